"""LLaVA (``LlavaForConditionalGeneration``): a CLIP or SigLIP tower, a projector, one token per patch.

:class:`LlavaFamily` holds the rules of the LLaVA line whose placeholders are one per tower patch
(:data:`~regate_lightning.families.base.PATCHES`) or per pooled patch
(:data:`~regate_lightning.families.base.POOLED`): LLaVA, LLaVA-NeXT-Video and Video-LLaVA use it.

Image tokens: ``(S / P) ** 2 + CLS - [default]`` where ``S`` is the tower's ``image_size``, ``P`` its
``patch_size``, ``CLS`` 1 for a tower with a class token (CLIP) and 0 without (SigLIP), and ``[default]`` 1
under ``vision_feature_select_strategy="default"``, which drops the first feature (HF's LLaVA does
``[:, 1:]``), 0 under ``"full"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    PATCHES,
    POOLED,
    Family,
    MediaRegions,
    MediaSteps,
    ModelParts,
    RandomMedia,
    frame_regions,
    patch_grid,
    text_config,
    top_id,
    tower_config,
    tower_has_cls,
)
from regate_lightning.keys import IMAGE_SIZES, IMAGE_TYPE, PIXEL_VALUES, PIXEL_VALUES_VIDEOS, VIDEO_TYPE

POOLED_ANYRES: dict[str, Any] = {
    "towers": ("vision_tower",),
    "placeholders": POOLED,
    "image_key": PIXEL_VALUES,
    "video_key": PIXEL_VALUES_VIDEOS,
    "anyres_images": True,
    "image_sizes_key": IMAGE_SIZES,
    "unused_tower_heads": True,
}
"""The :class:`~regate_lightning.families.base.Family` fields LLaVA-NeXT-Video and LLaVA-OneVision share: one tower
for images and videos, pooled video frames, anyres images (through the checkpoint's image processor only, counted
from ``image_sizes``), the tower's pooling head unused."""

IMAGE_SIZE = 32
"""Tower input side of the tiny test models."""
PATCH_SIZE = 8
"""Patch side of the tiny test models."""


def clip_vision_config(
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
) -> Any:
    """A small ``CLIPVisionConfig`` (MLP twice the hidden size unless given)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


def siglip_vision_config(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, hidden_size: int = 32) -> Any:
    """A small ``SiglipVisionConfig`` (2 layers, 4 heads)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        **tower_config(image_size, patch_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    )


