"""Per-(sample, candidate) store of the student-loss EMA and the reference loss (pure torch)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from regate_lightning.scoring import check_fraction, check_int, ema_update

__all__ = ["BANK_FORMAT_VERSION", "FALLBACKS", "NO_DIGEST", "KeyIndex", "ScoreBank", "flat_ranges", "same_content"]

BANK_FORMAT_VERSION: int = 2
"""Version of :meth:`ScoreBank.state_dict`'s layout; bumped on any incompatible change.

Version 2 keys samples by arbitrary non-negative int64 keys and stores a content digest per sample;
version 1 keyed them by their position in the data, which is not stable, and is refused."""

FALLBACKS: tuple[str, ...] = ("vocab", "ref")
"""Allowed ``fallback`` modes of :meth:`ScoreBank.difficulty`."""

NO_DIGEST: int = 0
"""The digest of a sample whose content is unknown: it matches any digest."""

_NAN = math.nan


class KeyIndex(nn.Module):
    """Maps non-negative int64 keys to dense row numbers (pure torch, on any device).

    Two sorted tables: a large *main* table and a small table of *recent* keys. A lookup is a
    ``searchsorted`` in each; new keys go into the recent table (sorted, at most :attr:`recent_limit`
    entries), which is merged into the main table when it overflows. So adding a batch of keys costs
    ``O(recent_limit)``, and the ``O(n log n)`` merge happens once per ``recent_limit`` new keys, not per
    call. The tables are non-persistent buffers (they move with ``.to()``); the owner rebuilds them
    from its own state with :meth:`rebuild`.

    Args:
        recent_limit: size of the recent table that triggers a merge.

    Example:
        >>> index = KeyIndex()
        >>> index.add(torch.tensor([2**62, 7]), torch.tensor([0, 1]))
        >>> index.find(torch.tensor([7, 8, 2**62])).tolist()
        [1, -1, 0]
    """

    main_keys: Tensor
    main_rows: Tensor
    recent_keys: Tensor
    recent_rows: Tensor

    def __init__(self, recent_limit: int = 16384) -> None:
        super().__init__()
        check_int("recent_limit", recent_limit, minimum=1)
        self.recent_limit = recent_limit
        for name in ("main_keys", "main_rows", "recent_keys", "recent_rows"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.int64), persistent=False)

    def __len__(self) -> int:
        return self.main_keys.numel() + self.recent_keys.numel()

    def find(self, keys: Tensor) -> Tensor:
        """Rows of ``keys`` (int64 ``[B]``, on the index's device): int64 ``[B]``, ``-1`` where absent."""
        rows = _search(self.main_keys, self.main_rows, keys)
        if self.recent_keys.numel():
            rows = torch.where(rows >= 0, rows, _search(self.recent_keys, self.recent_rows, keys))
        return rows

    def add(self, keys: Tensor, rows: Tensor) -> None:
        """Add keys that are distinct and absent (the caller checks), with their rows (int64 ``[K]`` each)."""
        if keys.numel() == 0:
            return
        recent_keys, order = torch.sort(torch.cat([self.recent_keys, keys]))
        recent_rows = torch.cat([self.recent_rows, rows])[order]
        if recent_keys.numel() <= self.recent_limit:
            self.recent_keys, self.recent_rows = recent_keys, recent_rows
            return
        main_keys, order = torch.sort(torch.cat([self.main_keys, recent_keys]))
        self.main_keys, self.main_rows = main_keys, torch.cat([self.main_rows, recent_rows])[order]
        self.recent_keys, self.recent_rows = recent_keys[:0], recent_rows[:0]

    def rebuild(self, keys_by_row: Tensor) -> None:
        """Index ``keys_by_row`` (int64 ``[S]``, distinct): key ``keys_by_row[r]`` gets row ``r``."""
        self.main_keys, order = torch.sort(keys_by_row)
        self.main_rows = order
        self.recent_keys, self.recent_rows = self.main_keys[:0], self.main_rows[:0]


def _search(table_keys: Tensor, table_rows: Tensor, keys: Tensor) -> Tensor:
    if table_keys.numel() == 0:
        return torch.full_like(keys, -1)
    pos = torch.searchsorted(table_keys, keys).clamp_(max=table_keys.numel() - 1)
    return torch.where(table_keys.index_select(0, pos) == keys, table_rows.index_select(0, pos), -1)


def same_content(counts: Tensor, digests: Tensor, stored_counts: Tensor, stored_digests: Tensor) -> Tensor:
    """Whether stored values describe a sample: the same candidate count, and digests that agree.

    A digest of :data:`NO_DIGEST` (unknown) on either side agrees with any digest; the count must
    always be equal. The one rule of the score store and the reference cache.

    Args:
        counts, digests: integer ``[B]``, the sample's candidate count and content digest.
        stored_counts, stored_digests: integer ``[B]``, what was stored with the values.

    Returns:
        bool ``[B]``.

    Example:
        >>> counts, digests = torch.tensor([2, 2, 2]), torch.tensor([5, 0, 5])
        >>> same_content(counts, digests, torch.tensor([2, 2, 3]), torch.tensor([6, 6, 5]))
        tensor([False,  True, False])
    """
    agree = (digests == stored_digests) | (digests == NO_DIGEST) | (stored_digests == NO_DIGEST)
    return (counts == stored_counts) & agree


def flat_ranges(starts: Tensor, counts: Tensor) -> Tensor:
    """The runs ``starts[b], ..., starts[b] + counts[b] - 1`` of every row, concatenated in row order.

    How the store finds the slots of a batch, and the cache the values of its samples. Batches (counts
    of one size, give or take) take elementwise operations on a padded ``[B, max count]`` grid; long,
    uneven lists (a whole cache in chunks) take ``repeat_interleave``, which is linear in the output.

    Args:
        starts: int64 ``[B]``.
        counts: int64 ``[B]``, non-negative.

    Returns:
        int64 ``[counts.sum()]`` on the device of ``starts``.

    Example:
        >>> flat_ranges(torch.tensor([10, 3, 7]), torch.tensor([2, 0, 3]))
        tensor([10, 11,  7,  8,  9])
    """
    if counts.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=starts.device)
    width, total = (int(v) for v in torch.stack([counts.max(), counts.sum()]).tolist())
    if counts.numel() * width <= 2 * total + 4096:
        grid = torch.arange(width, device=starts.device)
        return (starts.unsqueeze(1) + grid).masked_select(grid < counts.unsqueeze(1))
    row = torch.repeat_interleave(torch.arange(counts.numel(), device=starts.device), counts, output_size=total)
    within = torch.arange(total, device=starts.device) - (torch.cumsum(counts, 0) - counts)[row]
    return starts[row] + within


