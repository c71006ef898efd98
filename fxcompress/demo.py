"""``python -m fxcompress demo``: the spec's model and configs, end to end on the digits data."""

from __future__ import annotations

import copy

import torch

from fxcompress.api import compress, plan, select
from fxcompress.examples import SEED_CONFIGS, SeedModel, evaluate, load_digits, train_epochs
from fxcompress.report import calibration, summary
from fxcompress.training import get_step

__all__ = ["run_demo"]

TUNE_LR = 0.01  # fine-tuning after compression at a fifth of the training rate


def _show(title: str, text: str) -> None:
    # the demo is a command-line program: its output is the product, so it prints
    print(f"\n== {title} ==\n{text}")


def run_demo(quick: bool = False) -> None:
    """Plan tables for the spec's config lists, then pruning, QAT and both on the digits data."""
    torch.manual_seed(0)
    model = SeedModel()
    for title, config_list in SEED_CONFIGS.items():
        _show(f"spec example '{title}': {config_list}",
              f"selected layers: {select(model, config_list)}\n{summary(plan(model, config_list))}")

    data = load_digits()
    dense_epochs, tune_epochs = (2, 1) if quick else (15, 5)
    train_epochs(model, data, dense_epochs)
    dense = evaluate(model, data)
    longer = copy.deepcopy(model)
    train_epochs(longer, data, tune_epochs, seed=1, lr=TUNE_LR)
    reference = evaluate(longer, data)
    _show("dense baseline (scikit-learn digits, 28x28, stratified 70/30)",
          f"{dense_epochs} epochs: {dense:.2f}%   +{tune_epochs} epochs (the float reference): {reference:.2f}%")

    pruned = compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.8},
                              {"exclude": True, "op_names": ["fc2"]}])
    before = evaluate(pruned, data)
    train_epochs(pruned, data, tune_epochs, seed=1, lr=TUNE_LR)
    _show("80% pruning (conv1, conv2, fc1)",
          f"accuracy right after masking: {before:.2f}%   after {tune_epochs} epochs fine-tuning: "
          f"{evaluate(pruned, data):.2f}% (float reference {reference:.2f}%)\n{summary(pruned)}")

    steps_per_epoch = -(-len(data.y_train) // 64)
    qat_config = [{"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8,
                   "quant_start_step": steps_per_epoch}]
    qat = compress(model, qat_config)
    train_epochs(qat, data, tune_epochs, seed=1, lr=TUNE_LR)
    _show(f"8-bit QAT (input+weight), quantization from step {steps_per_epoch}",
          f"float reference {reference:.2f}%   fake-quant after {tune_epochs} epochs of QAT: "
          f"{evaluate(qat, data):.2f}%   (step counter: {get_step(qat)})\n{summary(qat)}\n"
          f"calibration of fc2 (NNI's export fields): {_short(calibration(qat)['fc2'])}")

    both = compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                             "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    train_epochs(both, data, tune_epochs, seed=1, lr=TUNE_LR)
    _show("50% pruning + 8-bit QAT (input, weight, output) in one sub-config",
          f"float reference {reference:.2f}%   pruned + fake-quant after {tune_epochs} epochs: "
          f"{evaluate(both, data):.2f}%\n{summary(both)}")


def _short(fields: dict) -> dict:
    return {k: ([round(x, 5) for x in v[:3]] + ["..."] if isinstance(v, list) and len(v) > 3 else v)
            for k, v in fields.items()}
