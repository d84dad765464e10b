"""Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's vision tower without DeepStack, and a hybrid recurrent text decoder.

``Qwen3_5ForConditionalGeneration`` and ``Qwen3_5MoeForConditionalGeneration`` (transformers
``models/qwen3_5``, ``models/qwen3_5_moe``) follow the Qwen-VL grid rules of :class:`QwenVLFamily`: an image or
video of grid ``(t, h, w)`` patches gives ``t * h * w / merge ** 2`` placeholder tokens, the pixels are
``qwen_patchify`` rows, the model needs ``mm_token_type_ids`` and computes its interleaved 3-D M-RoPE position
ids (``get_rope_index``) on the full sequence. What differs:

* **The vision tower** is Qwen3-VL's (``Qwen3_5VisionModel`` subclasses ``Qwen3VLVisionModel`` in the modular
  source) with DeepStack removed (``del self.deepstack_merger_list``): it returns only ``last_hidden_state``
  and the merged ``pooler_output``, so the decoder takes no per-position visual features beyond its input
  embeddings. It attends within one temporal patch (``get_vision_cu_seqlens``: ``h * w`` rows per segment),
  interpolates its learned position embeddings and its rotary ids per frame (``vision_utils``: the same for
  every temporal patch of a grid), so temporal patches are encoded independently and the engine skips those
  whose every token is elided.
* **Videos are laid out frame by frame.** The processor (``Qwen3VLProcessor.replace_video_token``) writes, for
  each temporal patch, its timestamp as text (``<1.5 seconds>``) and then that patch's placeholders between
  vision start / end tokens; the chat template's own ``<|vision_start|><|video_pad|><|vision_end|>`` wraps the
  whole. ``get_rope_index`` splits each video grid into ``t`` grids of one temporal patch and consumes one per
  run of video placeholders. A video is therefore several runs of placeholders
  (:meth:`Qwen3_5Family.media_per_row`), and random batches use that layout (:meth:`Qwen3_5Family.random_media`).
* **The text decoder is hybrid**: three of every four layers (``layer_types``) are gated delta-net
  linear-attention layers (``Qwen3_5GatedDeltaNet``: a causal depthwise convolution of kernel 4 over the
  sequence, then the gated delta rule, a recurrence whose state runs over the sequence in order), the fourth
  is full attention. Eliding a position removes it from the sequence that the recurrence and the convolution
  run over, so the elided step equals the unmodified model run on the kept positions (not the full sequence
  with a mask: a state that has seen a token cannot be made to forget it). Padding after the gather is on the
  right, after every real token of its row, so neither the causal convolution nor the recurrence of a real
  token reads it (HF also zeroes it: ``apply_mask_to_padding_states`` with ``create_recurrent_attention_mask``).
  ``Family.recurrent`` says so to the tests and the references (docs/method.md, "Recurrent decoders").
* **Qwen3.5-MoE** replaces the MLPs by a routed mixture of experts with a shared expert; with
  ``output_router_logits`` the engine adds the model's own ``load_balancing_loss_func`` over the kept,
  non-padding tokens (:class:`regate_lightning.elision.RouterLoss`).

The checkpoint's processing (per-frame timestamps in the placeholder text, the video processor's sampling) is
the data side's and is shared with Qwen3-VL (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families.base import DEFAULT_VOCAB, GRID, RandomMedia, text_config
from regate_lightning.families.qwen2_vl import PATCH_SIZE, QwenVLFamily
from regate_lightning.keys import (
    IMAGE_GRID_THW,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    TEXT_TYPE,
    VIDEO_GRID_THW,
    VIDEO_TYPE,
)

TIMESTAMP_TOKENS = 4
"""Text tokens that stand for one temporal patch's timestamp (``<1.5 seconds>``) in random batches."""

VIDEO_REFUSAL = (
    "Qwen3.5 videos need each temporal patch's timestamp in the placeholder text (the Qwen3-VL processor's "
    "layout), which regate_lightning.data does not write yet; a video written as one run of placeholders would "
    "not match the model's position ids. Use images, or skip video records (on_error='skip')"
)
"""Why the data pipeline refuses Qwen3.5 videos until the shared Qwen3-VL data side writes their timestamps."""


