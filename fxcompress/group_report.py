"""The dependency-group table of the plan: per group, its channels, what is pruned and what that removes.

Built from the group record (``fxcompress_groups``) and the current masks only. The parameters and
FLOPs a row gives are those this group's pruning removes on its own (a layer whose input and output
channels both shrink is counted in both rows); FLOPs are 2 per multiply-accumulate of the Conv/Linear
calls on the example inputs compress was given (their batch size included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import tabulate
import torch
from torch import nn

from fxcompress.attention import resolve_layer
from fxcompress.channel_groups import GroupPlan, GroupRecord, group_keep, group_record
from fxcompress.settings import GRADIENT_CRITERIA, ratio_floor

__all__ = ["GroupRow", "group_column", "group_report", "group_table", "removed_by_group"]


@dataclass(frozen=True)
class GroupRow:
    """One dependency group of the plan table: ``pruned`` channels of ``channels`` (None: no masks yet)."""

    id: int
    channels: int
    partitions: int
    layers: tuple[str, ...]
    status: str
    pruned: int | None
    params_removed: int | None
    flops_removed: int | None


def group_report(gm: nn.Module, allocated: Mapping[str, torch.Tensor] | None = None) -> list[GroupRow]:
    """One row per group an ``out_channel`` layer makes channels of, in graph order (empty without groups).

    Args:
        gm: a model from ``compress`` or ``plan`` (with ``example_inputs``).
        allocated: bool keep-masks computed but not installed (a dry run), as for ``report``.
    """
    record = group_record(gm)
    if record is None:
        return []
    rows = []
    for plan in record.plans:
        keep = _keep(gm, plan, allocated)
        removed = None if keep is None else removed_by_group(gm, record, plan, keep)
        rows.append(GroupRow(plan.id, plan.group.channels, plan.group.num_partitions, plan.layers, _status(plan, keep),
                             None if keep is None else int((~keep).sum()),
                             None if removed is None else removed[0], None if removed is None else removed[1]))
    return rows


def _status(plan: GroupPlan, keep: torch.Tensor | None) -> str:
    """``pruned`` (saying which LayerNorms now average over the kept channels), ``not pruned: <why>``, or for a ``'taylor'`` group whose masks keep every channel although
    its target prunes some: ``taylor: waiting for gradients`` (``update_masks(gm, data=...)`` scores it)."""
    if plan.prune is None:
        return f"not pruned: {plan.reason}"
    if plan.prune.criterion in GRADIENT_CRITERIA and keep is not None and bool(keep.all()) and any(
            ratio_floor(plan.prune.sparsity_per_layer, len(part)) for part in plan.group.partitions):
        return "taylor: waiting for gradients"
    if plan.renormed:
        names = ", ".join(map(repr, plan.renormed[:2])) + (f" and {len(plan.renormed) - 2} more"
                                                          if len(plan.renormed) > 2 else "")
        return f"pruned; LayerNorm {names} averages over the kept channels only"
    return "pruned"


def group_column(gm: nn.Module, layer: str) -> str:
    """The layer table's ``group`` entry: the ids of the groups it makes channels of, ``-`` for none."""
    record = group_record(gm)
    if record is None:
        return ""
    plans = record.of_layer(layer)
    if not plans:
        return "-" if layer in record.ungrouped else ""
    return ",".join(f"{p.id}" + ("" if p.prune is not None else " (not pruned)") for p in plans)


def group_table(gm: nn.Module, allocated: Mapping[str, torch.Tensor] | None = None) -> str:
    """The group rows rendered with tabulate ('' without groups); layers without a group listed after."""
    rows = group_report(gm, allocated)
    if not rows:
        return ""
    table = [[r.id, r.channels, r.partitions, "" if r.pruned is None else r.pruned, _layers(r.layers),
              "" if r.params_removed is None else r.params_removed,
              "" if r.flops_removed is None else f"{r.flops_removed:.4g}", r.status] for r in rows]
    headers = ["group", "channels", "parts", "pruned", "layers", "params removed", "FLOPs removed", "status"]
    text = tabulate.tabulate(table, headers=headers, tablefmt="github")
    record = group_record(gm)
    for layer, why in record.ungrouped.items():
        text += f"\n{layer}: not pruned, {why}"
    return text


def removed_by_group(gm: nn.Module, record: GroupRecord, plan: GroupPlan, keep: torch.Tensor) -> tuple[int, int]:
    """Parameters and FLOPs that removing the group's channels not in ``keep`` takes away (this group alone)."""
    params = 0
    out_part: dict[str, float] = {}
    in_part: dict[str, float] = {}
    for m in plan.group.members:
        module = _module(gm, m.layer)
        tensor = None if module is None else getattr(module, m.param, None)
        if not isinstance(tensor, torch.Tensor) or (m.role == "in" and m.layer in record.depthwise):
            continue
        span = tensor.shape[m.dim] * (getattr(module, "groups", 1) if m.role == "in" else 1)
        gone = int((~keep[list(m.channels)]).sum())
        if isinstance(tensor, nn.Parameter):
            params += tensor.numel() // span * gone
        if m.param == "weight" and m.role in ("out", "in"):
            part = out_part if m.role == "out" else in_part
            part[m.layer] = part.get(m.layer, 0.0) + gone / span
    macs = 0.0
    for layer in out_part.keys() | in_part.keys():
        kept = (1.0 - out_part.get(layer, 0.0)) * (1.0 - in_part.get(layer, 0.0))
        macs += record.macs.get(layer, 0) * (1.0 - kept)
    return params, int(round(2 * macs))


def _keep(gm: nn.Module, plan: GroupPlan, allocated: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    have = [n for n in plan.layers if n in (allocated or {}) or _has_mask(gm, n)]
    if not have:
        return None
    return group_keep(gm, plan, allocated)


def _has_mask(gm: nn.Module, name: str) -> bool:
    module = _module(gm, name)
    return module is not None and "weight_mask" in module._buffers


def _module(gm: nn.Module, name: str) -> nn.Module | None:
    try:
        return resolve_layer(gm, name)
    except AttributeError:
        return None


def _layers(names: tuple[str, ...]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"
