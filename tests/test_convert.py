"""fxcompress.convert: int8 weights, BatchNorms folded away, oneDNN int8 kernels, outputs close to gm.eval()."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.frozen import FrozenQuantizer
from fxcompress.int8 import Int8Conv, Int8Linear, QuantizeUint8

from .deploy_models import build, train_forwards
from .fixtures import CalledTwice, Nested

QAT = {"quant_types": ["input", "weight"], "quant_bits": 8, "quant_reduce_range": True}
LAYERS = ["Conv2d", "Linear"]


class Small(nn.Module):
    """Conv-BN-ReLU (folded in QAT), a depthwise conv with ReLU6, a conv without bias, a residual add, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        z = F.relu6(self.dw_bn(self.dw(y)))
        y = self.pw(z) + y
        return self.fc(y.mean(dim=(2, 3)))


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth normalised images (real-ish inputs, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 3, 3, generator=g)
    return (F.interpolate(coarse, size=(12, 12), mode="bilinear", align_corners=False) - 0.45) / 0.25


def trained_small(extra: dict | None = None, model: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    gm = fxcompress.compress(model or Small(), [{"op_types": LAYERS, **QAT, **(extra or {})}])
    return train_forwards(gm, [(images(8, s),) for s in range(4)])


def snapshot(gm: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    return {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}, gm.code


def assert_unchanged(gm: nn.Module, before: tuple[dict[str, torch.Tensor], str]) -> None:
    state, code = snapshot(gm)
    assert code == before[1] and state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, nn.Module]:
    gm = trained_small()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return gm, fxcompress.convert(gm, (images(2, 10),))


def test_weights_are_stored_int8_and_every_batchnorm_is_gone(small: tuple[nn.Module, nn.Module]) -> None:
    _, int8 = small
    layers = {n: type(m) for n, m in int8.named_modules() if isinstance(m, (Int8Conv, Int8Linear))}
    assert layers == {"conv": Int8Conv, "dw": Int8Conv, "pw": Int8Conv, "fc": Int8Linear}
    state = int8.state_dict()
    assert {k for k, v in state.items() if v.dtype == torch.int8} == {f"{n}.weight" for n in layers}
    assert not any(v.is_floating_point() and v.numel() > 8 for k, v in state.items() if k.endswith("weight"))
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenQuantizer)) for m in int8.modules())
    int8.graph.lint()
    targets = [n.target for n in int8.graph.nodes if n.op == "call_module"]
    # dw's ReLU6 output feeds only pw: requantized in dw's kernel; conv's ReLU output is read by the add too
    assert "pw.input_quantizer" not in targets and {"conv.input_quantizer", "dw.input_quantizer"} <= set(targets)
    assert int8.conv.output_scale is None and int8.dw.post_op == "hardtanh" and int8.dw.output_scale is not None
    assert int8.dw.output_scale == int8.pw.input_quantizer.scale


def test_folded_conv_equals_the_bn_folded_fake_quant_weight_by_hand(small: tuple[nn.Module, nn.Module]) -> None:
    gm, int8 = small
    with torch.no_grad():
        conv, bn = gm.conv, gm.bn
        t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = conv.weight * t.reshape(-1, 1, 1, 1)
        scale = folded.abs().amax(dim=(1, 2, 3)) / 127  # per-channel symmetric int8, narrow levels
        expected_weight = torch.fake_quantize_per_channel_affine(folded, scale, torch.zeros(8, dtype=torch.int32), 0,
                                                                 -127, 127)
        expected_bias = bn.bias + (conv.bias - bn.running_mean) * t
    weight = int8.conv.weight.float() * int8.conv.weight_scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(int8.conv.bias, expected_bias, rtol=1e-5, atol=1e-6)
    assert int(int8.conv.weight.abs().max()) == 127 and int8.conv.input_quantizer.qmax == 127


def test_outputs_are_close_to_the_fake_quant_model(small: tuple[nn.Module, nn.Module]) -> None:
    gm, int8 = small
    x = images(16, 99)
    with torch.no_grad():
        expected, got = gm(x), int8(x)
    assert cosine(got, expected) > 0.999
    # summation order moves a value across a rounding boundary now and then: one level of the last activation
    step = float(int8.fc.input_quantizer.scale) * float(int8.fc.weight_scale.max()) * 127 * 8
    assert float((got - expected).abs().max()) < step
    assert int8.convert_drift["cosine"] > 0.999 and int8.convert_drift["max_abs_diff"] < step


