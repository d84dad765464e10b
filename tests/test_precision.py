"""Gradient accumulation, bf16-mixed and LoRA with ``teacher="student"``, each on a real Trainer.

Tiny random models on CPU; every test is a short ``Trainer.fit``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from regate_lightning import LoraOptions, MLLMModule, ReGATECallback
from regate_lightning.families import resolve
from regate_lightning.keys import KEEP_MASK, SAMPLE_IDX
from regate_lightning.scoring import gather_candidates
from regate_lightning.targets import candidate_mask
from regate_lightning.teacher import Teacher, text_mask
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.batches import random_batch
from regate_lightning.testing.datamodule import RandomDataModule

# Steps 0, 2, ... keep every token; steps 1, 3, ... keep half of the candidates.
SCHEDULE = {"keep_ratio": 0.5, "warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}


class Spy(pl.Callback):
    """Placed after the ReGATE callback: records what it decided and how its teacher ran.

    Attributes:
        micro_batches: ``(global_step, batch has a keep mask)`` per training batch.
        teacher_autocast: per teacher forward, the CPU autocast dtype in force (None when off).
        teacher_names: the teacher's parameter names; teacher_dtypes: their dtypes (at fit start).
        fixed_before / fixed_after: the teacher's reference losses of ``fixed`` at fit start and end.
    """

    def __init__(self, regate: ReGATECallback, fixed: dict[str, torch.Tensor] | None = None) -> None:
        self.regate = regate
        self.fixed = fixed
        self.micro_batches: list[tuple[int, bool]] = []
        self.teacher_autocast: list[torch.dtype | None] = []
        self.teacher_names: list[str] = []
        self.teacher_dtypes: set[torch.dtype] = set()
        self.fixed_before: torch.Tensor | None = None
        self.fixed_after: torch.Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self.regate.teacher
        assert teacher is not None

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            on = torch.is_autocast_enabled("cpu")
            self.teacher_autocast.append(torch.get_autocast_dtype("cpu") if on else None)

        teacher.decoder.register_forward_hook(hook)
        self.teacher_names = [name for name, _ in teacher.named_parameters()]
        self.teacher_dtypes = {p.dtype for p in teacher.parameters()}
        self.fixed_before = self._reference(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.micro_batches.append((trainer.global_step, KEEP_MASK in batch))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fixed_after = self._reference(pl_module)  # the teacher is freed in teardown, after this

    def _reference(self, pl_module: pl.LightningModule) -> torch.Tensor | None:
        if self.fixed is None:
            return None
        assert self.regate.teacher is not None
        ids, labels = self.fixed["input_ids"], self.fixed["labels"]
        text = text_mask(resolve(pl_module.model).media_token_ids, ids, self.fixed["attention_mask"])
        n = len(self.teacher_autocast)
        losses = self.regate.teacher.reference_losses(ids, labels, text, candidate_mask(labels) & text)
        del self.teacher_autocast[n:]  # not a training step
        return losses


def fit(
    module: MLLMModule, callback: ReGATECallback, data: RandomDataModule, steps: int, fixed: Any = None, **kwargs: Any
) -> Spy:
    spy = Spy(callback, fixed)
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[callback, spy],
        **kwargs,
    )
    trainer.fit(module, data)
    assert trainer.global_step == steps
    return spy


def module(lora: LoraOptions | None = None, lr: float = 1e-3) -> MLLMModule:
    return MLLMModule(tiny.tiny_llava(), lora=lora, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))


def stored_ref(callback: ReGATECallback, data: RandomDataModule, model: torch.nn.Module) -> list[torch.Tensor]:
    """The store's reference losses of every training sample, in data-set order."""
    assert callback.bank is not None and data.train_set is not None
    parts = resolve(model)
    out = []
    for item in data.train_set:
        text = text_mask(parts.media_token_ids, item["input_ids"], item["attention_mask"])
        cand = candidate_mask(item["labels"]) & text
        out.append(callback.bank.get_ref(item[SAMPLE_IDX], cand.sum(1)))
    return out


