"""SPEC.md §5 with inf and NaN: an off quantizer passes them, an on one clamps them as torch's kernel.

Split from test_quant.py to keep both files under 400 lines; the float reference is the one there.
"""

from __future__ import annotations

import pytest
import torch

from fxcompress.quant import ActivationQuantizer, WeightQuantizer, fake_quant, qparams
from fxcompress.settings import QuantSetting

from .test_quant import ref_fake_quant, ref_qparams

INF, NAN = float("inf"), float("nan")
SPECIAL = [INF, -INF, NAN, 3e38, -3e38, 1.5, -0.0, 0.0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equal NaNs compare equal, -0.0 and 0.0 do not."""
    return t.detach().float().contiguous().view(torch.int32)


def observed(scheme: str, dtype: str, start: int) -> ActivationQuantizer:
    """An activation quantizer that has observed one finite batch, in eval mode."""
    q = ActivationQuantizer(QuantSetting(8, scheme, dtype), start).train()
    q(torch.tensor([-2.0, 0.5, 3.0]), torch.tensor(0))
    return q.eval()


@pytest.mark.parametrize("state", ["unobserved", "before_start_step"])
def test_off_quantizer_passes_inf_nan_and_gradient_unchanged_eager_and_scripted(state: str) -> None:
    if state == "unobserved":
        q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).eval()
    else:
        q = observed("per_tensor_affine", "uint", 5)
    step = torch.tensor(3)
    x = torch.tensor(SPECIAL, requires_grad=True)
    grad = torch.tensor([1.0, INF, NAN, -2.0, 3.0, 4.0, 5.0, -0.0])
    out = q(x, step)
    out.backward(grad)
    assert torch.equal(bits(out), bits(x)) and torch.equal(bits(x.grad), bits(grad))
    assert torch.equal(bits(torch.jit.script(q)(x.detach(), step)), bits(x))
    half = x.detach().bfloat16()  # low precision: quantized in float32, returned as bfloat16
    assert torch.equal(q(half, step).view(torch.int16), half.view(torch.int16))


def test_weight_quantizer_before_start_step_passes_inf_and_nan() -> None:
    w = torch.tensor([[INF, 1.0, -0.5], [NAN, -2.0, -INF]], requires_grad=True)
    q = WeightQuantizer(QuantSetting(4, "per_channel_symmetric", "int"), 2)
    out = q(w, torch.tensor(1))
    out.backward(torch.full((2, 3), 7.0))
    assert torch.equal(bits(out), bits(w)) and torch.equal(w.grad, torch.full((2, 3), 7.0))


def test_inf_observed_before_start_step_then_finite_inputs_match_reference() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 4).train()
    batches = [torch.tensor([-1.0, INF, 2.0]),  # max not finite: not a first observation
               torch.tensor([-2.0, 0.5, 3.0]),  # the first finite batch initializes the range
               torch.tensor([-INF, 1.0, 6.0]),  # min kept, max takes the EMA step
               torch.tensor([NAN, 9.0])]  # both bounds NaN: nothing changes
    initialized = []
    for step, batch in enumerate(batches):
        assert torch.equal(bits(q(batch, torch.tensor(step))), bits(batch))  # off before step 4
        initialized.append(bool(q.initialized))
    assert initialized == [False, True, True, True]
    lo, hi = -2.0, 0.99 * 3.0 + 0.01 * 6.0
    assert float(q.tracked_min) == lo and float(q.tracked_max) == pytest.approx(hi)
    x = torch.linspace(-3.0, 4.5, 31)
    out = q(x, torch.tensor(4))  # a training forward observes x, then quantizes
    lo, hi = 0.99 * lo + 0.01 * -3.0, 0.99 * hi + 0.01 * 4.5
    scale, zp, qmin, qmax = ref_qparams(torch.tensor(lo), torch.tensor(hi), 8, False, True)
    expected, _ = ref_fake_quant(x, scale, zp, qmin, qmax)
    assert out.isfinite().all() and not torch.equal(out, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_first_batch_with_inf_does_not_initialize_the_range() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    q(torch.tensor([-INF, 1.0]), torch.tensor(0))
    assert not bool(q.initialized)
    x = torch.tensor([-1.0, 0.25, 2.0])
    out = q(x, torch.tensor(1))  # first finite batch: taken as is (weight 1), not EMA'd with 0
    assert (float(q.tracked_min), float(q.tracked_max)) == (-1.0, 2.0)
    scale, zp, qmin, qmax = ref_qparams(torch.tensor(-1.0), torch.tensor(2.0), 8, False, True)
    assert torch.equal(out, ref_fake_quant(x, scale, zp, qmin, qmax)[0])


@pytest.mark.parametrize(("scheme", "dtype"), [("per_tensor_affine", "uint"), ("per_tensor_symmetric", "int")])
def test_on_quantizer_clamps_inf_and_nan_as_torch_kernel(scheme: str, dtype: str) -> None:
    q = observed(scheme, dtype, 0)
    x = torch.tensor([*SPECIAL, -2.0, 2.9, 100.0], requires_grad=True)
    out = q(x, torch.tensor(1))
    out.backward(torch.arange(1.0, 12.0))
    scale, zp = qparams(q.tracked_min, q.tracked_max, q.qmin, q.qmax, q.symmetric)
    xt = x.detach().clone().requires_grad_()
    expected = torch.fake_quantize_per_tensor_affine(xt, float(scale), int(zp), q.qmin, q.qmax)
    expected.backward(torch.arange(1.0, 12.0))
    assert torch.equal(bits(out), bits(expected)) and torch.equal(x.grad, xt.grad)
    top, bottom = (q.qmax - float(zp)) * float(scale), (q.qmin - float(zp)) * float(scale)
    assert out[:3].tolist() == [pytest.approx(top), pytest.approx(bottom), pytest.approx(bottom)]
    assert x.grad[:5].tolist() == [0.0] * 5  # inf, -inf, NaN, +-3e38 are outside the range
    assert torch.equal(bits(torch.jit.script(q)(x.detach(), torch.tensor(1))), bits(expected))


def test_per_channel_clamps_inf_and_nan_as_the_per_tensor_kernel() -> None:
    # torch's per-channel CPU kernel casts to int64 before clamping (+inf comes out as qmin);
    # fxcompress clamps every scheme as the per-tensor kernel does
    w = torch.tensor([[INF, -INF, NAN, 0.3], [1e30, -0.2, 0.1, 0.05]])
    scale, zp = torch.tensor([0.01, 0.002]), torch.zeros(2)
    out = fake_quant(w, scale, zp, torch.tensor(True), -127, 127, True)
    for row in range(2):
        expected = torch.fake_quantize_per_tensor_affine(w[row], float(scale[row]), 0, -127, 127)
        assert torch.equal(bits(out[row]), bits(expected))
    assert out[0, 0] == pytest.approx(1.27) and out[1, 0] == pytest.approx(0.254)
