"""The media-reliance gap: swapping media between rows, and val/video_gap in a real Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from regate_lightning.elision import forward_active
from regate_lightning.families import resolve, vision_parts
from regate_lightning.keys import INPUT_IDS, media_gap_metric
from regate_lightning.module import MLLMModule
from regate_lightning.reliance import answer_rows, media_runs, swap_media
from regate_lightning.testing import RandomDataModule, tiny
from regate_lightning.testing.batches import random_batch

FACTORIES = [
    tiny.tiny_llava,
    tiny.tiny_llava_next_video,
    tiny.tiny_video_llava,
    tiny.tiny_qwen2_vl,
    tiny.tiny_qwen2_5_vl,
]


def _media(batch: dict, parts) -> tuple[str, torch.Tensor]:
    family = parts.family
    key = family.video_key or family.image_key
    return key, batch[key]


def _per_row(pixels: torch.Tensor, rows: int) -> list[torch.Tensor]:
    return list(pixels.chunk(rows))


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_swap_gives_each_row_the_next_rows_media_and_the_model_accepts_it(factory):
    model = factory()
    parts = resolve(model)
    batch = random_batch(model, batch_size=3, num_frames=2, seed=1)
    (swap,) = swap_media(batch, parts)
    key, pixels = _media(batch, parts)
    rows = _per_row(pixels, 3)
    assert swap.rows.tolist() == [0, 1, 2]
    assert torch.equal(swap.own[key], pixels)
    assert torch.equal(swap.own[INPUT_IDS], batch[INPUT_IDS])
    assert torch.equal(swap.swapped[key], torch.cat([rows[1], rows[2], rows[0]]))
    out = forward_active(model, swap.swapped)  # placeholder counts still match the features
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("factory", [tiny.tiny_llava_next_video, tiny.tiny_qwen2_vl], ids=lambda f: f.__name__)
def test_a_student_whose_features_ignore_the_media_has_a_gap_of_exactly_zero(factory):
    model = factory()
    parts = resolve(model)
    batch = random_batch(model, batch_size=4, num_frames=2, seed=2)
    (swap,) = swap_media(batch, parts)
    own = forward_active(model, swap.own).token_loss
    swapped = forward_active(model, swap.swapped).token_loss
    assert (swapped - own).nan_to_num().abs().max() > 1e-4  # a random projector passes the media through
    _, projector = vision_parts(parts)
    last = [m for p in projector for m in p.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()  # every media item now gives the same features (the bias)
    own = forward_active(model, swap.own).token_loss
    swapped = forward_active(model, swap.swapped).token_loss
    assert torch.equal(own.isnan(), swapped.isnan())
    assert float((swapped - own).nan_to_num().abs().max()) == 0.0


def test_only_chosen_rows_with_one_media_of_one_layout_are_swapped():
    model = tiny.tiny_llava_next_video()
    parts = resolve(model)
    batch = random_batch(model, batch_size=3, num_frames=2)
    (swap,) = swap_media(batch, parts, torch.tensor([True, False, True]))
    pixels = batch["pixel_values_videos"]
    assert swap.rows.tolist() == [0, 2]
    assert torch.equal(swap.swapped["pixel_values_videos"], pixels[[2, 0]])
    assert swap_media(batch, parts, torch.tensor([0])) == []  # one row alone has nobody to swap with


def test_qwen_rows_swap_only_with_rows_of_the_same_grid():
    model = tiny.tiny_qwen2_vl()
    parts = resolve(model)
    two = random_batch(model, batch_size=2, num_frames=2, seed=0)
    four = random_batch(model, batch_size=1, num_frames=4, seed=1)
    width = max(two[INPUT_IDS].shape[1], four[INPUT_IDS].shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    batch = {
        key: torch.cat([pad(two[key], v), pad(four[key], v)])
        for key, v in (("input_ids", 0), ("attention_mask", 0), ("labels", -100), ("mm_token_type_ids", 0))
    }
    batch["pixel_values_videos"] = torch.cat([two["pixel_values_videos"], four["pixel_values_videos"]])
    batch["video_grid_thw"] = torch.cat([two["video_grid_thw"], four["video_grid_thw"]])
    assert media_runs(batch[INPUT_IDS], model.config.video_token_id).tolist() == [1, 1, 1]
    (swap,) = swap_media(batch, parts)
    assert swap.rows.tolist() == [0, 1]  # the 4-frame row has no partner of its layout
    first, second = two["pixel_values_videos"].chunk(2)
    assert torch.equal(swap.swapped["pixel_values_videos"], torch.cat([second, first]))
    assert torch.isfinite(forward_active(model, swap.swapped).loss)


def test_answer_rows_pick_the_correct_option():
    batch = {"option_idx": torch.tensor([0, 1, 2, 0, 1]), "answer_idx": torch.tensor([2, 2, 2, 0, 0])}
    assert answer_rows(batch).tolist() == [False, False, True, True, False]
    assert answer_rows({"input_ids": torch.zeros(2, 3)}) is None


@pytest.mark.parametrize("media_gap", [True, False])
def test_validation_logs_the_video_gap(media_gap):
    module = MLLMModule(tiny.tiny_llava_next_video(), media_gap=media_gap)
    data = RandomDataModule(num_samples=8, batch_size=4, num_frames=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data, verbose=False)
    name = media_gap_metric("val", "video")
    assert (name in trainer.callback_metrics) == media_gap
    if media_gap:
        assert torch.isfinite(trainer.callback_metrics[name])
