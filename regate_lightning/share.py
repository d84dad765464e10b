"""Will ReGATE pay on your data? The answer share of a training set, and the saving to expect from it.

ReGATE elides answer tokens only: the video, the image and the prompt always reach the decoder. What it
can save in a step is therefore bounded by the *candidate share* of the data: the answer-token
candidates (:func:`~regate_lightning.targets.candidate_mask`: an answer token that predicts the next
answer token) over every token the decoder runs. A sparse step at keep ratio ``p`` elides
``n - max(min_keep, ceil(p n))`` of a sample's ``n`` candidates; over a run only the sparse steps elide
(:func:`~regate_lightning.schedule.count_sparse_steps`). So the decoder tokens a run saves are

    saving = (elided in a sparse step / all tokens) * (sparse steps / steps)
           ~ candidate share * (1 - p) * (C - F) / C          (long runs, p = 0.5: 0.44 * candidate share)

Step time follows the decoder's tokens closely on a CPU (``docs/results.md``, "Throughput (CPU)") and
less than proportionally on a GPU, where fixed costs weigh more; see "When does ReGATE pay" in
``docs/results.md`` for the measured curve and the learning results beside it.

Command (the same recipe ``fit`` reads, so the same files, tokenizer, chat template, processor, frame
sampling and ``max_length``; the student is built as ``fit`` builds it, which for a large checkpoint
takes the time and memory of loading it)::

    python -m regate_lightning.share --config recipes/own_data.yaml
    python -m regate_lightning.share --config recipes/own_data.yaml --keep_ratio 0.3 --max_samples 2000

It walks the training set once in order with the recipe's collator, counts, and prints the counts, the
shares, and the saving expected per sparse step and over the recipe's run, at the ReGATE callback's
settings (or at ``--keep_ratio``; the paper's schedule when the recipe has no ReGATE callback).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS
from regate_lightning.schedule import Schedule, count_sparse_steps
from regate_lightning.targets import IGNORE_INDEX, candidate_mask, shift_targets

__all__ = ["ShareCounts", "count_batch", "expected_saving", "main"]


@dataclass
class ShareCounts:
    """Token counts of a training set, and what a sparse step at keep ratio ``keep_ratio`` elides.

    Attributes:
        samples: samples counted.
        tokens: non-padding tokens (what the baseline's decoder runs).
        media_tokens: image/video placeholder tokens among them.
        targets: supervised targets (answer tokens, the paper's "target tokens").
        candidates: elision candidates (answer tokens that predict the next answer token).
        elided: candidates a sparse step elides: ``n - max(min_keep, ceil(p n))`` per sample.
        keep_ratio: ``p``.
        min_keep: the callback's ``min_keep``.
    """

    samples: int = 0
    tokens: int = 0
    media_tokens: int = 0
    targets: int = 0
    candidates: int = 0
    elided: int = 0
    keep_ratio: float = 0.5
    min_keep: int = 1

    @property
    def answer_share(self) -> float:
        """Supervised answer tokens / all tokens."""
        return self.targets / max(self.tokens, 1)

    @property
    def candidate_share(self) -> float:
        """Elision candidates / all tokens: the most a step can elide."""
        return self.candidates / max(self.tokens, 1)

    @property
    def sparse_step_saving(self) -> float:
        """Decoder tokens a sparse step saves: elided candidates / all tokens."""
        return self.elided / max(self.tokens, 1)


def count_batch(counts: ShareCounts, batch: dict[str, Any], media_token_ids: tuple[int, ...] = ()) -> ShareCounts:
    """Add one collated batch to ``counts`` (in place) and return it.

    Args:
        counts: the running counts (its ``keep_ratio`` and ``min_keep`` set the elided count).
        batch: ``input_ids`` int64 ``[B, L]``, ``labels`` int64 ``[B, L]`` (``IGNORE_INDEX`` where
            unsupervised), optional ``attention_mask`` ``[B, L]`` (0 at padding).
        media_token_ids: the student's image/video placeholder ids.

    Example:
        >>> batch = {"input_ids": torch.tensor([[1, 9, 9, 5, 6, 7, 8]]),
        ...          "labels": torch.tensor([[-100, -100, -100, -100, 6, 7, 8]])}
        >>> c = count_batch(ShareCounts(keep_ratio=0.5), batch, (9,))
        >>> (c.tokens, c.media_tokens, c.targets, c.candidates, c.elided)
        (7, 2, 3, 2, 1)
    """
    ids, labels = batch[INPUT_IDS], batch[LABELS]
    attended = batch.get(ATTENTION_MASK)
    attended = torch.ones_like(ids, dtype=torch.bool) if attended is None else attended.bool()
    per_sample = candidate_mask(labels).sum(1)
    kept = torch.clamp(torch.ceil(per_sample * counts.keep_ratio), min=counts.min_keep)
    counts.samples += int(ids.shape[0])
    counts.tokens += int(attended.sum())
    if media_token_ids:
        counts.media_tokens += int((torch.isin(ids, torch.tensor(media_token_ids)) & attended).sum())
    counts.targets += int((shift_targets(labels) != IGNORE_INDEX).sum())
    counts.candidates += int(per_sample.sum())
    counts.elided += int(torch.where(per_sample > 0, per_sample - torch.minimum(kept, per_sample), 0).sum())
    return counts


def expected_saving(counts: ShareCounts, schedule: Schedule, steps: int) -> dict[str, float]:
    """The decoder-token saving to expect: per sparse step, over ``steps`` optimizer steps, and in the long run.

    Assumes every step draws the data set's average mix (the step's own samples make it vary).

    Returns:
        ``sparse_step``, ``run`` (over ``steps``), ``sparse_steps`` (how many of them are sparse) and
        ``long_run`` (the steady state: ``(C - F) / C`` of the steps sparse).

    Example:
        >>> c = ShareCounts(tokens=100, candidates=40, elided=20)
        >>> r = expected_saving(c, Schedule(warmup_steps=0, cycle_steps=4, full_steps=1), 8)
        >>> [round(r[k], 6) for k in ("sparse_step", "run", "long_run")]
        [0.2, 0.15, 0.15]
    """
    sparse = count_sparse_steps(steps, schedule) if steps > 0 else 0
    per_step = counts.sparse_step_saving
    steady = (schedule.cycle_steps - schedule.full_steps) / schedule.cycle_steps
    return {
        "sparse_step": per_step,
        "run": per_step * sparse / steps if steps > 0 else math.nan,
        "sparse_steps": float(sparse),
        "long_run": per_step * steady,
    }


def _recipe_steps(trainer: Any, batches: int) -> int:
    """Optimizer steps of the recipe's run: ``max_steps``, else epochs x batches / accumulation (0 if unknown)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    epochs = trainer.max_epochs or 0
    accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
    return max(epochs, 0) * math.ceil(batches / accumulate)


def report(counts: ShareCounts, saving: dict[str, float], schedule: Schedule, steps: int) -> str:
    """The printed summary."""
    p = counts.keep_ratio
    lines = [
        f"training samples: {counts.samples:,}; tokens the decoder runs: {counts.tokens:,} "
        f"({counts.tokens / max(counts.samples, 1):.0f} per sample; {counts.media_tokens:,} image/video tokens)",
        f"answer share: {counts.answer_share:.3f} ({counts.targets:,} supervised answer tokens)",
        f"candidate share: {counts.candidate_share:.3f} ({counts.candidates:,} answer tokens ReGATE may elide)",
        f"a sparse step at keep_ratio {p:g} elides {counts.elided:,} of them: "
        f"{100 * saving['sparse_step']:.1f} % of the decoder's tokens",
        f"schedule W/C/F = {schedule.warmup_steps}/{schedule.cycle_steps}/{schedule.full_steps}: "
        + (
            f"over this recipe's {steps:,} steps ({saving['sparse_steps']:.0f} sparse) ReGATE saves "
            f"{100 * saving['run']:.1f} % of the decoder's tokens; "
            if steps > 0
            else ""
        )
        + f"in the long run {100 * saving['long_run']:.1f} %",
        "step time follows the decoder's tokens on a CPU and less than proportionally on a GPU; where the "
        "saving is a few percent, ReGATE cannot pay for itself per step (docs/results.md, 'When does ReGATE pay')",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line: ``--config`` and the recipe's overrides go to the recipe, the rest are this tool's."""
    parser = argparse.ArgumentParser(
        prog="python -m regate_lightning.share",
        description="Print the answer share of a recipe's training set and the decoder-token saving ReGATE "
        "can bring (see docs/results.md, 'When does ReGATE pay'). Other arguments go to the recipe "
        "(--config FILE, --data.init_args.train_file ..., as for `regate-lightning fit`).",
    )
    parser.add_argument("--keep_ratio", type=float, default=None, help="p (default: the recipe's ReGATE callback's)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the run (default: the recipe's)")
    parser.add_argument(
        "--max_samples", type=int, default=None, help="stop after the batch that reaches N training samples"
    )
    return parser


def main(argv: list[str] | None = None) -> ShareCounts:
    """Run the command (see the module docstring) and return the counts."""
    from regate_lightning.callback import ReGATECallback
    from regate_lightning.cli import build_cli
    from regate_lightning.families import resolve
    from regate_lightning.score import training_loader

    args, recipe = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build_cli(recipe, run=False, save_config_callback=None)
    regate = next((c for c in cli.trainer.callbacks if isinstance(c, ReGATECallback)), None)
    schedule = regate.policy.schedule if regate is not None else Schedule()
    keep_ratio = args.keep_ratio if args.keep_ratio is not None else (regate.policy.keep_ratio if regate else 0.5)
    counts = ShareCounts(keep_ratio=keep_ratio, min_keep=regate.policy.min_keep if regate is not None else 1)
    data, module = cli.datamodule, cli.model
    cli.trainer.strategy.connect(module)  # the data module reads the student's layout from trainer.lightning_module
    data.trainer = cli.trainer
    data.prepare_data()
    data.setup("fit")
    media = tuple(resolve(module.model).media_token_ids)
    loader = training_loader(data.train_dataloader())
    for batch in loader:
        if batch is None:  # every sample of it skipped by the data's on_error policy (counted there)
            continue
        count_batch(counts, batch, media)
        if args.max_samples is not None and counts.samples >= args.max_samples:
            break
    steps = args.steps if args.steps is not None else _recipe_steps(cli.trainer, len(loader))
    saving = expected_saving(counts, schedule, steps)
    print(report(counts, saving, schedule, steps))
    return counts


if __name__ == "__main__":
    main()
    sys.exit(0)
