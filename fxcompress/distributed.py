"""Activation ranges across ranks: ``sync_ranges`` and the all-reduce it installs.

Syncing is off by default: a collective hidden in every training forward hangs as soon as the
ranks do not all run the same forwards (pipeline parallelism, uneven inputs, DDP's ``join()``),
so it is switched on explicitly, for one process group, with ``sync_ranges``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxcompress.quant import ActivationQuantizer

__all__ = ["RangeSync", "sync_ranges"]


class RangeSync:
    """Reduces a batch's (min, max) to the (min, max) over every rank of one process group.

    A process group is a handle local to this process: ``copy.deepcopy`` shares it, and pickling
    (``pickle``, ``torch.save`` of a whole model) leaves it out, so an unpickled model does not
    sync until ``sync_ranges`` is called again in the new process.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        # a non-finite bound takes no part (-inf never wins the MAX); if no rank has a finite
        # one, the result is not finite either and the observer keeps its tracked value
        lowest = torch.full_like(lo, -float("inf"))
        both = torch.stack([torch.where(torch.isfinite(lo), -lo, lowest), torch.where(torch.isfinite(hi), hi, lowest)])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        return -both[0], both[1]

    def __deepcopy__(self, memo: dict) -> RangeSync:
        return self

    def __reduce__(self) -> tuple:
        return _no_sync, ()


def _no_sync() -> None:
    """What an unpickled ``RangeSync`` becomes: syncing off."""
    return None


def sync_ranges(gm: nn.Module, group: dist.ProcessGroup | None) -> int:
    """Make every activation quantizer of ``gm`` all-reduce its batch min/max over ``group``.

    With a group, each training forward of every activation quantizer runs one ``all_reduce``
    (MAX of ``(-min, max)``, two numbers) over ``group`` before the EMA update, so the ranks of
    the group track the range of their combined batch; every rank of the group must then run the
    same training forwards. ``None`` (the default of a compressed model) turns syncing off: no
    communication, each rank tracks its own batches.

    Args:
        gm: a model returned by ``fxcompress.compress`` (or any module holding its quantizers,
            such as a ``DistributedDataParallel`` wrapper's ``.module``).
        group: a ``torch.distributed`` process group this rank belongs to, e.g.
            ``dist.group.WORLD`` (which is None, i.e. off, before ``init_process_group``), or None.

    Returns:
        The number of activation quantizers set.

    Raises:
        TypeError: ``group`` is neither None nor a process group this rank belongs to.

    >>> fxcompress.sync_ranges(gm, torch.distributed.group.WORLD)  # doctest: +SKIP
    6
    """
    sync = None if group is None else RangeSync(_checked(group))
    quantizers = [m for m in gm.modules() if isinstance(m, ActivationQuantizer)]
    for quantizer in quantizers:
        quantizer.range_sync = sync
    return len(quantizers)


def _checked(group: object) -> dist.ProcessGroup:
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return group
    if dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER:
        raise TypeError("sync_ranges: this rank is not a member of the group; pass None on ranks outside it")
    raise TypeError(f"sync_ranges: expected a torch.distributed ProcessGroup (e.g. dist.group.WORLD) or None, "
                    f"got {type(group).__name__}")
