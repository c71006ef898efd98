"""Hugging Face transformers models (small configs, random weights, nothing downloaded) and the
checks issue 10 asks of each. Their top-level forwards cannot be traced by torch.fx, so
``compress`` compresses them at module level (README, "Models fx cannot trace").

Per model, with ``input_ids``/``attention_mask``/``labels`` (or ``pixel_values``) passed as keywords:

(a) ``exact``: 50% level pruning of every ``nn.Linear``; each layer the forward calls (a forward
    hook on the original) is compressed with exactly ``floor(n/2)`` zeros in its mask, and the
    outputs equal a hand-masked copy of the original in eval and in train mode (same seed);
(b) ``modes``: compressed with all-ones masks from train and from eval mode, the model computes
    what the original does across eval/train/eval switches (SPEC §2.8);
(c) ``qat_off``: with ``quant_start_step`` not reached, fake quantization changes nothing;
(d) ``trains``: two SGD steps of a pruned + quantized model (eagerly, and under torch.compile in
    the fast test): finite losses, two steps counted, no gradient on a masked weight (except
    through an embedding tied to an LM head, which reads the weight as stored);
(e) ``generate`` (causal LMs): three greedy tokens equal the hand-masked copy's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as T
from torch import nn

import fxcompress

VOCAB, SEQ, BATCH = 100, 8, 2
PRUNE = [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}]
ONES = PRUNE
QAT_OFF = [{"op_types": ["Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 8,
            "quant_start_step": 100}]
TRAIN = [{"op_types": ["Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
          "quant_bits": 8, "quant_start_step": 1}]
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=VOCAB, attention_dropout=0.1)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "BertForSequenceClassification": lambda: T.BertForSequenceClassification(
        T.BertConfig(**_SMALL, max_position_embeddings=64)),
    "DistilBertForSequenceClassification": lambda: T.DistilBertForSequenceClassification(
        T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64)),
    "RobertaForSequenceClassification": lambda: T.RobertaForSequenceClassification(
        T.RobertaConfig(**_SMALL, max_position_embeddings=66)),
    "LlamaForCausalLM": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)),
    "Qwen2ForCausalLM": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER, tie_word_embeddings=True)),
    "MistralForCausalLM": lambda: T.MistralForCausalLM(T.MistralConfig(**_DECODER)),
    "T5ForConditionalGeneration": lambda: T.T5ForConditionalGeneration(
        T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0)),
    "ViTForImageClassification": lambda: T.ViTForImageClassification(
        T.ViTConfig(**{**_SMALL, "vocab_size": None}, image_size=32, patch_size=8, num_labels=10)),
}
FAST = ["BertForSequenceClassification", "Qwen2ForCausalLM"]
SWEEP = [name for name in BUILDERS if name not in FAST]
CAUSAL = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]()


def inputs(name: str, labels: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name.startswith("ViT"):
        out = {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g)}
        return {**out, "labels": torch.tensor([1, 7])} if labels else out
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # padding in the second row: the attention mask matters
    out = {"input_ids": ids, "attention_mask": mask}
    if not labels:
        return out
    if "SequenceClassification" in name:
        return {**out, "labels": torch.tensor([0, 1])}
    return {**out, "labels": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)}


def compress(model: nn.Module, config: list[dict[str, Any]], **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "compress: torch.fx could not trace")  # the module-level notice
        return fxcompress.compress(model, config, **kwargs)


def observed(name: str, config: list[dict[str, Any]] = TRAIN) -> nn.Module:
    """``name`` compressed with ``config`` after two training forwards (ranges observed), in eval mode."""
    gm = compress(build(name), config).train()
    with torch.no_grad():
        for _ in range(2):
            gm(**inputs(name))
    return gm.eval()


def called_linears(model: nn.Module, name: str) -> set[str]:
    """The nn.Linear modules a train-mode forward calls, seen by forward hooks on the original."""
    seen: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=n: seen.add(n))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.train()
    model(**inputs(name))
    for h in hooks:
        h.remove()
    return seen


def hand_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The original with each mask multiplied into its own copy of the layer's weight (a weight tied
    to an unpruned embedding is untied first: the embedding reads it as stored, SPEC §2.6), and a
    bias entry zeroed where its whole row is masked, row by row."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            layer = ref.get_submodule(name)
            layer.weight = nn.Parameter(layer.weight.detach().clone() * mask)
            if layer.bias is not None:
                bias = layer.bias.detach().clone()
                for row in range(mask.shape[0]):
                    if mask[row].sum() == 0:
                        bias[row] = 0.0
                layer.bias = nn.Parameter(bias)
    return ref


def logits(out: Any) -> torch.Tensor:
    return out.logits


@dataclass
class Outcome:
    name: str
    linears: int = 0
    compressed: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {a.shape} vs {b.shape}"
        raise AssertionError(f"{what}: max |diff| {diff}")


def check_exact(name: str, out: Outcome) -> None:
    model = build(name)
    used = called_linears(model, name)
    gm = compress(model, PRUNE)
    assert type(gm) is type(model), f"result is a {type(gm).__name__}"
    masks = fxcompress.masks(gm)
    out.linears, out.compressed = len(used), len(set(masks) & used)
    assert used <= set(masks), f"not compressed: {sorted(used - set(masks))}"
    for layer, mask in masks.items():
        assert int((mask == 0).sum()) == mask.numel() // 2, f"{layer}: {int((mask == 0).sum())} of {mask.numel()}"
    ref = hand_masked(model, masks)
    for mode in (False, True):
        gm.train(mode), ref.train(mode)
        torch.manual_seed(3)
        a = gm(**inputs(name))
        torch.manual_seed(3)
        b = ref(**inputs(name))
        assert type(a) is type(b)
        _same(logits(a), logits(b), f"{'train' if mode else 'eval'} logits")
        _same(a.loss, b.loss, f"{'train' if mode else 'eval'} loss")


def check_modes(name: str, out: Outcome) -> None:
    for start in (True, False):
        model = build(name).train(start)
        gm = compress(model, ONES, start_dense=True)
        for mode in (False, True, False):
            gm.train(mode), model.train(mode)
            torch.manual_seed(5)
            a = logits(gm(**inputs(name)))
            torch.manual_seed(5)
            b = logits(model(**inputs(name)))
            _same(a, b, f"compressed in {'train' if start else 'eval'}, run in {'train' if mode else 'eval'}")


def check_qat_off(name: str, out: Outcome) -> None:
    model = build(name).eval()
    gm = compress(model, QAT_OFF)
    gm.train()
    gm(**inputs(name))  # observes
    gm.eval()
    _same(logits(gm(**inputs(name))), logits(model(**inputs(name))), "quantization before its start step")


def check_trains(name: str, out: Outcome | None, compile: str | None = None) -> None:
    """Two SGD steps; ``compile``: a torch.compile backend to run the training step under."""
    model = build(name)
    gm = compress(model, TRAIN).train()
    run = torch.compile(gm, backend=compile) if compile else gm
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = run(**inputs(name)).loss
        assert torch.isfinite(loss), loss
        loss.backward()
        shared = {id(m.weight) for m in gm.modules() if isinstance(m, nn.Embedding)}
        for layer, mask in fxcompress.masks(gm).items():
            weight = gm.get_submodule(layer).weight
            if id(weight) in shared:  # a tied LM head: the embedding reads (and trains) it as stored, SPEC §2.6
                continue
            grad = weight.grad
            assert grad is None or not grad[mask == 0].any(), f"{layer}: gradient on a masked weight"
        opt.step()
    assert fxcompress.get_step(gm) == 2


def check_generate(name: str, out: Outcome) -> None:
    model = build(name).eval()
    gm = compress(model, PRUNE).eval()
    ref = hand_masked(model, fxcompress.masks(gm)).eval()
    ids = inputs(name, labels=False)
    a = gm.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    b = ref.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert a.shape == (BATCH, SEQ + 3) and torch.equal(a, b), (a, b)


def check(name: str) -> Outcome:
    out = Outcome(name)
    checks = [check_exact, check_modes, check_qat_off, check_trains]
    checks += [check_generate] if name in CAUSAL else []
    for fn in checks:
        try:
            fn(name, out)
        except Exception as err:  # every check runs; the failures are reported together
            out.failures[fn.__name__.removeprefix("check_")] = f"{type(err).__name__}: {err}"[:400]
    return out


def markdown(outcomes: list[Outcome]) -> str:
    """The README's table: outcome ``module level`` when every check passed, else the failed checks."""
    lines = ["| model | Linear layers used | compressed | outcome |", "|---|---|---|---|"]
    for o in outcomes:
        verdict = "module level" if o.ok else "; ".join(f"{k}: {v}" for k, v in o.failures.items())
        lines.append(f"| {o.name} | {o.linears} | {o.compressed} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tests.hf_models: the README's table
    print(markdown([check(name) for name in BUILDERS]))
