"""The plan is the truth (SPEC §2.6–§2.9, §4): what ``summary`` says is what the model computes.

Each named case from issue 9, and one property test over random small models and configs that
the forward equals a reference built by hand from the plan's masks and ranges, after every
public way of writing a weight.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress import ConfigError

from .fixtures import SeedModel, masked_reference, seed_input

PRUNE = [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}]


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 10)
        self.b = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def kept_count(mask: torch.Tensor) -> int:
    return int(mask.sum())


# -- 1. pruned weights never come back ------------------------------------------------------

def test_load_state_dict_of_dense_weights_stays_masked() -> None:
    torch.manual_seed(0)
    dense = SeedModel().eval()
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["default"], "sparsity_per_layer": 0.5}]).eval()
    gm.load_state_dict(dense.state_dict(), strict=False)  # dense weights over the pruned ones
    x = seed_input(4)
    torch.testing.assert_close(gm(x), masked_reference(dense, fxcompress.masks(gm))(x))
    assert not torch.allclose(gm(x), dense(x))
    rows = {r.name: r for r in fxcompress.report(gm)}
    assert rows["fc1"].pruned == 1179648 // 2  # what the plan table says is what acts


def test_tied_weights_with_equal_settings_share_one_mask() -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    model.b.weight = model.a.weight
    gm = fxcompress.compress(model, [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    assert gm.a.weight_mask is gm.b.weight_mask and int((gm.a.weight_mask == 0).sum()) == 50
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    x = torch.randn(8, 10)
    gm(x).square().sum().backward()
    opt.step()
    pruned = gm.a.weight_mask == 0
    assert int((gm.a.weight * gm.a.weight_mask)[pruned].count_nonzero()) == 0
    assert int(gm.a.weight[pruned].count_nonzero()) == 0  # zero gradient through both reads


def test_tied_weights_with_different_settings_name_both_layers() -> None:
    model = TwoLinear()
    model.b.weight = model.a.weight
    cfg = [{"op_names": ["a"], "sparsity_per_layer": 0.5}, {"op_names": ["b"], "sparsity_per_layer": 0.2}]
    with pytest.raises(ConfigError, match=r"layers 'a' and 'b' share one weight tensor but get different settings"):
        fxcompress.compress(model, cfg)


def test_momentum_from_before_an_inplace_compress_never_acts() -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    gm = fxcompress.compress(model, [{"op_names": ["a"], "sparsity_per_layer": 0.5}], inplace=True)
    opt.zero_grad()
    gm(x).square().sum().backward()
    opt.step()
    pruned = gm.a.weight_mask == 0
    assert int(gm.a.weight[pruned].count_nonzero()) == 50  # momentum moved every stored pruned entry...
    reference = copy.deepcopy(model)  # ...and none of them acts
    with torch.no_grad():
        reference.a.weight.mul_(gm.a.weight_mask)
    torch.testing.assert_close(gm(x), reference(x))


# -- 2./3. reads outside a module call, subclasses ------------------------------------------

class FunctionalRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return F.linear(y.mean(dim=(2, 3)), self.fc.weight, bias=self.fc.bias)


def test_functional_reads_are_masked() -> None:
    torch.manual_seed(0)
    model = FunctionalRead()
    gm = fxcompress.compress(model, [{"op_types": ["default"], "sparsity_per_layer": 0.5}])
    masks = fxcompress.masks(gm)
    assert sorted(masks) == ["conv", "fc"] and kept_count(masks["conv"]) == 162 - 81
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), masked_reference(model, masks)(x))


def test_functional_reads_are_quantized_with_their_inputs() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(FunctionalRead(), [{"op_types": ["default"], "quant_types": ["input", "weight"],
                                                 "quant_bits": 8}])
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("conv.input_quantizer") == 1 and calls.count("fc.weight_quantizer") == 1
    gm(torch.randn(2, 3, 8, 8))
    assert float(gm.conv.input_quantizer.initialized) == 1.0 and float(gm.fc.input_quantizer.initialized) == 1.0


class SamePadConv(nn.Conv2d):
    """A subclass with its own forward, as timm's Conv2dSame: pads at run time, then convolves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SubclassModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 4, 2)
        self.head = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean(dim=(2, 3)))


def test_subclasses_answer_to_their_base_name_and_are_compressed() -> None:
    torch.manual_seed(0)
    model = SubclassModel()
    gm = fxcompress.compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}])
    assert sorted(fxcompress.masks(gm)) == ["head", "stem"]
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gm(x), masked_reference(model, fxcompress.masks(gm))(x))
    only_head = fxcompress.compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5},
                                            {"op_types": ["SamePadConv"], "exclude": True}])
    assert sorted(fxcompress.masks(only_head)) == ["head"]


