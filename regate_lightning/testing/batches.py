"""Random token batches in the exact keys of each supported family (debug recipe, tests, benchmarks).

The sequence of each row is ``[bos] [media placeholders] [prompt] [answer] [eos]`` with labels on the
answer and ``eos``. Visual inputs are random pixels of the model's own image size; placeholder counts
follow the model's config, so the HF model accepts the batch as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regate_lightning.families import CAUSAL_LM, resolve
from regate_lightning.keys import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    MM_TOKEN_TYPE_IDS,
    SAMPLE_IDX,
)


def _vision_geometry(vision_config: Any) -> tuple[int, int]:
    size = vision_config.image_size
    patch = vision_config.patch_size
    if size % patch:
        raise ValueError(f"image_size {size} is not a multiple of patch_size {patch}")
    return size, size // patch


def media_layout(model: nn.Module, num_frames: int) -> tuple[int, int, dict[str, Any]]:
    """Placeholder id, placeholder count and pixel tensor shapes of one sample's media.

    Args:
        model: a supported HF model.
        num_frames: frames per video (video families); even for Qwen2-VL.

    Returns:
        ``(token_id, num_tokens, spec)`` where ``spec`` describes the pixel inputs of one sample.
    """
    parts = resolve(model)
    cfg = parts.model.config
    if parts.family == "llava":
        size, grid = _vision_geometry(cfg.vision_config)
        cls = (
            1
            if cfg.vision_feature_select_strategy == "full" and "siglip" not in cfg.vision_config.model_type
            else 0
        )
        return cfg.image_token_id, grid * grid + cls, {"key": "pixel_values", "shape": (3, size, size)}
    if parts.family == "llava_next_video":
        size, grid = _vision_geometry(cfg.vision_config)
        pooled = grid // cfg.spatial_pool_stride
        shape = (num_frames, 3, size, size)
        return (
            cfg.video_token_id,
            num_frames * pooled * pooled,
            {"key": "pixel_values_videos", "shape": shape},
        )
    if parts.family == "video_llava":
        size, grid = _vision_geometry(cfg.vision_config)
        shape = (num_frames, 3, size, size)
        return (
            cfg.video_token_id,
            num_frames * (grid * grid + 1),
            {"key": "pixel_values_videos", "shape": shape},
        )
    if parts.family == "qwen2_vl":
        vc = cfg.vision_config
        tp, merge, patch = vc.temporal_patch_size, vc.spatial_merge_size, vc.patch_size
        if num_frames % tp:
            raise ValueError(f"`num_frames` must be a multiple of temporal_patch_size {tp}, got {num_frames}")
        side = 4 * merge  # 4 merged tokens per side
        grid = (num_frames // tp, side, side)
        n_patches = grid[0] * grid[1] * grid[2]
        spec = {
            "key": "pixel_values_videos",
            "shape": (n_patches, vc.in_channels * tp * patch * patch),
            "grid": grid,
        }
        return cfg.video_token_id, n_patches // (merge * merge), spec
    raise ValueError(f"no media layout for family {parts.family!r}")


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
    media_id, n_media, spec = (None, 0, {}) if parts.family == CAUSAL_LM else media_layout(model, num_frames)
    vision_wrap = parts.family == "qwen2_vl"
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
            types[row, :n] = (ids[row, :n] == media_id).long() * 2
    batch: dict[str, torch.Tensor] = {
        INPUT_IDS: ids,
        ATTENTION_MASK: attention,
        LABELS: labels,
        SAMPLE_IDX: torch.arange(batch_size, dtype=torch.long) + seed * batch_size,
    }
    if spec:
        batch[spec["key"]] = torch.randn((batch_size, *spec["shape"]), generator=gen)
        if parts.family == "qwen2_vl":
            batch[spec["key"]] = batch[spec["key"]].flatten(0, 1)
            batch["video_grid_thw"] = torch.tensor([spec["grid"]] * batch_size, dtype=torch.long)
            batch[MM_TOKEN_TYPE_IDS] = types
    return batch
