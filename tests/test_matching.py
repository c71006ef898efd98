"""SPEC.md §2 (which sub-config a layer gets) and the model-dependent checks of §3."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress import ConfigError, select
from fxcompress.annotations import layer_plans
from fxcompress.config import parse_config
from fxcompress.examples import SEED_CONFIGS
from fxcompress.matching import LayerInfo, resolve_all

from .fixtures import CalledTwice, Nested, SeedModel


def plans_of(model: nn.Module, config_list: list, strict: bool = True) -> dict:
    return layer_plans(fxcompress.plan(model, config_list, strict=strict).graph)


# -- the spec's own examples, verbatim -------------------------------------------------------

def test_seed_where_examples_select_conv1_conv2_fc1() -> None:
    model = SeedModel()
    assert select(model, SEED_CONFIGS["where: types and names"]) == ["conv1", "conv2", "fc1"]
    assert select(model, SEED_CONFIGS["where: exclude"]) == ["conv1", "conv2", "fc1"]


def test_seed_pruning_example_resolves_to_stated_values() -> None:
    plans = plans_of(SeedModel(), SEED_CONFIGS["pruning"])
    assert {n: (p.config_index, p.prune.total_sparsity) for n, p in plans.items()} == {
        "conv1": (0, 0.5), "conv2": (0, 0.5), "fc1": (1, 0.8)}
    assert all(p.quant is None and p.prune.sparsity_per_layer is None for p in plans.values())


def test_seed_quantization_example_resolves_to_stated_values() -> None:
    plans = plans_of(SeedModel(), SEED_CONFIGS["quantization"])
    assert sorted(plans) == ["conv1", "conv2", "fc1"]
    for p in plans.values():
        assert (p.quant.input.bits, p.quant.weight.bits, p.quant.output) == (8, 8, None)
        assert p.quant.start_step == 0 and p.prune is None


# -- precedence, each rule in both orders ----------------------------------------------------

def test_exclude_after_removes_layer() -> None:
    cfg = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}, {"exclude": True, "op_names": ["fc2"]}]
    assert select(SeedModel(), cfg) == ["conv1", "conv2", "fc1"]
    assert plans_of(SeedModel(), cfg)["fc2"].excluded


def test_exclude_before_is_overridden_by_later_selection() -> None:
    cfg = [{"exclude": True, "op_names": ["fc2"]}, {"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}]
    # the exclude then applies to nothing, which strict mode reports (SPEC §3)
    with pytest.warns(UserWarning, match=r"config_list\[0\]: applies to no layer.*taken by the later config_list\[1\]"):
        assert select(SeedModel(), cfg, strict=False) == ["conv1", "conv2", "fc1", "fc2"]
    with pytest.warns(UserWarning):
        assert plans_of(SeedModel(), cfg, strict=False)["fc2"].overridden == (0,)


@pytest.mark.parametrize("order", [0, 1])
def test_later_sub_config_wins_whole(order: int) -> None:
    broad = {"op_types": ["Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"], "quant_bits": 8}
    narrow = {"op_names": ["fc1"], "sparsity_per_layer": 0.8}
    cfg = [broad, narrow] if order == 0 else [narrow, broad]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fc1 = plans_of(SeedModel(), cfg, strict=False)["fc1"]
    # narrow-first leaves sub-config 0 with no layer: reported, not silently accepted
    assert [str(w.message).startswith("config_list[0]: applies to no layer") for w in record] == \
        ([] if order == 0 else [True])
    if order == 0:  # narrow is last: its keys alone, no quantization merged in from broad
        assert (fc1.config_index, fc1.overridden, fc1.prune.sparsity_per_layer, fc1.quant) == (1, (0,), 0.8, None)
    else:
        assert (fc1.config_index, fc1.overridden, fc1.prune.sparsity_per_layer) == (1, (0,), 0.5)
        assert fc1.quant.weight.bits == 8


def test_types_and_names_intersect() -> None:
    assert select(SeedModel(), [{"op_types": ["Linear"], "op_names": ["conv1", "fc1"]}], strict=False) == ["fc1"]


def test_names_and_partial_names_unite() -> None:
    cfg = [{"op_names": ["stem"], "op_partial_names": ["blocks.1."]}]
    assert select(Nested(), cfg) == ["stem", "blocks.1.conv", "blocks.1.proj"]


def test_partial_names_with_types_intersect() -> None:
    assert select(Nested(), [{"op_types": ["Conv1d"], "op_partial_names": ["blocks."]}]) == [
        "blocks.0.proj", "blocks.1.proj"]


def test_subclass_answers_to_its_own_and_its_torch_base_name() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4))
    assert select(model, [{"op_types": ["Linear"]}]) == ["0", "1"]  # SPEC §2.1
    assert select(model, [{"op_types": ["MyLinear"]}]) == ["1"]
    assert select(model, [{"op_types": ["Linear"]}, {"op_types": ["MyLinear"], "exclude": True}]) == ["0"]
    assert select(model, [{"op_names": ["1"]}]) == ["1"]


def test_module_called_twice_is_one_layer_with_one_plan() -> None:
    gm = fxcompress.plan(CalledTwice(), [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    annotated = [n for n in gm.graph.nodes if "fxcompress" in n.meta]
    assert [n.target for n in annotated] == ["shared", "shared", "head"]
    assert annotated[0].meta["fxcompress"] is annotated[1].meta["fxcompress"] or \
        annotated[0].meta["fxcompress"] == annotated[1].meta["fxcompress"]
    assert list(layer_plans(gm.graph)) == ["shared", "head"]


# -- model-dependent errors ------------------------------------------------------------------

def test_unknown_op_name_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"config_list\[0\]\['op_names'\]: no module named 'fc_1' in the model; "
                                          r"close names: fc1, fc2"):
        select(SeedModel(), [{"op_names": ["fc_1"]}])


def test_container_name_suggests_partial_names() -> None:
    with pytest.raises(ConfigError, match=r"'blocks' is a Sequential, which fxcompress cannot compress .* use "
                                          r"'op_partial_names': \['blocks.'\]"):
        select(Nested(), [{"op_names": ["blocks"]}])


def test_non_compressible_leaf_named() -> None:
    with pytest.raises(ConfigError, match=r"'blocks.0.bn' is a BatchNorm2d, which fxcompress cannot compress"):
        select(Nested(), [{"op_names": ["blocks.0.bn"]}])


def test_sub_config_selecting_nothing() -> None:
    with pytest.raises(ConfigError, match=r"config_list\[0\]: selects no layer of this model \(its compressible "
                                          r"layer types: Conv2d, Linear\)"):
        select(SeedModel(), [{"op_types": ["Conv1d"]}])


def test_sub_config_fully_overridden() -> None:
    cfg = [{"op_names": ["fc1"], "sparsity_per_layer": 0.5}, {"op_types": ["Linear"], "sparsity_per_layer": 0.8}]
    with pytest.raises(ConfigError, match=r"config_list\[0\]: applies to no layer: every layer it selects is taken "
                                          r"by the later config_list\[1\]"):
        select(SeedModel(), cfg)


def test_cap_dict_naming_layer_outside_group() -> None:
    cfg = [{"op_types": ["Conv2d"], "total_sparsity": 0.5, "max_sparsity_per_layer": {"fc1": 0.9}}]
    with pytest.raises(ConfigError, match=r"\['max_sparsity_per_layer'\]: 'fc1' is not a layer this sub-config "
                                          r"applies to \(conv1, conv2\)"):
        fxcompress.compress(SeedModel(), cfg)


def test_strict_false_turns_model_errors_into_warnings() -> None:
    with pytest.warns(UserWarning, match=r"no module named 'fc_1'.*\(ignored: strict=False\)") as record:
        names = select(SeedModel(), [{"op_names": ["fc_1", "fc1"]}], strict=False)
    assert names == ["fc1"]
    assert record[0].filename == __file__


def test_config_error_leaves_model_untouched() -> None:
    model = SeedModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        fxcompress.compress(model, [{"op_names": ["nope"], "sparsity_per_layer": 0.5}])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- property test against a brute-force reading of §2 ---------------------------------------

TYPES = ["Conv1d", "Conv2d", "Conv3d", "Linear", "BatchNorm2d", "ReLU"]
NAMES = ["a", "a.b", "a.b.c", "ab", "b", "b.a", "c", "ca"]


def brute_force(config_list: list[dict], layers: list[tuple[str, str]]) -> dict[str, tuple[int, bool]]:
    """A direct transcription of SPEC.md §2 with no shared code: name -> (winning index, excluded)."""
    out = {}
    for name, type_name in layers:
        if type_name not in ("Conv1d", "Conv2d", "Conv3d", "Linear"):
            continue
        winner = None
        for i, sub in enumerate(config_list):
            types = sub.get("op_types")
            ok_type = types is None or type_name in types or "default" in types
            names = set(sub.get("op_names", []))
            names |= {n for n, _ in layers for p in sub.get("op_partial_names", []) if p in n}
            has_names = "op_names" in sub or "op_partial_names" in sub
            if ok_type and (not has_names or name in names):
                winner = i
        if winner is not None:
            out[name] = (winner, bool(config_list[winner].get("exclude")))
    return out


sub_configs = st.fixed_dictionaries({}, optional={
    "op_types": st.lists(st.sampled_from(["Conv1d", "Conv2d", "Conv3d", "Linear", "default"]), min_size=1,
                         max_size=3),
    "op_names": st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
    "op_partial_names": st.lists(st.sampled_from(["a", "b", ".", "c", "a.b"]), min_size=1, max_size=2),
    "exclude": st.just(True),
}).filter(lambda d: any(k in d for k in ("op_types", "op_names", "op_partial_names")))


@settings(max_examples=300, deadline=None)
@given(layers=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(TYPES)), min_size=1, max_size=8,
                       unique_by=lambda t: t[0]),
       config_list=st.lists(sub_configs, min_size=1, max_size=5))
def test_resolution_matches_brute_force(layers: list[tuple[str, str]], config_list: list[dict]) -> None:
    infos = [LayerInfo.of(n, t) for n, t in layers]
    got = {n: (r.winner.index, r.winner.exclude) for n, r in resolve_all(parse_config(config_list), infos).items()}
    assert got == brute_force(config_list, layers)


def test_brute_force_reference_is_not_trivial() -> None:
    # guards the property test: the reference must tell exclusion and overriding apart
    cfg = [{"op_types": ["Linear"]}, {"exclude": True, "op_partial_names": ["a"]}]
    assert brute_force(cfg, [("a", "Linear"), ("b", "Linear"), ("c", "ReLU")]) == {"a": (1, True), "b": (0, False)}


def test_no_warning_on_clean_config() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(SeedModel(), SEED_CONFIGS["where: exclude"])
