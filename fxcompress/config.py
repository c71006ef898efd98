"""Parse a config_list into frozen sub-configs; every ConfigError about the list is raised here."""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from fxcompress.errors import ConfigError, caller_stacklevel
from fxcompress.layer_types import NOT_SUPPORTED
from fxcompress.settings import (
    COMPRESSIBLE_TYPES,
    CRITERIA,
    DEFAULT_DTYPE,
    DEFAULT_SCHEME,
    DTYPES,
    KNOWN_TYPE_NAMES,
    QUANT_TYPES,
    SCHEMES,
    PruneSetting,
    QuantPlan,
    QuantSetting,
    SubConfig,
    suggest_type_name,
)

__all__ = ["VALID_KEYS", "parse_config"]

_SELECTOR_KEYS = ("op_types", "op_names", "op_partial_names")
_PRUNE_KEYS = ("sparsity_per_layer", "total_sparsity", "sparsity", "max_sparsity_per_layer",
               "criterion", "granularity", "seed")
_QUANT_KEYS = ("quant_types", "quant_bits", "quant_start_step", "quant_scheme", "quant_dtype", "quant_reduce_range")
VALID_KEYS = _SELECTOR_KEYS + ("exclude",) + _PRUNE_KEYS + _QUANT_KEYS


def parse_config(config_list: Any) -> tuple[SubConfig, ...]:
    """Validate a config_list and turn it into frozen :class:`SubConfig` objects.

    Args:
        config_list: a list of dicts, as in NNI's config specification.
    Returns:
        One SubConfig per dict, in order.
    Raises:
        ConfigError: the first problem found, naming ``config_list[i]['key']``.

    >>> parse_config([{'op_types': ['Conv2d'], 'sparsity_per_layer': 0.5}])[0].prune.sparsity_per_layer
    0.5
    """
    if isinstance(config_list, (str, bytes, Mapping)) or not isinstance(config_list, Sequence):
        raise ConfigError(f"config_list: expected a list of dicts, got {type(config_list).__name__}; "
                          "wrap a single sub-config in a list: [{...}]")
    if len(config_list) == 0:
        raise ConfigError("config_list: the list is empty; add at least one sub-config such as "
                          "{'op_types': ['default'], 'sparsity_per_layer': 0.5}")
    return tuple(_parse_sub(i, raw) for i, raw in enumerate(config_list))


