"""The modules of a converted model: uint8 activations times int8 weights on oneDNN's x86 kernels.

:func:`fxcompress.convert` puts these in place of the fake-quantized layers of a finalized model:

* :class:`QuantizeUint8` turns a float activation into the integer levels of its (frozen, per-tensor)
  quantizer, stored as ``uint8``: exactly the levels ``torch.fake_quantize_per_tensor_affine``
  rounds to (an ``int`` activation's levels are shifted by 128 into ``uint8``, zero point with them).
* :class:`Int8Conv` and :class:`Int8Linear` hold the weight as ``int8`` levels with one float32 scale
  per output channel (zero point 0) and a float32 bias, and call ``torch.ops.onednn.qconv_pointwise`` /
  ``qlinear_pointwise``: the kernels PyTorch's x86 inductor lowering of quantized models calls. They
  return float32, or (``output_scale`` set) the ``uint8`` levels of the next layer's input quantizer,
  requantized inside the kernel, after an optional ``relu`` / ``hardtanh`` post-op.

oneDNN wants its weights reordered ("prepacked") into an opaque blocked tensor. That tensor cannot be
pickled or deep-copied, so it is an attribute rebuilt from the ``int8`` buffer when a module is
built, loaded (``torch.load``, ``load_state_dict``) or copied: the saved state is the ``int8`` weight,
its scales and the bias. CPU only. Never imports torch.fx.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers torch.ops.quantized_decomposed)
from torch import Tensor, nn

__all__ = ["ConvertError", "Int8Conv", "Int8Linear", "QuantizeUint8"]


class ConvertError(ValueError):
    """A compressed model (or one of its layers) that :func:`fxcompress.convert` cannot run on int8 kernels.

    The message names the layer and says what to change. Nothing about the model is changed.
    """


class QuantizeUint8(nn.Module):
    """Float -> the ``uint8`` levels ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (round half to even).

    Args:
        scale: the quantizer's scale.
        zero_point: its zero point, in ``uint8`` levels.
        qmin: the lowest level (0, or 1 for a shifted narrow ``int`` quantizer).
        qmax: the highest level (255, or 127 with ``quant_reduce_range``).
    """

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        assert 0 <= qmin < qmax <= 255 and qmin <= zero_point <= qmax, "uint8 levels only"
        self.scale, self.zero_point, self.qmin, self.qmax = float(scale), int(zero_point), int(qmin), int(qmax)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        if torch.compiler.is_compiling():  # inductor fuses this into the op that makes x
            return torch.ops.quantized_decomposed.quantize_per_tensor.default(x, self.scale, self.zero_point, self.qmin,
                                                                              self.qmax, torch.uint8)
        levels = _quantize_eager(x, self.scale, self.zero_point)
        if (self.qmin, self.qmax) != (0, 255):
            levels.clamp_(self.qmin, self.qmax)
        return levels

    def same_levels(self, other: QuantizeUint8) -> bool:
        """Whether ``other`` computes the same levels."""
        return (self.scale, self.zero_point, self.qmin, self.qmax) == (other.scale, other.zero_point, other.qmin,
                                                                      other.qmax)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, levels [{self.qmin}, {self.qmax}]"


def _quantize_eager(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """The uint8 levels of ``x`` (0..255): PyTorch's vectorised quantize kernel, its storage viewed as uint8.

    That kernel is about 10x faster on CPU than the same arithmetic in tensor ops (their float -> uint8
    cast is not vectorised) and rounds exactly as ``fake_quantize_per_tensor_affine`` (tested). It
    makes a (deprecated) quantized tensor: where it is gone, the tensor ops take over.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized-tensor deprecation notice: only its storage is used
            q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
        return torch.empty((0,), dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(),
                                                          q.stride())
    except (AttributeError, RuntimeError):
        return torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(0, 255).to(torch.uint8)


