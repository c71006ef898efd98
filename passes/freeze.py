"""Finalize passes: fold the masks into the weights, freeze the quantizers, drop the training machinery.

Each pass edits the model it is given in place (``fxcompress.deploy.finalize`` hands them a deep
copy). What the result computes in eval mode is bit for bit what the compressed model computes in
eval mode: a folded weight is ``weight * mask``, the product the forward took at every read; a
quantizer that is on becomes a :class:`~fxcompress.frozen.FrozenQuantizer` with the qparams it used;
one that is off (before ``quant_start_step``, or never observed) computed the identity and is dropped.
Nodes other passes added that compute the same in eval mode (a BatchNorm fold's) are kept as they are.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.fx
from torch import nn

from fxcompress.annotations import RECORD, STEP_COUNTER, NodeRole, get_role, plans_of, set_role
from fxcompress.attention import resolve_layer
from fxcompress.frozen import FrozenQuantizer, PassThrough
from fxcompress.layers import CompressedLayer
from fxcompress.masking import masked_bias, masked_weight
from fxcompress.passes.module_level import _REASON as MODULE_LEVEL_MARK
from fxcompress.passes.module_level import count_step, module_level_reason
from fxcompress.pruning import zero_pruned
from fxcompress.quant import ActivationQuantizer, StepCounter, WeightQuantizer, qparams

__all__ = ["FINALIZED_STEP", "drop_training_state", "fold_masks", "freeze_graph", "freeze_quantizers", "quantizers_off",
           "untied_layers", "weight_quantizer_inputs"]

_QUANTIZERS = (ActivationQuantizer, WeightQuantizer)
#: The steps completed when the model was finalized, for nodes other than quantizers that read the step.
FINALIZED_STEP = "finalized_step"


@torch.no_grad()
def fold_masks(model: nn.Module) -> nn.Module:
    """Multiply every pruned layer's mask into its weight and bias, then delete the mask buffers.

    A tensor that a module the config does not prune also reads (an LM head tied to an embedding)
    is untied first (:func:`untied_layers`): the pruned layer gets its own folded copy, the other
    module keeps the stored one.

    Args:
        model: a compressed model (its plans say which layers are pruned); edited in place.
    Returns:
        ``model``; its pruned entries are exactly 0 (the sign of a zero is the product's).
    """
    pruned = _pruned(model)
    for name in untied_layers(model):
        layer = resolve_layer(model, name)
        for param in ("weight", "bias"):
            tensor, mask = getattr(layer, param), getattr(layer, f"{param}_mask", None)
            if tensor is not None and mask is not None:
                setattr(layer, param, nn.Parameter(tensor * mask, requires_grad=tensor.requires_grad))
    zero_pruned(model, pruned)  # in place: weight * mask, once per tensor (a tied pair shares its mask)
    for name in pruned:
        layer = resolve_layer(model, name)
        for buffer in ("weight_mask", "bias_mask"):
            if buffer in layer._buffers:
                delattr(layer, buffer)
    return model


def untied_layers(model: nn.Module) -> list[str]:
    """The pruned layers whose weight or bias a module outside the pruned layers also holds: folding
    their masks gives them tensors of their own."""
    pruned = _pruned(model)
    holders: dict[int, set[str]] = {}
    for owner, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), set()).add(owner)
    out = []
    for name in pruned:
        layer = resolve_layer(model, name)
        tensors = [getattr(layer, p) for p in ("weight", "bias") if hasattr(layer, f"{p}_mask")]
        if any(t is not None and not holders.get(id(t), set()) <= set(pruned) for t in tensors):
            out.append(name)
    return out


def _pruned(model: nn.Module) -> list[str]:
    return [n for n, p in plans_of(model).items() if p.prune is not None and p.compressed]


def quantizers_off(model: nn.Module) -> dict[str, str]:
    """Every quantizer of ``model`` that does nothing in eval mode, with the reason: ``{path: why}``."""
    counter = getattr(model, STEP_COUNTER, None)
    step = int(counter.step) if counter is not None else 0
    off = {}
    for path, q in model.named_modules():
        if not isinstance(q, _QUANTIZERS):
            continue
        if step < q.start_step:
            off[path] = f"quant_start_step {q.start_step} not reached ({step} steps done)"
        elif isinstance(q, ActivationQuantizer) and not bool(q.initialized > 0.5):
            off[path] = "it has not observed a batch with a finite min and max"
    return off


@torch.no_grad()
def weight_quantizer_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """What each weight quantizer quantizes in eval mode, by quantizer path; run before :func:`fold_masks`.

    In a graph that is the quantizer node's input, a function of parameters and buffers only (the
    masked weight, or a BatchNorm-folded one), evaluated here; in a CompressedLayer, the masked weight.
    """
    out: dict[str, torch.Tensor] = {}
    graph = getattr(model, "graph", None)
    for node in graph.nodes if isinstance(model, torch.fx.GraphModule) else ():
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), WeightQuantizer):
            out.setdefault(node.target, _constant(model, node.args[0]))
    for path, module in model.named_modules():
        if isinstance(module, CompressedLayer) and isinstance(getattr(module, "weight_quantizer", None),
                                                              WeightQuantizer):
            weight = module.weight.detach()
            out[f"{path}.weight_quantizer"] = weight * module.weight_mask if hasattr(module, "weight_mask") else weight
    return out


def _constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The value of ``node``, which depends on no input: its ancestors copied into a graph of their own.

    The step counter's node reads the count instead (what it returns in eval mode; nothing counts).
    """
    needed, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(current.all_input_nodes)
    graph, copies = torch.fx.Graph(), {}
    for n in gm.graph.nodes:  # graph order is a topological order
        if n not in needed:
            continue
        if _is_step(gm, n):
            copies[n] = graph.get_attr(f"{n.target}.step")
        else:
            assert n.op not in ("placeholder", "call_module"), f"{node} depends on the model's input via {n}"
            copies[n] = graph.node_copy(n, lambda arg: copies[arg])
    graph.output(copies[node])
    return torch.fx.GraphModule(gm, graph)().detach()


