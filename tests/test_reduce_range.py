"""quant_reduce_range: activations use the levels of one bit fewer (0..127 for uint8), weights keep theirs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.quant import ActivationQuantizer, WeightQuantizer
from fxcompress.settings import QuantSetting

from .deploy_models import train_forwards
from .test_export_onnx import assert_integer_kernels_within_two_levels

QAT = {"op_types": ["Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 8}


def test_activations_get_the_reduced_levels_and_weights_keep_theirs() -> None:
    (sub,) = fxcompress.parse_config([{**QAT, "quant_reduce_range": True,
                                       "quant_dtype": {"output": "int"}}])
    assert (sub.quant.input.qmin, sub.quant.input.qmax) == (0, 127)
    assert (sub.quant.output.qmin, sub.quant.output.qmax) == (-63, 63)
    assert (sub.quant.weight.qmin, sub.quant.weight.qmax) == (-127, 127) and not sub.quant.weight.reduce_range
    assert sub.quant.input.bits == 8  # still stored in 8 bits
    (default,) = fxcompress.parse_config([QAT])
    assert (default.quant.input.qmin, default.quant.input.qmax) == (0, 255)


def test_default_repr_is_unchanged_so_old_checkpoint_fingerprints_still_match() -> None:
    assert repr(QuantSetting(8, "per_tensor_affine", "uint")) == (
        "QuantSetting(bits=8, scheme='per_tensor_affine', dtype='uint')")
    assert repr(QuantSetting(8, "per_tensor_affine", "uint", True)).endswith(", reduce_range=True)")


@pytest.mark.parametrize(("entry", "match"), [
    ({**QAT, "quant_reduce_range": 1}, r"config_list\[0\]\['quant_reduce_range'\]: expected True or False, got 1"),
    ({"op_types": ["Linear"], "quant_reduce_range": True},
     r"config_list\[0\]\['quant_reduce_range'\]: only meaningful with 'quant_types'"),
    ({**QAT, "quant_bits": 2, "quant_dtype": "int", "quant_reduce_range": True},
     r"config_list\[0\]\['quant_reduce_range'\]: a 2-bit 'int' input has no levels left"),
    ({**QAT, "quant_reduce_rang": True}, r"unknown key 'quant_reduce_rang'; did you mean 'quant_reduce_range'\?"),
])
def test_bad_values_are_config_errors(entry: dict, match: str) -> None:
    with pytest.raises(fxcompress.ConfigError, match=match):
        fxcompress.parse_config([entry])


def test_the_trained_model_quantizes_activations_to_127_levels() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                             [{**QAT, "quant_reduce_range": True}])
    train_forwards(gm, [(torch.randn(16, 6),) for _ in range(3)])
    activation = gm.get_submodule("0.input_quantizer")
    assert isinstance(activation, ActivationQuantizer) and (activation.qmin, activation.qmax) == (0, 127)
    assert (gm.get_submodule("0.weight_quantizer").qmin, gm.get_submodule("0.weight_quantizer").qmax) == (-127, 127)
    assert isinstance(gm.get_submodule("0.weight_quantizer"), WeightQuantizer)
    x = torch.randn(64, 6) * 3  # beyond the tracked range: clamped at level 127
    scale = (activation.tracked_max - activation.tracked_min.clamp(max=0)) / 127
    with torch.no_grad():
        levels = torch.round(activation(x, torch.tensor(10)) / scale) + torch.round(-activation.tracked_min / scale)
    assert int(levels.max()) == 127 and int(levels.min()) == 0
    state = gm.state_dict()
    full = fxcompress.compress(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), [QAT])
    with pytest.raises(fxcompress.ConfigError, match="reduce_range=True"):
        full.load_state_dict(state)  # a checkpoint of another range is refused, naming the difference


@pytest.mark.parametrize("name", ["seed", "nested"])
def test_onnxruntime_integer_kernels_stay_within_a_level_or_two(name: str, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    # int8 weights (the default) and 7-bit activations: no int16 saturation, unlike the full range
    last = assert_integer_kernels_within_two_levels(name, {"quant_reduce_range": True}, tmp_path, monkeypatch)
    assert last.qmax == 127
