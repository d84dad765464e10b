"""Random token batches in the exact keys of each supported family (debug recipe, tests, benchmarks).

The sequence of each row is ``[bos] [media placeholders] [prompt] [answer] [eos]`` with labels on the
answer and ``eos``. Visual inputs are random pixels of the model's own image size; placeholder counts
follow the model's config, so the HF model accepts the batch as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regate_lightning.families import resolve
from regate_lightning.keys import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    SAMPLE_IDX,
)


def media_layout(model: nn.Module, num_frames: int) -> tuple[int, int, dict[str, Any]]:
    """Placeholder id, placeholder count and pixel tensor shapes of one sample's media.

    A family that takes videos gets one video of ``num_frames`` frames, else one image; the layout is the
    family's own (:meth:`~regate_lightning.families.Family.random_media`).

    Args:
        model: a supported multimodal HF model.
        num_frames: frames per video (video families).

    Returns:
        ``(token_id, num_tokens, spec)`` where ``spec`` describes the pixel inputs of one sample:
        ``{"key", "shape"}`` (the shape without the leading item dimension for a LLaVA family's pixels), plus
        ``"grid"`` (``(t, h, w)``) for grid families.

    Raises:
        ValueError: a text-only model, or a frame count the family cannot take.
    """
    parts = resolve(model)
    family, cfg = parts.family, parts.model.config
    media = family.random_media(cfg, num_frames, torch.Generator().manual_seed(0))
    # a kind without a placeholder id of its own is taken as images by the model (SmolVLM's, InternVL's frames)
    token = family.media_token_id(cfg, media.kind)
    if token is None:
        token = family.media_token_id(cfg, "image")
    assert token is not None
    key = family.media_key(media.kind)
    pixels = media.tensors[key]
    spec: dict[str, Any] = {
        "key": key,
        "shape": tuple(pixels.shape[1:]) if family.grid_keys is None else tuple(pixels.shape),
    }
    if family.grid_keys is not None:
        grid_key = family.grid_keys[0 if media.kind == "image" else 1]
        spec["grid"] = tuple(int(v) for v in media.tensors[grid_key][0].tolist())
    return token, sum(1 for i in media.ids if i == token), spec


def random_batch(
    model: nn.Module,
    batch_size: int = 2,
    prompt_len: int = 16,
    answer_len: int = 24,
    num_frames: int = 2,
    seed: int = 0,
    ragged: bool = False,
    frame_grid: tuple[int, int] | None = None,
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
        frame_grid: ``(height, width)`` of a frame in patches, for a family whose random media take a ``grid``
            (the Qwen-VL families); the family's default frames when None.

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
    grid = {} if frame_grid is None else {"grid": frame_grid}
    media = [family.random_media(cfg, num_frames, gen, **grid) for _ in range(batch_size)] if family.multimodal else []
    block = media[0].ids if media else []
    head = 1 + len(block) + prompt_len
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
        kinds = [0]
        if media:
            seq += media[row].ids
            kinds += media[row].token_types
        seq += torch.randint(low, high, (prompt_len + answer - 1,), generator=gen).tolist()
        seq.append(text_cfg.eos_token_id if text_cfg.eos_token_id is not None else 2)
        n = len(seq)
        ids[row, :n] = torch.tensor(seq)
        attention[row, :n] = 1
        labels[row, head:n] = ids[row, head:n]
        types[row, : len(kinds)] = torch.tensor(kinds)
    batch: dict[str, torch.Tensor] = {
        INPUT_IDS: ids,
        ATTENTION_MASK: attention,
        LABELS: labels,
        SAMPLE_IDX: torch.arange(batch_size, dtype=torch.long) + seed * batch_size,
    }
    for key in media[0].tensors if media else ():
        batch[key] = torch.cat([m.tensors[key] for m in media])
    if family.token_types:
        batch[family.token_types_key] = types
    return batch
