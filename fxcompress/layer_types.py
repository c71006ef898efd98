"""Which modules fxcompress can compress, and the type names ``op_types`` matches (SPEC §2.1). No torch.fx."""

from __future__ import annotations

import torch

__all__ = ["NOT_SUPPORTED", "TORCH_LAYERS", "compressible_base", "has_own_forward", "type_name_of", "type_names_of"]

#: The torch layer classes fxcompress rewrites; a subclass of one is compressible too (SPEC §2.1).
TORCH_LAYERS: tuple[type[torch.nn.Module], ...] = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                                                   torch.nn.Linear)


#: Layer classes of model libraries that users ask for and fxcompress does not compress, and why.
NOT_SUPPORTED: dict[str, str] = {
    "Conv1D": ("Hugging Face's Conv1D (GPT-2's attention and MLP projections) is a Linear whose weight is stored "
               "transposed, (in_features, out_features), and fxcompress does not compress it; GPT-2's lm_head is an "
               "nn.Linear and can be selected with 'Linear'"),
}


def compressible_base(module: torch.nn.Module) -> type[torch.nn.Module] | None:
    """The torch layer class a module is or derives from (Conv1d/2d/3d, Linear), or None."""
    own = getattr(module, "compressed_base", None)  # a CompressedLayer stands in for its layer
    if isinstance(own, str):
        return {c.__name__: c for c in TORCH_LAYERS}[own]
    for cls in type(module).__mro__:
        if cls in TORCH_LAYERS:
            return cls
    return None


def has_own_forward(module: torch.nn.Module) -> bool:
    """True for a subclass of a torch layer that overrides ``forward`` (timm's ``Conv2dSame``)."""
    base = compressible_base(module)
    return base is not None and type(module).forward is not base.forward and not hasattr(module, "compressed_base")


def type_name_of(module: torch.nn.Module) -> str:
    """The class name shown for a module: ``type(m).__name__``, qualified when it merely shares
    the name of a torch layer class without deriving from it (a user's own ``Linear``)."""
    names = getattr(module, "type_names", None)
    if isinstance(names, tuple):
        return names[0]
    cls = type(module)
    known = {c.__name__ for c in TORCH_LAYERS}
    if cls.__name__ in known and compressible_base(module) is None:
        return f"{cls.__module__}.{cls.__qualname__}"
    return cls.__name__


def type_names_of(module: torch.nn.Module) -> tuple[str, ...]:
    """The names ``op_types`` matches (SPEC §2.1): the class's own name and its torch base's name."""
    names = getattr(module, "type_names", None)
    if isinstance(names, tuple):
        return names
    own = type_name_of(module)
    base = compressible_base(module)
    return (own,) if base is None or base.__name__ == own else (own, base.__name__)
