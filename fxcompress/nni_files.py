"""What NNI's ``export_model`` files hold: the original model's state dict and the calibration dict.

NNI (v2's QAT_Quantizer) saved ``model.state_dict()`` of the unwrapped model and, per quantized
layer, ``weight_bits`` / ``weight_scale`` / ``weight_zero_point``, ``input_bits`` /
``tracked_min_input`` / ``tracked_max_input`` and ``output_bits`` / ``tracked_min_output`` /
``tracked_max_output``. Those fields alone do not say which integer levels or which formula turned a
tracked range into a scale, so fxcompress adds ``{kind}_scheme`` and ``{kind}_dtype`` (NNI 3's
names) and an activation's ``{kind}_scale`` / ``{kind}_zero_point`` (SPEC §5's formula applied to
the tracked range): with them a consumer reproduces the fake-quant model from the two files alone.
A conv whose BatchNorm is folded for QAT (``plan.folds_bn``) has ``weight_folded_bn``, the
BatchNorm's name: its weight fields describe the folded weight ``w * gamma / sqrt(running_var + eps)``
(SPEC §5), which the consumer computes from the state dict's conv and BatchNorm entries.
Every quantized layer has ``quant_reduce_range`` (the config key's name): True when the layer was
trained with it, its activations (input, output; an attention's key and value inputs) then using
the levels of one bit fewer (uint8 0..127, int8 -63..63) while its weight keeps all of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxcompress.annotations import plans_of
from fxcompress.attention import CompressedAttention
from fxcompress.layers import CompressionRecord
from fxcompress.passes.freeze import quantizers_off, weight_quantizer_inputs
from fxcompress.quant import ActivationQuantizer, StepCounter, WeightQuantizer, qparams

__all__ = ["nni_calibration", "original_state_dict"]

_ADDED = (ActivationQuantizer, WeightQuantizer, StepCounter, CompressionRecord)
_ACTIVATIONS = ("input", "key_input", "value_input", "output")


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under the original model's keys: no quantizer, step counter or record
    entries; an attention's ``in_proj.weight`` / ``in_proj.bias`` back to ``in_proj_weight`` (or
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``) / ``in_proj_bias``.

    Args:
        model: a compressed model whose masks are already folded (see ``passes.freeze.fold_masks``).
    """
    added = tuple(f"{path}." for path, m in model.named_modules() if isinstance(m, _ADDED))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(added)}
    for path, module in model.named_modules():
        if isinstance(module, CompressedAttention):
            _unpack_attention(state, f"{path}." if path else "", module)
    return state


def _unpack_attention(state: dict[str, torch.Tensor], prefix: str, attention: CompressedAttention) -> None:
    weight = state.pop(f"{prefix}in_proj.weight")
    if attention.qkv_widths:  # separate q/k/v: [q | k | v] side by side
        for part, piece in zip(("q", "k", "v"), weight.split(attention.qkv_widths, dim=1), strict=True):
            state[f"{prefix}{part}_proj_weight"] = piece.clone()
    else:
        state[f"{prefix}in_proj_weight"] = weight
    bias = state.pop(f"{prefix}in_proj.bias", None)
    if bias is not None:
        state[f"{prefix}in_proj_bias"] = bias.reshape(-1)


@torch.no_grad()
def nni_calibration(gm: nn.Module) -> dict[str, dict[str, Any]]:
    """Per layer, the fields of each quantizer that is on in eval mode (JSON-ready numbers and lists).

    Weight fields are the qparams of what the weight quantizer quantizes (the masked weight), as
    ``finalize`` freezes them; activation fields come from the tracked range.

    Args:
        gm: a model returned by ``fxcompress.compress`` (read only).
    Returns:
        ``{layer: {field: value}}`` in plan order; a layer whose quantizers are all off is left out.
    """
    off = quantizers_off(gm)
    weights = weight_quantizer_inputs(gm)
    out: dict[str, dict[str, Any]] = {}
    for name, plan in plans_of(gm).items():
        if plan.quant is None or not plan.compressed:
            continue
        layer = gm.get_submodule(name)
        fields: dict[str, Any] = {}
        for kind in ("weight", *_ACTIVATIONS):
            path = f"{name}.{kind}_quantizer"
            q = getattr(layer, f"{kind}_quantizer", None)
            if q is None or path in off:
                continue
            if kind == "weight":
                scale, zero_point = q.current_qparams(weights[path])
                fields.update(weight_bits=q.bits, weight_scale=scale.tolist(),
                              weight_zero_point=[int(v) for v in zero_point.reshape(-1).tolist()])
                if plan.folds_bn is not None:  # the fields describe w * gamma / sqrt(running_var + eps)
                    fields["weight_folded_bn"] = plan.folds_bn
            else:
                scale, zero_point = qparams(q.tracked_min, q.tracked_max, q.qmin, q.qmax, q.symmetric)
                fields.update({f"{kind}_bits": q.bits, f"tracked_min_{kind}": float(q.tracked_min),
                               f"tracked_max_{kind}": float(q.tracked_max), f"{kind}_scale": float(scale),
                               f"{kind}_zero_point": int(zero_point)})
            fields.update({f"{kind}_scheme": q.scheme, f"{kind}_dtype": q.dtype})
        if fields:
            # weights never reduce their range (config.py): the activation settings carry the key
            fields["quant_reduce_range"] = any(s is not None and s.reduce_range
                                               for s in (plan.quant.input, plan.quant.output))
            out[name] = fields
    return out
