"""``ReGATECallback``: the method as a Lightning callback, a thin driver around :class:`ReGATEPolicy`.

The callback decides; the module executes. The decisions are the policy's
(:mod:`regate_lightning.policy`); the callback connects them to Lightning's hooks:

1. ``setup("fit")``: builds the policy's teacher and store, opens the reference cache (memory-mapped; a
   sample's losses are read when training first meets it), restores state;
2. ``on_fit_start``: places the teacher on the student's device in its dtype, the store on ``store_device``;
3. ``on_train_batch_start``: ``policy.plan(batch, trainer.global_step)`` with the strategy's all-gather
   and the precision plugin's forward context, and writes ``batch["keep_mask"]`` in a sparse step;
4. ``on_train_batch_end``: ``policy.observe(plan, token_loss)``; counts the step and logs;
5. ``on_train_epoch_end`` / ``on_fit_end``: the lowest rank of each file system writes the reference cache
   (rank 0 alone on a shared folder; one rank per node on node-local folders) when it changed (the teacher
   scored samples since the last write, a checkpoint's store was restored, or records left the data).

Under DDP every rank gathers the step's samples (in ``on_train_batch_start``) and the step's reference
losses, student losses and counts (in ``on_train_batch_end``) from all ranks, one collective per hook
(:class:`~regate_lightning.sync.RaggedGather`), and applies them in rank order, so the stores stay
identical. Validation, test and predict are never
touched. Without the callback the module trains the plain baseline; with ``keep_ratio=1.0`` it runs
the very same computation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from regate_lightning.bank import ScoreBank
from regate_lightning.cache import ReferenceCache, open_cache, save_cache
from regate_lightning.keys import (
    ACTIVE,
    ACTIVE_FRAC,
    CANDIDATES,
    CUM_ACTIVE_TOKENS,
    CUM_SUPERVISED_TOKENS,
    CUM_TOKENS,
    KEPT,
    KEPT_FRAC,
    MEAN_EMA,
    MEAN_REF,
    NUM_ACTIVE,
    NUM_TARGETS,
    NUM_TOKENS,
    REPLACED,
    REPLACED_SAMPLES,
    SPARSE_STEP,
    SUPERVISED,
    TEACHER_CALLS,
    TEACHER_SAMPLES,
    TOKEN_LOSS,
    TOKENS,
    TOTALS,
)
from regate_lightning.policy import Gather, ReGATEPolicy, StepPlan
from regate_lightning.selection import Fallback, Selection
from regate_lightning.shared import (
    agree_on_file,
    check_checkpoint,
    first_in_folder,
    raise_together,
    resuming_from,
)
from regate_lightning.strategies import check_strategy, check_unsharded
from regate_lightning.sync import RaggedGather
from regate_lightning.teacher import STUDENT, Teacher

STATE_VERSION = 2
STORE_DEVICES = ("cpu", "model")


class ReGATECallback(Callback):
    """Reference-guided adaptive token elision (ReGATE) for an ``MLLMModule``.

    Args:
        keep_ratio: ``p``, fraction of candidate answer tokens kept in a sparse step, in (0, 1]; ``1.0``
            turns elision off, whatever the selection.
        ema_decay: ``beta``, EMA decay of the student's per-token loss, in [0, 1].
        ref_weight: ``lambda``, weight of the reference loss in ``d = (1 - lambda) m + lambda ref``.
        warmup_steps: ``W``, first optimizer steps that keep every token.
        cycle_steps: ``C``, cycle length in optimizer steps after the warm-up.
        full_steps: ``F``, full steps at the start of every cycle (``0 <= F <= C``).
        min_keep: at least this many candidates of a sample are kept.
        fallback: student difficulty of a never-measured candidate: ``"vocab"`` (EMA of its target
            token id, then the reference loss), ``"ref"`` (the reference loss), or a
            :class:`~regate_lightning.selection.Fallback`.
        teacher: ``"student"`` (a frozen copy of the student's language backbone taken when fitting
            starts, without adapters) or an HF id / local path of a causal LM with the same tokenizer.
        teacher_kwargs: keyword arguments of the teacher's ``from_pretrained`` (``dtype``, ...).
        tokenizer: HF id / path of the student's tokenizer, for the teacher-tokenizer check; by
            default the datamodule's ``tokenizer`` attribute is used.
        ref_cache: file of reference losses: opened at the start when it exists (memory-mapped; each
            sample's losses are read when training first meets it and its content matches), written
            (atomically, with the cached samples not met yet) at the end of every training epoch and of
            fitting, by the lowest rank of each file system, when its content changed: the teacher scored
            samples since the file was read or written, a checkpoint's store was restored, or samples of it
            belong to no record of the data now; an unchanged file is left as it is. Every rank must see the
            same file (or none): the ranks compare it through the process group at the start and refuse to
            differ.
        selection: which candidates a sparse step keeps: ``"regate"`` (the top fused scores; also
            ``"topk"``), ``"random"`` (a control at the same keep count), ``"adaptive"`` (a keep count per
            sample from its scores), or a :class:`~regate_lightning.selection.Selection` (in YAML, a
            ``class_path`` with ``init_args``). See :mod:`regate_lightning.selection`.
        seed: seed of the policy's random generator (the ``"random"`` selection), plus the rank.
        store_device: where the score store and the per-step bookkeeping live: ``"cpu"`` (default) or
            ``"model"`` (the student's device). The bookkeeping is a few dozen tiny operations on a few
            thousand values; on a GPU each is a kernel launch and several force a synchronisation while the
            GPU waits for the next forward, so host memory is faster and spares GPU memory.

    Attributes:
        policy: the :class:`~regate_lightning.policy.ReGATEPolicy` that makes every decision.
        totals: counters over the run (keys :data:`~regate_lightning.keys.TOTALS`), summed over ranks.
        last_plan: the policy's plan of the latest training batch (for reports).
        cache_samples: samples whose reference losses were read from ``ref_cache`` in this fit (the file is
            memory-mapped when fitting starts; a sample is read when training first meets it, if its
            content matches), over all ranks.
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
        fallback: str | Fallback = "vocab",
        teacher: str = STUDENT,
        teacher_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        ref_cache: str | None = None,
        selection: str | Selection = "regate",
        seed: int = 0,
        store_device: str = "cpu",
    ) -> None:
        super().__init__()
        self.policy = ReGATEPolicy(
            keep_ratio=keep_ratio,
            ema_decay=ema_decay,
            ref_weight=ref_weight,
            warmup_steps=warmup_steps,
            cycle_steps=cycle_steps,
            full_steps=full_steps,
            min_keep=min_keep,
            fallback=fallback,
            selection=selection,
            teacher=teacher,
            teacher_kwargs=teacher_kwargs,
            tokenizer=tokenizer,
            seed=seed,
        )
        if store_device not in STORE_DEVICES:
            raise ValueError(f"`store_device` must be one of {STORE_DEVICES}, got {store_device!r}")
        self.ref_cache = ref_cache
        self.store_device = store_device
        self.totals = dict.fromkeys(TOTALS, 0)
        self._restored: dict[str, Any] | None = None
        self._replaced_run = 0  # samples of this fit whose stored values were dropped, over all ranks
        self._first_replaced = ""  # the first of them, by name
        self.cache_samples = 0
        self._writes_cache = True
        self._cache_mark: int | None = None  # TEACHER_SAMPLES when ref_cache last held what the store holds
        self._plan: StepPlan | None = None
        self._gather: Gather | None = None
        self.last_plan: StepPlan | None = None

    @property
    def teacher(self) -> Teacher | None:
        """The policy's teacher (None outside fitting)."""
        return self.policy.teacher

    @property
    def bank(self) -> ScoreBank | None:
        """The policy's score store (None before ``setup``)."""
        return self.policy.bank

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What made the reference losses (see :func:`~regate_lightning.cache.reference_fingerprint`)."""
        return self.policy.fingerprint

    # ---------------------------------------------------------------------------------------------
    # Lifecycle.

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the teacher and the score store (fit only), check the tokenizer, read the cache."""
        if stage != "fit" or self.policy.teacher is not None:
            return
        model = getattr(pl_module, "model", None)
        if model is None:
            raise TypeError("ReGATECallback needs a LightningModule with the student HF model as `.model` (MLLMModule)")
        # Before anything is built: refuse strategies that cannot work and a student that is already sharded.
        check_strategy(trainer, self.policy.teacher_spec)
        self.policy.setup(model, trainer.datamodule)
        if self.policy.teacher_spec != STUDENT:
            assert self.policy.teacher is not None
            name = f"the teacher {self.policy.teacher_spec!r}"
            check_unsharded(self.policy.teacher, name, type(trainer.strategy).__name__)
        restored = self._restored is not None and self._restored.get("bank") is not None
        if self._restored is not None:
            self._apply_state(self._restored)
            self._restored = None
        self._replaced_run, self._first_replaced = 0, ""
        self._cache_mark = None
        check_checkpoint(trainer.strategy, resuming_from(trainer))
        if self.ref_cache:
            self.policy.cache, gone = self._open_cache(trainer.strategy, trainer.datamodule)
            if self.policy.cache is not None and not restored and not gone:
                # The file holds what the store will hold, unless a checkpoint's store was restored above or
                # the file holds samples of records no longer in the data (the next write leaves them out).
                self._cache_mark = self.totals[TEACHER_SAMPLES]

    def _open_cache(self, strategy: Strategy, datamodule: Any) -> tuple[ReferenceCache | None, int]:
        """Open ``ref_cache`` on every rank; refuse, on every rank, a cache that the ranks see differently.

        Returns the cache (None without a file) and how many of its samples belong to no record of the data.

        Every rank reads the file from its own file system. The ranks compare what they opened (present or
        not, fingerprint, samples) through the process group: one rank reading reference losses while
        another runs its teacher would make their stores differ. They also settle which ranks write the
        file at each epoch end (the lowest rank of each file system, :func:`~regate_lightning.shared.first_in_folder`).
        """
        assert self.ref_cache is not None
        cache, error = None, None
        try:
            cache = open_cache(self.ref_cache, self.policy.fingerprint)
        except ValueError as err:  # another setup's or a damaged file: every rank stops, not only this one
            error = err
        raise_together(strategy, error, f"opening the reference cache {self.ref_cache}")
        agree_on_file(
            strategy,
            self.ref_cache,
            None if cache is None else cache.summary(),
            "reference cache (`ref_cache`)",
            "put it on a file system every node mounts, copy the file to the same path on every node, or "
            "delete it everywhere and let this run's teacher score the samples again",
        )
        self._writes_cache = first_in_folder(strategy, Path(self.ref_cache).parent)
        gone = 0
        if cache is not None:
            keys = data_keys(datamodule)
            gone = 0 if keys is None else int((~torch.isin(cache.sample_idx, keys)).sum())
            rank_zero_info(
                f"ReGATE: {self.ref_cache} holds reference losses of {len(cache)} samples (each read when training "
                "first meets it)"
                + (
                    f"; {gone} of them belong to no record of the training data now (removed, or edited to "
                    "another id or line) and are left out when the cache is written again"
                    if gone
                    else ""
                )
            )
        return cache, gone

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the teacher on the student's device and the store on ``store_device``.

        The teacher's dtype: see :func:`~regate_lightning.teacher.teacher_dtype` (``teacher_kwargs``,
        else the autocast dtype under mixed precision, else the student's parameter dtype).
        """
        store = torch.device("cpu") if self.store_device == "cpu" else pl_module.device
        self.policy.start(
            pl_module.device,
            precision=str(trainer.precision),
            student_dtype=next(p.dtype for p in pl_module.parameters() if p.is_floating_point()),
            store=store,
            rank=trainer.global_rank,
        )
        self._gather = RaggedGather(trainer.strategy, device=store)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Free the teacher when fitting ends (the store stays for inspection)."""
        if stage == "fit":
            self.policy.release()
            self._gather = None

    # ---------------------------------------------------------------------------------------------
    # Training steps.

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Plan the step (score the batch) and, in a sparse step, write ``batch["keep_mask"]``."""
        context = trainer.precision_plugin.forward_context
        plan = self.policy.plan(batch, trainer.global_step, gather=self._exchange(trainer), context=context)
        plan.apply(batch)
        self.cache_samples += plan.cached
        if plan.replaced:
            self._report_replaced(plan, trainer.datamodule)
        self._plan = self.last_plan = plan

    def _report_replaced(self, plan: StepPlan, datamodule: Any) -> None:
        """Count restored entries that belonged to other content; name the first in the log the first time."""
        if not self._first_replaced:
            self._first_replaced = sample_name(datamodule, int(plan.replaced_keys[0]))
            more = f" and {plan.replaced - 1} more sample(s) of this step" if plan.replaced > 1 else ""
            rank_zero_warn(
                f"ReGATE: {self._first_replaced}{more} had stored values (from the checkpoint or `ref_cache`) made "
                "from other content (the record changed, or another record now has its id): they were dropped, the "
                f"teacher scores such samples again and their EMA restarts. Counted over the run in "
                f"`{REPLACED_SAMPLES}` and reported when fitting ends."
            )
        self._replaced_run += plan.replaced
        self.totals[REPLACED] += plan.replaced

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the student's losses into the EMA store; count and log the step."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        outputs = step_outputs(outputs, (TOKEN_LOSS, NUM_ACTIVE, NUM_TOKENS, NUM_TARGETS))
        counts = (outputs[NUM_ACTIVE], outputs[NUM_TOKENS], outputs[NUM_TARGETS], int(plan.counts.sum()), plan.kept)
        # The step's counts travel with the losses: one exchange between the ranks per hook.
        sums = self.policy.observe(plan, outputs[TOKEN_LOSS], self._exchange(trainer), (*counts, plan.scored))
        step = self._count(sums)
        if logging_step(trainer):
            self._log(pl_module, plan, step)

    def _exchange(self, trainer: pl.Trainer) -> Gather:
        """The policy's cross-rank gather (one collective per call); made here if ``on_fit_start`` did not run."""
        if self._gather is None:
            self._gather = RaggedGather(trainer.strategy, device=self.policy.store_device)
        return self._gather

    def _count(self, sums: list[int]) -> dict[str, int]:
        """Add the step's counts summed over ranks (keys of :data:`~regate_lightning.keys.TOTALS`) to ``totals``."""
        step = dict(zip((ACTIVE, TOKENS, SUPERVISED, CANDIDATES, KEPT, TEACHER_SAMPLES), sums, strict=True))
        for key, value in step.items():
            self.totals[key] += value
        return step

    def _log(self, pl_module: pl.LightningModule, plan: StepPlan, step: dict[str, int]) -> None:
        """Log the step's fractions and the run's cumulative counts (``regate/*``)."""
        size = int(plan.sample_idx.numel())
        metrics = {
            ACTIVE_FRAC: step[ACTIVE] / max(step[TOKENS], 1),
            CUM_ACTIVE_TOKENS: float(self.totals[ACTIVE]),
            CUM_TOKENS: float(self.totals[TOKENS]),
            CUM_SUPERVISED_TOKENS: float(self.totals[SUPERVISED]),
            MEAN_REF: _nanmean(plan.ref),
            MEAN_EMA: _nanmean(plan.difficulty),
            SPARSE_STEP: float(plan.sparse),
            TEACHER_CALLS: float(self.totals[TEACHER_SAMPLES]),
            REPLACED_SAMPLES: float(self.totals[REPLACED]),
        }
        pl_module.log(KEPT_FRAC, step[KEPT] / max(step[CANDIDATES], 1), prog_bar=True, batch_size=size)
        pl_module.log_dict(metrics, batch_size=size)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the reference cache (see `_write_cache`) so that a later run need not run the teacher again."""
        self._write_cache(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the reference cache once more at the end of fitting, and close the file read at the start."""
        self._write_cache(trainer)
        self.policy.cache = None
        if self._replaced_run:
            rank_zero_warn(
                f"ReGATE: in this fit {self._replaced_run} sample(s) had stored values made from other content, the "
                f"first {self._first_replaced}; they were scored again (`{REPLACED_SAMPLES}`)"
            )

    def cache_changed(self) -> bool:
        """Whether ``ref_cache`` differs from what the store would write: the teacher scored samples since the
        file was read or written, a checkpoint's store was restored, records left the data, or the file was
        never written."""
        return self._cache_mark is None or self.totals[TEACHER_SAMPLES] != self._cache_mark

    def _write_cache(self, trainer: pl.Trainer) -> None:
        """Every rank holds the same store: the lowest rank of each file system writes it there (see ``setup``),
        with the samples of the training data as it is now (none of removed records), when it changed."""
        if not self.ref_cache or self.policy.bank is None or not self.cache_changed():
            return
        if self._writes_cache:
            written = save_cache(
                self.ref_cache,
                self.policy.bank,
                self.policy.fingerprint,
                base=self.policy.cache,
                data_keys=data_keys(trainer.datamodule),
            )
            rank_zero_info(f"ReGATE: wrote reference losses of {written} samples to {self.ref_cache}")
        self._cache_mark = self.totals[TEACHER_SAMPLES]  # the same on every rank: totals are summed over ranks

    # ---------------------------------------------------------------------------------------------
    # Checkpointing.

    def state_dict(self) -> dict[str, Any]:
        """Version, arguments that must match, the settings that may change, the score store and the counters."""
        return {
            "version": STATE_VERSION,
            "arguments": self.policy.arguments(),
            "settings": self.policy.settings(),
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
        mismatch = {k: (saved.get(k), v) for k, v in self.policy.arguments().items() if saved.get(k) != v}
        if mismatch:
            details = ", ".join(f"`{k}` saved {a!r}, now {b!r}" for k, (a, b) in mismatch.items())
            raise ValueError(f"cannot resume ReGATE state: {details}. Resume with the same values or start afresh")
        saved_settings = state_dict.get("settings") or {}
        now = self.policy.settings()
        changed = {k: (saved_settings[k], v) for k, v in now.items() if saved_settings.get(k, v) != v}
        if changed:
            details = ", ".join(f"`{k}` {a!r} -> {b!r}" for k, (a, b) in changed.items())
            rank_zero_info(f"ReGATE: resuming with changed settings ({details}); from here on the new values apply")
        if self.bank is None:
            self._restored = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.bank is not None
        saved_fp = state.get("fingerprint") or {}
        if saved_fp and saved_fp.get("teacher_weights") != self.fingerprint.get("teacher_weights"):
            rank_zero_warn("ReGATE: the teacher's weights differ from the checkpoint's; cached reference losses kept")
        if state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
            self._cache_mark = None  # the restored store may hold samples the cache file lacks
        self.totals.update(state["totals"])


def data_keys(datamodule: Any) -> torch.Tensor | None:
    """int64 ``[N]``: the data module's training sample keys (its ``sample_keys()``), or None without one."""
    keys = getattr(datamodule, "sample_keys", None)
    return torch.tensor(keys(), dtype=torch.int64) if callable(keys) else None


def sample_name(datamodule: Any, key: int) -> str:
    """The record behind a sample key, by the data module's ``sample_name`` (``"id r1"``), else the key."""
    name = getattr(datamodule, "sample_name", None)
    return str(name(key)) if callable(name) else f"sample_idx {key}"


def step_outputs(outputs: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The training step's output, checked to be a dict holding ``keys`` (``MLLMModule.training_step``'s is).

    Raises:
        KeyError: naming the keys a callback needs and what the step returned.
    """
    if not isinstance(outputs, dict) or any(k not in outputs for k in keys):
        got = type(outputs).__name__ if not isinstance(outputs, dict) else f"a dict with {sorted(outputs)}"
        wanted = ", ".join(f"`{k}`" for k in keys)
        raise KeyError(f"the training step must return a dict with {wanted} (MLLMModule does); got {got}")
    return outputs


def logging_step(trainer: pl.Trainer) -> bool:
    """Whether the trainer writes logs at this step: ``self.log`` costs about 1 ms a call, so the
    callbacks log only on the steps Lightning records (every ``log_every_n_steps`` optimizer steps)."""
    return (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0 or trainer.global_step == 0


def _nanmean(x: torch.Tensor) -> float:
    finite = x[~x.isnan()]
    return float(finite.mean()) if finite.numel() else math.nan


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
