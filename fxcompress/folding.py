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

import torch
from torch import Tensor

__all__ = ["bn_fold_scale", "scale_bias", "scale_rows", "unscale_channels"]


def bn_fold_scale(gamma: Tensor | None, running_var: Tensor, eps: float, step: Tensor, start_step: int) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel (``gamma`` None: a BatchNorm without affine), 0 -> 1;
    all ones before ``start_step`` (``step`` completed steps), so that the model computes exactly the
    unfolded float model until quantization starts."""
    inv_std = torch.rsqrt(running_var + eps)
    scale = inv_std if gamma is None else gamma * inv_std
    folding = (scale != 0) & (step >= start_step)
    return torch.where(folding, scale, torch.ones_like(scale))


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
    return y / scale.reshape([1, -1] + [1] * (y.dim() - 2))
