"""Criterion ``'taylor'``: first-order Taylor importance, |w · ∂L/∂w| of the effective weight, summed over batches.

Molchanov et al. (CVPR 2019) estimate how much the loss changes when a weight goes by the first
term of its Taylor expansion, ``|w · ∂L/∂w|``; NNI's ``TaylorPruner`` and Torch-Pruning's
``TaylorImportance`` rank by it. It needs gradients, so ``compress`` cannot score it from the
weights: a taylor layer keeps every weight ("waiting for gradients" in the plan) until
``fxcompress.update_masks(gm, data=batches, loss_fn=loss_fn)`` runs forward and backward over the
batches (:func:`taylor_importance`) and ranks by the result:

* an element's score is ``Σ_b |w_e · ∂L_b/∂w|`` over the batches ``b`` (per batch, then summed: the
  gradients of two batches do not cancel), ``w_e`` the effective weight (pruned entries 0);
* with ``granularity: 'out_channel'`` a filter's score is the sum of its elements' scores, and a
  dependency group's channel score the sum over the filters of its layers, as for ``l1``;
* pruned entries rank below every kept one, so under a schedule masks only grow even where a
  gradient is exactly 0 (a dead ReLU);
* exact counts and ties (by position) as for the other criteria.

The model runs in eval mode (BatchNorm on its running statistics, no dropout, no quantizer range
update, no step counted), the gradients come from ``torch.autograd.grad`` (no ``.grad`` is written),
and every module's mode and weight's ``requires_grad`` are restored: scoring changes nothing about
the model. Bad data raises ``ValueError`` naming the batch or layer before any mask changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fxcompress.annotations import LayerPlan
from fxcompress.attention import resolve_layer
from fxcompress.channel_groups import group_record
from fxcompress.settings import GRADIENT_CRITERIA

__all__ = ["HOW", "taylor_importance", "taylor_layers", "waiting_layers"]

#: What to call, said by every message about taylor layers that have no gradients yet.
HOW = ("fxcompress.update_masks(gm, data=batches, loss_fn=loss_fn) with a few (inputs, target) batches "
       "(e.g. itertools.islice(train_loader, 8)) and a loss such as torch.nn.functional.cross_entropy")


def taylor_layers(plans: Mapping[str, LayerPlan]) -> list[str]:
    """The compressed layers pruned with a gradient criterion (``'taylor'``), in plan order."""
    return [n for n, p in plans.items()
            if p.compressed and p.prune is not None and p.prune.criterion in GRADIENT_CRITERIA]


def waiting_layers(gm: nn.Module, plans: Mapping[str, LayerPlan],
                   allocated: Mapping[str, Tensor] | None = None) -> set[str]:
    """The taylor layers still waiting for gradients: those of a taylor sub-config none of whose layers
    has a pruned weight yet (masks from the layers' buffers, or ``allocated`` in a dry run).

    Only layers that can prune count: an ``out_channel`` layer whose every dependency group is not
    pruned (blocked, partly selected, ...) keeps its weights for that reason, not for want of gradients.
    A sub-config whose masks are not computed at all (a plain ``plan``) is not waiting: nothing is.
    """
    record = group_record(gm)
    by_config: dict[int | None, list[str]] = {}
    for name in taylor_layers(plans):
        if record is not None and plans[name].prune.granularity == "out_channel" and not any(
                p.prune is not None for p in record.of_layer(name)):
            continue
        by_config.setdefault(plans[name].config_index, []).append(name)
    waiting: set[str] = set()
    for names in by_config.values():
        masks = [_mask(gm, n, allocated) for n in names]
        if any(m is not None for m in masks) and all(m is None or bool(m.all()) for m in masks):
            waiting.update(names)
    return waiting


def _mask(gm: nn.Module, name: str, allocated: Mapping[str, Tensor] | None) -> Tensor | None:
    if allocated is not None and name in allocated:
        return allocated[name].bool()
    try:
        buffer = resolve_layer(gm, name)._buffers.get("weight_mask")
    except AttributeError:
        return None
    return None if buffer is None else buffer.bool()


def taylor_importance(gm: nn.Module, names: Iterable[str], data: Any,
                      loss_fn: Callable[[Any, Any], Tensor]) -> dict[str, Tensor]:
    """Accumulated |w · ∂L/∂w| (float32, weight-shaped) of each named layer's effective weight over ``data``.

    Args:
        gm: a compressed model (GraphModule, or a model compressed at module level).
        names: the layers to score (layers sharing one weight share one score tensor).
        data: an iterable of ``(inputs, target)`` batches, as a DataLoader of ``(x, y)`` yields; ``inputs``
            is a tensor (``gm(x)``), a tuple or list of positional inputs (``gm(*x)``) or a dict of
            keyword inputs (``gm(**x)``). Iterated once.
        loss_fn: ``loss_fn(output, target)`` -> a scalar tensor (``torch.nn.functional.cross_entropy``).
    Returns:
        Layer name -> its scores; pruned entries hold -1 (below every kept entry).
    Raises:
        TypeError: ``loss_fn`` not callable.
        ValueError: ``data`` that is a tensor, empty, or holds a batch that is not an (inputs, target)
            pair; a loss that is not a finite scalar depending on the weights; a layer that gets no
            gradient or scores 0 everywhere. The model is unchanged.
        RuntimeError: called under ``torch.inference_mode()``, where no gradient can be taken.
    """
    names = list(names)
    if not callable(loss_fn):
        raise TypeError(f"update_masks: loss_fn must be callable as loss_fn(output, target) -> scalar tensor, got "
                        f"{type(loss_fn).__name__}; e.g. loss_fn=torch.nn.functional.cross_entropy")
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise ValueError(f"update_masks: data must be an iterable of (inputs, target) batches (a list, a DataLoader), "
                         f"got {type(data).__name__}; e.g. data=[(x, y)]")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("update_masks: criterion 'taylor' needs gradients, which torch.inference_mode() "
                           "disables; call update_masks outside it")
    weights: dict[int, nn.Parameter] = {}
    effective: dict[int, Tensor] = {}  # the weights as the forward uses them (pruned entries 0), fixed while scoring
    for name in names:
        layer = resolve_layer(gm, name)
        if id(layer.weight) not in weights:
            weights[id(layer.weight)] = layer.weight
            mask = layer._buffers.get("weight_mask")
            effective[id(layer.weight)] = layer.weight.detach() * (1 if mask is None else mask)
    params = list(weights.values())
    modes = [(m, m.training) for m in gm.modules()]
    grads = [(p, p.requires_grad) for p in params]
    try:
        gm.eval()
        for p in params:
            p.requires_grad_(True)
        sums, count = _accumulate(gm, params, effective, data, loss_fn)
    finally:
        for m, training in modes:
            m.training = training
        for p, requires in grads:
            p.requires_grad_(requires)
    out: dict[str, Tensor] = {}
    for name in names:
        layer = resolve_layer(gm, name)
        total = sums[id(layer.weight)]
        where = f"layer {name!r}"
        if total is None:
            raise ValueError(f"update_masks: {where} got no gradient from loss_fn over the {count} batch(es): the "
                             "loss does not depend on its output; check loss_fn, or prune the layer with another "
                             "criterion (nothing was changed)")
        if not bool(torch.isfinite(total).all()):
            raise ValueError(f"update_masks: {where}: |w·grad| is not finite over the {count} batch(es) (an inf or "
                             "nan gradient); check the data and loss_fn (nothing was changed)")
        if not bool(total.any()):
            raise ValueError(f"update_masks: {where}: |w·grad| is 0 for every weight over the {count} batch(es) (a "
                             "zero gradient: its output does not change the loss on this data), so it would be "
                             "ranked by position only; use other batches or loss_fn, or another criterion for it "
                             "(nothing was changed)")
        mask = layer._buffers.get("weight_mask")
        out[name] = total if mask is None else torch.where(mask.bool(), total, torch.full_like(total, -1.0))
    return out


def _accumulate(gm: nn.Module, params: list[nn.Parameter], effective: Mapping[int, Tensor], data: Iterable[Any],
                loss_fn: Callable[[Any, Any], Tensor]) -> tuple[dict[int, Tensor | None], int]:
    """Forward and ``autograd.grad`` per batch; per weight the sum over batches of |w_e · grad| (None: no grad)."""
    sums: dict[int, Tensor | None] = {id(p): None for p in params}
    count = 0
    with torch.enable_grad():
        for index, batch in enumerate(data):
            place = f"update_masks: data[{index}]"
            if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
                kind = type(batch).__name__ if not isinstance(batch, (tuple, list)) else f"{len(batch)} items"
                raise ValueError(f"{place}: expected an (inputs, target) pair, as a DataLoader of (x, y) yields, got "
                                 f"{kind}; for a loss without target yield (inputs, None) (nothing was changed)")
            inputs, target = batch
            if isinstance(inputs, Mapping):
                output = gm(**inputs)
            elif isinstance(inputs, (tuple, list)):
                output = gm(*inputs)
            else:
                output = gm(inputs)
            loss = loss_fn(output, target)
            _check_loss(place, loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                score = (effective[id(p)].float() * g.detach().float()).abs()
                sums[id(p)] = score if sums[id(p)] is None else sums[id(p)] + score
            count += 1
    if count == 0:
        raise ValueError("update_masks: data yielded no batch (an iterator already consumed? pass a list or a "
                         "DataLoader, which can be iterated again) (nothing was changed)")
    return sums, count


def _check_loss(place: str, loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{place}: loss_fn returned {got}, expected a scalar tensor; reduce it (e.g. .mean()) "
                         "(nothing was changed)")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"{place}: loss_fn returned {float(loss.detach())}; check the batch and loss_fn (nothing was changed)")
    if not loss.requires_grad:
        raise ValueError(f"{place}: the loss does not depend on the model's weights (it does not require grad: "
                         "computed under torch.no_grad() or detached?) (nothing was changed)")

