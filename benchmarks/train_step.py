"""Training-step overhead of fxcompress and its peers, relative to the plain model.

    python -m benchmarks.train_step [--rounds 30] [--models seed resnet18 mlp] [--modes eager compiled]
                                    [--device cuda]

One training step = forward, backward, optimizer step (SGD, momentum) on the next of 8 fixed
random batches (a new batch each step, as in training). For every model and mode,
all variants are timed in one process, interleaved round by round (plain, variant, plain,
variant, ...) after warm-up; the figure is the median over rounds of variant time / the
adjacent plain time. Peak memory of one step (parameters, gradients, optimizer state and
activations alive at once) comes from the profiler's memory timeline (CPU) or
``max_memory_allocated`` (``--device cuda``), also as a ratio to plain. On CUDA every step ends with
a synchronize, so a step's time is its GPU work, not its launch.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import tabulate
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcompress
from fxcompress.examples import SeedModel

from .common import write_results

__all__ = ["main"]

ALL = ["Conv2d", "Linear"]
PRUNE = [{"op_types": ALL, "sparsity_per_layer": 0.5}]
QAT = [{"op_types": ALL, "quant_types": ["input", "weight", "output"], "quant_bits": 8}]
BOTH = [{**PRUNE[0], **QAT[0]}]


class MLP(nn.Sequential):
    """A Linear-heavy transformer-sized MLP block stack."""

    def __init__(self, width: int = 512, depth: int = 6) -> None:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width * 2), nn.GELU(), nn.Linear(width * 2, width)]
        super().__init__(*layers, nn.Linear(width, 10))


def model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "seed":
        return SeedModel(), torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None), torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,))
    if name == "mobilenet_v3_small":
        return (torchvision.models.mobilenet_v3_small(weights=None), torch.randn(8, 3, 64, 64),
                torch.randint(0, 1000, (8,)))
    if name == "mlp":
        return MLP(), torch.randn(64, 512), torch.randint(0, 10, (64,))
    raise ValueError(name)


def torch_prune(model: nn.Module) -> nn.Module:
    import torch.nn.utils.prune as tprune

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            tprune.l1_unstructured(module, "weight", amount=0.5)
    return model


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's own deprecation notice
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def variants(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], nn.Module]]:
    return {
        "plain": lambda: copy.deepcopy(model),
        "fx prune 50%": lambda: fxcompress.compress(model, PRUNE),
        "fx QAT 8-bit": lambda: fxcompress.compress(model, QAT),
        "fx QAT 8-bit, BN not folded": lambda: fxcompress.compress(model, QAT, fold_bn=False),
        "fx prune+QAT": lambda: fxcompress.compress(model, BOTH),
        "torch prune l1 50%": lambda: torch_prune(model),
        "torch.ao QAT fx": lambda: torch_ao_qat(model, x),
    }


BATCHES = 8


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """One training step per call, on the next of ``BATCHES`` batches shaped like ``x`` and ``y``.

    The first batch is ``x``, ``y`` themselves; the others are drawn from a fixed seed, so every
    variant sees the same sequence. A new batch each step is what training does: the activation
    ranges then move as they do in training, not settle on one repeated batch.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(1)  # drawn on the CPU: the same batches on every device
    batches = itertools.cycle([(x, y)] + [(torch.randn(x.shape, generator=gen).to(x.device),
                                           y[torch.randperm(len(y), generator=gen).to(y.device)])
                                          for _ in range(BATCHES - 1)])
    cuda = x.device.type == "cuda"

    def step() -> None:
        xb, yb = next(batches)
        opt.zero_grad(set_to_none=True)
        out = forward(xb)
        loss = F.cross_entropy(out, yb) if out.dim() == 2 else out.float().mean()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    return step


