"""Random token batches in the exact keys of each supported family (debug recipe, tests, benchmarks).

The sequence of each row is ``[bos] [media placeholders] [prompt] [answer] [eos]`` with labels on the
answer and ``eos``. Visual inputs are random pixels of the model's own image size; placeholder counts
follow the model's config, so the HF model accepts the batch as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regate_lightning.families import GRID, resolve
from regate_lightning.keys import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    MM_TOKEN_TYPE_IDS,
    SAMPLE_IDX,
    VIDEO_TYPE,
)


def media_layout(model: nn.Module, num_frames: int) -> tuple[int, int, dict[str, Any]]:
    """Placeholder id, placeholder count and pixel tensor shapes of one sample's media.

    A family that takes videos gets one video of ``num_frames`` frames, else one image; the counts follow
    the family's placeholder rule in :mod:`regate_lightning.families`.

    Args:
        model: a supported multimodal HF model.
        num_frames: frames per video (video families); a multiple of the temporal patch size for grid
            families (Qwen2-VL), whose frames are ``4 * merge`` patches a side.

    Returns:
        ``(token_id, num_tokens, spec)`` where ``spec`` describes the pixel inputs of one sample:
        ``{"key", "shape"}``, plus ``"grid"`` (``(t, h, w)``) for grid families.

    Raises:
        ValueError: a text-only model, or a frame count the family cannot take.
    """
    parts = resolve(model)
    family, cfg = parts.family, parts.model.config
    vision = getattr(cfg, "vision_config", None)
    if family.placeholders == GRID:
        tp, merge, patch = vision.temporal_patch_size, vision.spatial_merge_size, vision.patch_size
        if num_frames % tp:
            raise ValueError(f"`num_frames` must be a multiple of temporal_patch_size {tp}, got {num_frames}")
        side = 4 * merge  # 4 merged tokens per side
        grid = (num_frames // tp, side, side)
        n_patches = grid[0] * grid[1] * grid[2]
        spec = {"key": family.video_key, "shape": (n_patches, vision.in_channels * tp * patch * patch), "grid": grid}
        return cfg.video_token_id, n_patches // (merge * merge), spec
    if family.video_key is not None:
        size = vision.image_size
        shape = (num_frames, 3, size, size)
        return cfg.video_token_id, num_frames * family.frame_tokens(cfg), {"key": family.video_key, "shape": shape}
    if family.image_key is not None:
        size = vision.image_size
        return cfg.image_token_id, family.image_tokens(cfg), {"key": family.image_key, "shape": (3, size, size)}
    raise ValueError(f"no media layout for family {family.name!r}")


def random_batch(
    model: nn.Module,
    batch_size: int = 2,
    prompt_len: int = 16,
    answer_len: int = 24,
    num_frames: int = 2,
    seed: int = 0,
    ragged: bool = False,
) -> dict[str, torch.Tensor]:
    """A random batch that ``model`` accepts, with labels on the answers.

    Args:
        model: a supported HF model.
        batch_size: rows.
        prompt_len: text tokens after the media and before the answer.
        answer_len: supervised answer tokens (the last one is ``eos``).
        num_frames: frames per video for video families.
        seed: generator seed; the same seed gives the same batch.
        ragged: if True, row ``i`` has ``i * 3`` fewer answer tokens, right-padded.

    Returns:
        The model's keys plus ``labels`` and ``sample_idx``.
    """
    parts = resolve(model)
    cfg = parts.model.config
    text_cfg = getattr(cfg, "text_config", cfg)
    vocab = text_cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    low, high = 3, vocab - 8  # keep clear of pad/bos/eos and of the placeholder ids at the top
    family = parts.family
    media_id, n_media, spec = media_layout(model, num_frames) if family.multimodal else (None, 0, {})
    vision_wrap = family.vision_markers
    head = 1 + n_media + (2 if vision_wrap else 0) + prompt_len
    length = head + answer_len
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros(batch_size, length, dtype=torch.long)
    types = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        answer = answer_len - (3 * row if ragged else 0)
        if answer < 2:
            raise ValueError(f"`answer_len` {answer_len} is too short for {batch_size} ragged rows")
        seq = [text_cfg.bos_token_id if text_cfg.bos_token_id is not None else 1]
        if media_id is not None:
            media = [media_id] * n_media
            if vision_wrap:
                media = [cfg.vision_start_token_id, *media, cfg.vision_end_token_id]
            seq += media
        seq += torch.randint(low, high, (prompt_len + answer - 1,), generator=gen).tolist()
        seq.append(text_cfg.eos_token_id if text_cfg.eos_token_id is not None else 2)
        n = len(seq)
        ids[row, :n] = torch.tensor(seq)
        attention[row, :n] = 1
        labels[row, head:n] = ids[row, head:n]
        if media_id is not None:
            types[row, :n] = (ids[row, :n] == media_id).long() * VIDEO_TYPE
    batch: dict[str, torch.Tensor] = {
        INPUT_IDS: ids,
        ATTENTION_MASK: attention,
        LABELS: labels,
        SAMPLE_IDX: torch.arange(batch_size, dtype=torch.long) + seed * batch_size,
    }
    if spec:
        batch[spec["key"]] = torch.randn((batch_size, *spec["shape"]), generator=gen)
        if family.grid_keys is not None:
            batch[spec["key"]] = batch[spec["key"]].flatten(0, 1)
            batch[family.grid_keys[1]] = torch.tensor([spec["grid"]] * batch_size, dtype=torch.long)
        if family.token_types:
            batch[MM_TOKEN_TYPE_IDS] = types
    return batch
