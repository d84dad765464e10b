"""Tiny random-initialised models of every supported family, built from configs (no download).

They serve the tests, the ``debug`` recipes and the benchmarks' smoke runs. Each factory returns a real HF
model class; only the sizes are small. Placeholder token ids default to the last ids of the vocabulary, as
transformers 5 requires them to be smaller than ``vocab_size``.

The config builders (:func:`text_config`, :func:`clip_vision_config`, :func:`llava_next_video_config`,
:func:`qwen_vl_kwargs`) are the one place where a small model's config is written: the factories here,
the demo's student (:mod:`regate_lightning.demo.student`) and the benchmarks' models of any size use them.

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


# --------------------------------------------------------------------------------------------------
# The config builders: the tiny factories below, the demo's student and the benchmarks' models all use them.


def text_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 4096,
    tie_word_embeddings: bool | None = None,
) -> dict[str, Any]:
    """Keyword arguments of a small Llama-style decoder config (``LlamaConfig``, ``Qwen2Config`` or a VLM's
    ``text_config``): pad/bos/eos ids 0/1/2, the MLP twice the hidden size unless given.

    Args:
        vocab_size: vocabulary size; multimodal builders put the placeholder ids at its top.
        hidden_size: hidden size.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention).
        intermediate_size: MLP width; default ``2 * hidden_size``.
        max_positions: ``max_position_embeddings``.
        tie_word_embeddings: set the key only when given (the config class's default otherwise).

    Returns:
        A new dict.

    Example:
        >>> text_config(hidden_size=32)["intermediate_size"]
        64
    """
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size if intermediate_size is None else intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_positions,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    return config


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) for a head dimension, in Qwen2-VL's proportions.

    Example:
        >>> mrope_section(128), mrope_section(16)
        ([16, 24, 24], [2, 3, 3])
    """
    half = head_dim // 2
    first = half // 4
    rest = half - first
    return [first + rest % 2, rest // 2, rest // 2]


def qwen_vl_kwargs(text: dict[str, Any], rope_theta: float = 10000.0) -> dict[str, Any]:
    """Keyword arguments of a Qwen2-VL / Qwen2.5-VL config around ``text`` (from :func:`text_config`).

    Adds M-RoPE to the text config (:func:`mrope_section`) and puts the four placeholder ids (image,
    video, vision start, vision end) at the top of the vocabulary.
    """
    vocab = text["vocab_size"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section(head_dim)}
    return {
        "text_config": {**text, "rope_parameters": rope},
        "image_token_id": vocab - 1,
        "video_token_id": vocab - 2,
        "vision_start_token_id": vocab - 3,
        "vision_end_token_id": vocab - 4,
    }


def clip_vision_config(
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
) -> CLIPVisionConfig:
    """A small CLIP vision tower config (MLP twice the hidden size unless given)."""
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


def llava_next_video_config(
    vision: CLIPVisionConfig,
    text: dict[str, Any],
    video_token_id: int | None = None,
    image_token_id: int | None = None,
    spatial_pool_stride: int = 2,
    vision_feature_layer: int = -1,
) -> LlavaNextVideoConfig:
    """A LLaVA-NeXT-Video config: pooled frames (2x2 by default), placeholders at the top of the vocabulary.

    ``vision_feature_layer=-1`` reads the tower's last hidden state; released checkpoints use -2 (the last
    tower layer then never reaches the loss, see :func:`~regate_lightning.families.unused_vision_modules`).
    """
    vocab = text["vocab_size"]
    return LlavaNextVideoConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        video_token_index=vocab - 2 if video_token_id is None else video_token_id,
        image_token_index=vocab - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=vision_feature_layer,
        image_grid_pinpoints=[[vision.image_size, vision.image_size]],
        spatial_pool_stride=spatial_pool_stride,
    )


# --------------------------------------------------------------------------------------------------
# The tiny factories.


def _finish(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    del seed  # seeding happens before construction; kept for a uniform signature
    model.config.use_cache = False
    return model.float()


def tiny_llama(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A tiny ``LlamaForCausalLM`` (text-only student or teacher)."""
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(LlamaConfig(**text_config(vocab_size, hidden_size, num_layers))), seed)


def tiny_qwen2(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Qwen2ForCausalLM:
    """A tiny ``Qwen2ForCausalLM`` (text-only student or teacher)."""
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(Qwen2Config(**text_config(vocab_size, hidden_size, num_layers))), seed)


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
        vcfg: Any = clip_vision_config(image_size)
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
        text_config=LlamaConfig(**text_config(vocab_size, hidden_size, num_layers)),
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
    vision_feature_layer: int = -1,
) -> LlavaNextVideoForConditionalGeneration:
    """A tiny ``LlavaNextVideoForConditionalGeneration``.

    A video of T frames gives ``T * (image_size / 8 / 2) ** 2`` video tokens (2x2 average pooling).
    ``vision_feature_layer=-2`` reads the tower as released LLaVA-NeXT-Video checkpoints do.
    """
    torch.manual_seed(seed)
    text = text_config(vocab_size, hidden_size, num_layers)
    vision = clip_vision_config(image_size)
    cfg = llava_next_video_config(
        vision, text, video_token_id, image_token_id, vision_feature_layer=vision_feature_layer
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
        vision_config=clip_vision_config(image_size),
        text_config=LlamaConfig(**text_config(vocab_size, hidden_size, num_layers)),
        video_token_index=vocab_size - 2 if video_token_id is None else video_token_id,
        image_token_index=vocab_size - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=-1,
    )
    return _finish(VideoLlavaForConditionalGeneration(cfg), seed)


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
    cfg = Qwen2VLConfig(vision_config=vision, **qwen_vl_kwargs(text_config(vocab_size, hidden_size, num_layers)))
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
    cfg = Qwen2_5_VLConfig(vision_config=vision, **qwen_vl_kwargs(text_config(vocab_size, hidden_size, num_layers)))
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg), seed)


def byte_tokenizer() -> Any:
    """A tokenizer for the tiny models: one token per UTF-8 byte, no merges, nothing to download.

    ``<pad>``, ``<s>``, ``</s>``, ``<image>``, ``<video>`` are ids 0-4 and the 256 bytes ids 5-260, so every
    id stays below the tiny models' placeholder ids (their last vocabulary ids, 508-511 of 512). It has the
    "USER: ... ASSISTANT: ..." chat template of :mod:`regate_lightning.data.render`. A recipe names it as
    ``tokenizer: regate_lightning.testing.byte_tokenizer``; a real checkpoint brings its own tokenizer.

    Example:
        >>> tok = byte_tokenizer()
        >>> len(tok), tok("hi")["input_ids"]
        (261, [76, 77])
    """
    from regate_lightning.data.synthetic import SPECIAL_TOKENS, train_tokenizer

    return train_tokenizer([], vocab_size=256 + len(SPECIAL_TOKENS))
