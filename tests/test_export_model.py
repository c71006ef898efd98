"""fxcompress.export_model: NNI's two files, from which a consumer reproduces the fake-quant model alone."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import fxcompress

from .deploy_models import Cross, build, train_forwards
from .fixtures import SeedModel, seed_input

NNI_FIELDS = {"weight_bits", "weight_scale", "weight_zero_point", "input_bits", "tracked_min_input",
              "tracked_max_input", "output_bits", "tracked_min_output", "tracked_max_output"}


# -- a consumer of the two files, written from SPEC §5 with PyTorch's fake-quant ops ----------------

def levels(bits: int, dtype: str) -> tuple[int, int]:
    return (0, 2**bits - 1) if dtype == "uint" else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)


def activation_qparams(fields: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point from the tracked range (float32, as the model computes them); with
    ``quant_reduce_range`` an activation uses the levels of one bit fewer."""
    qmin, qmax = levels(fields[f"{kind}_bits"] - fields["quant_reduce_range"], fields[f"{kind}_dtype"])
    lo = torch.tensor(min(fields[f"tracked_min_{kind}"], 0.0))
    hi = torch.tensor(max(fields[f"tracked_max_{kind}"], 0.0))
    eps = torch.finfo(torch.float32).eps
    if fields[f"{kind}_scheme"].endswith("symmetric"):
        scale = torch.clamp(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), min=eps)
        zero_point = torch.tensor((qmin + qmax) // 2 if fields[f"{kind}_dtype"] == "uint" else 0)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point.to(torch.int32), qmin, qmax


def fake_quantize_activation(fields: dict, kind: str, x: torch.Tensor) -> torch.Tensor:
    scale, zero_point, qmin, qmax = activation_qparams(fields, kind)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def reproduce(model: nn.Module, state_path: str | None, calibration_path: str) -> nn.Module:
    """Load the state dict into a fresh original model, then fake-quantize as the calibration says:
    each weight once (it is constant), inputs and outputs with hooks."""
    if state_path is not None:
        model.load_state_dict(torch.load(state_path, weights_only=True))
    calibration = torch.load(calibration_path, weights_only=True)
    for name, fields in calibration.items():
        layer = model.get_submodule(name)
        if "weight_bits" in fields:
            qmin, qmax = levels(fields["weight_bits"], fields["weight_dtype"])
            scale = torch.tensor(fields["weight_scale"])
            zero_point = torch.tensor(fields["weight_zero_point"], dtype=torch.int32)
            with torch.no_grad():
                if fields["weight_scheme"].startswith("per_channel"):
                    quantized = torch.fake_quantize_per_channel_affine(layer.weight, scale, zero_point, 0, qmin, qmax)
                else:
                    quantized = torch.fake_quantize_per_tensor_affine(layer.weight, scale, zero_point, qmin, qmax)
                layer.weight.copy_(quantized)
        if "input_bits" in fields:
            layer.register_forward_pre_hook(
                lambda _, args, f=fields: (fake_quantize_activation(f, "input", args[0]), *args[1:]))
        if "output_bits" in fields:
            layer.register_forward_hook(lambda _, __, out, f=fields: fake_quantize_activation(f, "output", out))
    return model.eval()


# -- tests ------------------------------------------------------------------------------------------

def test_a_consumer_reproduces_the_traced_fake_quant_model_from_the_two_files(tmp_path) -> None:
    original, gm, x = build("seed")
    before = {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    code = gm.code
    state_path, calibration_path = str(tmp_path / "model.pth"), str(tmp_path / "calibration.pth")
    returned = fxcompress.export_model(gm, state_path, calibration_path)
    assert gm.code == code and all(torch.equal(v, before[k]) for k, v in gm.state_dict().items() if k in before)
    state = torch.load(state_path, weights_only=True)
    assert list(state) == list(SeedModel().state_dict())  # the original's keys, in its order
    for layer, mask in fxcompress.masks(gm).items():
        assert not state[f"{layer}.weight"][~mask].any()
    calibration = torch.load(calibration_path, weights_only=True)
    assert calibration == returned and json.loads(json.dumps(calibration)) == calibration
    assert list(calibration) == ["conv1", "conv2", "fc1", "fc2"]
    assert NNI_FIELDS <= set(calibration["fc1"])
    assert calibration["fc1"]["input_scale"] == float(activation_qparams(calibration["fc1"], "input")[0])
    consumer = reproduce(SeedModel(), state_path, calibration_path)
    with torch.no_grad():
        assert torch.equal(consumer(*x), gm(*x))
    assert not torch.equal(consumer(*x), original.eval()(*x))


def test_quant_reduce_range_is_recorded_per_layer_and_a_consumer_reproduces_it(tmp_path) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [
        {"op_types": ["Conv2d"], "quant_types": ["input", "weight", "output"], "quant_bits": 8,
         "quant_reduce_range": True},
        {"op_names": ["fc1"], "quant_types": ["input", "weight"], "quant_bits": 8, "quant_dtype": "int",
         "quant_reduce_range": True},
        {"op_names": ["fc2"], "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    train_forwards(gm, [(seed_input(4),) for _ in range(3)])
    state_path, calibration_path = str(tmp_path / "model.pth"), str(tmp_path / "calibration.pth")
    calibration = fxcompress.export_model(gm, state_path, calibration_path)
    assert {name: fields["quant_reduce_range"] for name, fields in calibration.items()} == {
        "conv1": True, "conv2": True, "fc1": True, "fc2": False}
    # what the flag says: the activations' levels are those of 7 bits (the weights keep 8), and the
    # activation scale written beside it is that of the reduced levels
    assert activation_qparams(calibration["conv1"], "input")[2:] == (0, 127)
    assert activation_qparams(calibration["fc1"], "input")[2:] == (-63, 63)
    assert activation_qparams(calibration["fc2"], "input")[2:] == (0, 255)
    for name, fields in calibration.items():
        for kind in ("input", "output"):
            if f"{kind}_bits" in fields:
                assert fields[f"{kind}_scale"] == float(activation_qparams(fields, kind)[0]), (name, kind)
    x = seed_input(3)
    with torch.no_grad():
        assert torch.equal(reproduce(SeedModel(), state_path, calibration_path)(x), gm(x))
        # a consumer needs the flag: taking the reduced layers for full-range ones computes something else
        ignored = {name: {**fields, "quant_reduce_range": False} for name, fields in calibration.items()}
        torch.save(ignored, tmp_path / "ignored.pth")
        assert not torch.equal(reproduce(SeedModel(), state_path, str(tmp_path / "ignored.pth"))(x), gm(x))


def test_a_consumer_reproduces_a_module_level_hugging_face_model(tmp_path) -> None:
    from .hf_models import build as build_hf
    from .hf_models import inputs, logits, observed

    name = "BertForSequenceClassification"
    gm = observed(name)
    state_path, calibration_path = str(tmp_path / "model.pth"), str(tmp_path / "calibration.pth")
    fxcompress.export_model(gm, state_path, calibration_path)
    state = torch.load(state_path, weights_only=True)
    fresh = build_hf(name)
    assert set(state) == set(fresh.state_dict())
    consumer = reproduce(fresh, state_path, calibration_path)
    x = inputs(name, labels=False)
    with torch.no_grad():
        torch.testing.assert_close(logits(consumer(**x)), logits(gm(**x)), rtol=0, atol=0)


def test_attention_keys_are_nn_multihead_attentions_own(tmp_path) -> None:
    _, gm, _ = build("attention")
    path = str(tmp_path / "model.pth")
    calibration = fxcompress.export_model(gm, path)
    state = torch.load(path, weights_only=True)
    fresh = Cross()
    assert set(state) == set(fresh.state_dict())
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "encoder.self_attn.in_proj_weight",
            "attn.in_proj_bias"} <= set(state)
    fresh.load_state_dict(state)  # strict
    masks = fxcompress.masks(gm)
    joined = torch.cat([fresh.attn.q_proj_weight, fresh.attn.k_proj_weight, fresh.attn.v_proj_weight], dim=1)
    assert not joined[~masks["attn.in_proj"]].any() and joined[masks["attn.in_proj"]].all()
    assert not fresh.encoder.self_attn.in_proj_weight[~masks["encoder.self_attn.in_proj"]].any()
    in_proj = calibration["attn.in_proj"]
    assert {"key_input_bits", "tracked_min_key_input", "value_input_scale"} <= set(in_proj)
    assert len(in_proj["weight_scale"]) == 8  # one per output row j of q, k and v together
    assert "key_input_bits" not in calibration["encoder.self_attn.in_proj"]  # self-attention: never observed


def test_a_pruned_only_model_loads_into_the_original_and_computes_the_same(tmp_path) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.6}]).eval()
    path = str(tmp_path / "model.pth")
    assert fxcompress.export_model(gm, path) == {}
    fresh = SeedModel().eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = seed_input(2)
    assert torch.equal(fresh(x), gm(x))


