"""Rewrite each compressed layer's ``call_module`` into its functional op on visible parameters.

``conv1(x)`` becomes ``conv2d(x, conv1.weight, conv1.bias, stride, padding, dilation, groups)``
with ``get_attr`` nodes for the parameters, so later passes can splice masks and quantizers into
the weight, bias, input and output edges. The module stays in the tree and owns the state. Each
parameter ends up read by one ``get_attr`` node (a layer called twice shares it), so its mask
and weight quantizer run once per forward.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.annotations import get_plan, set_plan
from fxcompress.layer_types import compressible_base
from fxcompress.passes.annotate import layer_input

__all__ = ["FUNCTIONAL_OPS", "functionalize_layers"]

FUNCTIONAL_OPS = {torch.nn.Linear: F.linear, torch.nn.Conv1d: F.conv1d, torch.nn.Conv2d: F.conv2d,
                  torch.nn.Conv3d: F.conv3d}


def functionalize_layers(gm: torch.fx.GraphModule, *, finalize: bool = True) -> torch.fx.GraphModule:
    """Replace every annotated, compressed ``call_module`` node by its functional form.

    Args:
        gm: an annotated GraphModule, edited in place.
    Returns:
        ``gm``; the new nodes carry the same LayerPlan. Already functional layers are left alone.
    """
    reads: dict[str, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        if node.op == "get_attr" and plan is not None:
            _share_read(gm.graph, node, reads)
        if node.op != "call_module" or plan is None or not plan.compressed:
            continue
        module = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            weight = _read(gm.graph, f"{node.target}.weight", plan, reads)
            bias = _read(gm.graph, f"{node.target}.bias", plan, reads) if module.bias is not None else None
            new = gm.graph.call_function(FUNCTIONAL_OPS[compressible_base(module)],
                                         _functional_args(gm.graph, module, layer_input(node), weight, bias))
        set_plan(new, plan)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if finalize:  # compress() runs the passes back to back and finalizes once
        gm.graph.lint()
        gm.recompile()
    return gm


def _read(graph: torch.fx.Graph, target: str, plan: object, reads: dict[str, torch.fx.Node]) -> torch.fx.Node:
    """The one ``get_attr`` node of a parameter: an earlier one is valid everywhere later in the graph."""
    if target not in reads:
        reads[target] = graph.get_attr(target)
        set_plan(reads[target], plan)
    return reads[target]


def _share_read(graph: torch.fx.Graph, node: torch.fx.Node, reads: dict[str, torch.fx.Node]) -> None:
    first = reads.setdefault(node.target, node)
    if first is not node:
        node.replace_all_uses_with(first)
        graph.erase_node(node)


def _functional_args(graph: torch.fx.Graph, module: torch.nn.Module, x: torch.fx.Node,
                     weight: torch.fx.Node, bias: torch.fx.Node | None) -> tuple:
    if isinstance(module, torch.nn.Linear):
        return (x, weight, bias)
    padding = module.padding
    if module.padding_mode != "zeros":
        # nn.ConvNd pads explicitly for these modes and convolves with zero padding.
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                {"mode": module.padding_mode})
        padding = (0,) * len(module.kernel_size)
    return (x, weight, bias, module.stride, padding, module.dilation, module.groups)
