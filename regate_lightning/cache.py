"""The reference-loss cache file: reference losses per sample, written once, read by later runs.

A cache holds, for every scored sample, its key, candidate count and content digest (see
:class:`~regate_lightning.bank.ScoreBank`) and the teacher's loss at each candidate (flat layout, see
:mod:`regate_lightning.scoring`), and a *fingerprint* of what made them: the teacher, its vocabulary,
the tokenizer and how the data are rendered. Loading a cache whose fingerprint differs from the
current run's is refused, since its losses would describe another teacher or another rendering. Within
a matching cache every sample is checked again when training meets it: an entry whose candidate count
or digest differs from the sample's (the record changed, or another record now has its key) is
recomputed and counted, never used. Writes are atomic (a temporary file in the same folder, then
``os.replace``), so a run killed while writing leaves the previous cache whole.

Reading. ``fit`` opens the file with :func:`open_cache`: its arrays are memory-mapped
(``torch.load(mmap=True)``) and checked for shape and order, which reads the keys and counts but not
the losses, so starting from a cache of a million samples takes well under a second
(``docs/memory.md``). A sample's losses are read from the mapping when training first meets the sample
(:meth:`ReferenceCache.read`), after its count and digest were compared. ``regate-lightning score``
reads whole files into its store (:func:`load_cache`, :func:`load_into`) to merge them.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from regate_lightning.bank import ScoreBank, flat_ranges, same_content

if TYPE_CHECKING:
    from regate_lightning.teacher import Teacher

__all__ = [
    "CACHE_VERSION",
    "CHUNK_SAMPLES",
    "ReferenceCache",
    "cached_samples",
    "load_cache",
    "load_into",
    "open_cache",
    "reference_fingerprint",
    "save_cache",
    "share_complete",
    "write_atomic",
]

CACHE_VERSION = 2
CHUNK_SAMPLES = 1 << 16
"""Samples per bank call when a cache is written or read: bounds the temporaries of huge caches."""
_ARRAYS = {"sample_idx": torch.int64, "counts": torch.int64, "digests": torch.int64, "ref": torch.float32}
_FIX = "delete it (or point `ref_cache` at another file) and the reference losses are computed again"


def cached_samples(bank: ScoreBank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples of ``bank`` whose reference losses are complete, by ascending key.

    Returns:
        ``(sample_idx [S], counts [S], digests [S], flat_ref [N])`` on the CPU.
    """
    registered = torch.sort(bank.sample_keys()).values
    empty = torch.zeros(0, dtype=torch.int64)
    parts: list[tuple[torch.Tensor, ...]] = [(empty, empty, empty, torch.zeros(0))]
    for keys in registered.split(CHUNK_SAMPLES):  # chunks bound the temporaries (slot indices) at scale
        done = keys[bank.has_ref(keys)]
        counts = bank.candidate_counts(done)
        parts.append((done.cpu(), counts.cpu(), bank.digests(done).cpu(), bank.get_ref(done, counts).cpu()))
    idx, counts, digests, ref = zip(*parts, strict=True)
    return torch.cat(idx), torch.cat(counts), torch.cat(digests), torch.cat(ref)


def save_cache(
    path: str | os.PathLike,
    bank: ScoreBank,
    fingerprint: dict[str, Any],
    samples: torch.Tensor | None = None,
    base: ReferenceCache | None = None,
    data_keys: torch.Tensor | None = None,
) -> int:
    """Write the complete reference losses of ``bank`` to ``path`` atomically.

    Args:
        path: the cache file.
        bank: the store to read.
        fingerprint: what made the losses (see :func:`reference_fingerprint`).
        samples: integer ``[K]``: write only these samples (those of them that are complete); all when None.
        base: an opened cache whose samples are kept where ``bank`` has not registered them (``fit`` reads
            its cache lazily, so the samples it has not met yet are only in the file); its fingerprint
            must be ``fingerprint``.
        data_keys: integer ``[K]``: the keys of the samples the training data hold now; the others (records
            removed, or edited to another identity) are left out. None keeps every sample.

    Returns:
        The number of samples written.
    """
    sample_idx, counts, digests, ref = cached_samples(bank)
    if samples is not None:
        keep = torch.isin(sample_idx, samples.to(device="cpu", dtype=torch.int64))
        ref = ref[torch.repeat_interleave(keep, counts)]
        sample_idx, counts, digests = sample_idx[keep], counts[keep], digests[keep]
    if base is not None and len(base):
        sample_idx, counts, digests, ref = _merge((sample_idx, counts, digests, ref), base, bank)
    if data_keys is not None:
        live = torch.isin(sample_idx, data_keys.to(device="cpu", dtype=torch.int64))
        ref = ref[torch.repeat_interleave(live, counts)]
        sample_idx, counts, digests = sample_idx[live], counts[live], digests[live]
    payload = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "sample_idx": sample_idx,
        "counts": counts,
        "digests": digests,
        "ref": ref,
    }
    write_atomic(path, payload)
    return int(sample_idx.numel())


