"""Per-(sample, candidate) store of the student-loss EMA and the reference loss (pure torch)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from regate_lightning.scoring import check_fraction, check_int, ema_update

__all__ = ["BANK_FORMAT_VERSION", "FALLBACKS", "ScoreBank"]

BANK_FORMAT_VERSION: int = 1
"""Version of :meth:`ScoreBank.state_dict`'s layout; bumped on any incompatible change."""

FALLBACKS: tuple[str, ...] = ("vocab", "ref")
"""Allowed ``fallback`` modes of :meth:`ScoreBank.difficulty`."""

_NAN = math.nan


class ScoreBank(nn.Module):
    """Ragged store of ``m`` (student-loss EMA) and ``ref`` (reference loss) per (sample, candidate).

    Samples are identified by dense non-negative integers (their index in the training set). Each
    registered sample owns a contiguous run of ``length[s]`` slots starting at ``offset[s]`` in the flat
    value buffers, one slot per candidate, in candidate position order. All per-candidate arguments
    and results use the flat layout of :func:`~regate_lightning.scoring.gather_candidates` (row by
    row, position order) with ``counts[b]`` values for row ``b``.

    Buffers (persistent, so ``.to(device)`` and ``state_dict`` work as for any module):

    * ``ema`` float32 ``[capacity]``: student-loss EMA, NaN = never measured;
    * ``ref`` float32 ``[capacity]``: reference loss, NaN = not computed;
    * ``offset`` int64 ``[index_capacity]``: first slot of each sample, -1 = unseen sample;
    * ``length`` int64 ``[index_capacity]``: candidates of each sample (0 for unseen);
    * ``vocab_ema`` float32 ``[vocab_size]``: student-loss EMA per target token id, NaN = unseen.

    Memory. Both capacities grow by amortised doubling. Allocated bytes are
    ``8 * capacity + 16 * index_capacity + 4 * vocab_size`` with ``num_candidates <= capacity <
    2 * num_candidates`` once grown past ``initial_capacity`` and ``index_capacity < 2 * (max sample
    index + 1)``. Used bytes, which is also what :meth:`state_dict` saves (it trims both buffers to the
    used part), are ``8 * num_candidates + 16 * (max sample index + 1) + 4 * vocab_size``. So the store
    scales with the candidates seen, never with samples x max sequence length.

    Duplicates: a sample that occurs more than once in one call (e.g. a padded ``DistributedSampler``,
    or an all-gathered batch) gets one update, with the mean of the finite values given for each slot.

    Determinism: on CPU every method is bitwise deterministic. Means over repeated keys (a vocabulary
    id, a duplicated sample) are float64 ``index_add_`` sums, whose CUDA kernel is bitwise deterministic
    under ``torch.use_deterministic_algorithms(True)`` (Lightning: ``Trainer(deterministic=True)``);
    checked on an H200, where it also matched the CPU result.

    Slots are allocated in registration order (sorted by sample index within one call), so two banks
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
        >>> bank.register(idx, counts)
        >>> bank.set_ref(idx, torch.tensor([0.5, 0.6, 0.7]), counts)
        >>> bank.update(idx, torch.tensor([1.0, float("nan"), float("nan")]), counts, ids, decay=0.9)
        >>> bank.get_ema(idx, counts)
        tensor([1., nan, nan])
        >>> bank.difficulty(idx, counts, ids)  # measured; EMA of id 5; ref (id 6 never measured)
        tensor([1.0000, 1.0000, 0.7000])
    """

    ema: Tensor
    ref: Tensor
    offset: Tensor
    length: Tensor
    vocab_ema: Tensor

    def __init__(self, vocab_size: int, initial_capacity: int = 1024) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("initial_capacity", initial_capacity, minimum=0)
        self.vocab_size = vocab_size
        self._size = 0  # used slots of ema/ref
        self._num_indexed = 0  # max registered sample index + 1
        self._num_samples = 0  # registered samples
        self.register_buffer("ema", torch.full((initial_capacity,), _NAN))
        self.register_buffer("ref", torch.full((initial_capacity,), _NAN))
        self.register_buffer("offset", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("length", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("vocab_ema", torch.full((vocab_size,), _NAN))

    # ----------------------------------------------------------------------------------------------
    # Sizes.

    @property
    def num_samples(self) -> int:
        """Number of registered samples."""
        return self._num_samples

    @property
    def num_candidates(self) -> int:
        """Number of used candidate slots (sum of the registered samples' candidates)."""
        return self._size

    @property
    def capacity(self) -> int:
        """Number of allocated candidate slots."""
        return self.ema.numel()

    def nbytes(self, used_only: bool = False) -> int:
        """Bytes of the store's buffers.

        Args:
            used_only: ``False``: the allocated bytes (``8 * capacity + 16 * index_capacity + 4 *
                vocab_size``). ``True``: the bytes in use, which is what :meth:`state_dict` saves
                (``8 * num_candidates + 16 * (max sample index + 1) + 4 * vocab_size``).

        Returns:
            A byte count.
        """
        if used_only:
            return 8 * self._size + 16 * self._num_indexed + 4 * self.vocab_size
        return sum(
            b.numel() * b.element_size()
            for b in (self.ema, self.ref, self.offset, self.length, self.vocab_ema)
        )

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self.ema.device

    # ----------------------------------------------------------------------------------------------
    # Registration and slot lookup.

    def register(self, sample_idx: Tensor, num_candidates: Tensor) -> None:
        """Allocate slots for unseen samples; check seen samples still have the same candidates.

        The call is atomic: on an error nothing is changed.

        Args:
            sample_idx: integer ``[B]``, non-negative sample indices (repeats allowed).
            num_candidates: integer ``[B]``, non-negative candidate counts (``candidates.sum(1)``).

        Raises:
            ValueError: if a seen sample's count differs from the one it was registered with, if one
                sample occurs in the call with two different counts, or on bad shapes or values.
        """
        idx = self._check_sample_idx(sample_idx)
        counts = self._check_counts(num_candidates, idx)
        if idx.numel() == 0:
            return
        uidx, inverse = torch.unique(idx, return_inverse=True)
        ucounts = torch.zeros_like(uidx).scatter_(0, inverse, counts)
        clash = counts != ucounts[inverse]
        if bool(clash.any()):
            b = int(clash.nonzero()[0, 0])
            s = int(idx[b])
            raise ValueError(
                f"sample {s} occurs more than once in one batch with {int(ucounts[inverse[b]])} and "
                f"{int(counts[b])} candidates; the data must render each sample identically (same "
                "template, same truncation)"
            )
        seen = self.is_registered(uidx)
        self._raise_on_count_mismatch(uidx[seen], ucounts[seen])

        new_idx, new_counts = uidx[~seen], ucounts[~seen]
        if new_idx.numel() == 0:
            return
        self._grow_index(int(new_idx.max()) + 1)
        total = int(new_counts.sum())
        self._grow_values(self._size + total)
        self.offset[new_idx] = self._size + torch.cumsum(new_counts, 0) - new_counts
        self.length[new_idx] = new_counts
        self._size += total
        self._num_samples += new_idx.numel()

    def is_registered(self, sample_idx: Tensor) -> Tensor:
        """Whether each sample has been registered.

        Args:
            sample_idx: integer ``[B]``, non-negative.

        Returns:
            bool ``[B]`` on the buffers' device.
        """
        idx = self._check_sample_idx(sample_idx)
        known = idx < self._num_indexed
        out = torch.zeros_like(known)
        out[known] = self.offset[idx[known]] >= 0
        return out

    def _slots(self, sample_idx: Tensor, counts: Tensor) -> Tensor:
        """Flat slot index of every candidate of registered samples: int64 ``[counts.sum()]``."""
        return self._layout(sample_idx, counts)[0]

    def _layout(self, sample_idx: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Slots and owning rows of every candidate of registered samples, in flat layout.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            counts: integer ``[B]``, their candidate counts (checked against the registered ones).

        Returns:
            ``(slots, row)``: int64 ``[counts.sum()]`` each; ``row[j]`` is the batch row of value ``j``.
        """
        idx = self._check_sample_idx(sample_idx)
        counts = self._check_counts(counts, idx)
        registered = self.is_registered(idx)
        if not bool(registered.all()):
            missing = idx[~registered].unique().tolist()
            raise ValueError(f"samples {missing[:10]} are not registered; call `register()` first")
        self._raise_on_count_mismatch(idx, counts)
        total = int(counts.sum())
        row = torch.repeat_interleave(
            torch.arange(idx.numel(), device=self.device), counts, output_size=total
        )
        within = torch.arange(total, device=self.device) - (torch.cumsum(counts, 0) - counts)[row]
        return self.offset[idx][row] + within, row

    def _raise_on_count_mismatch(self, idx: Tensor, counts: Tensor) -> None:
        """Raise if registered samples ``idx`` [B] were registered with other counts than ``counts``."""
        mismatch = self.length[idx] != counts
        if bool(mismatch.any()):
            b = int(mismatch.nonzero()[0, 0])
            raise ValueError(
                f"sample {int(idx[b])} had {int(self.length[idx[b]])} candidates when first seen and has "
                f"{int(counts[b])} now; the data must render each sample identically (same template, "
                "same truncation) across epochs"
            )

    # ----------------------------------------------------------------------------------------------
    # Reference loss.

    def has_ref(self, sample_idx: Tensor) -> Tensor:
        """Whether every candidate of each sample has a reference loss.

        Args:
            sample_idx: integer ``[B]``, non-negative.

        Returns:
            bool ``[B]``; ``False`` for unregistered samples, ``True`` for registered samples without
            candidates.
        """
        registered = self.is_registered(sample_idx)
        out = torch.zeros_like(registered)
        if not bool(registered.any()):
            return out
        idx = self._check_sample_idx(sample_idx)[registered]
        lengths = self.length[idx]
        slots, row = self._layout(idx, lengths)
        num_missing = torch.zeros(idx.numel(), dtype=torch.int64, device=self.device)
        num_missing.index_add_(0, row, torch.isnan(self.ref[slots]).to(torch.int64))
        out[registered] = num_missing == 0
        return out

    def set_ref(self, sample_idx: Tensor, flat_values: Tensor, counts: Tensor) -> None:
        """Store reference losses (overwriting).

        Non-finite values are stored as NaN ("not computed"), so :meth:`has_ref` stays ``False`` for
        that sample and the caller recomputes it.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            flat_values: float ``[N]``, ``N = counts.sum()``, flat layout.
            counts: integer ``[B]``, candidates per row.
        """
        slots = self._slots(sample_idx, counts)
        values = self._check_flat("flat_values", flat_values, slots)
        uslots, mean = _mean_of_finite(slots, values)
        self.ref[uslots] = mean

    def get_ref(self, sample_idx: Tensor, counts: Tensor) -> Tensor:
        """Stored reference losses, NaN where not computed.

        Args:
            sample_idx: integer ``[B]`` of registered samples.
            counts: integer ``[B]``, candidates per row.

        Returns:
            float32 ``[counts.sum()]``, flat layout.
        """
        return self.ref[self._slots(sample_idx, counts)]

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
        return self.ema[self._slots(sample_idx, counts)]

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
        slots = self._slots(sample_idx, counts)
        loss = self._check_flat("flat_loss", flat_loss, slots)
        ids = self._check_target_ids(target_ids_flat, slots)
        uslots, slot_mean = _mean_of_finite(slots, loss)
        self.ema[uslots] = ema_update(self.ema[uslots], slot_mean, decay)
        uids, id_mean = _mean_of_finite(ids, loss)
        self.vocab_ema[uids] = ema_update(self.vocab_ema[uids], id_mean, decay)

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
        slots = self._slots(sample_idx, counts)
        m = self.ema[slots]
        if fallback == "vocab":
            ids = self._check_target_ids(target_ids_flat, slots)
            m = torch.where(torch.isnan(m), self.vocab_ema[ids], m)
        return torch.where(torch.isnan(m), self.ref[slots], m)

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

    def _grow_index(self, needed: int) -> None:
        if needed > self.offset.numel():
            new_size = max(needed, 2 * self.offset.numel())
            offset = torch.full((new_size,), -1, dtype=torch.int64, device=self.device)
            length = torch.zeros(new_size, dtype=torch.int64, device=self.device)
            offset[: self._num_indexed] = self.offset[: self._num_indexed]
            length[: self._num_indexed] = self.length[: self._num_indexed]
            self.offset, self.length = offset, length
        self._num_indexed = max(self._num_indexed, needed)

    # ----------------------------------------------------------------------------------------------
    # Checkpointing: trimmed to the used part, versioned, loadable into a bank of any capacity.

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
            )
        if state.get("vocab_size") != self.vocab_size:
            raise ValueError(
                f"ScoreBank state was saved with vocab_size={state.get('vocab_size')}, this bank has "
                f"vocab_size={self.vocab_size}; the student's tokenizer must not change between runs"
            )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Clones, not views: torch.save writes a view's whole storage, capacity included.
        for name, used in (
            ("ema", self._size),
            ("ref", self._size),
            ("offset", self._num_indexed),
            ("length", self._num_indexed),
        ):
            destination[prefix + name] = getattr(self, name)[:used].detach().clone()

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
        names = ("ema", "ref", "offset", "length")
        present = [prefix + n in state_dict for n in names]
        if any(present) and not all(present):
            raise ValueError(f"ScoreBank state must hold all of {names} or none, got {present}")
        if all(present):
            ema, ref, offset, length = (state_dict[prefix + n] for n in names)
            self._check_loaded(ema, ref, offset, length)
            # Resize to the incoming sizes so that the base class copies values into matching shapes.
            device = self.device
            self.ema = torch.empty(ema.shape, dtype=torch.float32, device=device)
            self.ref = torch.empty(ref.shape, dtype=torch.float32, device=device)
            self.offset = torch.empty(offset.shape, dtype=torch.int64, device=device)
            self.length = torch.empty(length.shape, dtype=torch.int64, device=device)
            self._size = ema.numel()
            self._num_indexed = offset.numel()
            self._num_samples = int((offset >= 0).sum())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @staticmethod
    def _check_loaded(ema: Tensor, ref: Tensor, offset: Tensor, length: Tensor) -> None:
        if ema.dim() != 1 or ref.shape != ema.shape:
            raise ValueError(
                f"ScoreBank state: `ema` and `ref` must be 1-D of equal size, got {tuple(ema.shape)} and "
                f"{tuple(ref.shape)}"
            )
        if offset.dim() != 1 or length.shape != offset.shape:
            raise ValueError(
                f"ScoreBank state: `offset` and `length` must be 1-D of equal size, got "
                f"{tuple(offset.shape)} and {tuple(length.shape)}"
            )
        seen = offset >= 0
        if bool((length < 0).any()) or bool((offset[seen] + length[seen] > ema.numel()).any()):
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

    def _check_counts(self, counts: Tensor, idx: Tensor) -> Tensor:
        if not isinstance(counts, Tensor) or counts.shape != idx.shape:
            raise ValueError(
                f"`counts` must be a tensor of shape {tuple(idx.shape)}, got {_describe(counts)}"
            )
        if not _is_integer(counts):
            raise TypeError(f"`counts` must be an integer tensor, got {counts.dtype}")
        counts = counts.to(device=self.device, dtype=torch.int64)
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError(f"`counts` must be >= 0, got {int(counts.min())}")
        return counts

    def _check_flat(self, name: str, values: Tensor, slots: Tensor) -> Tensor:
        if not isinstance(values, Tensor) or values.shape != slots.shape:
            raise ValueError(
                f"`{name}` must have shape [counts.sum()] = {tuple(slots.shape)}, got {_describe(values)}"
            )
        return values.to(device=self.device, dtype=torch.float32)

    def _check_target_ids(self, target_ids_flat: Tensor, slots: Tensor) -> Tensor:
        if not isinstance(target_ids_flat, Tensor) or target_ids_flat.shape != slots.shape:
            raise ValueError(
                f"`target_ids_flat` must have shape [counts.sum()] = {tuple(slots.shape)}, got "
                f"{_describe(target_ids_flat)}"
            )
        ids = target_ids_flat.to(device=self.device, dtype=torch.int64)
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"`target_ids_flat` must be in [0, {self.vocab_size}), got {bad}")
        return ids


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
