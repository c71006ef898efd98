"""Lower a finalized model's fake-quantized Conv/Linear calls onto int8 kernels (``fxcompress.convert``).

A quantized layer in a finalized graph reads ``conv(in_q(x), w_q(w'), b')``, where ``in_q`` and ``w_q``
are :class:`~fxcompress.frozen.FrozenQuantizer` nodes and ``w'``/``b'`` depend on parameters only (the
masked weight, or with Conv-BN folding ``w·s`` and ``b·s``, followed by ``unscale_channels(., s)`` and
the BatchNorm). :func:`lower_int8_layers` replaces that by ``Int8Conv(QuantizeUint8(x))`` at the
layer's own name: the weight's integer levels in ``int8`` with its per-channel scale, and the
BatchNorm that reads the conv folded into both (``bn(y / s') = y·r + (β - μ·t)`` with ``t = γ/σ`` and
``r = t/s'``: the scale becomes ``scale·|r|``, a channel with ``r < 0`` has its levels negated, one
with ``r = 0`` (a pruned channel) has none). Layers are found by the graph's structure (a conv/linear
call whose weight is a frozen quantizer's output), which survives pickling, unlike node metadata.

Then :func:`fuse_requantize` lets an int8 layer whose output goes, through at most a ReLU/ReLU6/Hardtanh,
only to input quantizers with the same levels return those ``uint8`` levels itself (oneDNN requantizes
inside the kernel), and equal quantizations of one tensor are made once. A float conv followed by a
BatchNorm (a layer the config does not quantize) gets the BatchNorm folded in float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fxcompress.annotations import plans_of
from fxcompress.attention import CompressedAttention
from fxcompress.folding import unscale_channels
from fxcompress.frozen import FrozenQuantizer
from fxcompress.int8 import ConvertError, Int8Conv, Int8Linear, QuantizeUint8
from fxcompress.passes.freeze import _constant, quantizers_off

__all__ = ["check_convertible", "fold_float_batchnorms", "fuse_requantize", "lower_int8_layers", "output_drift"]

_CONV_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR = (torch._C._nn.linear,)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_convertible(gm: nn.Module) -> None:
    """Refuse, naming the layer, a compressed model whose quantized layers cannot all run on int8 kernels.

    Args:
        gm: a model returned by ``fxcompress.compress`` (read only).
    Raises:
        ConvertError: the model was compressed at module level; no layer quantizes its weight; a quantized
            layer inside a leaf module or an attention module; a quantizer that is off in eval mode (its
            start step not reached, a range never observed); a weight or input bit width other than 8.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise ConvertError("convert: the model was compressed at module level (fx could not trace its forward), "
                           "and convert lowers the layers of a traced graph only; finalize(gm) gives its "
                           "fake-quantized inference model, export_onnx(gm, ...) an int8 ONNX file")
    plans = [p for p in plans_of(gm).values() if p.compressed and p.quant is not None and p.quant.weight is not None]
    if not plans:
        raise ConvertError("convert: no layer quantizes its weight, so there is nothing to run on int8 kernels; "
                           "compress with 'quant_types': ['input', 'weight'] and 'quant_bits': 8")
    off = quantizers_off(gm)
    attention = {name for name, m in gm.named_modules() if isinstance(m, CompressedAttention)}
    for plan in plans:
        where = f"convert: layer {plan.name!r}"
        if plan.name.rpartition(".")[0] in attention:
            raise ConvertError(f"{where} is a projection of an attention module, which convert does not lower "
                               "(its weights are read inside F.multi_head_attention_forward); exclude it from "
                               "quantization or export it with export_onnx")
        if plan.leaf is not None:
            raise ConvertError(f"{where} is compressed at module level inside leaf module {plan.leaf!r} (fx could not "
                               "trace it), and convert lowers graph layers only; make the leaf traceable (or "
                               "exclude the layer from quantization)")
        for kind in ("weight", "input", "output"):
            why = off.get(f"{plan.name}.{kind}_quantizer")
            if why is not None:
                raise ConvertError(f"{where}: its {kind} quantizer is off in eval mode ({why}), so there are no "
                                   "trained int8 ranges to convert; train until it is on (or exclude the layer)")
        for kind in ("weight", "input"):
            bits = getattr(plan.quant, kind).bits
            if bits != 8:
                raise ConvertError(f"{where}: its {kind} is quantized with {bits} bits, and convert has int8 kernels "
                                   f"only (no int{bits} kernel); quantize it with 'quant_bits': 8")


