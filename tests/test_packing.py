"""Packed steps against unmodified HF models, for every class of every supported family.

A packed step runs the kept positions of all rows back to back in one row ``[1, T]``; it must compute what each
sample computes alone, unpadded (``tests/references.py``): per-token losses and every parameter's gradient, for
the baseline (no keep mask) and with answer-token and visual-token elision. The classes come from the family
registry, so a family registered later is tested here without touching this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from references import (
    gradients,
    max_abs_diff,
    max_grad_diff,
    partial_mask,
    shortened_loss,
    token_losses_4d,
    token_losses_shortened,
    visual_mask,
)
from transformers import (
    AttentionInterface,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from regate_lightning import elision
from regate_lightning.elision import forward_active, pack_layout, packing_refusal
from regate_lightning.families import resolve
from regate_lightning.families.base import text_config
from regate_lightning.module import MLLMModule
from regate_lightning.packed_sdpa import PACKED_SDPA, register, row_marker, sdpa_varlen_attention
from regate_lightning.testing import tiny
from regate_lightning.testing.batches import random_batch

TOL = 1e-5
GRAD_TOL = 1e-5
FACTORIES = {
    "llama": tiny.tiny_llama,
    "qwen2": tiny.tiny_qwen2,
    **{name: (lambda name=name: tiny.tiny_model(name)) for name in tiny.tiny_classes()},
}
MULTIMODAL = [name for name in FACTORIES if name not in ("llama", "qwen2")]
MAX_ERRORS: dict[str, float] = {}


def packable(model: torch.nn.Module) -> bool:
    return packing_refusal(resolve(model)) is None


def refused(model: torch.nn.Module, batch: dict) -> bool:
    """For a family that cannot pack (recurrent layers): check that a packed step is refused, and say so."""
    if packable(model):
        return False
    with pytest.raises(ValueError, match=r"cannot run packed sequences: .*set `packed: false`"):
        forward_active(model, batch, packed=True)
    return True


@pytest.fixture(scope="module", params=list(FACTORIES))
def family(request):
    torch.manual_seed(0)
    model = FACTORIES[request.param]().eval()
    return request.param, model


def decoder_lengths(model: torch.nn.Module) -> tuple[list[tuple[int, ...]], torch.utils.hooks.RemovableHandle]:
    seen: list[tuple[int, ...]] = []
    handle = resolve(model).decoder.register_forward_hook(lambda m, a, o: seen.append(tuple(o.last_hidden_state.shape)))
    return seen, handle


@contextmanager
def attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Run the text decoder with ``implementation`` (the vision tower keeps its own)."""
    config = resolve(model).decoder.config
    before = config._attn_implementation
    if implementation == PACKED_SDPA:
        register()
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


IMPLEMENTATIONS = ["sdpa", PACKED_SDPA]
"""SDPA with transformers' block-diagonal mask, and SDPA per sample (what ``MLLMModule(packed=True)`` runs)."""


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("elided", [False, True], ids=["baseline", "elided"])
def test_packed_step_equals_each_sample_alone(family, elided, implementation):
    """Per-token losses of a packed step = each row alone on its unpadded (and shortened) sequence."""
    name, model = family
    batch = random_batch(model, batch_size=3, ragged=True, num_frames=2, seed=1)
    if refused(model, batch):
        return
    attended = batch["attention_mask"].bool()
    keep = partial_mask(batch, equal_rows=False) if elided else torch.ones_like(attended)
    seen, handle = decoder_lengths(model)
    try:
        with torch.no_grad(), attention(model, implementation):
            out = forward_active(model, batch, keep if elided else None, packed=True)
    finally:
        handle.remove()
    total = int((attended & keep).sum())
    assert seen[-1][:2] == (1, total), "the decoder ran one row of every kept position, no padding"
    assert out.decoder_length == out.num_active == total
    with torch.no_grad():
        errors = [max_abs_diff(out.token_loss, token_losses_shortened(model, batch, keep))]
        errors.append(max_abs_diff(out.token_loss, token_losses_4d(model, batch, keep)))
    err = max(errors)
    MAX_ERRORS[f"{name}/{'elided' if elided else 'baseline'}/{implementation}"] = err
    assert err < TOL


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("elided", [False, True], ids=["baseline", "elided"])
def test_packed_gradients_equal_each_sample_alone(family, elided, implementation):
    """The packed step's loss and every parameter's gradient equal those of the per-sample unpadded runs."""
    name, model = family
    batch = random_batch(model, batch_size=2, ragged=True, num_frames=2, seed=2)
    if refused(model, batch):
        return
    keep = partial_mask(batch, equal_rows=False) if elided else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    with attention(model, implementation):
        out = forward_active(model, batch, keep if elided else None, packed=True)
        packed = gradients(model, out.loss)
    reference = shortened_loss(model, batch, keep)
    err = max_grad_diff(packed, gradients(model, reference))
    MAX_ERRORS[f"{name}/grad/{'elided' if elided else 'baseline'}/{implementation}"] = err
    assert abs(float(out.loss.detach() - reference.detach())) < TOL
    assert err < GRAD_TOL


