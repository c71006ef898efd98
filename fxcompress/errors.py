"""The exceptions fxcompress raises for bad input."""

from __future__ import annotations

__all__ = ["ConfigError", "TraceError"]


class ConfigError(ValueError):
    """A config_list (or its use on a model) is invalid.

    The message names the place (``config_list[2]['quant_bits']``), says what was
    expected and how to fix it. Nothing about the model is changed when it is raised.
    """


class TraceError(RuntimeError):
    """torch.fx could not trace the model, even with the automatic leaf fallback."""
