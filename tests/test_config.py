"""SPEC.md §1 and §3: parsing, every rejection before looking at the model, config files."""

from __future__ import annotations

import json
import re
import sys
import warnings

import pytest
import torch

import fxcompress
from fxcompress import ConfigError, load_config, parse_config
from fxcompress.settings import KNOWN_TYPE_NAMES, QuantSetting, ratio_floor, suggest_type_name

from .fixtures import TwoLayers

C = {"op_types": ["Conv2d"]}
Q = {"op_types": ["Conv2d"], "quant_types": ["input", "weight"], "quant_bits": 8}

REJECTIONS = [
    # (config_list, expected message, as a regex)
    ({"op_types": ["Conv2d"]}, r"config_list: expected a list of dicts, got dict"),
    ("conv", r"config_list: expected a list of dicts, got str"),
    ([], r"config_list: the list is empty"),
    ([C, 3], r"config_list\[1\]: expected a dict, got int"),
    ([{"op_types": ["Conv2d"], "sparsity_per_layr": 0.5}],
     r"config_list\[0\]: unknown key 'sparsity_per_layr'; did you mean 'sparsity_per_layer'\?"),
    ([{"sparsity_per_layer": 0.5}], r"config_list\[0\]: no selector; add 'op_types', 'op_names' or"),
    ([{"op_types": "Conv2d"}], r"config_list\[0\]\['op_types'\]: expected a list of strings, got the bare "
                               r"string 'Conv2d'; write \['Conv2d'\]"),
    ([{"op_names": "fc1"}], r"config_list\[0\]\['op_names'\]: .*bare string 'fc1'"),
    ([{"op_partial_names": "layer"}], r"config_list\[0\]\['op_partial_names'\]: .*bare string"),
    ([{"op_types": []}], r"config_list\[0\]\['op_types'\]: the list is empty"),
    # §2.1: any class name parses (a subclass answers to its own name); only a wrong-case spelling
    # of a known name or a string that cannot be a class name is rejected before seeing the model.
    ([{"op_types": ["conv2d"]}], r"config_list\[0\]\['op_types'\]: 'conv2d' is not a layer type name "
                                 r"\(class names are case-sensitive\); did you mean 'Conv2d'\?"),
    ([{"op_types": ["Conv2d", "LINEAR"]}], r"\['op_types'\]: 'LINEAR' is not a layer type name .*did you mean 'Linear'\?"),
    ([{"op_types": ["Default"]}], r"\['op_types'\]: 'Default' is not a layer type name .*did you mean 'default'\?"),
    ([{"op_types": ["Conv 2d"]}], r"config_list\[0\]\['op_types'\]: 'Conv 2d' is not a layer class name \(expected "
                                  r"an identifier .*\); did you mean 'Conv2d'\? fxcompress compresses Conv1d, Conv2d"),
    ([{"op_types": ["torch.nn."]}], r"\['op_types'\]: 'torch.nn.' is not a layer class name"),
    ([{**C, "exclude": True, "sparsity_per_layer": 0.5}],
     r"config_list\[0\]: 'exclude' cannot be combined with 'sparsity_per_layer'"),
    ([{**C, "exclude": True, "quant_types": ["output"], "quant_bits": 8}],
     r"'exclude' cannot be combined with 'quant_types'"),
    ([{**C, "exclude": False}], r"config_list\[0\]\['exclude'\]: expected True, got False"),
    ([{**C, "exclude": 1}], r"config_list\[0\]\['exclude'\]: expected True, got 1"),
    ([{**C, "sparsity": 0.5, "sparsity_per_layer": 0.5}], r"'sparsity' and 'sparsity_per_layer' are the same"),
    ([{**C, "sparsity_per_layer": 0.5, "total_sparsity": 0.5}],
     r"'sparsity_per_layer' and 'total_sparsity' exclude each other"),
    ([{**C, "sparsity_per_layer": 1.5}], r"config_list\[0\]\['sparsity_per_layer'\]: expected a number in "
                                         r"\[0, 1\), got 1.5"),
    ([{**C, "sparsity_per_layer": 1.0}], r"\['sparsity_per_layer'\]: expected a number in \[0, 1\), got 1.0"),
    ([{**C, "sparsity_per_layer": -0.1}], r"expected a number in \[0, 1\), got -0.1"),
    ([{**C, "sparsity_per_layer": True}], r"\['sparsity_per_layer'\]: expected a number in \[0, 1\), got True"),
    ([{**C, "total_sparsity": "0.5"}], r"\['total_sparsity'\]: expected a number in \[0, 1\), got '0.5'"),
    ([{**C, "total_sparsity": float("nan")}], r"\['total_sparsity'\]: expected a number"),
    ([{**C, "sparsity_per_layer": 0.5, "max_sparsity_per_layer": 0.9}],
     r"\['max_sparsity_per_layer'\]: only meaningful with 'total_sparsity'"),
    ([{**C, "total_sparsity": 0.5, "max_sparsity_per_layer": 0.0}],
     r"\['max_sparsity_per_layer'\]: expected a number in \(0, 1\], got 0.0"),
    ([{**C, "total_sparsity": 0.5, "max_sparsity_per_layer": {"conv1": 1.2}}],
     r"\['max_sparsity_per_layer'\]\['conv1'\]: expected a number in \(0, 1\], got 1.2"),
    ([{**C, "quant_types": [], "quant_bits": 8}], r"\['quant_types'\]: expected a non-empty list"),
    ([{**C, "quant_types": ["input", "weight", "input"], "quant_bits": 8}], r"\['quant_types'\]: repeated entries"),
    ([{**C, "quant_types": ["inputs", "weight"], "quant_bits": 8}],
     r"unknown quantization type 'inputs'; did you mean 'input'\?"),
    ([{**C, "quant_types": ["weight"], "quant_bits": 8}], r"'weight' and 'input' are always quantized together"),
    ([{**C, "quant_types": "input", "quant_bits": 8}], r"'weight' and 'input' are always quantized together"),
    ([{**C, "quant_types": ["input", "weight"]}], r"config_list\[0\]: 'quant_types' needs 'quant_bits'"),
    ([{**C, "quant_types": ["input", "weight"], "quant_bits": {"weight": 8}}],
     r"\['quant_bits'\]: dict keys \['weight'\] must equal quant_types \['input', 'weight'\]"),
    ([{**C, "quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8, "output": 8}}],
     r"\['quant_bits'\]: dict keys .* must equal quant_types"),
    ([{**Q, "quant_bits": 1}], r"config_list\[0\]\['quant_bits'\]: expected an int bit width in 2..16, got 1"),
    ([{**Q, "quant_bits": 17}], r"\['quant_bits'\]: expected an int bit width in 2..16, got 17"),
    ([{**Q, "quant_bits": {"input": 8, "weight": 32}}], r"\['quant_bits'\]\['weight'\]: expected an int bit width"),
    ([{**Q, "quant_bits": 8.0}], r"expected an int bit width in 2..16, got 8.0"),
    ([{**C, "quant_bits": 8}], r"config_list\[0\]\['quant_bits'\]: only meaningful with 'quant_types'"),
    ([{**C, "quant_start_step": 3}], r"\['quant_start_step'\]: only meaningful with 'quant_types'"),
    ([{**C, "quant_scheme": "per_tensor_affine"}], r"\['quant_scheme'\]: only meaningful with 'quant_types'"),
    ([{**C, "quant_dtype": "int"}], r"\['quant_dtype'\]: only meaningful with 'quant_types'"),
    ([{**Q, "quant_start_step": -1}], r"\['quant_start_step'\]: expected an int >= 0, got -1"),
    ([{**Q, "quant_start_step": 2.5}], r"\['quant_start_step'\]: expected an int >= 0, got 2.5"),
    ([{**Q, "quant_scheme": "per_tensor_asymmetric"}],
     r"\['quant_scheme'\]: expected one of .*got 'per_tensor_asymmetric' \(did you mean 'per_tensor_symmetric'\?\)"),
    ([{**Q, "quant_scheme": {"output": "per_tensor_affine"}}], r"\['quant_scheme'\]: dict keys \['output'\] must be among"),
    # Activations are quantized per tensor: a per-channel scheme for them is a parse-time error.
    ([{**Q, "quant_scheme": "per_channel_symmetric"}],
     r"^config_list\[0\]\['quant_scheme'\]: 'per_channel_symmetric' applies to 'input', but activations are "
     r"quantized per tensor; write \{'weight': 'per_channel_symmetric'\}"),
    ([{**C, "quant_types": ["output"], "quant_bits": 8, "quant_scheme": "per_channel_affine"}],
     r"^config_list\[0\]\['quant_scheme'\]: 'per_channel_affine' applies to 'output', but activations are "
     r"quantized per tensor; use 'per_tensor_affine'$"),
    ([{**Q, "quant_scheme": {"weight": "per_channel_affine", "input": "per_channel_affine"}}],
     r"^config_list\[0\]\['quant_scheme'\]\['input'\]: 'per_channel_affine': activations are quantized per "
     r"tensor; use 'per_tensor_affine'"),
    ([{**Q, "quant_types": ["input", "weight", "output"], "quant_scheme": {"output": "per_channel_symmetric"}}],
     r"^config_list\[0\]\['quant_scheme'\]\['output'\]: 'per_channel_symmetric': activations are quantized"),
    ([{**Q, "quant_dtype": "int8"}], r"\['quant_dtype'\]: expected one of int, uint, got 'int8'"),
    ([{**C, "sparsity_per_layer": 0.5, "criterion": "l3"}], r"\['criterion'\]: expected one of level, l1, l2"),
    ([{**C, "sparsity_per_layer": 0.5, "granularity": "4:2"}], r"\['granularity'\]: expected 'element', 'out_channel'"),
    ([{**C, "granularity": "2:4", "sparsity_per_layer": 0.5}], r"'2:4' fixes the sparsity at 2/4"),
    ([{**C, "criterion": "l1"}], r"config_list\[0\]: pruning keys without a sparsity"),
    ([{**C, "total_sparsity": 0.5, "granularity": "out_channel"}], r"'total_sparsity' ranks single weights"),
    ([{**C, "sparsity_per_layer": 0.5, "criterion": "fpgm"}], r"'fpgm' ranks whole filters"),
    ([{**C, "sparsity_per_layer": 0.5, "seed": -1}], r"\['seed'\]: expected an int >= 0"),
]


@pytest.mark.parametrize(("config_list", "message"), REJECTIONS)
def test_rejections_name_the_place(config_list: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config_list)


@pytest.mark.parametrize("type_name", ["BatchNorm2d", "Conv2dSame", "NonDynamicallyQuantizableLinear",
                                       "timm.layers.Linear", "MyLinear"])
def test_any_class_name_parses_in_op_types(type_name: str) -> None:
    # §2.1: a layer answers to its own class name too, so names outside COMPRESSIBLE_TYPES are kept
    # as written; whether the model has such a layer is checked against the model (matching).
    (sub,) = parse_config([{"op_types": [type_name, "Linear"], "sparsity_per_layer": 0.5}])
    assert sub.op_types == (type_name, "Linear")


def test_default_expands_to_the_compressible_types_after_the_named_ones() -> None:
    (sub,) = parse_config([{"op_types": ["Conv2dSame", "default", "Linear"]}])
    assert sub.op_types == ("Conv2dSame", "Linear", "Conv1d", "Conv2d", "Conv3d")


def test_per_channel_weight_scheme_parses() -> None:
    (sub,) = parse_config([{**Q, "quant_scheme": {"weight": "per_channel_affine", "input": "per_tensor_symmetric"}}])
    assert sub.quant.weight.scheme == "per_channel_affine" and sub.quant.input.scheme == "per_tensor_symmetric"


def test_per_channel_activation_scheme_leaves_an_inplace_model_untouched() -> None:
    model = TwoLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"config_list\[0\]\['quant_scheme'\]"):
        fxcompress.compress(model, [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 8,
                                     "quant_scheme": "per_channel_symmetric"}], inplace=True)
    assert [name for name, _ in model.named_modules()] == modules
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_error_names_the_right_index() -> None:
    with pytest.raises(ConfigError, match=r"^config_list\[2\]\['quant_bits'\]"):
        parse_config([C, C, {**Q, "quant_bits": 99}])


