"""Mixed precision: autocast and low-precision models; CUDA variants run where a GPU exists."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxcompress

from .fixtures import SeedModel, seed_input

CFG = [{"op_types": ["default"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
        "quant_bits": 8}]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def train_steps(gm: torch.nn.Module, device: str, steps: int = 3, autocast_dtype: torch.dtype | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    x, y = seed_input(8).to(device, dtype), torch.arange(8, device=device)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = gm(x)
        F.nll_loss(out.float(), y).backward()
        opt.step()
    return out


def check_state(gm: torch.nn.Module, weight_dtype: torch.dtype) -> None:
    for name in ("conv1", "fc1"):
        layer = gm.get_submodule(name)
        assert layer.weight.dtype == weight_dtype
        for kind in ("input", "output"):
            q = getattr(layer, f"{kind}_quantizer")
            assert q.tracked_min.dtype == q.tracked_max.dtype == torch.float32
            assert bool(q.initialized) and float(q.tracked_max) > float(q.tracked_min)
        scale, _ = layer.weight_quantizer.current_qparams(layer.weight)
        assert scale.dtype == torch.float32
        pruned = layer.weight_mask == 0
        assert layer.weight_mask.dtype == weight_dtype and bool(pruned.any())
        assert not (layer.weight * layer.weight_mask)[pruned].any()
        assert not layer.weight.grad[pruned].any()
    assert fxcompress.get_step(gm) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16_training(device: str) -> None:
    gm = fxcompress.compress(SeedModel(), CFG).to(device)
    out = train_steps(gm, device, autocast_dtype=torch.bfloat16)
    # the plain model's output dtype under the same autocast: bfloat16 on CPU, float32 on CUDA (whose
    # autocast runs log_softmax in float32; seen on an H200, 2026-11-26)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = SeedModel().to(device)(seed_input(8).to(device)).dtype
    assert out.dtype == expected and torch.isfinite(out).all()
    check_state(gm, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(device: str, dtype: torch.dtype) -> None:
    gm = fxcompress.compress(SeedModel(), CFG).to(device=device, dtype=dtype)
    out = train_steps(gm, device, dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    check_state(gm, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_compressed_model_moves_to_device(device: str) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), CFG).to(device)
    assert all(b.device.type == device for b in gm.buffers())
    gm.eval()
    torch.manual_seed(0)
    ref = fxcompress.compress(SeedModel(), CFG).eval()
    torch.testing.assert_close(gm(seed_input().to(device)).cpu(), ref(seed_input()), rtol=1e-4, atol=1e-4)
