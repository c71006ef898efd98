"""nn.MultiheadAttention with separate q/k/v weights (kdim/vdim != embed_dim) is the one layer
``<attn>.in_proj`` (SPEC §2.6): its weight is ``[q | k | v]`` side by side, ``(E, E + kdim + vdim)``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.settings import ratio_floor

from .fixtures import masked_reference

E, HEADS, KDIM, VDIM = 8, 2, 12, 6
PRUNE = [{"op_types": ["Linear"], "sparsity_per_layer": 0.29}]


class Cross(nn.Module):
    """Cross-attention whose key and value have their own widths: torch keeps q/k/v weights apart."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=KDIM, vdim=VDIM, batch_first=True, bias=bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attn(q, k, v)[0]


def cross(bias: bool = True) -> Cross:
    torch.manual_seed(0)
    model = Cross(bias)
    with torch.no_grad():  # torch zero-initialises the biases: make every bias entry count
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, E, generator=gen), torch.randn(2, 5, KDIM, generator=gen),
            torch.randn(2, 5, VDIM, generator=gen))


def joined(attn: nn.MultiheadAttention) -> torch.Tensor:
    return torch.cat([attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight], dim=1).detach()


def separate_self_attention(embed_dim: int, heads: int, **kwargs: object) -> nn.MultiheadAttention:
    """Self-attention holding separate q/k/v weights: torch builds those only for kdim/vdim !=
    embed_dim, so the packed weight is split by hand (as a checkpoint converted from separate
    projections is loaded)."""
    mha = nn.MultiheadAttention(embed_dim, heads, **kwargs)
    q, k, v = mha.in_proj_weight.detach().chunk(3)
    mha._qkv_same_embed_dim = False
    mha.in_proj_weight = None
    mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight = (nn.Parameter(w.clone()) for w in (q, k, v))
    return mha


def test_one_layer_named_in_proj_with_exact_counts() -> None:
    model = cross()
    gm = fxcompress.compress(model, PRUNE)
    gm.graph.lint()
    rows = {r.name: r for r in fxcompress.report(gm)}
    n = E * (E + KDIM + VDIM)  # 208 weights over q, k and v
    assert list(rows) == ["attn.in_proj", "attn.out_proj"]
    assert (rows["attn.in_proj"].type_name, rows["attn.in_proj"].params) == ("Linear", n)
    assert rows["attn.in_proj"].pruned == 60 == ratio_floor(0.29, n)  # floor(0.29 * 208) = 60, one unit
    masks = fxcompress.masks(gm)
    assert masks["attn.in_proj"].shape == (E, E + KDIM + VDIM)
    # level: the 60 smallest |w| of q, k and v together (no ties in a random init)
    weight = joined(model.attn).abs()
    threshold = weight.flatten().sort().values[59]
    assert torch.equal(masks["attn.in_proj"], weight > threshold)
    assert fxcompress.select(model, [{"op_names": ["attn.in_proj"]}]) == ["attn.in_proj"]


