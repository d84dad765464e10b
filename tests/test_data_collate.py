"""Collation: padding, keys, and a max_length policy that never cuts visual tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import tokenizer

from regate_lightning.data import (
    ChatRenderer,
    ChoiceRecord,
    Collator,
    DataError,
    Media,
    MultipleChoiceDataset,
    SkipCounter,
    Turn,
    VisionSpec,
    fit_length,
)
from regate_lightning.evaluation import choose_options
from regate_lightning.keys import (
    ANSWER_IDX,
    IGNORE_INDEX,
    INPUT_IDS,
    NUM_OPTIONS,
    OPTION_IDX,
    PIXEL_VALUES_VIDEOS,
    QUESTION_IDX,
    SAMPLE_IDX,
    TASK,
)
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
    assert batch["pixel_values"].shape == (16, 3 * 2 * 8 * 8) and batch["image_grid_thw"].tolist() == [[1, 4, 4]]
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
            assert torch.equal(out.input_ids, sample.input_ids[: len(out)])  # a prefix: only text after is cut
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


# ------------------------------------------------------------------------------------------------
# Issue 11: whole questions (item 2), clips of different lengths (item 8), over-long samples named (item 10).


def _question(qwen, options: list[str], answer: int = 0):
    spec, renderer = qwen
    image = spec.process_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    record = ChoiceRecord(
        "q7", Media("image", Path("x.png")), "What colour?", tuple(options), answer, "colour", "mc.jsonl:3 (id q7)"
    )
    dataset = MultipleChoiceDataset([record], renderer)
    samples = []
    for j, option in enumerate(options):
        sample = renderer.render(
            [Turn("user", dataset.question_text(record)), Turn("assistant", option)],
            [image],
            end_of_turn=False,
            index=0,
            source=record.source,
        )
        sample.extras = {QUESTION_IDX: 0, OPTION_IDX: j, ANSWER_IDX: answer, NUM_OPTIONS: len(options), TASK: 0}
        samples.append(sample)
    return samples


def test_a_question_is_scored_with_all_its_options_or_not_at_all(qwen):
    """An option longer than max_length drops its whole question (once counted), never leaving the others to
    be scored on their own: a random model would score 1.0 on the question's survivors."""
    long_option = "red " * 40
    short = _question(qwen, ["red", "blue"])
    overlong = _question(qwen, ["green", long_option], answer=1)
    max_length = max(len(s) for s in short)
    counter = SkipCounter()
    counter.track(2)
    collate = Collator(0, max_length=max_length, overlong="skip", counter=counter)
    batch = collate([short, overlong])
    assert batch[OPTION_IDX].tolist() == [0, 1] and batch[NUM_OPTIONS].tolist() == [2, 2]
    assert counter.counts()["overlong"] == 1 and counter.records()["overlong"] == 1
    assert collate([overlong]) is None
    # Scoring refuses a question that lacks an option, whoever collated the batch.
    partial = Collator(0)([short[0]])
    with pytest.raises(ValueError, match="has 1 of its 2 options"):
        choose_options(torch.zeros(1, partial[INPUT_IDS].shape[1]), partial)


def test_clips_of_different_lengths_batch_and_match_per_sample_runs():
    """fps sampling: clips of 2 and 3 frames in one batch give each sample the logits it gets alone."""
    for factory in (tiny.tiny_llava_next_video, tiny.tiny_video_llava):
        model = factory().eval()
        spec = VisionSpec.from_model(model)
        renderer = ChatRenderer(tokenizer(), spec)
        gen = torch.Generator().manual_seed(0)
        samples = []
        for i, frames in enumerate((2, 3, 2)):
            clip = torch.randint(0, 256, (frames, 3, *spec.size), generator=gen, dtype=torch.uint8)
            turns = [Turn("user", "<video>\nWhat is moving?"), Turn("assistant", "Two red circles.")]
            samples.append(renderer.render(turns, [spec.process_video(clip)], sample_idx=i))
        collate = Collator(tokenizer())
        batch = collate(samples)
        assert batch[PIXEL_VALUES_VIDEOS].shape[:2] == (1, 7)  # the frames of all three clips, in order
        inputs = {k: v for k, v in batch.items() if k != SAMPLE_IDX}
        with torch.no_grad():
            joined = model(**inputs).logits
            for row, sample in enumerate(samples):
                alone = collate([sample])
                logits = model(**{k: v for k, v in alone.items() if k != SAMPLE_IDX}).logits
                n = len(sample)
                assert torch.allclose(joined[row, :n], logits[0], atol=1e-5), (factory.__name__, row)
        # A batch of equal lengths is stacked as HF's processors stack it.
        equal = collate([samples[0], samples[2]])
        assert equal[PIXEL_VALUES_VIDEOS].shape[:2] == (2, 2)


def test_overlong_raise_names_file_line_and_record(qwen):
    sample = _question(qwen, ["red " * 40, "blue"])[0]
    with pytest.raises(DataError, match=r"^mc\.jsonl:3 \(id q7\): \d+ tokens > max_length 20"):
        Collator(0, max_length=20, overlong="raise")([sample])


# ------------------------------------------------------------------------------------------------
# Issue 19: a question is never truncated (item 3); a truncated training sample is counted and named (item 5).


def test_a_question_is_never_truncated_left_out_under_truncate_and_skip_refused_under_raise(qwen):
    """Under the default `overlong: truncate` an option that does not fit used to be cut and scored."""
    short = _question(qwen, ["red", "blue"])
    overlong = _question(qwen, ["green", "red " * 40], answer=1)
    max_length = max(len(s) for s in short)
    assert max(len(s) for s in overlong) > max_length > overlong[0].visual_end  # truncate could cut it
    for policy in ("truncate", "skip"):
        counter = SkipCounter()
        counter.track(1)
        collate = Collator(0, max_length=max_length, overlong=policy, counter=counter)
        assert collate([overlong]) is None, policy
        assert counter.records()["overlong"] == 1 and counter.truncated() == 0, policy
        assert collate([short])[OPTION_IDX].tolist() == [0, 1]
    with pytest.raises(DataError, match=r"^mc\.jsonl:3 \(id q7\): \d+ tokens > max_length"):
        Collator(0, max_length=max_length, overlong="raise")([overlong])


def test_a_truncated_training_sample_is_counted_once_and_the_first_named(qwen, caplog):
    sample = _sample(qwen, 0, late_image=False)
    sample.index, sample.source = 4, "train.jsonl:5 (id long-answer)"
    counter = SkipCounter()
    counter.track(5)
    collate = Collator(0, max_length=len(sample) - 3, overlong="truncate", counter=counter)
    with caplog.at_level("DEBUG", logger="regate_lightning.data"):
        for _ in range(2):  # two epochs: one record
            assert collate([sample])[INPUT_IDS].shape[1] == len(sample) - 3
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if "truncated" in r.getMessage()]
    assert [level for level, _ in logged] == ["WARNING", "DEBUG"]
    assert f"train.jsonl:5 (id long-answer): {len(sample)} tokens > max_length {len(sample) - 3}" in logged[0][1]
    assert counter.truncated() == 1 and counter.total == 0  # one record, kept (not skipped)
