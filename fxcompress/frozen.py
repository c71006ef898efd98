"""The quantizers of a finalized model: fake quantization with constant scale and zero point.

:class:`FrozenQuantizer` is what an ON quantizer of a compressed model computes in eval mode, with
its qparams fixed at ``finalize`` time (an activation's from its tracked range, a weight's from the
masked weight). It calls ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` with an integer zero point: for per-tensor quantization
those kernels compute bit for bit what :func:`fxcompress.quant.fake_quant` computes, infinities and
NaN included; per channel they agree on every finite value (the per-channel kernel maps +inf to
qmin, see :mod:`fxcompress.quant`), and per-channel quantizers only see weights, whose values
``finalize`` checks. These ops are also what ONNX exporters lower to QuantizeLinear/DequantizeLinear.
:class:`PassThrough` stands where a CompressedLayer expects a quantizer that was off.
Both take ``(x, step)`` as the quantizers they replace and ignore ``step``. Never imports torch.fx.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FrozenQuantizer", "PassThrough"]


class FrozenQuantizer(nn.Module):
    """Fake quantization with constant ``scale`` (float32) and ``zero_point`` (int32) buffers.

    Args:
        scale: 0-dim, or one value per output channel (dim 0) when ``per_channel``.
        zero_point: shaped like ``scale``, integer valued.
        qmin: the lowest integer level.
        qmax: the highest integer level.
        per_channel: one scale per slice along dim 0.
        bits: the bit width (kept for export checks).
        dtype: ``'int'`` (narrow, symmetric levels) or ``'uint'``.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, per_channel: bool, bits: int,
                 dtype: str) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().round().to(torch.int32))
        self.qmin, self.qmax = qmin, qmax
        self.per_channel = per_channel
        self.bits = bits
        self.dtype = dtype
        # The levels the kernel clamps to, and whether the input is clamped to [qmin, qmax] in float
        # first. ONNX's int8 has no narrow range: set_int8_range() makes an 'int' quantizer export
        # as int8 (-128..127) with that clamp in front, which gives the same values.
        self.kernel_qmin, self.kernel_qmax = qmin, qmax
        self.clamp_first = False

    def forward(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        if x.dtype != torch.float32:  # low-precision models: quantize in float32, as fxcompress.quant does
            return self._quantize(x.float()).to(x.dtype)
        return self._quantize(x)  # no cast: an exported graph has Q/DQ right next to the op they feed

    def _quantize(self, x: Tensor) -> Tensor:
        if self.clamp_first:
            lo, hi = self.bounds(x.dim())
            x = torch.clamp(x, lo, hi)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 0, self.kernel_qmin,
                                                          self.kernel_qmax)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.kernel_qmin,
                                                     self.kernel_qmax)

    def bounds(self, dims: int) -> tuple[Tensor, Tensor]:
        """The float values of levels ``qmin`` and ``qmax``; per channel shaped to broadcast over a
        ``dims``-dimensional weight."""
        zp = self.zero_point.float()
        lo, hi = (self.qmin - zp) * self.scale, (self.qmax - zp) * self.scale
        if self.per_channel:
            shape = [-1] + [1] * (dims - 1)
            lo, hi = lo.reshape(shape), hi.reshape(shape)
        return lo, hi

    def set_int8_range(self, clamp_first: bool) -> None:
        """Quantize to the full int8 range (what ONNX's QuantizeLinear has); ``clamp_first`` keeps the
        narrow levels by clamping the input to them in float (not needed where no value reaches -128)."""
        assert self.dtype == "int" and self.bits == 8, "only 8-bit int quantizers have an int8 form"
        self.kernel_qmin, self.kernel_qmax = -128, 127
        self.clamp_first = clamp_first

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        return f"{self.dtype}{self.bits} {kind}, levels [{self.qmin}, {self.qmax}]"


class PassThrough(nn.Module):
    """A quantizer that was off when the model was finalized: returns its input unchanged."""

    def forward(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        return x
