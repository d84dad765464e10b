"""The synthetic demo set: determinism, formats, visual words, tokenizer, multiple-choice batches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from regate_lightning.data import (
    ChatRenderer,
    Collator,
    ConversationDataset,
    MultipleChoiceDataset,
    VisionSpec,
    classify_words,
    decode_video,
    ensure_synthetic,
    read_choice_records,
    synthetic_tokenizer,
    visual_words,
)
from regate_lightning.data.synthetic import _MC_QUESTIONS, _QA_TEMPLATES, COLOURS, COUNTS, DIRECTIONS, SHAPES, TASKS
from regate_lightning.keys import IGNORE_INDEX
from regate_lightning.testing import tiny


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("syn_a"), num_train=12, num_val=8)


def test_generation_is_deterministic_and_idempotent(synthetic, tmp_path):
    again = ensure_synthetic(tmp_path / "syn_b", num_train=12, num_val=8)
    assert synthetic.train.read_bytes() == again.train.read_bytes()
    assert synthetic.val.read_bytes() == again.val.read_bytes()
    for record in json.loads(synthetic.train.read_text()) + json.loads(synthetic.val.read_text()):
        a = decode_video(synthetic.root / record["video"], num_frames=8)
        b = decode_video(again.root / record["video"], num_frames=8)
        assert a.shape == (8, 3, 64, 64) and torch.equal(a, b)
    stamp = again.train.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path / "syn_b", num_train=12, num_val=8) == again
    assert again.train.stat().st_mtime_ns == stamp  # reused, not rewritten
    other = ensure_synthetic(tmp_path / "syn_b", num_train=12, num_val=8, seed=1)  # other params: regenerated
    assert other.train.read_bytes() != synthetic.train.read_bytes()


def test_clip_shows_its_colour(synthetic):
    record = json.loads(synthetic.train.read_text())[0]
    frames = decode_video(synthetic.root / record["video"], num_frames=8).float()
    colour = torch.tensor(COLOURS[record["clip"]["colour"]], dtype=torch.float32).view(3, 1, 1)
    close = ((frames - colour).abs().amax(1) < 40).float().sum((1, 2))  # shape pixels per frame
    assert (close > 20).all()


def test_train_answers_mix_visual_and_template_words(synthetic):
    records = json.loads(synthetic.train.read_text())
    visual = visual_words()
    for record in records:
        conv = record["conversations"]
        assert conv[0]["value"].startswith("<video>\n") and [t["from"] for t in conv][::2] == ["human"] * (
            len(conv) // 2
        )
        clip = record["clip"]
        truth = {**{t: clip[t] for t in ("colour", "shape", "direction")}, "count": COUNTS[clip["count"] - 1]}
        task = next(t for t in TASKS if conv[0]["value"] == f"<video>\n{_MC_QUESTIONS[t][0]}")
        assert conv[1]["value"] == truth[task]  # the short turn: the validation question, the option's word
        assert len(conv) in (4, 6) and not conv[2]["value"].startswith("<video>")
        answer = conv[3]["value"]
        words = classify_words(answer)
        assert 15 <= len(words) <= 30
        needed = {w.lower() for w, v in words if v}
        assert clip["colour"] in needed and clip["direction"] in needed and COUNTS[clip["count"] - 1] in needed
        assert sum(not v for _, v in words) > len(needed)  # most words are predictable from text
    for _, template in _QA_TEMPLATES:  # template words are never visual; only the slots are
        assert not any(needs_video for _, needs_video in classify_words(re.sub(r"\{\w+\}", "", template)))
    assert {"red", "circles", "left", "three"} <= visual and "video" not in visual


def test_validation_split_format(synthetic):
    raw = json.loads(synthetic.val.read_text())
    assert [r["task"] for r in raw] == [TASKS[i % 4] for i in range(8)]
    vocab = {
        "colour": set(COLOURS),
        "shape": {*SHAPES, "star"},
        "direction": set(DIRECTIONS),
        "count": {*COUNTS, "four"},
    }
    for r in raw:
        assert set(r) == {"id", "video", "task", "question", "options", "answer", "clip"}
        assert len(r["options"]) == 4 == len(set(r["options"])) and set(r["options"]) <= vocab[r["task"]]
        truth = {
            "colour": r["clip"]["colour"],
            "shape": r["clip"]["shape"],
            "direction": r["clip"]["direction"],
            "count": COUNTS[r["clip"]["count"] - 1],
        }[r["task"]]
        assert r["options"][r["answer"]] == truth
    records = read_choice_records(synthetic.val)
    assert records[0].media.path.is_file() and records[0].options == tuple(raw[0]["options"])


def test_tokenizer_is_trained_once_and_cached(synthetic):
    tok = synthetic_tokenizer(synthetic)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<image>", "<video>"]) == [3, 4] and len(tok) <= 500
    text = "The video shows two red circles moving left."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        == "<s>USER: Hi ASSISTANT:"
    )
    again = synthetic_tokenizer(synthetic)  # loaded from the cache folder
    assert again.get_vocab() == tok.get_vocab() and again.chat_template == tok.chat_template


def test_train_and_multiple_choice_batches_run_on_a_tiny_student(synthetic):
    tok = synthetic_tokenizer(synthetic)
    model = tiny.tiny_qwen2_vl()
    renderer = ChatRenderer(tok, VisionSpec.from_model(model))  # default size 64x64 = the clips'
    train = ConversationDataset(synthetic.train, renderer)
    collate = Collator(tok)
    batch = collate([train[0], train[1]])
    assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "sample_idx"}).loss)

    mc = MultipleChoiceDataset(synthetic.val, renderer, list_options=True)
    assert mc.task_names == tuple(sorted(TASKS))
    batch = collate([mc[0], mc[1]])
    assert batch["question_idx"].tolist() == [0] * 4 + [1] * 4 == batch["sample_idx"].tolist()
    assert batch["option_idx"].tolist() == [0, 1, 2, 3] * 2
    assert batch["answer_idx"].tolist() == [mc.records[0].answer] * 4 + [mc.records[1].answer] * 4
    assert batch["task"].tolist() == [mc.task_names.index(r.task) for r in mc.records[:2] for _ in range(4)]
    for row in range(8):
        labels = batch["labels"][row]
        option = mc.records[row // 4].options[row % 4]
        # option text only, no </s>; the space before it may share a token with the prompt's ":"
        assert tok.decode(labels[labels != IGNORE_INDEX].tolist()).lstrip() == option
    logits = model(
        **{
            k: v
            for k, v in batch.items()
            if k not in ("sample_idx", "question_idx", "option_idx", "answer_idx", "task", "labels")
        }
    ).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------
# The second task: long descriptions (issue 22).


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("syn_d"), num_train=40, num_val=12, task="descriptions")


def _first_half_colours(root, record) -> tuple[float, float]:
    """Pixels of each group's colour in the first and the second half of the clip (8 frames)."""
    frames = decode_video(root / record["video"], num_frames=8).float()
    out = []
    for group, half in (("first", slice(0, 4)), ("second", slice(4, 8))):
        colour = torch.tensor(COLOURS[record["clip"][group]["colour"]], dtype=torch.float32).view(3, 1, 1)
        other = torch.tensor(COLOURS[record["clip"]["second" if group == "first" else "first"]["colour"]])
        close = ((frames[half] - colour).abs().amax(1) < 40).float().sum((1, 2))
        far = ((frames[half] - other.float().view(3, 1, 1)).abs().amax(1) < 40).float().sum((1, 2))
        out.append(float(close.min() - far.max()))
    return out[0], out[1]


