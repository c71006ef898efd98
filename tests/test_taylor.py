"""Criterion 'taylor': masks from |w·grad| accumulated over batches, checked against scores computed by hand
with plain autograd on an uncompressed copy of the model; group masks; schedules; the errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.group_report import group_report
from fxcompress.taylor import taylor_importance

from .fixtures import masked_reference
from .test_speedup import Residual, _randomize_norms


class Small(nn.Module):
    """Conv-BN-ReLU, conv, flatten, Linear: 4 classes on 1x3x6x6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv2(F.relu(self.bn(self.conv1(x))))), 1))


def _batches(n: int = 3, shape: tuple[int, ...] = (5, 3, 6, 6), classes: int = 4, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen))
            for _ in range(n)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_norms(Small()).eval()


def _hand_scores(model: nn.Module, names: list[str], batches: list, loss_fn=F.cross_entropy) -> dict:
    """Σ over batches of |w · ∂L/∂w| per weight, with .backward() on a plain copy of the (dense) model in eval mode."""
    ref = copy.deepcopy(model).eval()
    total = {n: torch.zeros_like(ref.get_submodule(n).weight) for n in names}
    for x, y in batches:
        ref.zero_grad()
        loss_fn(ref(x), y).backward()
        for n in names:
            w = ref.get_submodule(n).weight
            total[n] += (w.detach() * w.grad).abs()
    return total


def _lowest(score: torch.Tensor, k: int) -> set[int]:
    """Indices of the k lowest scores, ties to the lower index (a stable sort, written without fxcompress)."""
    return set(torch.argsort(score.flatten(), stable=True)[:k].tolist())


def _compress(model: nn.Module, config: list, **kw: object) -> torch.fx.GraphModule:
    with pytest.warns(UserWarning, match="criterion 'taylor'.*waiting for gradients"):
        return fxcompress.compress(model, config, **kw)


def _state(gm: nn.Module) -> dict:
    """Everything scoring must leave alone: parameters, buffers (masks, BatchNorm statistics), grads, modes."""
    return {"tensors": {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in gm.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in gm.named_parameters()},
            "modes": {n: m.training for n, m in gm.named_modules()}}


def _assert_same_state(gm: nn.Module, before: dict, masks_too: bool = True) -> None:
    after = _state(gm)
    assert after["modes"] == before["modes"] and after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        if masks_too or not k.endswith("_mask"):
            assert torch.equal(after["tensors"][k], v), k
    for k, g in before["grads"].items():
        assert (g is None and after["grads"][k] is None) or torch.equal(after["grads"][k], g), k


LAYERS = ["conv1", "conv2", "fc"]


@pytest.mark.parametrize("sparsity", [0.5, 0.29])
def test_element_masks_prune_the_lowest_accumulated_w_grad(sparsity: float) -> None:
    model, batches = _model(), _batches()
    gm = _compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": sparsity, "criterion": "taylor"}])
    assert all(bool(m.all()) for m in fxcompress.masks(gm).values())  # dense until scored
    fxcompress.update_masks(gm, data=batches, loss_fn=F.cross_entropy)
    hand = _hand_scores(model, LAYERS, batches)
    for name in LAYERS:
        mask, n = fxcompress.masks(gm)[name], hand[name].numel()
        k = math.floor(round(sparsity * 100) * n / 100)  # exact floor(s·n): 0.29 of 100 is 29
        assert int((~mask).sum()) == k
        assert set((~mask).flatten().nonzero().squeeze(1).tolist()) == _lowest(hand[name], k), name
    x = batches[0][0]
    torch.testing.assert_close(gm(x), masked_reference(model, fxcompress.masks(gm))(x))


