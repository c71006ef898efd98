"""Physical channel removal for ``speedup``: slice parameters, fold what pruned channels still carry.

Reads the channel analysis (passes/dependencies.py) of a plain graph (no masks, the masked weights
baked in) and, per group, which channels stay; never the config. Every member of a group with pruned
channels is sliced along its dim: a layer's filters and bias, the input columns of its consumers
(for a grouped conv, within each of its groups; a depthwise conv's groups follow its channels), a
norm's parameters and running statistics, a parameter a tensor op reads. Before that, a pruned
channel that reaches a consumer as a nonzero constant (``sigmoid(0) = 0.5``) is folded into the
consumer's bias, measured on the example inputs: exact for a Linear and an unpadded conv.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxcompress.passes.annotate import layer_input, layer_weight
from fxcompress.passes.dependencies import ChannelGroup

__all__ = ["LayerCall", "PositionKeep", "fold_constants", "layer_calls", "measure_inputs", "position_keeps",
           "shrink_parameters"]

Key = tuple[str, str, int, str]  # (layer, parameter, dim, role)


@dataclass(frozen=True)
class LayerCall:
    """One call of a Conv/Linear in the graph: its node, whether a conv, its groups, and whether padded."""

    layer: str
    node: torch.fx.Node
    conv: bool
    groups: int
    padded: bool
    span: tuple[int, ...]  # the conv's kernel extent with dilation (input size giving one output)


@dataclass(frozen=True)
class PositionKeep:
    """Which positions along a parameter dim stay: ``keep`` over ``size`` positions (input channels for 'in')."""

    keep: torch.Tensor
    groups: tuple[int, ...]  # the dependency groups that decide them


def layer_calls(gm: torch.fx.GraphModule) -> dict[str, list[LayerCall]]:
    """Every Conv/Linear call of a plain graph (module calls and functional calls on a layer's weight)."""
    calls: dict[str, list[LayerCall]] = {}
    for node in gm.graph.nodes:
        call = _call(gm, node)
        if call is not None:
            calls.setdefault(call.layer, []).append(call)
    return calls


def _call(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LayerCall | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return LayerCall(node.target, node, False, 1, False, ())
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            padded = m.padding == "same" or (not isinstance(m.padding, str) and any(m.padding))
            return LayerCall(node.target, node, True, m.groups, padded, _span(m.kernel_size, m.dilation))
        return None
    weight = layer_weight(node)
    if node.op != "call_function" or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    layer = weight.target.rpartition(".")[0]
    if node.target is F.linear:
        return LayerCall(layer, node, False, 1, False, ())
    args = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), node.args, strict=False))
    args.update(node.kwargs)
    w = _tensor(gm, layer, weight.target.rpartition(".")[2])
    padding, dilation = args.get("padding", 0), args.get("dilation", 1)
    padded = padding == "same" or (not isinstance(padding, str) and any(_tuple(padding, w.dim() - 2)))
    return LayerCall(layer, node, True, args.get("groups", 1), padded,
                     _span(tuple(w.shape[2:]), _tuple(dilation, w.dim() - 2)))


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * n


def _span(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))


def position_keeps(groups: Sequence[ChannelGroup], keeps: Mapping[int, torch.Tensor], gm: nn.Module,
                   calls: Mapping[str, list[LayerCall]]) -> dict[Key, PositionKeep]:
    """For every parameter dim a group with pruned channels runs along: which positions stay."""
    out: dict[Key, PositionKeep] = {}
    for g in groups:
        if g.id not in keeps:
            continue
        for m in g.members:
            key = (m.layer, m.param, m.dim, m.role)
            if key not in out:
                tensor = _tensor(gm, m.layer, m.param)
                size = tensor.shape[m.dim] * (_groups(calls, m.layer) if m.role == "in" else 1)
                out[key] = PositionKeep(torch.ones(size, dtype=torch.bool), ())
            entry = out[key]
            entry.keep[list(m.positions)] = keeps[g.id][list(m.channels)]
            out[key] = PositionKeep(entry.keep, tuple(dict.fromkeys((*entry.groups, g.id))))
    return out


def _groups(calls: Mapping[str, list[LayerCall]], layer: str) -> int:
    return calls[layer][0].groups if layer in calls else 1


def _tensor(gm: nn.Module, layer: str, param: str) -> torch.Tensor:
    owner = gm.get_submodule(layer) if layer else gm
    return getattr(owner, param)


