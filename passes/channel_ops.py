"""How tensor ops move and tie channels: pointwise ops, reductions, reshapes, cat, matmul, shuffles.

Each rule takes the walk, the node and its concrete output and returns the node's layout (a tuple
of layouts for an op returning several tensors). An op missing here is unknown and blocks.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.passes.channel_flow import Axis, Layout, apply_shape_op
from fxcompress.passes.channel_walk import ChannelWalk, Operand, unknown_op

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "arg"]


def arg(walk: ChannelWalk, n: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """The concrete value of argument ``i`` / ``name`` of ``n``."""
    return walk.value(n.args[i] if len(n.args) > i else n.kwargs.get(name, default))


def pointwise(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    """Every tensor argument broadcast against the others (add, mul, where, ...)."""
    return walk.combine(n.name, [walk.operand(a) for a in walk.tensor_args(n)], out.shape)


def channelwise(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    """Only the first argument carries channels (activations, pools, dropout, ``.to(other)``)."""
    return walk.combine(n.name, [walk.operand(n.args[0])], out.shape)


def reduction(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    """``mean``/``sum``/...: over spatial dims channels stay; summed over, they are blocked."""
    src, shape, lay = walk.operand(n.args[0])
    dim, keepdim, rank = arg(walk, n, 1, "dim"), arg(walk, n, 2, "keepdim", False), len(shape)
    gone = set(range(rank)) if dim is None else {d % rank for d in (dim if isinstance(dim, list | tuple) else [dim])}
    axes = []
    for a in lay.axes:
        if set(a.dims) & gone:
            if not a.weak:
                walk.ledger.block(a.slots, n.name)
        else:
            axes.append(a if keepdim else replace(a, dims=tuple(d - sum(g < d for g in gone) for d in a.dims)))
    return Layout(tuple(axes), src)


def softmax(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor, dim: int | None = None) -> Layout:
    """Softmax over a channel dim mixes channels (blocks them); over another dim it keeps them."""
    dim = arg(walk, n, 1, "dim") if dim is None else dim
    lay = walk.layout(n.args[0])
    for a in lay.strong:
        if dim is None or dim % out.dim() in a.dims:
            walk.ledger.block(a.slots, n.name)
    return lay


def module_softmax(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    return softmax(walk, n, out, walk.module.get_submodule(n.target).dim)


def shape_op(walk: ChannelWalk, n: torch.fx.Node, out: Any) -> Any:
    """view/reshape/flatten/permute/transpose/slicing/chunk/split/...: applied to channel ids."""
    if len(walk.tensor_args(n)) > 1 and n.target not in ("expand_as", "view_as", "reshape_as"):
        return unknown_op(walk, n, out)  # indexing with a tensor: a gather the walk does not follow
    src, shape, lay = walk.operand(n.args[0])
    op, many = _on_ids(walk, n), not isinstance(out, torch.Tensor)
    per_out: list[list[Axis]] = [[] for _ in (out if many else [out])]
    for a in lay.axes:
        rebuilt, shuffled = apply_shape_op(a, shape, op)
        if shuffled:  # a channel shuffle: a permutation; the parts of the split that began it need not stay equal
            walk.ledger.reorder(a.slots, n.name)
        for axes, r in zip(per_out, rebuilt, strict=True):
            if r is None and not a.weak:
                walk.ledger.block(a.slots, n.name)
            elif r is not None:
                axes.append(r)
                if len(r.dims) > len(a.dims):  # a reshape splitting channels into (heads, head_dim)
                    walk.ledger.family(r.slots.reshape(-1, r.slots.shape[-1]), n.name)
    lays = tuple(Layout(tuple(axes), src) for axes in per_out)
    return lays if many else lays[0]


def _on_ids(walk: ChannelWalk, n: torch.fx.Node) -> Any:
    """The node's own op, to run on a tensor of channel ids in place of its tensor input."""
    rest, kwargs = walk.value(n.args[1:]), walk.value(n.kwargs)
    if n.op == "call_module":
        return walk.module.get_submodule(n.target)
    if n.op == "call_method":
        name = {"view": "reshape", "view_as": "reshape_as"}.get(n.target, n.target)  # ids are expanded views
        return lambda t: getattr(t, name)(*rest, **kwargs)
    return lambda t: n.target(t, *rest, **kwargs)


