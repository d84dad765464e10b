"""The elision engine against unmodified HF models, for every class of every supported family.

The classes come from the family registry (:func:`regate_lightning.testing.tiny.tiny_classes`), so a new
family is tested here without touching this file; the references are in ``tests/references.py``.
"""

from __future__ import annotations

import pytest
import torch
from references import (
    gradients,
    hf_inputs,
    max_abs_diff,
    max_grad_diff,
    partial_mask,
    shortened_loss,
    token_losses_4d,
    token_losses_decoder,
    token_losses_shortened,
    visual_mask,
)

from regate_lightning.elision import active_index, forward_active
from regate_lightning.families import resolve
from regate_lightning.testing import tiny
from regate_lightning.testing.batches import random_batch

TOL = 1e-5
GRAD_TOL = 1e-5
FACTORIES = {
    "llama": tiny.tiny_llama,
    "qwen2": tiny.tiny_qwen2,
    "llava_siglip": lambda: tiny.tiny_llava(vision="siglip"),
    **{name: (lambda name=name: tiny.tiny_model(name)) for name in tiny.tiny_classes()},
}
MULTIMODAL = [name for name in FACTORIES if name not in ("llama", "qwen2")]
MAX_ERRORS: dict[str, float] = {}


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
        errors = [max_abs_diff(out.token_loss, token_losses_shortened(model, batch, keep))]
        if not resolve(model).family.recurrent:  # a 4-D mask cannot hide a token from a recurrent state
            errors.append(max_abs_diff(out.token_loss, token_losses_4d(model, batch, keep)))
    err = max(errors)
    MAX_ERRORS[f"{name}/partial/{'equal' if equal_rows else 'ragged'}"] = err
    assert err < TOL
    expected_len = int((batch["attention_mask"].bool() & keep).sum(1).max())
    assert out.decoder_length == expected_len < batch["input_ids"].shape[1]
    assert out.token_loss[~keep].isnan().all()


def test_gradients_match_shortened_runs(family):
    """The elided step's loss and every parameter's gradient equal those of per-row shortened runs."""
    name, model = family
    batch = random_batch(model, batch_size=2, ragged=True, num_frames=2, seed=2)
    keep = partial_mask(batch, equal_rows=False)
    out = forward_active(model, batch, keep)
    elided = gradients(model, out.loss)
    reference = shortened_loss(model, batch, keep)
    err = max_grad_diff(elided, gradients(model, reference))
    MAX_ERRORS[f"{name}/grad"] = err
    assert abs(float(out.loss - reference)) < TOL
    assert err < GRAD_TOL


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


@pytest.mark.parametrize("name", MULTIMODAL)
def test_visual_positions_can_be_elided(name):
    model = FACTORIES[name]().eval()
    batch = random_batch(model, batch_size=2, num_frames=2)
    keep = visual_mask(model, batch)
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        if resolve(model).family.recurrent:
            reference = token_losses_decoder(model, batch, keep)
        else:
            reference = token_losses_4d(model, batch, keep)
    err = max_abs_diff(out.token_loss, reference)
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
