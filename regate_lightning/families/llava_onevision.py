"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``: LLaVA-OneVision, LLaVA-Video-7B-Qwen2).

**Images** are tiled "anyres-max": the checkpoint's image processor (``LlavaOnevisionImageProcessor``) gives a
base tile of the whole image and the tiles of the best resolution among ``image_grid_pinpoints``
(``[tiles, 3, S, S]``, base first) with the image's original size in ``image_sizes``. The model encodes every
tile alone (SigLIP, all ``(S / P) ** 2`` patch features), lays the grid tiles' features out as one feature map,
removes the padding (``unpad_image``), shrinks it bilinearly when it holds more than ``1.1 ** 2`` times
``max_num_patches`` tiles' worth (``vision_aspect_ratio="anyres_max_9"``), and appends one newline feature
(``image_newline``) to every row: ``(S / P) ** 2`` base tokens plus ``rows * (cols + 1)``. The count comes
from the model's own ``pack_image_features`` run on an empty meta tensor (:func:`image_tokens`), as
:func:`regate_lightning.data.vision.anyres_image_tokens` does for LLaVA-NeXT.

**Videos**: every frame alone through the tower and the projector, its ``g x g`` patch features
(``g = S / P``) pooled bilinearly to ``ceil(g / 2) x ceil(g / 2)`` (``apply_pooling``), and one newline feature
appended after the last frame: a video of ``F`` frames has ``F * ceil(g / 2) ** 2 + 1`` placeholders. The
newline is a learned feature with no pixels and no frame of its own: :class:`MediaSteps` and
:class:`MediaRegions` count it as the media's ``tail``; the engine skips a frame whose every token is elided
whatever the newline's fate.

**Steps skipped.** Video frames: one step each. Images: one step per image (all its tiles), because the
interpolation and the unpadding mix neighbouring tiles' features into one token; an image whose every token
is elided is not encoded.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    MediaRegions,
    MediaSteps,
    RandomMedia,
    patch_grid,
    text_config,
    top_id,
    tower_has_cls,
)
from regate_lightning.families.llava import IMAGE_SIZE, POOLED_ANYRES, LlavaFamily, siglip_vision_config
from regate_lightning.keys import IMAGE_SIZES, PIXEL_VALUES, PIXEL_VALUES_VIDEOS, VIDEO_TYPE

IMAGE_REFUSAL = (
    "LLaVA-OneVision encodes images with anyres-max tiling, which runs through the checkpoint's own image "
    "processor only: load the student from a checkpoint whose folder has its preprocessor_config.json "
    "(with image_grid_pinpoints), or give the image as a one-frame video"
)

BATCH_NUM_IMAGES = "batch_num_images"
"""The model's optional per-sample image count: a sample with several images is not tiled (one tile each)."""


def pooled_side(grid: int) -> int:
    """Tokens per side of a pooled frame: ``ceil(grid / 2)`` (``LlavaOnevisionModel.apply_pooling``)."""
    return math.ceil(grid / 2)


def pool_windows(grid: int) -> list[int]:
    """Per pooled row (or column), the first of the two patches its bilinear weights read.

    ``apply_pooling`` resizes the ``grid``-patch side to ``ceil(grid / 2)`` with ``F.interpolate(mode="bilinear",
    align_corners=False)``, which reads output ``i`` from source ``(i + 0.5) * grid / out - 0.5`` (at least 0):
    the patches ``floor`` of it and the next. The window starts there (one earlier at the last patch), so it
    covers every patch with a weight.

    Example:
        >>> pool_windows(4), pool_windows(5), pool_windows(27)[-1]
        ([0, 2], [0, 2, 3], 25)
    """
    out = pooled_side(grid)
    scale = grid / out
    return [min(int(max(scale * (i + 0.5) - 0.5, 0.0)), max(grid - 2, 0)) for i in range(out)]


