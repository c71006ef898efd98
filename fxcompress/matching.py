"""Which sub-config applies to a layer (SPEC.md §2): pure functions of names and types."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from fxcompress.config import COMPRESSIBLE_TYPES, SubConfig, caller_stacklevel
from fxcompress.errors import ConfigError

__all__ = ["LayerInfo", "Resolution", "check_against_model", "compressible", "resolve", "resolve_all", "selects"]


@dataclass(frozen=True)
class Resolution:
    """The sub-config that applies to one layer, and the earlier ones that also selected it."""

    winner: SubConfig | None
    overridden: tuple[int, ...] = ()


def selects(sub: SubConfig, name: str, type_name: str) -> bool:
    """True when every selector of ``sub`` agrees on the layer ``name`` of type ``type_name``.

    Types and names intersect; ``op_names`` and ``op_partial_names`` unite.
    """
    if sub.op_types is not None and type_name not in sub.op_types:
        return False
    if sub.op_names is None and sub.op_partial_names is None:
        return True
    if sub.op_names is not None and name in sub.op_names:
        return True
    return sub.op_partial_names is not None and any(p in name for p in sub.op_partial_names)


def resolve(subs: Sequence[SubConfig], name: str, type_name: str) -> Resolution:
    """The last sub-config selecting the layer wins, whole; the earlier selecting ones are overridden."""
    matches = [s for s in subs if selects(s, name, type_name)]
    if not matches:
        return Resolution(None)
    return Resolution(matches[-1], tuple(s.index for s in matches[:-1]))


@dataclass(frozen=True)
class LayerInfo:
    """A module of the model as matching sees it: qualified name, class name, has children."""

    name: str
    type_name: str
    is_container: bool = False


def compressible(layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    """The layers fxcompress can compress, in module order."""
    return [m for m in layers if m.type_name in COMPRESSIBLE_TYPES]


def resolve_all(subs: Sequence[SubConfig], layers: Sequence[LayerInfo]) -> dict[str, Resolution]:
    """The resolution of every compressible layer that some sub-config selects, in module order."""
    out = {}
    for m in compressible(layers):
        res = resolve(subs, m.name, m.type_name)
        if res.winner is not None:
            out[m.name] = res
    return out


def check_against_model(subs: Sequence[SubConfig], layers: Sequence[LayerInfo], strict: bool = True) -> None:
    """SPEC.md §3's model-dependent checks; ConfigError when strict, else a warning each.

    Raises:
        ConfigError: an ``op_names`` entry that names no module or a module fxcompress cannot
            compress, a sub-config that applies to no layer, a cap naming a layer outside its group.
    """
    by_name = {m.name: m for m in layers}
    problems = []
    for sub in subs:
        problems += _check_names(sub, by_name)
    resolutions = resolve_all(subs, layers)
    for sub in subs:
        won = [n for n, r in resolutions.items() if r.winner is sub]
        if not won:
            problems.append(_no_layer_message(sub, layers, resolutions))
        cap = sub.prune.max_sparsity_per_layer if sub.prune else None
        if isinstance(cap, tuple):
            for name, _ in cap:
                if name not in won:
                    problems.append(f"config_list[{sub.index}]['max_sparsity_per_layer']: {name!r} is not a "
                                    f"layer this sub-config applies to ({', '.join(won) or 'none'})")
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
        elif by_name[name].type_name not in COMPRESSIBLE_TYPES:
            m = by_name[name]
            fix = (f"; to select the layers inside it use 'op_partial_names': ['{name}.']" if m.is_container
                   else "")
            problems.append(f"{place}: {name!r} is a {m.type_name}, which fxcompress cannot compress "
                            f"(it compresses {', '.join(COMPRESSIBLE_TYPES)}){fix}")
    return problems


def _no_layer_message(sub: SubConfig, layers: Sequence[LayerInfo], resolutions: dict[str, Resolution]) -> str:
    taken = sorted({resolutions[m.name].winner.index for m in compressible(layers)
                    if selects(sub, m.name, m.type_name)})
    if taken:
        later = ", ".join(f"config_list[{i}]" for i in taken)
        return (f"config_list[{sub.index}]: applies to no layer: every layer it selects is taken by the later "
                f"{later}; remove it or narrow the later sub-config")
    types = sorted({m.type_name for m in compressible(layers)})
    return (f"config_list[{sub.index}]: selects no layer of this model (its compressible layer types: "
            f"{', '.join(types) or 'none'}); check 'op_types' / 'op_names' / 'op_partial_names'")
