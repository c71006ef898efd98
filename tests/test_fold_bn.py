"""Conv-BatchNorm folding for QAT (issue 12 item 1, SPEC §5): the weight quantizer sees w·γ/σ."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress

W8 = [{"op_types": ["Conv2d"], "quant_types": ["weight", "input"], "quant_bits": 8}]
LATE = [{"op_types": ["Conv2d"], "quant_types": ["weight", "input", "output"], "quant_bits": 8,
         "quant_start_step": 1000}]


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.side = nn.Conv2d(3, 4, 1)  # no BatchNorm: not folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))
        return y + self.side(x)[:, :, 1:-1, 1:-1]


def model() -> ConvBN:
    torch.manual_seed(0)
    m = ConvBN()
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for bn in (m.bn, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return m


X = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def test_plan_names_the_folded_batchnorm() -> None:
    gm = fxcompress.compress(model(), W8)
    sites = {r.name: r.site for r in fxcompress.report(gm)}
    assert sites == {"conv": "graph, folds bn", "conv2": "graph, folds bn2", "side": "graph"}
    assert not any(r.site.endswith("bn") for r in fxcompress.report(fxcompress.compress(model(), W8, fold_bn=False)))


def test_before_the_start_step_folding_computes_the_unfolded_model() -> None:
    """Train forwards (BatchNorm statistics move alike) and eval forwards, against fold_bn=False."""
    folded, plain = fxcompress.compress(model(), LATE), fxcompress.compress(model(), LATE, fold_bn=False)
    for mode in (True, True, False, True, False):
        folded.train(mode), plain.train(mode)
        assert torch.equal(folded(X), plain(X))  # every fold scale is 1 until the start step: bit-identical
    assert torch.equal(folded.bn.running_mean, plain.bn.running_mean)
    assert torch.equal(folded.bn2.running_var, plain.bn2.running_var)
    fxcompress.set_step(folded, 1000), fxcompress.set_step(plain, 1000)
    folded.eval(), plain.eval()  # quantizing: the folded weight's qparams differ from the plain weight's
    assert not torch.equal(folded(X), plain(X)) and torch.allclose(folded(X), plain(X), atol=0.1)


def _fq_rows(w: torch.Tensor) -> torch.Tensor:
    """SPEC §5 int8 narrow symmetric per output channel, by torch's own op: scale = max|w| / 127, zp 0."""
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1) / 127.0
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -127, 127)