def test_total_sparsity_ranks_the_three_weights_with_the_out_projection() -> None:
    model = cross()
    gm = fxcompress.compress(model, [{"op_types": ["Linear"], "total_sparsity": 0.7}])
    masks = fxcompress.masks(gm)
    everything = torch.cat([joined(model.attn).flatten(), model.attn.out_proj.weight.detach().flatten()]).abs()
    k = 190  # floor(0.7 * (208 + 64))
    threshold = everything.sort().values[k - 1]
    assert int((~masks["attn.in_proj"]).sum()) + int((~masks["attn.out_proj"]).sum()) == k
    assert torch.equal(masks["attn.in_proj"], joined(model.attn).abs() > threshold)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_numerics_match_a_hand_masked_attention(mode: str) -> None:
    model = cross()
    gm = fxcompress.compress(model, PRUNE).train(mode == "train")
    reference = masked_reference(model, fxcompress.masks(gm)).train(mode == "train")
    q, k, v = inputs()
    torch.testing.assert_close(gm(q, k, v), reference(q, k, v))
    assert not torch.allclose(gm(q, k, v), model.train(mode == "train")(q, k, v), atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(gm(q, k, v), reference(q, k, v))


def test_out_channel_prunes_row_j_of_q_k_and_v_with_their_biases() -> None:
    model = cross()
    gm = fxcompress.compress(model, [{"op_names": ["attn.in_proj"], "sparsity_per_layer": 0.5,
                                      "granularity": "out_channel"}])
    mask = fxcompress.masks(gm)["attn.in_proj"]
    rows = mask.all(dim=1)
    assert int((~rows).sum()) == 4 and torch.equal(mask, rows[:, None].expand_as(mask))  # floor(0.5 * 8) rows
    bias = gm.attn.in_proj.bias.detach()
    assert bias.shape == (3, E)
    assert torch.equal(bias[:, ~rows], torch.zeros(3, 4)) and bool((bias[:, rows] != 0).all())
    q, k, v = inputs()
    torch.testing.assert_close(gm.eval()(q, k, v), masked_reference(model, {"attn.in_proj": mask}).eval()(q, k, v))


def test_pruned_entries_get_no_gradient_and_the_state_dict_is_sparse() -> None:
    gm = fxcompress.compress(cross(), PRUNE)
    gm(*inputs()).square().sum().backward()
    mask = fxcompress.masks(gm)["attn.in_proj"]
    in_proj = gm.attn.in_proj
    assert float(in_proj.weight.grad[~mask].abs().sum()) == 0.0 and float(in_proj.weight.grad[mask].abs().sum()) > 0
    assert float(gm.state_dict()["attn.in_proj.weight"][~mask].abs().sum()) == 0.0


def test_no_bias() -> None:
    model = cross(bias=False)
    gm = fxcompress.compress(model, PRUNE)
    q, k, v = inputs()
    torch.testing.assert_close(gm.eval()(q, k, v), masked_reference(model, fxcompress.masks(gm)).eval()(q, k, v))


def fake_quant_input(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """uint8 per-tensor affine over a range widened to contain 0 (SPEC §5), by torch's own op."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zero_point = min(max(0 - round(lo / scale), 0), 255)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def test_quantized_in_projection_matches_torch_fake_quant() -> None:
    model = cross()
    cfg = [{"op_names": ["attn.in_proj"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"],
            "quant_bits": 8}]
    gm = fxcompress.compress(model, cfg)
    q, k, v = inputs()
    gm(q, k, v)  # one training step: the three input observers see their own tensors
    in_proj = gm.attn.in_proj
    ranges = [(float(o.tracked_min), float(o.tracked_max))
              for o in (in_proj.input_quantizer, in_proj.key_input_quantizer, in_proj.value_input_quantizer)]
    assert ranges[0] == (float(q.min()), float(q.max())) and ranges[1] == (float(k.min()), float(k.max()))
    mask = fxcompress.masks(gm)["attn.in_proj"]
    weight = joined(model.attn) * mask
    scale = weight.abs().amax(dim=1) / 127  # per-channel symmetric int8, narrow: one scale per row j
    quantized = torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros(E, dtype=torch.int32), 0, -127, 127)
    reference = masked_reference(model, {"attn.in_proj": mask})
    with torch.no_grad():
        reference.attn.q_proj_weight.copy_(quantized[:, :E])
        reference.attn.k_proj_weight.copy_(quantized[:, E:E + KDIM])
        reference.attn.v_proj_weight.copy_(quantized[:, E + KDIM:])
    expected = reference.eval()(*(fake_quant_input(x, *r) for x, r in zip((q, k, v), ranges, strict=True)))
    torch.testing.assert_close(gm.eval()(q, k, v), expected)
    assert len(fxcompress.calibration(gm)["attn.in_proj"]["weight_scale"]) == E
    torch.testing.assert_close(torch.tensor(fxcompress.calibration(gm)["attn.in_proj"]["weight_scale"]), scale)


def test_quantizing_every_linear_runs_and_composes_with_pruning() -> None:
    model = cross()
    pruned = fxcompress.compress(model, PRUNE)
    both = fxcompress.compress(pruned, [{"op_types": ["Linear"], "quant_types": ["input", "weight"],
                                         "quant_bits": 8}])
    assert torch.equal(fxcompress.masks(both)["attn.in_proj"], fxcompress.masks(pruned)["attn.in_proj"])
    assert [(r.name, r.pruned, bool(r.quant)) for r in fxcompress.report(both)] == [
        ("attn.in_proj", 60, True), ("attn.out_proj", 18, True)]  # floor(0.29 * 64) = 18
    q, k, v = inputs()
    out = both(q, k, v)
    out.sum().backward()
    assert out.shape == (2, 3, E) and both.attn.in_proj.weight.grad is not None


def test_output_of_the_in_projection_cannot_be_quantized() -> None:
    cfg = [{"op_types": ["Linear"], "quant_types": ["input", "weight", "output"], "quant_bits": 8}]
    with pytest.raises(ConfigError, match=r"layer 'attn.in_proj': activation quantization cannot reach the output "
                                          r"of the attention in-projection"):
        fxcompress.compress(cross(), cfg)


def test_loads_the_original_modules_state_dict() -> None:
    model = cross()
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_()
    gm = fxcompress.compress(model, PRUNE)
    state = gm.state_dict()
    assert state["attn.in_proj.weight"].shape == (E, E + KDIM + VDIM) and state["attn.in_proj.bias"].shape == (3, E)
    assert not any("q_proj_weight" in key or "in_proj_bias" in key for key in state)
    result = gm.load_state_dict(dense.state_dict(), strict=False)  # q_proj_weight, ..., in_proj_bias
    assert result.unexpected_keys == []
    torch.testing.assert_close(gm.attn.in_proj.weight.detach(), joined(dense.attn))
    q, k, v = inputs()
    expected = masked_reference(dense, fxcompress.masks(gm)).eval()(q, k, v)
    torch.testing.assert_close(gm.eval()(q, k, v), expected)
    again = fxcompress.compress(cross(), PRUNE)
    again.load_state_dict(gm.state_dict())  # its own keys round-trip
    for clone in (again, copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        torch.testing.assert_close(clone.eval()(q, k, v), expected)


def test_the_users_model_is_unchanged() -> None:
    model = cross()
    before = copy.deepcopy(model.state_dict())
    fxcompress.plan(model, PRUNE)
    fxcompress.compress(model, PRUNE)
    assert isinstance(model.attn, nn.MultiheadAttention) and model.attn.in_proj_weight is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_counts_the_three_weights() -> None:
    rows = fxcompress.report(fxcompress.plan(cross(), PRUNE))
    assert [(r.name, r.params, r.pruned) for r in rows] == [("attn.in_proj", 208, None), ("attn.out_proj", 64, None)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inside_a_transformer_encoder_layer_without_a_fast_path(mode: str) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
    layer.self_attn = separate_self_attention(E, HEADS, batch_first=True)
    model = nn.Sequential(layer)
    gm = fxcompress.compress(model, [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    masks = fxcompress.masks(gm)
    assert sorted(masks) == ["0.linear1", "0.linear2", "0.self_attn.in_proj", "0.self_attn.out_proj"]
    assert int((~masks["0.self_attn.in_proj"]).sum()) == 96  # floor(0.5 * 8 * 24)
    x = torch.randn(3, 5, E)
    reference = masked_reference(model, masks).train(mode == "train")
    gm.train(mode == "train")
    with torch.no_grad():  # eval under no_grad is where torch's fused fast paths would read raw weights
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(gm(x), model.train(mode == "train")(x), atol=1e-3)
    assert gm.get_submodule("0.self_attn").qkv_widths == [E, E, E]
