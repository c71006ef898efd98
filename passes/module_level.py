"""Module-level compression, for a model whose top-level forward torch.fx cannot trace.

Hugging Face ``transformers`` models are the common case: their forwards take ``**kwargs``
behind decorators, unpack tensor shapes into Python tuples and branch on which optional
arguments were given, so no one fx graph stands for them (and transformers 5 has no fx tracer
of its own). Rather than refuse, :func:`plan_modules` and :func:`rewrite_modules` compress such a
model as layers inside a leaf module are compressed: the result is a copy of the model, of the
model's own class, running the model's own forward, in which every compressed layer is a
:class:`~fxcompress.layers.CompressedLayer` (masks, quantizers) and every ``nn.MultiheadAttention``
a :class:`~fxcompress.attention.CompressedAttention`. The model keeps every method (``generate``,
``config``, keyword arguments, its output classes); both modes switch as in the original, since
nothing was traced and so nothing was baked in; a forward pre-hook on the model counts training
steps for ``quant_start_step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxcompress.annotations import STEP_COUNTER, LayerPlan
from fxcompress.attention import CompressedAttention, layers_inside, replace_attention, resolve_layer
from fxcompress.layers import CompressedLayer
from fxcompress.passes.annotate import inside_plan, merged_plan, plan_for, read_by_parent
from fxcompress.passes.quantize import add_quantizers
from fxcompress.pruning import compute_masks, install_masks
from fxcompress.quant import StepCounter
from fxcompress.settings import SubConfig

__all__ = ["MODULE_LEVEL", "count_step", "mark_module_level", "module_level_reason", "pending_module_masks", "plan_modules",
           "rewrite_modules"]

#: ``LayerPlan.leaf`` of a layer of a model compressed at module level (the whole model is the "leaf").
MODULE_LEVEL = ""
_REASON = "_fxcompress_module_level"


def module_level_reason(model: nn.Module) -> str | None:
    """Why ``model`` was compressed at module level (the trace failure), or None when it was traced."""
    reason = getattr(model, _REASON, None)
    return reason if isinstance(reason, str) else None


def plan_modules(model: nn.Module, subs: Sequence[SubConfig], previous: Mapping[str, LayerPlan]
                 ) -> dict[str, LayerPlan]:
    """The plans of the layers in ``model``'s tree that a sub-config selects (``leaf=""``, all ``used``).

    Nothing was traced, so whether the forward uses a layer is unknown: every selected layer is
    compressed. A layer whose parent's forward reads its weight's values directly is ``blocked``
    with the reason (a swapped-in module cannot intercept that read).

    Args:
        model: the model's copy; not changed here.
        subs: the parsed config list.
        previous: an earlier compress's plans of this model (merged, SPEC §2.9).
    Raises:
        ConfigError: a selected layer subclass with its own forward; a conflicting recompress.
    """
    plans = {}
    for name, module, why, in_proj in layers_inside(model):
        plan = merged_plan(previous.get(name), plan_for(subs, name, module, leaf=MODULE_LEVEL))
        if plan is not None:
            plans[name] = inside_plan(plan, module, why or read_by_parent(model, name), in_proj)
    return plans


def mark_module_level(model: nn.Module, reason: str) -> None:
    """Record on the model that it is compressed at module level, and why (the trace failure)."""
    setattr(model, _REASON, reason)


def pending_module_masks(model: nn.Module, plans: Mapping[str, LayerPlan], fraction: float
                         ) -> dict[str, torch.Tensor]:
    """The masks of the pruned layers that hold none yet; the final target is checked whatever ``fraction``."""
    todo = {n: p for n, p in plans.items()
            if p.prune is not None and p.compressed and "weight_mask" not in resolve_layer(model, n)._buffers}
    masks = compute_masks(model, todo, 1.0)
    return masks if fraction >= 1.0 else compute_masks(model, todo, fraction)


def rewrite_modules(model: nn.Module, plans: Mapping[str, LayerPlan], masks: Mapping[str, torch.Tensor]) -> None:
    """Swap the compressed layers for CompressedLayers, install ``masks``, add quantizers and the step counter.

    Args:
        model: the planned copy; edited in place.
        plans: from :func:`plan_modules`.
        masks: from :func:`pending_module_masks` (computed first, so a bad target fails before any change).
    """
    compressed = {n: p for n, p in plans.items() if p.compressed}
    if not compressed:
        return
    replace_attention(model, "")  # torch's attention reads its weights itself, also on its fast paths
    for name in compressed:
        layer = model.get_submodule(name)
        if not isinstance(layer, CompressedLayer):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, CompressedLayer(layer))
    install_masks(model, masks)
    quantized = [n for n, p in compressed.items() if p.quant is not None]
    for name in quantized:
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        layer = model.get_submodule(name)
        add_quantizers(layer, plans[name], isinstance(owner, CompressedAttention) and owner.in_proj is layer)
    if quantized and not isinstance(getattr(model, STEP_COUNTER, None), StepCounter):
        model.add_module(STEP_COUNTER, StepCounter(next(model.parameters()).device).train(model.training))
        model.register_forward_pre_hook(count_step)
    counter = getattr(model, STEP_COUNTER, None)
    for module in model.modules() if counter is not None else ():
        if isinstance(module, CompressedLayer) and not hasattr(module, "step"):
            module.attach_step(counter.step)


def count_step(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of a module-level model: one training forward is one step (SPEC §5)."""
    getattr(model, STEP_COUNTER)()