def _channels_last_empty(shape: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty tensor of ``shape`` (N, C, *spatial) laid out channels last, as oneDNN's conv returns it."""
    order = [0, *range(2, len(shape)), 1]
    return torch.empty([shape[i] for i in order], dtype=dtype, device=device).permute(
        [0, len(shape) - 1, *range(1, len(shape) - 1)])


_PACKED: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _cached_pack(weight: Tensor, pack: Any) -> Tensor:
    """oneDNN's packed form of ``weight``, kept while ``weight`` lives and is not written to."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        entry = (weakref.ref(weight, lambda _, k=key: _PACKED.pop(k, None)), weight._version, pack())
        _PACKED[key] = entry
    return entry[2]


@torch.library.custom_op("fxcompress::int8_conv", mutates_args=())
def _int8_conv_op(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, input_scale: float,
                  input_zero_point: int, output_scale: float, output_zero_point: int, uint8_output: bool,
                  post_op: str, post_op_args: list[float]) -> Tensor:
    """The int8 conv as one opaque op (compiled without freezing): packs its weight once, on first use."""
    packed = _cached_pack(weight, lambda: torch.ops.onednn.qconv_prepack(
        weight, weight_scale, input_scale, input_zero_point, stride, padding, dilation, groups, None))
    y = torch.ops.onednn.qconv_pointwise(
        x, input_scale, input_zero_point, packed, weight_scale, weight_zero_point, bias, stride, padding, dilation,
        groups, output_scale, output_zero_point, torch.uint8 if uint8_output else torch.float32, post_op,
        post_op_args, "")
    out = _channels_last_empty(list(y.shape), y.dtype, y.device)
    return y if y.stride() == out.stride() else out.copy_(y)


@_int8_conv_op.register_fake
def _(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor, bias: Tensor | None,
      stride: list[int], padding: list[int], dilation: list[int], groups: int, input_scale: float,
      input_zero_point: int, output_scale: float, output_zero_point: int, uint8_output: bool, post_op: str,
      post_op_args: list[float]) -> Tensor:
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
               zip(x.shape[2:], padding, dilation, weight.shape[2:], stride, strict=True)]
    return _channels_last_empty([x.shape[0], weight.shape[0], *spatial], torch.uint8 if uint8_output else
                                torch.float32, x.device)


@torch.library.custom_op("fxcompress::int8_linear", mutates_args=())
def _int8_linear_op(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor, bias: Tensor | None,
                    input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int,
                    uint8_output: bool, post_op: str, post_op_args: list[float]) -> Tensor:
    """The int8 linear layer (2-D input) as one opaque op (compiled without freezing)."""
    packed = _cached_pack(weight, lambda: torch.ops.onednn.qlinear_prepack(weight, None))
    y = torch.ops.onednn.qlinear_pointwise(
        x, input_scale, input_zero_point, packed, weight_scale, weight_zero_point, bias, output_scale,
        output_zero_point, torch.uint8 if uint8_output else torch.float32, post_op, post_op_args, "")
    return y.contiguous()


@_int8_linear_op.register_fake
def _(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor, bias: Tensor | None,
      input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int, uint8_output: bool,
      post_op: str, post_op_args: list[float]) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.uint8 if uint8_output else torch.float32)


def _opaque() -> bool:
    """Compiling without inductor's freezing: inductor lowers oneDNN's int8 ops only with constant weights,
    so the layers call their opaque custom op instead (any backend runs it)."""
    if not torch.compiler.is_compiling():
        return False
    import torch._inductor.config as inductor_config

    return not inductor_config.freezing


class _Int8Layer(nn.Module):
    """What Int8Conv and Int8Linear share: int8 weight, per-channel scales, bias, activation qparams, post-op."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: float,
                 input_zero_point: int) -> None:
        super().__init__()
        assert weight.dtype == torch.int8 and weight_scale.numel() == weight.shape[0]
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("weight_scale", weight_scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.output_scale: float | None = None  # None: float32 output
        self.output_zero_point = 0
        self.post_op = "none"  # or "relu", "hardtanh" (with post_op_args (min, max))
        self.post_op_args: list[float] = []
        self._packed = torch.empty(0)  # set by the subclass's _repack()

    def requantize(self, quantize: QuantizeUint8, post_op: str = "none", args: tuple[float, ...] = ()) -> None:
        """Return ``quantize``'s uint8 levels of ``post_op(output)`` instead of the float output.

        Levels narrower than 0..255 (``quant_reduce_range``) become a Hardtanh post-op clamping the float
        output to the values of the lowest and highest level, so the kernel never rounds beyond them.
        """
        self.output_scale, self.output_zero_point = quantize.scale, quantize.zero_point
        if (quantize.qmin, quantize.qmax) != (0, 255):
            lo = (quantize.qmin - quantize.zero_point) * quantize.scale
            hi = (quantize.qmax - quantize.zero_point) * quantize.scale
            if post_op == "relu":
                lo = max(lo, 0.0)
            elif post_op == "hardtanh":
                lo, hi = max(lo, args[0]), min(hi, args[1])
            post_op, args = "hardtanh", (lo, hi)
        self.post_op, self.post_op_args = post_op, [float(a) for a in args]

    def _out_dtype(self) -> torch.dtype:
        return torch.float32 if self.output_scale is None else torch.uint8

    def packed(self) -> Tensor:
        """oneDNN's reordered weight."""
        return self._packed

    def _repack(self) -> None:
        self._packed = self._pack()

    def _pack(self) -> Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None}  # opaque oneDNN tensors neither pickle nor copy

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._repack()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._repack()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's own signature)
        super()._apply(fn, recurse)
        self._repack()  # a cast or move: repack from the int8 buffer as it now is (CPU only)
        return self

    def extra_repr(self) -> str:
        out = "float32" if self.output_scale is None else f"uint8 (scale={self.output_scale:.6g}, " \
                                                          f"zero_point={self.output_zero_point})"
        post = "" if self.post_op == "none" else f", post_op={self.post_op}{tuple(self.post_op_args) or ''}"
        return f"input scale={self.input_scale:.6g} zero_point={self.input_zero_point}, output {out}{post}"


