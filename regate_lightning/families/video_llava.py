"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): separate image and video towers, CLS kept per frame.

An image gives LLaVA's count; a video frame ``(S / P) ** 2 + CLS`` tokens (every frame keeps the tower's class
token), each frame encoded alone.
"""

from __future__ import annotations

from typing import Any

from regate_lightning.families.base import DEFAULT_VOCAB, PATCHES, text_config, top_id
from regate_lightning.families.llava import IMAGE_SIZE, LlavaFamily, clip_vision_config
from regate_lightning.keys import PIXEL_VALUES_IMAGES, PIXEL_VALUES_VIDEOS


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    video_token_id: int | None = None,
    image_token_id: int | None = None,
) -> Any:
    """A tiny Video-LLaVA config: a video of T frames gives ``T * ((image_size / 8) ** 2 + 1)`` tokens."""
    from transformers import LlamaConfig, VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config=clip_vision_config(image_size),
        text_config=LlamaConfig(**text_config(vocab_size, hidden_size, num_layers)),
        video_token_index=top_id(vocab_size, 2, video_token_id),
        image_token_index=top_id(vocab_size, 1, image_token_id),
        vision_feature_layer=-1,
    )


FAMILY = LlavaFamily(
    "video_llava",
    classes=("VideoLlavaForConditionalGeneration",),
    model_types=("video_llava",),
    towers=("video_tower", "image_tower"),
    projectors=("multi_modal_projector",),
    placeholders=PATCHES,
    video_cls=True,
    image_key=PIXEL_VALUES_IMAGES,
    video_key=PIXEL_VALUES_VIDEOS,
    video_processor="VideoLlavaVideoProcessor",
    unused_tower_heads=True,
    encoders=(
        ("image", "image_tower", "multi_modal_projector"),
        ("video", "video_tower", "multi_modal_projector"),
    ),
    frames_alone=True,
    media_only=(("image", "image_tower"), ("video", "video_tower")),
    tiny={"VideoLlavaForConditionalGeneration": tiny_config},
)
