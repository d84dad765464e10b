"""Shared helpers of the benchmarks: models of a chosen size, batches of a chosen shape, timing, memory.

Everything here runs on CPU and on CUDA with the same code. Models are random-initialised from
configs (no download), built directly on the target device in the target dtype, so a model of a
few billion parameters is ready in seconds on a GPU. Only config fields that have existed since
transformers 5.0 are used (the GPU machines may run an older 5.x than the development machines).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regate_lightning.families import FAMILIES as REGISTRY
from regate_lightning.families import GRID, LLAVA_NEXT_VIDEO, QWEN2_VL, QWEN3_5, QWEN3_VL, resolve

FAMILIES = (QWEN2_VL, LLAVA_NEXT_VIDEO, QWEN3_5, QWEN3_VL)
"""The families the benchmarks build (names of :data:`regate_lightning.families.FAMILIES`)."""


# --------------------------------------------------------------------------------------------------
# Models.


@dataclass
class ModelSpec:
    """Sizes of a random-initialised multimodal model.

    Attributes:
        family: ``"qwen2_vl"`` (Qwen2-VL, M-RoPE, video through the Qwen2-VL vision tower) or
            ``"llava_next_video"`` (LLaMA decoder, CLIP tower, 2x2-pooled frames).
        vocab_size: vocabulary of the language model; the last four ids are the media placeholders.
        hidden_size: hidden size of the language model.
        num_layers: decoder layers.
        num_heads: attention heads of the decoder.
        num_kv_heads: key/value heads of the decoder (grouped-query attention).
        intermediate_size: MLP width of the decoder.
        vision_depth: layers of the vision tower.
        vision_width: hidden size of the vision tower.
        vision_heads: attention heads of the vision tower.
        patch_size: patch side of the vision tower, in pixels.
        image_size: frame side in pixels (``llava_next_video`` only; Qwen2-VL frames are set per batch).
        head_dim: ``qwen3_5``: head dimension of the full-attention layers (0: ``hidden_size // num_heads``).
        linear_key_heads: ``qwen3_5``: key heads of the gated delta-net layers (0: ``num_heads``).
        linear_value_heads: ``qwen3_5``: value heads of the gated delta-net layers (0: ``num_heads``).
        linear_head_dim: ``qwen3_5``: key and value head dimension of the gated delta-net layers (0: the
            full-attention head dimension).
        deepstack: ``qwen3_vl``: the tower blocks whose features feed the first decoder layers (default: three
            blocks at a quarter, half and three quarters of the depth, as Qwen3-VL-2B's 5, 11, 17 of 24; the
            first ``depth`` blocks for a tower of fewer than 4).
        tie_embeddings: ``qwen3_vl``: share the input embeddings with the LM head (Qwen3-VL-2B does).
    """

    family: str = QWEN2_VL
    vocab_size: int = 4096
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 1536
    vision_depth: int = 2
    vision_width: int = 64
    vision_heads: int = 4
    patch_size: int = 8
    image_size: int = 64
    head_dim: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_head_dim: int = 0
    deepstack: tuple[int, ...] | None = None
    tie_embeddings: bool = False

    def deepstack_indexes(self) -> list[int]:
        """The tower blocks that feed DeepStack (``qwen3_vl``).

        Example:
            >>> ModelSpec(vision_depth=24).deepstack_indexes(), ModelSpec(vision_depth=2).deepstack_indexes()
            ([5, 11, 17], [0, 1])
        """
        if self.deepstack is not None:
            return list(self.deepstack)
        if self.vision_depth < 4:
            return list(range(self.vision_depth))
        return [(i + 1) * self.vision_depth // 4 - 1 for i in range(3)]

    def check(self) -> None:
        """Raise a clear error for sizes the model classes would reject later, less clearly."""
        if self.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width {self.vision_width} is not a multiple of vision_heads {self.vision_heads}")
        if self.family in (QWEN2_VL, QWEN3_VL) and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"{self.family} needs an even head dimension (M-RoPE sections)")
        if self.family == QWEN3_VL and not all(0 <= i < self.vision_depth for i in self.deepstack_indexes()):
            raise ValueError(
                f"deepstack {self.deepstack_indexes()} must be blocks of the {self.vision_depth}-block tower"
            )
        if self.family == LLAVA_NEXT_VIDEO and self.image_size % (2 * self.patch_size):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2 * patch_size {self.patch_size}")
        if self.family == QWEN3_5:
            keys, values = self.linear_key_heads or self.num_heads, self.linear_value_heads or self.num_heads
            if values % keys:
                raise ValueError(f"linear_value_heads {values} is not a multiple of linear_key_heads {keys}")
            if (self.head_dim or self.hidden_size // self.num_heads) % 8:
                raise ValueError("qwen3_5 needs a head dimension that is a multiple of 8 (a quarter of it rotates)")


QWEN2_VL_2B_LIKE = ModelSpec(
    family=QWEN2_VL,
    vocab_size=151936,
    hidden_size=1536,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    intermediate_size=8960,
    vision_depth=16,
    vision_width=1280,
    vision_heads=16,
    patch_size=14,
)
"""Text backbone of Qwen2-VL-2B (hidden 1536, 28 layers, 12/2 heads, MLP 8960, vocabulary 151936) with a
vision tower of half the real depth (16 of 32 blocks, width 1280)."""

QWEN3_VL_2B_LIKE = ModelSpec(
    family=QWEN3_VL,
    vocab_size=151936,
    hidden_size=2048,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    intermediate_size=6144,
    vision_depth=24,
    vision_width=1024,
    vision_heads=16,
    patch_size=16,
    deepstack=(5, 11, 17),
    tie_embeddings=True,
)
"""The published sizes of Qwen3-VL-2B-Instruct: text hidden 2048, 28 layers, 16/8 heads (head 128), MLP 6144,
vocabulary 151936, tied embeddings; vision tower 24 blocks of width 1024 (MLP 4096, 16 heads), patch 16,
DeepStack from blocks 5, 11 and 17."""


def decoder_kwargs(sizes: Any, **extra: Any) -> dict[str, Any]:
    """The decoder config's keyword arguments (:func:`~regate_lightning.families.base.text_config`, 32768
    positions) of ``sizes`` (a :class:`ModelSpec`, or any object with its decoder sizes), and ``extra``."""
    from regate_lightning.families.base import text_config

    return text_config(
        sizes.vocab_size,
        sizes.hidden_size,
        sizes.num_layers,
        num_heads=sizes.num_heads,
        num_kv_heads=sizes.num_kv_heads,
        intermediate_size=sizes.intermediate_size,
        max_positions=32768,
        **extra,
    )


def model_config(spec: ModelSpec) -> Any:
    """The transformers config of ``spec`` (placeholder ids are the last ids of the vocabulary)."""
    from regate_lightning.testing.tiny import clip_vision_config, llava_next_video_config, qwen_vl_kwargs

    spec.check()
    if spec.family == QWEN3_5:
        return qwen3_5_model_config(spec)
    text = decoder_kwargs(spec)
    if spec.family == QWEN3_VL:
        from transformers import Qwen3VLConfig

        from regate_lightning.families.qwen3_vl import qwen3_vl_kwargs, qwen3_vl_vision

        vision3 = qwen3_vl_vision(
            spec.hidden_size,
            depth=spec.vision_depth,
            hidden_size=spec.vision_width,
            num_heads=spec.vision_heads,
            patch_size=spec.patch_size,
            deepstack=spec.deepstack_indexes(),
            num_position_embeddings=2304,
            intermediate_size=4 * spec.vision_width,
        )
        return Qwen3VLConfig(vision_config=vision3, tie_word_embeddings=spec.tie_embeddings, **qwen3_vl_kwargs(text))
    if spec.family == QWEN2_VL:
        from transformers import Qwen2VLConfig

        vision = {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_width,
            "hidden_size": spec.hidden_size,
            "num_heads": spec.vision_heads,
            "mlp_ratio": 4,
            "patch_size": spec.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        }
        return Qwen2VLConfig(vision_config=vision, **qwen_vl_kwargs(text, rope_theta=1000000.0))
    vision_cfg = clip_vision_config(
        spec.image_size,
        spec.patch_size,
        hidden_size=spec.vision_width,
        num_layers=spec.vision_depth,
        num_heads=spec.vision_heads,
        intermediate_size=4 * spec.vision_width,
    )
    return llava_next_video_config(vision_cfg, text)


# Qwen3.5 (hybrid decoder: three gated delta-net layers to one full-attention layer) -----------------------

QWEN3_5_08B_LIKE = ModelSpec(
    family=QWEN3_5,
    vocab_size=248320,
    hidden_size=1024,
    num_layers=24,
    num_heads=8,
    num_kv_heads=2,
    intermediate_size=3584,
    vision_depth=12,
    vision_width=768,
    vision_heads=12,
    patch_size=16,
    head_dim=256,
    linear_key_heads=16,
    linear_value_heads=16,
    linear_head_dim=128,
)
"""Qwen3.5-0.8B's published sizes: text hidden 1024, 24 layers (18 gated delta-net, 6 full attention), 8 / 2
heads of 256, gated delta-net 16 / 16 heads of 128, MLP 3584, vocabulary 248320, tied embeddings; vision tower
12 blocks of width 768 (12 heads, MLP 3072), patch 16, merged into width 1024."""

QWEN3_5_CPU_SPEC = ModelSpec(
    family=QWEN3_5,
    vocab_size=4096,
    hidden_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=1792,
    vision_depth=2,
    vision_width=64,
    vision_heads=4,
    patch_size=8,
    head_dim=128,
    linear_key_heads=8,
    linear_value_heads=8,
    linear_head_dim=64,
)
"""The CPU benchmark's Qwen3.5-shaped model: Qwen3.5-0.8B's proportions at the CPU model's hidden 512 and 4
layers (3 gated delta-net, 1 full attention; query and linear-attention widths twice the hidden size, MLP 3.5
times), vocabulary 4096, the CPU model's 2-block, 64-wide tower."""


