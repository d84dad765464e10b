"""Run an HF model's decoder on a chosen subset of sequence positions, exactly.

The engine takes a batch in the model's own keys plus ``labels`` and an optional ``keep_mask``
(bool ``[B, L]``, True = the position stays in the decoder's sequence). It lets the model encode
its images or videos and merge them into the input embeddings as usual; a forward pre-hook on the
text decoder then gathers the kept positions, with their *original* position ids (1-D, or
Qwen2-VL's 3-D M-RoPE ids), right-pads them to the longest kept row and passes an explicit 2-D
attention mask (without it, transformers reads gaps in the position ids as packed-sequence
boundaries and silently blocks attention across them). The LM head runs only at kept positions
that have a supervised target, and the loss uses the targets pre-shifted on the *full* sequence,
so a shortened sequence never shifts labels across positions that were not neighbours.

Which positions to keep is the caller's policy; the engine runs whatever the mask keeps, visual
and prompt positions included.

**Media steps whose every token is elided are not encoded.** A family's vision encoder encodes each
time step of a media (a frame; a temporal patch of Qwen2-VL) independently of the others
(:attr:`~regate_lightning.families.Family.encoders`), so the features of the steps that keep a token do
not depend on the others. When a keep mask elides every placeholder of a step, a forward pre-hook on the
tower passes it only the other steps' pixels (and, for Qwen2-VL, their grid), and a forward hook on the
module that outputs the features puts zeros in the skipped steps' rows, so that the model merges the
features into its placeholders as usual; those zeros sit at elided positions, which the decoder never
sees. The vision tower's forward and backward then cost what the kept steps cost.

**Packed steps** (``forward_active(..., packed=True)``): instead of right-padding every row to the longest
kept row, the kept positions of all rows run back to back as one row ``[1, T]`` (``T`` = the positions kept in
the whole batch), each with its own original position ids, under an attention mask that confines every token
to the earlier tokens of its own sample (built by transformers' own mask functions for the model's attention
implementation), and with the variable-length arguments of FlashAttention-2 (``cu_seq_lens_q/k``,
``max_length_q/k``). No padding position is computed. See :func:`pack_layout` and docs/elision.md.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regate_lightning.families import MEDIA_KINDS, Family, ModelParts, find_module, resolve
from regate_lightning.keys import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    KEEP_MASK,
    LABELS,
    LOSS,
    NUM_ACTIVE,
    NUM_TARGETS,
    NUM_TOKENS,
    TOKEN_LOSS,
)
from regate_lightning.packed_sdpa import PACKED_SDPA, row_marker
from regate_lightning.targets import shift_targets


@dataclass
class ElidedOutput:
    """What one forward pass on the active positions produced.

    Attributes:
        loss: float scalar, mean cross-entropy over the computed supervised targets (with grad).
        token_loss: float32 ``[B, L]``, detached; the loss of predicting token ``t + 1`` at original
            position ``t``; NaN where nothing was computed (elided, padding, or unsupervised).
        num_active: positions the decoder processed (padding excluded).
        num_tokens: non-padding positions of the batch.
        num_targets: supervised targets whose loss was computed.
        decoder_length: sequence length the decoder actually ran on (``L'`` after gathering; ``T``, every kept
            position of the batch, on a packed step).
        skipped_steps: media steps (frames, temporal patches, images) the vision encoder did not encode,
            because the keep mask elides every one of their tokens.
        aux_loss: a mixture-of-experts decoder's load-balancing loss over the tokens its router saw (the kept,
            non-padding ones), detached; ``loss`` includes it times the config's ``router_aux_loss_coef``, as the
            HF model's own loss does. None for a dense decoder.
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    num_active: int
    num_tokens: int
    num_targets: int
    decoder_length: int
    skipped_steps: int = 0
    aux_loss: torch.Tensor | None = None

    def step_output(self) -> dict[str, Any]:
        """The dict a training step returns and ``ReGATECallback.on_train_batch_end`` reads."""
        return {
            LOSS: self.loss,
            TOKEN_LOSS: self.token_loss,
            NUM_ACTIVE: self.num_active,
            NUM_TOKENS: self.num_tokens,
            NUM_TARGETS: self.num_targets,
        }


