"""ConversationDataModule with your own files under a real Trainer (issue 11, items 5, 6, 9 and 12)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_fixtures import iterate_with_an_empty_batch, llava_record, write_records, write_video

from regate_lightning import MLLMModule
from regate_lightning.data import ConversationDataModule, DataError, DataFile
from regate_lightning.keys import DATA_SKIPPED, DATA_SKIPPED_EPOCH
from regate_lightning.testing import tiny

TOKENIZER = "regate_lightning.testing.byte_tokenizer"


def fit(data: ConversationDataModule, root: Path, max_epochs: int = 1, **kwargs) -> tuple[pl.Trainer, list[dict]]:
    """Fit a tiny LLaVA-NeXT-Video on ``data``; the rows of its metrics.csv."""
    logger = pl.loggers.CSVLogger(root / "logs", name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        log_every_n_steps=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    module = MLLMModule(tiny.tiny_llava_next_video(hidden_size=32), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer.fit(module, data)
    with open(root / "logs" / "metrics.csv", encoding="utf-8") as handle:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(handle)]
    return trainer, rows


def mc(video: str, answer: str) -> dict:
    return {"video": video, "question": "What is moving?", "candidates": ["a circle", "a square"], "answer": answer}


def test_the_data_module_is_where_the_docs_say():
    import regate_lightning.data as data

    assert data.ConversationDataModule is ConversationDataModule and "ConversationDataModule" in data.__all__


def test_each_file_has_its_own_media_folder_and_validation_files_name_their_tasks(tmp_path):
    """Training clips in one folder, each MVBench-style task file's clips (or frame folders) in its own."""
    for folder, name in (("train_media", "t.mp4"), ("task_a_media", "a.mp4"), ("task_b_media", "b.mp4")):
        (tmp_path / folder).mkdir()
        write_video(tmp_path / folder / name, num_frames=4)
    (tmp_path / "ann").mkdir()
    train = write_records(tmp_path / "ann" / "train.jsonl", [llava_record(f"t{i}", "video", "t.mp4") for i in range(2)])
    task_a = write_records(tmp_path / "ann" / "action_sequence.json", [mc("a.mp4", "a circle")], jsonl=False)
    task_b = write_records(tmp_path / "ann" / "object_shuffle.json", [mc("b.mp4", "a square")] * 2, jsonl=False)
    data = ConversationDataModule(
        DataFile(str(train), media_root=str(tmp_path / "train_media")),
        [
            DataFile(str(task_a), media_root=str(tmp_path / "task_a_media")),
            DataFile(str(task_b), media_root=str(tmp_path / "task_b_media")),
        ],
        tokenizer=TOKENIZER,
        num_frames=2,
        batch_size=2,
    )
    trainer, _ = fit(data, tmp_path)
    assert data.task_names == ["action_sequence", "object_shuffle"]
    metrics = set(trainer.callback_metrics)
    assert {"val/acc", "val/acc_action_sequence", "val/acc_object_shuffle"} <= metrics
    assert "val/acc_" not in metrics
    assert data.val_set is not None and len(data.val_set) == 3


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", r"the file is empty"),
        ("[]", r"the file holds an empty JSON list"),
        (
            json.dumps(llava_record("x", "video", "gone.mp4")) + '\n{"broken\n',
            r"every one of its 2 records was skipped \(bad_json 1, missing_media 1\)",
        ),
    ],
    ids=["empty", "empty-list", "all-skipped"],
)
def test_a_file_without_usable_records_is_named_with_the_reason(tmp_path, content, why):
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    data = ConversationDataModule(str(path), tokenizer=TOKENIZER, on_error="skip")
    with pytest.raises(DataError, match=f"{path}: {why}"):
        fit(data, tmp_path)
    good = write_records(tmp_path / "ok.jsonl", [llava_record("ok", "video", "v.mp4")])
    write_video(tmp_path / "v.mp4", num_frames=2)
    data = ConversationDataModule(str(good), val_file=str(path), tokenizer=TOKENIZER, on_error="skip")
    head = why.split(r" \(")[0]  # a validation file too (whose records fail other checks)
    with pytest.raises(DataError, match=f"{path}: {head}"):
        fit(data, tmp_path)


