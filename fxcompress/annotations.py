"""The one owner of ``node.meta["fxcompress"]``: a frozen LayerPlan per compressible call site."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxcompress.config import PruneSetting, QuantPlan

__all__ = ["META_KEY", "LayerPlan", "get_plan", "layer_plans", "set_plan", "type_name_of"]

META_KEY = "fxcompress"


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

    @property
    def compressed(self) -> bool:
        return self.prune is not None or self.quant is not None


def get_plan(node: torch.fx.Node) -> LayerPlan | None:
    """The plan annotated on a node, or None."""
    return node.meta.get(META_KEY)


def set_plan(node: torch.fx.Node, plan: LayerPlan) -> None:
    """Annotate a node; a node holds at most one plan."""
    assert isinstance(plan, LayerPlan)
    node.meta[META_KEY] = plan


def layer_plans(graph: torch.fx.Graph) -> dict[str, LayerPlan]:
    """One plan per layer name, in graph order (a layer called twice appears once)."""
    plans: dict[str, LayerPlan] = {}
    for node in graph.nodes:
        plan = get_plan(node)
        if plan is not None:
            plans.setdefault(plan.name, plan)
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