def test_out_channel_and_total_sparsity_rank_summed_and_global_scores() -> None:
    model, batches = _model(), _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-layer out_channel without example inputs warns, as does taylor
        per_filter = fxcompress.compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                                                  "granularity": "out_channel", "criterion": "taylor"}])
    glob = _compress(model, [{"op_types": ["Conv2d", "Linear"], "total_sparsity": 0.6, "criterion": "taylor"}])
    for gm in (per_filter, glob):
        fxcompress.update_masks(gm, data=batches, loss_fn=F.cross_entropy)
    hand = _hand_scores(model, LAYERS, batches)
    for name in LAYERS:
        mask = fxcompress.masks(per_filter)[name]
        rows = hand[name].reshape(hand[name].shape[0], -1)
        pruned = set((~mask.reshape(mask.shape[0], -1).any(dim=1)).nonzero().squeeze(1).tolist())
        assert pruned == _lowest(rows.sum(dim=1), rows.shape[0] // 2), name
    flat = torch.cat([hand[n].flatten() for n in LAYERS])
    k = math.floor(6 * flat.numel() / 10)
    got = torch.cat([(~fxcompress.masks(glob)[n]).flatten() for n in LAYERS])
    assert int(got.sum()) == k and set(got.nonzero().squeeze(1).tolist()) == _lowest(flat, k)


def test_a_residual_group_sums_its_layers_channel_scores() -> None:
    model = _randomize_norms(Residual()).eval()
    x = torch.randn(2, 3, 6, 6)
    cfg = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5, "granularity": "out_channel", "criterion": "taylor"}]
    gm = _compress(model, cfg, example_inputs=(x,))
    rows = {r.layers: r for r in group_report(gm)}
    assert rows[("a", "b")].status == "taylor: waiting for gradients" and rows[("a", "b")].pruned == 0
    assert rows[("c",)].status.startswith("not pruned: blocked by 'output'")
    assert {r.name: r.target for r in fxcompress.report(gm)}["a"] == "0.5 out_channel (taylor: waiting for gradients)"
    assert "taylor: waiting for gradients" in fxcompress.summary(gm)
    with pytest.raises(fxcompress.SpeedupError, match=r"'a', 'b' are pruned with criterion 'taylor' and still wait "
                                                      r"for gradients.*update_masks\(gm, data="):
        fxcompress.speedup(gm)

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 4, 6, 6, generator=gen)) for _ in range(2)]
    fxcompress.update_masks(gm, data=batches, loss_fn=F.mse_loss)
    hand = _hand_scores(model, ["a", "b"], batches, F.mse_loss)
    channel = hand["a"].reshape(8, -1).sum(dim=1) + hand["b"].reshape(8, -1).sum(dim=1)
    expected = _lowest(channel, 4)  # floor(0.5 * 8) channels of the group, scores summed over both layers
    for layer in ("a", "b"):
        mask = fxcompress.masks(gm)[layer]
        assert set((~mask.reshape(8, -1).any(dim=1)).nonzero().squeeze(1).tolist()) == expected
    for bn in ("bn_a", "bn_b"):
        assert set((gm.get_submodule(bn).weight_mask == 0).nonzero().squeeze(1).tolist()) == expected
    assert not fxcompress.masks(gm)["c"].logical_not().any()  # its group is blocked: kept, not waiting
    rows = {r.layers: r for r in group_report(gm)}
    assert rows[("a", "b")].status == "pruned" and rows[("a", "b")].pruned == 4
    assert "waiting" not in fxcompress.summary(gm)
    fast = fxcompress.speedup(gm)
    assert fast.a.weight.shape[0] == fast.b.weight.shape[0] == 4
    torch.testing.assert_close(fast.eval()(x), gm.eval()(x))


def test_scoring_changes_nothing_about_the_model() -> None:
    model = _model()
    gm = _compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "criterion": "taylor",
                            "quant_types": ["input", "weight"], "quant_bits": 8}])
    gm.train()
    gm.bn.eval()  # a frozen BatchNorm keeps its own flag
    gm.fc.weight.requires_grad_(False)  # a frozen layer is still scored, and stays frozen
    gm.conv1.weight.grad = torch.full_like(gm.conv1.weight, 7.0)  # the user's accumulated gradient
    before = _state(gm)
    scores = taylor_importance(gm, LAYERS, _batches(), F.cross_entropy)  # the scoring step alone
    assert sorted(scores) == LAYERS and all(bool((s > 0).any()) for s in scores.values())
    _assert_same_state(gm, before)  # BatchNorm statistics, quantizer ranges, masks, weights, grads, modes
    assert fxcompress.get_step(gm) == 0  # no training forward was counted
    fxcompress.update_masks(gm, data=_batches(), loss_fn=F.cross_entropy)
    masks = fxcompress.masks(gm)
    assert all(int((~m).sum()) > 0 for m in masks.values())
    for name in LAYERS:  # installing the masks zeroes the pruned stored entries, as for every criterion
        before["tensors"][f"{name}.weight"] *= masks[name]
    _assert_same_state(gm, before, masks_too=False)


def test_masks_only_grow_under_a_schedule_and_rescoring_keeps_them() -> None:
    model, batches = _model(), _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: dense on purpose
        gm = fxcompress.compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.6,
                                          "criterion": "taylor"}], start_dense=True)
    sched = fxcompress.SparsityScheduler(gm, start_step=0, end_step=3, frequency=1, kind="linear", data=batches,
                                         loss_fn=F.cross_entropy)
    previous = {n: ~m for n, m in fxcompress.masks(gm).items()}
    for _ in range(3):
        sched.step()
        for name, mask in fxcompress.masks(gm).items():
            assert bool((previous[name] <= ~mask).all())  # a pruned weight stays pruned
            previous[name] = ~mask
    assert int((~fxcompress.masks(gm)["fc"]).sum()) == math.floor(0.6 * 384)
    again = fxcompress.update_masks(gm, data=_batches(seed=5), loss_fn=F.cross_entropy)
    assert all(torch.equal(~again[n], previous[n]) for n in previous)  # pruned entries rank first: same masks


def test_a_checkpoint_of_scored_masks_loads_into_a_waiting_model() -> None:
    model = _model()
    cfg = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5, "criterion": "taylor"}]
    gm = _compress(model, cfg)
    fxcompress.update_masks(gm, data=_batches(), loss_fn=F.cross_entropy)
    fresh = _compress(model, cfg)
    assert all("waiting for gradients" in r.target for r in fxcompress.report(fresh))
    fresh.load_state_dict(gm.state_dict())
    assert [r.target for r in fxcompress.report(fresh)] == ["0.5 (taylor)"] * 3
    assert all(torch.equal(m, fxcompress.masks(gm)[n]) for n, m in fxcompress.masks(fresh).items())