@dataclass(frozen=True)
class RouterLoss:
    """A mixture-of-experts decoder's auxiliary load-balancing loss, computed as its HF model computes it.

    HF's MoE models add ``router_aux_loss_coef * load_balancing_loss_func(router_logits, ...)`` to the loss in
    their ``*ForCausalLM`` / ``*ForConditionalGeneration`` forward when the text config's
    ``output_router_logits`` is set. The engine runs the inner model and the head itself, so it asks the inner
    model for the router logits and applies the model's own ``load_balancing_loss_func`` (from the model's
    modeling module), over the tokens the router saw that are not padding.

    Attributes:
        function: the modeling module's ``load_balancing_loss_func``.
        num_experts: experts per MoE layer.
        top_k: experts per token.
        coef: ``router_aux_loss_coef``.
    """

    function: Any
    num_experts: int
    top_k: int
    coef: float

    @classmethod
    def of(cls, parts: ModelParts) -> RouterLoss | None:
        """The router loss of a model whose text config asks for one (``output_router_logits``), else None.

        Raises:
            TypeError: a model that asks for router logits but whose modeling module has no
                ``load_balancing_loss_func``.
        """
        config = parts.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if not getattr(text, "output_router_logits", False):
            return None
        if "output_router_logits" not in inspect.signature(type(parts.model).forward).parameters:
            return None
        module = importlib.import_module(type(parts.model).__module__)
        function = getattr(module, "load_balancing_loss_func", None)
        if function is None:
            raise TypeError(
                f"{type(parts.model).__name__} asks for router logits (output_router_logits) but its modeling module "
                "has no load_balancing_loss_func; set output_router_logits=False in its text config"
            )
        return cls(function, int(text.num_experts), int(text.num_experts_per_tok), float(text.router_aux_loss_coef))

    def loss(self, router_logits: Any, routed: torch.Tensor) -> torch.Tensor:
        """The load-balancing loss over the routed tokens that are not padding (``routed``: bool ``[B, L']``)."""
        return self.function(router_logits, self.num_experts, self.top_k, routed.long())


