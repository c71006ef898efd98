"""Conv-BatchNorm folding for QAT: a weight-quantized conv followed by a BatchNorm quantizes the folded weight.

:func:`mark_bn_folds` (plan time) records in a conv's plan the BatchNorm it folds (``folds_bn``)
where the pattern is unambiguous: the conv is called once, as a module, its only user is a
BatchNorm with running statistics over its output channels, and that BatchNorm is called once.
:func:`fold_batchnorm` (after the quantize pass) rewrites those convs as
``unscale(conv(x, wq(scale_rows(w, s)), scale_bias(b, s)), s)`` with ``s = bn_fold_scale(...)``
(see :mod:`fxcompress.folding` for the math) and moves the conv's output quantizer, if any, after
the BatchNorm: the folded conv's output, what the deployed model computes.
"""

from __future__ import annotations

import torch
import torch.fx

from fxcompress.annotations import META_KEY, LayerPlan, NodeRole, get_plan, get_role, set_role
from fxcompress.folding import bn_fold_scale, scale_bias, scale_rows, unscale_channels
from fxcompress.passes.annotate import layer_weight

__all__ = ["fold_batchnorm", "mark_bn_folds"]
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def mark_bn_folds(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Set ``folds_bn`` in the plan of every weight-quantized conv whose output only a BatchNorm reads.

    The conv may be a module call or, in a compressed model being compressed again, its functional
    form; either way it must be the only use of its weight, and the BatchNorm called once.

    Args:
        gm: an annotated GraphModule before the rewriting passes; edited in place (metadata only).
    Returns:
        ``gm``.
    """
    calls: dict[str, int] = {}
    weight_uses: dict[str, int] = {}
    folds: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr" and node.target.endswith(".weight"):
            owner = node.target.rpartition(".")[0]
            weight_uses[owner] = weight_uses.get(owner, 0) + len(node.users)
    for node in gm.graph.nodes:
        plan = get_plan(node)
        if plan is None or not plan.compressed or plan.quant is None or plan.quant.weight is None:
            continue
        functional = layer_weight(node)
        if node.op != "call_module" and (functional is None or functional.op != "get_attr"):
            continue
        uses = calls.get(plan.name, 0) + weight_uses.get(plan.name, 0)
        norm = _folded_norm(gm, node, plan.name, calls) if uses == 1 else None
        if norm is not None:
            folds[plan.name] = norm
    for node in gm.graph.nodes:  # every node of the layer carries the same plan
        plan = get_plan(node)
        if plan is not None and plan.name in folds:
            node.meta[META_KEY] = LayerPlan(**{**plan.__dict__, "folds_bn": folds[plan.name]})
    return gm


def _folded_norm(gm: torch.fx.GraphModule, node: torch.fx.Node, layer: str, calls: dict[str, int]) -> str | None:
    """The BatchNorm that is the only reader of ``node`` (the one use of conv ``layer``), or None."""
    if not isinstance(gm.get_submodule(layer), _CONVS) or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or calls.get(user.target) != 1 or user.args[:1] != (node,):
        return None
    norm = gm.get_submodule(user.target)
    if (not isinstance(norm, _NORMS) or norm.running_var is None
            or norm.num_features != gm.get_submodule(layer).out_channels):
        return None
    return user.target


def fold_batchnorm(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite each conv whose plan ``folds_bn`` to quantize its BatchNorm-folded weight.

    Args:
        gm: a GraphModule after the quantize pass; edited in place (call ``recompile`` after).
    Returns:
        ``gm``. Convs already folded are left alone.
    """
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        weight = layer_weight(node)
        if plan is None or plan.folds_bn is None or weight is None or get_role(weight) is None:
            continue
        if weight.args and any(get_role(a) == NodeRole(plan.name, "bn_fold") for a in weight.args):
            continue  # already folded
        _fold(gm, node, weight, plan)
    return gm


def _fold(gm: torch.fx.GraphModule, conv: torch.fx.Node, quantizer: torch.fx.Node, plan: LayerPlan) -> None:
    graph, norm_name = gm.graph, plan.folds_bn
    norm = gm.get_submodule(norm_name)
    role = NodeRole(plan.name, "bn_fold")
    with graph.inserting_before(quantizer):
        gamma = graph.get_attr(f"{norm_name}.weight") if norm.weight is not None else None
        scale = _added(graph.call_function(bn_fold_scale, (gamma, graph.get_attr(f"{norm_name}.running_var"),
                                                           norm.eps, quantizer.args[1], plan.quant.start_step)), role)
        quantizer.update_arg(0, _added(graph.call_function(scale_rows, (quantizer.args[0], scale)), role))
    bias = conv.args[2] if len(conv.args) > 2 else None
    if bias is not None:
        with graph.inserting_before(conv):
            conv.update_arg(2, _added(graph.call_function(scale_bias, (bias, scale)), role))
    out_quantizer = next((u for u in conv.users if get_role(u) == NodeRole(plan.name, "output_quantizer")), None)
    if out_quantizer is not None:  # quantize the folded conv's output: after the BatchNorm
        out_quantizer.replace_all_uses_with(conv)
        target, step = out_quantizer.target, out_quantizer.args[1]
        graph.erase_node(out_quantizer)
    with graph.inserting_after(conv):
        unscaled = _added(graph.call_function(unscale_channels, (conv, scale)), role)
    conv.replace_all_uses_with(unscaled, delete_user_cb=lambda user: user is not unscaled)
    if out_quantizer is not None:
        norm_call = next(iter(unscaled.users))
        with graph.inserting_after(norm_call):
            moved = graph.call_module(target, (norm_call, step))
        set_role(moved, NodeRole(plan.name, "output_quantizer"))
        norm_call.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)


def _added(node: torch.fx.Node, role: NodeRole) -> torch.fx.Node:
    set_role(node, role)
    return node
