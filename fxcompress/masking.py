"""How a pruned layer uses its parameters in the forward: ``param * mask``, at every read.

The forward multiplies, so a pruned entry never acts whatever is written into the stored
parameter through a public path (``load_state_dict`` of dense weights, an optimizer whose
momentum predates the mask, a tied parameter): SPEC §4. Autograd's gradient of the product is
``grad * mask``, so pruned entries get exactly zero gradient. Never imports torch.fx.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["masked_bias", "masked_weight"]


def masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """The weight of a pruned layer as its forward uses it: pruned entries are zero and get no gradient."""
    return weight * mask


def masked_bias(bias: Tensor | None, mask: Tensor) -> Tensor | None:
    """As :func:`masked_weight`; Optional because TorchScript types a layer's bias as Optional."""
    if bias is None:
        return None
    return bias * mask
