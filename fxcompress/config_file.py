"""Read a config_list from a JSON or YAML file (validation is :func:`fxcompress.config.parse_config`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fxcompress.errors import ConfigError

__all__ = ["load_config"]


def load_config(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a config_list from a ``.json`` or ``.yaml``/``.yml`` file.

    Args:
        path: the file. YAML needs PyYAML installed. A top-level dict with a
            ``config_list`` key is unwrapped.
    Returns:
        The raw config_list (validate it with :func:`fxcompress.config.parse_config` or pass it
        to ``compress``).
    Raises:
        ConfigError: the file cannot be read as a config list.

    >>> load_config("cfg.json")  # doctest: +SKIP
    [{'op_types': ['Conv2d'], 'sparsity_per_layer': 0.5}]
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML; run `pip install pyyaml` "
                              "or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if isinstance(data, Mapping) and "config_list" in data:
        data = data["config_list"]
    return data
