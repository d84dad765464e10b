"""What the ranks of a run must share, agreed through the process group rather than assumed of the file system.

Several nodes rarely share every folder: scratch space is node-local on most clusters. A file that only
some ranks can read splits them silently (one rank reads reference losses while another runs its teacher;
one rank restores a checkpoint while another starts afresh), and a file that only some ranks write is
lost to the others. So every rank describes what it sees, the descriptions travel through the process
group (:func:`gather_text`, one ragged all-gather), and:

* :func:`agree_on_file` refuses, on every rank at once and before any work, a file that the ranks see
  differently (present on some, absent or different on others), naming the folder and what to share;
* :func:`first_in_folder` tells each rank whether it is the lowest rank that sees a folder, so that a file
  all ranks hold the same content for is written once per file system (once on a shared folder, once per
  node on node-local folders);
* :func:`raise_together` turns one rank's error into an error on every rank, instead of leaving the
  others waiting in their next collective until the process group's timeout.

A single process skips all of it (no collective, no file).
"""

from __future__ import annotations

import inspect
import secrets
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.strategies import Strategy

from regate_lightning.sync import RaggedGather

__all__ = [
    "SharedFileError",
    "agree_on_file",
    "check_checkpoint",
    "first_in_folder",
    "gather_text",
    "raise_together",
    "rank_name",
    "resuming_from",
]


class SharedFileError(RuntimeError):
    """The ranks of a run see a file they must share differently (or one of them failed to read it)."""


def gather_text(strategy: Strategy, text: str) -> list[str]:
    """Every rank's ``text``, in rank order, through the process group (``[text]`` on one process).

    Args:
        strategy: the trainer's strategy.
        text: this rank's text (any length; UTF-8).

    Returns:
        ``world_size`` strings, the same list on every rank.
    """
    if strategy.world_size == 1:
        return [text]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    flat, lengths = RaggedGather(strategy, device=torch.device("cpu"))([data, torch.tensor([data.numel()])])
    out, start = [], 0
    for n in lengths.tolist():
        out.append(bytes(flat[start : start + n].tolist()).decode())
        start += n
    return out


