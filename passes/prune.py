"""Pruning pass: compute exact masks, zero the pruned entries and mask each pruned layer's gradient."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxcompress.annotations import LayerPlan, get_plan, layer_plans
from fxcompress.masking import masked_bias, masked_weight
from fxcompress.sparsity import global_masks, layer_mask

__all__ = ["compute_masks", "install_masks", "pending_masks", "rewrite_pruned_layers"]


def compute_masks(gm: torch.nn.Module, plans: dict[str, LayerPlan], fraction: float = 1.0
                  ) -> dict[str, torch.Tensor]:
    """Weight keep-masks of every pruned layer from its current weights, at ``fraction`` of the target.

    ``total_sparsity`` layers are allocated together per sub-config (the group of layers for
    which that sub-config is the one that applies).

    Raises:
        ConfigError: unreachable caps, or an N:M pattern that does not fit a layer.
    """
    masks: dict[str, torch.Tensor] = {}
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, plan in plans.items():
        if plan.prune is None:
            continue
        weight = gm.get_submodule(name).weight
        if plan.prune.total_sparsity is not None:
            groups.setdefault(plan.config_index, {})[name] = weight
        else:
            masks[name] = layer_mask(weight, plan.prune, name, fraction)
    for index, weights in groups.items():
        setting = plans[next(iter(weights))].prune
        masks.update(global_masks(weights, setting, f"config_list[{index}]", fraction))
    return {name: masks[name] for name in plans if name in masks}


def install_masks(gm: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Store masks as ``<layer>.weight_mask`` / ``<layer>.bias_mask`` buffers and zero the pruned entries.

    The buffers hold 1.0 (kept) and 0.0 (pruned) in the weight's dtype: multiplying by a bool
    tensor takes PyTorch's type-promotion path, about 5x slower than a same-dtype multiply on
    CPU, and the gradient is multiplied by the mask in every training step. A bias entry is
    pruned when the whole output row/filter it belongs to is pruned.
    """
    for name, mask in masks.items():
        layer = gm.get_submodule(name)
        dtype, device = layer.weight.dtype, layer.weight.device
        values = {"weight": mask.to(device, dtype)}
        if layer.bias is not None:
            values["bias"] = mask.reshape(mask.shape[0], -1).any(dim=1).to(device, dtype)
        with torch.no_grad():
            for param, value in values.items():
                getattr(layer, param).mul_(value)  # pruned entries are held at exactly zero
                if hasattr(layer, f"{param}_mask"):
                    getattr(layer, f"{param}_mask").copy_(value)
                else:
                    layer.register_buffer(f"{param}_mask", value)


def pending_masks(gm: torch.fx.GraphModule, fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """The masks of the pruned layers that have none yet (what :func:`rewrite_pruned_layers` installs).

    Raises:
        ConfigError: unreachable caps, or an N:M pattern that does not fit a layer.
    """
    plans = {n: p for n, p in layer_plans(gm.graph).items()
             if p.prune is not None and not hasattr(gm.get_submodule(n), "weight_mask")}
    return compute_masks(gm, plans, fraction)


def rewrite_pruned_layers(gm: torch.fx.GraphModule, fraction: float = 1.0, *,
                          masks: dict[str, torch.Tensor] | None = None,
                          finalize: bool = True) -> torch.fx.GraphModule:
    """Mask the weight (and bias) of every functional layer call annotated with a pruning plan.

    Args:
        gm: an annotated GraphModule whose compressed layers are functional (see functionalize).
        fraction: of each layer's configured sparsity to prune now (0: start dense, for a scheduler).
        masks: computed beforehand by :func:`pending_masks` (``compress`` does, to fail before
            changing anything); computed here when None.
    Returns:
        ``gm``, with ``masked_weight(weight, weight_mask)`` nodes feeding each pruned layer.
    Raises:
        ConfigError: before any change, when a mask cannot be computed.
    """
    install_masks(gm, pending_masks(gm, fraction) if masks is None else masks)
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        if node.op != "call_function" or plan is None or plan.prune is None:
            continue
        _mask_arg(gm.graph, node, 1, f"{plan.name}.weight_mask", masked_weight)
        if node.args[2] is not None:
            _mask_arg(gm.graph, node, 2, f"{plan.name}.bias_mask", masked_bias)
    if finalize:  # compress() runs the passes back to back and finalizes once
        gm.graph.lint()
        gm.recompile()
    return gm


def _mask_arg(graph: torch.fx.Graph, node: torch.fx.Node, index: int, mask_path: str, op: Any) -> None:
    arg = node.args[index]
    inner = arg.args[0] if arg.op == "call_module" and arg.target.endswith("_quantizer") else arg
    if inner.op == "call_function" and inner.target is op and inner.args[1].target == mask_path:
        return  # already masked (maybe quantized after): the pass is idempotent
    with graph.inserting_before(node):
        mask = graph.get_attr(mask_path)
        masked = graph.call_function(op, (arg, mask))
    node.update_arg(index, masked)
