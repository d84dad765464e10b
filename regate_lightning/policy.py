"""``ReGATEPolicy``: the method's decisions in one object, without Lightning.

The policy owns the frozen teacher, the score store (:class:`~regate_lightning.bank.ScoreBank`), the
schedule, the selection and the fallback. Per training step it answers two calls::

    plan = policy.plan(batch, step)             # candidates, reference losses, scores, keep mask
    plan.apply(batch)                           # batch["keep_mask"] = plan.keep_mask (when there is one)
    out = forward_active(model, batch, batch.get("keep_mask"))
    policy.observe(plan, out.token_loss)        # the student's losses into the EMA store

:class:`~regate_lightning.ReGATECallback` calls exactly this around Lightning's training step, passing
``trainer.global_step`` as the step, the strategy's all-gather as ``gather`` and the precision plugin's
forward context as ``context``; ``regate-lightning score`` calls :meth:`ReGATEPolicy.reference` over the
training set; tests and benchmarks call the policy directly.

**Several policies on one batch.** A plan starts from any ``keep_mask`` already in the batch (another
policy, e.g. one that elides visual tokens, may have written it) and only removes positions from it:
a candidate that mask elides is not offered to the selection, and in a full step the mask is left as
it is. The teacher and the store always see every candidate, so reference losses and the store's
layout do not depend on the other policy; a candidate elided by it has no student loss (NaN), which the
EMA update skips. Without a prior mask, a full step writes no mask at all (``keep_ratio=1.0`` is
bit-for-bit the baseline).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from regate_lightning.bank import ScoreBank
from regate_lightning.cache import ReferenceCache, reference_fingerprint
from regate_lightning.elision import check_keep_mask
from regate_lightning.families import resolve
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, KEEP_MASK, LABELS, SAMPLE_IDX
from regate_lightning.schedule import Schedule, is_full_step
from regate_lightning.scoring import (
    check_fraction,
    check_int,
    check_keep_ratio,
    fuse_scores,
    gather_candidates,
    scatter_candidates,
)
from regate_lightning.selection import Fallback, Selection, as_fallback, as_selection, fallback_name
from regate_lightning.targets import candidate_mask, sample_digest, shift_targets
from regate_lightning.teacher import STUDENT, Teacher, build_teacher, teacher_dtype, text_mask

__all__ = ["Gather", "ReGATEPolicy", "StepPlan", "same_rank"]

Gather = Callable[[list[Tensor]], list[Tensor]]
"""Concatenates 1-D tensors of any lengths across ranks, in rank order (one output per input)."""


_EMPTY_INT = torch.zeros(0, dtype=torch.int64)
_EMPTY_FLOAT = torch.zeros(0, dtype=torch.float32)


def same_rank(tensors: list[Tensor]) -> list[Tensor]:
    """The :data:`Gather` of a single process: the tensors as they are."""
    return list(tensors)


@dataclass(frozen=True)
class StepPlan:
    """What the policy decided for one training batch; :meth:`ReGATEPolicy.observe` and reports read it.

    Tensors live on the store's device, except ``keep_mask`` (on the batch's device).

    Attributes:
        step: the optimizer step the batch belongs to.
        sample_idx: int64 ``[B]``.
        candidates: bool ``[B, L]``, the elision candidates (answer tokens that predict an answer token),
            whether or not a prior keep mask elides them.
        counts: int64 ``[B]``, candidates per sample.
        target_ids: int64 ``[N]``, the target token of each candidate (flat layout).
        ref: float32 ``[B, L]``, reference loss at the candidates (NaN elsewhere).
        difficulty: float32 ``[B, L]``, student difficulty ``m`` used for the score (NaN elsewhere).
        scores: float32 ``[B, L]``, fused score ``d = (1 - lambda) m + lambda ref`` (NaN elsewhere).
        sparse: whether the schedule made this step sparse.
        keep_mask: bool ``[B, L]`` for the batch: the prior mask with this step's elisions removed; the
            prior mask itself in a full step; None when the batch had none and the step is full.
        kept: candidates kept on this rank (counting those a prior mask elided as not kept).
        scored: samples the teacher scored for this step on this rank.
        replaced: samples of this step, over all ranks, whose restored values (from a checkpoint or a
            reference cache) belonged to other content and were dropped (see
            :class:`~regate_lightning.bank.ScoreBank`); the teacher scored them again.
        replaced_keys: int64 ``[replaced]``, their sample keys (to name them in the log).
        cached: samples of this step, over all ranks, whose reference losses were read from the reference
            cache (:attr:`ReGATEPolicy.cache`), met for the first time.
        new_ref: the reference losses this rank's teacher computed for this step: keys int64 ``[S]``,
            counts int64 ``[S]`` and the losses float32 (flat layout). They are in this rank's store
            already; :meth:`ReGATEPolicy.observe` sends them to the other ranks with the student's
            losses, in the step's one exchange.
    """

    step: int
    sample_idx: Tensor
    candidates: Tensor
    counts: Tensor
    target_ids: Tensor
    ref: Tensor
    difficulty: Tensor
    scores: Tensor
    sparse: bool
    keep_mask: Tensor | None
    kept: int
    scored: int
    replaced: int = 0
    cached: int = 0
    new_ref: tuple[Tensor, Tensor, Tensor] = (_EMPTY_INT, _EMPTY_INT, _EMPTY_FLOAT)
    replaced_keys: Tensor = _EMPTY_INT

    def apply(self, batch: MutableMapping[str, Any]) -> None:
        """Write :attr:`keep_mask` into ``batch`` (nothing when there is none)."""
        if self.keep_mask is not None:
            batch[KEEP_MASK] = self.keep_mask


class _Scored(NamedTuple):
    """What registering and scoring one batch did (see :class:`StepPlan` for the counts)."""

    scored: Tensor
    """bool ``[B]``: the rows this rank's teacher scored."""
    replaced: Tensor
    """int64 ``[R]``: the keys of the samples whose restored values belonged to other content."""
    cached: int
    new_ref: tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class _View:
    """The text side of one batch, on the store's device."""

    sample_idx: Tensor
    input_ids: Tensor
    labels: Tensor
    text: Tensor
    candidates: Tensor
    counts: Tensor
    digests: Tensor


