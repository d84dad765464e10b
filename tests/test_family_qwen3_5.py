"""Qwen3.5 and Qwen3.5-MoE: the frame-by-frame video layout, the hybrid recurrent decoder under elision, the
tower's skipped temporal patches, and the teacher from the hybrid text backbone (the MoE router loss is tested in
``tests/test_router_loss.py``).

The generic exactness tests (answer elision against per-row shortened runs, gradients, visual elision against
the decoder run on the kept embeddings) run for both classes in ``tests/test_elision.py``. Here: what is
particular to the family, with sequences long enough to cross the chunked delta rule's 64-token chunks.
"""

from __future__ import annotations

import pytest
import torch
from references import (
    TOL,
    gradients,
    max_abs_diff,
    max_grad_diff,
    partial_mask,
    row_media,
    shortened_loss,
    skipped_step_errors,
    teacher_error,
    token_losses_4d,
    token_losses_decoder,
    token_losses_shortened,
    visual_mask,
)
from script_loader import recipe

from regate_lightning.elision import forward_active
from regate_lightning.families import FAMILIES, family_of, resolve
from regate_lightning.families.qwen3_5 import TIMESTAMP_TOKENS, interleaved_mrope_section
from regate_lightning.keys import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, LABELS, MM_TOKEN_TYPE_IDS
from regate_lightning.teacher import Teacher
from regate_lightning.testing import tiny
from regate_lightning.testing.batches import random_batch
from regate_lightning.visual import VisualElisionPolicy