def image_tokens(
    image_size: tuple[int, int] | list[int],
    grid_pinpoints: list[list[int]],
    tower_size: int,
    patch_size: int,
    vision_aspect_ratio: str,
    tiles: int | None = None,
) -> int:
    """Placeholder tokens of one LLaVA-OneVision image, by the model's own ``pack_image_features``.

    The model's method runs on empty meta tensors (no compute) with the image's tile count, so the count is
    whatever the model builds: base tile, unpadded grid (shrunk under ``anyres_max_N``), newline per row.

    Args:
        image_size: the original ``(H, W)``.
        grid_pinpoints: the config's ``image_grid_pinpoints``.
        tower_size: the tower's ``image_size`` ``S``.
        patch_size: the tower's ``patch_size`` ``P``.
        vision_aspect_ratio: the config's ``vision_aspect_ratio`` (``"anyres_max_9"``).
        tiles: the image's tiles (default: the anyres count, base tile included; 1 for an image of a
            multi-image sample).

    Returns:
        The number of image tokens the model produces.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )

    size = [int(v) for v in image_size]
    if tiles is None:
        tiles = image_size_to_num_patches(size, grid_pinpoints, tower_size)
    grid = tower_size // patch_size
    config = types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=tower_size, patch_size=patch_size),
        image_grid_pinpoints=grid_pinpoints,
    )
    features = [torch.empty(tiles, grid * grid, 1, device="meta")]
    newline = torch.empty(1, device="meta")
    packed, _ = LlavaOnevisionModel.pack_image_features(
        types.SimpleNamespace(config=config), features, torch.tensor([size]), newline, vision_aspect_ratio
    )
    return int(packed[0].shape[0])


@dataclass(frozen=True)
class OnevisionFamily(LlavaFamily):
    """The rules of LLaVA-OneVision (see the module docstring)."""

    def frame_tokens(self, config: Any) -> int:
        """Placeholder tokens per video frame: ``ceil(g / 2) ** 2`` (the newline is per video).

        Raises:
            ValueError: a strategy that leaves the frame's features no square grid to pool.
        """
        grid = patch_grid(config.vision_config)
        cls = tower_has_cls(config.vision_config)
        if cls != (getattr(config, "vision_feature_select_strategy", "full") == "default"):
            raise ValueError(
                f"{self.name} pools a square grid of {grid} x {grid} patch features per frame: use "
                "vision_feature_select_strategy='default' with a CLS tower, 'full' without (SigLIP)"
            )
        return pooled_side(grid) ** 2

    def tail_tokens(self, config: Any, kind: str) -> int:
        """One newline feature after every video."""
        return 1 if kind == "video" else 0

    def media_keys(self, kind: str) -> tuple[str, ...]:
        """Video pixels; image tiles and their images' original sizes."""
        return (PIXEL_VALUES, IMAGE_SIZES) if kind == "image" else (PIXEL_VALUES_VIDEOS,)

    def image_tiles(self, config: Any, batch: Mapping[str, Any]) -> list[int]:
        """Tiles of every image of the batch (the model's rule: anyres, or 1 in a multi-image sample)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        sizes = batch.get(IMAGE_SIZES)
        if sizes is None:
            raise ValueError(f"{self.name}: the batch has `{PIXEL_VALUES}` but no `{IMAGE_SIZES}`")
        counts = batch.get(BATCH_NUM_IMAGES)
        alone = [True] * sizes.shape[0] if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        side = int(config.vision_config.image_size)
        return [
            image_size_to_num_patches(s, config.image_grid_pinpoints, side) if one else 1
            for s, one in zip(sizes.tolist(), alone, strict=True)
        ]

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """An image: one step of all its tiles; a video: one step per frame, and the newline as its tail."""
        pixels = batch.get(self.media_key(kind))
        if pixels is None:
            return []
        if kind == "video":
            return [MediaSteps(int(pixels.shape[1]), self.frame_tokens(config), 1, tail=1)] * int(pixels.shape[0])
        vision = config.vision_config
        out = []
        for size, tiles in zip(batch[IMAGE_SIZES].tolist(), self.image_tiles(config, batch), strict=True):
            count = image_tokens(
                size,
                config.image_grid_pinpoints,
                int(vision.image_size),
                int(vision.patch_size),
                config.vision_aspect_ratio,
                tiles,
            )
            out.append(MediaSteps(1, count, tiles))
        return out

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """A video's pooled token: the ``2 x 2`` patches its bilinear weights read (:func:`pool_windows`).

        Every frame's tokens row by row, then the video's newline as the tail.

        Raises:
            ValueError: images (their newline tokens sit inside the grid, and their features are unpadded and
                resized across tiles, so a token has no one region; visual-token elision of images uses
                ``selection="random"``, which reads none), or video pixels of the wrong shape.
        """
        pixels = batch.get(self.media_key(kind))
        if pixels is None:
            return []
        if kind == "image":
            raise ValueError(
                f"{self.name}: anyres image tokens have no pixel region each (newline tokens inside the grid, "
                "features unpadded and resized across tiles); elide image tokens with selection='random'"
            )
        if pixels.dim() != 5:
            raise ValueError(f"`{PIXEL_VALUES_VIDEOS}` must be [N, F, C, H, W], got shape {tuple(pixels.shape)}")
        vision = config.vision_config
        grid, patch = patch_grid(vision), int(vision.patch_size)
        self.frame_tokens(config)  # refuses a layout the model cannot pool
        starts = pool_windows(grid)
        width = 2 * patch if grid > 1 else patch
        crops = [
            pixels[..., y * patch : y * patch + width, x * patch : x * patch + width].flatten(2)
            for y in starts
            for x in starts
        ]
        regions = torch.stack(crops, dim=2)  # [N, F, tokens, C * width * width]
        return [MediaRegions(kind, regions[i], tail=1) for i in range(regions.shape[0])]

    def split_media(self, config: Any, batch: Mapping[str, Any], kind: str, count: int) -> list[dict[str, Tensor]]:
        """Videos one per entry; images as their tiles (``[tiles, 3, S, S]``) and original size.

        The tiles come concatenated (``[sum tiles, 3, S, S]``, this package's data layout), cut by the model's tile
        rule (:meth:`image_tiles`: the image's size and the config's ``image_grid_pinpoints``), or in the HF
        processor's padded ``[images, tiles, 3, S, S]`` layout, one image per entry.

        Raises:
            ValueError: a count that differs from ``image_sizes``, or tiles that differ from the sizes' count.
        """
        pixels = batch.get(PIXEL_VALUES)
        if kind == "video" or count == 0 or pixels is None or pixels.dim() == 5:
            return super().split_media(config, batch, kind, count)
        sizes = batch.get(IMAGE_SIZES)
        if sizes is None or sizes.shape[0] != count:
            found = None if sizes is None else sizes.shape[0]
            raise ValueError(f"`{IMAGE_SIZES}` holds {found} images but the text has {count}")
        tiles = self.image_tiles(config, batch)
        if sum(tiles) != pixels.shape[0]:
            raise ValueError(f"`{PIXEL_VALUES}` holds {pixels.shape[0]} tiles but the images' sizes make {sum(tiles)}")
        chunks = pixels.split(tiles)
        return [{PIXEL_VALUES: chunk, IMAGE_SIZES: sizes[i : i + 1]} for i, chunk in enumerate(chunks)]

    def random_media(self, config: Any, num_frames: int, generator: torch.Generator) -> RandomMedia:
        """A video of ``num_frames`` frames of random pixels: ``num_frames * ceil(g / 2) ** 2 + 1`` placeholders."""
        size = int(config.vision_config.image_size)
        count = num_frames * self.frame_tokens(config) + 1
        token = int(config.video_token_id)
        pixels = torch.randn((1, num_frames, 3, size, size), generator=generator)
        return RandomMedia([token] * count, [VIDEO_TYPE] * count, {PIXEL_VALUES_VIDEOS: pixels}, "video")


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    vision_aspect_ratio: str = "anyres_max_9",
    video_token_id: int | None = None,
    image_token_id: int | None = None,
) -> Any:
    """A tiny ``LlavaOnevisionConfig``: SigLIP (no head, as the checkpoints), Qwen2, anyres up to 3 x 3 tiles.

    A video of ``T`` frames gives ``T * ceil(image_size / 8 / 2) ** 2 + 1`` tokens.
    """
    from transformers import LlavaOnevisionConfig, SiglipVisionConfig

    tower = siglip_vision_config(image_size).to_dict()
    tower.update(vision_use_head=False)
    side = image_size
    pinpoints = [[side * r, side * c] for r in (1, 2, 3) for c in (1, 2, 3)]
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**tower),
        text_config={"model_type": "qwen2", **text_config(vocab_size, hidden_size, num_layers)},
        image_token_index=top_id(vocab_size, 1, image_token_id),
        video_token_index=top_id(vocab_size, 2, video_token_id),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
    )


FAMILY = OnevisionFamily(
    "llava_onevision",
    classes=("LlavaOnevisionForConditionalGeneration",),
    model_types=("llava_onevision",),
    projectors=("multi_modal_projector",),
    image_refusal=IMAGE_REFUSAL,
    video_processor="LlavaOnevisionVideoProcessor",
    encoders=(
        ("image", "vision_tower", "multi_modal_projector"),
        ("video", "vision_tower", "multi_modal_projector"),
    ),
    tiny={"LlavaOnevisionForConditionalGeneration": tiny_config},
    **POOLED_ANYRES,
)
