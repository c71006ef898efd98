"""SPEC.md §5: quantization numerics against an independent reference, the step gate, state."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

import fxcompress
from fxcompress.masking import masked_weight
from fxcompress.quant import ActivationQuantizer, WeightQuantizer, qparams
from fxcompress.settings import QuantSetting

from .fixtures import SeedModel, seed_input

EPS = torch.finfo(torch.float32).eps


# -- an independent reference of SPEC.md §5, in plain tensor code -----------------------------

def ref_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, uint: bool):
    qmin, qmax = (0, 2**bits - 1) if uint else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        scale = torch.where(scale < EPS, torch.full_like(scale, EPS), scale)
        zp = torch.full_like(scale, (qmin + qmax) // 2 if uint else 0)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale < EPS, torch.full_like(scale, EPS), scale)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp, qmin, qmax


def ref_fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):
    """Value and straight-through gradient mask; PyTorch's kernels multiply by 1/scale, as here."""
    q = torch.round(x * (1.0 / scale)) + zp
    inside = (q >= qmin) & (q <= qmax)
    return (q.clamp(qmin, qmax) - zp) * scale, inside


# -- scale and zero point ---------------------------------------------------------------------

def qp(lo: float, hi: float, bits: int, scheme: str, dtype: str) -> tuple[float, int]:
    s = QuantSetting(bits, scheme, dtype)
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), s.qmin, s.qmax, s.symmetric)
    return float(scale), int(zp)


def test_scale_and_zero_point_examples() -> None:
    assert qp(-1, 5, 8, "per_tensor_affine", "uint") == (pytest.approx(6 / 255), 42)
    assert qp(-1, 5, 8, "per_tensor_symmetric", "int") == (pytest.approx(5 / 127), 0)
    assert qp(1, 5, 8, "per_tensor_affine", "uint") == (pytest.approx(5 / 255), 0)  # widened to (0, 5)
    assert qp(-1, 5, 8, "per_tensor_symmetric", "uint") == (pytest.approx(5 / 127.5), 127)
    scale, zp = qp(0, 0, 8, "per_tensor_affine", "uint")
    assert scale == EPS and zp == 0


def test_zero_range_gives_no_nan() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    out = q(torch.zeros(4), torch.tensor(0))
    assert torch.equal(out, torch.zeros(4))
    w = WeightQuantizer(QuantSetting(8, "per_channel_symmetric", "int"), 0)
    assert not w(torch.zeros(3, 2), torch.tensor(0)).isnan().any()


def test_ema_first_initializes_then_decays() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).train()
    q(torch.tensor([0.0, 0.1, 0.2]), torch.tensor(0))
    assert (float(q.tracked_min), float(q.tracked_max)) == (0.0, pytest.approx(0.2))
    q(torch.tensor([0.2, 0.8]), torch.tensor(1))
    assert float(q.tracked_min) == pytest.approx(0.002) and float(q.tracked_max) == pytest.approx(0.206)
    q.eval()
    q(torch.tensor([-9.0, 9.0]), torch.tensor(2))
    assert float(q.tracked_max) == pytest.approx(0.206)  # no update in eval mode


def test_unobserved_quantizer_passes_through() -> None:
    q = ActivationQuantizer(QuantSetting(4, "per_tensor_affine", "uint"), 0).eval()
    x = torch.randn(10)
    assert torch.equal(q(x, torch.tensor(5)), x)


# -- fake-quant values and gradients against the reference ------------------------------------

SCHEMES = ["per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", ["int", "uint"])
def test_weight_fake_quant_matches_reference(bits: int, scheme: str, dtype: str) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = (torch.randn(6, 5, generator=gen) * torch.linspace(0.1, 3, 6).unsqueeze(1)).requires_grad_()
    quantizer = WeightQuantizer(QuantSetting(bits, scheme, dtype), 0)
    out = quantizer(w, torch.tensor(0))
    out.backward(torch.arange(30.0).reshape(6, 5))
    per_channel = scheme.startswith("per_channel")
    wd = w.detach()
    lo, hi = (wd.min(dim=1).values, wd.max(dim=1).values) if per_channel else (wd.min(), wd.max())
    scale, zp, qmin, qmax = ref_qparams(lo, hi, bits, scheme.endswith("symmetric"), dtype == "uint")
    if per_channel:
        scale, zp = scale.unsqueeze(1), zp.unsqueeze(1)
    expected, inside = ref_fake_quant(wd, scale, zp, qmin, qmax)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, torch.arange(30.0).reshape(6, 5) * inside)
    if bits <= 4:
        assert expected.unique().numel() <= 2**bits * (6 if per_channel else 1)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("scheme", ["per_tensor_affine", "per_tensor_symmetric"])