def _fq_tensor(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    return torch.fake_quantize_per_tensor_affine(x, scale, int(min(max(0 - round(lo / scale), 0), 255)), 0, 255)


def test_eval_output_is_the_deployed_conv_without_batchnorm() -> None:
    """After training steps, gm.eval() equals a BN-free conv whose weight is fq(w·γ/σ) and bias
    β + (b − μ)·γ/σ: the weight the quantizer saw is the weight the deployed model holds."""
    gm = fxcompress.compress(model(), W8)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        gm(X).square().mean().backward()
        opt.step()
    gm.eval()
    with torch.no_grad():
        conv, bn = gm.conv, gm.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = _fq_rows(conv.weight * s.reshape(-1, 1, 1, 1))
        b = bn.bias + (conv.bias - bn.running_mean) * s
        q = conv.input_quantizer
        x = _fq_tensor(X, float(q.tracked_min), float(q.tracked_max))
        deployed = F.conv2d(x, w, b, padding=1)
        seen = []  # the first BatchNorm's output, captured by a forward hook
        handle = gm.bn.register_forward_hook(lambda m, i, o: seen.append(o))
        gm(X)
        handle.remove()
    assert torch.allclose(seen[0], deployed, atol=1e-4, rtol=1e-4)


def test_folding_survives_recompression_and_can_be_switched_off() -> None:
    pruned = fxcompress.compress(model(), [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    both = fxcompress.compress(pruned, W8)
    assert {r.name: r.site for r in fxcompress.report(both)}["conv"] == "graph, folds bn"
    code = both.code
    assert code.count("bn_fold_scale(") == 2 and code.count("unscale_channels(") == 2
    # a BatchNorm whose gamma is 0 (a pruned channel) divides by 1, not 0
    with torch.no_grad():
        both.bn.weight[0] = 0.0
    both.train()
    assert torch.isfinite(both(X)).all()


def test_a_conv_whose_output_is_also_read_elsewhere_is_not_folded() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    gm = fxcompress.compress(Branch(), W8)
    assert [r.site for r in fxcompress.report(gm)] == ["graph"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_quantizer_moves_after_the_batchnorm(mode: str) -> None:
    cfg = [{"op_names": ["conv"], "quant_types": ["weight", "input", "output"], "quant_bits": 8}]
    gm = fxcompress.compress(copy.deepcopy(model()).train(mode == "train"), cfg)
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order.index("bn") < order.index("conv.output_quantizer")
    seen = []  # the BatchNorm's outputs, captured by a forward hook
    handle = gm.bn.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    gm.train()
    gm(X)
    handle.remove()
    q = gm.conv.output_quantizer  # it observed the BatchNorm's output (the first observation is taken as is)
    assert float(q.tracked_min) == min(float(seen[0].min()), 0.0) or float(q.tracked_min) == float(seen[0].min())
    assert float(q.tracked_max) == float(seen[0].max())


def test_calibration_describes_the_weight_the_quantizer_sees() -> None:
    """With folding, the weight fields are those of w·γ/σ and name the BatchNorm (SPEC §5); a stored
    pruned entry that was written to afterwards does not count (the quantizer sees the masked weight)."""
    cfg = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5, "quant_types": ["weight", "input"], "quant_bits": 8}]
    gm = fxcompress.compress(model(), cfg)
    with torch.no_grad():
        gm.conv.weight[gm.conv.weight_mask == 0] = 100.0  # written from outside; never acts
    fields = fxcompress.calibration(gm)
    bn = gm.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = (gm.conv.weight * gm.conv.weight_mask) * s.reshape(-1, 1, 1, 1)
    expected = folded.reshape(8, -1).abs().amax(dim=1) / 127.0
    assert fields["conv"]["weight_folded_bn"] == "bn" and "weight_folded_bn" not in fields["side"]
    assert torch.allclose(torch.tensor(fields["conv"]["weight_scale"]), expected, rtol=1e-6)
    side = gm.side.weight * gm.side.weight_mask
    assert torch.allclose(torch.tensor(fields["side"]["weight_scale"]),
                          side.reshape(4, -1).abs().amax(dim=1) / 127.0, rtol=1e-6)


# -- the fold's functions: eager fast versions against plain autograd ------------------------------

def test_unscale_gradient_is_the_divisions_and_keeps_only_the_quotient() -> None:
    from fxcompress.folding import unscale_channels

    gen = torch.Generator().manual_seed(2)
    y = torch.randn(4, 6, 5, 5, generator=gen, requires_grad=True)
    s = (torch.rand(6, generator=gen) + 0.5) * torch.tensor([1.0, -1.0, 1.0, 1.0, -2.0, 1.0])
    s.requires_grad_()
    g = torch.randn(4, 6, 5, 5, generator=gen)
    out = unscale_channels(y, s)
    saved = out.grad_fn.saved_tensors  # the quotient (the BatchNorm keeps it anyway) and s; not y
    assert saved[0].data_ptr() == out.data_ptr() and y.data_ptr() not in {t.data_ptr() for t in saved}
    out.backward(g)
    y2, s2 = y.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = y2 / s2.reshape(1, -1, 1, 1)  # PyTorch's division and its autograd
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(y.grad, y2.grad)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [0, 5])
def test_fold_scale_values_and_gradient(step: int) -> None:
    from fxcompress import folding

    gamma = torch.tensor([0.5, 0.0, -1.5, 2.0], requires_grad=True)
    var = torch.tensor([1.0, 2.0, 0.25, 4.0])
    fast = folding.bn_fold_scale(gamma, var, 1e-5, torch.tensor(step), 3)
    ref = torch.where(torch.tensor(step >= 3), gamma / torch.sqrt(var + 1e-5), 1.0)
    expected = torch.where(ref != 0, ref, 1.0)  # a 0 scale (gamma 0) divides by 1
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=0)
    if step >= 3:
        (fast * torch.arange(4.0)).sum().backward()
        inv_std = torch.rsqrt(var + 1e-5)
        assert torch.equal(gamma.grad, torch.tensor([0.0, 0.0, 2.0, 3.0]) * inv_std * torch.tensor([1.0, 0, 1, 1]))


def test_folded_model_gradients_match_plain_division(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxcompress.passes import fold_bn

    def train_grads() -> list[torch.Tensor]:
        gm = fxcompress.compress(model(), W8)
        gm.train()
        gm(X)  # ranges set
        gm.zero_grad()
        gm(X).square().mean().backward()
        return [p.grad.clone() for p in gm.parameters()]

    fast = train_grads()
    monkeypatch.setattr(fold_bn, "unscale_channels", lambda y, s: y / s.reshape(1, -1, 1, 1))
    plain = train_grads()
    assert len(fast) == len(plain) == 9
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_training_gradients_equal_eager() -> None:
    # the BatchNorm updates running_var later in the forward that reads it for the fold scale: the
    # compiled backward must use the forward's scale, not one recomputed from the updated buffer
    eager, compiled = fxcompress.compress(model(), W8), fxcompress.compress(model(), W8)
    step = torch.compile(compiled, fullgraph=True)
    for i in range(3):
        x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(i)) * (1 + i)
        eager.zero_grad(), compiled.zero_grad()
        eager(x).square().mean().backward()
        step(x).square().mean().backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=f"step {i}: {name}")
    torch.testing.assert_close(compiled.bn.running_var, eager.bn.running_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dims", [3, 4, 5])
def test_unscale_double_backward(dims: int) -> None:
    # a gradient penalty differentiates the backward: the scale must stay in its graph
    from fxcompress.folding import unscale_channels

    gen = torch.Generator().manual_seed(dims)
    y = torch.randn(2, 3, *[4] * (dims - 2), generator=gen, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(unscale_channels, (y, s))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_finalized_folded_model_can_be_saved(tmp_path) -> None:  # noqa: ANN001 (pytest fixture)
    gm = fxcompress.compress(model(), W8)
    gm(X)
    final = fxcompress.finalize(gm).eval()
    traced = torch.jit.trace(final, X)  # gradients recorded: the trace takes the plain division
    torch.jit.save(traced, tmp_path / "m.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(X), final(X))