@pytest.mark.parametrize("name", MULTIMODAL)
def test_packed_visual_elision(name):
    """Visual and answer positions elided, packed: equal to the full sequence with a 4-D mask hiding them."""
    model = FACTORIES[name]().eval()
    batch = random_batch(model, batch_size=2, ragged=True, num_frames=2, seed=3)
    if refused(model, batch):
        return
    keep = visual_mask(model, batch) & partial_mask(batch, equal_rows=False)
    with torch.no_grad():
        reference = token_losses_4d(model, batch, keep)
        outs = []
        for implementation in IMPLEMENTATIONS:
            with attention(model, implementation):
                outs.append(forward_active(model, batch, keep, packed=True))
    err = max(max_abs_diff(out.token_loss, reference) for out in outs)
    MAX_ERRORS[f"{name}/visual_elided"] = err
    assert err < TOL


# ------------------------------------------------------------------------------------------------------------
# Attention implementations, layer types, refusals.


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A pure-torch variable-length attention with FlashAttention-2's arguments (``cu_seq_lens_q/k``,
    ``max_length_q/k``): causal SDPA on each sample's slice of the packed row, nothing across samples."""
    assert attention_mask is None, "a FlashAttention implementation gets no mask on a packed row"
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert isinstance(kwargs["max_length_q"], int) and kwargs["max_length_q"] == int(cu_q.diff().max())
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling
        )
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture
def varlen_attention():
    """``varlen_reference`` registered with transformers as an attention implementation with FlashAttention's mask
    rule (``flash_attention_mask``: no mask unless there is padding), as a FlashAttention kernel is registered."""
    AttentionInterface.register("varlen_reference", varlen_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen_reference", flash_attention_mask)
    yield "varlen_reference"


@pytest.mark.parametrize("name", ["qwen2", "Qwen2VLForConditionalGeneration", "LlavaForConditionalGeneration"])
def test_flash_attention_gets_the_variable_length_arguments(name, varlen_attention):
    """What FlashAttention-2's variable-length path reads reaches the attention, and gives each sample alone."""
    model = FACTORIES[name]().eval()
    batch = random_batch(model, batch_size=3, ragged=True, num_frames=2, seed=4)
    keep = partial_mask(batch, equal_rows=False)
    with torch.no_grad():
        sdpa = forward_active(model, batch, keep, packed=True)
        resolve(model).decoder.config._attn_implementation = varlen_attention
        varlen = forward_active(model, batch, keep, packed=True)
    err = max_abs_diff(varlen.token_loss, sdpa.token_loss)
    MAX_ERRORS[f"{name}/varlen_vs_sdpa"] = err
    assert err < TOL


def test_eager_attention_and_sliding_window_layers():
    """Eager attention (an additive mask), SDPA and SDPA per sample on a decoder with sliding-window layers (a mask
    per layer type, the window counted within each sample as on a padded row) are exact too."""
    config = Qwen2Config(**text_config(num_layers=2), use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    register()
    for implementation in ("eager", "sdpa", PACKED_SDPA):
        config._attn_implementation = implementation
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        batch = random_batch(model, batch_size=3, ragged=True, seed=5)
        keep = partial_mask(batch, equal_rows=False)
        with torch.no_grad():
            out = forward_active(model, batch, keep, packed=True)
            padded = forward_active(model, batch, keep)
            reference = token_losses_shortened(model, batch, keep)
        err = max(max_abs_diff(out.token_loss, reference), max_abs_diff(out.token_loss, padded.token_loss))
        MAX_ERRORS[f"qwen2_sliding/{implementation}"] = err
        assert err < TOL


def tiny_qwen3_5() -> Qwen3_5ForCausalLM:
    config = Qwen3_5TextConfig(
        **text_config(hidden_size=32, num_layers=2),
        head_dim=8,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
    )
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).eval()


def test_recurrent_decoders_are_refused(monkeypatch):
    """Qwen3.5's gated delta-net carries its state along the row: packing is refused in one line before any work.
    Forced anyway, transformers' torch path of the layer refuses the sample boundaries the packed step passes it
    (``cu_seq_lens_q``): it cannot keep the samples apart."""
    model = tiny_qwen3_5()
    batch = random_batch(model, batch_size=2, ragged=True, seed=6)
    with pytest.raises(ValueError, match=r"Qwen3_5ForCausalLM cannot run packed sequences: .*linear_attention.*packed"):
        forward_active(model, batch, packed=True)
    with torch.no_grad():
        padded = forward_active(model, batch).token_loss  # padded rows stay exact for it
        alone = token_losses_shortened(model, batch, torch.ones_like(batch["input_ids"], dtype=torch.bool))
    assert max_abs_diff(padded, alone) < TOL
    monkeypatch.setattr(elision, "packing_refusal", lambda parts: None)
    with pytest.raises(ValueError, match=r"can't keep packed sequences apart"), torch.no_grad():
        forward_active(model, batch, packed=True)


def test_module_packs_with_sdpa_per_sample_and_refuses_recurrent_decoders():
    module = MLLMModule(tiny.tiny_qwen2_vl(), packed=True)
    parts = resolve(module.model)
    assert parts.decoder.config._attn_implementation == PACKED_SDPA
    assert module.model.config.vision_config._attn_implementation == "sdpa", "the tower keeps its attention"
    assert MLLMModule(tiny.tiny_qwen2_vl()).model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"^`packed`: Qwen3_5ForCausalLM cannot run packed sequences"):
        MLLMModule(tiny_qwen3_5(), packed=True)


