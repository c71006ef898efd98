"""Accuracy after compression on the digits data, over 3 seeds (the quality bars of issues 3 and 4).

    python -m benchmarks.quality [--seeds 0 1 2]

Per seed: the seed model trains 15 dense epochs (SGD lr 0.05, momentum 0.9); from that state
each variant trains 5 more epochs at lr 0.01 with the same data order and dropout stream:
dense (the reference), 80% per-layer pruning, total_sparsity 0.9, 8-bit and 4-bit QAT
(input+weight), QAT whose quant_start_step is all 5 epochs' steps (which must be
bit-for-bit float training), and 50% channel pruning (granularity 'out_channel', dependency
groups from compress's example_inputs, fc2 excluded since its outputs are the classes): the
masked model is fine-tuned, then ``fxcompress.speedup`` removes the pruned channels; the sped-up
model's accuracy, its max |difference| from the masked model's outputs on the test set and its
parameter count against the dense model's are reported.
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
CHANNELS, SPED_UP = "prune 50% channels +5 (masked)", "prune 50% channels +5, sped up"


def variants(steps: int) -> dict[str, list[dict] | None]:
    return {
        "dense +5": None,
        "prune 80% per layer +5": [{"op_types": ALL, "sparsity_per_layer": 0.8}],
        "prune total 0.9 +5": [{"op_types": ALL, "total_sparsity": 0.9}],
        "QAT 8-bit +5": [{"op_types": ALL, "quant_types": ["input", "weight"], "quant_bits": 8}],
        "QAT 4-bit +5": [{"op_types": ALL, "quant_types": ["input", "weight"], "quant_bits": 4}],
        "QAT 8-bit, start after 5 epochs": [{"op_types": ALL, "quant_types": ["input", "weight"], "quant_bits": 8,
                                             "quant_start_step": steps}],
        CHANNELS: [{"op_types": ALL, "sparsity_per_layer": 0.5, "granularity": "out_channel"},
                   {"exclude": True, "op_names": ["fc2"]}],
    }


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def sped_up(masked: torch.nn.Module, dense: torch.nn.Module, data) -> tuple[torch.nn.Module, dict]:
    """``speedup`` of the fine-tuned masked model, compared with it on the whole test set (eval mode)."""
    masked.eval()
    fast = fxcompress.speedup(masked, example_inputs=(data.x_test,))
    fast.eval()
    ref, out = masked(data.x_test), fast(data.x_test)
    diff = float((ref - out).abs().max())
    assert diff < 1e-4 * max(1.0, float(ref.abs().max())), f"sped-up model differs from the masked one by {diff}"
    return fast, {"max_abs_diff": diff, "max_abs_output": float(ref.abs().max()),
                  "same_predictions": bool(torch.equal(ref.argmax(1), out.argmax(1))),
                  "params_dense": n_params(dense), "params_sped_up": n_params(fast),
                  "params_ratio": n_params(fast) / n_params(dense),
                  "weight_shapes": {n: list(m.weight.shape) for n, m in fast.named_modules() if hasattr(m, "weight")}}


def run_seed(seed: int) -> tuple[dict[str, float], bool, dict]:
    data = load_digits()
    torch.manual_seed(seed)
    dense = SeedModel()
    train_epochs(dense, data, DENSE_EPOCHS, seed=seed, lr=DENSE_LR)
    steps = TUNE_EPOCHS * -(-len(data.y_train) // BATCH)
    acc, trained = {}, {}
    for name, config_list in variants(steps).items():
        if config_list is None:
            model = copy.deepcopy(dense)
        elif name == CHANNELS:  # the example inputs give compress the dependency groups
            model = fxcompress.compress(dense, config_list, example_inputs=(data.x_train[:2],))
        else:
            model = fxcompress.compress(dense, config_list)
        torch.manual_seed(seed + 1000)  # same dropout stream for every variant
        train_epochs(model, data, TUNE_EPOCHS, seed=seed + 1, lr=TUNE_LR)
        acc[name] = evaluate(model, data)
        trained[name] = model
    fast, channels = sped_up(trained[CHANNELS], dense, data)
    acc[SPED_UP] = evaluate(fast, data)
    late = trained["QAT 8-bit, start after 5 epochs"]
    float_equal = all(torch.equal(p, late.get_parameter(n)) for n, p in trained["dense +5"].named_parameters())
    return acc, float_equal, channels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    seeds = parser.parse_args().seeds
    per_seed, equal, channels = {}, [], {}
    for seed in seeds:
        per_seed[seed], eq, channels[seed] = run_seed(seed)
        equal.append(eq)
    names = list(per_seed[seeds[0]])
    mean = {n: statistics.mean(per_seed[s][n] for s in seeds) for n in names}
    ref = mean["dense +5"]
    rows = [[n, *(f"{per_seed[s][n]:.2f}" for s in seeds), f"{mean[n]:.2f}", f"{mean[n] - ref:+.2f}"] for n in names]
    print(tabulate.tabulate(rows, headers=["variant", *(f"seed {s}" for s in seeds), "mean %", "vs dense +5"],
                            tablefmt="github"))
    print(f"QAT with quant_start_step = all steps trains bit-for-bit like float: {all(equal)}")
    for s in seeds:
        c = channels[s]
        print(f"seed {s}: sped-up vs masked max |difference| {c['max_abs_diff']:.1e} (max |output| "
              f"{c['max_abs_output']:.1f}), same predictions: {c['same_predictions']}; params "
              f"{c['params_sped_up']} vs dense {c['params_dense']} ({c['params_ratio']:.3f})")
    path = write_results("quality", {"seeds": seeds, "accuracy": {str(s): per_seed[s] for s in seeds},
                                     "mean": mean, "delta_vs_dense": {n: mean[n] - ref for n in names},
                                     "late_start_equals_float": all(equal),
                                     "channel_speedup": {str(s): channels[s] for s in seeds}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