def qwen3_5_model_config(spec: ModelSpec) -> Any:
    """The ``Qwen3_5Config`` of a ``qwen3_5`` spec (the default ``layer_types``: every fourth layer full attention)."""
    from transformers import Qwen3_5Config

    from regate_lightning.families.qwen3_5 import qwen3_5_kwargs

    text = decoder_kwargs(spec, tie_word_embeddings=True)
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_width,
        "intermediate_size": 4 * spec.vision_width,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": spec.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "num_position_embeddings": 2304,
    }
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
    kwargs = qwen3_5_kwargs(
        text,
        vision,
        head_dim=head_dim,
        linear_heads=(spec.linear_key_heads or spec.num_heads, spec.linear_value_heads or spec.num_heads),
        linear_head_dim=spec.linear_head_dim or head_dim,
        rope_theta=10_000_000.0,
    )
    return Qwen3_5Config(**kwargs, tie_word_embeddings=True)


def build_model(
    spec: ModelSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    seed: int = 0,
) -> nn.Module:
    """A random-initialised model of ``spec``, built directly on ``device`` in ``dtype``.

    Args:
        spec: sizes.
        device: where the weights are created (no CPU detour for a GPU model).
        dtype: weight dtype.
        attn: attention implementation (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).
        seed: weight seed.

    Returns:
        The HF model in train mode, ``use_cache=False``.
    """
    import transformers

    cls = getattr(transformers, REGISTRY[spec.family].classes[0])
    return instantiate(cls, model_config(spec), device, dtype, attn, seed)


