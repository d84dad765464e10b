"""A mixture-of-experts student's load-balancing loss: the engine computes what the HF model computes.

HF's MoE models add ``router_aux_loss_coef * load_balancing_loss_func(...)`` to their loss when the text config
sets ``output_router_logits``; the engine runs the inner model and the head itself, so it must add the same
figure, over the tokens the router saw that are not padding (the kept ones on an elided step).
"""

from __future__ import annotations

import pytest
import torch
from references import hf_inputs, partial_mask, position_ids
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from regate_lightning.elision import forward_active
from regate_lightning.families.base import text_config
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.batches import random_batch


def tiny_moe() -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        **text_config(hidden_size=32, num_layers=2),
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


MOE_STUDENTS = {
    "qwen3_moe": tiny_moe,
    "qwen3_vl_moe": lambda: tiny.tiny_model("Qwen3VLMoeForConditionalGeneration", output_router_logits=True).eval(),
    "qwen3_5_moe": lambda: tiny.tiny_model(
        "Qwen3_5MoeForConditionalGeneration", output_router_logits=True, router_aux_loss_coef=0.5
    ).eval(),
}
"""A text MoE and the multimodal MoE classes (Qwen3-VL-MoE, Qwen3.5-MoE), each with its load-balancing loss on."""
FEWER_TOKENS = {"qwen3_moe": 1e-5, "qwen3_vl_moe": 1e-4, "qwen3_5_moe": 1e-5}
"""How far the aux loss of an elided batch must be from the full batch's (the router saw fewer tokens)."""


def shortened(model: torch.nn.Module, batch: dict, index: torch.Tensor) -> dict:
    """The batch's HF inputs cut to positions ``index`` (``[B, n]``), with their original position ids."""
    length = batch[INPUT_IDS].shape[1]
    short = {
        key: value.gather(1, index) if value.dim() == 2 and value.shape[1] == length else value
        for key, value in hf_inputs(batch).items()
        if key != LABELS
    }
    positions = position_ids(model, batch)  # [B, L], or [3, B, L] for M-RoPE
    short[ATTENTION_MASK] = torch.ones_like(index)
    short["position_ids"] = positions.gather(-1, index.expand(*positions.shape[:-1], -1))
    return short


@pytest.mark.parametrize("student", list(MOE_STUDENTS))
def test_aux_loss_equals_the_hf_model_on_full_and_elided_batches(student):
    """The full batch: the HF model's loss and aux loss. Rows that keep equal counts: the gathered batch has no
    padding, and its aux loss equals the HF model run on the rows shortened explicitly, as one batch; the router
    saw fewer tokens than on the full batch. A ragged elided batch (padding) gives a finite aux loss."""
    model = MOE_STUDENTS[student]()
    full = random_batch(model, batch_size=3, ragged=True, num_frames=4, seed=10)
    with torch.no_grad():
        reference = model(**hf_inputs(full), use_cache=False)
        out = forward_active(model, full)
    assert reference.aux_loss is not None and float(reference.aux_loss) > 0
    assert abs(float(out.aux_loss) - float(reference.aux_loss)) < 1e-6
    assert abs(float(out.loss) - float(reference.loss)) < 1e-5

    batch = random_batch(model, batch_size=2, num_frames=4, seed=11)
    keep = partial_mask(batch, equal_rows=True)
    index = keep.nonzero()[:, 1].view(2, -1)
    with torch.no_grad():
        whole = forward_active(model, batch)
        elided = forward_active(model, batch, keep)
        expected = model(**shortened(model, batch, index), use_cache=False)
        padded = forward_active(model, full, partial_mask(full, equal_rows=False))
    err = abs(float(elided.aux_loss) - float(expected.aux_loss))
    print(f"max|diff| {student} aux loss elided: {err:.2e}")
    assert err < 1e-6
    # the router saw fewer tokens: a difference far beyond the tolerance above (measured: 6.9e-05, 9.3e-04, 5.9e-05)
    assert abs(float(elided.aux_loss) - float(whole.aux_loss)) > FEWER_TOKENS[student]
    assert padded.aux_loss is not None and torch.isfinite(padded.aux_loss)


@pytest.mark.parametrize("student", list(MOE_STUDENTS))
def test_the_module_logs_the_aux_loss_in_training(tmp_path, student):
    """Two steps, the second sparse (answer elision, and visual-token elision for the multimodal students)."""

    from regate_lightning import MLLMModule, ReGATECallback, VisualTokenElision
    from regate_lightning.keys import TRAIN_AUX_LOSS
    from regate_lightning.testing import RandomDataModule

    module = MLLMModule(MOE_STUDENTS[student](), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    schedule = {"keep_ratio": 0.5, "warmup_steps": 1, "cycle_steps": 2, "full_steps": 0}
    callbacks = [ReGATECallback(**schedule)]
    if student != "qwen3_moe":
        callbacks.insert(0, VisualTokenElision(**schedule))
    trainer = quiet_trainer(
        max_steps=2,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=RandomDataModule(num_samples=4, batch_size=2, num_frames=4))
    assert TRAIN_AUX_LOSS in trainer.callback_metrics
    assert float(trainer.callback_metrics[TRAIN_AUX_LOSS]) > 0
