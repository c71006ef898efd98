"""Inference latency and saved size of the float model, finalize's fake-quant model and convert's int8 model.

    python -m benchmarks.deploy [--rounds 20] [--threads 1] [--models seed resnet18 resnet50 mobilenet_v2]
                                [--modes eager compiled]

Each model (torchvision, weights=None; batch 4 at 128x128, the seed model at 1x28x28) is compressed
with 8-bit QAT of every Conv2d/Linear input and weight (``quant_reduce_range: True``, the range that
converts exactly on x86 without VNNI), run for a few training forwards on normalised random images
(observers and BatchNorm statistics settle), then put in eval mode. Variants: the original float model,
``finalize(gm)`` and ``convert(gm, x)``; ``compiled`` is ``torch.compile`` with inductor's
``freezing`` on for all three (constant folding: the float model's Conv-BN fold and weight prepacking).
Latency: one forward under ``no_grad``, all variants interleaved round by round after warm-up, the
median over rounds (and the median of each round's ratio to the float model). Size: bytes of
``torch.save`` of the whole module. Drift: ``convert`` against ``finalize`` on a fresh batch, with
the reduced range and, converted from a copy trained without it, with the full uint8 range. One
thread by default: on a
shared 2-core machine, two OpenMP threads per process made single runs 10-20x slower at random.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from collections.abc import Callable

import tabulate
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress.examples import SeedModel
from fxcompress.passes.lower_int8 import output_drift

from .common import write_results

__all__ = ["main"]

QAT = {"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}
VARIANTS = ("float", "finalize", "convert")


def model_and_input(name: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The float model and a maker of real-ish batches (normalised images: smooth, not white noise)."""
    torch.manual_seed(0)
    if name == "seed":
        model, shape = SeedModel(), (4, 1, 28, 28)
    else:
        model, shape = getattr(torchvision.models, name)(weights=None), (4, 3, 128, 128)

    def batch() -> torch.Tensor:
        coarse = torch.rand(shape[0], shape[1], shape[2] // 8, shape[3] // 8)
        image = nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
        return (image + 0.05 * torch.randn(shape) - 0.45) / 0.25

    return model.eval(), batch


def trained(model: nn.Module, batch: Callable[[], torch.Tensor], reduce_range: bool) -> nn.Module:
    """The QAT model after a few training forwards (ranges and BatchNorm statistics observed), in eval mode."""
    gm = fxcompress.compress(model, [{**QAT, "quant_reduce_range": reduce_range}])
    gm.train()
    with torch.no_grad():
        for _ in range(4):
            gm(batch())
    return gm.eval()


def saved_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.tell()


def bench_model(name: str, modes: list[str], rounds: int, warmup: int) -> list[dict]:
    model, batch = model_and_input(name)
    gm = trained(model, batch, reduce_range=True)
    x = batch()
    full_range = trained(model, batch, reduce_range=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the full-range model's drift warning: reported below instead
        variants = {"float": model, "finalize": fxcompress.finalize(gm), "convert": fxcompress.convert(gm, (x,))}
        full = (fxcompress.finalize(full_range), fxcompress.convert(full_range, (x,)))
    probe = batch()
    with torch.no_grad():
        drift = output_drift(variants["finalize"](probe), variants["convert"](probe))
        full_drift = output_drift(full[0](probe), full[1](probe))
    sizes = {label: saved_bytes(m) for label, m in variants.items()}
    rows = []
    for mode in modes:
        runs = {}
        for label, module in variants.items():
            run = torch.compile(module) if mode == "compiled" else module
            started = time.perf_counter()
            with torch.no_grad():
                for _ in range(warmup):
                    run(x)
            runs[label] = run
            if mode == "compiled":
                print(f"  {name} {label}: compiled and warmed up in {time.perf_counter() - started:.0f} s", flush=True)
        times: dict[str, list[float]] = {label: [] for label in runs}
        ratios: dict[str, list[float]] = {label: [] for label in runs}
        with torch.no_grad():
            for _ in range(rounds):
                for label, run in runs.items():
                    started = time.perf_counter()
                    run(x)
                    times[label].append(time.perf_counter() - started)
                for label in runs:
                    ratios[label].append(times["float"][-1] / times[label][-1])
        for label in runs:
            rows.append({"model": name, "mode": mode, "variant": label,
                         "median_ms": 1000 * statistics.median(times[label]),
                         "speedup_vs_float": statistics.median(ratios[label]),
                         "bytes": sizes[label], "size_vs_float": sizes["float"] / sizes[label],
                         **({"drift_reduced_range": drift, "drift_full_range": full_drift}
                            if label == "convert" else {})})
    return rows


def _drift(d: dict[str, float] | None) -> str:
    if not d:
        return ""
    return f"cos {d['cosine']:.5f}, max diff {d['max_abs_diff']:.3g} of {d['max_abs_reference']:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["seed", "resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--results", default="deploy", help="name of the JSON file under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True
    rows = []
    for name in args.models:
        rows += bench_model(name, args.modes, args.rounds, args.warmup)
        print(f"done {name}", flush=True)
    table = []
    for r in rows:
        drift = r.get("drift_reduced_range")
        full = r.get("drift_full_range")
        table.append([r["model"], r["mode"], r["variant"], f"{r['median_ms']:.1f}", f"{r['speedup_vs_float']:.2f}x",
                      f"{r['bytes'] / 1e6:.2f} MB", f"{r['size_vs_float']:.2f}x",
                      _drift(drift), _drift(full)])
    print(tabulate.tabulate(table, headers=["model", "mode", "variant", "median ms", "speed vs float", "saved size",
                                            "smaller", "vs finalize, 7-bit activations", "vs finalize, 8-bit"],
                            tablefmt="github"))
    print(f"wrote {write_results(args.results, {'rounds': args.rounds, 'rows': rows})}")


if __name__ == "__main__":
    main()