def instantiate(
    cls: Any, config: Any, device: str | torch.device, dtype: torch.dtype, attn: str, seed: int = 0
) -> nn.Module:
    """A random-initialised ``cls`` of ``config``, built directly on ``device`` in ``dtype`` with the attention
    implementation ``attn``: in train mode, ``use_cache=False``."""
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
        except TypeError:  # an older signature: set the default dtype ourselves
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                config._attn_implementation = attn
                model = cls(config)
            finally:
                torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model.to(dtype=dtype)  # an older transformers left a sub-model in another dtype
    model.config.use_cache = False
    model.train()
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters in total and in the language model (the text decoder plus the LM head)."""
    parts = resolve(model)
    total = sum(p.numel() for p in model.parameters())
    text = sum(p.numel() for p in parts.decoder.parameters())
    head = parts.lm_head.weight
    tied = any(head is p for p in parts.decoder.parameters())
    return {"total": total, "language_model": text + (0 if tied else head.numel())}


# --------------------------------------------------------------------------------------------------
# Batches.


@dataclass
class Shape:
    """A sequence shape: per row ``[bos] [visual] [prompt] [answer]`` (Qwen2-VL adds two vision markers).

    Attributes:
        batch_size: rows.
        visual_tokens: placeholder tokens of the video (rounded to whole frames by :func:`make_batch`).
        prompt_len: text tokens between the video and the answer.
        answer_len: supervised answer tokens (the last one is ``eos``).
        overhead: other positions: ``bos`` and, for Qwen2-VL, the vision start/end markers; for Qwen3.5 also
            each temporal patch's timestamp text and markers (:func:`media_overhead`).
    """

    batch_size: int
    visual_tokens: int
    prompt_len: int
    answer_len: int
    overhead: int = 1

    @property
    def length(self) -> int:
        """Sequence length of a row."""
        return self.overhead + self.visual_tokens + self.prompt_len + self.answer_len

    @property
    def answer_share(self) -> float:
        """Answer tokens / sequence length."""
        return self.answer_len / self.length


def _frame_unit(model: nn.Module) -> tuple[int, int]:
    """(frames per unit, placeholder tokens per unit) of the family's default frame layout."""
    from regate_lightning.testing.batches import media_layout

    parts = resolve(model)
    unit = parts.model.config.vision_config.temporal_patch_size if parts.family.placeholders == GRID else 1
    _, tokens, _ = media_layout(model, unit)
    return unit, tokens


