"""VisualTokenElision on a real Lightning Trainer with tiny real HF models: schedule arithmetic, both
orders beside ReGATECallback, validation untouched, resume, logging."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from test_callback import module as regate_module
from test_callback import trainer, weights

from regate_lightning import MLLMModule, ReGATECallback, VisualTokenElision
from regate_lightning.cli import build_cli
from regate_lightning.keys import KEEP_MASK, VISUAL_CUM_KEPT_VISUAL_TOKENS, VISUAL_KEPT_FRAC
from regate_lightning.schedule import Schedule, expected_kept_fraction
from regate_lightning.testing import tiny
from regate_lightning.testing.datamodule import RandomDataModule


def module(factory=tiny.tiny_llava_next_video) -> MLLMModule:
    return regate_module(factory)


class MaskRecorder(Callback):
    """Records the keep mask the model runs with (placed after the elision callbacks), and checks evaluation."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor | None] = []
        self.eval_masks = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mask = batch.get(KEEP_MASK)
        self.masks.append(None if mask is None else mask.clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_masks += KEEP_MASK in batch


def test_kept_visual_share_matches_the_schedule():
    schedule = Schedule(warmup_steps=3, cycle_steps=8, full_steps=2)
    callback = VisualTokenElision(keep_ratio=0.5, warmup_steps=3, cycle_steps=8, full_steps=2, min_keep=0)
    steps = 21
    # 2 frames x 4 tokens: 8 visual tokens per sample, so p * n is whole in every sparse step.
    data = RandomDataModule(num_samples=8, batch_size=2, num_frames=2, prompt_len=4, answer_len=8)
    trainer(steps, [callback], max_epochs=100).fit(module(), data)
    measured = callback.totals["visual_kept"] / callback.totals["visual"]
    expected = expected_kept_fraction(steps, schedule, 0.5)
    print(f"kept visual share over {steps} steps: measured {measured:.6f}, schedule {expected:.6f}")
    assert measured == pytest.approx(expected, abs=1e-12)
    assert callback.totals["visual"] == steps * 2 * 8
    assert (
        callback.totals["tokens"] - callback.totals["active"]
        == callback.totals["visual"] - callback.totals["visual_kept"]
    )


@pytest.mark.parametrize(
    "factory", [tiny.tiny_llava_next_video, tiny.tiny_qwen2_vl], ids=["llava_next_video", "qwen2_vl"]
)
def test_either_order_beside_regate_trains_the_same(factory):
    data = {"num_samples": 8, "batch_size": 2, "num_frames": 2, "answer_len": 12}
    schedule = {"warmup_steps": 1, "cycle_steps": 3, "full_steps": 1}
    runs = []
    for visual_first in (True, False):
        pl.seed_everything(0)
        m = module(factory)
        visual = VisualTokenElision(keep_ratio=0.5, selection="temporal", **schedule)
        regate = ReGATECallback(keep_ratio=0.5, **schedule)
        recorder = MaskRecorder()
        order = [visual, regate] if visual_first else [regate, visual]
        trainer(5, [*order, recorder], limit_val_batches=1, val_check_interval=2).fit(m, RandomDataModule(**data))
        runs.append((weights(m), recorder, visual, regate))
    (wa, ra, va, ga), (wb, rb, vb, gb) = runs
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(ra.masks) == 5 and all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(ra.masks, rb.masks, strict=True)
    )
    sparse = [m for m in ra.masks if m is not None]
    assert len(sparse) == 2  # steps 2 and 3 of W=1, C=3, F=1 (steps 0, 1 and 4 are full)
    assert va.totals == vb.totals and ga.totals == gb.totals
    assert ga.totals["active"] == va.totals["active"] < va.totals["tokens"]
    # Both elided: visual tokens (visual_kept < visual) and answer tokens (kept < candidates), in the same steps.
    assert va.totals["visual_kept"] < va.totals["visual"] and ga.totals["kept"] < ga.totals["candidates"]
    assert ra.eval_masks == 0 and rb.eval_masks == 0, "validation never sees a keep mask"


def test_resume_equals_no_interruption(tmp_path):
    def run(max_epochs: int, ckpt: str | None = None, save: bool = False):
        pl.seed_everything(0)
        m = module()
        cb = VisualTokenElision(keep_ratio=0.5, selection="random", warmup_steps=1, cycle_steps=3, full_steps=1)
        extra = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)] if save else []
        t = trainer(-1, [cb, *extra], enable_checkpointing=save, max_epochs=max_epochs)
        t.fit(m, RandomDataModule(num_samples=8, batch_size=4, num_frames=2, shuffle=False), ckpt_path=ckpt)
        return m, cb

    full_model, full_cb = run(3)
    run(2, save=True)
    resumed_model, resumed_cb = run(3, ckpt=str(tmp_path / "last.ckpt"))
    assert resumed_cb.totals == full_cb.totals and full_cb.totals["visual_kept"] < full_cb.totals["visual"]
    a, b = weights(full_model), weights(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_is_versioned_and_warns_on_other_arguments():
    state = VisualTokenElision(keep_ratio=0.5).state_dict()
    assert state["version"] == 1 and set(state["totals"]) == {"active", "tokens", "visual", "visual_kept"}
    with pytest.raises(ValueError, match="VisualTokenElision state has version 0"):
        VisualTokenElision().load_state_dict({**state, "version": 0})
    with pytest.warns(UserWarning, match="`keep_ratio` saved 0.5, now 0.25"):
        VisualTokenElision(keep_ratio=0.25).load_state_dict(state)


def test_logs_the_visual_share(tmp_path):
    callback = VisualTokenElision(keep_ratio=0.25, warmup_steps=0, full_steps=0, selection="uniform")
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer(2, [callback], logger=logger, log_every_n_steps=1).fit(
        module(), RandomDataModule(num_samples=4, batch_size=2, num_frames=4)
    )
    metrics = trainer_metrics(tmp_path)
    assert metrics[VISUAL_KEPT_FRAC] == pytest.approx(0.25)
    assert metrics[VISUAL_CUM_KEPT_VISUAL_TOKENS] == callback.totals["visual_kept"] == 2 * 2 * 4


def trainer_metrics(folder) -> dict[str, float]:
    import csv

    [path] = list(folder.rglob("metrics.csv"))
    last: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return last


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("temporal", "TemporalSelection(whole_frames=False)"),
        ("uniform", "UniformSelection()"),
        ("random", "RandomSelection()"),
        (
            {"class_path": "regate_lightning.visual.TemporalSelection", "init_args": {"whole_frames": True}},
            "TemporalSelection(whole_frames=True)",
        ),
    ],
)
def test_visual_selection_from_yaml(tmp_path, selection, expected):
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "debug_regate.yaml").read_text())
    config["trainer"].update(logger=False, enable_progress_bar=False, enable_model_summary=False)
    visual = {"class_path": "regate_lightning.VisualTokenElision", "init_args": {"selection": selection}}
    config["trainer"]["callbacks"].insert(0, visual)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, VisualTokenElision)]
    assert repr(callback.policy.selection) == expected
