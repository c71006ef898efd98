"""The plan table and calibration export, built from annotations and module state only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tabulate
import torch
import torch.fx

from fxcompress.annotations import LayerPlan, plans_of
from fxcompress.attention import resolve_layer
from fxcompress.group_report import group_column, group_table
from fxcompress.settings import QuantSetting
from fxcompress.taylor import waiting_layers

__all__ = ["LayerRow", "calibration", "report", "summary"]


@dataclass(frozen=True)
class LayerRow:
    """One layer of the plan table."""

    name: str
    type_name: str
    site: str
    params: int
    config_index: int | None
    overridden: tuple[int, ...]
    excluded: bool
    target: str
    achieved_sparsity: float | None
    pruned: int | None
    quant: str
    start_step: int | None
    ranges: str
    group: str = ""  # the dependency groups it makes channels of (out_channel with example inputs)


def report(gm: torch.fx.GraphModule, allocated: Mapping[str, torch.Tensor] | None = None) -> list[LayerRow]:
    """One row per annotated layer, in graph order.

    Args:
        gm: a model returned by ``compress`` or ``plan``.
        allocated: keep-masks computed but not installed (a dry run: ``compute_masks`` on a
            ``plan``): a pruned layer without a ``weight_mask`` counts its pruned weights from these.

    >>> [r.name for r in report(gm)]  # doctest: +SKIP
    ['conv1', 'conv2', 'fc1']
    """
    plans = plans_of(gm)
    waiting = waiting_layers(gm, plans, allocated)
    return [_row(gm, plan, (allocated or {}).get(plan.name), plan.name in waiting) for plan in plans.values()]


def _row(gm: torch.nn.Module, plan: LayerPlan, allocated: torch.Tensor | None = None,
         waiting: bool = False) -> LayerRow:
    layer = _module_or_none(gm, plan.name) if plan.used else None
    params = 0 if layer is None else layer.weight.numel()
    mask = getattr(layer, "weight_mask", None) if plan.compressed and plan.prune is not None else None
    if mask is None and plan.compressed and plan.prune is not None:
        mask = allocated
    pruned = None if mask is None else int(params - int(mask.sum()))
    q = plan.quant
    quant = "" if q is None else ", ".join(_quant_text(t, getattr(q, t)) for t in q.types)
    ranges = []
    for kind in ("input", "output"):
        quantizer = getattr(layer, f"{kind}_quantizer", None) if plan.compressed else None
        if quantizer is not None and bool(quantizer.initialized):
            ranges.append(f"{kind} [{float(quantizer.tracked_min):.4g}, {float(quantizer.tracked_max):.4g}]")
        elif quantizer is not None:
            ranges.append(f"{kind} not observed")
    site = _site(plan)
    return LayerRow(name=plan.name, type_name=plan.type_name, site=site, params=params, config_index=plan.config_index,
                    overridden=plan.overridden, excluded=plan.excluded, target=_target(plan, waiting),
                    achieved_sparsity=None if pruned is None else pruned / params, pruned=pruned, quant=quant,
                    start_step=None if q is None else q.start_step, ranges="; ".join(ranges),
                    group=group_column(gm, plan.name))


def _module_or_none(gm: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return resolve_layer(gm, name)
    except AttributeError:  # a layer the forward never uses is not kept in the traced module
        return None


def _site(plan: LayerPlan) -> str:
    if not plan.used:
        return "unused"
    if plan.blocked is not None:
        return "not compressed (see plan.blocked)"
    site = "graph" if plan.leaf is None else f"in leaf {plan.leaf}" if plan.leaf else "module level"
    if plan.folds_bn is not None:
        site += f", folds {plan.folds_bn}"
    if plan.unreachable and plan.quant is not None and plan.quant.input is not None:
        site += f" (weight only at {len(plan.unreachable)} read(s))"
    return site


def _quant_text(kind: str, s: QuantSetting) -> str:
    scheme = ("ch-" if s.per_channel else "") + ("sym" if s.symmetric else "aff")
    return f"{kind} {s.dtype}{s.bits} {scheme}"


def _target(plan: LayerPlan, waiting: bool = False) -> str:
    """The ``target`` column; a ``'taylor'`` layer not scored yet says it waits for gradients."""
    text = _setting_text(plan)
    return text.removesuffix(" (taylor)") + " (taylor: waiting for gradients)" if waiting else text


def _setting_text(plan: LayerPlan) -> str:
    p = plan.prune
    if plan.excluded:
        return "excluded"
    if p is None:
        return ""
    if p.n_m is not None:
        return f"{p.granularity} ({p.criterion})"
    if p.total_sparsity is not None:
        cap = p.cap_for(plan.name)
        return f"total {p.total_sparsity:g}" + (f" (cap {cap:g})" if cap is not None else "")
    extra = "" if p.granularity == "element" else f" {p.granularity}"
    return f"{p.sparsity_per_layer:g}{extra} ({p.criterion})"


def summary(gm: torch.fx.GraphModule, allocated: Mapping[str, torch.Tensor] | None = None) -> str:
    """The plan table rendered with tabulate, with a totals row (``allocated``: as for :func:`report`).

    With dependency groups (``out_channel`` and example inputs) the layer table gets a ``group``
    column and is followed by the group table (``fxcompress.group_report.group_table``).

    >>> print(summary(gm))  # doctest: +SKIP
    """
    rows = report(gm, allocated)
    table = [[r.name, r.type_name, r.site, r.params, r.config_index,
              ",".join(map(str, r.overridden)) or "-", r.target,
              "" if r.achieved_sparsity is None else f"{r.achieved_sparsity:.2%}",
              r.quant, "" if r.start_step is None else r.start_step, r.ranges] for r in rows]
    params = sum(r.params for r in rows)
    pruned = sum(r.pruned or 0 for r in rows)
    table.append(["TOTAL", f"{len(rows)} layers", "", params, "", "", "",
                  f"{pruned / params:.2%}" if params and any(r.pruned is not None for r in rows) else "",
                  f"{sum(1 for r in rows if r.quant)} quantized", "", ""])
    headers = ["layer", "type", "rewritten", "#params", "config", "overrides", "target", "sparsity", "quant", "start", "ranges"]
    groups = group_table(gm, allocated)
    if not groups:
        return tabulate.tabulate(table, headers=headers, tablefmt="github")
    for line, r in zip(table, rows, strict=False):  # the TOTAL line has no layer
        line.insert(7, r.group)
    table[-1].insert(7, "")
    headers.insert(7, "group")
    return f"{tabulate.tabulate(table, headers=headers, tablefmt='github')}\n\nDependency groups:\n{groups}"


@torch.no_grad()
def calibration(gm: torch.fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per quantized layer, NNI's export fields as plain Python numbers and lists (JSON-ready).

    Fields: ``weight_bits``, ``weight_scale``, ``weight_zero_point``, ``input_bits``,
    ``tracked_min_input``, ``tracked_max_input``, ``output_bits``, ``tracked_min_output``,
    ``tracked_max_output`` (for the quantized types of each layer), ``weight_folded_bn`` (the
    BatchNorm folded into the weight those fields describe, with Conv-BN folding), plus ``input_observed`` /
    ``output_observed``: False for an activation quantizer that has not yet observed a batch with
    a finite min and max (it passes its input through unchanged), whose tracked range is then
    None rather than a made-up ``[0, 0]``.

    Args:
        gm: a model returned by ``fxcompress.compress``.

    Returns:
        ``{layer name: {field: value}}`` in graph order.

    >>> calibration(gm)["fc1"]["input_observed"]  # doctest: +SKIP
    True
    """
    from fxcompress.passes.freeze import weight_quantizer_inputs  # the passes import this module

    seen = weight_quantizer_inputs(gm)
    out: dict[str, dict[str, Any]] = {}
    for name, plan in plans_of(gm).items():
        if plan.quant is None or not plan.compressed:  # unused or blocked: no quantizer to read
            continue
        layer = gm.get_submodule(name)
        fields: dict[str, Any] = {}
        if plan.quant.weight is not None:
            # what the quantizer sees: the masked weight (a stored pruned entry may have moved), or
            # with Conv-BN folding the folded one, w * gamma / sqrt(running_var + eps) (SPEC §5)
            weight = seen.get(f"{name}.weight_quantizer", layer.weight)
            scale, zero_point = layer.weight_quantizer.current_qparams(weight)
            fields.update(weight_bits=plan.quant.weight.bits, weight_scale=scale.tolist(),
                          weight_zero_point=[int(v) for v in zero_point.tolist()])
            if plan.folds_bn is not None:
                fields["weight_folded_bn"] = plan.folds_bn
        for kind in ("input", "output"):
            quantizer = getattr(layer, f"{kind}_quantizer", None)
            if quantizer is not None:
                fields.update(_activation_fields(kind, quantizer))
        out[name] = fields
    return out


def _activation_fields(kind: str, quantizer: torch.nn.Module) -> dict[str, Any]:
    observed = bool(quantizer.initialized)
    return {f"{kind}_bits": quantizer.bits,
            f"tracked_min_{kind}": float(quantizer.tracked_min) if observed else None,
            f"tracked_max_{kind}": float(quantizer.tracked_max) if observed else None,
            f"{kind}_observed": observed}