def _parse_sub(index: int, raw: Any) -> SubConfig:
    where = f"config_list[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a dict, got {type(raw).__name__}")
    for key in raw:
        if key not in VALID_KEYS:
            close = difflib.get_close_matches(str(key), VALID_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(VALID_KEYS)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    selectors = {k: _parse_selector(where, k, raw[k]) for k in _SELECTOR_KEYS if k in raw}
    if not selectors:
        raise ConfigError(f"{where}: no selector; add 'op_types', 'op_names' or 'op_partial_names' "
                          "to say which layers this sub-config is for")
    exclude = _parse_exclude(where, raw)
    prune = _parse_prune(where, raw)
    quant = _parse_quant(where, raw)
    return SubConfig(index=index, exclude=exclude, prune=prune, quant=quant, **selectors)


def _parse_selector(where: str, key: str, value: Any) -> tuple[str, ...]:
    place = f"{where}['{key}']"
    if isinstance(value, str):
        raise ConfigError(f"{place}: expected a list of strings, got the bare string {value!r}; "
                          f"write [{value!r}]")
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{place}: expected a list of non-empty strings, got {value!r}")
    if len(value) == 0:
        raise ConfigError(f"{place}: the list is empty and would select nothing; "
                          "remove the key or name at least one entry")
    if key == "op_types":
        for name in value:
            _check_type_name(place, name)
        if "default" in value:
            value = list(dict.fromkeys([t for t in value if t != "default"] + list(COMPRESSIBLE_TYPES)))
    return tuple(value)


def _check_type_name(place: str, name: str) -> None:
    """Reject an ``op_types`` entry that cannot be a class name, or a wrong-case compressible type.

    Any other class name parses (SPEC.md §2.1: a subclass answers to its own name); whether the
    model has a layer of that type is checked against the model, in ``matching``.
    """
    if name in NOT_SUPPORTED:
        raise ConfigError(f"{place}: {name!r} cannot be compressed: {NOT_SUPPORTED[name]}")
    hint = suggest_type_name(name)
    if not all(part.isidentifier() for part in name.split(".")):
        fix = f"did you mean '{hint}'? " if hint else ""
        raise ConfigError(f"{place}: {name!r} is not a layer class name (expected an identifier such as "
                          f"'Conv2d', or a qualified name such as 'torch.nn.Conv2d'); {fix}"
                          f"fxcompress compresses {', '.join(COMPRESSIBLE_TYPES)} or 'default'")
    if name not in KNOWN_TYPE_NAMES and name.lower() in {k.lower() for k in KNOWN_TYPE_NAMES}:
        raise ConfigError(f"{place}: {name!r} is not a layer type name (class names are case-sensitive); "
                          f"did you mean '{hint}'?")


def _parse_exclude(where: str, raw: Mapping[str, Any]) -> bool:
    if "exclude" not in raw:
        return False
    if raw["exclude"] is not True:
        raise ConfigError(f"{where}['exclude']: expected True, got {raw['exclude']!r}; "
                          "remove the key to compress the selected layers")
    clash = [k for k in _PRUNE_KEYS + _QUANT_KEYS if k in raw]
    if clash:
        raise ConfigError(f"{where}: 'exclude' cannot be combined with {clash[0]!r} (the spec makes them "
                          "exclusive); put the settings in a separate sub-config")
    return True


def _ratio(place: str, value: Any, low_open: bool, high_closed: bool) -> float:
    lo, hi = ("(0" if low_open else "[0"), ("1]" if high_closed else "1)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{place}: expected a number in {lo}, {hi}, got {value!r}")
    ok_lo = value > 0 if low_open else value >= 0
    ok_hi = value <= 1 if high_closed else value < 1
    if not (ok_lo and ok_hi):
        raise ConfigError(f"{place}: expected a number in {lo}, {hi}, got {value!r}")
    return float(value)


def _parse_prune(where: str, raw: Mapping[str, Any]) -> PruneSetting | None:
    if not any(k in raw for k in _PRUNE_KEYS):
        return None
    if "sparsity" in raw:
        if "sparsity_per_layer" in raw:
            raise ConfigError(f"{where}: 'sparsity' and 'sparsity_per_layer' are the same setting; "
                              "keep only 'sparsity_per_layer'")
        warnings.warn(f"{where}['sparsity'] is the pruning-v1 name of 'sparsity_per_layer' and will be "
                      "removed; rename the key", FutureWarning, stacklevel=caller_stacklevel())
    per_layer_key = "sparsity_per_layer" if "sparsity_per_layer" in raw else "sparsity"
    if per_layer_key in raw and "total_sparsity" in raw:
        raise ConfigError(f"{where}: {per_layer_key!r} and 'total_sparsity' exclude each other; "
                          "keep one (or use two sub-configs)")
    per_layer = total = cap = None
    if per_layer_key in raw:
        per_layer = _ratio(f"{where}['{per_layer_key}']", raw[per_layer_key], False, False)
    if "total_sparsity" in raw:
        total = _ratio(f"{where}['total_sparsity']", raw["total_sparsity"], False, False)
    if "max_sparsity_per_layer" in raw:
        if total is None:
            raise ConfigError(f"{where}['max_sparsity_per_layer']: only meaningful with 'total_sparsity'; "
                              "add 'total_sparsity' or remove the cap")
        cap = _parse_cap(f"{where}['max_sparsity_per_layer']", raw["max_sparsity_per_layer"])
    setting = PruneSetting(per_layer, total, cap, _parse_criterion(where, raw),
                           _parse_granularity(where, raw), _parse_seed(where, raw))
    _check_prune_combination(where, setting)
    return setting


def _parse_cap(place: str, value: Any) -> float | tuple[tuple[str, float], ...]:
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{place}: expected a non-empty dict of layer name -> ratio, got {value!r}")
        return tuple((k, _ratio(f"{place}[{k!r}]", v, True, True)) for k, v in value.items())
    return _ratio(place, value, True, True)


def _parse_criterion(where: str, raw: Mapping[str, Any]) -> str:
    value = raw.get("criterion", "level")
    if value not in CRITERIA:
        raise ConfigError(f"{where}['criterion']: expected one of {', '.join(CRITERIA)}, got {value!r}")
    return value


def _parse_granularity(where: str, raw: Mapping[str, Any]) -> str:
    value = raw.get("granularity", "element")
    if value in ("element", "out_channel"):
        return value
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]):
        return f"{int(parts[0])}:{int(parts[1])}"
    raise ConfigError(f"{where}['granularity']: expected 'element', 'out_channel' or 'N:M' with "
                      f"0 < N < M (e.g. '2:4'), got {value!r}")


