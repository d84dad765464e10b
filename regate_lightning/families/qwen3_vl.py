"""Qwen3-VL and Qwen3-VL-MoE: the Qwen-VL grid, DeepStack features, interleaved M-RoPE, timestamped videos.

What :class:`Qwen3VLFamily` adds to the Qwen-VL rules of :class:`~regate_lightning.families.qwen2_vl.QwenVLFamily`
(patch 16 and merge 2 in the checkpoints; ``t * h * w / merge ** 2`` placeholders per media; pixels in
``qwen_patchify`` order; ``mm_token_type_ids``):

* **DeepStack.** The vision tower also returns the merged features of some of its intermediate blocks
  (``deepstack_features``, one ``[visual tokens, hidden]`` tensor per entry of ``deepstack_visual_indexes``);
  the model passes them to its text decoder with ``visual_pos_masks`` (bool ``[B, L]``, the image and video
  placeholders), and the decoder adds entry ``i`` to the hidden states of decoder layer ``i`` at those positions.
  On an elided step the mask is gathered like the embeddings, and each entry keeps the rows of the visual
  positions the decoder still sees, in order (:meth:`Qwen3VLFamily.shorten_decoder_inputs`); the rows of elided
  visual tokens are dropped. When the engine skips temporal patches in the tower, the DeepStack features get
  zero rows for them, as the merged features do (:meth:`Qwen3VLFamily.fill_skipped`); those rows sit at elided
  positions and are dropped again before the decoder.
* **Interleaved M-RoPE.** The model computes 3-row position ids with its own ``get_rope_index`` on the full
  sequence (every temporal patch of a video is a grid ``(1, h, w)`` of its own, placed after the text before it)
  and passes them to its decoder as ``[3, B, L]``; the engine gathers them at the kept positions. (The decoder
  would also take 4 rows, the first being text positions for its mask: the model does not pass them.)
* **Timestamped videos.** ``Qwen3VLProcessor.replace_video_token`` writes every temporal patch of a video as
  ``<{t:.1f} seconds>`` + vision start + its placeholders + vision end, where ``t`` is the mean time of the
  patch's first and last frame (``_calculate_timestamps``: frame index / source fps, the last frame repeated
  to fill the last patch). The checkpoints' chat template writes a video as vision start, one video pad,
  vision end, and the processor replaces only the pad, so a video reads ``<|vision_start|><0.5 seconds>
  <|vision_start|>pads<|vision_end|><1.5 seconds><|vision_start|>pads<|vision_end|><|vision_end|>``
  (transformers 5.24). :meth:`Qwen3VLFamily.media_expansion` gives that text to the data side,
  :meth:`Qwen3VLFamily.media_per_row` counts a video as one item although its placeholders form one run per
  temporal patch, and :meth:`Qwen3VLFamily.random_media` builds the same layout.
* **Temporal patches are encoded independently**: the tower's attention runs per frame of the grid
  (``cu_seqlens`` of ``transformers.vision_utils.get_vision_cu_seqlens`` with ``merge_temporal=False``: one
  segment of ``h * w`` patches per temporal patch), its rotary and learned position embeddings depend on a
  patch's place in its frame only, and the patch embedding, mergers and MLPs work per row; so the engine
  skips the temporal patches whose every token is elided, as for Qwen2-VL.
* **MoE** (``Qwen3VLMoeForConditionalGeneration``): the router runs inside the decoder on the tokens it sees;
  with ``output_router_logits`` the engine adds the model's own load-balancing loss over the kept, non-padding
  tokens (:class:`~regate_lightning.elision.RouterLoss`).

Qwen3.5 (same vision settings, processor ``Qwen3VLProcessor``) can reuse this family's video rules by
subclassing :class:`Qwen3VLFamily`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    MediaText,
    RandomMedia,
    count_runs,
    scatter_rows,
    text_config,
)
from regate_lightning.families.qwen2_vl import GRID_RULES, QwenVLFamily, placeholder_ids
from regate_lightning.keys import (
    PIXEL_VALUES_VIDEOS,
    VIDEO_GRID_THW,
    VIDEO_TYPE,
)

PATCH_SIZE = 16
"""Patch side of the tiny test models (the checkpoints' own)."""

DEEPSTACK_EMBEDS = "deepstack_visual_embeds"
"""The decoder's keyword argument of DeepStack features: a list of ``[visual tokens, hidden]`` tensors."""
VISUAL_POS_MASKS = "visual_pos_masks"
"""The decoder's keyword argument of visual positions: bool ``[B, L]``."""

RANDOM_TIMESTAMP_TOKENS = 4
"""Text ids that stand for one temporal patch's timestamp in random batches (no tokenizer there)."""


def temporal_timestamps(frame_seconds: Sequence[float], temporal_patch_size: int) -> list[float]:
    """The time of each temporal patch, as ``Qwen3VLProcessor._calculate_timestamps`` computes it.

    The frames are padded to a multiple of ``temporal_patch_size`` by repeating the last one; a patch's time is
    the mean of its first and last frame's.

    Args:
        frame_seconds: each sampled frame's time in its source video (frame index / source fps).
        temporal_patch_size: frames per temporal patch.

    Returns:
        One time in seconds per temporal patch.

    Example:
        >>> temporal_timestamps([0.0, 0.5, 1.0], 2)
        [0.25, 1.0]
    """
    seconds = [float(s) for s in frame_seconds]
    if not seconds:
        raise ValueError("a video needs at least one frame time")
    if len(seconds) % temporal_patch_size:
        seconds.extend(seconds[-1] for _ in range(temporal_patch_size - len(seconds) % temporal_patch_size))
    return [
        (seconds[i] + seconds[i + temporal_patch_size - 1]) / 2 for i in range(0, len(seconds), temporal_patch_size)
    ]


def timestamp_text(seconds: float) -> str:
    """The text ``Qwen3VLProcessor`` writes before a temporal patch.

    Example:
        >>> timestamp_text(0.25), timestamp_text(12.0)
        ('<0.2 seconds>', '<12.0 seconds>')
    """
    return f"<{seconds:.1f} seconds>"


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) in the checkpoints' proportions (24, 20, 20 of 64).

    Example:
        >>> interleaved_mrope_section(128), interleaved_mrope_section(16)
        ([24, 20, 20], [4, 2, 2])
    """
    half = head_dim // 2
    side = half * 20 // 64
    return [half - 2 * side, side, side]


@dataclass(frozen=True)
class Qwen3VLFamily(QwenVLFamily):
    """The rules of Qwen3-VL (see the module docstring)."""

    # ----------------------------------------------------------------------------------------------
    # Videos: one run of placeholders per temporal patch, each after its timestamp.

    def media_expansion(self, text: MediaText) -> tuple[int | str, ...] | None:
        """A video: per temporal patch its timestamp text, vision start, its placeholders, vision end (see the module
        docstring and :meth:`~regate_lightning.families.Family.media_expansion`); an image: one run.

        Raises:
            ValueError: frame times that do not make the video's temporal patches, or a video without markers.
        """
        if text.kind != "video":
            return None
        if text.markers is None:
            raise ValueError(f"{self.name} writes a vision start / end around every temporal patch; none were given")
        times = temporal_timestamps(text.frame_seconds, text.temporal_patch_size)
        if len(times) != text.steps:
            raise ValueError(
                f"{len(text.frame_seconds)} frame times make {len(times)} temporal patches of "
                f"{text.temporal_patch_size}, but the video has {text.steps}"
            )
        start, end = text.markers
        parts: list[int | str] = []
        for t in times:
            parts += [timestamp_text(t), start, *[text.token_id] * text.tokens_per_step, end]
        return tuple(parts)

    def media_per_row(self, config: Any, input_ids: Tensor, kind: str) -> Tensor:
        """Media items of ``kind`` per row: the outermost vision start / end spans that hold its placeholders.

        A Qwen3-VL video is one span ``<|vision_start|> ... <|vision_end|>`` around its temporal patches, each of
        which has its own start / end; placeholders outside any span (a layout without markers) count by runs.
        """
        pads = self.placeholder_mask(config, input_ids, kind)
        start_id, end_id = self.marker_token_ids(config)
        starts, ends = (input_ids == start_id).long(), (input_ids == end_id).long()
        inside = (starts.cumsum(1) - ends.cumsum(1) + ends) > 0  # an end token still belongs to its span
        first = inside & ~torch.nn.functional.pad(inside, (1, 0))[:, :-1]
        span = first.long().cumsum(1) * inside  # 1, 2, ... per outermost span; 0 outside any
        holds = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.long, device=input_ids.device)
        holds.scatter_add_(1, span, (pads & inside).long())
        return (holds[:, 1:] > 0).sum(1) + count_runs(pads & ~inside)

    # ----------------------------------------------------------------------------------------------
    # The engine: DeepStack features follow the kept positions; skipped steps get zero rows.

    def shorten_decoder_inputs(
        self, kwargs: dict[str, Any], index: Tensor, valid: Tensor, length: int
    ) -> dict[str, Any]:
        """Gather ``visual_pos_masks`` at the kept positions; keep the DeepStack rows of kept visual tokens.

        The features of entry ``i`` are in row-major order of the full sequence's visual positions (HF's
        ``hidden_states[visual_pos_masks] += features``); the kept visual positions keep that order, so their
        rows are ``features[kept[visual_pos_masks]]``.
        """
        mask = kwargs.get(VISUAL_POS_MASKS)
        if mask is None:
            return kwargs
        mask = mask.to(index.device)
        rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        kept = torch.zeros(mask.shape, dtype=torch.bool, device=index.device)
        kept[rows[valid], index[valid]] = True
        kwargs[VISUAL_POS_MASKS] = mask.gather(1, index) & valid
        features = kwargs.get(DEEPSTACK_EMBEDS)
        if features is not None:
            keep = kept[mask]
            kwargs[DEEPSTACK_EMBEDS] = [f[keep.to(f.device)] for f in features]
        return kwargs

    def fill_skipped(self, output: Any, keep: Tensor) -> Any:
        """Zero rows for the skipped steps in the merged features and in every DeepStack entry.

        (``last_hidden_state``, one row per patch of the kept steps, is left as the tower returned it: the
        model reads only ``pooler_output`` and ``deepstack_features``.)
        """
        output = super().fill_skipped(output, keep)
        features = getattr(output, "deepstack_features", None)
        if features is not None:
            output.deepstack_features = [scatter_rows(f, keep) for f in features]
        return output

    # ----------------------------------------------------------------------------------------------
    # Random batches.

    def random_media(
        self, config: Any, num_frames: int, generator: torch.Generator, grid: tuple[int, int] | None = None
    ) -> RandomMedia:
        """A video of ``num_frames`` frames in the layout of :meth:`media_expansion` (frames at 2 fps).

        Each timestamp is :data:`RANDOM_TIMESTAMP_TOKENS` text ids (random batches have no tokenizer); the
        video is wrapped in vision start / end, as the checkpoints' chat template writes it.
        """
        grid, pixels = self.random_video(config, num_frames, generator, grid)
        merge = self.merge_size(config)
        token = int(config.video_token_id)
        start, end = self.marker_token_ids(config)
        seconds = [i / 2.0 for i in range(num_frames)]
        tp = int(config.vision_config.temporal_patch_size)
        text = MediaText(
            "video",
            token,
            steps=grid[0],
            tokens_per_step=grid[1] * grid[2] // (merge * merge),
            markers=(start, end),
            temporal_patch_size=tp,
            frame_seconds=tuple(seconds),
        )
        parts = self.media_expansion(text)
        assert parts is not None
        ids = [start]
        for part in parts:
            ids += _random_text_ids(part) if isinstance(part, str) else [part]
        ids.append(end)
        types = [VIDEO_TYPE if i == token else 0 for i in ids]
        tensors = {PIXEL_VALUES_VIDEOS: pixels, VIDEO_GRID_THW: torch.tensor([grid], dtype=torch.long)}
        return RandomMedia(ids, types, tensors, "video")


def _random_text_ids(text: str) -> list[int]:
    """:data:`RANDOM_TIMESTAMP_TOKENS` ordinary text ids (3 .. 12) that stand for a timestamp's text."""
    digits = [c for c in text if c.isdigit()][-(RANDOM_TIMESTAMP_TOKENS - 2) :]
    digits = ["0"] * (RANDOM_TIMESTAMP_TOKENS - 2 - len(digits)) + digits
    return [3, *(3 + int(d) for d in digits), 4]