@torch.no_grad()
def freeze_quantizers(model: nn.Module, off: Mapping[str, str], weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace every quantizer module: on -> FrozenQuantizer at the qparams it uses in eval mode; off ->
    a PassThrough inside a CompressedLayer (whose forward calls it), else nothing (a graph's node of
    it is removed by :func:`freeze_graph`).

    Args:
        model: a compressed model; edited in place.
        off: from :func:`quantizers_off`.
        weights: from :func:`weight_quantizer_inputs`: what each weight quantizer quantizes.
    Raises:
        ValueError: a per-channel quantized weight with non-finite values (where PyTorch's
            per-channel kernel and fxcompress's fake quantization differ), naming the layer.
    """
    for path, q in list(model.named_modules()):
        if not isinstance(q, _QUANTIZERS):
            continue
        owner_path, _, attr = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        if path in off:
            delattr(owner, attr)
            if isinstance(owner, CompressedLayer):
                owner.add_module(attr, PassThrough())
            continue
        if isinstance(q, WeightQuantizer):
            if q.per_channel and not bool(torch.isfinite(weights[path]).all()):
                raise ValueError(f"finalize: layer {owner_path!r} has non-finite weights; fxcompress cannot freeze "
                                 "their per-channel fake quantization exactly")
            scale, zero_point = q.current_qparams(weights[path])
        else:
            scale, zero_point = qparams(q.tracked_min, q.tracked_max, q.qmin, q.qmax, q.symmetric)
        per_channel = isinstance(q, WeightQuantizer) and q.per_channel
        setattr(owner, attr, FrozenQuantizer(scale, zero_point, q.qmin, q.qmax, per_channel, q.bits, q.dtype))
    return model


def freeze_graph(gm: torch.fx.GraphModule, off: Mapping[str, str]) -> torch.fx.GraphModule:
    """Rewrite the graph's compression nodes into their inference form; run :func:`freeze_quantizers` and
    :func:`fold_masks` first.

    A node ``q(x, step)`` of a frozen quantizer becomes ``q(x)`` (with its ``NodeRole``); one of a
    quantizer that was off (``off``: from :func:`quantizers_off`) becomes ``x``; a mask node becomes
    its weight read (the mask is in the weight); the step counter's node and unused reads go. Other
    nodes a pass added (a BatchNorm fold's) stay: they compute the same in eval mode. Where they read
    the step, they read the count at finalize time, a constant non-persistent buffer ``finalized_step``.
    """
    graph = gm.graph
    masks = {f"{name}.{param}_mask" for name in _pruned(gm) for param in ("weight", "bias")}
    for node in list(graph.nodes):
        role = get_role(node)
        if node.op == "call_module" and node.target in off or _is_mask(node, masks):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), FrozenQuantizer):
            if len(node.args) > 1:
                with graph.inserting_before(node):
                    new = graph.call_module(node.target, (node.args[0],))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                node = new
            layer, _, kind = node.target.rpartition(".")
            set_role(node, role or NodeRole(layer, kind))
    for node in reversed(list(graph.nodes)):
        if _is_step(gm, node) and node.users:  # another pass's node reads the step (a BatchNorm fold's gate)
            gm.register_buffer(FINALIZED_STEP, gm.get_submodule(node.target).step.clone(), persistent=False)
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.get_attr(FINALIZED_STEP))
        if not node.users and (node.op == "get_attr" or _is_step(gm, node)):
            graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_mask(node: torch.fx.Node, masks: set[str]) -> bool:
    """A mask multiply: by its role, or (a graph restored from pickle, which traced ``masked_weight``
    into a ``mul`` and dropped the roles) a product with a pruned layer's mask buffer."""
    role = get_role(node)
    if role is not None:
        return role.kind in ("weight_mask", "bias_mask")
    if node.op != "call_function" or node.target not in (masked_weight, masked_bias, operator.mul):
        return False
    mask = node.args[1] if len(node.args) == 2 else None
    return isinstance(mask, torch.fx.Node) and mask.op == "get_attr" and mask.target in masks


def _is_step(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return get_role(node) == NodeRole("", "step") or (
        node.op == "call_module" and isinstance(gm.get_submodule(node.target), StepCounter))


def drop_training_state(model: nn.Module) -> nn.Module:
    """Remove the step counter (and a module-level model's step hook), the compression record and the
    step buffers the CompressedLayers share: what is left is an ordinary module."""
    for name in (STEP_COUNTER, RECORD):
        if name in model._modules:
            delattr(model, name)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is count_step:
            del model._forward_pre_hooks[key]
    if module_level_reason(model) is not None:
        delattr(model, MODULE_LEVEL_MARK)
    for module in model.modules():
        if isinstance(module, CompressedLayer) and "step" in module._buffers:
            delattr(module, "step")
    return model