def active_index(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the active positions of each row, in order, right-padded.

    Args:
        active: bool ``[B, L]``.

    Returns:
        ``(index, valid)``: int64 ``[B, L']`` positions (padding slots hold 0) and bool ``[B, L']``
        marking real entries, where ``L'`` is the largest number of active positions in a row.

    Example:
        >>> idx, valid = active_index(torch.tensor([[True, False, True], [False, True, False]]))
        >>> idx.tolist(), valid.tolist()
        ([[0, 2], [1, 0]], [[True, True], [True, False]])
    """
    counts = active.sum(dim=1)
    width = int(counts.max().item()) if active.numel() else 0
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=active.device)[None, :] < counts[:, None]
    return order.masked_fill(~valid, 0), valid


def gather_positions(x: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``index`` (``[B, L']``) along the sequence dimension of ``x``.

    Works for embeddings ``[B, L, H]`` (``seq_dim=1``) and for position ids ``[B, L]`` or
    ``[k, B, L]`` (``seq_dim=-1``, the batch dimension just before it).

    Args:
        x: tensor whose batch dimension precedes ``seq_dim``.
        index: int64 ``[B, L']``.
        seq_dim: the sequence dimension of ``x``.

    Returns:
        ``x`` with its sequence dimension replaced by ``L'``.
    """
    seq_dim = seq_dim % x.dim()
    shape = [1] * x.dim()
    shape[seq_dim - 1], shape[seq_dim] = index.shape
    idx = index.view(shape).expand(*x.shape[: seq_dim - 1], *index.shape, *x.shape[seq_dim + 1 :])
    return x.gather(seq_dim, idx)


class _GatherHook:
    """Forward pre-hook on the text decoder that shortens its inputs to the active positions."""

    def __init__(self, parts: ModelParts, index: torch.Tensor, valid: torch.Tensor) -> None:
        self.parts = parts
        self.index = index
        self.valid = valid
        self.decoder_length = -1

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args, kwargs, embeds, positions = _full_decoder_inputs(self.parts, module, args, kwargs)
        batch, length = embeds.shape[:2]
        kwargs["inputs_embeds"] = gather_positions(embeds, self.index, seq_dim=1)
        kwargs["position_ids"] = gather_positions(positions, self.index, seq_dim=-1)
        kwargs[ATTENTION_MASK] = self.parts.family.decoder_mask(
            kwargs.get(ATTENTION_MASK), self.index, self.valid, length
        )
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(self.index.shape[1], device=embeds.device)
        full = _full_length_tensors(kwargs, batch, length)
        kwargs = self.parts.family.shorten_decoder_inputs(kwargs, self.index, self.valid, length)
        _refuse_full_length(self.parts, kwargs, full, length, self.index.shape[1])
        self.decoder_length = self.index.shape[1]
        return args, kwargs


def _full_decoder_inputs(
    parts: ModelParts, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor, torch.Tensor]:
    """The decoder's arguments with its input embeddings ``[B, L, H]`` and position ids over the full sequence.

    The embeddings are computed from ``input_ids`` when the model passed ids (a causal LM); the position ids are
    created as the decoder itself would (``arange``, ``[B, L]`` or ``[k, B, L]`` for M-RoPE) when the model passed
    none. ``input_ids`` is set to None in the returned keyword arguments (a copy).
    """
    kwargs = dict(kwargs)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        input_ids = kwargs.pop(INPUT_IDS, None)
        if input_ids is None and args:
            input_ids, args = args[0], args[1:]
        embeds = module.get_input_embeddings()(input_ids)
    kwargs[INPUT_IDS] = None
    batch, length = embeds.shape[:2]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=embeds.device).expand(batch, length)
        rows = parts.family.position_rows()
        if rows > 1:
            positions = positions.expand(rows, batch, length)
    return args, kwargs, embeds, positions


def _tensors(value: Any) -> list[torch.Tensor]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _full_length_tensors(kwargs: dict[str, Any], batch: int, length: int) -> set[int]:
    """Ids of the decoder's tensor arguments (or list items) shaped ``[B, L, ...]`` that the engine did not shorten."""
    return {
        id(t)
        for name, value in kwargs.items()
        if name not in ("inputs_embeds", "position_ids", ATTENTION_MASK)
        for t in _tensors(value)
        if t.dim() >= 2 and tuple(t.shape[:2]) == (batch, length)
    }


def _refuse_full_length(parts: ModelParts, kwargs: dict[str, Any], full: set[int], length: int, short: int) -> None:
    """Refuse a per-position decoder argument that the family left at the full length (it would be misaligned)."""
    for name, value in kwargs.items():
        if any(id(t) in full for t in _tensors(value)):
            raise RuntimeError(
                f"{type(parts.model).__name__} passes `{name}` over the full sequence ({length} positions) to its "
                f"decoder, which the elided step shortens to {short}; the family {parts.family.name!r} must shorten it "
                "in Family.shorten_decoder_inputs (regate_lightning/families/)"
            )


