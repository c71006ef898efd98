"""Tracing fallback to leaf modules, checkpoints, deepcopy and pickle."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import ConfigError
from fxcompress.layers import CompressedLayer

from .fixtures import DataDependentBlock, SeedModel, WithBranchyBlock, masked_reference, seed_input

PRUNE = [{"op_types": ["default"], "sparsity_per_layer": 0.5}]


def test_untraceable_block_falls_back_to_a_leaf_and_is_still_compressed() -> None:
    torch.manual_seed(0)
    model = WithBranchyBlock()
    gm = fxcompress.compress(model, PRUNE)
    assert "block" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert isinstance(gm.block.fc, CompressedLayer) and isinstance(gm.block.conv, CompressedLayer)
    assert not isinstance(model.block.fc, CompressedLayer)  # the user's model is untouched
    rows = {r.name: r for r in fxcompress.report(gm)}
    assert {n: r.site for n, r in rows.items()} == {"stem": "graph", "block.fc": "in leaf block",
                                                    "block.conv": "in leaf block", "head": "graph"}
    assert {n: r.pruned for n, r in rows.items()} == {"stem": 32, "block.fc": 32, "block.conv": 1, "head": 12}
    ref = masked_reference(model, fxcompress.masks(gm))
    for sign in (1.0, -1.0):  # both branches of the data-dependent block
        x = sign * torch.rand(4, 8) + sign
        torch.testing.assert_close(gm(x), ref(x))
    assert "block.fc.weight_mask" in gm.state_dict()


def test_failed_compress_leaves_an_inplace_model_with_leaves_untouched() -> None:
    model = WithBranchyBlock()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="asks for"):
        fxcompress.compress(model, [{"op_types": ["Linear"], "total_sparsity": 0.9, "max_sparsity_per_layer": 0.5}],
                            inplace=True)
    assert type(model.block.fc) is nn.Linear and not hasattr(model.stem, "weight_mask")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_user_leaf_modules_are_compressed_inside() -> None:
    torch.manual_seed(0)
    model = SeedModel()
    gm = fxcompress.compress(model, PRUNE, leaf_modules=["fc1"])  # a compressible leaf is just itself
    assert fxcompress.report(gm)[2].site == "graph"
    outer = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    gm = fxcompress.compress(outer, PRUNE, leaf_modules=[nn.Sequential])
    sites = {r.name: r.site for r in fxcompress.report(gm)}
    assert sites == {"0": "graph", "1.0": "in leaf 1"}
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), masked_reference(outer, fxcompress.masks(gm))(x))


class BlockFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DataDependentBlock()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_quantization_inside_a_leaf_follows_the_same_gate() -> None:
    torch.manual_seed(0)
    cfg = [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 4, "quant_start_step": 2}]
    gm = fxcompress.compress(BlockFirst(), cfg)
    x = torch.rand(4, 8) + 0.1  # positive: the block takes its Linear branch
    outputs = {}
    gm.block.register_forward_hook(lambda m, i, o: outputs.update(o=o))
    seen = []
    for _ in range(4):
        gm(x)
        seen.append(torch.equal(outputs["o"], F.relu(F.linear(x, gm.block.fc.weight, gm.block.fc.bias))))
    assert seen == [True, True, False, False]
    assert fxcompress.get_step(gm) == 4


def test_deepcopy_and_pickle_keep_everything() -> None:
    cfg = [{"op_types": ["default"], "sparsity_per_layer": 0.5, "quant_types": ["input", "weight"],
            "quant_bits": 8}]
    gm = fxcompress.compress(WithBranchyBlock(), cfg)
    gm.train()
    x = torch.rand(4, 8)
    gm(x)
    gm.eval()
    expected = gm(x)
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        torch.testing.assert_close(clone(x), expected)
        assert [r.name for r in fxcompress.report(clone)] == ["stem", "block.fc", "block.conv", "head"]
        assert fxcompress.get_step(clone) == 1
        assert all(torch.equal(m, fxcompress.masks(gm)[n]) for n, m in fxcompress.masks(clone).items())
        # the leaf layers still share the model's step counter after copying
        assert clone.block.fc.step.data_ptr() == clone.fxcompress_step.step.data_ptr()


def test_checkpoint_into_fresh_model_restores_masks_ranges_and_step() -> None:
    cfg = [{"op_types": ["default"], "total_sparsity": 0.6, "quant_types": ["input", "weight", "output"],
            "quant_bits": 8, "quant_start_step": 1}]
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), cfg)
    with torch.no_grad():
        gm.fc1.weight.mul_(-1.5)
    fxcompress.update_masks(gm)
    gm.train()
    for _ in range(3):
        gm(seed_input(4))
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    buffer.seek(0)
    fresh = fxcompress.compress(SeedModel(), cfg)
    fresh.load_state_dict(torch.load(buffer))
    assert fxcompress.get_step(fresh) == 3
    for name, buf in gm.state_dict().items():
        if isinstance(buf, torch.Tensor):
            assert torch.equal(fresh.state_dict()[name], buf), name
    gm.eval(), fresh.eval()
    torch.testing.assert_close(fresh(seed_input()), gm(seed_input()))


def test_checkpoint_from_another_config_is_refused_before_loading() -> None:
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["default"], "sparsity_per_layer": 0.5}])
    state = gm.state_dict()
    other = fxcompress.compress(SeedModel(), [{"op_types": ["default"], "sparsity_per_layer": 0.8}])
    before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ConfigError, match=r"checkpoint was made with a different compression config; layer 'conv1': "
                                          r"checkpoint prune=PruneSetting\(sparsity_per_layer=0.5.*this model "
                                          r"prune=PruneSetting\(sparsity_per_layer=0.8"):
        other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    quant = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"],
                                               "quant_bits": 8}])
    with pytest.raises(ConfigError, match=r"layer 'conv1': checkpoint prune=.*this model prune=None, quant=QuantPlan"):
        quant.load_state_dict(state, strict=False)


class PaddedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect")
        self.plain = nn.Conv2d(3, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.plain(self.same(x))
        return self.plain(self.same(-x))


def test_leaf_layers_script_and_match_the_reference_with_padding_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PaddedBlock(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    gm = fxcompress.compress(model, PRUNE)
    assert [r.site for r in fxcompress.report(gm)] == ["in leaf 0", "in leaf 0", "graph"]
    x = torch.rand(2, 2, 6, 6)
    torch.testing.assert_close(gm(x), masked_reference(model, fxcompress.masks(gm))(x))
    quantized = fxcompress.compress(WithBranchyBlock(), [{**PRUNE[0], "quant_types": ["input", "weight", "output"],
                                                          "quant_bits": 8}])
    quantized.train()
    quantized(torch.rand(4, 8))
    quantized.eval()
    scripted = torch.jit.script(quantized)
    for v in (torch.rand(3, 8), -torch.rand(3, 8)):
        torch.testing.assert_close(scripted(v), quantized(v))
