"""The elision engine against unmodified HF models, for every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regate_lightning.elision import active_index, forward_active
from regate_lightning.families import resolve
from regate_lightning.keys import IGNORE_INDEX, LABELS, SAMPLE_IDX
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.testing import tiny
from regate_lightning.testing.batches import random_batch

TOL = 1e-5
FACTORIES = {
    "llama": tiny.tiny_llama,
    "qwen2": tiny.tiny_qwen2,
    "llava_clip": tiny.tiny_llava,
    "llava_siglip": lambda: tiny.tiny_llava(vision="siglip"),
    "llava_next_video": tiny.tiny_llava_next_video,
    "video_llava": tiny.tiny_video_llava,
    "qwen2_vl": tiny.tiny_qwen2_vl,
    "qwen2_5_vl": tiny.tiny_qwen2_5_vl,
}
MAX_ERRORS: dict[str, float] = {}


def hf_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in (SAMPLE_IDX, "keep_mask")}


def position_ids(model, batch: dict) -> torch.Tensor:
    """Original position ids of the full sequence (3-D M-RoPE ids for Qwen2-VL)."""
    parts = resolve(model)
    if parts.mrope:
        pos, _ = parts.inner.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            video_grid_thw=batch.get("video_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        return pos
    return torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])


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


def token_losses_4d(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Full-sequence run where a 4-D mask hides the elided keys; token losses [B, L]."""
    attended = batch["attention_mask"].bool()
    active = attended & keep
    length = active.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask4d = causal[None, None] & active[:, None, None, :]
    mask4d |= torch.eye(length, dtype=torch.bool)[None, None]  # padded queries attend to themselves
    inputs = hf_inputs(batch)
    inputs.pop(LABELS)
    inputs["attention_mask"] = mask4d
    inputs["position_ids"] = position_ids(model, batch)
    logits = model(**inputs, use_cache=False).logits.float()
    targets = shift_targets(batch[LABELS]).masked_fill(~active, IGNORE_INDEX)
    loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return loss.masked_fill(targets == IGNORE_INDEX, float("nan"))


def token_losses_shortened(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Each row run alone on its explicitly shortened sequence with its original position ids."""
    out = torch.full(batch["input_ids"].shape, float("nan"))
    targets = shift_targets(batch[LABELS])
    full_pos = position_ids(model, batch)
    active = batch["attention_mask"].bool() & keep
    for row in range(active.shape[0]):
        idx = active[row].nonzero().flatten()
        inputs = {}
        for key, value in hf_inputs(batch).items():
            if key == LABELS:
                continue
            if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                inputs[key] = value[row : row + 1, idx]
            elif key == "video_grid_thw":
                inputs[key] = value[row : row + 1]
            elif key == "pixel_values_videos" and "video_grid_thw" in batch:
                per_row = value.shape[0] // active.shape[0]
                inputs[key] = value[row * per_row : (row + 1) * per_row]
            else:
                inputs[key] = value[row : row + 1]
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["position_ids"] = full_pos[..., row : row + 1, idx]
        logits = model(**inputs, use_cache=False).logits[0].float()
        tgt = targets[row, idx]
        sup = tgt != IGNORE_INDEX
        out[row, idx[sup]] = F.cross_entropy(logits[sup], tgt[sup], reduction="none")
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(a.isnan(), b.isnan()), "computed positions differ"
    finite = ~a.isnan()
    return float((a[finite] - b[finite]).abs().max())


@pytest.fixture(scope="module", params=list(FACTORIES))
def family(request):
    torch.manual_seed(0)
    model = FACTORIES[request.param]().eval()
    return request.param, model


def test_full_mask_equals_hf_loss(family):
    name, model = family
    batch = random_batch(model, batch_size=3, ragged=True, num_frames=2)
    with torch.no_grad():
        reference = model(**hf_inputs(batch), use_cache=False).loss
        plain = forward_active(model, batch)
        keep_all = forward_active(model, batch, torch.ones_like(batch["input_ids"], dtype=torch.bool))
    err = max(abs(float(plain.loss - reference)), abs(float(keep_all.loss - reference)))
    MAX_ERRORS[f"{name}/full"] = err
    assert err < TOL
    assert keep_all.decoder_length == batch["input_ids"].shape[1]


@pytest.mark.parametrize("equal_rows", [False, True], ids=["ragged_keep", "gaps_no_padding"])
def test_partial_mask_matches_shortened_and_4d(family, equal_rows):
    name, model = family
    batch = random_batch(model, batch_size=3, ragged=not equal_rows, num_frames=2, seed=1)
    keep = partial_mask(batch, equal_rows=equal_rows)
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        short = token_losses_shortened(model, batch, keep)
        masked = token_losses_4d(model, batch, keep)
    err = max(max_abs_diff(out.token_loss, short), max_abs_diff(out.token_loss, masked))
    MAX_ERRORS[f"{name}/partial/{'equal' if equal_rows else 'ragged'}"] = err
    assert err < TOL
    expected_len = int((batch["attention_mask"].bool() & keep).sum(1).max())
    assert out.decoder_length == expected_len < batch["input_ids"].shape[1]
    assert out.token_loss[~keep].isnan().all()


def test_decoder_sees_shorter_sequence(family):
    _, model = family
    batch = random_batch(model, batch_size=2, num_frames=2)
    keep = partial_mask(batch, equal_rows=True)
    seen: list[int] = []
    handle = resolve(model).decoder.register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state.shape[1]))
    try:
        with torch.no_grad():
            forward_active(model, batch, keep)
    finally:
        handle.remove()
    assert seen == [int(keep.sum(1).max())]
    assert seen[0] < batch["input_ids"].shape[1]


@pytest.mark.parametrize("name", ["llava_clip", "qwen2_vl", "video_llava"])
def test_visual_positions_can_be_elided(name):
    model = FACTORIES[name]().eval()
    batch = random_batch(model, batch_size=2, num_frames=2)
    parts = resolve(model)
    keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    media = torch.zeros_like(keep)
    for token in parts.media_token_ids:
        media |= batch["input_ids"] == token
    drop = media.nonzero()[::3]
    keep[drop[:, 0], drop[:, 1]] = False
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        masked = token_losses_4d(model, batch, keep)
    err = max_abs_diff(out.token_loss, masked)
    MAX_ERRORS[f"{name}/visual_elided"] = err
    assert err < TOL


def test_active_index_orders_and_pads():
    active = torch.tensor([[True, False, True, True], [False, False, True, False]])
    index, valid = active_index(active)
    assert index.tolist() == [[0, 2, 3], [2, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_report_max_errors(capsys):
    """Print the measured max error of every equivalence test (read by the closing note)."""
    with capsys.disabled():
        for key, value in sorted(MAX_ERRORS.items()):
            print(f"max|diff| {key}: {value:.2e}")
