"""Collation: padding, keys, and a max_length policy that never cuts visual tokens."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import tokenizer

from regate_lightning.data import ChatRenderer, Collator, DataError, Turn, VisionSpec, fit_length
from regate_lightning.keys import IGNORE_INDEX
from regate_lightning.testing import tiny


@pytest.fixture(scope="module")
def qwen():
    spec = VisionSpec.from_model(tiny.tiny_qwen2_vl(), size=(32, 32))
    return spec, ChatRenderer(tokenizer(), spec)


def _sample(qwen, idx=0, late_image=True):
    spec, renderer = qwen
    image = spec.process_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    turns = [
        Turn("user", "What is moving in the video?"),
        Turn("assistant", "Two red circles."),
        Turn("user", "<image>\nAnd here?" if late_image else "And here?"),
        Turn("assistant", "The video shows three shapes in the picture."),
    ]
    return renderer.render(turns, [image] if late_image else [], sample_idx=idx)


def test_padding_mask_and_labels(qwen):
    short, long = _sample(qwen, 0, late_image=False), _sample(qwen, 1)
    batch = Collator(tokenizer())([long, short])
    assert batch["input_ids"].shape == (2, len(long))
    n = len(short)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(long) - n)
    assert (batch["input_ids"][1, n:] == tokenizer().pad_token_id).all()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert batch["mm_token_type_ids"][0].tolist() == long.token_types.tolist()
    assert batch["pixel_values"].shape == (16, 3 * 2 * 8 * 8) and batch["image_grid_thw"].tolist() == [
        [1, 4, 4]
    ]
    padded = Collator(0, pad_to_multiple_of=16)([short])
    assert padded["input_ids"].shape[1] % 16 == 0


def test_max_length_never_cuts_visual_tokens(qwen):
    spec, _ = qwen
    sample = _sample(qwen)
    visual = int((sample.token_types != 0).sum())
    assert sample.input_ids[sample.visual_end - 1] == spec.vision_end_token_id
    outcomes = set()
    for max_length in range(2, len(sample) + 2):
        for policy in ("truncate", "skip", "raise"):
            try:
                out = fit_length(sample, max_length, policy)
            except DataError as err:
                assert policy == "raise" and err.reason == "overlong" and max_length < len(sample)
                outcomes.add("raised")
                continue
            if out is None:
                assert max_length < len(sample)
                outcomes.add("skipped")
                continue
            assert len(out) <= max_length
            assert torch.equal(
                out.input_ids, sample.input_ids[: len(out)]
            )  # a prefix: only text after is cut
            assert int((out.token_types != 0).sum()) == visual and len(out) >= sample.visual_end
            assert (out.labels[1:] != IGNORE_INDEX).any()
            outcomes.add("truncated" if len(out) < len(sample) else "kept")
    assert outcomes == {"raised", "skipped", "truncated", "kept"}


def test_overlong_samples_are_counted_and_the_rest_kept(qwen):
    sample, other = _sample(qwen, 0), _sample(qwen, 1, late_image=False)
    too_short = sample.visual_end - 1  # cannot keep the image
    collate = Collator(0, max_length=too_short, overlong="truncate")
    batch = collate([sample, other])
    assert batch["sample_idx"].tolist() == [1] and collate.counter.counts()["overlong"] == 1
    assert batch["input_ids"].shape[1] == too_short
    assert "pixel_values" not in batch  # the image went with its sample
    with pytest.raises(DataError, match="max_length"):
        Collator(0, max_length=too_short, overlong="raise")([sample])


def test_collator_arguments_are_validated():
    with pytest.raises(ValueError, match="overlong"):
        Collator(0, max_length=10, overlong="cut")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        Collator(0, max_length=1)
    no_pad = type("Tok", (), {"pad_token_id": None, "eos_token_id": None})()
    with pytest.raises(ValueError, match="pad"):
        Collator(no_pad)
