"""Length-aware batching: batches of similar lengths, or batches filled to a token budget.

On data whose samples differ much in length (video clips of 5 to 60 s, answers of 5 to 400 tokens), a batch of
random samples is padded to its longest one, and most of what a padded step computes is padding. Two batch
samplers avoid it, and one loader makes either resumable in the middle of an epoch:

* :class:`LengthGroupedBatchSampler`: a fixed number of samples per batch, drawn from groups of similar length
  (HF transformers' ``LengthGroupedSampler`` / LLaVA's ``group_by_modality_length``): each epoch shuffles the
  samples, cuts the order into *megabatches* of ``group_size`` global batches, sorts each by length and cuts it
  into global batches; the order of the global batches is shuffled again, so long and short steps alternate.
* :class:`TokenBudgetBatchSampler`: as many samples per batch as fit ``max_tokens`` (counted as the padded
  batch's ``samples x longest sample``, which bounds a packed batch's ``sum`` too): the samples are sorted by
  length once and filled greedily into batches (fairseq's ``batch_by_size``); each epoch shuffles the order of
  the batches, so the batches, and the number of steps, are the same every epoch.
* :class:`ResumableDataLoader`: a :class:`~regate_lightning.data.collate.NonEmptyDataLoader` over one of
  them that Lightning saves in its checkpoints (``state_dict`` / ``load_state_dict``): a run resumed from a
  checkpoint taken in the middle of an epoch reads exactly the batches that the run that never stopped reads.

**Several processes.** Both samplers plan *global* steps: each step is one batch per rank (consecutive in
length, so the ranks' batches are alike and none waits long for another), and every rank runs the same number
of steps; an epoch whose samples do not fill the last step is completed with samples (length-grouped) or
batches (token budget) from its start, as ``DistributedSampler`` does, unless ``drop_last``. A sampler reads
its rank and the number of ranks from the ``sampler`` it is given (Lightning replaces it by a
``DistributedSampler`` under DDP, and keeps this sampler's own order), else from ``torch.distributed``.
Every rank derives the same plan from the seed and the epoch.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from regate_lightning.data.collate import NonEmptyDataLoader

log = logging.getLogger("regate_lightning.data")

BATCHING_CHOICES = ("random", "length_grouped", "token_budget")
"""The data modules' ``batching`` values: random batches of ``batch_size`` (the default), length-grouped batches
of ``batch_size`` (:class:`LengthGroupedBatchSampler`), batches filled to ``max_tokens``
(:class:`TokenBudgetBatchSampler`)."""

STATE_VERSION = 1
_WARNED: set[tuple[int, str]] = set()


def check_batching(batching: str, max_tokens: int | None, group_size: int) -> None:
    """Refuse a ``batching`` choice, token budget or group size a batch sampler would refuse later.

    Raises:
        ValueError: naming the argument, what is allowed and what was given.
    """
    if batching not in BATCHING_CHOICES:
        raise ValueError(f"`batching` must be one of {BATCHING_CHOICES}, got {batching!r}")
    if batching == "token_budget" and (max_tokens is None or max_tokens < 1):
        raise ValueError(
            f"`max_tokens` must be a positive number of tokens with batching='token_budget', got {max_tokens}"
        )
    if batching != "token_budget" and max_tokens is not None:
        raise ValueError(f"`max_tokens` applies with batching='token_budget' only, got batching={batching!r}")
    if group_size < 1:
        raise ValueError(f"`group_size` must be >= 1, got {group_size}")


def _replicas(sampler: Any) -> tuple[int, int]:
    """``(num_replicas, rank)``: from a ``DistributedSampler``, else from ``torch.distributed``, else ``(1, 0)``."""
    if hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
        return int(sampler.num_replicas), int(sampler.rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _digest(lengths: Sequence[int]) -> str:
    return hashlib.blake2b(torch.tensor(list(lengths), dtype=torch.int64).numpy().tobytes(), digest_size=8).hexdigest()


class LengthAwareBatchSampler(BatchSampler):
    """What the two samplers share: a per-epoch plan of global steps, this rank's share of it, resumption.

    Args:
        sampler: the data set's index sampler; only its ``num_replicas`` and ``rank`` are read when it is a
            ``DistributedSampler`` (Lightning passes one under DDP); the order comes from this sampler.
        lengths: the length in tokens of every sample of the data set, by index.
        batch_size: samples per batch (:class:`LengthGroupedBatchSampler`); the cap of samples per batch
            (:class:`TokenBudgetBatchSampler`).
        drop_last: leave out the samples (or batches) that do not fill the last step, instead of completing it
            with ones from the epoch's start.
        seed: the seed of the shuffles (with the epoch: every rank plans the same steps).
        shuffle: shuffle every epoch (off: the same plan every epoch, from ``seed``).

    Raises:
        ValueError: empty or negative lengths, a ``batch_size`` below 1.
    """

    kind = "length_aware"

    def __init__(
        self,
        sampler: Iterable[int] | None,
        lengths: Sequence[int],
        batch_size: int = 1,
        drop_last: bool = False,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(sampler if sampler is not None else range(len(lengths)), batch_size, drop_last)
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("`lengths` is empty: the data set has no sample")
        if min(self.lengths) < 0:
            raise ValueError(f"`lengths` must be >= 0, got {min(self.lengths)}")
        self.num_replicas, self.rank = _replicas(sampler)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.source = self.sampler
        self.sampler = self  # Lightning calls `batch_sampler.sampler.set_epoch(epoch)` every epoch
        self._resume: tuple[int, int] | None = None
        self.started_at = 0

    # -- the plan ------------------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Every global step of ``epoch``: one batch of sample indices per rank."""
        raise NotImplementedError

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + (epoch if self.shuffle else 0))

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose plan the next iteration follows (Lightning calls it at every epoch start)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        self.started_at = start
        for step in self.plan(self.epoch)[start:]:
            yield step[self.rank]

    def __len__(self) -> int:
        """Steps of an epoch (the same every epoch)."""
        return self.num_steps()

    def num_steps(self) -> int:
        """Steps of an epoch, without planning it."""
        raise NotImplementedError

    # -- resumption ------------------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a saved place in an epoch is valid for: the sampler, its settings, the ranks and the data's lengths."""
        return {
            "kind": self.kind,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "lengths": _digest(self.lengths),
        }

    def resume(self, epoch: int, batches: int) -> None:
        """Start the next iteration, if it is of ``epoch``, at its ``batches``-th batch (the earlier ones were read)."""
        self._resume = (int(epoch), int(batches))


