"""Run a GraphModule on example inputs and record, node by node, how channels move, tie or get blocked.

:class:`ChannelWalk` is a ``torch.fx.Interpreter``: it runs each node for real (so every size,
``x.size(1) // groups`` included, is concrete) and then asks the rule for that op what the
node's output channels are (passes/channel_ops.py for tensor ops, passes/channel_layers.py for
layers). An op no rule knows blocks the channels it reads. The result is a :class:`Ledger`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

from fxcompress.passes.channel_flow import Axis, Layout, Ledger, axis_field, shift_axis

__all__ = ["ChannelWalk", "Operand", "Rule", "run_walk", "walk_channels"]

Operand = tuple[str, tuple[int, ...], Layout]  # (where its channels come from, shape, layout)
Rule = Callable[["ChannelWalk", torch.fx.Node, Any], Any]
_LAZY = object()  # a parameter's layout, made on first use by a tensor op


class ChannelWalk(torch.fx.Interpreter):
    """Interpret ``gm`` and keep a :class:`Layout` per tensor-valued node in ``layouts``."""

    def __init__(self, gm: torch.fx.GraphModule, resolve: Callable[[torch.fx.Node, Any], Rule | None]) -> None:
        super().__init__(gm)
        self.ledger = Ledger()
        self.layouts: dict[torch.fx.Node, Any] = {}
        self.shapes: dict[torch.fx.Node, torch.Size] = {}  # each tensor-valued node's output shape
        self._resolve = resolve

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = out.shape
        if n.op == "output":
            returned = map_aggregate(n.args[0], lambda a: self.layout(a, materialize=False)
                                     if isinstance(a, torch.fx.Node) else None)
            for lay in _flatten(returned):
                for axis in lay.strong:
                    self.ledger.block(axis.slots, "output")
        elif n.op == "placeholder":
            self.layouts[n] = _like(out, Layout(source=n.name))
        elif n.op == "get_attr":
            self.layouts[n] = _LAZY if isinstance(out, torch.Tensor) else None
        elif _has_tensor(out):
            rule = self._resolve(n, self)
            self.layouts[n] = (rule or unknown_op)(self, n, out)
            for lay in _flatten(self.layouts[n]):
                self.ledger.carriers.extend((n.name, a.slots) for a in lay.strong)
        elif not _reads_shape_only(n):
            self.block_inputs(n)  # a value read out of the channels (``.item()``, ``.tolist()``)
        return out

    # ---- what rules read -------------------------------------------------------------------------

    def value(self, arg: Any) -> Any:
        """``arg`` with every node replaced by its concrete value (still in the interpreter's env)."""
        return map_aggregate(arg, lambda a: self.env[a] if isinstance(a, torch.fx.Node) else a)

    def layout(self, arg: Any, materialize: bool = True) -> Any:
        if not isinstance(arg, torch.fx.Node):
            return Layout()
        lay = self.layouts.get(arg)
        if lay is _LAZY:
            if not materialize:
                return Layout(source=arg.name)
            lay = self.layouts[arg] = self._parameter_layout(arg)
        return lay

    def operand(self, arg: torch.fx.Node) -> Operand:
        lay = self.layout(arg)
        return (lay.source or arg.name, tuple(self.env[arg].shape), lay)

    def tensor_args(self, n: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) if isinstance(self.env[a], torch.Tensor)
                              and a not in found else None)
        return found

    def channel_slots(self, n: torch.fx.Node, x: torch.fx.Node, dim: int, label: str) -> torch.Tensor:
        """The slots along ``dim`` of ``x``, as a layer reading them sees them; channels from outside
        (a model input, an op the walk cannot follow) get fresh slots, blocked by their source."""
        lay, size = self.layout(x), self.env[x].shape[dim]
        for axis in lay.axes:
            if axis.dims == (dim,):
                return axis.slots
            if dim in axis.dims:  # a layer reading part of a (heads, head_dim) axis: not followed
                self.ledger.block(axis.slots, n.name)
                return self.ledger.new_bundle(size, label, blocked_by=n.name)
        key = f"{x.name}[{dim}]"  # one set of outside channels, however many layers read them
        return self.layer_slots(key, lambda: self.ledger.new_bundle(size, key, blocked_by=lay.source or x.name))

    def layer_slots(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Slots belonging to a layer rather than a call: a layer called twice has one set."""
        if key not in self.ledger.cache:
            self.ledger.cache[key] = make()
        return self.ledger.cache[key]

    def tie_layer_input(self, key: str, slots: torch.Tensor, record: Callable[[torch.Tensor], None], why: str) -> None:
        """A layer's input channels: recorded at its first call, tied to the first call's at later ones."""
        if key in self.ledger.cache:
            self.ledger.tie(self.ledger.cache[key], slots, why)
        else:
            self.ledger.cache[key] = slots
            record(slots)

    def block_inputs(self, n: torch.fx.Node, why: str | None = None) -> None:
        """Block every channel ``n`` reads, in tensors and in tuples of tensors alike."""
        reads: list[torch.fx.Node] = []
        torch.fx.node.map_arg((n.args, n.kwargs), reads.append)
        for arg in reads:
            for lay in _flatten(self.layout(arg, materialize=False)):
                for axis in lay.strong:
                    self.ledger.block(axis.slots, why or n.name)

    # ---- the elementwise rule, shared by pointwise ops, matmul and cat --------------------------------

    def combine(self, why: str, operands: Sequence[Operand], out_shape: Sequence[int],
                lenient: Iterable[int] = ()) -> Layout:
        """Broadcast ``operands`` against each other: channel axes on the same dims become one.

        An operand without channels but with the full size on a channel dim (a model input added to
        a conv's output) blocks them, as does a channel broadcast over a larger dim. On ``lenient``
        dims (matmul batch dims) a partner without channels is fine next to a (heads, head_dim) axis:
        the heads stay, only channels inside them go.
        """
        rank, lenient = len(out_shape), set(lenient)
        placed = [(src, (1,) * (rank - len(shape)) + tuple(shape), [shift_axis(a, rank - len(shape)) for a in lay.axes])
                  for src, shape, lay in operands]
        out_axes = []
        for cluster in _clusters([(i, a) for i, (_, _, axes) in enumerate(placed) for a in axes]):
            axes = [a for _, a in cluster]
            strong = [a for a in axes if not a.weak]
            dims = set().union(*(a.dims for a in axes))
            loose = {d for d in dims & lenient if strong and all(len(a.dims) > 1 for a in strong)}
            owners = {i for i, _ in cluster}
            partner = next((src for i, (src, shape, _) in enumerate(placed) if i not in owners
                            and any(shape[d] == out_shape[d] > 1 for d in dims - loose)), None)
            misfit = any(a.slots.shape[k] != out_shape[d] for a in axes for k, d in enumerate(a.dims))
            if strong and (partner or misfit):
                for a in strong:
                    self.ledger.block(a.slots, why if misfit else partner)
            if misfit or (partner and not strong):
                continue
            for a in axes[1:]:
                self.ledger.tie(axis_field(axes[0], rank), axis_field(a, rank), why)
            keep = min(strong or axes, key=lambda a: len(a.dims))
            out_axes.append(replace(keep, weak=not strong))
        return Layout(tuple(out_axes), operands[0][0] if operands else "")

    def _parameter_layout(self, n: torch.fx.Node) -> Layout:
        """A parameter or buffer read by a tensor op: each dim of size > 1 is a weak axis of its own."""
        owner, _, attr = str(n.target).rpartition(".")
        axes = []
        for d, size in enumerate(self.env[n].shape):
            if size > 1:
                label = f"{n.target}[{d}]"
                slots = self.layer_slots(label, lambda d=d, size=size, label=label: self.ledger.new_bundle(size, label))
                if not any(m.layer == owner and m.param == attr and m.dim == d for m in self.ledger.members):
                    self.ledger.member(owner, attr, d, "param", slots)
                axes.append(Axis((d,), slots, weak=True))
        return Layout(tuple(axes), n.name)


def unknown_op(walk: ChannelWalk, n: torch.fx.Node, out: Any) -> Any:
    """An op the walk cannot reason about: every channel it reads is blocked, its output has none."""
    walk.block_inputs(n)
    return _like(out, Layout(source=n.name))


def walk_channels(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  resolve: Callable[[torch.fx.Node, ChannelWalk], Rule | None]) -> Ledger:
    """Run ``gm`` once in eval mode without gradients (nothing in the model changes) and return the ledger."""
    return run_walk(gm, example_inputs, resolve).ledger


def run_walk(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
             resolve: Callable[[torch.fx.Node, ChannelWalk], Rule | None]) -> ChannelWalk:
    """As :func:`walk_channels`, returning the whole walk: its ledger, each node's layout and shape."""
    modes = {m: m.training for m in gm.modules()}
    walk = ChannelWalk(gm, resolve)
    try:
        gm.eval()
        with torch.no_grad():
            walk.run(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return walk


def _reads_shape_only(n: torch.fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()``: reading a tensor's shape leaves its channels alone."""
    if n.op == "call_method":
        return n.target in ("size", "dim", "numel", "nelement", "get_device", "type")
    return n.op == "call_function" and n.target in (getattr, len)


def _clusters(items: list[tuple[int, Axis]]) -> list[list[tuple[int, Axis]]]:
    """Axes that share a dim, in first-seen order."""
    clusters: list[list[tuple[int, Axis]]] = []
    for item in items:
        touching = [c for c in clusters if any(set(item[1].dims) & set(a.dims) for _, a in c)]
        merged = [x for c in touching for x in c] + [item]
        clusters = [c for c in clusters if not any(c is t for t in touching)] + [merged]
    return clusters


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in _leaves(value))


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [x for v in value for x in _leaves(v)]
    return [value]


def _like(out: Any, lay: Layout) -> Any:
    """``lay`` for a tensor; the same shape of tuple for a tuple of tensors; None otherwise."""
    if isinstance(out, torch.Tensor):
        return lay
    if isinstance(out, list | tuple):
        return tuple(_like(v, lay) for v in out)
    return None


def _flatten(lay: Any) -> list[Layout]:
    if isinstance(lay, Layout):
        return [lay]
    if isinstance(lay, dict):
        lay = list(lay.values())
    if isinstance(lay, list | tuple):
        return [x for v in lay for x in _flatten(v)]
    return []
