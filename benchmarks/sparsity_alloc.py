"""Time of the exact global allocation (total_sparsity) and of compress() on ResNet-50.

    python -m benchmarks.sparsity_alloc
"""

from __future__ import annotations

import statistics
import time

import tabulate
import torch
import torchvision

import fxcompress
from fxcompress.settings import PruneSetting
from fxcompress.sparsity import global_masks

from .common import write_results

__all__ = ["main"]


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    n = sum(w.numel() for w in weights.values())
    rows = []
    for label, setting in [("total 0.5", PruneSetting(total_sparsity=0.5)),
                           ("total 0.5, cap 0.55", PruneSetting(total_sparsity=0.5, max_sparsity_per_layer=0.55)),
                           ("total 0.9, cap 0.92", PruneSetting(total_sparsity=0.9, max_sparsity_per_layer=0.92))]:
        masks = global_masks(weights, setting, "bench")
        assert sum(int((~m).sum()) for m in masks.values()) == int(setting.total_sparsity * n)
        rows.append({"case": f"global_masks {label}", "weights": n,
                     "median_s": _median_time(lambda s=setting: global_masks(weights, s, "bench"), 5)})
    cfg = [{"op_types": ["default"], "total_sparsity": 0.5}]
    rows.append({"case": "compress() total 0.5", "weights": n,
                 "median_s": _median_time(lambda: fxcompress.compress(model, cfg), 3)})
    print(tabulate.tabulate([[r["case"], r["weights"], f"{r['median_s']:.3f}"] for r in rows],
                            headers=["case (ResNet-50)", "weights", "median s"], tablefmt="github"))
    print(f"wrote {write_results('sparsity_alloc', {'rows': rows})}")


if __name__ == "__main__":
    main()
