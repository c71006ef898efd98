"""The eager CPU fast path of the quantizers (issue 13) computes what the tensor path computes.

Plain eager calls on CPU compute ranges, scales and the gate as Python floats, use PyTorch's own
fake-quant kernels for small tensors and write large ones into reused buffers. Every figure here is
compared bit for bit (sign of zero included) with the tensor path, the one torch.compile, export,
tracing and CUDA use, and the values with PyTorch's kernels; the pool is checked never to write a
tensor anyone still holds.
"""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch

import fxcompress
import fxcompress.quant as quant
from fxcompress.quant import ActivationQuantizer, BufferPool, WeightQuantizer, f32, qparams, qparams_float
from fxcompress.settings import QuantSetting

from .fixtures import SeedModel, seed_input

INF, NAN = float("inf"), float("nan")


def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns (a copy): -0.0 and 0.0 differ, equal NaNs agree."""
    return t.detach().float().contiguous().view(torch.int32).clone()


@pytest.fixture
def tensor_path(monkeypatch: pytest.MonkeyPatch):
    """Run a callable with the eager fast path switched off (the path compile and CUDA take)."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(quant, "_host_path", lambda x: False)
            return fn(*args)

    return run


# -- Python-float qparams are float32 tensor qparams -----------------------------------------------

SCHEMES = [("per_tensor_affine", "uint"), ("per_tensor_affine", "int"), ("per_tensor_symmetric", "int"),
           ("per_tensor_symmetric", "uint")]


@pytest.mark.parametrize("nbits", [2, 4, 7, 8, 16])
@pytest.mark.parametrize("scheme,dtype", SCHEMES)
def test_float_qparams_equal_tensor_qparams_bit_for_bit(nbits: int, scheme: str, dtype: str) -> None:
    s = QuantSetting(nbits, scheme, dtype)
    gen = torch.Generator().manual_seed(nbits)
    lows = torch.cat([-torch.rand(300, generator=gen) * 10.0 ** torch.randint(-30, 30, (300,), generator=gen),
                      torch.tensor([0.0, -0.0, 1.0, -3e38, -1e-38, 5.0])])
    highs = torch.cat([torch.rand(300, generator=gen) * 10.0 ** torch.randint(-30, 30, (300,), generator=gen),
                       torch.tensor([0.0, 0.0, 2.0, 3e38, 1e-38, 7.0])])
    for lo, hi in zip(lows.tolist(), highs.tolist(), strict=True):
        scale_t, zp_t = qparams(torch.tensor(lo), torch.tensor(hi), s.qmin, s.qmax, s.symmetric)
        scale, zp = qparams_float(lo, hi, s.qmin, s.qmax, s.symmetric)
        assert torch.equal(bits(scale_t), bits(torch.tensor(scale))), (lo, hi)
        assert float(zp_t) == zp, (lo, hi)


def test_f32_rounds_like_float32_tensors() -> None:
    values = [0.1, 1 / 3, 3.4028235e38, 3.4028236e38, 1e39, -1e39, 1e-46, 2.0**-149 * 0.6, 16777217.0]
    for v in values:
        assert bits(torch.tensor(f32(v))).item() == bits(torch.tensor(v, dtype=torch.float64).float()).item()


# -- quantizers: fast path == tensor path ---------------------------------------------------------

def batches(shape: tuple[int, ...], special: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(shape))
    out = [torch.randn(shape, generator=gen) * (1 + i) + 0.3 * i for i in range(4)]
    if special:  # a batch with inf and NaN, after the first (which initialises the range)
        out[2] = out[2].clone()
        out[2].view(-1)[:4] = torch.tensor([INF, -INF, NAN, -0.0])
    out[3] = out[3].clone()
    out[3].view(-1)[:3] = torch.tensor([-0.0, 1e-30, -1e-30])  # round to a signed zero
    return out


def run_activation(x_batches: list[torch.Tensor], scheme: str, dtype: str, nbits: int, start: int):
    q = ActivationQuantizer(QuantSetting(nbits, scheme, dtype), start).train()
    record = []
    for i, xb in enumerate(x_batches):
        x = xb.clone().requires_grad_()
        out = q(x, torch.tensor(i))
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        record += [bits(out), bits(x.grad), bits(q.tracked_min), bits(q.tracked_max), bits(q.initialized)]
    q.eval()
    with torch.no_grad():
        record.append(bits(q(x_batches[0] * 3, torch.tensor(9))))
    return record