# ---- bad input ---------------------------------------------------------------------------------

class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.body(x))
        return self.head_a(h), self.head_b(h)


TAYLOR = [{"op_types": ["Linear"], "sparsity_per_layer": 0.5, "criterion": "taylor"}]
PAIRS = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]


def _first_head_loss(out: tuple, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[0], y)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({}, ValueError, r"layers 'body', 'head_a', 'head_b' \(config_list\[0\]\) are pruned with criterion 'taylor'.*"
                     r"call fxcompress.update_masks\(gm, data=batches, loss_fn=loss_fn\)"),
    ({"data": PAIRS}, ValueError, r"data= without loss_fn=: criterion 'taylor' needs both"),
    ({"loss_fn": _first_head_loss}, ValueError, r"loss_fn= without data="),
    ({"data": PAIRS, "loss_fn": "cross_entropy"}, TypeError, r"loss_fn must be callable"),
    ({"data": PAIRS[0][0], "loss_fn": _first_head_loss}, ValueError, r"data must be an iterable of \(inputs, target\) "
                                                                     r"batches .*got Tensor"),
    ({"data": [], "loss_fn": _first_head_loss}, ValueError, r"data yielded no batch"),
    ({"data": iter([]), "loss_fn": _first_head_loss}, ValueError, r"an iterator already consumed"),
    ({"data": [PAIRS[0][0]], "loss_fn": _first_head_loss}, ValueError, r"data\[0\]: expected an \(inputs, target\) "
                                                                       r"pair.*got Tensor"),
    ({"data": [(PAIRS[0][0], PAIRS[0][1], 1)], "loss_fn": _first_head_loss}, ValueError, r"got 3 items"),
    ({"data": PAIRS, "loss_fn": lambda out, y: F.cross_entropy(out[0], y, reduction="none")}, ValueError,
     r"data\[0\]: loss_fn returned shape \(4,\), expected a scalar tensor"),
    ({"data": PAIRS, "loss_fn": lambda out, y: torch.tensor(1.0)}, ValueError,
     r"data\[0\]: the loss does not depend on the model's weights"),
    ({"data": PAIRS, "loss_fn": lambda out, y: out[0].sum() * float("nan")}, ValueError,
     r"data\[0\]: loss_fn returned nan"),
    ({"data": PAIRS, "loss_fn": _first_head_loss}, ValueError,
     r"layer 'head_b' got no gradient from loss_fn over the 1 batch\(es\)"),
    ({"data": PAIRS, "loss_fn": lambda out, y: out[0].sum() * 0.0 + out[1].sum()}, ValueError,
     r"layer 'head_a': \|w·grad\| is 0 for every weight over the 1 batch\(es\)"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(kwargs: dict, error: type, match: str) -> None:
    gm = _compress(TwoHeads(), TAYLOR)
    before = _state(gm)
    with pytest.raises(error, match=match):
        fxcompress.update_masks(gm, **kwargs)
    _assert_same_state(gm, before)


def test_data_for_a_model_without_taylor_layers_is_refused() -> None:
    gm = fxcompress.compress(TwoHeads(), [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    with pytest.raises(ValueError, match=r"data and loss_fn feed criterion 'taylor', which no pruned layer"):
        fxcompress.update_masks(gm, data=PAIRS, loss_fn=_first_head_loss)


def test_taylor_with_an_n_m_pattern_is_a_config_error() -> None:
    with pytest.raises(fxcompress.ConfigError, match=r"config_list\[0\]\['criterion'\]: 'taylor' does not combine "
                                                     r"with granularity '2:4'"):
        fxcompress.parse_config([{"op_types": ["Linear"], "granularity": "2:4", "criterion": "taylor"}])
    with pytest.raises(fxcompress.ConfigError, match=r"expected one of level, l1, l2, fpgm, random, taylor"):
        fxcompress.parse_config([{"op_types": ["Linear"], "sparsity_per_layer": 0.5, "criterion": "tailor"}])


def test_a_model_compressed_at_module_level_takes_keyword_inputs() -> None:
    from .test_speedup import Untraceable

    torch.manual_seed(0)
    model = Untraceable().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compressed at module level, and taylor waits: both warn
        gm = fxcompress.compress(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5, "criterion": "taylor"}])
    x = torch.randn(2, 3, 4, 4)
    target = torch.randn(2, 2, 4, 4)
    fxcompress.update_masks(gm, data=[({"x": x}, target)], loss_fn=F.mse_loss)
    hand = _hand_scores(model, ["a", "b"], [(x, target)], F.mse_loss)
    for name in ("a", "b"):
        pruned = (~fxcompress.masks(gm)[name]).flatten().nonzero().squeeze(1).tolist()
        assert set(pruned) == _lowest(hand[name], hand[name].numel() // 2)
    assert [r.target for r in fxcompress.report(gm)] == ["0.5 (taylor)"] * 2
