"""fxcompress.export_onnx: QuantizeLinear/DequantizeLinear pairs that onnxruntime runs as the fake-quant model.

Two tolerances, both measured (README, Deploy). With its graph optimizations off, onnxruntime runs
the QDQ graph as written, in float: it gives gm.eval()'s outputs to float rounding (1e-5 here; a
value exactly at a rounding tie may land one level apart, as QuantizeLinear divides by the scale
where PyTorch multiplies by its reciprocal). With its default optimizations it fuses each
DequantizeLinear -> op -> QuantizeLinear into an integer kernel (QLinearConv, QLinearMatMul): its
requantization rounds differently, by about one level of the output quantizer, and on x86 CPUs
without VNNI (this machine: AVX2) uint8 activations times int8 weights saturate int16 pair sums
(VPMADDUBSW): with fxcompress's default int8 weights the outputs drift by up to ~10% of their
spread on these small random models (cosine > 0.996). uint8 per-channel affine weights
(``quant_dtype: {'weight': 'uint'}``, ``quant_scheme: {'weight': 'per_channel_affine'}``) avoid
the saturation: the integer kernels then stay within two levels of the last output quantizer.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.frozen import FrozenQuantizer

from . import deploy_models
from .deploy_models import ALL_TYPES, BUILDERS, PRUNE_QUANT, build, train_forwards
from .fixtures import SeedModel, seed_input

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def export(gm: nn.Module, x: tuple, tmp_path, **kwargs) -> tuple[onnx.ModelProto, str]:
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        fxcompress.export_onnx(gm, path, x, **kwargs)
    return onnx.load(path), path


def run(path: str, x: tuple, optimized: bool) -> torch.Tensor:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), x, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def ops(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and the outputs of Constant nodes, by name."""
    out = {i.name: i for i in model.graph.initializer}
    for node in ops(model, "Constant"):
        out[node.output[0]] = onnx.helper.get_attribute_value(node.attribute[0])
    for node in ops(model, "Identity"):  # the exporter shares equal constants through Identity nodes
        if node.input[0] in out:
            out[node.output[0]] = out[node.input[0]]
    return out


