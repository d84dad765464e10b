"""Reference runs of unmodified HF models on the same active tokens, against which every elision path is tested.

Three references, each independent of the engine's gather:

* :func:`token_losses_4d`: the full sequence through the whole model, with a 4-D attention mask that hides
  the elided keys (exact for attention decoders; not for recurrent layers, whose state a mask cannot hide);
* :func:`token_losses_shortened`: each row alone, its elided positions removed from ``input_ids`` (and every
  other per-position input), with its original position ids, through the whole model: the media must then
  keep all their placeholders (answer-token elision);
* :func:`token_losses_decoder`: each row alone through the model's own text decoder and head, on the kept
  positions of the merged input embeddings the model built on the full sequence (visual-token elision in a
  recurrent decoder, where neither other reference applies).

The position ids of the full sequence are those the model itself passes to its decoder
(:func:`decoder_inputs`), so no family's position rule is re-implemented here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from regate_lightning.elision import forward_active
from regate_lightning.families import MEDIA_KINDS, resolve
from regate_lightning.keys import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, LABELS, SAMPLE_IDX
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import Teacher, text_mask

TOL = 1e-5
"""The largest difference an exactness test allows between the elided step and its reference (losses, gradients)."""


def hf_inputs(batch: dict) -> dict:
    """The batch without this package's own keys."""
    return {k: v for k, v in batch.items() if k not in (SAMPLE_IDX, "keep_mask")}


def decoder_inputs(model: Any, batch: dict, grad: bool = False) -> dict[str, Any]:
    """The keyword arguments the model passes to its text decoder on the full batch (captured by a pre-hook).

    With ``grad`` the full run keeps its graph, so that gradients reach the tower through the merged embeddings.
    """
    parts = resolve(model)
    seen: dict[str, Any] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)

    handle = parts.decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        inputs = hf_inputs(batch)
        inputs.pop(LABELS)
        with torch.set_grad_enabled(grad):
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


def position_ids(model: Any, batch: dict) -> torch.Tensor:
    """The position ids of the full sequence as the model computes them (``[B, L]`` or ``[k, B, L]``)."""
    positions = decoder_inputs(model, batch).get("position_ids")
    if positions is None:
        return torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    return positions


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two token-loss maps that must have NaN at the same places."""
    assert torch.equal(a.isnan(), b.isnan()), "computed positions differ"
    finite = ~a.isnan()
    return float((a[finite] - b[finite]).abs().max())


def partial_mask(batch: dict, *, equal_rows: bool) -> torch.Tensor:
    """Drop some answer positions (different numbers per row unless ``equal_rows``)."""
    cand = candidate_mask(batch[LABELS])
    keep = torch.ones_like(cand)
    for row in range(cand.shape[0]):
        pos = cand[row].nonzero().flatten()
        step = 2 if equal_rows else 2 + row
        keep[row, pos[::step]] = False
    if equal_rows:
        counts = keep.logical_and(batch["attention_mask"].bool()).sum(1)
        assert counts.unique().numel() == 1, "test setup: rows must keep equal counts"
    return keep


def visual_mask(model: Any, batch: dict, every: int = 3) -> torch.Tensor:
    """Keep everything but every ``every``-th visual placeholder position."""
    parts = resolve(model)
    keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    media = torch.zeros_like(keep)
    for token in parts.media_token_ids:
        media |= batch["input_ids"] == token
    drop = media.nonzero()[::every]
    keep[drop[:, 0], drop[:, 1]] = False
    return keep


def _losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return loss.masked_fill(targets == IGNORE_INDEX, float("nan"))


def token_losses_4d(model: Any, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Full-sequence run where a 4-D mask hides the elided keys; token losses ``[B, L]``.

    The mask is causal, or, for a model that builds its decoder's masks itself (Gemma 3's dict of 4-D masks per
    layer type, with bidirectional image blocks), the model's own masks on the full sequence; the elided keys are
    hidden in either.
    """
    attended = batch["attention_mask"].bool()
    active = attended & keep
    length = active.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eye = torch.eye(length, dtype=torch.bool)[None, None]  # padded queries attend to themselves
    own = decoder_inputs(model, batch).get("attention_mask")
    if isinstance(own, dict):
        mask4d: Any = {
            kind: ((causal[None, None] if m is None else m) & active[:, None, None, :]) | eye for kind, m in own.items()
        }
    else:
        mask4d = (causal[None, None] & active[:, None, None, :]) | eye
    inputs = hf_inputs(batch)
    inputs.pop(LABELS)
    inputs["attention_mask"] = mask4d
    inputs["position_ids"] = position_ids(model, batch)
    logits = model(**inputs, use_cache=False).logits
    targets = shift_targets(batch[LABELS]).masked_fill(~active, IGNORE_INDEX)
    return _losses(logits, targets)


