"""The exceptions fxcompress raises for bad input, and where its warnings point."""

from __future__ import annotations

import os
import sys

__all__ = ["ConfigError", "TraceError", "caller_stacklevel"]

_PACKAGE_DIRS = (os.path.dirname(__file__), os.path.join(os.path.dirname(os.path.dirname(__file__)), "passes"))


class ConfigError(ValueError):
    """A config_list (or its use on a model) is invalid.

    The message names the place (``config_list[2]['quant_bits']``), says what was
    expected and how to fix it. Nothing about the model is changed when it is raised.
    """


class TraceError(RuntimeError):
    """torch.fx could not trace the model, even with the automatic leaf fallback.

    ``module`` is the qualified name of the module that could not be traced (``""``: the
    top-level forward), or None when unknown.
    """

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


def caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside fxcompress, so warnings point at user code.

    Returns:
        The value to pass as ``warnings.warn(..., stacklevel=caller_stacklevel())``.

    >>> import warnings
    >>> warnings.warn("x", UserWarning, stacklevel=caller_stacklevel())  # doctest: +SKIP
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename).startswith(_PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1
    return level
