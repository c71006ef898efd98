"""How layers use channels: Conv/Linear make new ones from the ones they read; norms and PReLU hold
per-channel parameters; a depthwise conv keeps its input's; a grouped conv and a GroupNorm cut theirs
into equal parts. Module calls and the functional forms (``F.conv2d(x, self.conv.weight)``) alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.passes.channel_flow import Axis, Layout
from fxcompress.passes.channel_ops import arg
from fxcompress.passes.channel_walk import ChannelWalk, unknown_op

__all__ = ["LAYER_FUNCTION_RULES", "LAYER_MODULE_RULES"]

Params = dict[str, tuple[str, str]]  # role ('weight', 'bias', 'running_mean', ...) -> (layer, parameter name)
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_TRANSPOSES = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _linear(walk: ChannelWalk, n: torch.fx.Node, x: torch.fx.Node, params: Params, out: torch.Tensor) -> Layout:
    """In-features are the channels of the input's last dim; out-features are the layer's own."""
    layer, (src, shape, lay) = params["weight"][0], walk.operand(x)
    last = len(shape) - 1
    slots = walk.channel_slots(n, x, last, f"{layer} input")
    walk.tie_layer_input(f"{layer}:in", slots, lambda s: _record(walk, params, ("weight",), 1, "in", s), n.name)
    own = walk.layer_slots(f"{layer}:out", lambda: _new_channels(walk, params, out.shape[-1], 0))
    rest = tuple(a for a in lay.axes if last not in a.dims)  # e.g. tokens: a Linear acts on the last dim only
    return Layout((*rest, Axis((last,), own)), src)


def _conv(walk: ChannelWalk, n: torch.fx.Node, x: torch.fx.Node, params: Params, groups: int,
          weight_shape: torch.Size, out: torch.Tensor, transposed: bool = False) -> Layout:
    """Dim 1 of the weight reads the input's channel dim; dim 0 (the filters) makes the output's.
    (A transposed conv's weight is (in, out, ...).) ``groups == in_channels`` (depthwise, with or
    without a channel multiplier): output channel ``o`` is input channel ``o // multiplier``."""
    layer, (src, shape, lay) = params["weight"][0], walk.operand(x)
    c = len(shape) - (len(weight_shape) - 2) - 1  # the channel dim: 1, or 0 for an unbatched input
    cin, cout = shape[c], out.shape[c]
    if transposed and groups > 1:
        return unknown_op(walk, n, out)
    slots = walk.channel_slots(n, x, c, f"{layer} input")
    walk.tie_layer_input(f"{layer}:in", slots,
                         lambda s: _record(walk, params, ("weight",), int(not transposed), "in", s), n.name)
    slots = walk.ledger.cache[f"{layer}:in"]
    for a in lay.strong:
        if c not in a.dims:  # channels spread over spatial dims: mixed by the kernel
            walk.ledger.block(a.slots, n.name)
    if not transposed and groups == cin > 1 and cout % cin == 0:  # depthwise (one input channel: an ordinary conv)
        def make() -> torch.Tensor:
            own = slots.repeat_interleave(cout // cin)
            _record(walk, params, ("weight", "bias"), 0, "out", own)
            return own
    else:
        def make() -> torch.Tensor:
            own = _new_channels(walk, params, cout, int(transposed))
            walk.ledger.family(slots.reshape(groups, -1), n.name)
            walk.ledger.family(own.reshape(groups, -1), n.name)
            return own
    return Layout((Axis((c,), walk.layer_slots(f"{layer}:out", make)),), src)


def _norm(walk: ChannelWalk, n: torch.fx.Node, x: torch.fx.Node, params: Params, first: int, count: int,
          num_groups: int | None = None, across: bool = False) -> Layout:
    """Per-channel parameters along input dims ``first .. first+count-1`` (parameter dims 0 ..).
    ``across``: the norm's mean and variance are taken across those dims (LayerNorm, GroupNorm)."""
    lay, rank = walk.layout(x), walk.env[x].dim()
    first %= rank
    layer = next(iter(params.values()))[0] if params else n.name
    for a in lay.axes:
        inside = [d for d in a.dims if first <= d < first + count]
        if len(a.dims) == 1 and inside:
            dim = inside[0] - first
            walk.tie_layer_input(f"{layer}:norm{dim}", a.slots,
                                 lambda s, dim=dim: _record(walk, params, _NORM_PARAMS, dim, "norm", s), n.name)
            if num_groups:
                walk.ledger.family(a.slots.reshape(num_groups, -1), n.name)
            if across:
                walk.ledger.statistics.append((n.name, a.slots))
        elif inside and not a.weak:
            walk.ledger.block(a.slots, n.name)
    return lay


def _new_channels(walk: ChannelWalk, params: Params, size: int, dim: int) -> torch.Tensor:
    slots = walk.ledger.new_bundle(size, params["weight"][0])
    _record(walk, params, ("weight",), dim, "out", slots)
    _record(walk, params, ("bias",), 0, "out", slots)
    return slots


def _record(walk: ChannelWalk, params: Params, roles: tuple[str, ...], dim: int, role: str, slots: torch.Tensor
            ) -> None:
    for r in roles:
        if r in params:
            walk.ledger.member(*params[r], dim if r == "weight" or role == "norm" else 0, role, slots)


# ---- module calls ------------------------------------------------------------------------------------

def _module(walk: ChannelWalk, n: torch.fx.Node) -> torch.nn.Module:
    return walk.module.get_submodule(n.target)


def _own(n: torch.fx.Node, module: torch.nn.Module, roles: tuple[str, ...]) -> Params:
    return {r: (str(n.target), r) for r in roles if getattr(module, r, None) is not None}


def linear_module(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    return _linear(walk, n, n.args[0], _own(n, _module(walk, n), ("weight", "bias")), out)


def conv_module(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    m = _module(walk, n)
    return _conv(walk, n, n.args[0], _own(n, m, ("weight", "bias")), m.groups, m.weight.shape, out,
                 transposed=isinstance(m, _CONV_TRANSPOSES))


def batch_norm_module(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    return _norm(walk, n, n.args[0], _own(n, _module(walk, n), _NORM_PARAMS), 1, 1)


def layer_norm_module(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    m = _module(walk, n)
    k = len(m.normalized_shape)
    return _norm(walk, n, n.args[0], _own(n, m, ("weight", "bias")), -k, k, across=True)


def group_norm_module(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    m = _module(walk, n)
    return _norm(walk, n, n.args[0], _own(n, m, ("weight", "bias")), 1, 1, m.num_groups, across=True)


def prelu_module(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
    m = _module(walk, n)
    params = _own(n, m, ("weight",)) if m.num_parameters > 1 else {}
    return _norm(walk, n, n.args[0], params, 1, 1)


# ---- functional calls on parameters -----------------------------------------------------------------

def _read(walk: ChannelWalk, n: torch.fx.Node, where: dict[str, tuple[int, str]]) -> Params | None:
    """The parameters a functional layer call reads, found as ``get_attr`` nodes; None when one is computed."""
    params = {}
    for role, (i, name) in where.items():
        a = n.args[i] if len(n.args) > i else n.kwargs.get(name)
        if isinstance(a, torch.fx.Node) and a.op == "get_attr":
            owner, _, attr = str(a.target).rpartition(".")
            params[role] = (owner, attr)
        elif a is not None:
            return None
    return params


def _functional(make: Any, where: dict[str, tuple[int, str]], needs_weight: bool = True) -> Any:
    def rule(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor) -> Layout:
        params = _read(walk, n, where)
        if params is None or (needs_weight and "weight" not in params):
            return unknown_op(walk, n, out)
        return make(walk, n, out, params)
    return rule


def _linear_rule(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor, params: Params) -> Layout:
    return _linear(walk, n, n.args[0], params, out)


def _conv_rule(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor, params: Params) -> Layout:
    return _conv(walk, n, n.args[0], params, arg(walk, n, 6, "groups", 1), walk.env[n.args[1]].shape, out)


def _norm_rule(walk: ChannelWalk, n: torch.fx.Node, out: torch.Tensor, params: Params) -> Layout:
    if n.target is F.layer_norm:
        k = len(arg(walk, n, 1, "normalized_shape"))
        return _norm(walk, n, n.args[0], params, -k, k, across=True)
    groups = arg(walk, n, 1, "num_groups") if n.target is F.group_norm else None
    return _norm(walk, n, n.args[0], params, 1, 1, groups, across=groups is not None)


_WEIGHT_BIAS = {"weight": (1, "weight"), "bias": (2, "bias")}
_STATS_AFFINE = {"running_mean": (1, "running_mean"), "running_var": (2, "running_var"), "weight": (3, "weight"),
                 "bias": (4, "bias")}
_AFFINE = {"weight": (2, "weight"), "bias": (3, "bias")}
LAYER_FUNCTION_RULES: dict[Any, Any] = {
    F.linear: _functional(_linear_rule, _WEIGHT_BIAS),
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), _functional(_conv_rule, _WEIGHT_BIAS)),
    **dict.fromkeys((F.batch_norm, F.instance_norm), _functional(_norm_rule, _STATS_AFFINE, needs_weight=False)),
    **dict.fromkeys((F.layer_norm, F.group_norm), _functional(_norm_rule, _AFFINE, needs_weight=False)),
}
LAYER_MODULE_RULES: dict[type, Any] = {
    torch.nn.Linear: linear_module, **dict.fromkeys(_CONVS + _CONV_TRANSPOSES, conv_module),
    **dict.fromkeys(_BATCH_NORMS, batch_norm_module), torch.nn.LayerNorm: layer_norm_module,
    torch.nn.GroupNorm: group_norm_module, torch.nn.PReLU: prelu_module,
}
