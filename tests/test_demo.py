"""The embedded demo, shrunk: synthetic videos, pretrained text LM, ReGATE, the elision report."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.data.datamodule import SyntheticVideoQADataModule
from regate_lightning.data.datasets import sample_key
from regate_lightning.demo import demo_student
from regate_lightning.keys import KEEP_MASK, SAMPLE_IDX
from regate_lightning.report import ElisionReport, run_summary


class KeepSpy(pl.Callback):
    """Records each sparse step's keep mask per sample (listed after ReGATECallback)."""

    def __init__(self) -> None:
        self.masks: dict[tuple[int, int], torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if KEEP_MASK in batch:
            for row, idx in enumerate(batch[SAMPLE_IDX].tolist()):
                self.masks[(trainer.global_step, idx)] = batch[KEEP_MASK][row].cpu().clone()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cache = str(root / "synthetic")
    size = {"root": cache, "num_train": 24, "num_val": 8}
    pl.seed_everything(0)
    student = demo_student(**size, pretrain_steps=30)
    module = MLLMModule(student, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    data = SyntheticVideoQADataModule(**size, num_frames=4, batch_size=4, val_batch_questions=4, media_cache_mb=16)
    spy = KeepSpy()
    report = ElisionReport(
        html_path=str(root / "report.html"),
        num_samples=3,
        word_classifier="regate_lightning.data.synthetic.needs_video",
    )
    regate = ReGATECallback(warmup_steps=1, cycle_steps=4, full_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[regate, spy, report],
    )
    trainer.fit(module, data)
    return trainer, regate, spy, report, root


def test_demo_trains_evaluates_and_saves_tokens(demo_run, capsys):
    trainer, regate, _, _, _ = demo_run
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert {"val/acc_colour", "val/acc_shape", "val/acc_direction", "val/acc_count"} <= set(trainer.callback_metrics)
    assert regate.totals["active"] < regate.totals["tokens"], "sparse steps processed fewer tokens"
    assert regate.totals["teacher_samples"] == 24
    summary = run_summary(trainer, regate)
    assert math.isfinite(summary["val/video_gap"])  # measured on the correct options, printed in the summary
    assert trainer.datamodule.media_cache.misses == 24 + 8  # every clip decoded once over the two epochs


def test_report_marks_agree_with_keep_masks(demo_run):
    _, _, spy, _, root = demo_run
    html = (root / "report.html").read_text()
    samples = re.findall(r"<h3>id (train-\d+), step (\d+)</h3><p class='sample' data-sample='(\d+)'>(.*?)</p>", html)
    assert len(samples) == 3
    for name, step, sample, body in samples:
        assert sample_key(f"id {name}") == int(sample)  # the record behind the sample key, by name
        mask = spy.masks[(int(step), int(sample))]
        marks = re.findall(r"data-pos='(\d+)' data-kept='(\d)'", body)
        assert marks, "every shown sample has answer tokens"
        for pos, kept in marks:
            assert bool(int(kept)) == bool(mask[int(pos)]), f"sample {sample} position {pos}"
        assert any(k == "0" for _, k in marks) and any(k == "1" for _, k in marks)


def test_reference_contrast_is_reported(demo_run):
    trainer, _, _, report, _ = demo_run
    contrast = report.contrast(trainer.datamodule.tokenizer)
    assert contrast["video"]["tokens"] > 0 and contrast["text"]["tokens"] > 0


def test_summary_says_where_the_reference_losses_came_from(tmp_path):
    from regate_lightning.report import render_text

    summary = {
        "tokens_processed": 90.0,
        "tokens_baseline": 100.0,
        "steps": 10.0,
        "tokens_saved_frac": 0.1,
        "candidates": 40.0,
        "candidates_kept": 30.0,
        "teacher_samples": 8.0,
    }
    first = render_text([], summary, None, tmp_path / "r.html")
    assert "30 of 40 (75.0 %); teacher scored 8 samples once each" in first and "ref_cache" not in first
    again = render_text([], {**summary, "teacher_samples": 0.0, "cache_samples": 8.0}, None, tmp_path / "r.html")
    assert "(75.0 %); the teacher ran on no sample, 8 read from ref_cache" in again


def test_descriptions_recipe_runs_at_smoke_size(tmp_path, monkeypatch, capsys):
    """recipes/demo_descriptions_regate.yaml as written, shrunk by overrides: data, text LM, fit, summary."""
    from pathlib import Path

    from regate_lightning.cli import main

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "synthetic_descriptions")
    main(
        [
            "fit",
            "--config",
            str(recipes / "demo_descriptions_regate.yaml"),
            f"--model.model_kwargs.root={root}",
            "--model.model_kwargs.num_train=16",
            "--model.model_kwargs.num_val=12",
            "--model.model_kwargs.pretrain_steps=5",
            f"--data.init_args.root={root}",
            "--data.init_args.num_train=16",
            "--data.init_args.num_val=12",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=1",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks.warmup_steps=1",
            "--trainer.callbacks.cycle_steps=2",
            "--trainer.callbacks.full_steps=0",
        ]
    )
    out = capsys.readouterr().out
    assert "ReGATE run summary" in out and "validation accuracy" in out
    for task in ("order", "shape", "count", "direction", "speed", "entry"):
        assert f"{task} " in out.split("validation accuracy")[1].splitlines()[0]
    assert (tmp_path / "runs" / "demo_descriptions" / "ref_cache.pt").is_file()
