"""Channel masks per dependency group: what ``granularity: 'out_channel'`` prunes when compress has example inputs.

A group (passes/dependencies.py) is a set of channels that several layers make or read together:
the output channels of the convs a residual add joins, the BatchNorm after them, the consumers
that read them. With ``out_channel``, one mask per group decides which of its channels go (scores
summed over its layers' filters, exactly ``floor(s·C)``, or ``floor(s·C/G)`` in each of ``G``
partitions), and every layer making those channels gets the rows of that mask; the norms over them
get masks too, so a pruned channel is exactly 0 after its norm in both modes (SPEC §4). The groups
and why any of them is not pruned live in the module tree (:class:`GroupRecord`,
``fxcompress_groups``), so masks can be recomputed (``update_masks``, schedules) and ``speedup``
can remove the channels later. Nothing here imports torch.fx.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxcompress.attention import resolve_layer
from fxcompress.settings import GRADIENT_CRITERIA, PruneSetting
from fxcompress.sparsity import partition_mask, scores

__all__ = ["GROUPS", "GroupPlan", "GroupRecord", "group_keep", "group_record", "masked_channels", "masked_layer_norm"]

GROUPS = "fxcompress_groups"


def masked_channels(y: Tensor, mask: Tensor) -> Tensor:
    """A norm's output with its pruned channels (dim 1) at exactly 0: ``y * mask`` broadcast over dim 1.

    The same as masking the norm's ``weight`` and ``bias`` (the masked channel's output is
    ``0·x̂ + 0``), in train and eval mode alike, whatever its running statistics hold.
    """
    return y * mask.reshape([-1] + [1] * (y.dim() - 2))


def masked_layer_norm(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
                      eps: float, mask: Tensor) -> Tensor:
    """``F.layer_norm`` over the kept channels only: what the LayerNorm of a pruned group computes (SPEC §4).

    ``mask`` (1 kept, 0 pruned; the shape of ``normalized_shape``) marks the kept entries of the
    normalized dims. Mean and variance are taken over the kept entries alone, so a kept channel gets
    exactly what a LayerNorm over the kept channels gives, which is what ``speedup``'s smaller
    LayerNorm computes; a pruned channel is exactly 0 (its weight and bias are masked), whatever the
    input holds there. With every channel kept it equals ``F.layer_norm`` up to float rounding.
    Computed in float32 for half-precision inputs, as ``F.layer_norm`` does under autocast.
    """
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.float()
    dims = [-1 - i for i in range(len(normalized_shape))]
    keep = mask.to(x.dtype)
    count = keep.sum()
    mean = (x * keep).sum(dims, keepdim=True) / count
    centered = (x - mean) * keep
    var = (centered * centered).sum(dims, keepdim=True) / count
    y = centered * torch.rsqrt(var + eps)  # 0 in the pruned channels, whatever the weight
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias * keep
    return y


@dataclass(frozen=True)
class GroupPlan:
    """What compress decided for one dependency group that an ``out_channel`` layer makes channels of.

    ``group`` is the :class:`~fxcompress.passes.dependencies.ChannelGroup`; ``layers`` the Conv/Linear
    layers making its channels (the *producers*); ``norms`` the norm modules over them whose outputs
    are masked. ``prune`` is the setting its channels are pruned with, or None with ``reason`` saying
    why they are not (blocked, partly selected, a GroupNorm averaging across them, ...). ``renormed``:
    the LayerNorms (by their module) that average across the group's channels; with the group pruned
    they compute :func:`masked_layer_norm`, their statistics over the kept channels only.
    """

    group: Any
    layers: tuple[str, ...]
    norms: tuple[str, ...]
    prune: PruneSetting | None
    config_index: int | None
    reason: str | None = None
    renormed: tuple[str, ...] = ()

    @property
    def id(self) -> int:
        return self.group.id


class GroupRecord(nn.Module):
    """The group plans of a compressed model, kept in its module tree (``fxcompress_groups``).

    ``macs``: multiply-accumulates of each Conv/Linear call on the example inputs (summed over
    calls); ``depthwise``: the convs whose groups equal their input channels; ``inputs``: the
    example inputs' shapes and dtypes (``speedup`` runs the model on such inputs when given none);
    ``ungrouped``: ``out_channel`` layers that belong to no group, with the reason (not pruned).
    """

    def __init__(self, plans: Iterable[GroupPlan], macs: Mapping[str, int], depthwise: Iterable[str],
                 inputs: Iterable[tuple[tuple[int, ...], torch.dtype]], ungrouped: Mapping[str, str]) -> None:
        super().__init__()
        self.plans = tuple(plans)
        self.macs = dict(macs)
        self.depthwise = frozenset(depthwise)
        self.inputs = tuple(inputs)
        self.ungrouped = dict(ungrouped)

    def example_inputs(self) -> tuple[Tensor, ...]:
        """Inputs of the recorded shapes and dtypes (seeded normal floats, zeros otherwise)."""
        gen = torch.Generator().manual_seed(0)
        return tuple(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                     else torch.zeros(shape, dtype=dtype) for shape, dtype in self.inputs)

    def of_layer(self, name: str) -> list[GroupPlan]:
        """The group plans ``name`` makes channels of."""
        return [p for p in self.plans if name in p.layers]

    def masks(self, gm: nn.Module, names: Iterable[str], fraction: float = 1.0,
              importance: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Bool keep-masks for the ``out_channel`` layers in ``names`` and for the norms of their groups.

        A layer in a pruned group gets that group's mask on the rows holding its channels; rows in
        no pruned group (a group not pruned, or a layer without group) are kept. A norm's mask has
        its parameters' shape. ``importance``: as for :meth:`channel_mask`.
        """
        names = set(names)
        rows: dict[str, Tensor] = {}
        for name in names:
            rows[name] = torch.ones(resolve_layer(gm, name).weight.shape[0], dtype=torch.bool)
        for plan in self.plans:
            if plan.prune is None or not set(plan.layers) <= names:
                continue
            keep = self.channel_mask(gm, plan, fraction, importance)
            for m in plan.group.members:
                if m.role == "out" and m.param == "weight" and m.layer in rows:
                    rows[m.layer][list(m.positions)] &= keep[list(m.channels)]
                elif m.role == "norm" and m.param == "weight" and m.layer in plan.norms:
                    rows.setdefault(m.layer, torch.ones(resolve_layer(gm, m.layer).weight.shape[0], dtype=torch.bool))
                    rows[m.layer][list(m.positions)] &= keep[list(m.channels)]
        out = {}
        for name, keep in rows.items():
            weight = resolve_layer(gm, name).weight
            out[name] = keep.reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()
        return out

    def channel_mask(self, gm: nn.Module, plan: GroupPlan, fraction: float = 1.0,
                     importance: Mapping[str, Tensor] | None = None) -> Tensor:
        """The group's bool channel keep-mask: filter scores summed over its layers, the lowest pruned,
        ``floor(s·n)`` in each partition of ``n`` (s: the sparsity times ``fraction``).

        With criterion ``'taylor'`` a filter's score is the sum of its accumulated |w·grad| taken from
        ``importance`` (layer name -> weight-shaped tensor); a group whose layers have none yet is
        waiting for gradients and keeps every channel.
        """
        setting, group = plan.prune, plan.group
        gradient = setting.criterion in GRADIENT_CRITERIA
        if gradient and not all(n in (importance or {}) for n in plan.layers):
            return torch.ones(group.channels, dtype=torch.bool)
        total = torch.zeros(group.channels, dtype=torch.float64)
        for m in group.members:
            if m.role == "out" and m.param == "weight" and m.layer in plan.layers:
                layer = resolve_layer(gm, m.layer)
                mask = getattr(layer, "weight_mask", None)
                weight = layer.weight.detach() if mask is None else layer.weight.detach() * mask
                if gradient:
                    weight = importance[m.layer]
                rows = scores(weight, setting, m.layer).double().cpu()
                total.index_add_(0, torch.tensor(m.channels, dtype=torch.long), rows[list(m.positions)])
        sparsity = setting.sparsity_per_layer * fraction if fraction < 1.0 else setting.sparsity_per_layer
        return _keep_a_filter_each(partition_mask(total, group.partitions, sparsity), total, plan)