def test_an_epoch_whose_samples_all_fail_to_decode_names_the_file(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 nothing else" * 10)
    path = write_records(tmp_path / "train.jsonl", [llava_record(f"b{i}", "video", "bad.mp4") for i in range(3)])
    data = ConversationDataModule(str(path), tokenizer=TOKENIZER, num_frames=2, batch_size=2, on_error="skip")
    with pytest.raises(
        DataError,
        match=rf"{path}: every one of its 3 training samples was skipped in epoch 0 "
        r"\(unreadable_media 3\)",
    ):
        fit(data, tmp_path)


def test_skips_are_counted_per_epoch_and_once_per_record_and_steps_stay_contiguous(tmp_path):
    """Item 12: 2 records missing (skipped when read) and 2 that fail to decode (skipped in every epoch); with
    one good record and batches of 2, one batch per epoch has no sample left: it is left out, so the logged
    `step` column is the optimizer step, without gaps or repeats."""
    write_video(tmp_path / "good.mp4", num_frames=2)
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 nothing else" * 10)
    records = [
        llava_record("g", "video", "good.mp4"),
        llava_record("m0", "video", "gone0.mp4"),
        llava_record("b0", "video", "bad.mp4"),
        llava_record("m1", "video", "gone1.mp4"),
        llava_record("b1", "video", "bad.mp4"),
    ]
    path = write_records(tmp_path / "train.jsonl", records)
    data = ConversationDataModule(str(path), tokenizer=TOKENIZER, num_frames=2, batch_size=2, on_error="skip")
    trainer, rows = fit(data, tmp_path, max_epochs=3)
    ends = [row for row in rows if DATA_SKIPPED in row]
    assert [float(row[DATA_SKIPPED_EPOCH]) for row in ends] == [2.0, 2.0, 2.0]  # the two bad videos, each epoch
    assert [float(row[DATA_SKIPPED]) for row in ends] == [4.0, 4.0, 4.0]  # 4 records, each once
    assert data.counter.records() == {
        **dict.fromkeys(data.counter.records(), 0),
        "missing_media": 2,
        "unreadable_media": 2,
    }
    steps = [int(row["step"]) for row in rows if "train/loss" in row]
    assert steps == list(range(trainer.global_step)) and trainer.global_step >= 3
    assert len({json.dumps(row, sort_keys=True) for row in rows}) == len(rows), "no duplicate rows"


@pytest.mark.slow
def test_an_empty_batch_under_several_processes_stops_with_a_clear_error(tmp_path):
    """One process leaves an empty batch out; several cannot (DDP runs every step on every rank): they stop."""
    from regate_lightning.data import NonEmptyDataLoader

    loader = NonEmptyDataLoader(list(range(4)), batch_size=2, collate_fn=lambda xs: None if 2 in xs else xs)
    assert list(loader) == [[0, 1]] and len(loader) == 2
    context = torch.multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    torch.multiprocessing.start_processes(
        iterate_with_an_empty_batch,
        args=(2, f"file://{tmp_path / 'rendezvous'}", errors),
        nprocs=2,
        start_method="spawn",
    )
    messages = [errors.get() for _ in range(2)]
    assert all("every rank must run every step" in m for m in messages)


def test_truncated_answers_are_counted_and_over_long_options_leave_their_question_out(tmp_path):
    """Issue 19, items 3 and 5, under the default `overlong: truncate`: a 100-word answer is cut and counted in
    `data/truncated` (it was cut silently); a question with an option over `max_length` is left out and counted
    in `val/skipped_questions` (its options were cut and scored)."""
    write_video(tmp_path / "v.mp4", num_frames=4)
    long = llava_record("long", "video", "v.mp4")
    long["conversations"][1]["value"] = "word " * 100
    train = write_records(tmp_path / "train.jsonl", [llava_record("short", "video", "v.mp4"), long])
    overlong = {**mc("v.mp4", "a circle"), "candidates": ["a circle", "a square " * 30]}
    val = write_records(tmp_path / "mc.json", [mc("v.mp4", "a circle"), overlong], jsonl=False)
    data = ConversationDataModule(str(train), str(val), tokenizer=TOKENIZER, num_frames=2, batch_size=2, max_length=160)
    assert data.overlong == "truncate"
    _, rows = fit(data, tmp_path)
    assert [float(row["data/truncated"]) for row in rows if "data/truncated" in row] == [1.0]
    assert [float(row["val/skipped_questions"]) for row in rows if "val/skipped_questions" in row] == [1.0]
