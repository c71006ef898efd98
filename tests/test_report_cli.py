"""The plan table, its totals, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import fxcompress
from fxcompress.__main__ import main

from .fixtures import SeedModel

CFG = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5},
       {"op_names": ["fc1"], "total_sparsity": 0.8},
       {"op_names": ["conv2"], "quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 4},
        "quant_start_step": 10}]


def test_report_rows() -> None:
    rows = fxcompress.report(fxcompress.compress(SeedModel(), CFG))
    assert [(r.name, r.type_name, r.params, r.config_index, r.overridden) for r in rows] == [
        ("conv1", "Conv2d", 288, 0, ()), ("conv2", "Conv2d", 18432, 2, (0,)), ("fc1", "Linear", 1179648, 1, ())]
    conv1, conv2, fc1 = rows
    assert (conv1.target, conv1.pruned, conv1.achieved_sparsity) == ("0.5 (level)", 144, 0.5)
    assert (fc1.target, fc1.pruned) == ("total 0.8", 943718)  # floor(0.8 * 1179648)
    assert conv2.pruned is None and conv2.quant == "weight int4 ch-sym, input uint8 aff" and conv2.start_step == 10


def test_plan_is_a_dry_run() -> None:
    gm = fxcompress.plan(SeedModel(), CFG)
    rows = fxcompress.report(gm)
    assert [r.achieved_sparsity for r in rows] == [None, None, None]
    assert not any(n.endswith("mask") for n, _ in gm.named_buffers())


def test_summary_has_totals() -> None:
    text = fxcompress.summary(fxcompress.compress(SeedModel(), CFG))
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "layer"
    total = lines[-1]
    assert "TOTAL" in total and "3 layers" in total and "1198368" in total  # 288 + 18432 + 1179648 weights
    pruned = 144 + 943718
    assert f"{pruned / 1198368:.2%}" in total and "1 quantized" in total


def test_cli_plan_torchvision(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps([{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5},
                               {"exclude": True, "op_names": ["conv1"]}]))
    assert main(["plan", "--model", "torchvision:resnet18", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("| Conv2d") == 20 and "excluded" in out and "21 layers" not in out and "20 layers" in out


def test_cli_plan_file_model(tmp_path, capsys) -> None:
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        class Net(nn.Sequential):
            def __init__(self):
                super().__init__(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    """))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("- op_types: [Linear]\n  quant_types: [input, weight]\n  quant_bits: 8\n")
    assert main(["plan", "--model", f"{src}:Net", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "| 0       | Linear" in out and "| 2       | Linear" in out and "2 quantized" in out


def test_cli_reports_config_errors(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps([{"op_names": ["fc9"]}]))
    assert main(["plan", "--model", "torchvision:resnet18", "--config", str(cfg)]) == 2
    assert "config_list[0]['op_names']: no module named 'fc9'" in capsys.readouterr().err


def test_cli_help_documents_all_verbs() -> None:
    out = subprocess.run([sys.executable, "-m", "fxcompress", "--help"], capture_output=True, text=True, check=True)
    assert "plan" in out.stdout and "demo" in out.stdout


@pytest.mark.parametrize("verb", ["plan", "demo"])
def test_cli_verb_help(verb: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