def test_sparsity_is_an_alias_with_a_future_warning_pointing_at_the_caller() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        subs = parse_config([{**C, "sparsity": 0.3}])
    assert subs[0].prune.sparsity_per_layer == 0.3
    assert [w.category for w in caught] == [FutureWarning]
    assert "config_list[0]['sparsity']" in str(caught[0].message)
    assert caught[0].filename == __file__


def test_resolved_values_and_defaults() -> None:
    (sub,) = parse_config([{"op_types": ["default"], "quant_types": ["input", "weight", "output"],
                            "quant_bits": {"input": 8, "weight": 4, "output": 6}, "quant_start_step": 7,
                            "quant_scheme": {"input": "per_tensor_symmetric"}}])
    assert sub.op_types == ("Conv1d", "Conv2d", "Conv3d", "Linear")
    assert sub.quant.weight == QuantSetting(4, "per_channel_symmetric", "int")
    assert sub.quant.input == QuantSetting(8, "per_tensor_symmetric", "uint")
    assert sub.quant.output == QuantSetting(6, "per_tensor_affine", "uint")
    assert sub.quant.start_step == 7
    assert sub.prune is None and not sub.exclude


def test_quant_ranges() -> None:
    assert (QuantSetting(8, "per_tensor_affine", "uint").qmin, QuantSetting(8, "per_tensor_affine", "uint").qmax) \
        == (0, 255)
    assert (QuantSetting(8, "per_tensor_affine", "int").qmin, QuantSetting(8, "per_tensor_affine", "int").qmax) \
        == (-127, 127)
    assert (QuantSetting(2, "per_tensor_affine", "int").qmin, QuantSetting(2, "per_tensor_affine", "int").qmax) \
        == (-1, 1)


