"""SPEC §2.8: the compressed model behaves like the original in both modes, whatever mode it was
compressed in, across any number of switches; a mode dependence fxcompress cannot keep is an error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import TraceError

ONES = [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5}]


class DropPath(nn.Module):
    """timm's shape: a Python branch on self.training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.p
        return x * keep / (1 - self.p)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: F.batch_norm with training decided in Python, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return F.relu(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = BatchNormAct(4)
        self.drop = DropPath(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.training:  # a block's own branch
            y = y * 0.5
        return x + self.drop(y)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def all_ones(gm: nn.Module) -> None:
    for mask in fxcompress.masks(gm):
        layer = gm.get_submodule(mask)
        layer.weight_mask.fill_(1.0)
        if hasattr(layer, "bias_mask"):
            layer.bias_mask.fill_(1.0)


@pytest.mark.parametrize("compress_mode", ["train", "eval"])
def test_both_modes_match_the_original_across_switches(compress_mode: str) -> None:
    torch.manual_seed(0)
    model = Net().train(compress_mode == "train")
    gm = fxcompress.compress(model, ONES, start_dense=True)
    assert sorted(fxcompress.masks(gm)) == ["blocks.0.conv", "blocks.1.conv", "head", "stem"]
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    for mode in ["eval", "train", "eval", "train"]:
        for m in (gm, reference):
            m.train(mode == "train")
        torch.manual_seed(1)
        got = gm(x)
        torch.manual_seed(1)
        want = reference(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gm.blocks[0].bn.running_mean, reference.blocks[0].bn.running_mean)
        assert int(gm.blocks[1].bn.num_batches_tracked) == int(reference.blocks[1].bn.num_batches_tracked)
    assert int(reference.blocks[0].bn.num_batches_tracked) == 2  # the train forwards did update statistics


def test_mode_dependent_modules_become_leaves_and_their_layers_are_still_compressed() -> None:
    gm = fxcompress.compress(Net(), ONES)
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"blocks.0", "blocks.1"} <= calls  # the block with its own branch is kept whole
    rows = {r.name: r.site for r in fxcompress.report(gm)}
    assert rows == {"stem": "graph", "blocks.0.conv": "in leaf blocks.0", "blocks.1.conv": "in leaf blocks.1",
                    "head": "graph"}


def test_mode_dependence_of_the_top_level_forward_compresses_at_module_level() -> None:
    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * (2.0 if self.training else 1.0)

    with pytest.warns(UserWarning, match=r"the top-level forward of Top computes a different graph in train and "
                                         r"eval mode \(it reads self.training\)\. Top is compressed at module level"):
        gm = fxcompress.compress(Top().eval(), ONES)
    x = torch.ones(1, 2)
    ref = gm.fc.weight.sum(1) + gm.fc.bias  # all-ones masks: the plain layer
    assert torch.allclose(gm(x), ref)
    assert torch.allclose(gm.train()(x), 2 * ref)
    with pytest.raises(TraceError, match=r"the top-level forward of Top computes a different graph in train and "
                                         r"eval mode"):
        fxcompress.trace(Top(), fallback=False)


def test_submodule_modes_are_restored_after_tracing() -> None:
    model = Net().train()
    model.blocks[0].bn.eval()  # a frozen BatchNorm inside a training model
    fxcompress.compress(model, ONES, inplace=True)
    assert model.training and not model.blocks[0].bn.training and model.blocks[1].bn.training


def test_a_mode_flag_passed_as_an_argument_is_read_at_run_time() -> None:
    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.fc(x), 0.5, self.training)  # as timm and torchvision's Swin write it

    model = FunctionalDropout()
    gm = fxcompress.compress(model, ONES, start_dense=True)
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("training")] == ["training"]
    assert fxcompress.report(gm)[0].site == "graph"  # no leaf was needed
    x = torch.randn(16, 8)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x))
    torch.manual_seed(0)
    got = gm.train()(x)
    torch.manual_seed(0)
    torch.testing.assert_close(got, model.train()(x))
    assert int((got == 0).sum()) > 0  # dropout really ran in train mode