@pytest.mark.parametrize("dtype", ["int", "uint"])
def test_activation_fake_quant_matches_reference(bits: int, scheme: str, dtype: str) -> None:
    quantizer = ActivationQuantizer(QuantSetting(bits, scheme, dtype), 0).train()
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(50, generator=gen) * 2 + 0.5
    quantizer(first, torch.tensor(0))
    x = (torch.randn(50, generator=gen) * 10).requires_grad_()  # wider than the range: some clip
    out = quantizer(x, torch.tensor(1))
    out.sum().backward()
    lo = 0.99 * first.min() + 0.01 * x.detach().min()
    hi = 0.99 * first.max() + 0.01 * x.detach().max()
    scale, zp, qmin, qmax = ref_qparams(lo, hi, bits, scheme.endswith("symmetric"), dtype == "uint")
    expected, inside = ref_fake_quant(x.detach(), scale, zp, qmin, qmax)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(x.grad, inside.float())
    if bits <= 8:
        assert 0 < int(inside.sum()) < 50  # both sides of the straight-through rule are exercised


# -- the gate ---------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def float_forward(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float model's output with gm's current weights, computed by hand."""
    return F.linear(F.relu(F.linear(x, gm.fc1.weight, gm.fc1.bias)), gm.fc2.weight, gm.fc2.bias)


QCFG = [{"op_types": ["Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 4,
         "quant_start_step": 3}]


def test_gate_first_three_training_forwards_are_float() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), QCFG)
    x = torch.randn(8, 6)
    assert torch.equal(gm.eval()(x), float_forward(gm, x))  # eval before any training forward
    gm.train()
    equal = []
    for _ in range(5):
        equal.append(torch.equal(gm(x), float_forward(gm, x)))
    assert equal == [True, True, True, False, False]
    assert fxcompress.get_step(gm) == 5
    gm.eval()
    assert not torch.equal(gm(x), float_forward(gm, x)) and fxcompress.get_step(gm) == 5


def test_gate_counts_optimizer_steps_when_attached() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), QCFG)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    handle = fxcompress.attach_optimizer(gm, opt)
    x = torch.randn(8, 6)
    quantized_at = []
    for step in range(5):
        for _ in range(4):  # gradient accumulation
            out = gm(x)
            quantized_at.append((step, not torch.equal(out, float_forward(gm, x))))
            out.sum().backward()
        opt.step()
        opt.zero_grad()
    assert [s for s, q in quantized_at if q][:1] == [3]  # from the 4th optimizer step on
    assert all(q == (s >= 3) for s, q in quantized_at)
    assert fxcompress.get_step(gm) == 5
    handle.remove()


def test_set_and_get_step() -> None:
    gm = fxcompress.compress(MLP(), QCFG)
    fxcompress.set_step(gm, 3)
    assert fxcompress.get_step(gm) == 3
    gm.train()
    x = torch.randn(2, 6)
    gm(x)
    assert not torch.equal(gm(x), float_forward(gm, x))
    with pytest.raises(ValueError, match="no quantized layer"):
        fxcompress.get_step(fxcompress.compress(MLP(), [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}]))