def frozen(gm: nn.Module) -> dict[str, FrozenQuantizer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {n: m for n, m in fxcompress.finalize(gm).named_modules() if isinstance(m, FrozenQuantizer)}


def frozen_calls(gm: nn.Module, x: tuple) -> set[str]:
    """The frozen quantizers one forward of the finalized model calls on ``x`` (a CompressedAttention
    also quantizes its out-projection's weight once more in dead code, which the exporter drops)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = fxcompress.finalize(gm)
    calls: set[str] = set()
    for name, module in final.named_modules():
        if isinstance(module, FrozenQuantizer):
            module.register_forward_hook(lambda *_, name=name: calls.add(name))
    with torch.no_grad():
        final(*x)
    return calls


@pytest.mark.parametrize("name", list(BUILDERS))
def test_one_qdq_pair_per_quantizer_per_channel_weights_on_axis_0(name: str, tmp_path) -> None:
    _, gm, x = build(name)
    model, _ = export(gm, x, tmp_path)
    calls = frozen_calls(gm, x)  # the leaf model's data-dependent block runs one branch of two
    assert model.opset_import[0].version == 17
    assert len(ops(model, "QuantizeLinear")) == len(ops(model, "DequantizeLinear")) == len(calls)
    initializers = constants(model)
    weight_dqs = [n for n in ops(model, "DequantizeLinear") if len(initializers[n.input[1]].dims) == 1]
    weights = [n for n in calls if n.endswith(".weight_quantizer")]
    assert len(weight_dqs) == len(weights) and all(frozen(gm)[n].per_channel for n in weights)
    for node in weight_dqs:
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {"axis": 0}
    zero_point_types = {initializers[n.input[2]].data_type for n in ops(model, "QuantizeLinear")}
    assert zero_point_types == {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_onnxruntime_runs_the_fake_quant_model(name: str, tmp_path) -> None:
    _, gm, x = build(name)
    before = {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    code = gm.code
    _, path = export(gm, x, tmp_path)
    assert gm.code == code and all(torch.equal(v, before[k]) for k, v in gm.state_dict().items() if k in before)
    with torch.no_grad():
        expected = gm(*x)
    torch.testing.assert_close(run(path, x, optimized=False), expected, rtol=1e-5, atol=1e-5)
    # the integer kernels, int8 weights: rounding plus int16 saturation (module docstring), measured
    fused = run(path, x, optimized=True)
    cosine = torch.nn.functional.cosine_similarity(fused.flatten(), expected.flatten(), dim=0)
    spread = float(expected.max() - expected.min())
    assert cosine > 0.995 and float((fused - expected).abs().max()) < 0.12 * spread


def assert_integer_kernels_within_two_levels(name: str, keys: dict, tmp_path, monkeypatch) -> torch.nn.Module:  # noqa: ANN001
    """Build deploy model ``name`` with ``keys`` added to its config, export it, and check onnxruntime:
    exact without graph optimizations, within two output levels with its integer kernels. Returns the
    last output quantizer (frozen)."""
    monkeypatch.setattr(deploy_models, "PRUNE_QUANT", [{**PRUNE_QUANT[0], **keys}])
    monkeypatch.setattr(deploy_models, "ALL_TYPES", {**ALL_TYPES, **keys})
    _, gm, x = build(name)
    _, path = export(gm, x, tmp_path)
    with torch.no_grad():
        expected = gm(*x)
    torch.testing.assert_close(run(path, x, optimized=False), expected, rtol=1e-5, atol=1e-5)
    last = [m for n, m in frozen(gm).items() if n.endswith("output_quantizer")][-1]
    assert float((run(path, x, optimized=True) - expected).abs().max()) <= 2 * float(last.scale) + 1e-6
    return last


@pytest.mark.parametrize("name", list(BUILDERS))
def test_uint8_affine_weights_keep_the_integer_kernels_within_a_level_or_two(name: str, tmp_path,
                                                                              monkeypatch) -> None:
    weights = {"quant_dtype": {"weight": "uint"}, "quant_scheme": {"weight": "per_channel_affine"}}
    assert_integer_kernels_within_two_levels(name, weights, tmp_path, monkeypatch)


def test_narrow_int_activations_are_clipped_to_their_levels(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    config = [{"op_types": ["Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 8,
               "quant_dtype": "int", "quant_scheme": {"input": "per_tensor_symmetric", "output": "per_tensor_affine",
                                                      "weight": "per_channel_affine"}}]
    gm = train_forwards(fxcompress.compress(model, config), [(torch.randn(16, 6),) for _ in range(3)])
    x = (5 * torch.randn(32, 6),)  # beyond the tracked range: the narrow level -127 must hold, not int8's -128
    onnx_model, path = export(gm, x, tmp_path)
    assert len(ops(onnx_model, "Clip")) == 4  # two inputs, two outputs; weights never reach -128
    torch.testing.assert_close(run(path, x, optimized=False), gm(*x), rtol=1e-5, atol=1e-5)


def test_a_pruned_only_model_exports_without_qdq(tmp_path) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}]).eval()
    x = (seed_input(2),)
    model, path = export(gm, x, tmp_path, opset=13)
    assert model.opset_import[0].version == 13 and not ops(model, "QuantizeLinear")
    weight = next(i for i in model.graph.initializer if i.name == "conv1.weight")
    assert int((onnx.numpy_helper.to_array(weight) == 0).sum()) == 144  # floor(0.5 * 288)
    torch.testing.assert_close(run(path, x, optimized=True), gm(*x), rtol=1e-4, atol=1e-5)


def test_a_module_level_hugging_face_model_exports_with_keyword_inputs(tmp_path) -> None:
    from .hf_models import inputs, logits, observed

    name = "BertForSequenceClassification"
    gm = observed(name)
    x = inputs(name, labels=False)
    model, path = export(gm, (x["input_ids"], {"attention_mask": x["attention_mask"]}), tmp_path)
    assert len(ops(model, "QuantizeLinear")) == len(frozen(gm)) == 42  # 14 Linear layers x 3
    out = run(path, (x["input_ids"], x["attention_mask"]), optimized=False)
    torch.testing.assert_close(out, logits(gm(**x)), rtol=1e-4, atol=1e-5)


def test_bit_widths_other_than_8_name_the_layer(tmp_path) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_names": ["fc1"], "quant_types": ["input", "weight"],
                                            "quant_bits": {"input": 8, "weight": 4}}])
    train_forwards(gm, [(seed_input(2),)])
    with pytest.raises(ValueError, match=r"export_onnx: layer 'fc1': its weight quantizer has 4 bits, and ONNX "
                                         r"QuantizeLinear/DequantizeLinear hold 8-bit integers only"):
        fxcompress.export_onnx(gm, str(tmp_path / "m.onnx"), (seed_input(1),))
    assert not (tmp_path / "m.onnx").exists()


def test_bad_input(tmp_path) -> None:
    with pytest.raises(TypeError, match="export_onnx: expected a model returned by fxcompress.compress"):
        fxcompress.export_onnx(SeedModel(), str(tmp_path / "m.onnx"), (seed_input(1),))
    _, gm, x = build("seed")
    with pytest.raises(ValueError, match="export_onnx: opset 12 is too old"):
        fxcompress.export_onnx(gm, str(tmp_path / "m.onnx"), x, opset=12)
    assert not np.any([p.exists() for p in tmp_path.iterdir()])