@torch.no_grad()
def measure_inputs(gm: torch.fx.GraphModule, calls: Mapping[str, list[LayerCall]], layers: set[str],
                   inputs: Sequence[Any]) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``gm`` (eval, no grad) and return its output and, per layer in ``layers``, which input channels
    hold one value everywhere (over the batch, positions and calls) and that value."""
    wanted = {c.node: c for layer in layers for c in calls.get(layer, ())}
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n in wanted:
                call = wanted[n]
                x = self.env[layer_input(n)]
                dim = x.dim() - len(call.span) - 1 if call.conv else x.dim() - 1
                rows = x.detach().movedim(dim, 0).reshape(x.shape[dim], -1).float().cpu()
                lo, hi = rows.amin(dim=1), rows.amax(dim=1)
                const, value = lo == hi, lo
                if call.layer in found:
                    old_const, old_value = found[call.layer]
                    const = const & old_const & (value == old_value)
                found[call.layer] = (const, value)
            return super().run_node(n)

    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        out = Probe(gm).run(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return out, found


@torch.no_grad()
def fold_constants(gm: torch.fx.GraphModule, calls: Mapping[str, list[LayerCall]], keeps: Mapping[Key, PositionKeep],
                   measured: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Add to each consumer's bias what its pruned input channels contribute as constants.

    Returns:
        Problems, one line each (a pruned input that varies, a constant into a padded conv); empty when
        every pruned input is foldable.
    """
    problems = []
    for (layer, param, _, role), entry in keeps.items():
        if role != "in" or param != "weight" or layer not in measured:
            continue
        gone = (~entry.keep).nonzero().squeeze(1)
        const, value = measured[layer]
        if not bool(const[gone].all()):
            problems.append(f"pruned channels of group {entry.groups[0]} reach {layer!r} with values that vary over "
                            "the batch or positions (something between their norm and this layer adds to them)")
            continue
        carried = torch.zeros_like(value)
        carried[gone] = value[gone]
        if not bool(carried.any()):
            continue
        call = calls[layer][0]
        if call.padded:
            problems.append(f"pruned channels of group {entry.groups[0]} reach the padded conv {layer!r} as constants "
                            f"({float(carried[gone].abs().max()):.3g} at most): the padding makes their contribution "
                            "differ at the borders, so it cannot be folded into a bias")
            continue
        _add_to_bias(gm, calls[layer], carried)
    return problems


def _add_to_bias(gm: torch.fx.GraphModule, calls: Sequence[LayerCall], carried: torch.Tensor) -> None:
    call = calls[0]
    owner = gm.get_submodule(call.layer)
    weight = owner.weight
    x = carried.to(weight).reshape(1, -1, *([1] * len(call.span))).expand(1, -1, *call.span)
    delta = (F.linear(x.reshape(1, -1), weight) if not call.conv else
             _conv(x, weight, call.groups)).reshape(-1)
    if owner.bias is None:
        owner.bias = nn.Parameter(delta.clone(), requires_grad=weight.requires_grad)
        for c in calls:
            if c.node.op == "call_function":
                _set_arg(c.node, 2, "bias", _bias_read(gm, c.node, call.layer))
    else:
        owner.bias.add_(delta)


def _conv(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2](x.contiguous(), weight, None, 1, 0, 1, groups)


def _bias_read(gm: torch.fx.GraphModule, node: torch.fx.Node, layer: str) -> torch.fx.Node:
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(f"{layer}.bias")


def _set_arg(node: torch.fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


@torch.no_grad()
def shrink_parameters(gm: torch.fx.GraphModule, calls: Mapping[str, list[LayerCall]],
                      keeps: Mapping[Key, PositionKeep]) -> None:
    """Slice every parameter/buffer to its kept positions and update the modules' sizes and groups."""
    for (layer, param, dim, role), entry in sorted(keeps.items(), key=lambda kv: kv[0][3] == "in"):
        owner = gm.get_submodule(layer) if layer else gm
        tensor = getattr(owner, param)
        if role == "in" and param == "weight" and layer in calls and calls[layer][0].conv:
            sliced = _conv_input(tensor, entry.keep, calls[layer][0].groups)
        else:
            sliced = tensor.index_select(dim, entry.keep.nonzero().squeeze(1).to(tensor.device))
        _replace(owner, param, tensor, sliced)
    for layer in {k[0] for k in keeps}:
        _resize(gm, layer, calls, keeps)


def _conv_input(weight: torch.Tensor, keep: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv weight's input columns kept: ``keep`` over its input channels, cut into ``groups``."""
    if weight.shape[1] == 1 and groups == keep.numel():
        return weight  # depthwise: its filters are its channels, sliced as its output
    cells = keep.reshape(groups, -1)
    counts = cells.sum(dim=1)
    assert bool((counts == counts[0]).all()), "a grouped conv's groups lose unequally (partitions are equal)"
    rows = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    picked = [rows[g][:, cells[g].nonzero().squeeze(1).to(weight.device)] for g in range(groups)]
    return torch.cat(picked).reshape(weight.shape[0], int(counts[0]), *weight.shape[2:])


def _replace(owner: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new.clone(), requires_grad=old.requires_grad))
    else:
        owner._buffers[name] = new.clone()


def _resize(gm: torch.fx.GraphModule, layer: str, calls: Mapping[str, list[LayerCall]],
            keeps: Mapping[Key, PositionKeep]) -> None:
    """Make a module's size attributes (and a depthwise conv's groups, also in functional calls) match."""
    m = gm.get_submodule(layer) if layer else gm
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.conv._ConvNd) or (layer in calls and calls[layer][0].conv):
        groups = calls[layer][0].groups if layer in calls else m.groups
        entry = keeps.get((layer, "weight", 1, "in"))
        depthwise = m.weight.shape[1] == 1 and entry is not None and entry.keep.numel() == groups
        new_groups = int(entry.keep.sum()) if depthwise else groups
        if isinstance(m, nn.modules.conv._ConvNd):
            m.out_channels, m.groups = m.weight.shape[0], new_groups
            m.in_channels = m.weight.shape[1] * new_groups
        for c in calls.get(layer, ()):
            if c.node.op == "call_function" and new_groups != groups:
                _set_arg(c.node, 6, "groups", new_groups)
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = next(t.shape[0] for t in (m.weight, m.running_mean) if t is not None)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.shape[0]
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = m.weight.shape[0]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (*m.normalized_shape[:-1], m.weight.shape[-1])