def test_step_is_read_from_its_buffer_only_after_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # the counter keeps the count as a Python int: on CUDA every read is a device synchronization
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), QCFG)
    x = torch.randn(8, 6)
    counter = gm.get_submodule("fxcompress_step")
    reads = []
    item = torch.Tensor.item

    def counted(t: torch.Tensor):  # noqa: ANN202
        if t.dtype == torch.int64 and t.dim() == 0:
            reads.append(int(item(t)))
        return item(t)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    equal = [torch.equal(gm(x), float_forward(gm, x)) for _ in range(5)]
    assert equal == [True, True, True, False, False] and reads == [0]  # one read, in the first forward
    fxcompress.set_step(gm, 1)  # a write (fill_) bumps the buffer's version: read again
    assert torch.equal(gm(x), float_forward(gm, x)) and reads == [0, 1]
    with torch.no_grad():
        counter.step.add_(5)  # any in-place write
    assert not torch.equal(gm(x), float_forward(gm, x)) and reads == [0, 1, 7]
    gm.eval()
    for _ in range(3):
        gm(x)
    assert reads == [0, 1, 7] and fxcompress.get_step(gm) == 8
    done = counter()
    assert done.fxcompress_step_value == 8 and int(done) == 8 and counter.step.item() == 8
    assert "_seen" not in copy.deepcopy(counter).__dict__


def test_graph_has_visible_quant_nodes() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5,
                                            "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    gm.graph.lint()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("fxcompress_step") == 1
    for layer in ("conv1", "conv2"):
        # the weight's chain sits right after its read; then the call's input and output
        assert [c for c in calls if c.startswith(layer)] == [f"{layer}.weight_quantizer", f"{layer}.input_quantizer",
                                                              f"{layer}.output_quantizer"]
    # the weight quantizer sees the masked weight
    wq = next(n for n in gm.graph.nodes if n.target == "conv1.weight_quantizer")
    assert wq.args[0].target is masked_weight and wq.args[0].args[1].target == "conv1.weight_mask"
    assert set(gm.state_dict()) >= {"fxcompress_step.step", "conv1.input_quantizer.tracked_min",
                                    "conv1.output_quantizer.initialized", "conv2.weight_mask"}


def test_pruned_entries_stay_zero_after_weight_quantization() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_names": ["fc2"], "sparsity_per_layer": 0.5,
                                            "quant_types": ["input", "weight"], "quant_bits": 4,
                                            "quant_scheme": {"weight": "per_tensor_affine"}}])
    masked = gm.fc2.weight * gm.fc2.weight_mask
    quantized = gm.fc2.weight_quantizer(masked, torch.tensor(0))
    assert not quantized[gm.fc2.weight_mask == 0].any()


# -- compile, script, export, state -----------------------------------------------------------

def test_compile_once_per_mode_across_the_start_step() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), QCFG)
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    x = torch.randn(8, 6)
    outs = [compiled(x) for _ in range(6)]
    assert counter.frame_count == 1
    assert [torch.equal(o, float_forward(gm, x)) for o in outs] == [True] * 3 + [False] * 3
    gm.eval()
    compiled(x)
    compiled(x)
    assert counter.frame_count == 2


