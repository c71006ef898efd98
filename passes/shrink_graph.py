"""The graph side of ``speedup``: sizes written into the graph follow the kept channels; shuffles become gathers.

After passes/shrink.py has sliced the parameters, a ``view``/``reshape``/``unflatten``/``expand`` that
names a channel dim's size, a ``split`` into channel ranges, a ``narrow`` or a slice of channels
still hold the old numbers: they get the kept counts (the node's channel layout from the analysis
says which of its sizes are channels). A channel shuffle (a view/transpose/view that interleaves
channel parts, ``nn.ChannelShuffle``) is replaced by one ``index_select`` that puts the kept
channels in the order the shuffle gives them, since the kept parts need not be equal any more.
``scaled_dot_product_attention`` keeps the scale of the heads' original size.
An op whose channel sizes cannot be rewritten raises, naming the node.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.passes.channel_flow import Axis, Layout
from fxcompress.passes.dependencies import ChannelAnalysis

__all__ = ["ShrinkError", "replace_shuffles", "rewrite_sizes", "slot_keep"]

_VIEWS = ("view", "reshape", "expand")
_FUNCTION_VIEWS = (torch.reshape,)


class ShrinkError(ValueError):
    """An op holds channel sizes in a form speedup cannot rewrite."""


def slot_keep(analysis: ChannelAnalysis, keeps: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Per slot of the analysis: whether its channel stays (slots of groups without pruning stay)."""
    keep = torch.ones(analysis.slot_group.numel(), dtype=torch.bool)
    for gid, channels in keeps.items():
        where = analysis.slot_group == gid
        keep[where] = channels[analysis.slot_channel[where]]
    return keep


