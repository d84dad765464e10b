"""Issue 11, item 1: reference losses and EMA values stay attached to their records.

A sample is keyed by its record's identity (its id, else file and line), not by its position among the
records that happened to be usable, and a stored value (``ref_cache``, checkpoint) is used only for the
content it was made from: anything else is recomputed and counted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_fixtures import write_video

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.data import ConversationDataModule, sample_key
from regate_lightning.keys import REPLACED, TEACHER_SAMPLES
from regate_lightning.testing import quiet_trainer, tiny

TOKENIZER = "regate_lightning.testing.byte_tokenizer"


def record(rid: str, video: str, answer: str) -> dict:
    return {
        "id": rid,
        "video": video,
        "conversations": [
            {"from": "human", "value": "<video>\nWhat is moving?"},
            {"from": "gpt", "value": answer},
        ],
    }


# r1 and r2 have answers of one length: the same candidate count, other tokens.
RECORDS = [
    record("r0", "v0.mp4", "A red circle moves left."),
    record("r1", "v1.mp4", "Two blue squares go up."),
    record("r2", "v2.mp4", "One green square goes."),
]


def write(root: Path, records: list[dict]) -> Path:
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def fit(root: Path, cache: Path | None, max_steps: int = 1, ckpt: str | None = None, save: bool = False):
    """One fit of a tiny LLaVA-NeXT-Video on ``root/train.jsonl`` (one batch of every sample per step)."""
    callback = ReGATECallback(warmup_steps=0, cycle_steps=2, full_steps=0, ref_cache=str(cache) if cache else None)
    data = ConversationDataModule(
        str(root / "train.jsonl"), tokenizer=TOKENIZER, num_frames=2, batch_size=3, on_error="skip", max_length=None
    )
    extra = [pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)] if save else []
    trainer = quiet_trainer(
        accelerator="cpu",
        max_steps=max_steps,
        enable_checkpointing=save,
        callbacks=[callback, *extra],
    )
    module = MLLMModule(tiny.tiny_llava_next_video(hidden_size=32), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer.fit(module, data, ckpt_path=ckpt)
    return callback, data


def set_up(data: ConversationDataModule) -> ConversationDataModule:
    """``data`` after ``setup("fit")`` under a Trainer that holds a tiny LLaVA-NeXT-Video student."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.connect(MLLMModule(tiny.tiny_llava_next_video(hidden_size=32)))
    data.trainer = trainer
    data.setup("fit")
    return data


def references(callback: ReGATECallback, data: ConversationDataModule) -> dict[str, list[float]]:
    """Each record's stored reference losses, by record identity."""
    bank = callback.bank
    assert bank is not None and data.train_set is not None
    out = {}
    for key, name in zip(data.train_set.keys, data.train_set.identities, strict=True):
        keys = torch.tensor([key])
        out[name] = bank.get_ref(keys, bank.candidate_counts(keys)).tolist()
    return out


@pytest.fixture
def videos(tmp_path):
    for i in range(3):
        write_video(tmp_path / f"v{i}.mp4", num_frames=4, seed=i)
    return tmp_path


def test_reference_cache_follows_records_when_the_usable_set_changes(videos, tmp_path):
    """The issue's repro: score with one video missing (skipped), restore it, fit with the same ref_cache."""
    write(videos, RECORDS)
    cache = tmp_path / "ref_cache.pt"
    shutil.move(videos / "v1.mp4", tmp_path / "aside.mp4")
    first, _ = fit(videos, cache)  # r1 is skipped: r0 and r2 are scored and cached
    assert first.totals[TEACHER_SAMPLES] == 2
    shutil.move(tmp_path / "aside.mp4", videos / "v1.mp4")
    second, data = fit(videos, cache)
    assert second.cache_samples == 2
    assert second.totals[TEACHER_SAMPLES] == 1, "only the restored record r1 needed the teacher"
    fresh_cb, fresh_data = fit(videos, None)
    assert references(second, data) == references(fresh_cb, fresh_data)
    assert data.train_set is not None and data.train_set.keys == [sample_key(f"id r{i}") for i in range(3)]


