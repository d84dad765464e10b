"""A mixture-of-experts student's load-balancing loss: the engine computes what the HF model computes.

HF's MoE models add ``router_aux_loss_coef * load_balancing_loss_func(...)`` to their loss when the text config
sets ``output_router_logits``; the engine runs the inner model and the head itself, so it must add the same
figure, over the tokens the router saw that are not padding (the kept ones on an elided step).
"""

from __future__ import annotations

import torch
from references import hf_inputs, partial_mask
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from regate_lightning.elision import forward_active
from regate_lightning.families.base import text_config
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


def test_full_batch_loss_and_aux_loss_equal_the_hf_model():
    model = tiny_moe()
    batch = random_batch(model, batch_size=3, ragged=True)
    with torch.no_grad():
        reference = model(**hf_inputs(batch), use_cache=False)
        out = forward_active(model, batch)
    assert reference.aux_loss is not None and float(reference.aux_loss) > 0
    assert abs(float(out.aux_loss) - float(reference.aux_loss)) < 1e-6
    assert abs(float(out.loss) - float(reference.loss)) < 1e-5


def test_elided_aux_loss_is_over_the_kept_tokens():
    """Rows that keep equal counts: the gathered batch has no padding, and equals the HF model run on it."""
    model = tiny_moe()
    batch = random_batch(model, batch_size=2, seed=1)
    keep = partial_mask(batch, equal_rows=True)
    index = keep.nonzero()[:, 1].view(2, -1)
    short = {
        "input_ids": batch["input_ids"].gather(1, index),
        "attention_mask": torch.ones_like(index),
        "position_ids": index,
    }
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        reference = model(**short, use_cache=False)
        padded = forward_active(model, random_batch(model, batch_size=2, seed=1, ragged=True), None)
    assert abs(float(out.aux_loss) - float(reference.aux_loss)) < 1e-6
    assert padded.aux_loss is not None and torch.isfinite(padded.aux_loss)


def test_the_module_logs_the_aux_loss_in_training(tmp_path):
    import lightning.pytorch as pl

    from regate_lightning import MLLMModule, ReGATECallback
    from regate_lightning.keys import TRAIN_AUX_LOSS
    from regate_lightning.testing import RandomDataModule

    module = MLLMModule(tiny_moe(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    callback = ReGATECallback(keep_ratio=0.5, warmup_steps=1, cycle_steps=2, full_steps=1)
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=RandomDataModule(num_samples=12, batch_size=4))
    assert TRAIN_AUX_LOSS in trainer.callback_metrics
    assert float(trainer.callback_metrics[TRAIN_AUX_LOSS]) > 0
