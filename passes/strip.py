"""Undo the graph side of an earlier compress (masks, quantizers, step node) so a new config can be planned.

Used when a compressed model is compressed again (SPEC §2.9): the module state (mask buffers,
quantizers with their ranges, the step counter) stays; only the nodes go, and the passes
rebuild them from the merged plans (a LayerNorm made a ``masked_layer_norm`` is an ``F.layer_norm``
again). Nodes are recognised by their role annotation or, in a
graph restored from pickle (which drops metadata), by the function or module class they call.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.annotations import META_KEY, get_role
from fxcompress.channel_groups import masked_channels, masked_layer_norm
from fxcompress.folding import bn_fold_scale, scale_bias, scale_rows, unscale_channels
from fxcompress.masking import masked_bias, masked_weight
from fxcompress.quant import ActivationQuantizer, StepCounter, WeightQuantizer

__all__ = ["strip_compression"]

_ADDED_MODULES = (ActivationQuantizer, WeightQuantizer, StepCounter)
FOLD_FUNCTIONS = (bn_fold_scale, scale_rows, scale_bias, unscale_channels)


def strip_compression(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove every mask, quantizer and step-counter node, and every plan annotation, from ``gm``'s graph.

    Args:
        gm: a GraphModule returned by ``compress``; edited in place (graph only).
    Returns:
        ``gm``: its graph computes the uncompressed model again from the same modules.
    """
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and node.target is masked_layer_norm:
            node.target, node.args = F.layer_norm, node.args[:5]  # the LayerNorm it was (as a function)
        elif _added(gm, node):
            if node.args:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        node.meta.pop(META_KEY, None)
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)  # the mask reads
    gm.graph = copy.deepcopy(gm.graph)  # a fresh namespace: the rebuilt nodes get their old names back
    gm.graph.lint()
    gm.recompile()
    return gm


def _added(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if get_role(node) is not None:
        return True
    if node.op == "call_function":
        return node.target in (masked_weight, masked_bias, masked_channels, *FOLD_FUNCTIONS)
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ADDED_MODULES)
