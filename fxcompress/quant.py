"""Modules that run inside a compressed model: the step counter, observers and fake-quant.

Everything here is TorchScript-compatible, has no Python branch on tensor values (the
``quant_start_step`` gate is arithmetic on a 0/1 tensor), and never imports torch.fx.

Fake quantization computes exactly what ``torch.fake_quantize_per_{tensor,channel}_affine``
compute, ``(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale``, but from plain
float tensor ops in one autograd Function: on CPU PyTorch's fake-quant kernels take 15x (per
channel) and 4x (per tensor) as long as the same arithmetic done with vectorised elementwise
ops, and the gate folds into the same Function instead of a ``torch.where`` pass forward and
backward. Under ``torch.jit.script`` the PyTorch kernels themselves are used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxcompress.config import QuantSetting

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
        q = x * torch.reciprocal(scale)
        q.round_().add_(zero_point)
        clamped = q.clamp(qmin, qmax)
        # 1.0 where the value was inside the range; float compares are several times faster than
        # bool ones on CPU. With the gate off every entry passes (the gradient is the identity).
        keep = torch.eq(q, clamped, out=q)
        keep.mul_(gate).add_(1.0 - gate)
        ctx.save_for_backward(keep)
        return torch.lerp(x, clamped.sub_(zero_point).mul_(scale), gate)

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
    """``x`` fake-quantized where ``gate`` is 1 and unchanged where it is 0 (a 0-dim float tensor).

    ``scale``/``zero_point`` are float tensors: 0-dim, or one per output channel for ``per_channel``.
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
        return torch.where(gate > 0.5, fq.to(x.dtype), x)
    if x.dtype != torch.float32:  # low-precision models and autocast: quantize in float32
        return _fake_quant_function(x.float(), scale, zero_point, gate, qmin, qmax).to(x.dtype)
    return _fake_quant_function(x, scale, zero_point, gate, qmin, qmax)


class ActivationQuantizer(nn.Module):
    """Per-tensor fake-quant of an activation with an EMA (decay 0.99) min/max observer.

    The observer updates in training mode only (also before the start step); an observer
    that has seen nothing passes its input through unchanged.
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
        self.sync_ranks = True
        self.decay = EMA_DECAY
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
        gate = self.initialized * (step >= self.start_step)
        return fake_quant(x, scale, zero_point, gate, self.qmin, self.qmax, False)

    def _observe(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.float(), hi.float()
        if self.sync_ranks and not torch.jit.is_scripting():
            lo, hi = _global_range(lo, hi)
        # lerp with weight 1 takes the first observation as is; then EMA with weight 1 - decay
        weight = 1.0 - self.decay * self.initialized
        self.tracked_min.lerp_(lo, weight)
        self.tracked_max.lerp_(hi, weight)
        self.initialized.fill_(1.0)


@torch.jit.unused
def _global_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Under torch.distributed, the range over every rank's batch, so all ranks quantize alike."""
    if not (dist.is_available() and dist.is_initialized()):
        return lo, hi
    both = torch.stack([-lo, hi])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -both[0], both[1]


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
        gate = (step >= self.start_step).float()
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