def test_inductor_training_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), QCFG)
    eager = copy.deepcopy(gm)
    compiled = torch.compile(gm, fullgraph=True)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for model, m in ((compiled, gm), (eager, eager)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert fxcompress.get_step(gm) == fxcompress.get_step(eager) == 6
    torch.testing.assert_close(gm.fc1.weight, eager.fc1.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm.fc1.input_quantizer.tracked_max, eager.fc1.input_quantizer.tracked_max)


def test_script_and_export_of_quantized_model() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["default"], "sparsity_per_layer": 0.3,
                                            "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    gm.train()
    gm(seed_input(8))
    gm.eval()
    x = seed_input(3)
    expected = gm(x)
    torch.testing.assert_close(torch.jit.script(gm)(x), expected)
    exported = torch.export.export(gm, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_state_round_trip_resumes_identically() -> None:
    torch.manual_seed(0)
    cfg = [{"op_types": ["Linear"], "sparsity_per_layer": 0.25, "quant_types": ["input", "weight", "output"],
            "quant_bits": 6, "quant_start_step": 2}]
    gm = fxcompress.compress(MLP(), cfg)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": gm.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = fxcompress.compress(MLP(), cfg)
    fresh.load_state_dict(saved["model"])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05)
    fresh_opt.load_state_dict(saved["opt"])
    assert fxcompress.get_step(fresh) == 3
    assert float(fresh.fc1.input_quantizer.tracked_max) == float(gm.fc1.input_quantizer.tracked_max)
    for model, o in ((gm, opt), (fresh, fresh_opt)):
        for _ in range(2):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    assert torch.equal(gm(x), fresh(x))


def test_calibration_fields_are_json_ready() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), [{"op_names": ["fc1"], "quant_types": ["input", "weight", "output"],
                                      "quant_bits": {"input": 8, "weight": 4, "output": 8}}])
    gm.train()
    x = torch.randn(8, 6)
    gm(x)
    cal = fxcompress.calibration(gm)
    assert list(cal) == ["fc1"]
    fields = cal["fc1"]
    assert set(fields) == {"weight_bits", "weight_scale", "weight_zero_point", "input_bits", "tracked_min_input",
                           "tracked_max_input", "output_bits", "tracked_min_output", "tracked_max_output",
                           "input_observed", "output_observed"}
    assert fields["input_observed"] is True and fields["output_observed"] is True
    json.dumps(cal)
    assert fields["weight_bits"] == 4 and len(fields["weight_scale"]) == 16 and fields["weight_zero_point"] == [0] * 16
    assert fields["weight_scale"][0] == pytest.approx(float(gm.fc1.weight[0].detach().abs().max()) / 7)
    assert (fields["tracked_min_input"], fields["tracked_max_input"]) == (pytest.approx(float(x.min())),
                                                                          pytest.approx(float(x.max())))
    report = {r.name: r for r in fxcompress.report(gm)}["fc1"]
    assert report.quant == "weight int4 ch-sym, input uint8 aff, output uint8 aff"
    assert report.ranges.startswith(f"input [{float(x.min()):.4g}, {float(x.max()):.4g}]")


def test_calibration_of_an_unobserved_quantizer_says_so() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(MLP(), [{"op_names": ["fc1"], "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    gm.train()
    gm(torch.tensor([[float("inf"), 0.5, 0.0, 0.0, 0.0, 0.0]]))  # a batch with inf does not count
    expected = {"input_observed": False, "tracked_min_input": None, "tracked_max_input": None,
                "output_observed": False, "tracked_min_output": None, "tracked_max_output": None}
    cal = json.loads(json.dumps(fxcompress.calibration(gm)))["fc1"]
    assert {k: cal[k] for k in expected} == expected and len(cal["weight_scale"]) == 16
    assert {r.name: r for r in fxcompress.report(gm)}["fc1"].ranges == "input not observed; output not observed"
    assert "input not observed" in fxcompress.summary(gm)
    x = torch.randn(8, 6)
    gm(x)
    cal = fxcompress.calibration(gm)["fc1"]
    assert cal["input_observed"] and cal["output_observed"]
    assert (cal["tracked_min_input"], cal["tracked_max_input"]) == (float(x.min()), float(x.max()))


class WithAuxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.aux = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # aux is never used


def test_calibration_leaves_out_a_layer_the_forward_never_uses() -> None:
    gm = fxcompress.compress(WithAuxHead(), [{"op_types": ["Linear"], "quant_types": ["input", "weight"],
                                               "quant_bits": 8}])
    assert list(fxcompress.calibration(gm)) == ["fc"]


def test_gate_off_passes_huge_values_and_their_gradient() -> None:
    q = ActivationQuantizer(QuantSetting(8, "per_tensor_affine", "uint"), 0).eval()  # never observed
    x = torch.tensor([3e38, -1e30, 5.0], requires_grad=True)
    out = q(x, torch.tensor(0))
    out.sum().backward()
    assert torch.equal(out.detach(), x.detach()) and torch.equal(x.grad, torch.ones(3))


def test_new_modules_follow_the_model_mode() -> None:
    gm = fxcompress.compress(MLP().eval(), QCFG)
    assert not any(m.training for m in gm.modules())
    gm(torch.randn(2, 6))
    assert fxcompress.get_step(gm) == 0 and not bool(gm.fc1.input_quantizer.initialized)
    gm.train()
    gm(torch.randn(2, 6))
    assert fxcompress.get_step(gm) == 1 and bool(gm.fc1.input_quantizer.initialized)
