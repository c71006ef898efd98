"""compress(): trace the model (the only place that traces), run the passes, return a GraphModule."""

from __future__ import annotations

import copy
import linecache
import logging
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx

from fxcompress.annotations import RECORD, LayerPlan, layer_plans, plans_of
from fxcompress.config import parse_config
from fxcompress.errors import TraceError, caller_stacklevel
from fxcompress.layer_types import compressible_base, has_own_forward, type_names_of
from fxcompress.layers import CompressionRecord
from fxcompress.matching import LayerInfo, check_against_model, check_traced, resolve_all
from fxcompress.passes.annotate import annotate_layers, unused_plans
from fxcompress.passes.functionalize import functionalize_layers
from fxcompress.passes.leaf_layers import rewrite_leaf_layers
from fxcompress.passes.prune import pending_masks, rewrite_pruned_layers
from fxcompress.passes.quantize import insert_fake_quant
from fxcompress.passes.strip import strip_compression
from fxcompress.pruning import check_tied, check_unclaimed
from fxcompress.settings import SubConfig

__all__ = ["compress", "layer_infos", "plan", "select", "trace"]

log = logging.getLogger(__name__)

LeafSpec = str | type[torch.nn.Module]


def compress(model: torch.nn.Module, config_list: Any, *, example_inputs: Sequence[Any] | None = None,
             leaf_modules: Iterable[LeafSpec] = (), concrete_args: dict[str, Any] | None = None,
             strict: bool = True, inplace: bool = False, start_dense: bool = False) -> torch.fx.GraphModule:
    """Trace ``model`` and rewrite the layers ``config_list`` selects into masked / fake-quant form.

    Args:
        model: an ``nn.Module`` (traced with torch.fx) or a GraphModule, also one ``compress``
            returned: the new config is then added to the old one (SPEC §2.9).
        config_list: NNI-style list of sub-config dicts (see README).
        example_inputs: if given, the result is run once on them (eval mode, no grad) as a check.
        leaf_modules: module types or qualified names the tracer must not enter.
        concrete_args: passed to ``torch.fx.Tracer.trace`` to specialise arguments.
        strict: model-dependent config problems raise (True) or warn (False).
        inplace: reuse the model's modules instead of a deep copy.
        start_dense: install all-ones masks and prune nothing yet, so that a
            ``SparsityScheduler`` ramps from the dense weights (the final target is checked now).
    Returns:
        A new GraphModule that trains, compiles, exports and scripts.
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
    gm, previous = _plan(model, subs, leaf_modules, concrete_args, strict, inplace)
    masks = pending_masks(gm, 0.0 if start_dense else 1.0)  # may raise: before any change
    rewrite_leaf_layers(gm)
    functionalize_layers(gm, finalize=False)
    rewrite_pruned_layers(gm, masks=masks, finalize=False)
    insert_fake_quant(gm, finalize=False)
    gm.graph.lint()
    gm.recompile()
    if example_inputs is not None:
        _smoke_run(gm, example_inputs)
    return gm


def plan(model: torch.nn.Module, config_list: Any, *, leaf_modules: Iterable[LeafSpec] = (),
         concrete_args: dict[str, Any] | None = None, strict: bool = True,
         inplace: bool = False) -> torch.fx.GraphModule:
    """The dry run: trace and annotate only; ``report``/``summary`` show what ``compress`` would do.

    Arguments as for :func:`compress`; the returned GraphModule computes exactly what the model does.
    """
    return _plan(model, parse_config(config_list), leaf_modules, concrete_args, strict, inplace)[0]


def _plan(model: torch.nn.Module, subs: tuple[SubConfig, ...], leaf_modules: Iterable[LeafSpec],
          concrete_args: dict[str, Any] | None, strict: bool, inplace: bool
          ) -> tuple[torch.fx.GraphModule, dict[str, LayerPlan]]:
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
        gm = trace(model if inplace else copy.deepcopy(model), leaf_modules, concrete_args)
    annotate_layers(gm, subs, previous)
    plans = {**layer_plans(gm.graph), **unused_plans(gm, subs, gm.graph, previous)}
    check_traced(subs, plans, strict=strict)
    check_tied(gm, plans)
    check_unclaimed(gm, plans, previous)
    _record_plans(gm, plans)
    return gm, previous


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
    return [LayerInfo(name, type_names_of(m), any(True for _ in m.children()), compressible_base(m) is not None)
            for name, m in model.named_modules() if name]


class _Tracer(torch.fx.Tracer):
    """A tracer that also stops at user-given leaf modules and remembers where it is."""

    def __init__(self, leaves: Iterable[LeafSpec] = ()) -> None:
        super().__init__()
        leaves = list(leaves)
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if has_own_forward(m):
            return False  # a Conv/Linear subclass with its own forward: trace how it reads its weight
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.module_stack_names.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.module_stack_names.pop()
        return result


def trace(model: torch.nn.Module, leaf_modules: Iterable[LeafSpec] = (),
          concrete_args: dict[str, Any] | None = None, fallback: bool = True) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that shares its modules.

    When a submodule cannot be traced (data-dependent control flow, say) and ``fallback`` is
    True, it becomes a leaf module and tracing is retried; the layers inside such leaves are
    compressed by module-level rewriting later.

    Raises:
        TraceError: naming the submodule and source line that could not be traced, when the
            top-level forward fails or ``fallback`` is False.
    """
    leaves = list(leaf_modules)
    while True:
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model, concrete_args)
            break
        except Exception as err:  # any tracing failure is handled the same way
            where = tracer.module_stack_names[-1] if tracer.module_stack_names else ""
            if not fallback or not where or where in leaves:
                raise TraceError(_trace_message(model, where, err)) from err
            log.info("torch.fx cannot trace %r (%s); retrying with it as a leaf module", where, err)
            leaves.append(where)
    _resolve_string_annotations(graph, model)
    return _with_module_tree(tracer.root, graph, model.__class__.__name__)


