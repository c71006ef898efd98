"""Tiny CPU models shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.examples import SeedModel

__all__ = ["CalledTwice", "DataDependentBlock", "Nested", "SeedModel", "TwoLayers", "WithBranchyBlock", "masked_reference",
           "seed_input"]


def masked_reference(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The original model with the masks multiplied into its weights (and filters' biases) by hand:
    the independent reference every pruning numerics test compares against. An attention's
    ``<a>.in_proj`` mask goes into ``<a>.in_proj_weight`` / ``in_proj_bias`` (SPEC §2.6), or into its
    separate q/k/v weights (see :func:`_mask_separate_qkv`)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            owner, _, part = name.rpartition(".")
            if part == "in_proj" and isinstance(ref.get_submodule(owner), nn.MultiheadAttention):
                attention = ref.get_submodule(owner)
                if not attention._qkv_same_embed_dim:
                    _mask_separate_qkv(attention, mask)
                    continue
                weight, bias = attention.in_proj_weight, attention.in_proj_bias
            else:
                weight, bias = ref.get_submodule(name).weight, ref.get_submodule(name).bias
            weight.mul_(mask)
            if bias is None:
                continue
            # An independent transcription of SPEC.md §4 ("a bias entry is masked when the whole
            # output row/filter it belongs to is masked"), written filter by filter on purpose: it
            # must not share an expression with passes/prune.py, or a wrong rule would pass both.
            for i in range(weight.shape[0]):
                if not mask[i].any():
                    bias[i] = 0.0
    return ref


def _mask_separate_qkv(attention: nn.MultiheadAttention, mask: torch.Tensor) -> None:
    """The mask of an in-projection with separate q/k/v weights is ``(E, E + kdim + vdim)``: the
    q, k and v columns side by side. Row ``j`` is output ``j`` of all three, so bias entries ``j``,
    ``E + j`` and ``2E + j`` go when that whole row is pruned."""
    start = 0
    for weight in (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight):
        weight.mul_(mask[:, start:start + weight.shape[1]])
        start += weight.shape[1]
    assert start == mask.shape[1]
    bias, e = attention.in_proj_bias, attention.embed_dim
    for j in range(e if bias is not None else 0):
        if not mask[j].any():
            bias[j] = bias[e + j] = bias[2 * e + j] = 0.0


def seed_input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class TwoLayers(nn.Module):
    """Layers of 500 and 1000 weights (the spec's total_sparsity example), no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_1 = nn.Linear(50, 10, bias=False)
        self.layer_2 = nn.Linear(10, 100, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_2(self.layer_1(x))


class CalledTwice(nn.Module):
    """One Linear used at two places in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.shared(F.relu(self.shared(x)))))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.proj = nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        n, c, h, w = y.shape
        return self.proj(y.flatten(2)).reshape(n, c, h, w) + x


class Nested(nn.Module):
    """Containers, several layer types, a BatchNorm that cannot be compressed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class DataDependentBlock(nn.Module):
    """fx cannot trace it (a branch on a value): its layers are compressed inside a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return F.relu(self.fc(x))
        return self.conv(x.unsqueeze(1)).squeeze(1)


class WithBranchyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.block = DataDependentBlock()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))