@pytest.mark.parametrize("shape", [(3, 5), (4, 8, 16, 17)])  # PyTorch's kernel / the pooled passes (> 8192)
@pytest.mark.parametrize("scheme,dtype", SCHEMES)
@pytest.mark.parametrize("special", [False, True])
def test_activation_fast_path_equals_tensor_path(tensor_path, shape, scheme: str, dtype: str, special: bool) -> None:
    xs = batches(shape, special)
    fast = run_activation(xs, scheme, dtype, 8, 1)
    slow = tensor_path(run_activation, xs, scheme, dtype, 8, 1)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


def run_weight(w0: torch.Tensor, setting: QuantSetting, steps: int = 3):
    q = WeightQuantizer(setting, 1).train()
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w], lr=0.1)
    record = []
    for i in range(steps):
        out = q(w, torch.tensor(i))
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        record += [bits(out), bits(w.grad)]
        opt.step()
        opt.zero_grad()
    masked = w * (torch.arange(w.numel()).reshape(w.shape) % 3 != 0)  # a non-leaf weight (a pruned one)
    out = q(masked, torch.tensor(5))
    out.sum().backward()
    record += [bits(out), bits(w.grad)]
    return record


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3), (64, 32, 3, 3), (300, 200)])
@pytest.mark.parametrize("scheme,dtype", [("per_channel_symmetric", "int"), ("per_channel_affine", "uint"),
                                          ("per_channel_symmetric", "uint"), ("per_tensor_affine", "int"),
                                          ("per_tensor_symmetric", "int")])
@pytest.mark.parametrize("nbits", [4, 8])
def test_weight_fast_path_equals_tensor_path(tensor_path, shape, scheme: str, dtype: str, nbits: int) -> None:
    gen = torch.Generator().manual_seed(len(shape) + nbits)
    w0 = torch.randn(shape, generator=gen) * torch.linspace(0.01, 2, shape[0]).reshape([-1] + [1] * (len(shape) - 1))
    w0.view(-1)[1] = 0.0  # a zero weight, and one that rounds to -0.0
    w0.view(-1)[2] = -1e-9
    setting = QuantSetting(nbits, scheme, dtype)
    fast = run_weight(w0, setting)
    slow = tensor_path(run_weight, w0, setting)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(6, 5), (300, 200)])
def test_per_channel_weights_equal_torch_kernel_including_zero_signs(shape) -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen)
    w[:, 0] = -1e-7
    out = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 0)(w, torch.tensor(0))
    scale = w.abs().amax(1) / 127.0  # int8 symmetric: levels -127..127
    expected = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(shape[0], dtype=torch.int32), 0, -127, 127)
    assert torch.equal(bits(out), bits(expected))
    assert (bits(out[:, 0]) == 0).all()  # +0.0, as the kernel's integer arithmetic gives


@pytest.mark.parametrize("shape", [(2, 3), (200, 300)])
def test_weight_with_nan_or_inf_rows_equals_tensor_path(tensor_path, shape) -> None:
    w = torch.randn(shape)
    w[0, 1], w[1, 0] = NAN, INF
    setting = QuantSetting(8, "per_channel_symmetric", "int")
    fast = WeightQuantizer(setting, 0)(w, torch.tensor(0))
    slow = tensor_path(WeightQuantizer(setting, 0), w, torch.tensor(0))
    assert torch.equal(fast.isnan(), slow.isnan())  # a NaN's sign bit may differ: it means nothing
    assert torch.equal(bits(fast[~fast.isnan()]), bits(slow[~slow.isnan()]))


def test_off_quantizer_returns_its_input() -> None:
    x = torch.randn(4, 4)
    a = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 5).train()
    assert a(x, torch.tensor(2)) is x  # observed, not quantized yet
    assert float(a.initialized) == 1.0
    w = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 5)
    assert w(x, torch.tensor(4)) is x


def test_low_precision_input_keeps_its_dtype(tensor_path) -> None:
    x = (torch.randn(4, 8, 16, 16) * 3).bfloat16()
    for shape in [(4, 8, 16, 16), (3, 5)]:
        xb = x.reshape(-1)[:int(torch.tensor(shape).prod())].reshape(shape)
        q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
        out = q(xb, torch.tensor(0))
        assert out.dtype == torch.bfloat16
        assert torch.equal(bits(out.float()), bits(tensor_path(
            ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train(), xb, torch.tensor(0)).float()))


# -- the buffer pool never writes a tensor someone holds ------------------------------------------

