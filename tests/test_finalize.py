"""fxcompress.finalize: the inference model computes exactly what gm.eval() computes, with nothing left to train."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.annotations import NodeRole, get_role
from fxcompress.frozen import FrozenQuantizer, PassThrough
from fxcompress.layers import CompressedLayer, CompressionRecord
from fxcompress.passes.freeze import freeze_graph
from fxcompress.quant import ActivationQuantizer, StepCounter, WeightQuantizer, fake_quant, qparams

from .deploy_models import BUILDERS, build, train_forwards
from .fixtures import SeedModel, masked_reference, seed_input

TRAINING_MODULES = (ActivationQuantizer, WeightQuantizer, StepCounter, CompressionRecord)


def finalize_quietly(gm: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxcompress.finalize(gm)


def snapshot(gm: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    state = {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    return state, getattr(gm, "code", "")


def assert_unchanged(gm: nn.Module, before: tuple[dict[str, torch.Tensor], str]) -> None:
    state, code = snapshot(gm)
    assert code == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def quantizers_on(gm: nn.Module) -> int:
    return sum(1 for m in gm.modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer)))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_equals_the_eval_model_exactly_with_nothing_left_to_train(name: str) -> None:
    _, gm, x = build(name)
    expected = gm(*x)
    before = snapshot(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every quantizer is on: nothing to warn about
        final = fxcompress.finalize(gm)
    assert_unchanged(gm, before)
    assert not final.training and not any(m.training for m in final.modules())
    assert torch.equal(final(*x), expected)
    assert not any(isinstance(m, TRAINING_MODULES) for m in final.modules())
    assert not any(k.endswith("_mask") or k.startswith("fxcompress_") for k in final.state_dict())
    frozen = [n for n, m in final.named_modules() if isinstance(m, FrozenQuantizer)]
    passing = [n for n, m in final.named_modules() if isinstance(m, PassThrough)]
    assert len(frozen) + len(passing) == quantizers_on(gm) and len(frozen) > 0
    for layer, mask in fxcompress.masks(gm).items():
        weight = final.get_submodule(layer).weight
        assert int((weight[~mask] != 0).sum()) == 0 and bool((weight[mask] != 0).all())
    if isinstance(final, torch.fx.GraphModule):
        final.graph.lint()
        calls = [n for n in final.graph.nodes if n.op == "call_module" and n.target in frozen]
        assert all(get_role(n) == NodeRole(*n.target.rpartition(".")[::2]) and len(n.args) == 1 for n in calls)
        assert {n.target for n in calls} == {f for f in frozen if not isinstance(final.get_submodule(f.rpartition(".")[0]),
                                                                             CompressedLayer)}
        assert not any(isinstance(get_role(n), NodeRole) and get_role(n).kind in ("step", "weight_mask", "bias_mask")
                       for n in final.graph.nodes)


@pytest.mark.parametrize("name", ["seed", "leaf", "attention"])  # no BatchNorm: each quantizer sees the masked weight
def test_frozen_weight_qparams_are_what_the_weight_quantizer_computes(name: str) -> None:
    _, gm, _ = build(name)
    final = finalize_quietly(gm)
    for path, module in gm.named_modules():
        if isinstance(module, WeightQuantizer):
            layer = path.rpartition(".")[0]
            compressed = gm.get_submodule(layer)
            weight = compressed.weight.detach()
            if hasattr(compressed, "weight_mask"):
                weight = weight * compressed.weight_mask
            scale, zero_point = module.current_qparams(weight)
            frozen = final.get_submodule(path)
            assert torch.equal(frozen.scale, scale) and torch.equal(frozen.zero_point, zero_point.int())
            assert frozen.per_channel == module.per_channel and (frozen.qmin, frozen.qmax) == (module.qmin, module.qmax)


@pytest.mark.parametrize("name", ["seed", "nested", "leaf"])
def test_scripts_with_the_same_outputs(name: str) -> None:
    _, gm, x = build(name)
    final = finalize_quietly(gm)
    assert torch.equal(torch.jit.script(final)(*x), gm(*x))


@pytest.mark.parametrize("name", ["seed", "attention"])
def test_exports_and_compiles(name: str) -> None:
    _, gm, x = build(name)
    final = finalize_quietly(gm)
    program = torch.export.export(final, x)
    assert torch.equal(program.module()(*x), gm(*x))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(final, fullgraph=True)(*x), gm(*x), rtol=0, atol=1e-6)


def test_a_quantizer_that_is_off_is_dropped_with_a_warning_naming_the_layer() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_names": ["fc1"], "quant_types": ["input", "weight"], "quant_bits": 8,
                                            "quant_start_step": 10},
                                           {"op_names": ["fc2"], "quant_types": ["input", "weight"], "quant_bits": 8}])
    x = seed_input(3)
    train_forwards(gm, [(seed_input(4),)])
    gm.fc2.input_quantizer.initialized.zero_()  # as if every batch had held an inf
    with pytest.warns(UserWarning) as caught:
        final = fxcompress.finalize(gm)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert "layer 'fc1': its input quantizer is off in eval mode (quant_start_step 10 not reached (1 steps done))" \
        in messages[0]
    assert "layer 'fc1': its weight quantizer is off" in messages[1]
    assert "layer 'fc2': its input quantizer is off in eval mode (it has not observed a batch" in messages[2]
    assert torch.equal(final(x), gm(x))
    assert [n for n, m in final.named_modules() if isinstance(m, FrozenQuantizer)] == ["fc2.weight_quantizer"]
    assert not hasattr(final.fc1, "input_quantizer") and not hasattr(final.fc1, "weight_quantizer")


def test_a_quantizer_off_inside_a_leaf_becomes_a_pass_through() -> None:
    _, gm, x = build("leaf")
    gm.get_submodule("block.fc").input_quantizer.initialized.zero_()
    with pytest.warns(UserWarning, match="layer 'block.fc': its input quantizer is off"):
        final = fxcompress.finalize(gm)
    assert isinstance(final.block.fc.input_quantizer, PassThrough)
    assert torch.equal(final(*x), gm(*x))


def test_narrow_int_and_low_bit_widths_and_non_finite_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = [{"op_names": ["0"], "quant_types": ["input", "weight", "output"], "quant_bits": {"input": 8, "weight": 4,
            "output": 6}, "quant_dtype": "int", "quant_scheme": {"input": "per_tensor_symmetric",
            "weight": "per_channel_affine", "output": "per_tensor_affine"}},
           {"op_names": ["2"], "quant_types": ["input", "weight"], "quant_bits": 3,
            "quant_scheme": "per_tensor_symmetric", "quant_dtype": "uint"}]
    gm = train_forwards(fxcompress.compress(model, cfg), [(torch.randn(8, 6),) for _ in range(2)])
    final = fxcompress.finalize(gm)
    x = 3 * torch.randn(64, 6)
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), float("-inf"), float("nan")
    torch.testing.assert_close(final(x), gm(x), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(final(x[3:]), gm(x[3:]))


def test_pruned_only_model_is_the_hand_masked_model() -> None:
    torch.manual_seed(0)
    model = SeedModel()
    gm = fxcompress.compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.7}])
    final = fxcompress.finalize(gm)
    reference = masked_reference(model, fxcompress.masks(gm)).eval()
    x = seed_input(3)
    assert torch.equal(final(x), gm.eval()(x))
    assert all(torch.equal(final.state_dict()[k], v) for k, v in reference.state_dict().items())
    assert "fxcompress_step" not in dict(final.named_modules())


def test_pickled_model_without_node_metadata() -> None:
    _, gm, x = build("seed")
    restored = pickle.loads(pickle.dumps(gm))
    final = finalize_quietly(restored)
    assert torch.equal(final(*x), gm(*x))
    assert "weight_mask" not in final.code and "fxcompress_step" not in final.code


def test_a_weight_tied_to_a_module_the_config_does_not_prune_is_untied() -> None:
    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    gm = fxcompress.compress(TiedHead(), [{"op_names": ["head"], "sparsity_per_layer": 0.5}]).eval()
    ids = torch.tensor([[1, 2, 3]])
    final = fxcompress.finalize(gm)
    assert torch.equal(final(ids), gm(ids))
    assert final.head.weight is not final.embed.weight
    assert torch.equal(final.embed.weight, gm.embed.weight)


def test_what_was_never_compressed_is_refused() -> None:
    with pytest.raises(TypeError, match=r"finalize: expected a model returned by fxcompress.compress, got a "
                                        r"SeedModel that was never compressed"):
        fxcompress.finalize(SeedModel())
    final = finalize_quietly(build("seed")[1])
    with pytest.raises(TypeError, match="got a GraphModule that was never compressed"):
        fxcompress.finalize(final)


def test_module_level_layers_keep_their_forward() -> None:
    _, gm, x = build("leaf")
    final = finalize_quietly(gm)
    fc = final.get_submodule("block.fc")
    assert isinstance(fc, CompressedLayer) and "step" not in fc._buffers and not hasattr(fc, "weight_mask")


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "Qwen2ForCausalLM"])
def test_module_level_hugging_face_models(name: str) -> None:
    from .hf_models import TRAIN, compress, inputs, logits
    from .hf_models import build as build_hf

    gm = compress(build_hf(name), TRAIN).train()
    with torch.no_grad():
        for _ in range(2):
            gm(**inputs(name))
    gm.eval()
    before = snapshot(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every quantizer is on: nothing to warn about
        final = fxcompress.finalize(gm)
    assert_unchanged(gm, before)
    assert type(final) is type(gm) and not final._forward_pre_hooks
    x = inputs(name, labels=False)
    assert torch.equal(logits(final(**x)), logits(gm(**x)))
    plain = {**x, "use_cache": False} if name.endswith("CausalLM") else x  # a KV cache is no pytree torch.export knows
    assert torch.equal(logits(torch.export.export(final, (), kwargs=plain).module()(**plain)), logits(gm(**x)))
    assert not any(isinstance(m, TRAINING_MODULES) for m in final.modules())
    assert sum(isinstance(m, FrozenQuantizer) for m in final.modules()) == quantizers_on(gm)
    if name.endswith("CausalLM"):  # Qwen2 ties its LM head to the embedding, which the config does not prune
        assert final.lm_head.weight is not final.model.embed_tokens.weight
        assert torch.equal(final.model.embed_tokens.weight, gm.model.embed_tokens.weight)
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(final.generate(**x, **kwargs), gm.generate(**x, **kwargs))


@pytest.mark.parametrize(("bits", "dtype", "symmetric"), [(8, "uint", False), (8, "int", True), (8, "uint", True),
                                                          (4, "int", False), (16, "uint", False), (2, "int", True)])
def test_pytorchs_kernels_are_bit_identical_to_fxcompress_fake_quant(bits: int, dtype: str, symmetric: bool) -> None:
    """What FrozenQuantizer relies on: per tensor for every value, inf and NaN and rounding ties
    included; per channel for finite weights."""
    qmin, qmax = (0, 2**bits - 1) if dtype == "uint" else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    gen = torch.Generator().manual_seed(bits)
    scale, zero_point = qparams(torch.tensor(-1.3), torch.tensor(2.9), qmin, qmax, symmetric)
    levels = torch.arange(qmin - 3, qmax + 4).float()
    x = torch.cat([4 * torch.randn(5000, generator=gen), (levels - zero_point) * scale,
                   (levels - zero_point + 0.5) * scale,
                   torch.tensor([float("inf"), float("-inf"), float("nan"), 3e38, -3e38, 0.0, -0.0])])
    frozen = FrozenQuantizer(scale, zero_point, qmin, qmax, False, bits, dtype)
    ours = fake_quant(x, scale, zero_point, torch.tensor(True), qmin, qmax, False)
    torch.testing.assert_close(frozen(x), ours, rtol=0, atol=0, equal_nan=True)
    weight = torch.randn(16, 3, 3, 3, generator=gen) * torch.rand(16, 1, 1, 1, generator=gen)
    rows = weight.reshape(16, -1)
    scale, zero_point = qparams(rows.amin(1), rows.amax(1), qmin, qmax, symmetric)
    frozen = FrozenQuantizer(scale, zero_point, qmin, qmax, True, bits, dtype)
    assert torch.equal(frozen(weight), fake_quant(weight, scale, zero_point, torch.tensor(True), qmin, qmax, True))


def test_the_graph_pass_is_idempotent() -> None:
    _, gm, x = build("seed")
    final = finalize_quietly(gm)
    code = final.code
    freeze_graph(final, {})
    assert final.code == code and torch.equal(final(*x), gm(*x))