def _parse_seed(where: str, raw: Mapping[str, Any]) -> int:
    value = raw.get("seed", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}['seed']: expected an int >= 0, got {value!r}")
    return value


def _check_prune_combination(where: str, s: PruneSetting) -> None:
    if s.n_m is not None:
        n, m = s.n_m
        if s.sparsity_per_layer is not None or s.total_sparsity is not None:
            raise ConfigError(f"{where}['granularity']: '{n}:{m}' fixes the sparsity at {m - n}/{m}; "
                              "remove 'sparsity_per_layer' / 'total_sparsity'")
    elif s.sparsity_per_layer is None and s.total_sparsity is None:
        raise ConfigError(f"{where}: pruning keys without a sparsity; add 'sparsity_per_layer' or "
                          "'total_sparsity'")
    if s.total_sparsity is not None and s.granularity != "element":
        raise ConfigError(f"{where}['granularity']: 'total_sparsity' ranks single weights globally and "
                          f"needs granularity 'element', got {s.granularity!r}; use 'sparsity_per_layer'")
    if s.criterion == "taylor" and s.n_m is not None:
        raise ConfigError(f"{where}['criterion']: 'taylor' does not combine with granularity '{s.granularity}' "
                          "(an N:M pattern keeps the largest |w| of each block); use granularity 'element' or "
                          "'out_channel' with 'sparsity_per_layer', or drop 'criterion'")
    if s.criterion == "fpgm" and s.granularity != "out_channel":
        raise ConfigError(f"{where}['criterion']: 'fpgm' ranks whole filters; add "
                          "'granularity': 'out_channel'")


def _parse_quant(where: str, raw: Mapping[str, Any]) -> QuantPlan | None:
    if "quant_types" not in raw:
        for key in _QUANT_KEYS[1:]:
            if key in raw:
                raise ConfigError(f"{where}[{key!r}]: only meaningful with 'quant_types'; add "
                                  "'quant_types': ['input', 'weight'] or remove the key")
        return None
    types = _parse_quant_types(f"{where}['quant_types']", raw["quant_types"])
    if "quant_bits" not in raw:
        raise ConfigError(f"{where}: 'quant_types' needs 'quant_bits'; add e.g. 'quant_bits': 8")
    bits = _per_type(f"{where}['quant_bits']", raw["quant_bits"], types, None, _check_bits)
    schemes = _per_type(f"{where}['quant_scheme']", raw.get("quant_scheme"), types, DEFAULT_SCHEME,
                        _choice(SCHEMES), partial=True)
    _check_activation_schemes(f"{where}['quant_scheme']", raw.get("quant_scheme"), schemes)
    dtypes = _per_type(f"{where}['quant_dtype']", raw.get("quant_dtype"), types, DEFAULT_DTYPE,
                       _choice(DTYPES), partial=True)
    start = raw.get("quant_start_step", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"{where}['quant_start_step']: expected an int >= 0, got {start!r}")
    reduce_range = _parse_reduce_range(f"{where}['quant_reduce_range']", raw.get("quant_reduce_range", False),
                                       bits, dtypes)
    settings = {t: QuantSetting(bits[t], schemes[t], dtypes[t], reduce_range and t != "weight") for t in types}
    return QuantPlan(settings.get("weight"), settings.get("input"), settings.get("output"), start)


