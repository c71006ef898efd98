"""Dependency groups: which layers' channel dims are one and must be pruned together. Pure analysis.

A residual add makes the output channels of both operands' producers one set of channels; a
concatenation places each input's channels at an offset of its consumer's input channels; a
depthwise conv's filters are its input channels; a BatchNorm's parameters follow the channels
it normalizes; a flatten into a Linear maps each conv channel to a block of in-features. The
channel walk (passes/channel_walk.py) runs the traced model once on example inputs and records
every such tie; this module turns the record into a ``networkx`` graph whose connected components
are the groups, and describes each group's channels, members and constraints. Nothing about the
model changes; no masks are involved (``granularity: 'out_channel'`` and ``speedup`` build on it).

Example:
    >>> import torchvision
    >>> from fxcompress.tracing import trace
    >>> gm = trace(torchvision.models.resnet18(weights=None))
    >>> groups = dependency_groups(gm, torch.randn(1, 3, 64, 64))
    >>> g = next(g for g in groups if any(m.layer == "layer1.0.conv2" for m in g.members))
    >>> g.channels, g.num_partitions, g.blocked_by
    (64, 1, None)
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx

from fxcompress.passes.channel_flow import Ledger
from fxcompress.passes.channel_layers import LAYER_FUNCTION_RULES, LAYER_MODULE_RULES
from fxcompress.passes.channel_ops import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, select_item
from fxcompress.passes.channel_walk import ChannelWalk, Rule, run_walk

__all__ = ["ChannelAnalysis", "ChannelGroup", "Member", "analyze_channels", "dependency_graph", "dependency_groups"]

_MODULES = {**MODULE_RULES, **LAYER_MODULE_RULES}
_FUNCTIONS = {**FUNCTION_RULES, **LAYER_FUNCTION_RULES}


@dataclass(frozen=True)
class Member:
    """Positions along one dim of one parameter that hold channels of a group.

    ``positions[i]`` holds group channel ``channels[i]``; several positions may hold one channel
    (a conv channel flattened into a block of Linear in-features, a depthwise channel multiplier).
    ``role``: ``'out'`` a layer's own channels (weight dim 0, or dim 1 of a transposed conv; and
    its bias), ``'in'`` the channels a layer reads (for a grouped or depthwise conv, position ``p``
    is input channel ``p``: weight column ``p % (in_channels // groups)`` of the filters of group
    ``p // (in_channels // groups)``), ``'norm'`` a norm's or PReLU's per-channel parameters and
    running statistics, ``'param'`` a parameter a tensor op reads directly (a layer scale, a class
    token, a position embedding).
    """

    layer: str
    param: str
    dim: int
    role: str
    positions: tuple[int, ...]
    channels: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """``channels`` channels that are pruned together, numbered ``0 .. channels-1``.

    ``partitions``: the channels cut into equal parts (grouped convs, GroupNorm groups, heads); each
    part must lose equally many channels (a chunk is not such a cut: ``speedup`` turns a chunk whose
    parts end up unequal into a split). One part when there is no such
    constraint. ``blocked_by``: the fx node (or ``'output'``, or a model input) that reads the
    channels in a way that cannot shrink, None when the group can be pruned. ``nodes``: the fx nodes
    whose outputs carry the channels, in graph order. ``reorders``: the nodes among them that
    permute the channels (a channel shuffle): with channels pruned, their output holds the kept
    channels interleaved anew, not in the original order, so a pruned model must re-sort there.
    ``statistics``: the norms that average across the channels (a LayerNorm over the channel dim,
    a GroupNorm): a pruned channel is left out of their mean and variance, where a masked one
    counts as a 0, so they compute differently once channels are removed.
    """

    id: int
    channels: int
    partitions: tuple[tuple[int, ...], ...]
    members: tuple[Member, ...]
    blocked_by: str | None
    nodes: tuple[str, ...]
    reorders: tuple[str, ...] = ()
    statistics: tuple[str, ...] = ()

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)

    @property
    def prunable(self) -> bool:
        return self.blocked_by is None


@dataclass(frozen=True, eq=False)
class ChannelAnalysis:
    """The groups, and where their channels are in every tensor of the graph (what ``speedup`` edits).

    ``layouts``: per fx node, its output's :class:`~fxcompress.passes.channel_flow.Layout` (a tuple of
    them for an op returning several tensors); ``shapes``: per tensor-valued node, its output shape on
    the example inputs. A layout's slots are mapped to groups by ``slot_group`` (the group id, -1 for a
    slot in no group) and ``slot_channel`` (the channel's number in its group).
    """

    groups: list[ChannelGroup]
    layouts: dict[torch.fx.Node, Any]
    shapes: dict[torch.fx.Node, torch.Size]
    slot_group: torch.Tensor
    slot_channel: torch.Tensor


def dependency_graph(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any]) -> nx.Graph:
    """The channel dependency graph: a node per set of channels made at once (a layer's output
    channels, one dim of a parameter, channels from outside), an edge where an op ties them.

    Node attributes: ``channels`` (how many). Edge attribute ``via``: the fx nodes that tie them.
    Its connected components are the groups of :func:`dependency_groups`.
    """
    ledger = _walk(gm, example_inputs)
    return _bundle_graph(ledger, _classes(ledger))[0]


def dependency_groups(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any]
                      ) -> list[ChannelGroup]:
    """The groups of coupled channel dims of a traced model, in graph order.

    Args:
        gm: a GraphModule from ``fxcompress.tracing.trace``; it is run once, in eval mode and
            without gradients, its modules' modes restored after (nothing in it changes).
        example_inputs: a tensor, or the tuple of positional inputs, of the shapes it will see.
    Returns:
        One ChannelGroup per set of channels that some Conv/Linear makes or reads.
    Raises:
        TypeError: ``gm`` is not a GraphModule.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1)
        ...     def forward(self, x):
        ...         y = self.a(x)
        ...         return self.b(y) + y
        >>> [(g.channels, g.blocked_by) for g in dependency_groups(torch.fx.symbolic_trace(Net()),
        ...                                                         torch.randn(1, 3, 8, 8))]
        [(3, 'x'), (8, 'output')]
    """
    return analyze_channels(gm, example_inputs).groups


def analyze_channels(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any]) -> ChannelAnalysis:
    """:func:`dependency_groups` with each node's channel layout and shape (arguments as there)."""
    walk = _run(gm, example_inputs)
    roots = _classes(walk.ledger)
    _, bundle_group = _bundle_graph(walk.ledger, roots)
    groups, slot_group, slot_channel = _assemble(walk.ledger, roots, bundle_group)
    return ChannelAnalysis(groups, walk.layouts, walk.shapes, slot_group, slot_channel)