def concatenate(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    """``cat`` along a channel dim places each input's channels at its offset; along another dim
    (tokens, batch) and ``stack``, the inputs' channels are the same channels."""
    tensors = n.args[0] if n.args else n.kwargs["tensors"]
    ops, d = [walk.operand(t) for t in tensors], arg(walk, n, 1, "dim", 0) % out.dim()
    if n.target is torch.stack:
        ops = [(src, shape[:d] + (1,) + shape[d:], Layout(tuple(replace(a, dims=tuple(x + (x >= d) for x in a.dims))
                                                               for a in lay.axes), lay.source)) for src, shape, lay in ops]
    if n.target is torch.stack or not any(d in a.dims for _, _, lay in ops for a in lay.axes):
        flat = [(src, shape[:d] + (1,) + shape[d + 1:], lay) for src, shape, lay in ops]
        return walk.combine(n.name, flat, out.shape[:d] + (1,) + out.shape[d + 1:])
    pieces, weak = [], True
    for i, (src, shape, lay) in enumerate(ops):
        a = next((a for a in lay.axes if d in a.dims), None)
        if a is not None and a.dims == (d,):
            pieces.append(a.slots)
            weak &= a.weak
            continue
        if a is not None and not a.weak:
            walk.ledger.block(a.slots, n.name)
        pieces.append(walk.ledger.new_bundle(shape[d], f"{n.name}[{i}]", blocked_by=n.name if a else src))
        weak = False
    return Layout((Axis((d,), torch.cat(pieces), weak),), ops[0][0])


def matmul(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    return _matmul(walk, n.name, walk.operand(n.args[0]), walk.operand(n.args[1]))


def attention(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    """``scaled_dot_product_attention``: ``softmax(q @ k.T) @ v``; q and k are tied, the output is v's."""
    q, k, v = (walk.operand(n.args[i] if len(n.args) > i else n.kwargs[name])
               for i, name in enumerate(("query", "key", "value")))
    r = len(k[1])
    swap = {r - 1: r - 2, r - 2: r - 1}
    kt = (k[0], k[1][:-2] + (k[1][-1], k[1][-2]),
          Layout(tuple(replace(a, dims=tuple(swap.get(d, d) for d in a.dims)) for a in k[2].axes), k[2].source))
    scores = _matmul(walk, n.name, q, kt)
    shape = tuple(torch.broadcast_shapes(q[1][:-2], kt[1][:-2])) + (q[1][-2], kt[1][-1])
    return _matmul(walk, n.name, (n.name, shape, scores), v)


def _matmul(walk: ChannelWalk, why: str, a: Operand, b: Operand) -> Layout:
    """``a @ b`` as a broadcast over (batch..., n, k, m): channels of ``a`` along k meet ``b``'s along k."""
    if len(a[1]) < 2 or len(b[1]) < 2:
        for lay in (a[2], b[2]):
            for x in lay.strong:
                walk.ledger.block(x.slots, why)
        return Layout(source=why)
    ro = max(len(a[1]), len(b[1]))
    pa, pb = _place(a, ro, left=True), _place(b, ro, left=False)
    lay = walk.combine(why, [pa, pb], tuple(torch.broadcast_shapes(pa[1], pb[1])), lenient=range(ro - 2))
    k = ro - 1  # the contracted dim: its channels end here
    return Layout(tuple(replace(x, dims=tuple(d if d < k else d - 1 for d in x.dims)) for x in lay.axes
                        if k not in x.dims), lay.source)


def _place(operand: Operand, ro: int, left: bool) -> Operand:
    src, shape, lay = operand
    r = len(shape)
    where = {d: d + ro - r for d in range(r - 2)} | ({r - 2: ro - 2, r - 1: ro - 1} if left else {r - 2: ro - 1, r - 1: ro})
    placed = [1] * (ro + 1)
    for d, size in enumerate(shape):
        placed[where[d]] = size
    return src, tuple(placed), Layout(tuple(replace(x, dims=tuple(where[d] for d in x.dims)) for x in lay.axes),
                                      lay.source)


def channel_shuffle(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor, groups: int | None = None) -> Layout:
    """``nn.ChannelShuffle``: a permutation of the channels (as the view/transpose/view it stands for)."""
    groups = arg(walk, n, 1, "groups") if groups is None else groups
    src, shape, lay = walk.operand(n.args[0])
    axes = []
    for a in lay.axes:
        if a.dims == (1,) and len(a.slots) % groups == 0:
            walk.ledger.reorder(a.slots, n.name)
            axes.append(replace(a, slots=a.slots.reshape(groups, -1).t().reshape(-1)))
        elif 1 in a.dims and not a.weak:
            walk.ledger.block(a.slots, n.name)
        else:
            axes.append(a)
    return Layout(tuple(axes), src)


def module_shuffle(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    return channel_shuffle(walk, n, out, walk.module.get_submodule(n.target).groups)


def select_item(walk: ChannelWalk, n: torch.fx.Node, out: Any) -> Any:
    """``pieces[i]`` of an op that returned several tensors."""
    lays = walk.layout(n.args[0])
    return lays[arg(walk, n, 1, "index")] if isinstance(lays, tuple) else unknown_op(walk, n, out)


_SHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "movedim", "squeeze",
                  "unsqueeze", "narrow", "select", "chunk", "split", "unbind", "t", "expand", "expand_as", "view_as",
                  "reshape_as", "repeat")
_SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
                    torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind,
                    torch.t, torch.unflatten)
_POINTWISE_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                        operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                        torch.minimum, torch.where, operator.gt, operator.ge, operator.lt, operator.le, operator.eq,
                        operator.ne, torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne)
_CHANNELWISE_FUNCTIONS = (
    operator.neg, operator.pow, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.abs, torch.neg,
    torch.exp, torch.sqrt, torch.rsqrt, torch.erf, torch.clone, torch.zeros_like, torch.ones_like, F.relu, F.relu6,
    F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
    F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.interpolate, F.pad)
_CHANNELWISE_METHODS = ("contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as", "cpu",
                        "cuda", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "sqrt",
                        "clamp", "clamp_", "clamp_min", "pow", "__neg__")
_POINTWISE_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum")
_REDUCTIONS = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp")

FUNCTION_RULES: dict[Any, Any] = {
    **dict.fromkeys(_POINTWISE_FUNCTIONS, pointwise), **dict.fromkeys(_CHANNELWISE_FUNCTIONS, channelwise),
    **dict.fromkeys(_SHAPE_FUNCTIONS, shape_op), **{getattr(torch, r): reduction for r in _REDUCTIONS},
    operator.getitem: shape_op, operator.matmul: matmul, torch.matmul: matmul, torch.bmm: matmul,
    torch.cat: concatenate, torch.concat: concatenate, torch.stack: concatenate, F.softmax: softmax,
    torch.softmax: softmax, F.log_softmax: softmax, torch.channel_shuffle: channel_shuffle,
    F.channel_shuffle: channel_shuffle, F.scaled_dot_product_attention: attention,
    "torchvision.ops.stochastic_depth.stochastic_depth": channelwise,
}
METHOD_RULES: dict[str, Any] = {
    **dict.fromkeys(_CHANNELWISE_METHODS, channelwise), **dict.fromkeys(_POINTWISE_METHODS, pointwise),
    **dict.fromkeys(_SHAPE_METHODS, shape_op), **dict.fromkeys(_REDUCTIONS, reduction), "matmul": matmul,
    "bmm": matmul, "softmax": softmax, "log_softmax": softmax,
}
_CHANNELWISE_MODULES = (
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Hardswish,
    torch.nn.Hardsigmoid, torch.nn.Hardtanh, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SELU, torch.nn.CELU,
    torch.nn.Mish, torch.nn.Softplus, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout, torch.nn.Identity, torch.nn.MaxPool1d, torch.nn.MaxPool2d,
    torch.nn.MaxPool3d, torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d, torch.nn.AdaptiveAvgPool1d,
    torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d, torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d,
    torch.nn.AdaptiveMaxPool3d, torch.nn.Upsample, torch.nn.ZeroPad2d, torch.nn.ConstantPad1d, torch.nn.ConstantPad2d,
    torch.nn.ConstantPad3d, torch.nn.ReflectionPad1d, torch.nn.ReflectionPad2d, torch.nn.ReplicationPad1d,
    torch.nn.ReplicationPad2d)
MODULE_RULES: dict[type, Any] = {
    **dict.fromkeys(_CHANNELWISE_MODULES, channelwise), torch.nn.Flatten: shape_op, torch.nn.Unflatten: shape_op,
    torch.nn.Softmax: module_softmax, torch.nn.LogSoftmax: module_softmax, torch.nn.ChannelShuffle: module_shuffle,
}