def test_outputs_held_by_the_caller_are_never_overwritten() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    held = []
    for i in range(4):
        x = (torch.randn(4, 8, 32, 32) * (i + 1)).requires_grad_()
        out = q(x, torch.tensor(i))
        out.sum().backward()
        held.append((out.detach(), out.detach().clone(), x.grad, x.grad.clone()))
    for out, copy_out, grad, copy_grad in held:
        assert torch.equal(bits(out), bits(copy_out)) and torch.equal(bits(grad), bits(copy_grad))
    assert len({o.data_ptr() for o, *_ in held}) == 4  # all held: none reused


def test_buffers_are_reused_once_released() -> None:
    q = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 0).train()
    w = torch.nn.Parameter(torch.randn(300, 200))
    pointers = []
    for _ in range(3):
        out = q(w, torch.tensor(1))
        pointers.append(out.data_ptr())
        out.sum().backward()
        del out
    assert pointers[0] == pointers[1] == pointers[2]


def test_two_forwards_then_one_backward_and_retain_graph(tensor_path) -> None:
    """Two uses of one quantizer in a graph (a siamese model), then a second backward of the same graph."""
    def run():
        torch.manual_seed(0)
        q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
        w = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 0).train()
        weight = torch.nn.Parameter(torch.randn(64, 64))
        a, b = torch.randn(32, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
        loss = (q(a, torch.tensor(1)) @ w(weight, torch.tensor(1))).sum() * (
            q(b, torch.tensor(1)) @ w(weight, torch.tensor(1))).square().mean()
        loss.backward(retain_graph=True)
        first = [weight.grad.clone(), a.grad.clone(), b.grad.clone()]
        loss.backward()
        return first + [weight.grad, a.grad, b.grad]

    for fast, slow in zip(run(), tensor_path(run), strict=True):
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_pool_is_shared_bounded_and_released_in_eval() -> None:
    quant.release_buffers()
    q = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 0).train()
    w = torch.nn.Parameter(torch.randn(300, 200))
    for _ in range(2):
        q(w, torch.tensor(1)).sum().backward()
    pool = quant.buffer_pool()
    assert pool.nbytes == 2 * 300 * 200 * 4  # |w| and the output (no mask: see below), reused
    assert "_pool" not in q.__dict__ and len(pickle.dumps(q)) < 10_000 and copy.deepcopy(q) is not q
    q.eval()
    assert quant.buffer_pool().nbytes == 0  # eval mode releases the buffers
    small = BufferPool(max_bytes=1000)
    small.take(torch.empty(100))  # 400 bytes: kept
    small.take(torch.empty(200))  # 800 more: over the cap, not kept
    assert small.nbytes == 400


