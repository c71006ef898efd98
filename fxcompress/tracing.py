"""Symbolic tracing for compress(): the only place that traces; both train/eval modes captured alike.

fx evaluates Python branches at trace time, so a module whose forward reads ``self.training``
(timm's ``BatchNormAct2d``, ``DropPath``, a block's own ``if self.training:``) would be baked into
the mode the model was in. :func:`trace` traces the model in both modes and, where the graphs
differ, keeps the deepest module responsible as a leaf (it then runs its own forward, in whatever
mode the compressed model is in), retracing until both modes give the same graph (SPEC §2.8).
"""

from __future__ import annotations

import linecache
import logging
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from fxcompress.errors import TraceError
from fxcompress.layer_types import has_own_forward

__all__ = ["LeafSpec", "trace", "with_module_tree"]

log = logging.getLogger(__name__)

LeafSpec = str | type[torch.nn.Module]


def _library_notrace_functions() -> tuple[Any, ...]:
    """Helpers that model libraries already imported declare opaque to fx (timm's registry, and its
    ``pad_same``, whose shape arithmetic fx cannot trace), so e.g. ``Conv2dSame`` traces as
    ``pad_same`` + ``F.conv2d`` on a visible weight instead of failing into a leaf."""
    if "timm" not in sys.modules:
        return ()
    try:
        from timm.layers import _fx, padding
    except ImportError:  # another timm layout: trace without its hints
        return ()
    return (*getattr(_fx, "_autowrap_functions", ()), padding.pad_same)


class _Tracer(torch.fx.Tracer):
    """A tracer that also stops at user-given leaf modules and remembers where it is."""

    def __init__(self, leaves: Iterable[LeafSpec] = ()) -> None:
        super().__init__(autowrap_functions=_library_notrace_functions())
        # buffers become get_attr nodes: code such as ``self.num_batches_tracked.add_(1)`` is recorded,
        # not run on the real buffer while tracing
        self.proxy_buffer_attributes = True
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
    """Symbolically trace ``model`` into a GraphModule that shares its modules, valid in both modes.

    The model is traced in train and in eval mode (its modules' own flags are restored after).
    When the two graphs differ, the deepest module whose forward made them differ becomes a leaf
    and both are traced again. When a submodule cannot be traced at all (data-dependent control
    flow) and ``fallback`` is True, it becomes a leaf too. The layers inside leaves are compressed
    by module-level rewriting later.

    Raises:
        TraceError: naming the module and source line, when the top-level forward cannot be
            traced, depends on the mode itself, or ``fallback`` is False.
    """
    leaves = list(leaf_modules)
    modes = {m: m.training for m in model.modules()}
    try:
        while True:
            graphs = {}
            for mode in (True, False):
                model.train(mode)
                graphs[mode], root = _trace_with_fallback(model, leaves, concrete_args, fallback)
            _lift_mode_flags(graphs[True], graphs[False])
            found = _mode_dependent_modules(graphs[True], graphs[False])
            if not found:
                break
            for where in found:
                if not fallback or not where or where in leaves:
                    raise TraceError(_mode_message(model, where), where)
            log.info("%s compute differently in train and eval mode; keeping them as leaf modules", found)
            leaves.extend(found)
    finally:
        for m, mode in modes.items():
            m.training = mode
    graph = graphs[model.training]
    _resolve_string_annotations(graph, model)
    return with_module_tree(root, graph, model.__class__.__name__)


def _trace_with_fallback(model: torch.nn.Module, leaves: list[LeafSpec], concrete_args: dict[str, Any] | None,
                         fallback: bool) -> tuple[torch.fx.Graph, torch.nn.Module]:
    """Trace once; a submodule fx cannot trace is added to ``leaves`` (in place) and tracing retried."""
    while True:
        tracer = _Tracer(leaves)
        try:
            return tracer.trace(model, concrete_args), tracer.root
        except Exception as err:  # any tracing failure is handled the same way
            where = tracer.module_stack_names[-1] if tracer.module_stack_names else ""
            if not fallback or not where or where in leaves:
                raise TraceError(_trace_message(model, where, err), where) from err
            log.info("torch.fx cannot trace %r (%s); retrying with it as a leaf module", where, err)
            leaves.append(where)


def _lift_mode_flags(train: torch.fx.Graph, evaluation: torch.fx.Graph) -> None:
    """Where a module's nodes differ only in a bool argument that is True in train mode and False in
    eval (``F.dropout(x, p, self.training)``, torchvision Swin's ``training=self.training``), make both
    graphs read the module's ``training`` flag at run time instead: no leaf is needed for that."""
    a, b = _by_owner(train), _by_owner(evaluation)
    for owner in a.keys() & b.keys():
        xs, ys = a[owner], b[owner]
        if [_shape(x) for x in xs] != [_shape(y) for y in ys]:
            continue  # a structural difference: left to _mode_dependent_modules
        for x, y in zip(xs, ys, strict=True):
            positions = [i for i, (u, v) in enumerate(zip(x.args, y.args, strict=True)) if u is True and v is False]
            names = [k for k in x.kwargs if x.kwargs[k] is True and y.kwargs[k] is False]
            for graph, node in ((train, x), (evaluation, y)) if positions or names else ():
                with graph.inserting_before(node):
                    flag = graph.get_attr(f"{owner}.training" if owner else "training")
                for i in positions:
                    node.update_arg(i, flag)
                for k in names:
                    node.update_kwarg(k, flag)


