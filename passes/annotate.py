"""Config pass: annotate every compressible call site with its LayerPlan; changes no node."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from fxcompress.annotations import LayerPlan, get_plan, set_plan, type_name_of
from fxcompress.config import COMPRESSIBLE_TYPES, SubConfig
from fxcompress.matching import resolve

__all__ = ["annotate_layers", "plan_for"]


def plan_for(subs: Sequence[SubConfig], name: str, type_name: str) -> LayerPlan | None:
    """The LayerPlan of one layer, or None when no sub-config selects it."""
    res = resolve(subs, name, type_name)
    win = res.winner
    if win is None:
        return None
    return LayerPlan(name=name, type_name=type_name, config_index=win.index, overridden=res.overridden,
                     excluded=win.exclude, prune=win.prune, quant=win.quant)


def annotate_layers(gm: torch.fx.GraphModule, subs: Sequence[SubConfig]) -> torch.fx.GraphModule:
    """Write ``node.meta["fxcompress"]`` on each call of a compressible module some sub-config selects.

    Args:
        gm: a traced model; edited in place (metadata only).
        subs: the parsed config list.
    Returns:
        ``gm``. A node annotated before keeps its plan (the pass is idempotent).
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or get_plan(node) is not None:
            continue
        type_name = type_name_of(modules[node.target])
        if type_name not in COMPRESSIBLE_TYPES:
            continue
        plan = plan_for(subs, node.target, type_name)
        if plan is not None:
            set_plan(node, plan)
    gm.graph.lint()
    return gm
