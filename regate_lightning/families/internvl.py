"""InternVL (``InternVLForConditionalGeneration``: the InternVL3 / InternVL3.5 ``-HF`` checkpoints).

**Tiles.** The checkpoint's image processor (``GotOcr2ImageProcessor``, with ``crop_to_patches=True`` as
``InternVLProcessor`` calls it) cuts an image into a grid of ``S x S`` tiles whose aspect ratio is closest to
the image's, between ``min_patches`` and ``max_patches`` tiles, plus a thumbnail of the whole image when there
are several. Every tile is one row of ``pixel_values`` ``[tiles, 3, S, S]``.

**Tokens.** ``InternVLVisionModel`` encodes every tile alone (CLS token first, dropped under
``vision_feature_select_strategy="default"``), the model pixel-shuffles the ``S / P`` x ``S / P`` patch features
by ``downsample_ratio`` ``r`` (each token concatenates ``1 / r`` x ``1 / r`` neighbouring patches) and projects
them: ``(S / P) ** 2 * r ** 2`` tokens per tile (256 for ``S = 448, P = 14, r = 0.5``). An image is written
``<img>`` + ``<IMG_CONTEXT>`` x ``tiles * T`` + ``</img>`` (``InternVLProcessor.replace_image_token``).

**Videos.** A video is one tile per frame (``InternVLVideoProcessor`` resizes frames to ``S x S``), written
``Frame1: <img>...</img>\\nFrame2: <img>...</img>`` (``InternVLProcessor.replace_video_token``); its frames
join the images in ``pixel_values`` in text order. To the model, a video's frames are images: one key, one
placeholder id. The data's batches therefore carry :data:`~regate_lightning.keys.FRAME_INDEX` (per tile of
``pixel_values``: its frame number in its video, -1 for an image's tile), as SmolVLM's do, which the model never
reads (the engine passes it only what its forward names). Kinds, as in SmolVLM's family: ``"image"`` is every
placeholder (the model's view, what the tower encodes and the engine's step skipping reads); ``"video"`` is the
subset that are video frames (:meth:`InternVLFamily.media_positions`, :meth:`InternVLFamily.media_regions`), which
:class:`~regate_lightning.VisualTokenElision` selects from with ``images=False``.

**Steps skipped.** Every tile and frame is encoded alone, so the engine does not encode a tile or frame
whose every token is elided (:meth:`InternVLFamily.media_steps`: each ``<img>`` span, in ``pixel_values``
order, with one step per tile).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    MediaRegions,
    MediaSteps,
    MediaText,
    ModelParts,
    RandomMedia,
    TileFamily,
    find_module,
    frame_regions,
    runs,
    text_config,
    top_id,
    tower_config,
)
from regate_lightning.keys import FRAME_INDEX, INPUT_IDS, PIXEL_VALUES, TEXT_TYPE, VIDEO_TYPE

IMAGE_START = "<img>"
"""Text before a tile span (the tokenizer's ``start_image_token`` in every InternVL ``-HF`` checkpoint)."""
IMAGE_END = "</img>"
"""Text after a tile span (``end_image_token``)."""

IMAGE_SIZE = 32
"""Tile side of the tiny test models."""
PATCH_SIZE = 8
"""Patch side of the tiny test models (4 x 4 patches, 2 x 2 tokens per tile after the pixel shuffle)."""


def square_side(value: Any) -> int:
    """One side of a square size given as an int or a ``(height, width)`` pair.

    Raises:
        ValueError: a size that is not square.
    """
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ValueError(f"InternVL's tower takes square tiles, got image/patch size {value}")
        return int(value[0])
    return int(value)


@dataclass(frozen=True)
class InternVLFamily(TileFamily):
    """The rules of InternVL (see the module docstring)."""

    def tile_side(self, config: Any) -> int:
        """The tower's tile side ``S``."""
        return square_side(config.vision_config.image_size)

    def shuffle(self, config: Any) -> int:
        """Patches per side merged into one token by the pixel shuffle (``1 / downsample_ratio``).

        Raises:
            ValueError: a ratio whose inverse is no whole number.
        """
        ratio = float(config.downsample_ratio)
        merge = round(1 / ratio)
        if merge < 1 or abs(merge * ratio - 1) > 1e-6:
            raise ValueError(f"InternVL's downsample_ratio must be 1 / k for a whole k, got {ratio}")
        return merge

    def tile_tokens(self, config: Any) -> int:
        """Placeholder tokens per tile or frame: ``(S / P) ** 2 * downsample_ratio ** 2``.

        Raises:
            ValueError: a tower whose patch grid does not divide by the pixel shuffle, or a strategy that keeps
                the CLS token (the model then cannot form its square grid of features).
        """
        side, patch = self.tile_side(config), square_side(config.vision_config.patch_size)
        merge = self.shuffle(config)
        if side % patch or (side // patch) % merge:
            raise ValueError(
                f"InternVL: {side // patch if side % patch == 0 else side / patch} patches a side do not divide "
                f"into {merge} x {merge} tokens"
            )
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise ValueError("InternVL needs vision_feature_select_strategy='default' (the CLS token is dropped)")
        return (side // patch // merge) ** 2

    # ----------------------------------------------------------------------------------------------
    # What the family takes.

    def media_keys(self, kind: str) -> tuple[str, ...]:
        """Pixels and the frame index, one entry per tile or frame (both kinds)."""
        return (PIXEL_VALUES, FRAME_INDEX)

    def media_positions(self, config: Any, batch: Mapping[str, Any], kind: str) -> Tensor:
        """``"image"``: every ``<IMG_CONTEXT>``; ``"video"``: the spans of the tiles whose frame index is >= 0.

        Without a frame index (a batch of transformers' own processor) no placeholder is a video's.
        """
        everything = self.placeholder_mask(config, batch[INPUT_IDS], "image")
        if kind == "image":
            return everything
        out = torch.zeros_like(everything)
        for row, start, tiles, video in self._spans(config, batch):
            if video:
                out[row, start : start + tiles * self.tile_tokens(config)] = True
        return out

    def media_expansion(self, text: MediaText) -> tuple[int | str, ...]:
        """``<img>`` span of an image's tiles, or ``Frame{i}: <img>...</img>`` lines of a video's frames.

        Example:
            >>> FAMILY.media_expansion(MediaText("video", 9, steps=2, tokens_per_step=1))
            ('Frame1: <img>', 9, '</img>\\nFrame2: <img>', 9, '</img>')
        """
        token, per_step = text.token_id, text.tokens_per_step
        if text.kind == "image":
            return (IMAGE_START, *[token] * (text.steps * per_step), IMAGE_END)
        out: list[int | str] = []
        for i in range(text.steps):
            out += [f"{IMAGE_END}\nFrame{i + 1}: {IMAGE_START}" if i else f"Frame1: {IMAGE_START}"]
            out += [token] * per_step
        return (*out, IMAGE_END)

    # ----------------------------------------------------------------------------------------------
    # Spans, steps and regions.

    def _spans(self, config: Any, batch: Mapping[str, Any]) -> list[tuple[int, int, int, bool]]:
        """Every ``<IMG_CONTEXT>`` span in ``pixel_values`` order: ``(row, start, tiles, is_video_frame)``.

        Raises:
            ValueError: a span whose length is no whole number of tiles, or a video frame span of several tiles.
        """
        per_tile = self.tile_tokens(config)
        found = []
        for row, start, length in runs(batch[INPUT_IDS] == int(config.image_token_id)):
            if length % per_tile:
                raise ValueError(
                    f"internvl: a run of {length} <IMG_CONTEXT> tokens is no whole number of {per_tile}-token tiles"
                )
            found.append((row, start, length // per_tile))
        index = self.frame_index(batch, sum(n for _, _, n in found))
        firsts = torch.tensor([0, *[n for _, _, n in found]]).cumsum(0)[:-1].tolist()
        out = []
        for (row, start, tiles), first in zip(found, firsts, strict=True):
            video = index is not None and int(index[first]) >= 0
            if video and tiles != 1:
                raise ValueError(f"internvl: a video frame's <img> span holds {tiles} tiles; a frame is one tile")
            out.append((row, start, tiles, video))
        return out

    def _tiles(self, config: Any, batch: Mapping[str, Any]) -> tuple[Tensor, list[tuple[int, int, int, bool]]]:
        """``pixel_values`` and the spans, checked against each other."""
        pixels = batch[PIXEL_VALUES]
        found = self._spans(config, batch)
        total = sum(s[2] for s in found)
        if pixels.dim() != 4 or pixels.shape[0] != total:
            raise ValueError(
                f"internvl: `{PIXEL_VALUES}` has shape {tuple(pixels.shape)} but the text's <img> spans hold "
                f"{total} tiles"
            )
        return pixels, found

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """The model's view: every ``<img>`` span (an image, or one frame of a video), one step per tile.

        The model has one kind of media, images, so ``"image"`` lists every tile and frame in ``pixel_values``
        order and ``"video"`` nothing (see :meth:`~regate_lightning.families.Family.media_steps`).
        """
        if kind != "image" or batch.get(PIXEL_VALUES) is None:
            return []
        per_tile = self.tile_tokens(config)
        return [MediaSteps(tiles, per_tile, 1) for _, _, tiles, _ in self._spans(config, batch)]

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """A token is one ``1/r x 1/r`` block of patches of its tile (the pixel shuffle's order, row by row).

        ``"image"``: every ``<img>`` span (an image, whose steps are its tiles with the thumbnail last, or a video's
        frame); ``"video"``: one media per video, whose steps are its frames (grouped by the frame index).

        Raises:
            ValueError: pixels that do not match the spans.
        """
        if batch.get(PIXEL_VALUES) is None:
            return []
        pixels, found = self._tiles(config, batch)
        side, patch = self.tile_side(config), square_side(config.vision_config.patch_size)
        merge = self.shuffle(config)
        cells = frame_regions(kind, pixels.unsqueeze(0), patch * merge, side // patch // merge)[0].regions
        chunks = cells.split([s[2] for s in found])
        if kind == "image":
            return [MediaRegions("image", chunk) for chunk in chunks]
        index = self.frame_index(batch, pixels.shape[0])
        videos: list[list[Tensor]] = []
        first = 0
        for chunk, (_, _, tiles, video) in zip(chunks, found, strict=True):
            if video:
                assert index is not None
                if int(index[first]) == 0 or not videos:
                    videos.append([])
                videos[-1].append(chunk)
            first += tiles
        return [MediaRegions("video", torch.cat(frames)) for frames in videos]

    def split_media(self, config: Any, batch: Mapping[str, Any], kind: str, count: int) -> list[dict[str, Tensor]]:
        """The model's media (every ``<img>`` span: an image's tiles, or one frame) cut from ``pixel_values``.

        Raises:
            ValueError: ``count`` differs from the text's spans, or the pixels from their tiles.
        """
        if count == 0 or kind != "image" or batch.get(PIXEL_VALUES) is None:
            return []
        pixels, found = self._tiles(config, batch)
        if len(found) != count:
            raise ValueError(f"internvl: the text has {len(found)} <img> spans, the caller counted {count}")
        sizes = [s[2] for s in found]
        items: list[dict[str, Tensor]] = [{PIXEL_VALUES: chunk} for chunk in pixels.split(sizes)]
        index = self.frame_index(batch, pixels.shape[0])
        if index is not None:
            for item, part in zip(items, index.split(sizes), strict=True):
                item[FRAME_INDEX] = part
        return items

    # ----------------------------------------------------------------------------------------------
    # Parts the training never reaches; random batches.

    def unused_vision_modules(self, parts: ModelParts) -> list[nn.Module]:
        """The tower's layers after ``vision_feature_layer`` and its final norm, when the layer is not the last."""
        layer = getattr(parts.model.config, "vision_feature_layer", -1)
        tower = find_module(parts.inner, "vision_tower")
        if not isinstance(layer, int) or layer == -1 or tower is None:
            return []
        layers = tower.encoder.layer
        first = layer % (len(layers) + 1)
        found = list(layers[first:])
        if not isinstance(tower.layernorm, nn.Identity):
            found.append(tower.layernorm)
        return found

    def random_media(self, config: Any, num_frames: int, generator: torch.Generator) -> RandomMedia:
        """A video of ``num_frames`` one-tile frames: ``<img>`` / ``</img>`` stand-ins around each frame's span.

        The tiny models' vocabulary holds ``<img>``, ``</img>`` and the frame separator at its top (the ids
        under the placeholder, which random text never uses).
        """
        side = self.tile_side(config)
        per_tile = self.tile_tokens(config)
        token = int(config.image_token_id)
        start, end, separator = token - 1, token - 2, token - 3
        ids: list[int] = []
        types: list[int] = []
        for i in range(num_frames):
            head = [separator, start] if i else [start]
            ids += [*head, *[token] * per_tile, end]
            types += [TEXT_TYPE] * len(head) + [VIDEO_TYPE] * per_tile + [TEXT_TYPE]
        pixels = torch.randn((num_frames, 3, side, side), generator=generator)
        tensors = {PIXEL_VALUES: pixels, FRAME_INDEX: torch.arange(num_frames)}
        return RandomMedia(ids, types, tensors, "video")


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    text_model_type: str = "qwen2",
    image_token_id: int | None = None,
) -> Any:
    """A tiny ``InternVLConfig``: ``image_size / 8`` patches a side, pixel-shuffled by 0.5.

    Args:
        vocab_size: vocabulary (the placeholder id at its top).
        hidden_size: the text model's hidden size.
        num_layers: decoder layers.
        image_size: tile side (a multiple of 16).
        text_model_type: the text backbone, ``"qwen2"`` (InternVL3) or ``"qwen3"`` (most InternVL3.5 sizes).
        image_token_id: the ``<IMG_CONTEXT>`` id (default: the last id of the vocabulary).

    Raises:
        ValueError: an unknown ``text_model_type``.
    """
    from transformers import InternVLConfig

    if text_model_type not in ("qwen2", "qwen3"):
        raise ValueError(f"`text_model_type` must be 'qwen2' or 'qwen3', got {text_model_type!r}")
    text = {"model_type": text_model_type, **text_config(vocab_size, hidden_size, num_layers)}
    return InternVLConfig(
        vision_config=tower_config(image_size, PATCH_SIZE),
        text_config=text,
        image_token_id=top_id(vocab_size, 1, image_token_id),
        image_seq_length=(image_size // PATCH_SIZE // 2) ** 2,
    )


FAMILY = InternVLFamily(
    "internvl",
    classes=("InternVLForConditionalGeneration",),
    model_types=("internvl",),
    towers=("vision_tower",),
    projectors=("multi_modal_projector",),
    video_processor="InternVLVideoProcessor",
    processor_class="InternVLProcessor",
    encoders=(("image", "vision_tower", "multi_modal_projector"),),
    tiny={"InternVLForConditionalGeneration": tiny_config},
)
