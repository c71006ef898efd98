"""Quantization pass: insert input / weight / output fake-quant nodes, gated by the step counter."""

from __future__ import annotations

import torch
import torch.fx

from fxcompress.annotations import LayerPlan, get_plan, layer_plans
from fxcompress.layers import CompressedLayer
from fxcompress.quant import ActivationQuantizer, StepCounter, WeightQuantizer

__all__ = ["STEP_COUNTER", "insert_fake_quant"]

STEP_COUNTER = "fxcompress_step"


def insert_fake_quant(gm: torch.fx.GraphModule, *, finalize: bool = True) -> torch.fx.GraphModule:
    """Give every layer annotated with quantization its quantizer modules and nodes.

    Quantizers live under the layer (``conv1.input_quantizer``, ``conv1.weight_quantizer``,
    ``conv1.output_quantizer``); one ``fxcompress_step`` counter feeds them all.

    Args:
        gm: an annotated GraphModule whose compressed layers are functional; edited in place.
    Returns:
        ``gm``. Running it again changes nothing.
    """
    plans = {n: p for n, p in layer_plans(gm.graph).items() if p.quant is not None}
    if plans:
        _insert_quantizers(gm, plans)
    if finalize:  # compress() runs the passes back to back and finalizes once
        gm.graph.lint()
        gm.recompile()
    return gm


def _insert_quantizers(gm: torch.fx.GraphModule, plans: dict[str, LayerPlan]) -> None:
    for name, plan in plans.items():
        _add_quantizers(gm.get_submodule(name), plan)
    step = _step_node(gm)
    counter = gm.get_submodule(STEP_COUNTER)
    for name in plans:
        layer = gm.get_submodule(name)
        if isinstance(layer, CompressedLayer) and not hasattr(layer, "step"):
            layer.attach_step(counter.step)  # layers inside leaf modules read the shared counter
    for node in list(gm.graph.nodes):
        plan = get_plan(node)
        if node.op != "call_function" or plan is None or plan.quant is None:
            continue
        for kind, index in (("input", 0), ("weight", 1)):
            if getattr(plan.quant, kind) is not None:
                _quantize_arg(gm.graph, node, index, f"{plan.name}.{kind}_quantizer", step)
        if plan.quant.output is not None:
            _quantize_output(gm.graph, node, f"{plan.name}.output_quantizer", step)


def _add_quantizers(layer: torch.nn.Module, plan: LayerPlan) -> None:
    quant = plan.quant
    for kind, cls in (("input", ActivationQuantizer), ("weight", WeightQuantizer),
                      ("output", ActivationQuantizer)):
        setting = getattr(quant, kind)
        if setting is not None and not hasattr(layer, f"{kind}_quantizer"):
            quantizer = cls(setting, quant.start_step, layer.weight.device).train(layer.training)
            layer.add_module(f"{kind}_quantizer", quantizer)


def _step_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == STEP_COUNTER:
            return node
    if not hasattr(gm, STEP_COUNTER):
        device = next(gm.parameters()).device
        gm.add_module(STEP_COUNTER, StepCounter(device).train(gm.training))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = gm.graph.inserting_after(placeholders[-1]) if placeholders else gm.graph.inserting_before()
    with anchor:
        return gm.graph.call_module(STEP_COUNTER, ())


def _quantize_arg(graph: torch.fx.Graph, node: torch.fx.Node, index: int, target: str,
                  step: torch.fx.Node) -> None:
    arg = node.args[index]
    if arg.op == "call_module" and arg.target == target:
        return
    with graph.inserting_before(node):
        node.update_arg(index, graph.call_module(target, (arg, step)))


def _quantize_output(graph: torch.fx.Graph, node: torch.fx.Node, target: str, step: torch.fx.Node) -> None:
    if any(u.op == "call_module" and u.target == target for u in node.users):
        return
    with graph.inserting_after(node):
        quantized = graph.call_module(target, (node, step))
    node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
