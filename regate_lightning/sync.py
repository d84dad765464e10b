"""Gathering one step's ragged per-rank tensors on every rank in one collective, through the Lightning strategy.

The score store must be identical on every rank: each rank gathers what all ranks saw in a step
(sample keys, candidate counts, flat per-candidate values) and applies the concatenation in rank
order. Shapes and dtypes differ between the tensors of one call and lengths between ranks, so a call
packs all of its tensors into one byte buffer (a header of lengths, then each tensor's bytes, padded
to 8 bytes) and gathers that buffer with a single ``strategy.all_gather``.

``all_gather`` needs one shape on every rank, so the buffers are padded to a *width* that all ranks
agree on. Each header carries its rank's payload size; when a rank's payload did not fit, every rank
sees that in the gathered headers and all of them gather once more at the new width (the largest
payload, rounded up to a power of two), which then serves the later calls of the same kind. In a
steady run a call costs one collective; before this module packed them, a training batch of
:class:`~regate_lightning.ReGATECallback` issued 15 (8 in ``plan``, 7 in ``observe``), now 2
(``tests/test_ddp.py`` counts them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.strategies import Strategy

__all__ = ["RaggedGather", "all_gather_ragged", "pack", "sum_over_ranks", "timeout_message", "unpack"]

_ALIGN = 8  # bytes: every section starts at a multiple of the largest element size


def pack(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """One rank's tensors as one byte buffer of a fixed size: header, then each tensor's bytes.

    Args:
        tensors: 1-D tensors of any dtypes and lengths, on one device (moved to the first one's otherwise).
        width: payload bytes of the buffer (a multiple of 8). A shorter payload is padded with zeros; a
            longer one is cut (the header still gives its full size, so the receivers know to ask again).

    Returns:
        uint8 ``[8 * (K + 1) + width]``: the int64 header ``[payload bytes, len_1 .. len_K]``, then the
        sections, each padded to a multiple of 8 bytes.

    Example:
        >>> buffer = pack([torch.tensor([1, 2]), torch.tensor([0.5])], width=32)
        >>> buffer.numel(), unpack(buffer[None], [torch.int64, torch.float32])
        (56, [tensor([1, 2]), tensor([0.5000])])
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    sections = []
    for t in tensors:
        raw = t.detach().to(device).reshape(-1).contiguous().view(torch.uint8)
        sections += [raw, torch.zeros((-raw.numel()) % _ALIGN, dtype=torch.uint8, device=device)]
    payload = sum(s.numel() for s in sections)
    header = torch.tensor([payload, *(t.numel() for t in tensors)], dtype=torch.int64).to(device)
    padding = torch.zeros(max(width - payload, 0), dtype=torch.uint8, device=device)
    return torch.cat([header.view(torch.uint8), *sections, padding])[: header.numel() * 8 + width]


def unpack(gathered: torch.Tensor, dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """The inverse of :func:`pack` for the buffers of all ranks: each tensor concatenated in rank order.

    Args:
        gathered: uint8 ``[W, bytes]``, row ``r`` = rank ``r``'s buffer (padded to one length).
        dtypes: the tensors' dtypes, as given to :func:`pack`.

    Returns:
        One 1-D tensor per dtype, on the device of ``gathered``: rank 0's values, then rank 1's, ...
    """
    head = 8 * (len(dtypes) + 1)
    lengths = gathered[:, :head].contiguous().view(torch.int64).tolist()
    parts: list[list[torch.Tensor]] = [[] for _ in dtypes]
    for row, header in zip(gathered, lengths, strict=True):
        start = head
        for i, (dtype, n) in enumerate(zip(dtypes, header[1:], strict=True)):
            size = n * torch.empty(0, dtype=dtype).element_size()
            parts[i].append(row[start : start + size].view(dtype))
            start += size + (-size) % _ALIGN
    return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]


class RaggedGather:
    """Concatenate 1-D tensors of any lengths and dtypes across ranks, in rank order, in one collective.

    The policy's ``gather`` (:data:`~regate_lightning.policy.Gather`) under a Lightning strategy. It keeps
    the agreed width of each kind of call (the number and dtypes of its tensors), so it lives as long as
    the fit.

    Args:
        strategy: the trainer's strategy (a single process returns the inputs unchanged).
        device: where the results go (default: the strategy's root device); one copy per call.

    Attributes:
        collectives: collectives issued so far (one per call, two when a buffer outgrew its width).
    """

    def __init__(self, strategy: Strategy, device: torch.device | None = None) -> None:
        self.strategy = strategy
        self.device = device
        self.widths: dict[tuple[torch.dtype, ...], int] = {}
        self.collectives = 0

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's ``tensors`` (the same number and dtypes on every rank), concatenated in rank order."""
        if self.strategy.world_size == 1:
            return list(tensors)
        kind = tuple(t.dtype for t in tensors)
        root = self.strategy.root_device
        width = self.widths.get(kind, 0)
        gathered = self._all_gather(pack(tensors, width))
        payloads = gathered[:, :8].contiguous().view(torch.int64).flatten().tolist()
        if max(payloads) > width:  # some rank's tensors did not fit: all ranks saw it, all gather again
            width = 1 << (max(payloads) - 1).bit_length()
            gathered = self._all_gather(pack(tensors, width))
        self.widths[kind] = width
        return unpack(gathered.to(self.device or root), kind)

    def _all_gather(self, buffer: torch.Tensor) -> torch.Tensor:
        """One collective; the buffer is packed where the tensors are and copied to the root device once.

        Raises:
            TimeoutError: the other ranks did not join within the process group's timeout (a rank hangs, or is
                slower than the timeout allows); the message names the strategy's ``timeout`` setting.
        """
        self.collectives += 1
        try:
            gathered = self.strategy.all_gather(buffer.to(self.strategy.root_device))
        except RuntimeError as err:
            if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
                raise
            raise TimeoutError(timeout_message(self.strategy, str(err).strip().splitlines()[0])) from err
        return gathered.reshape(self.strategy.world_size, -1)


def timeout_message(strategy: Strategy, cause: str) -> str:
    """What to say when a rank waited in a collective longer than the process group's timeout."""
    timeout = getattr(strategy, "_timeout", None)
    limit = f"{timeout.total_seconds():g} s" if timeout is not None else "its timeout"
    return (
        f"rank {strategy.global_rank} waited for the other ranks longer than the process group's timeout ({limit}): "
        "a rank hangs, or is slower than that (a first teacher step, a teacher or data still loading). Raise the "
        "strategy's `timeout` in the recipe (trainer.strategy: {class_path: lightning.pytorch.strategies.DDPStrategy, "
        f"init_args: {{timeout: 3600}}}}, in seconds; docs/scale.md) or find the stuck rank. ({cause})"
    )


def all_gather_ragged(strategy: Strategy, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate 1-D tensors of any lengths across ranks, in rank order (a :class:`RaggedGather` of one call).

    Args:
        strategy: the trainer's strategy (single-device strategies return the inputs unchanged).
        tensors: 1-D tensors of this rank; the same number and dtypes on every rank.

    Returns:
        For each input, the concatenation over ranks ``0 .. world_size - 1``.
    """
    return RaggedGather(strategy)(tensors)


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