def _walk(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any]) -> Ledger:
    return _run(gm, example_inputs).ledger


def _run(gm: torch.fx.GraphModule, example_inputs: torch.Tensor | Sequence[Any]) -> ChannelWalk:
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"dependency groups need a torch.fx.GraphModule (fxcompress.tracing.trace(model)), "
                        f"got {type(gm).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return run_walk(gm, inputs, _resolve)


def _resolve(n: torch.fx.Node, walk: ChannelWalk) -> Rule | None:
    """The rule for a node's op; None for an op the walk does not know (it blocks)."""
    if n.op == "call_module":
        module = walk.module.get_submodule(n.target)
        cls = next((c for c in type(module).__mro__ if c in _MODULES), None)
        # a subclass with its own forward (a leaf fx could not enter) may do anything
        return _MODULES[cls] if cls is not None and type(module).forward is cls.forward else None
    if n.op == "call_method":
        return METHOD_RULES.get(n.target)
    if n.op != "call_function":
        return None
    if n.target is operator.getitem and not isinstance(walk.env[n.args[0]], torch.Tensor):
        return select_item
    name = f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__name__', '')}"
    return _FUNCTIONS.get(n.target) or _FUNCTIONS.get(name)


def _classes(ledger: Ledger) -> list[int]:
    """Each slot's channel: the smallest slot tied to it (union-find over the ties)."""
    parent = list(range(ledger.size))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in ledger.ties:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    return [find(x) for x in range(ledger.size)]


def _bundle_graph(ledger: Ledger, roots: list[int]) -> tuple[nx.Graph, list[int]]:
    """The networkx graph over bundles, and each bundle's component (group) number in graph order."""
    graph = nx.Graph()
    labels = [b.label for b in ledger.bundles]
    graph.add_nodes_from((b.label, {"channels": b.size}) for b in ledger.bundles)
    flat = [(c.reshape(-1), why) for c, why in ledger.families]
    links = [*ledger.ties, *((c[:1].expand_as(c), c, why) for c, why in flat)]
    for a, b, why in links:
        ba, bb = _bundle_of(ledger, a.reshape(-1)), _bundle_of(ledger, b.reshape(-1))
        for x, y in torch.unique(torch.stack([ba, bb], 1)[ba != bb], dim=0).tolist():
            graph.add_edge(labels[x], labels[y])
            graph.edges[labels[x], labels[y]].setdefault("via", []).append(why)
    for _, _, data in graph.edges(data=True):
        data["via"] = tuple(dict.fromkeys(data["via"]))
    index = {label: i for i, label in enumerate(labels)}
    components = sorted((sorted(index[x] for x in c) for c in nx.connected_components(graph)), key=min)
    bundle_group = [0] * len(labels)
    for g, component in enumerate(components):
        for i in component:
            bundle_group[i] = g
    return graph, bundle_group


