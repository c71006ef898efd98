"""Two-process DistributedDataParallel (gloo, CPU) against a single process on the whole batch."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fxcompress

from .fixtures import Nested

CFG = [{"op_types": ["default"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight", "output"],
        "quant_bits": 8, "quant_start_step": 2}]
STEPS, BATCH = 4, 8


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


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        gm = make_model()
        train(DistributedDataParallel(gm), batches(), rank)
        out[rank] = {k: v.detach().clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_single_process() -> None:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
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