@pytest.mark.parametrize(("ratio", "n", "expected"), [(0.29, 100, 29), (0.57, 100, 57), (0.8, 500, 400),
                                                      (0.8, 1000, 800), (0.1, 3, 0), (0.5, 7, 3)])
def test_ratio_floor_is_float_safe(ratio: float, n: int, expected: int) -> None:
    assert ratio_floor(ratio, n) == expected


def test_load_json_and_yaml(tmp_path) -> None:
    cfg = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (tmp_path / "c.yaml").write_text("- op_types: [Conv2d]\n  sparsity_per_layer: 0.5\n")
    assert load_config(tmp_path / "c.json") == cfg
    assert load_config(tmp_path / "c.yaml") == cfg


def test_yaml_without_pyyaml_says_how_to_fix(tmp_path, monkeypatch) -> None:
    (tmp_path / "c.yml").write_text("- op_types: [Conv2d]\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ConfigError, match=re.escape("reading YAML needs PyYAML; run `pip install pyyaml`")):
        load_config(tmp_path / "c.yml")


def test_bad_json_file(tmp_path) -> None:
    (tmp_path / "c.json").write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "c.json")


@pytest.mark.parametrize(("name", "known", "expected"), [
    ("conv2d", KNOWN_TYPE_NAMES, "Conv2d"), ("Linaer", KNOWN_TYPE_NAMES, "Linear"),
    ("conv2dsame", ("Conv2dSame", "Conv2d"), "Conv2dSame"), ("Transformer", KNOWN_TYPE_NAMES, None)])
def test_suggest_type_name_prefers_a_case_insensitive_match(name: str, known: tuple[str, ...],
                                                            expected: str | None) -> None:
    assert suggest_type_name(name, known) == expected