def test_quantizers_that_are_off_are_left_out_with_a_warning(tmp_path) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_names": ["fc1"], "quant_types": ["input", "weight"], "quant_bits": 8,
                                            "quant_start_step": 5},
                                           {"op_names": ["fc2"], "quant_types": ["input", "weight"], "quant_bits": 8}])
    train_forwards(gm, [(seed_input(2),)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibration = fxcompress.export_model(gm, str(tmp_path / "model.pth"))
    assert list(calibration) == ["fc2"]
    assert sorted(str(w.message).split(" is off")[0] for w in caught) == [
        "export_model: layer 'fc1': its input quantizer", "export_model: layer 'fc1': its weight quantizer"]
    assert "(quant_start_step 5 not reached (1 steps done)), so its fields are left out" in str(caught[0].message)
    assert calibration["fc2"]["weight_scheme"] == "per_channel_symmetric" and calibration["fc2"]["input_dtype"] == "uint"


def test_what_was_never_compressed_is_refused(tmp_path) -> None:
    with pytest.raises(TypeError, match="export_model: expected a model returned by fxcompress.compress, got a "
                                        "SeedModel that was never compressed"):
        fxcompress.export_model(SeedModel(), str(tmp_path / "model.pth"))
    assert not list(tmp_path.iterdir())


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_a_folded_batchnorm_is_named_and_a_consumer_folds_it_the_same_way(tmp_path) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(ConvBN(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                                         "quant_types": ["input", "weight"], "quant_bits": 8, "quant_start_step": 1}])
    train_forwards(gm, [(torch.randn(4, 3, 6, 6),) for _ in range(3)])
    state_path, calibration_path = str(tmp_path / "model.pth"), str(tmp_path / "calibration.pth")
    calibration = fxcompress.export_model(gm, state_path, calibration_path)
    assert calibration["conv"]["weight_folded_bn"] == "bn" and "weight_folded_bn" not in calibration["fc"]
    # the consumer folds the BatchNorm into the conv (the deployed model has none), then quantizes the folded weight
    model = ConvBN()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    with torch.no_grad():
        bn, conv = model.bn, model.conv
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.copy_(conv.weight * s.reshape(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
    model.bn = nn.Identity()
    consumer = reproduce(model, None, calibration_path)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(consumer(x), gm(x), rtol=1e-4, atol=1e-5)