class Int8Conv(_Int8Layer):
    """A convolution (1d/2d/3d) of uint8 levels with int8 weight levels, on oneDNN's int8 kernel.

    Args:
        weight: int8 levels ``(C_out, C_in/groups, *kernel)``, symmetric (zero point 0).
        weight_scale: float scale per output channel (positive).
        bias: float bias per output channel, or None.
        stride, padding, dilation, groups: as the convolution's.
        input_scale: the input quantizer's scale.
        input_zero_point: its zero point in uint8 levels.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, input_scale: float,
                 input_zero_point: int) -> None:
        super().__init__(weight, weight_scale, bias, input_scale, input_zero_point)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups = int(groups)
        self.register_buffer("weight_zero_point", torch.zeros(weight.shape[0], dtype=torch.int64))
        self._repack()  # a kernel oneDNN lacks fails here, not at the first forward

    def _pack(self) -> Tensor:
        return torch.ops.onednn.qconv_prepack(self.weight, self.weight_scale, self.input_scale, self.input_zero_point,
                                              self.stride, self.padding, self.dilation, self.groups, None)

    def forward(self, x: Tensor) -> Tensor:
        output_scale = 1.0 if self.output_scale is None else self.output_scale
        if _opaque():
            y = _int8_conv_op(x, self.weight, self.weight_scale, self.weight_zero_point, self.bias, self.stride,
                              self.padding, self.dilation, self.groups, self.input_scale, self.input_zero_point,
                              output_scale, self.output_zero_point, self.output_scale is not None, self.post_op,
                              self.post_op_args)
        else:
            y = torch.ops.onednn.qconv_pointwise(
                x, self.input_scale, self.input_zero_point, self.packed(), self.weight_scale, self.weight_zero_point,
                self.bias, self.stride, self.padding, self.dilation, self.groups, output_scale,
                self.output_zero_point, self._out_dtype(), self.post_op, self.post_op_args, "")
        return y


class Int8Linear(_Int8Layer):
    """A linear layer on uint8 levels with int8 weight levels, on oneDNN's int8 kernel (any leading dims).

    Args:
        weight: int8 levels ``(out_features, in_features)``, symmetric (zero point 0).
        weight_scale: float scale per output feature (positive).
        bias: float bias, or None.
        input_scale: the input quantizer's scale.
        input_zero_point: its zero point in uint8 levels.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: float,
                 input_zero_point: int) -> None:
        super().__init__(weight, weight_scale, bias, input_scale, input_zero_point)
        self.register_buffer("weight_zero_point", torch.zeros(weight.shape[0], dtype=torch.int64))
        self._repack()

    def _pack(self) -> Tensor:
        return torch.ops.onednn.qlinear_prepack(self.weight, None)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        output_scale = 1.0 if self.output_scale is None else self.output_scale
        if _opaque():
            y = _int8_linear_op(rows, self.weight, self.weight_scale, self.weight_zero_point, self.bias,
                                self.input_scale, self.input_zero_point, output_scale, self.output_zero_point,
                                self.output_scale is not None, self.post_op, self.post_op_args)
        else:
            y = torch.ops.onednn.qlinear_pointwise(
                rows, self.input_scale, self.input_zero_point, self.packed(), self.weight_scale,
                self.weight_zero_point, self.bias, output_scale, self.output_zero_point, self._out_dtype(),
                self.post_op, self.post_op_args, "")
        return y.reshape(*x.shape[:-1], y.shape[-1])