def test_first_layer_computes_the_fake_quant_conv_to_float_rounding(small: tuple[nn.Module, nn.Module]) -> None:
    gm, int8 = small
    x = images(4, 5)
    final = fxcompress.finalize(gm)
    with torch.no_grad():
        levels = int8.conv.input_quantizer(x)
        expected = final.bn(_fake_quant_conv(final, x))
        got = F.relu(int8.conv(levels))
    torch.testing.assert_close(got, F.relu(expected), rtol=0, atol=1e-5 * float(expected.abs().max()))


def _fake_quant_conv(final: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """finalize's conv + fold, by hand: conv(fq(x), fq(w*s), b*s) / s."""
    s = final.bn.weight / torch.sqrt(final.bn.running_var + final.bn.eps)
    w = final.conv.weight_quantizer(final.conv.weight * s.reshape(-1, 1, 1, 1))
    y = F.conv2d(final.conv.input_quantizer(x), w, final.conv.bias * s, padding=1)
    return y / s.reshape(1, -1, 1, 1)


def test_quantize_levels_equal_fake_quantization_ties_included() -> None:
    q = QuantizeUint8(0.05, 3, 0, 127)
    x = torch.cat([(torch.arange(-10, 300) + 0.5) * 0.05, torch.randn(1000) * 4]).reshape(1, -1, 1, 1)
    expected = torch.fake_quantize_per_tensor_affine(x, 0.05, 3, 0, 127)
    assert q(x).dtype == torch.uint8
    assert torch.equal((q(x).float() - 3) * 0.05, expected)


def test_saves_and_loads_and_copies(small: tuple[nn.Module, nn.Module], tmp_path) -> None:  # noqa: ANN001
    _, int8 = small
    x = images(3, 7)
    with torch.no_grad():
        expected = int8(x)
        torch.save(int8, tmp_path / "int8.pt")
        loaded = torch.load(tmp_path / "int8.pt", weights_only=False)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(copy.deepcopy(int8)(x), expected)
        fresh = copy.deepcopy(int8)
        fresh.conv.weight.zero_()
        fresh.load_state_dict(int8.state_dict())  # repacks the kernel's weight from the loaded int8 levels
        assert torch.equal(fresh(x), expected)


def test_gm_is_unchanged_and_convert_is_repeatable() -> None:
    gm = trained_small()
    before = snapshot(gm)
    x = images(2, 3)
    first, second = fxcompress.convert(gm, (x,)), fxcompress.convert(gm, x)
    assert_unchanged(gm, before)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_full_range_activations_are_converted_and_their_drift_reported() -> None:
    gm = trained_small({"quant_reduce_range": False})
    x = images(8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a large drift warns; the numbers are what is checked here
        int8 = fxcompress.convert(gm, (x,))
    assert int8.conv.input_quantizer.qmax == 255
    with torch.no_grad():
        drift = cosine(int8(x), gm(x))
    assert drift > 0.99 and abs(drift - int8.convert_drift["cosine"]) < 1e-9


def test_pruned_model_with_output_quantizers_converts() -> None:
    _, gm, x = build("seed")  # 50% pruned, input/weight/output quantized, Conv2d and Linear
    int8 = fxcompress.convert(gm, x)
    assert isinstance(int8.conv1, Int8Conv) and isinstance(int8.fc1.output_quantizer, FrozenQuantizer)
    assert (int8.conv1.weight == 0).float().mean() >= 0.5
    with torch.no_grad():
        assert cosine(int8(*x), gm(*x)) > 0.99


def test_compiled_equals_eager() -> None:
    gm = trained_small(model=nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                                           nn.Linear(4 * 8 * 8, 2)))
    int8 = fxcompress.convert(gm, (images(2, 0),))
    x = images(2, 1)
    with torch.no_grad():
        expected = int8(x)
        # frozen: inductor lowers oneDNN's int8 ops (constant weights); else the layers' opaque custom ops
        with torch._inductor.config.patch(freezing=True):
            assert torch.equal(torch.compile(int8)(x), expected)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(int8)(x), expected)


# --- bad input: clear errors naming the layer, gm unchanged ----------------------------------------------------


def _refused(gm: nn.Module, match: str) -> None:
    before = snapshot(gm) if isinstance(gm, torch.fx.GraphModule) else None
    with pytest.raises(fxcompress.ConvertError, match=match):
        fxcompress.convert(gm, (images(2, 0),))
    if before is not None:
        assert_unchanged(gm, before)


