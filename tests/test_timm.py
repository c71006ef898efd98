"""timm models (issue 10, item 4): both modes with all-ones masks, every used Conv2d/Linear compressed,
QAT before quant_start_step equal to float, two training steps. The checks are in tests/timm_models.py."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import timm

from .timm_models import FAST, SWEEP, check


def assert_outcome(name: str) -> None:
    out = check(name)
    print(json.dumps(asdict(out)))  # the counts behind the verdict (pytest -s / -rP shows them)
    assert out.ok, f"{name}: " + "; ".join(f"[{k}] {v}" for k, v in out.failures.items())
    assert out.used > 0 and out.compressed == out.used, out


@pytest.mark.parametrize("name", FAST)
def test_timm_fast_subset(name: str) -> None:
    assert_outcome(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_timm_sweep(name: str) -> None:
    assert_outcome(name)


def test_model_lists_name_real_timm_models() -> None:
    names = FAST + SWEEP
    assert len(set(names)) == len(names)
    assert not set(names) - set(timm.list_models())
    assert len(names) >= 60
