"""The one owner of ``node.meta["fxcompress"]``: a frozen LayerPlan per compressible call site."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxcompress.config import PruneSetting, QuantPlan

__all__ = ["META_KEY", "RECORD", "LayerPlan", "LeafPlan", "get_leaf_plan", "get_plan", "layer_plans", "plans_of", "set_plan",
           "type_name_of"]

META_KEY = "fxcompress"
RECORD = "fxcompress_record"


@dataclass(frozen=True)
class LayerPlan:
    """What the config decided for one layer.

    ``config_index`` is the sub-config that applies (None when none selects the layer);
    ``overridden`` the earlier sub-configs that also selected it.
    """

    name: str
    type_name: str
    config_index: int | None
    overridden: tuple[int, ...] = ()
    excluded: bool = False
    prune: PruneSetting | None = None
    quant: QuantPlan | None = None
    leaf: str | None = None

    @property
    def compressed(self) -> bool:
        return self.prune is not None or self.quant is not None


@dataclass(frozen=True)
class LeafPlan:
    """The plans of the layers inside a leaf module the tracer did not enter (``leaf`` is its name)."""

    leaf: str
    layers: tuple[LayerPlan, ...]


def get_plan(node: torch.fx.Node) -> LayerPlan | None:
    """The plan of the layer a node calls, or None (also for a leaf-module call)."""
    plan = node.meta.get(META_KEY)
    return plan if isinstance(plan, LayerPlan) else None


def get_leaf_plan(node: torch.fx.Node) -> LeafPlan | None:
    """The plans of the layers inside the leaf module a node calls, or None."""
    plan = node.meta.get(META_KEY)
    return plan if isinstance(plan, LeafPlan) else None


def set_plan(node: torch.fx.Node, plan: LayerPlan | LeafPlan) -> None:
    """Annotate a node; a node holds at most one plan."""
    assert isinstance(plan, (LayerPlan, LeafPlan))
    node.meta[META_KEY] = plan


def layer_plans(graph: torch.fx.Graph) -> dict[str, LayerPlan]:
    """One plan per layer name, in graph order (a layer called twice appears once).

    Layers inside leaf modules come where their leaf is called.
    """
    plans: dict[str, LayerPlan] = {}
    for node in graph.nodes:
        plan = node.meta.get(META_KEY)
        for layer in plan.layers if isinstance(plan, LeafPlan) else (plan,) if plan is not None else ():
            plans.setdefault(layer.name, layer)
    return plans


def plans_of(gm: torch.nn.Module) -> dict[str, LayerPlan]:
    """The plans of a compressed model: from its graph, or from its record when the graph lost
    its metadata (a GraphModule restored by pickle regenerates its graph from code)."""
    graph = getattr(gm, "graph", None)
    plans = layer_plans(graph) if graph is not None else {}
    if not plans and hasattr(gm, RECORD):
        plans = dict(getattr(gm, RECORD).plans)
    return plans


def type_name_of(module: torch.nn.Module) -> str:
    """The name matching uses for a module's type: ``type(m).__name__`` for torch's own layer classes.

    A user class that only shares a name with a compressible torch class (``my.Linear``) gets its
    qualified name, so it is never mistaken for the class fxcompress knows how to rewrite.
    """
    cls = type(module)
    if cls.__name__ in _TORCH_LAYERS and _TORCH_LAYERS[cls.__name__] is not cls:
        return f"{cls.__module__}.{cls.__qualname__}"
    return cls.__name__


_TORCH_LAYERS = {c.__name__: c for c in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)}
