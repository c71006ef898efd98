"""compress(): trace the model (the only place that traces), run the passes, return a GraphModule."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx

from fxcompress.annotations import RECORD, LayerPlan, layer_plans, plans_of
from fxcompress.config import parse_config
from fxcompress.errors import TraceError, caller_stacklevel
from fxcompress.layer_types import compressible_base, type_names_of
from fxcompress.layers import CompressionRecord
from fxcompress.matching import LayerInfo, check_against_model, check_traced, resolve_all
from fxcompress.passes.annotate import annotate_layers, unused_plans
from fxcompress.passes.fold_bn import fold_batchnorm, mark_bn_folds
from fxcompress.passes.functionalize import functionalize_layers
from fxcompress.passes.group_plan import attach_group_record, needs_groups, out_channel_layers
from fxcompress.passes.leaf_layers import rewrite_leaf_layers
from fxcompress.passes.module_level import (
    mark_module_level,
    module_level_reason,
    pending_module_masks,
    plan_modules,
    rewrite_modules,
)
from fxcompress.passes.prune import pending_masks, rewrite_pruned_layers
from fxcompress.passes.quantize import insert_fake_quant
from fxcompress.passes.strip import strip_compression
from fxcompress.pruning import check_tied, check_unclaimed
from fxcompress.settings import SubConfig
from fxcompress.taylor import HOW, taylor_layers
from fxcompress.tracing import LeafSpec, trace, with_module_tree

__all__ = ["compress", "layer_infos", "plan", "select", "trace"]

def compress(model: torch.nn.Module, config_list: Any, *, example_inputs: Sequence[Any] | None = None,
             leaf_modules: Iterable[LeafSpec] = (), concrete_args: dict[str, Any] | None = None,
             strict: bool = True, inplace: bool = False, start_dense: bool = False,
             fold_bn: bool = True) -> torch.fx.GraphModule:
    """Trace ``model`` and rewrite the layers ``config_list`` selects into masked / fake-quant form.

    Args:
        model: an ``nn.Module`` (traced with torch.fx) or a GraphModule, also one ``compress``
            returned: the new config is then added to the old one (SPEC §2.9).
        config_list: NNI-style list of sub-config dicts (see README).
        example_inputs: the tuple of positional inputs, of the shapes the model will see.
            ``granularity: 'out_channel'`` needs them to find the dependency groups (one channel
            mask per group, norms masked too: SPEC §4, what ``fxcompress.speedup`` removes); without
            them each such layer's filters are ranked alone, with a warning. If given, the result
            is also run once on them (eval mode, no grad) as a check.
        leaf_modules: module types or qualified names the tracer must not enter.
        concrete_args: passed to ``torch.fx.Tracer.trace`` to specialise arguments.
        strict: model-dependent config problems raise (True) or warn (False).
        inplace: reuse the model's modules instead of a deep copy.
        start_dense: install all-ones masks and prune nothing yet, so that a
            ``SparsityScheduler`` ramps from the dense weights (the final target is checked now).
            Layers pruned with criterion ``'taylor'`` (|w·grad|) start so anyway, with a warning:
            their masks are computed by ``update_masks(gm, data=..., loss_fn=...)``.
        fold_bn: a weight-quantized conv whose output only a BatchNorm reads quantizes the
            BatchNorm-folded weight (the weight the deployed model holds); see ``fxcompress.folding``.
    Returns:
        A new GraphModule that trains, compiles, exports and scripts. When torch.fx cannot trace
        the model's top-level forward (Hugging Face models), a copy of the model itself, compressed
        at module level, with a warning saying why (see :mod:`fxcompress.passes.module_level`).
    Raises:
        ConfigError: a bad config (nothing about the model is changed).
        TraceError: the model cannot be traced; the message names the module and line.

    >>> gm = compress(model, [{'op_types': ['Conv2d'], 'sparsity_per_layer': 0.5}])  # doctest: +SKIP
    """
    subs = parse_config(config_list)
    if not any(s.prune is not None or s.quant is not None for s in subs):
        warnings.warn("compress: the config_list has no pruning or quantization key in any sub-config, so "
                      "nothing is compressed; add e.g. 'sparsity_per_layer' or 'quant_types'", UserWarning,
                      stacklevel=caller_stacklevel())
    gm = _plan(model, subs, leaf_modules, concrete_args, strict, inplace, fold_bn)
    _plan_groups(gm, example_inputs)
    if module_level_reason(gm) is not None:
        plans = plans_of(gm)
        module_masks = pending_module_masks(gm, plans, 0.0 if start_dense else 1.0)
        rewrite_modules(gm, plans, module_masks)
        if not start_dense:
            _warn_waiting(plans, module_masks)
        if example_inputs is not None:
            _smoke_run(gm, example_inputs)
        return gm
    masks = pending_masks(gm, 0.0 if start_dense else 1.0)  # may raise: before any change
    rewrite_leaf_layers(gm)
    functionalize_layers(gm, finalize=False)
    rewrite_pruned_layers(gm, masks=masks, finalize=False)
    if not start_dense:
        _warn_waiting(plans_of(gm), masks)
    insert_fake_quant(gm, finalize=False)
    fold_batchnorm(gm)
    gm.graph.lint()
    gm.recompile()
    if example_inputs is not None:
        _smoke_run(gm, example_inputs)
    return gm


def plan(model: torch.nn.Module, config_list: Any, *, example_inputs: Sequence[Any] | None = None,
         leaf_modules: Iterable[LeafSpec] = (),
         concrete_args: dict[str, Any] | None = None, strict: bool = True,
         inplace: bool = False, fold_bn: bool = True) -> torch.fx.GraphModule:
    """The dry run: trace and annotate only; ``report``/``summary`` show what ``compress`` would do.

    Arguments as for :func:`compress` (``example_inputs`` for the dependency groups of
    ``out_channel``); the returned GraphModule computes exactly what the model does.
    """
    gm = _plan(model, parse_config(config_list), leaf_modules, concrete_args, strict, inplace, fold_bn)
    _plan_groups(gm, example_inputs)
    return gm


def _plan_groups(gm: torch.nn.Module, example_inputs: Sequence[Any] | None) -> None:
    """Record the dependency groups that ``out_channel`` layers prune, or warn that each is ranked alone."""
    plans = plans_of(gm)
    if not out_channel_layers(plans) or not needs_groups(gm, plans):
        return
    if module_level_reason(gm) is not None:
        why = "the model is compressed at module level (no graph to find dependency groups in)"
    elif example_inputs is None:
        why = "compress was given no example_inputs to find the dependency groups with"
    else:
        attach_group_record(gm, example_inputs, plans)
        return
    warnings.warn(f"compress: granularity 'out_channel' ranks each layer's filters alone because {why}: a residual "
                  "add or a BatchNorm can then keep a pruned channel alive, and fxcompress.speedup cannot remove it. "
                  "Pass compress(model, config_list, example_inputs=(x,)) to prune whole dependency groups",
                  UserWarning, stacklevel=caller_stacklevel())


def _plan(model: torch.nn.Module, subs: tuple[SubConfig, ...], leaf_modules: Iterable[LeafSpec],
          concrete_args: dict[str, Any] | None, strict: bool, inplace: bool, fold_bn: bool = True
          ) -> torch.fx.GraphModule:
    """Trace (or re-graph a GraphModule), annotate, run every model check; changes no module of ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compress: expected an nn.Module, got {type(model).__name__}")
    check_against_model(subs, layer_infos(model), strict=strict)
    previous = plans_of(model) if hasattr(model, RECORD) else {}
    if isinstance(model, torch.fx.GraphModule):
        source = model if inplace else copy.deepcopy(model)
        gm = _regraph(source)
        strip_compression(gm)  # a compressed model's nodes are rebuilt from the merged plans
    else:
        source = model if inplace else copy.deepcopy(model)
        try:
            gm = trace(source, leaf_modules, concrete_args)
        except TraceError as err:
            if err.module != "":
                raise
            return _plan_module_level(source, subs, previous, str(err), strict)
    annotate_layers(gm, subs, previous)
    if fold_bn:
        mark_bn_folds(gm)
    plans = {**layer_plans(gm.graph), **unused_plans(gm, subs, gm.graph, previous)}
    check_traced(subs, plans, strict=strict)
    check_tied(gm, plans)
    check_unclaimed(gm, plans, previous)
    _record_plans(gm, plans)
    return gm


