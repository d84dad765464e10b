"""``VisualTokenElision``: visual-token elision as a Lightning callback, a thin driver around the policy.

The decisions are :class:`~regate_lightning.visual.VisualElisionPolicy`'s; the callback connects them to
Lightning's hooks:

1. ``setup("fit")``: reads the student's family (its token -> pixel-region layout);
2. ``on_train_batch_start``: ``policy.plan(batch, trainer.global_step)`` and, in a sparse step, writes
   ``batch["keep_mask"]``, removing positions from any mask already there;
3. ``on_train_batch_end``: sums the step's counts over ranks into ``totals`` and logs ``visual/*``.

It works alone and beside :class:`~regate_lightning.ReGATECallback`, in either order in
``trainer.callbacks``: each removes positions from whatever keep mask the other wrote, so the decoder runs
on the intersection. The teacher of ReGATE is text-only and never sees visual tokens. Validation, test
and predict are never touched.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from regate_lightning.callback import logging_step, step_outputs
from regate_lightning.keys import (
    ACTIVE,
    NUM_ACTIVE,
    NUM_TOKENS,
    TOKENS,
    VISUAL,
    VISUAL_ACTIVE_FRAC,
    VISUAL_CUM_ACTIVE_TOKENS,
    VISUAL_CUM_KEPT_VISUAL_TOKENS,
    VISUAL_CUM_TOKENS,
    VISUAL_CUM_VISUAL_TOKENS,
    VISUAL_KEPT,
    VISUAL_KEPT_FRAC,
    VISUAL_SPARSE_STEP,
    VISUAL_TOTALS,
)
from regate_lightning.sync import sum_over_ranks
from regate_lightning.visual import VisualElisionPolicy, VisualPlan, VisualSelection

STATE_VERSION = 1


class VisualTokenElision(Callback):
    """Elide visual tokens of the training batches in sparse steps (see ``docs/method.md``).

    Args:
        keep_ratio: fraction of each sample's visual tokens kept in a sparse step, in (0, 1]; ``1.0``
            turns it off. A sample with ``n`` visual tokens keeps ``max(min_keep, ceil(keep_ratio * n))``.
        selection: ``"temporal"`` (the tokens whose pixels changed most since the previous frame; the first
            frame before all), ``"temporal_frames"`` (whole frames, the most changed first; the vision tower
            skips the elided ones), ``"uniform"`` (whole frames, evenly spread), ``"random"`` (a control), or
            a :class:`~regate_lightning.visual.VisualSelection` (in YAML, a ``class_path``).
        warmup_steps: first optimizer steps that keep every token.
        cycle_steps: cycle length in optimizer steps after the warm-up.
        full_steps: full steps at the start of every cycle.
        min_keep: at least this many visual tokens of a sample are kept.
        images: elide image tokens too (with ``selection="random"`` only: an image has no previous frame).
        seed: seed of the random selection (per step, rank and batch index: a resumed run draws the same).

    Attributes:
        policy: the :class:`~regate_lightning.visual.VisualElisionPolicy` that makes every decision.
        totals: counters over the run (keys :data:`~regate_lightning.keys.VISUAL_TOTALS`), summed over ranks.
        last_plan: the policy's plan of the latest training batch.

    Example (Python; the same arguments in YAML under ``trainer.callbacks``)::

        trainer = pl.Trainer(callbacks=[VisualTokenElision(keep_ratio=0.5, selection="temporal"),
                                        ReGATECallback(keep_ratio=0.5)])
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        selection: str | VisualSelection = "temporal",
        warmup_steps: int = 100,
        cycle_steps: int = 128,
        full_steps: int = 16,
        min_keep: int = 1,
        images: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.policy = VisualElisionPolicy(
            keep_ratio=keep_ratio,
            selection=selection,
            warmup_steps=warmup_steps,
            cycle_steps=cycle_steps,
            full_steps=full_steps,
            min_keep=min_keep,
            images=images,
            seed=seed,
        )
        self.totals = dict.fromkeys(VISUAL_TOTALS, 0)
        self._plan: VisualPlan | None = None
        self.last_plan: VisualPlan | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Read the student's family (fit only)."""
        if stage != "fit":
            return
        model = getattr(pl_module, "model", None)
        if model is None:
            raise TypeError(
                "VisualTokenElision needs a LightningModule with the student HF model as `.model` (MLLMModule)"
            )
        self.policy.setup(model)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Plan the step and, in a sparse step, write ``batch["keep_mask"]``."""
        if batch is None:  # a batch the data's on_error="skip" policy emptied (ReGATECallback explains DDP)
            return
        plan = self.policy.plan(batch, trainer.global_step, rank=trainer.global_rank, index=batch_idx)
        plan.apply(batch)
        self._plan = self.last_plan = plan

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the step over ranks and log ``visual/*`` on logging steps."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        outputs = step_outputs(outputs, (NUM_ACTIVE, NUM_TOKENS))
        counts = (outputs[NUM_ACTIVE], outputs[NUM_TOKENS], plan.visual, plan.kept)
        step = dict(zip(VISUAL_TOTALS, sum_over_ranks(trainer.strategy, counts), strict=True))
        for key, value in step.items():
            self.totals[key] += value
        if logging_step(trainer):
            self._log(pl_module, plan, step)

    def _log(self, pl_module: pl.LightningModule, plan: VisualPlan, step: dict[str, int]) -> None:
        size = int(plan.candidates.shape[0])
        metrics = {
            VISUAL_ACTIVE_FRAC: step[ACTIVE] / max(step[TOKENS], 1),
            VISUAL_CUM_ACTIVE_TOKENS: float(self.totals[ACTIVE]),
            VISUAL_CUM_TOKENS: float(self.totals[TOKENS]),
            VISUAL_CUM_VISUAL_TOKENS: float(self.totals[VISUAL]),
            VISUAL_CUM_KEPT_VISUAL_TOKENS: float(self.totals[VISUAL_KEPT]),
            VISUAL_SPARSE_STEP: float(plan.sparse),
        }
        pl_module.log(VISUAL_KEPT_FRAC, step[VISUAL_KEPT] / max(step[VISUAL], 1), prog_bar=True, batch_size=size)
        pl_module.log_dict(metrics, batch_size=size)

    # ---------------------------------------------------------------------------------------------
    # Checkpointing.

    def state_dict(self) -> dict[str, Any]:
        """Version, the arguments (for a warning on resume) and the counters; the policy keeps no other state."""
        return {"version": STATE_VERSION, "arguments": self.policy.arguments(), "totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters; warn when the arguments differ from the checkpoint's."""
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"VisualTokenElision state has version {version!r}; this release reads {STATE_VERSION}")
        saved, now = state_dict.get("arguments") or {}, self.policy.arguments()
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"`{k}` saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            rank_zero_warn(f"VisualTokenElision resumes with other arguments: {details}")
        self.totals.update({k: int(v) for k, v in state_dict["totals"].items() if k in self.totals})
