"""``RandomDataModule``: random token batches shaped for whatever student the module holds.

It serves the ``debug`` recipes and the tests: no files, no tokenizer; the batches follow the
student's own placeholder counts (see :mod:`regate_lightning.testing.batches`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from regate_lightning.families import resolve
from regate_lightning.keys import IMAGE, SAMPLE_IDX, VIDEO
from regate_lightning.testing.batches import random_batch


class _RandomSamples(Dataset):
    def __init__(self, model: torch.nn.Module, num_samples: int, seed: int, **shape: Any) -> None:
        self.items = []
        for i in range(num_samples):
            item = random_batch(model, batch_size=1, seed=seed * 1_000_003 + i, **shape)
            item[SAMPLE_IDX] = torch.tensor([i])
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def concat_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate one-row batches of equal length along dim 0 (Qwen2-VL patches included)."""
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


class RandomDataModule(pl.LightningDataModule):
    """Random batches in the student's own keys, labels on the answers.

    Args:
        num_samples: training samples (the validation split has a quarter as many, at least 2).
        batch_size: samples per batch.
        prompt_len: text tokens between the media and the answer.
        answer_len: supervised tokens per sample.
        num_frames: frames per video for video students.
        seed: the same seed gives the same data.
        shuffle: shuffle the training set every epoch.
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
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_samples", num_samples),
            ("batch_size", batch_size),
            ("answer_len", answer_len),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

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
        self.train_set = _RandomSamples(model, hp.num_samples, hp.seed, **shape)
        self.val_set = _RandomSamples(model, max(2, hp.num_samples // 4), hp.seed + 1, **shape)

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
        """Shuffled training batches."""
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=self.hparams.shuffle,
            collate_fn=concat_collate,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=concat_collate)
