"""Multiple-choice evaluation in the MVBench style: each option scored by the student's likelihood.

A multiple-choice batch has one row per option (``question_idx``, ``option_idx``, ``answer_idx``,
``task``: int64 ``[B]``), with labels on the option's text only. The option with the highest
log-likelihood (sum over its tokens, or mean per token) is the prediction. A tie for the highest
likelihood predicts no option (:data:`NO_PREDICTION`), which counts as wrong: the first of the tied
options is not a guess the model made. Accuracy is accumulated
with torchmetrics, overall and per task, and synchronised across processes by torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from regate_lightning.keys import ANSWER_IDX, NUM_OPTIONS, OPTION_IDX, QUESTION_IDX, TASK

OPTION_SCORES = ("sum", "mean")
NO_PREDICTION = -1
"""The prediction of a question whose highest likelihood is shared by several options (never an answer)."""


def choose_options(
    token_loss: torch.Tensor, batch: dict[str, Any], option_score: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick, per question of the batch, the option with the highest likelihood.

    Args:
        token_loss: float ``[B, L]``, per-position loss, NaN where not supervised.
        batch: with ``question_idx``, ``option_idx``, ``answer_idx``, ``task`` (int64 ``[B]``); every
            option of a question must be in the same batch (checked against ``num_options`` when the batch
            has it: a question scored on some of its options would inflate the accuracy).
        option_score: ``"sum"`` or ``"mean"`` of the option's token log-likelihoods.

    Returns:
        ``(pred, answer, task)``: int64 ``[Q]`` each, one entry per question; ``pred`` is
        :data:`NO_PREDICTION` where several options share the highest likelihood (a tie counts as wrong).

    Example:
        >>> loss = torch.tensor([[1.0, float("nan")], [0.2, 0.3], [2.0, 2.0]])
        >>> b = {"question_idx": torch.tensor([4, 4, 4]), "option_idx": torch.tensor([0, 1, 2]),
        ...      "answer_idx": torch.tensor([1, 1, 1]), "task": torch.tensor([0, 0, 0])}
        >>> choose_options(loss, b)
        (tensor([1]), tensor([1]), tensor([0]))
        >>> choose_options(torch.tensor([[0.5], [0.5]]), {**b, **{k: v[:2] for k, v in b.items()}})[0]
        tensor([-1])
    """
    if option_score not in OPTION_SCORES:
        raise ValueError(f"`option_score` must be one of {OPTION_SCORES}, got {option_score!r}")
    supervised = ~token_loss.isnan()
    loglik = -token_loss.nan_to_num(0.0).sum(1)
    if option_score == "mean":
        loglik = loglik / supervised.sum(1).clamp(min=1)
    questions = batch[QUESTION_IDX]
    preds, answers, tasks = [], [], []
    for q in questions.unique(sorted=True):
        rows = (questions == q).nonzero().flatten()
        options = batch[OPTION_IDX][rows]
        if options.unique().numel() != options.numel():
            raise ValueError(f"question {int(q)} has an option twice in one batch")
        if NUM_OPTIONS in batch and int(batch[NUM_OPTIONS][rows[0]]) != options.numel():
            raise ValueError(
                f"question {int(q)} has {options.numel()} of its {int(batch[NUM_OPTIONS][rows[0]])} options in the "
                "batch; a question is scored with all its options or not at all (the collator drops it whole)"
            )
        scores = loglik[rows]
        best = scores == scores.max()
        tied = int(best.sum()) > 1
        preds.append(torch.full_like(options[0], NO_PREDICTION) if tied else options[best][0])
        answers.append(batch[ANSWER_IDX][rows[0]])
        tasks.append(batch[TASK][rows[0]])
    return torch.stack(preds), torch.stack(answers), torch.stack(tasks)


class ChoiceAccuracy(nn.Module):
    """Accuracy overall and per task, as torchmetrics ``MeanMetric`` s of 0/1 hits.

    Per-task accuracies are computed for every named task on every rank (so that the metrics'
    cross-process synchronisation happens in the same order everywhere); a task id without a name is
    refused.

    Args:
        task_names: names of the task ids (index = id); per-task metrics are named ``acc_<name>``.
        max_tasks: number of per-task slots.
    """

    def __init__(self, task_names: list[str] | None = None, max_tasks: int = 32) -> None:
        super().__init__()
        self.task_names = list(task_names or [])
        self.overall = MeanMetric()
        self.per_task = nn.ModuleList([MeanMetric() for _ in range(max(max_tasks, len(self.task_names)))])
        self.count = 0

    def update(self, preds: torch.Tensor, answers: torch.Tensor, tasks: torch.Tensor) -> None:
        """Add one batch of per-question predictions."""
        hits = (preds == answers).float()
        self.overall.update(hits)
        for task in tasks.unique().tolist():
            if task >= len(self.task_names):
                raise ValueError(
                    f"task id {task} has no name: pass `task_names` (the datamodule's `task_names` is used when it "
                    "has one)"
                )
            self.per_task[task].update(hits[tasks == task])
        self.count += int(hits.numel())

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"all": acc, "<task>": acc, ...}`` over everything since the last reset (all ranks)."""
        out = {"all": self.overall.compute()}
        for task, name in enumerate(self.task_names):
            out[name] = self.per_task[task].compute()
        return out

    def reset(self) -> None:
        """Forget the epoch's predictions."""
        self.overall.reset()
        for metric in self.per_task:
            metric.reset()
        self.count = 0
