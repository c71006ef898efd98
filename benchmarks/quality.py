"""Accuracy after compression on the digits data, over 3 seeds (the quality bars of issues 3 and 4).

    python -m benchmarks.quality [--seeds 0 1 2]

Per seed: the seed model trains 15 dense epochs (SGD lr 0.05, momentum 0.9); from that state
each variant trains 5 more epochs at lr 0.01 with the same data order and dropout stream:
dense (the reference), 80% per-layer pruning, total_sparsity 0.9, 8-bit and 4-bit QAT
(input+weight), and QAT whose quant_start_step is all 5 epochs' steps (which must be
bit-for-bit float training).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import tabulate
import torch

import fxcompress
from fxcompress.examples import SeedModel, evaluate, load_digits, train_epochs

from .common import write_results

__all__ = ["main"]

DENSE_EPOCHS, TUNE_EPOCHS, BATCH = 15, 5, 64
DENSE_LR, TUNE_LR = 0.05, 0.01  # fine-tuning at a fifth of the training rate, the same for every variant
ALL = ["Conv2d", "Linear"]


def variants(steps: int) -> dict[str, list[dict] | None]:
    return {
        "dense +5": None,
        "prune 80% per layer +5": [{"op_types": ALL, "sparsity_per_layer": 0.8}],
        "prune total 0.9 +5": [{"op_types": ALL, "total_sparsity": 0.9}],
        "QAT 8-bit +5": [{"op_types": ALL, "quant_types": ["input", "weight"], "quant_bits": 8}],
        "QAT 4-bit +5": [{"op_types": ALL, "quant_types": ["input", "weight"], "quant_bits": 4}],
        "QAT 8-bit, start after 5 epochs": [{"op_types": ALL, "quant_types": ["input", "weight"], "quant_bits": 8,
                                             "quant_start_step": steps}],
    }


def run_seed(seed: int) -> tuple[dict[str, float], bool]:
    data = load_digits()
    torch.manual_seed(seed)
    dense = SeedModel()
    train_epochs(dense, data, DENSE_EPOCHS, seed=seed, lr=DENSE_LR)
    steps = TUNE_EPOCHS * -(-len(data.y_train) // BATCH)
    acc, trained = {}, {}
    for name, config_list in variants(steps).items():
        model = copy.deepcopy(dense) if config_list is None else fxcompress.compress(dense, config_list)
        torch.manual_seed(seed + 1000)  # same dropout stream for every variant
        train_epochs(model, data, TUNE_EPOCHS, seed=seed + 1, lr=TUNE_LR)
        acc[name] = evaluate(model, data)
        trained[name] = model
    late = trained["QAT 8-bit, start after 5 epochs"]
    float_equal = all(torch.equal(p, late.get_parameter(n)) for n, p in trained["dense +5"].named_parameters())
    return acc, float_equal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    seeds = parser.parse_args().seeds
    per_seed, equal = {}, []
    for seed in seeds:
        per_seed[seed], eq = run_seed(seed)
        equal.append(eq)
    names = list(per_seed[seeds[0]])
    mean = {n: statistics.mean(per_seed[s][n] for s in seeds) for n in names}
    ref = mean["dense +5"]
    rows = [[n, *(f"{per_seed[s][n]:.2f}" for s in seeds), f"{mean[n]:.2f}", f"{mean[n] - ref:+.2f}"] for n in names]
    print(tabulate.tabulate(rows, headers=["variant", *(f"seed {s}" for s in seeds), "mean %", "vs dense +5"],
                            tablefmt="github"))
    print(f"QAT with quant_start_step = all steps trains bit-for-bit like float: {all(equal)}")
    path = write_results("quality", {"seeds": seeds, "accuracy": {str(s): per_seed[s] for s in seeds},
                                     "mean": mean, "delta_vs_dense": {n: mean[n] - ref for n in names},
                                     "late_start_equals_float": all(equal)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