def interleaved_mrope_section(rotary_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) of an interleaved layout, in Qwen3.5's proportions.

    Qwen3.5's rotary half-dimension of 32 frequencies is split ``[11, 11, 10]``: with the interleaved layout
    (``mrope_interleaved``) the height takes frequencies ``1, 4, ...`` and the width ``2, 5, ...``, the
    temporal axis the rest.

    Args:
        rotary_dim: ``head_dim * partial_rotary_factor``, even.

    Example:
        >>> interleaved_mrope_section(64), interleaved_mrope_section(8)
        ([11, 11, 10], [2, 1, 1])
    """
    half = rotary_dim // 2
    height, width = half * 11 // 32 or 1, half * 10 // 32 or 1
    return [half - height - width, height, width]


def qwen3_5_kwargs(
    text: dict[str, Any],
    vision: dict[str, Any],
    *,
    head_dim: int,
    linear_heads: tuple[int, int],
    linear_head_dim: int,
    partial_rotary_factor: float = 0.25,
    rope_theta: float = 10000.0,
) -> dict[str, Any]:
    """Keyword arguments of a ``Qwen3_5Config`` / ``Qwen3_5MoeConfig`` around ``text`` (from :func:`text_config`).

    Adds the hybrid decoder's sizes (the default ``layer_types``: every fourth layer full attention), partial
    interleaved M-RoPE (:func:`interleaved_mrope_section`) and the four placeholder ids (image, video, vision
    start, vision end) at the top of the vocabulary.

    Args:
        text: the text config's keyword arguments.
        vision: the vision config's keyword arguments.
        head_dim: head dimension of the full-attention layers.
        linear_heads: key heads and value heads of the linear-attention layers.
        linear_head_dim: key and value head dimension of the linear-attention layers.
        partial_rotary_factor: share of the head dimension that is rotated.
        rope_theta: rotary base.
    """
    vocab = text["vocab_size"]
    rotary = int(head_dim * partial_rotary_factor)
    rope = {
        "rope_type": "default",
        "rope_theta": rope_theta,
        "partial_rotary_factor": partial_rotary_factor,
        "mrope_section": interleaved_mrope_section(rotary),
        "mrope_interleaved": True,
    }
    text = {
        **text,
        "head_dim": head_dim,
        "linear_num_key_heads": linear_heads[0],
        "linear_num_value_heads": linear_heads[1],
        "linear_key_head_dim": linear_head_dim,
        "linear_value_head_dim": linear_head_dim,
        "linear_conv_kernel_dim": 4,
        "rope_parameters": rope,
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": vocab - 1,
        "video_token_id": vocab - 2,
        "vision_start_token_id": vocab - 3,
        "vision_end_token_id": vocab - 4,
    }


def tiny_vision(hidden_size: int) -> dict[str, Any]:
    """The tiny vision tower: 2 blocks of width 32, patch 8, temporal patch 2, merge 2, an 8 x 8 position grid."""
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": hidden_size,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
    }


def tiny_qwen3_5_config(vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 4) -> Any:
    """A tiny ``Qwen3_5Config``: 3 linear-attention layers and 1 full-attention layer by default (Qwen3.5's
    pattern), 2 key / 4 value heads of 16 in the linear layers, 4 / 2 heads of 32 in the full one."""
    from transformers import Qwen3_5Config

    kwargs = qwen3_5_kwargs(
        text_config(vocab_size, hidden_size, num_layers),
        tiny_vision(hidden_size),
        head_dim=32,
        linear_heads=(2, 4),
        linear_head_dim=16,
    )
    return Qwen3_5Config(**kwargs)


def tiny_qwen3_5_moe_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 4,
    output_router_logits: bool = False,
    router_aux_loss_coef: float = 0.001,
) -> Any:
    """A tiny ``Qwen3_5MoeConfig``: the layers of :func:`tiny_qwen3_5_config`, each MLP 4 experts of width 32
    (2 per token) beside a shared expert of width 32; ``output_router_logits`` adds the load-balancing loss."""
    from transformers import Qwen3_5MoeConfig

    text = text_config(vocab_size, hidden_size, num_layers)
    del text["intermediate_size"]  # the MoE config has expert widths instead
    text.update(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        output_router_logits=output_router_logits,
        router_aux_loss_coef=router_aux_loss_coef,
    )
    kwargs = qwen3_5_kwargs(text, tiny_vision(hidden_size), head_dim=32, linear_heads=(2, 4), linear_head_dim=16)
    return Qwen3_5MoeConfig(**kwargs)


def video_runs(row: list[int], token: int) -> list[tuple[int, int]]:
    """``(start, end)`` (end exclusive) of each run of ``token`` in ``row``.

    Example:
        >>> video_runs([0, 7, 7, 1, 7], 7)
        [(1, 3), (4, 5)]
    """
    runs: list[tuple[int, int]] = []
    for i, value in enumerate(row):
        if value != token:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


@dataclass(frozen=True)
class Qwen3_5Family(QwenVLFamily):
    """The Qwen-VL rules with Qwen3.5's frame-by-frame video layout (see the module docstring)."""

    def media_per_row(self, config: Any, input_ids: Tensor, kind: str) -> Tensor:
        """Media items of ``kind`` per row (int64 ``[B]``); a video is its frames' runs of placeholders.

        Two consecutive runs of video placeholders are temporal patches of one video when the tokens between
        them are one vision end, the next patch's timestamp text and one vision start, as the processor writes
        them; between two videos stand the chat template's end and start tokens too (two of each), or other
        text. Images are one run each.

        Example:
            >>> from types import SimpleNamespace
            >>> config = SimpleNamespace(video_token_id=9, vision_start_token_id=7, vision_end_token_id=8)
            >>> one = [7, 5, 7, 9, 9, 8, 5, 7, 9, 9, 8, 8]  # a video of 2 temporal patches
            >>> FAMILY.media_per_row(config, torch.tensor([one + one, one + [0] * 12]), "video").tolist()
            [2, 1]
        """
        if kind != "video" or not self.takes(kind):
            return super().media_per_row(config, input_ids, kind)
        token = int(config.video_token_id)
        start, end = self.marker_token_ids(config)
        counts = []
        for row in input_ids.tolist():
            runs = video_runs(row, token)
            videos = 0
            for i, (first, _) in enumerate(runs):
                gap = row[runs[i - 1][1] : first] if i else []
                markers = [t for t in gap if t in (start, end)]
                same = len(gap) >= 2 and gap[0] == end and gap[-1] == start and len(markers) == 2
                videos += 0 if same else 1
            counts.append(videos)
        return torch.tensor(counts, dtype=torch.long, device=input_ids.device)

    def random_media(
        self, config: Any, num_frames: int, generator: torch.Generator, grid: tuple[int, int] | None = None
    ) -> RandomMedia:
        """A video of ``num_frames`` frames in the processor's layout: per temporal patch, a timestamp of
        :data:`TIMESTAMP_TOKENS` random text tokens, then the patch's placeholders between vision start / end,
        the whole between the chat template's vision start / end.

        Args:
            config: the model's config.
            num_frames: frames, a multiple of ``temporal_patch_size``.
            generator: random source of the pixels and the timestamp tokens.
            grid: ``(height, width)`` of a frame in patches (multiples of the merge size); default
                ``4 * merge`` a side.

        Raises:
            ValueError: a frame count that is not a multiple of ``temporal_patch_size``, or a grid that is not
                a multiple of the merge size.
        """
        vision = config.vision_config
        tp, merge, patch = int(vision.temporal_patch_size), self.merge_size(config), int(vision.patch_size)
        if num_frames % tp or num_frames <= 0:
            raise ValueError(f"`num_frames` must be a positive multiple of temporal_patch_size {tp}, got {num_frames}")
        height, width = grid if grid is not None else (4 * merge, 4 * merge)
        if height % merge or width % merge or height <= 0 or width <= 0:
            raise ValueError(f"`grid` {grid} must be positive multiples of the merge size {merge}")
        steps = num_frames // tp
        per_step = height * width // (merge * merge)
        pixels = torch.randn(
            (steps * height * width, int(vision.in_channels) * tp * patch * patch), generator=generator
        )
        start, end = self.marker_token_ids(config)
        vocab = int(config.get_text_config().vocab_size)
        ids, types = [start], [TEXT_TYPE]
        for _ in range(steps):
            stamp = torch.randint(3, vocab - 8, (TIMESTAMP_TOKENS,), generator=generator).tolist()
            ids += [*stamp, start, *[int(config.video_token_id)] * per_step, end]
            types += [TEXT_TYPE] * (TIMESTAMP_TOKENS + 1) + [VIDEO_TYPE] * per_step + [TEXT_TYPE]
        ids.append(end)
        types.append(TEXT_TYPE)
        tensors = {PIXEL_VALUES_VIDEOS: pixels, VIDEO_GRID_THW: torch.tensor([[steps, height, width]])}
        return RandomMedia(ids, types, tensors, "video")


FAMILY = Qwen3_5Family(
    "qwen3_5",
    classes=("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"),
    model_types=("qwen3_5", "qwen3_5_moe"),
    towers=("visual",),
    projectors=("visual.merger",),
    placeholders=GRID,
    image_key=PIXEL_VALUES,
    video_key=PIXEL_VALUES_VIDEOS,
    grid_keys=(IMAGE_GRID_THW, VIDEO_GRID_THW),
    video_processor="Qwen3VLVideoProcessor",
    video_refusal=VIDEO_REFUSAL,
    mrope=True,
    vision_markers=True,
    token_types=True,
    encoders=(("image", "visual", "visual"), ("video", "visual", "visual")),
    recurrent=True,
    tiny={
        "Qwen3_5ForConditionalGeneration": tiny_qwen3_5_config,
        "Qwen3_5MoeForConditionalGeneration": tiny_qwen3_5_moe_config,
    },
)