class ScoreBank(nn.Module):
    """Ragged store of ``m`` (student-loss EMA) and ``ref`` (reference loss) per (sample, candidate).

    **Samples** are identified by *keys*: any non-negative int64 that stays the same for the same
    sample across epochs and runs (``ConversationDataset`` uses a 63-bit hash of the record's id, else
    of its file and line; dense indices work too). A :class:`KeyIndex` maps keys to dense *rows* in
    registration order. Each row owns a contiguous run of ``length[r]`` slots starting at
    ``offset[r]`` in the flat value buffers, one slot per candidate, in candidate position order. All
    per-candidate arguments and results use the flat layout of
    :func:`~regate_lightning.scoring.gather_candidates` (row by row, position order) with
    ``counts[b]`` values for batch row ``b``.

    **Digests.** Each sample may carry a content digest (int64, :data:`NO_DIGEST` = unknown), e.g.
    :func:`~regate_lightning.targets.sample_digest` of its tokens and candidates. Values that came from
    elsewhere (a checkpoint: :meth:`load_state_dict`; a reference cache: ``register(..., restore=True)``)
    are *pending* until the sample is next registered from live data: if its candidate count and digest
    match, they are used; if not, they belong to other content (the record changed, or the cache was
    made from other data) and are reset to "not computed" and counted in :attr:`num_replaced`, so the
    reference loss is recomputed and the EMA starts afresh. For a sample that was registered from live
    data in this run, a different count or digest is an error (the data renders it differently from
    one epoch to the next).

    Buffers (persistent, so ``.to(device)`` and ``state_dict`` work as for any module):

    * ``ema`` float32 ``[capacity]``: student-loss EMA, NaN = never measured;
    * ``ref`` float32 ``[capacity]``: reference loss, NaN = not computed;
    * ``keys``, ``offset``, ``length``, ``digest`` int64 ``[row_capacity]``: per row, the sample's key,
      first slot, candidate count and content digest;
    * ``vocab_ema`` float32 ``[vocab_size]``: student-loss EMA per target token id, NaN = unseen.

    Memory. Both capacities grow by amortised doubling. Used bytes, which is also what
    :meth:`state_dict` saves (it trims the buffers to the used part), are ``8 * num_candidates + 32 *
    num_samples + 4 * vocab_size``; the key index adds ``16 * num_samples`` in memory (it is rebuilt
    on load, not saved), and the pending flags one byte per sample. So the store scales with the
    candidates seen, never with samples x max sequence length, nor with the size of the keys.

    Duplicates: a sample that occurs more than once in one call (e.g. a padded ``DistributedSampler``,
    or an all-gathered batch) gets one update, with the mean of the finite values given for each slot.

    Determinism: on CPU every method is bitwise deterministic. Means over repeated keys (a vocabulary
    id, a duplicated sample) are float64 ``index_add_`` sums, whose CUDA kernel is bitwise deterministic
    under ``torch.use_deterministic_algorithms(True)`` (Lightning: ``Trainer(deterministic=True)``);
    checked on an H200, where it also matched the CPU result.

    Rows and slots are allocated in registration order (sorted by key within one call), so two banks
    that register the same sequence of batches have identical buffers: under DDP, register the
    all-gathered batch on every rank to keep the ranks' stores identical.

    Tensors passed in are moved to the buffers' device; results live there too. Most methods
    synchronise with the device once or twice (to validate, and to size the flat index).

    Args:
        vocab_size: size of the tokenizer's vocabulary (``>= 1``); target ids must be below it.
        initial_capacity: initial number of candidate slots (``>= 0``).

    Example:
        >>> bank = ScoreBank(vocab_size=10)
        >>> idx, counts, ids = torch.tensor([7, 3]), torch.tensor([2, 1]), torch.tensor([5, 5, 6])
        >>> bank.register(idx, counts)  # both met for the first time
        tensor([True, True])
        >>> bank.set_ref(idx, torch.tensor([0.5, 0.6, 0.7]), counts)
        >>> bank.update(idx, torch.tensor([1.0, float("nan"), float("nan")]), counts, ids, decay=0.9)
        >>> bank.get_ema(idx, counts)
        tensor([1., nan, nan])
        >>> bank.difficulty(idx, counts, ids)  # measured; EMA of id 5; ref (id 6 never measured)
        tensor([1.0000, 1.0000, 0.7000])
    """

    ema: Tensor
    ref: Tensor
    keys: Tensor
    offset: Tensor
    length: Tensor
    digest: Tensor
    vocab_ema: Tensor
    pending: Tensor

    _ROW_BUFFERS = ("keys", "offset", "length", "digest")

    def __init__(self, vocab_size: int, initial_capacity: int = 1024) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("initial_capacity", initial_capacity, minimum=0)
        self.vocab_size = vocab_size
        self._size = 0  # used slots of ema/ref
        self._rows = 0  # registered samples (used rows)
        self.num_replaced = 0
        """Pending samples whose count or digest did not match their live data, reset since construction."""
        self.replaced_keys = torch.zeros(0, dtype=torch.int64)
        """int64 ``[R]``: the keys of the samples the latest such reset concerned (one :meth:`register` call)."""
        self.index = KeyIndex()
        self._located: tuple[Tensor, Tensor, tuple[int, ...], _Located] | None = None
        self.register_buffer("ema", torch.full((initial_capacity,), _NAN))
        self.register_buffer("ref", torch.full((initial_capacity,), _NAN))
        for name in self._ROW_BUFFERS:
            self.register_buffer(name, torch.zeros(0, dtype=torch.int64))
        self.register_buffer("vocab_ema", torch.full((vocab_size,), _NAN))
        self.register_buffer("pending", torch.zeros(0, dtype=torch.bool), persistent=False)

    # ----------------------------------------------------------------------------------------------
    # Sizes.

    @property
    def num_samples(self) -> int:
        """Number of registered samples."""
        return self._rows

    @property
    def num_candidates(self) -> int:
        """Number of used candidate slots (the registered samples' candidates, and those of replaced ones)."""
        return self._size

    @property
    def capacity(self) -> int:
        """Number of allocated candidate slots."""
        return self.ema.numel()

    def nbytes(self, used_only: bool = False) -> int:
        """Bytes of the store's buffers.

        Args:
            used_only: ``False``: the allocated bytes of every buffer, the key index and the pending
                flags included. ``True``: the bytes in use that :meth:`state_dict` saves
                (``8 * num_candidates + 32 * num_samples + 4 * vocab_size``).

        Returns:
            A byte count.
        """
        if used_only:
            return 8 * self._size + 32 * self._rows + 4 * self.vocab_size
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self.ema.device

    # ----------------------------------------------------------------------------------------------
    # Registration and slot lookup.

    def register(self, sample_idx: Tensor, num_candidates: Tensor, digests: Tensor | None = None) -> Tensor:
        """Allocate slots for unseen samples of live data; check seen samples against their count and digest.

        A pending sample (restored, see the class docstring) whose count or digest differs is reset and
        counted in :attr:`num_replaced`; a matching one is confirmed. The call is atomic: on an error
        nothing is changed. When every sample is known and confirmed with the same count and digest (the
        steady state of training), the call only reads the store.

        Args:
            sample_idx: integer ``[B]``, non-negative sample keys (repeats allowed).
            num_candidates: integer ``[B]``, non-negative candidate counts (``candidates.sum(1)``).
            digests: integer ``[B]``, content digests (:data:`NO_DIGEST` = unknown), or None (all unknown).

        Returns:
            bool ``[B]`` on the buffers' device: the samples met from live data for the first time (new to
            the store, or restored and now confirmed or reset), whose values may come from elsewhere (a
            reference cache, see :class:`~regate_lightning.cache.ReferenceCache`).

        Raises:
            ValueError: a sample registered from live data in this run comes with another count or
                digest; one sample occurs in the call with two different counts or digests; bad shapes
                or values.
        """
        idx = self._check_sample_idx(sample_idx)
        counts, digs = self._check_counts(num_candidates, idx), self._check_digests(digests, idx)
        if self._rows and idx.numel():
            rows = self.index.find(idx)
            r = rows.clamp(min=0)
            length, digest, pending = (b.index_select(0, r) for b in (self.length, self.digest, self.pending))
            if bool(((rows >= 0) & (length == counts) & ((digest == digs) | (digs == NO_DIGEST)) & ~pending).all()):
                return torch.zeros_like(rows, dtype=torch.bool)  # seen, confirmed, same content: nothing to do
        return self._register(idx, counts, digs, restore=False)

    def register_stored(self, sample_idx: Tensor, num_candidates: Tensor, digests: Tensor | None = None) -> Tensor:
        """Register samples read from a stored source (a reference cache), not from live data.

        Unseen samples become pending rows (confirmed or reset when live data registers them); a seen
        sample whose count or digest differs is left as it is and reported as not accepted.

        Args:
            sample_idx: integer ``[B]``, non-negative sample keys.
            num_candidates: integer ``[B]``, their candidate counts.
            digests: integer ``[B]``, their content digests, or None (unknown).

        Returns:
            bool ``[B]`` on the buffers' device: whether the store's entry describes the given sample (so
            that its stored values may be written into it).
        """
        idx = self._check_sample_idx(sample_idx)
        return self._register(idx, self._check_counts(num_candidates, idx), self._check_digests(digests, idx), True)

    def _register(self, idx: Tensor, counts: Tensor, digs: Tensor, restore: bool) -> Tensor:
        """Register checked keys, counts and digests (``restore=False``: live data; ``True``: stored values).

        Returns, per input, whether the sample was met from live data for the first time (``restore=False``)
        or whether its stored values were accepted (``restore=True``).
        """
        if idx.numel() == 0:
            return torch.ones(0, dtype=torch.bool, device=self.device)
        uidx, inverse = torch.unique(idx, return_inverse=True)
        ucounts = torch.zeros_like(uidx).scatter_(0, inverse, counts)
        udigs = torch.zeros_like(uidx).scatter_(0, inverse, digs)
        for name, values, unique in (("candidates", counts, ucounts), ("content digests", digs, udigs)):
            clash = values != unique[inverse]
            if bool(clash.any()):
                b = int(clash.nonzero()[0, 0])
                raise ValueError(
                    f"sample {int(idx[b])} occurs more than once in one batch with different {name} "
                    f"({int(unique[inverse[b]])} and {int(values[b])}); the data must render each sample "
                    "identically (same template, same truncation), and sample keys must be unique"
                )
        rows = self.index.find(uidx)
        seen = rows >= 0
        srows = rows[seen]
        matches = same_content(ucounts[seen], udigs[seen], self.length[srows], self.digest[srows])
        accepted = torch.ones_like(seen)
        replace = torch.zeros(0, dtype=torch.int64, device=self.device)
        if restore:
            accepted[seen] = matches
        else:
            accepted[seen] = self.pending[srows]  # first met from live data: new rows, and restored ones
            clash = ~matches & ~self.pending[srows]
            if bool(clash.any()):
                b = int(clash.nonzero()[0, 0])
                r = int(srows[b])
                raise _changed(
                    int(uidx[seen][b]),
                    f"{int(self.length[r])} candidates (content digest {int(self.digest[r])})",
                    f"{int(ucounts[seen][b])} (digest {int(udigs[seen][b])})",
                )
            replace = (seen.nonzero().flatten())[~matches]
        new = (~seen).nonzero().flatten()
        # Validated: from here on the store changes.
        if replace.numel():
            self._replace(rows[replace], ucounts[replace], udigs[replace])
        if not restore and srows.numel():
            self.pending[srows] = False
            known = udigs[seen] != NO_DIGEST
            self.digest[srows[known]] = udigs[seen][known]
        if new.numel():
            self._append(uidx[new], ucounts[new], udigs[new], pending=restore)
        return accepted[inverse]

    def _append(self, keys: Tensor, counts: Tensor, digests: Tensor, pending: bool) -> None:
        """New rows for distinct unseen ``keys`` (sorted), with fresh slots."""
        first = self._rows
        self._grow_rows(first + keys.numel())
        rows = torch.arange(first, first + keys.numel(), device=self.device)
        self.keys[rows] = keys
        self.digest[rows] = digests
        self.pending[rows] = pending
        self._allocate(rows, counts)
        self._rows += keys.numel()
        self.index.add(keys, rows)

    def _replace(self, rows: Tensor, counts: Tensor, digests: Tensor) -> None:
        """Forget the values of pending ``rows`` whose content changed; new slots where the count changed."""
        same = self.length[rows] == counts
        if bool(same.any()):
            slots = flat_ranges(self.offset[rows[same]], counts[same])
            self.ema[slots] = _NAN
            self.ref[slots] = _NAN
        if bool((~same).any()):  # the old slots stay unused
            self._allocate(rows[~same], counts[~same])
            self._located = None  # those rows have new slots
        self.digest[rows] = digests
        self.num_replaced += rows.numel()
        self.replaced_keys = self.keys[rows]

    def _allocate(self, rows: Tensor, counts: Tensor) -> None:
        total = int(counts.sum())
        self._grow_values(self._size + total)
        self.offset[rows] = self._size + torch.cumsum(counts, 0) - counts
        self.length[rows] = counts
        self._size += total

    def is_registered(self, sample_idx: Tensor) -> Tensor:
        """Whether each sample has been registered.

        Args:
            sample_idx: integer ``[B]``, non-negative keys.

        Returns:
            bool ``[B]`` on the buffers' device.
        """
        return self.index.find(self._check_sample_idx(sample_idx)) >= 0

    def sample_keys(self) -> Tensor:
        """The keys of every registered sample, in registration order: int64 ``[num_samples]``."""
        return self.keys[: self._rows]

    def candidate_counts(self, sample_idx: Tensor) -> Tensor:
        """The registered candidate count of each (registered) sample: int64 ``[B]``."""
        return self.length[self._rows_of(self._check_sample_idx(sample_idx))]

    def digests(self, sample_idx: Tensor) -> Tensor:
        """The stored content digest of each (registered) sample: int64 ``[B]`` (:data:`NO_DIGEST` = unknown)."""
        return self.digest[self._rows_of(self._check_sample_idx(sample_idx))]

    def _rows_of(self, idx: Tensor) -> Tensor:
        rows = self.index.find(idx)
        missing = rows < 0
        if bool(missing.any()):
            keys = idx[missing].unique().tolist()
            raise ValueError(f"samples {keys[:10]} are not registered; call `register()` first")
        return rows

    def _locate(self, sample_idx: Tensor, counts: Tensor) -> _Located:
        """The slots of every candidate of registered samples, and whether the samples are distinct.

        The last result is kept while the same two tensors (unchanged in place) are asked about and no
        row has moved: a training step asks about one batch several times (reference losses, difficulty,
        the EMA update), and finding its rows among the store's keys is most of each of those calls.

        Args:
            sample_idx: integer ``[B]`` keys of registered samples.
            counts: integer ``[B]``, their candidate counts (checked against the registered ones).
        """
        memo = self._located
        if memo is not None and memo[0] is sample_idx and memo[1] is counts and memo[2] == _versions(*memo[:2]):
            return memo[3]
        idx = self._check_sample_idx(sample_idx)
        checked = self._check_counts(counts, idx)
        rows = self._rows_of(idx)
        mismatch = self.length.index_select(0, rows) != checked
        if bool(mismatch.any()):
            b = int(mismatch.nonzero()[0, 0])
            raise _changed(int(idx[b]), f"{int(self.length[rows[b]])} candidates", f"{int(checked[b])}")
        ordered = torch.sort(rows).values
        distinct = not bool((ordered[1:] == ordered[:-1]).any())
        located = _Located(flat_ranges(self.offset.index_select(0, rows), checked), distinct)
        self._located = (sample_idx, counts, _versions(sample_idx, counts), located)
        return located

    # ----------------------------------------------------------------------------------------------
    # Reference loss.

    def has_ref(self, sample_idx: Tensor) -> Tensor:
        """Whether every candidate of each sample has a reference loss.

        Args:
            sample_idx: integer ``[B]``, non-negative keys.

        Returns:
            bool ``[B]``; ``False`` for unregistered samples, ``True`` for registered samples without
            candidates.
        """
        rows = self.index.find(self._check_sample_idx(sample_idx))
        registered = rows >= 0
        if not bool(registered.all()):
            out = torch.zeros_like(registered)
            if bool(registered.any()):
                out[registered] = self._complete(rows[registered])
            return out
        return self._complete(rows)

    def _complete(self, rows: Tensor) -> Tensor:
        """Whether registered ``rows`` (int64 ``[B]``) have every reference loss: bool ``[B]``."""
        lengths = self.length.index_select(0, rows)
        slots = flat_ranges(self.offset.index_select(0, rows), lengths)
        missing = torch.isnan(self.ref.index_select(0, slots))
        # Per-row counts of NaN as differences of one running sum: no scatter, no per-row loop.
        running = torch.cat([missing.new_zeros(1, dtype=torch.int64), torch.cumsum(missing, 0)])
        ends = torch.cumsum(lengths, 0)
        return running.index_select(0, ends) == running.index_select(0, ends - lengths)

    def set_ref(self, sample_idx: Tensor, flat_values: Tensor, counts: Tensor) -> None:
        """Store reference losses (overwriting).

        Non-finite values are stored as NaN ("not computed"), so :meth:`has_ref` stays ``False`` for
        that sample and the caller recomputes it.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            flat_values: float ``[N]``, ``N = counts.sum()``, flat layout.
            counts: integer ``[B]``, candidates per row.
        """
        slots, distinct = self._locate(sample_idx, counts)
        values = self._check_flat("flat_values", flat_values, slots)
        if distinct:  # one value per slot: the mean of one finite value is that value
            self.ref.index_copy_(0, slots, torch.where(torch.isfinite(values), values, _NAN))
        else:
            self.ref.index_copy_(0, *_mean_of_finite(slots, values))

    def get_ref(self, sample_idx: Tensor, counts: Tensor) -> Tensor:
        """Stored reference losses, NaN where not computed.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            counts: integer ``[B]``, candidates per row.

        Returns:
            float32 ``[counts.sum()]``, flat layout.
        """
        return self.ref.index_select(0, self._locate(sample_idx, counts).slots)

    # ----------------------------------------------------------------------------------------------
    # Student difficulty.

    def get_ema(self, sample_idx: Tensor, counts: Tensor) -> Tensor:
        """Per-(sample, candidate) student-loss EMA, NaN where never measured.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            counts: integer ``[B]``, candidates per row.

        Returns:
            float32 ``[counts.sum()]``, flat layout.
        """
        return self.ema.index_select(0, self._locate(sample_idx, counts).slots)

    def update(
        self,
        sample_idx: Tensor,
        flat_loss: Tensor,
        counts: Tensor,
        target_ids_flat: Tensor,
        decay: float,
    ) -> None:
        """Fold the student's per-candidate losses of one step into the EMAs.

        Per slot: ``m <- decay * m + (1 - decay) * loss`` where the loss is finite, first measurement
        initialises (:func:`~regate_lightning.scoring.ema_update`). Per vocabulary id: the same rule
        applied once per call to the mean finite loss of all candidates whose target is that id.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            flat_loss: float ``[N]``, flat layout; NaN where the student computed nothing (elided).
            counts: integer ``[B]``, candidates per row.
            target_ids_flat: integer ``[N]``, the target token id of each candidate, in
                ``[0, vocab_size)``.
            decay: ``beta`` in ``[0, 1]``.
        """
        check_fraction("decay", decay)
        slots, distinct = self._locate(sample_idx, counts)
        loss = self._check_flat("flat_loss", flat_loss, slots)
        ids = self._check_target_ids(target_ids_flat, slots)
        # One loss per slot: as it is where the samples are distinct (ema_update skips the non-finite ones,
        # as the mean does), else the mean of the finite ones.
        uslots, slot_loss = (slots, loss) if distinct else _mean_of_finite(slots, loss)
        self.ema.index_copy_(0, uslots, ema_update(self.ema.index_select(0, uslots), slot_loss, decay))
        uids, id_mean = _mean_of_finite(ids, loss)
        self.vocab_ema.index_copy_(0, uids, ema_update(self.vocab_ema.index_select(0, uids), id_mean, decay))

    def difficulty(
        self,
        sample_idx: Tensor,
        counts: Tensor,
        target_ids_flat: Tensor,
        fallback: str = "vocab",
    ) -> Tensor:
        """Student difficulty ``m`` for scoring, with a fallback where a candidate was never measured.

        * ``"vocab"`` (default): the per-vocabulary-id EMA of the candidate's target token; where that
          id is unseen too, the reference loss. Useful in one-epoch runs, where a per-sample EMA is
          never read back.
        * ``"ref"``: the reference loss, so an unmeasured candidate's fused score is its reference loss.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            counts: integer ``[B]``, candidates per row.
            target_ids_flat: integer ``[N]``, target token ids, in ``[0, vocab_size)``.
            fallback: ``"vocab"`` or ``"ref"``.

        Returns:
            float32 ``[N]``, flat layout; NaN only where every source in the chain is missing.

        Raises:
            ValueError: if ``fallback`` is not one of :data:`FALLBACKS`.
        """
        if fallback not in FALLBACKS:
            raise ValueError(f"`fallback` must be one of {FALLBACKS}, got {fallback!r}")
        slots = self._locate(sample_idx, counts).slots
        m = self.ema.index_select(0, slots)
        if fallback == "vocab":
            ids = self._check_target_ids(target_ids_flat, slots)
            m = torch.where(torch.isnan(m), self.vocab_ema.index_select(0, ids), m)
        return torch.where(torch.isnan(m), self.ref.index_select(0, slots), m)

    # ----------------------------------------------------------------------------------------------
    # Growth.

    def _grow_values(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for name in ("ema", "ref"):
            old = getattr(self, name)
            new = torch.full((new_capacity,), _NAN, dtype=old.dtype, device=old.device)
            new[: self._size] = old[: self._size]
            setattr(self, name, new)

    def _grow_rows(self, needed: int) -> None:
        if needed <= self.keys.numel():
            return
        new_size = max(needed, 2 * self.keys.numel())
        for name in (*self._ROW_BUFFERS, "pending"):
            old = getattr(self, name)
            new = torch.zeros(new_size, dtype=old.dtype, device=old.device)
            new[: self._rows] = old[: self._rows]
            setattr(self, name, new)

    # ----------------------------------------------------------------------------------------------
    # Checkpointing: trimmed to the used part, versioned, loadable into a bank of any capacity.

    def _apply(self, fn: Any, recurse: bool = True) -> ScoreBank:
        self._located = None  # the kept slots live on the old device
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict[str, int]:
        """Format version and the arguments a loaded state must match."""
        return {"format_version": BANK_FORMAT_VERSION, "vocab_size": self.vocab_size}

    def set_extra_state(self, state: Any) -> None:
        """Check a loaded state's version and arguments (also checked before the buffers load)."""
        self._check_extra_state(state)

    def _check_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "format_version" not in state:
            raise ValueError(f"not a ScoreBank state (no `format_version`): {state!r}")
        if state["format_version"] != BANK_FORMAT_VERSION:
            raise ValueError(
                f"ScoreBank state has format version {state['format_version']}, this code reads version "
                f"{BANK_FORMAT_VERSION}"
                + (
                    " (version 1 keyed samples by their position among the records that were read, which "
                    "shifts when that set changes; its values cannot be matched to samples: start the store afresh)"
                    if state["format_version"] == 1
                    else ""
                )
            )
        if state.get("vocab_size") != self.vocab_size:
            raise ValueError(
                f"ScoreBank state was saved with vocab_size={state.get('vocab_size')}, this bank has "
                f"vocab_size={self.vocab_size}; the student's tokenizer must not change between runs"
            )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Clones, not views: torch.save writes a view's whole storage, capacity included.
        for name in ("ema", "ref"):
            destination[prefix + name] = getattr(self, name)[: self._size].detach().clone()
        for name in self._ROW_BUFFERS:
            destination[prefix + name] = getattr(self, name)[: self._rows].detach().clone()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        extra_key = prefix + "_extra_state"
        if extra_key in state_dict:
            self._check_extra_state(state_dict[extra_key])
        names = ("ema", "ref", *self._ROW_BUFFERS)
        present = [prefix + n in state_dict for n in names]
        if any(present) and not all(present):
            raise ValueError(f"ScoreBank state must hold all of {names} or none, got {present}")
        if all(present):
            loaded = {n: state_dict[prefix + n] for n in names}
            self._check_loaded(loaded)
            # Resize to the incoming sizes so that the base class copies values into matching shapes.
            device = self.device
            for name, value in loaded.items():
                dtype = torch.float32 if name in ("ema", "ref") else torch.int64
                setattr(self, name, torch.empty(value.shape, dtype=dtype, device=device))
            self._size = loaded["ema"].numel()
            self._rows = loaded["keys"].numel()
            # Values from a checkpoint are pending until live data confirms each sample (see the class docstring).
            self.pending = torch.ones(self._rows, dtype=torch.bool, device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if all(present):
            self.index.rebuild(self.keys[: self._rows])
            self._located = None

    @staticmethod
    def _check_loaded(loaded: dict[str, Tensor]) -> None:
        ema, ref, keys = loaded["ema"], loaded["ref"], loaded["keys"]
        if ema.dim() != 1 or ref.shape != ema.shape:
            raise ValueError(
                f"ScoreBank state: `ema` and `ref` must be 1-D of equal size, got {tuple(ema.shape)} and "
                f"{tuple(ref.shape)}"
            )
        if keys.dim() != 1 or any(loaded[n].shape != keys.shape for n in ScoreBank._ROW_BUFFERS):
            raise ValueError(
                "ScoreBank state: `keys`, `offset`, `length` and `digest` must be 1-D of equal size, got "
                + ", ".join(str(tuple(loaded[n].shape)) for n in ScoreBank._ROW_BUFFERS)
            )
        offset, length = loaded["offset"], loaded["length"]
        if bool((keys < 0).any()) or keys.unique().numel() != keys.numel():
            raise ValueError("ScoreBank state is corrupt: sample keys must be distinct and non-negative")
        if bool((length < 0).any()) or bool((offset < 0).any()) or bool((offset + length > ema.numel()).any()):
            raise ValueError("ScoreBank state is corrupt: a sample's slots lie outside `ema`")

    # ----------------------------------------------------------------------------------------------
    # Input checks.

    def _check_sample_idx(self, sample_idx: Tensor) -> Tensor:
        if not isinstance(sample_idx, Tensor) or sample_idx.dim() != 1:
            raise ValueError(f"`sample_idx` must be a 1-D tensor [B], got {_describe(sample_idx)}")
        if not _is_integer(sample_idx):
            raise TypeError(f"`sample_idx` must be an integer tensor, got {sample_idx.dtype}")
        idx = sample_idx.to(device=self.device, dtype=torch.int64)
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"`sample_idx` must be >= 0, got {int(idx.min())}")
        return idx

    def _check_digests(self, digests: Tensor | None, idx: Tensor) -> Tensor:
        if digests is None:
            return torch.full_like(idx, NO_DIGEST)
        if not isinstance(digests, Tensor) or digests.shape != idx.shape:
            raise ValueError(f"`digests` must be a tensor of shape {tuple(idx.shape)}, got {_describe(digests)}")
        if not _is_integer(digests):
            raise TypeError(f"`digests` must be an integer tensor, got {digests.dtype}")
        return digests.to(device=self.device, dtype=torch.int64)

    def _check_counts(self, counts: Tensor, idx: Tensor) -> Tensor:
        if not isinstance(counts, Tensor) or counts.shape != idx.shape:
            raise ValueError(f"`counts` must be a tensor of shape {tuple(idx.shape)}, got {_describe(counts)}")
        if not _is_integer(counts):
            raise TypeError(f"`counts` must be an integer tensor, got {counts.dtype}")
        counts = counts.to(device=self.device, dtype=torch.int64)
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError(f"`counts` must be >= 0, got {int(counts.min())}")
        return counts

    def _check_flat(self, name: str, values: Tensor, slots: Tensor) -> Tensor:
        if not isinstance(values, Tensor) or values.shape != slots.shape:
            raise ValueError(f"`{name}` must have shape [counts.sum()] = {tuple(slots.shape)}, got {_describe(values)}")
        return values.to(device=self.device, dtype=torch.float32)

    def _check_target_ids(self, target_ids_flat: Tensor, slots: Tensor) -> Tensor:
        if not isinstance(target_ids_flat, Tensor) or target_ids_flat.shape != slots.shape:
            raise ValueError(
                f"`target_ids_flat` must have shape [counts.sum()] = {tuple(slots.shape)}, got "
                f"{_describe(target_ids_flat)}"
            )
        ids = target_ids_flat.to(device=self.device, dtype=torch.int64)
        if ids.numel():
            low, high = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"`target_ids_flat` must be in [0, {self.vocab_size}), got {bad}")
        return ids


