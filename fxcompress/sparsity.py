"""Pure tensor math for masks: exact counts, deterministic ties, global allocation under caps.

Masks are bool tensors shaped like the weight: True = kept, False = pruned. Ties between equal
scores are broken by position (the earlier element goes first), so masks are identical on every
run and device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fxcompress.errors import ConfigError
from fxcompress.settings import PruneSetting, ratio_floor

__all__ = ["global_masks", "kth_smallest", "layer_mask", "lowest_k_mask", "n_m_mask", "partition_mask", "schedule_fraction",
           "scores"]


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """A bool keep-mask of ``score``'s shape that prunes exactly the ``k`` smallest scores.

    Ties at the threshold are pruned in index order. Linear time: the threshold comes from
    :func:`kth_smallest`, and only the (usually few) tied elements are ranked by position.
    """
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = kth_smallest(flat, k)
    pruned = flat < threshold
    at = flat == threshold
    room = k - int(pruned.sum())
    if room == int(at.sum()):
        pruned |= at
    else:
        pruned[at.nonzero().squeeze(1)[:room]] = True
    return (~pruned).reshape(score.shape)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest value (1-based) of a 1-D tensor.

    For large tensors a strided sample brackets the answer, and only the values inside the
    bracket go through ``kthvalue`` (several times faster than one kthvalue over everything);
    when the bracket misses, the full kthvalue is the fallback, so the result is always exact.
    """
    n = flat.numel()
    if n < 1 << 20:
        return flat.kthvalue(k).values
    stride = n >> 16
    sample = flat[::stride]
    q = k / n
    width = 4.0 / sample.numel() ** 0.5
    lo = sample.kthvalue(max(1, int((q - width) * sample.numel()))).values
    hi = sample.kthvalue(min(sample.numel(), int((q + width) * sample.numel()) + 1)).values
    below = int((flat < lo).sum())
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return flat.kthvalue(k).values


def scores(weight: torch.Tensor, setting: PruneSetting, name: str) -> torch.Tensor:
    """Importance of each pruning unit: one per element, or one per output channel (row/filter).

    ``level``/``l1`` rank |w| (summed per filter), ``l2`` the L2 norm, ``fpgm`` each filter's
    total distance to the others (filters near the geometric median go first), ``random`` a draw
    seeded by ``seed`` and the layer name. For ``taylor`` the tensor given is not the weight but its
    elementwise importance, the accumulated |w·grad| (:func:`fxcompress.taylor.taylor_importance`):
    taken as is per element, summed per filter.
    """
    w = weight.detach().float()
    if setting.criterion == "taylor":
        return w if setting.granularity == "element" else w.reshape(w.shape[0], -1).sum(dim=1)
    if setting.criterion == "random":
        gen = torch.Generator().manual_seed(setting.seed + _stable_hash(name))
        shape = w.shape if setting.granularity == "element" else w.shape[:1]
        return torch.rand(shape, generator=gen)
    if setting.granularity == "element":
        return w.abs()
    rows = w.reshape(w.shape[0], -1)
    if setting.criterion == "l2":
        return rows.norm(dim=1)
    if setting.criterion == "fpgm":
        return torch.cdist(rows, rows).sum(dim=1)
    return rows.abs().sum(dim=1)


