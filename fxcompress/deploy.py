"""The way out of training: finalize (the inference model), convert (int8 kernels), export_onnx (QDQ ONNX),
export_model (NNI's files).

None of these changes the compressed model it is given: each works on a deep copy.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fxcompress.annotations import RECORD
from fxcompress.errors import caller_stacklevel
from fxcompress.frozen import FrozenQuantizer
from fxcompress.nni_files import nni_calibration, original_state_dict
from fxcompress.passes.freeze import (
    drop_training_state,
    fold_masks,
    freeze_graph,
    freeze_quantizers,
    quantizers_off,
    untied_layers,
    weight_quantizer_inputs,
)
from fxcompress.passes.lower_int8 import (
    check_convertible,
    fold_float_batchnorms,
    fuse_requantize,
    lower_int8_layers,
    output_drift,
)

__all__ = ["convert", "export_model", "export_onnx", "finalize"]

#: The cosine similarity to the fake-quantized outputs below which ``convert`` warns.
CONVERT_MIN_COSINE = 0.99


def finalize(gm: nn.Module) -> nn.Module:
    """The inference model of a compressed model: what ``gm.eval()`` computes, with nothing left to train.

    Masks are multiplied into the weights (pruned entries exactly 0; no mask buffers or nodes); each
    quantizer that is on in eval mode (its ``quant_start_step`` reached, an activation quantizer's
    range observed) becomes a :class:`~fxcompress.frozen.FrozenQuantizer` with constant scale and
    zero point (a weight's computed once from the masked weight); one that is off computes the
    identity in ``gm.eval()`` and is dropped, with a warning naming the layer and why (an attention's
    key/value input quantizers, which self-attention never calls, without one). The step counter,
    the observers and the compression record are gone.

    Args:
        gm: a model returned by ``fxcompress.compress`` (traced, with leaf layers, or module level).
    Returns:
        A new model in eval mode (a GraphModule for a traced ``gm``) whose outputs equal
        ``gm.eval()``'s exactly; it exports with ``torch.export``, compiles and (traced) scripts.
    Raises:
        TypeError: ``gm`` was not compressed by fxcompress.

    >>> inference = finalize(gm)  # doctest: +SKIP
    """
    _check_compressed(gm, "finalize")
    return _finalized(gm, "finalize")


def _finalized(gm: nn.Module, caller: str) -> nn.Module:
    model = copy.deepcopy(gm).eval()  # eval: nothing counts or observes while it is taken apart
    off = quantizers_off(model)
    _warn_off(off, caller, "it is dropped: the finalized model does not quantize there, as gm.eval() does not")
    weights = weight_quantizer_inputs(model)  # before the masks are folded: the graph still reads them
    fold_masks(model)
    freeze_quantizers(model, off, weights)
    if isinstance(model, torch.fx.GraphModule):
        freeze_graph(model, off)
    drop_training_state(model)
    return model.eval()


def convert(gm: nn.Module, example_inputs: Sequence[Any] | torch.Tensor) -> nn.Module:
    """The int8 inference model of a quantized model: int8 weights, uint8 activations, oneDNN's x86 int8 kernels.

    Each layer whose input and weight are quantized (8 bits, the weight symmetric ``int``) becomes an
    :class:`~fxcompress.int8.Int8Conv` / :class:`~fxcompress.int8.Int8Linear` holding its weight's
    integer levels as ``int8`` with a float scale per output channel, behind a
    :class:`~fxcompress.int8.QuantizeUint8` of its input; a BatchNorm reading a conv (folded during QAT
    or not) is folded into that conv's scales and bias and removed; where a layer's output, after a
    ReLU/ReLU6, only feeds other int8 layers' inputs, the kernel returns their uint8 levels directly.
    Output quantizers and the rest of the model stay as :func:`finalize` has them (float). The result
    runs eagerly and under ``torch.compile`` (inductor fuses the quantize steps into the ops before
    them), saves with ``torch.save(model, path)`` and loads with ``torch.load(path, weights_only=False)``.

    It runs :func:`finalize`'s model and the result on ``example_inputs`` and keeps how far apart they
    are in ``result.convert_drift`` (``cosine``, ``max_abs_diff``, ``max_abs_reference``), warning when
    the cosine is below 0.99. x86 CPUs without VNNI sum pairs of uint8 x int8 products in 16 bits, which
    saturate with full-range uint8 activations: train with ``quant_reduce_range: True`` (7-bit
    activation levels, README Deploy) for the kernels to match the fake-quantized model.

    Args:
        gm: a model returned by ``fxcompress.compress`` (traced), trained past ``quant_start_step``.
        example_inputs: the forward's positional arguments (a tuple; a last element that is a dict holds
            keyword arguments), or one tensor.
    Returns:
        A new GraphModule in eval mode; ``gm`` is not changed.
    Raises:
        TypeError: ``gm`` was not compressed by fxcompress.
        ConvertError: (a ``ValueError``) naming the layer: a quantizer off in eval mode (never observed,
            start step not reached), a bit width other than 8, an asymmetric or ``uint`` weight, a layer
            inside a leaf or attention module, a layer called twice; or a model compressed at module level.

    >>> int8_model = convert(gm, (torch.randn(1, 1, 28, 28),))  # doctest: +SKIP
    """
    _check_compressed(gm, "convert")
    check_convertible(gm)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    keywords = args[-1] if args and isinstance(args[-1], dict) else {}
    args = args[:len(args) - bool(keywords)]
    model = _finalized(gm, "convert")
    with torch.no_grad():
        reference = model(*args, **keywords)
        lower_int8_layers(model)
        fuse_requantize(model)
        fold_float_batchnorms(model)
        drift = output_drift(reference, model(*args, **keywords))
    model.convert_drift = drift
    if drift["cosine"] < CONVERT_MIN_COSINE:
        warnings.warn(f"convert: the int8 model's outputs are far from the fake-quantized model's on the example "
                      f"inputs (cosine {drift['cosine']:.4f}, largest difference {drift['max_abs_diff']:.4g} of "
                      f"{drift['max_abs_reference']:.4g}); on x86 without VNNI, train with 'quant_reduce_range': "
                      "True (README, Deploy)", UserWarning, stacklevel=caller_stacklevel())
    return model.eval()


def _warn_off(off: dict[str, str], caller: str, consequence: str) -> None:
    for path, why in off.items():
        layer, _, attr = path.rpartition(".")
        if attr in ("key_input_quantizer", "value_input_quantizer"):
            continue  # self-attention never calls them; the query's input quantizer speaks for the layer
        warnings.warn(f"{caller}: layer {layer!r}: its {attr.removesuffix('_quantizer')} quantizer is off in eval "
                      f"mode ({why}), so {consequence}", UserWarning, stacklevel=caller_stacklevel())


def _check_compressed(gm: Any, caller: str) -> None:
    if not isinstance(gm, nn.Module) or not hasattr(gm, RECORD):
        kind = type(gm).__name__
        raise TypeError(f"{caller}: expected a model returned by fxcompress.compress, got a {kind} that was never "
                        "compressed (it has no fxcompress_record); compress it first, or pass the compressed model")


def export_onnx(gm: nn.Module, path: str | os.PathLike, example_inputs: Sequence[Any] | torch.Tensor,
                opset: int = 17) -> None:
    """Write the finalized model as ONNX with a QuantizeLinear/DequantizeLinear pair per quantizer.

    Weights quantized per channel get their pair along ``axis=0``; activations are per tensor. The
    export runs PyTorch's TorchScript-based exporter (``dynamo=False``; the README's Deploy section
    says why) on :func:`finalize`'s model, which traces the forward on ``example_inputs``: a
    data-dependent branch is fixed at the path those inputs take. 8-bit quantization only: ``uint``
    is uint8 (levels 0..255), ``int`` (narrow, -127..127) is int8 with a Clip to the narrow levels
    in front of an activation's QuantizeLinear (a weight's quantized levels never reach -128).

    Args:
        gm: a model returned by ``fxcompress.compress``.
        path: the ``.onnx`` file to write.
        example_inputs: the forward's positional arguments (a tuple; a last element that is a dict
            holds keyword arguments, as ``torch.onnx.export`` takes them), or one tensor.
        opset: the ONNX opset, 13 or later (per-channel QuantizeLinear needs 13).
    Raises:
        TypeError: ``gm`` was not compressed by fxcompress.
        ValueError: an opset below 13, or a quantizer that is on with a bit width other than 8 (naming the layer).
        ImportError: the ``onnx`` package is missing (``pip install fxcompress[onnx]``).

    >>> export_onnx(gm, "model.onnx", (torch.randn(1, 1, 28, 28),))  # doctest: +SKIP
    """
    _check_compressed(gm, "export_onnx")
    if opset < 13:
        raise ValueError(f"export_onnx: opset {opset} is too old; per-channel QuantizeLinear/DequantizeLinear "
                         "need opset 13 or later")
    try:
        import onnx
    except ImportError as err:
        raise ImportError("export_onnx needs the onnx package: pip install 'fxcompress[onnx]'") from err
    model = _finalized(gm, "export_onnx")
    _to_onnx_levels(model)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    keywords = args[-1] if args and isinstance(args[-1], dict) else {}
    positional = list(inspect.signature(model.forward).parameters)[:len(args) - bool(keywords)]
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notices: it is chosen deliberately (README, Deploy)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(model, args, os.fspath(path), opset_version=opset, dynamo=False,
                              input_names=[*positional, *keywords])
    onnx.checker.check_model(os.fspath(path))


def _to_onnx_levels(model: nn.Module) -> None:
    """Give every frozen quantizer the levels of an ONNX 8-bit type, keeping its values; refuse other widths."""
    for path, q in model.named_modules():
        if not isinstance(q, FrozenQuantizer):
            continue
        layer, _, attr = path.rpartition(".")
        if q.bits != 8:
            raise ValueError(f"export_onnx: layer {layer!r}: its {attr.removesuffix('_quantizer')} quantizer has "
                             f"{q.bits} bits, and ONNX QuantizeLinear/DequantizeLinear hold 8-bit integers only "
                             "(int8/uint8); quantize it with 8 bits to export it")
        if q.dtype == "uint":
            continue
        if attr != "weight_quantizer":
            q.set_int8_range(clamp_first=True)
            continue
        weight = model.get_submodule(layer).weight
        with torch.no_grad():
            narrow = q(weight)
            q.set_int8_range(clamp_first=False)
            if not torch.equal(q(weight), narrow):  # a level below -127: keep the narrow levels with a Clip
                q.set_int8_range(clamp_first=True)


def export_model(gm: nn.Module, model_path: str | os.PathLike,
                 calibration_path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """NNI's ``export_model``: the original model's state dict and the calibration dict, with ``torch.save``.

    The state dict has the original model's own keys, masks folded into the weights (no ``*_mask``,
    quantizer, ``fxcompress_step`` or ``fxcompress_record`` entries; an ``nn.MultiheadAttention``'s
    ``in_proj.weight`` is its ``in_proj_weight`` again, or its ``q/k/v_proj_weight``), so it loads
    into a fresh copy of the original model. A module the traced forward never uses is not in a
    GraphModule, so its keys are missing (load with ``strict=False``). The calibration dict, per
    layer, holds NNI's fields (``weight_bits``, ``weight_scale``, ``weight_zero_point``, ``input_bits``,
    ``tracked_min_input``, ``tracked_max_input``, ``output_bits``, ``tracked_min_output``,
    ``tracked_max_output``) and fxcompress's (``{kind}_scheme``, ``{kind}_dtype``, and an activation's
    ``{kind}_scale`` / ``{kind}_zero_point``; ``key_input`` / ``value_input`` for an attention's key
    and value) for every quantizer that is on in eval mode; one that is off is left out, with a
    warning as :func:`finalize` gives. Weight fields describe the masked weight of the saved state dict.
    Each layer also has ``quant_reduce_range``: whether its activations use the levels of one bit fewer
    (the config key of that name; uint8 0..127), which their bits and scale alone do not say.

    Args:
        gm: a model returned by ``fxcompress.compress``.
        model_path: where to ``torch.save`` the state dict.
        calibration_path: where to ``torch.save`` the calibration dict (not written when None).
    Returns:
        The calibration dict (plain numbers and lists; JSON-ready).
    Raises:
        TypeError: ``gm`` was not compressed by fxcompress.

    >>> calibration = export_model(gm, "model.pth", "calibration.pth")  # doctest: +SKIP
    """
    _check_compressed(gm, "export_model")
    model = copy.deepcopy(gm)
    for layer in untied_layers(model):
        warnings.warn(f"export_model: layer {layer!r} shares its weight with a module the config does not prune; "
                      "the state dict holds the masked weight under the layer's key and the stored one under the "
                      "other module's, and a model that ties the two again keeps only one of them", UserWarning,
                      stacklevel=caller_stacklevel())
    _warn_off(quantizers_off(model), "export_model",
              "its fields are left out of the calibration: gm.eval() does not quantize there")
    fold_masks(model)
    torch.save(original_state_dict(model), os.fspath(model_path))
    fields = nni_calibration(gm)
    if calibration_path is not None:
        torch.save(fields, os.fspath(calibration_path))
    return fields
