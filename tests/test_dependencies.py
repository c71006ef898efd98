"""Dependency groups: hand-built graphs against groups written out by hand, and two torchvision models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcompress
from fxcompress.passes.dependencies import ChannelGroup, Member, dependency_graph, dependency_groups
from fxcompress.tracing import trace

OUT, IN, NORM = "out", "in", "norm"


def mystery(x: torch.Tensor) -> torch.Tensor:
    """A function the analysis knows nothing about (fx keeps it as one call)."""
    return x.flip(1)


torch.fx.wrap("mystery")


def _groups(model: nn.Module, *inputs: torch.Tensor, **trace_kw: object) -> list[ChannelGroup]:
    return dependency_groups(trace(model.eval(), **trace_kw), inputs)


def _keys(group: ChannelGroup) -> set[tuple[str, str, int, str]]:
    return {(m.layer, m.param, m.dim, m.role) for m in group.members}


def _member(group: ChannelGroup, layer: str, param: str = "weight", dim: int = 0) -> Member:
    (found,) = [m for m in group.members if (m.layer, m.param, m.dim) == (layer, param, dim)]
    return found


def _layer(layer: str, role: str, bias: bool = True) -> set[tuple[str, str, int, str]]:
    """A Conv/Linear's members: its filters (and bias) for 'out', weight dim 1 for 'in'."""
    if role == IN:
        return {(layer, "weight", 1, IN)}
    return {(layer, "weight", 0, OUT)} | ({(layer, "bias", 0, OUT)} if bias else set())


def _bn(layer: str) -> set[tuple[str, str, int, str]]:
    return {(layer, p, 0, NORM) for p in ("weight", "bias", "running_mean", "running_var")}


def _shape(groups: list[ChannelGroup]) -> list[tuple[int, int, str | None]]:
    return [(g.channels, g.num_partitions, g.blocked_by) for g in groups]


RANGE8 = tuple(range(8))


