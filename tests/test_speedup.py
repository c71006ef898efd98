"""Group masks for ``granularity: 'out_channel'`` and ``speedup``: counts per group written out by hand,
exactness of the shrunk model against the masked one, and the errors."""

from __future__ import annotations

import copy
import io
import re
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlock

import fxcompress
from fxcompress.group_report import group_report
from fxcompress.settings import ratio_floor

from .fixtures import masked_reference
from .test_dependencies import (
    Add,
    Blocked,
    Cat,
    Chunk,
    Depthwise,
    FlattenLinear,
    Grouped,
    Heads,
    Norms,
    Shuffle,
    SqueezeExcite,
)

OC = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "granularity": "out_channel"}]


def _compress(model: nn.Module, x: torch.Tensor, config: list | None = None, **kw: object) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return fxcompress.compress(model.eval(), config or OC, example_inputs=(x,), **kw)


def _rows_pruned(gm: nn.Module, layer: str) -> list[int]:
    mask = fxcompress.masks(gm)[layer]
    return (~mask.reshape(mask.shape[0], -1).any(dim=1)).nonzero().squeeze(1).tolist()


def _filter_l1(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).sum(dim=1)


class Residual(nn.Module):
    """Two convs joined by a residual add, each with its BatchNorm, read by a last conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Norm parameters and statistics away from their init, so that an unmasked shift would show."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ---- group masks -------------------------------------------------------------------------------

def test_a_residual_group_gets_one_mask_ranked_by_summed_filter_scores() -> None:
    model = _randomize_norms(Residual())
    gm = _compress(model, torch.randn(2, 3, 6, 6))
    score = _filter_l1(model.a) + _filter_l1(model.b)  # summed over the group's filters, by hand
    expected = sorted(torch.argsort(score, stable=True)[:4].tolist())  # floor(0.5 * 8)
    assert _rows_pruned(gm, "a") == _rows_pruned(gm, "b") == expected
    assert _rows_pruned(gm, "c") == []  # its channels are the output: blocked
    for bn in ("bn_a", "bn_b"):  # the norms over the pruned channels are masked too
        norm = gm.get_submodule(bn)
        assert (norm.weight_mask == 0).nonzero().squeeze(1).tolist() == expected
        assert (norm.bias_mask == 0).nonzero().squeeze(1).tolist() == expected
        assert not norm.weight.detach()[expected].any() and not norm.bias.detach()[expected].any()
    rows = {r.layers: r for r in group_report(gm)}
    assert rows[("a", "b")].pruned == 4 and rows[("a", "b")].status == "pruned"
    assert rows[("c",)].status == "not pruned: blocked by 'output': the model returns these channels"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pruned_channels_are_exactly_zero_after_their_norm_in_both_modes(mode: str) -> None:
    model = _randomize_norms(Residual())
    gm = _compress(model, torch.randn(2, 3, 6, 6)).train(mode == "train")
    seen = []
    gm.get_submodule("relu").register_forward_hook(lambda m, args, out: seen.append(args[0]))
    gm(torch.randn(4, 3, 6, 6))
    pruned = _rows_pruned(gm, "a")
    kept = [c for c in range(8) if c not in pruned]
    assert len(pruned) == 4 and not seen[0][:, pruned].any() and bool(seen[0][:, kept].any(dim=(0, 2, 3)).all())


def test_grouped_conv_prunes_equally_many_in_each_partition() -> None:
    model = Grouped()
    gm = _compress(model, torch.randn(1, 3, 5, 5))
    pruned_a = _rows_pruned(gm, "a")  # 8 channels in 4 parts of 2: floor(0.5 * 2) = 1 per part
    assert [sum(c in pruned_a for c in (2 * p, 2 * p + 1)) for p in range(4)] == [1, 1, 1, 1]
    score = _filter_l1(model.a)
    assert pruned_a == [min((2 * p, 2 * p + 1), key=lambda c: (float(score[c]), c)) for p in range(4)]
    pruned_g = _rows_pruned(gm, "g")  # 12 channels in 4 parts of 3: floor(0.5 * 3) = 1 per part
    assert [sum(c in pruned_g for c in range(3 * p, 3 * p + 3)) for p in range(4)] == [1, 1, 1, 1]
    assert {r.layers: r.partitions for r in group_report(gm)}[("g",)] == 4


def test_a_group_the_config_only_partly_selects_is_not_pruned_and_the_plan_says_so() -> None:
    gm = _compress(Add(), torch.randn(1, 3, 6, 6), [{"op_names": ["a"], "sparsity_per_layer": 0.5,
                                                      "granularity": "out_channel"}])
    assert _rows_pruned(gm, "a") == []
    (row,) = group_report(gm)
    assert row.layers == ("a", "b") and row.pruned == 0
    assert row.status.startswith("not pruned: partly selected: 'b' also make")
    assert {r.name: r.group for r in fxcompress.report(gm)} == {"a": f"{row.id} (not pruned)"}
    text = fxcompress.summary(gm)
    assert "| group " in text and f"{row.id} (not pruned)" in text and "partly selected" in text


def test_a_blocked_group_is_not_pruned_and_the_plan_names_the_node() -> None:
    gm = _compress(Blocked("function"), torch.randn(1, 3, 4, 4))
    rows = {r.layers: r.status for r in group_report(gm)}
    assert rows[("a",)] == "not pruned: blocked by node 'mystery', which reads these channels in a way that cannot shrink"
    assert _rows_pruned(gm, "a") == []


def test_a_group_norm_keeps_its_group_and_a_layer_norm_averages_over_the_kept_channels() -> None:
    gm = _compress(_randomize_norms(Norms()), torch.randn(2, 3, 4, 4))
    rows = {r.layers: r.status for r in group_report(gm)}
    assert rows[("conv",)] == "pruned"
    assert rows[("conv2",)] == ("not pruned: 'gn' (a GroupNorm, or a LayerNorm without a 1-d affine weight) averages "
                                "across these channels: removing them would change its mean and variance")
    assert rows[("fc",)] == "pruned; LayerNorm 'ln' averages over the kept channels only"
    assert len(_rows_pruned(gm, "fc")) == 2 and len(_rows_pruned(gm, "conv")) == 4  # floor(0.5 * 5), floor(0.5 * 8)
    assert _rows_pruned(gm, "conv2") == []
    assert (gm.ln.weight_mask == 0).nonzero().squeeze(1).tolist() == _rows_pruned(gm, "fc")


class LayerNormStream(nn.Module):
    """A pre-norm residual stream that LayerNorms average across: embed, one MLP block, a final norm, a head."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.embed, self.ln1 = nn.Linear(4, 8), nn.LayerNorm(8, elementwise_affine=affine)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.ln_out, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        return self.head(self.ln_out(h))


