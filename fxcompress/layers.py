"""Module-level stand-in for a layer inside a leaf module the tracer could not enter.

It owns the layer's parameters under the layer's own name, so masks and quantizers get the
same state-dict keys as in a graph-rewritten layer (``blocks.0.fc.weight_mask``), and computes
exactly what the graph rewrite computes. Never imports torch.fx.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxcompress.errors import ConfigError
from fxcompress.layer_types import compressible_base, type_names_of
from fxcompress.masking import masked_bias, masked_weight

__all__ = ["CompressedLayer", "CompressionRecord"]


class CompressedLayer(nn.Module):
    """A Conv1d/2d/3d or Linear whose forward applies its masks and fake-quant modules.

    Masks (``weight_mask``/``bias_mask`` buffers) and quantizers (``input_quantizer``, ...)
    are attached later by the pruning and quantization passes, as for graph-rewritten layers.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.type_names = type_names_of(layer)
        base = compressible_base(layer)
        assert base is not None, "only Conv1d/2d/3d and Linear layers are wrapped"
        self.compressed_base = base.__name__
        self.weight = layer.weight
        self.bias = layer.bias
        self.conv_dims = 0 if isinstance(layer, nn.Linear) else layer.weight.dim() - 2
        # int lists, never empty, so TorchScript infers List[int] (Linear leaves them unused)
        self.stride = list(getattr(layer, "stride", (1,)))
        self.dilation = list(getattr(layer, "dilation", (1,)))
        self.groups = getattr(layer, "groups", 1)
        mode = getattr(layer, "padding_mode", "zeros")
        padding = getattr(layer, "padding", (0,))
        # 'same'/'valid' and non-zero padding modes: pad explicitly, as nn.ConvNd does for the latter
        self.explicit_pad = isinstance(padding, str) or mode != "zeros"
        self.padding = [0] * max(self.conv_dims, 1) if self.explicit_pad else list(padding)
        self.pad = list(layer._reversed_padding_repeated_twice) if self.explicit_pad else [0, 0]
        self.pad_mode = "constant" if mode == "zeros" else mode
        self.counts_forwards = True
        self.train(layer.training)

    def attach_step(self, step: Tensor) -> None:
        """Share the model's step counter tensor (the same tensor, under this layer's name)."""
        self.register_buffer("step", step, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        done = self.done_steps()
        if hasattr(self, "input_quantizer"):
            x = self.input_quantizer(x, done)
        weight, bias = self.compressed_params(done)
        y = self._op(x, weight, bias)
        if hasattr(self, "output_quantizer"):
            y = self.output_quantizer(y, done)
        return y

    def done_steps(self) -> Tensor:
        """Training steps completed before this forward (the model's counter already counted it)."""
        if hasattr(self, "step"):
            return self.step - int(self.training and self.counts_forwards)
        return torch.zeros((), dtype=torch.int64)

    def compressed_params(self, done: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weight and bias as the forward uses them: masked, then the weight fake-quantized."""
        weight, bias = self.weight, self.bias
        if hasattr(self, "weight_mask"):
            weight = masked_weight(weight, self.weight_mask)
            if bias is not None:
                bias = masked_bias(bias, self.bias_mask)
        if hasattr(self, "weight_quantizer"):
            weight = self.weight_quantizer(weight, done)
        return weight, bias

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.conv_dims == 0:
            return F.linear(x, weight, bias)
        if self.explicit_pad:
            x = F.pad(x, self.pad, mode=self.pad_mode)
        if self.conv_dims == 1:
            return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.conv_dims == 2:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.type_names[0]}, weight={tuple(self.weight.shape)}"


class CompressionRecord(nn.Module):
    """What the config decided, kept in the module tree: survives pickling, guards checkpoints.

    Its extra state (``fxcompress_record._extra_state``) is a fingerprint of every layer's
    plan; loading a state dict made under a different config raises before anything loads.
    """

    def __init__(self, plans: dict[str, object]) -> None:
        super().__init__()
        self.plans = dict(plans)

    def fingerprint(self) -> dict[str, str]:
        return {name: f"prune={p.prune!r}, quant={p.quant!r}" for name, p in self.plans.items()
                if p.compressed}

    def get_extra_state(self) -> dict[str, dict[str, str]]:
        return {"layers": self.fingerprint()}

    def set_extra_state(self, state: dict[str, dict[str, str]]) -> None:
        mine, theirs = self.fingerprint(), state["layers"]
        if mine == theirs:
            return
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                raise ConfigError(
                    f"load_state_dict: the checkpoint was made with a different compression config; layer "
                    f"{name!r}: checkpoint {theirs.get(name, 'not compressed')}, this model "
                    f"{mine.get(name, 'not compressed')}. Compress the model with the checkpoint's config_list "
                    "before loading (nothing was loaded)")
