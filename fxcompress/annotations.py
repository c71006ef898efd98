"""The one owner of ``node.meta["fxcompress"]``: a frozen LayerPlan per layer read, a NodeRole per added node."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxcompress.settings import PruneSetting, QuantPlan

__all__ = ["META_KEY", "RECORD", "STEP_COUNTER", "LayerPlan", "LeafPlan", "NodeRole", "get_leaf_plan", "get_plan",
           "get_role", "layer_plans", "plans_of", "set_plan", "set_role"]

META_KEY = "fxcompress"
RECORD = "fxcompress_record"
STEP_COUNTER = "fxcompress_step"

@dataclass(frozen=True)
class LayerPlan:
    """What the config decided for one layer.

    ``config_index`` is the sub-config that applies (None when none selects the layer);
    ``overridden`` the earlier sub-configs that also selected it. ``used`` is False for a
    layer the traced forward never calls nor reads; ``unreachable`` describes the reads of its
    weight whose input fxcompress cannot see (input/output quantization skipped there).
    ``folds_bn`` names the BatchNorm whose scale the layer's weight quantizer sees folded in
    (Conv-BN folding for QAT, ``fxcompress.folding``).
    """

    name: str
    type_name: str
    config_index: int | None
    overridden: tuple[int, ...] = ()
    excluded: bool = False
    prune: PruneSetting | None = None
    quant: QuantPlan | None = None
    leaf: str | None = None
    used: bool = True
    unreachable: tuple[str, ...] = ()
    blocked: str | None = None
    folds_bn: str | None = None

    @property
    def compressed(self) -> bool:
        """True when the model computes this layer compressed (what ``compress`` rewrites)."""
        return self.used and self.blocked is None and (self.prune is not None or self.quant is not None)


@dataclass(frozen=True)
class LeafPlan:
    """The plans of the layers inside a leaf module the tracer did not enter (``leaf`` is its name)."""

    leaf: str
    layers: tuple[LayerPlan, ...]


@dataclass(frozen=True)
class NodeRole:
    """What a node that a pass added does for a layer: ``kind`` is one of ``weight_mask``,
    ``bias_mask``, ``weight_quantizer``, ``input_quantizer``, ``output_quantizer`` or ``step``."""

    layer: str
    kind: str


def get_plan(node: torch.fx.Node) -> LayerPlan | None:
    """The plan of the layer a node calls or reads, or None (also for a leaf-module call)."""
    plan = node.meta.get(META_KEY)
    return plan if isinstance(plan, LayerPlan) else None


def get_leaf_plan(node: torch.fx.Node) -> LeafPlan | None:
    """The plans of the layers inside the leaf module a node calls, or None."""
    plan = node.meta.get(META_KEY)
    return plan if isinstance(plan, LeafPlan) else None


def get_role(node: torch.fx.Node) -> NodeRole | None:
    """The role of a node a pass added, or None."""
    role = node.meta.get(META_KEY)
    return role if isinstance(role, NodeRole) else None


def set_plan(node: torch.fx.Node, plan: LayerPlan | LeafPlan) -> None:
    """Annotate a node; a node holds at most one plan."""
    assert isinstance(plan, (LayerPlan, LeafPlan))
    node.meta[META_KEY] = plan


def set_role(node: torch.fx.Node, role: NodeRole) -> None:
    """Mark a node a pass added with what it does."""
    node.meta[META_KEY] = role


def layer_plans(graph: torch.fx.Graph) -> dict[str, LayerPlan]:
    """One plan per layer name, in graph order (a layer called twice appears once).

    Layers inside leaf modules come where their leaf is called.
    """
    plans: dict[str, LayerPlan] = {}
    for node in graph.nodes:
        plan = node.meta.get(META_KEY)
        for layer in plan.layers if isinstance(plan, LeafPlan) else (plan,) if isinstance(plan, LayerPlan) else ():
            plans.setdefault(layer.name, layer)
    return plans


def plans_of(gm: torch.nn.Module) -> dict[str, LayerPlan]:
    """The plans of a compressed model, unused layers included: from its record when it has one
    (it survives pickling, which drops node metadata), else from its graph."""
    if hasattr(gm, RECORD):
        return dict(getattr(gm, RECORD).plans)
    graph = getattr(gm, "graph", None)
    return layer_plans(graph) if graph is not None else {}
