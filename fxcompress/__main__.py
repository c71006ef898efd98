"""Command line: ``python -m fxcompress {plan,demo} ...``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from fxcompress.api import plan
from fxcompress.config_file import load_config
from fxcompress.errors import ConfigError, TraceError
from fxcompress.report import summary

__all__ = ["load_model", "main"]


def load_model(spec: str) -> torch.nn.Module:
    """``torchvision:NAME`` (built with weights=None) or ``path/to/file.py:ClassName`` (no-arg constructor)."""
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise SystemExit(f"--model {spec!r}: expected 'torchvision:NAME' or 'path/to/file.py:ClassName'")
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    path = Path(source)
    if not path.is_file():
        raise SystemExit(f"--model {spec!r}: no file {source}")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"--model {spec!r}: {source} defines no {name}")
    return getattr(module, name)()


def _plan(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    gm = plan(model, load_config(args.config), strict=not args.no_strict)
    print(summary(gm))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fxcompress.demo import run_demo

    run_demo(quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fxcompress",
                                     description="NNI-style model compression as a torch.fx pass.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser("plan", help="print the per-layer plan table for a model and a config file "
                                         "(a dry run: the model is traced and annotated, nothing is trained)")
    plan.add_argument("--model", required=True, help="torchvision:NAME or path/to/file.py:ClassName")
    plan.add_argument("--config", required=True, help="config_list as .json or .yaml")
    plan.add_argument("--no-strict", action="store_true", help="warn instead of failing on model mismatches")
    plan.set_defaults(run=_plan)
    demo = verbs.add_parser("demo", help="the spec's example model and configs end to end on the digits data")
    demo.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, TraceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
