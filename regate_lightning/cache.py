"""The reference-loss cache file: reference losses per sample, written once, read by later runs.

A cache holds, for every scored sample, its candidate count and the teacher's loss at each
candidate (flat layout, see :mod:`regate_lightning.scoring`), and a *fingerprint* of what made
them: the teacher, its vocabulary, the data. Loading a cache whose fingerprint differs from the
current run's is refused, since its losses would describe another teacher or other samples.
Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a run killed while
writing leaves the previous cache whole.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from regate_lightning.bank import ScoreBank

CACHE_VERSION = 1


def cached_samples(bank: ScoreBank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples of ``bank`` whose reference losses are complete.

    Returns:
        ``(sample_idx [S], counts [S], flat_ref [N])`` on the CPU.
    """
    registered = (bank.offset >= 0).nonzero().flatten()
    if registered.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0)
    done = registered[bank.has_ref(registered)]
    counts = bank.length[done]
    return done.cpu(), counts.cpu(), bank.get_ref(done, counts).cpu()


def save_cache(path: str | os.PathLike, bank: ScoreBank, fingerprint: dict[str, Any]) -> int:
    """Write the complete reference losses of ``bank`` to ``path`` atomically.

    Returns:
        The number of samples written.
    """
    sample_idx, counts, ref = cached_samples(bank)
    payload = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "sample_idx": sample_idx,
        "counts": counts,
        "ref": ref,
    }
    write_atomic(path, payload)
    return int(sample_idx.numel())


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

    Raises:
        ValueError: the file is not a cache of this version, or was made for another teacher,
            tokenizer or data set (the message names the differing fields and the fix).
    """
    target = Path(path)
    if not target.exists():
        return None
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file: say which and how to fix
        raise ValueError(f"reference cache {target} cannot be read ({err}); delete it to recompute") from err
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        raise ValueError(f"{target} is not a reference cache of version {CACHE_VERSION}; delete it to recompute")
    stored = payload["fingerprint"]
    differ = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
    if differ:
        details = "; ".join(f"{k}: cache {stored.get(k)!r}, run {fingerprint.get(k)!r}" for k in differ)
        raise ValueError(
            f"reference cache {target} was made for another setup ({details}). Point `ref_cache` at a new file, "
            "or delete this one to recompute"
        )
    return payload


def load_into(bank: ScoreBank, payload: dict[str, Any]) -> int:
    """Register the cached samples in ``bank`` and store their reference losses.

    Returns:
        The number of samples loaded.
    """
    sample_idx, counts, ref = payload["sample_idx"], payload["counts"], payload["ref"]
    if sample_idx.numel():
        bank.register(sample_idx, counts)
        bank.set_ref(sample_idx, ref, counts)
    return int(sample_idx.numel())


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
