"""Errors of the data pipeline and the counter of the bad-input policy.

Every reader, dataset and collator of :mod:`regate_lightning.data` takes ``on_error`` (``"raise"`` or
``"skip"``). With ``"raise"`` a bad input raises :class:`DataError` (or its subclass
:class:`MediaError` for unreadable media) whose message names the file, the line or record id and what
to fix. With ``"skip"`` the input is dropped, logged on the ``regate_lightning.data`` logger (the first
occurrence of each reason at WARNING, later ones at DEBUG) and counted in a :class:`SkipCounter`.

:class:`SkipCounter` works across DataLoader worker processes: its counts live in a shared-memory
tensor with one row per process (row 0 for the main process, row ``1 + worker_id`` for a worker), so
every row has one writer and no increment is lost; :meth:`SkipCounter.counts` sums the rows. The
counter must be created before the workers start (the datasets and collators create theirs in their
constructors), and then works with ``fork`` and ``spawn`` alike.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

import torch

logger = logging.getLogger("regate_lightning.data")

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")

SKIP_REASONS: tuple[str, ...] = (
    "bad_json",
    "bad_record",
    "no_assistant",
    "placeholder_mismatch",
    "missing_media",
    "unsupported_media",
    "unreadable_media",
    "overlong",
)
"""Why an input was skipped, in the order of :class:`SkipCounter`'s columns.

- ``bad_json``: a line of a JSONL file that is not valid JSON.
- ``bad_record``: a record without the required fields, or with fields of the wrong type.
- ``no_assistant``: a conversation without an assistant turn (nothing to supervise).
- ``placeholder_mismatch``: the ``<image>`` / ``<video>`` placeholders do not match the media.
- ``missing_media``: a media file that does not exist.
- ``unsupported_media``: a media kind that the model family cannot take (e.g. a video for LLaVA).
- ``unreadable_media``: a media file that exists but cannot be decoded (found in ``__getitem__``).
- ``overlong``: a sample longer than ``max_length`` that cannot be truncated (found by the collator).
"""


class DataError(ValueError):
    """A bad input record; the message names the file, the line or record id and the fix.

    Attributes:
        reason: one of :data:`SKIP_REASONS`.
    """

    def __init__(self, message: str, reason: str = "bad_record") -> None:
        super().__init__(message)
        if reason not in SKIP_REASONS:
            raise ValueError(f"`reason` must be one of {SKIP_REASONS}, got {reason!r}")
        self.reason = reason


class MediaError(DataError):
    """A video or image that cannot be read or decoded; the message names the file."""

    def __init__(self, message: str, reason: str = "unreadable_media") -> None:
        super().__init__(message, reason)


def check_on_error(on_error: str) -> None:
    """Raise ``ValueError`` unless ``on_error`` is ``"raise"`` or ``"skip"``."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"`on_error` must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def _process_row(capacity: int) -> int:
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0
    # More workers than rows: workers share a row (documented; counts may then race).
    return 1 + info.id % (capacity - 1)


class SkipCounter:
    """Counts skipped inputs by reason, safe across threads and DataLoader worker processes.

    Args:
        max_workers: rows reserved for worker processes; workers beyond it share rows.

    Example:
        >>> counter = SkipCounter()
        >>> counter.add("missing_media")
        >>> counter.counts()["missing_media"], counter.total
        (1, 1)
    """

    def __init__(self, max_workers: int = 64) -> None:
        if max_workers < 1:
            raise ValueError(f"`max_workers` must be >= 1, got {max_workers}")
        self._table = torch.zeros(max_workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` inputs skipped for ``reason`` (one of :data:`SKIP_REASONS`)."""
        col = SKIP_REASONS.index(reason)
        row = _process_row(self._table.shape[0])
        with self._lock:
            self._table[row, col] += n

    def skip(self, error: DataError) -> None:
        """Count and log a skipped input; the first of each reason in this process at WARNING."""
        self.add(error.reason)
        level = logging.DEBUG if error.reason in self._warned else logging.WARNING
        self._warned.add(error.reason)
        logger.log(level, "skipped (%s): %s", error.reason, error)

    def counts(self) -> dict[str, int]:
        """Counts by reason, summed over the main process and every worker (zeros included)."""
        totals = self._table.sum(0).tolist()
        return dict(zip(SKIP_REASONS, totals, strict=True))

    @property
    def total(self) -> int:
        """All skipped inputs."""
        return int(self._table.sum())

    def reset(self) -> None:
        """Set every count to zero."""
        with self._lock:
            self._table.zero_()

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.counts().items() if v}
        return f"SkipCounter({nonzero})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle; each process gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