def _kept_channel_layer_norms(gm: nn.Module, ref: nn.Module) -> mock._patch:
    """Patch ``F.layer_norm`` so that in ``ref`` a LayerNorm whose module ``gm`` masked normalizes the kept
    channels alone: gather them, ``F.layer_norm`` of the smaller size, scatter into zeros (the reference
    for SPEC §4's LayerNorm of a pruned group, written without fxcompress's masked formula)."""
    by_weight = {id(ref.get_submodule(name).weight): module.weight_mask.bool() for name, module in gm.named_modules()
                 if isinstance(module, nn.LayerNorm) and "weight_mask" in module._buffers}
    real = F.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):  # noqa: ANN001, ANN202
        keep = by_weight.get(id(weight))
        if keep is None:
            return real(x, shape, weight, bias, eps)
        idx = keep.nonzero().squeeze(1)
        out = torch.zeros_like(x)
        out[..., idx] = real(x[..., idx], [len(idx)], weight[idx], None if bias is None else bias[idx], eps)
        return out

    return mock.patch.object(F, "layer_norm", layer_norm)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_layer_norm_over_a_pruned_stream_normalizes_the_kept_channels_in_both_modes(mode: str) -> None:
    torch.manual_seed(0)
    model = _randomize_norms(LayerNormStream())
    gm = _compress(model, torch.randn(2, 5, 4)).train(mode == "train")
    pruned = _rows_pruned(gm, "embed")
    assert len(pruned) == 4 and _rows_pruned(gm, "fc2") == pruned  # one stream group: floor(0.5 * 8)
    rows = {r.layers: r.status for r in group_report(gm)}
    assert rows[("embed", "fc2")] == "pruned; LayerNorm 'ln1', 'ln_out' averages over the kept channels only"
    ref = masked_reference(model, fxcompress.masks(gm)).train(mode == "train")
    x = torch.randn(3, 5, 4, requires_grad=True)
    with _kept_channel_layer_norms(gm, ref):
        expected = ref(x)
    got = gm(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    outputs: dict[str, torch.Tensor] = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            outputs[n.name] = super().run_node(n)
            return outputs[n.name]

    Record(gm).run(x)
    assert not outputs["ln1"][..., pruned].any() and not outputs["ln_out"][..., pruned].any()  # exactly 0
    got.square().sum().backward()
    assert not gm.ln1.weight.grad[pruned].any() and not gm.ln1.bias.grad[pruned].any()
    assert gm.ln1.weight.grad[[c for c in range(8) if c not in pruned]].all()


def test_a_model_with_masked_layer_norms_scripts_exports_compiles_and_finalizes() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(LayerNormStream()).eval()
    x = torch.randn(2, 5, 4)
    gm = _compress(model, x)
    expected = gm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(gm)
    torch.testing.assert_close(scripted(x), expected)
    torch.testing.assert_close(torch.export.export(gm, (x,)).module()(x), expected)
    torch.testing.assert_close(torch.compile(copy.deepcopy(gm), backend="aot_eager")(x), expected)
    torch.testing.assert_close(fxcompress.finalize(copy.deepcopy(gm))(x), expected)


def test_a_layer_norm_without_affine_weight_keeps_its_group() -> None:
    gm = _compress(LayerNormStream(affine=False), torch.randn(2, 5, 4))
    rows = {r.layers: r.status for r in group_report(gm)}
    assert rows[("embed", "fc2")].startswith("not pruned: 'ln1' (a GroupNorm, or a LayerNorm without a 1-d affine")
    assert _rows_pruned(gm, "embed") == [] and len(_rows_pruned(gm, "fc1")) == 8


def test_tiny_convnext_shrinks_its_stream_through_layer_norm_2d() -> None:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = _nonzero_init(ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5)).eval()
    _randomize_norms(model)
    x = torch.randn(1, 3, 16, 16)
    gm = _compress(model, x)
    _group_counts_exact(gm)
    fast = fxcompress.speedup(gm)
    probe = torch.randn(2, 3, 32, 32)
    _assert_same(fast, gm, probe)
    ref = _masked_copy(model, gm)
    with _kept_channel_layer_norms(gm, ref), torch.no_grad():
        torch.testing.assert_close(gm(probe), ref(probe), rtol=1e-5, atol=1e-5)
    assert fast.features[0][0].out_channels == 4 and fast.features[0][1].weight.shape == (4,)  # stem 8 -> 4
    assert sum(p.numel() for p in fast.parameters()) == _kept_params(model, gm, probe)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