@torch.fx.wrap
def opaque_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


class OpaqueRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque_matmul(x, self.qkv.weight)


def test_unreachable_input_is_an_error_under_strict_and_weight_only_otherwise() -> None:
    cfg = [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 4}]
    with pytest.raises(ConfigError, match=r"layer 'qkv': activation quantization cannot reach the read of qkv.weight by "
                                          r"opaque_matmul"):
        fxcompress.compress(OpaqueRead(), cfg)
    with pytest.warns(UserWarning, match=r"layer 'qkv': activation quantization cannot reach"):
        gm = fxcompress.compress(OpaqueRead(), cfg, strict=False)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "qkv.weight_quantizer" in calls and "qkv.input_quantizer" not in calls
    assert fxcompress.report(gm)[0].site == "graph (weight only at 1 read(s))"
    x = torch.randn(3, 4)
    w = gm.qkv.weight.detach()
    scale = w.abs().amax(dim=1) / 7  # 4-bit narrow symmetric: [-7, 7]
    ref = x @ torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(4, dtype=torch.int32), 0, -7, 7).t()
    torch.testing.assert_close(gm.eval()(x), ref)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_layer_is_compressed_in_both_modes(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    gm = fxcompress.compress(model, PRUNE)
    masks = fxcompress.masks(gm)
    assert sorted(masks) == ["0", "1.linear1", "1.linear2", "1.self_attn.in_proj", "1.self_attn.out_proj"]
    assert int((~masks["1.self_attn.in_proj"]).sum()) == 96  # floor(0.5 * 24 * 8)
    x = torch.randn(3, 5, 8)
    reference = masked_reference(model, masks).train(mode == "train")
    gm.train(mode == "train")
    with torch.no_grad():  # eval under no_grad is where torch's fused fast path would read raw weights
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(gm(x), model.train(mode == "train")(x), atol=1e-3)


def test_attention_loads_a_plain_state_dict_and_composes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    dense = copy.deepcopy(model)
    torch.nn.init.normal_(dense[0].self_attn.in_proj_weight)
    gm = fxcompress.compress(model, PRUNE)
    assert "0.self_attn.in_proj.weight" in gm.state_dict() and "0.self_attn.in_proj_weight" not in gm.state_dict()
    gm.load_state_dict(dense.state_dict(), strict=False)  # nn.MultiheadAttention's own key names
    masks = fxcompress.masks(gm)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(gm.eval()(x), masked_reference(dense, masks).eval()(x), rtol=1e-5, atol=1e-5)
    both = fxcompress.compress(gm, [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}])
    assert [r.quant != "" and r.pruned is not None for r in fxcompress.report(both)] == [True] * 4


def test_attention_quantizes_each_distinct_input() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return self.attn(q, kv, kv)[0] + self.attn(q, q, q)[0]

    gm = fxcompress.compress(Cross(), [{"op_types": ["Linear"], "quant_types": ["input", "weight"],
                                        "quant_bits": 8}])
    q, kv = torch.randn(2, 3, 8), 5 + torch.randn(2, 4, 8)
    gm(q, kv)
    in_proj = gm.attn.in_proj
    # query quantizer saw q (twice), the key quantizer saw kv; value is key here, so it saw nothing
    assert float(in_proj.input_quantizer.tracked_max) < 5 < float(in_proj.key_input_quantizer.tracked_max)
    assert float(in_proj.value_input_quantizer.initialized) == 0.0
    assert float(gm.attn.out_proj.input_quantizer.initialized) == 1.0
    assert fxcompress.calibration(gm)["attn.in_proj"]["input_bits"] == 8


