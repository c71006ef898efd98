"""Channel axes of tensors and the ledger of channel ties: the data under passes/dependencies.py. No torch.fx.

A *slot* is one channel as some producer makes it: an output channel of a layer, one index along
one dim of a parameter, or a channel that comes from outside the analysis (a model input, an op
the analysis cannot follow). Slots are numbered in creation order, a *bundle* at a time (all the
output channels of one layer). A tensor's :class:`Layout` says which of its dims carry which
slots; ops *tie* slots (a residual add makes channel ``i`` of both operands one channel), and the
ledger records every tie, member, equal-partition constraint and blocker with the fx node that
caused it. Reshapes, permutes, slices and splits are followed by applying the op itself to a
tensor of channel ids (:func:`apply_shape_op`), so any combination of them is understood the
way torch computes it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

__all__ = ["Axis", "Bundle", "Layout", "Ledger", "MemberRecord", "apply_shape_op", "axis_field", "shift_axis"]


@dataclass(frozen=True, eq=False)
class Axis:
    """One channel axis of a tensor: the tensor dims it runs along (outer to inner) and its slots.

    Usually one dim (a conv's channel dim). A channel dim viewed as ``(heads, head_dim)`` or as
    ShuffleNet's ``(groups, channels_per_group)`` is one axis over two dims, outer first, whatever
    order a later transpose puts them in. ``weak`` axes hold only parameter slots that have not met
    a layer's channels yet: where they meet no channels they are dropped instead of blocking.
    """

    dims: tuple[int, ...]
    slots: torch.Tensor  # int64, shape: the sizes of ``dims`` in that order
    weak: bool = False


@dataclass(frozen=True, eq=False)
class Layout:
    """The channel axes of one tensor; ``source`` names where its untracked dims come from."""

    axes: tuple[Axis, ...] = ()
    source: str = ""

    @property
    def strong(self) -> tuple[Axis, ...]:
        return tuple(a for a in self.axes if not a.weak)


@dataclass(frozen=True)
class Bundle:
    """Slots ``start .. start+size-1``, created together (one layer's output channels)."""

    start: int
    size: int
    label: str


@dataclass(frozen=True, eq=False)
class MemberRecord:
    """Positions along ``dim`` of ``layer.param`` and the slot each one holds."""

    layer: str
    param: str
    dim: int
    role: str  # 'out' (a layer's own channels), 'in' (its input channels), 'norm', 'param'
    positions: torch.Tensor
    slots: torch.Tensor


@dataclass
class Ledger:
    """Everything the channel walk found, in graph order; turned into groups by passes/dependencies.py."""

    bundles: list[Bundle] = field(default_factory=list)
    ties: list[tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=list)
    members: list[MemberRecord] = field(default_factory=list)
    families: list[tuple[torch.Tensor, str]] = field(default_factory=list)  # (G, n) slots: equal parts
    blocks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    carriers: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # fx nodes and the slots they carry
    reorders: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # shuffles of these slots
    statistics: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # norms averaging across them
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # per layer/parameter: its slots
    labels: set[str] = field(default_factory=set)
    size: int = 0

    def new_bundle(self, size: int, label: str, blocked_by: str | None = None) -> torch.Tensor:
        """Fresh slots; a bundle of channels from outside the analysis is blocked from the start."""
        unique = label if label not in self.labels else next(f"{label}#{k}" for k in itertools.count(2)
                                                             if f"{label}#{k}" not in self.labels)
        self.labels.add(unique)
        self.bundles.append(Bundle(self.size, size, unique))
        slots = torch.arange(self.size, self.size + size)
        self.size += size
        if blocked_by is not None:
            self.block(slots, blocked_by)
        return slots

    def tie(self, a: torch.Tensor, b: torch.Tensor, why: str) -> None:
        """Make ``a[i]`` and ``b[i]`` one channel (broadcasting)."""
        a, b = torch.broadcast_tensors(a, b)
        self.ties.append((a.reshape(-1), b.reshape(-1), why))

    def block(self, slots: torch.Tensor, why: str) -> None:
        self.blocks.append((slots.reshape(-1), why))

    def member(self, layer: str, param: str, dim: int, role: str, slots: torch.Tensor,
               positions: torch.Tensor | None = None) -> None:
        slots = slots.reshape(-1)
        positions = torch.arange(len(slots)) if positions is None else positions
        self.members.append(MemberRecord(layer, param, dim, role, positions, slots))

    def family(self, cells: torch.Tensor, why: str) -> None:
        """The rows of ``cells`` (slots) must lose equally many channels each."""
        if cells.shape[0] > 1:
            self.families.append((cells, why))

    def reorder(self, slots: torch.Tensor, why: str) -> None:
        """``slots``, split into parts earlier, are merged back in another order (a channel shuffle):
        that is a permutation, which keeps any subset; the parts of the split need not stay equal."""
        key = torch.sort(slots.reshape(-1)).values
        self.families = [(c, w) for c, w in self.families
                         if c.numel() != key.numel() or not torch.equal(torch.sort(c.reshape(-1)).values, key)]
        self.reorders.append((why, slots))


def shift_axis(axis: Axis, offset: int) -> Axis:
    return replace(axis, dims=tuple(d + offset for d in axis.dims))


def axis_field(axis: Axis, rank: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` (default: the slots) laid out in tensor order, size 1 on the dims the axis does not use."""
    values = axis.slots if values is None else values
    order = sorted(range(len(axis.dims)), key=lambda i: axis.dims[i])
    shape = [1] * rank
    for d, n in zip(axis.dims, values.shape, strict=True):
        shape[d] = n
    return values.permute(order).reshape(shape)


def apply_shape_op(axis: Axis, in_shape: Sequence[int], op: Callable[[torch.Tensor], object]
                   ) -> tuple[list[Axis | None], bool]:
    """Follow ``axis`` through a reshape/permute/slice/split ``op`` by applying it to channel ids.

    Returns one entry per tensor ``op`` returns: the axis it carries, or None where it no longer
    carries the whole axis in a way that keeps channel order (a single channel picked out, a flip);
    and whether the op merges an axis of several dims back in another order (a channel shuffle).
    """
    ids = torch.arange(axis.slots.numel()).reshape(axis.slots.shape)
    result = op(axis_field(axis, len(in_shape), ids).expand(*in_shape))
    outs = [result] if isinstance(result, torch.Tensor) else list(result)
    flat = axis.slots.reshape(-1)
    rebuilt, shuffled = [], False
    for out in outs:
        new, reorders = _rebuild(out, flat, multi=len(axis.dims) > 1)
        rebuilt.append(replace(axis, dims=new[0], slots=new[1]) if new else None)
        shuffled |= reorders
    return rebuilt, shuffled


def _rebuild(out: torch.Tensor, flat: torch.Tensor, multi: bool
             ) -> tuple[tuple[tuple[int, ...], torch.Tensor] | None, bool]:
    """The axis carried by ``out`` (channel ids in tensor layout): its dims outer-to-inner and slots."""
    vary = [d for d in range(out.dim()) if out.shape[d] > 1 and not bool((out == out.narrow(d, 0, 1)).all())]
    if not vary:
        return None, False
    reduced = out[tuple(slice(None) if d in vary else 0 for d in range(out.dim()))]
    back = reduced.reshape([out.shape[d] if d in vary else 1 for d in range(out.dim())])
    if not torch.equal(back.expand_as(out), out):
        return None, False  # channels spread over dims in a way that is no product of axes
    for perm in itertools.permutations(range(len(vary))):
        seq = reduced.permute(perm).reshape(-1)
        if bool((seq[1:] >= seq[:-1]).all()):
            return (tuple(vary[i] for i in perm), flat[reduced.permute(perm)]), False
    if not multi:
        return None, False  # a single dim reordered (a flip, a gather): no order to keep
    return (tuple(vary), flat[reduced]), True
