"""Modules that run inside a compressed model: the step counter, observers and fake-quant.

Everything here is TorchScript-compatible, has no Python branch on tensor values in any traced
or scripted path (the ``quant_start_step`` gate is a 0-dim bool tensor there), and never imports
torch.fx.

Fake quantization computes exactly what ``torch.fake_quantize_per_tensor_affine`` computes,
``(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale``, non-finite inputs included
(``+inf`` gives qmax, ``-inf`` and NaN give qmin, each with a zero gradient, as the kernel's
``fmin(fmax(q, qmin), qmax)`` does), but from plain float tensor ops in one autograd Function:
on CPU PyTorch's fake-quant kernels take 15x (per channel) and 4x (per tensor) as long as the
same arithmetic done with vectorised elementwise ops. PyTorch's per-channel CPU kernel casts to
int64 before clamping, so it maps values beyond int64 (and +inf) to qmin; here every scheme
clamps as the per-tensor kernel does. Under ``torch.jit.script`` the PyTorch kernels are used.

Two ways to the same numbers:

* **plain eager on CPU** (the common training loop): a per-tensor range, its scale and zero point
  and the gate are Python floats, computed with every operation rounded to float32 exactly as the
  tensor code rounds it. A quantizer then costs one reduction and three elementwise passes
  (multiply, round, scale) into reused buffers; where a value can fall outside the levels, a clamp
  and a mask pass more, and a multiply in the backward. That replaces some thirty dispatched 0-dim
  tensor ops that cost more than the passes on small layers. A quantizer that is off returns its
  input itself.
* **everything else** (``torch.compile``, ``torch.export``, ``torch.jit.trace``, CUDA, tensor
  subclasses, dispatch modes): the same formulas on 0-dim tensors, no host synchronisation and no
  data-dependent Python branch, so the graph is static and compilers fuse it.

A quantizer that is off (before ``quant_start_step``, or an activation quantizer that has not
observed a finite range yet) returns its input unchanged, infinities and NaN included, and passes
the gradient unchanged: the gate is a ``torch.where`` (or, eagerly, a Python branch), never
arithmetic with a 0/1 weight.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fxcompress.settings import QuantSetting

__all__ = ["ActivationQuantizer", "BufferPool", "StepCounter", "WeightQuantizer", "buffer_pool", "fake_quant", "qparams",
           "release_buffers"]

EMA_DECAY = 0.99
_FLOAT32 = struct.Struct("f")
_EPS = 1.1920928955078125e-07  # float32 eps, the smallest scale


def f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (infinities beyond float32's range), as a float.

    One rounding of the double result of ``+ - * /`` on float32 operands is the correctly rounded
    float32 result (a double has more than 2·24+2 bits), so Python arithmetic wrapped in ``f32``
    reproduces float32 tensor arithmetic bit for bit.
    """
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


#: the EMA's weight of a new observation, ``1 - decay`` in float32 (0.00999999...)
EMA_WEIGHT = f32(1.0 - f32(EMA_DECAY))


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
        if not torch.jit.is_scripting():
            if _host_path(self.step):
                return self._forward_host()
        done = self.step.clone()
        if self.training and self.counts_forwards:
            self.step.add_(1)
        return done

    @torch.jit.unused
    def _forward_host(self) -> Tensor:
        """:meth:`forward`, with the count also kept as a Python int: the quantizers read it from the
        returned tensor (:func:`_step_value`) instead of from the device, and the buffer is read only
        after someone else wrote it (its version counter or C++ tensor changed)."""
        step = self.step
        seen = self.__dict__.get("_seen")  # holds the buffer: no freed tensor's address is reused
        value = seen[2] if seen is not None and seen[1] == (step._version, step._cdata) else int(step.item())
        done = step.clone()
        counting = self.training and self.counts_forwards
        if counting:
            step.add_(1)
        self.__dict__["_seen"] = (step, (step._version, step._cdata), value + counting)
        done.fxcompress_step_value = value  # read by _step_value; a plain tensor attribute
        return done

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_seen", None)  # a cache of the buffer's value: neither copied nor pickled
        return state