def _plan_module_level(model: torch.nn.Module, subs: tuple[SubConfig, ...], previous: dict[str, LayerPlan],
                       reason: str, strict: bool) -> torch.nn.Module:
    """The top-level forward cannot be traced: plan the layers of the model's copy at module level."""
    if module_level_reason(model) is None:  # said once per model, not again when it is recompressed
        head = re.split(r"\. Fix:|, and fxcompress cannot", reason)[0]
        warnings.warn(f"compress: {head}. {type(model).__name__} is compressed at module "
                      "level instead: the result is a copy of the model running its own forward, with each "
                      "compressed layer replaced by a CompressedLayer (see the README, 'Models fx cannot trace')",
                      UserWarning, stacklevel=caller_stacklevel())
    plans = plan_modules(model, subs, previous)
    check_traced(subs, plans, strict=strict)
    check_tied(model, plans)
    check_unclaimed(model, plans, previous)
    mark_module_level(model, reason)
    _record_plans(model, plans)
    return model


def select(model: torch.nn.Module, config_list: Any, *, strict: bool = True) -> list[str]:
    """Names of the layers ``config_list`` selects and does not exclude, in module order.

    Only the module tree is looked at (no tracing): a selected layer the forward never uses is listed.

    >>> select(model, [{'op_types': ['Conv2d']}, {'op_names': ['fc1']}])  # doctest: +SKIP
    ['conv1', 'conv2', 'fc1']
    """
    subs = parse_config(config_list)
    layers = layer_infos(model)
    check_against_model(subs, layers, strict=strict)
    return [name for name, res in resolve_all(subs, layers).items() if not res.winner.exclude]


