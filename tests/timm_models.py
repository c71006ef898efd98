"""timm models (random weights, nothing downloaded) and the four checks issue 10 asks of each.

Per model, at a 64x64 input of batch 2:

(a) ``modes``: compressed with all-ones masks (``start_dense=True``), once from train mode and
    once from eval mode, the model computes what the original does across eval/train/eval/train
    switches (the same RNG seed before each train forward: dropout and drop-path draw), and the
    BatchNorm running statistics move exactly as the original's (SPEC §2.8);
(b) ``coverage``: every Conv2d/Linear the forward uses (a forward hook on the original in either
    mode, or a plan row that is not ``unused``) is compressed: its row's site is ``graph`` or
    ``in leaf ...``;
(c) ``qat_off``: with ``quant_start_step`` not reached, fake quantization changes nothing (one
    train forward, then eval), to 1e-6;
(d) ``trains``: two SGD steps of a pruned + quantized model give finite losses and no gradient
    reaches a masked weight.

``python -m tests.timm_models [NAME ...]`` runs the checks and prints a markdown table.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.annotations import plans_of

SIZE, BATCH, CLASSES = 64, 2, 10
ONES = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}]
QAT_OFF = [{"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 8,
            "quant_start_step": 100}]
# quantization off at the first training step, on at the second
TRAIN = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
          "quant_bits": 8, "quant_start_step": 1}]

# make test: two small models covering BatchNorm + DropPath and BatchNormAct2d + SE + hard-swish (the
# mode-dependent blocks); efficientnet_b0, convnext_atto and vit_tiny (1-2 minutes each here) run in
# the sweep (make test-slow)
FAST = ["resnet10t", "mobilenetv3_small_050"]

SWEEP = [
    "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224",
    # ResNet and relatives
    "resnet18", "resnet18d", "resnet26t", "seresnet18", "resnext26ts", "skresnet18", "eca_resnet33ts", "nf_resnet26",
    "gernet_s", "repvgg_a0", "mobileone_s0",
    # EfficientNet
    "efficientnet_lite0", "tf_efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "mixnet_s", "tinynet_e",
    # MobileNet and other mobile nets
    "mobilenetv3_large_075", "mobilenetv2_035", "mobilenetv1_100", "mobilenetv4_conv_small_035",
    "mobilenetv4_hybrid_medium", "lcnet_050", "mnasnet_small", "hardcorenas_a", "rexnet_100", "fbnetc_100",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_005",
    # ConvNeXt
    "convnext_atto_ols", "convnextv2_atto", "convnext_femto", "inception_next_atto",
    # ViT / DeiT and other plain transformers
    "vit_small_patch16_224", "vit_tiny_r_s16_p8_224", "eva02_tiny_patch14_224", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224", "pit_ti_224", "xcit_nano_12_p16_224", "convit_tiny",
    "cait_xxs24_224",
    # Swin
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224",
    # MaxViT / CoAtNet
    "maxvit_pico_rw_256", "maxvit_rmlp_pico_rw_256", "maxxvit_rmlp_nano_rw_256", "coatnet_nano_cc_224",
    # LeViT
    "levit_128s", "levit_conv_128s",
    # EdgeNeXt
    "edgenext_xx_small", "edgenext_x_small",
    # PoolFormer / MetaFormer
    "poolformer_s12", "poolformerv2_s12", "caformer_s18",
    # MobileViT
    "mobilevit_xxs", "mobilevitv2_050",
    # GhostNet (ghostnetv3_050 passes too, but its compress takes ~11 s: 45 s+ of the sweep)
    "ghostnet_050", "ghostnetv2_100",
    # HRNet
    "hrnet_w18_small", "hrnet_w18_small_v2",
    # DLA
    "dla34", "dla46_c", "dla46x_c", "dla60x_c",
    # CSP
    "cspresnet50", "cs3darknet_s", "cs3darknet_focus_s", "cspresnext50",
    # other families
    "densenet121", "dpn48b", "efficientformerv2_s0", "fastvit_t8", "pvt_v2_b0", "tiny_vit_5m_224", "repvit_m0_9",
    "efficientvit_b0", "efficientvit_m0", "gcvit_xxtiny", "coat_lite_tiny", "hgnetv2_b0", "starnet_s050",
    "ese_vovnet19b_slim_dw", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "visformer_tiny", "mambaout_femto",
    "fasternet_t0", "swiftformer_xs", "nest_tiny", "shvit_s1",
]


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """``timm.create_model(name, pretrained=False)`` with 10 classes, dropout and drop-path on where the
    model takes them (timm's head calls ``F.dropout(x, p, training=self.training)`` in the top-level
    forward), ``img_size`` where the model's input size is fixed; and a 64x64 batch of 2."""
    cfg = timm.models.get_pretrained_cfg(name)
    kwargs = {"num_classes": CLASSES, "drop_rate": 0.1, "drop_path_rate": 0.1}
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = SIZE
    for unsupported in ((), ("drop_path_rate",), ("drop_path_rate", "drop_rate")):
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, **{k: v for k, v in kwargs.items()
                                                                 if k not in unsupported})
            break
        except TypeError as err:  # a model without drop-path (or dropout) rejects the keyword
            if not any(k in str(err) for k in ("drop_path_rate", "drop_rate")) or unsupported:
                raise
    return model, torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@dataclass