@contextmanager
def _gathering(parts: ModelParts, index: torch.Tensor, valid: torch.Tensor) -> Iterator[_GatherHook]:
    hook = _GatherHook(parts, index, valid)
    handle = parts.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield hook
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------------
# Packed steps: the kept positions of every row back to back in one row, attention confined to each sample.

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""The decoder layer types (a text config's ``layer_types``) a packed step supports: softmax attention, whose
mask transformers builds per type; any other type (linear attention, state-space, convolution, chunked
attention) carries state or blocks across positions that a packed row would share between samples."""


def packing_refusal(parts: ModelParts) -> str | None:
    """Why ``parts``' decoder cannot run packed sequences exactly, or None when it can.

    A packed row holds several samples back to back. Softmax attention is confined to each sample by the mask
    (:func:`packed_attention_mask`); a recurrent layer (the gated delta-net of Qwen3.5 and Qwen3-Next, Mamba
    layers) carries its state, and its short convolution its window, from one position to the next. transformers'
    torch path of those layers cannot keep the samples of a row apart (it refuses ``cu_seqlens`` unless the
    flash-linear-attention kernels are installed, and its convolution then needs ``seq_idx`` too, which this
    engine does not pass), so such a decoder is refused before any work.

    Returns:
        A one-line reason naming the model, the layer types and the fix, or None.
    """
    name = type(parts.model).__name__
    if type(parts.family).decoder_mask is not Family.decoder_mask:
        return (
            f"{name} cannot run packed sequences: the model builds its decoder's attention masks itself (the "
            f"{parts.family.name} family's Family.decoder_mask: e.g. image tokens that attend to each other both "
            "ways), which a packed row's sample-confined mask would replace; set `packed: false` (padded rows are "
            "exact for it)"
        )
    config = parts.decoder.config if hasattr(parts.decoder, "config") else parts.model.config
    types = set(getattr(config, "layer_types", None) or ())
    other = sorted(types - set(ATTENTION_LAYER_TYPES))
    if parts.family.recurrent or other:
        what = f"layer types {other}" if other else "recurrent layers"
        return (
            f"{name} cannot run packed sequences: its decoder has {what}, whose state runs from one position to "
            "the next, and transformers' torch path of them cannot keep the samples of a packed row apart; set "
            "`packed: false` (padded rows are exact for it)"
        )
    return None


@dataclass(frozen=True)
class PackedLayout:
    """Where the active positions of a ``[B, L]`` batch go in one packed row ``[1, T]``.

    Attributes:
        flat: int64 ``[T]``, the active positions in row-major order as indices into the flattened ``B * L``
            positions (row ``flat // L``, position ``flat % L``).
        rows: int64 ``[T]``, the batch row (sample) of each packed position.
        positions: int64 ``[T]``, the original position of each packed position in its row.
        cu_seqlens: int32 ``[S + 1]``, the cumulative lengths of the ``S`` samples that keep a position
            (FlashAttention's ``cu_seqlens``).
        max_length: the longest sample in the row.
    """

    flat: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int

    @property
    def index(self) -> torch.Tensor:
        """``flat`` as a ``[1, T]`` index into the flattened ``[1, B * L]`` batch."""
        return self.flat[None]

    @property
    def length(self) -> int:
        """``T``, the packed row's length."""
        return int(self.flat.numel())


def pack_layout(active: torch.Tensor) -> PackedLayout:
    """The packed layout of the active positions of a batch (see :class:`PackedLayout`).

    Args:
        active: bool ``[B, L]``.

    Returns:
        The layout; a row with no active position is no sample of the packed row.

    Example:
        >>> layout = pack_layout(torch.tensor([[True, False, True], [False, True, False]]))
        >>> layout.flat.tolist(), layout.rows.tolist(), layout.positions.tolist(), layout.cu_seqlens.tolist()
        ([0, 2, 4], [0, 0, 1], [0, 2, 1], [0, 2, 3])
    """
    length = active.shape[1]
    flat = active.reshape(-1).nonzero().flatten()
    counts = active.sum(1)
    counts = counts[counts > 0]
    cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return PackedLayout(
        flat=flat,
        rows=torch.div(flat, length, rounding_mode="floor"),
        positions=flat % length,
        cu_seqlens=cu_seqlens,
        max_length=int(counts.max()) if counts.numel() else 0,
    )


def packed_attention_mask(config: Any, embeds: torch.Tensor, rows: torch.Tensor) -> Any:
    """The decoder's attention mask for one packed row: causal, and within each sample only.

    transformers' own mask builders (``create_causal_mask``, ``create_sliding_window_causal_mask``) make it for
    the config's attention implementation, with its ``packed_sequence_mask_function`` over the samples' ids as
    an extra condition: a 4-D boolean mask for SDPA, a 4-D additive mask for eager attention, a ``BlockMask``
    for flex attention, and None for FlashAttention (which reads ``cu_seq_lens_q/k`` instead). The position ids
    are not given to the builders: they would read every gap that elision leaves in them as a sample boundary.
    For :data:`~regate_lightning.packed_sdpa.PACKED_SDPA`, which reads ``cu_seq_lens_q`` too, it is an all-True
    marker of no memory (:func:`~regate_lightning.packed_sdpa.row_marker`).

    Args:
        config: the text decoder's config (its ``_attn_implementation``, ``layer_types``, ``sliding_window``).
        embeds: the packed input embeddings ``[1, T, H]`` (their shape, dtype and device).
        rows: int64 ``[T]``, the sample of each packed position.

    Returns:
        One mask, or a dict ``{layer type: mask}`` when the decoder has layers of several types (it indexes
        the masks by each layer's type).
    """
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
        packed_sequence_mask_function,
    )

    if config._attn_implementation == PACKED_SDPA:  # it reads the samples' boundaries from cu_seq_lens_q
        return row_marker(embeds.shape[1], embeds.device)
    same_sample = packed_sequence_mask_function(rows[None])
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:  # one type for every layer: a sliding window where the config sets one (Mistral)
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
        layer_types = ["sliding_attention" if sliding else "full_attention"]
    kinds = [kind for kind in dict.fromkeys(layer_types) if kind in builders]  # others: see packing_refusal
    masks = {kind: builders[kind](config, embeds, None, None, and_mask_function=same_sample) for kind in kinds}
    if set(masks) == {"full_attention"} or not getattr(config, "layer_types", None):
        return next(iter(masks.values()))
    return masks


class _PackHook:
    """Forward pre-hook on the text decoder that runs the active positions of all rows as one packed row."""

    def __init__(self, parts: ModelParts, layout: PackedLayout) -> None:
        self.parts = parts
        self.layout = layout
        self.decoder_length = -1

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args, kwargs, embeds, positions = _full_decoder_inputs(self.parts, module, args, kwargs)
        batch, length = embeds.shape[:2]
        flat_length = batch * length
        index = self.layout.index.to(embeds.device)
        packed = gather_positions(embeds.reshape(1, flat_length, *embeds.shape[2:]), index, seq_dim=1)
        kwargs["inputs_embeds"] = packed
        flat_positions = positions.reshape(*positions.shape[:-2], 1, flat_length)
        kwargs["position_ids"] = gather_positions(flat_positions, index, seq_dim=-1)
        config = getattr(module, "config", self.parts.model.config)
        mask = packed_attention_mask(config, packed, self.layout.rows.to(embeds.device))
        kwargs[ATTENTION_MASK] = mask
        cu_seqlens = self.layout.cu_seqlens.to(embeds.device)
        kwargs.update(
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=self.layout.max_length,
            max_length_k=self.layout.max_length,
        )
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(self.layout.length, device=embeds.device)
        kwargs, full = _flatten_rows(kwargs, batch, length)
        valid = torch.ones_like(index, dtype=torch.bool)
        kwargs = self.parts.family.shorten_decoder_inputs(kwargs, index, valid, flat_length)
        _refuse_full_length(self.parts, kwargs, full, flat_length, self.layout.length)
        if kwargs.get(ATTENTION_MASK) is not mask:
            raise RuntimeError(
                f"the family {self.parts.family.name!r} replaces the decoder's attention mask in "
                "Family.shorten_decoder_inputs, which a packed step builds itself (one row, each sample attending to "
                "itself only); set `packed: false` for this family"
            )
        self.decoder_length = self.layout.length
        return args, kwargs


_OWN_INPUTS = ("inputs_embeds", "position_ids", ATTENTION_MASK)


def _flatten_rows(kwargs: dict[str, Any], batch: int, length: int) -> tuple[dict[str, Any], set[int]]:
    """The family's own per-position decoder inputs ``[B, L, ...]`` (tensors or list items) as ``[1, B * L, ...]``.

    Row-major flattening keeps the order in which a model fills per-position features (DeepStack's visual
    features follow the placeholders of the batch row by row), so a family's
    :meth:`~regate_lightning.families.Family.shorten_decoder_inputs` gathers them with the packed index as it
    gathers a padded batch.

    Returns:
        The keyword arguments and the ids of the flattened tensors (still at the full length ``B * L``).
    """

    def flat(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == (batch, length):
            return t.reshape(1, batch * length, *t.shape[2:])
        return t

    out = dict(kwargs)
    for name, value in kwargs.items():
        if name in _OWN_INPUTS:
            continue
        out[name] = type(value)(flat(v) for v in value) if isinstance(value, (list, tuple)) else flat(value)
    return out, _full_length_tensors(out, 1, batch * length)


@contextmanager
def _packing(parts: ModelParts, layout: PackedLayout) -> Iterator[_PackHook]:
    hook = _PackHook(parts, layout)
    handle = parts.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield hook
    finally:
        handle.remove()


@dataclass
class _StepSkip:
    """Which tower-input rows and which output rows of one media kind are kept (the steps with a kept token)."""

    kind: str
    rows: torch.Tensor  # bool [tower input rows]
    outputs: torch.Tensor  # bool [feature rows of the output module]
    tower_kwargs: dict[str, Any]  # the tower's other arguments for the kept steps (Qwen-VL: their grids)
    skipped: int  # steps not encoded


def plan_step_skips(parts: ModelParts, batch: Mapping[str, Any], active: torch.Tensor) -> list[_StepSkip]:
    """The media steps (frames, temporal patches, images) whose every placeholder position is inactive.

    Placeholders of a kind are filled with the kind's features in row-major order of the batch (HF's
    ``masked_scatter``), media by media and step by step, so the placeholder positions, split by the
    family's :meth:`~regate_lightning.families.Family.media_steps`, are each step's tokens.

    Args:
        parts: the model's parts.
        batch: the model's inputs.
        active: bool ``[B, L]``, the positions the decoder runs on.

    Returns:
        One entry per kind with at least one step to skip; a kind keeps at least its first step (a tower
        called on no pixel at all is not supported by every family).
    """
    family, config = parts.family, parts.model.config
    encoded = {kind for kind, _, _ in family.encoders}
    out = []
    for kind in MEDIA_KINDS:
        if kind not in encoded or family.media_token_id(config, kind) is None:
            continue
        media = family.media_steps(config, batch, kind)
        if not media:
            continue
        flags = active[family.placeholder_mask(config, batch[INPUT_IDS], kind)]
        sizes = [m.num_placeholders for m in media]
        if flags.numel() != sum(sizes):
            return []  # the model itself will refuse the batch, naming the counts
        keep = [m.steps_with_a_token(f) for f, m in zip(flags.split(sizes), media, strict=True)]
        steps = torch.cat(keep)
        if bool(steps.all()):
            continue
        if not bool(steps.any()):
            keep[0][0] = True
            steps = torch.cat(keep)
        rows = torch.cat([k.repeat_interleave(m.rows_per_step) for k, m in zip(keep, media, strict=True)])
        per_row_output = family.encoders[0][1] != family.encoders[0][2]  # a projector: one output row per input row
        outputs = (
            rows
            if per_row_output
            else torch.cat([k.repeat_interleave(m.tokens_per_step) for k, m in zip(keep, media, strict=True)])
        )
        tower_kwargs = family.skip_tower_kwargs(batch, kind, keep)
        out.append(_StepSkip(kind, rows, outputs, tower_kwargs, int((~steps).sum())))
    return out


class _SkipHooks:
    """Tower pre-hooks that drop the skipped steps' pixels, output hooks that put zero rows back for them."""

    def __init__(self, parts: ModelParts, batch: Mapping[str, Any], skips: list[_StepSkip]) -> None:
        self.skips = {s.kind: s for s in skips}
        # The kinds the model will encode, in its order: each call of a tower belongs to the next one.
        family = parts.family
        self.family = family
        self.calls = [kind for kind, _, _ in family.encoders if batch.get(family.media_key(kind)) is not None]
        self.pending: _StepSkip | None = None

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if not self.calls:
            raise RuntimeError("the vision tower was called more often than the batch has media kinds")
        skip = self.skips.get(self.calls.pop(0))
        if skip is None:
            return args, kwargs
        pixels = args[0] if args else kwargs["pixel_values"]
        if pixels.shape[0] != skip.rows.numel():
            raise RuntimeError(
                f"the vision tower got {pixels.shape[0]} rows of {skip.kind} pixels where the family's layout has "
                f"{skip.rows.numel()}; this transformers version encodes media differently"
            )
        pixels = pixels[skip.rows.to(pixels.device)]
        args, kwargs = ((pixels, *args[1:]), dict(kwargs)) if args else (args, {**kwargs, "pixel_values": pixels})
        kwargs.update(
            {k: v.to(pixels.device) if isinstance(v, torch.Tensor) else v for k, v in skip.tower_kwargs.items()}
        )
        self.pending = skip
        return args, kwargs

    def after(self, module: nn.Module, args: Any, output: Any) -> Any:
        skip, self.pending = self.pending, None
        if skip is None:
            return output
        return self.family.fill_skipped(output, skip.outputs)


@contextmanager
def _skipping(parts: ModelParts, batch: Mapping[str, Any], skips: list[_StepSkip]) -> Iterator[None]:
    if not skips:
        yield
        return
    hooks = _SkipHooks(parts, batch, skips)
    handles = []
    towers = {tower for _, tower, _ in parts.family.encoders}
    outputs = {output for _, _, output in parts.family.encoders}
    for path in towers:
        module = find_module(parts.inner, path)
        if module is not None:
            handles.append(module.register_forward_pre_hook(hooks.before, with_kwargs=True))
    for path in outputs:
        module = find_module(parts.inner, path)
        if module is not None:
            handles.append(module.register_forward_hook(hooks.after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_NON_MODEL_KEYS = frozenset({LABELS, KEEP_MASK})


def model_inputs(parts: ModelParts, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that the model's inner forward accepts by name."""
    accepted = inspect.signature(parts.inner.forward).parameters
    return {k: v for k, v in batch.items() if k in accepted and k not in _NON_MODEL_KEYS}


def check_keep_mask(keep_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Raise a clear error for a keep mask of the wrong type or shape."""
    if not isinstance(keep_mask, torch.Tensor) or keep_mask.dtype != torch.bool:
        got = keep_mask.dtype if isinstance(keep_mask, torch.Tensor) else type(keep_mask).__name__
        raise TypeError(f"`{KEEP_MASK}` must be a bool tensor [B, L] (True = keep the position), got {got}")
    if keep_mask.shape != input_ids.shape:
        raise ValueError(
            f"`{KEEP_MASK}` must have the shape of `{INPUT_IDS}` {tuple(input_ids.shape)}, got {tuple(keep_mask.shape)}"
        )


def forward_active(
    model: nn.Module, batch: Mapping[str, Any], keep_mask: torch.Tensor | None = None, *, packed: bool = False
) -> ElidedOutput:
    """Run ``model`` on the active positions of ``batch`` and compute the loss there.

    Active positions are those with ``attention_mask`` 1 and ``keep_mask`` True. Without a keep
    mask (or when it keeps every attended position) the model runs unchanged on the full batch,
    which is the exact baseline. With ``packed`` the active positions of all rows run as one row
    without padding (see :func:`pack_layout`), with or without a keep mask.

    Args:
        model: a supported HF model (see :mod:`regate_lightning.families`), optionally peft-wrapped.
        batch: the model's inputs (``input_ids``, ``attention_mask``, pixel values, grids, ...) and
            ``labels`` (int64 ``[B, L]``, -100 where unsupervised, *not* shifted).
        keep_mask: bool ``[B, L]`` or None.
        packed: run the active positions of every row back to back in one row ``[1, T]``, each sample
            attending to itself only, instead of right-padded rows.

    Returns:
        The loss, the per-position token losses and token counts.

    Raises:
        ValueError: no ``labels``; no supervised target in the batch; a keep mask of the wrong shape,
            or one that keeps no position of a row; ``packed`` for a decoder that cannot run packed
            sequences (:func:`packing_refusal`).
        TypeError: an unsupported model class, or a keep mask that is not bool.
    """
    parts = resolve(model)
    refusal = packing_refusal(parts) if packed else None
    if refusal is not None:
        raise ValueError(refusal)
    if LABELS not in batch:
        raise ValueError(
            f"the batch has no `{LABELS}`: training needs labels [B, L] with {IGNORE_INDEX} on unsupervised "
            "positions (the data collators of regate_lightning.data add them)"
        )
    input_ids: torch.Tensor = batch[INPUT_IDS]
    labels: torch.Tensor = batch[LABELS]
    attention = batch.get(ATTENTION_MASK)
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.bool()
    targets = shift_targets(labels).masked_fill(~attended, IGNORE_INDEX)
    if not (targets != IGNORE_INDEX).any():
        raise ValueError(
            "the batch has no supervised target: every label is -100 (or only the last token of each row is "
            "supervised). Check that the data marks the assistant's answer in `labels` and that max_length "
            "does not cut it away"
        )
    active = attended
    if keep_mask is not None:
        check_keep_mask(keep_mask, input_ids)
        active = attended & keep_mask.to(attended.device)
        empty = (active.sum(1) == 0) & (attended.sum(1) > 0)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"`{KEEP_MASK}` keeps no position in rows {rows}; keep at least the prompt of each row")
    inputs = model_inputs(parts, batch)
    inputs["use_cache"] = False
    router = RouterLoss.of(parts)
    if router is not None:
        inputs["output_router_logits"] = True
    num_tokens = int(attended.sum())
    skips: list[_StepSkip] = []
    rows = None  # the batch row of each computed position, where it is not the position's own row
    if packed:
        layout = pack_layout(active)
        skips = plan_step_skips(parts, batch, active)
        with _packing(parts, layout) as packer, _skipping(parts, batch, skips):
            out = parts.inner(**inputs)
        hidden = out.last_hidden_state
        if packer.decoder_length != layout.length or tuple(hidden.shape[:2]) != (1, layout.length):
            raise RuntimeError(
                f"{type(parts.model).__name__}: the decoder did not run on the packed row "
                f"(expected [1, {layout.length}], saw {list(hidden.shape[:2])})"
            )
        position, rows = layout.positions[None], layout.rows[None]
        gathered_targets = targets.reshape(-1)[layout.flat][None]
        decoder_length = layout.length
        routed = torch.ones_like(position, dtype=torch.bool)
    elif torch.equal(active, attended):
        out = parts.inner(**inputs)
        hidden = out.last_hidden_state
        position = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        gathered_targets = targets
        decoder_length = input_ids.shape[1]
        routed = attended
    else:
        index, valid = active_index(active)
        skips = plan_step_skips(parts, batch, active)
        with _gathering(parts, index, valid) as hook, _skipping(parts, batch, skips):
            out = parts.inner(**inputs)
        hidden = out.last_hidden_state
        routed = valid
        if hook.decoder_length != index.shape[1] or hidden.shape[1] != index.shape[1]:
            raise RuntimeError(
                f"{type(parts.model).__name__}: the decoder did not run on the gathered sequence "
                f"(expected length {index.shape[1]}, saw {hidden.shape[1]})"
            )
        position = index
        gathered_targets = targets.gather(1, index).masked_fill(~valid, IGNORE_INDEX)
        decoder_length = index.shape[1]
    supervised = gathered_targets != IGNORE_INDEX
    logits = parts.lm_head(hidden[supervised]).float()
    per_token = F.cross_entropy(logits, gathered_targets[supervised], reduction="none")
    token_loss = torch.full(input_ids.shape, float("nan"), dtype=torch.float32, device=input_ids.device)
    if rows is None:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(position)
    token_loss[rows[supervised], position[supervised]] = per_token.detach().float()
    loss = per_token.mean()
    aux = None
    if router is not None:
        aux = router.loss(out.router_logits, routed)
        loss = loss + router.coef * aux.to(loss.device)
    return ElidedOutput(
        loss=loss,
        token_loss=token_loss,
        num_active=int(active.sum()),
        num_tokens=num_tokens,
        num_targets=int(supervised.sum()),
        decoder_length=decoder_length,
        skipped_steps=sum(s.skipped for s in skips),
        aux_loss=None if aux is None else aux.detach(),
    )
