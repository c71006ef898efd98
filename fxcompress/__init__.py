"""fxcompress: NNI's compression config spec as a torch.fx graph-transform pass."""

from fxcompress.api import compress, plan, select, trace
from fxcompress.config import parse_config
from fxcompress.config_file import load_config
from fxcompress.deploy import convert, export_model, export_onnx, finalize
from fxcompress.distributed import sync_ranges
from fxcompress.errors import ConfigError, TraceError
from fxcompress.int8 import ConvertError
from fxcompress.report import calibration, report, summary
from fxcompress.shrinking import SpeedupError, speedup, speedup_from_state_dict
from fxcompress.training import (
    SparsityScheduler,
    apply_masks,
    attach_optimizer,
    get_step,
    masks,
    set_step,
    update_masks,
)

__all__ = [
    "ConfigError",
    "ConvertError",
    "SparsityScheduler",
    "SpeedupError",
    "TraceError",
    "apply_masks",
    "attach_optimizer",
    "calibration",
    "compress",
    "convert",
    "export_model",
    "export_onnx",
    "finalize",
    "get_step",
    "load_config",
    "masks",
    "parse_config",
    "plan",
    "report",
    "select",
    "set_step",
    "summary",
    "speedup",
    "speedup_from_state_dict",
    "sync_ranges",
    "trace",
    "update_masks",
]
