"""The frozen settings a config_list parses into, the names it may use, and exact ratio counts."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

__all__ = [
    "COMPRESSIBLE_TYPES",
    "CRITERIA",
    "DEFAULT_DTYPE",
    "DEFAULT_SCHEME",
    "DTYPES",
    "GRADIENT_CRITERIA",
    "KNOWN_TYPE_NAMES",
    "QUANT_TYPES",
    "SCHEMES",
    "PruneSetting",
    "QuantPlan",
    "QuantSetting",
    "SubConfig",
    "ratio_floor",
    "suggest_type_name",
]

#: Layer type names fxcompress rewrites; what ``op_types: ['default']`` stands for.
COMPRESSIBLE_TYPES: tuple[str, ...] = ("Conv1d", "Conv2d", "Conv3d", "Linear")
#: The ``op_types`` names known without looking at a model (a model adds its own class names).
KNOWN_TYPE_NAMES: tuple[str, ...] = COMPRESSIBLE_TYPES + ("default",)
QUANT_TYPES: tuple[str, ...] = ("weight", "input", "output")
SCHEMES: tuple[str, ...] = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                            "per_channel_symmetric")
DTYPES: tuple[str, ...] = ("int", "uint")
CRITERIA: tuple[str, ...] = ("level", "l1", "l2", "fpgm", "random", "taylor")
#: Criteria that rank by gradients, not by the weights alone: their masks wait for ``update_masks(gm, data=...)``.
GRADIENT_CRITERIA: tuple[str, ...] = ("taylor",)
#: SPEC.md §5 defaults: weights per channel symmetric int, activations per tensor affine uint.
DEFAULT_SCHEME: Mapping[str, str] = MappingProxyType(
    {"weight": "per_channel_symmetric", "input": "per_tensor_affine", "output": "per_tensor_affine"})
DEFAULT_DTYPE: Mapping[str, str] = MappingProxyType({"weight": "int", "input": "uint", "output": "uint"})


def ratio_floor(ratio: float, n: int) -> int:
    """``floor(ratio * n)`` computed on the decimal the user wrote (0.29 of 100 is 29, not 28).

    Args:
        ratio: a fraction as the user wrote it.
        n: the count it applies to.
    Returns:
        The exact floor, free of binary float error.

    >>> ratio_floor(0.29, 100)
    29
    """
    return math.floor(Fraction(repr(float(ratio))) * n)


def suggest_type_name(name: str, known: Iterable[str] = KNOWN_TYPE_NAMES) -> str | None:
    """The known ``op_types`` name closest to ``name``: a case-insensitive match first, then difflib.

    Args:
        name: an ``op_types`` entry that matched nothing.
        known: the names it may have meant (the model's layer type names, ``KNOWN_TYPE_NAMES``).
    Returns:
        The suggestion, or None when nothing is close.

    >>> suggest_type_name("conv2d")
    'Conv2d'
    """
    known = list(dict.fromkeys(known))
    same_case = [k for k in known if k.lower() == name.lower()]
    if same_case:
        return same_case[0]
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


@dataclass(frozen=True)
class QuantSetting:
    """How one tensor kind (weight, input or output) of a layer is fake-quantized."""

    bits: int
    scheme: str
    dtype: str
    #: ``quant_reduce_range`` (activations only): the levels of ``bits - 1`` bits, stored in ``bits``
    #: (torch.ao's ``reduce_range``): uint8 activations use 0..127, so x86 int8 kernels without VNNI
    #: cannot saturate their 16-bit pair sums (README, Deploy).
    reduce_range: bool = False

    def __repr__(self) -> str:
        # reduce_range only when set: checkpoint fingerprints (repr of the plans) made before the key
        # existed still match
        extra = ", reduce_range=True" if self.reduce_range else ""
        return f"QuantSetting(bits={self.bits!r}, scheme={self.scheme!r}, dtype={self.dtype!r}{extra})"

    @property
    def level_bits(self) -> int:
        """The bits whose levels are used: ``bits``, or one fewer with ``reduce_range``."""
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def qmin(self) -> int:
        """The smallest integer level (SPEC.md §5: ``int`` is narrow, as NNI)."""
        return 0 if self.dtype == "uint" else -(2 ** (self.level_bits - 1) - 1)

    @property
    def qmax(self) -> int:
        """The largest integer level."""
        return 2**self.level_bits - 1 if self.dtype == "uint" else 2 ** (self.level_bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        """True for the per-output-channel schemes."""
        return self.scheme.startswith("per_channel")

    @property
    def symmetric(self) -> bool:
        """True for the symmetric schemes."""
        return self.scheme.endswith("symmetric")


@dataclass(frozen=True)
class QuantPlan:
    """The quantization a sub-config asks for: one setting per quantized tensor kind."""

    weight: QuantSetting | None
    input: QuantSetting | None
    output: QuantSetting | None
    start_step: int = 0

    @property
    def types(self) -> tuple[str, ...]:
        """The quantized tensor kinds, in ``QUANT_TYPES`` order."""
        return tuple(t for t in QUANT_TYPES if getattr(self, t) is not None)


@dataclass(frozen=True)
class PruneSetting:
    """The pruning a sub-config asks for.

    Exactly one of ``sparsity_per_layer`` / ``total_sparsity`` is set, except for an
    ``N:M`` granularity, which fixes the sparsity itself and takes neither.
    """

    sparsity_per_layer: float | None = None
    total_sparsity: float | None = None
    max_sparsity_per_layer: float | tuple[tuple[str, float], ...] | None = None
    criterion: str = "level"
    granularity: str = "element"
    seed: int = 0

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` for an ``'N:M'`` granularity, else None."""
        if ":" not in self.granularity:
            return None
        n, m = self.granularity.split(":")
        return int(n), int(m)

    def cap_for(self, name: str) -> float | None:
        """The ``max_sparsity_per_layer`` cap of one layer, or None when uncapped."""
        cap = self.max_sparsity_per_layer
        if isinstance(cap, tuple):
            return dict(cap).get(name)
        return cap


@dataclass(frozen=True)
class SubConfig:
    """One validated sub-config of a config_list; ``index`` is its place in the list."""

    index: int
    op_types: tuple[str, ...] | None = None
    op_names: tuple[str, ...] | None = None
    op_partial_names: tuple[str, ...] | None = None
    exclude: bool = False
    prune: PruneSetting | None = None
    quant: QuantPlan | None = None
