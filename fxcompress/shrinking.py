"""``speedup``: turn a channel-pruned model into a smaller one that computes the same, and rebuild it from a state dict.

A model compressed with ``granularity: 'out_channel'`` and ``example_inputs`` holds one channel
mask per dependency group (SPEC §4). :func:`speedup` removes the pruned channels for real: each
Conv/Linear keeps only its kept filters and reads only its kept input channels, norms keep only
theirs, sizes written in the graph follow, channel shuffles become gathers of the kept channels,
and a constant a pruned channel still carries into a layer (``sigmoid(0) = 0.5``) is folded into
that layer's bias. The result has no masks and equals the masked model in eval mode (to float
rounding; speedup checks it on the example inputs); it keeps both modes, trains, compiles, exports
and scripts. Quantized layers keep their quantizers (their state is per tensor, or recomputed from
the weight per channel, so nothing needs slicing).

Saving: ``torch.save(fast)`` / ``torch.load(path, weights_only=False)`` of the whole module, or a
state dict: ``fast.state_dict()`` records which filters were pruned (``fxcompress_speedup``), and
:func:`speedup_from_state_dict` rebuilds the small model from the original model and the config.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxcompress.annotations import RECORD, plans_of
from fxcompress.api import compress
from fxcompress.attention import resolve_layer
from fxcompress.channel_groups import GROUPS, group_record
from fxcompress.errors import ConfigError
from fxcompress.passes.annotate import annotate_layers
from fxcompress.passes.dependencies import ChannelAnalysis, ChannelGroup, analyze_channels
from fxcompress.passes.fold_bn import fold_batchnorm
from fxcompress.passes.functionalize import functionalize_layers
from fxcompress.passes.group_plan import NORM_TYPES, layer_norm_call
from fxcompress.passes.leaf_layers import rewrite_leaf_layers
from fxcompress.passes.module_level import module_level_reason
from fxcompress.passes.prune import renorm_layer_norm
from fxcompress.passes.quantize import insert_fake_quant
from fxcompress.passes.shrink import fold_constants, layer_calls, measure_inputs, position_keeps, shrink_parameters
from fxcompress.passes.shrink_graph import ShrinkError, replace_shuffles, rewrite_sizes, slot_keep
from fxcompress.passes.strip import strip_compression
from fxcompress.pruning import install_masks
from fxcompress.taylor import HOW, waiting_layers

__all__ = ["SPEEDUP", "SpeedupError", "SpeedupRecord", "speedup", "speedup_from_state_dict"]

SPEEDUP = "fxcompress_speedup"


class SpeedupError(ValueError):
    """A model ``speedup`` cannot shrink: no channel masks, masks that are not whole groups' channels,
    a group whose channels an op reads in a way that cannot shrink (named), a module-level model."""


class SpeedupRecord(nn.Module):
    """Which filters (rows of a layer's weight) and norm channels ``speedup`` removed, in the state dict
    as ``fxcompress_speedup._extra_state`` (what :func:`speedup_from_state_dict` rebuilds from)."""

    def __init__(self, pruned: Mapping[str, list[int]]) -> None:
        super().__init__()
        self.pruned = {k: list(v) for k, v in pruned.items()}

    def get_extra_state(self) -> dict[str, dict[str, list[int]]]:
        return {"pruned": self.pruned}

    def set_extra_state(self, state: dict[str, dict[str, list[int]]]) -> None:
        if state["pruned"] != self.pruned:
            raise ConfigError("load_state_dict: the checkpoint's model was sped up with other channels pruned than "
                              "this one; rebuild it with fxcompress.speedup_from_state_dict(model, config_list, "
                              "state_dict, example_inputs)")


def speedup(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any] | None = None
            ) -> torch.fx.GraphModule:
    """A copy of ``gm`` with its pruned channels physically removed; ``gm`` is not changed.

    Args:
        gm: a model from ``compress`` with ``granularity: 'out_channel'`` and ``example_inputs``.
        example_inputs: a tensor or tuple of inputs to analyse and check on; default: inputs of the
            shapes ``compress`` was given.
    Returns:
        A GraphModule without masks that equals ``gm`` in eval mode (float rounding).
    Raises:
        SpeedupError: no channel masks; masks that are not whole dependency groups' channels (per
            layer ``out_channel`` without example inputs, ``element``/``N:M`` masks); a group that
            cannot shrink, naming the op that blocks it; a model compressed at module level.

    >>> fast = speedup(compress(model, [{'op_types': ['Conv2d'], 'sparsity_per_layer': 0.5,
    ...                'granularity': 'out_channel'}], example_inputs=(x,)))  # doctest: +SKIP
    """
    inputs = _inputs(gm, example_inputs)
    waiting = sorted(waiting_layers(gm, plans_of(gm)))
    if waiting:
        raise SpeedupError(f"speedup: layers {', '.join(map(repr, waiting))} are pruned with criterion 'taylor' and "
                           f"still wait for gradients (their masks keep every channel); call {HOW} first")
    new = copy.deepcopy(gm)
    masks = _masks(new)
    _bake(new, masks)
    strip_compression(new)
    analysis = analyze_channels(new, inputs)
    keeps = _group_keeps(new, analysis, masks)
    calls = layer_calls(new)
    positions = position_keeps(analysis.groups, keeps, new, calls)
    consumers = {layer for (layer, _, _, role) in positions if role == "in"}
    renormed = _renorm(new, analysis, keeps, masks)  # the reference computes the masked model's LayerNorms
    reference, measured = measure_inputs(new, calls, consumers, inputs)
    problems = fold_constants(new, calls, positions, measured)
    if problems:
        raise SpeedupError(f"speedup: {problems[0]}")
    shrink_parameters(new, calls, positions)
    _unrenorm(new, renormed)  # a plain LayerNorm over the kept channels computes the same
    keep = slot_keep(analysis, keeps)
    try:
        replace_shuffles(new, analysis, keep, set(keeps))  # first: the shuffles' own views go
        rewrite_sizes(new, analysis, keep)
    except ShrinkError as err:
        raise SpeedupError(str(err)) from None
    new.graph.lint()
    new.recompile()
    _check_equal(new, inputs, reference)
    _finish(new, masks, positions)
    return new


def _inputs(gm: nn.Module, example_inputs: torch.Tensor | Sequence[Any] | None) -> tuple[Any, ...]:
    if not isinstance(gm, nn.Module):
        raise TypeError(f"speedup: expected the GraphModule compress returned, got {type(gm).__name__}")
    reason = module_level_reason(gm)
    if reason is not None:
        raise SpeedupError(f"speedup: {type(gm).__name__} was compressed at module level ({reason.split('. ')[0]}), "
                           "so there is no graph to follow its channels through; speedup shrinks GraphModules only")
    if not isinstance(gm, torch.fx.GraphModule):
        raise SpeedupError(f"speedup: expected the GraphModule compress returned, got {type(gm).__name__}")
    if example_inputs is not None:
        return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    record = group_record(gm)
    if record is None or not record.inputs:
        raise SpeedupError("speedup: no example inputs: pass speedup(gm, example_inputs=(x,)), or compress with "
                           "example_inputs (then out_channel prunes whole dependency groups, which speedup needs)")
    return record.example_inputs()


def _masks(gm: nn.Module) -> dict[str, torch.Tensor]:
    """The bool masks of the pruned layers and of the norms of pruned groups."""
    masks = {n: resolve_layer(gm, n).weight_mask.bool().cpu() for n, p in plans_of(gm).items()
             if p.prune is not None and p.compressed and "weight_mask" in resolve_layer(gm, n)._buffers}
    record = group_record(gm)
    for plan in record.plans if record is not None else ():
        for norm in plan.norms:
            if "weight_mask" in gm.get_submodule(norm)._buffers:
                masks[norm] = gm.get_submodule(norm).weight_mask.bool().cpu()
    if not masks:
        raise SpeedupError("speedup: the model has no pruning masks; compress it with granularity 'out_channel' "
                           "(and example_inputs) first")
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        if not bool((rows == rows[:, :1]).all()):
            raise SpeedupError(f"speedup: layer {name!r} has masks that prune single weights, not whole filters "
                               f"(granularity {plans_of(gm)[name].prune.granularity!r}); speedup removes channels "
                               "only: use granularity 'out_channel' for the layers to shrink")
    return masks


@torch.no_grad()
def _bake(gm: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Multiply the masks into the parameters (the plain graph then computes the masked model) and drop them."""
    holders: dict[int, int] = {}
    for module in gm.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    for name, mask in masks.items():
        layer = resolve_layer(gm, name)
        if holders.get(id(layer.weight), 0) > 1:
            raise SpeedupError(f"speedup: layer {name!r} shares its weight with another module; speedup cannot "
                               "slice a tied weight")
        rows = mask.reshape(mask.shape[0], -1)[:, 0]
        layer.weight.mul_(mask.to(layer.weight))
        if layer.bias is not None:
            layer.bias.mul_(rows.to(layer.bias))
        for buffer in ("weight_mask", "bias_mask"):
            layer._buffers.pop(buffer, None)


