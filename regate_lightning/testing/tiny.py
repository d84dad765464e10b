"""Tiny random-initialised models of every supported family, built from configs (no download).

They serve the tests, the ``debug`` recipes and the CPU demo. Each factory returns a real HF model
class; only the sizes are small. Placeholder token ids default to the last ids of the vocabulary, as
transformers 5 requires them to be smaller than ``vocab_size``.

A recipe names a factory by its dotted path, e.g. ``model: regate_lightning.testing.tiny_llava``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

DEFAULT_VOCAB = 512
IMAGE_SIZE = 32
PATCH_SIZE = 8


def _text_kwargs(vocab_size: int, hidden_size: int, num_layers: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _clip_vision(image_size: int = IMAGE_SIZE, hidden_size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=hidden_size,
    )


def _finish(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    del seed  # seeding happens before construction; kept for a uniform signature
    model.config.use_cache = False
    return model.float()


def tiny_llama(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A tiny ``LlamaForCausalLM`` (text-only student or teacher)."""
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(LlamaConfig(**_text_kwargs(vocab_size, hidden_size, num_layers))), seed)


def tiny_qwen2(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Qwen2ForCausalLM:
    """A tiny ``Qwen2ForCausalLM`` (text-only student or teacher)."""
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(vocab_size, hidden_size, num_layers))), seed)


def tiny_llava(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision: str = "clip",
    image_size: int = IMAGE_SIZE,
    image_token_id: int | None = None,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A tiny ``LlavaForConditionalGeneration`` with a CLIP or SigLIP tower.

    With CLIP the CLS token is dropped (``"default"``): ``(image_size / 8) ** 2`` image tokens.
    SigLIP has no CLS token, so it uses ``"full"`` with the same count.
    """
    if vision not in ("clip", "siglip"):
        raise ValueError(f"`vision` must be 'clip' or 'siglip', got {vision!r}")
    torch.manual_seed(seed)
    if vision == "clip":
        vcfg: Any = _clip_vision(image_size)
        strategy = "default"
    else:
        vcfg = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=PATCH_SIZE,
        )
        strategy = "full"
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=LlamaConfig(**_text_kwargs(vocab_size, hidden_size, num_layers)),
        image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
    )
    return _finish(LlavaForConditionalGeneration(cfg), seed)


def tiny_llava_next_video(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    video_token_id: int | None = None,
    image_token_id: int | None = None,
    seed: int = 0,
) -> LlavaNextVideoForConditionalGeneration:
    """A tiny ``LlavaNextVideoForConditionalGeneration``.

    A video of T frames gives ``T * (image_size / 8 / 2) ** 2`` video tokens (2x2 average pooling).
    """
    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(
        vision_config=_clip_vision(image_size),
        text_config=LlamaConfig(**_text_kwargs(vocab_size, hidden_size, num_layers)),
        video_token_index=vocab_size - 2 if video_token_id is None else video_token_id,
        image_token_index=vocab_size - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size]],
        spatial_pool_stride=2,
    )
    return _finish(LlavaNextVideoForConditionalGeneration(cfg), seed)


def tiny_video_llava(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    video_token_id: int | None = None,
    image_token_id: int | None = None,
    seed: int = 0,
) -> VideoLlavaForConditionalGeneration:
    """A tiny ``VideoLlavaForConditionalGeneration``.

    A video of T frames gives ``T * ((image_size / 8) ** 2 + 1)`` video tokens (CLS kept per frame).
    """
    torch.manual_seed(seed)
    cfg = VideoLlavaConfig(
        vision_config=_clip_vision(image_size),
        text_config=LlamaConfig(**_text_kwargs(vocab_size, hidden_size, num_layers)),
        video_token_index=vocab_size - 2 if video_token_id is None else video_token_id,
        image_token_index=vocab_size - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=-1,
    )
    return _finish(VideoLlavaForConditionalGeneration(cfg), seed)


def _qwen_vl_kwargs(vocab_size: int, hidden_size: int, num_layers: int) -> dict[str, Any]:
    text = _text_kwargs(vocab_size, hidden_size, num_layers)
    half = hidden_size // text["num_attention_heads"] // 2  # rotary frequencies per head
    temporal = half // 4
    height = (half - temporal) // 2
    section = [temporal, height, half - temporal - height]  # [2, 3, 3] at hidden 64, as Qwen2-VL's 16/24/24
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    return {
        "text_config": text,
        "image_token_id": vocab_size - 1,
        "video_token_id": vocab_size - 2,
        "vision_start_token_id": vocab_size - 3,
        "vision_end_token_id": vocab_size - 4,
    }


def tiny_qwen2_vl(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Qwen2VLForConditionalGeneration:
    """A tiny ``Qwen2VLForConditionalGeneration`` (patch 8, temporal patch 2, merge 2).

    An image or video of grid ``(t, h, w)`` patches gives ``t * h * w / 4`` placeholder tokens.
    """
    torch.manual_seed(seed)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": hidden_size,
        "num_heads": 4,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    cfg = Qwen2VLConfig(vision_config=vision, **_qwen_vl_kwargs(vocab_size, hidden_size, num_layers))
    return _finish(Qwen2VLForConditionalGeneration(cfg), seed)


def tiny_qwen2_5_vl(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (patch 8, temporal patch 2, merge 2)."""
    torch.manual_seed(seed)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": hidden_size,
        "num_heads": 4,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    }
    cfg = Qwen2_5_VLConfig(vision_config=vision, **_qwen_vl_kwargs(vocab_size, hidden_size, num_layers))
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg), seed)
