"""The compiled path of fake quantization (``torch.compile``/``torch.export``: ``_FakeQuantTraceable``).

Values and straight-through gradients under inductor equal torch's own fake-quant kernels (an
independent reference), inf and NaN included, with the gate on and off; and the compiled training
step saves no bool mask per element for the backward (inductor's CPU code stores bool tensors
element by element: issue 13).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fxcompress.quant import ActivationQuantizer, WeightQuantizer, fake_quant
from fxcompress.settings import QuantSetting

INF, NAN = float("inf"), float("nan")
SPECIAL = [INF, -INF, NAN, 3e38, -3e38, 1.5, -0.0, 0.0, -2.0, 2.9, 100.0, 0.004, -0.006, 0.5]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equal NaNs compare equal, -0.0 and 0.0 do not."""
    return t.detach().float().contiguous().view(torch.int32)


def compiled_fake_quant(qmin: int, qmax: int, per_channel: bool):  # noqa: ANN201
    def run(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, scale, zp, gate, qmin, qmax, per_channel)

    return torch.compile(run, backend="inductor", fullgraph=True)


def with_grad(fn, x: torch.Tensor, grad: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    xg = x.detach().clone().requires_grad_()
    out = fn(xg, *args)
    out.backward(grad)
    return out.detach(), xg.grad


@pytest.mark.parametrize(("qmin", "qmax", "scale", "zp"), [(0, 255, 0.02, 100), (-127, 127, 0.015, 0), (0, 15, 0.3, 3)])
def test_per_tensor_values_and_gradient_equal_torch_kernel(qmin: int, qmax: int, scale: float, zp: int) -> None:
    torch._dynamo.reset()
    x = torch.cat([torch.tensor(SPECIAL), torch.linspace(-6.0, 6.0, 997)])
    grad = torch.linspace(-1.0, 2.0, x.numel())
    out, gx = with_grad(compiled_fake_quant(qmin, qmax, False), x, grad, torch.tensor(scale), torch.tensor(float(zp)),
                        torch.tensor(True))
    expected, gexp = with_grad(lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax), x, grad)
    assert torch.equal(bits(out), bits(expected))
    assert torch.equal(bits(gx), bits(gexp))
    assert gx[:5].tolist() == [0.0] * 5  # inf, -inf, NaN, +-3e38: outside the range


def test_per_channel_values_and_gradient_equal_torch_kernel_row_by_row() -> None:
    # torch's per-channel CPU kernel maps +inf to qmin (it casts to int64 first); fxcompress clamps
    # every scheme as the per-tensor kernel does, so each row is compared with that one
    torch._dynamo.reset()
    w = torch.stack([torch.tensor(SPECIAL), torch.linspace(-0.5, 0.4, len(SPECIAL)),
                     torch.linspace(-3.0, 3.0, len(SPECIAL))])
    scale, zp = torch.tensor([0.01, 0.004, 0.03]), torch.tensor([0.0, 3.0, 0.0])
    grad = torch.linspace(-1.0, 2.0, w.numel()).reshape(w.shape)
    out, gw = with_grad(compiled_fake_quant(-127, 127, True), w, grad, scale, zp, torch.tensor(True))
    for row in range(3):
        expected, gexp = with_grad(lambda t, r=row: torch.fake_quantize_per_tensor_affine(
            t, float(scale[r]), int(zp[r]), -127, 127), w[row], grad[row])
        assert torch.equal(bits(out[row]), bits(expected))
        assert torch.equal(bits(gw[row]), bits(gexp))


def test_off_gate_returns_input_and_gradient_unchanged() -> None:
    torch._dynamo.reset()
    x = torch.tensor(SPECIAL)
    grad = torch.tensor([1.0, INF, NAN, -2.0, 3.0, 4.0, 5.0, -0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out, gx = with_grad(compiled_fake_quant(0, 255, False), x, grad, torch.tensor(0.02), torch.tensor(100.0),
                        torch.tensor(False))
    assert torch.equal(bits(out), bits(x)) and torch.equal(bits(gx), bits(grad))


@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_quantizer_modules_equal_eager_bit_for_bit(per_channel: bool) -> None:
    """Training forwards (the observer's EMA moves), values and gradients, against the eager path."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    scheme, dtype = ("per_channel_symmetric", "int") if per_channel else ("per_tensor_affine", "uint")
    quantizers = [(ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train(),
                   WeightQuantizer(QuantSetting(8, scheme, dtype), 0)) for _ in range(2)]
    step = torch.tensor(1)

    def run(act: ActivationQuantizer, weight: WeightQuantizer, x: torch.Tensor, w: torch.Tensor):  # noqa: ANN202
        return act(x, step), weight(w, step)

    compiled = torch.compile(run, fullgraph=True)
    for i in range(3):
        x = torch.randn(8, 32) * (i + 1)
        x[0, :3] = torch.tensor([INF, -INF, NAN]) if i == 2 else x[0, :3]  # a batch with inf/NaN
        w = torch.randn(16, 32)
        cx, cw = torch.randn(8, 32), torch.randn(16, 32)
        results = []
        for fn, (act, weight) in ((compiled, quantizers[0]), (run, quantizers[1])):
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            qx, qw = fn(act, weight, xg, wg)
            ((qx * cx).nan_to_num().sum() + (qw * cw).sum()).backward()
            results.append([qx, qw, xg.grad, wg.grad, act.tracked_min, act.tracked_max])
        for got, expected in zip(*results, strict=True):  # sign of zero included
            assert torch.equal(bits(got), bits(expected))


def test_training_step_saves_no_bool_mask_per_element() -> None:
    """Inductor's CPU code writes bool tensors one element at a time (~10x a fused float pass):
    the straight-through mask the backward reads must not be one (a float mask or the input is)."""
    torch._dynamo.reset()
    act = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    weight = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 0)
    step = torch.tensor(1)
    x = torch.randn(64, 256).requires_grad_()
    w = torch.randn(128, 256).requires_grad_()

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return act(x, step) @ weight(w, step).t()

    compiled = torch.compile(run, backend="inductor", fullgraph=True)

    def step_fn() -> None:
        compiled(x, w).sum().backward()

    _, codes = run_and_get_code(step_fn)
    forward = codes[0]
    bool_buffers = re.findall(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.bool\)", forward)
    assert [s for s in bool_buffers if s.strip()] == []  # only 0-dim gates