def test_a_changed_record_is_recomputed_not_read_from_the_cache(videos, tmp_path):
    write(videos, RECORDS)
    cache = tmp_path / "ref_cache.pt"
    fit(videos, cache)
    changed = [RECORDS[0], record("r1", "v1.mp4", "Two green circles go."), RECORDS[2]]  # same id and length
    write(videos, changed)
    with pytest.warns(UserWarning) as caught:
        again, data = fit(videos, cache)
    # Issue 19, item 10: the warning names the record ("1 sample(s) of this step" named none), and the end of
    # the fit gives the count over the run.
    messages = [str(w.message) for w in caught if "other content" in str(w.message)]
    assert messages[0].startswith("ReGATE: id r1 had stored values (from the checkpoint or `ref_cache`) made from")
    assert messages[1] == (
        "ReGATE: in this fit 1 sample(s) had stored values made from other content, the first id r1; they were "
        "scored again (`regate/replaced_samples`)"
    )
    assert again.totals[REPLACED] == 1 and again.totals[TEACHER_SAMPLES] == 1
    fresh_cb, fresh_data = fit(videos, None)
    assert references(again, data) == references(fresh_cb, fresh_data)


def test_a_rewritten_cache_keeps_only_the_records_of_the_data(videos, tmp_path, caplog):
    """Issue 19, item 10: a cache kept the entries of records that no longer exist (11 entries for 6 records)."""
    write(videos, RECORDS)
    cache = tmp_path / "ref_cache.pt"
    fit(videos, cache)
    write(videos, [RECORDS[0], RECORDS[1], {**RECORDS[2], "id": "r9"}])  # r2 edited to another id
    with caplog.at_level("INFO"):
        again, data = fit(videos, cache)
    assert again.totals[TEACHER_SAMPLES] == 1, "r9 is new; r0 and r1 come from the cache"
    assert "1 of them belong to no record of the training data now" in caplog.text
    kept = torch.load(cache, weights_only=True)["sample_idx"].tolist()
    assert kept == sorted(sample_key(f"id {rid}") for rid in ("r0", "r1", "r9")) == sorted(data.sample_keys())


def test_a_restored_store_entry_of_a_changed_record_is_recomputed_and_counted(videos):
    write(videos, RECORDS)
    fit(videos, None, max_steps=1, save=True)
    write(videos, [record("r0", "v0.mp4", "A red square moves up."), *RECORDS[1:]])  # r0 changed, same length
    with pytest.warns(UserWarning, match="made from other content"):
        resumed, data = fit(videos, None, max_steps=2, ckpt=str(videos / "ckpt" / "last.ckpt"))
    assert resumed.totals[REPLACED] == 1
    assert resumed.totals[TEACHER_SAMPLES] == 3 + 1, "three in the first run, r0 again after the resume"
    fresh_cb, fresh_data = fit(videos, None)
    assert references(resumed, data)["id r0"] == references(fresh_cb, fresh_data)["id r0"]


def test_fingerprint_covers_what_changes_the_rendered_tokens(videos):
    """Frames, fps, frame folders' rate, system prompt, chat template, max_length: each changes the fingerprint;
    the records themselves do not (each sample is checked by its own digest)."""
    write(videos, RECORDS)

    def fingerprint(**kwargs) -> str:
        return set_up(ConversationDataModule(str(videos / "train.jsonl"), tokenizer=TOKENIZER, **kwargs)).fingerprint()

    base = fingerprint()
    variants = {
        "num_frames": fingerprint(num_frames=4),
        "fps": fingerprint(fps=2.0),
        "folder_fps": fingerprint(folder_fps=5.0),
        "system_prompt": fingerprint(system_prompt="Be brief."),
        "max_length": fingerprint(max_length=512),
        "overlong": fingerprint(overlong="skip"),
    }
    assert all(v != base for v in variants.values()), [k for k, v in variants.items() if v == base]
    assert len(set(variants.values())) == len(variants)
    write(videos, [*RECORDS, record("r3", "v0.mp4", "More data.")])
    assert fingerprint() == base


def test_chat_template_is_in_the_fingerprint(videos):
    write(videos, RECORDS)

    class OtherTemplate(ConversationDataModule):
        def load_tokenizer(self):
            tokenizer = super().load_tokenizer()
            tokenizer.chat_template = tokenizer.chat_template.replace("USER:", "Q:")
            return tokenizer

    prints = [
        set_up(cls(str(videos / "train.jsonl"), tokenizer=TOKENIZER)).fingerprint()
        for cls in (ConversationDataModule, OtherTemplate)
    ]
    assert prints[0] != prints[1]


def test_duplicate_ids_get_distinct_keys(videos):
    write(videos, [RECORDS[0], {**RECORDS[1], "id": "r0"}, RECORDS[2]])
    data = set_up(ConversationDataModule(str(videos / "train.jsonl"), tokenizer=TOKENIZER))
    assert data.train_set is not None
    assert data.train_set.identities == ["id r0", "id r0#2", "id r2"]
    assert len(set(data.train_set.keys)) == 3
    assert data.sample_name(data.train_set.keys[1]) == "id r0#2"
