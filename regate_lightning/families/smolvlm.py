"""SmolVLM and SmolVLM2 (``SmolVLMForConditionalGeneration``): image tiles and video frames behind one placeholder.

The model encodes *images* of one size ``S x S`` (the processor's ``max_image_size``), each on its own: the SigLIP
tower attends within one image (``patch_attention_mask`` marks its real patches), and the connector's pixel
shuffle merges ``scale x scale`` patches into one token, so every image gives
``(S / P) ** 2 / scale ** 2`` tokens (``P`` the patch size; HF's ``image_seq_len``). What the processor makes of a
picture or a clip is a list of such images:

* an **image** is split into ``rows x cols`` sub-images of ``S x S`` plus the whole image resized to ``S x S``
  (``SmolVLMImageProcessor``'s ``do_image_splitting``); a small image is one global image. Its text is
  ``<fake_token_around_image><row_i_col_j><image>*N`` per tile, a newline after each row, then
  ``\\n<fake_token_around_image><global-img><image>*N<fake_token_around_image>``;
* a **video** is its frames, each one global image, each after ``\\nFrame from MM:SS:``, after an intro that
  names the frame count and the duration (``SmolVLMProcessor.replace_video_token``).

Every tile and frame is an ``<image>`` to the model, and one ``pixel_values`` holds them all in placeholder order.
This package lays them out as ``[N, 1, 3, S, S]`` (one image per row; HF's processor pads to
``[B, max images, 3, S, S]``, which the model flattens and unpads into the same sequence) with
``pixel_attention_mask`` ``[N, 1, S, S]``, and :data:`~regate_lightning.keys.FRAME_INDEX` ``[N]`` records which
rows are frames of a video (0, 1, ... per video; -1 for an image's tile), which the model ignores.

Kinds: the family's ``"image"`` kind is *every* placeholder (the model's view: what the tower encodes and the
engine's step skipping reads); its ``"video"`` kind is the subset that are video frames (what
:class:`~regate_lightning.VisualTokenElision` selects from with ``images=False``). A step is one tile or frame;
each is encoded alone, so a tile or frame whose every token is elided is not encoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    MediaRegions,
    MediaSteps,
    MediaText,
    RandomMedia,
    TileFamily,
    expansion_parts,
    frame_regions,
    runs,
    text_config,
    top_id,
    tower_config,
)
from regate_lightning.keys import FRAME_INDEX, INPUT_IDS, PIXEL_ATTENTION_MASK, PIXEL_VALUES, VIDEO_TYPE

IMAGE_SIZE = 32
"""Tile side of the tiny test models."""
PATCH_SIZE = 8
"""Patch side of the tiny test models."""

FAKE_TOKEN = "<fake_token_around_image>"
"""The token SmolVLM's processor writes around every tile and frame (``tokenizer.fake_image_token``)."""
GLOBAL_TOKEN = "<global-img>"
"""The token before the global image and every video frame (``tokenizer.global_image_token``)."""


IMAGE_TOKEN = "<image>"
"""The placeholder of every tile and frame (``tokenizer.image_token``)."""


