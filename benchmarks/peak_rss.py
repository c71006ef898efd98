"""Peak resident memory of five training steps, in a fresh process per variant (issue 13).

    python -m benchmarks.peak_rss MODEL VARIANT     # MODEL: seed, resnet18, mobilenet_v3_small, mlp
                                                    # VARIANT: plain, qat (pooled buffers), qat-fresh

Prints how far the process's peak RSS (``ru_maxrss``) grew over the steps. Unlike the profiler's
memory timeline, it counts only memory that is resident, so buffers the quantizers keep for reuse
count once, not as live for the whole step. Run each variant in its own process.
"""

from __future__ import annotations

import argparse
import resource

import torch

import fxcompress
from fxcompress import quant

from .train_step import QAT, make_step, model_and_batch

__all__ = ["main"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("variant", choices=["plain", "qat", "qat-fresh"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, x, y = model_and_batch(args.model)
    if args.variant == "qat-fresh":  # no buffer reuse: every tensor freshly allocated
        quant._Quantizer._buffer_pool = lambda self, x: None
    model = model if args.variant == "plain" else fxcompress.compress(model, QAT, fold_bn=False)
    step = make_step(model, x, y, compiled=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        step()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{args.model} {args.variant}: peak RSS grew {grown / 1e3:.1f} MB over 5 training steps")


if __name__ == "__main__":
    main()
