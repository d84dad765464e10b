"""Qwen2-VL and Qwen2.5-VL: patches of a ``(t, h, w)`` grid, merged ``merge x merge`` into one token, M-RoPE.

:class:`QwenVLFamily` holds the rules of the Qwen-VL line (Qwen3-VL and Qwen3.5 build on it): an image or
video of grid ``(t, h, w)`` patches gives ``t * h * w / merge ** 2`` placeholder tokens, wrapped in vision
start / end tokens; the pixels are ``[sum t * h * w, C * tp * P * P]`` patch rows in the order of
``qwen_patchify`` (grid order ``(t, h / m, w / m, m, m)``: the ``m * m`` patches of a token are consecutive
rows); the model needs ``mm_token_type_ids`` and computes 3-D M-RoPE position ids (``get_rope_index``) on the
full sequence. The tower attends within one temporal patch, so temporal patches are encoded independently.
Qwen2.5-VL also takes ``second_per_grid_ts`` per video.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    GRID,
    Family,
    MediaRegions,
    MediaSteps,
    RandomMedia,
    text_config,
    top_id,
)
from regate_lightning.keys import (
    IMAGE_GRID_THW,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    SECOND_PER_GRID_TS,
    VIDEO_GRID_THW,
    VIDEO_TYPE,
)

PATCH_SIZE = 8
"""Patch side of the tiny test models."""


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


def placeholder_ids(vocab_size: int) -> dict[str, int]:
    """A Qwen-VL config's image, video, vision start and vision end ids, at the top of the vocabulary."""
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {key: top_id(vocab_size, rank) for rank, key in enumerate(keys, start=1)}


def qwen_vl_kwargs(text: dict[str, Any], rope_theta: float = 10000.0) -> dict[str, Any]:
    """Keyword arguments of a Qwen2-VL / Qwen2.5-VL config around ``text`` (from :func:`text_config`).

    Adds M-RoPE to the text config (:func:`mrope_section`) and puts the four placeholder ids (image,
    video, vision start, vision end) at the top of the vocabulary.
    """
    vocab = text["vocab_size"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section(head_dim)}
    return {"text_config": {**text, "rope_parameters": rope}, **placeholder_ids(vocab)}