def lower_int8_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every conv/linear call whose input and weight pass frozen 8-bit quantizers by int8 modules.

    Args:
        gm: a finalized GraphModule (``fxcompress.finalize``'s result); edited in place.
    Returns:
        ``gm``, recompiled; unused modules (the replaced quantizers and folded BatchNorms) deleted.
    Raises:
        ConvertError: a quantized layer the int8 kernels cannot compute, naming it (a weight with a
            nonzero zero point, a padding oneDNN has no form of, a layer called more than once).
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.endswith(".weight_quantizer"):
            calls[node.target] = calls.get(node.target, 0) + len(node.users)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and (node.target in _CONV_DIMS or node.target in _LINEAR):
            weight = _arg(node, 1, "weight")
            if _frozen(gm, weight) is not None:
                layer = weight.target.removesuffix(".weight_quantizer")
                if calls[weight.target] != 1:
                    raise ConvertError(f"convert: layer {layer!r} is called {calls[weight.target]} times; convert "
                                       "lowers layers called once (call a copy of the layer at each place)")
                _lower(gm, node, weight, layer)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _lower(gm: torch.fx.GraphModule, node: torch.fx.Node, weight: torch.fx.Node, layer: str) -> None:
    graph = gm.graph
    source = _arg(node, 0, "input")
    in_q = _frozen(gm, source)
    if in_q is None:
        raise ConvertError(f"convert: layer {layer!r} has a quantized weight but no input quantizer in front of its "
                           "call; int8 kernels need both ('quant_types': ['input', 'weight'])")
    quantize = _quantize_module(in_q, layer)
    levels, scale = _weight_levels(gm.get_submodule(weight.target), _constant(gm, weight.args[0]), layer)
    bias_node = _arg(node, 2, "bias")
    bias = _constant(gm, bias_node) if isinstance(bias_node, torch.fx.Node) else bias_node
    last, (levels, scale, bias) = _fold_norm(gm, node, levels, scale, bias)
    if node.target in _LINEAR:
        module: nn.Module = Int8Linear(levels, scale, bias, quantize.scale, quantize.zero_point)
    else:
        module = Int8Conv(levels, scale, bias, *_conv_geometry(node, levels, layer), quantize.scale,
                          quantize.zero_point)
    old = gm.get_submodule(layer)
    for name, child in old.named_children():  # an output quantizer stays a (frozen) fake quantizer
        if name not in ("weight_quantizer", "input_quantizer"):
            module.add_module(name, child)
    module.add_module("input_quantizer", quantize)
    with graph.inserting_before(node):
        levels_node = graph.call_module(f"{layer}.input_quantizer", (source.args[0],))
        lowered = graph.call_module(layer, (levels_node,))
    last.replace_all_uses_with(lowered)
    _erase_unused(graph, last)  # the float call, its quantizers, the fold and the BatchNorm
    _replace_module(gm, layer, module)


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    if getattr(node, "_erased", False) or node.users or node.op in ("placeholder", "output"):
        return  # (a node reached again through another of its erased readers)
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for parent in inputs:
        _erase_unused(graph, parent)


def _arg(node: torch.fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _frozen(gm: torch.fx.GraphModule, node: Any) -> FrozenQuantizer | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, FrozenQuantizer):
            return module
    return None


def _quantize_module(q: FrozenQuantizer, layer: str) -> QuantizeUint8:
    """The uint8 levels of an activation quantizer: its own for ``uint``, shifted by 128 for ``int``."""
    if q.bits != 8:
        raise ConvertError(f"convert: layer {layer!r}: its input is quantized with {q.bits} bits; the int8 kernels "
                           "take 8-bit activations: quantize it with 'quant_bits': 8")
    shift = 128 if q.dtype == "int" else 0
    return QuantizeUint8(float(q.scale), int(q.zero_point) + shift, q.qmin + shift, q.qmax + shift)


@torch.no_grad()
def _weight_levels(q: FrozenQuantizer, weight: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 levels of ``q(weight)`` and one scale per output channel: ``q(weight) = levels * scale`` exactly."""
    if q.bits != 8:
        raise ConvertError(f"convert: layer {layer!r}: its weight is quantized with {q.bits} bits, and there is no "
                           f"int{q.bits} kernel here; quantize it with 'quant_bits': 8")
    if q.dtype != "int" or bool((q.zero_point != 0).any()):
        raise ConvertError(f"convert: layer {layer!r}: its weight is quantized as {q.dtype} with a nonzero zero "
                           "point; the int8 kernels take symmetric int8 weights: use 'quant_dtype': {'weight': "
                           "'int'} and a symmetric 'quant_scheme' for the weight (the default)")
    rows = weight.float().reshape(weight.shape[0], -1)
    scale = q.scale.reshape(-1, 1) if q.per_channel else q.scale.reshape(1, 1)
    levels = torch.clamp(torch.round(rows * torch.reciprocal(scale)), q.qmin, q.qmax)
    assert torch.equal((levels * scale).reshape(weight.shape), q(weight.float())), f"{layer}: levels differ"
    return levels.to(torch.int8).reshape(weight.shape), scale.expand(weight.shape[0], 1).reshape(-1).clone()


def _fold_norm(gm: torch.fx.GraphModule, node: torch.fx.Node, levels: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.fx.Node, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Fold the BatchNorm that alone reads the conv (through a fold's ``unscale_channels``) into levels, scale
    and bias; returns the node whose value the int8 layer now computes."""
    if node.target in _LINEAR or len(node.users) != 1:
        return node, (levels, scale, bias)
    tail, folded_scale = node, None
    user = next(iter(node.users))
    if user.op == "call_function" and user.target is unscale_channels and len(user.users) == 1:
        tail, folded_scale, user = user, user.args[1], next(iter(user.users))
    if user.op != "call_module" or user.args != (tail,) or user.kwargs:
        return node, (levels, scale, bias)
    norm = gm.get_submodule(user.target)
    if not isinstance(norm, _NORMS) or norm.training or norm.running_var is None:
        return node, (levels, scale, bias)
    with torch.no_grad():
        t = torch.rsqrt(norm.running_var + norm.eps)
        t = t if norm.weight is None else norm.weight * t
        shift = -norm.running_mean * t if norm.bias is None else norm.bias - norm.running_mean * t
        s = torch.ones_like(t) if folded_scale is None else _constant(gm, folded_scale)
        r = torch.where(s == t, torch.ones_like(t), t / s)
        view = [-1] + [1] * (levels.dim() - 1)
        levels = (levels.to(torch.int16) * torch.sign(r).to(torch.int16).reshape(view)).to(torch.int8)
        scale = torch.where(r == 0, scale, scale * r.abs())
        bias = shift if bias is None else bias * r + shift
    return user, (levels, scale, bias)


def _conv_geometry(node: torch.fx.Node, weight: torch.Tensor, layer: str) -> tuple[list[int], list[int], list[int], int]:
    """stride, padding, dilation, groups of a conv call, as int lists (``'valid'``/``'same'`` resolved)."""
    dims = _CONV_DIMS[node.target]
    values = {name: _arg(node, i, name) for i, name in enumerate(_CONV_ARGS)}

    def ints(value: Any, default: int) -> list[int]:
        value = default if value is None else value
        return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]

    stride, dilation = ints(values["stride"], 1), ints(values["dilation"], 1)
    padding = values["padding"]
    if padding == "valid":
        padding = 0
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
        if any(p % 2 for p in total) or any(s != 1 for s in stride):
            raise ConvertError(f"convert: layer {layer!r}: padding='same' pads unevenly here, which the int8 "
                               "kernel cannot; give the conv an explicit symmetric padding")
        padding = [p // 2 for p in total]
    return stride, ints(padding, 0), dilation, int(values["groups"] or 1)


def _replace_module(gm: torch.fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


_RELU_FUNCTIONS = (torch.relu, F.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def _post_op(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, tuple[float, ...]] | None:
    """The oneDNN post-op ``node`` computes (a ReLU, ReLU6 or Hardtanh), or None."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) == 1:
        return "relu", ()
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1:
        return "relu", ()
    if node.op == "call_function" and node.target is F.relu6:
        return "hardtanh", (0.0, 6.0)
    if node.op == "call_function" and node.target is F.hardtanh:
        lo, hi = (list(node.args[1:3]) + [node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0)])[:2]
        return "hardtanh", (float(lo), float(hi))
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.ReLU:
            return "relu", ()
        if type(module) in (nn.ReLU6, nn.Hardtanh):
            return "hardtanh", (float(module.min_val), float(module.max_val))
    return None


def fuse_requantize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Let int8 layers output the uint8 levels their readers quantize to, and quantize each tensor once.

    An int8 layer whose float output (or the output of one ReLU/ReLU6/Hardtanh reading only it) is read
    only by :class:`QuantizeUint8` nodes of one set of levels returns those levels (requantized inside
    the kernel, the activation as its post-op). Then quantize nodes of the same tensor with the same
    levels are merged.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), (Int8Conv, Int8Linear)):
            continue
        layer = gm.get_submodule(node.target)
        tail, post = node, ("none", ())
        if len(node.users) == 1:
            found = _post_op(gm, next(iter(node.users)))
            if found is not None:
                tail, post = next(iter(node.users)), found
        readers = [_quantize_of(gm, u) for u in tail.users]
        if not readers or any(r is None for r in readers) or not all(readers[0].same_levels(r) for r in readers):
            continue
        layer.requantize(readers[0], post[0], post[1])
        for reader in list(tail.users):
            reader.replace_all_uses_with(node)
            graph.erase_node(reader)
        if tail is not node:
            graph.erase_node(tail)
    _merge_quantizes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _quantize_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> QuantizeUint8 | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, QuantizeUint8):
            return module
    return None


def _merge_quantizes(gm: torch.fx.GraphModule) -> None:
    """One quantize node per (tensor, levels): the first in graph order serves the others' readers."""
    seen: dict[torch.fx.Node, list[tuple[QuantizeUint8, torch.fx.Node]]] = {}
    for node in list(gm.graph.nodes):
        module = _quantize_of(gm, node)
        if module is None:
            continue
        source = node.args[0]
        same = next((n for m, n in seen.get(source, []) if m.same_levels(module)), None)
        if same is None:
            seen.setdefault(source, []).append((module, node))
        else:
            node.replace_all_uses_with(same)
            gm.graph.erase_node(node)


def fold_float_batchnorms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold each eval-mode BatchNorm that alone reads a float ``nn.ConvNd`` module's output into that conv."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        norm, conv_node = gm.get_submodule(node.target), node.args[0]
        if not isinstance(norm, _NORMS) or norm.training or norm.running_var is None:
            continue
        if conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        conv = gm.get_submodule(conv_node.target)
        if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or conv.training or _called(graph, conv_node) > 1:
            continue
        _replace_module(gm, conv_node.target, fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(conv_node)
        graph.erase_node(node)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _called(graph: torch.fx.Graph, node: torch.fx.Node) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == node.target)


def output_drift(reference: Any, result: Any) -> dict[str, float]:
    """Cosine similarity and largest absolute difference of two (nested) outputs, over their float tensors."""
    ref = _flat(reference)
    out = _flat(result)
    cosine = float(F.cosine_similarity(ref.double(), out.double(), dim=0)) if ref.numel() else 1.0
    return {"cosine": cosine, "max_abs_diff": float((ref - out).abs().max()) if ref.numel() else 0.0,
            "max_abs_reference": float(ref.abs().max()) if ref.numel() else 0.0}


def _flat(value: Any) -> torch.Tensor:
    leaves: Sequence[Any] = torch.utils._pytree.tree_leaves(value)
    parts = [t.detach().float().reshape(-1) for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat(parts) if parts else torch.zeros(0)