def image_expansion(rows: int, cols: int, tokens: int, image_token_id: int) -> tuple[int | str, ...]:
    """The text SmolVLM's processor writes for an image split into ``rows x cols`` tiles plus the global image
    (``(0, 0)``: one global image), from transformers' own ``get_image_prompt_string``."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    text = get_image_prompt_string(
        rows,
        cols,
        tokens,
        fake_token_around_image=FAKE_TOKEN,
        image_token=IMAGE_TOKEN,
        global_image_token=GLOBAL_TOKEN,
    )
    return expansion_parts(text, IMAGE_TOKEN, image_token_id)


def video_expansion(
    timestamps: list[float], duration: float | None, tokens: int, image_token_id: int
) -> tuple[int | str, ...]:
    """The text SmolVLM2's processor writes for a video of frames at ``timestamps`` (seconds), from transformers'
    own ``SmolVLMProcessor.replace_video_token``: an intro with the frame count in words and the duration, then
    ``Frame from MM:SS:`` (on a new line) and one global image per frame, then a blank line.

    Raises:
        ImportError: ``num2words`` is missing (SmolVLM's processor needs it too): ``pip install num2words``.
    """
    from types import SimpleNamespace

    from transformers.models.smolvlm import processing_smolvlm
    from transformers.video_utils import VideoMetadata

    if processing_smolvlm.num2words is None:
        raise ImportError(
            "SmolVLM's video prompt writes the frame count in words with `num2words`, as its processor does: "
            "pip install num2words (the `smolvlm` extra of regate-lightning)"
        )
    processor = SimpleNamespace(
        image_seq_len=tokens, image_token=IMAGE_TOKEN, fake_image_token=FAKE_TOKEN, global_image_token=GLOBAL_TOKEN
    )
    metadata = VideoMetadata(
        total_num_frames=len(timestamps), fps=1.0, duration=duration, frames_indices=list(timestamps)
    )
    inputs = {"pixel_values": torch.empty(1, len(timestamps), 0), "video_metadata": [metadata]}
    text = processing_smolvlm.SmolVLMProcessor.replace_video_token(processor, inputs, 0)
    return expansion_parts(text, IMAGE_TOKEN, image_token_id)


def tile_tokens(config: Any) -> int:
    """Placeholder tokens per tile or frame: ``(S / P) ** 2 / scale ** 2`` (HF's ``SmolVLMModel.image_seq_len``).

    Raises:
        ValueError: a patch grid that the pixel shuffle cannot merge ``scale x scale``.
    """
    vision = config.vision_config
    side, scale = int(vision.image_size) // int(vision.patch_size), int(config.scale_factor)
    if side % scale:
        raise ValueError(f"SmolVLM's {side} x {side} patches cannot be pixel-shuffled by scale_factor {scale}")
    return (side // scale) ** 2


def real_tiles(pixels: Tensor) -> Tensor:
    """Which images of ``pixel_values`` ``[B, N, 3, H, W]`` the model encodes (bool ``[B * N]``).

    HF's rule (``SmolVLMModel.get_image_features``): an image whose values are all 0 is padding; if every image
    is, the first is encoded anyway.
    """
    real = pixels.flatten(0, 1).flatten(1).ne(0).any(1)
    real[0] |= ~real.any()
    return real


@dataclass(frozen=True)
class SmolVLMFamily(TileFamily):
    """SmolVLM's rules (see the module docstring)."""

    def tile_side(self, config: Any) -> int:
        """The side ``S`` of every tile and frame (the tower's ``image_size``)."""
        return int(config.vision_config.image_size)

    def tile_tokens(self, config: Any) -> int:
        """Placeholder tokens per tile or frame (:func:`tile_tokens`)."""
        return tile_tokens(config)

    def media_keys(self, kind: str) -> tuple[str, ...]:
        """Pixels, their attention mask and the frame index, one entry per tile or frame (both kinds)."""
        return (PIXEL_VALUES, PIXEL_ATTENTION_MASK, FRAME_INDEX) if self.takes(kind) else ()

    def tiles(self, batch: Mapping[str, Any]) -> int:
        """Tiles and frames the model encodes (rows of its tower input)."""
        pixels = batch.get(PIXEL_VALUES)
        if pixels is None:
            return 0
        if pixels.dim() != 5:
            raise ValueError(f"`{PIXEL_VALUES}` must be [N, images, 3, H, W], got shape {tuple(pixels.shape)}")
        return int(real_tiles(pixels).sum())

    def frames(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's :data:`~regate_lightning.keys.FRAME_INDEX` (:meth:`TileFamily.frame_index`), required.

        Raises:
            ValueError: the batch has no frame index, or one whose length is not the number of tiles.
        """
        index = self.frame_index(batch, self.tiles(batch))
        if index is None:
            raise ValueError(
                f"SmolVLM's video frames are told from image tiles by `{FRAME_INDEX}` (int64 [tiles]: a frame's number "
                "in its video, -1 for an image tile), which this batch lacks; the data of regate_lightning.data adds it"
            )
        return index

    def media_positions(self, config: Any, batch: Mapping[str, Any], kind: str) -> Tensor:
        """``"image"``: every placeholder; ``"video"``: the placeholders of the tiles whose frame index is >= 0.

        Every tile's placeholders are one run (the processor writes a marker token before and after each), and the
        k-th run of the batch (row by row) holds the k-th tile's features.

        Raises:
            ValueError: a video kind asked of a batch without a frame index, or runs that are not one per tile.
        """
        everything = self.placeholder_mask(config, batch[INPUT_IDS], "image")
        if kind == "image":
            return everything
        frames = self.frames(batch) >= 0
        found = runs(everything)
        if len(found) != frames.numel():
            raise ValueError(
                f"the batch has {len(found)} runs of <image> placeholders but {frames.numel()} tiles; each tile's "
                "placeholders must be one run (SmolVLM's processor writes a marker token around each)"
            )
        out = torch.zeros_like(everything)
        for (row, start, length), frame in zip(found, frames.tolist(), strict=True):
            if frame:
                out[row, start : start + length] = True
        return out

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """``"image"``: one step per tile or frame; ``"video"``: one media per video, a step per frame."""
        tiles = self.tiles(batch)
        if not tiles:
            return []
        tokens = tile_tokens(config)
        if kind == "image":
            return [MediaSteps(1, tokens, 1)] * tiles
        return [MediaSteps(len(frames), tokens, 1) for frames in self._videos(batch)]

    def _videos(self, batch: Mapping[str, Any]) -> list[list[int]]:
        """The tile indices of each video's frames, video by video."""
        videos: list[list[int]] = []
        for tile, frame in enumerate(self.frames(batch).tolist()):
            if frame == 0:
                videos.append([tile])
            elif frame > 0:
                if not videos:
                    raise ValueError(f"`{FRAME_INDEX}` starts a video at frame {frame}, not 0")
                videos[-1].append(tile)
        return videos

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """A token is a ``scale * P`` pixel square of its tile, row by row (the connector's pixel shuffle).

        ``"image"``: one media of one step per tile or frame; ``"video"``: one media per video, a step per frame.
        """
        pixels = batch.get(PIXEL_VALUES)
        if pixels is None:
            return []
        tiles = pixels.flatten(0, 1)[real_tiles(pixels)]
        vision = config.vision_config
        cell = int(vision.patch_size) * int(config.scale_factor)
        cells = int(vision.image_size) // cell
        if kind == "image":
            return frame_regions("image", tiles.unsqueeze(1), cell, cells)
        return [frame_regions("video", tiles[frames].unsqueeze(0), cell, cells)[0] for frames in self._videos(batch)]

    def split_media(self, config: Any, batch: Mapping[str, Any], kind: str, count: int) -> list[dict[str, Tensor]]:
        """One item per tile or frame (the ``"image"`` kind's placeholder runs), in placeholder order."""
        if kind != "image" or count == 0 or batch.get(PIXEL_VALUES) is None:
            return []
        pixels = batch[PIXEL_VALUES]
        real = real_tiles(pixels)
        tiles = pixels.flatten(0, 1)[real]
        if tiles.shape[0] != count:
            raise ValueError(f"`{PIXEL_VALUES}` holds {tiles.shape[0]} tiles but the text has {count}")
        mask = batch.get(PIXEL_ATTENTION_MASK)
        masks = mask.flatten(0, 1)[real] if mask is not None else None
        index = batch.get(FRAME_INDEX)
        items = []
        for i in range(count):
            item = {PIXEL_VALUES: tiles[i : i + 1].unsqueeze(1)}
            if masks is not None:
                item[PIXEL_ATTENTION_MASK] = masks[i : i + 1].unsqueeze(1)
            if index is not None:
                item[FRAME_INDEX] = index.flatten()[i : i + 1]
            items.append(item)
        return items

    def media_expansion(self, text: MediaText) -> tuple[int | str, ...]:
        """An image: its tiles by row and column, then the global image (:func:`image_expansion`); a video: its
        intro, then each frame after its timestamp (:func:`video_expansion`)."""
        if text.kind == "image":
            rows, cols = text.tile_grid
            return image_expansion(rows, cols, text.tokens_per_step, text.token_id)
        return video_expansion(list(text.times), text.duration, text.tokens_per_step, text.token_id)

    def skip_tower_kwargs(self, batch: Mapping[str, Any], kind: str, keep: list[Tensor]) -> dict[str, Any]:
        """No ``patch_attention_mask`` for the kept tiles: the tower then attends over every patch of each.

        SmolVLM's processors make every tile and frame a full ``S x S`` image (split tiles, the global image and
        frames are all resized or cropped to ``max_image_size``), so the mask HF derives from
        ``pixel_attention_mask`` is all ones for every real tile, which is what the tower assumes without one.

        Raises:
            ValueError: a kept tile with padded pixels (its mask could not be dropped).
        """
        mask = batch.get(PIXEL_ATTENTION_MASK)
        if mask is not None:
            kept = torch.cat(keep).to(mask.device)
            tiles = mask.flatten(0, 1)[real_tiles(batch[PIXEL_VALUES]).to(mask.device)][kept]
            if not bool(tiles.bool().all()):
                raise ValueError(
                    f"a SmolVLM tile with padded pixels (`{PIXEL_ATTENTION_MASK}` has zeros) cannot be encoded on its "
                    "own by the elided step; make every tile a full image (SmolVLM's processors do)"
                )
        return {"patch_attention_mask": None}

    def random_media(self, config: Any, num_frames: int, generator: torch.Generator) -> RandomMedia:
        """A video of ``num_frames`` frames of random pixels, each as SmolVLM's processor writes a frame."""
        size = int(config.vision_config.image_size)
        vocab = int(config.text_config.vocab_size)
        fake, global_img = vocab - 2, vocab - 3  # stand-ins for the marker tokens (text to the model)
        count = tile_tokens(config)
        token = int(config.image_token_id)
        ids: list[int] = []
        types: list[int] = []
        for _ in range(num_frames):
            block = [fake, global_img, *[token] * count, fake]
            ids += block
            types += [VIDEO_TYPE if t == token else 0 for t in block]
        tensors = {
            PIXEL_VALUES: torch.randn((num_frames, 1, 3, size, size), generator=generator),
            PIXEL_ATTENTION_MASK: torch.ones((num_frames, 1, size, size), dtype=torch.long),
            FRAME_INDEX: torch.arange(num_frames),
        }
        return RandomMedia(ids, types, tensors, "video")


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    image_token_id: int | None = None,
) -> Any:
    """A tiny ``SmolVLMConfig``: a SigLIP-style tower on ``image_size`` tiles of 8-pixel patches, a Llama decoder,
    scale factor 2, so ``(image_size / 16) ** 2`` tokens per tile or frame (4 at the default size)."""
    from transformers import SmolVLMConfig

    text = {"model_type": "llama", **text_config(vocab_size, hidden_size, num_layers)}
    return SmolVLMConfig(
        vision_config=tower_config(image_size, PATCH_SIZE),
        text_config=text,
        image_token_id=top_id(vocab_size, 1, image_token_id),
        scale_factor=2,
        pad_token_id=0,
    )


FAMILY = SmolVLMFamily(
    "smolvlm",
    classes=("SmolVLMForConditionalGeneration",),
    model_types=("smolvlm",),
    decoder="text_model",
    towers=("vision_model",),
    projectors=("connector",),
    video_processor="SmolVLMVideoProcessor",
    processor_class="SmolVLMProcessor",
    encoders=(("image", "vision_model", "connector"),),
    tiny={"SmolVLMForConditionalGeneration": tiny_config},
)