@torch.jit.unused
def _step_value(step: Tensor) -> int:
    """The completed-step count in ``step``: kept on the tensor by :class:`StepCounter`, read otherwise."""
    value = getattr(step, "fxcompress_step_value", None)
    return step.item() if value is None else value


def qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool,
            divisor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point (both float32) of SPEC.md §5 for the range (lo, hi), widened to contain 0.

    Affine: ``scale = (max-min)/(qmax-qmin)``, ``zp = qmin - round(min/scale)`` clamped.
    Symmetric: ``scale = max(|min|,|max|) / ((qmax-qmin)/2)``, ``zp = (qmin+qmax)//2`` (0 for int).
    Scale never drops below float32 eps (written as a literal: TorchScript reads no globals).
    ``divisor``, if given, is that denominator as a 0-dim float32 tensor on the device of ``lo``
    (see :func:`_divisor`: CUDA rounds a division by a Python number differently).
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        magnitude = torch.maximum(-lo, hi)
        if divisor is None:
            scale = magnitude / ((qmax - qmin) / 2.0)
        else:
            scale = magnitude / divisor
        scale = torch.clamp(scale, min=1.1920928955078125e-07)
        zero_point = torch.full_like(scale, float((qmin + qmax) // 2))
    else:
        if divisor is None:
            scale = (hi - lo) / float(qmax - qmin)
        else:
            scale = (hi - lo) / divisor
        scale = torch.clamp(scale, min=1.1920928955078125e-07)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def qparams_float(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, float]:
    """:func:`qparams` for a finite per-tensor range in Python floats, rounded as float32 rounds.

    Equal bit for bit to ``qparams(torch.tensor(lo), torch.tensor(hi), ...)`` (a test checks).
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(f32(max(-lo, hi) / f32((qmax - qmin) / 2.0)), _EPS)
        return scale, float((qmin + qmax) // 2)
    scale = max(f32(f32(hi - lo) / float(qmax - qmin)), _EPS)
    return scale, float(min(max(qmin - round(f32(lo / scale)), qmin), qmax))


class _FakeQuant(torch.autograd.Function):
    """Gated fake quantization with the straight-through gradient, in float arithmetic only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, gate: Tensor, qmin: int,
                qmax: int) -> Tensor:
        with torch.no_grad():  # already off in eager; torch.export traces this body with grad on
            q = x * torch.reciprocal(scale)
            # NaN clamps to qmin as in PyTorch's kernel (fmax(NaN, qmin) is qmin); inf clamps below
            q.nan_to_num_(nan=-math.inf)
            q.round_().add_(zero_point)
            clamped = q.clamp(qmin, qmax)
            # 1.0 where the value was inside the range; float compares are several times faster
            # than bool ones on CPU. With the gate off every entry passes (identity gradient).
            keep = torch.eq(q, clamped, out=q)
            torch.maximum(keep, torch.logical_not(gate).float(), out=keep)
            # a select, not a 0/1 blend (inf * 0 is NaN), written into the buffer: one allocation less
            out = torch.where(gate, clamped.sub_(zero_point).mul_(scale), x, out=clamped)
        ctx.save_for_backward(keep)
        return out

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
    """``x`` fake-quantized where ``gate`` (a 0-dim bool tensor) is true, else ``x`` unchanged.

    Args:
        x: the tensor to quantize (computed in float32, returned in ``x``'s dtype).
        scale: float tensor, 0-dim, or one per output channel (dim 0) for ``per_channel``.
        zero_point: float tensor shaped like ``scale``.
        gate: 0-dim bool tensor; false returns every value of ``x`` (inf and NaN included) and
            passes the gradient unchanged.
        qmin: the lowest integer level.
        qmax: the highest integer level.
        per_channel: whether ``scale``/``zero_point`` hold one value per output channel.

    Returns:
        A tensor like ``x``.
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
        return torch.where(gate, fq.to(x.dtype), x)
    if _compiling():  # torch.compile / torch.export: plain differentiable ops a compiler fuses
        return _fake_quant_traceable(x.float(), scale, zero_point, gate, qmin, qmax).to(x.dtype)
    if x.dtype != torch.float32:  # low-precision models and autocast: quantize in float32
        return _fake_quant_function(x.float(), scale, zero_point, gate, qmin, qmax).to(x.dtype)
    return _fake_quant_function(x, scale, zero_point, gate, qmin, qmax)


@torch.jit.unused
def _compiling() -> bool:
    return torch.compiler.is_compiling()


class _FakeQuantTraceable(torch.autograd.Function):
    """:class:`_FakeQuant` for compilers (``torch.compile``, ``torch.export``): the same values (up to
    the compiler's reordering of float ops) and straight-through gradient, from out-of-place ops
    that inductor fuses into the loops around them, with no bool tensor anywhere the partitioner
    could save for the backward.

    That last point is what makes it fast on CPU: inductor's C++ code stores and loads a bool
    tensor element by element (a ``VecMask`` to ``bool*`` store runs scalar loops: measured ~11 ns
    per element, ten times a whole fused quantizer pass). AOTAutograd's partitioner saves a
    compare of two full tensors (``q == clamped``, ``q == q``: it never recomputes an op whose
    output is 4x smaller than its inputs) and prefers a 1-byte mask to any 4-byte tensor; so the
    mask here is float arithmetic (``q`` and ``clamped`` are whole numbers or infinities, so
    ``|q - clamped|`` is 0 inside the range and at least 1 outside), NaN is caught by a compare
    with a constant (``q >= -inf`` is false only for NaN; ``isnan``'s CPU code is scalar) and the
    backward is ``grad * keep``, as :class:`_FakeQuant`'s. ``keep`` is saved as bfloat16 (0 and 1
    are exact; 2 bytes per element), and the partitioner recomputes the rest.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, gate: Tensor, qmin: int,
                qmax: int) -> Tensor:
        q = torch.round(x * torch.reciprocal(scale))
        # NaN clamps to qmin as in PyTorch's kernel: every compare with NaN is false
        q = torch.where(q >= -math.inf, q, -math.inf)
        # round's -0.0 becomes +0.0, as adding the zero point does in the kernel: inductor drops
        # the add of a zero point it knows is 0 (the symmetric schemes), and with it that effect
        q = torch.where(q == 0.0, 0.0, q) + zero_point
        clamped = torch.clamp(q, qmin, qmax)
        # a select, not a 0/1 blend (inf * 0 is NaN): an off gate returns x itself
        out = torch.where(gate, (clamped - zero_point) * scale, x)
        # 1.0 inside the range, 0.0 outside (inf and NaN included); 1.0 everywhere when off
        keep = torch.where(gate, 1.0 - torch.clamp(torch.abs(q - clamped), max=1.0), 1.0)
        # saved in 2 bytes: 0.0 and 1.0 are exact in bfloat16 (inductor converts in vector code; a
        # 1-byte uint8 mask measured 3x the conversion cost of bfloat16, a float32 one twice its memory)
        ctx.save_for_backward(keep.to(torch.bfloat16))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype), None, None, None, None, None


