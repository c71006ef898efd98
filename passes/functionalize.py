"""Rewrite each compressed layer's ``call_module`` into its functional op on visible parameters.

``conv1(x)`` becomes ``conv2d(x, conv1.weight, conv1.bias, stride, padding, dilation, groups)``
with ``get_attr`` nodes for the parameters, so later passes can splice masks and quantizers into
the weight, bias, input and output edges. The module stays in the tree and owns the state.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.annotations import get_plan, set_plan

__all__ = ["FUNCTIONAL_OPS", "functionalize_layers"]

FUNCTIONAL_OPS = {torch.nn.Linear: F.linear, torch.nn.Conv1d: F.conv1d, torch.nn.Conv2d: F.conv2d,
                  torch.nn.Conv3d: F.conv3d}


def functionalize_layers(gm: torch.fx.GraphModule, *, finalize: bool = True) -> torch.fx.GraphModule:
    """Replace every annotated, compressed ``call_module`` node by its functional form.

    Args:
        gm: an annotated GraphModule, edited in place.
    Returns:
        ``gm``; the new node carries the same LayerPlan. Already functional layers are left alone.
    """
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        if node.op != "call_module" or plan is None or not plan.compressed:
            continue
        module = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            new = gm.graph.call_function(FUNCTIONAL_OPS[type(module)],
                                         _functional_args(gm.graph, module, _input_of(node), weight, bias))
        set_plan(new, plan)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if finalize:  # compress() runs the passes back to back and finalizes once
        gm.graph.lint()
        gm.recompile()
    return gm


def _input_of(node: torch.fx.Node) -> torch.fx.Node:
    """The layer's input, passed positionally or as ``input=`` (the name torch's layers use)."""
    return node.args[0] if node.args else node.kwargs["input"]


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
