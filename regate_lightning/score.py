"""Offline reference scoring: ``regate-lightning score --config recipe.yaml``.

The command reads the very recipe that ``fit`` reads, builds the same student, data module and
trainer, finds the :class:`~regate_lightning.ReGATECallback` among ``trainer.callbacks`` and runs its
teacher once over the whole training set, batched, before any training. It writes the callback's
``ref_cache`` file, in the callback's format and with the fingerprint the callback computes
(:func:`regate_lightning.cache.reference_fingerprint`), so a following ``fit`` reads every reference
loss from the file and never runs the teacher.

* **Processes.** Scoring runs as a ``trainer.predict`` of :class:`ReferenceScorer` under the
  recipe's own trainer: its accelerator, devices, strategy (``ddp``, ``ddp_spawn``, ...) and
  precision. Under several processes Lightning gives each rank a disjoint shard of the training set
  (an unrepeated distributed sampler); rank ``r`` of ``W`` writes ``<ref_cache>.part<r>of<W>`` and
  rank 0 merges the parts into ``<ref_cache>`` at the end.
* **Order.** The training loader is rebuilt without shuffling (same dataset, collate function,
  workers and batch size), so two runs see the same batches and write identical caches.
* **Resuming.** Progress is written every ``flush_every`` batches and every ``flush_seconds``
  seconds, atomically (:func:`regate_lightning.cache.write_atomic`): a kill at any moment leaves
  the previous file whole. A restarted run loads the cache and any part files (refusing files made
  for another teacher, tokenizer or data set) and runs the teacher only on samples not in them.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from regate_lightning.bank import ScoreBank
from regate_lightning.cache import load_cache, load_into, reference_fingerprint, save_cache
from regate_lightning.callback import ReGATECallback
from regate_lightning.families import ModelParts, resolve
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS, SAMPLE_IDX
from regate_lightning.scoring import check_int, gather_candidates
from regate_lightning.targets import candidate_mask
from regate_lightning.teacher import Teacher, text_mask

log = logging.getLogger(__name__)

__all__ = [
    "ReferenceScorer",
    "ScoreOptions",
    "ScoreResult",
    "find_callback",
    "part_files",
    "part_path",
    "score",
    "training_loader",
]


@dataclass
class ScoreOptions:
    """Options of ``regate-lightning score`` (``--score.NAME`` on the command line).

    Attributes:
        ref_cache: the cache file to write; by default the ReGATECallback's ``ref_cache``.
        batch_size: samples per teacher batch; by default the training loader's.
        flush_every: write the progress every this many batches (0: only by time and at the end).
        flush_seconds: write the progress at least every this many seconds (0: only by batch count and
            at the end).
        progress: show a progress bar with an ETA on stderr (rank 0 only).
    """

    ref_cache: str | None = None
    batch_size: int | None = None
    flush_every: int = 100
    flush_seconds: float = 300.0
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("flush_every", self.flush_every, minimum=0)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        if not self.flush_seconds >= 0:
            raise ValueError(f"`flush_seconds` must be >= 0, got {self.flush_seconds}")


@dataclass
class ScoreResult:
    """What a scoring run did (the same on every rank).

    Attributes:
        path: the cache file written.
        num_samples: samples in the cache file at the end.
        scored: samples the teacher ran on in this run (all ranks).
        reused: samples skipped because an earlier run had scored them (all ranks).
        seconds: wall-clock time of the scoring loop.
    """

    path: Path
    num_samples: int = 0
    scored: int = 0
    reused: int = 0
    seconds: float = 0.0


def find_callback(trainer: pl.Trainer) -> ReGATECallback:
    """The one :class:`ReGATECallback` among ``trainer.callbacks``.

    Raises:
        ValueError: there is none, or more than one.
    """
    found = [c for c in trainer.callbacks if isinstance(c, ReGATECallback)]
    if len(found) != 1:
        raise ValueError(
            f"`score` needs exactly one regate_lightning.ReGATECallback in `trainer.callbacks` (it names the "
            f"teacher and `ref_cache`); the recipe has {len(found)}"
        )
    return found[0]


def part_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The file rank ``rank`` of ``world_size`` writes its share to: ``<path>.part<rank>of<world_size>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.part{rank}of{world_size}")


def part_files(path: str | Path) -> list[Path]:
    """The part files of ``path`` left by a multi-process run (any world size), sorted."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.part\d+of\d+")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def _temporaries(path: Path) -> list[Path]:
    """Temporary files that a killed ``write_atomic`` of ``path`` or of its parts left behind."""
    pattern = re.compile(re.escape(path.name) + r"(\.part\d+of\d+)?\.[^.]+\.tmp")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def training_loader(loader: Any, batch_size: int | None = None) -> DataLoader:
    """The training loader in a fixed order: same dataset, collate function and workers, no shuffling.

    Args:
        loader: what the data module's ``train_dataloader()`` returned.
        batch_size: samples per batch; None keeps the loader's.

    Returns:
        A ``DataLoader`` over every sample once (no shuffling, nothing dropped). An iterable-style
        dataset is returned as it is (its order is its own).

    Raises:
        TypeError: ``loader`` is not one ``DataLoader``.
        ValueError: the loader has a custom batch sampler and no ``batch_size`` was given.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"`score` needs `train_dataloader()` to return one torch DataLoader, got {type(loader).__name__}"
        )
    if isinstance(loader.dataset, IterableDataset):
        return loader
    size = batch_size if batch_size is not None else loader.batch_size
    if size is None:
        raise ValueError(
            "the training DataLoader uses a custom batch sampler; give `--score.batch_size` so that scoring can "
            "walk the data set in order"
        )
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_size=size,
        shuffle=False,
        drop_last=False,
        collate_fn=loader.collate_fn,
        num_workers=workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
    )


class _TrainingSet(pl.LightningDataModule):
    """Serves the wrapped data module's training set as the predict data, in a fixed order."""

    def __init__(self, inner: pl.LightningDataModule, batch_size: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.batch_size = batch_size
        self.prepare_data_per_node = inner.prepare_data_per_node
        self.iterable = False

    def prepare_data(self) -> None:
        self.inner.trainer = self.trainer
        self.inner.prepare_data()

    def setup(self, stage: str) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup("fit")

    def predict_dataloader(self) -> DataLoader:
        loader = training_loader(self.inner.train_dataloader(), self.batch_size)
        self.iterable = isinstance(loader.dataset, IterableDataset)
        return loader

    def teardown(self, stage: str) -> None:
        self.inner.teardown("fit")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_before_batch_transfer(batch, dataloader_idx)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.inner.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_after_batch_transfer(batch, dataloader_idx)


class ReferenceScorer(pl.LightningModule):
    """Runs a ReGATE teacher over the training set in ``trainer.predict`` and writes the reference cache.

    The student is held but not registered as a submodule, so it stays where it is (on the CPU);
    only the teacher is moved to the device and converted by the precision plugin, exactly as the
    callback's teacher is when fitting. ``model`` exposes the student's HF model for data modules that
    read ``trainer.lightning_module.model``.

    Args:
        student: the recipe's ``MLLMModule`` (anything with the student HF model as ``.model``).
        callback: the recipe's ``ReGATECallback`` (teacher spec and arguments).
        datamodule: the recipe's data module (for the data fingerprint and the tokenizer check).
        path: the cache file.
        options: flush period, progress bar.
    """

    def __init__(
        self,
        student: pl.LightningModule,
        callback: ReGATECallback,
        datamodule: Any,
        path: str | Path,
        options: ScoreOptions | None = None,
    ) -> None:
        super().__init__()
        if getattr(student, "model", None) is None:
            raise TypeError("`score` needs a LightningModule with the student HF model as `.model` (MLLMModule)")
        self._held = (student, datamodule, callback)  # a tuple: not registered as submodules
        self.path = Path(path)
        self.options = options or ScoreOptions()
        self.teacher: Teacher | None = None
        # The store is no submodule: it stays on the CPU in float32 whatever the device and precision.
        self._bank: list[ScoreBank] = []
        self.fingerprint: dict[str, Any] = {}
        self.result = ScoreResult(self.path)
        self.rows_by_rank = False
        self._own = self.path
        self._mine: list[torch.Tensor] | None = None
        self._parts: ModelParts | None = None
        self._pending = 0
        self._last_flush = 0.0
        self._started = 0.0
        self._bar: Any = None
        self._counts = {"scored": 0, "reused": 0}

    @property
    def model(self) -> nn.Module:
        """The student's HF model (not a submodule of the scorer)."""
        return self._held[0].model

    @property
    def bank(self) -> ScoreBank | None:
        """The reference losses scored or loaded so far (on the CPU; None before ``setup``)."""
        return self._bank[0] if self._bank else None

    # ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Build the teacher, compute the fingerprint, load what earlier runs wrote (checked)."""
        if self.teacher is not None:
            return
        student, datamodule, callback = self._held
        self._parts = resolve(student.model)
        teacher = callback.build_teacher(student.model, datamodule)
        self.fingerprint = reference_fingerprint(callback.teacher_spec, teacher, datamodule)
        dtype = next(p.dtype for p in student.parameters() if p.is_floating_point())
        self.teacher = teacher.to(dtype=dtype)
        bank = ScoreBank(vocab_size=teacher.vocab_size)
        self._bank = [bank]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self._own = self.path if world == 1 else part_path(self.path, rank, world)
        self._mine = None if world == 1 else []
        for file in [self.path, *part_files(self.path)]:
            payload = load_cache(file, self.fingerprint)  # refuses a cache made for another setup
            if payload is None:
                continue
            load_into(bank, payload)
            if self._mine is not None and file == self._own:
                self._mine.append(payload["sample_idx"])

    def on_predict_start(self) -> None:
        """Start the clock and the progress bar."""
        datamodule = self.trainer.datamodule
        self.rows_by_rank = bool(getattr(datamodule, "iterable", False)) and self.trainer.world_size > 1
        self._started = self._last_flush = time.monotonic()
        if self.options.progress and self.trainer.is_global_zero:
            from tqdm import tqdm

            total = self.trainer.num_predict_batches[0] if self.trainer.num_predict_batches else None
            self._bar = tqdm(
                total=None if total in (None, float("inf")) else int(total),
                desc="ReGATE reference scoring",
                unit="batch",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        """Score the batch's samples that no earlier run scored; flush when due."""
        assert self.teacher is not None and self.bank is not None and self._parts is not None
        if SAMPLE_IDX not in batch:
            raise KeyError(
                f"`score` needs `batch['{SAMPLE_IDX}']`: an int64 [B] tensor with a stable id per sample (its index "
                "in the training set), as for ReGATECallback"
            )
        if LABELS not in batch:
            raise KeyError(f"`score` needs `batch['{LABELS}']` to find the answer tokens")
        input_ids, labels = batch[INPUT_IDS], batch[LABELS]
        text = text_mask(self._parts, input_ids, batch.get(ATTENTION_MASK))
        candidates = candidate_mask(labels) & text
        sample_idx = batch[SAMPLE_IDX].to(labels.device).long()
        if self.rows_by_rank:  # an iterable data set is not sharded by a sampler: split its rows
            rows = sample_idx % self.trainer.world_size == self.trainer.global_rank
            input_ids, labels, text, candidates, sample_idx = (
                x[rows] for x in (input_ids, labels, text, candidates, sample_idx)
            )
        counts = candidates.sum(1)
        cpu_idx, cpu_counts = sample_idx.cpu(), counts.cpu()
        self.bank.register(cpu_idx, cpu_counts)  # refuses a sample rendered differently from the cache
        missing = ~self.bank.has_ref(cpu_idx)
        self._counts["reused"] += int((~missing).sum())
        if missing.any():
            rows = missing.to(labels.device)
            losses = self.teacher.reference_losses(input_ids[rows], labels[rows], text[rows], candidates[rows])
            flat = gather_candidates(losses, candidates[rows]).float().cpu()
            self.bank.set_ref(cpu_idx[missing], flat, cpu_counts[missing])
            if self._mine is not None:
                self._mine.append(cpu_idx[missing])
            self._counts["scored"] += int(missing.sum())
            self._pending += 1
        if self._due():
            self._flush()
        if self._bar is not None:
            self._bar.set_postfix(scored=self._counts["scored"], reused=self._counts["reused"], refresh=False)
            self._bar.update(1)

    def _due(self) -> bool:
        if not self._pending:
            return False
        every, seconds = self.options.flush_every, self.options.flush_seconds
        return bool((every and self._pending >= every) or (seconds and time.monotonic() - self._last_flush >= seconds))

    def _flush(self) -> int:
        assert self.bank is not None
        mine = None if self._mine is None else torch.cat([torch.zeros(0, dtype=torch.int64), *self._mine])
        written = save_cache(self._own, self.bank, self.fingerprint, samples=mine)
        self._pending = 0
        self._last_flush = time.monotonic()
        return written

    def on_predict_end(self) -> None:
        """Write this rank's last progress; rank 0 merges the parts into the cache file."""
        assert self.bank is not None
        trainer = self.trainer
        if self._pending or not self._own.exists():
            self._flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        trainer.strategy.barrier("regate_score_written")
        if trainer.is_global_zero:
            parts = part_files(self.path)
            for file in parts:
                payload = load_cache(file, self.fingerprint)
                if payload is not None:
                    load_into(self.bank, payload)
            if parts or not self.path.exists():
                save_cache(self.path, self.bank, self.fingerprint)
            for file in [*parts, *_temporaries(self.path)]:
                file.unlink(missing_ok=True)
        trainer.strategy.barrier("regate_score_merged")
        totals = torch.tensor(
            [self._counts["scored"], self._counts["reused"]], dtype=torch.float64, device=trainer.strategy.root_device
        )
        scored, reused = (int(v) for v in trainer.strategy.reduce(totals, reduce_op="sum").tolist())
        payload = load_cache(self.path, self.fingerprint)
        self.result = ScoreResult(
            path=self.path,
            num_samples=0 if payload is None else int(payload["sample_idx"].numel()),
            scored=scored,
            reused=reused,
            seconds=time.monotonic() - self._started,
        )


def score(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule, options: ScoreOptions | None
) -> ScoreResult:
    """Run the recipe's ReGATE teacher over the training set once and write the reference cache.

    The trainer is borrowed for one ``predict`` run: its progress bar, its loggers, the config-saving
    callback and the ReGATE callback itself are set aside while it scores and put back afterwards.

    Args:
        trainer: the recipe's trainer (accelerator, devices, strategy, precision).
        model: the recipe's ``MLLMModule``.
        datamodule: the recipe's data module; its training set is scored.
        options: see :class:`ScoreOptions`.

    Returns:
        What the run did.

    Raises:
        ValueError: no ReGATECallback, no cache path, or an existing cache made for another setup.
    """
    options = options or ScoreOptions()
    callback = find_callback(trainer)
    path = options.ref_cache or callback.ref_cache
    if not path:
        raise ValueError(
            "nothing to write: set the ReGATECallback's `ref_cache` in the recipe (the file `fit` will read), or "
            "give `--score.ref_cache`"
        )
    if datamodule is None:
        raise ValueError("`score` needs the recipe's `data` (its training set is what gets scored)")
    scorer = ReferenceScorer(model, callback, datamodule, path, options)
    saved = (trainer.callbacks, trainer.loggers, trainer.predict_loop.inference_mode)
    set_aside = (ProgressBar, SaveConfigCallback, ReGATECallback)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, set_aside)]
    trainer.loggers = []
    trainer.predict_loop.inference_mode = False  # torch.no_grad, as the callback: tensors stay ordinary
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="predict returned None")  # the scorer writes files instead
            trainer.predict(scorer, datamodule=_TrainingSet(datamodule, options.batch_size), return_predictions=False)
    finally:
        trainer.callbacks, trainer.loggers, trainer.predict_loop.inference_mode = saved
    return scorer.result
