"""Config pass: annotate every call and weight read of a selected layer with its LayerPlan; changes no node.

A layer is its weight wherever the model reads it (SPEC §2.6): a ``call_module`` of the layer,
a ``get_attr`` of ``<layer>.weight`` / ``<layer>.bias`` (a functional call on ``self.fc.weight``,
a subclass's own forward), and the ``F.linear``/``F.convNd`` call that consumes such a read all
carry the layer's plan. A read whose consumer is not such a call (the weight passed into a
function fx does not enter) is recorded in the plan as unreachable for input quantization.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.annotations import META_KEY, LayerPlan, LeafPlan, get_plan, layer_plans, set_plan
from fxcompress.attention import layers_inside
from fxcompress.errors import ConfigError
from fxcompress.layer_types import compressible_base, has_own_forward, type_name_of, type_names_of
from fxcompress.matching import resolve
from fxcompress.settings import SubConfig

__all__ = ["COMPUTE_OPS", "annotate_layers", "inside_plan", "layer_input", "layer_weight", "merged_plan", "plan_for",
           "read_by_parent", "unused_plans"]

COMPUTE_OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)
_ATTENTION_OWNERS = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
# ops a read may pass through on its way to a compute op and still count as the layer's weight
_TRANSPARENT_METHODS = ("to", "contiguous", "float", "half", "bfloat16", "type_as")
# source text after ``self.fc.weight`` that reads only its metadata, which a swapped-in layer keeps
_METADATA_READ = re.compile(r"\s*\.\s*(dtype|shape|device|ndim|is_cuda|requires_grad|size\s*\(|dim\s*\(|numel\s*\()")


def plan_for(subs: Sequence[SubConfig], name: str, module: torch.nn.Module, leaf: str | None = None
             ) -> LayerPlan | None:
    """The LayerPlan of one layer, or None when no sub-config selects it."""
    res = resolve(subs, name, type_names_of(module))
    win = res.winner
    if win is None:
        return None
    return LayerPlan(name=name, type_name=type_name_of(module), config_index=win.index, overridden=res.overridden,
                     excluded=win.exclude, prune=win.prune, quant=win.quant, leaf=leaf)


def layer_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The weight argument of an ``F.linear``/``F.convNd`` call, positional or keyword."""
    if node.op != "call_function" or node.target not in COMPUTE_OPS:
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def layer_input(node: torch.fx.Node) -> torch.fx.Node:
    """The input of a layer call (``call_module`` or functional), positional or ``input=``."""
    return node.args[0] if node.args else node.kwargs["input"]


def annotate_layers(gm: torch.fx.GraphModule, subs: Sequence[SubConfig],
                    previous: Mapping[str, LayerPlan] | None = None) -> torch.fx.GraphModule:
    """Write ``node.meta["fxcompress"]`` on each call and weight read of a layer some sub-config selects.

    A call of a leaf module (one the tracer did not enter) that holds selected layers gets a
    LeafPlan listing their plans; they are rewritten at module level later.

    Args:
        gm: a traced model; edited in place (metadata only).
        subs: the parsed config list.
        previous: the plans of an earlier ``compress`` of this model; they are merged (SPEC §2.9).
    Returns:
        ``gm``. A node annotated before keeps its plan (the pass is idempotent).
    Raises:
        ConfigError: the earlier and the new config both prune (or both quantize) a layer differently.
    """
    previous = previous or {}
    for node in list(gm.graph.nodes):
        if META_KEY in node.meta:
            continue
        plan = _node_plan(gm, node, subs, previous)
        if plan is not None:
            set_plan(node, plan)
    _record_reachability(gm)
    gm.graph.lint()
    return gm


def _node_plan(gm: torch.fx.GraphModule, node: torch.fx.Node, subs: Sequence[SubConfig],
               previous: Mapping[str, LayerPlan]) -> LayerPlan | LeafPlan | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if compressible_base(module) is not None:
            return _checked(merged_plan(previous.get(node.target), plan_for(subs, node.target, module)), module)
        inner = ((merged_plan(previous.get(f"{node.target}.{name}"),
                          plan_for(subs, f"{node.target}.{name}", m, leaf=node.target)), m, why, in_proj)
                 for name, m, why, in_proj in layers_inside(module))
        layers = tuple(inside_plan(p, m, why or read_by_parent(module, p.name[len(node.target) + 1:]), in_proj)
                       for p, m, why, in_proj in inner if p is not None)
        return LeafPlan(node.target, layers) if layers else None
    if node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        return _layer_plan(gm, owner, subs, previous) if attr in ("weight", "bias") else None
    weight = layer_weight(node)
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return _layer_plan(gm, weight.target.rpartition(".")[0], subs, previous)
    return None


def _layer_plan(gm: torch.fx.GraphModule, name: str, subs: Sequence[SubConfig],
                previous: Mapping[str, LayerPlan]) -> LayerPlan | None:
    """The merged plan of the compressible module ``name`` whose parameter a node reads, or None."""
    module = _module_or_none(gm, name)
    if module is None or compressible_base(module) is None:
        return None
    return merged_plan(previous.get(name), plan_for(subs, name, module))


