"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): pooled frames, anyres images.

A video frame gives ``((S / P) // stride) ** 2`` tokens (the tower's patches, average-pooled ``stride x stride``
by ``LlavaNextVideoPooler``); every frame is encoded alone. Images are tiled by the config's
``image_grid_pinpoints`` ("anyres"), which runs through the checkpoint's own image processor only; their count
is :func:`regate_lightning.data.vision.anyres_image_tokens` of the image's original size.
"""

from __future__ import annotations

from typing import Any

from regate_lightning.families.base import DEFAULT_VOCAB, text_config, top_id
from regate_lightning.families.llava import IMAGE_SIZE, POOLED_ANYRES, LlavaFamily, clip_vision_config

IMAGE_REFUSAL = (
    "LLaVA-NeXT-Video encodes images with anyres tiling, which runs through the checkpoint's own image "
    "processor only: load the student from a checkpoint whose folder has its preprocessor_config.json "
    "(with image_grid_pinpoints), or give the image as a one-frame video"
)


def llava_next_video_config(
    vision: Any,
    text: dict[str, Any],
    video_token_id: int | None = None,
    image_token_id: int | None = None,
    spatial_pool_stride: int = 2,
    vision_feature_layer: int = -1,
) -> Any:
    """A ``LlavaNextVideoConfig``: pooled frames (2x2 by default), placeholders at the top of the vocabulary.

    ``vision_feature_layer=-1`` reads the tower's last hidden state; released checkpoints use -2 (the last
    tower layer then never reaches the loss, see :meth:`LlavaFamily.unused_vision_modules`).
    """
    from transformers import LlamaConfig, LlavaNextVideoConfig

    vocab = text["vocab_size"]
    return LlavaNextVideoConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        video_token_index=top_id(vocab, 2, video_token_id),
        image_token_index=top_id(vocab, 1, image_token_id),
        vision_feature_layer=vision_feature_layer,
        image_grid_pinpoints=[[vision.image_size, vision.image_size]],
        spatial_pool_stride=spatial_pool_stride,
    )


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    video_token_id: int | None = None,
    image_token_id: int | None = None,
    vision_feature_layer: int = -1,
) -> Any:
    """A tiny LLaVA-NeXT-Video config: a video of T frames gives ``T * (image_size / 8 / 2) ** 2`` tokens.

    ``vision_feature_layer=-2`` reads the tower as released LLaVA-NeXT-Video checkpoints do.
    """
    text = text_config(vocab_size, hidden_size, num_layers)
    vision = clip_vision_config(image_size)
    return llava_next_video_config(
        vision, text, video_token_id, image_token_id, vision_feature_layer=vision_feature_layer
    )


FAMILY = LlavaFamily(
    "llava_next_video",
    classes=("LlavaNextVideoForConditionalGeneration",),
    model_types=("llava_next_video",),
    projectors=("multi_modal_projector", "vision_resampler"),
    image_refusal=IMAGE_REFUSAL,
    video_processor="LlavaNextVideoVideoProcessor",
    encoders=(("video", "vision_tower", "multi_modal_projector"),),
    frames_alone=True,
    media_only=(("image", "image_newline"), ("video", "vision_resampler")),
    tiny={"LlavaNextVideoForConditionalGeneration": tiny_config},
    **POOLED_ANYRES,
)
