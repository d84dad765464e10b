"""Gemma 3: its bidirectional image attention kept exactly on the shortened sequence, its processor's images, crops
and text, images skipped in the tower, the teacher from its own text backbone.

The generic exactness tests run for ``Gemma3ForConditionalGeneration`` in ``tests/test_elision.py``; their 4-D
reference is the model's own masks on the full sequence (``tests/references.py``) with the elided keys hidden.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import CORPUS, write_records
from PIL import Image
from references import hf_inputs, max_abs_diff, partial_mask, token_losses_4d, token_losses_shortened, visual_mask

from regate_lightning import MLLMModule
from regate_lightning.data import train_tokenizer
from regate_lightning.data.datamodule import ConversationDataModule
from regate_lightning.elision import forward_active
from regate_lightning.families import family_of, resolve
from regate_lightning.families.gemma3 import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS, PIXEL_VALUES, SAMPLE_IDX, TOKEN_TYPE_IDS
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import Teacher
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy

TOL = 1e-5
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
SPECIALS = ("<pad>", "<bos>", "<eos>", BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN, "<start_of_turn>", "<end_of_turn>")
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""Gemma 3's chat template, shortened: ``<start_of_turn>`` turns, an image as ``<start_of_image>``."""
IMAGE_PROCESSOR = {
    "image_processor_type": "Gemma3ImageProcessor",
    "size": {"height": 32, "width": 32},
    "image_mean": MEAN,
    "image_std": STD,
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 16,
    "pan_and_scan_max_num_crops": 3,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
SPARSE = {"warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}


def gemma_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=380, special_tokens=SPECIALS, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gemma3")
    tok = gemma_tokenizer()
    model = tiny.tiny_model("Gemma3ForConditionalGeneration")
    ids = tok.convert_tokens_to_ids([BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN])
    model.config.boi_token_id, model.config.image_token_id, model.config.eoi_token_id = ids
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """(H, W): wide (pan-and-scan crops), square (none), tall (crops)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    paths = []
    for i, (h, w) in enumerate([(40, 100), (50, 50), (90, 30)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def first_batch(student: str, train_file: Path) -> tuple[MLLMModule, dict]:
    module = MLLMModule(model=student)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    data = ConversationDataModule(train_file=str(train_file), max_length=None, batch_size=8)
    data.trainer = trainer
    data.setup("fit")
    assert data.train_set is not None
    batch = data.train_dataloader().collate_fn([data.train_set[i] for i in range(len(data.train_set))])
    return module, {k: v for k, v in batch.items() if k != SAMPLE_IDX}


def image_records(folder: Path, paths: list[Path]) -> Path:
    records = [
        {
            "id": f"r{i}",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "path": str(p)}, {"type": "text", "text": "What is it?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "It is green."}]},
            ],
        }
        for i, p in enumerate(paths)
    ]
    return write_records(folder / "images.jsonl", records)


# ------------------------------------------------------------------------------------------------
# The bidirectional image attention on the shortened sequence.


def test_kept_image_tokens_still_see_each_other_both_ways():
    """Elided answer and image tokens: equal to the model's own (bidirectional) masks with the elided keys hidden;
    answer tokens elided: equal to per-row shortened runs too (where Gemma builds its masks from the shortened
    token_type_ids); neither equal to a causal-only run, so the image blocks matter in this test."""
    model = tiny.tiny_model("Gemma3ForConditionalGeneration").eval()
    batch = random_batch(model, batch_size=3, ragged=True, seed=3)
    answers = partial_mask(batch, equal_rows=False)
    keep = answers & visual_mask(model, batch, every=3)
    with torch.no_grad():
        out = forward_active(model, batch, keep).token_loss
        assert max_abs_diff(out, token_losses_4d(model, batch, keep)) < TOL
        assert max_abs_diff(out, _causal_only(model, batch, keep)) > 1e-3
        out = forward_active(model, batch, answers).token_loss
        assert max_abs_diff(out, token_losses_shortened(model, batch, answers)) < TOL
        assert max_abs_diff(out, _causal_only(model, batch, answers)) > 1e-3


def _causal_only(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    active = batch[ATTENTION_MASK].bool() & keep
    length = active.shape[1]
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & active[:, None, None, :]
    mask |= torch.eye(length, dtype=torch.bool)[None, None]
    inputs = hf_inputs(batch)
    inputs.pop(LABELS)
    logits = model(**{**inputs, ATTENTION_MASK: {"full_attention": mask, "sliding_attention": mask}}).logits
    targets = shift_targets(batch[LABELS]).masked_fill(~active, -100)
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return loss.masked_fill(targets == -100, float("nan"))


def test_sliding_windows_span_the_original_positions():
    """With a window shorter than the sequence, the elided step keeps each sliding layer's window over the original
    positions (the model's own masks restricted to the kept tokens): equal to the full model with the elided keys
    hidden. A run on the shortened sequence alone would slide its window over fewer, farther tokens."""
    model = tiny.tiny_model("Gemma3ForConditionalGeneration", sliding_window=6).eval()
    batch = random_batch(model, batch_size=2, seed=4)
    answers = partial_mask(batch, equal_rows=True)
    keep = answers & visual_mask(model, batch, every=2)
    with torch.no_grad():
        assert max_abs_diff(forward_active(model, batch, keep).token_loss, token_losses_4d(model, batch, keep)) < TOL
        out = forward_active(model, batch, answers).token_loss
        assert max_abs_diff(out, token_losses_4d(model, batch, answers)) < TOL
        shortened = token_losses_shortened(model, batch, answers)  # a window over the shortened sequence instead
    assert max_abs_diff(out, shortened) > 1e-3


def test_a_mask_that_is_not_gemmas_dict_is_refused():
    model = tiny.tiny_model("Gemma3ForConditionalGeneration")
    with pytest.raises(TypeError, match="dict of 4-D masks"):
        family_of(model).decoder_mask(torch.ones(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2).bool(), 4)


def test_images_whose_tokens_are_all_elided_are_not_encoded():
    model = tiny.tiny_model("Gemma3ForConditionalGeneration").eval()
    batch = random_batch(model, batch_size=3, ragged=True, seed=5)
    keep = partial_mask(batch, equal_rows=False)
    keep[1] &= batch[INPUT_IDS][1] != model.config.image_token_id  # the second row's image entirely
    rows: list[int] = []
    handle = resolve(model).inner.vision_tower.register_forward_hook(
        lambda m, a, o: rows.append(o.last_hidden_state.shape[0])
    )
    try:
        model.zero_grad()
        out = forward_active(model, batch, keep)
        out.loss.backward()
    finally:
        handle.remove()
    skipped = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    model.zero_grad()
    masked = token_losses_4d(model, batch, keep)
    masked[~masked.isnan()].mean().backward()
    full = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    model.zero_grad()
    assert out.skipped_steps == 1 and rows == [2]
    assert max_abs_diff(out.token_loss.detach(), masked.detach()) < TOL
    assert max(float((skipped[k] - full[k]).abs().max()) for k in full) < TOL


def test_random_visual_elision_of_image_tokens_equals_the_model():
    model = tiny.tiny_model("Gemma3ForConditionalGeneration").eval()
    batch = random_batch(model, batch_size=3, ragged=True, seed=6)
    policy = VisualElisionPolicy(selection="random", images=True, keep_ratio=0.5, **SPARSE)
    policy.setup(model)
    keep = policy.plan(batch, step=1).keep_mask
    with torch.no_grad():
        assert max_abs_diff(forward_active(model, batch, keep).token_loss, token_losses_4d(model, batch, keep)) < TOL
    [regions] = family_of(model).media_regions(model.config, {PIXEL_VALUES: batch[PIXEL_VALUES][:1]}, "image")
    assert regions.num_tokens == model.config.mm_tokens_per_image and regions.regions.shape[-1] == 3 * 16 * 16


# ------------------------------------------------------------------------------------------------
# The checkpoint's processor and text.


def test_images_and_crops_equal_gemma3_image_processor_and_processor_text(folder, images, tmp_path):
    from types import SimpleNamespace

    from transformers import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    module, batch = first_batch(str(folder), image_records(tmp_path, images))
    settings = {k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"}
    hf = Gemma3ImageProcessorPil(**settings)(images=[Image.open(p) for p in images], return_tensors="pt")
    assert max_abs_diff(batch[PIXEL_VALUES], hf[PIXEL_VALUES]) == 0
    crops = [int(c) for c in hf["num_crops"]]
    assert crops[1] == 0 and crops[0] > 0 and crops[2] > 0
    tok = gemma_tokenizer()
    tokens = module.hf_model.config.mm_tokens_per_image
    sequence = f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * tokens}{EOI_TOKEN}\n\n"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is green."}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=TEMPLATE)
    image_id = module.hf_model.config.image_token_id
    for row in range(len(images)):
        prompt = Gemma3Processor.replace_image_token(
            SimpleNamespace(full_image_sequence=sequence), {"num_crops": crops}, row
        )
        expected = tok(text.replace(BOI_TOKEN, prompt, 1), add_special_tokens=False)["input_ids"]
        attended = batch[ATTENTION_MASK][row].bool()
        assert batch[INPUT_IDS][row][attended].tolist() == expected, row
        types = [int(t == image_id) for t in expected]  # the processor's token_type_ids: 1 at image tokens
        assert batch[TOKEN_TYPE_IDS][row][attended].tolist() == types
    with torch.no_grad():
        assert torch.isfinite(forward_active(module.model, batch).loss)


# ------------------------------------------------------------------------------------------------
# The teacher.


def test_teacher_is_the_gemma3_text_backbone_on_text_positions():
    from transformers import Gemma3ForCausalLM

    model = tiny.tiny_model("Gemma3ForConditionalGeneration")
    batch = random_batch(model, batch_size=2, ragged=True)
    parts = resolve(model)
    text = batch[ATTENTION_MASK].bool() & ~torch.isin(batch[INPUT_IDS], torch.tensor(parts.media_token_ids))
    cand = candidate_mask(batch[LABELS]) & text
    ours = Teacher.from_student(model).reference_losses(batch[INPUT_IDS], batch[LABELS], text, cand)
    backbone = Gemma3ForCausalLM(model.config.text_config)
    backbone.model.load_state_dict(parts.decoder.state_dict())
    backbone.lm_head.load_state_dict(parts.lm_head.state_dict())
    targets = shift_targets(batch[LABELS])
    for row in range(2):
        idx = text[row].nonzero().flatten()
        with torch.no_grad():
            logits = backbone(input_ids=batch[INPUT_IDS][row : row + 1, idx], position_ids=idx[None]).logits[0]
        want = cand[row, idx]
        expected = F.cross_entropy(logits[want], targets[row, idx][want], reduction="none")
        assert torch.allclose(ours[row, idx[want]], expected, atol=1e-5)
