"""Modules that run inside a compressed model: the step counter, observers and fake-quant.

Everything here is TorchScript-compatible, has no Python branch on tensor values (the
``quant_start_step`` gate is a ``torch.where``), and never imports torch.fx.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxcompress.config import QuantSetting

__all__ = ["ActivationQuantizer", "StepCounter", "WeightQuantizer", "apply_mask", "qparams"]

EMA_DECAY = 0.99
FLOAT32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, a literal for TorchScript


def apply_mask(tensor: Tensor | None, mask: Tensor) -> Tensor | None:
    """``tensor * mask``; typed Optional because TorchScript sees a layer's bias as Optional."""
    if tensor is None:
        return None
    return tensor * mask


class StepCounter(nn.Module):
    """One int64 buffer counting completed training steps for the whole model.

    Called once at the top of the forward, it returns the steps completed *before* this
    forward and, in training mode when counting forwards, adds one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts_forwards = True
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self) -> Tensor:
        done = self.step.clone()
        if self.training and self.counts_forwards:
            self.step.add_(1)
        return done


def qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of SPEC.md §5 for the range (lo, hi), widened to contain 0.

    Affine: ``scale = (max-min)/(qmax-qmin)``, ``zp = qmin - round(min/scale)`` clamped.
    Symmetric: ``scale = max(|min|,|max|) / ((qmax-qmin)/2)``, ``zp = (qmin+qmax)//2`` (0 for int).
    Scale never drops below float32 eps.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((qmax - qmin) / 2.0), min=1.1920928955078125e-07)
        zero_point = torch.full_like(scale, float((qmin + qmax) // 2))
    else:
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=1.1920928955078125e-07)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point.to(torch.int32)


class ActivationQuantizer(nn.Module):
    """Per-tensor fake-quant of an activation with an EMA (decay 0.99) min/max observer.

    The observer updates in training mode only (also before the start step); an observer
    that has seen nothing passes its input through unchanged.
    """

    def __init__(self, setting: QuantSetting, start_step: int) -> None:
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
        self.register_buffer("tracked_min", torch.zeros((), dtype=torch.float32))
        self.register_buffer("tracked_max", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's own signature)
        # ranges stay float32 when the model is cast (model.half(), .to(bfloat16)); devices follow
        super()._apply(fn, recurse)
        for name in ("tracked_min", "tracked_max"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        if self.training:
            self._observe(x)
        scale, zero_point = qparams(self.tracked_min, self.tracked_max, self.qmin, self.qmax, self.symmetric)
        fq = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, self.qmin, self.qmax)
        active = self.initialized & (step >= self.start_step)
        return torch.where(active, fq.to(x.dtype), x)

    def _observe(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.float(), hi.float()
        if self.sync_ranks and not torch.jit.is_scripting():
            lo, hi = _global_range(lo, hi)
        first = ~self.initialized
        self.tracked_min.copy_(torch.where(first, lo, self.decay * self.tracked_min + (1.0 - self.decay) * lo))
        self.tracked_max.copy_(torch.where(first, hi, self.decay * self.tracked_max + (1.0 - self.decay) * hi))
        self.initialized.fill_(True)


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

    def __init__(self, setting: QuantSetting, start_step: int) -> None:
        super().__init__()
        self.qmin, self.qmax = setting.qmin, setting.qmax
        self.symmetric = setting.symmetric
        self.per_channel = setting.per_channel
        self.start_step = start_step
        self.bits = setting.bits
        self.scheme = setting.scheme
        self.dtype = setting.dtype

    def forward(self, w: Tensor, step: Tensor) -> Tensor:
        scale, zero_point = self.current_qparams(w)
        wf = w.float()
        if self.per_channel:
            fq = torch.fake_quantize_per_channel_affine(wf, scale, zero_point, 0, self.qmin, self.qmax)
        else:
            fq = torch.fake_quantize_per_tensor_affine(wf, scale, zero_point, self.qmin, self.qmax)
        return torch.where(step >= self.start_step, fq.to(w.dtype), w)

    def current_qparams(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point for the weight as it is now."""
        wd = w.detach().float()
        if self.per_channel:
            lo, hi = torch.aminmax(wd.reshape(wd.shape[0], -1), dim=1)
        else:
            lo, hi = torch.aminmax(wd)
        return qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
