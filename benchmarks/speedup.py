"""Channel pruning that shrinks the model: fxcompress.speedup against Torch-Pruning, CPU inference latency.

    python -m benchmarks.speedup [--rounds 20] [--models resnet18 resnet50 mobilenet_v2 convnext_tiny]
                                 [--sparsities 0.3 0.5 0.7] [--modes eager compiled]

Set-up of the issue's anchor: batch 4, 128x128 inputs, 2 threads, L1 filter norm, the given share
of each layer's output channels pruned, the last Linear kept. Torch-Pruning (a benchmark-only
dependency, ``pip install torch-pruning==1.6.1``) prunes with ``MagnitudePruner`` (p=1), per-layer
ratio; fxcompress compresses with ``granularity: 'out_channel'``, ``criterion: 'l1'`` and calls
``fxcompress.speedup``. For every model, sparsity and mode the three models (dense, Torch-Pruning,
fxcompress) are timed in one process, interleaved round by round after warm-up; a ratio is the
median over rounds of dense time / variant time (>1: faster). Parameters and FLOPs (torch's
``FlopCounterMode``) are reported as fractions of the dense model's, and ``max |diff|`` is the
largest difference between the sped-up model and the masked model it came from (fxcompress
promises equality; Torch-Pruning has no masked model to compare with).
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
from torch.utils.flop_counter import FlopCounterMode

import fxcompress

from .common import write_results

__all__ = ["main"]

BATCH, SIZE = 4, 128


def build(name: str) -> tuple[nn.Module, str]:
    """A torchvision model (random weights, eval mode) and the name of its last Linear."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return model, last


def torch_pruning(model: nn.Module, last: str, sparsity: float, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(pruned, (x,), importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=sparsity, ignored_layers=[pruned.get_submodule(last)])
    pruner.step()
    return pruned.eval()


def fx_speedup(model: nn.Module, last: str, sparsity: float, x: torch.Tensor,
               counts_of: nn.Module | None = None) -> tuple[nn.Module, float]:
    """The sped-up model and its max |difference| from the masked model it came from.

    ``counts_of``: a pruned model (Torch-Pruning's) whose kept filter counts each layer should match:
    Torch-Pruning keeps ``int(C·(1-s))`` filters, where SPEC §4 prunes ``floor(s·C)``, so at 70% it
    removes one channel more of 96; a per-layer sparsity of ``(C - kept + 0.5) / C`` prunes as many.
    """
    config = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": sparsity, "granularity": "out_channel",
               "criterion": "l1"}]
    if counts_of is not None:
        config = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and name != last:
                total, kept = m.weight.shape[0], counts_of.get_submodule(name).weight.shape[0]
                config.append({"op_names": [name], "sparsity_per_layer": (total - kept + 0.5) / total,
                               "granularity": "out_channel", "criterion": "l1"})
    config.append({"op_names": [last], "exclude": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = fxcompress.compress(model, config, example_inputs=(x,)).eval()
        fast = fxcompress.speedup(masked, (x,)).eval()
    with torch.no_grad():
        diff = (fast(x) - masked(x)).abs().max().item()
    return fast, diff


def count(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Parameters and forward FLOPs."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, sparsity: float, modes: list[str], rounds: int, warmup: int, tp_counts: bool = False
          ) -> list[dict]:
    model, last = build(name)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    variants: dict[str, nn.Module] = {"dense": model}
    extra: dict[str, dict] = {"dense": {}}
    try:
        variants["torch-pruning"] = torch_pruning(model, last, sparsity, x)
        extra["torch-pruning"] = {}
    except ImportError:
        print("torch-pruning is not installed: pip install torch-pruning==1.6.1")
    if hasattr(fxcompress, "speedup"):
        variants["fxcompress"], diff = fx_speedup(model, last, sparsity, x)
        extra["fxcompress"] = {"max_abs_diff_vs_masked": diff}
        if tp_counts and "torch-pruning" in variants:
            variants["fxcompress, TP's counts"], diff = fx_speedup(model, last, sparsity, x, variants["torch-pruning"])
            extra["fxcompress, TP's counts"] = {"max_abs_diff_vs_masked": diff}
    dense_params, dense_flops = count(model, x)
    rows = []
    for mode in modes:
        runs = {k: (torch.compile(m) if mode == "compiled" else m) for k, m in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        with torch.no_grad():
            for r in range(warmup + rounds):
                for k, m in runs.items():  # interleaved: dense, tp, fx, dense, tp, fx, ...
                    t = timed(lambda m=m: m(x))
                    if r >= warmup:
                        times[k].append(t)
        for k, m in variants.items():
            params, flops = count(m, x)
            ratios = [d / t for d, t in zip(times["dense"], times[k], strict=True)]
            rows.append({"model": name, "sparsity": sparsity, "mode": mode, "variant": k,
                         "median_ms": 1000 * statistics.median(times[k]), "speedup": statistics.median(ratios),
                         "params": params / dense_params, "flops": flops / dense_flops, **extra[k]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "convnext_tiny"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--results", default="speedup", help="name of the JSON written under benchmarks/results")
    parser.add_argument("--tp-counts", action="store_true",
                        help="also time fxcompress pruning as many filters per layer as Torch-Pruning did")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        for sparsity in args.sparsities:
            rows += bench(name, sparsity, args.modes, args.rounds, args.warmup, args.tp_counts)
            print(f"{name} {sparsity:g} done", flush=True)
    table = [[r["model"], r["sparsity"], r["mode"], r["variant"], f"{r['median_ms']:.1f}", f"{r['speedup']:.2f}x",
              f"{r['params']:.2f}", f"{r['flops']:.2f}",
              "" if "max_abs_diff_vs_masked" not in r else f"{r['max_abs_diff_vs_masked']:.1e}"] for r in rows]
    print(tabulate.tabulate(table, headers=["model", "sparsity", "mode", "variant", "ms", "speedup vs dense",
                                            "params", "FLOPs", "max |diff| vs masked"], tablefmt="github"))
    path = write_results(args.results, {"batch": BATCH, "size": SIZE, "rounds": args.rounds, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
