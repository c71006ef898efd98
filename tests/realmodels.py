"""The torchvision classification models, and the check each one goes through.

``python -m tests.realmodels`` runs the whole sweep and prints the README's table.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision

import fxcompress
from fxcompress.settings import ratio_floor

from .fixtures import masked_reference

MAX_PARAMS = 150_000_000  # larger models take minutes each on the 2-core CI machine
PRUNE = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}]
BOTH = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"],
         "quant_bits": 8}]
FAST = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "regnet_x_400mf", "shufflenet_v2_x0_5"]


def classification_models() -> list[str]:
    """Every classification model torchvision lists (built programmatically, not hand-picked)."""
    return torchvision.models.list_models(module=torchvision.models)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with weights=None and a small input it accepts."""
    kwargs, size = {}, 64
    if name.startswith("vit_"):
        patch = int(name.split("_")[-1])
        kwargs, size = {"image_size": patch * 4}, patch * 4
    elif name == "inception_v3":
        kwargs, size = {"aux_logits": False, "init_weights": False}, 96
    elif name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": False}
    elif name == "maxvit_t":
        size = 224
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@dataclass
class Outcome:
    model: str
    params: int
    traces: bool | None = None
    layers: int = 0
    in_leaves: int = 0
    exact_sparsity: bool | None = None
    matches_reference: bool | None = None
    trains: bool | None = None
    seconds: float = 0.0
    warnings: int = 0
    note: str = ""


def check(name: str) -> Outcome:
    """Compress one model; record (and assert in tests) the properties the issue asks for."""
    start = time.perf_counter()
    model, x = build(name)
    out = Outcome(name, sum(p.numel() for p in model.parameters()))
    if out.params > MAX_PARAMS:
        out.note = f"skipped: over {MAX_PARAMS // 1_000_000}M parameters"
        return out
    try:
        torch.fx.symbolic_trace(model)
        out.traces = True
    except Exception as err:  # which models torch.fx itself cannot trace is part of the outcome
        out.traces, out.note = False, f"symbolic_trace: {type(err).__name__}"
    model.eval()
    with warnings.catch_warnings(record=True) as said:  # layers the plan leaves alone, with the reason
        warnings.simplefilter("always")
        pruned = fxcompress.compress(model, PRUNE, strict=False).eval()
    blocked = sum(r.site.startswith("not compressed") for r in fxcompress.report(pruned))
    if blocked:
        out.note = (out.note + "; " if out.note else "") + f"{blocked} layers not compressed (plan says why)"
    out.warnings = len(said)
    masks = fxcompress.masks(pruned)
    rows = fxcompress.report(pruned)
    out.layers, out.in_leaves = len(rows), sum(r.site.startswith("in leaf") for r in rows)
    out.exact_sparsity = all(int((~m).sum()) == ratio_floor(0.5, m.numel()) for m in masks.values())
    reference = masked_reference(model, masks)
    with torch.no_grad():
        out.matches_reference = bool(torch.allclose(pruned(x), reference(x), rtol=1e-4, atol=1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same layers as above, said once already
        both = fxcompress.compress(model, BOTH, strict=False).train()
    y = both(x)
    y.float().square().mean().backward()
    grads = [both.get_submodule(n).weight.grad for n in masks]
    out.trains = all(g is not None and not g[~masks[n]].any() for g, n in zip(grads, masks, strict=True))
    out.seconds = round(time.perf_counter() - start, 1)
    return out


def markdown(outcomes: list[Outcome]) -> str:
    def mark(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "**no**")

    lines = ["| model | params (M) | fx traces | layers (in leaves) | exact sparsity | = masked ref | trains | note |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.model} | {o.params / 1e6:.1f} | {mark(o.traces)} | {o.layers} ({o.in_leaves}) | "
                     f"{mark(o.exact_sparsity)} | {mark(o.matches_reference)} | {mark(o.trains)} | {o.note} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(2)
    outcomes = []
    for name in sys.argv[1:] or classification_models():
        outcomes.append(check(name))
        print(json.dumps(asdict(outcomes[-1])), file=sys.stderr, flush=True)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/model_sweep.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    print(markdown(outcomes))


if __name__ == "__main__":
    main()
