"""Command line: ``python -m fxcompress {plan,demo} ...``.

A user mistake (a mistyped model name, a missing file, a package that is not installed, a bad
config) is one line ``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fxcompress.annotations import plans_of
from fxcompress.api import plan
from fxcompress.config_file import load_config
from fxcompress.errors import ConfigError, TraceError
from fxcompress.pruning import compute_masks
from fxcompress.report import summary

__all__ = ["HF_SMALL_SIZES", "UsageError", "load_model", "main", "plan_table", "small_hf_config"]

#: Sizes given to a Hugging Face config, under each name its config classes use for them (a
#: config takes the ones it has): 2 layers of width 32, 4 heads of 8 (2 key/value heads), MLP 64.
HF_SMALL_SIZES: dict[str, int] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "head_dim": 8, "max_position_embeddings": 64, "image_size": 32, "patch_size": 8,
    "d_ff": 64, "num_decoder_layers": 2, "n_inner": 64, "hidden_dim": 64,  # T5, GPT-2, DistilBERT
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,  # BART and friends
}
_HF_VOCAB = 100  # raised above the config's special token ids (an embedding's padding_idx must fit)
_SOURCES = "'torchvision:NAME', 'timm:NAME', 'hf:ClassName' or 'path/to/file.py:ClassName'"


class UsageError(Exception):
    """A mistake on the command line; ``main`` prints it as one ``error:`` line."""


def load_model(spec: str) -> torch.nn.Module:
    """Build the model ``--model`` names, with random weights (nothing is downloaded).

    Args:
        spec: ``torchvision:NAME`` (``weights=None``), ``timm:NAME`` (``pretrained=False``),
            ``hf:ClassName`` (a transformers model class built from a small config, see
            :data:`HF_SMALL_SIZES`) or ``path/to/file.py:ClassName`` (no-arg constructor).
    Raises:
        UsageError: an unknown name (close names suggested), a missing file, a missing package.

    >>> load_model("hf:BertForSequenceClassification").config.hidden_size  # doctest: +SKIP
    32
    """
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise UsageError(f"--model {spec!r}: expected {_SOURCES}")
    builders: dict[str, Callable[[str], torch.nn.Module]] = {
        "torchvision": _torchvision_model, "timm": _timm_model, "hf": _hf_model}
    if source in builders:
        return builders[source](name)
    return _file_model(Path(source), name)


def _torchvision_model(name: str) -> torch.nn.Module:
    torchvision = _optional("torchvision", f"torchvision:{name}")
    known = torchvision.models.list_models()
    if name not in known:
        raise UsageError(f"--model torchvision:{name}: torchvision has no model {name!r}{_suggest(name, known)}")
    return torchvision.models.get_model(name, weights=None)


def _timm_model(name: str) -> torch.nn.Module:
    timm = _optional("timm", f"timm:{name}")
    if not timm.is_model(name):
        raise UsageError(f"--model timm:{name}: timm has no model {name!r}{_suggest(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False)


def _hf_model(name: str) -> torch.nn.Module:
    transformers = _optional("transformers", f"hf:{name}")
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None:
        known = [n for n in dir(transformers) if n[:1].isupper()]
        raise UsageError(f"--model hf:{name}: transformers has no class {name!r}{_suggest(name, known)}")
    config_class = getattr(cls, "config_class", None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module) or config_class is None:
        raise UsageError(f"--model hf:{name}: not a transformers model class with a config_class "
                         "(use a concrete class such as BertForSequenceClassification, not an Auto* class)")
    try:
        return cls(small_hf_config(config_class))
    except Exception as err:  # a config the small sizes do not fit: say which, in one line
        raise UsageError(f"--model hf:{name}: could not build it from a small config: "
                         f"{type(err).__name__}: {_one_line(err)}") from None


def small_hf_config(config_class: type) -> Any:
    """A ``config_class`` instance with :data:`HF_SMALL_SIZES` for the fields it has; a composite
    config (CLIP: ``text_config``, ``vision_config``) gets small concrete sub-configs too."""
    kwargs: dict[str, Any] = _small_fields(config_class)
    for key, sub in getattr(config_class, "sub_configs", {}).items():
        if hasattr(sub, "model_type"):  # a concrete config class (AutoConfig sub-configs keep their defaults)
            kwargs[key] = _small_fields(sub)
    return config_class(**kwargs)


def _small_fields(config_class: type) -> dict[str, Any]:
    default = config_class()
    fields = {k: v for k, v in HF_SMALL_SIZES.items() if hasattr(default, k)}
    if hasattr(default, "vocab_size"):
        ids = (getattr(default, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                    "decoder_start_token_id"))
        fields["vocab_size"] = max([_HF_VOCAB] + [i + 1 for i in ids if isinstance(i, int)])
    return fields


def _file_model(path: Path, name: str) -> torch.nn.Module:
    if not path.is_file():
        raise UsageError(f"--model {path}:{name}: no file {path} (expected {_SOURCES})")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        known = [n for n in vars(module) if not n.startswith("_")]
        raise UsageError(f"--model {path}:{name}: {path} defines no {name!r}{_suggest(name, known)}")
    return getattr(module, name)()


def _optional(package: str, spec: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UsageError(f"--model {spec}: the {package} package is not installed; "
                         f"run `pip install {package}`") from None


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def plan_table(model: torch.nn.Module, config_list: Any, strict: bool = True) -> str:
    """The plan table of a dry run: trace and annotate a copy of ``model``, and compute (not install)
    the masks, so the sparsity column shows what ``compress`` prunes in each layer (a ``total_sparsity``
    sub-config's allocation included). ``model`` is not changed.

    Raises:
        ConfigError: a bad config, or caps that cannot hold a ``total_sparsity``.
    """
    gm = plan(model, config_list, strict=strict)
    return summary(gm, allocated=compute_masks(gm, plans_of(gm)))


def _plan(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    config_list = load_config(args.config)
    torch.manual_seed(0)  # random weights, but the same table on every run
    print(plan_table(load_model(args.model), config_list, strict=not args.no_strict))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fxcompress.demo import run_demo

    run_demo(quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 after an ``error:`` line)."""
    parser = argparse.ArgumentParser(prog="python -m fxcompress",
                                     description="NNI-style model compression as a torch.fx pass.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    plan_verb = verbs.add_parser("plan", help="print the per-layer plan table for a model and a config file "
                                              "(a dry run: the model is traced and annotated and its masks "
                                              "computed, nothing is trained)")
    plan_verb.add_argument("--model", required=True, help=_SOURCES.replace("'", ""))
    plan_verb.add_argument("--config", required=True, help="config_list as .json or .yaml")
    plan_verb.add_argument("--no-strict", action="store_true", help="warn instead of failing on model mismatches")
    plan_verb.set_defaults(run=_plan)
    demo = verbs.add_parser("demo", help="the spec's example model and configs end to end on the digits data")
    demo.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except (UsageError, ConfigError, TraceError) as err:
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A warning is one ``warning:`` line too (no source line of the library under it)."""
    print(f"warning: {_one_line(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
