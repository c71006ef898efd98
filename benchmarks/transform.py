"""Transform time: compress() against symbolic_trace (+ deepcopy) and torch.ao's prepare_qat_fx.

    python -m benchmarks.transform [--rounds 5]

Real models (resnet50, mobilenet_v2, vit_b_16) with a prune+QAT config, then scaling:
MLPs of 100, 1,000 and 10,000 Linear layers, and 100 sub-configs on the 1,000-layer MLP.
Medians of interleaved rounds; the JSON also holds per-layer times to show growth is linear.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import tabulate
import torch
import torchvision
from torch import nn

import fxcompress

from .common import write_results

__all__ = ["main"]

CFG = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"],
        "quant_bits": 8}]


def deep_mlp(n: int, width: int = 16) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def prepare_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for label, fn in fns.items():  # interleaved
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def case(name: str, model: nn.Module, x: torch.Tensor, config: list[dict], rounds: int, with_ao: bool) -> dict:
    fns: dict[str, Callable[[], object]] = {
        "symbolic_trace": lambda: torch.fx.symbolic_trace(model),
        "trace+deepcopy": lambda: torch.fx.symbolic_trace(copy.deepcopy(model)),
        "compress": lambda: fxcompress.compress(model, config),
    }
    if with_ao:
        fns["prepare_qat_fx"] = lambda: prepare_qat(model, x)
    t = timed(fns, rounds)
    layers = len(fxcompress.select(model, config))
    return {"case": name, "layers": layers, "sub_configs": len(config), **{f"{k}_s": v for k, v in t.items()},
            "compress_vs_trace_deepcopy": t["compress"] / t["trace+deepcopy"],
            "prepare_qat_fx_vs_trace": t["prepare_qat_fx"] / t["symbolic_trace"] if with_ao else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    image = torch.randn(1, 3, 64, 64)
    for name, build, x in [("resnet50", lambda: torchvision.models.resnet50(weights=None), image),
                           ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), image),
                           ("vit_b_16", lambda: torchvision.models.vit_b_16(weights=None, image_size=64), image)]:
        rows.append(case(name, build(), x, CFG, args.rounds, with_ao=True))
        print(f"done {name}", flush=True)
    for n in (100, 1000, 10000):
        rows.append(case(f"mlp x{n}", deep_mlp(n), torch.randn(2, 16), CFG, max(1, args.rounds // (n // 1000 or 1)),
                         with_ao=n <= 1000))
        print(f"done mlp {n}", flush=True)
    many = CFG + [{"op_names": [str(10 * i)], "sparsity_per_layer": 0.3} for i in range(99)]
    rows.append(case("mlp x1000, 100 sub-configs", deep_mlp(1000), torch.randn(2, 16), many, args.rounds,
                     with_ao=False))
    table = [[r["case"], r["layers"], r["sub_configs"], f"{r['symbolic_trace_s']:.3f}", f"{r['trace+deepcopy_s']:.3f}",
              f"{r['compress_s']:.3f}", f"{r['compress_vs_trace_deepcopy']:.2f}",
              f"{r['prepare_qat_fx_s']:.3f}" if "prepare_qat_fx_s" in r else "-",
              f"{r['prepare_qat_fx_vs_trace']:.1f}" if r["prepare_qat_fx_vs_trace"] else "-",
              f"{1e3 * r['compress_s'] / r['layers']:.2f}"] for r in rows]
    print(tabulate.tabulate(table, headers=["case", "layers", "sub-configs", "trace s", "trace+deepcopy s",
                                            "compress s", "compress / (trace+deepcopy)", "prepare_qat_fx s",
                                            "prepare_qat_fx / trace", "compress ms/layer"], tablefmt="github"))
    print(f"wrote {write_results('transform', {'rounds': args.rounds, 'rows': rows})}")


if __name__ == "__main__":
    main()
