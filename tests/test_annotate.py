"""The config pass on tiny and real models, tracing, and compress()'s treatment of the user's model."""

from __future__ import annotations

import collections

import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import TraceError
from fxcompress.annotations import META_KEY, layer_plans
from fxcompress.api import trace
from fxcompress.config import parse_config
from fxcompress.passes.annotate import annotate_layers

from .fixtures import Nested, SeedModel, seed_input

REAL_MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (1, 3, 64, 64)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(weights=None, image_size=32), (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_annotate_real_model(name: str) -> None:
    build, shape = REAL_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    expected = model(x)
    config_list = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}, {"op_types": ["Linear"], "quant_types":
                   ["input", "weight"], "quant_bits": 8}]
    gm = trace(model)
    annotate_layers(gm, parse_config(config_list))
    gm.graph.lint()
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    modules = dict(model.named_modules())
    # SPEC §2.1: subclasses count (torchvision's attention out_proj is a NonDynamicallyQuantizableLinear)
    matching = {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    leaves = {t for t in calls if t not in matching and (any(n.startswith(f"{t}.") for n in matching)
                                                         or isinstance(modules[t], nn.MultiheadAttention))}
    inside = {n for n in matching if any(n.startswith(f"{t}.") for t in leaves)}
    # SPEC §2.6: an nn.MultiheadAttention (always a leaf) is two layers, in_proj and out_proj
    inside |= {f"{n}.in_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    annotated = [n for n in gm.graph.nodes if META_KEY in n.meta]
    # every call of every matching module, and every leaf call holding one, is annotated; nothing else is
    assert len(annotated) == sum(calls[n] for n in (matching & set(calls)) | leaves)
    assert {n.target for n in annotated} == (matching & set(calls)) | leaves
    assert len(layer_plans(gm.graph)) == len(matching & set(calls)) + len(inside)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    before = [dict(n.meta) for n in gm.graph.nodes]
    annotate_layers(gm, parse_config(config_list))
    assert [dict(n.meta) for n in gm.graph.nodes] == before  # idempotent


def test_real_model_counts_are_what_we_think() -> None:
    # pins the numbers the loop above compares, so a tracer change cannot make both sides empty
    gm = fxcompress.plan(torchvision.models.resnet18(weights=None), [{"op_types": ["default"]}])
    plans = layer_plans(gm.graph)
    assert len(plans) == 21
    assert collections.Counter(p.type_name for p in plans.values()) == {"Conv2d": 20, "Linear": 1}


def test_compress_does_not_modify_the_model() -> None:
    model = SeedModel()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxcompress.compress(model, [{"op_types": ["default"], "sparsity_per_layer": 0.5,
                                      "quant_types": ["input", "weight"], "quant_bits": 8}])
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(model.conv1, "weight_mask") and hasattr(gm.conv1, "weight_mask")
    assert gm.conv1.weight is not model.conv1.weight


def test_inplace_reuses_the_modules() -> None:
    model = SeedModel()
    gm = fxcompress.compress(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}], inplace=True)
    assert gm.conv1 is model.conv1 and hasattr(model.conv1, "weight_mask")


def test_graph_module_input_is_accepted_and_copied() -> None:
    traced = torch.fx.symbolic_trace(SeedModel())
    gm = fxcompress.compress(traced, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    assert gm is not traced and not hasattr(traced.conv1, "weight_mask")
    assert gm(seed_input()).shape == (2, 10)


def test_compress_twice_is_idempotent() -> None:
    cfg = [{"op_types": ["default"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
            "quant_bits": 8}]
    gm = fxcompress.compress(SeedModel(), cfg)
    code = gm.code
    again = fxcompress.compress(gm, cfg, inplace=True)
    assert again.code == code


def test_leaf_modules_by_name_and_type() -> None:
    gm = trace(Nested(), leaf_modules=["blocks.0"])
    assert "blocks.0" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    gm = trace(Nested(), leaf_modules=[nn.BatchNorm2d])
    assert "blocks.1.bn" in {n.target for n in gm.graph.nodes if n.op == "call_module"}


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Branchy()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))


def test_trace_error_names_module_line_and_fix() -> None:
    with pytest.raises(TraceError, match=r"could not trace module 'inner' \(Branchy\) at .*test_annotate.py:\d+ "
                                         r"\(if x.sum\(\) > 0:\).*leaf_modules=\['inner'\]"):
        trace(Outer(), fallback=False)


def test_top_level_trace_failure_compresses_at_module_level() -> None:
    with pytest.warns(UserWarning, match=r"could not trace the top-level forward at .*test_annotate.py:\d+ "
                                         r"\(if x.sum\(\) > 0:\).* Branchy is compressed at module level instead"):
        gm = fxcompress.compress(Branchy(), [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    assert type(gm) is Branchy and isinstance(gm.fc, fxcompress.layers.CompressedLayer)
    assert int(gm.fc.weight_mask.sum()) == 8
    with pytest.raises(TraceError, match=r"could not trace the top-level forward at .*test_annotate.py:\d+ "
                                         r"\(if x.sum\(\) > 0:\).*concrete_args"):
        trace(Branchy(), fallback=False)


def test_example_inputs_smoke_run_keeps_mode_and_step() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"],
                                            "quant_bits": 8}], example_inputs=(seed_input(),))
    assert gm.training and fxcompress.get_step(gm) == 0
    assert not bool(gm.conv1.input_quantizer.initialized)