class LengthGroupedBatchSampler(LengthAwareBatchSampler):
    """``batch_size`` samples per batch, from megabatches sorted by length (see the module docstring).

    Args:
        sampler: see :class:`LengthAwareBatchSampler`.
        lengths: the length in tokens of every sample, by index.
        batch_size: samples per batch and rank.
        drop_last: see :class:`LengthAwareBatchSampler`.
        seed: see :class:`LengthAwareBatchSampler`.
        shuffle: see :class:`LengthAwareBatchSampler`.
        group_size: global batches per megabatch (HF's ``LengthGroupedSampler`` sorts 50 batches at a time): the
            larger, the more alike the lengths in a batch, and the less random its other samples.

    Example:
        >>> sampler = LengthGroupedBatchSampler(None, [5, 50, 6, 49, 7, 48], batch_size=2, shuffle=False)
        >>> sorted(sorted(b) for b in sampler)
        [[0, 2], [1, 3], [4, 5]]
    """

    kind = "length_grouped"

    def __init__(
        self,
        sampler: Iterable[int] | None,
        lengths: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        group_size: int = 50,
    ) -> None:
        super().__init__(sampler, lengths, batch_size, drop_last, seed, shuffle)
        if group_size < 1:
            raise ValueError(f"`group_size` must be >= 1, got {group_size}")
        self.group_size = int(group_size)

    def identity(self) -> dict[str, Any]:
        """See :meth:`LengthAwareBatchSampler.identity`."""
        return {**super().identity(), "group_size": self.group_size}

    def num_steps(self) -> int:
        """Global batches of ``batch_size x ranks`` samples in an epoch (see :meth:`plan`).

        Raises:
            ValueError: ``drop_last`` with fewer samples than one step takes.
        """
        n, per_step = len(self.lengths), self.batch_size * self.num_replicas
        steps = n // per_step if self.drop_last else math.ceil(n / per_step)
        if steps == 0:
            raise ValueError(f"{n} samples do not fill one step of {per_step} (batch_size x ranks) with drop_last")
        return steps

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Shuffle; complete or cut to whole global batches; sort megabatches; deal each global batch to the ranks."""
        n, per_step = len(self.lengths), self.batch_size * self.num_replicas
        generator = self._generator(epoch)
        order = torch.randperm(n, generator=generator).tolist()
        steps = self.num_steps()
        order = (order * math.ceil(steps * per_step / n))[: steps * per_step]
        mega = self.group_size * per_step
        plan: list[list[list[int]]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            for s in range(0, len(chunk), per_step):
                plan.append(_deal(chunk[s : s + per_step], self.num_replicas))
        shuffled = torch.randperm(len(plan), generator=generator).tolist() if self.shuffle else range(len(plan))
        return [plan[i] for i in shuffled]


def _deal(indices: list[int], ranks: int) -> list[list[int]]:
    """Samples sorted by length dealt to the ranks back and forth (0, 1, .., r-1, r-1, .., 0, 0, ..): balanced totals.

    Example:
        >>> _deal([9, 8, 7, 6, 5, 4], 2)
        [[9, 6, 5], [8, 7, 4]]
    """
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i, index in enumerate(indices):
        turn, place = divmod(i, ranks)
        out[place if turn % 2 == 0 else ranks - 1 - place].append(index)
    return out


class TokenBudgetBatchSampler(LengthAwareBatchSampler):
    """As many samples per batch as fit ``max_tokens`` padded positions (see the module docstring).

    A batch costs ``samples x its longest sample`` tokens, what its padded step computes (a packed step computes
    the sum of the lengths, which is no more). A sample longer than ``max_tokens`` gets a batch of its own (and
    is counted in :attr:`oversized`, logged once).

    Args:
        sampler: see :class:`LengthAwareBatchSampler`.
        lengths: the length in tokens of every sample, by index.
        max_tokens: the budget of one batch (of one rank).
        batch_size: the most samples in one batch; 0 for no cap beyond the budget.
        drop_last: see :class:`LengthAwareBatchSampler`.
        seed: see :class:`LengthAwareBatchSampler`.
        shuffle: shuffle the order of the batches every epoch.

    Example:
        >>> sampler = TokenBudgetBatchSampler(None, [5, 50, 6, 49, 7, 48], max_tokens=100, shuffle=False)
        >>> list(sampler)
        [[1, 3], [5, 4], [2, 0]]
    """

    kind = "token_budget"

    def __init__(
        self,
        sampler: Iterable[int] | None,
        lengths: Sequence[int],
        max_tokens: int,
        batch_size: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens}")
        if batch_size < 0:
            raise ValueError(f"`batch_size` must be >= 0 (0 = no cap), got {batch_size}")
        super().__init__(sampler, lengths, max(batch_size, 1), drop_last, seed, shuffle)
        self.max_tokens = int(max_tokens)
        self.cap = int(batch_size) or len(self.lengths)
        self.batches = self._fill()
        self.oversized = sum(1 for n in self.lengths if n > self.max_tokens)
        warning = (self.max_tokens, _digest(self.lengths))
        if self.oversized and self.rank == 0 and warning not in _WARNED:  # once, though Lightning builds it twice
            _WARNED.add(warning)
            log.warning(
                "data: %d of %d samples are longer than max_tokens %d (the longest has %d tokens); each gets a batch "
                "of its own",
                self.oversized,
                len(self.lengths),
                self.max_tokens,
                max(self.lengths),
            )

    def _fill(self) -> list[list[int]]:
        """Greedy filling of the samples sorted by length, longest first (ties by index)."""
        batches: list[list[int]] = []
        current: list[int] = []
        for index in sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i)):
            longest = self.lengths[current[0]] if current else self.lengths[index]
            if current and ((len(current) + 1) * longest > self.max_tokens or len(current) >= self.cap):
                batches.append(current)
                current = []
            current.append(index)
        batches.append(current)
        return batches

    def identity(self) -> dict[str, Any]:
        """See :meth:`LengthAwareBatchSampler.identity`."""
        return {
            **super().identity(),
            "max_tokens": self.max_tokens,
            "cap": self.cap if self.cap < len(self.lengths) else 0,
        }

    def num_steps(self) -> int:
        """Steps of ``ranks`` batches in an epoch (see :meth:`plan`).

        Raises:
            ValueError: ``drop_last`` with fewer batches than ranks.
        """
        ranks, batches = self.num_replicas, len(self.batches)
        steps = batches // ranks if self.drop_last else math.ceil(batches / ranks)
        if steps == 0:
            raise ValueError(f"{batches} batches do not fill one step of {ranks} ranks with drop_last")
        return steps

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Consecutive batches (alike in length) form a step, one per rank; the steps' order is shuffled."""
        ranks = self.num_replicas
        batches = self.batches
        steps = self.num_steps()
        batches = (batches * math.ceil(steps * ranks / len(batches)))[: steps * ranks]
        plan = [batches[s * ranks : (s + 1) * ranks] for s in range(steps)]
        if not self.shuffle:
            return plan
        return [plan[i] for i in torch.randperm(len(plan), generator=self._generator(epoch)).tolist()]


