"""``python -m regate_lightning.share``: the answer share and the expected saving of a recipe's training set."""

from __future__ import annotations

from pathlib import Path

import torch

from regate_lightning import ReGATECallback
from regate_lightning.cli import build_cli
from regate_lightning.keys import CANDIDATES, TOKENS
from regate_lightning.schedule import Schedule, count_sparse_steps
from regate_lightning.share import ShareCounts, count_batch, expected_saving, main

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "own_data.yaml")


def test_counts_of_own_data_equal_what_one_epoch_of_fit_processes(tmp_path, monkeypatch, capsys):
    """The share command's tokens and candidates are the ReGATE callback's totals over one epoch of `fit`."""
    monkeypatch.chdir(Path(RECIPE).parents[1])  # the recipe's data paths are relative to the repository
    counts = main(["--config", RECIPE])
    out = capsys.readouterr().out
    assert f"answer share: {counts.answer_share:.3f}" in out and "candidate share" in out
    assert "over this recipe's 8 steps (5 sparse)" in out  # 2 epochs of 4 batches, W/C/F = 1/4/1
    assert 0 < counts.candidates < counts.targets < counts.tokens and counts.media_tokens > 0
    run = [
        "fit",
        "--config",
        RECIPE,
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks.ref_cache=null",
    ]
    cli = build_cli(run, save_config_callback=None)
    regate = next(c for c in cli.trainer.callbacks if isinstance(c, ReGATECallback))
    assert regate.totals[TOKENS] == counts.tokens and regate.totals[CANDIDATES] == counts.candidates
    assert counts.samples == len(cli.datamodule.train_set) - cli.datamodule.counter.total


def test_keep_ratio_and_min_keep_set_the_elided_count():
    labels = torch.full((2, 12), -100)
    labels[0, 2:12] = 5  # 10 answer tokens: 9 candidates
    labels[1, 10:12] = 5  # 2 answer tokens: 1 candidate
    batch = {"input_ids": torch.ones(2, 12, dtype=torch.long), "labels": labels}
    # p = 0.3: ceil(2.7) = 3 kept of 9, and max(min_keep=1, ceil(0.3)) = 1 kept of 1: 6 elided.
    assert count_batch(ShareCounts(keep_ratio=0.3), batch).elided == 6
    # min_keep 4: 4 kept of 9, and 1 of 1 (never more than there are): 5 elided.
    assert count_batch(ShareCounts(keep_ratio=0.3, min_keep=4), batch).elided == 5
    saving = expected_saving(count_batch(ShareCounts(), batch), Schedule(), 1000)
    assert saving["sparse_steps"] == count_sparse_steps(1000, Schedule())
    assert abs(saving["long_run"] - saving["sparse_step"] * 112 / 128) < 1e-12


def test_when_regate_pays_reads_the_measurements(tmp_path, capsys):
    """benchmarks/when_regate_pays.py: the throughput and time-to-accuracy results in one table and figure."""
    import importlib.util

    from script_loader import load_script

    script = load_script("benchmarks/when_regate_pays.py")
    assert script.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| CPU | 75 % | 0.5 | 0.581 | 0.627 | 42 % |" in out  # docs/results/throughput_cpu/throughput.json
    assert "| H200 | 39 % | 0.5 | 0.948 | 0.805 | 5 % |" in out
    assert "| shapes (the demo) | 27 % | 0.890 |" in out  # docs/results/time_to_accuracy/time_to_accuracy.json
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "when_regate_pays.png").stat().st_size > 10_000