def _group_keeps(gm: nn.Module, analysis: ChannelAnalysis, masks: Mapping[str, torch.Tensor]
                 ) -> dict[int, torch.Tensor]:
    """Per group with pruned channels, its channel keep-mask (pruned: every filter holding it is masked).

    Raises:
        SpeedupError: masks that split a group's channels; a pruned group that is blocked, averaged
            over by a GroupNorm (or a LayerNorm not masked on them), cut unevenly across its partitions, or has an unmasked norm.
    """
    keeps: dict[int, torch.Tensor] = {}
    explained: dict[str, set[int]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for g in analysis.groups:
        pruned_all, pruned_any = _pruned_channels(g, masks)
        if bool(pruned_any.any()) and not torch.equal(pruned_all, pruned_any):
            layer = _splitter(g, masks, pruned_all)
            raise SpeedupError(f"speedup: layer {layer!r} prunes channels of group {g.id} that other layers making "
                               "them keep (per-layer masks); compress with example_inputs=(x,) so that granularity "
                               "'out_channel' prunes whole dependency groups")
        if not bool(pruned_all.any()):
            continue
        _check_group(gm, g, pruned_all, masks, nodes)
        keeps[g.id] = ~pruned_all
        for m in g.members:
            if m.role == "out" and m.param == "weight":
                explained.setdefault(m.layer, set()).update(
                    p for p, c in zip(m.positions, m.channels, strict=True) if pruned_all[c])
    record = group_record(gm)
    norms = {n for p in (record.plans if record is not None else ()) for n in p.norms}
    for name, mask in masks.items():
        rows = set((~mask.reshape(mask.shape[0], -1).any(dim=1)).nonzero().squeeze(1).tolist())
        if name not in norms and rows - explained.get(name, set()):
            raise SpeedupError(f"speedup: layer {name!r} has pruned filters that are in no prunable dependency group "
                               "(its channels are read where the analysis cannot follow them)")
    if not keeps:
        raise SpeedupError("speedup: no channel is pruned (the masks keep every channel of every group)")
    return keeps


def _pruned_channels(g: ChannelGroup, masks: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels every filter of every producer prunes, and channels some filter prunes."""
    held = torch.zeros(g.channels)
    kept = torch.zeros(g.channels)
    gone = torch.zeros(g.channels)
    for m in g.members:
        if m.role != "out" or m.param != "weight":
            continue
        channels = torch.tensor(m.channels, dtype=torch.long)
        mask = masks.get(m.layer)
        rows = torch.ones(len(m.positions), dtype=torch.bool) if mask is None else \
            mask.reshape(mask.shape[0], -1).any(dim=1)[list(m.positions)]
        held.index_add_(0, channels, torch.ones(len(channels)))
        kept.index_add_(0, channels, rows.float())
        gone.index_add_(0, channels, (~rows).float())
    return (held > 0) & (kept == 0), gone > 0


def _splitter(g: ChannelGroup, masks: Mapping[str, torch.Tensor], pruned_all: torch.Tensor) -> str:
    for m in g.members:
        mask = masks.get(m.layer)
        if m.role == "out" and m.param == "weight" and mask is not None:
            rows = mask.reshape(mask.shape[0], -1).any(dim=1)[list(m.positions)]
            if any(not r and not pruned_all[c] for r, c in zip(rows.tolist(), m.channels, strict=True)):
                return m.layer
    return g.members[0].layer


def _check_group(gm: nn.Module, g: ChannelGroup, pruned: torch.Tensor, masks: Mapping[str, torch.Tensor],
                 nodes: Mapping[str, torch.fx.Node]) -> None:
    layers = sorted({m.layer for m in g.members if m.role == "out"})
    if g.blocked_by is not None:
        raise SpeedupError(f"speedup: group {g.id} ({', '.join(layers)}) cannot be shrunk: node {g.blocked_by!r} "
                           "reads its channels in a way that cannot shrink; exclude its layers from the config")
    for name in g.statistics:
        call = layer_norm_call(gm, nodes[name]) if name in nodes else None
        mask = None if call is None else masks.get(call.owner)
        norm = None if call is None else _member(g, call.owner)
        if mask is None or norm is None or any(bool(mask[p]) for p, c in zip(norm.positions, norm.channels, strict=True)
                                               if pruned[c]):
            raise SpeedupError(f"speedup: group {g.id} ({', '.join(layers)}) cannot be shrunk: {name!r} averages "
                               "across its channels (a GroupNorm, or a LayerNorm whose statistics do not leave the "
                               "pruned channels out), so removing them would change it")
    counts = {int(pruned[list(p)].sum()) for p in g.partitions}
    if len(counts) > 1:
        raise SpeedupError(f"speedup: group {g.id} ({', '.join(layers)}) must lose equally many channels in each of "
                           f"its {g.num_partitions} parts (grouped conv, heads, chunks), but loses {sorted(counts)}")
    for m in g.members:
        if m.role == "norm" and m.param in ("weight", "running_mean") and isinstance(_module(gm, m.layer), NORM_TYPES):
            mask = masks.get(m.layer)
            unmasked = [c for p, c in zip(m.positions, m.channels, strict=True)
                        if pruned[c] and (mask is None or bool(mask[p]))]
            if unmasked:
                raise SpeedupError(f"speedup: norm {m.layer!r} is not masked on the pruned channels of group {g.id}, "
                                   "so its shift keeps them alive; compress with example_inputs=(x,) so that "
                                   "granularity 'out_channel' masks the norms of each group")


def _member(g: ChannelGroup, layer: str) -> Any:
    return next((m for m in g.members if m.layer == layer and m.role == "norm" and m.param == "weight"), None)


_KEEP = "_fxcompress_speedup_keep"


def _renorm(gm: torch.fx.GraphModule, analysis: ChannelAnalysis, keeps: Mapping[int, torch.Tensor],
            masks: Mapping[str, torch.Tensor]) -> list[torch.fx.Node]:
    """Make the LayerNorms over pruned groups ``masked_layer_norm`` again, as in the masked model (the
    stripped graph has plain ones, which count the pruned channels as zeros), with their masks as
    temporary buffers; :func:`_unrenorm` undoes it once the parameters are sliced."""
    nodes = {n.name: n for n in gm.graph.nodes}
    done: list[torch.fx.Node] = []
    for g in analysis.groups:
        for name in g.statistics if g.id in keeps else ():
            node = nodes[name]
            call = layer_norm_call(gm, node)
            if node in done or call is None:
                continue
            gm.register_buffer(f"{_KEEP}{len(done)}", masks[call.owner].to(gm.get_submodule(call.owner).weight),
                               persistent=False)
            renorm_layer_norm(gm, node, call, f"{_KEEP}{len(done)}")
            done.append(node)
    return done


def _unrenorm(gm: torch.fx.GraphModule, renormed: list[torch.fx.Node]) -> None:
    """Plain ``F.layer_norm`` calls over the kept channels (the weights are sliced), the masks gone."""
    for node in renormed:
        x, _, weight, bias, eps, read = node.args
        node.target, node.args = F.layer_norm, (x, list(gm.get_submodule(weight.target.rpartition(".")[0]).weight.shape),
                                                weight, bias, eps)
        gm.graph.erase_node(read)
        delattr(gm, read.target)


def _module(gm: nn.Module, name: str) -> nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def _check_equal(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], reference: Any) -> None:
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        out = gm(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    for a, b in zip(_leaves(out), _leaves(reference), strict=True):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * scale):
            raise SpeedupError("speedup: the shrunk model does not compute what the masked model computes on the "
                               "example inputs (an op whose channels speedup handles wrongly); please report it")


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [x for v in value for x in _leaves(v)]
    return []


def _finish(gm: torch.fx.GraphModule, masks: Mapping[str, torch.Tensor], positions: Mapping) -> None:
    """Plans without the pruning that is now physical, the record of what went, quantizers back in the graph."""
    plans = {n: replace(p, prune=None) if n in masks else p for n, p in plans_of(gm).items()}
    getattr(gm, RECORD).plans = plans
    gm._modules.pop(GROUPS, None)
    pruned = {layer: (~entry.keep).nonzero().squeeze(1).tolist()
              for (layer, param, _, role), entry in positions.items()
              if param == "weight" and role in ("out", "norm") and layer in masks and not bool(entry.keep.all())}
    gm.add_module(SPEEDUP, SpeedupRecord(pruned).train(gm.training))
    annotate_layers(gm, (), plans)
    rewrite_leaf_layers(gm)
    functionalize_layers(gm, finalize=False)
    insert_fake_quant(gm, finalize=False)
    fold_batchnorm(gm)  # a quantized conv's BatchNorm fold (its plan says which), as compress makes it
    gm.graph.lint()
    gm.recompile()


def speedup_from_state_dict(model: nn.Module, config_list: Any, state_dict: Mapping[str, Any],
                            example_inputs: torch.Tensor | Sequence[Any], **compress_kwargs: Any
                            ) -> torch.fx.GraphModule:
    """Rebuild a sped-up model from the original (dense) model, the config and the sped-up state dict.

    Compresses ``model`` as before, sets the masks to the filters the state dict records as removed,
    runs :func:`speedup` and loads the state dict (strict) into the result. ``model`` is not changed.

    >>> torch.save(fast.state_dict(), "fast.pt")  # doctest: +SKIP
    >>> fast = speedup_from_state_dict(resnet18(), config_list, torch.load("fast.pt"), (x,))  # doctest: +SKIP
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    key = f"{SPEEDUP}._extra_state"
    if key not in state_dict:
        raise ConfigError(f"speedup_from_state_dict: the state dict has no {key!r}; it is not from a sped-up model")
    with warnings.catch_warnings():  # the masks come from the state dict: 'taylor' layers wait for nothing
        warnings.filterwarnings("ignore", message=r"compress: config_list\[.*criterion 'taylor'")
        gm = compress(model, config_list, example_inputs=inputs, **compress_kwargs)
    pruned = state_dict[key]["pruned"]
    masks = {}
    for name in _masks(gm):  # every mask compress computed, set to the filters the checkpoint removed
        weight = resolve_layer(gm, name).weight
        masks[name] = torch.ones(weight.shape, dtype=torch.bool)
        masks[name][pruned.get(name, [])] = False
    unknown = sorted(set(pruned) - set(masks))
    if unknown:
        raise ConfigError(f"speedup_from_state_dict: the state dict removed filters of {unknown[0]!r}, which this "
                          "config_list does not prune with granularity 'out_channel'; use the config it was made with")
    install_masks(gm, masks)
    fast = speedup(gm, inputs)
    fast.load_state_dict(state_dict)
    return fast
