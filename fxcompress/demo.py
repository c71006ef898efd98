"""``python -m fxcompress demo``: the spec's model and configs, end to end on the digits data.

Training prints a line per epoch (step, mean loss, elapsed seconds), so a slow machine is never
silent; the demo ends with :data:`EXAMPLE`, a train-then-evaluate script the user can copy.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from fxcompress.api import compress, plan, select
from fxcompress.examples import SEED_CONFIGS, Digits, SeedModel, evaluate, load_digits
from fxcompress.report import calibration, summary
from fxcompress.training import get_step

__all__ = ["EXAMPLE", "run_demo"]

TUNE_LR = 0.01  # fine-tuning after compression at a fifth of the training rate

#: What to copy: compress, an ordinary training loop, evaluation in eval mode (a test runs it).
EXAMPLE = '''\
import torch, torch.nn.functional as F, fxcompress
from fxcompress.examples import SeedModel, load_digits

data = load_digits()  # scikit-learn's 8x8 digits as 1x28x28 tensors, split 70/30
gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                                        "quant_types": ["input", "weight"], "quant_bits": 8, "quant_start_step": 20}])
opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
for epoch in range(3):  # your usual loop: the masks and the fake quantization are in gm's forward
    gm.train()
    for i in range(0, len(data.y_train), 64):
        opt.zero_grad()
        F.nll_loss(gm(data.x_train[i:i + 64]), data.y_train[i:i + 64]).backward()
        opt.step()
    gm.eval()
    with torch.no_grad():
        accuracy = (gm(data.x_test).argmax(1) == data.y_test).float().mean()
    print(f"epoch {epoch}: test accuracy {accuracy:.2%}")
print(fxcompress.summary(gm))
'''


def _show(title: str, text: str) -> None:
    # the demo is a command-line program: its output is the product, so it prints
    print(f"\n== {title} ==" + (f"\n{text}" if text else ""), flush=True)


def train_with_progress(model: torch.nn.Module, data: Digits, epochs: int, label: str, seed: int = 0,
                        lr: float = 0.05, batch_size: int = 64) -> None:
    """``examples.train_epochs`` (SGD with momentum 0.9, the same seeded order), printing after each
    epoch: ``[label] epoch e/E  step s  loss l  t s``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    start, step = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(data.y_train), generator=gen)
        total = 0.0
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            opt.zero_grad()
            loss = F.nll_loss(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            step += 1
        print(f"  [{label}] epoch {epoch}/{epochs}  step {step}  loss {total / len(order):.4f}  "
              f"{time.perf_counter() - start:.1f}s", flush=True)


def run_demo(quick: bool = False) -> None:
    """Plan tables for the spec's config lists, then pruning, QAT and both on the digits data."""
    torch.manual_seed(0)
    model = SeedModel()
    for title, config_list in SEED_CONFIGS.items():
        _show(f"spec example '{title}': {config_list}",
              f"selected layers: {select(model, config_list)}\n{summary(plan(model, config_list))}")
    data = load_digits()
    dense_epochs, tune_epochs = (2, 1) if quick else (15, 5)
    _show("training (one line per epoch: steps so far, mean loss, seconds)", "")
    train_with_progress(model, data, dense_epochs, "dense")
    dense = evaluate(model, data)
    longer = copy.deepcopy(model)
    train_with_progress(longer, data, tune_epochs, "float reference", seed=1, lr=TUNE_LR)
    reference = evaluate(longer, data)
    _show("dense baseline (scikit-learn digits, 28x28, stratified 70/30)",
          f"{dense_epochs} epochs: {dense:.2f}%   +{tune_epochs} epochs (the float reference): {reference:.2f}%")
    _pruning(model, data, tune_epochs, reference)
    _qat(model, data, tune_epochs, reference)
    _pruning_and_qat(model, data, tune_epochs, reference)
    _show("your turn: compress, train, evaluate (copy this into a file and run it)", EXAMPLE)


def _pruning(model: torch.nn.Module, data: Digits, epochs: int, reference: float) -> None:
    pruned = compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.8},
                              {"exclude": True, "op_names": ["fc2"]}])
    before = evaluate(pruned, data)
    train_with_progress(pruned, data, epochs, "80% pruned", seed=1, lr=TUNE_LR)
    _show("80% pruning (conv1, conv2, fc1)",
          f"accuracy right after masking: {before:.2f}%   after {epochs} epochs fine-tuning: "
          f"{evaluate(pruned, data):.2f}% (float reference {reference:.2f}%)\n{summary(pruned)}")


def _qat(model: torch.nn.Module, data: Digits, epochs: int, reference: float) -> None:
    steps_per_epoch = -(-len(data.y_train) // 64)
    qat = compress(model, [{"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8,
                            "quant_start_step": steps_per_epoch}])
    train_with_progress(qat, data, epochs, "8-bit QAT", seed=1, lr=TUNE_LR)
    _show(f"8-bit QAT (input+weight), quantization from step {steps_per_epoch}",
          f"float reference {reference:.2f}%   fake-quant after {epochs} epochs of QAT: "
          f"{evaluate(qat, data):.2f}%   (step counter: {get_step(qat)})\n{summary(qat)}\n"
          f"calibration of fc2 (NNI's export fields): {_short(calibration(qat)['fc2'])}")


def _pruning_and_qat(model: torch.nn.Module, data: Digits, epochs: int, reference: float) -> None:
    both = compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                             "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    train_with_progress(both, data, epochs, "50% pruned + 8-bit QAT", seed=1, lr=TUNE_LR)
    _show("50% pruning + 8-bit QAT (input, weight, output) in one sub-config",
          f"float reference {reference:.2f}%   pruned + fake-quant after {epochs} epochs: "
          f"{evaluate(both, data):.2f}%\n{summary(both)}")


def _short(fields: dict) -> dict:
    return {k: ([round(x, 5) for x in v[:3]] + ["..."] if isinstance(v, list) and len(v) > 3 else v)
            for k, v in fields.items()}
