"""``ReGATECallback``: the method as a Lightning callback.

The callback decides; the module executes. At each training batch it

1. ``on_train_batch_start``: registers the batch's samples in the score store, runs the frozen
   teacher once for samples it has never scored (or reads the cache), and, in a sparse step of the
   schedule, fuses the student-loss EMA with the reference loss and writes ``batch["keep_mask"]``
   with the top ``keep_ratio`` candidates of each sample;
2. ``on_train_batch_end``: folds the student's per-token losses into the EMA and logs the counts.

Under DDP every rank gathers the step's samples, reference losses and student losses from all ranks
and applies them in rank order, so the stores stay identical. Validation, test and predict are never
touched. Without the callback the module trains the plain baseline; with ``keep_ratio=1.0`` it runs
the very same computation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from regate_lightning.bank import FALLBACKS, ScoreBank
from regate_lightning.cache import load_cache, load_into, reference_fingerprint, save_cache
from regate_lightning.families import resolve
from regate_lightning.keys import (
    ATTENTION_MASK,
    INPUT_IDS,
    KEEP_MASK,
    LABELS,
    NUM_ACTIVE,
    NUM_TARGETS,
    NUM_TOKENS,
    SAMPLE_IDX,
    TOKEN_LOSS,
)
from regate_lightning.schedule import Schedule, is_full_step
from regate_lightning.scoring import (
    check_fraction,
    check_int,
    check_keep_ratio,
    fuse_scores,
    gather_candidates,
    random_keep,
    scatter_candidates,
    select_keep,
)
from regate_lightning.strategies import check_strategy, check_unsharded
from regate_lightning.sync import all_gather_ragged
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import STUDENT, Teacher, check_tokenizers, text_mask

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
SELECTIONS = ("regate", "random")
STORE_DEVICES = ("cpu", "model")
PREFIX = "regate/"
METRICS = {
    "kept": PREFIX + "kept_frac",
    "active": PREFIX + "active_frac",
    "cum_active": PREFIX + "cum_active_tokens",
    "cum_tokens": PREFIX + "cum_tokens",
    "cum_supervised": PREFIX + "cum_supervised_tokens",
    "ref": PREFIX + "mean_ref",
    "ema": PREFIX + "mean_ema",
    "phase": PREFIX + "sparse_step",
    "teacher_calls": PREFIX + "teacher_samples",
}


@dataclass
class StepRecord:
    """What the callback decided for the current (or last) training batch; read by reports.

    Attributes:
        sample_idx: int64 ``[B]``.
        candidates: bool ``[B, L]``, the elision candidates.
        counts: int64 ``[B]``, candidates per row.
        target_ids: int64 ``[N]``, target token of each candidate (flat layout).
        sparse: whether this was a sparse step.
        kept: candidates kept on this rank.
        ref: float32 ``[B, L]``, reference loss at candidates (NaN elsewhere).
        difficulty: float32 ``[B, L]``, student difficulty ``m`` used for the score (NaN elsewhere).
        global_step: the optimizer step the batch belongs to (``trainer.global_step`` at its start).
    """

    sample_idx: torch.Tensor
    candidates: torch.Tensor
    counts: torch.Tensor
    target_ids: torch.Tensor
    sparse: bool
    kept: int
    ref: torch.Tensor
    difficulty: torch.Tensor
    global_step: int


class ReGATECallback(Callback):
    """Reference-guided adaptive token elision (ReGATE) for an ``MLLMModule``.

    Args:
        keep_ratio: ``p``, fraction of candidate answer tokens kept in a sparse step, in (0, 1].
        ema_decay: ``beta``, EMA decay of the student's per-token loss, in [0, 1].
        ref_weight: ``lambda``, weight of the reference loss in ``d = (1 - lambda) m + lambda ref``.
        warmup_steps: ``W``, first optimizer steps that keep every token.
        cycle_steps: ``C``, cycle length in optimizer steps after the warm-up.
        full_steps: ``F``, full steps at the start of every cycle (``0 <= F <= C``).
        min_keep: at least this many candidates of a sample are kept.
        fallback: student difficulty of a never-measured candidate: ``"vocab"`` (EMA of its target
            token id, then the reference loss) or ``"ref"`` (the reference loss).
        teacher: ``"student"`` (a frozen copy of the student's language backbone taken when fitting
            starts, without adapters) or an HF id / local path of a causal LM with the same tokenizer.
        teacher_kwargs: keyword arguments of the teacher's ``from_pretrained`` (``dtype``, ...).
        tokenizer: HF id / path of the student's tokenizer, for the teacher-tokenizer check; by
            default the datamodule's ``tokenizer`` attribute is used.
        ref_cache: file of reference losses: read at the start when it exists, written (atomically,
            by rank 0) at the end of every training epoch and of fitting.
        selection: ``"regate"`` (top fused score) or ``"random"`` (a control at the same keep count).
        seed: seed of the ``"random"`` selection.
        store_device: where the score store and the per-step bookkeeping live: ``"cpu"`` (default) or
            ``"model"`` (the student's device). The bookkeeping is a few dozen tiny operations on a few
            thousand values; on a GPU each is a kernel launch and several force a synchronisation while the
            GPU waits for the next forward, so host memory is faster and spares GPU memory.
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        ema_decay: float = 0.9,
        ref_weight: float = 0.5,
        warmup_steps: int = 100,
        cycle_steps: int = 128,
        full_steps: int = 16,
        min_keep: int = 1,
        fallback: str = "vocab",
        teacher: str = STUDENT,
        teacher_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        ref_cache: str | None = None,
        selection: str = "regate",
        seed: int = 0,
        store_device: str = "cpu",
    ) -> None:
        super().__init__()
        check_keep_ratio(keep_ratio)
        check_fraction("ema_decay", ema_decay)
        check_fraction("ref_weight", ref_weight)
        check_int("min_keep", min_keep, minimum=0)
        self.schedule = Schedule(warmup_steps=warmup_steps, cycle_steps=cycle_steps, full_steps=full_steps)
        if fallback not in FALLBACKS:
            raise ValueError(f"`fallback` must be one of {FALLBACKS}, got {fallback!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"`selection` must be one of {SELECTIONS}, got {selection!r}")
        if store_device not in STORE_DEVICES:
            raise ValueError(f"`store_device` must be one of {STORE_DEVICES}, got {store_device!r}")
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"`teacher` must be 'student' or an HF id / local path, got {teacher!r}")
        self.keep_ratio = float(keep_ratio)
        self.ema_decay = float(ema_decay)
        self.ref_weight = float(ref_weight)
        self.min_keep = min_keep
        self.fallback = fallback
        self.teacher_spec = teacher
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.tokenizer = tokenizer
        self.ref_cache = ref_cache
        self.selection = selection
        self.seed = seed
        self.store_device = store_device
        self._store = torch.device("cpu")
        self.teacher: Teacher | None = None
        self.bank: ScoreBank | None = None
        self.fingerprint: dict[str, Any] = {}
        self.totals = {"active": 0, "tokens": 0, "supervised": 0, "teacher_samples": 0, "candidates": 0, "kept": 0}
        self._restored: dict[str, Any] | None = None
        self._step: StepRecord | None = None
        self.last_step: StepRecord | None = None
        self._generator: torch.Generator | None = None

    # ---------------------------------------------------------------------------------------------
    # Lifecycle.

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the teacher and the score store (fit only), check the tokenizer, read the cache."""
        if stage != "fit" or self.teacher is not None:
            return
        model = getattr(pl_module, "model", None)
        if model is None:
            raise TypeError("ReGATECallback needs a LightningModule with the student HF model as `.model` (MLLMModule)")
        # Before anything is built: refuse strategies that cannot work and a student that is already sharded.
        check_strategy(trainer, self.teacher_spec)
        parts = resolve(model)
        self.teacher = self.build_teacher(model, trainer.datamodule)
        if self.teacher_spec != STUDENT:
            check_unsharded(self.teacher, f"the teacher {self.teacher_spec!r}", type(trainer.strategy).__name__)
        vocab = max(self.teacher.vocab_size, int(parts.lm_head.weight.shape[0]))
        self.bank = ScoreBank(vocab_size=vocab)
        self.fingerprint = reference_fingerprint(self.teacher_spec, self.teacher, trainer.datamodule)
        if self._restored is not None:
            self._apply_state(self._restored)
            self._restored = None
        if self.ref_cache:
            payload = load_cache(self.ref_cache, self.fingerprint)
            if payload is not None:
                loaded = load_into(self.bank, payload)
                log.info("ReGATE: read reference losses of %d samples from %s", loaded, self.ref_cache)

    def build_teacher(self, model: torch.nn.Module, datamodule: Any) -> Teacher:
        """The teacher of this callback: a frozen copy of the student, or a loaded LM (fitting and scoring).

        A teacher that is not the student must share the student's tokenizer: the ``tokenizer`` argument,
        else the data module's ``tokenizer`` attribute, is compared with the teacher's.

        Args:
            model: the student HF model.
            datamodule: the training data module (or None).

        Returns:
            The teacher, on the CPU, in the dtype it was built in.
        """
        if self.teacher_spec == STUDENT:
            return Teacher.from_student(model)
        from transformers import AutoTokenizer

        teacher = Teacher.from_pretrained(self.teacher_spec, **self.teacher_kwargs)
        student_tok = getattr(datamodule, "tokenizer", None)
        if self.tokenizer is not None:
            student_tok = AutoTokenizer.from_pretrained(self.tokenizer)
        if student_tok is None:
            raise ValueError(
                f"teacher {self.teacher_spec!r} is not the student, so its tokenizer must be checked against the "
                "student's: pass `tokenizer=` (the student's HF id or path) or give the datamodule a `tokenizer`"
            )
        check_tokenizers(student_tok, AutoTokenizer.from_pretrained(self.teacher_spec), resolve(model).media_token_ids)
        return teacher

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the teacher and the store on the student's device.

        The teacher takes the dtype given in ``teacher_kwargs``; else, under mixed precision, the autocast
        dtype (it only runs forward, under the same autocast, so fp32 weights would double its memory for
        nothing); else the student's parameter dtype.
        """
        assert self.teacher is not None and self.bank is not None
        dtype = self.teacher_kwargs.get("dtype")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = _MIXED.get(str(trainer.precision))
        if dtype is None:
            dtype = next(p.dtype for p in pl_module.parameters() if p.is_floating_point())
        self.teacher.to(device=pl_module.device, dtype=dtype)
        self._store = torch.device("cpu") if self.store_device == "cpu" else pl_module.device
        self.bank.to(self._store)
        self._generator = torch.Generator(device=self._store).manual_seed(self.seed + trainer.global_rank)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Free the teacher when fitting ends (the store stays for inspection)."""
        if stage == "fit":
            self.teacher = None

    # ---------------------------------------------------------------------------------------------
    # Training steps.

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Score the batch and, in a sparse step, write ``batch["keep_mask"]``."""
        assert self.teacher is not None and self.bank is not None
        if batch is None:  # every sample of the batch skipped by the data's on_error="skip" policy
            if trainer.world_size > 1:
                raise RuntimeError(
                    "a whole batch was skipped by the data's on_error='skip' policy on one process; under several "
                    "processes every rank must run every step (DDP synchronises gradients), so fix or remove the bad "
                    "records, or use a larger batch size"
                )
            return
        if SAMPLE_IDX not in batch:
            raise KeyError(
                f"ReGATECallback needs `batch['{SAMPLE_IDX}']`: an int64 [B] tensor with a stable id per sample (its "
                "index in the training set). The collators of regate_lightning.data add it; for your own dataset "
                f"return the index from __getitem__ and collate it as `{SAMPLE_IDX}`"
            )
        if LABELS not in batch:
            raise KeyError(f"ReGATECallback needs `batch['{LABELS}']` to find the answer tokens")
        parts = resolve(pl_module.model)
        store = self._store
        input_ids, labels = batch[INPUT_IDS].to(store), batch[LABELS].to(store)
        attention = batch.get(ATTENTION_MASK)
        text = text_mask(parts, input_ids, None if attention is None else attention.to(store))
        candidates = candidate_mask(labels) & text
        counts = candidates.sum(1)
        sample_idx = batch[SAMPLE_IDX].to(store).long()
        target_ids = gather_candidates(shift_targets(labels), candidates)

        all_idx, all_counts = self._gather(trainer, [sample_idx, counts])
        self.bank.register(all_idx, all_counts)
        self._score_missing(trainer, input_ids, labels, text, candidates, sample_idx, counts)

        sparse = self.keep_ratio < 1.0 and not is_full_step(trainer.global_step, self.schedule)
        ref = self.bank.get_ref(sample_idx, counts)
        ema = self.bank.difficulty(sample_idx, counts, target_ids, self.fallback)
        kept = int(counts.sum())
        if sparse and kept:
            if self.selection == "random":
                keep = random_keep(candidates, self.keep_ratio, self.min_keep, self._generator)
            else:
                score = scatter_candidates(fuse_scores(ema, ref, self.ref_weight), candidates)
                keep = select_keep(score, candidates, self.keep_ratio, self.min_keep)
            batch[KEEP_MASK] = keep.to(batch[INPUT_IDS].device, non_blocking=True)
            kept = int((keep & candidates).sum())
        else:
            batch.pop(KEEP_MASK, None)
        self._step = self.last_step = StepRecord(
            sample_idx,
            candidates,
            counts,
            target_ids,
            sparse,
            kept,
            scatter_candidates(ref.float(), candidates),
            scatter_candidates(ema.float(), candidates),
            trainer.global_step,
        )

    def _gather(self, trainer: pl.Trainer, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """All ranks' values (see :func:`all_gather_ragged`), back on the store's device."""
        return [t.to(self._store) for t in all_gather_ragged(trainer.strategy, tensors)]

    def _score_missing(
        self,
        trainer: pl.Trainer,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        text: torch.Tensor,
        candidates: torch.Tensor,
        sample_idx: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Run the teacher on this rank's unscored samples; share the losses with every rank."""
        assert self.teacher is not None and self.bank is not None
        missing = ~self.bank.has_ref(sample_idx)
        flat = torch.zeros(0, device=self._store)
        if missing.any():
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                losses = self.teacher.reference_losses(
                    input_ids[missing], labels[missing], text[missing], candidates[missing]
                )
            flat = gather_candidates(losses.to(self._store), candidates[missing])
        idx, cnt, flat = self._gather(trainer, [sample_idx[missing], counts[missing], flat.float()])
        # Counted over all ranks, like the other totals, so it is the same on every rank and in checkpoints.
        self.totals["teacher_samples"] += int(idx.numel())
        if idx.numel():
            self.bank.set_ref(idx, flat, cnt)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the student's losses into the EMA store; log the step's counts."""
        assert self.bank is not None
        step, self._step = self._step, None
        if step is None:
            return
        if not isinstance(outputs, dict) or TOKEN_LOSS not in outputs:
            raise KeyError(
                f"the training step must return a dict with `{TOKEN_LOSS}` [B, L] (MLLMModule does); got "
                f"{type(outputs).__name__}"
            )
        flat = gather_candidates(outputs[TOKEN_LOSS].to(self._store), step.candidates)
        gathered = self._gather(trainer, [step.sample_idx, step.counts, flat, step.target_ids])
        self.bank.update(gathered[0], gathered[2], gathered[1], gathered[3], self.ema_decay)
        counts = torch.tensor(
            [outputs[NUM_ACTIVE], outputs[NUM_TOKENS], outputs[NUM_TARGETS], int(step.counts.sum()), step.kept],
            dtype=torch.float64,
            device=trainer.strategy.root_device,
        )
        active, tokens, supervised, candidates, kept = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        for key, value in (
            ("active", active),
            ("tokens", tokens),
            ("supervised", supervised),
            ("candidates", candidates),
            ("kept", kept),
        ):
            self.totals[key] += int(value)
        if not _logging_step(trainer):
            return
        size = int(step.sample_idx.numel())
        metrics = {
            METRICS["active"]: active / max(tokens, 1),
            METRICS["cum_active"]: float(self.totals["active"]),
            METRICS["cum_tokens"]: float(self.totals["tokens"]),
            METRICS["cum_supervised"]: float(self.totals["supervised"]),
            METRICS["ref"]: _nanmean(step.ref),
            METRICS["ema"]: _nanmean(step.difficulty),
            METRICS["phase"]: float(step.sparse),
            METRICS["teacher_calls"]: float(self.totals["teacher_samples"]),
        }
        pl_module.log(METRICS["kept"], kept / max(candidates, 1), prog_bar=True, batch_size=size)
        pl_module.log_dict(metrics, batch_size=size)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the reference cache (rank 0) so that a later run need not run the teacher again."""
        self._write_cache(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the reference cache once more at the end of fitting."""
        self._write_cache(trainer)

    def _write_cache(self, trainer: pl.Trainer) -> None:
        if self.ref_cache and self.bank is not None and trainer.is_global_zero:
            written = save_cache(self.ref_cache, self.bank, self.fingerprint)
            log.info("ReGATE: wrote reference losses of %d samples to %s", written, self.ref_cache)

    # ---------------------------------------------------------------------------------------------
    # Checkpointing.

    def _arguments(self) -> dict[str, Any]:
        """The arguments a resumed run must share with the saved one."""
        return {"teacher": self.teacher_spec, "fallback": self.fallback}

    def state_dict(self) -> dict[str, Any]:
        """Version, arguments that must match, the score store and the counters."""
        return {
            "version": STATE_VERSION,
            "arguments": self._arguments(),
            "bank": None if self.bank is None else _to_cpu(self.bank.state_dict()),
            "totals": dict(self.totals),
            "fingerprint": dict(self.fingerprint),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check compatibility and restore (now, or in ``setup`` when the store does not exist yet)."""
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"ReGATECallback state has version {version!r}; this release reads {STATE_VERSION}")
        saved = state_dict["arguments"]
        mismatch = {k: (saved.get(k), v) for k, v in self._arguments().items() if saved.get(k) != v}
        if mismatch:
            details = ", ".join(f"`{k}` saved {a!r}, now {b!r}" for k, (a, b) in mismatch.items())
            raise ValueError(f"cannot resume ReGATE state: {details}. Resume with the same values or start afresh")
        if self.bank is None:
            self._restored = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.bank is not None
        saved_fp = state.get("fingerprint") or {}
        if saved_fp and saved_fp.get("teacher_weights") != self.fingerprint.get("teacher_weights"):
            log.warning("ReGATE: the teacher's weights differ from the checkpoint's; cached reference losses kept")
        if state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
        self.totals.update(state["totals"])


def _logging_step(trainer: pl.Trainer) -> bool:
    """Whether the trainer writes logs at this step: ``self.log`` costs about 1 ms a call, so the
    callback logs only on the steps Lightning records (every ``log_every_n_steps`` optimizer steps)."""
    return (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0 or trainer.global_step == 0


def _nanmean(x: torch.Tensor) -> float:
    finite = x[~x.isnan()]
    return float(finite.mean()) if finite.numel() else math.nan


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
