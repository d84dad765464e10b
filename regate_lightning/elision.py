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

from regate_lightning.families import MEDIA_KINDS, ModelParts, find_module, resolve
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
        decoder_length: sequence length the decoder actually ran on (``L'`` after gathering).
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
            rows = self.parts.family.position_rows()
            if rows > 1:
                positions = positions.expand(rows, batch, length)
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
        per_row_output = family.encoders[0][1] != family.encoders[0][2]  # a projector: one output row per step
        outputs = (
            steps
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


def forward_active(model: nn.Module, batch: Mapping[str, Any], keep_mask: torch.Tensor | None = None) -> ElidedOutput:
    """Run ``model`` on the active positions of ``batch`` and compute the loss there.

    Active positions are those with ``attention_mask`` 1 and ``keep_mask`` True. Without a keep
    mask (or when it keeps every attended position) the model runs unchanged on the full batch,
    which is the exact baseline.

    Args:
        model: a supported HF model (see :mod:`regate_lightning.families`), optionally peft-wrapped.
        batch: the model's inputs (``input_ids``, ``attention_mask``, pixel values, grids, ...) and
            ``labels`` (int64 ``[B, L]``, -100 where unsupervised, *not* shifted).
        keep_mask: bool ``[B, L]`` or None.

    Returns:
        The loss, the per-position token losses and token counts.

    Raises:
        ValueError: no ``labels``; no supervised target in the batch; a keep mask of the wrong shape,
            or one that keeps no position of a row.
        TypeError: an unsupported model class, or a keep mask that is not bool.
    """
    parts = resolve(model)
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
    if torch.equal(active, attended):
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
