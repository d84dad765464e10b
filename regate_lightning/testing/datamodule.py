"""``RandomDataModule``: random token batches shaped for whatever student the module holds.

It serves the ``debug`` recipes and the tests: no files, no tokenizer; the batches follow the
student's own placeholder counts (see :mod:`regate_lightning.testing.batches`). With ``min_answer_len`` the
samples differ in length (right-padded in a batch), so that the length-aware batching and packed steps have
something to do.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from regate_lightning.data.batching import ResumableDataLoader, check_batching, make_batch_sampler
from regate_lightning.families import resolve
from regate_lightning.keys import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    IMAGE,
    INPUT_IDS,
    LABELS,
    MM_TOKEN_TYPE_IDS,
    SAMPLE_IDX,
    VIDEO,
)
from regate_lightning.testing.batches import random_batch

PAD_VALUES = {INPUT_IDS: 0, ATTENTION_MASK: 0, LABELS: IGNORE_INDEX, MM_TOKEN_TYPE_IDS: 0}
"""The per-position keys of a batch and their padding values."""


class _RandomSamples(Dataset):
    def __init__(
        self, model: torch.nn.Module, num_samples: int, seed: int, min_answer_len: int | None, **shape: Any
    ) -> None:
        self.items = []
        lengths = torch.Generator().manual_seed(seed)
        longest = shape.pop("answer_len")
        for i in range(num_samples):
            answer = longest
            if min_answer_len is not None:
                answer = int(torch.randint(min_answer_len, longest + 1, (1,), generator=lengths))
            item = random_batch(model, batch_size=1, seed=seed * 1_000_003 + i, answer_len=answer, **shape)
            item[SAMPLE_IDX] = torch.tensor([i])
            self.items.append(item)
        self.lengths = [int(item[INPUT_IDS].shape[1]) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def concat_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate one-row batches along dim 0 (Qwen2-VL patches included), right-padding the per-position keys."""
    length = max(int(item[INPUT_IDS].shape[1]) for item in items)

    def pad(key: str, value: torch.Tensor) -> torch.Tensor:
        if key not in PAD_VALUES or value.shape[1] == length:
            return value
        return F.pad(value, (0, length - value.shape[1]), value=PAD_VALUES[key])

    return {key: torch.cat([pad(key, item[key]) for item in items]) for key in items[0]}


class RandomDataModule(pl.LightningDataModule):
    """Random batches in the student's own keys, labels on the answers.

    Args:
        num_samples: training samples (the validation split has a quarter as many, at least 2).
        batch_size: samples per batch (with ``batching="token_budget"``: the cap of samples per batch).
        prompt_len: text tokens between the media and the answer.
        answer_len: supervised tokens per sample (the most, with ``min_answer_len``).
        num_frames: frames per video for video students.
        seed: the same seed gives the same data.
        shuffle: shuffle the training set every epoch.
        min_answer_len: draw each sample's answer length between this and ``answer_len`` (None: all
            ``answer_len``).
        batching: ``"random"``, ``"length_grouped"`` or ``"token_budget"``, as
            :class:`~regate_lightning.data.ConversationDataModule`'s (:mod:`regate_lightning.data.batching`).
        max_tokens: ``"token_budget"``: the most padded positions (samples x longest) in one batch.
        group_size: ``"length_grouped"``: batches sorted together.
    """

    def __init__(
        self,
        num_samples: int = 32,
        batch_size: int = 4,
        prompt_len: int = 16,
        answer_len: int = 32,
        num_frames: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        min_answer_len: int | None = None,
        batching: str = "random",
        max_tokens: int | None = None,
        group_size: int = 50,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_samples", num_samples),
            ("batch_size", batch_size),
            ("answer_len", answer_len),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if min_answer_len is not None and not 2 <= min_answer_len <= answer_len:
            raise ValueError(f"`min_answer_len` must be in [2, answer_len={answer_len}] or null, got {min_answer_len}")
        check_batching(batching, max_tokens, group_size)
        self.save_hyperparameters()
        self.train_set: _RandomSamples | None = None
        self.val_set: _RandomSamples | None = None

    def setup(self, stage: str) -> None:
        """Build the samples from the attached module's model (the data must match its config)."""
        if self.train_set is not None:
            return
        if self.trainer is None or self.trainer.lightning_module is None:
            raise RuntimeError(
                "RandomDataModule needs a Trainer with a module attached (it reads the student's config)"
            )
        model = self.trainer.lightning_module.model
        hp = self.hparams
        shape = {"prompt_len": hp.prompt_len, "answer_len": hp.answer_len, "num_frames": hp.num_frames}
        self.train_set = _RandomSamples(model, hp.num_samples, hp.seed, hp.min_answer_len, **shape)
        self.val_set = _RandomSamples(model, max(2, hp.num_samples // 4), hp.seed + 1, hp.min_answer_len, **shape)

    @property
    def media_kinds(self) -> tuple[str, ...] | None:
        """What every training batch holds: one video per sample for a family that takes videos, else one image
        (:func:`~regate_lightning.testing.media_layout`); None before ``setup`` and for a text-only student.

        :class:`~regate_lightning.MLLMModule` freezes the parameters only the other kind would use.
        """
        if self.trainer is None or self.trainer.lightning_module is None:
            return None
        family = resolve(self.trainer.lightning_module.model).family
        if not family.multimodal:
            return None
        return (VIDEO,) if family.video_key is not None else (IMAGE,)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (of ``batching``)."""
        hp = self.hparams
        assert self.train_set is not None
        sampler = make_batch_sampler(
            hp.batching,
            self.train_set.lengths,
            hp.batch_size,
            hp.max_tokens,
            hp.group_size,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            shuffle=hp.shuffle,
        )
        if sampler is not None:
            return ResumableDataLoader(self.train_set, batch_sampler=sampler, collate_fn=concat_collate)
        return DataLoader(self.train_set, batch_size=hp.batch_size, shuffle=hp.shuffle, collate_fn=concat_collate)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=concat_collate)


QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}
"""The ``Trainer`` settings of a test or benchmark run: no logger, checkpoints, progress bar, model summary or
validation."""


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A ``lightning.pytorch.Trainer`` with :data:`QUIET_TRAINER`'s settings, ``kwargs`` added or overriding them."""
    return pl.Trainer(**{**QUIET_TRAINER, **kwargs})
