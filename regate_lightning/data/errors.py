"""Errors of the data pipeline and the counter of the bad-input policy.

Every reader, dataset and collator of :mod:`regate_lightning.data` takes ``on_error`` (``"raise"`` or
``"skip"``). With ``"raise"`` a bad input raises :class:`DataError` (or its subclass
:class:`MediaError` for unreadable media) whose message names the file, the line or record id and what
to fix. With ``"skip"`` the input is dropped, logged on the ``regate_lightning.data`` logger (the first
occurrence of each reason at WARNING, later ones at DEBUG) and counted in a :class:`SkipCounter`.

:class:`SkipCounter` works across DataLoader worker processes: its counts live in shared-memory
tensors with one row per process (row 0 for the main process, row ``1 + worker_id`` for a worker), so
every row has one writer and no increment is lost. It keeps two views of the same skips:

* **occurrences** (:meth:`SkipCounter.counts`): every skip, so a record whose video fails to decode is
  counted again in every epoch that meets it; the difference of two :meth:`SkipCounter.snapshot` s is
  what one epoch (or one validation run) skipped;
* **records** (:meth:`SkipCounter.records`): each record once, whatever the number of epochs: the
  records skipped while reading the file, plus every record of the dataset that was skipped at least
  once later (marked by its index in a shared table sized by :meth:`SkipCounter.track`).

Beside the skips it counts the samples the collator cut to ``max_length`` and kept
(:meth:`SkipCounter.truncate`, :meth:`SkipCounter.truncated`: each record once, the first named in the log).

The counter must be created (and :meth:`SkipCounter.track` called) before the workers start (the
datasets and collators do it in their constructors), and then works with ``fork`` and ``spawn`` alike.
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
    "empty_answer",
    "duplicate_options",
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
- ``empty_answer``: a conversation with an assistant turn that holds no text (it would train an empty
  answer, its end-of-turn token alone).
- ``duplicate_options``: a multiple-choice question with two equal options (it cannot be scored: the
  likelihood cannot tell them apart).
- ``placeholder_mismatch``: the ``<image>`` / ``<video>`` placeholders do not match the media.
- ``missing_media``: a media file that does not exist.
- ``unsupported_media``: a media kind that the model family cannot take (e.g. a video for LLaVA).
- ``unreadable_media``: a media file that exists but cannot be decoded (found in ``__getitem__``).
- ``overlong``: a sample longer than ``max_length`` that cannot be truncated, or a multiple-choice
  question that does not fit whole (found by the collator).
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


def _by_reason(values: list[int]) -> dict[str, int]:
    return dict(zip(SKIP_REASONS, values, strict=True))


class SkipCounter:
    """Counts skipped inputs by reason, safe across threads and DataLoader worker processes.

    See the module docstring for its two views (occurrences and records).

    Args:
        max_workers: rows reserved for worker processes; workers beyond it share rows.

    Example:
        >>> counter = SkipCounter()
        >>> counter.track(3)                                 # a dataset of 3 records
        >>> before = counter.snapshot()
        >>> counter.add("unreadable_media", index=1)         # record 1 fails in epoch 0 ...
        >>> counter.add("unreadable_media", index=1)         # ... and again in epoch 1
        >>> counter.counts()["unreadable_media"], counter.records()["unreadable_media"]
        (2, 1)
        >>> counter.since(before)["unreadable_media"]
        2
    """

    def __init__(self, max_workers: int = 64) -> None:
        if max_workers < 1:
            raise ValueError(f"`max_workers` must be >= 1, got {max_workers}")
        self._table = torch.zeros(max_workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        # Skips without a record index (records dropped while reading a file): each is a record of its own.
        self._unindexed = torch.zeros(max_workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        # 1 + the reason of each dataset record skipped at least once; 0 = never skipped.
        self._marks = torch.zeros(0, dtype=torch.int8).share_memory_()
        # Samples cut to `max_length` (kept, not skipped): each dataset record once, and those without an index.
        self._cut = torch.zeros(0, dtype=torch.bool).share_memory_()
        self._cut_unindexed = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def track(self, num_records: int) -> None:
        """Size the table of skipped records for a dataset of ``num_records`` (call before workers start).

        Records are told apart by their index, so :meth:`records` counts one dataset's records: give each
        dataset its own counter (``ConversationDataModule`` keeps one for training and one for validation).
        """
        if num_records > self._marks.numel():
            marks = torch.zeros(num_records, dtype=torch.int8)
            marks[: self._marks.numel()] = self._marks
            self._marks = marks.share_memory_()
            cut = torch.zeros(num_records, dtype=torch.bool)
            cut[: self._cut.numel()] = self._cut
            self._cut = cut.share_memory_()

    def add(self, reason: str, n: int = 1, index: int | None = None) -> None:
        """Count ``n`` inputs skipped for ``reason`` (one of :data:`SKIP_REASONS`).

        Args:
            reason: why.
            n: how many.
            index: the skipped record's index in a tracked dataset (counted once in :meth:`records`), or
                None for a record that never reached the dataset (dropped while reading).
        """
        col = SKIP_REASONS.index(reason)
        row = _process_row(self._table.shape[0])
        with self._lock:
            self._table[row, col] += n
            if index is None:
                self._unindexed[row, col] += n
            elif 0 <= index < self._marks.numel() and int(self._marks[index]) == 0:
                self._marks[index] = col + 1

    def skip(self, error: DataError, index: int | None = None) -> None:
        """Count and log a skipped input; the first of each reason in this process at WARNING."""
        self.add(error.reason, index=index)
        level = logging.DEBUG if error.reason in self._warned else logging.WARNING
        self._warned.add(error.reason)
        logger.log(level, "skipped (%s): %s", error.reason, error)

    def truncate(self, message: str, index: int | None = None) -> None:
        """Count a sample that was cut to ``max_length`` and kept; log the first in this process at WARNING.

        Args:
            message: names the sample (file, line, record id) and what was cut.
            index: the record's index in a tracked dataset (counted once in :meth:`truncated`), or None.
        """
        row = _process_row(self._cut_unindexed.shape[0])
        with self._lock:
            if index is None or not 0 <= index < self._cut.numel():
                self._cut_unindexed[row] += 1
            else:
                self._cut[index] = True
        level = logging.DEBUG if "truncated" in self._warned else logging.WARNING
        self._warned.add("truncated")
        logger.log(level, "truncated (overlong='truncate'): %s", message)

    def truncated(self) -> int:
        """Samples cut to ``max_length`` so far, each dataset record once (``data/truncated``)."""
        return int(self._cut.sum()) + int(self._cut_unindexed.sum())

    def counts(self) -> dict[str, int]:
        """Skip occurrences by reason, summed over the main process and every worker (zeros included)."""
        return _by_reason(self._table.sum(0).tolist())

    def snapshot(self) -> torch.Tensor:
        """The occurrence counts now, to compare with later (:meth:`since`)."""
        return self._table.sum(0).clone()

    def since(self, snapshot: torch.Tensor) -> dict[str, int]:
        """Skip occurrences by reason since ``snapshot`` (e.g. in one epoch)."""
        return _by_reason((self._table.sum(0) - snapshot).tolist())

    def records(self) -> dict[str, int]:
        """Skipped records by reason, each counted once: those dropped while reading, and every dataset
        record skipped at least once since (by the reason it was first skipped for)."""
        marked = torch.bincount(self._marks.long(), minlength=len(SKIP_REASONS) + 1)[1:]
        return _by_reason((self._unindexed.sum(0) + marked).tolist())

    @property
    def total(self) -> int:
        """All skip occurrences."""
        return int(self._table.sum())

    def reset(self) -> None:
        """Set every count to zero."""
        with self._lock:
            self._table.zero_()
            self._unindexed.zero_()
            self._marks.zero_()
            self._cut.zero_()
            self._cut_unindexed.zero_()

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


def describe_counts(counts: dict[str, int]) -> str:
    """``"missing_media 5, unreadable_media 4"``: the non-zero counts of a by-reason dict, or ``"none"``.

    Example:
        >>> describe_counts({"bad_json": 0, "missing_media": 5, "unreadable_media": 4})
        'missing_media 5, unreadable_media 4'
    """
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"