def test_descriptions_are_long_mostly_predictable_and_state_the_clip(descriptions):
    from regate_lightning.data import synthetic_descriptions as d

    tok = synthetic_tokenizer(descriptions)
    assert len(tok) <= 766  # the student's 768 ids end with the two placeholders
    records = json.loads(descriptions.train.read_text())
    long_answers = [r for r in records if len(r["conversations"]) == 2 and len(r["conversations"][1]["value"]) > 40]
    short = [r for r in records if r not in long_answers]
    assert 0.6 <= len(long_answers) / len(records) <= 0.9 and short, "mostly descriptions, some short questions"
    counts = [0, 0]  # words that need the video, all words
    for record in long_answers:
        request, answer = (t["value"] for t in record["conversations"])
        assert request.removeprefix("<video>\n") in d._REQUESTS
        tokens = len(tok(answer, add_special_tokens=False)["input_ids"])
        prompt = len(tok.apply_chat_template([{"role": "user", "content": request}], tokenize=True, return_dict=False))
        share = (tokens + 1) / (tokens + 1 + prompt + 64)  # answer and </s> against 64 video tokens and the prompt
        assert 80 <= tokens <= 250 and 0.5 <= share <= 0.8, (tokens, share)
        clip = record["clip"]
        words = [w.lower() for w, _ in d.classify_words(answer)]
        for group in (clip["first"], clip["second"]):
            assert group["colour"] in words and group["direction"] in words
            assert {"slowly", "quickly", "slow"} & set(words)
        visual = sum(v for _, v in d.classify_words(answer))
        assert visual < 0.4 * len(words), "most words are predictable from the text"
        counts[0] += visual
        counts[1] += len(words)
    assert counts[0] < 0.3 * counts[1]
    for record in short:
        assert all(len(t["value"].split()) == 1 for t in record["conversations"][1::2])
    # Several phrasings and paragraph orders.
    assert len({r["conversations"][1]["value"].split(".")[0] for r in long_answers}) > 10


def test_descriptions_clips_show_the_groups_in_order(descriptions):
    for record in json.loads(descriptions.train.read_text())[:6]:
        first, second = _first_half_colours(descriptions.root, record)
        assert first > 0 and second > 0, "each half shows its own group's colour, not the other's"


def test_descriptions_validation_questions(descriptions):
    from regate_lightning.data import synthetic_descriptions as d

    raw = json.loads(descriptions.val.read_text())
    assert [r["task"] for r in raw] == [d.TASKS[i % len(d.TASKS)] for i in range(12)]
    for r in raw:
        clip = r["clip"]
        groups = [d.Group(**clip["first"]), d.Group(**clip["second"])]
        if r["task"] == "order":
            truth = clip["first"]["colour"]
            assert clip["second"]["colour"] in r["options"]
        else:
            group = next(g for g in groups if g.colour in r["question"])
            truth = group.answer(r["task"])
        assert r["options"][r["answer"]] == truth and len(set(r["options"])) == len(r["options"]) >= 2
    assert {r.task for r in read_choice_records(descriptions.val)} == set(d.TASKS)


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`task` must be one of \('shapes', 'descriptions'\), got 'captions'"):
        ensure_synthetic(tmp_path, num_train=2, num_val=1, task="captions")
