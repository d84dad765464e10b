"""MLLMModule and the elision engine under training: gradients, LoRA, checkpointing, bad input, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regate_lightning.elision import forward_active
from regate_lightning.families import resolve, vision_parts
from regate_lightning.keys import IGNORE_INDEX, KEEP_MASK, LABELS, TOKEN_LOSS
from regate_lightning.module import LoraOptions, MLLMModule, load_model
from regate_lightning.targets import candidate_mask
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.batches import random_batch

ROOT = Path(__file__).resolve().parents[1]


def elide_half(batch: dict) -> torch.Tensor:
    cand = candidate_mask(batch[LABELS])
    keep = torch.ones_like(cand)
    rows, cols = cand.nonzero(as_tuple=True)
    keep[rows[::2], cols[::2]] = False
    return keep


@pytest.mark.parametrize("factory", [tiny.tiny_llava, tiny.tiny_qwen2_vl, tiny.tiny_llava_next_video])
def test_gradients_reach_vision_tower_and_projector(factory):
    model = factory()
    batch = random_batch(model, batch_size=2)
    out = forward_active(model, batch, elide_half(batch))
    out.loss.backward()
    tower, projector = vision_parts(resolve(model))
    for group, name in ((tower, "tower"), (projector, "projector")):
        params = [p for m in group for p in m.parameters()]
        # The first parameter is the patch embedding (tower) or the first projection (projector): the
        # deepest point the loss must reach. Unused heads (e.g. CLIP's post-layernorm) get none.
        assert params[0].grad is not None and float(params[0].grad.abs().sum()) > 0, f"no gradient in the {name}"


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = None
    grads = []
    for checkpointing in (False, True):
        module = MLLMModule(tiny.tiny_llava(), gradient_checkpointing=checkpointing)
        module.train()
        batch = batch or random_batch(module.model, batch_size=2)
        out = forward_active(module.model, batch, elide_half(batch))
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_trains_adapters_only_on_the_elided_path():
    module = MLLMModule(tiny.tiny_qwen2_vl(), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable), "adapters must sit on the decoder only"
    batch = random_batch(module.model, batch_size=2)
    module.train()
    plain = forward_active(module.hf_model, batch, elide_half(batch))
    out = module.run({**batch, KEEP_MASK: elide_half(batch)})
    assert torch.allclose(out.loss, plain.loss)
    out.loss.backward()
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora_b)


def test_freeze_flags():
    module = MLLMModule(tiny.tiny_llava(), freeze_vision_tower=True, freeze_projector=True)
    inner = module.hf_model.model
    assert not any(p.requires_grad for p in inner.vision_tower.parameters())
    assert not any(p.requires_grad for p in inner.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in inner.language_model.parameters())
    with pytest.raises(ValueError, match="need a multimodal model"):
        MLLMModule(tiny.tiny_llama(), freeze_vision_tower=True)


def test_training_step_returns_token_loss():
    module = MLLMModule(tiny.tiny_video_llava())
    batch = random_batch(module.model, batch_size=2, ragged=True)
    batch[KEEP_MASK] = elide_half(batch)
    out = module.training_step(batch, 0)
    tl = out[TOKEN_LOSS]
    assert tl.shape == batch["input_ids"].shape and tl.dtype == torch.float32 and not tl.requires_grad
    assert tl[~batch[KEEP_MASK]].isnan().all()
    computed = ~tl.isnan()
    assert torch.allclose(tl[computed].mean(), out["loss"].detach())


class TestBadInput:
    @pytest.fixture(scope="class")
    def model(self):
        return tiny.tiny_llava()

    def test_keep_mask_wrong_dtype(self, model):
        batch = random_batch(model)
        with pytest.raises(TypeError, match="must be a bool tensor"):
            forward_active(model, batch, torch.ones_like(batch["input_ids"]))

    def test_keep_mask_wrong_shape(self, model):
        batch = random_batch(model)
        with pytest.raises(ValueError, match="must have the shape"):
            forward_active(model, batch, torch.ones(2, 3, dtype=torch.bool))

    def test_missing_labels(self, model):
        batch = random_batch(model)
        del batch[LABELS]
        with pytest.raises(ValueError, match="has no `labels`"):
            forward_active(model, batch)

    def test_no_supervised_token_in_batch(self, model):
        batch = random_batch(model)
        batch[LABELS].fill_(IGNORE_INDEX)
        with pytest.raises(ValueError, match="no supervised target"):
            forward_active(model, batch)

    def test_row_without_supervised_token_adds_no_loss(self, model):
        """Documented: such a row is computed but contributes nothing; the loss is the other rows'."""
        batch = random_batch(model, batch_size=2)
        batch[LABELS][1] = IGNORE_INDEX
        with torch.no_grad():
            both = forward_active(model, batch)
            first = forward_active(model, {k: v[:1] for k, v in batch.items()})
        assert torch.allclose(both.loss, first.loss, atol=1e-6)
        assert both.token_loss[1].isnan().all()

    def test_row_that_keeps_nothing(self, model):
        batch = random_batch(model)
        keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        keep[1] = False
        with pytest.raises(ValueError, match=r"keeps no position in rows \[1\]"):
            forward_active(model, batch, keep)

    def test_unsupported_model(self):
        from transformers import BertConfig, BertModel

        with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
            MLLMModule(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)))


