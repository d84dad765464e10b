"""Length-aware batching: the two batch samplers, their plans across ranks, and mid-epoch resumption.

The samplers' DDP behaviour under real processes is in ``tests/test_ddp.py`` (the worker's ``batching`` fit);
here the plans are checked for several imitated ranks, and a real ``Trainer`` resumes from a checkpoint taken in
the middle of an epoch.
"""

from __future__ import annotations

import logging
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DistributedSampler

from regate_lightning import MLLMModule
from regate_lightning.data.batching import (
    LengthGroupedBatchSampler,
    ResumableDataLoader,
    TokenBudgetBatchSampler,
    check_batching,
    sample_lengths,
)
from regate_lightning.data.collate import Collator
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.datamodule import RandomDataModule

LENGTHS = [int(n) for n in torch.randint(20, 400, (103,), generator=torch.Generator().manual_seed(0))]


def ranks(make, world: int) -> list:
    """One sampler per imitated rank, each given the DistributedSampler Lightning would inject."""
    return [make(DistributedSampler(range(len(LENGTHS)), num_replicas=world, rank=r)) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_length_grouped_plan(world):
    samplers = ranks(lambda s: LengthGroupedBatchSampler(s, LENGTHS, batch_size=4, group_size=5), world)
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        assert len({len(batches) for batches in per_rank}) == 1, "every rank runs the same number of steps"
        assert len(per_rank[0]) == len(samplers[0]) == -(-len(LENGTHS) // (4 * world))
        steps = [[i for b in batches for i in b] for batches in zip(*per_rank, strict=True)]
        seen = Counter(i for step in steps for i in step)
        assert set(seen) == set(range(len(LENGTHS))), "every sample in the epoch"
        assert sum(seen.values()) - len(LENGTHS) < 4 * world, "only the last step is completed from the start"
        assert all(len(b) == 4 for batches in per_rank for b in batches)
    # Grouping: a batch spans ~70 tokens of lengths where 4 random samples of 20-400 tokens span ~230.
    spread = [max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in per_rank[0]]
    assert sum(spread) / len(spread) < 100
    assert [list(s) for s in samplers] == per_rank, "the plan of an epoch is fixed by the seed"
    samplers[0].set_epoch(0)
    assert list(samplers[0]) != per_rank[0], "another epoch, another plan"


@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_plan(world):
    samplers = ranks(lambda s: TokenBudgetBatchSampler(s, LENGTHS, max_tokens=1200, batch_size=8), world)
    per_rank = [list(s) for s in samplers]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    for batches in per_rank:
        for b in batches:
            assert len(b) * max(LENGTHS[i] for i in b) <= 1200 and len(b) <= 8
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(len(LENGTHS)))
    fill = sum(LENGTHS) / sum(len(b) * max(LENGTHS[i] for i in b) for bs in per_rank for b in bs)
    assert fill > 0.85, f"padded positions hold {fill:.0%} tokens"
    for sampler in samplers:
        sampler.set_epoch(1)
    again = [list(s) for s in samplers]
    assert sorted(sorted(b) for bs in again for b in bs) == sorted(sorted(b) for bs in per_rank for b in bs)
    assert again != per_rank, "in another order"


def test_token_budget_oversized_sample_and_refusals(caplog):
    with caplog.at_level(logging.WARNING, logger="regate_lightning.data"):
        sampler = TokenBudgetBatchSampler(None, [10, 500, 20], max_tokens=100)
    assert sampler.oversized == 1 and [500] in [[sampler.lengths[i] for i in b] for b in sampler.batches]
    assert "1 of 3 samples are longer than max_tokens 100" in caplog.text
    with pytest.raises(ValueError, match=r"`max_tokens` must be >= 1, got 0"):
        TokenBudgetBatchSampler(None, [10], max_tokens=0)
    with pytest.raises(ValueError, match=r"`batching` must be one of .*got 'sorted'"):
        check_batching("sorted", None, 50)
    with pytest.raises(ValueError, match=r"`max_tokens` must be a positive number .*token_budget"):
        check_batching("token_budget", None, 50)
    with pytest.raises(ValueError, match=r"`max_tokens` applies with batching='token_budget' only"):
        check_batching("length_grouped", 100, 50)
    with pytest.raises(ValueError, match=r"`group_size` must be >= 1, got 0"):
        RandomDataModule(batching="length_grouped", group_size=0)
    with pytest.raises(TypeError, match=r"ResumableDataLoader needs a LengthAwareBatchSampler"):
        ResumableDataLoader(range(4), batch_size=2)


def test_a_state_for_other_data_restarts_the_epoch(caplog):
    def loader(lengths):
        sampler = TokenBudgetBatchSampler(None, lengths, 1000)
        return ResumableDataLoader(range(len(lengths)), batch_sampler=sampler, collate_fn=list)

    first = loader(LENGTHS)
    iterator = iter(first)
    next(iterator), next(iterator)
    state = first.state_dict()
    assert state["batches"] == 2 and state["epoch"] == 0
    same = loader(LENGTHS)
    same.load_state_dict(state)
    assert list(same) == list(first)[2:]
    other = loader(LENGTHS[:-1])
    with caplog.at_level(logging.WARNING, logger="regate_lightning.data"):
        other.load_state_dict(state)
    assert "saved for other batching (lengths differ): the epoch restarts" in caplog.text
    assert len(list(other)) == len(other)


def test_sample_lengths_are_the_collated_lengths():
    from regate_lightning.data.render import Sample

    samples = [
        Sample(torch.arange(n), torch.arange(n), torch.zeros(n, dtype=torch.long), {}, sample_idx=i)
        for i, n in enumerate((7, 3, 12))
    ]
    assert sample_lengths([*samples, None]) == [7, 3, 12, 0]
    assert sample_lengths(samples, max_length=5) == [5, 3, 5]
    batch = Collator(0)(samples)
    assert batch["attention_mask"].sum(1).tolist() == [7, 3, 12]


# ------------------------------------------------------------------------------------------------------------
# Resuming mid-epoch with a real Trainer.


class Record(pl.Callback):
    """The samples of every training batch, and the weights at the end."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch["sample_idx"].tolist()))


def fit(batching: dict, ckpt_dir=None, resume=None) -> tuple[list, dict]:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    module = MLLMModule(tiny.tiny_llama(num_layers=1), packed=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = RandomDataModule(num_samples=20, batch_size=4, prompt_len=4, answer_len=24, min_answer_len=4, **batching)
    record = Record()
    callbacks: list[pl.Callback] = [record]
    if ckpt_dir is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        )
    trainer = quiet_trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
    )
    trainer.fit(module, data, ckpt_path=resume)
    return record.batches, {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "batching",
    [{"batching": "length_grouped", "group_size": 2}, {"batching": "token_budget", "max_tokens": 120}],
    ids=["length_grouped", "token_budget"],
)
def test_resume_mid_epoch_reads_the_batches_of_the_uninterrupted_run(batching, tmp_path, recwarn):
    full, weights = fit(batching, ckpt_dir=tmp_path)
    per_epoch = len(full) // 2
    step = next(s for s in range(per_epoch + 1, 2 * per_epoch) if s % 2 == 0)  # in the middle of the 2nd epoch
    resumed, resumed_weights = fit(batching, resume=str(tmp_path / f"step={step}.ckpt"))
    assert resumed == full[step:], "the resumed run reads what the uninterrupted one read after the checkpoint"
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights), "and ends with the same weights"
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_conversation_data_with_fps_clips_packed_over_a_token_budget(tmp_path):
    """Clips of 1 to 4 s sampled at 2 fps (2 to 8 frames) and answers of 1 to 3 turns: every sample's length is
    measured in ``setup`` exactly as the collator pads it, and packed steps train over budget batches."""
    from data_fixtures import llava_record, write_records, write_video

    from regate_lightning.data import ConversationDataModule

    records = []
    for i in range(6):
        write_video(tmp_path / f"v{i}.mp4", num_frames=4 * (1 + i % 4), fps=4.0, seed=i)
        records.append(llava_record(f"r{i}", "video", f"v{i}.mp4", turns=1 + i % 3))
    path = write_records(tmp_path / "train.jsonl", records)
    data = ConversationDataModule(
        str(path),
        tokenizer="regate_lightning.testing.byte_tokenizer",
        fps=2.0,
        num_frames=8,
        frame_size=[32, 32],
        batch_size=4,
        batching="token_budget",
        max_tokens=800,
    )
    seen: dict[int, int] = {}

    class Lengths(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert len(batch["sample_idx"]) * batch["input_ids"].shape[1] <= 800
            seen.update(zip(batch["sample_idx"].tolist(), batch["attention_mask"].sum(1).tolist(), strict=True))

    module = MLLMModule(tiny.tiny_qwen2_vl(), packed=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[Lengths()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    assert data.train_lengths is not None and data.train_set is not None
    by_key = {data.train_set[i].sample_idx: n for i, n in enumerate(data.train_lengths)}
    assert seen == by_key and len(set(by_key.values())) > 3, "exact lengths, and they differ"
    assert isinstance(trainer.train_dataloader, ResumableDataLoader)
