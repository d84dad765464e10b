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


def test_json_list_names_the_record_index(root):
    path = write_records(root / "list.json", [llava_record("ok", "video", "good0.mp4"), _no_assistant()], jsonl=False)
    with pytest.raises(DataError, match=r"list\.json#1 \(id no-answer\)"):
        read_records(path)
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
