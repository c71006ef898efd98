"""The plan table, its totals, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fxcompress
from fxcompress.__main__ import load_model, main, plan_table

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


# -- model sources, the dry run's allocation, one-line errors (issue 10 item 5) --------------------

TWO_LAYERS = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, small_first=False):
            super().__init__()
            torch.manual_seed(0)
            self.layer_1 = nn.Linear(50, 10, bias=False)
            self.layer_2 = nn.Linear(10, 100, bias=False)
            if small_first:
                with torch.no_grad():
                    self.layer_1.weight.mul_(1e-3)

        def forward(self, x):
            return self.layer_2(self.layer_1(x))

    class SmallFirst(Net):
        def __init__(self):
            super().__init__(small_first=True)
""")


def table_rows(text: str) -> dict[str, list[str]]:
    """The plan table's rows by layer name: the cells after the name."""
    rows = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


SPARSITY = 6  # the "sparsity" column, counted after the name


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def write_json(tmp_path, config_list: list):
    return write(tmp_path, "cfg.json", json.dumps(config_list))


def expected_allocation(model: torch.nn.Module, total: float) -> dict[str, str]:
    """Per Linear layer, the sparsity column under ``total_sparsity``: the globally smallest |w| go."""
    weights = {n: m.weight.detach().abs().flatten() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    everything = torch.cat(list(weights.values()))
    k = int(total * everything.numel())
    threshold = everything.sort().values[k - 1]
    assert int((everything == threshold).sum()) == 1  # no tie at the threshold: the counts are exact
    return {n: f"{int((w <= threshold).sum()) / w.numel():.2%}" for n, w in weights.items()}


def test_cli_plan_shows_the_total_sparsity_allocation(tmp_path, capsys) -> None:
    src = write(tmp_path, "net.py", TWO_LAYERS)
    cfg = write(tmp_path, "cfg.json", json.dumps([{"op_types": ["Linear"], "total_sparsity": 0.8}]))
    assert main(["plan", "--model", f"{src}:Net", "--config", str(cfg)]) == 0
    rows = table_rows(capsys.readouterr().out)
    expected = expected_allocation(load_model(f"{src}:Net"), 0.8)  # floor(0.8 * 1500) = 1200, globally
    assert {n: rows[n][SPARSITY] for n in expected} == expected
    assert expected["layer_1"] != "80.00%"  # uneven: the allocation is visible
    assert rows["TOTAL"][SPARSITY] == "80.00%"


def test_cli_plan_allocation_under_a_cap(tmp_path, capsys) -> None:
    # the spec's example: 500 and 1000 weights, total 0.8, cap 0.9; layer_1's weights are the
    # 500 smallest, so it is held at floor(0.9 * 500) = 450 and layer_2 gives the other 750
    src = write(tmp_path, "net.py", TWO_LAYERS)
    cfg = write(tmp_path, "cfg.json", json.dumps([{"op_types": ["Linear"], "total_sparsity": 0.8,
                                                   "max_sparsity_per_layer": 0.9}]))
    assert main(["plan", "--model", f"{src}:SmallFirst", "--config", str(cfg)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert (rows["layer_1"][SPARSITY], rows["layer_2"][SPARSITY]) == ("90.00%", "75.00%")


def test_cli_plan_unreachable_cap_is_one_error_line(tmp_path, capsys) -> None:
    src = write(tmp_path, "net.py", TWO_LAYERS)
    cfg = write(tmp_path, "cfg.json", json.dumps([{"op_types": ["Linear"], "total_sparsity": 0.8,
                                                   "max_sparsity_per_layer": 0.5}]))
    assert main(["plan", "--model", f"{src}:Net", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: config_list[0]: total_sparsity 0.8 asks for 1200 pruned weights but max_sparsity_per_layer allows "
        "at most 750; raise the caps or lower total_sparsity"]


def test_plan_table_leaves_the_model_unchanged() -> None:
    model = SeedModel()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text = plan_table(model, [{"op_types": ["Conv2d", "Linear"], "total_sparsity": 0.5}])
    assert table_rows(text)["TOTAL"][SPARSITY] == "50.00%"
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [type(m).__name__ for m in model.children()] == ["Conv2d", "Conv2d", "Dropout2d", "Dropout", "Linear",
                                                             "Linear"]


def test_cli_plan_timm(tmp_path, capsys) -> None:
    timm = pytest.importorskip("timm")
    cfg = write_json(tmp_path, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.3}])
    assert main(["plan", "--model", "timm:test_resnet", "--config", str(cfg)]) == 0
    rows = table_rows(capsys.readouterr().out)
    convs = {n: m.weight.numel() for n, m in timm.create_model("test_resnet").named_modules()
             if isinstance(m, torch.nn.Conv2d)}
    assert [n for n in rows if n != "TOTAL"] == list(convs)
    for name, n in convs.items():
        assert rows[name][SPARSITY] == f"{int(0.3 * n) / n:.2%}", name  # floor(0.3 n) of n


@pytest.mark.parametrize(("name", "sizes"), [
    ("BertForSequenceClassification", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "intermediate_size": 64, "vocab_size": 100}),
    ("LlamaForCausalLM", {"hidden_size": 32, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}),
    ("T5ForConditionalGeneration", {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2,
                                    "num_decoder_layers": 2}),
    ("ViTForImageClassification", {"hidden_size": 32, "image_size": 32, "patch_size": 8}),
    ("DistilBertModel", {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4}),
    ("GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_inner": 64, "vocab_size": 50257}),  # eos id 50256 fits
])
def test_hf_models_are_built_from_small_configs(name: str, sizes: dict) -> None:
    pytest.importorskip("transformers")
    model = load_model(f"hf:{name}")
    assert type(model).__name__ == name
    assert {k: getattr(model.config, k) for k in sizes} == sizes
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_cli_plan_hf(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    cfg = write_json(tmp_path, [{"op_types": ["Linear"], "total_sparsity": 0.5}])
    assert main(["plan", "--model", "hf:BertForSequenceClassification", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    rows = table_rows(out)
    torch.manual_seed(0)  # the CLI builds its random weights under seed 0
    expected = expected_allocation(load_model("hf:BertForSequenceClassification"), 0.5)
    assert len(expected) == 14 and [n for n in rows if n != "TOTAL"] == list(expected)
    assert {n: rows[n][SPARSITY] for n in expected} == expected
    assert len(set(expected.values())) > 3  # an uneven allocation, not 50% everywhere
    assert rows["TOTAL"][SPARSITY] == "50.00%"
    assert all(line.startswith("warning: ") for line in err.splitlines())


@pytest.mark.parametrize(("spec", "message"), [
    ("torchvision:resnet181", "--model torchvision:resnet181: torchvision has no model 'resnet181'; did you mean "
                              "'resnet18', 'resnet101', 'resnet152'?"),
    ("timm:resnet181", "--model timm:resnet181: timm has no model 'resnet181'; did you mean 'resnet18', "
                       "'resnet18d', 'resnet101'?"),
    ("hf:BertForSequenceClasification", "--model hf:BertForSequenceClasification: transformers has no class "
     "'BertForSequenceClasification'; did you mean 'BertForSequenceClassification', "
     "'IBertForSequenceClassification', 'BartForSequenceClassification'?"),
    ("hf:AutoModel", "--model hf:AutoModel: not a transformers model class with a config_class (use a concrete "
                     "class such as BertForSequenceClassification, not an Auto* class)"),
    ("nets/missing.py:Net", "--model nets/missing.py:Net: no file nets/missing.py (expected 'torchvision:NAME', "
                            "'timm:NAME', 'hf:ClassName' or 'path/to/file.py:ClassName')"),
    ("resnet18", "--model 'resnet18': expected 'torchvision:NAME', 'timm:NAME', 'hf:ClassName' or "
                 "'path/to/file.py:ClassName'"),
])
def test_cli_bad_model_is_one_error_line(spec: str, message: str, tmp_path, capsys) -> None:
    cfg = write_json(tmp_path, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    assert main(["plan", "--model", spec, "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


def test_cli_file_model_without_the_class(tmp_path, capsys) -> None:
    src = write(tmp_path, "net.py", TWO_LAYERS)
    cfg = write_json(tmp_path, [{"op_types": ["Linear"]}])
    assert main(["plan", "--model", f"{src}:Nett", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --model {src}:Nett: {src} defines no 'Nett'; "
                                                     "did you mean 'Net'?"]


@pytest.mark.parametrize("package", ["timm", "transformers"])
def test_cli_missing_package_is_one_error_line(package: str, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    spec = {"timm": "timm:resnet18", "transformers": "hf:BertModel"}[package]
    cfg = write_json(tmp_path, [{"op_types": ["Linear"]}])
    assert main(["plan", "--model", spec, "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --model {spec}: the {package} package is not installed; run `pip install {package}`"]


def test_cli_missing_config_file_is_one_error_line_without_traceback(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    run = subprocess.run([sys.executable, "-m", "fxcompress", "plan", "--model", "torchvision:resnet18",
                          "--config", str(missing)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [f"error: --config {missing}: no such file"]
