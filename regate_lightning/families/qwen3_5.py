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
  (:meth:`Qwen3VLFamily.media_per_row`): the same layout as Qwen3-VL's, written by the same data path
  (:meth:`Qwen3VLFamily.media_expansion`), so :class:`Qwen3_5Family` subclasses :class:`Qwen3VLFamily`.
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

The checkpoint's processing (per-frame timestamps in the placeholder text, the video processor's rules) is
Qwen3-VL's: transformers maps ``qwen3_5`` to ``Qwen3VLProcessor``, ``Qwen2VLImageProcessor`` and
``Qwen3VLVideoProcessor`` (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from regate_lightning.families.base import DEFAULT_VOCAB, text_config
from regate_lightning.families.qwen2_vl import GRID_RULES, PATCH_SIZE, placeholder_ids
from regate_lightning.families.qwen3_vl import RANDOM_TIMESTAMP_TOKENS, Qwen3VLFamily

TIMESTAMP_TOKENS = RANDOM_TIMESTAMP_TOKENS
"""Text tokens that stand for one temporal patch's timestamp (``<1.5 seconds>``) in random batches (Qwen3-VL's)."""


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
    return {"text_config": text, "vision_config": vision, **placeholder_ids(vocab)}


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


@dataclass(frozen=True)
class Qwen3_5Family(Qwen3VLFamily):
    """Qwen3-VL's rules (grids, the timestamped video layout, its processors) with a recurrent text decoder.

    Qwen3.5 has no DeepStack, so the inherited :meth:`Qwen3VLFamily.shorten_decoder_inputs` and
    :meth:`Qwen3VLFamily.fill_skipped` find no DeepStack inputs or outputs and leave the rest as the generic rules do.
    """


FAMILY = Qwen3_5Family(
    "qwen3_5",
    classes=("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"),
    model_types=("qwen3_5", "qwen3_5_moe"),
    projectors=("visual.merger",),
    video_processor="Qwen3VLVideoProcessor",
    recurrent=True,
    **GRID_RULES,
    tiny={
        "Qwen3_5ForConditionalGeneration": tiny_qwen3_5_config,
        "Qwen3_5MoeForConditionalGeneration": tiny_qwen3_5_moe_config,
    },
)
