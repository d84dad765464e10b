"""VideoLLaMA3 (``VideoLlama3ForConditionalGeneration``): variable-resolution patches, a merge size per media, and
the processor's compression of repeated video tokens.

An image or video is a ``(t, h, w)`` grid of ``P x P`` patches (images: ``t = 1``; the processor's ``smart_resize``
picks ``h, w`` per media), flattened in the order ``(t, h / m, w / m, m, m)`` like Qwen-VL's with a temporal patch of
one frame. Each media has its own merge size ``m`` (``image_merge_sizes`` / ``video_merge_sizes``; the processors
use 1 for images and 2 for videos): the tower attends within one frame (``cu_seqlens`` per frame), and
``pixel_unshuffle`` bilinearly downsamples each frame's features by ``m``, so a frame gives ``h * w / m ** 2``
tokens, and frames are encoded independently. Positions are plain 1-D ids (a Qwen2 decoder), and media have no
start / end markers: an image is a run of ``<|image_pad|>``; a video's frames each follow ``Time {t:.1f}s:``,
separated by commas (``VideoLlama3Processor.replace_video_token``).

**Compression.** ``VideoLlama3VideoProcessor`` (``use_token_compression``) keeps a video token only where its
``m x m`` patch block differs from the same block of the previous frame (mean absolute difference of the normalised
pixels, times 255, above 0.1; the first frame whole; at least one token per frame): ``video_compression_mask``
(bool, one entry per token of the uncompressed grids). The model computes every frame's features, drops the masked
ones, and places the rest into the video placeholders, which the processor wrote only for the kept tokens. So a
frame has between 1 and ``h * w / m ** 2`` placeholders (:attr:`MediaSteps.placeholders`), and the token ->
region map has holes (:attr:`MediaRegions.present`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    MERGED,
    Family,
    MediaRegions,
    MediaSteps,
    MediaText,
    RandomMedia,
    expansion_parts,
    scatter_rows,
    text_config,
    top_id,
    tower_config,
)
from regate_lightning.keys import (
    IMAGE_GRID_THW,
    IMAGE_MERGE_SIZES,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    VIDEO_COMPRESSION_MASK,
    VIDEO_GRID_THW,
    VIDEO_MERGE_SIZES,
    VIDEO_TYPE,
)

PATCH_SIZE = 8
"""Patch side of the tiny test models."""
IMAGE_MERGE = 1
"""Merge size of images (``VideoLlama3ImageProcessor``'s default)."""
VIDEO_MERGE = 2
"""Merge size of videos (``VideoLlama3VideoProcessor``'s default)."""
COMPRESSION_THRESHOLD = 0.1
"""``VideoLlama3VideoProcessor._get_compression_mask``'s threshold (mean |difference| of normalised pixels x 255)."""


def compression_mask(pixels: Tensor, grid: Tensor, merge: Tensor, threshold: float = COMPRESSION_THRESHOLD) -> Tensor:
    """The video tokens VideoLLaMA3's video processor keeps, by its rule (``_get_compression_mask``).

    A token of frame ``t >= 1`` is kept when the mean absolute difference (times 255) between its ``m x m`` patch
    block and the same block of frame ``t - 1`` exceeds ``threshold``; every token of the first frame and of a
    one-frame video is kept; a frame with none kept keeps its first token.

    Args:
        pixels: float ``[sum t * h * w, C * P * P]``, the videos' patch rows.
        grid: int64 ``[N, 3]``, each video's ``(t, h, w)``.
        merge: int64 ``[N]``, each video's merge size.
        threshold: the processor's threshold.

    Returns:
        bool ``[sum t * h * w / m ** 2]``.
    """
    out = []
    for rows, (t, h, w), m in zip(pixels.split(grid.prod(1).tolist()), grid.tolist(), merge.tolist(), strict=True):
        tokens = h * w // (m * m)
        if t == 1:
            out.append(torch.ones(tokens, dtype=torch.bool, device=pixels.device))
            continue
        blocks = rows.view(t, tokens, -1)
        diff = (blocks[1:] - blocks[:-1]).abs().mean(dim=-1) * 255
        diff = torch.cat([torch.full_like(diff[:1], threshold + 1), diff])
        mask = diff > threshold
        mask[mask.sum(1) < 1, :1] = True
        out.append(mask.flatten())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


VIDEO_TOKEN = "<|video_pad|>"
"""VideoLLaMA3's video placeholder (``VideoLlama3Processor.video_token``)."""


def video_expansion(timestamps: list[float], per_frame: list[int], video_token_id: int) -> tuple[int | str, ...]:
    """The text VideoLLaMA3's processor writes for a video: ``Time {t:.1f}s:`` before each frame's kept tokens,
    frames joined by commas, from transformers' own ``VideoLlama3Processor.replace_video_token``.

    Args:
        timestamps: each frame's time in seconds.
        per_frame: each frame's placeholder count (after compression).
        video_token_id: the placeholder id.

    Returns:
        :attr:`~regate_lightning.data.vision.ProcessedMedia.expansion` parts.
    """
    from types import SimpleNamespace

    from transformers.models.video_llama_3.processing_video_llama_3 import VideoLlama3Processor
    from transformers.video_utils import VideoMetadata

    frames = len(timestamps)
    if len(per_frame) != frames:
        raise ValueError(f"{len(per_frame)} frame token counts for {frames} timestamps")
    # the processor splits the video's mask into equal frames and counts each frame's kept tokens
    width = max(per_frame) if per_frame else 0
    padded = torch.zeros(frames, width, dtype=torch.bool)
    for t, n in enumerate(per_frame):
        padded[t, :n] = True
    inputs = {
        "video_grid_thw": torch.tensor([[frames, 1, width]]),
        "video_merge_sizes": torch.tensor([1]),
        "video_compression_mask": padded.flatten(),
        "video_metadata": [VideoMetadata(total_num_frames=frames, fps=1.0, frames_indices=list(timestamps))],
    }
    text = VideoLlama3Processor.replace_video_token(SimpleNamespace(video_token=VIDEO_TOKEN), inputs, 0)
    return expansion_parts(text, VIDEO_TOKEN, video_token_id)


@dataclass(frozen=True)
class VideoLlama3Family(Family):
    """VideoLLaMA3's rules (see the module docstring)."""

    def keys(self, kind: str) -> tuple[str, str, str]:
        """The pixel, grid and merge-size keys of ``kind``."""
        if kind == "image":
            return PIXEL_VALUES, IMAGE_GRID_THW, IMAGE_MERGE_SIZES
        return PIXEL_VALUES_VIDEOS, VIDEO_GRID_THW, VIDEO_MERGE_SIZES

    def media_keys(self, kind: str) -> tuple[str, ...]:
        """Pixels, grids, merge sizes; videos also the compression mask."""
        keys = self.keys(kind)
        return (*keys, VIDEO_COMPRESSION_MASK) if kind == "video" else keys

    def layout(self, batch: Mapping[str, Any], kind: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """The batch's pixels, grids ``[N, 3]`` and merge sizes ``[N]`` of ``kind``, None without its pixels.

        Raises:
            ValueError: pixels without grids or merge sizes, or counts that disagree.
        """
        pixel_key, grid_key, merge_key = self.keys(kind)
        pixels = batch.get(pixel_key)
        if pixels is None:
            return None
        grid, merge = batch.get(grid_key), batch.get(merge_key)
        if grid is None or merge is None:
            raise ValueError(f"the batch has `{pixel_key}` but not both `{grid_key}` and `{merge_key}`")
        if pixels.shape[0] != int(grid.prod(1).sum()) or merge.numel() != grid.shape[0]:
            raise ValueError(
                f"`{pixel_key}` has {pixels.shape[0]} patch rows and `{merge_key}` {merge.numel()} entries, but "
                f"`{grid_key}` {grid.tolist()} needs {int(grid.prod(1).sum())} rows and {grid.shape[0]} entries"
            )
        return pixels, grid, merge.flatten()

    def kept_tokens(self, batch: Mapping[str, Any], kind: str) -> list[Tensor | None]:
        """Per media of ``kind``: bool ``[t, h * w / m ** 2]``, the tokens with a placeholder; None if all have.

        Raises:
            ValueError: a compression mask whose length is not the videos' token count.
        """
        layout = self.layout(batch, kind)
        if layout is None:
            return []
        _, grid, merge = layout
        sizes = [t * h * w // (m * m) for (t, h, w), m in zip(grid.tolist(), merge.tolist(), strict=True)]
        mask = batch.get(VIDEO_COMPRESSION_MASK) if kind == "video" else None
        if mask is None:
            return [None] * len(sizes)
        if mask.numel() != sum(sizes):
            raise ValueError(
                f"`{VIDEO_COMPRESSION_MASK}` has {mask.numel()} entries but the videos have {sum(sizes)} tokens"
            )
        return [
            part.view(int(g[0]), -1) for part, g in zip(mask.flatten().bool().split(sizes), grid.tolist(), strict=True)
        ]

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """One step per frame: ``h * w / m ** 2`` tokens, ``h * w`` patch rows; compressed frames fewer placeholders."""
        layout = self.layout(batch, kind)
        if layout is None:
            return []
        _, grid, merge = layout
        out = []
        for (t, h, w), m, kept in zip(grid.tolist(), merge.tolist(), self.kept_tokens(batch, kind), strict=True):
            placeholders = None if kept is None else tuple(int(n) for n in kept.sum(1).tolist())
            out.append(MediaSteps(t, h * w // (m * m), h * w, placeholders))
        return out

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """A token is one ``m x m`` block of patches of one frame (rows in ``(t, h / m, w / m, m, m)`` order)."""
        layout = self.layout(batch, kind)
        if layout is None:
            return []
        pixels, grid, merge = layout
        out = []
        chunks = pixels.split(grid.prod(1).tolist())
        kept_tokens = self.kept_tokens(batch, kind)
        for rows, (t, h, w), m, kept in zip(chunks, grid.tolist(), merge.tolist(), kept_tokens, strict=True):
            out.append(MediaRegions(kind, rows.reshape(t, h * w // (m * m), m * m * pixels.shape[1]), present=kept))
        return out

    def split_media(self, config: Any, batch: Mapping[str, Any], kind: str, count: int) -> list[dict[str, Tensor]]:
        """Media items cut from the patch rows by their grids (and the compression mask by their tokens)."""
        layout = self.layout(batch, kind) if count else None
        if layout is None:
            return []
        pixels, grid, merge = layout
        if grid.shape[0] != count:
            raise ValueError(f"`{self.keys(kind)[1]}` holds {grid.shape[0]} {kind}s but the text has {count}")
        pixel_key, grid_key, merge_key = self.keys(kind)
        kept = self.kept_tokens(batch, kind)
        items = []
        for i, rows in enumerate(pixels.split(grid.prod(1).tolist())):
            item = {pixel_key: rows, grid_key: grid[i : i + 1], merge_key: merge[i : i + 1]}
            if kind == "video" and kept[i] is not None:
                item[VIDEO_COMPRESSION_MASK] = kept[i].flatten()  # type: ignore[union-attr]
            items.append(item)
        return items

    def media_expansion(self, text: MediaText) -> tuple[int | str, ...] | None:
        """A video: ``Time {t:.1f}s:`` before each frame's kept tokens (:func:`video_expansion`); an image: one run."""
        if text.kind != "video":
            return None
        per_frame = list(text.placeholders) if text.placeholders is not None else [text.tokens_per_step] * text.steps
        return video_expansion(list(text.times), per_frame, text.token_id)

    def skip_tower_kwargs(self, batch: Mapping[str, Any], kind: str, keep: list[Tensor]) -> dict[str, Any]:
        """The kept frames' grids and merge sizes (a media without a kept frame is dropped)."""
        layout = self.layout(batch, kind)
        assert layout is not None
        _, grid, merge = layout
        kept = torch.stack([k.sum() for k in keep]).to(grid.device)
        grid = grid.clone()
        grid[:, 0] = kept
        return {"grid_thw": grid[kept > 0], "merge_sizes": merge[kept > 0]}

    def fill_skipped(self, output: Any, keep: Tensor) -> Any:
        """Zero feature rows for the skipped frames' tokens in the tower's ``last_hidden_state``."""
        output.last_hidden_state = scatter_rows(output.last_hidden_state, keep)
        return output

    def random_media(self, config: Any, num_frames: int, generator: torch.Generator) -> RandomMedia:
        """A video of ``num_frames`` frames, ``4 * merge`` patches a side; frames after the first lose every third
        token to a compression mask (so frames have different placeholder counts)."""
        patch, channels = int(config.vision_config.patch_size), int(config.vision_config.num_channels)
        side = 4 * VIDEO_MERGE
        grid = torch.tensor([[num_frames, side, side]])
        tokens = side * side // VIDEO_MERGE**2
        mask = torch.ones(num_frames, tokens, dtype=torch.bool)
        mask[1:, ::3] = False
        count = int(mask.sum())
        pixels = torch.randn((num_frames * side * side, channels * patch * patch), generator=generator)
        tensors = {
            PIXEL_VALUES_VIDEOS: pixels,
            VIDEO_GRID_THW: grid,
            VIDEO_MERGE_SIZES: torch.tensor([VIDEO_MERGE]),
            VIDEO_COMPRESSION_MASK: mask.flatten(),
        }
        return RandomMedia([int(config.video_token_id)] * count, [VIDEO_TYPE] * count, tensors, "video")


def tiny_config(vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A tiny ``VideoLlama3Config``: patch 8, a Qwen2 decoder; image / video placeholders at the vocabulary's top."""
    from transformers import VideoLlama3Config

    return VideoLlama3Config(
        vision_config=tower_config(None, PATCH_SIZE),
        text_config={"model_type": "qwen2", **text_config(vocab_size, hidden_size, num_layers)},
        image_token_id=top_id(vocab_size, 1),
        video_token_id=top_id(vocab_size, 2),
    )


FAMILY = VideoLlama3Family(
    "video_llama_3",
    classes=("VideoLlama3ForConditionalGeneration",),
    model_types=("video_llama_3",),
    towers=("vision_model",),
    projectors=("projector",),
    placeholders=MERGED,
    image_key=PIXEL_VALUES,
    video_key=PIXEL_VALUES_VIDEOS,
    grid_keys=(IMAGE_GRID_THW, VIDEO_GRID_THW),
    video_processor="VideoLlama3VideoProcessor",
    encoders=(("image", "vision_model", "vision_model"), ("video", "vision_model", "vision_model")),
    tiny={"VideoLlama3ForConditionalGeneration": tiny_config},
)
