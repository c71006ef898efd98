"""The demo: progress while it trains, and the example it ends with runs as printed."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from fxcompress import demo, examples
from fxcompress.examples import Digits, SeedModel


@pytest.fixture(scope="module")
def small_digits() -> Digits:
    """256 training and 64 test images of the real data: the same code paths, a fraction of the time."""
    data = examples.load_digits()
    return Digits(data.x_train[:256], data.y_train[:256], data.x_test[:64], data.y_test[:64])


def test_training_prints_step_loss_and_seconds_each_epoch(small_digits: Digits, capsys) -> None:
    torch.manual_seed(0)
    model = SeedModel()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # dropout draws from the global generator
    demo.train_with_progress(model, small_digits, 2, "dense", seed=3, lr=0.02)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines, 1):  # 256 / 64 = 4 steps per epoch
        match = re.fullmatch(rf"  \[dense\] epoch {epoch}/2  step {4 * epoch}  loss (\d+\.\d{{4}})  (\d+\.\d)s", line)
        assert match is not None, line
    # the same training as examples.train_epochs, only louder
    torch.manual_seed(1)
    examples.train_epochs(reference, small_digits, 2, seed=3, lr=0.02)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_the_example_runs_as_printed(small_digits: Digits, monkeypatch, capsys) -> None:
    assert len(demo.EXAMPLE.splitlines()) <= 18  # a screenful to copy
    monkeypatch.setattr(examples, "load_digits", lambda: small_digits)
    exec(compile(demo.EXAMPLE, "<demo example>", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert [re.fullmatch(r"epoch (\d): test accuracy \d+\.\d\d%", line)[1] for line in out[:3]] == ["0", "1", "2"]
    rows = [line.split("|")[1].strip() for line in out[5:10]]
    assert rows == ["conv1", "conv2", "fc1", "fc2", "TOTAL"]
    assert all("50.00%" in line and "weight int8" in line for line in out[5:9])


def test_quick_demo_shows_progress_and_ends_with_the_example(small_digits: Digits, monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "load_digits", lambda: small_digits)
    demo.run_demo(quick=True)
    out = capsys.readouterr().out
    progress = re.findall(r"^  \[([^\]]+)\] epoch (\d+)/(\d+)  step (\d+)  loss \d+\.\d{4}  \d+\.\ds$", out, re.M)
    assert progress == [("dense", "1", "2", "4"), ("dense", "2", "2", "8"), ("float reference", "1", "1", "4"),
                        ("80% pruned", "1", "1", "4"), ("8-bit QAT", "1", "1", "4"),
                        ("50% pruned + 8-bit QAT", "1", "1", "4")]
    assert out.endswith(demo.EXAMPLE + "\n")