def test_attention_in_projection_output_cannot_be_quantized() -> None:
    cfg = [{"op_types": ["Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 8}]

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    with pytest.raises(ConfigError, match=r"layer 'attn.in_proj': activation quantization cannot reach the output "
                                          r"of the attention in-projection"):
        fxcompress.compress(Wrap(), cfg)


# -- 4. silent no-ops -----------------------------------------------------------------------

class WithAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 2)  # never used by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_unused_layer_named_in_op_names() -> None:
    cfg = [{"op_names": ["body", "aux"], "sparsity_per_layer": 0.5}]
    with pytest.raises(ConfigError, match=r"\['op_names'\]: 'aux' is never called nor its weight read"):
        fxcompress.compress(WithAux(), cfg)
    with pytest.warns(UserWarning, match=r"'aux' is never called"):
        gm = fxcompress.compress(WithAux(), cfg, strict=False)
    assert sorted(fxcompress.masks(gm)) == ["body"]


def test_unused_layer_selected_by_type_is_listed_without_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = fxcompress.compress(WithAux(), PRUNE)
    rows = {r.name: r for r in fxcompress.report(gm)}
    assert rows["aux"].site == "unused" and rows["aux"].pruned is None and rows["body"].pruned == 8
    assert "| aux " in fxcompress.summary(gm)


@pytest.mark.parametrize("cfg", [[{"op_types": ["Linear"]}],
                                 [{"op_types": ["Linear"], "exclude": True}]], ids=["selectors-only", "only-exclude"])
def test_config_that_compresses_nothing_warns(cfg: list) -> None:
    with pytest.warns(UserWarning, match=r"nothing is compressed"):
        fxcompress.compress(TwoLinear(), cfg)


# -- 5. compressing a compressed model -------------------------------------------------------

def test_prune_then_quantize_composes() -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    pruned = fxcompress.compress(model, PRUNE)
    both = fxcompress.compress(pruned, [{"op_types": ["Linear"], "quant_types": ["input", "weight"],
                                         "quant_bits": 8}])
    rows = fxcompress.report(both)
    assert [(r.pruned, r.quant) for r in rows] == [(50, "weight int8 ch-sym, input uint8 aff")] * 2
    assert torch.equal(both.a.weight_mask, pruned.a.weight_mask)
    calls = [n.target for n in both.graph.nodes if n.op == "call_module"]
    assert calls == ["fxcompress_step", "a.weight_quantizer", "a.input_quantizer", "b.weight_quantizer",
                     "b.input_quantizer"]
    assert "a.weight_quantizer" not in [n.target for n in pruned.graph.nodes]  # the first result is unchanged


def test_recompression_with_a_different_setting_is_an_error() -> None:
    pruned = fxcompress.compress(TwoLinear(), PRUNE)
    with pytest.raises(ConfigError, match=r"layer 'a' is already pruned by an earlier compress with different"):
        fxcompress.compress(pruned, [{"op_types": ["Linear"], "sparsity_per_layer": 0.7}])
    fxcompress.compress(pruned, PRUNE)  # the same settings again are fine


# -- 6. masks are found through the plans -----------------------------------------------------

class OwnMasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.full((4,), 2.0))
        self.register_buffer("scale_mask", torch.tensor([1.0, 0.0, 1.0, 0.0]))
        self.register_buffer("causal_mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale * self.scale_mask + self.causal_mask.float().sum()


def test_user_mask_buffers_are_left_alone() -> None:
    gm = fxcompress.compress(OwnMasks(), PRUNE)
    fxcompress.apply_masks(gm)
    fxcompress.update_masks(gm)
    assert list(fxcompress.masks(gm)) == ["fc"]
    assert gm.scale.tolist() == [2.0, 2.0, 2.0, 2.0]
    sched = fxcompress.SparsityScheduler(gm, 0, 2)
    sched.step()
    assert gm.scale.tolist() == [2.0, 2.0, 2.0, 2.0]


def test_torch_prune_model_is_a_clear_error() -> None:
    model = TwoLinear()
    torch.nn.utils.prune.l1_unstructured(model.a, "weight", amount=0.5)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"layer 'a' was pruned with torch.nn.utils.prune.*prune.remove"):
        fxcompress.compress(model, PRUNE, inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- 7. errors that arrived late ------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    ({"total_sparsity": 0.8, "max_sparsity_per_layer": 0.5}, r"asks for 160 pruned weights but .* at most 100"),
    ({"granularity": "2:3"}, r"granularity '2:3' needs a row length divisible by 3, got 10"),
], ids=["unreachable-cap", "n-m-row"])
def test_start_dense_checks_the_final_target_at_compress(keys: dict, message: str) -> None:
    cfg = [{"op_types": ["Linear"], **keys}]
    with pytest.raises(ConfigError, match=message):
        fxcompress.compress(TwoLinear(), cfg, start_dense=True)


# -- the property: effective forward == a hand-built reference, after every write path --------

class RandomNet(nn.Module):
    """Linear layers, some called as modules and some read functionally."""

    def __init__(self, widths: list[int], functional: list[bool]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False))
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight, layer.bias) if self.functional[i] else layer(x)
            x = torch.relu(x) if i + 1 < len(self.layers) else x
        return x