def media_overhead(
    model: nn.Module, visual_tokens: int | None = None, frame_grid: tuple[int, int] | None = None
) -> int:
    """Non-media, non-text positions around the video: bos, plus Qwen2-VL's vision start/end markers.

    With ``visual_tokens``, also the text that a family writes per media step (Qwen3.5: each temporal patch's
    timestamp and vision start / end, :func:`step_text`) for a video of that many placeholders, its frames
    ``frame_grid`` patches (the family's random frames when None).
    """
    fixed = 1 + (2 if resolve(model).family.vision_markers else 0)
    if visual_tokens is None:
        return fixed
    per_step, text = step_text(model, frame_grid)
    return fixed + visual_tokens // per_step * text


def step_text(model: nn.Module, frame_grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(placeholders, other positions) of one media step in the family's random video layout.

    The other positions are those a family writes around each step besides the video's own markers: 0 for
    Qwen2-VL and the LLaVA families, a timestamp and vision start / end per temporal patch for Qwen3.5.

    Args:
        model: a supported multimodal model.
        frame_grid: ``(height, width)`` of a frame in patches for a family whose random media take it.
    """
    import inspect

    from regate_lightning.testing.batches import media_layout

    parts = resolve(model)
    family, config = parts.family, parts.model.config
    unit, tokens = _frame_unit(model)
    if family.placeholders != GRID or "grid" not in inspect.signature(family.random_media).parameters:
        return tokens, 0
    token, _, _ = media_layout(model, unit)
    kwargs = {} if frame_grid is None else {"grid": frame_grid}
    media = family.random_media(config, unit, torch.Generator().manual_seed(0), **kwargs)
    count = sum(1 for i in media.ids if i == token)
    return count, len(media.ids) - count - (2 if family.vision_markers else 0)


def visual_granularity(model: nn.Module, frame_grid: tuple[int, int] | None = None) -> int:
    """The visual token counts :func:`make_batch` can produce are multiples of this number."""
    _, tokens = _frame_unit(model)
    if frame_grid is None:
        return tokens
    merge = _merge(model)
    per_unit = frame_grid[0] * frame_grid[1] // (merge * merge)
    return math.lcm(tokens, per_unit)


def _merge(model: nn.Module) -> int:
    return int(resolve(model).model.config.vision_config.spatial_merge_size)


def shape_for_share(
    model: nn.Module,
    length: int,
    answer_share: float,
    prompt_len: int,
    batch_size: int,
    frame_grid: tuple[int, int] | None = None,
) -> Shape:
    """A shape of about ``length`` tokens whose answer is ``answer_share`` of it; the video fills the rest.

    The video is rounded to whole frames; the answer then takes whatever makes the length exact.
    """
    overhead = media_overhead(model)
    step = visual_granularity(model, frame_grid)
    answer = max(2, round(answer_share * length))
    per_step, text = step_text(model, frame_grid)
    positions = step + step // per_step * text  # of one granule of video, with the text written per media step
    visual = max(step, round((length - answer - prompt_len - overhead) / positions) * step)
    overhead = media_overhead(model, visual, frame_grid)
    answer = max(2, length - overhead - visual - prompt_len)
    return Shape(batch_size, visual, prompt_len, answer, overhead)


def fixed_shape(
    model: nn.Module,
    batch_size: int,
    visual_tokens: int,
    prompt_len: int,
    answer_len: int,
    frame_grid: tuple[int, int] | None = None,
) -> Shape:
    """A shape with the given token counts and the model's own overhead positions (``frame_grid``: the frames'
    size in patches, for a family that writes text per media step)."""
    return Shape(batch_size, visual_tokens, prompt_len, answer_len, media_overhead(model, visual_tokens, frame_grid))


def make_batch(model: nn.Module, shape: Shape, seed: int = 0, frame_grid: tuple[int, int] | None = None) -> dict:
    """A random batch of ``shape`` that ``model`` accepts (on CPU, float32 pixels).

    Args:
        model: a Qwen2-VL or LLaVA-NeXT-Video model.
        shape: the sequence shape; ``visual_tokens`` must be a multiple of :func:`visual_granularity`.
        seed: batch seed; also offsets ``sample_idx`` so that different seeds are different samples.
        frame_grid: grid families only: ``(height, width)`` of a frame in patches (multiples of the merge
            size). The default is the 8x8-patch frames of ``random_batch``; a realistic video (e.g.
            24x32 patches = 336x448 pixels at patch 14) gives fewer, larger frames of the same token count.
            A family that writes text per media step (Qwen3.5) lays its random video out at that size.

    Returns:
        The model's keys plus ``labels`` and ``sample_idx``.
    """
    from regate_lightning.testing.batches import random_batch

    unit, per_unit = _frame_unit(model)
    granularity = visual_granularity(model, frame_grid)
    if shape.visual_tokens <= 0 or shape.visual_tokens % granularity:
        raise ValueError(f"visual_tokens must be a positive multiple of {granularity}, got {shape.visual_tokens}")
    expected = media_overhead(model, shape.visual_tokens, frame_grid)
    if shape.overhead != expected:
        raise ValueError(f"shape.overhead {shape.overhead} does not match the model's {expected}")
    if frame_grid is not None and step_text(model, frame_grid)[1]:
        # Text per media step (Qwen3.5's timestamps): the placeholders are laid out by the frames' own grid.
        per_step = step_text(model, frame_grid)[0]
        return random_batch(
            model,
            batch_size=shape.batch_size,
            prompt_len=shape.prompt_len,
            answer_len=shape.answer_len,
            num_frames=unit * shape.visual_tokens // per_step,
            seed=seed,
            frame_grid=frame_grid,
        )
    frames = unit * shape.visual_tokens // per_unit
    batch = random_batch(
        model,
        batch_size=shape.batch_size,
        prompt_len=shape.prompt_len,
        answer_len=shape.answer_len,
        num_frames=frames,
        seed=seed,
    )
    parts = resolve(model)
    if frame_grid is not None:
        if parts.family.placeholders != GRID:
            raise ValueError("`frame_grid` applies to grid families (qwen2_vl) only")
        merge = _merge(model)
        height, width = frame_grid
        if height % merge or width % merge:
            raise ValueError(f"frame_grid {frame_grid} must be multiples of the merge size {merge}")
        temporal = shape.visual_tokens * merge * merge // (height * width)
        patches = temporal * height * width
        gen = torch.Generator().manual_seed(seed + 7919)
        dim = batch["pixel_values_videos"].shape[-1]
        batch["pixel_values_videos"] = torch.randn(shape.batch_size * patches, dim, generator=gen)
        batch["video_grid_thw"] = torch.tensor([[temporal, height, width]] * shape.batch_size, dtype=torch.long)
    return batch


def to_device(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move a batch; floating tensors (pixels) take the model's dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None, non_blocking=True)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Timing and memory.


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """A timestamp after the device's queued work has finished."""
    synchronize(device)
    return time.perf_counter()


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for an even count).

    Example:
        >>> median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class ActivationMeter:
    """Bytes of the tensors autograd saves for the backward pass ("activation memory").

    Counts, through ``torch.autograd.graph.saved_tensors_hooks``, every distinct storage saved during
    the forward pass, excluding the model's parameters and buffers. Saved tensors stay alive until the
    backward pass, so the sum at the end of the forward pass is the peak of saved activations. It
    leaves out transient buffers freed within the forward pass and the gradients of the backward
    pass; on a GPU, ``torch.cuda.max_memory_allocated`` is reported beside it.

    Args:
        model: the model whose parameters and buffers are not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.saved: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        """Saved bytes so far."""
        return sum(self.saved.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return tensor
        if ptr and ptr not in self.exclude and ptr not in self.saved:
            self.saved[ptr] = storage.nbytes()
        return tensor

    @contextmanager
    def measure(self) -> Iterator[ActivationMeter]:
        """Count what is saved inside the block."""
        self.saved = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def reset_peak(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` on CUDA, None on CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------
# Reporting.


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and library versions, for the header of every result."""
    import lightning
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages now (None where the OS does not tell)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A plain-text (and Markdown-compatible) table.

    Args:
        rows: one mapping per row.
        columns: ``(key, header, formatter)`` per column.

    Returns:
        The table as Markdown pipe syntax, aligned for reading in a terminal.
    """
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt(row.get(key)) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def fmt_float(digits: int) -> Callable[[Any], str]:
    """Formatter with ``digits`` decimals; ``-`` for None/NaN."""

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}"

    return fmt


def fmt_str(value: Any) -> str:
    """Formatter for text; ``-`` for None."""
    return "-" if value is None else str(value)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (dataclasses and NaN allowed), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)
        if isinstance(obj, torch.dtype | torch.device):
            return str(obj)
        return repr(obj)

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=default))
    tmp.replace(path)
    return path
