"""Offline reference scoring: ``regate-lightning score --config recipe.yaml``.

The command reads the very recipe that ``fit`` reads, builds the same student and data module, finds
the :class:`~regate_lightning.ReGATECallback` among the recipe's ``trainer.callbacks`` and runs its
policy's teacher once over the whole training set, batched, before any training
(:meth:`~regate_lightning.policy.ReGATEPolicy.reference`: the same teacher, dtype and precision context as
``fit``). It writes the callback's ``ref_cache`` file, in the callback's format and with the fingerprint
the callback computes (:func:`regate_lightning.cache.reference_fingerprint`), so a following ``fit``
reads every reference loss from the file and never runs the teacher.

* **Processes.** Scoring runs as a ``trainer.predict`` of :class:`ReferenceScorer` under a trainer
  built from the recipe's trainer settings (accelerator, devices, num_nodes, strategy such as ``ddp``,
  precision) without its callbacks, loggers and progress bar. Under several processes Lightning
  gives each rank a disjoint shard of the training set (an unrepeated distributed sampler); rank ``r``
  of ``W`` writes its progress to ``<ref_cache>.part<r>of<W>`` in the folder it sees. At the end the
  ranks exchange their losses through the process group, so every rank holds all of them, and the
  lowest rank that sees each folder writes ``<ref_cache>`` there: once on a folder all nodes share,
  once per node on node-local folders. Nothing is merged through the file system.
* **Order.** The training loader is rebuilt without shuffling (same dataset, collate function,
  workers and batch size), so two runs see the same batches and write identical caches.
* **Resuming.** Progress is written every ``flush_every`` batches and every ``flush_seconds``
  seconds, atomically (:func:`regate_lightning.cache.write_atomic`): a kill at any moment leaves
  the previous file whole. A restarted run loads the cache and any part files each rank sees
  (refusing, on every rank at once, files made for another teacher, tokenizer or data set), the ranks
  exchange what they read, and the teacher runs only on samples that no rank's files hold.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from regate_lightning.bank import ScoreBank
from regate_lightning.cache import CHUNK_SAMPLES, load_cache, load_into, save_cache, share_complete
from regate_lightning.callback import ReGATECallback
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS, SAMPLE_IDX
from regate_lightning.policy import ReGATEPolicy
from regate_lightning.scoring import check_int
from regate_lightning.shared import first_in_folder, raise_together
from regate_lightning.sync import RaggedGather

__all__ = [
    "SCORING_TRAINER",
    "ReferenceScorer",
    "ScoreOptions",
    "ScoreResult",
    "find_callback",
    "part_files",
    "part_path",
    "score",
    "training_loader",
]

SCORING_TRAINER: dict[str, Any] = {
    "callbacks": [],
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "inference_mode": False,  # torch.no_grad, as in fit: the store's tensors stay ordinary tensors
}
"""``Trainer`` arguments of a scoring run, over the recipe's: no callbacks, loggers or progress bar."""


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


