"""timm models (issue 10, item 4): both modes with all-ones masks, every used Conv2d/Linear compressed,
QAT before quant_start_step equal to float, two training steps. The checks are in tests/timm_models.py."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import timm

from .timm_models import FAST, SWEEP, check


def assert_outcome(name: str) -> None:
    out = check(name)
    print(json.dumps(asdict(out)))  # the counts behind the verdict (pytest -s / -rP shows them)
    assert out.ok, f"{name}: " + "; ".join(f"[{k}] {v}" for k, v in out.failures.items())
    assert out.used > 0 and out.compressed == out.used, out


@pytest.mark.parametrize("name", FAST)
def test_timm_fast_subset(name: str) -> None:
    assert_outcome(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_timm_sweep(name: str) -> None:
    assert_outcome(name)


def test_model_lists_name_real_timm_models() -> None:
    names = FAST + SWEEP
    assert len(set(names)) == len(names)
    assert not set(names) - set(timm.list_models())
    assert len(names) >= 60


OUT_CHANNEL = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "granularity": "out_channel"}]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_speedup_shrinks_a_timm_residual_stream_through_its_layer_norms(name: str) -> None:
    """timm's ViT (attention of Linear layers, class token, position embedding) and ConvNeXt (LayerNorm2d):
    the stream the LayerNorms average across is pruned with them (statistics over the kept channels), and
    speedup equals the masked model."""
    import torch

    import fxcompress
    from fxcompress.group_report import group_report

    torch.manual_seed(0)
    kw = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxcompress.compress(model, OUT_CHANNEL, example_inputs=(x,))
    rows = group_report(gm)
    stream = rows[0]  # the patch embedding's / stem's channels: the first group
    assert stream.pruned == stream.channels // 2 and "averages over the kept channels only" in stream.status
    fast = fxcompress.speedup(gm)
    probe = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = gm.eval()(probe), fast.eval()(probe)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    params = sum(p.numel() for p in fast.parameters()) / sum(p.numel() for p in model.parameters())
    if name.startswith("vit"):  # 192 -> 96 wide; 3 heads of 64 -> 3 of 32 (floor(0.5 * 64) per head)
        assert fast.blocks[0].norm1.weight.shape == (96,) and fast.pos_embed.shape[-1] == 96
        assert fast.blocks[0].attn.qkv.weight.shape == (3 * 3 * 32, 96)
        assert fast.blocks[0].attn.proj.weight.shape == (96, 3 * 32)
    else:
        assert fast.stem[0].out_channels == model.stem[0].out_channels // 2
    assert params < 0.3, params