class Add(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


def test_residual_add_ties_both_producers_and_the_consumer() -> None:
    groups = _groups(Add(), torch.randn(2, 3, 6, 6))
    assert _shape(groups) == [(3, 1, "x"), (8, 1, None), (4, 1, "output")]
    assert _keys(groups[0]) == _layer("a", IN) | _layer("b", IN)  # the model input: not prunable
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("b", OUT) | _layer("c", IN)
    for layer, dim in (("a", 0), ("b", 0), ("c", 1)):
        m = _member(groups[1], layer, dim=dim)
        assert m.positions == RANGE8 and m.channels == RANGE8  # channel i of a is channel i of b
    assert _keys(groups[2]) == _layer("c", OUT)
    assert groups[1].nodes == ("a", "b", "add")


def test_graph_edges_name_the_op_that_ties() -> None:
    graph = dependency_graph(trace(Add()), torch.randn(1, 3, 6, 6))
    assert set(graph.nodes) == {"x[1]", "a", "b", "c"}
    assert graph.edges["a", "b"]["via"] == ("add",) and graph.number_of_edges() == 1
    assert graph.nodes["a"]["channels"] == 8


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_cat_places_each_input_at_its_offset() -> None:
    groups = _groups(Cat(), torch.randn(1, 3, 4, 4))
    assert _shape(groups) == [(3, 1, "x"), (4, 1, None), (6, 1, None), (5, 1, "output")]
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("c", IN)
    assert _keys(groups[2]) == _layer("b", OUT) | _layer("c", IN)
    first, second = _member(groups[1], "c", dim=1), _member(groups[2], "c", dim=1)
    assert (first.positions, first.channels) == ((0, 1, 2, 3), (0, 1, 2, 3))
    assert (second.positions, second.channels) == ((4, 5, 6, 7, 8, 9), (0, 1, 2, 3, 4, 5))


class Chunk(nn.Module):
    def __init__(self, sizes: list[int] | None = None) -> None:
        super().__init__()
        self.sizes = sizes
        self.a = nn.Conv2d(3, 8, 1)
        first = sizes[0] if sizes else 4
        self.b, self.c = nn.Conv2d(first, 2, 1), nn.Conv2d(8 - first, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y1, y2 = torch.split(y, self.sizes, dim=1) if self.sizes else y.chunk(2, dim=1)
        return self.b(y1) * self.c(y2)


@pytest.mark.parametrize("sizes", [None, [3, 5]], ids=["chunk", "split"])
def test_chunk_and_split_send_channel_ranges_to_their_consumers(sizes: list[int] | None) -> None:
    groups = _groups(Chunk(sizes), torch.randn(1, 3, 4, 4))
    assert _shape(groups) == [(3, 1, "x"), (8, 1, None), (2, 1, "output")]
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("b", IN) | _layer("c", IN)
    cut = sizes[0] if sizes else 4
    b, c = _member(groups[1], "b", dim=1), _member(groups[1], "c", dim=1)
    assert (b.positions, b.channels) == (tuple(range(cut)), tuple(range(cut)))
    assert (c.positions, c.channels) == (tuple(range(8 - cut)), tuple(range(cut, 8)))
    assert _keys(groups[2]) == _layer("b", OUT) | _layer("c", OUT)  # multiplied together


class Depthwise(nn.Module):
    def __init__(self, multiplier: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, groups=8)
        self.b = nn.Conv2d(8 * multiplier, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.dw(self.a(x)))


def test_depthwise_conv_keeps_its_input_channels() -> None:
    groups = _groups(Depthwise(), torch.randn(1, 3, 5, 5))
    assert _shape(groups) == [(3, 1, "x"), (8, 1, None), (2, 1, "output")]
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("dw", IN) | _layer("dw", OUT) | _layer("b", IN)
    assert _member(groups[1], "dw").channels == RANGE8 and _member(groups[1], "b", dim=1).channels == RANGE8


def test_depthwise_channel_multiplier_maps_each_input_channel_to_its_filters() -> None:
    groups = _groups(Depthwise(multiplier=2), torch.randn(1, 3, 5, 5))
    assert _shape(groups) == [(3, 1, "x"), (8, 1, None), (2, 1, "output")]
    dw, b = _member(groups[1], "dw"), _member(groups[1], "b", dim=1)
    assert dw.positions == tuple(range(16)) and dw.channels == (0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
    assert b.channels == dw.channels


class Grayscale(nn.Module):
    """A first conv over a one-channel image: groups == in_channels == 1, an ordinary conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_conv_over_one_input_channel_is_not_depthwise() -> None:
    groups = _groups(Grayscale(), torch.randn(1, 1, 6, 6))
    assert _shape(groups) == [(1, 1, "x"), (8, 1, None), (2, 1, "output")]  # a's filters are their own group
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("b", IN)
    gm = fxcompress.compress(Grayscale(), [{"op_names": ["a"], "sparsity_per_layer": 0.5, "granularity": "out_channel"}],
                             example_inputs=(torch.randn(1, 1, 6, 6),))
    assert int((gm.a.weight_mask.reshape(8, -1).sum(1) == 0).sum()) == 4  # before the fix: blocked by 'x'


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 3, groups=4), nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.g(self.a(x)))


def test_grouped_conv_cuts_its_input_and_output_channels_into_equal_parts() -> None:
    groups = _groups(Grouped(), torch.randn(1, 3, 5, 5))
    assert _shape(groups) == [(3, 1, "x"), (8, 4, None), (12, 4, None), (2, 1, "output")]
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("g", IN)
    assert groups[1].partitions == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert _keys(groups[2]) == _layer("g", OUT) | _layer("b", IN)
    assert groups[2].partitions == ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))
    assert _member(groups[1], "g", dim=1).positions == RANGE8  # input channel numbers


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2, self.head = (nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1),
                                                    nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * scale)


def test_squeeze_excitation_multiply_ties_the_excitation_to_the_features() -> None:
    groups = _groups(SqueezeExcite(), torch.randn(1, 3, 6, 6))
    assert _shape(groups) == [(3, 1, "x"), (8, 1, None), (2, 1, None), (4, 1, "output")]
    assert _keys(groups[1]) == _layer("conv", OUT) | _layer("fc1", IN) | _layer("fc2", OUT) | _layer("head", IN)
    assert _keys(groups[2]) == _layer("fc1", OUT) | _layer("fc2", IN)
    assert _member(groups[1], "fc2").channels == RANGE8


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_maps_a_conv_channel_to_a_block_of_linear_in_features() -> None:
    groups = _groups(FlattenLinear(), torch.randn(2, 3, 5, 5))
    assert _shape(groups) == [(3, 1, "x"), (4, 1, None), (10, 1, "output")]
    assert _keys(groups[1]) == _layer("conv", OUT) | _layer("fc", IN)
    fc = _member(groups[1], "fc", dim=1)
    assert fc.positions == tuple(range(36)) and fc.channels == tuple(p // 9 for p in range(36))


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2, self.gn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1), \
            nn.GroupNorm(2, 6)
        self.fc, self.ln, self.fc2 = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn(self.conv2(F.relu(self.bn(self.conv(x)))))
        return self.fc2(self.ln(self.fc(y.mean((2, 3)))))


def test_norms_after_a_layer_belong_to_its_group() -> None:
    groups = _groups(Norms(), torch.randn(2, 3, 4, 4))
    assert _shape(groups) == [(3, 1, "x"), (8, 1, None), (6, 2, None), (5, 1, None), (3, 1, "output")]
    assert _keys(groups[1]) == _layer("conv", OUT) | _bn("bn") | _layer("conv2", IN)
    assert _keys(groups[2]) == _layer("conv2", OUT) | {("gn", "weight", 0, NORM), ("gn", "bias", 0, NORM)} \
        | _layer("fc", IN)
    assert groups[2].partitions == ((0, 1, 2), (3, 4, 5))  # GroupNorm's two groups
    assert _keys(groups[3]) == _layer("fc", OUT) | {("ln", "weight", 0, NORM), ("ln", "bias", 0, NORM)} \
        | _layer("fc2", IN)
    # BatchNorm's statistics are per channel; LayerNorm and GroupNorm average across channels
    assert [g.statistics for g in groups] == [(), (), ("gn",), ("ln",), ()]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNet shuffle: sizes read at run time, view/transpose/view."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, -1, height, width)


class Shuffle(nn.Module):
    def __init__(self, module: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)
        self.shuffle = nn.ChannelShuffle(2) if module else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.c(self.shuffle(y) if self.shuffle is not None else channel_shuffle(y, 2))


@pytest.mark.parametrize("module", [False, True], ids=["view-transpose-view", "nn.ChannelShuffle"])
def test_channel_shuffle_interleaves_the_groups(module: bool) -> None:
    groups = _groups(Shuffle(module), torch.randn(1, 3, 4, 4))
    assert _shape(groups) == [(3, 1, "x"), (4, 1, None), (4, 1, None), (2, 1, "output")]
    assert _keys(groups[1]) == _layer("a", OUT) | _layer("c", IN)
    assert _keys(groups[2]) == _layer("b", OUT) | _layer("c", IN)
    a, b = _member(groups[1], "c", dim=1), _member(groups[2], "c", dim=1)
    assert (a.positions, a.channels) == ((0, 2, 4, 6), (0, 1, 2, 3))  # c's input: a0 b0 a1 b1 ...
    assert (b.positions, b.channels) == ((1, 3, 5, 7), (0, 1, 2, 3))
    where = "shuffle" if module else "view_1"
    assert groups[1].reorders == (where,) and groups[2].reorders == (where,)


class Heads(nn.Module):
    """Attention with the embedding split into heads, by hand or through one packed q/k/v Linear."""

    def __init__(self, packed: bool = False, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.packed, self.heads = packed, heads
        if packed:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.packed:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = (f(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
            out = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_attention_heads_partition_the_projections() -> None:
    groups = _groups(Heads(), torch.randn(2, 5, 8))
    assert _shape(groups) == [(8, 1, "x"), (8, 2, None), (8, 2, None), (8, 1, "output")]
    assert _keys(groups[0]) == _layer("q", IN) | _layer("k", IN) | _layer("v", IN)
    assert _keys(groups[1]) == _layer("q", OUT) | _layer("k", OUT)  # q.k^T sums over each head's channels
    assert _member(groups[1], "k").channels == RANGE8
    assert groups[1].partitions == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert _keys(groups[2]) == _layer("v", OUT) | _layer("proj", IN)
    assert _member(groups[2], "proj", dim=1).channels == RANGE8
    assert groups[2].partitions == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_packed_qkv_heads_through_scaled_dot_product_attention() -> None:
    groups = _groups(Heads(packed=True), torch.randn(2, 5, 8))
    assert _shape(groups) == [(8, 1, "x"), (16, 4, None), (8, 1, "output")]
    assert _keys(groups[1]) == _layer("qkv", OUT) | _layer("proj", IN)
    qkv = _member(groups[1], "qkv")
    assert qkv.positions == tuple(range(24)) and qkv.channels == RANGE8 + RANGE8 + tuple(range(8, 16))  # q, k, v
    assert _member(groups[1], "proj", dim=1).channels == tuple(range(8, 16))
    assert groups[1].partitions == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean()


class Blocked(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.b, self.custom = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), Custom()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(mystery(y) if self.op == "function" else self.custom(y))


@pytest.mark.parametrize("op", ["function", "module"])
def test_a_channel_read_by_an_unknown_op_blocks_its_group_naming_the_node(op: str) -> None:
    leaf = {"leaf_modules": [Custom]} if op == "module" else {}
    groups = _groups(Blocked(op), torch.randn(1, 3, 4, 4), **leaf)
    node = "mystery" if op == "function" else "custom"
    assert _shape(groups) == [(3, 1, "x"), (8, 1, node), (8, 1, node), (2, 1, "output")]
    assert _keys(groups[1]) == _layer("a", OUT) and _keys(groups[2]) == _layer("b", IN)


class Functional(nn.Module):
    """A layer read functionally and a layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.shared, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.fc.weight, self.fc.bias)
        return self.head(self.shared(y) + self.shared(F.relu(y)))


def test_functional_reads_and_a_layer_called_twice() -> None:
    groups = _groups(Functional(), torch.randn(3, 4))
    assert _shape(groups) == [(4, 1, "x"), (6, 1, None), (6, 1, None), (2, 1, "output")]
    assert _keys(groups[1]) == _layer("fc", OUT) | _layer("shared", IN)
    assert _keys(groups[2]) == _layer("shared", OUT) | _layer("head", IN)


def test_the_model_is_not_changed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model[2].eval()
    gm = trace(model)
    state, code = copy.deepcopy(gm.state_dict()), gm.code
    dependency_groups(gm, torch.randn(2, 3, 4, 4))
    assert gm.code == code and gm.training and not gm.get_submodule("2").training
    for key, value in gm.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm statistics untouched


def test_not_a_graph_module() -> None:
    with pytest.raises(TypeError, match="GraphModule"):
        dependency_groups(nn.Linear(2, 2), torch.randn(1, 2))


def _covered_once(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Every Conv/Linear's output and input channels are in exactly one group each, position by position."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            for dim, count in ((0, m.weight.shape[0]), (1, m.weight.shape[1] * getattr(m, "groups", 1))):
                found = sorted(p for g in groups for x in g.members if (x.layer, x.param, x.dim) == (name, "weight", dim)
                               for p in x.positions)
                assert found == list(range(count)), (name, dim)


def test_resnet18() -> None:
    model = torchvision.models.resnet18(weights=None)
    groups = _groups(model, torch.randn(1, 3, 32, 32))
    # input, stem+layer1, 2 inner per layer1, then per layer2..4 one residual and 2 inner, fc
    assert len(groups) == 14 and [g.blocked_by for g in groups if not g.prunable] == ["x", "output"]
    (layer1,) = [g for g in groups if ("layer1.0.conv2", "weight", 0, OUT) in _keys(g)]
    expected = (_layer("conv1", OUT, bias=False) | _bn("bn1")
                | _layer("layer1.0.conv2", OUT, bias=False) | _bn("layer1.0.bn2")
                | _layer("layer1.1.conv2", OUT, bias=False) | _bn("layer1.1.bn2")
                | _layer("layer1.0.conv1", IN) | _layer("layer1.1.conv1", IN)
                | _layer("layer2.0.conv1", IN) | _layer("layer2.0.downsample.0", IN))
    assert _keys(layer1) == expected and (layer1.channels, layer1.num_partitions) == (64, 1)
    assert all(m.channels == tuple(range(64)) for m in layer1.members)
    (inner,) = [g for g in groups if ("layer1.0.conv1", "weight", 0, OUT) in _keys(g)]
    assert _keys(inner) == _layer("layer1.0.conv1", OUT, bias=False) | _bn("layer1.0.bn1") | _layer("layer1.0.conv2", IN)
    (last,) = [g for g in groups if ("fc", "weight", 1, IN) in _keys(g)]
    assert ("layer4.0.downsample.0", "weight", 0, OUT) in _keys(last) and last.channels == 512
    _covered_once(model, groups)


def test_mobilenet_v2() -> None:
    model = torchvision.models.mobilenet_v2(weights=None)
    groups = _groups(model, torch.randn(1, 3, 32, 32))
    # input, stem (with block 1's depthwise), 16 expansions (each with its depthwise), 7 stages of
    # projections (residual chains), the 1280-channel last conv, the classifier
    assert len(groups) == 27 and [g.blocked_by for g in groups if not g.prunable] == ["x", "output"]
    (stage,) = [g for g in groups if ("features.4.conv.2", "weight", 0, OUT) in _keys(g)]
    expected = set().union(*(_layer(f"features.{i}.conv.2", OUT, bias=False) | _bn(f"features.{i}.conv.3")
                             for i in (4, 5, 6)),
                           *(_layer(f"features.{i}.conv.0.0", IN) for i in (5, 6, 7)))
    assert _keys(stage) == expected and stage.channels == 32
    (expand,) = [g for g in groups if ("features.2.conv.0.0", "weight", 0, OUT) in _keys(g)]
    assert _keys(expand) == (_layer("features.2.conv.0.0", OUT, bias=False) | _bn("features.2.conv.0.1")
                             | _layer("features.2.conv.1.0", IN) | _layer("features.2.conv.1.0", OUT, bias=False)
                             | _bn("features.2.conv.1.1") | _layer("features.2.conv.2", IN))
    assert expand.channels == 96 and expand.num_partitions == 1
    _covered_once(model, groups)