def reference_forward(gm: nn.Module, n_layers: int, x: torch.Tensor, quantized: set[int]) -> torch.Tensor:
    """The forward rebuilt by hand from the stored weights, the mask buffers and the observed ranges."""
    for i in range(n_layers):
        layer = gm.get_submodule(f"layers.{i}")
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        mask = getattr(layer, "weight_mask", None)
        if mask is not None:
            w = w * mask
            for row in range(w.shape[0]):  # a bias entry goes when its whole row is pruned
                if not bool(mask[row].any()):
                    b[row] = 0.0
        if i in quantized:
            lo, hi = min(float(layer.input_quantizer.tracked_min), 0.0), max(float(layer.input_quantizer.tracked_max), 0.0)
            scale = max((hi - lo) / 255, torch.finfo(torch.float32).eps)
            zp = int(min(max(round(-lo / scale), 0), 255))
            x = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
            ch = torch.maximum(w.amin(dim=1).neg().clamp(min=0), w.amax(dim=1).clamp(min=0)) / 127
            ch = ch.clamp(min=torch.finfo(torch.float32).eps)
            w = torch.fake_quantize_per_channel_affine(w, ch, torch.zeros(len(ch), dtype=torch.int32), 0, -127, 127)
        x = x @ w.t() + b
        x = torch.relu(x) if i + 1 < n_layers else x
    return x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 9), min_size=2, max_size=5),
       data=st.data())
def test_effective_forward_equals_hand_built_reference(widths: list[int], data: st.DataObject) -> None:
    n = len(widths) - 1
    functional = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    pruned = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    quantized = data.draw(st.sets(st.integers(0, n - 1)))
    sparsity = data.draw(st.sampled_from([0.25, 0.5, 0.75]))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    model = RandomNet(widths, functional)
    x = torch.randn(6, widths[0])
    names = lambda s: [f"layers.{i}" for i in sorted(s)]  # noqa: E731
    prune_cfg = [{"op_names": names(pruned), "sparsity_per_layer": sparsity}]
    gm = fxcompress.compress(model, prune_cfg, start_dense=bool(quantized))
    if quantized:  # the other write path: ramp with a scheduler, then add quantization by recompressing
        sched = fxcompress.SparsityScheduler(gm, 0, 2, kind="linear")
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)

    def check(model_now: nn.Module, quant: set[int]) -> None:
        model_now.eval()
        torch.testing.assert_close(model_now(x), reference_forward(model_now, n, x, quant), rtol=1e-5, atol=1e-5)
        for name, mask in fxcompress.masks(model_now).items():
            expect = int(sparsity * mask.numel()) if not quantized or sched.fraction == 1.0 else None
            if expect is not None:
                assert int((~mask).sum()) == expect, name
        model_now.train()

    gm.load_state_dict(model.state_dict(), strict=False)  # dense weights written over the masked ones
    check(gm, set())
    for _ in range(2):  # optimizer steps with momentum from the dense phase
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
        if quantized:
            sched.step()
    check(gm, set())
    if quantized:
        both = fxcompress.compress(gm, [{"op_names": names(quantized), "quant_types": ["input", "weight"],
                                         "quant_bits": 8}])
        both(x)  # observe one batch
        check(both, quantized)


class ReadsChildWeight(nn.Module):
    """fx cannot trace it (a data-dependent branch), and its forward reads its child's weight directly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return F.linear(x, self.fc.weight, self.fc.bias)
        return self.fc(x)


def test_leaf_reading_a_child_weight_directly_is_reported() -> None:
    model = nn.Sequential(ReadsChildWeight(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"layer '0.fc' is selected but cannot be compressed: ReadsChildWeight."
                                          r"forward reads self.fc.weight directly"):
        fxcompress.compress(model, PRUNE)
    with pytest.warns(UserWarning, match=r"'0.fc' is selected but cannot be compressed"):
        gm = fxcompress.compress(model, PRUNE, strict=False)
    assert sorted(fxcompress.masks(gm)) == ["1"]


def test_timm_conv2d_same_is_traced_through_its_padding() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(timm_layers.Conv2dSame(3, 8, 3, stride=2), nn.ReLU())
    cfg = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"], "quant_bits": 8}]
    gm = fxcompress.compress(model, cfg)
    assert fxcompress.report(gm)[0].site == "graph" and int((~fxcompress.masks(gm)["0"]).sum()) == 108
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "0.input_quantizer" in calls  # the padded input is visible, so it is quantized
    x = torch.randn(2, 3, 9, 9)
    gm(x)
    pruned = fxcompress.compress(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    torch.testing.assert_close(pruned(x), masked_reference(model, fxcompress.masks(pruned))(x))