def row_media(model: Any, batch: dict, row: int) -> dict[str, torch.Tensor]:
    """The media tensors of one row of a batch (by the family's own item layout)."""
    parts = resolve(model)
    family, config = parts.family, parts.model.config
    out: dict[str, torch.Tensor] = {}
    for kind in MEDIA_KINDS:
        if family.media_token_id(config, kind) is None:
            continue
        per_row = family.media_per_row(config, batch["input_ids"], kind)
        items = family.split_media(config, batch, kind, int(per_row.sum()))
        start = int(per_row[:row].sum())
        mine = items[start : start + int(per_row[row])]
        for key in mine[0] if mine else ():
            out[key] = torch.cat([item[key] for item in mine])
    return out


def _row_inputs(model: Any, batch: dict, row: int, idx: torch.Tensor, full_pos: torch.Tensor) -> dict[str, Any]:
    """One row's inputs with only positions ``idx`` (every per-position input cut), its media, its positions."""
    length = batch["input_ids"].shape[1]
    media = row_media(model, batch, row)
    inputs: dict[str, Any] = {}
    for key, value in hf_inputs(batch).items():
        if key == LABELS or key in media:
            continue
        per_position = value.dim() == 2 and value.shape[1] == length
        inputs[key] = value[row : row + 1, idx] if per_position else value[row : row + 1]
    inputs.update(media)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["position_ids"] = full_pos[..., row : row + 1, idx]
    return inputs