def rank_name(strategy: Strategy, rank: int) -> str:
    """``"rank R"``, with the node when the run spans several: how messages name a rank."""
    nodes = getattr(strategy, "num_nodes", 1)
    processes = max(strategy.world_size // max(nodes, 1), 1)
    return f"rank {rank} (node {rank // processes})" if nodes > 1 else f"rank {rank}"


def raise_together(strategy: Strategy, error: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed at ``what``; return on every rank otherwise.

    A rank that raises alone leaves the others blocked in their next collective until the process group
    times out (30 minutes by default), and their logs say nothing of why. Every rank calls this after
    trying ``what``: the ranks that failed raise their own error, the others a
    :class:`SharedFileError` that quotes the first failed rank's message.

    Args:
        strategy: the trainer's strategy.
        error: this rank's error, or None.
        what: what was tried, for the message (e.g. ``"reading the reference cache runs/ref.pt"``).

    Raises:
        BaseException: this rank's ``error``, when it has one.
        SharedFileError: another rank failed.
    """
    if strategy.world_size == 1:
        if error is not None:
            raise error
        return
    messages = gather_text(strategy, "" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message]
    if failed:
        rank, message = failed[0]
        raise SharedFileError(f"{what} failed on {rank_name(strategy, rank)}: {message}")


def agree_on_file(strategy: Strategy, path: str | Path, summary: str | None, what: str, share: str) -> None:
    """Refuse, on every rank, a file that the ranks see differently.

    Args:
        strategy: the trainer's strategy.
        path: the file.
        summary: what this rank sees: None when the file is absent, else a short text that equal files give
            equally on every node (sizes, counts, digests; not modification times).
        what: how the message names the file (e.g. ``"reference cache"``).
        share: the fix, e.g. ``"put it on a file system every node mounts, or copy it to every node"``.

    Raises:
        SharedFileError: naming the file, its folder, what each rank sees and ``share``.
    """
    if strategy.world_size == 1:
        return
    seen = gather_text(strategy, "\0" if summary is None else summary)
    if len(set(seen)) == 1:
        return
    lines = "; ".join(
        f"{rank_name(strategy, rank)}: {'no file' if text == chr(0) else text}" for rank, text in enumerate(seen)
    )
    folder = Path(str(path)).parent
    raise SharedFileError(
        f"the {what} {path} is not the same on every rank ({lines}). Each rank reads it from its own file "
        f"system, so the folder {folder} must hold the same file for every node: {share} (docs/scale.md, "
        "'Several nodes: what runs where, and what must be shared')"
    )


def resuming_from(trainer: pl.Trainer) -> str | None:
    """The checkpoint this ``fit`` restores, as seen from a ``setup`` hook (before Lightning reads it), or None.

    Lightning 2.6 resolves ``fit(ckpt_path=...)`` (``"last"``, ``"hpc"``, a path) before the ``setup`` hooks but
    records it on the trainer (``trainer.ckpt_path``) only when it loads the file, after them. The resolved path
    is the ``ckpt_path`` argument of ``Trainer._run`` on the call stack; a path set with
    ``trainer.ckpt_path = ...`` is on the trainer already.

    Args:
        trainer: the trainer whose ``fit`` is running.

    Returns:
        The checkpoint's path or URL, or None (not resuming, or not called from inside ``Trainer._run``).
    """
    if trainer.ckpt_path:
        return str(trainer.ckpt_path)
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            path = frame.f_locals.get("ckpt_path")
            return None if path is None else str(path)
        frame = frame.f_back
    return None


def check_checkpoint(strategy: Strategy, ckpt_path: str | Path | None) -> None:
    """Refuse a resume whose checkpoint not every rank can read, before Lightning restores it.

    Lightning writes checkpoints from global rank 0 and reads them on every rank: on node-local folders the
    other nodes do not have the file, and their error ("Checkpoint file not found") reaches the first node
    as a lost connection. Every rank says whether it has the file (and its size).

    Args:
        strategy: the trainer's strategy (in a ``setup`` hook: the process group exists).
        ckpt_path: the checkpoint being resumed from (:func:`resuming_from`; None when not resuming).

    Raises:
        SharedFileError: the ranks disagree, naming the checkpoint's folder and the fix.
    """
    if strategy.world_size == 1:
        return
    summary = None
    if ckpt_path is not None:
        fs = get_filesystem(ckpt_path)
        if fs.isdir(str(ckpt_path)):  # DeepSpeed writes a folder (its ranks' shards)
            summary = "a folder"
        elif fs.exists(str(ckpt_path)):
            summary = f"{fs.size(str(ckpt_path))} bytes"
    agree_on_file(
        strategy,
        str(ckpt_path),
        summary,
        "checkpoint to resume from",
        "write checkpoints (ModelCheckpoint's `dirpath`, the logger's folder) to a file system every node "
        "mounts, or copy the checkpoint to the same path on every node before resuming",
    )


def first_in_folder(strategy: Strategy, folder: str | Path) -> bool:
    """Whether this rank is the lowest rank that sees ``folder``: the one that writes shared files there.

    Every rank leaves a probe file named after a token of this call in ``folder``; after a barrier each rank
    looks for the probes of the lower ranks. On a folder all nodes share, only rank 0 answers True; on
    node-local folders, the lowest rank of every node. (A network file system that caches directory
    listings may hide a fresh probe for a while: then two ranks write the same content, each atomically,
    which costs time, not data.)

    Args:
        strategy: the trainer's strategy.
        folder: the folder (created if missing).

    Returns:
        True on the ranks that should write.
    """
    if strategy.world_size == 1:
        return True
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = gather_text(strategy, secrets.token_hex(8))[0]  # rank 0's token: one name for this call
    rank = strategy.global_rank
    probes = [folder / f".regate-probe-{token}.{r}" for r in range(strategy.world_size)]
    probes[rank].touch()
    strategy.barrier("regate_probe_written")
    first = not any(p.exists() for p in probes[:rank])
    strategy.barrier("regate_probe_read")
    probes[rank].unlink(missing_ok=True)
    return first