def peak_memory(step: Callable[[], None], device: str = "cpu") -> int:
    """Peak bytes allocated during one step on ``device``, from the allocator's own events."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        step()
    # the profiler's memory timeline: bytes live per category over time; peak of their sum
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(row) for row in sizes)


def bench_model(name: str, mode: str, rounds: int, warmup: int, only: list[str] | None = None,
                builders: dict[str, Callable[[], nn.Module]] | None = None, device: str = "cpu") -> list[dict]:
    """Rows for one model and mode: ``variants`` (or ``builders``, beside the plain model), interleaved.

    Every variant is built on the CPU (torch.ao prepares with a CPU example) and then moved to ``device``.
    """
    model, x, y = model_and_batch(name)
    steps, errors = {}, {}
    if builders is not None:
        chosen = {"plain": lambda: copy.deepcopy(model), **builders}
    else:
        chosen = {k: v for k, v in variants(model, x).items() if k == "plain" or not only or k in only}
    for label, build in chosen.items():
        try:
            steps[label] = make_step(build().to(device), x.to(device), y.to(device), compiled=mode == "compiled")
            for _ in range(warmup):
                steps[label]()
        except Exception as err:  # a peer that cannot run this mode is reported, not fatal
            errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            steps.pop(label, None)
    ratios: dict[str, list[float]] = {label: [] for label in steps if label != "plain"}
    plain_times = []
    for _ in range(rounds):
        for label in ratios:
            t0 = time.perf_counter()
            steps["plain"]()
            t1 = time.perf_counter()
            steps[label]()
            t2 = time.perf_counter()
            ratios[label].append((t2 - t1) / (t1 - t0))
            plain_times.append(t1 - t0)
    if not plain_times:  # every variant failed: time the plain step alone
        for _ in range(rounds):
            t0 = time.perf_counter()
            steps["plain"]()
            plain_times.append(time.perf_counter() - t0)
    plain_peak = peak_memory(steps["plain"], device)
    rows = []
    for label in chosen:
        if label == "plain":
            continue
        row = {"model": name, "mode": mode, "variant": label, "device": device}
        if label in errors:
            row["error"] = errors[label]
        else:
            row.update(time_ratio=statistics.median(ratios[label]),
                       memory_ratio=peak_memory(steps[label], device) / plain_peak)
        rows.append(row)
    rows.append({"model": name, "mode": mode, "variant": "plain", "device": device, "median_step_ms":
                 1000 * statistics.median(plain_times), "peak_bytes": plain_peak})
    return rows


def readme_table(paths: list[str]) -> str:
    """The README's table from result files: a row per variant, a column per model and mode, step
    time / plain (the plain step's milliseconds in the last row); an error prints as ``failed``."""
    rows = [row for path in paths for row in json.loads(Path(path).read_text())["rows"]]
    columns = list(dict.fromkeys((r["model"], r["mode"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "plain"))

    def cell(variant: str, column: tuple[str, str]) -> str:
        found = [r for r in rows if (r["model"], r["mode"]) == column and r["variant"] == variant]
        if not found:
            return "-"
        r = found[-1]
        if "error" in r:
            return "failed"
        if variant == "plain":  # a tenth of a millisecond where steps are short (a GPU's)
            return f"{r['median_step_ms']:.1f}" if r["median_step_ms"] < 20 else f"{r['median_step_ms']:.0f}"
        return f"{r['time_ratio']:.2f}"

    lines = ["| variant | " + " | ".join(f"{m} {mode}" for m, mode in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for variant in [*variants, "plain"]:
        label = "*plain step (ms)*" if variant == "plain" else variant
        lines.append(f"| {label} | " + " | ".join(cell(variant, c) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["seed", "resnet18", "mobilenet_v3_small", "mlp"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--variants", nargs="+", default=None, help="only these (plain is always run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--results", default="train_step", help="name of the JSON file under benchmarks/results")
    parser.add_argument("--readme-table", nargs="+", metavar="JSON", help="print the README table of these "
                        "result files and exit (nothing is measured)")
    args = parser.parse_args()
    if args.readme_table:
        print(readme_table(args.readme_table))
        return
    rows = []
    for mode in args.modes:
        for name in args.models:
            rows += bench_model(name, mode, args.rounds, args.warmup, args.variants, device=args.device)
            print(f"done {name} {mode}", flush=True)
    table = [[r["model"], r["mode"], r["variant"],
              f"{r['time_ratio']:.3f}" if "time_ratio" in r else (f"{r['median_step_ms']:.1f} ms" if
                                                                    "median_step_ms" in r else "-"),
              f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "",
              r.get("error", "")] for r in rows]
    print(tabulate.tabulate(table, headers=["model", "mode", "variant", "step time / plain", "peak mem / plain",
                                            "error"], tablefmt="github"))
    print(f"wrote {write_results(args.results, {'rounds': args.rounds, 'device': args.device, 'rows': rows})}")


if __name__ == "__main__":
    main()