class ReGATEPolicy:
    """Reference-guided adaptive token elision: teacher, score store, schedule, selection; no Lightning.

    Build it with the method's arguments (each is checked here, naming the argument), then
    :meth:`setup` (teacher and store, on the CPU) and :meth:`start` (devices and dtype) before the first
    :meth:`plan`. The arguments are those of :class:`~regate_lightning.ReGATECallback` (see
    ``docs/method.md``).

    Args:
        keep_ratio: ``p``, fraction of candidate answer tokens kept in a sparse step, in (0, 1]; ``1.0``
            turns elision off for every selection.
        ema_decay: ``beta``, EMA decay of the student's per-token loss, in [0, 1].
        ref_weight: ``lambda``, weight of the reference loss in ``d = (1 - lambda) m + lambda ref``.
        warmup_steps: ``W``, first optimizer steps that keep every token.
        cycle_steps: ``C``, cycle length in optimizer steps after the warm-up.
        full_steps: ``F``, full steps at the start of every cycle (``0 <= F <= C``).
        min_keep: at least this many candidates of a sample are kept.
        fallback: student difficulty of a never-measured candidate: ``"vocab"``, ``"ref"`` or a
            :class:`~regate_lightning.selection.Fallback`.
        selection: ``"regate"`` / ``"topk"``, ``"random"``, ``"adaptive"`` or a
            :class:`~regate_lightning.selection.Selection` (or a callable with its signature).
        teacher: ``"student"`` or an HF id / local path of a causal LM with the same tokenizer.
        teacher_kwargs: keyword arguments of the teacher's ``from_pretrained`` (``dtype``, ...).
        tokenizer: HF id / path of the student's tokenizer, for the teacher-tokenizer check.
        seed: seed of the policy's random generator (``seed + rank`` on each rank).

    Example:
        >>> from regate_lightning.testing import random_batch, tiny_llava
        >>> model = tiny_llava()
        >>> policy = ReGATEPolicy(keep_ratio=0.5, warmup_steps=0, full_steps=0)
        >>> policy.setup(model)
        >>> policy.start(torch.device("cpu"))
        >>> batch = random_batch(model, batch_size=2, answer_len=9)
        >>> plan = policy.plan(batch, step=0)
        >>> plan.sparse, plan.counts.tolist(), plan.kept
        (True, [8, 8], 8)
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
        selection: str | Selection | Callable[..., Tensor] = "regate",
        teacher: str = STUDENT,
        teacher_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
    ) -> None:
        check_keep_ratio(keep_ratio)
        check_fraction("ema_decay", ema_decay)
        check_fraction("ref_weight", ref_weight)
        check_int("min_keep", min_keep, minimum=0)
        check_int("seed", seed, minimum=0)
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"`teacher` must be 'student' or an HF id / local path, got {teacher!r}")
        self.schedule = Schedule(warmup_steps=warmup_steps, cycle_steps=cycle_steps, full_steps=full_steps)
        self.keep_ratio = float(keep_ratio)
        self.ema_decay = float(ema_decay)
        self.ref_weight = float(ref_weight)
        self.min_keep = min_keep
        self.fallback = as_fallback(fallback)
        self.selection = as_selection(selection)
        self.teacher_spec = teacher
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.tokenizer = tokenizer
        self.seed = seed
        self.teacher: Teacher | None = None
        self.bank: ScoreBank | None = None
        self.fingerprint: dict[str, Any] = {}
        self.media_token_ids: tuple[int, ...] = ()
        self.store_device = torch.device("cpu")
        self.generator: torch.Generator | None = None
        self.cache: ReferenceCache | None = None
        """A reference cache opened for lazy reading (:func:`~regate_lightning.cache.open_cache`): a sample
        met for the first time takes its reference losses from it when the cached content matches."""

    # ---------------------------------------------------------------------------------------------
    # Lifecycle.

    def setup(self, model: nn.Module, datamodule: Any = None) -> None:
        """Build the teacher and an empty score store (on the CPU) and the reference-cache fingerprint.

        Args:
            model: the student HF model (possibly peft-wrapped); ``teacher="student"`` copies its
                language backbone now, before any update.
            datamodule: the training data (or None): its ``tokenizer`` for the teacher-tokenizer check
                and, with its ``fingerprint()``, the cache fingerprint.
        """
        parts = resolve(model)
        self.teacher = self.build_teacher(model, datamodule)
        self.bank = ScoreBank(vocab_size=max(self.teacher.vocab_size, int(parts.lm_head.weight.shape[0])))
        self.media_token_ids = parts.media_token_ids
        self.fingerprint = reference_fingerprint(self.teacher_spec, self.teacher, datamodule)

    def build_teacher(self, model: nn.Module, datamodule: Any = None) -> Teacher:
        """This policy's teacher, built (and its tokenizer checked) as :meth:`setup` does; not kept.

        See :func:`~regate_lightning.teacher.build_teacher`.
        """
        return build_teacher(self.teacher_spec, model, self.teacher_kwargs, self.tokenizer, datamodule)

    def start(
        self,
        device: torch.device,
        precision: str | None = None,
        student_dtype: torch.dtype = torch.float32,
        store: torch.device | None = None,
        rank: int = 0,
    ) -> None:
        """Place the teacher and the store; seed the generator. Fitting and scoring both call it.

        Args:
            device: the student's device; the teacher runs there.
            precision: Lightning's precision string; with ``student_dtype`` it picks the teacher's dtype
                (:func:`~regate_lightning.teacher.teacher_dtype`).
            student_dtype: the student's floating-point parameter dtype.
            store: the store's device (default the CPU): where the per-step bookkeeping runs.
            rank: this process's rank (the generator is seeded with ``seed + rank``).
        """
        teacher, bank = self._ready()
        teacher.to(device=device, dtype=teacher_dtype(self.teacher_kwargs, precision, student_dtype))
        self.store_device = torch.device("cpu") if store is None else torch.device(store)
        bank.to(self.store_device)
        self.generator = torch.Generator(device=self.store_device).manual_seed(self.seed + rank)

    def release(self) -> None:
        """Free the teacher (the store stays, for inspection and checkpoints)."""
        self.teacher = None

    def arguments(self) -> dict[str, Any]:
        """The arguments a resumed run must share with the saved one (checked on resume)."""
        return {"teacher": self.teacher_spec, "fallback": fallback_name(self.fallback)}

    def settings(self) -> dict[str, Any]:
        """The arguments a resumed run may change on purpose (a resume that changes one says so in the log)."""
        return {
            "keep_ratio": self.keep_ratio,
            "ema_decay": self.ema_decay,
            "ref_weight": self.ref_weight,
            "warmup_steps": self.schedule.warmup_steps,
            "cycle_steps": self.schedule.cycle_steps,
            "full_steps": self.schedule.full_steps,
            "min_keep": self.min_keep,
            "selection": repr(self.selection),
        }

    # ---------------------------------------------------------------------------------------------
    # The two calls of a training step.

    def plan(
        self,
        batch: Mapping[str, Any],
        step: int,
        gather: Gather = same_rank,
        context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> StepPlan:
        """Score the batch and decide its keep mask.

        Registers the batch's samples in the store (all ranks', through ``gather``), runs the teacher
        once on the samples no rank has scored yet (under ``context()`` and ``torch.no_grad()``) and, in
        a sparse step of the schedule, selects the candidates to keep from the fused scores. The batch is
        not modified: :meth:`StepPlan.apply` writes the mask.

        Args:
            batch: ``input_ids`` and ``labels`` (int64 ``[B, L]``), ``sample_idx`` (int64 ``[B]``, a
                stable id per sample), optionally ``attention_mask`` and a prior ``keep_mask``.
            step: the optimizer step (decides full or sparse).
            gather: the cross-rank all-gather (see :data:`Gather`); the identity on one process.
            context: a factory of the context the teacher runs in (e.g. the precision plugin's
                ``forward_context``).

        Returns:
            The plan.

        Raises:
            KeyError: no ``sample_idx`` or ``labels`` in the batch.
        """
        _, bank = self._ready()
        view = self._view(batch)
        scored, replaced, cached, new_ref = self._register_and_score(view, gather, context)
        target_ids = gather_candidates(shift_targets(view.labels), view.candidates)
        ref = bank.get_ref(view.sample_idx, view.counts)
        difficulty = self.fallback.difficulty(bank, view.sample_idx, view.counts, target_ids)
        scores = scatter_candidates(fuse_scores(difficulty, ref, self.ref_weight), view.candidates)
        sparse = self.keep_ratio < 1.0 and not is_full_step(step, self.schedule)
        prior = batch.get(KEEP_MASK)
        keep_mask = prior
        available = view.candidates
        if prior is not None:
            check_keep_mask(prior, batch[INPUT_IDS])
            prior = prior.to(self.store_device)
            available = available & prior
        kept = int(available.sum())
        if sparse and kept:
            keep = self._select(scores, available)
            if prior is not None:
                keep = keep & prior
            keep_mask = _to_device(keep, batch[INPUT_IDS].device)
            kept = int((keep & view.candidates).sum())
        return StepPlan(
            step=step,
            sample_idx=view.sample_idx,
            candidates=view.candidates,
            counts=view.counts,
            target_ids=target_ids,
            ref=scatter_candidates(ref.float(), view.candidates),
            difficulty=scatter_candidates(difficulty.float(), view.candidates),
            scores=scores,
            sparse=sparse,
            keep_mask=keep_mask,
            kept=kept,
            scored=int(scored.sum()),
            replaced=int(replaced.numel()),
            cached=cached,
            new_ref=new_ref,
            replaced_keys=replaced,
        )

    def observe(
        self, plan: StepPlan, token_loss: Tensor, gather: Gather = same_rank, counts: Sequence[int] = ()
    ) -> list[int]:
        """Fold the student's per-token losses of the planned batch into the EMA store (all ranks').

        Under several processes this is the step's one exchange: each rank sends its student losses,
        the reference losses its teacher computed in :meth:`plan` (``plan.new_ref``) and ``counts``; every
        rank then stores all of them, so the stores stay identical.

        Args:
            plan: what :meth:`plan` returned for the batch.
            token_loss: float ``[B, L]``, the loss of predicting token ``t + 1`` at position ``t``; NaN
                where the student computed nothing (elided by this or any other policy), which the EMA
                skips.
            gather: as in :meth:`plan`.
            counts: this rank's whole counts to be summed over ranks in the same exchange (the callback's
                token counts), or nothing.

        Returns:
            The sums of ``counts`` over ranks (``counts`` itself on one process).
        """
        _, bank = self._ready()
        flat = gather_candidates(token_loss.to(self.store_device), plan.candidates)
        mine = torch.tensor(list(counts), dtype=torch.int64)
        ref_idx, ref_counts, ref_flat = plan.new_ref
        idx, cand, flat, target_ids, ref_idx, ref_counts, ref_flat, sums = self._gather(
            gather, [plan.sample_idx, plan.counts, flat, plan.target_ids, ref_idx, ref_counts, ref_flat, mine]
        )
        bank.update(idx, flat, cand, target_ids, self.ema_decay)
        if ref_idx.numel():  # every rank's new losses (this rank's are stored already: the same values again)
            bank.set_ref(ref_idx, ref_flat, ref_counts)
        return sums.reshape(-1, max(len(mine), 1)).sum(0).tolist()[: len(mine)]

    def reference(
        self,
        batch: Mapping[str, Any],
        gather: Gather = same_rank,
        context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> Tensor:
        """Register the batch's samples and run the teacher on those without reference losses (offline scoring).

        Args:
            batch: as for :meth:`plan` (only the text keys are read).
            gather: as in :meth:`plan`: every rank's samples are registered, and each rank keeps the losses
                its own teacher computed (``regate-lightning score`` runs each rank on its own store and
                writes a part file per rank).
            context: as in :meth:`plan`.

        Returns:
            bool ``[B]`` on the store's device: the samples the teacher scored now (the others had
            reference losses already).
        """
        return self._register_and_score(self._view(batch), gather, context).scored

    # ---------------------------------------------------------------------------------------------
    # Pieces.

    def _ready(self) -> tuple[Teacher, ScoreBank]:
        if self.teacher is None or self.bank is None:
            raise RuntimeError("call ReGATEPolicy.setup(model) and .start(device) before planning or scoring")
        return self.teacher, self.bank

    def _gather(self, gather: Gather, tensors: list[Tensor]) -> list[Tensor]:
        gathered = gather(tensors)
        # The same objects on one process (same_rank): kept, so that the store knows the batch it located.
        return [t if t.device == self.store_device else t.to(self.store_device) for t in gathered]

    def _view(self, batch: Mapping[str, Any]) -> _View:
        if SAMPLE_IDX not in batch:
            raise KeyError(
                f"ReGATE needs `batch['{SAMPLE_IDX}']`: an int64 [B] tensor with a stable non-negative key per "
                "sample, the same for the same sample in every epoch and run. The datasets of regate_lightning.data "
                "add it (a hash of the record's id); for your own dataset return one from __getitem__ (an id, or "
                f"the index when the data never change) and collate it as `{SAMPLE_IDX}`"
            )
        if LABELS not in batch:
            raise KeyError(f"ReGATE needs `batch['{LABELS}']` to find the answer tokens")
        attention = batch.get(ATTENTION_MASK)
        text_keys = [batch[INPUT_IDS], batch[LABELS], batch[SAMPLE_IDX], *([] if attention is None else [attention])]
        input_ids, labels, sample_idx, *rest = _to_store(text_keys, self.store_device)
        attention = rest[0] if rest else None
        text = text_mask(self.media_token_ids, input_ids, attention)
        candidates = candidate_mask(labels) & text
        digests = sample_digest(input_ids, candidates, attention)
        return _View(sample_idx.long(), input_ids, labels, text, candidates, candidates.sum(1), digests)

    def _register_and_score(
        self, view: _View, gather: Gather, context: Callable[[], AbstractContextManager[Any]]
    ) -> _Scored:
        """Register every rank's samples; read the cache for those met first; run the teacher on this rank's others.

        The losses the teacher computes are stored here at once; the other ranks receive them in
        :meth:`observe`.
        """
        teacher, bank = self._ready()
        all_idx, all_counts, all_digests = self._gather(gather, [view.sample_idx, view.counts, view.digests])
        before = bank.num_replaced
        first = bank.register(all_idx, all_counts, all_digests)
        replaced = bank.replaced_keys.cpu() if bank.num_replaced > before else _EMPTY_INT
        cached = 0
        if self.cache is not None and bool(first.any()):
            cached, other = self._read_cache(all_idx[first], all_counts[first], all_digests[first])
            replaced = torch.cat([replaced, other.cpu()])
        missing = ~bank.has_ref(view.sample_idx)
        if not bool(missing.any()):
            return _Scored(missing, replaced, cached, (_EMPTY_INT, _EMPTY_INT, _EMPTY_FLOAT))
        with torch.no_grad(), context():
            losses = teacher.reference_losses(
                view.input_ids[missing], view.labels[missing], view.text[missing], view.candidates[missing]
            )
        idx, counts = view.sample_idx[missing], view.counts[missing]
        flat = gather_candidates(losses.to(self.store_device), view.candidates[missing]).float()
        bank.set_ref(idx, flat, counts)
        return _Scored(missing, replaced, cached, (idx, counts, flat))

    def _read_cache(self, sample_idx: Tensor, counts: Tensor, digests: Tensor) -> tuple[int, int]:
        """Store the cached reference losses of samples met for the first time, where the content matches.

        Returns:
            The number of those samples read from the cache, and the keys of those it holds for other
            content (dropped and counted), int64 ``[R]``.
        """
        _, bank = self._ready()
        assert self.cache is not None
        unknown = ~bank.has_ref(sample_idx)
        found, usable, values = self.cache.read(sample_idx[unknown], counts[unknown], digests[unknown])
        if bool(usable.any()):
            on_store = usable.to(self.store_device)
            bank.set_ref(sample_idx[unknown][on_store], values.to(self.store_device), counts[unknown][on_store])
        return int(usable.sum()), sample_idx[unknown][(found & ~usable).to(sample_idx.device)]

    def _select(self, scores: Tensor, available: Tensor) -> Tensor:
        keep = self.selection.select(scores, available, self.keep_ratio, self.min_keep, self.generator)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != available.shape:
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
            raise TypeError(f"`selection` {self.selection!r} must return a bool [B, L] tensor, got {got}")
        if not bool((keep | available).all()):
            raise ValueError(f"`selection` {self.selection!r} elided a position that is not an available candidate")
        return keep


def _to_store(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """``tensors`` on the store's device; from another device in one copy (one synchronisation, not one each).

    Args:
        tensors: integer or bool tensors of any shapes, on one device.
        device: the store's device.

    Returns:
        The tensors on ``device``: those that were there as they are, the others as int64.
    """
    away = [t for t in tensors if t.device != device]
    if not away:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in away]).to(device)
    moved = iter(part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in away]), away, strict=True))
    return [t if t.device == device else next(moved) for t in tensors]


def _to_device(mask: Tensor, device: torch.device) -> Tensor:
    """A host mask copied to ``device`` without making the host wait (through pinned memory on a GPU)."""
    if mask.device == device:
        return mask
    if mask.device.type == "cpu" and device.type == "cuda":
        mask = mask.pin_memory()
    return mask.to(device, non_blocking=True)
