"""Masks of the pruned layers: computed from the effective weights, installed as buffers, shared by tied layers.

Everything here works on the module tree and the layers' plans; no graph, no buffer found by
its name alone (SPEC §4): a layer's mask is ``<layer>.weight_mask`` because its plan prunes it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.utils.prune

from fxcompress.annotations import LayerPlan
from fxcompress.attention import resolve_layer
from fxcompress.channel_groups import group_record
from fxcompress.errors import ConfigError
from fxcompress.settings import GRADIENT_CRITERIA
from fxcompress.sparsity import global_masks, layer_mask

__all__ = ["check_tied", "check_unclaimed", "compute_masks", "effective_weight", "install_masks", "tied_layers", "zero_pruned"]


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight as the forward uses it: pruned entries count as 0 (detached)."""
    weight = layer.weight.detach()
    mask = getattr(layer, "weight_mask", None)
    return weight if mask is None else weight * mask


def tied_layers(gm: torch.nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Layer name -> the layers in ``names`` that hold the same weight tensor (itself first), for tied ones."""
    by_weight: dict[int, list[str]] = {}
    for name in names:
        by_weight.setdefault(id(resolve_layer(gm, name).weight), []).append(name)
    return {n: group for group in by_weight.values() if len(group) > 1 for n in group}


def check_tied(gm: torch.nn.Module, plans: Mapping[str, LayerPlan]) -> None:
    """One weight shared by two compressed layers needs one setting (SPEC §2.7).

    Raises:
        ConfigError: naming both layers and both settings.
    """
    compressed = [n for n, p in plans.items() if p.compressed]
    for name, group in tied_layers(gm, compressed).items():
        first = plans[group[0]]
        mine = plans[name]
        if (mine.prune, mine.quant) != (first.prune, first.quant):
            raise ConfigError(
                f"layers {group[0]!r} and {name!r} share one weight tensor but get different settings "
                f"(config_list[{first.config_index}] vs config_list[{mine.config_index}]: prune {first.prune} vs "
                f"{mine.prune}, quant {first.quant} vs {mine.quant}); give them one sub-config")


def check_unclaimed(gm: torch.nn.Module, plans: Mapping[str, LayerPlan], previous: Mapping[str, LayerPlan]) -> None:
    """The layers this compress will change must not carry someone else's pruning (SPEC §4).

    Raises:
        ConfigError: a layer pruned with ``torch.nn.utils.prune`` (its ``weight`` is recomputed by a
            hook, so a graph read of it is stale), or one that already holds a ``weight_mask`` /
            ``bias_mask`` that no earlier ``compress`` made.
    """
    for name, plan in plans.items():
        if not plan.compressed:
            continue
        layer = resolve_layer(gm, name)
        if torch.nn.utils.prune.is_pruned(layer):
            raise ConfigError(f"layer {name!r} was pruned with torch.nn.utils.prune (it has weight_orig/weight_mask "
                              "and a forward pre-hook); make that pruning permanent with "
                              f"torch.nn.utils.prune.remove(model.{name}, 'weight') before compressing it")
        old = previous.get(name)
        if plan.prune is not None and (old is None or old.prune is None or not old.compressed):
            for attr in ("weight_mask", "bias_mask"):
                if hasattr(layer, attr):
                    raise ConfigError(f"layer {name!r} already has an attribute {attr!r} that fxcompress did not "
                                      "make; fxcompress stores its mask under that name: rename yours")


def compute_masks(gm: torch.nn.Module, plans: Mapping[str, LayerPlan], fraction: float = 1.0,
                  importance: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool weight keep-masks of the pruned layers in ``plans``, from their effective weights.

    ``total_sparsity`` layers are allocated together per sub-config (the group of layers for
    which that sub-config is the one that applies); layers sharing one weight get one mask.
    When compress recorded dependency groups (``granularity: 'out_channel'`` with example inputs),
    the ``out_channel`` layers get their groups' channel masks instead, and the result also holds
    the masks of the norms over pruned channels (keyed by the norm's name, shaped like its weight).

    ``importance`` holds, per criterion ``'taylor'`` layer, its accumulated |w·grad| (weight-shaped,
    from :func:`fxcompress.taylor.taylor_importance`), which ranks it instead of its weight. A taylor
    layer without one is *waiting for gradients*: it keeps every weight (its group every channel),
    though a ``total_sparsity`` target is still checked, so unreachable caps fail now.

    Raises:
        ConfigError: unreachable caps, or an N:M pattern that does not fit a layer.
    """
    importance = importance or {}
    pruned = [n for n, p in plans.items() if p.prune is not None and p.compressed]
    tied = tied_layers(gm, pruned)
    owners = [n for n in pruned if tied.get(n, [n])[0] == n]
    masks: dict[str, torch.Tensor] = {}
    groups: dict[int, dict[str, torch.Tensor]] = {}
    waiting: set[str] = set()
    record = group_record(gm)
    if record is not None:
        grouped = [n for n in owners if plans[n].prune.granularity == "out_channel"]
        masks.update(record.masks(gm, grouped, fraction, importance))
        owners = [n for n in owners if n not in grouped]
    for name in owners:
        plan = plans[name]
        weight = effective_weight(resolve_layer(gm, name))
        if plan.prune.criterion in GRADIENT_CRITERIA:
            if name not in importance:
                waiting.add(name)
            weight = importance.get(name, torch.zeros_like(weight))
        if plan.prune.total_sparsity is not None:
            groups.setdefault(plan.config_index, {})[name] = weight
        elif name in waiting:
            masks[name] = torch.ones_like(weight, dtype=torch.bool)
        else:
            masks[name] = layer_mask(weight, plan.prune, name, fraction)
    for index, weights in groups.items():
        setting = plans[next(iter(weights))].prune
        masks.update(global_masks(weights, setting, f"config_list[{index}]", fraction))  # checks the caps
    for name in waiting:
        masks[name] = torch.ones_like(masks[name])
    # a tied layer that is not its weight's first holder shares that holder's mask
    return {**masks, **{name: masks[tied[name][0] if name in tied else name] for name in pruned}}


@torch.no_grad()
def install_masks(gm: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Store masks as ``<layer>.weight_mask`` / ``<layer>.bias_mask`` buffers (tied layers share one tensor).

    The buffers hold 1.0 (kept) and 0.0 (pruned) in the weight's dtype: the forward multiplies by
    them, and a same-dtype multiply is several times faster than a bool one on CPU. A bias entry
    is pruned when the whole output row/filter it belongs to is pruned. The stored pruned entries
    are zeroed too, unless a module the config does not prune reads the same tensor.
    """
    shared: dict[int, dict[str, torch.Tensor]] = {}
    for name, mask in masks.items():
        layer = resolve_layer(gm, name)
        key = id(layer.weight)
        if key not in shared:
            dtype, device = layer.weight.dtype, layer.weight.device
            values = {"weight": mask.to(device, dtype)}
            if layer.bias is not None:
                values["bias"] = mask.reshape(mask.shape[0], -1).any(dim=1).to(device, dtype)
            shared[key] = values
        for param, value in shared[key].items():
            current = getattr(layer, f"{param}_mask", None)
            if isinstance(current, torch.Tensor) and f"{param}_mask" in layer._buffers:
                current.copy_(value)
                shared[key][param] = current  # a tied layer shares the tensor already installed
            else:
                layer.register_buffer(f"{param}_mask", value)
    zero_pruned(gm, list(masks))


@torch.no_grad()
def zero_pruned(gm: torch.nn.Module, names: list[str]) -> None:
    """Zero the stored pruned entries of these layers' weights and biases (cosmetic: the forward masks).

    A tensor that a module outside ``names`` also holds (an LM head tied to an embedding) is left
    as stored, since that module reads it unmasked (SPEC §2.6).
    """
    holders: dict[int, set[str]] = {}
    for owner, module in gm.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), set()).add(owner)
    for name in names:
        layer = resolve_layer(gm, name)
        for param in ("weight", "bias"):
            tensor, mask = getattr(layer, param), getattr(layer, f"{param}_mask", None)
            if tensor is not None and mask is not None and holders.get(id(tensor), set()) <= set(names):
                tensor.mul_(mask)