DENSE = "Qwen3_5ForConditionalGeneration"
MOE = "Qwen3_5MoeForConditionalGeneration"
RECIPE = "debug_qwen3_5.yaml"
SPARSE = {"warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}  # step 1 is sparse


@pytest.fixture(scope="module")
def dense():
    return tiny.tiny_model(DENSE).eval()


def hybrid_layers(model: torch.nn.Module) -> list[str]:
    return list(model.config.get_text_config().layer_types)


# ------------------------------------------------------------------------------------------------
# The model and its layout.


def test_tiny_models_have_the_hybrid_decoder_and_a_tower_without_deepstack():
    for name in (DENSE, MOE):
        model = tiny.tiny_model(name)
        assert hybrid_layers(model) == ["linear_attention"] * 3 + ["full_attention"]
        assert not hasattr(model.model.visual, "deepstack_merger_list")
        family = family_of(model)
        assert family is FAMILIES["qwen3_5"] and family.recurrent
        rope = model.config.get_text_config().rope_parameters
        assert rope["mrope_interleaved"] and rope["mrope_section"] == [2, 1, 1]
    assert interleaved_mrope_section(64) == [11, 11, 10]  # the real checkpoints' sections


def test_videos_are_laid_out_frame_by_frame_as_get_rope_index_reads_them(dense):
    """Per temporal patch: its timestamp text, then vision start, its tokens, vision end; all inside the chat
    template's start ... end. ``get_rope_index`` gives each patch its own grid, one temporal position apart."""
    config = dense.config
    batch = random_batch(dense, batch_size=2, num_frames=6, seed=0)  # 3 temporal patches of 16 tokens
    start, end, video = config.vision_start_token_id, config.vision_end_token_id, config.video_token_id
    row = batch[INPUT_IDS][0].tolist()
    block = row[1 : 1 + 2 + 3 * (TIMESTAMP_TOKENS + 2 + 16)]
    assert block[0] == start and block[-1] == end
    for t in range(3):
        patch = block[1 + t * (TIMESTAMP_TOKENS + 18) : 1 + (t + 1) * (TIMESTAMP_TOKENS + 18)]
        stamp, rest = patch[:TIMESTAMP_TOKENS], patch[TIMESTAMP_TOKENS:]
        assert start not in stamp and end not in stamp and video not in stamp
        assert rest == [start, *[video] * 16, end]
    types = batch[MM_TOKEN_TYPE_IDS][0]
    assert torch.equal(types == 2, batch[INPUT_IDS][0] == video)
    positions, _ = dense.model.get_rope_index(
        batch[INPUT_IDS], batch[MM_TOKEN_TYPE_IDS], video_grid_thw=batch["video_grid_thw"]
    )
    temporal = positions[0, 0][batch[INPUT_IDS][0] == video].view(3, 16)
    assert (temporal == temporal[:, :1]).all(), "one temporal position per patch"
    gaps = temporal[1:, 0] - temporal[:-1, 0]
    assert (gaps == TIMESTAMP_TOKENS + 2 + 4).all(), "timestamp + markers + the previous patch's 4 positions"
    family = family_of(dense)
    assert family.media_per_row(config, batch[INPUT_IDS], "video").tolist() == [1, 1]
    two = torch.cat([batch[INPUT_IDS][:1], batch[INPUT_IDS][:1]], dim=1)  # two videos in one row
    assert family.media_per_row(config, two, "video").tolist() == [2]
    with torch.no_grad():
        assert torch.isfinite(forward_active(dense, batch).loss)


# ------------------------------------------------------------------------------------------------
# The recurrent decoder: padding, batching, chunks.


def test_padding_never_reaches_a_real_token_and_a_row_alone_equals_it_in_a_ragged_batch(dense):
    """Right padding (the engine's layout after the gather): its values change no real token, bit for bit; each
    row equals the row run alone, across the chunked delta rule's 64-token chunks."""
    decoder = resolve(dense).decoder
    lengths = [150, 97, 40]
    width = max(lengths)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, width, 64, generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    positions = torch.arange(width).expand(3, width)
    outputs = []
    with torch.no_grad():
        for fill in (0.0, 1e4, -3e5):
            padded = x.masked_fill(~mask.bool()[..., None], fill)
            hidden = decoder(inputs_embeds=padded, position_ids=positions, attention_mask=mask, use_cache=False)
            outputs.append(hidden.last_hidden_state)
        real = mask.bool()
        assert all(torch.equal(o[real], outputs[0][real]) for o in outputs[1:]), "padding values leaked"
        worst = 0.0
        for i, n in enumerate(lengths):
            alone = decoder(
                inputs_embeds=x[i : i + 1, :n],
                position_ids=positions[i : i + 1, :n],
                attention_mask=torch.ones(1, n, dtype=torch.long),
                use_cache=False,
            ).last_hidden_state[0]
            worst = max(worst, float((outputs[0][i, :n] - alone).abs().max()))
    print(f"max|diff| qwen3_5 decoder row alone vs ragged batch: {worst:.2e}")
    assert worst < 1e-6


def test_the_chunked_delta_rule_is_the_token_by_token_recurrence():
    """HF's chunked form (chunks of 64, the sequence padded to a multiple) equals its recurrent form, whatever
    the chunk size: where the chunk boundaries fall changes only rounding."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 150, 4, 16, generator=gen) for _ in range(3))
    beta, decay = torch.rand(2, 150, 4, generator=gen), -torch.rand(2, 150, 4, generator=gen)
    kwargs = {"g": decay, "beta": beta, "use_qk_l2norm_in_kernel": True}
    chunked, _ = hf.torch_chunk_gated_delta_rule(q, k, v, **kwargs)
    small, _ = hf.torch_chunk_gated_delta_rule(q, k, v, chunk_size=16, **kwargs)
    recurrent, _ = hf.torch_recurrent_gated_delta_rule(q, k, v, **kwargs)
    prefix, _ = hf.torch_chunk_gated_delta_rule(
        q[:, :100], k[:, :100], v[:, :100], g=decay[:, :100], beta=beta[:, :100], use_qk_l2norm_in_kernel=True
    )
    assert float((chunked - recurrent).abs().max()) < 1e-5
    assert float((chunked - small).abs().max()) < 1e-5
    assert torch.equal(prefix, chunked[:, :100]), "later tokens never change earlier outputs"


def test_answer_elision_is_exact_across_chunk_boundaries(dense):
    """Rows of ~250 tokens keeping 150-200: the kept sequences cross the 64- and 128-token chunk boundaries."""
    batch = random_batch(dense, batch_size=3, ragged=True, num_frames=4, answer_len=200, seed=5)
    keep = partial_mask(batch, equal_rows=False)
    with torch.no_grad():
        out = forward_active(dense, batch, keep)
        err = max_abs_diff(out.token_loss, token_losses_shortened(dense, batch, keep))
    kept = (keep & batch[ATTENTION_MASK].bool()).sum(1)
    assert out.decoder_length == int(kept.max()) > 128 and kept.unique().numel() == 3
    print(f"max|diff| qwen3_5 answer elision, {out.decoder_length} kept of {batch[INPUT_IDS].shape[1]}: {err:.2e}")
    assert err < TOL
    elided = forward_active(dense, batch, keep).loss
    mine = gradients(dense, elided)
    reference = shortened_loss(dense, batch, keep)
    grad_err = max_grad_diff(mine, gradients(dense, reference))
    print(f"max|grad diff| qwen3_5 answer elision across chunks: {grad_err:.2e}")
    assert abs(float(elided - reference)) < TOL and grad_err < TOL


def test_an_elided_token_is_unseen_by_the_state_unlike_a_masked_one(dense):
    """Why the reference of a recurrent decoder is the shortened run: a 4-D mask hides an elided key from the
    attention layer, but the recurrent layers still read it, so the masked full run is another computation."""
    batch = random_batch(dense, batch_size=2, num_frames=4, seed=6)
    keep = partial_mask(batch, equal_rows=True)
    with torch.no_grad():
        out = forward_active(dense, batch, keep)
        shortened = max_abs_diff(out.token_loss, token_losses_shortened(dense, batch, keep))
        masked = max_abs_diff(out.token_loss, token_losses_4d(dense, batch, keep))
    print(f"max|diff| qwen3_5 elided vs shortened {shortened:.2e}, vs the 4-D-masked full run {masked:.2e}")
    assert shortened < TOL < 1e-3 < masked


# ------------------------------------------------------------------------------------------------
# Visual-token elision, and the temporal patches the tower skips.


@pytest.mark.parametrize("selection", ["temporal", "temporal_frames", "uniform", "random"])
def test_visual_elision_equals_the_decoder_on_the_kept_positions(dense, selection):
    batch = random_batch(dense, batch_size=3, num_frames=8, ragged=True, seed=7)  # 4 temporal patches
    policy = VisualElisionPolicy(keep_ratio=0.4, selection=selection, **SPARSE)
    policy.setup(dense)
    keep = policy.plan(batch, step=1).keep_mask
    assert (~keep).any()
    with torch.no_grad():
        out = forward_active(dense, batch, keep)
        err = max_abs_diff(out.token_loss, token_losses_decoder(dense, batch, keep))
    print(f"max|diff| qwen3_5 visual elision ({selection}): {err:.2e}, skipped steps {out.skipped_steps}")
    assert err < TOL


def test_fully_elided_temporal_patches_are_not_encoded_and_train_the_same(dense):
    batch = random_batch(dense, batch_size=2, num_frames=8, ragged=True, seed=8)  # 2 x 4 temporal patches
    policy = VisualElisionPolicy(keep_ratio=0.5, selection="uniform", **SPARSE)
    policy.setup(dense)
    keep = policy.plan(batch, step=1).keep_mask
    # the reference: the model's merged embeddings of the full sequence (the tower on every temporal patch), then
    # each row's kept positions alone through the decoder and head, with gradients through the tower
    out, rows, loss_err, grad_err, trained = skipped_step_errors(
        dense, batch, keep, dense.model.visual, token_losses_decoder
    )
    patch_rows = batch["pixel_values_videos"].shape[0] // 8  # rows of one temporal patch
    assert out.skipped_steps == 4 and rows == [4 * patch_rows], "the tower encoded the kept half only"
    assert any(n.startswith("model.visual.") for n in trained)
    print(f"max|diff| qwen3_5 skipped patches: loss {loss_err:.2e}, grad {grad_err:.2e}")
    assert loss_err < TOL and grad_err < TOL


def image_and_video_batch(model: torch.nn.Module, seed: int = 9) -> dict:
    """Each row: ``[bos] <image 16 tokens> <video of 2 temporal patches> [prompt] [answer]``, ragged."""
    config = model.config
    family = family_of(model)
    batch = random_batch(model, batch_size=2, num_frames=4, ragged=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    image_ids = [config.vision_start_token_id, *[config.image_token_id] * 16, config.vision_end_token_id]
    size = len(image_ids)
    ids = torch.cat([batch[INPUT_IDS][:, :1], torch.tensor([image_ids] * 2), batch[INPUT_IDS][:, 1:]], dim=1)
    pad = torch.zeros(2, size, dtype=torch.long)
    types = torch.tensor([[0, *[1] * 16, 0]] * 2)
    out = dict(batch)
    out[INPUT_IDS] = ids
    out[ATTENTION_MASK] = torch.cat([batch[ATTENTION_MASK][:, :1], pad + 1, batch[ATTENTION_MASK][:, 1:]], dim=1)
    out[LABELS] = torch.cat([batch[LABELS][:, :1], pad + IGNORE_INDEX, batch[LABELS][:, 1:]], dim=1)
    out[MM_TOKEN_TYPE_IDS] = torch.cat([batch[MM_TOKEN_TYPE_IDS][:, :1], types, batch[MM_TOKEN_TYPE_IDS][:, 1:]], 1)
    vision = config.vision_config
    dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    out["pixel_values"] = torch.randn(2 * 64, dim, generator=gen)  # 2 images of 8 x 8 patches
    out["image_grid_thw"] = torch.tensor([[1, 8, 8]] * 2)
    assert family.media_per_row(config, ids, "image").tolist() == [1, 1]
    assert family.media_per_row(config, ids, "video").tolist() == [1, 1]
    return out


def test_images_and_videos_in_one_row(dense):
    batch = image_and_video_batch(dense)
    assert set(row_media(dense, batch, 1)) == {
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
    }
    keep = partial_mask(batch, equal_rows=False)
    visual = visual_mask(dense, batch, every=2)
    with torch.no_grad():
        answer_err = max_abs_diff(
            forward_active(dense, batch, keep).token_loss, token_losses_shortened(dense, batch, keep)
        )
        visual_err = max_abs_diff(
            forward_active(dense, batch, visual).token_loss, token_losses_decoder(dense, batch, visual)
        )
    print(f"max|diff| qwen3_5 image + video rows: answer {answer_err:.2e}, visual {visual_err:.2e}")
    assert answer_err < TOL and visual_err < TOL


# ------------------------------------------------------------------------------------------------
# The teacher: the student's own hybrid text backbone, in fit and in `regate-lightning score`.


def test_teacher_is_the_hybrid_text_backbone_on_the_text_positions(dense):
    batch = random_batch(dense, batch_size=3, ragged=True, num_frames=4, answer_len=90, seed=12)
    teacher = Teacher.from_student(dense)
    assert type(teacher.decoder).__name__ == "Qwen3_5TextModel"
    assert sum(type(m).__name__ == "Qwen3_5GatedDeltaNet" for m in teacher.decoder.modules()) == 3
    err = teacher_error(dense, batch, "Qwen3_5ForCausalLM")  # the text positions, placeholders removed
    print(f"max|diff| qwen3_5 teacher vs the text backbone on the text positions: {err:.2e}")
    assert err < TOL


def test_score_and_fit_write_the_same_reference_losses(tmp_path):
    from regate_lightning.cli import build_cli, score_main

    scored, fitted = tmp_path / "scored.pt", tmp_path / "fitted.pt"
    score = recipe(tmp_path, "score.yaml", scored, RECIPE, max_steps=2, num_samples=8)
    result = score_main(["--config", str(score), "--score.progress", "false"])
    assert (result.num_samples, result.scored) == (8, 8)
    build_cli(["fit", "--config", str(recipe(tmp_path, "fit.yaml", fitted, RECIPE, max_steps=2, num_samples=8))])
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (scored, fitted))
    assert torch.equal(a["sample_idx"], b["sample_idx"]) and torch.equal(a["counts"], b["counts"])
    assert a["ref"].isfinite().all() and a["ref"].numel() > 0
    err = float((a["ref"] - b["ref"]).abs().max())
    print(f"max|diff| qwen3_5 reference losses, score vs fit: {err:.2e}")
    assert err < 1e-6


def test_videos_are_written_as_qwen3vl_processor_writes_them(tmp_path):
    """Qwen3.5's processor is Qwen3-VL's (transformers maps qwen3_5 to Qwen3VLProcessor): the data writes each
    temporal patch's timestamp and markers exactly as it does, and the hybrid model runs the batch."""
    import json

    from test_family_qwen3_vl import assert_video_ids_equal_the_processors, save_qwen3

    folder = save_qwen3(tmp_path / "qwen3_5", "Qwen3_5ForConditionalGeneration")
    patch = json.loads((folder / "config.json").read_text())["vision_config"]["patch_size"]
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):  # the tiny tower's patch size
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "patch_size": patch}))
    assert_video_ids_equal_the_processors(folder, tmp_path)


def test_lora_adapts_the_gated_delta_net_layers_and_the_elided_step_stays_exact():
    from regate_lightning import MLLMModule
    from regate_lightning.module import LoraOptions

    module = MLLMModule(tiny.tiny_model(DENSE), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    adapted = {n.split(".lora_")[0] for n, p in module.named_parameters() if p.requires_grad}
    for layer in range(3):
        for name in ("in_proj_qkv", "in_proj_z", "out_proj"):
            assert any(n.endswith(f"layers.{layer}.linear_attn.{name}") for n in adapted), (layer, name)
    assert not any(".visual." in n for n in adapted)
    model = module.hf_model.eval()
    for n, p in module.named_parameters():  # nonzero adapters, so that they change the outputs
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    batch = random_batch(model, batch_size=2, ragged=True, num_frames=4, seed=13)
    keep = partial_mask(batch, equal_rows=False)
    with torch.no_grad():
        err = max_abs_diff(
            forward_active(module.model, batch, keep).token_loss, token_losses_shortened(module.model, batch, keep)
        )
    assert err < TOL