def test_load_model_from_local_path(tmp_path):
    tiny.tiny_qwen2_vl().save_pretrained(tmp_path / "student")
    model = load_model(str(tmp_path / "student"))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    with pytest.raises(ValueError, match="only applies"):
        load_model(model, {"dtype": "float32"})


def test_a_mistyped_factory_path_fails_naming_it(monkeypatch):
    """A dotted path is a factory: an import error or a missing name is reported, never sent to the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"`model` 'regate_lightning.testing.tiny_lava': module .* no attribute"):
        load_model("regate_lightning.testing.tiny_lava")
    with pytest.raises(ValueError, match=r"`model` 'regate_lightnin.tiny.x': module 'regate_lightnin.tiny' cannot be"):
        load_model("regate_lightnin.tiny.x")
    with pytest.raises(TypeError, match=r"names a str, not a factory"):
        load_model("regate_lightning.keys.LABELS")
    assert type(load_model("regate_lightning.testing.tiny_llama", {"num_layers": 1})).__name__ == "LlamaForCausalLM"


def test_option_score_is_checked_before_the_model_is_loaded():
    with pytest.raises(ValueError, match="`option_score` must be one of"):
        MLLMModule("no-such-org/no-such-model", option_score="median")


def test_debug_recipe_runs_through_console_script(tmp_path):
    script = Path(sys.executable).with_name("regate-lightning")
    cmd = [
        str(script),
        "fit",
        "--config",
        str(ROOT / "recipes" / "debug.yaml"),
        "--trainer.max_steps=3",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and "train/loss" in metrics[0].read_text()


# --------------------------------------------------------------------------------------------------
# Per-part optimisation: parameter groups, learning rates, freezing the language model, schedules.


@pytest.mark.parametrize(
    "factory", [tiny.tiny_llava, tiny.tiny_llava_next_video, tiny.tiny_video_llava, tiny.tiny_qwen2_vl, tiny.tiny_llama]
)
def test_parameter_parts_hold_exactly_each_parts_parameters(factory):
    from regate_lightning.families import PARTS, parameter_parts

    model = factory()
    parts = resolve(model)
    groups = parameter_parts(parts)
    assert tuple(groups) == PARTS
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # disjoint, and every parameter
    tower, projector = vision_parts(parts)
    for part, modules in (("vision_tower", tower), ("projector", projector)):
        assert {id(p) for m in modules for p in m.parameters()} == {id(p) for p in groups[part]}
    decoder = {id(p) for p in parts.decoder.parameters()} | {id(p) for p in parts.lm_head.parameters()}
    assert decoder <= {id(p) for p in groups["language_model"]}


def test_part_learning_rates_become_optimizer_groups():
    module = MLLMModule(
        tiny.tiny_qwen2_vl(),
        vision_tower_lr=1e-4,
        projector_lr=1e-2,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    optimizer = module.configure_optimizers()
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert {name: g["lr"] for name, g in by_name.items()} == {
        "vision_tower": 1e-4,
        "projector": 1e-2,
        "language_model": 1e-3,
    }
    inner = module.hf_model.model
    merger = {id(p) for p in inner.visual.merger.parameters()}
    assert {id(p) for p in by_name["projector"]["params"]} == merger
    assert {id(p) for p in by_name["vision_tower"]["params"]} == {
        id(p) for p in inner.visual.parameters() if id(p) not in merger
    }


def test_lora_adapters_are_the_language_model_group():
    module = MLLMModule(tiny.tiny_llava(), lora=LoraOptions(r=4, alpha=8), language_model_lr=5e-4, projector_lr=None)
    groups = module.parameter_groups()
    assert [g["name"] for g in groups] == ["language_model"]
    assert groups[0]["lr"] == 5e-4
    assert all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in module.parameters())


def test_freeze_language_model_trains_tower_and_projector_only():
    module = MLLMModule(tiny.tiny_llava_next_video(), freeze_language_model=True)
    names = {g["name"] for g in module.parameter_groups()}
    assert names == {"vision_tower", "projector"}
    assert not any(p.requires_grad for p in module.hf_model.model.language_model.parameters())
    assert not any(p.requires_grad for p in module.hf_model.lm_head.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"projector_lr": -1.0}, "`projector_lr` must be a positive number"),
        ({"vision_tower_lr": 0}, "`vision_tower_lr` must be a positive number"),
        ({"freeze_vision_tower": True, "vision_tower_lr": 1e-4}, "`vision_tower_lr` is set but the vision tower"),
        ({"freeze_language_model": True, "lora": LoraOptions()}, "contradict each other"),
        ({"lr_schedule": "nope"}, "`lr_schedule` must be one of transformers' schedulers"),
        ({"warmup_ratio": 0.1}, "`warmup_ratio` needs `lr_schedule`"),
        ({"lr_schedule": "cosine", "warmup_ratio": 1.5}, r"`warmup_ratio` must be in \[0, 1\)"),
        ({"lr_schedule": "cosine", "lr_scheduler": lambda o: None}, "not both"),
    ],
)
def test_bad_optimisation_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLLMModule(tiny.tiny_llava(), **kwargs)


def test_freeze_language_model_refuses_a_text_only_model():
    with pytest.raises(ValueError, match="needs a multimodal model"):
        MLLMModule(tiny.tiny_llama(), freeze_language_model=True)


def test_lr_schedule_warms_up_then_decays_every_group_alike():
    import lightning.pytorch as pl

    from regate_lightning.testing import RandomDataModule

    seen: list[dict[str, float]] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    module = MLLMModule(
        tiny.tiny_llava_next_video(),
        projector_lr=1e-2,
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
        lr_schedule="cosine",
        warmup_ratio=0.25,
    )
    trainer = quiet_trainer(
        accelerator="cpu",
        max_steps=8,
        callbacks=[Watch()],
    )
    trainer.fit(module, datamodule=RandomDataModule(num_samples=32, batch_size=4, num_frames=2))
    projector = [s["projector"] for s in seen]
    # transformers' warm-up: step / warmup_steps over 2 of the 8 steps, then the cosine decay.
    assert projector[:3] == pytest.approx([0.0, 1e-2 / 2, 1e-2])
    assert projector[2:] == sorted(projector[2:], reverse=True) and projector[-1] < 1e-3
    for s in seen[1:]:
        assert s["projector"] / s["language_model"] == pytest.approx(10.0)
