"""Group planning for ``granularity: 'out_channel'``: which dependency groups are pruned, and why not.

Runs the channel analysis (passes/dependencies.py) on the traced model and the example inputs, and
records in the module tree (``fxcompress_groups``, a :class:`~fxcompress.channel_groups.GroupRecord`)
every group that an ``out_channel`` layer makes channels of: pruned with that layer's setting when
every layer making its channels is pruned alike, else not pruned with the reason. Also records each
Conv/Linear call's multiply-accumulates on the example inputs (for the FLOPs the report shows).
Changes no node and no parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxcompress.annotations import LayerPlan
from fxcompress.attention import resolve_layer
from fxcompress.channel_groups import GROUPS, GroupPlan, GroupRecord
from fxcompress.passes.annotate import COMPUTE_OPS, layer_weight
from fxcompress.passes.dependencies import ChannelGroup, analyze_channels

__all__ = ["NORM_TYPES", "LayerNormCall", "attach_group_record", "layer_norm_call", "needs_groups",
           "out_channel_layers"]

#: Norms with per-channel statistics whose output a group mask zeroes (LayerNorm/GroupNorm average across).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def out_channel_layers(plans: Mapping[str, LayerPlan]) -> dict[str, LayerPlan]:
    """The layers a config prunes with ``granularity: 'out_channel'``."""
    return {n: p for n, p in plans.items()
            if p.compressed and p.prune is not None and p.prune.granularity == "out_channel"}


def needs_groups(gm: nn.Module, plans: Mapping[str, LayerPlan]) -> bool:
    """True when some ``out_channel`` layer has no mask yet (an earlier compress's masks stay)."""
    return any("weight_mask" not in resolve_layer(gm, n)._buffers for n in out_channel_layers(plans))


def attach_group_record(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any],
                        plans: Mapping[str, LayerPlan]) -> GroupRecord:
    """Analyse ``gm``'s channel dependencies and store the group plans as ``gm.fxcompress_groups``.

    Args:
        gm: the traced, annotated model (before any rewrite); run once in eval mode, unchanged.
        example_inputs: a tensor or the tuple of positional inputs.
        plans: every layer's plan.
    Returns:
        The record (also in ``gm``'s module tree, replacing an earlier one).
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    analysis = analyze_channels(gm, inputs)
    selected = out_channel_layers(plans)
    nodes = {n.name: n for n in gm.graph.nodes}
    group_plans = [_group_plan(gm, g, selected, nodes) for g in analysis.groups]
    group_plans = [p for p in group_plans if p is not None]
    grouped = {layer for p in group_plans for layer in p.layers}
    ungrouped = {n: _why_ungrouped(p) for n, p in selected.items() if n not in grouped}
    macs, depthwise = _layer_macs(gm, analysis.shapes)
    shapes = tuple((tuple(x.shape), x.dtype) for x in inputs if isinstance(x, torch.Tensor))
    record = GroupRecord(group_plans, macs, depthwise, shapes, ungrouped).train(gm.training)
    if hasattr(gm, GROUPS):
        delattr(gm, GROUPS)
    gm.add_module(GROUPS, record)
    return record


def _group_plan(gm: nn.Module, group: ChannelGroup, selected: Mapping[str, LayerPlan],
                nodes: Mapping[str, torch.fx.Node]) -> GroupPlan | None:
    layers = tuple(dict.fromkeys(m.layer for m in group.members if m.role == "out" and m.param == "weight"))
    mine = [n for n in layers if n in selected]
    if not mine:
        return None
    norms = tuple(dict.fromkeys(m.layer for m in group.members if m.role == "norm" and _is_norm(gm, m.layer)))
    settings = {selected[n].prune for n in mine}
    first = selected[mine[0]]
    reason = None
    renormed, not_renormed = _renormed(gm, group, nodes)
    if group.blocked_by is not None:
        reason = _blocked(group.blocked_by)
    elif len(mine) < len(layers):
        others = [n for n in layers if n not in selected]
        reason = (f"partly selected: {', '.join(map(repr, others))} also make these channels and are not pruned "
                  "with granularity 'out_channel'")
    elif len(settings) > 1:
        other = next(selected[n] for n in mine if selected[n].prune != first.prune)
        reason = (f"its layers have different settings: {first.name!r} config_list[{first.config_index}], "
                  f"{other.name!r} config_list[{other.config_index}]")
    elif not_renormed is not None:
        reason = not_renormed
    else:
        bare = [n for n in norms if getattr(gm.get_submodule(n), "weight", None) is None]
        if bare:
            reason = (f"norm {bare[0]!r} has no affine weight and bias to mask: its running statistics would give a "
                      "pruned channel a value in eval mode only")
    if reason is not None:
        return GroupPlan(group, layers, norms, None, first.config_index, reason)
    return GroupPlan(group, layers, norms + renormed, first.prune, first.config_index, renormed=renormed)


@dataclass(frozen=True)
class LayerNormCall:
    """A LayerNorm call whose affine parameters are a module's ``weight`` and ``bias`` (``owner``): a module
    call, or ``F.layer_norm`` on that module's parameters (torchvision's and timm's LayerNorm2d)."""

    owner: str
    input: Any
    normalized_shape: list[int]
    weight: torch.fx.Node | None  # the read of ``<owner>.weight``; None for a module call
    bias: torch.fx.Node | None
    eps: float