def _shortened_rows(model: Any, batch: dict, keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: its kept positions with a supervised target, and their losses (with grad), run alone."""
    targets = shift_targets(batch[LABELS])
    full_pos = position_ids(model, batch)
    active = batch["attention_mask"].bool() & keep
    out = []
    for row in range(active.shape[0]):
        idx = active[row].nonzero().flatten()
        logits = model(**_row_inputs(model, batch, row, idx, full_pos), use_cache=False).logits[0].float()
        tgt = targets[row, idx]
        sup = tgt != IGNORE_INDEX
        out.append((idx[sup], F.cross_entropy(logits[sup], tgt[sup], reduction="none")))
    return out


def token_losses_shortened(model: Any, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Each row run alone on its explicitly shortened sequence with its original position ids."""
    out = torch.full(batch["input_ids"].shape, float("nan"))
    for row, (positions, losses) in enumerate(_shortened_rows(model, batch, keep)):
        out[row, positions] = losses.detach()
    return out


def shortened_loss(model: Any, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """The mean over every row's computed targets of the per-row shortened runs, with grad (for gradients)."""
    losses = torch.cat([loss for _, loss in _shortened_rows(model, batch, keep)])
    return losses.mean()


def token_losses_decoder(model: Any, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Each row's kept positions of the full run's merged embeddings through the decoder and head, alone.

    Under grad mode the losses carry the graph of the whole run (the tower included), for gradient references.
    """
    parts = resolve(model)
    captured = decoder_inputs(model, batch, grad=torch.is_grad_enabled())
    embeds = captured["inputs_embeds"]
    full_pos = position_ids(model, batch)
    targets = shift_targets(batch[LABELS])
    active = batch["attention_mask"].bool() & keep
    out = torch.full(batch["input_ids"].shape, float("nan"))
    for row in range(active.shape[0]):
        idx = active[row].nonzero().flatten()
        hidden = parts.decoder(
            inputs_embeds=embeds[row : row + 1, idx],
            position_ids=full_pos[..., row : row + 1, idx],
            attention_mask=torch.ones(1, idx.numel(), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        logits = parts.lm_head(hidden)[0].float()
        tgt = targets[row, idx]
        sup = tgt != IGNORE_INDEX
        out[row, idx[sup]] = F.cross_entropy(logits[sup], tgt[sup], reduction="none")
    return out


def teacher_reference_losses(
    model: Any, batch: dict, text: torch.Tensor, candidates: torch.Tensor, causal_lm: str | None = None
) -> torch.Tensor:
    """The student's text backbone as a plain HF causal LM, run row by row on the text positions alone.

    The causal LM is built from the student's ``text_config`` (``AutoModelForCausalLM.from_config``: the class of
    its ``model_type``; ``causal_lm`` names the class it must be) and given the student's decoder and head weights;
    each row's text tokens run through it with their original position ids. Losses ``[B, L]`` at ``candidates``,
    NaN elsewhere.
    """
    from transformers import AutoModelForCausalLM

    parts = resolve(model)
    lm = AutoModelForCausalLM.from_config(model.config.get_text_config()).eval()
    assert causal_lm is None or type(lm).__name__ == causal_lm, type(lm).__name__
    lm.model.load_state_dict(parts.decoder.state_dict())
    lm.lm_head.load_state_dict(parts.lm_head.state_dict())
    targets = shift_targets(batch[LABELS])
    out = torch.full(batch["input_ids"].shape, float("nan"))
    for row in range(text.shape[0]):
        idx = text[row].nonzero().flatten()
        with torch.no_grad():
            ids = batch["input_ids"][row : row + 1, idx]
            # an explicit mask: without one, transformers reads the gaps in the positions as packed sequences
            mask = torch.ones_like(ids)
            logits = lm(input_ids=ids, position_ids=idx[None], attention_mask=mask, use_cache=False).logits
        wanted = candidates[row, idx]
        out[row, idx[wanted]] = _losses(logits, targets[row : row + 1, idx])[0][wanted]
    return out


def teacher_error(model: Any, batch: dict, causal_lm: str | None = None) -> float:
    """max |difference| of ``Teacher.from_student``'s reference losses and :func:`teacher_reference_losses` (the
    student's text backbone as the causal LM ``causal_lm``) on the batch's text positions."""
    text = text_mask(resolve(model).media_token_ids, batch[INPUT_IDS], batch[ATTENTION_MASK])
    candidates = candidate_mask(batch[LABELS]) & text
    ours = Teacher.from_student(model).reference_losses(batch[INPUT_IDS], batch[LABELS], text, candidates)
    return max_abs_diff(ours, teacher_reference_losses(model, batch, text, candidates, causal_lm))


# ------------------------------------------------------------------------------------------------
# Gradients, and the steps the tower skips.


def gradients(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of ``loss`` (the model's gradients zeroed before and after)."""
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def max_grad_diff(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest difference of two gradient maps, which must cover the same parameters."""
    assert ours.keys() == expected.keys(), "different parameters got gradients"
    return max(float((ours[name] - expected[name]).abs().max()) for name in expected)


@contextmanager
def tower_rows(tower: Any) -> Iterator[list[int]]:
    """The rows of every input the vision ``tower`` encodes while the context is open (a forward hook)."""
    rows: list[int] = []
    handle = tower.register_forward_hook(lambda m, a, o: rows.append(o.last_hidden_state.shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


class SkippedStep(NamedTuple):
    """An elided training step against its reference (:func:`skipped_step_errors`)."""

    out: Any
    """The step's output (``forward_active``)."""
    rows: list[int]
    """The tower's input rows, per call."""
    loss_error: float
    """The largest token-loss difference."""
    grad_error: float
    """The largest gradient difference."""
    trained: frozenset[str]
    """The parameters that got a gradient (the same in both runs)."""


def skipped_step_errors(
    model: Any, batch: dict, keep: torch.Tensor, tower: Any, reference: Any = token_losses_4d
) -> SkippedStep:
    """One elided training step against a reference run on the same active tokens (with gradients).

    The step runs with a hook on ``tower`` counting the rows it encodes (steps whose every token is elided are not
    encoded); ``reference`` (:func:`token_losses_4d`, or :func:`token_losses_decoder` for a recurrent decoder)
    gives the token losses, and the mean of its computed ones the reference gradients.
    """
    with tower_rows(tower) as rows:
        out = forward_active(model, batch, keep)
        ours = gradients(model, out.loss)
    losses = reference(model, batch, keep)
    expected = gradients(model, losses[~losses.isnan()].mean())
    loss_error = max_abs_diff(out.token_loss.detach(), losses.detach())
    return SkippedStep(out, rows, loss_error, max_grad_diff(ours, expected), frozenset(expected))