def test_a_quantizer_that_never_observed_data_is_refused() -> None:
    gm = fxcompress.compress(Small(), [{"op_types": LAYERS, **QAT}]).eval()  # never trained: nothing observed
    _refused(gm, r"layer 'conv': its input quantizer is off in eval mode \(it has not observed a batch")


def test_quant_start_step_not_reached_is_refused() -> None:
    _refused(trained_small({"quant_start_step": 100}), r"layer 'conv': .*quant_start_step 100 not reached")


def test_a_bit_width_without_int_kernel_is_refused() -> None:
    gm = trained_small({"quant_bits": {"input": 8, "weight": 4}})
    _refused(gm, r"layer 'conv': its weight is quantized with 4 bits, .*no int4 kernel")


def test_an_asymmetric_uint_weight_is_refused() -> None:
    gm = trained_small({"quant_dtype": {"weight": "uint"}, "quant_scheme": {"weight": "per_channel_affine"}})
    _refused(gm, r"layer 'conv': its weight is quantized as uint with a nonzero zero point")


def test_a_layer_called_twice_is_refused() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(CalledTwice(), [{"op_types": ["Linear"], **QAT}])
    train_forwards(gm, [(torch.randn(4, 8),) for _ in range(2)])
    with pytest.raises(fxcompress.ConvertError, match=r"layer 'shared' is called 2 times"):
        fxcompress.convert(gm, (torch.randn(2, 8),))


@pytest.mark.parametrize(("name", "match"), [
    ("leaf", r"layer 'block.(fc|conv)' is compressed at module level inside leaf module 'block'"),
    ("attention", r"layer 'encoder.self_attn.in_proj' is a projection of an attention module"),
])
def test_layers_outside_the_graph_are_refused(name: str, match: str) -> None:
    _, gm, x = build(name)
    before = snapshot(gm)
    with pytest.raises(fxcompress.ConvertError, match=match):
        fxcompress.convert(gm, x)
    assert_unchanged(gm, before)


def test_a_model_without_quantized_weights_is_refused() -> None:
    gm = fxcompress.compress(Nested(), [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    _refused(gm, "no layer quantizes its weight")


def test_a_model_fxcompress_did_not_compress_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="convert: expected a model returned by fxcompress.compress"):
        fxcompress.convert(Small(), (images(1, 0),))


def test_a_batchnorm_not_folded_in_qat_is_folded_into_the_int8_scales_negative_gammas_included() -> None:
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():
        model.bn.weight[:4] *= -1  # gamma < 0: the folded weight's levels change sign
    gm = fxcompress.compress(model, [{"op_types": LAYERS, **QAT}], fold_bn=False)
    train_forwards(gm, [(images(8, s),) for s in range(4)])
    int8 = fxcompress.convert(gm, (images(2, 10),))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())
    assert bool((int8.conv.weight_scale > 0).all())
    x = images(16, 42)
    with torch.no_grad():
        assert cosine(int8(x), gm(x)) > 0.999
        levels = int8.conv.input_quantizer(x)
        expected = gm.bn(F.conv2d(gm.conv.input_quantizer(x, torch.tensor(10)),
                                  gm.conv.weight_quantizer(gm.conv.weight, torch.tensor(10)), gm.conv.bias, padding=1))
        torch.testing.assert_close(int8.conv(levels), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_a_conv_the_config_excludes_keeps_float_weights_with_its_batchnorm_folded() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(Small(), [{"op_types": LAYERS, **QAT}, {"exclude": True, "op_names": ["conv"]}])
    train_forwards(gm, [(images(8, s),) for s in range(4)])
    int8 = fxcompress.convert(gm, (images(2, 10),))
    assert type(int8.conv) is nn.Conv2d and int8.conv.weight.dtype == torch.float32
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())
    x = images(16, 42)
    with torch.no_grad():
        assert cosine(int8(x), gm(x)) > 0.999


def test_int_activations_are_shifted_into_uint8_levels() -> None:
    gm = trained_small({"quant_dtype": {"input": "int"}, "quant_scheme": {"input": "per_tensor_symmetric"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shifted levels reach 191: without VNNI the sums may saturate (README)
        int8 = fxcompress.convert(gm, (images(2, 10),))
    q = int8.conv.input_quantizer
    assert (q.zero_point, q.qmin, q.qmax) == (128, 65, 191)  # int -63..63 (reduced range), shifted by 128
    x = images(16, 42)
    with torch.no_grad():
        torch.testing.assert_close(((q(x).float() - 128) * q.scale), gm.conv.input_quantizer(x, torch.tensor(10)))
        assert cosine(int8(x), gm(x)) > 0.99
