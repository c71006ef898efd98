"""How a pruned layer uses its parameters in the forward: the gradient is masked, the values already are.

A pruned entry of a parameter is held at exactly zero: ``install_masks`` zeroes it, and it gets
zero gradient here, so no optimizer moves it (momentum stays 0, weight decay of 0 is 0, Adam's
update of a zero gradient from zero moments is 0). The forward therefore reads the parameter as
it is, with no ``weight * weight_mask`` pass, and only the backward multiplies by the mask: one
elementwise pass per step instead of two, and no masked copy of the weight kept for backward.
Under TorchScript the plain ``param * mask`` is used. Never imports torch.fx.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["masked_bias", "masked_weight"]


class _MaskGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, param: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return param.view_as(param)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


@torch.jit.unused
def _mask_gradient(param: Tensor, mask: Tensor) -> Tensor:
    return _MaskGradient.apply(param, mask)


def masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """The weight of a pruned layer as its forward uses it (pruned entries are zero, get no gradient)."""
    if torch.jit.is_scripting():
        return weight * mask
    return _mask_gradient(weight, mask)


def masked_bias(bias: Tensor | None, mask: Tensor) -> Tensor | None:
    """As :func:`masked_weight`; Optional because TorchScript types a layer's bias as Optional."""
    if bias is None:
        return None
    if torch.jit.is_scripting():
        return bias * mask
    return _mask_gradient(bias, mask)
