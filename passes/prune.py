"""Pruning pass: install exact masks and multiply every read of a pruned layer's weight and bias by them."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.annotations import LayerPlan, NodeRole, get_plan, get_role, layer_plans, set_role
from fxcompress.attention import resolve_layer
from fxcompress.channel_groups import group_record, masked_channels, masked_layer_norm
from fxcompress.masking import masked_bias, masked_weight
from fxcompress.passes.group_plan import LayerNormCall, layer_norm_call
from fxcompress.pruning import compute_masks, install_masks

__all__ = ["pending_masks", "renorm_layer_norm", "rewrite_pruned_layers"]


def pending_masks(gm: torch.fx.GraphModule, fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """The masks of the pruned layers that have none yet (what :func:`rewrite_pruned_layers` installs).

    A ``weight_mask`` a layer already holds is an earlier compress's (``compress`` refuses foreign ones).

    Args:
        gm: an annotated GraphModule.
        fraction: of each layer's configured sparsity to prune now (0: start dense, for a scheduler);
            the full target is checked either way, so an unreachable one fails now.
    Raises:
        ConfigError: unreachable caps, or an N:M pattern that does not fit a layer.
    """
    plans = {n: p for n, p in layer_plans(gm.graph).items()
             if p.prune is not None and p.compressed and "weight_mask" not in resolve_layer(gm, n)._buffers}
    masks = compute_masks(gm, plans, 1.0)  # the final target must be reachable (SPEC §3), whatever fraction
    return masks if fraction >= 1.0 else compute_masks(gm, plans, fraction)


def rewrite_pruned_layers(gm: torch.fx.GraphModule, fraction: float = 1.0, *,
                          masks: dict[str, torch.Tensor] | None = None,
                          finalize: bool = True) -> torch.fx.GraphModule:
    """Multiply every read of a pruned layer's weight (and bias) by its mask.

    Args:
        gm: an annotated GraphModule whose compressed layers are functional (see functionalize).
        fraction: of each layer's configured sparsity to prune now (0: start dense, for a scheduler).
        masks: computed beforehand by :func:`pending_masks` (``compress`` does, to fail before
            changing anything); computed here when None.
    Returns:
        ``gm``, with a ``masked_weight(read, <layer>.<param>_mask)`` node after each read.
    Raises:
        ConfigError: before any change, when a mask cannot be computed.
    """
    install_masks(gm, pending_masks(gm, fraction) if masks is None else masks)
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        if node.op == "get_attr" and plan is not None and plan.prune is not None and plan.compressed:
            _mask_read(gm.graph, node, plan)
    _renorm_layer_norms(gm)
    _mask_norm_outputs(gm)
    if finalize:  # compress() runs the passes back to back and finalizes once
        gm.graph.lint()
        gm.recompile()
    return gm


def _renorm_layer_norms(gm: torch.fx.GraphModule) -> None:
    """Make each LayerNorm over a pruned group's channels a :func:`masked_layer_norm` (statistics over the
    kept channels, pruned channels 0), in place: the node keeps its name and users."""
    record = group_record(gm)
    owners = {n for p in (record.plans if record is not None else ()) if p.prune is not None for n in p.renormed}
    for node in list(gm.graph.nodes):
        call = layer_norm_call(gm, node)
        if call is None or call.owner not in owners or "weight_mask" not in gm.get_submodule(call.owner)._buffers:
            continue
        renorm_layer_norm(gm, node, call, f"{call.owner}.weight_mask")


def renorm_layer_norm(gm: torch.fx.GraphModule, node: torch.fx.Node, call: LayerNormCall, mask: str) -> None:
    """Make the LayerNorm ``node`` (``call``) a :func:`masked_layer_norm` with the mask at attribute
    ``mask``, in place: the node keeps its name and users."""
    weight, bias = call.weight, call.bias
    with gm.graph.inserting_before(node):
        if node.op == "call_module":
            weight = gm.graph.get_attr(f"{call.owner}.weight")
            if gm.get_submodule(call.owner).bias is not None:
                bias = gm.graph.get_attr(f"{call.owner}.bias")
        read = gm.graph.get_attr(mask)
    node.op, node.target = "call_function", masked_layer_norm
    node.args, node.kwargs = (call.input, call.normalized_shape, weight, bias, call.eps, read), {}


def _mask_norm_outputs(gm: torch.fx.GraphModule) -> None:
    """Zero the pruned channels after each norm of a pruned group (its weight and bias masked, in effect)."""
    record = group_record(gm)
    norms = {n for p in (record.plans if record is not None else ()) if p.prune is not None for n in p.norms}
    for node in list(gm.graph.nodes):
        name = _norm_called(node)
        if name not in norms or "weight_mask" not in gm.get_submodule(name)._buffers:
            continue
        if any(get_role(u) == NodeRole(name, "weight_mask") for u in node.users):
            continue  # already masked: the pass is idempotent
        with gm.graph.inserting_after(node):
            mask = gm.graph.get_attr(f"{name}.weight_mask")
        with gm.graph.inserting_after(mask):
            masked = gm.graph.call_function(masked_channels, (node, mask))
        set_role(masked, NodeRole(name, "weight_mask"))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user, masked=masked: user is not masked)


def _norm_called(node: torch.fx.Node) -> str | None:
    """The norm module a node runs: a module call, or ``F.batch_norm``/``F.instance_norm`` on its weight."""
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and node.target in (F.batch_norm, F.instance_norm):
        for a in (*node.args, *node.kwargs.values()):
            if isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target.endswith(".weight"):
                return a.target.rpartition(".")[0]
    return None


def _mask_read(graph: torch.fx.Graph, read: torch.fx.Node, plan: LayerPlan) -> None:
    param = read.target.rpartition(".")[2]
    kind = f"{param}_mask"
    if any(get_role(u) == NodeRole(plan.name, kind) for u in read.users):
        return  # already masked: the pass is idempotent
    with graph.inserting_after(read):
        mask = graph.get_attr(f"{plan.name}.{kind}")
    with graph.inserting_after(mask):
        masked = graph.call_function(masked_weight if param == "weight" else masked_bias, (read, mask))
    set_role(masked, NodeRole(plan.name, kind))
    read.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
