"""Ranks under torch.distributed (gloo, CPU): DDP against one process, and ``sync_ranges``' groups.

Every collective is bounded: the process group times out after 30 s and the spawned ranks are
killed, failing the test, if they have not finished after 120 s.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fxcompress
from fxcompress.quant import ActivationQuantizer

from .fixtures import Nested

CFG = [{"op_types": ["default"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
        "quant_bits": 8, "quant_start_step": 2}]
STEPS, BATCH = 4, 8
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


# -- running ranks without hanging -----------------------------------------------------------

def run_ranks(worker: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> dict[int, Any]:
    """``worker(rank, *args)`` on ``world`` gloo ranks; what each returns, by rank."""
    # forkserver with torch preloaded (and torch._dynamo, which DDP imports when first built): a
    # rank starts in well under a second instead of importing torch again (spawn), and is forked
    # from a process that never ran a parallel region (fork)
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", "fxcompress"])
    out = mp.Manager().dict()
    ctx = mp.start_processes(_entry, args=(worker, world, _free_port(), out, args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"ranks still running after {timeout:.0f} s: a collective is waiting for a peer")
    return dict(out)


def _entry(rank: int, worker: Callable[..., Any], world: int, port: int, out: dict, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)
    try:
        out[rank] = worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- DDP with synced ranges equals one process on the whole batch ------------------------------

def make_model() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = Nested()
    for block in model.blocks:
        block.bn = torch.nn.Identity()  # BatchNorm sees per-rank batches under DDP: not comparable
    return fxcompress.compress(model, CFG)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 6, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def train(model: torch.nn.Module, data: list, rank: int | None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        if rank is not None:  # each rank takes its half of the global batch
            x, y = x.chunk(2)[rank], y.chunk(2)[rank]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_worker(rank: int) -> dict[str, torch.Tensor]:
    gm = make_model()
    assert fxcompress.sync_ranges(gm, dist.group.WORLD) == 12  # input and output of 6 layers
    train(DistributedDataParallel(gm), batches(), rank)
    return {k: v.detach().clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}


def test_ddp_two_ranks_with_synced_ranges_match_single_process() -> None:
    out = run_ranks(_ddp_worker, 2)
    rank0, rank1 = out[0], out[1]
    single = make_model()
    train(single, batches(), None)
    reference = single.state_dict()
    assert fxcompress.get_step(single) == STEPS and int(rank0["fxcompress_step.step"]) == STEPS
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"ranks differ in {key}"  # masks, ranges, weights alike
        if key.endswith(("_mask", "initialized", "step")):
            assert torch.equal(value, reference[key]), key
        else:
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)
    for name, mask in fxcompress.masks(single).items():
        weight = rank0[f"{name}.weight"]
        assert not (weight * mask)[~mask].any()
        assert int((rank0[f"{name}.weight_mask"] == 0).sum()) == int((~mask).sum())
    # activation ranges are the ranges of the whole batch, not of one rank's half
    assert float(rank0["stem.input_quantizer.tracked_max"]) == float(reference["stem.input_quantizer.tracked_max"])


# -- a subgroup is respected; None never communicates ----------------------------------------

ICFG = [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}]


def small_model() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return fxcompress.compress(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), ICFG).train()


def rank_batch(rank: int, step: int) -> torch.Tensor:
    """Rank r's batch at a step: rank 2's spans the widest range, so a leak to ranks 0/1 shows."""
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * rank + step)) * (1 + 2 * rank)


def input_range(gm: nn.Module) -> tuple[float, float]:
    """The tracked range of the first layer's input quantizer, which sees the model input as is."""
    quantizer = gm.get_submodule("0.input_quantizer")
    return float(quantizer.tracked_min), float(quantizer.tracked_max)


def ema_range(batches: list[list[torch.Tensor]]) -> tuple[float, float]:
    """SPEC §5's EMA by hand over steps, each step's range over the given ranks' batches."""
    lo = hi = None
    for step in batches:
        b_lo, b_hi = min(float(b.min()) for b in step), max(float(b.max()) for b in step)
        lo, hi = (b_lo, b_hi) if lo is None else (0.99 * lo + 0.01 * b_lo, 0.99 * hi + 0.01 * b_hi)
    return lo, hi


def _subgroup_worker(rank: int) -> dict[str, Any]:
    pair, alone = dist.new_group([0, 1]), dist.new_group([2])  # every rank creates every group
    gm = small_model()
    group = pair if rank < 2 else alone
    assert fxcompress.sync_ranges(gm, group) == 2
    for step in range(3):
        gm(rank_batch(rank, step))
    found = [m for m in gm.modules() if isinstance(m, ActivationQuantizer)]
    copied = copy.deepcopy(gm)  # a group is a process-local handle: a copy shares it, pickle drops it
    restored = pickle.loads(pickle.dumps(gm))
    x = rank_batch(rank, 9)
    scripted = torch.jit.script(gm.eval())
    return {"range": input_range(gm),
            "all_synced": all(q.range_sync is not None and q.range_sync.group is group for q in found),
            "copy_shares_group": all(q.range_sync.group is group for q in copied.modules()
                                     if isinstance(q, ActivationQuantizer)),
            "pickle_drops_group": all(q.range_sync is None for q in restored.modules()
                                      if isinstance(q, ActivationQuantizer)),
            "scripted_matches": torch.equal(scripted(x), gm(x))}


def test_sync_ranges_respects_a_subgroup() -> None:
    out = run_ranks(_subgroup_worker, 3)
    pair = ema_range([[rank_batch(0, s), rank_batch(1, s)] for s in range(3)])
    alone = ema_range([[rank_batch(2, s)] for s in range(3)])
    assert out[0]["range"] == out[1]["range"] == pytest.approx(pair, rel=1e-6)
    assert out[2]["range"] == pytest.approx(alone, rel=1e-6) and out[2]["range"][1] > out[0]["range"][1]
    for rank in range(3):
        assert {k: v for k, v in out[rank].items() if k != "range"} == {
            "all_synced": True, "copy_shares_group": True, "pickle_drops_group": True, "scripted_matches": True}


def _no_sync_worker(rank: int) -> tuple[float, float]:
    gm = small_model()
    fxcompress.sync_ranges(gm, dist.group.WORLD)
    assert fxcompress.sync_ranges(gm, None) == 2

    def no_collectives(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("all_reduce called with syncing off")

    dist.all_reduce = no_collectives  # this spawned process only
    for step in range(1 + 2 * rank):  # rank 0: one forward, rank 1: three
        gm(rank_batch(rank, step))
    return input_range(gm)


def test_sync_ranges_none_never_communicates() -> None:
    out = run_ranks(_no_sync_worker, 2)
    for rank in range(2):
        assert out[rank] == pytest.approx(ema_range([[rank_batch(rank, s)] for s in range(1 + 2 * rank)]), rel=1e-6)
    assert out[0] != out[1]


def test_sync_ranges_rejects_what_is_not_a_process_group() -> None:
    gm = small_model()
    with pytest.raises(TypeError, match="expected a torch.distributed ProcessGroup .* or None, got str"):
        fxcompress.sync_ranges(gm, "WORLD")
    assert fxcompress.sync_ranges(gm, None) == 2
