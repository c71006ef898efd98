"""Real torchvision models: compression, and compile / export / script on a representative subset."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fxcompress

from .fixtures import SeedModel, seed_input
from .realmodels import FAST, build, check, classification_models

CFG = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
        "quant_bits": 8, "quant_start_step": 2}]


def assert_outcome(name: str) -> None:
    out = check(name)
    if out.note.startswith("skipped"):
        pytest.skip(out.note)
    assert out.layers > 0 and out.exact_sparsity and out.matches_reference and out.trains, out


@pytest.mark.parametrize("name", FAST)
def test_real_model_fast_subset(name: str) -> None:
    assert_outcome(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in classification_models() if n not in FAST])
def test_real_model_full_sweep(name: str) -> None:
    assert_outcome(name)


def subjects() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    out = [("seed", SeedModel(), seed_input(4))]
    for name in ("resnet18", "mobilenet_v3_small"):
        model, x = build(name)
        out.append((name, model, x))
    return out


# mobilenet_v3_small (hard-swish, squeeze-excitation) takes over a minute each here: make test-slow
_SUBJECTS = ["seed", "resnet18", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", _SUBJECTS)
def test_compile_fullgraph_one_compilation_per_mode(name: str) -> None:
    _, model, x = next(s for s in subjects() if s[0] == name)
    torch._dynamo.reset()
    gm = fxcompress.compress(model, CFG)
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter, fullgraph=True)  # fullgraph: any graph break raises
    for _ in range(4):  # across quant_start_step
        compiled(x).float().sum().backward()
    assert counter.frame_count == 1
    gm.eval()
    compiled(x)
    compiled(x)
    assert counter.frame_count == 2
    assert fxcompress.get_step(gm) == 4


@pytest.mark.parametrize("name", _SUBJECTS)
def test_export_and_script_match_eager(name: str) -> None:
    _, model, x = next(s for s in subjects() if s[0] == name)
    gm = fxcompress.compress(model, CFG)
    gm.train()
    for _ in range(3):
        gm(x)
    gm.eval()
    expected = gm(x)
    exported = torch.export.export(gm, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    torch.testing.assert_close(torch.jit.script(gm)(x), expected)
