"""Config pass: annotate every compressible call site with its LayerPlan; changes no node."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from fxcompress.annotations import META_KEY, LayerPlan, LeafPlan, set_plan, type_name_of
from fxcompress.config import COMPRESSIBLE_TYPES, SubConfig
from fxcompress.matching import resolve

__all__ = ["annotate_layers", "plan_for"]


def plan_for(subs: Sequence[SubConfig], name: str, type_name: str, leaf: str | None = None) -> LayerPlan | None:
    """The LayerPlan of one layer, or None when no sub-config selects it."""
    res = resolve(subs, name, type_name)
    win = res.winner
    if win is None:
        return None
    return LayerPlan(name=name, type_name=type_name, config_index=win.index, overridden=res.overridden,
                     excluded=win.exclude, prune=win.prune, quant=win.quant, leaf=leaf)


def annotate_layers(gm: torch.fx.GraphModule, subs: Sequence[SubConfig]) -> torch.fx.GraphModule:
    """Write ``node.meta["fxcompress"]`` on each call of a compressible module some sub-config selects.

    A call of a leaf module (one the tracer did not enter) that holds selected layers gets a
    LeafPlan listing their plans; they are rewritten at module level later.

    Args:
        gm: a traced model; edited in place (metadata only).
        subs: the parsed config list.
    Returns:
        ``gm``. A node annotated before keeps its plan (the pass is idempotent).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or META_KEY in node.meta:
            continue
        module = gm.get_submodule(node.target)
        type_name = type_name_of(module)
        if type_name in COMPRESSIBLE_TYPES:
            plan = plan_for(subs, node.target, type_name)
        else:
            inner = (plan_for(subs, f"{node.target}.{name}", type_name_of(m), leaf=node.target)
                     for name, m in module.named_modules() if name and type_name_of(m) in COMPRESSIBLE_TYPES)
            layers = tuple(p for p in inner if p is not None)
            plan = LeafPlan(node.target, layers) if layers else None
        if plan is not None:
            set_plan(node, plan)
    gm.graph.lint()
    return gm