def layer_infos(model: torch.nn.Module) -> list[LayerInfo]:
    """Every module of ``model`` as matching sees it, in ``named_modules`` order."""
    infos = []
    for name, m in model.named_modules():
        if name:
            infos.append(LayerInfo(name, type_names_of(m), any(True for _ in m.children()),
                                   compressible_base(m) is not None))
        if isinstance(m, torch.nn.MultiheadAttention):  # its packed in-projection is a layer (SPEC §2.6)
            infos.append(LayerInfo(f"{name}.in_proj" if name else "in_proj", ("Linear",), False, True))
    return infos


def _regraph(source: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``source``'s graph that shares its whole module tree
    (recompiling ``source`` itself would change the class it shares with the user's model)."""
    return with_module_tree(source, copy.deepcopy(source.graph), source.__class__.__name__)


def _record_plans(gm: torch.nn.Module, plans: dict[str, LayerPlan]) -> None:
    # first in the tree, so a mismatching checkpoint is refused before any other module loads
    others = {k: v for k, v in gm._modules.items() if k != RECORD}
    gm._modules.clear()
    gm.add_module(RECORD, CompressionRecord(plans).train(gm.training))
    gm._modules.update(others)


def _warn_waiting(plans: dict[str, LayerPlan], masks: dict[str, torch.Tensor]) -> None:
    """Say that the layers this compress masked with criterion 'taylor' keep every weight until scored."""
    names = [n for n in taylor_layers(plans) if n in masks]
    if not names:
        return
    configs = sorted({plans[n].config_index for n in names})
    shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    warnings.warn(f"compress: config_list{configs} prunes with criterion 'taylor', which ranks weights by |w·grad| "
                  f"and so needs gradients: layers {shown} keep every weight (the plan says 'waiting for gradients') "
                  f"until {HOW} scores them", UserWarning, stacklevel=caller_stacklevel())


def _smoke_run(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(*example_inputs)
    finally:
        gm.train(was_training)