def _with_module_tree(root: torch.nn.Module, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` that shares ``root``'s whole module tree.

    ``GraphModule(root, graph)`` copies only what the graph names and replaces the modules on the
    way with bare ``nn.Module``s: a layer whose weight is read functionally would lose its type
    (and so its plan), and an unused layer would vanish from the plan and the state dict.
    """
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph(), name)
    for table in ("_modules", "_parameters", "_buffers"):
        getattr(gm, table).update(getattr(root, table))
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                gm.get_submodule(node.target) if node.op == "call_module" else _fetch(gm, node.target)
            except AttributeError:  # a plain tensor attribute of the root: copied as GraphModule would
                torch.fx.graph_module._copy_attr(root, gm, node.target)
    gm.graph = graph
    gm.recompile()
    return gm.train(root.training)


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if not hasattr(module, attr):
        raise AttributeError(target)
    return getattr(module, attr)


def _resolve_string_annotations(graph: torch.fx.Graph, model: torch.nn.Module) -> None:
    """Evaluate ``from __future__ import annotations`` strings on inputs/outputs.

    fx would print them as unknown names (``x: _torch_Tensor_``), which TorchScript rejects.
    """
    scope = getattr(type(model).forward, "__globals__", {})
    for node in graph.nodes:
        if isinstance(node.type, str):
            try:
                node.type = eval(node.type, dict(scope))  # the user's own annotation, in its own module
            except Exception:  # an annotation that cannot be evaluated is dropped, not fatal
                node.type = None


def _trace_message(model: torch.nn.Module, where: str, err: Exception) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    line = ""
    if frames:
        f = frames[-1]
        code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
        line = f" at {f.filename}:{f.lineno} ({code})"
    module = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else "the top-level forward"
    leaf = f"leaf_modules=['{where}']" if where else "leaf_modules=[...]"
    return (f"torch.fx could not trace {module}{line}: {type(err).__name__}: {err}. "
            f"Fix: pass compress(..., {leaf}) to keep that module opaque, or concrete_args={{...}} to fix "
            "the argument its control flow depends on")


def _regraph(source: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``source``'s graph that shares its whole module tree
    (recompiling ``source`` itself would change the class it shares with the user's model)."""
    return _with_module_tree(source, copy.deepcopy(source.graph), source.__class__.__name__)


def _record_plans(gm: torch.fx.GraphModule, plans: dict[str, LayerPlan]) -> None:
    # first in the tree, so a mismatching checkpoint is refused before any other module loads
    others = {k: v for k, v in gm._modules.items() if k != RECORD}
    gm._modules.clear()
    gm.add_module(RECORD, CompressionRecord(plans).train(gm.training))
    gm._modules.update(others)


def _smoke_run(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(*example_inputs)
    finally:
        gm.train(was_training)
