"""Modules that run inside a compressed model: the step counter, observers and fake-quant.

Everything here is TorchScript-compatible, has no Python branch on tensor values (the
``quant_start_step`` gate is a 0-dim bool tensor), and never imports torch.fx.

Fake quantization computes exactly what ``torch.fake_quantize_per_tensor_affine`` computes,
``(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale``, non-finite inputs included
(``+inf`` gives qmax, ``-inf`` and NaN give qmin, each with a zero gradient, as the kernel's
``fmin(fmax(q, qmin), qmax)`` does), but from plain float tensor ops in one autograd Function:
on CPU PyTorch's fake-quant kernels take 15x (per channel) and 4x (per tensor) as long as the
same arithmetic done with vectorised elementwise ops. PyTorch's per-channel CPU kernel casts to
int64 before clamping, so it maps values beyond int64 (and +inf) to qmin; here every scheme
clamps as the per-tensor kernel does. Under ``torch.jit.script`` the PyTorch kernels are used.

A quantizer that is off (before ``quant_start_step``, or an activation quantizer that has not
observed a finite range yet) returns its input unchanged, infinities and NaN included, and passes
the gradient unchanged: the gate is a ``torch.where``, never arithmetic with a 0/1 weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fxcompress.settings import QuantSetting

__all__ = ["ActivationQuantizer", "StepCounter", "WeightQuantizer", "fake_quant", "qparams"]

EMA_DECAY = 0.99


class StepCounter(nn.Module):
    """One int64 buffer counting completed training steps for the whole model.

    Called once at the top of the forward, it returns the steps completed *before* this
    forward and, in training mode when counting forwards, adds one.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.counts_forwards = True
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))

    def forward(self) -> Tensor:
        done = self.step.clone()
        if self.training and self.counts_forwards:
            self.step.add_(1)
        return done


def qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point (both float32) of SPEC.md §5 for the range (lo, hi), widened to contain 0.

    Affine: ``scale = (max-min)/(qmax-qmin)``, ``zp = qmin - round(min/scale)`` clamped.
    Symmetric: ``scale = max(|min|,|max|) / ((qmax-qmin)/2)``, ``zp = (qmin+qmax)//2`` (0 for int).
    Scale never drops below float32 eps (written as a literal: TorchScript reads no globals).
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((qmax - qmin) / 2.0), min=1.1920928955078125e-07)
        zero_point = torch.full_like(scale, float((qmin + qmax) // 2))
    else:
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=1.1920928955078125e-07)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


class _FakeQuant(torch.autograd.Function):
    """Gated fake quantization with the straight-through gradient, in float arithmetic only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, gate: Tensor, qmin: int,
                qmax: int) -> Tensor:
        with torch.no_grad():  # already off in eager; torch.export traces this body with grad on
            q = x * torch.reciprocal(scale)
            # NaN clamps to qmin as in PyTorch's kernel (fmax(NaN, qmin) is qmin); inf clamps below
            q.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            q.round_().add_(zero_point)
            clamped = q.clamp(qmin, qmax)
            # 1.0 where the value was inside the range; float compares are several times faster
            # than bool ones on CPU. With the gate off every entry passes (identity gradient).
            keep = torch.eq(q, clamped, out=q)
            torch.maximum(keep, torch.logical_not(gate).float(), out=keep)
            # a select, not a 0/1 blend (inf * 0 is NaN), written into the buffer: one allocation less
            out = torch.where(gate, clamped.sub_(zero_point).mul_(scale), x, out=clamped)
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None, None, None, None


@torch.jit.unused
def _fake_quant_function(x: Tensor, scale: Tensor, zero_point: Tensor, gate: Tensor, qmin: int,
                         qmax: int) -> Tensor:
    return _FakeQuant.apply(x, scale, zero_point, gate, qmin, qmax)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, gate: Tensor, qmin: int, qmax: int,
               per_channel: bool) -> Tensor:
    """``x`` fake-quantized where ``gate`` (a 0-dim bool tensor) is true, else ``x`` unchanged.

    Args:
        x: the tensor to quantize (computed in float32, returned in ``x``'s dtype).
        scale: float tensor, 0-dim, or one per output channel (dim 0) for ``per_channel``.
        zero_point: float tensor shaped like ``scale``.
        gate: 0-dim bool tensor; false returns every value of ``x`` (inf and NaN included) and
            passes the gradient unchanged.
        qmin: the lowest integer level.
        qmax: the highest integer level.
        per_channel: whether ``scale``/``zero_point`` hold one value per output channel.

    Returns:
        A tensor like ``x``.
    """
    if per_channel:
        shape = [-1] + [1] * (x.dim() - 1)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if torch.jit.is_scripting():
        xf = x.float()
        zp = zero_point.round().to(torch.int32)
        if per_channel:
            fq = torch.fake_quantize_per_channel_affine(xf, scale.flatten(), zp.flatten(), 0, qmin, qmax)
        else:
            fq = torch.fake_quantize_per_tensor_affine(xf, scale, zp, qmin, qmax)
        return torch.where(gate, fq.to(x.dtype), x)
    if x.dtype != torch.float32:  # low-precision models and autocast: quantize in float32
        return _fake_quant_function(x.float(), scale, zero_point, gate, qmin, qmax).to(x.dtype)
    return _fake_quant_function(x, scale, zero_point, gate, qmin, qmax)


class ActivationQuantizer(nn.Module):
    """Per-tensor fake-quant of an activation with an EMA (decay 0.99) min/max observer.

    The observer updates in training mode only (also before the start step). A non-finite batch
    bound (an inf in the batch; a NaN makes both bounds NaN) leaves that tracked bound as it was,
    and only a batch whose min and max are both finite counts as the first observation (sets
    ``initialized``); until then the quantizer passes its input through unchanged. With
    ``range_sync`` set (see ``fxcompress.sync_ranges``) the batch range is first reduced over a
    process group.
    """

    def __init__(self, setting: QuantSetting, start_step: int, device: torch.device | None = None) -> None:
        super().__init__()
        if setting.per_channel:
            raise ValueError("activations are quantized per tensor")
        self.qmin, self.qmax = setting.qmin, setting.qmax
        self.symmetric = setting.symmetric
        self.start_step = start_step
        self.bits = setting.bits
        self.scheme = setting.scheme
        self.dtype = setting.dtype
        self.decay = EMA_DECAY
        # a callable (lo, hi) -> (lo, hi) reducing the batch range over ranks, or None (the
        # default: no collective in the forward); set by fxcompress.sync_ranges
        self.range_sync: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
        for name in ("tracked_min", "tracked_max", "initialized"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's own signature)
        # state stays float32 when the model is cast (model.half(), .to(bfloat16)); devices follow
        super()._apply(fn, recurse)
        for name in ("tracked_min", "tracked_max", "initialized"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        if self.training:
            self._observe(x)
        scale, zero_point = qparams(self.tracked_min, self.tracked_max, self.qmin, self.qmax, self.symmetric)
        gate = (step >= self.start_step) & (self.initialized > 0.5)
        return fake_quant(x, scale, zero_point, gate, self.qmin, self.qmax, False)

    def _observe(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.float(), hi.float()
        if not torch.jit.is_scripting():
            lo, hi = self._synced(lo, hi)
        lo_finite, hi_finite = torch.isfinite(lo), torch.isfinite(hi)
        # lerp with weight 1 takes the first observation as is; then EMA with weight 1 - decay.
        # A non-finite bound is replaced by the tracked value, which the lerp then keeps exactly.
        weight = 1.0 - self.decay * self.initialized
        self.tracked_min.lerp_(torch.where(lo_finite, lo, self.tracked_min), weight)
        self.tracked_max.lerp_(torch.where(hi_finite, hi, self.tracked_max), weight)
        self.initialized.masked_fill_(lo_finite & hi_finite, 1.0)

    @torch.jit.unused
    def _synced(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The batch range reduced over ranks by ``range_sync``; as is when syncing is off."""
        if self.range_sync is None:
            return lo, hi
        return self.range_sync(lo, hi)


class WeightQuantizer(nn.Module):
    """Fake-quant of a weight from its current min/max (per output channel for per-channel schemes)."""

    def __init__(self, setting: QuantSetting, start_step: int, device: torch.device | None = None) -> None:
        super().__init__()  # holds no state: ``device`` is accepted for a uniform constructor
        self.qmin, self.qmax = setting.qmin, setting.qmax
        self.symmetric = setting.symmetric
        self.per_channel = setting.per_channel
        self.start_step = start_step
        self.bits = setting.bits
        self.scheme = setting.scheme
        self.dtype = setting.dtype

    def forward(self, w: Tensor, step: Tensor) -> Tensor:
        scale, zero_point = self.current_qparams(w)
        gate = step >= self.start_step
        return fake_quant(w, scale, zero_point, gate, self.qmin, self.qmax, self.per_channel)

    def current_qparams(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point for the weight as it is now."""
        wd = w.detach().float()
        if self.per_channel:
            rows = wd.reshape(wd.shape[0], -1)
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # two passes beat aminmax(dim=) 15x on CPU
        else:
            lo, hi = torch.aminmax(wd)
        return qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