@torch.jit.unused
def _fake_quant_traceable(x: Tensor, scale: Tensor, zero_point: Tensor, gate: Tensor, qmin: int,
                          qmax: int) -> Tensor:
    """:class:`_FakeQuantTraceable` (the path ``torch.compile`` and ``torch.export`` take)."""
    return _FakeQuantTraceable.apply(x, scale, zero_point, gate, qmin, qmax)


# -- plain eager: ranges and qparams on the host ------------------------------------------------

_PLAIN_TYPES = (Tensor, nn.Parameter)

#: whether eager CUDA quantizers read their range to the host (see :func:`_host_path`)
HOST_READS_ON_CUDA = True


@torch.jit.unused
def _host_path(x: Tensor) -> bool:
    """Whether this call runs eagerly on plain tensors whose range and qparams are best computed as
    Python floats: on the CPU, where reading a 0-dim tensor is free, and on CUDA (with
    :data:`HOST_READS_ON_CUDA`), where one read of the batch's min and max replaces some 40 tiny
    kernel launches of the tensor path (see the README's benchmark section).

    Not under ``torch.compile``/``torch.export`` (dynamo), ``torch.jit.trace``, a dispatch mode
    (fake tensors, ``make_fx``, non-strict export), functorch transforms or a CUDA graph capture
    (which allows no host read).
    """
    return (not torch.compiler.is_compiling() and type(x) in _PLAIN_TYPES
            and (x.device.type == "cpu" or (x.device.type == "cuda" and HOST_READS_ON_CUDA
                                            and not torch.cuda.is_current_stream_capturing()))
            and not torch.jit.is_tracing() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


@torch.jit.unused
def _read_pair(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Two 0-dim tensors as Python floats: one device-to-host copy off the CPU, not two."""
    if a.device.type == "cpu":
        return a.item(), b.item()
    low, high = torch.stack((a, b)).tolist()
    return low, high


class BufferPool:
    """Buffers the quantizers of one thread reuse instead of allocating new tensors (eager CPU).

    On CPU a freshly allocated large tensor costs a page fault per 4 KiB on first write (glibc maps
    large blocks fresh from the OS and unmaps them on free); on this project's machine that is ten
    times the arithmetic of a fake-quant pass (a 4 MB weight: 5.7 ms fresh, 0.53 ms in reused
    buffers). A buffer is handed out only while nothing but the pool refers to its storage (no
    tensor, view, autograd saved tensor or ``.grad`` holds it: PyTorch's storage use count says
    so), so reuse is invisible: a tensor anyone still holds is never written. One pool serves every
    quantizer of the thread, so a buffer one layer's output has finished with serves the next
    layer: the pool grows to the most buffers alive at once, which fresh tensors would take too.
    It holds at most ``max_bytes``; :func:`release_buffers` (or putting a quantizer in eval mode)
    empties it.
    """

    PER_SHAPE = 64

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.buffers: dict[tuple, list[Tensor]] = {}

    def take(self, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """An alias of a free buffer shaped and laid out like ``like`` (a new tensor if there is none)."""
        if torch.is_inference_mode_enabled():  # an inference tensor could never be written outside it
            return torch.empty_like(like, dtype=dtype)
        if like.is_contiguous():
            layout = 0
        elif like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
            layout = 1
        else:  # other strides: not pooled
            return torch.empty_like(like, dtype=dtype)
        key = (like.shape, layout, dtype)
        same = self.buffers.get(key)
        if same is not None:
            for buf in same:
                if torch._C._storage_Use_Count(buf.untyped_storage()._cdata) == 2:  # the pool + this call
                    return buf.detach()  # while the alias lives, the buffer counts as taken
        fresh = torch.empty_like(like, dtype=dtype)
        size = fresh.untyped_storage().nbytes()
        if self.nbytes + size <= self.max_bytes and (same is None or len(same) < self.PER_SHAPE):
            self.buffers.setdefault(key, []).append(fresh)
            self.nbytes += size
        return fresh.detach()


_POOLS = threading.local()


def buffer_pool() -> BufferPool:
    """This thread's :class:`BufferPool`."""
    pool = getattr(_POOLS, "pool", None)
    if pool is None:
        pool = _POOLS.pool = BufferPool()
    return pool


def release_buffers() -> None:
    """Free the buffers this thread's quantizers keep for reuse (they are made again when needed)."""
    _POOLS.pool = None


_ZERO = torch.zeros(())  # read-only: the 0 added in the last pass of _quantize_values


def _quantize_values(x: Tensor, inv_scale: float | Tensor, scale: float | Tensor, zero_point: float | Tensor,
                     qmin: int, qmax: int, nan_free: bool, keep: bool, in_range: bool,
                     pool: BufferPool | None) -> tuple[Tensor, Tensor | None]:
    """Fake-quantized ``x`` (float32) and, if ``keep``, its float32 0/1 straight-through mask.

    The values of :class:`_FakeQuant`, bit for bit, in fewer passes (the zero point is never added
    and subtracted, see below), written into buffers from ``pool`` (new tensors without one). The
    mask is 1 where the rounded, shifted value was within ``[qmin, qmax]``, as PyTorch's kernel
    computes it. It is float32, not bool: one compare
    into the dead rounding buffer, and a float multiply in the backward (bool masks measured slower
    on CPU; see the README's benchmark section). With ``in_range`` (the caller has shown that every
    value rounds to a level within ``[qmin, qmax]``) the clamp would change nothing and the mask
    would be all ones: neither is made, and the mask returned is None.
    """
    q = torch.mul(x, inv_scale, out=pool.take(x)) if pool is not None else torch.mul(x, inv_scale)
    if not nan_free:  # NaN clamps to qmin as in PyTorch's kernel (and is outside the range)
        q.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    q.round_()  # the level before the zero point is added
    mask = None
    if not in_range:
        # clamp(q + zp, qmin, qmax) - zp is clamp(q, qmin - zp, qmax - zp): whole numbers, exact in
        # float32 (beyond 2**24 both are outside the range and give the bound)
        low, high = qmin - zero_point, qmax - zero_point
        if not keep:
            q.clamp_(low, high)
        else:
            clamped = torch.clamp(q, low, high, out=pool.take(x)) if pool is not None else torch.clamp(q, low, high)
            mask = torch.eq(q, clamped, out=q)  # 1.0 inside the range
            q = clamped
    # 0 + q * scale; adding 0 turns round's -0.0 into +0.0, as the kernel's zero-point addition does.
    # Per tensor that is one pass (two fewer than adding and subtracting the zero point, then
    # scaling); per channel two (addcmul with a broadcast 0 runs 4-6x slower than both)
    if isinstance(scale, float):
        return torch.add(_ZERO, q, alpha=scale, out=q), mask
    return q.mul_(scale).add_(0.0), mask


def _levels_contain(lo: float, hi: float, inv_scale: float, zero_point: float, qmin: int, qmax: int) -> bool:
    """Whether every float32 value in ``[lo, hi]`` rounds to a level within ``[qmin, qmax]``.

    ``round(v * inv_scale) + zero_point`` (float32 products, as the tensor ops round them) is monotone
    in ``v``, so the two ends decide. Then fake quantization clamps nothing and the straight-through
    mask is all ones.
    """
    low, high = f32(lo * inv_scale), f32(hi * inv_scale)
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    return round(low) + zero_point >= qmin and round(high) + zero_point <= qmax


class _FakeQuantEager(torch.autograd.Function):
    """Fake quantization that is on, with precomputed (float or tensor) parameters."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inv_scale: Any, scale: Any, zero_point: Any, qmin: int, qmax: int,
                nan_free: bool, in_range: bool, pool: BufferPool | None) -> Tensor:
        out, mask = _quantize_values(x, inv_scale, scale, zero_point, qmin, qmax, nan_free, True, in_range, pool)
        if mask is not None:  # in range: the gradient passes unchanged, nothing is kept for the backward
            ctx.save_for_backward(mask)
        ctx.masked = mask is not None
        # a gradient in a pooled buffer is copied, not kept, where it becomes a leaf's .grad
        ctx.pool = None if x.is_leaf else pool
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        nothing = (None,) * 8  # the other inputs take no gradient
        if not ctx.masked:
            return grad, *nothing
        (mask,) = ctx.saved_tensors
        pool: BufferPool | None = ctx.pool
        if pool is None:
            return grad * mask, *nothing
        return torch.mul(grad, mask, out=pool.take(grad)), *nothing


#: up to this many elements PyTorch's own fake-quant kernels (one dispatch, autograd in C++) beat
#: the vectorised passes plus a Python autograd Function; above it the passes win (the CPU kernels
#: are scalar: per element 5x (per tensor) and 10x (per channel) slower). Both compute the same
#: values and gradient masks.
KERNEL_MAX_NUMEL = 8192
KERNEL_MAX_NUMEL_PER_CHANNEL = 4096


_ZERO_POINTS: dict[tuple[int, int, torch.device], Tensor] = {}
_DIVISORS: dict[tuple[float, torch.device], Tensor] = {}


@torch.jit.unused
def _divisor(value: float, device: torch.device) -> float | Tensor:
    """``value`` to divide a tensor on ``device`` by, correctly rounded: a float on the CPU; elsewhere a
    0-dim float32 tensor there, made once (CUDA multiplies by the reciprocal of a Python scalar
    divisor, which can be an ulp off the quotient)."""
    if device.type == "cpu":
        return value
    key = (value, device)
    divisor = _DIVISORS.get(key)
    if divisor is None:
        if len(_DIVISORS) > 64:
            _DIVISORS.clear()
        divisor = _DIVISORS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return divisor


@torch.jit.unused
def _zero_points(channels: int, value: int, device: torch.device) -> Tensor:
    """An int32 ``(channels,)`` tensor of ``value`` on ``device`` for PyTorch's per-channel kernel,
    made once (read-only: the kernel never writes it)."""
    key = (channels, value, device)
    zp = _ZERO_POINTS.get(key)
    if zp is None:
        if len(_ZERO_POINTS) > 512:
            _ZERO_POINTS.clear()
        zp = _ZERO_POINTS[key] = torch.full((channels,), value, dtype=torch.int32, device=device)
    return zp


@torch.jit.unused
def _fake_quant_on(x: Tensor, scale: float | Tensor, zero_point: float | Tensor, qmin: int, qmax: int,
                   nan_free: bool, pool: BufferPool | None, span: tuple[float, float] | None = None,
                   narrow_symmetric: bool = False) -> Tensor:
    """Eager fake quantization with the gate known to be on; a mask only when a gradient needs it.

    Args:
        x: the tensor (computed in float32, returned in its dtype).
        scale: a float quantizes per tensor; a ``(C,)`` tensor per channel along dim 0.
        zero_point: a float (per tensor, or the same for every channel) or a ``(C,)`` float tensor.
        qmin: the lowest integer level.
        qmax: the highest integer level.
        nan_free: ``x`` is known to hold no NaN (a pass is skipped).
        pool: where the result and the mask are written, or None for new tensors.
        span: per tensor, the finite min and max of ``x`` when known: if both round to levels within
            ``[qmin, qmax]``, nothing is clamped and no mask is kept (the gradient passes unchanged).
        narrow_symmetric: per channel, ``scale`` is each row's largest ``|x|`` over ``qmax`` (zero
            point 0, ``qmin == -qmax``): then every finite row rounds within the levels (see
            :meth:`WeightQuantizer._forward_plain`), and no mask is kept either.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    kernel = xf.device.type != "cpu"  # off the CPU PyTorch's kernels are vectorised: one launch
    if isinstance(scale, float):
        if kernel or xf.numel() <= KERNEL_MAX_NUMEL:
            out = torch.fake_quantize_per_tensor_affine(xf, scale, int(zero_point), qmin, qmax)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        inv_scale: float | Tensor = f32(1.0 / scale)
        in_range = span is not None and _levels_contain(span[0], span[1], inv_scale, zero_point, qmin, qmax)
    else:
        # PyTorch's per-channel kernel maps values beyond int64 (inf) to qmin: used only when every
        # scale (and so every value of x, the row's range) is finite
        nan_free = math.isfinite(scale.sum().item())  # no NaN (or inf) in any row of x
        if nan_free and (kernel or xf.numel() <= KERNEL_MAX_NUMEL_PER_CHANNEL):
            zp = _zero_points(scale.shape[0], int(zero_point), xf.device) if isinstance(zero_point, float) \
                else zero_point.to(torch.int32)
            out = torch.fake_quantize_per_channel_affine(xf, scale, zp, 0, qmin, qmax)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        in_range = narrow_symmetric and nan_free
        shape = [-1] + [1] * (x.dim() - 1)
        scale = scale.reshape(shape)
        inv_scale = torch.reciprocal(scale)
        if not isinstance(zero_point, float):
            zero_point = zero_point.reshape(shape)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FakeQuantEager.apply(xf, inv_scale, scale, zero_point, qmin, qmax, nan_free, in_range, pool)
    else:
        out = _quantize_values(xf.detach(), inv_scale, scale, zero_point, qmin, qmax, nan_free, False, in_range,
                               pool)[0]
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# -- the quantizer modules ------------------------------------------------------------------------

class _Quantizer(nn.Module):
    """What both quantizers share: the eager CPU path writes into this thread's :class:`BufferPool`
    in training mode; putting a quantizer in eval mode releases the pool."""

    @torch.jit.unused
    def _buffer_pool(self, x: Tensor) -> BufferPool | None:
        return buffer_pool() if self.training and x.device.type == "cpu" else None

    def train(self, mode: bool = True):  # noqa: ANN201 (nn.Module's own signature)
        if not mode and self.training:
            release_buffers()
        return super().train(mode)


class ActivationQuantizer(_Quantizer):
    """Per-tensor fake-quant of an activation with an EMA (decay 0.99) min/max observer.

    The observer updates in training mode only (also before the start step). A non-finite batch
    bound (an inf in the batch; a NaN makes both bounds NaN) leaves that tracked bound as it was,
    and only a batch whose min and max are both finite counts as the first observation (sets
    ``initialized``); until then the quantizer passes its input through unchanged. The first
    observation is taken as is; later ones move a bound by ``(batch - tracked) * (1 - decay)``,
    each operation rounded to float32. With ``range_sync`` set (see ``fxcompress.sync_ranges``)
    the batch range is first reduced over a process group.
    """

    ema_weight = EMA_WEIGHT  # also for modules pickled before the instance attribute existed

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
        self.ema_weight = EMA_WEIGHT  # an attribute: TorchScript reads no globals
        # a callable (lo, hi) -> (lo, hi) reducing the batch range over ranks, or None (the
        # default: no collective in the forward); set by fxcompress.sync_ranges
        self.range_sync: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
        for name in ("tracked_min", "tracked_max", "initialized"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's own signature)
        # state stays float32 when the model is cast (model.half(), .to(bfloat16)); devices follow
        super()._apply(fn, recurse)
        for name in ("tracked_min", "tracked_max", "initialized"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if _host_path(x):
                return self._forward_plain(x, step)
        if self.training:
            self._observe(x)
        scale, zero_point = qparams(self.tracked_min, self.tracked_max, self.qmin, self.qmax, self.symmetric)
        gate = (step >= self.start_step) & (self.initialized > 0.5)
        return fake_quant(x, scale, zero_point, gate, self.qmin, self.qmax, False)

    def _observe(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.float(), hi.float()
        if not torch.jit.is_scripting():
            lo, hi = self._synced(lo, hi)
        initialized = self.initialized > 0.5
        for tracked, seen in ((self.tracked_min, lo), (self.tracked_max, hi)):
            moved = torch.where(initialized, tracked + (seen - tracked) * self.ema_weight, seen)
            tracked.copy_(torch.where(torch.isfinite(seen), moved, tracked))
        self.initialized.masked_fill_(torch.isfinite(lo) & torch.isfinite(hi), 1.0)

    @torch.jit.unused
    def _synced(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The batch range reduced over ranks by ``range_sync``; as is when syncing is off."""
        if self.range_sync is None:
            return lo, hi
        return self.range_sync(lo, hi)

    @torch.jit.unused
    def _tracked_floats(self) -> tuple[float, float, bool]:
        """``tracked_min``, ``tracked_max`` and ``initialized`` as Python values, read from the buffers
        only when they are other tensors or were written since (their version counters say so)."""
        tensors, state = self._range_state()
        seen = self.__dict__.get("_seen")
        if seen is not None and seen[1] == state:
            return seen[2]
        values = (tensors[0].item(), tensors[1].item(), tensors[2].item() > 0.5)
        self.__dict__["_seen"] = (tensors, state, values)
        return values

    @torch.jit.unused
    def _remember(self, lo: float, hi: float, initialized: bool) -> None:
        self.__dict__["_seen"] = (*self._range_state(), (lo, hi, initialized))

    @torch.jit.unused
    def _range_state(self) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """The range buffers and what changes when one is written in place (its version) or replaced,
        also under the same Python object (``torch.utils.swap_tensors``, as ``load_state_dict`` may
        do: its C++ tensor). The cache holds the buffers, so no freed tensor's address is reused."""
        buffers = self._buffers
        low, high, init = buffers["tracked_min"], buffers["tracked_max"], buffers["initialized"]
        # spelled out: a generator here doubles the cost of the cache hit on every forward
        return (low, high, init), (low._version, low._cdata, high._version, high._cdata, init._version, init._cdata)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_seen", None)  # a cache of the buffers' values: neither copied nor pickled
        return state

    @torch.jit.unused
    def _forward_plain(self, x: Tensor, step: Tensor) -> Tensor:
        """:meth:`forward` with the range, qparams and gate as Python floats (same values)."""
        lo, hi, initialized = self._tracked_floats()
        nan_free = False
        span = None
        if self.training:
            batch_lo, batch_hi = torch.aminmax(x.detach())
            own = _read_pair(batch_lo, batch_hi)
            # this process's own min and max decide the passes and the mask; the range (synced over
            # processes with range_sync, where another rank's finite bounds replace a non-finite one)
            # moves the EMA
            nan_free = math.isfinite(own[0]) and math.isfinite(own[1])  # no NaN or inf in x
            if nan_free:  # if both round within the levels, nothing clamps: no mask
                span = own
            seen_lo, seen_hi = own
            if self.range_sync is not None:
                synced = self._synced(batch_lo.float(), batch_hi.float())
                seen_lo, seen_hi = _read_pair(synced[0], synced[1])
            if math.isfinite(seen_lo):
                lo = f32(lo + f32(f32(seen_lo - lo) * self.ema_weight)) if initialized else seen_lo
                self.tracked_min.fill_(lo)
            if math.isfinite(seen_hi):
                hi = f32(hi + f32(f32(seen_hi - hi) * self.ema_weight)) if initialized else seen_hi
                self.tracked_max.fill_(hi)
            if math.isfinite(seen_lo) and math.isfinite(seen_hi) and not initialized:
                self.initialized.fill_(1.0)
                initialized = True
            self._remember(lo, hi, initialized)
        if not initialized or _step_value(step) < self.start_step:
            return x
        scale, zero_point = qparams_float(lo, hi, self.qmin, self.qmax, self.symmetric)
        return _fake_quant_on(x, scale, zero_point, self.qmin, self.qmax, nan_free, self._buffer_pool(x), span)


class WeightQuantizer(_Quantizer):
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
        if not torch.jit.is_scripting():
            if _host_path(w):
                return self._forward_plain(w, step)
        scale, zero_point = self.current_qparams(w)
        gate = step >= self.start_step
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

    @torch.jit.unused
    def _forward_plain(self, w: Tensor, step: Tensor) -> Tensor:
        """:meth:`forward` with the gate (and a per-tensor scale) as Python floats (same values)."""
        if _step_value(step) < self.start_step:
            return w
        if self.per_channel:
            wd = w.detach()
            rows = (wd if wd.dtype == torch.float32 else wd.float()).reshape(wd.shape[0], -1)
            pool = self._buffer_pool(w)
            if self.symmetric:  # qparams' max(-min(lo, 0), max(hi, 0)) is the row's largest |w|
                magnitude = torch.abs(rows, out=pool.take(rows)) if pool is not None else rows.abs()
                scale = magnitude.amax(dim=1).div_(_divisor((self.qmax - self.qmin) / 2.0, w.device)).clamp_(min=_EPS)
                # narrow int levels (-qmax..qmax, zero point 0): the row's largest |w| times the float32
                # reciprocal of f32(largest / qmax) is qmax within 3 float32 roundings (or below qmax
                # when the scale is raised to eps), far from the half level that would round past
                # qmax for qmax <= 2**16; every other finite |w| of the row is smaller: all levels fit
                narrow = self.qmin == -self.qmax and 1 <= self.qmax <= 1 << 16
                return _fake_quant_on(w, scale, float((self.qmin + self.qmax) // 2), self.qmin, self.qmax, False,
                                      pool, narrow_symmetric=narrow)
            # two passes beat aminmax(dim=) 15x on CPU
            divisor = _divisor(float(self.qmax - self.qmin), w.device)
            scale, zero_point = qparams(rows.amin(dim=1), rows.amax(dim=1), self.qmin, self.qmax, False,
                                        None if isinstance(divisor, float) else divisor)
            return _fake_quant_on(w, scale, zero_point, self.qmin, self.qmax, False, pool)
        lo, hi = _read_pair(*torch.aminmax(w.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN qparams: the tensor path's values
            scale_t, zp_t = self.current_qparams(w)
            return fake_quant(w, scale_t, zp_t, torch.ones((), dtype=torch.bool), self.qmin, self.qmax, False)
        scale, zero_point = qparams_float(lo, hi, self.qmin, self.qmax, self.symmetric)
        return _fake_quant_on(w, scale, zero_point, self.qmin, self.qmax, True, self._buffer_pool(w), (lo, hi))