class _Located(NamedTuple):
    """What :meth:`ScoreBank._locate` finds for a batch."""

    slots: Tensor
    """int64 ``[N]``: the flat slot of every candidate, in the flat layout."""
    distinct: bool
    """No sample occurs twice (so no slot does)."""


def _versions(*tensors: Tensor) -> tuple[int, ...]:
    """In-place modification counters of ``tensors``: a kept result is stale once one of them moves."""
    return tuple(t._version for t in tensors)


def _changed(key: int, before: str, now: str) -> ValueError:
    """The error for a sample that comes back with other content than it was registered with."""
    return ValueError(
        f"sample {key} had {before} when first seen and has {now} now; the data must render each sample "
        "identically (same template, same truncation) across epochs, and sample keys must be unique"
    )


def _mean_of_finite(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of the finite ``values`` per distinct key.

    Args:
        keys: int64 ``[N]``.
        values: float32 ``[N]``.

    Returns:
        ``(unique_keys, mean)``: int64 ``[U]`` sorted, float32 ``[U]``; NaN where a key has no finite
        value. Summed in float64, so for one value per key the mean is that value exactly.
    """
    ukeys, inverse = torch.unique(keys, return_inverse=True)
    finite = torch.isfinite(values)
    total = torch.zeros(ukeys.numel(), dtype=torch.float64, device=values.device)
    total.index_add_(0, inverse, torch.where(finite, values, 0.0).to(torch.float64))
    num = torch.zeros(ukeys.numel(), dtype=torch.int64, device=values.device)
    num.index_add_(0, inverse, finite.to(torch.int64))
    mean = torch.where(num > 0, total / num.clamp(min=1), _NAN)
    return ukeys, mean.to(torch.float32)


def _is_integer(x: Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