def rewrite_sizes(gm: torch.fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """Give every size argument on a channel dim of a pruned group its kept count (see the module doc).

    Raises:
        ShrinkError: naming the node, when a size cannot be rewritten (a size held in a tensor
            shape object, channels kept unevenly across the parts of a reshape, a strided slice).
    """
    for n in list(gm.graph.nodes):
        if n.op not in ("call_method", "call_function") or not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        source = _layout(analysis, n.args[0])
        if source is None or not any(bool((~keep[a.slots]).any()) for a in source.strong):
            continue
        target = n.target if n.op == "call_function" else n.target
        if target in _VIEWS or target in _FUNCTION_VIEWS:
            _rewrite_view(n, analysis, keep)
        elif target in ("unflatten", torch.unflatten):
            _rewrite_unflatten(n, analysis, keep)
        elif target in ("split", torch.split, "chunk", torch.chunk):
            _rewrite_split(n, analysis, keep)
        elif target in ("narrow", torch.narrow):
            _rewrite_narrow(n, source, keep)
        elif target is operator.getitem and isinstance(n.args[1], tuple | slice):
            _rewrite_slice(n, source, keep)
        elif target is F.scaled_dot_product_attention and len(n.args) < 7 and n.kwargs.get("scale") is None:
            # its default scale is 1/sqrt(head_dim): the masked model's head_dim, not the kept one
            n.update_kwarg("scale", analysis.shapes[n.args[0]][-1] ** -0.5)


def _layout(analysis: ChannelAnalysis, n: torch.fx.Node) -> Layout | None:
    lay = analysis.layouts.get(n)
    return lay if isinstance(lay, Layout) else None


def _kept_sizes(axis: Axis, keep: torch.Tensor, node: torch.fx.Node) -> dict[int, int]:
    """The kept size along each dim of an axis (a channel dim viewed as (heads, head_dim), ...).

    The kept channels stay in order, so a part (a head) may keep any channels as long as every part
    that keeps some keeps equally many: the view then has that many per part, and parts keeping
    none are gone.
    """
    sizes = _uniform_shape(keep[axis.slots])
    if sizes is None:
        raise ShrinkError(f"speedup: node {node.name!r} views channels as {tuple(axis.slots.shape)} parts (heads) "
                          "that keep different numbers of channels; prune equally many in each part")
    return dict(zip(axis.dims, sizes, strict=True))


def _uniform_shape(kept: torch.Tensor) -> tuple[int, ...] | None:
    if kept.dim() == 1:
        return (int(kept.sum()),)
    inner = [_uniform_shape(part) for part in kept if bool(part.any())]
    if not inner or None in inner or len(set(inner)) > 1:
        return None
    return (len(inner), *inner[0])


def _pruned_axes(lay: Any, keep: torch.Tensor) -> list[Axis]:
    return [a for a in lay.strong if bool((~keep[a.slots]).any())] if isinstance(lay, Layout) else []


def _rewrite_view(n: torch.fx.Node, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    sizes = {}
    for a in _pruned_axes(analysis.layouts.get(n), keep):
        sizes.update(_kept_sizes(a, keep, n))
    if not sizes:
        return
    packed = len(n.args) == 2 and isinstance(n.args[1], list | tuple)
    shape = list(n.args[1] if packed else n.args[1:]) if len(n.args) > 1 else list(n.kwargs.get("shape", n.kwargs.get("size", ())))
    if not shape or any(d >= len(shape) for d in sizes):
        raise ShrinkError(f"speedup: node {n.name!r} takes its target shape from a tensor shape object; speedup cannot "
                          "rewrite the channel sizes in it (write the sizes out in the model, e.g. x.view(b, c, -1))")
    for d, size in sizes.items():
        if not (n.target == "expand" and shape[d] == -1):
            shape[d] = size
    if len(n.args) > 1:
        n.args = (n.args[0], tuple(shape)) if packed else (n.args[0], *shape)
    else:
        n.update_kwarg("shape" if "shape" in n.kwargs else "size", tuple(shape))


def _rewrite_unflatten(n: torch.fx.Node, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    dim, sizes = n.args[1], list(n.args[2])
    rank = len(analysis.shapes[n])
    start = dim % (rank - len(sizes) + 1)
    for a in _pruned_axes(analysis.layouts.get(n), keep):
        for d, size in _kept_sizes(a, keep, n).items():
            sizes[d - start] = size
    n.update_arg(2, tuple(sizes))


def _rewrite_split(n: torch.fx.Node, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    pieces = analysis.layouts.get(n)
    counts = []
    for lay in pieces:
        axes = _pruned_axes(lay, keep) or list(lay.strong)
        counts.append(int(keep[axes[0].slots].sum()) if axes else None)
    if None in counts:
        raise ShrinkError(f"speedup: node {n.name!r} splits channels in a way speedup cannot follow")
    if n.target in ("chunk", torch.chunk):
        if len(set(counts)) == 1:
            return
        n.target = "split" if n.op == "call_method" else torch.split  # parts of unequal sizes now
    n.update_arg(1, counts[0] if isinstance(n.args[1], int) and len(set(counts)) == 1 else tuple(counts))


def _channel_keep(source: Layout, dim: int, n: torch.fx.Node, keep: torch.Tensor) -> torch.Tensor | None:
    axis = next((a for a in source.strong if dim in a.dims), None)
    if axis is None:
        return None
    if axis.dims != (dim,):
        raise ShrinkError(f"speedup: node {n.name!r} slices a dim that holds channels together with another dim")
    return keep[axis.slots]


def _rewrite_narrow(n: torch.fx.Node, source: Layout, keep: torch.Tensor) -> None:
    dim, start, length = n.args[1], n.args[2], n.args[3]
    kept = _channel_keep(source, dim, n, keep)
    if kept is not None:
        n.args = (n.args[0], dim, int(kept[:start].sum()), int(kept[start:start + length].sum()))


def _rewrite_slice(n: torch.fx.Node, source: Layout, keep: torch.Tensor) -> None:
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    if any(i is Ellipsis or i is None for i in index):
        if any(isinstance(i, slice) and i != slice(None) for i in index):
            raise ShrinkError(f"speedup: node {n.name!r} slices channels next to '...'/None; write the slice out")
        return
    new = list(index)
    for d, i in enumerate(index):
        kept = _channel_keep(source, d, n, keep) if isinstance(i, slice) and i != slice(None) else None
        if kept is None:
            continue
        if i.step not in (None, 1) or not all(isinstance(v, int | None) for v in (i.start, i.stop)):
            raise ShrinkError(f"speedup: node {n.name!r} takes a strided or computed slice of channels")
        start, stop, _ = i.indices(kept.numel())
        new[d] = slice(int(kept[:start].sum()), int(kept[:stop].sum()))
    n.update_arg(1, tuple(new) if isinstance(n.args[1], tuple) else new[0])


def replace_shuffles(gm: torch.fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
                     pruned: set[int]) -> None:
    """Replace each channel shuffle of a pruned group by an ``index_select`` of the kept channels."""
    by_name = {n.name: n for n in gm.graph.nodes}
    names = dict.fromkeys(r for g in analysis.groups if g.id in pruned for r in g.reorders)
    for name in names:
        shuffle = by_name[name]
        out = next(a for a in analysis.layouts[shuffle].strong if len(a.dims) == 1)
        source, axis = _shuffle_source(analysis, shuffle, out)
        where = {int(s): i for i, s in enumerate(axis.slots[keep[axis.slots]].tolist())}
        order = torch.tensor([where[int(s)] for s in out.slots[keep[out.slots]].tolist()], dtype=torch.long)
        buffer = f"{name}_kept_order"
        gm.register_buffer(buffer, order.to(next(gm.parameters()).device))
        with gm.graph.inserting_before(shuffle):
            index = gm.graph.get_attr(buffer)
            gather = gm.graph.call_function(torch.index_select, (source, axis.dims[0], index))
        shuffle.replace_all_uses_with(gather)
        analysis.layouts[gather] = analysis.layouts[shuffle]  # its users' sizes are rewritten next
        _erase_dead(gm.graph, shuffle)


def _shuffle_source(analysis: ChannelAnalysis, shuffle: torch.fx.Node, out: Axis) -> tuple[torch.fx.Node, Axis]:
    """The tensor the shuffle began from: the nearest input holding the same channels along one dim."""
    wanted = set(out.slots.tolist())
    n = shuffle.args[0]
    while isinstance(n, torch.fx.Node):
        lay = _layout(analysis, n)
        for a in lay.strong if lay is not None else ():
            if len(a.dims) == 1 and set(a.slots.tolist()) == wanted:
                return n, a
        n = n.args[0] if n.args else None
    raise ShrinkError(f"speedup: cannot find where the channel shuffle {shuffle.name!r} begins")


def _erase_dead(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase ``node`` and then every input of it that nothing else uses (views, size arithmetic)."""
    work = [node]
    while work:
        n = work.pop()
        if n.users or n.op not in ("call_function", "call_method", "get_attr"):
            continue
        if n.op == "call_method" and n.target.endswith("_"):
            continue  # an in-place op changes its input: not dead
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        work.extend(inputs)
