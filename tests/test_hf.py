"""Hugging Face transformers models and other models whose top-level forward fx cannot trace (issue 10):
compressed at module level. The per-model checks are in tests/hf_models.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import fxcompress
from fxcompress import ConfigError

from .hf_models import BUILDERS, FAST, SWEEP, build, check, check_trains, compress, inputs

PRUNE = [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}]


def assert_outcome(name: str) -> None:
    out = check(name)
    assert out.ok, f"{name}: " + "; ".join(f"[{k}] {v}" for k, v in out.failures.items())
    assert out.linears > 0 and out.compressed == out.linears, out


@pytest.mark.parametrize("name", FAST)
def test_hf_fast_subset(name: str) -> None:
    assert_outcome(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_hf_sweep(name: str) -> None:
    assert_outcome(name)


def test_hf_training_step_compiles() -> None:
    """dynamo captures the module-level model and its step-counting hook (aot_eager here; inductor in the sweep)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    check_trains("Qwen2ForCausalLM", None, compile="aot_eager")
    assert not counters["graph_break"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDERS))
def test_hf_training_step_compiles_with_inductor(name: str) -> None:
    torch._dynamo.reset()
    check_trains(name, None, compile="inductor")


def test_module_level_result_keeps_the_class_the_warning_and_the_plan() -> None:
    model = build("BertForSequenceClassification")
    with pytest.warns(UserWarning, match=r"could not trace the top-level forward \(fx cannot make inputs for a "
                                         r"forward whose signature is \*args/\*\*kwargs behind a decorator\).*"
                                         r"BertForSequenceClassification is compressed at module level"):
        gm = fxcompress.compress(model, PRUNE)
    assert type(gm) is type(model) and gm is not model and gm.config is not None
    rows = fxcompress.report(gm)
    assert len(rows) == 14 and {r.site for r in rows} == {"module level"}
    assert rows[0].name == "bert.encoder.layer.0.attention.self.query" and rows[0].pruned == 512
    assert not any(isinstance(m, fxcompress.layers.CompressedLayer) for m in model.modules())  # the input untouched
    # recompressing adds quantization and keeps the masks (SPEC §2.9), without a second notice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = fxcompress.compress(gm, [{"op_names": ["classifier"], "quant_types": ["weight", "input"],
                                         "quant_bits": 8}])
    assert torch.equal(both.classifier.weight_mask, gm.classifier.weight_mask)
    assert hasattr(both.classifier, "weight_quantizer") and not hasattr(gm.classifier, "weight_quantizer")
    both.train()
    both(**inputs("BertForSequenceClassification"))
    assert fxcompress.get_step(both) == 1


def test_module_level_state_dict_round_trip() -> None:
    gm = compress(build("LlamaForCausalLM"), [{"op_types": ["Linear"], "sparsity_per_layer": 0.5,
                                               "quant_types": ["weight", "input"], "quant_bits": 8}])
    gm.train()
    gm(**inputs("LlamaForCausalLM"))
    state = gm.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight_mask" in state and "fxcompress_step.step" in state
    fresh = compress(build("LlamaForCausalLM"), [{"op_types": ["Linear"], "sparsity_per_layer": 0.5,
                                                  "quant_types": ["weight", "input"], "quant_bits": 8}])
    fresh.load_state_dict(state)
    gm.eval(), fresh.eval()
    assert torch.equal(gm(**inputs("LlamaForCausalLM")).logits, fresh(**inputs("LlamaForCausalLM")).logits)


class Untraceable(nn.Module):
    """A top-level branch on data, and a parent that reads its child's weight values itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.drop(self.fc(x))
        return self.head(x) + self.head.weight.sum() * 0.0 if self.head.weight.dtype == torch.float32 else x


def test_a_parent_reading_a_weight_blocks_that_layer_at_module_level() -> None:
    with pytest.warns(UserWarning, match="compressed at module level"), \
         pytest.raises(ConfigError, match=r"layer 'head' is selected but cannot be compressed: Untraceable.forward "
                                          r"reads self.head.weight directly"):
        fxcompress.compress(Untraceable(), PRUNE)
    with pytest.warns(UserWarning, match="compressed at module level"):
        gm = fxcompress.compress(Untraceable(), PRUNE, strict=False)
    rows = {r.name: (r.site, r.pruned) for r in fxcompress.report(gm)}
    assert rows == {"fc": ("module level", 8), "head": ("not compressed (see plan.blocked)", None)}
    # both modes follow the original's: dropout acts in train mode only
    x = torch.ones(3, 4)
    gm.eval()
    assert torch.equal(gm(x), gm(x))
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    assert not torch.equal(a, gm(x))


def test_gpt2_conv1d_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"config_list\[0\]\['op_types'\]: 'Conv1D' cannot be compressed: Hugging "
                                          r"Face's Conv1D .* is a Linear whose weight is stored transposed"):
        fxcompress.parse_config([{"op_types": ["Conv1D"], "sparsity_per_layer": 0.5}])
    import transformers
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ConfigError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D, which fxcompress cannot "
                                          r"compress .*stored transposed"):
        compress(gpt2, [{"op_names": ["transformer.h.0.attn.c_attn"], "sparsity_per_layer": 0.5}])
    gm = compress(gpt2, PRUNE)  # 'Linear' selects the nn.Linear lm_head, tied to the token embedding
    assert [r.name for r in fxcompress.report(gm)] == ["lm_head"]
    assert torch.equal(gm.transformer.wte.weight, gpt2.transformer.wte.weight)  # the embedding reads it as stored


def test_module_level_model_exports() -> None:
    """torch.export takes the module-level model (non-strict, as transformers models need) in eval mode."""
    gm = compress(build("BertForSequenceClassification"), [
        {"op_types": ["Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"], "quant_bits": 8}])
    gm.train()
    gm(**inputs("BertForSequenceClassification"))  # observe ranges
    gm.eval()
    kwargs = inputs("BertForSequenceClassification", labels=False)
    exported = torch.export.export(gm, (), kwargs, strict=False)
    assert torch.allclose(exported.module()(**kwargs).logits, gm(**kwargs).logits, atol=1e-6)
