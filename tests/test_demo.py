"""The demo: progress while it trains, and the example it ends with runs as printed."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch

import fxcompress
from fxcompress import demo, examples
from fxcompress.examples import Digits, SeedModel

DEPLOY_TITLE = "== deploy the 8-bit QAT model: finalize -> convert (int8) -> export_onnx (onnxruntime) =="
DEPLOY_COLUMNS = ["model", "test accuracy", "size (bytes)", "smaller", "latency (ms)", "faster",
                  "max abs diff vs fake-quant"]


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
    # the deploy step comes last before the example, on the QAT model trained above
    deploy = out[out.index(DEPLOY_TITLE):out.rindex("\n== your turn")]
    assert out.index(DEPLOY_TITLE) > out.index("== 50% pruning + 8-bit QAT")
    lines = deploy.splitlines()
    assert lines[1].startswith("QAT config: 'quant_reduce_range': True (7-bit activations, uint8 levels 0..127), ")
    if _vnni() is False:  # this machine: AVX2, no VNNI
        assert f"because this CPU ({torch.backends.cpu.get_cpu_capability()}) has no VNNI: " in lines[1]
    rows = deploy_rows(deploy)
    assert list(rows) == ["float (the float reference)", "fake-quant (finalize)", "int8 (convert)",
                          "onnxruntime (export_onnx)"]
    accuracy = {label: float(row["test accuracy"].removesuffix("%")) for label, row in rows.items()}
    # the table's models are the ones trained above: the same accuracies as printed there
    float_reference = re.search(r"\(the float reference\): (\d+\.\d\d)%", out)[1]
    qat = re.search(r"fake-quant after 1 epochs of QAT: (\d+\.\d\d)%", out)[1]
    assert (accuracy["float (the float reference)"], accuracy["fake-quant (finalize)"]) == (float(float_reference),
                                                                                            float(qat))
    one_image = 100 / len(small_digits.y_test)
    assert abs(accuracy["int8 (convert)"] - accuracy["fake-quant (finalize)"]) <= 2 * one_image
    assert abs(accuracy["onnxruntime (export_onnx)"] - accuracy["fake-quant (finalize)"]) <= 2 * one_image
    reach = float(re.search(r"log-probabilities on the 64 test images \(which reach (\S+)\)$", deploy, re.M)[1])
    diff = {label: float(row["max abs diff vs fake-quant"]) for label, row in rows.items() if label[0] in "io"}
    assert diff["int8 (convert)"] <= 0.01 * reach and diff["onnxruntime (export_onnx)"] <= 0.03 * reach
    size = {label: int(row["size (bytes)"].replace(",", "")) for label, row in rows.items()}
    assert size["int8 (convert)"] * 3.5 < size["float (the float reference)"]
    assert rows["int8 (convert)"]["smaller"] == f"{size['float (the float reference)'] / size['int8 (convert)']:.2f}x"
    assert all(float(row["latency (ms)"]) > 0 for row in rows.values())
    assert "median of 3 interleaved rounds, one batch of 64 test images, 1 thread" in deploy
    ort = re.search(r"^onnxruntime (\S+) ran the ONNX file \(default optimizations: QDQ fused into integer kernels\): "
                    r"test accuracy (\d+\.\d\d)%, max abs diff vs the fake-quant model (\S+)$", deploy, re.M)
    assert ort is not None, deploy
    assert (float(ort[2]), float(ort[3])) == (accuracy["onnxruntime (export_onnx)"], diff["onnxruntime (export_onnx)"])


def test_without_onnxruntime_the_deploy_step_says_so_and_skips_its_row(small_digits: Digits, monkeypatch,
                                                                        capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    torch.manual_seed(0)
    model = SeedModel()
    gm = fxcompress.compress(model, [{**demo.QAT_CONFIG, "quant_start_step": 2}])
    examples.train_epochs(gm, small_digits, 1, lr=0.01)
    demo.deploy(model, gm, small_digits, rounds=1)
    out = capsys.readouterr().out
    assert "\nonnxruntime is not installed, so the onnxruntime row is skipped (pip install 'fxcompress[onnx]')\n" in out
    rows = deploy_rows(out)
    assert list(rows) == ["float (the float reference)", "fake-quant (finalize)", "int8 (convert)"]
    assert "ran the ONNX file" not in out


def deploy_rows(text: str) -> dict[str, dict[str, str]]:
    """The deploy table (GitHub markdown, as printed) as {model: {column: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == DEPLOY_COLUMNS
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == len(DEPLOY_COLUMNS) for row in rows)
    return {row[0]: dict(zip(DEPLOY_COLUMNS, row, strict=True)) for row in rows}


def _vnni() -> bool | None:
    """Whether the CPU has VNNI (or AMX), None where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(f.read().split()))
    except OSError:
        return None
