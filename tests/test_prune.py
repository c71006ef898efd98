"""The pruning pass: graph shape, numerics against a hand-masked reference, training, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.masking import masked_bias, masked_weight
from fxcompress.passes.prune import rewrite_pruned_layers

from .fixtures import CalledTwice, Nested, SeedModel, masked_reference, seed_input

CRITERIA_GRANULARITIES = [
    {"sparsity_per_layer": 0.6},
    {"sparsity_per_layer": 0.6, "criterion": "l2"},
    {"sparsity_per_layer": 0.6, "criterion": "random", "seed": 7},
    {"sparsity_per_layer": 0.5, "granularity": "out_channel"},
    {"sparsity_per_layer": 0.5, "granularity": "out_channel", "criterion": "l2"},
    {"sparsity_per_layer": 0.5, "granularity": "out_channel", "criterion": "fpgm"},
    {"granularity": "1:4", "op_types": ["Linear"]},  # conv1's rows hold 9 weights, not a multiple of 4
    {"total_sparsity": 0.7},
    {"total_sparsity": 0.7, "max_sparsity_per_layer": 0.75},
]


@pytest.mark.parametrize("keys", CRITERIA_GRANULARITIES, ids=lambda k: "-".join(map(str, k.values())))
def test_numerics_equal_hand_masked_reference(keys: dict) -> None:
    torch.manual_seed(0)
    model = SeedModel().eval()
    config_list = [{"op_types": ["Conv2d", "Linear"], **keys}]
    gm = fxcompress.compress(model, config_list).eval()
    masks = fxcompress.masks(gm)
    assert sorted(masks) == sorted(fxcompress.select(model, config_list)) and len(masks) >= 2
    x = seed_input(4)
    torch.testing.assert_close(gm(x), masked_reference(model, masks)(x))
    assert not torch.allclose(gm(x), model(x))  # the masks really act


def test_graph_has_visible_mask_nodes() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    gm.graph.lint()
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert targets.count("conv1.weight_mask") == 1 and targets.count("conv2.bias_mask") == 1
    assert sum(1 for n in gm.graph.nodes if n.target is masked_weight) == 2
    assert sum(1 for n in gm.graph.nodes if n.target is masked_bias) == 2
    assert sum(1 for n in gm.graph.nodes if n.target is F.conv2d) == 2
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"dropout1", "dropout2", "fc1", "fc2"}
    assert "weight_mask" in gm.code
    assert gm.conv1.weight_mask.dtype == torch.float32 and gm.conv1.weight_mask.shape == gm.conv1.weight.shape
    assert set(gm.conv1.weight_mask.unique().tolist()) == {0.0, 1.0}
    code = gm.code
    rewrite_pruned_layers(gm)
    assert gm.code == code  # idempotent


def test_bias_entry_follows_its_filter() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_names": ["conv1"], "sparsity_per_layer": 0.25,
                                            "granularity": "out_channel"}])
    assert int((gm.conv1.bias_mask == 0).sum()) == 8  # floor(0.25 * 32) filters
    assert torch.equal(gm.conv1.bias_mask.bool(), gm.conv1.weight_mask.reshape(32, -1).bool().all(dim=1))
    elementwise = fxcompress.compress(SeedModel(), [{"op_names": ["conv1"], "sparsity_per_layer": 0.25}])
    assert bool(elementwise.conv1.bias_mask.all())  # no filter is wholly pruned at 25% elementwise


def test_conv1d_conv3d_and_padding_modes() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                          nn.Unflatten(1, (4, 1, 1, 8)), nn.Conv3d(4, 2, 1, padding=1, padding_mode="circular"))
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8)
    gm = fxcompress.compress(model, [{"op_types": ["default"], "sparsity_per_layer": 0.5}])
    torch.testing.assert_close(gm(x), masked_reference(model, fxcompress.masks(gm))(x))


def test_layer_called_twice_has_one_mask() -> None:
    torch.manual_seed(0)
    model = CalledTwice()
    gm = fxcompress.compress(model, [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    assert [n for n, _ in gm.named_buffers()] == ["shared.weight_mask", "shared.bias_mask", "head.weight_mask",
                                                  "head.bias_mask"]
    x = torch.randn(5, 8)
    torch.testing.assert_close(gm(x), masked_reference(model, fxcompress.masks(gm))(x))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd-momentum-wd", "adamw"])
def test_optimizers_do_not_revive_masked_weights(make_opt) -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(Nested(), [{"op_types": ["default"], "sparsity_per_layer": 0.7}])
    opt = make_opt(gm.parameters())
    masks = {n: m.clone() for n, m in fxcompress.masks(gm).items()}
    layers = {n: gm.get_submodule(n) for n in masks}
    start = {n: layer.weight.detach().abs().clone() for n, layer in layers.items()}
    x = torch.randn(4, 3, 6, 6)
    for _ in range(50):
        opt.zero_grad()
        gm(x).square().mean().backward()
        for n, layer in layers.items():
            assert not layer.weight.grad[~masks[n]].any()  # masked weights get exactly zero gradient
        opt.step()
    for n, layer in layers.items():
        assert torch.equal(fxcompress.masks(gm)[n], masks[n])
        w = layer.weight.detach()
        assert not w[~masks[n]].any()  # pruned entries are held at exactly zero
        assert not torch.equal(w[masks[n]], start[n][masks[n]])  # the kept weights did train


def test_compile_fullgraph_trains_with_masks() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["default"], "sparsity_per_layer": 0.5}])
    eager = copy.deepcopy(gm)
    compiled = torch.compile(gm, fullgraph=True)
    x, y = seed_input(8), torch.arange(8)
    for model in (compiled, eager):
        model.eval()  # dropout's random streams differ between inductor and eager
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()
    for name in ("conv1", "fc1"):
        torch.testing.assert_close(gm.get_submodule(name).weight, eager.get_submodule(name).weight)
        masked = gm.get_submodule(name).weight_mask == 0
        assert not gm.get_submodule(name).weight.grad[masked].any()


def test_jit_script_runs_pruned_model() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["default"], "sparsity_per_layer": 0.5}]).eval()
    scripted = torch.jit.script(gm)
    torch.testing.assert_close(scripted(seed_input()), gm(seed_input()))


def test_masks_survive_state_dict_round_trip() -> None:
    cfg = [{"op_types": ["default"], "sparsity_per_layer": 0.5}]
    gm = fxcompress.compress(SeedModel(), cfg)
    with torch.no_grad():
        gm.fc1.weight.normal_()
    fxcompress.update_masks(gm)
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    buffer.seek(0)
    fresh = fxcompress.compress(SeedModel(), cfg)
    assert not torch.equal(fresh.fc1.weight_mask, gm.fc1.weight_mask)
    fresh.load_state_dict(torch.load(buffer))
    assert all(torch.equal(fresh.get_submodule(n).weight_mask, m) for n, m in fxcompress.masks(gm).items())
    torch.testing.assert_close(fresh.eval()(seed_input()), gm.eval()(seed_input()))


def test_update_masks_follows_new_weights() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_names": ["fc2"], "sparsity_per_layer": 0.25}])
    with torch.no_grad():
        gm.fc2.weight.copy_(torch.arange(1280, dtype=torch.float32).reshape(10, 128).flip(1))
    new = fxcompress.update_masks(gm)["fc2"]
    assert int((~new).sum()) == 320
    assert torch.equal(gm.fc2.weight_mask, new)
    assert bool((gm.fc2.weight[~new] < gm.fc2.weight[new].min()).all())


def test_sparsity_scheduler_ramps_to_target() -> None:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.8}], start_dense=True)
    assert bool(gm.conv2.weight.all()) and bool(gm.conv2.weight_mask.all())  # nothing pruned yet
    sched = fxcompress.SparsityScheduler(gm, start_step=2, end_step=10, frequency=2, kind="agp")
    seen = [int((gm.conv2.weight_mask == 0).sum())]
    for _ in range(12):
        sched.step()
        seen.append(int((gm.conv2.weight_mask == 0).sum()))
    n = 18432
    expected_at = {s: int(0.8 * (1 - (1 - (s - 2) / 8) ** 3) * n) for s in (4, 6, 8)}
    assert seen[0] == 0 and seen[2] == 0
    assert [seen[s] for s in (4, 6, 8)] == [pytest.approx(v, abs=1) for v in expected_at.values()]
    assert seen[3] == seen[2] and seen[5] == seen[4]  # only every `frequency` steps
    assert seen[10] == seen[12] == int(0.8 * n)
    assert seen == sorted(seen)
    assert int((gm.conv2.weight == 0).sum()) == seen[-1]


def test_scheduler_state_resumes_the_schedule() -> None:
    cfg = [{"op_names": ["fc2"], "sparsity_per_layer": 0.5}]
    gm = fxcompress.compress(SeedModel(), cfg, start_dense=True)
    sched = fxcompress.SparsityScheduler(gm, start_step=0, end_step=10, frequency=1, kind="linear")
    for _ in range(4):
        sched.step()
    resumed = fxcompress.SparsityScheduler(fxcompress.compress(SeedModel(), cfg, start_dense=True), 0, 10, 1, "linear")
    resumed.load_state_dict(sched.state_dict())
    assert (resumed.step_count, resumed.fraction) == (4, 0.4)
    resumed.step()
    sched.step()
    assert int((resumed.gm.fc2.weight_mask == 0).sum()) == int((sched.gm.fc2.weight_mask == 0).sum()) == 320


def test_momentum_from_before_a_mask_change_never_acts() -> None:
    torch.manual_seed(0)
    model = SeedModel()
    gm = fxcompress.compress(model, [{"op_names": ["fc2"], "sparsity_per_layer": 0.5}], start_dense=True)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    sched = fxcompress.SparsityScheduler(gm, start_step=2, end_step=4, frequency=1, kind="linear")
    x, y = seed_input(8), torch.arange(8)
    moved = 0
    for _ in range(8):
        opt.zero_grad()
        F.nll_loss(gm(x), y).backward()
        opt.step()  # momentum built while dense moves entries pruned since
        sched.step()
        pruned = gm.fc2.weight_mask == 0
        moved += int(gm.fc2.weight[pruned].count_nonzero())
        # the forward equals the model with the stored weights masked by hand
        current = copy.deepcopy(model)
        current.load_state_dict({k: v for k, v in gm.state_dict().items() if k in model.state_dict()})
        torch.testing.assert_close(gm.eval()(x), masked_reference(current, fxcompress.masks(gm)).eval()(x))
        gm.train()
    assert int(pruned.sum()) == 640 and moved > 0  # momentum did move stored pruned entries; they never acted


def test_layer_called_with_keyword_input() -> None:
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)

    torch.manual_seed(0)
    model = KeywordCall()
    gm = fxcompress.compress(model, [{"op_types": ["Linear"], "sparsity_per_layer": 0.5}])
    x = torch.randn(3, 6)
    torch.testing.assert_close(gm(x), masked_reference(model, fxcompress.masks(gm))(x))