class Outcome:
    model: str
    params: int = 0
    compressed: int = 0  # plan rows whose site is graph / in leaf ...
    in_leaves: int = 0  # ... of them in leaf modules
    used: int = 0  # Conv2d/Linear layers the forward uses (hooks, or a plan row that is not unused)
    modules: int = 0  # Conv2d/Linear modules in the model
    leaves: list[str] = field(default_factory=list)  # types of the model's own modules kept as leaves
    buffers: int = 0  # BatchNorm statistics compared in (a)
    failures: dict[str, str] = field(default_factory=dict)  # check -> "Type: first line"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _compress(model: nn.Module, config: list[dict], mode: str, **kwargs) -> torch.fx.GraphModule:
    """A compressed copy of ``model``, which is in ``mode`` when ``compress`` sees it."""
    model = copy.deepcopy(model).train(mode == "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # strict=False warns of layers it leaves alone; check_coverage says which
        return fxcompress.compress(model, config, strict=False, **kwargs)


def _seeded(module: nn.Module, x: torch.Tensor, seed: int) -> object:
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x)


def _statistics(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def used_layers(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Conv2d/Linear modules called by the original's forward in train or eval mode (forward hooks)."""
    model = copy.deepcopy(model)
    seen: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, n=n: seen.add(n))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for mode in (True, False):
        _seeded(model.train(mode), x, 0)
    for h in handles:
        h.remove()
    return seen


def check_coverage(model: nn.Module, x: torch.Tensor, gm: torch.fx.GraphModule, out: Outcome) -> None:
    """(b): every Conv2d/Linear the forward uses is compressed, in the graph or inside a leaf."""
    rows = {r.name: r.site for r in fxcompress.report(gm)}
    compressed = {n for n, site in rows.items() if site == "graph" or site.startswith("in leaf")}
    used = used_layers(model, x) | {n for n, site in rows.items() if site != "unused"}
    out.compressed, out.used = len(compressed), len(used)
    out.in_leaves = sum(rows[n].startswith("in leaf") for n in compressed)
    out.modules = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    out.leaves = sorted({type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"
                         and not type(gm.get_submodule(n.target)).__module__.startswith(("torch.", "fxcompress."))})
    missing = sorted(used - compressed)
    if missing:
        plans = plans_of(gm)
        why = [f"{n} ({rows.get(n, 'no plan row')}" + (f": {plans[n].blocked}" if n in plans and plans[n].blocked
                                                        else "") + ")" for n in missing]
        raise AssertionError(f"{len(missing)} of {len(used)} used Conv2d/Linear layers not compressed: "
                             + "; ".join(why[:3]))


def check_modes(model: nn.Module, x: torch.Tensor, gms: dict[str, torch.fx.GraphModule], out: Outcome) -> None:
    """(a): compressed with all-ones masks in either mode, the model matches the original in both modes,
    outputs and BatchNorm statistics, across eval/train/eval/train switches."""
    buffers = _statistics(model)
    out.buffers = len(buffers)
    for compress_mode, gm in gms.items():
        reference = copy.deepcopy(model)
        for step, mode in enumerate(["eval", "train", "eval", "train"]):
            gm.train(mode == "train")
            reference.train(mode == "train")
            where = f"compressed in {compress_mode}, forward {step + 1} ({mode})"
            torch.testing.assert_close(_seeded(gm, x, step), _seeded(reference, x, step),
                                       msg=lambda m, w=where: f"{w}: {m}")
            for name in buffers:
                torch.testing.assert_close(gm.get_buffer(name), reference.get_buffer(name),
                                           msg=lambda m, w=where, n=name: f"{w}, buffer {n}: {m}")


def check_qat_off(model: nn.Module, x: torch.Tensor, gm: torch.fx.GraphModule, out: Outcome) -> None:
    """(c): before quant_start_step, the fake-quantized model computes the float model: one train
    forward, then eval, to 1e-6."""
    original = copy.deepcopy(model).train()
    gm.train()
    torch.testing.assert_close(_seeded(gm, x, 0), _seeded(original, x, 0), rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"train forward: {m}")
    gm.eval()
    original.eval()
    torch.testing.assert_close(_seeded(gm, x, 0), _seeded(original, x, 0), rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"eval forward after one train forward: {m}")


def check_trains(gm: torch.fx.GraphModule, x: torch.Tensor, out: Outcome) -> None:
    """(d): two SGD steps of the 50%-pruned model (quantization comes on at the second) give finite
    losses, and no gradient reaches a masked weight."""
    masks = fxcompress.masks(gm)
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    labels = torch.arange(BATCH) % CLASSES
    torch.manual_seed(0)
    for step in range(2):
        opt.zero_grad()
        y = gm(x)
        loss = F.cross_entropy(y[0] if isinstance(y, tuple) else y, labels)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise AssertionError(f"step {step + 1}: loss {loss.item()}")
        opt.step()
    for name, mask in masks.items():
        grad = gm.get_submodule(name).weight.grad
        if grad is not None and grad[~mask].any():
            raise AssertionError(f"{name}: a masked weight has a gradient")


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def check(name: str) -> Outcome:
    """Build ``name`` and run the four checks: four ``compress`` calls (all-ones masks from train mode and
    from eval mode for (a) and (b), QAT_OFF for (c), TRAIN for (d)). A failure is recorded under its
    check (``compress`` when compress itself raises) and the checks that do not depend on it still run."""
    start = time.perf_counter()
    out = Outcome(name)
    model, x = build(name)
    out.params = sum(p.numel() for p in model.parameters())

    def attempt(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # every failure is part of the outcome
            out.failures.setdefault(label, _reason(err))
            return None

    gms = {mode: attempt("compress", _compress, model, ONES, mode, start_dense=True) for mode in ("train", "eval")}
    if gms["eval"] is not None:
        attempt("coverage", check_coverage, model, x, gms["eval"], out)
    if None not in gms.values():
        attempt("modes", check_modes, model, x, gms, out)
    qat = attempt("compress", _compress, model, QAT_OFF, "train")
    if qat is not None:
        attempt("qat_off", check_qat_off, model, x, qat, out)
    trained = attempt("compress", _compress, model, TRAIN, "train")
    if trained is not None:
        attempt("trains", check_trains, trained, x, out)
    out.seconds = round(time.perf_counter() - start, 1)
    return out


def markdown(outcomes: list[Outcome]) -> str:
    """The README's table; outcome ``graph`` (every layer in the fx graph), ``graph + leaf`` (some
    inside leaf modules, compressed at module level), or the failed checks with their reasons."""
    lines = ["| model | params (M) | compressed / used (in leaves) | leaf types | outcome |", "|---|---|---|---|---|"]
    for o in outcomes:
        verdict = (("graph + leaf" if o.in_leaves else "graph") if o.ok
                   else "; ".join(f"{k}: {v}" for k, v in o.failures.items()))
        lines.append(f"| {o.model} | {o.params / 1e6:.1f} | {o.compressed} / {o.used} ({o.in_leaves}) | "
                     f"{', '.join(o.leaves)} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(2)
    outcomes = []
    for name in sys.argv[1:] or FAST + SWEEP:
        outcomes.append(check(name))
        print(json.dumps(asdict(outcomes[-1])), file=sys.stderr, flush=True)
    print(markdown(outcomes))


if __name__ == "__main__":
    main()