def _bundle_of(ledger: Ledger, slots: torch.Tensor) -> torch.Tensor:
    starts = torch.tensor([b.start for b in ledger.bundles], dtype=torch.long)
    return torch.searchsorted(starts, slots.contiguous(), right=True) - 1


def _assemble(ledger: Ledger, roots: list[int], bundle_group: list[int]
              ) -> tuple[list[ChannelGroup], torch.Tensor, torch.Tensor]:
    """Number each group's channels (in order of creation) and gather its members, blocks and parts;
    also each slot's group id (-1: none) and channel number."""
    root_of = torch.tensor(roots, dtype=torch.long)
    group_of = torch.tensor(bundle_group, dtype=torch.long)[_bundle_of(ledger, root_of)] if roots else root_of
    groups_list, numbers, sizes = group_of.tolist(), [0] * len(roots), Counter()
    for r in sorted(set(roots)):  # a group's channel i is its i-th channel by creation
        g = groups_list[r]
        numbers[r], sizes[g] = sizes[g], sizes[g] + 1
    channel_of = torch.tensor(numbers, dtype=torch.long)[root_of]
    members: dict[int, list[Member]] = {g: [] for g in sizes}
    for m in ledger.members:
        where = group_of[m.slots]
        for g in torch.unique(where).tolist():
            pick = where == g
            members[g].append(Member(m.layer, m.param, m.dim, m.role, tuple(m.positions[pick].tolist()),
                                     tuple(channel_of[m.slots[pick]].tolist())))
    blocked: dict[int, str] = {}
    for slots, why in ledger.blocks:
        for g in torch.unique(group_of[slots]).tolist():
            blocked.setdefault(g, why)
    families: dict[int, list[tuple[list[list[int]], str]]] = {g: [] for g in sizes}
    for cells, why in ledger.families:
        families[int(group_of[cells[0, 0]])].append((channel_of[cells].tolist(), why))
    nodes, reorders, stats = (_named(records, group_of, sizes)
                              for records in (ledger.carriers, ledger.reorders, ledger.statistics))
    groups, ids = [], {}
    for g in sorted(sizes):
        if not any(m.role in ("in", "out") for m in members[g]):
            continue  # parameters that never meet a layer's channels
        ids[g] = len(groups)
        parts = _partitions(sizes[g], [cells for cells, _ in families[g]])
        if parts is None:  # parts that cannot all be kept equal
            blocked.setdefault(g, next(why for _, why in families[g]))
            parts = (tuple(range(sizes[g])),)
        groups.append(ChannelGroup(len(groups), sizes[g], parts, tuple(members[g]), blocked.get(g), nodes[g],
                                   reorders[g], stats[g]))
    to_id = torch.tensor([ids.get(c, -1) for c in range(max(sizes, default=-1) + 1)], dtype=torch.long)
    return groups, to_id[group_of] if roots else group_of, channel_of


def _named(records: list[tuple[str, torch.Tensor]], group_of: torch.Tensor, sizes: Counter
           ) -> dict[int, tuple[str, ...]]:
    """Per group, the fx nodes (in graph order, once each) whose slots fall in it."""
    found: dict[int, dict[str, None]] = {g: {} for g in sizes}
    for name, slots in records:
        for g in torch.unique(group_of[slots.reshape(-1)]).tolist():
            found[g][name] = None
    return {g: tuple(names) for g, names in found.items()}


def _partitions(count: int, families: list[list[list[int]]]) -> tuple[tuple[int, ...], ...] | None:
    """The coarsest cut of ``count`` channels into equal parts such that, pruning equally many in each
    part, every cell of every family loses equally many positions; None when there is none.

    Channels are grouped by the cells they belong to; those groups are cut into pieces of their
    greatest common size. A family whose cells differ in size or repeat channels unevenly has none.
    """
    signature: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    for f, cells in enumerate(families):
        counts = [Counter(cell) for cell in cells]
        if len({len(c) for c in counts}) != 1 or len({m for c in counts for m in c.values()}) != 1:
            return None
        for j, cell in enumerate(counts):
            for c in cell:
                signature[c].append((f, j))
    by_signature: dict[tuple, list[int]] = {}
    for c in range(count):
        by_signature.setdefault(tuple(signature[c]), []).append(c)
    size = math.gcd(*(len(p) for p in by_signature.values()))
    return tuple(sorted(tuple(p[i:i + size]) for p in by_signature.values() for i in range(0, len(p), size)))
