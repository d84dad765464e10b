"""Bad input: a documented error naming the record with ``raise``, a counted skip with ``skip``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from data_fixtures import llava_record, messages_record, tokenizer, write_records, write_video
from torch.utils.data import DataLoader

from regate_lightning.data import (
    ChatRenderer,
    Collator,
    ConversationDataset,
    DataError,
    FrameSampling,
    MediaError,
    SkipCounter,
    VisionSpec,
    read_choice_records,
    read_records,
)
from regate_lightning.data.datasets import sample_key
from regate_lightning.testing import tiny

FRAMES = FrameSampling(num_frames=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    write_video(root / "good0.mp4", seed=0)
    write_video(root / "good1.mp4", seed=1)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing useful" * 10)
    return root


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(tokenizer(), VisionSpec.from_model(tiny.tiny_llava_next_video()))


def _no_assistant():
    record = llava_record("no-answer", "video", "good0.mp4")
    record["conversations"] = record["conversations"][:1]
    return record


def _mismatch():
    record = llava_record("two-markers", "video", "good0.mp4")
    record["conversations"][0]["value"] = "<video>\n<video>\nWhat is moving?"
    return record


def _answer_with_marker():
    record = llava_record("marker-in-answer", "video", "good0.mp4")
    record["conversations"][0]["value"] = "What is moving?"
    record["conversations"][1]["value"] = "<video> this"
    return record


def _messages_without_path():
    record = messages_record("no-path", "video", "good0.mp4")
    del record["messages"][0]["content"][0]["path"]
    return record


def _empty_answer():
    """Issue 19, item 4: a multi-turn record with one empty answer trained `[ ][</s>]` without a word."""
    record = llava_record("empty-answer", "video", "good0.mp4", turns=2)
    record["conversations"][1]["value"] = "  "
    return record


def _answer_first():
    record = llava_record("answer-first", "video", "good0.mp4")
    record["conversations"].insert(0, {"from": "gpt", "value": "Hello."})
    return record


# (bad line or record, reason, a fragment of the message that names the fix)
BAD = [
    ('{"id": "broken", "video": "good0.mp4", "conversations": [', "bad_json", "not valid JSON"),
    (_no_assistant(), "no_assistant", "no assistant turn"),
    (_mismatch(), "placeholder_mismatch", "2 <video> placeholder(s)"),
    (_answer_with_marker(), "placeholder_mismatch", "media belong in user turns"),
    (llava_record("gone", "video", "missing.mp4"), "missing_media", "does not exist"),
    (messages_record("msg-gone", "video", "missing.mp4"), "missing_media", "does not exist"),
    (_messages_without_path(), "bad_record", "without a `path`"),
    ({"id": "neither", "video": "good0.mp4"}, "bad_record", "neither `conversations`"),
    (_answer_first(), "bad_record", "must start with a user turn"),
    (_empty_answer(), "empty_answer", "turn 1 (counted from 0) is an assistant turn without text"),
]


@pytest.mark.parametrize(("bad", "reason", "fix"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_raise_names_the_record_and_skip_counts_it(root, renderer, bad, reason, fix):
    good = [llava_record("ok0", "video", "good0.mp4"), messages_record("ok1", "video", "good1.mp4")]
    path = write_records(root / f"bad_{reason}.jsonl", [good[0], bad, good[1]])
    with pytest.raises(DataError, match=re.escape(fix)) as info:
        ConversationDataset(path, renderer, FRAMES)
    message = str(info.value)
    assert info.value.reason == reason
    assert f"bad_{reason}.jsonl:2" in message  # file and line
    if isinstance(bad, dict):
        assert bad["id"] in message

    dataset = ConversationDataset(path, renderer, FRAMES, on_error="skip")
    assert [r.id for r in dataset.records] == ["ok0", "ok1"]
    assert dataset.counter.counts()[reason] == 1 and dataset.counter.total == 1


def test_json_list_names_the_record_by_its_place_counted_from_one(root):
    """Issue 19, item 9: `#1` named the second record of a list, where `:1` names the first line of JSONL."""
    path = write_records(root / "list.json", [llava_record("ok", "video", "good0.mp4"), _no_assistant()], jsonl=False)
    with pytest.raises(DataError, match=r"list\.json, record 2 of the list \(id no-answer\): no assistant"):
        read_records(path)
    assert [r.key for r in read_records(path, on_error="skip")] == ["id ok"]  # identities are unchanged
    bare = [{k: v for k, v in llava_record("x", "video", "good0.mp4").items() if k != "id"}] * 2
    keys = [r.key for r in read_records(write_records(root / "bare.json", bare, jsonl=False))]
    assert keys == ["at bare.json#0", "at bare.json#1"]  # the sample keys' identity: the index, from 0
    (root / "broken.json").write_text('[{"id": 1}, {', encoding="utf-8")
    with pytest.raises(DataError, match="use JSONL"):  # nothing to skip to in a broken JSON list
        read_records(root / "broken.json", on_error="skip")


def test_corrupt_media_raise_in_getitem_names_record_and_file(root, renderer):
    path = write_records(root / "corrupt.jsonl", [llava_record("bad-media", "video", "corrupt.mp4")])
    dataset = ConversationDataset(path, renderer, FRAMES)  # exists, so the eager checks pass
    with pytest.raises(MediaError, match=r"corrupt\.jsonl:1 \(id bad-media\).*corrupt\.mp4"):
        dataset[0]


def test_corrupt_media_is_dropped_and_the_rest_of_the_batch_is_intact(root, renderer):
    records = [
        llava_record("ok0", "video", "good0.mp4"),
        llava_record("bad", "video", "corrupt.mp4"),
        messages_record("ok1", "video", "good1.mp4"),
    ]
    path = write_records(root / "mixed.jsonl", records)
    dataset = ConversationDataset(path, renderer, FRAMES, on_error="skip")
    collate = Collator(tokenizer())
    batch = collate([dataset[i] for i in range(3)])
    assert batch["sample_idx"].tolist() == [sample_key("id ok0"), sample_key("id ok1")] == dataset.keys[::2]
    assert dataset.counter.counts()["unreadable_media"] == 1
    alone = collate([dataset[0]]), collate([dataset[2]])
    for row, single in enumerate(alone):
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :n], single["input_ids"][0])
        assert torch.equal(batch["labels"][row, :n], single["labels"][0])
        assert torch.equal(batch["pixel_values_videos"][row], single["pixel_values_videos"][0])
    model = tiny.tiny_llava_next_video()
    loss = model(**{k: v for k, v in batch.items() if k != "sample_idx"}).loss
    assert torch.isfinite(loss)
    assert collate([None, None]) is None  # nothing left: the module skips the step


def test_skip_counts_reach_the_main_process_from_workers(root, renderer):
    records = [llava_record(f"ok{i}", "video", f"good{i % 2}.mp4") for i in range(4)]
    records[1] = llava_record("bad", "video", "corrupt.mp4")
    records[3] = llava_record("bad2", "video", "corrupt.mp4")
    path = write_records(root / "workers.jsonl", records)
    counter = SkipCounter()
    dataset = ConversationDataset(path, renderer, FRAMES, on_error="skip", counter=counter)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=Collator(tokenizer(), counter=counter))
    seen = [int(i) for batch in loader for i in batch["sample_idx"]]
    assert seen == [sample_key("id ok0"), sample_key("id ok2")]
    assert counter.counts()["unreadable_media"] == 2


def test_skip_counter_is_validated_and_reports():
    counter = SkipCounter()
    counter.skip(DataError("x", "overlong"))
    assert "overlong" in repr(counter)
    with pytest.raises(ValueError, match="reason"):
        DataError("x", "nonsense")
    with pytest.raises(ValueError, match="on_error"):
        read_records("whatever.json", on_error="ignore")  # type: ignore[arg-type]


def test_skip_is_logged(root, renderer, caplog):
    good = llava_record("ok", "video", "good0.mp4")
    path = write_records(root / "logged.jsonl", [json.dumps(_no_assistant()), json.dumps(_no_assistant()), good])
    with caplog.at_level("DEBUG", logger="regate_lightning.data"):
        ConversationDataset(path, renderer, FRAMES, on_error="skip")
    levels = [r.levelname for r in caplog.records if "no_assistant" in r.getMessage()]
    assert levels == ["WARNING", "DEBUG"]  # the first of a reason warns, later ones go to DEBUG


# ------------------------------------------------------------------------------------------------
# Issue 19: equal options (item 2), byte-order marks (item 8).


def test_equal_options_are_refused_or_skipped_and_a_tie_counts_as_wrong(root):
    """Options ["a", "a"] scored val/acc 1.0 on a random model: the tie went to option 0, the answer."""
    from regate_lightning.evaluation import ChoiceAccuracy, choose_options

    question = {"id": "q-same", "video": "good0.mp4", "question": "Which?", "answer": 0}
    records = [{**question, "options": ["a", " a"]}, {**question, "id": "q-ok", "options": ["a", "b"]}]
    path = write_records(root / "same_options.jsonl", records)
    with pytest.raises(DataError, match=r"same_options\.jsonl:1 \(id q-same\): options 0 and 1 are equal") as info:
        read_choice_records(path)
    assert info.value.reason == "duplicate_options"
    counter = SkipCounter()
    assert [r.id for r in read_choice_records(path, on_error="skip", counter=counter)] == ["q-ok"]
    assert counter.counts()["duplicate_options"] == 1
    # Equal likelihoods (any two options a model cannot tell apart): no option is predicted.
    batch = {
        "question_idx": torch.tensor([0, 0, 1, 1]),
        "option_idx": torch.tensor([0, 1, 0, 1]),
        "answer_idx": torch.tensor([0, 0, 1, 1]),
        "task": torch.tensor([0, 0, 0, 0]),
    }
    token_loss = torch.tensor([[0.7, 0.2], [0.2, 0.7], [0.5, 0.5], [0.1, 0.2]])  # question 0 ties
    preds, answers, tasks = choose_options(token_loss, batch)
    assert preds.tolist() == [-1, 1] and answers.tolist() == [0, 1]
    accuracy = ChoiceAccuracy(["t"])
    accuracy.update(preds, answers, tasks)
    assert float(accuracy.compute()["all"]) == 0.5  # the tie is wrong, the clear answer right


@pytest.mark.parametrize("jsonl", [False, True], ids=["json-list", "jsonl"])
def test_a_byte_order_mark_is_read_as_one(root, jsonl):
    """A 6-record JSON list with a UTF-8 BOM was read as JSONL: "every one of its 94 records was skipped"."""
    records = [llava_record(f"bom{i}", "video", "good0.mp4") for i in range(6)]
    path = write_records(root / f"bom{int(jsonl)}.json", records, jsonl=jsonl)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.id for r in read_records(path, on_error="skip")] == [f"bom{i}" for i in range(6)]