def test_the_plan_shows_group_ids_and_the_params_and_flops_each_group_removes() -> None:
    gm = _compress(Chain(), torch.randn(1, 3, 6, 6))
    (row, head) = group_report(gm)
    # conv1 loses 4 of 8 filters (4 * 27 weights + 4 biases), conv2 4 of its 8 input columns (4 * 4)
    assert (row.layers, row.channels, row.pruned, row.params_removed) == (("conv1",), 8, 4, 4 * 27 + 4 + 4 * 4)
    # multiply-accumulates on the 1x3x6x6 input: conv1 288 outputs x 27, conv2 144 outputs x 8; half of each
    assert row.flops_removed == 2 * (288 * 27 // 2 + 144 * 8 // 2)
    assert head.status.startswith("not pruned: blocked by 'output'")
    rows = {r.name: r.group for r in fxcompress.report(gm)}
    assert rows == {"conv1": str(row.id), "conv2": f"{head.id} (not pruned)"}
    text = fxcompress.summary(gm)
    assert "| group " in text and "Dependency groups:" in text
    assert re.search(r"\|\s+128\s+\|\s+8928\s+\| pruned", text)


def test_without_example_inputs_out_channel_ranks_each_layer_alone_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"ranks each layer's filters alone because compress was given no "
                                         r"example_inputs.*example_inputs=\(x,\)"):
        gm = fxcompress.compress(_randomize_norms(Residual()).eval(), OC)
    assert not hasattr(gm, "fxcompress_groups") and "weight_mask" not in gm.bn_a._buffers
    assert len(_rows_pruned(gm, "a")) == 4 and len(_rows_pruned(gm, "c")) == 2  # per layer, as before


