"""Module-level rewrite of the selected layers inside leaf modules (no graph node reaches them)."""

from __future__ import annotations

import torch.fx

from fxcompress.annotations import get_leaf_plan
from fxcompress.attention import replace_attention
from fxcompress.layers import CompressedLayer

__all__ = ["rewrite_leaf_layers"]


def rewrite_leaf_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Swap each compressed layer inside a leaf module for a CompressedLayer holding its parameters.

    A leaf that compresses anything has every ``nn.MultiheadAttention`` inside it swapped for a
    CompressedAttention (its ``in_proj``/``out_proj`` are then CompressedLayers): torch's attention
    reads those weights directly, and its fused fast paths (and those of ``nn.Transformer*`` layers
    around it) would read every weight raw.

    Args:
        gm: an annotated GraphModule; edited in place (module tree only, no node changes).
    Returns:
        ``gm``. Layers already swapped are left alone.
    """
    for node in list(gm.graph.nodes):
        leaf_plan = get_leaf_plan(node)
        if leaf_plan is None or not any(plan.compressed for plan in leaf_plan.layers):
            continue
        replace_attention(gm, leaf_plan.leaf)
        for plan in leaf_plan.layers:
            layer = gm.get_submodule(plan.name)
            if plan.compressed and not isinstance(layer, CompressedLayer):
                parent, _, attr = plan.name.rpartition(".")
                setattr(gm.get_submodule(parent), attr, CompressedLayer(layer))
    return gm
