"""Small compressed-and-trained models for the deploy tests (finalize, export_onnx, export_model).

Each builder returns ``(original model, compressed model after a few training forwards, example inputs)``,
the compressed model in eval mode with every quantizer on (its start step passed, its ranges observed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxcompress

from .fixtures import Nested, SeedModel, WithBranchyBlock, seed_input

__all__ = ["ALL_TYPES", "BUILDERS", "Cross", "build", "train_forwards"]

ALL_TYPES = {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "quant_start_step": 2}
PRUNE_QUANT = [{"op_types": ["Conv1d", "Conv2d", "Linear"], "sparsity_per_layer": 0.5, **ALL_TYPES}]


def train_forwards(gm: nn.Module, batches: list[tuple[Any, ...]]) -> nn.Module:
    """A training forward per batch (observers move, steps count), then eval mode."""
    gm.train()
    with torch.no_grad():
        for batch in batches:
            gm(*batch)
    return gm.eval()


class Cross(nn.Module):
    """Cross-attention (query, key and value quantized apart) next to a packed self-attention encoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, kdim=12, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.encoder(q), k, v)[0])


def _seed() -> tuple[nn.Module, nn.Module, tuple[Any, ...]]:
    model = SeedModel()
    gm = fxcompress.compress(model, PRUNE_QUANT)
    return model, train_forwards(gm, [(seed_input(4),) for _ in range(3)]), (seed_input(3),)


def _nested() -> tuple[nn.Module, nn.Module, tuple[Any, ...]]:
    model = Nested()
    gm = fxcompress.compress(model, PRUNE_QUANT)
    return model, train_forwards(gm, [(torch.randn(4, 3, 6, 6),) for _ in range(3)]), (torch.randn(2, 3, 6, 6),)


def _leafy() -> tuple[nn.Module, nn.Module, tuple[Any, ...]]:
    model = WithBranchyBlock()
    gm = fxcompress.compress(model, PRUNE_QUANT)
    batches = [(torch.rand(4, 8) + 1,), (-torch.rand(4, 8) - 1,), (torch.rand(4, 8) + 1,)]  # both branches
    return model, train_forwards(gm, batches), (torch.rand(3, 8) + 0.5,)


def _cross_inputs(n: int) -> tuple[torch.Tensor, ...]:
    return torch.randn(n, 3, 8), torch.randn(n, 5, 12), torch.randn(n, 5, 6)


def _attention() -> tuple[nn.Module, nn.Module, tuple[Any, ...]]:
    model = Cross()
    gm = fxcompress.compress(model, [{"op_types": ["Linear"], "sparsity_per_layer": 0.5, **ALL_TYPES},
                                     {"op_partial_names": ["in_proj"], "sparsity_per_layer": 0.5,
                                      "quant_types": ["input", "weight"], "quant_bits": 8, "quant_start_step": 2}])
    return model, train_forwards(gm, [_cross_inputs(4) for _ in range(3)]), _cross_inputs(2)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, nn.Module, tuple[Any, ...]]]] = {
    "seed": _seed, "nested": _nested, "leaf": _leafy, "attention": _attention,
}


def build(name: str) -> tuple[nn.Module, nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these models should need a warning
        return BUILDERS[name]()