def test_packed_router_loss_equals_the_padded_one():
    """A mixture-of-experts decoder's load-balancing loss over the routed tokens: the same tokens, packed or padded."""
    from test_router_loss import tiny_moe

    model = tiny_moe()
    batch = random_batch(model, batch_size=3, ragged=True, seed=8)
    keep = partial_mask(batch, equal_rows=False)
    with torch.no_grad():
        padded, packed = forward_active(model, batch, keep), forward_active(model, batch, keep, packed=True)
    assert packed.aux_loss is not None and padded.aux_loss is not None
    assert abs(float(packed.aux_loss - padded.aux_loss)) < 1e-6
    assert max_abs_diff(packed.token_loss, padded.token_loss) < TOL


def test_gradient_checkpointing_recomputes_the_packed_row():
    """With activation checkpointing the backward pass recomputes each layer with the packed row's arguments."""
    grads = []
    for checkpointing in (False, True):
        module = MLLMModule(tiny.tiny_qwen2_vl(), packed=True, gradient_checkpointing=checkpointing)
        module.model.train()
        batch = random_batch(module.model, batch_size=3, ragged=True, seed=7)
        module.run({**batch, "keep_mask": partial_mask(batch, equal_rows=False)}).loss.backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0]) < GRAD_TOL


def test_sdpa_per_sample_refuses_a_real_mask_on_a_packed_row():
    layer = torch.nn.Module()
    q = torch.randn(1, 2, 5, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out, _ = sdpa_varlen_attention(layer, q, q, q, row_marker(5), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    first, _ = sdpa_varlen_attention(layer, q[:, :, :2], q[:, :, :2], q[:, :, :2], None)
    assert torch.equal(out[:, :2], first), "the first sample alone"
    with pytest.raises(ValueError, match=r"sdpa_varlen runs one packed row without a mask"):
        sdpa_varlen_attention(layer, q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool), cu_seq_lens_q=cu)


def test_pack_layout_of_a_batch_with_an_empty_padding_row():
    active = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    layout = pack_layout(active)
    assert layout.flat.tolist() == [0, 1, 6, 8]
    assert layout.rows.tolist() == [0, 0, 2, 2] and layout.positions.tolist() == [0, 1, 0, 2]
    assert layout.cu_seqlens.tolist() == [0, 2, 4] and layout.max_length == 2 and layout.length == 4


def test_report_max_errors(capsys):
    """Print the measured max error of every packed-step test (read by docs/elision.md)."""
    with capsys.disabled():
        for key, value in sorted(MAX_ERRORS.items()):
            print(f"max|diff| {key}: {value:.2e}")
