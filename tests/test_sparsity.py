"""SPEC.md §4 mask math: exact counts, the spec's numbers, caps, criteria, granularities, schedules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress
from fxcompress import ConfigError
from fxcompress.settings import PruneSetting
from fxcompress.sparsity import global_masks, kth_smallest, layer_mask, lowest_k_mask, schedule_fraction

from .fixtures import TwoLayers


def pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


def two_layers(small_first: bool = True) -> TwoLayers:
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        model.layer_1.weight.copy_(torch.rand(10, 50) * (0.01 if small_first else 1.0) + 1e-4)
        model.layer_2.weight.copy_(torch.rand(100, 10) + 0.02)
    return model


def pruned_counts(gm: torch.nn.Module) -> dict[str, int]:
    return {name: pruned(mask) for name, mask in fxcompress.masks(gm).items()}


# -- the spec's own numbers -------------------------------------------------------------------

def test_seed_sparsity_per_layer_400_and_800() -> None:
    gm = fxcompress.compress(two_layers(), [{"op_types": ["Linear"], "sparsity_per_layer": 0.8}])
    assert pruned_counts(gm) == {"layer_1": 400, "layer_2": 800}


def test_seed_total_sparsity_1200_smaller_layer_first() -> None:
    gm = fxcompress.compress(two_layers(), [{"op_types": ["Linear"], "total_sparsity": 0.8}])
    assert pruned_counts(gm) == {"layer_1": 500, "layer_2": 700}


def test_seed_total_sparsity_with_cap_450_of_500() -> None:
    gm = fxcompress.compress(two_layers(), [{"op_types": ["Linear"], "total_sparsity": 0.8,
                                             "max_sparsity_per_layer": 0.9}])
    assert pruned_counts(gm) == {"layer_1": 450, "layer_2": 750}


def test_cap_as_dict_caps_only_named_layer() -> None:
    gm = fxcompress.compress(two_layers(), [{"op_types": ["Linear"], "total_sparsity": 0.8,
                                             "max_sparsity_per_layer": {"layer_1": 0.5}}])
    assert pruned_counts(gm) == {"layer_1": 250, "layer_2": 950}


def test_unreachable_cap_raises_with_both_numbers_and_leaves_model_alone() -> None:
    model = two_layers()
    with pytest.raises(ConfigError, match=r"config_list\[0\]: total_sparsity 0.8 asks for 1200 pruned weights but "
                                          r"max_sparsity_per_layer allows at most 750"):
        fxcompress.compress(model, [{"op_types": ["Linear"], "total_sparsity": 0.8, "max_sparsity_per_layer": 0.5}],
                            inplace=True)
    assert not hasattr(model.layer_1, "weight_mask")


def test_group_is_only_the_layers_the_sub_config_wins() -> None:
    # layer_2 is taken by a later sub-config: the total is over layer_1's 500 weights only
    gm = fxcompress.compress(two_layers(), [{"op_types": ["Linear"], "total_sparsity": 0.5},
                                            {"op_names": ["layer_2"], "sparsity_per_layer": 0.1}])
    assert pruned_counts(gm) == {"layer_1": 250, "layer_2": 100}


# -- exactness and determinism ----------------------------------------------------------------

@pytest.mark.parametrize(("ratio", "expected"), [(0.29, 29), (0.57, 57), (0.01, 1), (0.0, 0), (0.999, 99)])
def test_float_safe_floor_on_100_weights(ratio: float, expected: int) -> None:
    layer = torch.nn.Linear(10, 10, bias=False)
    assert pruned(layer_mask(layer.weight, PruneSetting(sparsity_per_layer=ratio), "l")) == expected


def test_all_equal_weights_half_exactly_and_deterministic() -> None:
    w = torch.ones(7, 9)
    masks = [layer_mask(w, PruneSetting(sparsity_per_layer=0.5), "l") for _ in range(2)]
    assert pruned(masks[0]) == 31  # floor(0.5 * 63)
    assert torch.equal(masks[0], masks[1])
    # ties go in index order: the first 31 positions
    assert torch.equal(~masks[0].reshape(-1), torch.arange(63) < 31)


def test_identical_masks_across_two_compressions() -> None:
    cfg = [{"op_types": ["Linear"], "total_sparsity": 0.6}]
    a, b = fxcompress.masks(fxcompress.compress(two_layers(), cfg)), fxcompress.masks(fxcompress.compress(two_layers(),
                                                                                                         cfg))
    assert all(torch.equal(a[n], b[n]) for n in a)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=60), frac=st.floats(0, 1))
def test_lowest_k_matches_stable_sort(values: list[int], frac: float) -> None:
    score = torch.tensor(values, dtype=torch.float32)
    k = int(frac * len(values))
    reference = torch.ones(len(values), dtype=torch.bool)
    reference[torch.sort(score, stable=True).indices[:k]] = False
    assert torch.equal(lowest_k_mask(score, k), reference)


def test_kth_smallest_exact_on_large_tensors() -> None:
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(1))
    x[::7] = 0.0  # many ties
    for k in (1, 5, 428_571, 1_500_000, 2_999_999, 3_000_000):
        assert kth_smallest(x, k) == x.kthvalue(k).values


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), total=st.floats(0, 0.99),
       cap=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_global_allocation_matches_greedy_reference(sizes: list[int], total: float, cap: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weights = {f"l{i}": torch.randint(-5, 6, (n,), generator=gen).float() for i, n in enumerate(sizes)}
    setting = PruneSetting(total_sparsity=round(total, 3), max_sparsity_per_layer=round(cap, 3))
    k = int(round(total, 3) * 1000) * sum(sizes) // 1000
    caps = {n: int(round(cap, 3) * 1000) * w.numel() // 1000 for n, w in weights.items()}
    # greedy reference: walk all weights by (|w|, layer order, index), prune while the layer has room
    order = sorted((abs(float(v)), li, j, n) for li, (n, w) in enumerate(weights.items()) for j, v in enumerate(w))
    ref = {n: torch.ones(w.numel(), dtype=torch.bool) for n, w in weights.items()}
    taken = dict.fromkeys(weights, 0)
    left = k
    for _, _, j, n in order:
        if left and taken[n] < caps[n]:
            ref[n][j], taken[n], left = False, taken[n] + 1, left - 1
    if left:
        with pytest.raises(ConfigError, match="asks for"):
            global_masks(weights, setting, "g")
        return
    got = global_masks(weights, setting, "g")
    assert {n: pruned(m) for n, m in got.items()} == taken
    assert all(torch.equal(got[n], ref[n]) for n in weights)


# -- criteria and granularities ---------------------------------------------------------------

def test_out_channel_prunes_whole_rows_by_l1() -> None:
    w = torch.tensor([[1.0, 1.0], [0.1, 5.0], [0.2, 0.2], [3.0, -3.0]])
    mask = layer_mask(w, PruneSetting(sparsity_per_layer=0.5, granularity="out_channel", criterion="l1"), "l")
    assert torch.equal(mask.all(dim=1), torch.tensor([False, True, False, True]))
    assert torch.equal(mask.any(dim=1), mask.all(dim=1))


def test_out_channel_l2_differs_from_l1() -> None:
    w = torch.tensor([[3.0, 0.0, 0.0], [1.5, 1.5, 1.5]])  # l1: 3 < 4.5; l2: 3 > 2.6
    l1 = layer_mask(w, PruneSetting(sparsity_per_layer=0.5, granularity="out_channel", criterion="l1"), "l")
    l2 = layer_mask(w, PruneSetting(sparsity_per_layer=0.5, granularity="out_channel", criterion="l2"), "l")
    assert l1[:, 0].tolist() == [False, True] and l2[:, 0].tolist() == [True, False]


def test_fpgm_prunes_filter_nearest_the_others() -> None:
    w = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [4.0, 4.0]])  # (4,4) is most central
    mask = layer_mask(w, PruneSetting(sparsity_per_layer=0.25, granularity="out_channel", criterion="fpgm"), "l")
    assert mask.all(dim=1).tolist() == [True, True, True, False]


def test_random_criterion_is_seeded() -> None:
    w = torch.ones(40)
    a = layer_mask(w, PruneSetting(sparsity_per_layer=0.5, criterion="random", seed=3), "l")
    b = layer_mask(w, PruneSetting(sparsity_per_layer=0.5, criterion="random", seed=3), "l")
    c = layer_mask(w, PruneSetting(sparsity_per_layer=0.5, criterion="random", seed=4), "l")
    assert torch.equal(a, b) and not torch.equal(a, c) and pruned(a) == 20
    assert not torch.equal(a, torch.arange(40) >= 20)  # not the index-order tie-break


def test_n_m_keeps_n_largest_of_each_group() -> None:
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.0, 0.1, -0.2, 9.0]])
    mask = layer_mask(w, PruneSetting(granularity="2:4"), "l")
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]


def test_n_m_needs_divisible_rows() -> None:
    with pytest.raises(ConfigError, match=r"layer 'fc': granularity '2:4' needs a row length divisible by 4, got 6"):
        layer_mask(torch.ones(3, 6), PruneSetting(granularity="2:4"), "fc")


# -- schedules ----------------------------------------------------------------------------------

def test_agp_and_linear_schedules() -> None:
    assert [schedule_fraction(s, 10, 20, "linear") for s in (0, 10, 15, 20, 30)] == [0, 0, 0.5, 1, 1]
    assert schedule_fraction(15, 10, 20, "agp") == pytest.approx(1 - 0.5**3)
    assert schedule_fraction(12, 10, 20, "agp") == pytest.approx(1 - 0.8**3)