def test_a_schedule_ramps_whole_groups() -> None:
    gm = _compress(_randomize_norms(Residual()), torch.randn(2, 3, 6, 6), start_dense=True)
    assert _rows_pruned(gm, "a") == []
    sched = fxcompress.SparsityScheduler(gm, start_step=0, end_step=3, frequency=1, kind="linear")
    previous: set[int] = set()
    for step in range(3):
        sched.step()
        pruned = _rows_pruned(gm, "a")
        assert pruned == _rows_pruned(gm, "b") and previous <= set(pruned)  # one mask, only growing
        assert len(pruned) == ratio_floor(0.5 * (step + 1) / 3, 8)
        assert (gm.bn_b.weight_mask == 0).nonzero().squeeze(1).tolist() == pruned
        previous = set(pruned)


# ---- speedup on hand-built models --------------------------------------------------------------

class Shrinkable(nn.Module):
    """Stem + BatchNorm, a depthwise conv, a residual add, a cat shuffled, squeeze-excitation, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.bn_dw(self.dw(y))) + y
        y = self.shuffle(torch.cat([y, F.relu(self.side(y))], dim=1))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class SigmoidInto(nn.Module):
    """A pruned channel reaches the next layer as sigmoid(0) = 0.5: a constant folded into its bias."""

    def __init__(self, kernel: int = 1, padding: int = 0, bias: bool = True, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.a = nn.Linear(6, 8) if linear else nn.Conv2d(3, 8, 3)
        self.b = nn.Linear(8, 4, bias=bias) if linear else nn.Conv2d(8, 4, kernel, padding=padding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x)))


def _input(model: nn.Module) -> torch.Tensor:
    shapes = {Heads: (2, 5, 8), SigmoidInto: (2, 3, 7, 7), FlattenLinear: (2, 3, 5, 5), LayerNormStream: (2, 5, 4),
              Norms: (2, 3, 4, 4)}
    if isinstance(model, SigmoidInto) and model.linear:
        return torch.randn(3, 6)
    return torch.randn(*shapes.get(type(model), (2, 3, 6, 6)))


#: model -> its parameter count after speedup at 50%, worked out by hand from each layer's kept sizes
HAND_BUILT = {
    "residual": (lambda: _randomize_norms(Residual()),
                 (4 * 3 * 9 + 4) + (4 * 3 + 4) + 2 * (4 + 4) + (4 * 4 + 4)),
    "cat": (Cat, (2 * 3 + 2) + (3 * 3 + 3) + (5 * 5 + 5)),
    "chunk": (lambda: Chunk(), (4 * 3 + 4) + (2 * 4 + 2 + 2)),
    "split": (lambda: Chunk([3, 5]), (4 * 3 + 4) + (2 * 4 + 2 + 2)),  # b and c read the 4 kept between them
    "depthwise": (lambda: Depthwise(), (4 * 3 + 4) + (4 * 9 + 4) + (2 * 4 + 2)),
    "depthwise-x2": (lambda: Depthwise(2), (4 * 3 + 4) + (8 * 9 + 8) + (2 * 8 + 2)),
    "grouped": (Grouped, (4 * 3 + 4) + (8 * 1 * 9 + 8) + (2 * 8 + 2)),
    "squeeze-excite": (SqueezeExcite, (4 * 27 + 4) + (1 * 4 + 1) + (4 * 1 + 4) + (4 * 4 + 4)),
    "flatten-linear": (FlattenLinear, (2 * 27 + 2) + (10 * 18 + 10)),
    "shuffle": (lambda: Shuffle(), 2 * (2 * 3 + 2) + (2 * 4 + 2)),
    "nn.ChannelShuffle": (lambda: Shuffle(True), 2 * (2 * 3 + 2) + (2 * 4 + 2)),
    "heads": (lambda: Heads(), 2 * (4 * 8 + 4) + (4 * 8 + 4) + (8 * 4 + 8)),
    "packed-heads": (lambda: Heads(packed=True), (12 * 8 + 12) + (8 * 4 + 8)),
    # one group of 16 (SE ties the shuffled cat), stem keeping s and side d of them, s + d = 8:
    # stem 27s, two norms 4s, dw 9s, side s*d + d, fc1 2*8 + 2, fc2 8*2 + 8, head 5*8 + 5
    "shrinkable": (lambda: _randomize_norms(Shrinkable()),
                   lambda s, d: 27 * s + 4 * s + 9 * s + s * d + d + 18 + 24 + 45),
    "sigmoid-into-conv": (lambda: SigmoidInto(), (4 * 27 + 4) + (4 * 4 + 4)),
    "sigmoid-into-biasless-conv": (lambda: SigmoidInto(bias=False), (4 * 27 + 4) + (4 * 4 + 4)),
    "sigmoid-into-linear": (lambda: SigmoidInto(linear=True), (4 * 6 + 4) + (4 * 4 + 4)),
    # conv 4 of 8 filters and its BatchNorm; conv2 keeps all 6 (its GroupNorm group is not pruned), reading 4;
    # fc 3 of 5 (floor(0.5 * 5) = 2 pruned) and its LayerNorm; fc2 3 outputs (the model's) reading 3
    "norms": (lambda: _randomize_norms(Norms()),
              (4 * 3 + 4) + 2 * 4 + (6 * 4 + 6) + 2 * 6 + (3 * 6 + 3) + 2 * 3 + (3 * 3 + 3)),
    # the stream keeps 4 of 8: embed 4*4+4, two LayerNorms 2*4 each, fc1 8 of 16 reading 4, fc2 4 reading 8,
    # head 3 (the output) reading 4
    "layer-norm-stream": (lambda: _randomize_norms(LayerNormStream()),
                          (4 * 4 + 4) + 2 * (2 * 4) + (8 * 4 + 8) + (4 * 8 + 4) + (3 * 4 + 3)),
}


def _assert_same(fast: nn.Module, gm: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = gm.eval()(x), fast.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_speedup_equals_the_masked_model_with_the_kept_sizes(name: str) -> None:
    make, params = HAND_BUILT[name]
    torch.manual_seed(0)
    model = make().eval()
    x = _input(model)
    gm = _compress(model, x)
    fast = fxcompress.speedup(gm)
    fast.graph.lint()
    _assert_same(fast, gm, x)
    if callable(params):  # counts that depend on which layer's channels the ranking picked
        params = params(*(8 - len(_rows_pruned(gm, layer)) for layer in ("stem", "side")))
    assert sum(p.numel() for p in fast.parameters()) == params
    assert not any(n.endswith("_mask") for n, _ in fast.named_buffers())
    assert "masked" not in fast.code


def test_a_folded_constant_lands_in_the_next_bias() -> None:
    torch.manual_seed(0)
    model = SigmoidInto(bias=False).eval()
    gm = _compress(model, _input(model))
    pruned = _rows_pruned(gm, "a")
    fast = fxcompress.speedup(gm)
    kept = [c for c in range(8) if c not in pruned]
    expected = 0.5 * model.b.weight.detach()[:, pruned].sum(dim=(1, 2, 3))  # sigmoid(0) times the removed columns
    torch.testing.assert_close(fast.b.bias.detach(), expected)
    torch.testing.assert_close(fast.b.weight.detach(), model.b.weight.detach()[:, kept])


def test_speedup_keeps_the_model_unchanged_and_the_modes() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(Shrinkable()).eval()
    x = _input(model)
    gm = _compress(model, x).train()
    state, code = copy.deepcopy(gm.state_dict()), gm.code
    fast = fxcompress.speedup(gm)
    assert gm.code == code
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor))
    assert fast.training and fast.bn.training
    fast.train()(x)  # train mode: batch statistics, running stats move
    assert not torch.equal(fast.bn.running_mean, torch.zeros_like(fast.bn.running_mean))


# ---- torchvision ---------------------------------------------------------------------------------

def _masked_copy(model: nn.Module, gm: nn.Module) -> nn.Module:
    """The original model with the layer masks and the norm masks multiplied in by hand."""
    ref = masked_reference(model, fxcompress.masks(gm))
    with torch.no_grad():
        for name, module in gm.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm) and "weight_mask" in module._buffers:
                norm = ref.get_submodule(name)
                norm.weight.mul_(module.weight_mask)
                norm.bias.mul_(module.bias_mask)
    return ref.eval()


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid)


def _kept_params(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> int:
    """The parameters a shrunk model should hold, found without fxcompress's groups: a layer keeps its
    unmasked filters times the input channels that are not identically zero in the masked model (its
    ReLU-like activations made identities and hard sigmoids sigmoids, so that no kept channel is zero by
    chance, as a ReLU at random init can make one; a pruned channel is 0 whatever the activations)."""
    ref = _masked_copy(model, gm)
    for name, m in list(ref.named_modules()):
        if isinstance(m, _ACTIVATIONS):
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent), attr, nn.Sigmoid() if isinstance(m, nn.Hardsigmoid) else nn.Identity())
    masks = fxcompress.masks(gm)
    alive: dict[str, int] = {}

    def probe(name: str, conv: bool):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            dim = 1 if conv else -1
            seen = args[0].detach().movedim(dim, 0).reshape(args[0].shape[dim], -1).ne(0).any(dim=1)
            alive[name] = int(seen.sum()) if name not in alive else max(alive[name], int(seen.sum()))
        return hook

    for name, m in ref.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_pre_hook(probe(name, isinstance(m, nn.Conv2d)))
    with torch.no_grad(), mock.patch.object(F, "relu", lambda t, inplace=False: t):  # DenseNet's last ReLU
        ref(x)
    total = 0
    counted = set()
    for name, m in ref.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            rows = masks[name].reshape(m.weight.shape[0], -1).any(dim=1) if name in masks else None
            out = m.weight.shape[0] if rows is None else int(rows.sum())
            groups = getattr(m, "groups", 1)
            cin = alive.get(name, m.weight.shape[1] * groups)
            per_filter = 1 if groups > 1 and groups == m.weight.shape[1] * groups else cin // groups
            total += out * per_filter * m.weight[0, 0].numel() + (out if m.bias is not None else 0)
            counted.update({id(m.weight), id(m.bias)})
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm) and m.weight is not None:
            mask = getattr(gm.get_submodule(name), "weight_mask", None)
            kept = m.weight.numel() if mask is None else int(mask.sum())
            total += 2 * kept
            counted.update({id(m.weight), id(m.bias)})
        elif isinstance(m, CNBlock):  # its layer scale multiplies the last Linear's outputs channel by channel
            last = name + ".block.5"
            total += int(masks[last].any(dim=1).sum()) if last in masks else m.layer_scale.numel()
            counted.add(id(m.layer_scale))
    return total + sum(p.numel() for p in ref.parameters() if id(p) not in counted)


def _group_counts_exact(gm: nn.Module, sparsity: float = 0.5) -> None:
    record = gm.fxcompress_groups
    for row, plan in zip(group_report(gm), record.plans, strict=True):
        if plan.prune is not None:
            assert row.pruned == sum(ratio_floor(sparsity, len(p)) for p in plan.group.partitions), row


def _nonzero_init(model: nn.Module) -> nn.Module:
    """Weights torchvision initializes to zero (ViT's head) drawn at random, so outputs say something."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.05)
    return model


def _check_torchvision(name: str, size: int, **kwargs: object) -> None:
    torch.manual_seed(0)
    model = _nonzero_init(torchvision.models.get_model(name, weights=None, **kwargs)).eval()
    x = torch.randn(1, 3, size, size)
    gm = _compress(model, x)
    _group_counts_exact(gm)
    fast = fxcompress.speedup(gm)
    probe = torch.randn(4, 3, 2 * size, 2 * size) if not name.startswith("vit") else torch.randn(4, 3, size, size)
    _assert_same(fast, gm, probe)
    assert sum(p.numel() for p in fast.parameters()) == _kept_params(model, gm, probe)
    assert sum(p.numel() for p in fast.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "efficientnet_b0"])
