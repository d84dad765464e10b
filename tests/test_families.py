"""The family registry: one entry per family, and every reader of it (engine, data, random batches) agrees."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers
from references import TOL, teacher_error

from regate_lightning.data.vision import VisionSpec
from regate_lightning.elision import forward_active
from regate_lightning.families import (
    FAMILIES,
    FAMILY_MODULES,
    GRID,
    TEXT_ONLY,
    family_of,
    resolve,
    tower_has_cls,
    vision_parts,
)
from regate_lightning.testing import tiny
from regate_lightning.testing.batches import media_layout, random_batch

MULTIMODAL = tiny.tiny_classes()


def test_every_entry_names_real_classes_and_model_types():
    for module_name in FAMILY_MODULES:
        family = importlib.import_module(f"regate_lightning.families.{module_name}").FAMILY
        assert FAMILIES[module_name] is family
    for family in FAMILIES.values():
        for name in family.classes:
            assert hasattr(transformers, name), name
        assert family.image_key or family.video_key, family.name
        assert set(family.tiny) == set(family.classes), f"{family.name}: a tiny config for every class"
    built = {family_of(tiny.tiny_model(name)).name for name in MULTIMODAL}
    assert built == set(FAMILIES), "every family has a tiny model in the test suite"
    for name in MULTIMODAL:
        model = tiny.tiny_model(name)
        assert type(model).__name__ == name
        assert model.config.model_type in family_of(model).model_types


@pytest.mark.parametrize("name", MULTIMODAL)
def test_engine_and_data_read_the_same_entry(name):
    model = tiny.tiny_model(name)
    parts = resolve(model)
    assert parts.family is family_of(model) is family_of(model.config)
    tower, projector = vision_parts(parts)
    assert tower and projector
    assert not {id(p) for m in tower for p in m.parameters()} & {id(p) for m in projector for p in m.parameters()}
    spec = VisionSpec.from_model(model)
    assert spec.family == parts.family.name
    assert spec.is_qwen == (parts.family.placeholders == GRID) == parts.mrope


@pytest.mark.parametrize(
    ("factory", "strategy"),
    [
        (tiny.tiny_llava, "default"),
        (tiny.tiny_llava, "full"),  # CLIP keeps its CLS token
        (lambda: tiny.tiny_llava(vision="siglip"), "full"),  # SigLIP has none
        (tiny.tiny_video_llava, "default"),
        (tiny.tiny_llava_next_video, "default"),
        (tiny.tiny_qwen2_vl, None),
    ],
)
def test_random_batches_and_vision_spec_count_the_same_placeholders(factory, strategy):
    """The random batches and the data pipeline use one placeholder rule; the HF model accepts the count."""
    model = factory()
    if strategy is not None:
        model.config.vision_feature_select_strategy = strategy
    spec = VisionSpec.from_model(model)
    frames = 2
    token_id, count, layout = media_layout(model, frames)
    if spec.is_qwen:
        pixels = torch.zeros(frames, 3, *spec.size, dtype=torch.uint8)
        assert spec.process_video(pixels).num_tokens == count
    elif spec.video_key is not None:
        assert layout["key"] == spec.video_key and count == frames * spec.tokens_per_frame
    else:
        assert layout["key"] == spec.image_key and count == spec.tokens_per_image
    assert token_id in spec.media_token_ids
    forward_active(model, random_batch(model, batch_size=1, num_frames=frames))  # HF checks the count itself


@pytest.mark.parametrize(
    ("name", "config", "causal_lm"),
    [
        ("Gemma3ForConditionalGeneration", {}, "Gemma3ForCausalLM"),
        ("SmolVLMForConditionalGeneration", {}, "LlamaForCausalLM"),
        ("VideoLlama3ForConditionalGeneration", {}, "Qwen2ForCausalLM"),
        ("LlavaOnevisionForConditionalGeneration", {}, "Qwen2ForCausalLM"),
        ("InternVLForConditionalGeneration", {"text_model_type": "qwen2"}, "Qwen2ForCausalLM"),  # InternVL3
        ("InternVLForConditionalGeneration", {"text_model_type": "qwen3"}, "Qwen3ForCausalLM"),  # most InternVL3.5
    ],
    ids=["gemma3", "smolvlm", "video_llama_3", "llava_onevision", "internvl-qwen2", "internvl-qwen3"],
)
def test_teacher_is_the_students_text_backbone(name, config, causal_lm):
    """``Teacher.from_student``'s reference losses equal the student's text backbone as its own HF causal LM, with
    the student's decoder and head weights, run on the text positions with their original position ids."""
    model = tiny.tiny_model(name, **config).eval()
    batch = random_batch(model, batch_size=2, num_frames=2, ragged=True, seed=3)
    assert teacher_error(model, batch, causal_lm) < TOL


def test_cls_rule():
    clip, siglip = tiny.tiny_llava().config.vision_config, tiny.tiny_llava(vision="siglip").config.vision_config
    assert tower_has_cls(clip) and not tower_has_cls(siglip)
    with pytest.raises(ValueError, match="unknown vision tower 'pixtral'"):
        tower_has_cls(type("Config", (), {"model_type": "pixtral"})())


def test_text_only_and_unsupported_models():
    assert resolve(tiny.tiny_llama()).family is TEXT_ONLY and not TEXT_ONLY.multimodal
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(TypeError, match="model class BertModel is not supported"):
        resolve(transformers.BertModel(bert))
    with pytest.raises(ValueError, match="model type 'bert' is not supported"):
        family_of(transformers.BertConfig())