def _parse_reduce_range(place: str, value: Any, bits: Mapping[str, int], dtypes: Mapping[str, str]) -> bool:
    """``quant_reduce_range``: activations (input, output) use the levels of one bit fewer; weights keep theirs."""
    if not isinstance(value, bool):
        raise ConfigError(f"{place}: expected True or False, got {value!r}")
    for t in ("input", "output"):
        if value and t in bits and dtypes[t] == "int" and bits[t] < 3:
            raise ConfigError(f"{place}: a {bits[t]}-bit 'int' {t} has no levels left after reducing its range "
                              f"(-(2^(b-2)-1)..2^(b-2)-1); use at least 3 bits or drop the key")
    return value


def _parse_quant_types(place: str, value: Any) -> tuple[str, ...]:
    types = [value] if isinstance(value, str) else value
    if not isinstance(types, Sequence) or not types:
        raise ConfigError(f"{place}: expected a non-empty list of 'weight', 'input', 'output', got {value!r}")
    for t in types:
        if t not in QUANT_TYPES:
            close = difflib.get_close_matches(str(t), QUANT_TYPES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{place}: unknown quantization type {t!r}{hint} "
                              "(expected 'weight', 'input' or 'output')")
    if len(set(types)) != len(types):
        raise ConfigError(f"{place}: repeated entries in {list(types)!r}; list each type once")
    if ("weight" in types) != ("input" in types):
        raise ConfigError(f"{place}: 'weight' and 'input' are always quantized together (spec); "
                          "write ['input', 'weight']")
    return tuple(types)


def _check_activation_schemes(place: str, value: Any, schemes: Mapping[str, str]) -> None:
    """Reject a per-channel scheme for an activation: inputs and outputs are quantized per tensor."""
    for t in ("input", "output"):
        scheme = schemes.get(t, "")
        if not scheme.startswith("per_channel"):
            continue
        per_tensor = scheme.replace("per_channel", "per_tensor")
        if isinstance(value, Mapping):
            raise ConfigError(f"{place}[{t!r}]: {scheme!r}: activations are quantized per tensor; "
                              f"use {per_tensor!r} (only 'weight' can be quantized per channel)")
        fix = (f"write {{'weight': {scheme!r}}} to quantize the weight per channel and keep the "
               f"activations' default, or {{'weight': {scheme!r}, {t!r}: {per_tensor!r}}}"
               if "weight" in schemes else f"use {per_tensor!r}")
        raise ConfigError(f"{place}: {scheme!r} applies to {t!r}, but activations are quantized per "
                          f"tensor; {fix}")


def _check_bits(place: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
        raise ConfigError(f"{place}: expected an int bit width in 2..16, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Any:
    def check(place: str, value: Any) -> str:
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{place}: expected one of {', '.join(options)}, got {value!r}{hint}")
        return value

    return check


def _per_type(place: str, value: Any, types: tuple[str, ...], defaults: Mapping[str, Any] | None,
              check: Any, partial: bool = False) -> dict[str, Any]:
    """Expand a scalar-or-dict key into one checked value per quantized type."""
    if value is None:
        return {t: defaults[t] for t in types} if defaults else {}
    if not isinstance(value, Mapping):
        return {t: check(place, value) for t in types}
    keys = set(value)
    if keys - set(types) or (not partial and keys != set(types)):
        raise ConfigError(f"{place}: dict keys {sorted(keys)} must {'be among' if partial else 'equal'} "
                          f"quant_types {list(types)}")
    out = {t: defaults[t] for t in types} if defaults else {}
    out.update({t: check(f"{place}[{t!r}]", v) for t, v in value.items()})
    return out
