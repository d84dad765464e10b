"""Seeing which tokens ReGATE kept: an HTML report, a compact terminal view, and a contrast table.

``ElisionReport`` is a callback placed beside ``ReGATECallback``. In the first sparse steps it records,
for a few training samples, every answer token with whether the student computed its loss (kept) or
not (elided), its reference loss and its student difficulty (EMA or fallback), as the paper's teaser
shows. Each token is shown as the *target* of the position that predicts it: eliding position ``t``
drops the loss of token ``t + 1`` (and removes token ``t`` from the decoder's input).

At the end of fitting it writes a self-contained HTML file, prints the same samples compactly
(elided tokens in ``[brackets]``), the run's token savings and validation accuracy, and, when a word
classifier is given (the synthetic set has one), the mean reference loss of words that need the
video against words predictable from the text.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from regate_lightning._imports import import_object
from regate_lightning.callback import ReGATECallback
from regate_lightning.keys import (
    ACTIVE,
    CANDIDATES,
    INPUT_IDS,
    KEEP_MASK,
    KEPT,
    LABELS,
    MEDIA_KINDS,
    SAMPLE_IDX,
    SUPERVISED,
    TEACHER_SAMPLES,
    TOKENS,
    VAL,
    acc_metric,
    media_gap_metric,
    task_accuracies,
)
from regate_lightning.targets import shift_targets


@dataclass
class SampleView:
    """One recorded training sample: its answer tokens and their fate in one sparse step."""

    sample_idx: int
    step: int
    name: str = ""
    """The record behind ``sample_idx`` (the data module's ``sample_name``), e.g. ``"id train-00089"``."""
    tokens: list[str] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    difficulty: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


class ElisionReport(Callback):
    """Record kept and elided answer tokens; write an HTML report and print a summary at the end.

    Args:
        html_path: where the report is written.
        num_samples: training samples shown.
        word_classifier: dotted path of ``f(word) -> bool`` (True = the word needs the image/video) for
            the reference-loss contrast table; None skips the table.
        json_path: optional machine-readable copy of what the report shows.
    """

    def __init__(
        self,
        html_path: str = "runs/elision_report.html",
        num_samples: int = 4,
        word_classifier: str | None = None,
        json_path: str | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {num_samples}")
        self.html_path = Path(html_path)
        self.json_path = Path(json_path) if json_path else None
        self.num_samples = num_samples
        self.word_classifier = import_object(word_classifier, "word_classifier") if word_classifier else None
        self.views: list[SampleView] = []
        self.ref_sum: torch.Tensor | None = None
        self.ref_count: torch.Tensor | None = None

    @staticmethod
    def _regate(trainer: pl.Trainer) -> ReGATECallback:
        for callback in trainer.callbacks:
            if isinstance(callback, ReGATECallback):
                return callback
        raise ValueError("ElisionReport needs a ReGATECallback in trainer.callbacks")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that ReGATE is on."""
        if stage == "fit":
            self._regate(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Accumulate reference losses per target token; record samples of the first sparse steps."""
        plan = self._regate(trainer).last_plan
        if plan is None or batch is None:
            return
        cand = plan.candidates
        targets = shift_targets(batch[LABELS].to(cand.device))
        ids = targets[cand]
        ref = plan.ref[cand].float()
        finite = ~ref.isnan()
        if self.ref_sum is None:
            size = int(pl_module.model.get_output_embeddings().weight.shape[0])
            self.ref_sum = torch.zeros(size, dtype=torch.float64)
            self.ref_count = torch.zeros(size, dtype=torch.int64)
        self.ref_sum.index_add_(0, ids[finite].cpu(), ref[finite].double().cpu())
        self.ref_count.index_add_(0, ids[finite].cpu(), torch.ones_like(ids[finite]).cpu())
        keep = batch.get(KEEP_MASK)
        if keep is None or len(self.views) >= self.num_samples:
            return
        keep = keep.to(cand.device)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        sample_name = getattr(trainer.datamodule, "sample_name", None)
        for row in range(batch[INPUT_IDS].shape[0]):
            if len(self.views) >= self.num_samples:
                break
            positions = cand[row].nonzero().flatten()
            if positions.numel() == 0:
                continue
            key = int(batch[SAMPLE_IDX][row])
            view = SampleView(key, plan.step, sample_name(key) if sample_name is not None else str(key))
            for t in positions.tolist():
                token_id = int(targets[row, t])
                text = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
                view.tokens.append(text)
                view.kept.append(bool(keep[row, t]))
                view.ref.append(float(plan.ref[row, t]))
                view.difficulty.append(float(plan.difficulty[row, t]))
                view.positions.append(t)
            self.views.append(view)

    def contrast(self, tokenizer: Any) -> dict[str, Any] | None:
        """Mean reference loss of video-dependent vs text-predictable words (whole-word tokens only)."""
        if self.word_classifier is None or self.ref_count is None or tokenizer is None:
            return None
        groups: dict[str, list[tuple[str, float, int]]] = {"video": [], "text": []}
        for token_id in (self.ref_count > 0).nonzero().flatten().tolist():
            word = tokenizer.decode([token_id]).strip()
            if not word.isalpha():
                continue
            mean = float(self.ref_sum[token_id] / self.ref_count[token_id])
            groups["video" if self.word_classifier(word.lower()) else "text"].append(
                (word, mean, int(self.ref_count[token_id]))
            )
        out: dict[str, Any] = {}
        for name, words in groups.items():
            n = sum(c for _, _, c in words)
            out[name] = {
                "mean_ref": sum(m * c for _, m, c in words) / n if n else math.nan,
                "tokens": n,
                "words": sorted(words, key=lambda w: -w[2])[:12],
            }
        return out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the HTML report and print the summary (rank 0)."""
        if not trainer.is_global_zero:
            return
        regate = self._regate(trainer)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        contrast = self.contrast(tokenizer)
        summary = run_summary(trainer, regate)
        self.html_path.parent.mkdir(parents=True, exist_ok=True)
        self.html_path.write_text(render_html(self.views, summary, contrast), encoding="utf-8")
        if self.json_path is not None:
            payload = {"summary": summary, "contrast": contrast, "samples": [v.__dict__ for v in self.views]}
            self.json_path.write_text(json.dumps(payload, indent=1, default=float), encoding="utf-8")
        print(render_text(self.views, summary, contrast, self.html_path))


def run_summary(trainer: pl.Trainer, regate: ReGATECallback) -> dict[str, float]:
    """Token counts of the run and the last validation accuracies (overall and per task)."""
    totals = regate.totals
    tokens, active = totals[TOKENS], totals[ACTIVE]
    summary = {
        "steps": float(trainer.global_step),
        "tokens_baseline": float(tokens),
        "tokens_processed": float(active),
        "tokens_saved_frac": 1.0 - active / tokens if tokens else 0.0,
        "candidates": float(totals[CANDIDATES]),
        "candidates_kept": float(totals[KEPT]),
        "supervised_trained": float(totals[SUPERVISED]),
        "teacher_samples": float(totals[TEACHER_SAMPLES]),
        "cache_samples": float(regate.cache_samples),
    }
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    if acc_metric(VAL) in metrics:
        summary[acc_metric(VAL)] = metrics[acc_metric(VAL)]
    for task, value in task_accuracies(metrics, VAL).items():
        summary[acc_metric(VAL, task)] = value
    for kind in MEDIA_KINDS:
        if media_gap_metric(VAL, kind) in metrics:
            summary[media_gap_metric(VAL, kind)] = metrics[media_gap_metric(VAL, kind)]
    return summary


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2f}"


def render_text(
    views: list[SampleView], summary: dict[str, float], contrast: dict[str, Any] | None, html_path: Path
) -> str:
    """The terminal version of the report."""
    lines = ["", "ReGATE run summary"]
    if acc_metric(VAL) in summary:
        per_task = ", ".join(f"{task} {v:.2f}" for task, v in task_accuracies(summary, VAL).items())
        lines.append(f"  validation accuracy: {summary[acc_metric(VAL)]:.3f}" + (f" ({per_task})" if per_task else ""))
    for kind in MEDIA_KINDS:
        if media_gap_metric(VAL, kind) in summary:
            lines.append(
                f"  {kind} gap: {summary[media_gap_metric(VAL, kind)]:.3f} nats per answer token (loss with another "
                f"sample's {kind} minus with its own; 0 = the student ignores its {kind}s)"
            )
    lines.append(
        f"  tokens through the decoder: {summary['tokens_processed']:.0f} of {summary['tokens_baseline']:.0f} "
        f"that the baseline processes in the same {summary['steps']:.0f} steps "
        f"(saved {100 * summary['tokens_saved_frac']:.1f} %)"
    )
    if summary["candidates"]:
        lines.append(
            f"  answer-token candidates kept: {summary['candidates_kept']:.0f} of {summary['candidates']:.0f} "
            f"({100 * summary['candidates_kept'] / summary['candidates']:.1f} %); "
            + (
                f"teacher scored {summary['teacher_samples']:.0f} samples once each"
                if summary["teacher_samples"]
                else "the teacher ran on no sample"
            )
            + (f", {summary['cache_samples']:.0f} read from ref_cache" if summary.get("cache_samples") else "")
        )
    if contrast:
        lines.append("  reference loss (text-only teacher), mean per token:")
        for name, label in (("text", "words predictable from the text"), ("video", "words that need the video")):
            group = contrast[name]
            lines.append(f"    {label:34s} {_fmt(group['mean_ref'])}  ({group['tokens']} tokens)")
    if views:
        lines.append("  kept and [elided] answer tokens in the first sparse step:")
        for view in views:
            words = [tok if kept else f"[{tok.strip()}]" for tok, kept in zip(view.tokens, view.kept, strict=True)]
            lines.append(
                f"    {view.name or view.sample_idx}: " + "".join(w if w.startswith(" ") else " " + w for w in words)
            )
    lines.append(f"  report: {html_path}")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
.tok { display: inline-block; margin: 1px; padding: 2px 3px; border-radius: 3px; font-family: monospace; }
.kept { background: #cde8cd; } .elided { background: #eee; color: #999; text-decoration: line-through; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.legend span { margin-right: 1em; }
"""


def render_html(views: list[SampleView], summary: dict[str, float], contrast: dict[str, Any] | None) -> str:
    """A self-contained HTML page (no scripts, no external resources)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>" for k, v in summary.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ReGATE: kept and elided tokens</title>",
        f"<style>{_CSS}</style></head><body><h1>ReGATE: which answer tokens the student computed</h1>",
        "<p class='legend'><span class='tok kept'>kept</span><span class='tok elided'>elided</span>"
        " Hover a token for its reference loss (text-only teacher) and the student difficulty (EMA).</p>",
        f"<h2>Run</h2><table>{rows}</table>",
    ]
    if contrast:
        parts.append(
            "<h2>Reference loss by word type</h2><table><tr><th>words</th><th>mean ref loss</th>"
            "<th>tokens</th><th>most frequent</th></tr>"
        )
        for name, label in (("text", "predictable from the text"), ("video", "need the video")):
            group = contrast[name]
            common = ", ".join(f"{html.escape(w)} ({m:.2f})" for w, m, _ in group["words"])
            parts.append(
                f"<tr><th>{label}</th><td>{_fmt(group['mean_ref'])}</td><td>{group['tokens']}</td>"
                f"<td style='text-align:left'>{common}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Samples</h2>")
    for view in views:
        name = html.escape(view.name or str(view.sample_idx))
        parts.append(f"<h3>{name}, step {view.step}</h3><p class='sample' data-sample='{view.sample_idx}'>")
        for tok, kept, ref, diff, pos in zip(
            view.tokens, view.kept, view.ref, view.difficulty, view.positions, strict=True
        ):
            cls = "kept" if kept else "elided"
            title = f"ref {_fmt(ref)} | EMA {_fmt(diff)} | position {pos}"
            parts.append(
                f"<span class='tok {cls}' data-pos='{pos}' data-kept='{int(kept)}' "
                f"title='{html.escape(title)}'>{html.escape(tok)}</span>"
            )
        parts.append("</p>")
    parts.append("</body></html>")
    return "".join(parts)