def qwen3_vl_kwargs(text: dict[str, Any], rope_theta: float = 5000000.0) -> dict[str, Any]:
    """Keyword arguments of a Qwen3-VL config around ``text`` (from :func:`text_config`): interleaved M-RoPE and
    the four placeholder ids (image, video, vision start, vision end) at the top of the vocabulary."""
    vocab = text["vocab_size"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {
        "rope_type": "default",
        "rope_theta": rope_theta,
        "mrope_section": interleaved_mrope_section(head_dim),
        "mrope_interleaved": True,
    }
    return {"text_config": {**text, "head_dim": head_dim, "rope_parameters": rope}, **placeholder_ids(vocab)}


def qwen3_vl_vision(
    out_hidden_size: int,
    depth: int = 2,
    hidden_size: int = 32,
    num_heads: int = 4,
    patch_size: int = PATCH_SIZE,
    deepstack: Sequence[int] = (0, 1),
    num_position_embeddings: int = 16,
    intermediate_size: int | None = None,
) -> dict[str, Any]:
    """A Qwen3-VL vision config (merge 2, temporal patch 2) with DeepStack features from blocks ``deepstack``."""
    return {
        "depth": depth,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size if intermediate_size is None else intermediate_size,
        "num_heads": num_heads,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": out_hidden_size,
        "num_position_embeddings": num_position_embeddings,
        "deepstack_visual_indexes": list(deepstack),
    }


def tiny_qwen3_vl_config(vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 3) -> Any:
    """A tiny ``Qwen3VLConfig``: patch 16, merge 2, a 2-block tower whose both blocks feed DeepStack (decoder
    layers 0 and 1 of 3 receive its features)."""
    from transformers import Qwen3VLConfig

    text = text_config(vocab_size, hidden_size, num_layers)
    return Qwen3VLConfig(vision_config=qwen3_vl_vision(hidden_size), **qwen3_vl_kwargs(text))


def tiny_qwen3_vl_moe_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_experts: int = 4,
    output_router_logits: bool = False,
) -> Any:
    """A tiny ``Qwen3VLMoeConfig``: the tower of :func:`tiny_qwen3_vl_config`, every decoder layer a mixture of
    ``num_experts`` experts (2 per token); ``output_router_logits`` adds the load-balancing loss."""
    from transformers import Qwen3VLMoeConfig

    kwargs = qwen3_vl_kwargs(text_config(vocab_size, hidden_size, num_layers))
    kwargs["text_config"].update(
        num_experts=num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden_size // 2,
        decoder_sparse_step=1,
        output_router_logits=output_router_logits,
        router_aux_loss_coef=0.5,
    )
    return Qwen3VLMoeConfig(vision_config=qwen3_vl_vision(hidden_size), **kwargs)


FAMILY = Qwen3VLFamily(
    "qwen3_vl",
    classes=("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    projectors=("visual.merger", "visual.deepstack_merger_list"),
    video_processor="Qwen3VLVideoProcessor",
    **GRID_RULES,
    tiny={
        "Qwen3VLForConditionalGeneration": tiny_qwen3_vl_config,
        "Qwen3VLMoeForConditionalGeneration": tiny_qwen3_vl_moe_config,
    },
)
