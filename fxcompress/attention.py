"""``nn.MultiheadAttention`` as two compressible Linear layers, ``<attn>.in_proj`` and ``<attn>.out_proj``.

torch's attention never calls its projections as modules: ``F.multi_head_attention_forward``
reads ``in_proj_weight`` and ``out_proj.weight`` directly, and in eval under ``no_grad`` the fused
fast paths of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` read the raw weights in
C++. :class:`CompressedAttention` stands in for such a module (SPEC §2.6): it owns the same
parameters, passes the masked / fake-quantized weights to ``F.multi_head_attention_forward``
with ``training=self.training`` (dropout follows the mode), quantizes query / key / value with
one quantizer per distinct tensor, and makes the out-projection's input visible for its input
quantizer. It reports ``_qkv_same_embed_dim = False`` so that the fast paths of enclosing
``nn.Transformer*`` layers, which check that flag, are never taken. Never imports torch.fx.

Separate q/k/v weights (``kdim``/``vdim`` != ``embed_dim``: ``q_proj_weight`` ``(E, E)``,
``k_proj_weight`` ``(E, kdim)``, ``v_proj_weight`` ``(E, vdim)``) are still the one layer
``<attn>.in_proj`` (SPEC §2.6), so its sparsity is counted over all three together. Its weight is
the three side by side, ``[q | k | v]`` of shape ``(E, E + kdim + vdim)``: rows of different
widths cannot be stacked into one tensor, columns can. Row ``j`` of the layer is the ``j``-th
output of q, k and v together, which is what ``granularity: 'out_channel'``, the bias rule of
SPEC §4 and per-channel weight quantization see: ``out_channel`` prunes ``q_j``, ``k_j`` and
``v_j`` together (with their three bias entries) and per-channel schemes give ``E`` scales
(the packed layer, ``(3E, E)``, has ``3E`` rows). The bias is stored as ``(3, E)`` (``[b_q; b_k;
b_v]``) so that its ``(E,)`` mask broadcasts over the three parts. The state-dict keys are
``<attn>.in_proj.weight`` / ``<attn>.in_proj.bias`` as for the packed layer; a plain
``nn.MultiheadAttention`` state dict (``q_proj_weight``, ... , ``in_proj_bias``) still loads.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxcompress.layer_types import compressible_base
from fxcompress.layers import CompressedLayer

__all__ = ["CompressedAttention", "layers_inside", "replace_attention", "resolve_layer"]


def resolve_layer(root: nn.Module, name: str) -> nn.Module:
    """The module of layer ``name``; ``<a>.in_proj`` of a not yet rewritten ``nn.MultiheadAttention``
    is a stand-in Linear over its in-projection (what masks are computed from)."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        owner, _, part = name.rpartition(".")
        attention = root.get_submodule(owner) if owner else root
        if part == "in_proj" and isinstance(attention, nn.MultiheadAttention):
            return _in_projection(attention)
        raise


def layers_inside(module: nn.Module) -> list[tuple[str, nn.Module, str | None, bool]]:
    """The compressible layers in a module's tree: ``(relative name, module, why not or None, is an in_proj)``.

    An ``nn.MultiheadAttention`` ``a`` contributes ``a.in_proj`` (a stand-in Linear over its packed
    ``in_proj_weight``, or over its q/k/v weights side by side) besides its ``a.out_proj``.
    """
    out = []
    for name, m in module.named_modules():
        if name and compressible_base(m) is not None:
            out.append((name, m, None, False))
        if isinstance(m, nn.MultiheadAttention):
            out.append((f"{name}.in_proj" if name else "in_proj", _in_projection(m), None, True))
    return out


def replace_attention(root: nn.Module, under: str) -> None:
    """Swap every ``nn.MultiheadAttention`` at or inside ``root``'s module ``under`` for a
    CompressedAttention over the same parameters."""
    for name, m in list(root.get_submodule(under).named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            full = f"{under}.{name}" if name else under
            parent, _, attr = full.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, CompressedAttention(m))


def _projection_shell(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding the in-projection's own parameters (no copy)."""
    shell = nn.Linear(1, 1, bias=False)
    shell.in_features, shell.out_features = weight.shape[1], weight.shape[0]
    shell.weight = weight
    shell.bias = bias
    return shell


# nn.MultiheadAttention with separate q/k/v -> (the parameters' identities and versions, the stand-in)
_SEPARATE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], nn.Linear]] = weakref.WeakKeyDictionary()


