"""Conv-BatchNorm folding during QAT: the tensor functions the fold pass puts in the graph. Never imports torch.fx.

A quantized convolution followed by a BatchNorm is deployed as one convolution whose weight is
``w * gamma / sqrt(running_var + eps)`` (per output channel). Quantization-aware training must
therefore fake-quantize that folded weight, not ``w`` (NNI 2.x's QAT_Quantizer with a dummy
input, torch.ao's ``ConvBn2d``). As torch.ao does, the forward computes

    s = gamma / sqrt(running_var + eps)
    y = conv(x, fq(w * s), b * s) / s        # = conv(x, w, b) when fq is off (float rounding aside)
    z = bn(y)                                # batch statistics in train mode, running ones in eval

so the BatchNorm still normalises with its batch statistics (and updates its running ones) in
training, while in eval ``z`` is exactly what the folded convolution computes. A channel whose
``s`` is 0 (``gamma`` = 0: e.g. a pruned channel) is scaled by 1 instead, so no division by zero.
Before ``quant_start_step`` every ``s`` is 1: the model is bit-identical to the float model until
quantization starts (the gate is a tensor computation, as the quantizers' is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["bn_fold_scale", "scale_bias", "scale_rows", "unscale_channels"]


def bn_fold_scale(gamma: Tensor | None, running_var: Tensor, eps: float, step: Tensor, start_step: int) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel (``gamma`` None: a BatchNorm without affine), 0 -> 1;
    all ones before ``start_step`` (``step`` completed steps), so that the model computes exactly the
    unfolded float model until quantization starts."""
    if not torch.jit.is_scripting():
        running_var = _read_before_update(running_var)
    inv_std = torch.rsqrt(running_var + eps)
    scale = inv_std if gamma is None else gamma * inv_std
    folding = (scale != 0) & (step >= start_step)
    return torch.where(folding, scale, torch.ones_like(scale))


@torch.library.custom_op("fxcompress::buffer_snapshot", mutates_args=())
def _buffer_snapshot(x: Tensor) -> Tensor:
    """A copy of ``x``, as an op the compiler's partitioner never recomputes in the backward."""
    return x.clone()


@_buffer_snapshot.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.jit.unused
def _read_before_update(running_var: Tensor) -> Tensor:
    """``running_var`` as read now, also for the backward of a ``torch.compile``d training step.

    The BatchNorm after the conv updates ``running_var`` in place later in the same forward.
    AOTAutograd's partitioner may recompute ``rsqrt(running_var + eps)`` in the backward instead of
    saving it, and the recomputation then reads the updated buffer: the fold scale of the backward
    is not the forward's, and the gradients of the conv's weight and bias and the BatchNorm's
    parameters come out wrong (torch 2.14.1; pytorch/pytorch PR 197039 proposes the fix upstream).
    A snapshot through an opaque op is saved instead (a few bytes per channel). Export and
    eager are unaffected (no backward is partitioned) and read the buffer directly; a training
    program exported and then compiled for training would meet the partitioner without the snapshot.
    """
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _buffer_snapshot(running_var)
    return running_var


def scale_rows(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with output channel ``i`` (dim 0) multiplied by ``scale[i]``."""
    return weight * scale.reshape([-1] + [1] * (weight.dim() - 1))


def scale_bias(bias: Tensor | None, scale: Tensor) -> Tensor | None:
    """``bias * scale`` (None stays None: TorchScript types a layer's bias as Optional)."""
    if bias is None:
        return None
    return bias * scale


def unscale_channels(y: Tensor, scale: Tensor) -> Tensor:
    """``y`` with channel ``i`` (dim 1) divided by ``scale[i]``."""
    if not torch.jit.is_scripting():
        if _keeps_quotient(y, scale):
            return _unscale(y, scale)
    return y / _per_channel(scale, y.dim())


def _per_channel(scale: Tensor, dims: int) -> Tensor:
    """``scale`` shaped to broadcast over dim 1 of a ``dims``-dimensional tensor."""
    return scale.reshape([1, -1] + [1] * (dims - 2))


@torch.jit.unused
def _keeps_quotient(y: Tensor, scale: Tensor) -> bool:
    """Whether :class:`_Unscale` is worth it: a gradient is recorded, and not by ``torch.jit.trace``
    (a traced Python autograd Function cannot be saved with ``torch.jit.save``)."""
    return (torch.is_grad_enabled() and (y.requires_grad or scale.requires_grad)
            and not torch.jit.is_tracing())


class _Unscale(torch.autograd.Function):
    """``y / s`` per channel, with a backward that keeps the quotient instead of ``y``.

    PyTorch's division saves ``y``, a tensor nothing else keeps: the BatchNorm after the conv keeps
    the quotient. Here the quotient ``out`` is saved, so folding keeps no extra activation-sized tensor
    per conv, and the scale's gradient is ``-sum(grad * out) / s`` (PyTorch's is ``sum(-grad * y / s²)``:
    the same math, rounded differently). Saving the quotient means that an in-place change of the
    BatchNorm's input (a user's pre-hook, say) raises autograd's version error, as the BatchNorm's
    own saved input would. The scale is saved as given, so a double backward differentiates through it.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, scale: Tensor) -> Tensor:
        out = y / _per_channel(scale, y.dim())
        ctx.save_for_backward(out, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        out, scale = ctx.saved_tensors
        grad_y = grad / _per_channel(scale, grad.dim()) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            dims = [0, *range(2, grad.dim())]
            grad_scale = -((grad * out).sum(dims) / scale)
        return grad_y, grad_scale


@torch.jit.unused
def _unscale(y: Tensor, scale: Tensor) -> Tensor:
    return _Unscale.apply(y, scale)