def _mode_dependent_modules(train: torch.fx.Graph, evaluation: torch.fx.Graph) -> list[str]:
    """The deepest modules whose own code differs between the graphs ("" is the top-level forward);
    empty when both graphs compute the same. All of them at once, so one retrace handles a model
    full of mode-dependent blocks."""
    if _keys(train) == _keys(evaluation):
        return []
    a, b = _local_keys(train), _local_keys(evaluation)
    differ = {o for o in a.keys() | b.keys() if a.get(o) != b.get(o)}
    if not differ:  # only the wiring between modules differs: blame the first difference's owner
        differ = {_first_difference(train, evaluation)}
    return sorted(o for o in differ if not any(d != o and (o == "" or d.startswith(f"{o}.")) for d in differ))


def _by_owner(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    out: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        out.setdefault(_owner(node), []).append(node)
    return out


def _shape(node: torch.fx.Node) -> tuple:
    return node.op, _target(node), len(node.args), tuple(sorted(node.kwargs))


def _target(node: torch.fx.Node) -> Any:
    if node.op == "get_attr" and node.target.startswith("_tensor_constant"):
        return "_tensor_constant"  # each trace numbers the constants it lifts afresh
    return node.target


def _keys(graph: torch.fx.Graph) -> list[tuple]:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return [_node_key(n, lambda v: ("node", index[v])) for n in graph.nodes]


def _local_keys(graph: torch.fx.Graph) -> dict[str, list[tuple]]:
    """Per owning module, its nodes' keys; a reference into another module names only that module,
    so a child's change does not make its parent differ."""
    groups = _by_owner(graph)
    local = {n: (owner, i) for owner, nodes in groups.items() for i, n in enumerate(nodes)}
    out = {}
    for owner, nodes in groups.items():
        refer = lambda v, o=owner: ("local", local[v][1]) if local[v][0] == o else ("from", local[v][0])  # noqa: E731
        out[owner] = [_node_key(n, refer) for n in nodes]
    return out


def _first_difference(train: torch.fx.Graph, evaluation: torch.fx.Graph) -> str:
    a, b, ka, kb = list(train.nodes), list(evaluation.nodes), _keys(train), _keys(evaluation)
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or ka[i] != kb[i]:
            return max((_owner(n[i]) for n in (a, b) if i < len(n)), key=lambda o: o.count(".") + bool(o))
    return ""


def _node_key(node: torch.fx.Node, refer: Any) -> tuple:
    wrap = lambda v: refer(v) if isinstance(v, torch.fx.Node) else v  # noqa: E731
    args = torch.fx.node.map_aggregate(node.args, wrap)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, wrap)
    return node.op, _target(node), repr(args), repr(kwargs)


def _owner(node: torch.fx.Node) -> str:
    """The module whose forward created ``node`` (for a module call: the caller, not the callee)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack:
        stack = stack[:-1]
    return stack[-1][0] if stack else ""


def _mode_message(model: torch.nn.Module, where: str) -> str:
    what = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else "the top-level forward"
    return (f"{what} of {type(model).__name__} computes a different graph in train and eval mode (it reads "
            "self.training), and fxcompress cannot keep it as a leaf module; compressing it would bake one mode "
            "in. Fix: move the mode-dependent code into a submodule, or compress a wrapper whose forward calls "
            "the model as a submodule")


def with_module_tree(root: torch.nn.Module, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
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
    gm.training = root.training  # not .train(): submodules keep their own flags (a frozen BatchNorm)
    return gm


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
    here = os.path.dirname(__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith(here)]
    line = ""
    if frames:
        f = frames[-1]
        code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
        line = f" at {f.filename}:{f.lineno} ({code})"
    if "co_varnames" in str(err) or (not frames and "Proxy object cannot be iterated" in str(err)):
        line = " (fx cannot make inputs for a forward whose signature is *args/**kwargs behind a decorator)"
    module = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else "the top-level forward"
    leaf = f"leaf_modules=['{where}']" if where else "leaf_modules=[...]"
    return (f"torch.fx could not trace {module}{line}: {type(err).__name__}: {err}. "
            f"Fix: pass compress(..., {leaf}) to keep that module opaque, or concrete_args={{...}} to fix "
            "the argument its control flow depends on")