def _in_projection(mha: nn.MultiheadAttention) -> nn.Linear:
    """The stand-in Linear of an attention's in-projection.

    Separate q/k/v weights are joined into new parameters ``[q | k | v]`` and ``(3, E)`` bias; the
    stand-in is kept while they are unchanged, because tied-weight detection and mask sharing tell
    layers apart by the identity of their weight tensor (a fresh join per call could reuse the
    address of a freed one).
    """
    if mha._qkv_same_embed_dim:
        return _projection_shell(mha.in_proj_weight, mha.in_proj_bias)
    parts = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.in_proj_bias)
    key = tuple(None if p is None else (id(p), p._version) for p in parts)
    cached = _SEPARATE.get(mha)
    if cached is None or cached[0] != key:
        grad = mha.q_proj_weight.requires_grad
        weight = nn.Parameter(torch.cat(parts[:3], dim=1).detach(), requires_grad=grad)
        bias = None if parts[3] is None else nn.Parameter(parts[3].detach().reshape(3, -1).clone(),
                                                          requires_grad=grad)
        cached = _SEPARATE[mha] = (key, _projection_shell(weight, bias))
    return cached[1]


class CompressedAttention(nn.Module):
    """Multi-head attention whose in- and out-projection weights pass their masks and quantizers."""

    _qkv_same_embed_dim = False  # keeps nn.Transformer* fast paths (raw weight reads) off

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, mha.dropout
        self.batch_first, self.add_zero_attn = mha.batch_first, mha.add_zero_attn
        self.head_dim = mha.head_dim
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        # separate q/k/v: the widths of q, k and v in the joined weight [q | k | v]; empty when packed
        self.qkv_widths = [] if mha._qkv_same_embed_dim else [mha.embed_dim, mha.kdim, mha.vdim]
        self.in_proj = CompressedLayer(_in_projection(mha))
        self.in_proj.type_names = ("Linear",)
        out = mha.out_proj
        self.out_proj = out if isinstance(out, CompressedLayer) else CompressedLayer(out)
        self.counts_forwards = True
        self._register_load_state_dict_pre_hook(_rename_packed_keys)
        self.train(mha.training)

    @property
    def in_proj_weight(self) -> Tensor | None:
        return None if self.qkv_widths else self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        bias = self.in_proj.bias
        return None if bias is None else bias.reshape(-1)

    def attach_step(self, step: Tensor) -> None:
        """Share the model's step counter with both projections."""
        self.in_proj.attach_step(step)
        self.out_proj.attach_step(step)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        done = self.in_proj.done_steps()
        query, key, value = self._quantized_inputs(query, key, value, done)
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = _seq_first(query, key, value)
        in_weight, in_bias = self.in_proj.compressed_params(done)
        out_weight, out_bias = self.out_proj.compressed_params(done)
        project_out = not hasattr(self.out_proj, "input_quantizer")
        if not project_out:  # the attention's own output is the out-projection's input: keep it visible
            out_weight, out_bias = torch.eye(self.embed_dim, dtype=in_weight.dtype, device=in_weight.device), None
        separate = len(self.qkv_widths) == 3
        q_weight, k_weight, v_weight = in_weight, in_weight, in_weight  # read only when separate
        if separate:  # [q | k | v] side by side, the bias (3, E)
            q_weight, k_weight, v_weight = in_weight.split(self.qkv_widths, dim=1)
            in_bias = None if in_bias is None else in_bias.reshape(-1)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_weight, in_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, out_weight, out_bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=separate, q_proj_weight=q_weight, k_proj_weight=k_weight,
            v_proj_weight=v_weight, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not project_out:
            out = self.out_proj(out)
        elif hasattr(self.out_proj, "output_quantizer"):
            out = self.out_proj.output_quantizer(out, done)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _quantized_inputs(self, query: Tensor, key: Tensor, value: Tensor, done: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """One input quantizer per distinct tensor: self-attention keeps ``query is key is value``."""
        if not hasattr(self.in_proj, "input_quantizer"):
            return query, key, value
        q = self.in_proj.input_quantizer(query, done)
        k = q if key is query else self.in_proj.key_input_quantizer(key, done)
        v = k if value is key else (q if value is query else self.in_proj.value_input_quantizer(value, done))
        return q, k, v

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _seq_first(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-first to sequence-first, keeping ``query is key`` / ``key is value`` as nn.MultiheadAttention does."""
    if key is value:
        if query is key:
            query = query.transpose(1, 0)
            return query, query, query
        query, key = query.transpose(1, 0), key.transpose(1, 0)
        return query, key, key
    return query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)


def _rename_packed_keys(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load an ``nn.MultiheadAttention`` state dict: ``in_proj_weight`` is now ``in_proj.weight``;
    separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` are joined into it side by side
    and their ``in_proj_bias`` is reshaped to ``(3, E)``."""
    separate = tuple(prefix + k for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    if all(k in state for k in separate) and prefix + "in_proj.weight" not in state:
        state[prefix + "in_proj.weight"] = torch.cat([state.pop(k) for k in separate], dim=1)
        if prefix + "in_proj_bias" in state:
            state[prefix + "in_proj.bias"] = state.pop(prefix + "in_proj_bias").reshape(3, -1)
    for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
        if prefix + old in state and prefix + new not in state:
            state[prefix + new] = state.pop(prefix + old)