class ResumableDataLoader(NonEmptyDataLoader):
    """A :class:`~regate_lightning.data.collate.NonEmptyDataLoader` over a :class:`LengthAwareBatchSampler` whose
    place in the epoch Lightning saves in checkpoints and restores on resume.

    Lightning calls ``state_dict`` when it saves a checkpoint and ``load_state_dict`` before the resumed run's
    first iteration. The state is the epoch, the batches read in it, and the sampler's :meth:`identity`; a state
    saved for other data, settings or another number of ranks is not used (a warning says what differs, and the
    epoch restarts from its first batch, as it does for a loader that cannot resume).

    Raises:
        TypeError: a batch sampler that is not a :class:`LengthAwareBatchSampler`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, LengthAwareBatchSampler):
            raise TypeError(
                f"ResumableDataLoader needs a LengthAwareBatchSampler as `batch_sampler`, got "
                f"{type(self.batch_sampler).__name__}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches of it read so far (skipped empty ones included) and the sampler's identity."""
        sampler = self.batch_sampler
        assert isinstance(sampler, LengthAwareBatchSampler)
        return {
            "version": STATE_VERSION,
            "epoch": sampler.epoch,
            "batches": sampler.started_at + getattr(self, "batches_read", 0),
            "sampler": sampler.identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its last read batch (see the class docstring)."""
        sampler = self.batch_sampler
        assert isinstance(sampler, LengthAwareBatchSampler)
        saved, now = state.get("sampler", {}), sampler.identity()
        if state.get("version") != STATE_VERSION or saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)) or ["version"]
            if sampler.rank == 0:
                log.warning(
                    "data: the checkpoint's place in epoch %s was saved for other batching (%s differ): the epoch "
                    "restarts from its first batch",
                    state.get("epoch"),
                    ", ".join(changed),
                )
            return
        sampler.resume(int(state["epoch"]), int(state["batches"]))


def _lengths_of(items: list[Any]) -> list[int]:
    """Token lengths of a list of samples (a ``None``, a sample the data set could not load, counts 0)."""
    return [0 if item is None else len(item) if not isinstance(item, list) else max(map(len, item)) for item in items]


def sample_lengths(dataset: Dataset, max_length: int | None = None, num_workers: int = 0) -> list[int]:
    """The length in tokens of every sample of ``dataset``, capped at ``max_length``, by index.

    Each sample is loaded once (its media decoded and rendered, in ``num_workers`` worker processes), so the
    lengths are exact: the placeholders of a clip sampled by ``fps`` included. A sample the data set cannot load
    (``on_error="skip"``; counted by the data set) counts 0 tokens.
    """
    loader = DataLoader(dataset, batch_size=32, num_workers=num_workers, collate_fn=_lengths_of)
    lengths = [n for chunk in loader for n in chunk]
    return lengths if max_length is None else [min(n, max_length) for n in lengths]


def make_batch_sampler(
    batching: str,
    lengths: Sequence[int],
    batch_size: int,
    max_tokens: int | None = None,
    group_size: int = 50,
    seed: int = 0,
    shuffle: bool = True,
) -> LengthAwareBatchSampler | None:
    """The batch sampler of a data module's ``batching`` choice (None for ``"random"``).

    With ``"token_budget"``, ``batch_size`` caps the samples per batch only when ``max_tokens`` would allow more
    (0 = no cap).
    """
    check_batching(batching, max_tokens, group_size)
    if batching == "length_grouped":
        return LengthGroupedBatchSampler(None, lengths, batch_size, seed=seed, shuffle=shuffle, group_size=group_size)
    if batching == "token_budget":
        assert max_tokens is not None
        return TokenBudgetBatchSampler(None, lengths, max_tokens, batch_size, seed=seed, shuffle=shuffle)
    return None