def test_torchvision_fast_subset(name: str) -> None:
    _check_torchvision(name, 32)


SWEEP = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v3_small", "mobilenet_v3_large",
         "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "densenet121", "shufflenet_v2_x1_0",
         "convnext_tiny", "vgg11", "vgg11_bn", "squeezenet1_0", "squeezenet1_1", "vit_b_16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_torchvision_sweep(name: str) -> None:
    if name.startswith("vit"):
        _check_torchvision(name, 64, image_size=64)  # its MLPs shrink; attention and the stream are blocked
    else:
        _check_torchvision(name, 32)


# ---- what the result can do ------------------------------------------------------------------------

def _fast_shrinkable() -> tuple[nn.Module, torch.fx.GraphModule, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomize_norms(Shrinkable()).eval()
    x = _input(model)
    gm = _compress(model, x)
    return model, gm, fxcompress.speedup(gm), x


def test_the_result_trains_compiles_exports_and_scripts() -> None:
    _, gm, fast, x = _fast_shrinkable()
    expected = gm.eval()(x)
    scripted = torch.jit.script(fast.eval())
    torch.testing.assert_close(scripted(x), expected)
    exported = torch.export.export(fast.eval(), (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    compiled = torch.compile(copy.deepcopy(fast).train(), backend="aot_eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    before = compiled.stem.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        compiled(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
    assert not torch.equal(compiled.stem.weight.detach(), before)


def test_quantizers_survive_on_pruned_layers() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(Residual()).eval()
    x = torch.randn(2, 3, 6, 6)
    cfg = [{**OC[0], "quant_types": ["input", "weight"], "quant_bits": 8, "quant_start_step": 3}]
    gm = _compress(model, x, cfg)
    fast = fxcompress.speedup(gm)
    assert isinstance(fast.a.weight_quantizer, fxcompress.quant.WeightQuantizer)
    assert isinstance(fast.c.input_quantizer, fxcompress.quant.ActivationQuantizer)
    assert fast.a.weight.shape[0] == 4 and "weight_quantizer" in fast.code
    _assert_same(fast, gm, x)  # quantization is off before step 3: float equality
    fast.train()
    for _ in range(4):
        fast(x)
    assert fxcompress.get_step(fast) == 4 and bool(fast.c.input_quantizer.initialized)
    assert fxcompress.calibration(fast)["a"]["weight_bits"] == 8 and len(fxcompress.calibration(fast)["a"]["weight_scale"]) == 4


def test_saving_the_module_and_rebuilding_from_a_state_dict() -> None:
    model, gm, fast, x = _fast_shrinkable()
    with torch.no_grad():
        fast.head.bias.add_(1.0)  # as if fine-tuned after speedup
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.eval()(x), fast.eval()(x))
    state = fast.state_dict()
    assert state["fxcompress_speedup._extra_state"]["pruned"]["stem"] == _rows_pruned(gm, "stem")
    rebuilt = fxcompress.speedup_from_state_dict(model, OC, state, (x,))
    torch.testing.assert_close(rebuilt.eval()(x), fast.eval()(x))
    assert {k: v.shape for k, v in rebuilt.state_dict().items() if isinstance(v, torch.Tensor)} == \
        {k: v.shape for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_a_state_dict_of_other_channels_is_refused_when_loaded() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(Residual()).eval()
    x = torch.randn(2, 3, 6, 6)
    fast = fxcompress.speedup(_compress(model, x))
    other = fxcompress.speedup(_compress(model, x, [{**OC[0], "criterion": "random", "seed": 3}]))
    assert _shapes(other) == _shapes(fast)  # the same sizes: only the record tells them apart
    assert other.state_dict()["fxcompress_speedup._extra_state"] != fast.state_dict()["fxcompress_speedup._extra_state"]
    with pytest.raises(fxcompress.ConfigError, match="sped up with other channels pruned"):
        fast.load_state_dict(other.state_dict())


def _shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def test_a_dry_run_plan_shows_the_groups() -> None:
    from fxcompress.annotations import plans_of
    from fxcompress.pruning import compute_masks

    torch.manual_seed(0)
    gm = fxcompress.plan(Chain().eval(), OC, example_inputs=(torch.randn(1, 3, 6, 6),))
    assert [r.pruned for r in group_report(gm)] == [None, None]  # nothing computed yet
    rows = group_report(gm, compute_masks(gm, plans_of(gm)))  # as `python -m fxcompress plan` does
    assert [(r.pruned, r.params_removed, r.flops_removed) for r in rows] == [(4, 128, 8928), (0, 0, 0)]
    assert not any(n.endswith("_mask") for n, _ in gm.named_buffers())


# ---- errors -----------------------------------------------------------------------------------------

def test_a_model_without_channel_masks_is_refused() -> None:
    x = torch.randn(1, 3, 6, 6)
    quant_only = _compress(Residual(), x, [{"op_types": ["Conv2d"], "quant_types": ["weight", "input"],
                                            "quant_bits": 8}])
    with pytest.raises(fxcompress.SpeedupError, match="the model has no pruning masks"):
        fxcompress.speedup(quant_only, (x,))
    element = _compress(Residual(), x, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    with pytest.raises(fxcompress.SpeedupError, match=r"layer 'a' has masks that prune single weights.*'element'"):
        fxcompress.speedup(element, (x,))
    with pytest.raises(fxcompress.SpeedupError, match="no channel is pruned"):
        fxcompress.speedup(_compress(Residual(), x, [{**OC[0], "sparsity_per_layer": 0.1}]))
    with pytest.raises(fxcompress.SpeedupError, match="expected the GraphModule compress returned, got Residual"):
        fxcompress.speedup(Residual())


def test_per_layer_channel_masks_are_refused_with_the_fix() -> None:
    x = torch.randn(1, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxcompress.compress(_randomize_norms(Residual()).eval(), OC)
    with pytest.raises(fxcompress.SpeedupError, match=r"no example inputs: pass speedup\(gm, example_inputs"):
        fxcompress.speedup(gm)
    with pytest.raises(fxcompress.SpeedupError, match=r"layer '[ab]' prunes channels of group .*\(per-layer masks\).*"
                                                      r"example_inputs=\(x,\)"):
        fxcompress.speedup(gm, (x,))


def test_a_group_that_cannot_shrink_names_the_op() -> None:
    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-layer masks: the group is pruned although 'mystery' reads it
        gm = fxcompress.compress(Blocked("function").eval(), [{"op_names": ["a"], "sparsity_per_layer": 0.5,
                                                               "granularity": "out_channel"}])
    with pytest.raises(fxcompress.SpeedupError, match=r"group \d+ \(a\) cannot be shrunk: node 'mystery' reads"):
        fxcompress.speedup(gm, (x,))


def test_a_constant_into_a_padded_conv_is_refused() -> None:
    torch.manual_seed(0)
    model = SigmoidInto(kernel=3, padding=1).eval()
    gm = _compress(model, _input(model))
    with pytest.raises(fxcompress.SpeedupError, match=r"reach the padded conv 'b' as constants \(0.5 at most\)"):
        fxcompress.speedup(gm)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow at the top: fx cannot trace it
            x = -x
        return self.b(self.a(x))


def test_a_module_level_model_is_refused() -> None:
    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxcompress.compress(Untraceable(), OC, example_inputs=(x,))
    with pytest.raises(fxcompress.SpeedupError, match="compressed at module level .* no graph"):
        fxcompress.speedup(gm, (x,))