def saved_numels(fn) -> list[int]:
    """The sizes of the tensors autograd saves while ``fn`` runs."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("nbits", [2, 4, 8, 16])
def test_narrow_symmetric_rows_never_clamp_in_torch_kernel(nbits: int) -> None:
    # Why per-channel symmetric int weights keep no mask: PyTorch's own kernel, with scales made
    # here as the largest |w| of each row over qmax, passes the whole gradient for rows of every size
    qmax = 2 ** (nbits - 1) - 1
    gen = torch.Generator().manual_seed(nbits)
    magnitudes = 10.0 ** torch.linspace(-44, 37, 400)  # subnormal rows (scale raised to eps) to huge
    w = (torch.randn(400, 50, generator=gen) * magnitudes[:, None]).requires_grad_()
    scale = (w.detach().abs().amax(1) / qmax).clamp(min=torch.finfo(torch.float32).eps)
    zeros = torch.zeros(400, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zeros, 0, -qmax, qmax)
    expected.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    # and the eager passes that rely on it (20000 elements: not the kernel) give the same values
    ours = torch.nn.Parameter(w.detach().clone())
    out = WeightQuantizer(QuantSetting(nbits, "per_channel_symmetric", "int"), 0).train()(ours, torch.tensor(0))
    out.sum().backward()
    assert torch.equal(bits(out), bits(expected)) and torch.equal(ours.grad, torch.ones_like(w))


@pytest.mark.parametrize("scheme,dtype", [("per_tensor_affine", "uint"), ("per_tensor_symmetric", "int")])
def test_batch_within_the_range_keeps_no_mask(scheme: str, dtype: str) -> None:
    # A training batch whose min and max round within the levels (after the EMA update) clamps nothing:
    # no mask is kept and the gradient passes whole. A wider batch keeps the mask. Values and
    # gradients equal PyTorch's kernel at the quantizer's own scale and zero point either way.
    setting = QuantSetting(8, scheme, dtype)
    q = ActivationQuantizer(setting, 0).train()
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4, 8, 32, 32, generator=gen)  # 32768 elements: the pooled passes
    grad_in = torch.linspace(-1, 1, base.numel()).reshape(base.shape)
    saved, outside = [], []
    for factor in (1.0, 0.5, 0.5, 3.0):  # first batch sets the range; then narrower, narrower, wider
        x = (base * factor).requires_grad_()
        out = []
        saved.append(saved_numels(lambda x=x, out=out: out.append(q(x, torch.tensor(0)))))
        out[0].backward(grad_in)
        scale, zp = qparams(q.tracked_min, q.tracked_max, setting.qmin, setting.qmax, setting.symmetric)
        xk = x.detach().clone().requires_grad_()
        expected = torch.fake_quantize_per_tensor_affine(xk, scale, zp.int(), setting.qmin, setting.qmax)
        expected.backward(grad_in)
        assert torch.equal(bits(out[0]), bits(expected)) and torch.equal(bits(x.grad), bits(xk.grad))
        outside.append(int((xk.grad != grad_in).sum()))
    assert outside[:3] == [0, 0, 0] and outside[3] > 1000  # the kernel clamps only the wider batch
    assert saved[:3] == [[], [], []]
    assert saved[3] == [base.numel()]  # the mask


def test_pool_hands_out_only_free_buffers() -> None:
    pool = BufferPool()
    held = [pool.take(torch.empty(3, 3)) for _ in range(5)]
    assert len({t.data_ptr() for t in held}) == 5  # all held: five buffers
    pointer = held[2].data_ptr()
    del held[2]
    assert pool.take(torch.empty(3, 3)).data_ptr() == pointer  # the released one comes back
    transposed = torch.empty(4, 6).t()
    assert pool.take(transposed).shape == (6, 4) and pool.nbytes == 5 * 36  # odd strides: not pooled


def test_channels_last_layout_is_kept() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    x = torch.randn(4, 16, 32, 32).to(memory_format=torch.channels_last)
    for i in range(2):
        out = q(x, torch.tensor(i))
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("train", [True, False])
def test_model_level_training_matches_tensor_path(tensor_path, train: bool) -> None:
    import fxcompress
    from fxcompress.examples import SeedModel

    def run():
        torch.manual_seed(0)
        gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                                                "quant_types": ["input", "weight", "output"], "quant_bits": 8,
                                                "quant_start_step": 1}])
        gm.train(train)
        opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
        outs = []
        for i in range(3):
            x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i))
            out = gm(x)
            torch.nn.functional.nll_loss(out, torch.arange(16) % 10).backward()
            opt.step()
            opt.zero_grad()
            outs.append(out.detach())
        return outs + [p.detach() for p in gm.parameters()] + list(gm.buffers())

    for a, b in zip(run(), tensor_path(run), strict=True):
        assert torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)


def test_every_scheme_and_width_in_one_sweep(tensor_path) -> None:
    """A cheap sweep over widths the parametrised tests leave out, on the pooled path."""
    x = torch.randn(2, 8, 32, 32) * 4
    for nbits, (scheme, dtype) in itertools.product([2, 3, 12, 16], SCHEMES):
        fast = run_activation([x, x * 0.5], scheme, dtype, nbits, 0)
        slow = tensor_path(run_activation, [x, x * 0.5], scheme, dtype, nbits, 0)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True)), (nbits, scheme, dtype)


def test_range_written_from_outside_is_read_again(tensor_path) -> None:
    """The fast path keeps the range as Python floats; writes to the buffers (fill_, load_state_dict,
    a new tensor) must be seen at the next forward."""
    setting = QuantSetting(8, "per_tensor_affine", "uint")
    x = torch.randn(4, 8, 16, 16)
    q = ActivationQuantizer(setting, 0).train()
    q(x, torch.tensor(0))
    q.eval()
    before = q(x, torch.tensor(1))
    q.tracked_max.fill_(20.0)
    wide = q(x, torch.tensor(1))
    assert not torch.equal(before, wide)
    reference = ActivationQuantizer(setting, 0).eval()
    reference.load_state_dict(q.state_dict())
    assert torch.equal(bits(wide), bits(tensor_path(reference, x, torch.tensor(1))))
    q.load_state_dict({**q.state_dict(), "tracked_max": torch.tensor(0.5)})
    assert torch.equal(bits(q(x, torch.tensor(1))), bits(tensor_path(q, x, torch.tensor(1))))
    q.tracked_min = torch.tensor(-3.0)  # a new tensor in the buffer's place
    assert torch.equal(bits(q(x, torch.tensor(1))), bits(tensor_path(q, x, torch.tensor(1))))


@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_synced_range_does_not_hide_this_batchs_own_inf_or_nan(tensor_path, bad: float) -> None:
    # With range_sync, another rank's finite bounds replace this batch's non-finite one; the value
    # itself must still clamp (inf to qmax, -inf and NaN to qmin) with a zero gradient, as the kernel has
    def other_rank_saw(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.where(torch.isfinite(lo), lo, INF)  # a non-finite bound takes no part
        hi = torch.where(torch.isfinite(hi), hi, -INF)
        return torch.minimum(lo, torch.tensor(-4.0)), torch.maximum(hi, torch.tensor(4.0))

    def run():
        q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
        q.range_sync = other_rank_saw
        x = torch.linspace(-1, 1, 9000)  # the pooled passes
        x[0] = bad
        x.requires_grad_()
        out = q(x, torch.tensor(0))
        out.backward(torch.ones_like(out))
        return out.detach(), x.grad

    (out, grad), (ref_out, ref_grad) = run(), tensor_path(run)
    assert torch.equal(bits(out), bits(ref_out)) and torch.equal(bits(grad), bits(ref_grad))
    assert grad[0] == 0.0 and grad[1:].eq(1.0).all()
    assert out[1:].abs().max() <= 1.0 + 4 / 255  # this batch's values, on the synced range's levels
    assert out[0] == (out.max() if bad == INF else out.min()) and 3.9 < out[0].abs() < 4.1  # a bound of [-4, 4]


def test_range_swapped_in_by_load_state_dict_is_read_again(tensor_path) -> None:
    # torch.utils.swap_tensors keeps the buffer's Python object and may keep its version counter
    setting = QuantSetting(8, "per_tensor_affine", "uint")
    x = torch.linspace(-5, 5, 100)
    q, other = ActivationQuantizer(setting, 0).train(), ActivationQuantizer(setting, 0).train()
    q(torch.linspace(-1, 1, 100), torch.tensor(0))
    other(torch.linspace(-3, 3, 100), torch.tensor(0))
    q.eval()
    q(x, torch.tensor(0))  # the range is cached
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        q.load_state_dict(other.state_dict(), assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert q.tracked_max.item() == 3.0
    assert torch.equal(bits(q(x, torch.tensor(0))), bits(tensor_path(q, x, torch.tensor(0))))


def test_inference_mode_in_training_mode_leaves_the_pool_usable() -> None:
    quant.release_buffers()
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    x = torch.randn(4, 8, 32, 32)
    with torch.inference_mode():
        q(x, torch.tensor(0))
    out = q(x.requires_grad_(), torch.tensor(1))  # buffers made now are ordinary tensors
    out.sum().backward()
    assert not out.is_inference()


# -- CUDA: the same host-read path (runs where a GPU exists; tests.cuda_check covers more) ----------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("scheme,dtype", [("per_tensor_affine", "uint"), ("per_tensor_symmetric", "int"),
                                          ("per_channel_symmetric", "int"), ("per_channel_affine", "uint")])
def test_cuda_host_reads_equal_the_cpu_path_bit_for_bit(scheme: str, dtype: str) -> None:
    per_channel = scheme.startswith("per_channel")
    runs = {}
    for device in ("cpu", "cuda"):
        cls = WeightQuantizer if per_channel else ActivationQuantizer
        q = cls(QuantSetting(8, scheme, dtype), 0).train().to(device)
        out = []
        for i, spread in enumerate([1.0, 3.0, 0.5]):
            x = torch.randn(64, 16, 3, 3, generator=torch.Generator().manual_seed(i)) * spread
            if i == 2 and not per_channel:
                x[0, 0, 0, 0] = INF  # this bound stays as it was; the value clamps
            x = x.to(device).requires_grad_()
            assert quant._host_path(x)
            y = q(x, torch.tensor(1, device=device))
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(device))
            out += [bits(y.cpu()), bits(x.grad.cpu())]
            if not per_channel:
                out += [bits(q.tracked_min.cpu()), bits(q.tracked_max.cpu())]
        runs[device] = out
    for i, (a, b) in enumerate(zip(runs["cpu"], runs["cuda"], strict=True)):
        assert torch.equal(a, b), f"tensor {i}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_graph_capture_takes_the_tensor_path() -> None:
    # a capture allows no host read: the quantizer records the tensor path and replays it
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"],
                                            "quant_bits": 8}]).cuda()
    x = seed_input(8).cuda()
    gm(x)  # one training forward: the input ranges are set
    gm.eval()
    expected = gm(x)
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gm(static)  # warm-up off the default stream, as CUDA graphs ask
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gm(static)
    graph.replay()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
