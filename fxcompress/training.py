"""Masks and steps over training: masks, update_masks, SparsityScheduler, step counter helpers."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxcompress.annotations import STEP_COUNTER, LayerPlan, plans_of
from fxcompress.layers import CompressedLayer
from fxcompress.pruning import compute_masks, install_masks, zero_pruned
from fxcompress.quant import StepCounter
from fxcompress.sparsity import schedule_fraction

__all__ = ["SparsityScheduler", "apply_masks", "attach_optimizer", "get_step", "masks", "set_step", "update_masks"]


def masks(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> bool weight keep-mask (True = kept), for every pruned layer.

    >>> {name: float((~m).float().mean()) for name, m in masks(gm).items()}  # doctest: +SKIP
    {'conv1': 0.5, 'conv2': 0.5}
    """
    return {name: gm.get_submodule(name).weight_mask.bool() for name in _pruned(gm)}


def _pruned(gm: torch.nn.Module) -> dict[str, LayerPlan]:
    """The plans of the layers the model prunes: masks are found through them, never by buffer name."""
    return {n: p for n, p in plans_of(gm).items() if p.prune is not None and p.compressed}


def update_masks(gm: torch.fx.GraphModule, fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """Recompute every mask from the current effective weights with the same config.

    Pruned entries count as 0 (SPEC §4), so under a growing ``fraction`` masks only grow; to
    rank the stored weights afresh, compress the original model again.

    Args:
        gm: a model returned by ``compress``.
        fraction: reach this fraction of each layer's configured sparsity (schedulers use it).
    Returns:
        The new masks (also stored in the model's buffers).
    """
    plans = _pruned(gm)
    with torch.no_grad():
        new = compute_masks(gm, plans, fraction)
        install_masks(gm, new)
    return new


@torch.no_grad()
def apply_masks(gm: torch.nn.Module) -> None:
    """Zero the stored pruned entries of every pruned layer's weight and bias again.

    Cosmetic: the forward multiplies every read by the mask, so a pruned entry never acts even
    when an optimizer whose momentum predates a mask moves it. Zeroing keeps ``state_dict`` sparse.
    A tensor that a module the config does not prune also reads is left as stored.
    """
    zero_pruned(gm, list(_pruned(gm)))


class SparsityScheduler:
    """Gradual pruning, used like an LR scheduler: call ``step()`` after each optimizer step.

    Each layer's target ramps from 0 at ``start_step`` to its configured sparsity at
    ``end_step``; masks are recomputed from the effective weights every ``frequency`` steps, so
    they only grow. ``kind='agp'`` is the cubic schedule of Zhu & Gupta (2017), ``'linear'`` a
    straight ramp. Compress with ``start_dense=True`` so the ramp starts from the dense weights.

    >>> sched = SparsityScheduler(gm, start_step=0, end_step=100, frequency=10)  # doctest: +SKIP
    >>> for batch in data: loss(gm(batch)).backward(); opt.step(); sched.step()  # doctest: +SKIP
    """

    def __init__(self, gm: torch.fx.GraphModule, start_step: int, end_step: int, frequency: int = 1,
                 kind: str = "agp") -> None:
        if kind not in ("agp", "linear"):
            raise ValueError(f"SparsityScheduler: kind must be 'agp' or 'linear', got {kind!r}")
        if not 0 <= start_step < end_step or frequency < 1:
            raise ValueError(f"SparsityScheduler: need 0 <= start_step < end_step and frequency >= 1, got "
                             f"start_step={start_step}, end_step={end_step}, frequency={frequency}")
        self.gm, self.start, self.end, self.frequency, self.kind = gm, start_step, end_step, frequency, kind
        self.step_count = 0
        self.fraction = schedule_fraction(0, start_step, end_step, kind)
        update_masks(gm, self.fraction)

    def step(self) -> None:
        """Count one optimizer step; recompute masks when the schedule says so."""
        self.step_count += 1
        due = (self.step_count - self.start) % self.frequency == 0 or self.step_count == self.end
        if self.start <= self.step_count <= self.end and due:
            self.fraction = schedule_fraction(self.step_count, self.start, self.end, self.kind)
            update_masks(self.gm, self.fraction)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "fraction": self.fraction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.fraction = state["step_count"], state["fraction"]


def _counter(gm: torch.nn.Module) -> torch.nn.Module:
    if not hasattr(gm, STEP_COUNTER):
        raise ValueError("this model has no quantized layer, so it keeps no step counter")
    return getattr(gm, STEP_COUNTER)


def get_step(gm: torch.nn.Module) -> int:
    """Completed training steps recorded in the model."""
    return int(_counter(gm).step)


def set_step(gm: torch.nn.Module, step: int) -> None:
    """Set the completed-step count (e.g. when resuming without the model's state dict)."""
    _counter(gm).step.fill_(int(step))


def attach_optimizer(gm: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Count optimizer steps instead of training forwards (for gradient accumulation).

    Returns:
        The hook handle; ``handle.remove()`` stops counting through this optimizer.
    """
    counter = _counter(gm)
    for module in gm.modules():
        if isinstance(module, (StepCounter, CompressedLayer)):  # the counter and layers inside leaf modules
            module.counts_forwards = False

    def count_step(*_: Any) -> None:
        counter.step.add_(1)

    return optimizer.register_step_post_hook(count_step)
