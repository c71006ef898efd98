"""Masks and steps over training: masks, update_masks, SparsityScheduler, step counter helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from fxcompress.annotations import STEP_COUNTER, LayerPlan, plans_of
from fxcompress.layers import CompressedLayer
from fxcompress.pruning import compute_masks, install_masks, zero_pruned
from fxcompress.quant import StepCounter
from fxcompress.sparsity import schedule_fraction
from fxcompress.taylor import HOW, taylor_importance, taylor_layers

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


def update_masks(gm: torch.fx.GraphModule, fraction: float = 1.0, *, data: Any = None,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Recompute every mask from the current effective weights with the same config.

    Pruned entries count as 0 (SPEC §4), so under a growing ``fraction`` masks only grow; to
    rank the stored weights afresh, compress the original model again.

    Layers pruned with criterion ``'taylor'`` are ranked by |w·grad| instead, which needs gradients:
    pass ``data`` and ``loss_fn`` and the model runs forward and backward over the batches (eval mode,
    no optimizer step, no weight, ``.grad``, buffer or mode changed; see :mod:`fxcompress.taylor`).
    Until that is done they keep every weight and the plan says "waiting for gradients".

    Args:
        gm: a model returned by ``compress``.
        fraction: reach this fraction of each layer's configured sparsity (schedulers use it).
        data: for ``'taylor'`` layers: an iterable of ``(inputs, target)`` batches, a few are enough
            (``itertools.islice(train_loader, 8)``); ``inputs`` a tensor, a tuple of positional inputs
            or a dict of keyword inputs.
        loss_fn: for ``'taylor'`` layers: ``loss_fn(output, target)`` -> scalar tensor
            (``torch.nn.functional.cross_entropy``).
    Returns:
        The new masks (also stored in the model's buffers).
    Raises:
        ValueError: ``'taylor'`` layers without ``data``/``loss_fn`` (at a ``fraction`` above 0), ``data``
            for a model without them, or data that yields no usable gradient (see
            :func:`~fxcompress.taylor.taylor_importance`). Nothing is changed when it is raised.
        ConfigError: unreachable caps.

    >>> update_masks(gm, data=[(x, y)], loss_fn=torch.nn.functional.cross_entropy)  # doctest: +SKIP
    """
    plans = _pruned(gm)
    importance = _taylor_importance(gm, plans, fraction, data, loss_fn)
    with torch.no_grad():
        new = compute_masks(gm, plans, fraction, importance)
        install_masks(gm, new)
    return new


def _taylor_importance(gm: torch.nn.Module, plans: dict[str, LayerPlan], fraction: float, data: Any,
                       loss_fn: Any) -> dict[str, torch.Tensor] | None:
    """The taylor layers' accumulated |w·grad|, or None when no gradients are needed (or none given at fraction 0)."""
    names = taylor_layers(plans)
    given = [k for k, v in (("data", data), ("loss_fn", loss_fn)) if v is not None]
    if not names:
        if given:
            raise ValueError(f"update_masks: {' and '.join(given)} feed criterion 'taylor', which no pruned layer of "
                             "this model uses; drop them (nothing was changed)")
        return None
    if len(given) == 1:
        missing = "loss_fn" if given == ["data"] else "data"
        raise ValueError(f"update_masks: {given[0]}= without {missing}=: criterion 'taylor' needs both; call {HOW} "
                         "(nothing was changed)")
    if fraction <= 0.0:
        return None  # nothing is pruned at fraction 0: every layer keeps every weight, no need to score
    if not given:
        configs = sorted({plans[n].config_index for n in names})
        shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ValueError(f"update_masks: layers {shown} (config_list{configs}) are pruned with criterion 'taylor', "
                         f"which ranks weights by |w·grad| and so needs gradients: call {HOW} (under a schedule: "
                         "SparsityScheduler(gm, ..., data=batches, loss_fn=loss_fn)) (nothing was changed)")
    return taylor_importance(gm, names, data, loss_fn)


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
    With criterion ``'taylor'`` give ``data`` and ``loss_fn`` (as for :func:`update_masks`): every mask
    update scores the layers over those batches again, so ``data`` must be iterable more than once
    (a list, a DataLoader).

    >>> sched = SparsityScheduler(gm, start_step=0, end_step=100, frequency=10)  # doctest: +SKIP
    >>> for batch in data: loss(gm(batch)).backward(); opt.step(); sched.step()  # doctest: +SKIP
    """

    def __init__(self, gm: torch.fx.GraphModule, start_step: int, end_step: int, frequency: int = 1,
                 kind: str = "agp", *, data: Any = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
                 ) -> None:
        if kind not in ("agp", "linear"):
            raise ValueError(f"SparsityScheduler: kind must be 'agp' or 'linear', got {kind!r}")
        if not 0 <= start_step < end_step or frequency < 1:
            raise ValueError(f"SparsityScheduler: need 0 <= start_step < end_step and frequency >= 1, got "
                             f"start_step={start_step}, end_step={end_step}, frequency={frequency}")
        self.gm, self.start, self.end, self.frequency, self.kind = gm, start_step, end_step, frequency, kind
        self.data, self.loss_fn = data, loss_fn
        self.step_count = 0
        self.fraction = schedule_fraction(0, start_step, end_step, kind)
        update_masks(gm, self.fraction, data=data, loss_fn=loss_fn)

    def step(self) -> None:
        """Count one optimizer step; recompute masks when the schedule says so."""
        self.step_count += 1
        due = (self.step_count - self.start) % self.frequency == 0 or self.step_count == self.end
        if self.start <= self.step_count <= self.end and due:
            self.fraction = schedule_fraction(self.step_count, self.start, self.end, self.kind)
            update_masks(self.gm, self.fraction, data=self.data, loss_fn=self.loss_fn)

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
