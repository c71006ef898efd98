"""Quantization pass: insert input / weight / output fake-quant nodes, gated by the step counter."""

from __future__ import annotations

import torch
import torch.fx

from fxcompress.annotations import STEP_COUNTER, LayerPlan, NodeRole, get_plan, get_role, layer_plans, set_role
from fxcompress.attention import CompressedAttention
from fxcompress.layers import CompressedLayer
from fxcompress.passes.annotate import layer_input, layer_weight
from fxcompress.quant import ActivationQuantizer, StepCounter, WeightQuantizer

__all__ = ["add_quantizers", "insert_fake_quant"]


def insert_fake_quant(gm: torch.fx.GraphModule, *, finalize: bool = True) -> torch.fx.GraphModule:
    """Give every layer annotated with quantization its quantizer modules and nodes.

    Quantizers live under the layer (``conv1.input_quantizer``, ``conv1.weight_quantizer``,
    ``conv1.output_quantizer``); one ``fxcompress_step`` counter feeds them all. Every read of
    the weight passes the weight quantizer (after the mask); every visible call of the layer
    passes its input and output through the activation quantizers.

    Args:
        gm: an annotated GraphModule whose compressed layers are functional; edited in place.
    Returns:
        ``gm``. Running it again changes nothing.
    """
    plans = {n: p for n, p in layer_plans(gm.graph).items() if p.quant is not None and p.compressed}
    if plans:
        _insert_quantizers(gm, plans)
    if finalize:  # compress() runs the passes back to back and finalizes once
        gm.graph.lint()
        gm.recompile()
    return gm


def _insert_quantizers(gm: torch.fx.GraphModule, plans: dict[str, LayerPlan]) -> None:
    for name, plan in plans.items():
        owner = gm.get_submodule(name.rpartition(".")[0]) if "." in name else gm
        add_quantizers(gm.get_submodule(name), plan, isinstance(owner, CompressedAttention)
                        and owner.in_proj is gm.get_submodule(name))
    step = _step_node(gm)
    counter = gm.get_submodule(STEP_COUNTER)
    for module in gm.modules():
        if isinstance(module, CompressedLayer) and not hasattr(module, "step"):
            module.attach_step(counter.step)  # layers inside leaf modules read the shared counter
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        if plan is None or plan.quant is None or not plan.compressed:
            continue
        if node.op == "get_attr" and node.target.endswith(".weight") and plan.quant.weight is not None:
            _quantize_read(gm.graph, node, plan.name, step)
        elif layer_weight(node) is not None:
            if plan.quant.input is not None:
                _quantize_input(gm.graph, node, plan.name, step)
            if plan.quant.output is not None:
                _quantize_output(gm.graph, node, plan.name, step)


def add_quantizers(layer: torch.nn.Module, plan: LayerPlan, attention_in_proj: bool) -> None:
    """Give ``layer`` the quantizer modules its plan asks for (those it already has are kept)."""
    quant = plan.quant
    kinds = [("input", ActivationQuantizer), ("weight", WeightQuantizer), ("output", ActivationQuantizer)]
    if attention_in_proj and quant.input is not None:  # cross-attention: key and value are inputs of their own
        kinds += [("key_input", ActivationQuantizer), ("value_input", ActivationQuantizer)]
    for kind, cls in kinds:
        setting = getattr(quant, kind.rpartition("_")[2] if kind.endswith("_input") else kind)
        if setting is not None and not isinstance(getattr(layer, f"{kind}_quantizer", None), cls):
            quantizer = cls(setting, quant.start_step, layer.weight.device).train(layer.training)
            layer.add_module(f"{kind}_quantizer", quantizer)


def _step_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    for node in gm.graph.nodes:
        if get_role(node) == NodeRole("", "step"):
            return node
    if not isinstance(getattr(gm, STEP_COUNTER, None), StepCounter):
        device = next(gm.parameters()).device
        gm.add_module(STEP_COUNTER, StepCounter(device).train(gm.training))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = gm.graph.inserting_after(placeholders[-1]) if placeholders else gm.graph.inserting_before()
    with anchor:
        node = gm.graph.call_module(STEP_COUNTER, ())
    set_role(node, NodeRole("", "step"))
    return node


def _insert_after(graph: torch.fx.Graph, source: torch.fx.Node, layer: str, kind: str,
                  step: torch.fx.Node) -> None:
    """``source`` -> ``<layer>.<kind>(source, step)`` for every user of ``source``."""
    if any(get_role(u) == NodeRole(layer, kind) for u in source.users):
        return  # the pass is idempotent
    with graph.inserting_after(source):
        new = graph.call_module(f"{layer}.{kind}", (source, step))
    set_role(new, NodeRole(layer, kind))
    source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _quantize_read(graph: torch.fx.Graph, read: torch.fx.Node, layer: str, step: torch.fx.Node) -> None:
    masked = [u for u in read.users if get_role(u) == NodeRole(layer, "weight_mask")]
    _insert_after(graph, masked[0] if masked else read, layer, "weight_quantizer", step)


def _quantize_input(graph: torch.fx.Graph, node: torch.fx.Node, layer: str, step: torch.fx.Node) -> None:
    x = layer_input(node)
    if get_role(x) == NodeRole(layer, "input_quantizer"):
        return
    with graph.inserting_before(node):
        new = graph.call_module(f"{layer}.input_quantizer", (x, step))
    set_role(new, NodeRole(layer, "input_quantizer"))
    if node.args:
        node.update_arg(0, new)
    else:
        node.update_kwarg("input", new)


def _quantize_output(graph: torch.fx.Graph, node: torch.fx.Node, layer: str, step: torch.fx.Node) -> None:
    _insert_after(graph, node, layer, "output_quantizer", step)