def layer_norm_call(gm: nn.Module, node: torch.fx.Node) -> LayerNormCall | None:
    """The LayerNorm ``node`` runs, when its weight is a 1-d ``weight`` parameter of one module, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.LayerNorm) or type(m).forward is not nn.LayerNorm.forward or len(node.args) != 1:
            return None
        owner, shape, weight, bias, eps = node.target, list(m.normalized_shape), None, None, m.eps
    elif node.op == "call_function" and node.target is F.layer_norm:
        args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args, strict=False))
        args.update(node.kwargs)
        weight, bias = args.get("weight"), args.get("bias")
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or not weight.target.endswith(".weight"):
            return None
        owner = weight.target.rpartition(".")[0]
        if bias is not None and (not isinstance(bias, torch.fx.Node) or bias.target != f"{owner}.bias"):
            return None
        shape, eps = list(args["normalized_shape"]), float(args.get("eps", 1e-5))
    else:
        return None
    m = gm.get_submodule(owner)
    if not isinstance(m._parameters.get("weight"), nn.Parameter) or m.weight.dim() != 1:
        return None
    if node.op == "call_module" and m._parameters.get("bias") is None and getattr(m, "bias", None) is not None:
        return None
    return LayerNormCall(owner, node.args[0], shape, weight, bias, eps)


def _renormed(gm: torch.fx.GraphModule, group: ChannelGroup, nodes: Mapping[str, torch.fx.Node]
              ) -> tuple[tuple[str, ...], str | None]:
    """The LayerNorms averaging across the group that can take their statistics over the kept channels (by
    module), or the reason one cannot (a GroupNorm, a LayerNorm without a 1-d affine weight)."""
    owners = []
    for name in group.statistics:
        call = layer_norm_call(gm, nodes[name]) if name in nodes else None
        if call is None:
            return (), (f"{name!r} (a GroupNorm, or a LayerNorm without a 1-d affine weight) averages across these "
                        "channels: removing them would change its mean and variance")
        owners.append(call.owner)
    return tuple(dict.fromkeys(owners)), None


def _is_norm(gm: nn.Module, name: str) -> bool:
    try:
        return isinstance(gm.get_submodule(name), NORM_TYPES)
    except AttributeError:
        return False


def _blocked(node: str) -> str:
    if node == "output":
        return "blocked by 'output': the model returns these channels"
    return f"blocked by node {node!r}, which reads these channels in a way that cannot shrink"


def _why_ungrouped(plan: LayerPlan) -> str:
    if plan.leaf:
        return f"inside leaf module {plan.leaf!r}, whose channels the dependency analysis does not follow"
    return "its output channels are in no dependency group (the analysis does not see its call)"


def _layer_macs(gm: torch.fx.GraphModule, shapes: Mapping[torch.fx.Node, torch.Size]
                ) -> tuple[dict[str, int], set[str]]:
    """Multiply-accumulates of each Conv/Linear on the example inputs, and the depthwise convs."""
    macs: dict[str, int] = {}
    depthwise: set[str] = set()
    for node in gm.graph.nodes:
        name, groups = _layer_call(gm, node)
        if name is None or node not in shapes:
            continue
        weight = gm.get_submodule(name).weight
        macs[name] = macs.get(name, 0) + shapes[node].numel() * (weight.numel() // weight.shape[0])
        if weight.dim() > 2 and weight.shape[1] == 1 and groups > 1:
            depthwise.add(name)
    return macs, depthwise


def _layer_call(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, int]:
    """The Conv/Linear a node calls (a module call or a functional call on its weight) and its groups."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed):
            return node.target, getattr(module, "groups", 1)
        return None, 1
    weight = layer_weight(node)
    if node.op == "call_function" and node.target in COMPUTE_OPS and isinstance(weight, torch.fx.Node) \
            and weight.op == "get_attr":
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return weight.target.rpartition(".")[0], groups if isinstance(groups, int) else 1
    return None, 1
