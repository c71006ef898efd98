"""Which sub-config applies to a layer (SPEC.md §2): pure functions of names, types and plans."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fxcompress.errors import ConfigError, caller_stacklevel
from fxcompress.layer_types import NOT_SUPPORTED
from fxcompress.settings import COMPRESSIBLE_TYPES, SubConfig

__all__ = ["LayerInfo", "Resolution", "check_against_model", "check_traced", "compressible", "report_problems",
           "resolve", "resolve_all", "selects"]


@dataclass(frozen=True)
class Resolution:
    """The sub-config that applies to one layer, and the earlier ones that also selected it."""

    winner: SubConfig | None
    overridden: tuple[int, ...] = ()


@dataclass(frozen=True)
class LayerInfo:
    """A module of the model as matching sees it.

    ``type_names`` are the names ``op_types`` matches: the class's own name and, for a subclass
    of a torch layer, that layer's name (SPEC §2.1). ``is_compressible``: fxcompress can compress it.
    """

    name: str
    type_names: tuple[str, ...]
    is_container: bool = False
    is_compressible: bool = False

    @classmethod
    def of(cls, name: str, type_name: str) -> LayerInfo:
        """A layer known by one type name (compressible when it is one of torch's layer names)."""
        return cls(name, (type_name,), False, type_name in COMPRESSIBLE_TYPES)


def selects(sub: SubConfig, name: str, type_names: tuple[str, ...] | str) -> bool:
    """True when every selector of ``sub`` agrees on the layer ``name`` with these type names.

    Types and names intersect; ``op_names`` and ``op_partial_names`` unite.
    """
    names = (type_names,) if isinstance(type_names, str) else type_names
    if sub.op_types is not None and not any(t in sub.op_types for t in names):
        return False
    if sub.op_names is None and sub.op_partial_names is None:
        return True
    if sub.op_names is not None and name in sub.op_names:
        return True
    return sub.op_partial_names is not None and any(p in name for p in sub.op_partial_names)


def resolve(subs: Sequence[SubConfig], name: str, type_names: tuple[str, ...] | str) -> Resolution:
    """The last sub-config selecting the layer wins, whole; the earlier selecting ones are overridden."""
    matches = [s for s in subs if selects(s, name, type_names)]
    if not matches:
        return Resolution(None)
    return Resolution(matches[-1], tuple(s.index for s in matches[:-1]))


def compressible(layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    """The layers fxcompress can compress, in module order."""
    return [m for m in layers if m.is_compressible]


def resolve_all(subs: Sequence[SubConfig], layers: Sequence[LayerInfo]) -> dict[str, Resolution]:
    """The resolution of every compressible layer that some sub-config selects, in module order."""
    out = {}
    for m in compressible(layers):
        res = resolve(subs, m.name, m.type_names)
        if res.winner is not None:
            out[m.name] = res
    return out


def check_against_model(subs: Sequence[SubConfig], layers: Sequence[LayerInfo], strict: bool = True) -> None:
    """SPEC.md §3's checks against the module tree; ConfigError when strict, else a warning each.

    Raises:
        ConfigError: an ``op_names`` entry that names no module or a module fxcompress cannot
            compress; an ``op_types`` entry that names no layer type of the model; a sub-config
            that applies to no layer; a cap naming a layer outside its group.
    """
    by_name = {m.name: m for m in layers}
    problems = []
    for sub in subs:
        problems += _check_names(sub, by_name) + _check_types(sub, layers)
    resolutions = resolve_all(subs, layers)
    for sub in subs:
        won = [n for n, r in resolutions.items() if r.winner is sub]
        if not won:
            problems.append(_no_layer_message(sub, layers, resolutions))
        cap = sub.prune.max_sparsity_per_layer if sub.prune else None
        for name, _ in cap if isinstance(cap, tuple) else ():
            if name not in won:
                problems.append(f"config_list[{sub.index}]['max_sparsity_per_layer']: {name!r} is not a "
                                f"layer this sub-config applies to ({', '.join(won) or 'none'})")
    report_problems(problems, strict)


def check_traced(subs: Sequence[SubConfig], plans: Mapping[str, Any], strict: bool = True) -> None:
    """SPEC.md §2.7's checks against what the traced forward uses (``plans``: name -> LayerPlan,
    unused layers included); ConfigError when strict, else a warning each. A layer selected only
    by type or partial name that the forward never uses is no error: the plan lists it as unused.

    Raises:
        ConfigError: an ``op_names`` layer the forward never uses; a layer whose input cannot be
            reached for input quantization.
    """
    problems = []
    for sub in subs:
        for name in sub.op_names or ():
            if name in plans and not plans[name].used and plans[name].config_index == sub.index:
                problems.append(f"config_list[{sub.index}]['op_names']: {name!r} is never called nor its weight "
                                "read by the traced forward, so nothing would be compressed; remove it from "
                                "op_names")
    for name, plan in plans.items():
        if plan.blocked is not None and (plan.prune is not None or plan.quant is not None):
            problems.append(f"layer {name!r} is selected but cannot be compressed: {plan.blocked}. Exclude it "
                            f"({{'op_names': [{name!r}], 'exclude': True}}) or pass strict=False to leave it as is")
        if plan.compressed and plan.quant is not None:
            problems += [f"layer {name!r}: activation quantization cannot reach {where}; its weight is "
                         "quantized there without those activation quantizers. Fix: call the layer as a module "
                         "or drop the activation from its quant_types" for where in plan.unreachable]
    report_problems(problems, strict)


def report_problems(problems: Sequence[str], strict: bool) -> None:
    """Raise the first problem as a ConfigError when strict, else warn each (pointing at user code)."""
    if problems and strict:
        raise ConfigError(problems[0])
    for problem in problems:
        warnings.warn(f"{problem} (ignored: strict=False)", UserWarning, stacklevel=caller_stacklevel())


def _check_names(sub: SubConfig, by_name: dict[str, LayerInfo]) -> list[str]:
    problems = []
    for name in sub.op_names or ():
        place = f"config_list[{sub.index}]['op_names']"
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            problems.append(f"{place}: no module named {name!r} in the model{hint}")
        elif not by_name[name].is_compressible:
            m = by_name[name]
            fix = (f"; to select the layers inside it use 'op_partial_names': ['{name}.']" if m.is_container
                   else f": {NOT_SUPPORTED[m.type_names[0]]}" if m.type_names[0] in NOT_SUPPORTED else "")
            problems.append(f"{place}: {name!r} is a {m.type_names[0]}, which fxcompress cannot compress "
                            f"(it compresses {', '.join(COMPRESSIBLE_TYPES)} and their subclasses){fix}")
    return problems


def _check_types(sub: SubConfig, layers: Sequence[LayerInfo]) -> list[str]:
    present = {t for m in compressible(layers) for t in m.type_names}
    problems = []
    for name in sub.op_types or ():
        if name not in COMPRESSIBLE_TYPES and name not in present:
            close = difflib.get_close_matches(name, sorted(present | set(COMPRESSIBLE_TYPES)), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"config_list[{sub.index}]['op_types']: {name!r} is not the type of any compressible "
                            f"layer of this model; {hint}its layer types: {', '.join(sorted(present)) or 'none'}")
    return problems


def _no_layer_message(sub: SubConfig, layers: Sequence[LayerInfo], resolutions: dict[str, Resolution]) -> str:
    taken = sorted({resolutions[m.name].winner.index for m in compressible(layers)
                    if selects(sub, m.name, m.type_names)})
    if taken:
        later = ", ".join(f"config_list[{i}]" for i in taken)
        return (f"config_list[{sub.index}]: applies to no layer: every layer it selects is taken by the later "
                f"{later}; remove it or narrow the later sub-config")
    types = sorted({t for m in compressible(layers) for t in m.type_names})
    return (f"config_list[{sub.index}]: selects no layer of this model (its compressible layer types: "
            f"{', '.join(types) or 'none'}); check 'op_types' / 'op_names' / 'op_partial_names'")