def fresh_ref(data: RandomDataModule) -> list[torch.Tensor]:
    """Reference losses of a teacher copied from a fresh base model (no adapters, never trained)."""
    base = tiny.tiny_llava()  # same seed, so the same initial weights as the student's base
    teacher = Teacher.from_student(base)
    parts = resolve(base)
    assert data.train_set is not None
    out = []
    for item in data.train_set:
        text = text_mask(parts.media_token_ids, item["input_ids"], item["attention_mask"])
        cand = candidate_mask(item["labels"]) & text
        out.append(gather_candidates(teacher.reference_losses(item["input_ids"], item["labels"], text, cand), cand))
    return out


PAIRED = [(0, False), (0, False), (1, True), (1, True), (2, False), (2, False), (3, True), (3, True)]


def test_accumulation_phase_follows_the_optimizer_step():
    callback = ReGATECallback(**SCHEDULE)
    data = RandomDataModule(num_samples=16, batch_size=2, answer_len=16)
    spy = fit(module(), callback, data, steps=4, accumulate_grad_batches=2)
    # Both micro-batches of an optimizer step share its global_step and its phase (full or sparse).
    assert spy.micro_batches == PAIRED


def test_bf16_mixed_runs_the_teacher_under_autocast():
    callback = ReGATECallback(**SCHEDULE)
    data = RandomDataModule(num_samples=8, batch_size=2, answer_len=16)
    student = module()
    spy = fit(student, callback, data, steps=4, max_epochs=2, precision="bf16-mixed")
    assert spy.teacher_autocast and set(spy.teacher_autocast) == {torch.bfloat16}
    assert [sparse for _, sparse in spy.micro_batches] == [False, True, False, True], "keep masks written"
    stored = stored_ref(callback, data, student.model)
    assert all(torch.isfinite(r).all() for r in stored), "finite reference losses for every sample"
    # Under bf16-mixed the teacher is stored in bf16 (it only runs forward under the same autocast), so
    # the losses are those of fp32 within bf16 rounding, but not bitwise.
    gaps = [float((got - want).abs().max()) for got, want in zip(stored, fresh_ref(data), strict=True)]
    assert 0 < max(gaps) < 0.05
    assert spy.teacher_dtypes == {torch.bfloat16}
    assert callback.totals["teacher_samples"] == 8


def test_lora_teacher_is_the_base_model_and_stays_fixed():
    data = RandomDataModule(num_samples=8, batch_size=2, answer_len=16)
    student = module(LoraOptions(r=4, alpha=8, dropout=0.0), lr=1e-2)
    fixed = random_batch(student.model, batch_size=2, seed=123, prompt_len=16, answer_len=16)
    lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" in n}
    assert lora_before
    callback = ReGATECallback(**SCHEDULE)
    spy = fit(student, callback, data, steps=4, max_epochs=2, fixed=fixed)
    assert spy.teacher_names and not [n for n in spy.teacher_names if "lora_" in n], "no adapter in the teacher"
    lora_after = dict(student.named_parameters())
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before), "the adapters trained"
    # The reference losses are the base model's (a fresh copy without adapters), bitwise.
    for got, want in zip(stored_ref(callback, data, student.model), fresh_ref(data), strict=True):
        assert torch.equal(got, want)
    # ... and the teacher did not move while the adapters trained.
    assert spy.fixed_before is not None and spy.fixed_after is not None
    assert_same_losses(spy.fixed_before, spy.fixed_after)


def test_accumulation_bf16_mixed_and_lora_together():
    data = RandomDataModule(num_samples=16, batch_size=2, answer_len=16)
    student = module(LoraOptions(r=4, alpha=8, dropout=0.0), lr=1e-2)
    fixed = random_batch(student.model, batch_size=2, seed=123, prompt_len=16, answer_len=16)
    callback = ReGATECallback(**SCHEDULE)
    spy = fit(student, callback, data, steps=4, fixed=fixed, accumulate_grad_batches=2, precision="bf16-mixed")
    assert spy.micro_batches == PAIRED
    assert spy.teacher_autocast and set(spy.teacher_autocast) == {torch.bfloat16}
    assert spy.teacher_names and not [n for n in spy.teacher_names if "lora_" in n]
    assert all(torch.isfinite(r).all() for r in stored_ref(callback, data, student.model))
    assert spy.fixed_before is not None and spy.fixed_after is not None
    assert_same_losses(spy.fixed_before, spy.fixed_after)
    assert callback.totals["teacher_samples"] == 16
    assert 0 < callback.totals["kept"] < callback.totals["candidates"]


def assert_same_losses(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(), b.nan_to_num())