def find_callback(callbacks: pl.Trainer | Iterable[Callback]) -> ReGATECallback:
    """The one :class:`ReGATECallback` among a trainer's callbacks (or among ``callbacks``).

    Raises:
        ValueError: there is none, or more than one.
    """
    found = [c for c in getattr(callbacks, "callbacks", callbacks) if isinstance(c, ReGATECallback)]
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
    """Runs a ReGATE policy's teacher over the training set in ``trainer.predict`` and writes the reference cache.

    The student is held but not registered as a submodule, so it stays where it is (on the CPU); the
    policy's teacher is placed on the scorer's device in the dtype ``fit`` gives it
    (:meth:`~regate_lightning.policy.ReGATEPolicy.start`) and its store stays on the CPU in float32.
    ``model`` exposes the student's HF model for data modules that read ``trainer.lightning_module.model``.

    Args:
        student: the recipe's ``MLLMModule`` (anything with the student HF model as ``.model``).
        policy: the recipe's ReGATE policy (``ReGATECallback.policy``): teacher spec and arguments.
        datamodule: the recipe's data module (for the data fingerprint and the tokenizer check).
        path: the cache file.
        options: flush period, progress bar.
    """

    def __init__(
        self,
        student: pl.LightningModule,
        policy: ReGATEPolicy,
        datamodule: Any,
        path: str | Path,
        options: ScoreOptions | None = None,
    ) -> None:
        super().__init__()
        if getattr(student, "model", None) is None:
            raise TypeError("`score` needs a LightningModule with the student HF model as `.model` (MLLMModule)")
        self._held = (student, datamodule)  # a tuple: not registered as submodules
        self.policy = policy
        self.path = Path(path)
        self.options = options or ScoreOptions()
        self.result = ScoreResult(self.path)
        self.rows_by_rank = False
        self._own = self.path
        self._parts: list[Path] = []
        self._mine: list[torch.Tensor] | None = None
        self._pending = 0
        self._last_flush = 0.0
        self._started = 0.0
        self._bar: Any = None
        self._counts = {"scored": 0, "reused": 0}

    @property
    def model(self) -> nn.Module:
        """The student's HF model (not a submodule of the scorer)."""
        return self._held[0].model

    # ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Build the teacher, compute the fingerprint, load what earlier runs wrote (checked)."""
        if self.policy.teacher is not None:
            return
        student, datamodule = self._held
        self.policy.setup(student.model, datamodule)
        bank = self.policy.bank
        assert bank is not None
        strategy = self.trainer.strategy
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self._own = self.path if world == 1 else part_path(self.path, rank, world)
        self._mine = None if world == 1 else []
        error = None
        try:  # every rank reads what its own file system holds: the cache and the part files of earlier runs
            for file in [self.path, *part_files(self.path)]:
                payload = load_cache(file, self.policy.fingerprint)  # refuses a cache made for another setup
                if payload is None:
                    continue
                load_into(bank, payload)
                if file != self.path:
                    self._parts.append(file)
                if self._mine is not None and file == self._own:
                    self._mine.append(payload["sample_idx"])
        except ValueError as err:
            error = err
        raise_together(strategy, error, f"reading the reference cache {self.path} and its part files")
        if world > 1:  # node-local folders hold different files: every rank gets what any rank read
            share_complete(bank, RaggedGather(strategy, device=torch.device("cpu")), rank)

    def on_predict_start(self) -> None:
        """Place the teacher as ``fit`` would; start the clock and the progress bar."""
        trainer = self.trainer
        self.policy.start(
            self.device, precision=str(trainer.precision), student_dtype=fit_dtype(trainer, self._held[0])
        )
        datamodule = trainer.datamodule
        self.rows_by_rank = bool(getattr(datamodule, "iterable", False)) and trainer.world_size > 1
        self._started = self._last_flush = time.monotonic()
        if self.options.progress and trainer.is_global_zero:
            from tqdm import tqdm

            total = trainer.num_predict_batches[0] if trainer.num_predict_batches else None
            self._bar = tqdm(
                total=None if total in (None, float("inf")) else int(total),
                desc="ReGATE reference scoring",
                unit="batch",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        """Score the batch's samples that no earlier run scored; flush when due."""
        if batch is None:  # every sample skipped by the data's on_error="skip" policy (and counted there)
            return
        text = {k: batch[k] for k in (INPUT_IDS, ATTENTION_MASK, LABELS, SAMPLE_IDX) if k in batch}
        if self.rows_by_rank and SAMPLE_IDX in text:  # an iterable data set is not sharded by a sampler
            rows = text[SAMPLE_IDX] % self.trainer.world_size == self.trainer.global_rank
            text = {k: v[rows.to(v.device)] for k, v in text.items()}
        context = self.trainer.precision_plugin.forward_context
        scored = self.policy.reference(text, context=context).cpu()  # refuses a sample rendered differently
        self._counts["reused"] += int((~scored).sum())
        if scored.any():
            if self._mine is not None:
                self._mine.append(text[SAMPLE_IDX].cpu().long()[scored])
            self._counts["scored"] += int(scored.sum())
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
        assert self.policy.bank is not None
        mine = None if self._mine is None else torch.cat([torch.zeros(0, dtype=torch.int64), *self._mine])
        written = save_cache(self._own, self.policy.bank, self.policy.fingerprint, samples=mine)
        self._pending = 0
        self._last_flush = time.monotonic()
        return written

    def on_predict_end(self) -> None:
        """Write this rank's last progress; gather every rank's losses; one rank per file system writes the cache.

        The losses travel through the process group (:func:`~regate_lightning.cache.share_complete`), not
        through the file system: on node-local folders every node ends with the complete file, on a shared
        folder rank 0 writes it once (:func:`~regate_lightning.shared.first_in_folder`).
        """
        bank = self.policy.bank
        assert bank is not None
        trainer = self.trainer
        strategy = trainer.strategy
        if self._pending or not self._own.exists():
            self._flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        world = trainer.world_size
        if world > 1:
            share_complete(bank, RaggedGather(strategy, device=torch.device("cpu")), trainer.global_rank)
        if first_in_folder(strategy, self.path.parent) and (world > 1 or self._parts or not self.path.exists()):
            save_cache(self.path, bank, self.policy.fingerprint)
        strategy.barrier("regate_score_written")
        leftovers = [*self._parts, *([self._own] if self._own != self.path else []), *_temporaries(self.path)]
        for file in leftovers:
            file.unlink(missing_ok=True)
        totals = torch.tensor(
            [self._counts["scored"], self._counts["reused"]], dtype=torch.float64, device=strategy.root_device
        )
        scored, reused = (int(v) for v in strategy.reduce(totals, reduce_op="sum").tolist())
        self.policy.release()
        self.result = ScoreResult(
            path=self.path,
            num_samples=complete_samples(bank),
            scored=scored,
            reused=reused,
            seconds=time.monotonic() - self._started,
        )


def complete_samples(bank: ScoreBank) -> int:
    """The samples of ``bank`` with every reference loss: those a cache written from it holds."""
    keys = bank.sample_keys()
    return int(sum(int(bank.has_ref(k).sum()) for k in keys.split(CHUNK_SAMPLES))) if keys.numel() else 0


def fit_dtype(trainer: pl.Trainer, student: nn.Module) -> torch.dtype:
    """The parameter dtype ``fit`` gives the student: its own, as ``trainer``'s precision plugin converts it.

    ``bf16-true`` and ``16-true`` convert the LightningModule's parameters; mixed precisions leave them. The
    scorer does not convert the student (it only holds it), so it asks the plugin what it would do, on a probe.
    """
    dtype = next(p.dtype for p in student.parameters() if p.is_floating_point())
    converted = trainer.precision_plugin.convert_module(nn.Linear(1, 1, dtype=dtype))
    return next((p.dtype for p in converted.parameters() if p.is_floating_point()), dtype)


def score(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    callback: ReGATECallback,
    options: ScoreOptions | None = None,
) -> ScoreResult:
    """Run a ReGATE callback's teacher over the training set once and write the reference cache.

    Args:
        trainer: a trainer for this run alone, with the recipe's accelerator, devices, strategy and
            precision, built with ``inference_mode=False`` (``regate-lightning score`` builds it from the
            recipe with :data:`SCORING_TRAINER`); it runs one ``predict``.
        model: the recipe's ``MLLMModule``.
        datamodule: the recipe's data module; its training set is scored.
        callback: the recipe's ``ReGATECallback`` (teacher, ``ref_cache``, see :func:`find_callback`).
        options: see :class:`ScoreOptions`.

    Returns:
        What the run did.

    Raises:
        ValueError: no cache path, no data, a trainer in inference mode, or an existing cache made for
            another setup.
    """
    options = options or ScoreOptions()
    path = options.ref_cache or callback.ref_cache
    if not path:
        raise ValueError(
            "nothing to write: set the ReGATECallback's `ref_cache` in the recipe (the file `fit` will read), or "
            "give `--score.ref_cache`"
        )
    if datamodule is None:
        raise ValueError("`score` needs the recipe's `data` (its training set is what gets scored)")
    if trainer.predict_loop.inference_mode:
        raise ValueError(
            "`score` needs a Trainer built with inference_mode=False: the teacher runs under torch.no_grad, as in "
            "fit, so that the score store's tensors stay ordinary tensors"
        )
    scorer = ReferenceScorer(model, callback.policy, datamodule, path, options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predict returned None")  # the scorer writes files instead
        trainer.predict(scorer, datamodule=_TrainingSet(datamodule, options.batch_size), return_predictions=False)
    return scorer.result