def _checked(plan: LayerPlan | None, module: torch.nn.Module) -> LayerPlan | None:
    """Refuse a compressed layer whose own forward fxcompress cannot see into (it runs as a leaf)."""
    if plan is not None and plan.compressed and has_own_forward(module):
        raise ConfigError(
            f"layer {plan.name!r} ({plan.type_name}) has its own forward but runs inside a leaf module (or a model "
            "whose forward could not be traced), where fxcompress cannot see how it reads its weight; remove it "
            "(or its parent) from leaf_modules, or "
            f"exclude it: {{'op_names': [{plan.name!r}], 'exclude': True}}")
    return plan


def read_by_parent(root: torch.nn.Module, path: str) -> str | None:
    """Why a layer run at module level cannot be compressed: its parent's forward reads the values of
    ``self.<layer>.weight`` directly (found in the source), which a swapped-in module cannot intercept.
    Reads of metadata (``.dtype``, ``.shape``, ...) and ``isinstance`` checks are harmless."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, _ATTENTION_OWNERS) or attr == "in_proj":
        # handled: CompressedAttention replaces the attention, and with it these layers' fused fast
        # paths (the only place their forwards read a child's weight) are never taken
        return None
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return None
    for read in re.finditer(rf"(\w+)\.{re.escape(attr)}\.(weight|bias)\b", source):
        if _METADATA_READ.match(source, read.end()) or re.search(r"isinstance\(\s*$", source[:read.start()]):
            continue
        return (f"{type(parent).__name__}.forward reads self.{attr}.{read.group(2)} directly, and the layer is "
                "compressed at module level (fx could not trace its parent in both modes alike), so a module-level "
                "mask or quantizer would be bypassed")
    return None


def inside_plan(plan: LayerPlan, module: torch.nn.Module, why: str | None, in_proj: bool) -> LayerPlan:
    """A layer inside a leaf: blocked with a reason, or an attention in-projection whose outputs
    (q, k, v) exist only inside F.multi_head_attention_forward."""
    if why is not None:
        return LayerPlan(**{**plan.__dict__, "blocked": why})
    if in_proj and plan.quant is not None and plan.quant.output is not None:
        note = "the output of the attention in-projection (q, k, v inside F.multi_head_attention_forward)"
        return LayerPlan(**{**plan.__dict__, "unreachable": (*plan.unreachable, note)})
    return _checked(plan, module)


def _module_or_none(gm: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def merged_plan(old: LayerPlan | None, new: LayerPlan | None) -> LayerPlan | None:
    """An earlier compress's plan with the new one added (SPEC §2.9)."""
    if old is None or not old.compressed:
        return new
    if new is None or not new.compressed:
        return old
    for kind in ("prune", "quant"):
        a, b = getattr(old, kind), getattr(new, kind)
        if a is not None and b is not None and a != b:
            raise ConfigError(
                f"config_list[{new.config_index}]: layer {new.name!r} is already {kind}d by an earlier compress "
                f"with different settings ({a} vs {b}); compress the original model with one config instead")
    return LayerPlan(name=new.name, type_name=new.type_name, config_index=new.config_index,
                     overridden=new.overridden, prune=old.prune or new.prune, quant=old.quant or new.quant,
                     leaf=new.leaf)


def _record_reachability(gm: torch.fx.GraphModule) -> None:
    """Note in each plan the weight reads whose consumer is not a visible layer call."""
    unreachable: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        plan = get_plan(node)
        if plan is None or node.op != "get_attr" or not node.target.endswith(".weight"):
            continue
        for user in _consumers(node):
            if layer_weight(user) is None:
                what = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", user.target)
                unreachable.setdefault(plan.name, []).append(f"the read of {node.target} by {what} (node {user.name!r})")
    if not unreachable:
        return
    for node in gm.graph.nodes:
        plan = get_plan(node)
        if plan is not None and plan.name in unreachable:
            node.meta[META_KEY] = LayerPlan(**{**plan.__dict__, "unreachable": tuple(unreachable[plan.name])})


def _consumers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that use a weight read's values, looking through casts such as ``.to(dtype)``;
    reads of its metadata only (``weight.shape``, ``weight.size()``) do not count."""
    out = []
    for user in node.users:
        if user.op == "call_method" and user.target in _TRANSPARENT_METHODS and user.args[0] is node:
            out += _consumers(user)
        elif not _metadata_only(user):
            out.append(user)
    return out


def _metadata_only(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda")
    return node.op == "call_method" and node.target in ("size", "dim", "numel")


def unused_plans(gm: torch.nn.Module, subs: Sequence[SubConfig], graph: torch.fx.Graph,
                 previous: Mapping[str, LayerPlan] | None = None) -> dict[str, LayerPlan]:
    """Plans of the selected layers that the traced forward never calls nor reads (``used=False``)."""
    seen = set(layer_plans(graph))
    called = tuple(f"{n.target}." for n in graph.nodes if n.op == "call_module")  # inside them: used
    out = {}
    for name, module in gm.named_modules():
        if name and name not in seen and compressible_base(module) is not None and not name.startswith(called):
            plan = (previous or {}).get(name) or plan_for(subs, name, module)
            if plan is not None:
                out[name] = LayerPlan(**{**plan.__dict__, "used": False})
    return out