def layers_after_feature_layer(vision_model: nn.Module, feature_layer: int | list[int]) -> list[nn.Module]:
    """The encoder layers of a CLIP/SigLIP tower that come after every hidden state the model reads.

    ``hidden_states[k]`` is the output of the first ``k`` of the tower's ``N`` layers (``k = 0``: the
    embeddings), so with the deepest selected index ``K`` (negative indices counted from ``N + 1``) the
    layers ``K .. N - 1`` never reach the features: LLaVA's ``vision_feature_layer=-2`` leaves the last one.

    Args:
        vision_model: the tower's transformer (with ``encoder.layers``).
        feature_layer: the config's ``vision_feature_layer`` (an index or a list of indices).

    Returns:
        The unused layers (empty for a tower without ``encoder.layers``).
    """
    layers = getattr(getattr(vision_model, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    states = len(layers) + 1
    indices = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    deepest = max(int(i) % states for i in indices)
    return list(layers)[deepest:]


@dataclass(frozen=True)
class LlavaFamily(Family):
    """The rules of the LLaVA line with one token per (pooled) tower patch (see the module docstring).

    Attributes:
        video_cls: whether every video frame keeps the tower's class token (Video-LLaVA).
    """

    video_cls: bool = False

    def image_tokens(self, config: Any) -> int:
        """Placeholder tokens per image of a :data:`PATCHES` family.

        Raises:
            ValueError: the family has no per-image count or takes no images; an unknown tower.
        """
        if self.placeholders != PATCHES or self.image_key is None:
            raise ValueError(f"{self.name} has no fixed number of placeholder tokens per image")
        grid = patch_grid(config.vision_config)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return grid * grid + int(tower_has_cls(config.vision_config)) - int(strategy == "default")

    def frame_tokens(self, config: Any) -> int:
        """Placeholder tokens per video frame.

        Raises:
            ValueError: the family takes no videos; an unknown tower; a pooled family whose features cannot
                form a square grid.
        """
        if self.video_key is None:
            raise ValueError(f"{self.name} has no fixed number of placeholder tokens per video frame")
        vision = config.vision_config
        grid = patch_grid(vision)
        cls = tower_has_cls(vision)
        if self.placeholders == PATCHES:
            return grid * grid + int(cls and self.video_cls)
        if getattr(config, "vision_feature_select_strategy", "default") == "full" and cls:
            raise ValueError(
                f"{self.name} with vision_feature_select_strategy='full' and a CLS tower cannot pool: use 'default'"
            )
        pooled = grid // int(config.spatial_pool_stride)
        return pooled * pooled

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """One step per image; one step per video frame (see :meth:`Family.media_steps`)."""
        pixels = batch.get(self.media_key(kind))
        if pixels is None:
            return []
        if kind == "image":
            return [MediaSteps(1, self.image_tokens(config), 1)] * int(pixels.shape[0])
        return [MediaSteps(int(pixels.shape[1]), self.frame_tokens(config), 1)] * int(pixels.shape[0])

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """The token -> region rule (see :meth:`Family.media_regions`).

        * :data:`PATCHES`: a token is one tower patch (``P x P`` pixels); a CLS token (Video-LLaVA's frames,
          a CLIP image under ``"full"``) stands for the whole frame; under ``"default"`` the first feature is
          dropped, as HF's LLaVA does;
        * :data:`POOLED`: a token is ``stride x stride`` patches (``stride * P`` pixels a side), as
          ``LlavaNextVideoPooler`` pools them (a remainder of patches that does not fill a pool is dropped).

        Raises:
            ValueError: a pixel tensor of the wrong shape.
        """
        key = self.media_key(kind)
        pixels = batch.get(key)
        if pixels is None:
            return []
        vision = config.vision_config
        grid, patch = patch_grid(vision), int(vision.patch_size)
        frames = pixels.unsqueeze(1) if kind == "image" else pixels
        if frames.dim() != 5:
            want = "[N, C, H, W]" if kind == "image" else "[N, F, C, H, W]"
            raise ValueError(f"`{key}` must be {want}, got shape {tuple(pixels.shape)}")
        if self.placeholders == POOLED:
            stride = int(config.spatial_pool_stride)
            return frame_regions(kind, frames, patch * stride, grid // stride)
        cls = tower_has_cls(vision)
        if kind == "video":
            return frame_regions(kind, frames, patch, grid, lead=cls and self.video_cls)
        default = getattr(config, "vision_feature_select_strategy", "default") == "default"
        # Features are [CLS] + patches; "default" drops the first: the CLS token, or a CLS-less tower's first patch.
        return frame_regions(kind, frames, patch, grid, lead=cls and not default, drop_first=default and not cls)

    def unused_vision_modules(self, parts: ModelParts) -> list[nn.Module]:
        """The tower's parts after the hidden state the LLaVA line reads (``vision_feature_layer``).

        CLIP's ``post_layernorm``, SigLIP's pooling ``head`` and every encoder layer after the deepest selected
        hidden state (the last layer under LLaVA's usual ``vision_feature_layer=-2``) get no gradient; under
        plain DDP such parameters stop training with "parameters that were not used".
        :class:`~regate_lightning.MLLMModule` freezes them (their values do not affect any output).
        """
        if not self.unused_tower_heads:
            return []
        from regate_lightning.families import vision_parts

        tower, _ = vision_parts(parts)
        found = []
        for module in tower:
            vision_model = getattr(module, "vision_model", module)
            found += [
                getattr(vision_model, n)
                for n in ("post_layernorm", "head")
                if isinstance(getattr(vision_model, n, None), nn.Module)
            ]
            found += layers_after_feature_layer(vision_model, getattr(parts.model.config, "vision_feature_layer", -1))
        return found

    def random_media(self, config: Any, num_frames: int, generator: torch.Generator) -> RandomMedia:
        """A video of ``num_frames`` frames of random pixels where the family takes videos, else an image."""
        size = int(config.vision_config.image_size)
        if self.video_key is not None:
            count = num_frames * self.frame_tokens(config)
            token = int(config.video_token_id)
            pixels = torch.randn((1, num_frames, 3, size, size), generator=generator)
            return RandomMedia([token] * count, [VIDEO_TYPE] * count, {self.video_key: pixels}, "video")
        assert self.image_key is not None
        count = self.image_tokens(config)
        token = int(config.image_token_id)
        pixels = torch.randn((1, 3, size, size), generator=generator)
        return RandomMedia([token] * count, [IMAGE_TYPE] * count, {self.image_key: pixels}, "image")


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision: str = "clip",
    image_size: int = IMAGE_SIZE,
    image_token_id: int | None = None,
) -> Any:
    """A tiny ``LlavaConfig`` with a CLIP or SigLIP tower.

    With CLIP the CLS token is dropped (``"default"``): ``(image_size / 8) ** 2`` image tokens. SigLIP has no
    CLS token, so it uses ``"full"`` with the same count.

    Raises:
        ValueError: ``vision`` is neither ``"clip"`` nor ``"siglip"``.
    """
    from transformers import LlamaConfig, LlavaConfig

    if vision not in ("clip", "siglip"):
        raise ValueError(f"`vision` must be 'clip' or 'siglip', got {vision!r}")
    if vision == "clip":
        tower, strategy = clip_vision_config(image_size), "default"
    else:
        tower, strategy = siglip_vision_config(image_size), "full"
    return LlavaConfig(
        vision_config=tower,
        text_config=LlamaConfig(**text_config(vocab_size, hidden_size, num_layers)),
        image_token_id=top_id(vocab_size, 1, image_token_id),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
    )


FAMILY = LlavaFamily(
    "llava",
    classes=("LlavaForConditionalGeneration",),
    model_types=("llava",),
    towers=("vision_tower",),
    projectors=("multi_modal_projector",),
    placeholders=PATCHES,
    image_key=PIXEL_VALUES,
    unused_tower_heads=True,
    encoders=(("image", "vision_tower", "multi_modal_projector"),),
    tiny={"LlavaForConditionalGeneration": tiny_config},
)
