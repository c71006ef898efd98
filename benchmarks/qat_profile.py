"""Where QAT's training-step time goes, quantizer stage by stage (issue 13).

    python -m benchmarks.qat_profile [--rounds 9] [--models seed resnet18 mobilenet_v3_small] [--modes eager compiled]

Each stage is a variant of the 8-bit input+weight+output QAT model (BatchNorm not folded) whose
quantizers stop after that stage and return their input unchanged:

* ``observe``: activation min/max (one reduction) and the EMA update; weight min/max per channel;
* ``+ qparams, gate``: scale and zero point from the range, and the start-step gate;
* ``full``: the fake quantization itself (round, clamp, straight-through mask, and its backward).

Every variant is timed interleaved with the plain model in one process (median of ``--rounds``
ratios), as ``benchmarks.train_step`` does; the difference between adjacent stages is that stage's
cost. Prints a table and writes ``benchmarks/results/qat_profile.json``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import tabulate
import torch

import fxcompress
from fxcompress import quant
from fxcompress.quant import ActivationQuantizer, WeightQuantizer, qparams

from .common import write_results
from .train_step import QAT, bench_model, model_and_batch

__all__ = ["main"]


def _observe_only(self: ActivationQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    if self.training:
        if quant._host_path(x):
            lo, hi = torch.aminmax(x.detach())
            lo, hi = lo.item(), hi.item()
            if math.isfinite(lo) and math.isfinite(hi):
                self.tracked_min.fill_(lo)
                self.tracked_max.fill_(hi)
        else:
            self._observe(x)
    return x


def _observe_qparams(self: ActivationQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    _observe_only(self, x, step)
    if quant._host_path(x):
        if step.item() >= self.start_step:
            quant.qparams_float(self.tracked_min.item(), self.tracked_max.item(), self.qmin, self.qmax,
                                self.symmetric)
        return x
    qparams(self.tracked_min, self.tracked_max, self.qmin, self.qmax, self.symmetric)
    return torch.where(step >= self.start_step, x, x)


def _weight_minmax(self: WeightQuantizer, w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    rows = w.detach().reshape(w.shape[0], -1)
    rows.amin(dim=1), rows.amax(dim=1)
    return w


def _weight_qparams(self: WeightQuantizer, w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    self.current_qparams(w)
    return w


STAGES: dict[str, tuple[Callable, Callable]] = {
    "observe": (_observe_only, _weight_minmax),
    "+ qparams, gate": (_observe_qparams, _weight_qparams),
    "full": (ActivationQuantizer.forward, WeightQuantizer.forward),
}


class _Staged:
    """QAT models whose quantizer classes run only up to a stage (subclasses: the originals stay)."""

    def __init__(self, stage: str) -> None:
        act, weight = STAGES[stage]
        self.act = type("StagedActivationQuantizer", (ActivationQuantizer,), {"forward": act})
        self.weight = type("StagedWeightQuantizer", (WeightQuantizer,), {"forward": weight})

    def build(self, model: torch.nn.Module) -> torch.nn.Module:
        gm = fxcompress.compress(model, QAT, fold_bn=False)
        for module in gm.modules():
            if type(module) is ActivationQuantizer:
                module.__class__ = self.act
            elif type(module) is WeightQuantizer:
                module.__class__ = self.weight
        return gm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["seed", "resnet18", "mobilenet_v3_small"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    args = parser.parse_args()
    rows = []
    for mode in args.modes:
        for name in args.models:
            model, _, _ = model_and_batch(name)
            builders = {f"stage: {stage}": (lambda stage=stage, model=model: _Staged(stage).build(model))
                        for stage in STAGES}
            rows += bench_model(name, mode, args.rounds, args.warmup, builders=builders)
            print(f"done {name} {mode}", flush=True)
    table = [[r["model"], r["mode"], r["variant"], f"{r['time_ratio']:.3f}" if "time_ratio" in r else
              f"{r.get('median_step_ms', 0):.1f} ms", r.get("error", "")] for r in rows]
    print(tabulate.tabulate(table, headers=["model", "mode", "stage", "step time / plain", "error"],
                            tablefmt="github"))
    print(f"wrote {write_results('qat_profile', {'rounds': args.rounds, 'rows': rows})}")


if __name__ == "__main__":
    main()
