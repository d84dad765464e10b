"""Gathering one step's ragged per-rank tensors on every rank, through the Lightning strategy.

The score store must be identical on every rank: each rank gathers what all ranks saw in a step
(sample ids, candidate counts, flat per-candidate values) and applies the concatenation in rank
order. Shapes differ between ranks, so each tensor is padded to the largest rank's length, gathered
with ``strategy.all_gather`` (torch.distributed underneath) and trimmed again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.strategies import Strategy


def all_gather_ragged(strategy: Strategy, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate 1-D tensors of any lengths across ranks, in rank order.

    Args:
        strategy: the trainer's strategy (single-device strategies return the inputs unchanged).
        tensors: 1-D tensors of this rank; the same number and dtypes on every rank.

    Returns:
        For each input, the concatenation over ranks ``0 .. world_size - 1``.
    """
    if strategy.world_size == 1:
        return list(tensors)
    device = strategy.root_device
    lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=device)
    all_lengths = strategy.all_gather(lengths).reshape(strategy.world_size, len(tensors))
    out = []
    for i, t in enumerate(tensors):
        width = int(all_lengths[:, i].max())
        padded = torch.zeros(width, dtype=t.dtype, device=device)
        padded[: t.numel()] = t.to(device)
        gathered = strategy.all_gather(padded).reshape(strategy.world_size, width)
        out.append(torch.cat([gathered[r, : int(all_lengths[r, i])] for r in range(strategy.world_size)]))
    return out


def sum_over_ranks(strategy: Strategy, values: Sequence[int | torch.Tensor]) -> list[int]:
    """Whole counts summed over ranks in one all-reduce (the values themselves on one process).

    Args:
        strategy: the trainer's strategy.
        values: this rank's counts (ints or 0-d integer tensors on any device).

    Returns:
        The sums, in the order of ``values``, the same on every rank.
    """
    counts = torch.stack([torch.as_tensor(v).to(torch.float64).cpu() for v in values]).to(strategy.root_device)
    return [int(v) for v in strategy.reduce(counts, reduce_op="sum").tolist()]
