"""Gemma 3: its bidirectional image attention kept exactly on the shortened sequence, its processor's images, crops
and text, images skipped in the tower.

The generic exactness tests run for ``Gemma3ForConditionalGeneration`` in ``tests/test_elision.py``; their 4-D
reference is the model's own masks on the full sequence (``tests/references.py``) with the elided keys hidden. The
teacher from its own text backbone is tested in ``tests/test_families.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import (
    CORPUS,
    MEAN,
    STD,
    first_batch,
    image_records,
    messages,
    row_ids,
    run_model,
    save_checkpoint,
)
from PIL import Image
from references import (
    TOL,
    hf_inputs,
    max_abs_diff,
    partial_mask,
    skipped_step_errors,
    token_losses_4d,
    token_losses_shortened,
    visual_mask,
)

from regate_lightning.data import train_tokenizer
from regate_lightning.elision import forward_active
from regate_lightning.families import family_of, resolve
from regate_lightning.families.gemma3 import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS, PIXEL_VALUES, TOKEN_TYPE_IDS
from regate_lightning.targets import shift_targets
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy

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
    ids = {"boi_token_id": BOI_TOKEN, "image_token_id": IMAGE_TOKEN, "eoi_token_id": EOI_TOKEN}
    model = tiny.tiny_model("Gemma3ForConditionalGeneration")
    return save_checkpoint(tmp_path_factory.mktemp("gemma3"), model, gemma_tokenizer(), ids, image=IMAGE_PROCESSOR)


IMAGE_HW, IMAGE_SEED = [(40, 100), (50, 50), (90, 30)], 5
"""The ``images`` fixture's (H, W): wide (pan-and-scan crops), square (none), tall (crops)."""


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
    out, rows, loss_err, grad_err, _ = skipped_step_errors(model, batch, keep, resolve(model).inner.vision_tower)
    assert out.skipped_steps == 1 and rows == [2]
    assert loss_err < TOL and grad_err < TOL


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

    module, batch, _ = first_batch(str(folder), image_records(tmp_path, images, question="What is it?"))
    settings = {k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"}
    hf = Gemma3ImageProcessorPil(**settings)(images=[Image.open(p) for p in images], return_tensors="pt")
    assert max_abs_diff(batch[PIXEL_VALUES], hf[PIXEL_VALUES]) == 0
    crops = [int(c) for c in hf["num_crops"]]
    assert crops[1] == 0 and crops[0] > 0 and crops[2] > 0
    tok = gemma_tokenizer()
    tokens = module.hf_model.config.mm_tokens_per_image
    sequence = f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * tokens}{EOI_TOKEN}\n\n"
    conversation = messages("What is it?", "It is green.", ("image", None))
    text = tok.apply_chat_template(conversation, tokenize=False, chat_template=TEMPLATE)
    image_id = module.hf_model.config.image_token_id
    for row in range(len(images)):
        prompt = Gemma3Processor.replace_image_token(
            SimpleNamespace(full_image_sequence=sequence), {"num_crops": crops}, row
        )
        expected = tok(text.replace(BOI_TOKEN, prompt, 1), add_special_tokens=False)["input_ids"]
        assert row_ids(batch, row) == expected, row
        types = [int(t == image_id) for t in expected]  # the processor's token_type_ids: 1 at image tokens
        assert batch[TOKEN_TYPE_IDS][row][batch[ATTENTION_MASK][row].bool()].tolist() == types
    run_model(module, batch)