def n_m_mask(weight: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep the ``n`` largest |w| of every ``m`` consecutive weights along each row (input dim)."""
    rows = weight.detach().abs().float().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ConfigError(f"layer {name!r}: granularity '{n}:{m}' needs a row length divisible by {m}, "
                          f"got {rows.shape[1]}; use another granularity for this layer")
    groups = rows.reshape(-1, m)
    order = torch.sort(groups, dim=1, stable=True, descending=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return keep.reshape(weight.shape)


def layer_mask(weight: torch.Tensor, setting: PruneSetting, name: str, fraction: float = 1.0) -> torch.Tensor:
    """The keep-mask of one layer under ``sparsity_per_layer`` (or N:M), at ``fraction`` of the target."""
    if setting.n_m is not None:
        return n_m_mask(weight, *setting.n_m, name) if fraction >= 1.0 else torch.ones_like(weight, dtype=torch.bool)
    sparsity = setting.sparsity_per_layer * fraction if fraction < 1.0 else setting.sparsity_per_layer
    score = scores(weight, setting, name)
    if setting.granularity == "element":
        return lowest_k_mask(score, ratio_floor(sparsity, weight.numel()))
    keep_rows = lowest_k_mask(score, ratio_floor(sparsity, weight.shape[0]))
    return keep_rows.reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()


def partition_mask(score: torch.Tensor, partitions: Sequence[Sequence[int]], sparsity: float) -> torch.Tensor:
    """A bool keep-mask over a group's channels: exactly ``floor(sparsity · n)`` of each partition's ``n``
    channels pruned, the lowest scores of that partition first (ties in channel order).

    One partition holding every channel is the plain case: ``floor(s·C)`` of ``C``.

    >>> partition_mask(torch.tensor([3., 1., 2., 0.]), [[0, 1], [2, 3]], 0.5).tolist()
    [True, False, True, False]
    """
    keep = torch.ones(score.shape[0], dtype=torch.bool)
    for part in partitions:
        index = torch.as_tensor(list(part), dtype=torch.long)
        keep[index] = lowest_k_mask(score[index], ratio_floor(sparsity, len(index)))
    return keep


def global_masks(weights: Mapping[str, torch.Tensor], setting: PruneSetting, where: str,
                 fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """Masks for a ``total_sparsity`` group: the globally lowest scores, each layer under its cap.

    Exactly ``floor(total * N)`` weights are pruned; no layer loses more than ``floor(cap * n)``.
    Layers whose uncapped share exceeds their cap are fixed at the cap and the rest re-ranked,
    which is the greedy "next smallest weight in a layer with room" order done in O(N) passes.

    Raises:
        ConfigError: the caps cannot hold ``floor(total * N)`` pruned weights.
    """
    total = setting.total_sparsity * fraction if fraction < 1.0 else setting.total_sparsity
    names = list(weights)
    numels = {n: weights[n].numel() for n in names}
    k = ratio_floor(total, sum(numels.values()))
    caps = {n: numels[n] if setting.cap_for(n) is None else ratio_floor(setting.cap_for(n), numels[n])
            for n in names}
    if k > sum(caps.values()):
        raise ConfigError(f"{where}: total_sparsity {setting.total_sparsity} asks for {k} pruned weights but "
                          f"max_sparsity_per_layer allows at most {sum(caps.values())}; raise the caps or "
                          "lower total_sparsity")
    flat = {n: scores(weights[n], setting, n).reshape(-1) for n in names}
    masks: dict[str, torch.Tensor] = {}
    free = names
    while free:
        keep = lowest_k_mask(torch.cat([flat[n] for n in free]), k)
        parts = dict(zip(free, keep.split([numels[n] for n in free]), strict=True))
        over = [n for n in free if numels[n] - int(parts[n].sum()) > caps[n]]
        if not over:
            masks.update(parts)
            break
        # a layer over its cap in the uncapped ranking is at its cap in the capped one
        for n in over:
            masks[n] = lowest_k_mask(flat[n], caps[n])
            k -= caps[n]
        free = [n for n in free if n not in over]
    return {n: masks[n].reshape(weights[n].shape) for n in names}


def schedule_fraction(step: int, start: int, end: int, kind: str) -> float:
    """Fraction of the final sparsity reached at ``step``: 0 before ``start``, 1 from ``end`` on.

    ``agp`` is Zhu & Gupta's cubic ramp ``1 - (1 - p)^3``; ``linear`` is ``p``.
    """
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    p = (step - start) / (end - start)
    return 1.0 - (1.0 - p) ** 3 if kind == "agp" else p


def _stable_hash(text: str) -> int:
    """A hash of a layer name that does not change between processes (unlike ``hash``)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % (2**31)