def grid_regions(kind: str, pixels: Tensor, grids: Tensor, merge: int) -> list[MediaRegions]:
    """Qwen-VL patch rows ``[sum t*h*w, D]`` cut per media of grid ``(t, h, w)`` into ``merge x merge`` blocks.

    Raises:
        ValueError: pixels whose row count does not match the grids.
    """
    sizes = [(int(t), int(h), int(w)) for t, h, w in grids.tolist()]
    total = sum(t * h * w for t, h, w in sizes)
    if pixels.dim() != 2 or pixels.shape[0] != total:
        raise ValueError(f"{kind} patches have shape {tuple(pixels.shape)}, but the grids {sizes} need {total} rows")
    out, start = [], 0
    for t, h, w in sizes:
        rows = pixels[start : start + t * h * w]
        out.append(MediaRegions(kind, rows.reshape(t, h * w // (merge * merge), merge * merge * pixels.shape[1])))
        start += t * h * w
    return out


@dataclass(frozen=True)
class QwenVLFamily(Family):
    """The rules of the Qwen-VL line (see the module docstring)."""

    def grid_key(self, kind: str) -> str:
        """The batch key of the ``(t, h, w)`` grids of ``kind``."""
        assert self.grid_keys is not None
        return self.grid_keys[0 if kind == "image" else 1]

    def grids(self, batch: Mapping[str, Any], kind: str) -> Tensor:
        """The batch's ``(t, h, w)`` grids of the media of ``kind`` (int64 ``[N, 3]``).

        Raises:
            ValueError: the batch has pixels of ``kind`` but no grids.
        """
        grids = batch.get(self.grid_key(kind))
        if grids is None:
            raise ValueError(f"the batch has `{self.media_key(kind)}` but no `{self.grid_key(kind)}`")
        return grids

    def merge_size(self, config: Any) -> int:
        """Patches per side merged into one token."""
        return int(config.vision_config.spatial_merge_size)

    def media_keys(self, kind: str) -> tuple[str, ...]:
        """Pixels and grids; Qwen2.5-VL videos also ``second_per_grid_ts``."""
        if not self.takes(kind):
            return ()
        keys = (self.media_key(kind), self.grid_key(kind))
        return (*keys, SECOND_PER_GRID_TS) if kind == "video" and self.seconds_per_grid else keys

    def marker_token_ids(self, config: Any) -> tuple[int, ...]:
        """The vision start and end ids."""
        return tuple(int(getattr(config, k)) for k in ("vision_start_token_id", "vision_end_token_id"))

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """One step per temporal patch of ``h * w / merge ** 2`` tokens (see :meth:`Family.media_steps`)."""
        if batch.get(self.media_key(kind)) is None:
            return []
        merge = self.merge_size(config)
        return [MediaSteps(t, h * w // (merge * merge), h * w) for t, h, w in self.grids(batch, kind).tolist()]

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """A token is one ``merge x merge`` block of patches of one temporal patch (see the module docstring)."""
        pixels = batch.get(self.media_key(kind))
        if pixels is None:
            return []
        return grid_regions(kind, pixels, self.grids(batch, kind), self.merge_size(config))

    def skip_tower_kwargs(self, batch: Mapping[str, Any], kind: str, keep: list[Tensor]) -> dict[str, Tensor]:
        """The grids of the kept temporal patches (a media without one is dropped) as the tower's ``grid_thw``."""
        kept = torch.stack([k.sum() for k in keep])
        grid = self.grids(batch, kind).clone()
        grid[:, 0] = kept.to(grid.device)
        return {"grid_thw": grid[kept > 0]}

    def split_media(self, config: Any, batch: Mapping[str, Any], kind: str, count: int) -> list[dict[str, Tensor]]:
        """Media items cut from the patch rows by their grids (see :meth:`Family.split_media`)."""
        if count == 0 or batch.get(self.media_key(kind)) is None:
            return []
        grid = self.grids(batch, kind)
        if grid.shape[0] != count:
            raise ValueError(f"`{self.grid_key(kind)}` holds {grid.shape[0]} {kind}s but the text has {count}")
        chunks = batch[self.media_key(kind)].split(grid.prod(1).tolist())
        seconds = batch.get(SECOND_PER_GRID_TS) if kind == "video" else None
        items = []
        for i, chunk in enumerate(chunks):
            item = {self.media_key(kind): chunk, self.grid_key(kind): grid[i : i + 1]}
            if seconds is not None:
                item[SECOND_PER_GRID_TS] = seconds[i : i + 1]
            items.append(item)
        return items

    def random_video(
        self, config: Any, num_frames: int, generator: torch.Generator, grid: tuple[int, int] | None = None
    ) -> tuple[tuple[int, int, int], Tensor]:
        """The grid and random patch rows of a video of ``num_frames`` frames (see :meth:`random_media`).

        Returns:
            ``(t, h, w)`` and float32 ``[t * h * w, C * tp * P * P]``.

        Raises:
            ValueError: a frame count that is not a multiple of ``temporal_patch_size``, or a ``grid``
                that is not made of whole ``merge x merge`` blocks.
        """
        vision = config.vision_config
        tp, merge, patch = int(vision.temporal_patch_size), self.merge_size(config), int(vision.patch_size)
        if num_frames % tp:
            raise ValueError(f"`num_frames` must be a multiple of temporal_patch_size {tp}, got {num_frames}")
        height, width = grid if grid is not None else (4 * merge, 4 * merge)  # 4 merged tokens a side
        if height <= 0 or width <= 0 or height % merge or width % merge:
            raise ValueError(f"`grid` must be positive multiples of the merge size {merge}, got {grid}")
        grid = (num_frames // tp, int(height), int(width))
        rows = grid[0] * grid[1] * grid[2]
        pixels = torch.randn((rows, int(vision.in_channels) * tp * patch * patch), generator=generator)
        return grid, pixels

    def random_media(
        self, config: Any, num_frames: int, generator: torch.Generator, grid: tuple[int, int] | None = None
    ) -> RandomMedia:
        """A video of ``num_frames`` frames (a multiple of the temporal patch), ``4 * merge`` patches a side
        unless ``grid`` says otherwise.

        Raises:
            ValueError: a frame count that is not a multiple of ``temporal_patch_size``.
        """
        grid, pixels = self.random_video(config, num_frames, generator, grid)
        merge = self.merge_size(config)
        count = grid[0] * grid[1] * grid[2] // (merge * merge)
        start, end = self.marker_token_ids(config)
        ids = [start, *[int(config.video_token_id)] * count, end]
        types = [0, *[VIDEO_TYPE] * count, 0]
        tensors = {PIXEL_VALUES_VIDEOS: pixels, VIDEO_GRID_THW: torch.tensor([grid], dtype=torch.long)}
        if self.seconds_per_grid and config.model_type in self.seconds_per_grid:
            tensors[SECOND_PER_GRID_TS] = torch.tensor([1.0])
        return RandomMedia(ids, types, tensors, "video")


def tiny_qwen2_vl_config(vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A tiny ``Qwen2VLConfig`` (patch 8, temporal patch 2, merge 2)."""
    from transformers import Qwen2VLConfig

    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": hidden_size,
        "num_heads": 4,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(vision_config=vision, **qwen_vl_kwargs(text_config(vocab_size, hidden_size, num_layers)))


def tiny_qwen2_5_vl_config(vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A tiny ``Qwen2_5_VLConfig`` (patch 8, temporal patch 2, merge 2, windowed attention in one block)."""
    from transformers import Qwen2_5_VLConfig

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
    return Qwen2_5_VLConfig(vision_config=vision, **qwen_vl_kwargs(text_config(vocab_size, hidden_size, num_layers)))


GRID_RULES: dict[str, Any] = {
    "towers": ("visual",),
    "placeholders": GRID,
    "image_key": PIXEL_VALUES,
    "video_key": PIXEL_VALUES_VIDEOS,
    "grid_keys": (IMAGE_GRID_THW, VIDEO_GRID_THW),
    "mrope": True,
    "vision_markers": True,
    "token_types": True,
    "encoders": (("image", "visual", "visual"), ("video", "visual", "visual")),
}
"""The :class:`~regate_lightning.families.base.Family` fields every Qwen-VL family shares (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3.5): one ``visual`` tower for images and videos, grids, M-RoPE, vision start / end markers and
token types."""

FAMILY = QwenVLFamily(
    "qwen2_vl",
    classes=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    model_types=("qwen2_vl", "qwen2_5_vl"),
    projectors=("visual.merger",),
    video_processor="Qwen2VLVideoProcessor",
    seconds_per_grid=("qwen2_5_vl",),
    **GRID_RULES,
    tiny={
        "Qwen2VLForConditionalGeneration": tiny_qwen2_vl_config,
        "Qwen2_5_VLForConditionalGeneration": tiny_qwen2_5_vl_config,
    },
)