def _merge(
    own: tuple[torch.Tensor, ...], base: ReferenceCache, bank: ScoreBank
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``own`` (the store's samples, ascending keys) and the samples of ``base`` the store has not registered."""
    unmet = torch.cat([~bank.is_registered(k).cpu() for k in base.sample_idx.split(CHUNK_SAMPLES)])
    keys = torch.cat([own[0], base.sample_idx[unmet]])
    order = torch.argsort(keys)  # the keys are distinct: the store's and the unmet ones
    counts = torch.cat([own[1], base.counts[unmet]])
    starts = torch.cat([torch.cumsum(own[1], 0) - own[1], base.starts[unmet]])
    from_base = torch.cat([torch.zeros_like(own[0], dtype=torch.bool), torch.ones(int(unmet.sum()), dtype=torch.bool)])
    out_counts = counts[order]
    ref = torch.empty(int(out_counts.sum()), dtype=torch.float32)
    out_starts = torch.cumsum(out_counts, 0) - out_counts
    for chunk in torch.arange(order.numel()).split(CHUNK_SAMPLES):  # chunks bound the index temporaries
        for source, which in ((own[3], ~from_base[order[chunk]]), (base.ref, from_base[order[chunk]])):
            picked = order[chunk][which]
            values = source[flat_ranges(starts[picked], counts[picked])]
            ref[flat_ranges(out_starts[chunk][which], counts[picked])] = values
    return keys[order], out_counts, torch.cat([own[2], base.digests[unmet]])[order], ref


def write_atomic(path: str | os.PathLike, payload: Any) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path: str | os.PathLike, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Read a cache written for the same fingerprint; None if the file does not exist.

    The arrays are memory-mapped from the file (read when used) and checked: their dtypes and shapes,
    keys that ascend, counts that add up to the losses.

    Raises:
        ValueError: the file is not a readable cache of this version, was made for another teacher,
            tokenizer or rendering of the data, or its arrays do not fit together (the message names
            the file, the differing fields or the fault, and the fix).
    """
    target = Path(path)
    if not target.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch's "file an issue" about a pickle protocol is not for our user
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a foreign or damaged file; torch's own advice (weights_only=False) is wrong here
        raise ValueError(
            f"reference cache {target} is not a readable reference cache ({_load_failure(err)}); {_FIX}"
        ) from None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION or "fingerprint" not in payload:
        found = payload.get("version") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{target} is not a reference cache of version {CACHE_VERSION} (found {found!r}); {_FIX}")
    stored = payload["fingerprint"]
    differ = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
    if differ:
        details = "; ".join(f"{k}: cache {stored.get(k)!r}, run {fingerprint.get(k)!r}" for k in differ)
        raise ValueError(
            f"reference cache {target} was made for another setup ({details}). Point `ref_cache` at a new file, "
            "or delete this one to recompute"
        )
    fault = _layout_fault(payload)
    if fault:
        raise ValueError(f"reference cache {target} is damaged: {fault}; {_FIX}")
    return payload


def _layout_fault(payload: dict[str, Any]) -> str | None:
    """What is wrong with a cache's arrays (reads the keys and counts, not the losses), or None."""
    for name, dtype in _ARRAYS.items():
        value = payload.get(name)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
            got = value.dtype if isinstance(value, torch.Tensor) else repr(value)
            return f"`{name}` must be a 1-D {dtype} tensor, got {got}"
    keys, counts, digests = payload["sample_idx"], payload["counts"], payload["digests"]
    if counts.shape != keys.shape or digests.shape != keys.shape:
        sizes = f"{keys.numel()}, {counts.numel()}, {digests.numel()}"
        return f"`sample_idx`, `counts` and `digests` differ in length ({sizes})"
    if keys.numel() and (int(keys[0]) < 0 or not bool((keys[1:] > keys[:-1]).all())):
        return "the sample keys are not distinct, non-negative and ascending"
    if keys.numel() and int(counts.min()) < 0:
        return "a candidate count is negative"
    if int(counts.sum()) != payload["ref"].numel():
        return f"the candidate counts add up to {int(counts.sum())}, but the file holds {payload['ref'].numel()} losses"
    return None


class ReferenceCache:
    """A reference cache file opened for reading: memory-mapped, each sample read when it is asked for.

    What ``fit`` uses (:func:`open_cache`): opening maps the file and reads its keys and counts; a
    sample's losses are read by :meth:`read`, which training calls the first time it meets the sample,
    and only when the cached count and digest agree with the sample's
    (:func:`~regate_lightning.bank.same_content`). The file may be replaced while it is open (the
    callback writes the cache atomically at the end of each epoch): the mapping keeps the file that was
    opened.

    Args:
        path: the file (for messages).
        payload: what :func:`load_cache` returned for it.

    Attributes:
        sample_idx: int64 ``[S]``, the cached keys, ascending (mapped).
        counts: int64 ``[S]``, candidates per cached sample (mapped).
        digests: int64 ``[S]``, content digests (mapped).
        ref: float32 ``[sum(counts)]``, the losses (mapped).
        starts: int64 ``[S]``, where each sample's losses start in ``ref``.
    """

    def __init__(self, path: str | os.PathLike, payload: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint: dict[str, Any] = payload["fingerprint"]
        self.sample_idx: torch.Tensor = payload["sample_idx"]
        self.counts: torch.Tensor = payload["counts"]
        self.digests: torch.Tensor = payload["digests"]
        self.ref: torch.Tensor = payload["ref"]
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        return self.sample_idx.numel()

    def summary(self) -> str:
        """What equal copies of this file have in common, in one line: its samples, fingerprint and keys.

        A digest of the fingerprint and of the keys, counts and content digests (read at opening), not of
        the losses: cheap at any size, and equal for a file and its copy on another node.
        """
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode())
        for array in (self.sample_idx, self.counts, self.digests):
            digest.update(array.numpy().tobytes())
        return f"{len(self)} samples, {self.ref.numel()} losses, digest {digest.hexdigest()[:12]}"

    def read(self, sample_idx: torch.Tensor, counts: torch.Tensor, digests: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The cached losses of the given samples, where the file holds them for the same content.

        Args:
            sample_idx: int64 ``[B]``, sample keys (on any device).
            counts: int64 ``[B]``, the samples' candidate counts.
            digests: int64 ``[B]``, their content digests.

        Returns:
            ``(found, usable, values)`` on the CPU: bool ``[B]`` (the file holds the key), bool ``[B]``
            (... with the same count and digest) and float32 ``[counts[usable].sum()]`` (the usable
            samples' losses, flat layout).
        """
        idx, counts, digests = (t.to(device="cpu", dtype=torch.int64) for t in (sample_idx, counts, digests))
        if len(self) == 0:
            return torch.zeros_like(idx, dtype=torch.bool), torch.zeros_like(idx, dtype=torch.bool), torch.zeros(0)
        at = torch.searchsorted(self.sample_idx, idx).clamp_(max=len(self) - 1)
        found = self.sample_idx[at] == idx
        usable = found & same_content(counts, digests, self.counts[at], self.digests[at])
        return found, usable, self.ref[flat_ranges(self.starts[at[usable]], counts[usable])]


def open_cache(path: str | os.PathLike, fingerprint: dict[str, Any]) -> ReferenceCache | None:
    """Open a cache written for the same fingerprint for lazy reading; None if the file does not exist.

    Raises:
        ValueError: as :func:`load_cache`.
    """
    payload = load_cache(path, fingerprint)
    return None if payload is None else ReferenceCache(path, payload)


def _load_failure(err: BaseException) -> str:
    """What went wrong reading a file, in one line, without torch's advice to load it unsafely."""
    if "weights_only" in str(err) or "Weights only load failed" in str(err):
        return "it holds objects other than tensors and plain containers"
    if isinstance(err, EOFError) or "central directory" in str(err):
        return "it ends early: truncated, e.g. by a full disk or an interrupted copy"
    return f"damaged, or another kind of file: {type(err).__name__}"


def load_into(bank: ScoreBank, payload: dict[str, Any]) -> int:
    """Register the cached samples in ``bank`` as pending entries and store their reference losses.

    A cached sample that the bank already holds with another candidate count or digest is left out (the
    bank's entry stays). Every loaded entry is checked against its sample when training registers it
    (see :class:`~regate_lightning.bank.ScoreBank`).

    Returns:
        The number of samples loaded.
    """
    sample_idx, counts, ref = payload["sample_idx"], payload["counts"], payload["ref"]
    digests = payload["digests"]
    ends = torch.cumsum(counts, 0)
    loaded = 0
    for start in range(0, sample_idx.numel(), CHUNK_SAMPLES):  # chunks bound the temporaries at scale
        stop = min(start + CHUNK_SAMPLES, sample_idx.numel())
        first = int(ends[start - 1]) if start else 0
        idx, cnt = sample_idx[start:stop], counts[start:stop]
        accepted = bank.register_stored(idx, cnt, digests[start:stop]).cpu()
        values = ref[first : int(ends[stop - 1])][torch.repeat_interleave(accepted, cnt)]
        bank.set_ref(idx[accepted], values, cnt[accepted])
        loaded += int(accepted.sum())
    return loaded


def data_fingerprint(datamodule: Any) -> str | None:
    """The data module's own ``fingerprint()`` (a str naming its samples and rendering), or None."""
    fingerprint = getattr(datamodule, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A short digest of a tokenizer's vocabulary (token -> id), or None without a ``get_vocab``."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return None
    import hashlib
    import json

    text = json.dumps(sorted(get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_fingerprint(teacher_spec: str, teacher: Teacher, datamodule: Any) -> dict[str, Any]:
    """What makes reference losses reusable: the teacher (spec, weights, vocabulary), tokenizer and data.

    The one definition shared by :class:`~regate_lightning.ReGATECallback` (which reads and writes the
    cache while fitting) and ``regate-lightning score`` (which writes it offline), so that a cache made
    by either is accepted by the other, and one made for another setup is refused by both.

    Args:
        teacher_spec: the callback's ``teacher`` argument (``"student"`` or an HF id / path).
        teacher: the teacher as built, before it is cast to the student's dtype or moved to a device, so
            that the digest does not depend on the run's precision.
        datamodule: the training data module (or None); its ``fingerprint()`` and the vocabulary of its
            ``tokenizer`` are used when it has them.

    Returns:
        ``{"teacher", "teacher_weights", "vocab_size", "tokenizer", "data"}``. ``tokenizer`` and ``data``
        are None when the data module has no tokenizer / no ``fingerprint()``; a cache written without
        a key compares equal to None there, so caches written before a key existed still load.
    """
    return {
        "teacher": teacher_spec,
        "teacher_weights": weights_digest(teacher),
        "vocab_size": teacher.vocab_size,
        "tokenizer": tokenizer_digest(getattr(datamodule, "tokenizer", None)),
        "data": data_fingerprint(datamodule),
    }


def weights_digest(module: torch.nn.Module, samples: int = 4096) -> str:
    """A short digest of a module's weights (a strided sample of every parameter), for fingerprints."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(module.state_dict().items()):
        flat = param.detach().flatten()
        step = max(1, flat.numel() // samples)
        digest.update(name.encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


Gather = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Concatenates 1-D tensors across ranks in rank order (:data:`regate_lightning.policy.Gather`)."""


def share_complete(bank: ScoreBank, gather: Gather, rank: int, chunk: int = CHUNK_SAMPLES) -> int:
    """Give every rank the complete reference losses of every sample that any rank holds, each sent once.

    After it, :func:`cached_samples` is the same on every rank (so any rank can write the whole cache file).
    ``regate-lightning score`` calls it when it starts (so that no rank scores again what another rank's files
    hold: on node-local folders the nodes see different files) and when it ends (so that every node can
    write the complete file). Two kinds of collective: the keys of every rank (8 bytes a sample), then each
    sample's count, digest and losses from the lowest rank that holds it, in rounds of ``chunk`` samples per
    rank (every rank computes the same number of rounds from the keys).

    Args:
        bank: this rank's store.
        gather: the cross-rank all-gather (one output per input, concatenated in rank order).
        rank: this rank's index in the gather's order.
        chunk: samples a rank sends per round: bounds each collective's buffers.

    Returns:
        The number of samples this rank received.
    """
    keys = torch.sort(bank.sample_keys().cpu()).values
    keys = keys[bank.has_ref(keys).cpu()] if keys.numel() else keys
    all_keys, lengths = (t.cpu() for t in gather([keys, torch.tensor([keys.numel()])]))
    per_rank = all_keys.split(lengths.tolist())
    owned, seen = [], torch.zeros(0, dtype=torch.int64)
    for held in per_rank:  # a sample is sent by the lowest rank that holds it
        new = held[~torch.isin(held, seen)]
        owned.append(new)
        seen = torch.cat([seen, new])
    rounds = max((n.numel() + chunk - 1) // chunk for n in owned)
    mine = owned[rank]
    received = 0
    for start in range(0, rounds * chunk, chunk):
        send = mine[start : start + chunk]
        counts = bank.candidate_counts(send).cpu() if send.numel() else torch.zeros(0, dtype=torch.int64)
        digests = bank.digests(send).cpu() if send.numel() else torch.zeros(0, dtype=torch.int64)
        ref = bank.get_ref(send, counts).float().cpu() if send.numel() else torch.zeros(0)
        idx, counts, digests, ref = (t.cpu() for t in gather([send, counts, digests, ref]))
        need = ~bank.has_ref(idx).cpu() if idx.numel() else torch.zeros(0, dtype=torch.bool)
        if bool(need.any()):
            payload = {
                "sample_idx": idx[need],
                "counts": counts[need],
                "digests": digests[need],
                "ref": ref[torch.repeat_interleave(need, counts)],
            }
            received += load_into(bank, payload)
    return received