def _keep_a_filter_each(keep: Tensor, score: Tensor, plan: GroupPlan) -> Tensor:
    """Swap channels so that no layer loses all its filters (a conv of 0 filters cannot run): its best
    channel stays and, in the same partition, the lowest-scored kept channel of another layer goes."""
    own: dict[str, set[int]] = {}
    for m in plan.group.members:
        if m.role == "out" and m.param == "weight" and m.layer in plan.layers:
            own.setdefault(m.layer, set()).update(m.channels)
    owners: dict[int, list[str]] = {}
    for layer, channels in own.items():
        for c in channels:
            owners.setdefault(c, []).append(layer)
    part_of = {c: p for p, part in enumerate(plan.group.partitions) for c in part}
    keep = keep.clone()
    for channels in own.values():
        if any(bool(keep[c]) for c in channels):
            continue
        best = max(sorted(channels), key=lambda c: float(score[c]))
        spare = [c for c in plan.group.partitions[part_of[best]] if bool(keep[c]) and all(
            any(bool(keep[o]) for o in own[other] if o != c) for other in owners.get(c, []))]
        if spare:
            keep[best], keep[min(spare, key=lambda c: (float(score[c]), c))] = True, False
    return keep


def group_record(gm: nn.Module) -> GroupRecord | None:
    """The model's group record, or None when compress made no group masks."""
    record = getattr(gm, GROUPS, None)
    return record if isinstance(record, GroupRecord) else None


def group_keep(gm: nn.Module, plan: GroupPlan, masks: Mapping[str, Tensor] | None = None) -> Tensor:
    """Which of a group's channels are kept now, read off its layers' weight masks (or ``masks``, bool).

    A channel is pruned when every row holding it, in every layer making it, is masked.
    """
    kept = torch.zeros(plan.group.channels)  # rows holding each channel that some mask keeps
    seen = torch.zeros(plan.group.channels, dtype=torch.bool)
    for m in plan.group.members:
        if m.role != "out" or m.param != "weight" or m.layer not in plan.layers:
            continue
        mask = (masks or {}).get(m.layer)
        if mask is None:
            buffer = getattr(resolve_layer(gm, m.layer), "weight_mask", None)
            mask = None if buffer is None else buffer.bool()
        channels = torch.tensor(m.channels, dtype=torch.long)
        seen[channels] = True
        row_kept = torch.ones(len(m.positions)) if mask is None else \
            mask.reshape(mask.shape[0], -1).any(dim=1).cpu()[list(m.positions)].float()
        kept.index_add_(0, channels, row_kept)
    return (kept > 0) | ~seen
