"""VideoLLaMA3: per-media merge sizes, its processors' patches and text, its video compression combined with
visual-token elision, frames skipped in the tower.

The generic exactness tests run for ``VideoLlama3ForConditionalGeneration`` in ``tests/test_elision.py`` (its random
batches carry a compression mask, so frames there have different placeholder counts), the teacher from its Qwen2
text backbone in ``tests/test_families.py``. Checkpoint folders are built in ``tmp_path``; nothing is downloaded.
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
    clip_frames,
    first_batch,
    media_records,
    messages,
    needs_torchvision,
    row_ids,
    run_model,
    save_checkpoint,
    video_paths,
    write_video,
)
from PIL import Image
from references import TOL, max_abs_diff, partial_mask, skipped_step_errors, token_losses_4d

from regate_lightning.data import sample_video, train_tokenizer
from regate_lightning.elision import forward_active
from regate_lightning.families import family_of, resolve
from regate_lightning.families.video_llama_3 import compression_mask
from regate_lightning.keys import (
    ATTENTION_MASK,
    IMAGE_GRID_THW,
    IMAGE_MERGE_SIZES,
    INPUT_IDS,
    LABELS,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    VIDEO_COMPRESSION_MASK,
    VIDEO_GRID_THW,
    VIDEO_MERGE_SIZES,
)
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image_pad|>\n{% elif content['type'] == 'video' %}<|video_pad|>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A VideoLLaMA3-style chat template: ``<|im_start|>`` turns, media as their placeholder token and a newline."""
IMAGE_PROCESSOR = {
    "image_processor_type": "VideoLlama3ImageProcessor",
    "min_pixels": 1024,
    "max_pixels": 4096,
    "patch_size": 8,
    "merge_size": 1,
    "image_mean": MEAN,
    "image_std": STD,
}
VIDEO_PROCESSOR = {
    "video_processor_type": "VideoLlama3VideoProcessor",
    "min_pixels": 1024,
    "max_pixels": 4 * 4096,
    "patch_size": 8,
    "merge_size": 2,
    "image_mean": STD,
    "image_std": MEAN,
    "use_token_compression": True,
    "fps": 2.0,
    "max_frames": 4,
}
SPARSE = {"warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}


def vl3_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=380, special_tokens=SPECIALS, chat_template=TEMPLATE)


def save_vl3(folder: Path) -> Path:
    model = tiny.tiny_model("VideoLlama3ForConditionalGeneration")
    ids = {"image_token_id": SPECIALS[3], "video_token_id": SPECIALS[4]}
    return save_checkpoint(folder, model, vl3_tokenizer(), ids, image=IMAGE_PROCESSOR, video=VIDEO_PROCESSOR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_vl3(tmp_path_factory.mktemp("vl3"))


IMAGE_HW, IMAGE_SEED = [(60, 90), (128, 64), (20, 24)], 4
"""The ``images`` fixture's (H, W)."""


QUESTION = {"question": "What is it?", "answer": "A square moves up."}
"""The conversation of every test record."""


def records(folder: Path, media: list[tuple[str, Path]], name: str = "train.jsonl") -> Path:
    return media_records(folder, media, name=name, **QUESTION)


def processor_text(tok, kind: str) -> str:
    conversation = messages(QUESTION["question"], QUESTION["answer"], (kind, None))
    return tok.apply_chat_template(conversation, tokenize=False, chat_template=TEMPLATE)


# ------------------------------------------------------------------------------------------------
# The checkpoint's processors.


def test_images_equal_video_llama_3_image_processor_and_processor_text(folder, images, tmp_path):
    from types import SimpleNamespace

    from transformers import VideoLlama3ImageProcessorPil
    from transformers.models.video_llama_3.processing_video_llama_3 import VideoLlama3Processor

    module, batch, _ = first_batch(str(folder), records(tmp_path, [("image", p) for p in images]))
    settings = {k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"}
    hf = VideoLlama3ImageProcessorPil(**settings)(images=[Image.open(p) for p in images], return_tensors="pt")
    assert max_abs_diff(batch[PIXEL_VALUES], hf[PIXEL_VALUES]) == 0
    assert torch.equal(batch[IMAGE_GRID_THW], hf[IMAGE_GRID_THW]) and batch[IMAGE_MERGE_SIZES].tolist() == [1, 1, 1]
    tok = vl3_tokenizer()
    processor = SimpleNamespace(image_token="<|image_pad|>", image_processor=SimpleNamespace(merge_size=1))
    for row in range(len(images)):
        prompt = VideoLlama3Processor.replace_image_token(processor, hf, row)
        expected = tok(processor_text(tok, "image").replace("<|image_pad|>", prompt))["input_ids"]
        assert row_ids(batch, row) == expected
    run_model(module, batch)


def test_videos_follow_the_video_rules_compression_and_timestamps(folder, tmp_path):
    """Built-in video rule: smart_resize with max_pixels shared by the frames, merge 2, the compression mask;
    input_ids as VideoLlama3Processor.replace_video_token writes them (kept tokens per frame after its time)."""
    from types import SimpleNamespace

    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import smart_resize
    from transformers.models.video_llama_3.processing_video_llama_3 import VideoLlama3Processor
    from transformers.video_utils import VideoMetadata

    videos = [write_video(tmp_path / "a.mp4", num_frames=8, fps=4.0), write_video(tmp_path / "b.mp4", 4, 2.0, 3)]
    module, batch, data = first_batch(str(folder), records(tmp_path, [("video", v) for v in videos]))
    assert data.frames.fps == 2.0 and data.frames.num_frames == 4
    side = [s // 8 for s in smart_resize(64, 64, 16, 1024, 4 * 4096 // 4)]
    assert batch[VIDEO_GRID_THW].tolist() == [[4, *side], [4, *side]] and batch[VIDEO_MERGE_SIZES].tolist() == [2, 2]
    assert torch.equal(batch[VIDEO_COMPRESSION_MASK], compression_mask(batch[PIXEL_VALUES_VIDEOS], *_grids(batch)))
    tok = vl3_tokenizer()
    processor = SimpleNamespace(video_token="<|video_pad|>")
    for row, path in enumerate(videos):
        decoded = sample_video(path, data.frames.num_frames, data.frames.sample, data.frames.fps)
        inputs = {
            VIDEO_GRID_THW: batch[VIDEO_GRID_THW],
            VIDEO_MERGE_SIZES: batch[VIDEO_MERGE_SIZES],
            VIDEO_COMPRESSION_MASK: batch[VIDEO_COMPRESSION_MASK],
            "video_metadata": [VideoMetadata(len(decoded.times), fps=1.0, frames_indices=list(decoded.times))] * 2,
        }
        prompt = VideoLlama3Processor.replace_video_token(processor, inputs, row)
        expected = tok(processor_text(tok, "video").replace("<|video_pad|>", prompt))["input_ids"]
        assert row_ids(batch, row) == expected, row
        assert "Time 0.5s:" in prompt
    run_model(module, batch)


def _grids(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[VIDEO_GRID_THW], batch[VIDEO_MERGE_SIZES]


def test_compression_rule():
    """The first frame whole; a token kept where its block changed; a repeated frame keeps its first token."""
    patch_dim = 3 * 8 * 8
    frames = torch.zeros(3, 4, 4, patch_dim)  # t, h, w patches (merge 2: 4 tokens of 2 x 2 patches per frame)
    frames[1, :2, :2] = 0.5  # frame 1 changes its first token's block (patches in (h/m, w/m, m, m) order below)
    rows = frames.view(3, 2, 2, 2, 2, patch_dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, patch_dim)
    kept = compression_mask(rows, torch.tensor([[3, 4, 4]]), torch.tensor([2])).view(3, 4)
    assert kept[0].all() and kept[1].tolist() == [True, False, False, False]
    assert kept[2].tolist() == [True, False, False, False]  # frame 2 changed back: the block differs again
    same = compression_mask(torch.zeros(2 * 16, patch_dim), torch.tensor([[2, 4, 4]]), torch.tensor([2])).view(2, 4)
    assert same[1].tolist() == [True, False, False, False]  # nothing changed: the first token stays


@needs_torchvision
def test_builtin_video_rule_equals_video_llama_3_video_processor(folder, tmp_path):
    transformers_side, builtin = video_paths(folder, "video_llama_3")
    for i, (frames, size) in enumerate([(4, (48, 64)), (3, (90, 40))]):
        decoded = clip_frames(tmp_path / f"v{i}.mp4", frames, seed=i, size=size)
        a, b = transformers_side.video(decoded), builtin.video(decoded)
        assert torch.equal(a.grid, b.grid) and torch.equal(a.merge_sizes, b.merge_sizes)
        diff = max_abs_diff(a.values, b.values)
        print(f"max|diff| video_llama_3 video built-in vs VideoLlama3VideoProcessor: {diff:.2e}")
        assert diff <= 1e-5 and torch.equal(a.compression, b.compression)


# ------------------------------------------------------------------------------------------------
# Compression and visual-token elision; skipped frames; mixed merge sizes.


def compressed_batch(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Random batch whose videos have static regions, so the processor's rule compresses them."""
    model = tiny.tiny_model("VideoLlama3ForConditionalGeneration").eval()
    batch = random_batch(model, batch_size=3, num_frames=4, ragged=True, seed=seed)
    pixels = batch[PIXEL_VALUES_VIDEOS].view(3, 4, 64, -1)
    pixels[:, 1:, :32] = pixels[:, :1, :32]  # the top half of every frame repeats the first frame
    batch[PIXEL_VALUES_VIDEOS] = pixels.reshape(3 * 4 * 64, -1)
    batch[VIDEO_COMPRESSION_MASK] = compression_mask(batch[PIXEL_VALUES_VIDEOS], *_grids(batch))
    per_frame = batch[VIDEO_COMPRESSION_MASK].view(3, 4, 16).sum(2)
    assert per_frame[:, 0].eq(16).all() and per_frame[:, 1:].eq(8).all()  # the changed half of later frames
    return model, _with_placeholders(model, batch)


def _with_placeholders(model: torch.nn.Module, batch: dict) -> dict:
    """Rebuild each row's ids so that its video has one placeholder per kept token."""
    token = model.config.video_token_id
    kept = batch[VIDEO_COMPRESSION_MASK].view(batch[VIDEO_GRID_THW].shape[0], -1).sum(1).tolist()
    rows = []
    for row, count in enumerate(kept):
        ids = batch[INPUT_IDS][row][batch[ATTENTION_MASK][row].bool()]
        labels = batch[LABELS][row][batch[ATTENTION_MASK][row].bool()]
        first = int((ids == token).nonzero()[0])
        n = int((ids == token).sum())
        rows.append(
            (
                torch.cat([ids[:first], torch.full((count,), token), ids[first + n :]]),
                torch.cat([labels[:first], torch.full((count,), -100), labels[first + n :]]),
            )
        )
    width = max(len(r[0]) for r in rows)
    batch[INPUT_IDS] = torch.stack([F.pad(i, (0, width - len(i))) for i, _ in rows])
    batch[LABELS] = torch.stack([F.pad(lab, (0, width - len(lab)), value=-100) for _, lab in rows])
    batch[ATTENTION_MASK] = torch.stack([F.pad(torch.ones_like(i), (0, width - len(i))) for i, _ in rows])
    return batch


@pytest.mark.parametrize("selection", ["temporal", "random", "temporal_frames"])
def test_compression_then_visual_elision_equals_the_model(selection):
    """Compression removes repeated tokens before the sequence is built; visual-token elision then keeps its ratio
    of what is left; the elided step equals the unmodified model on the same active tokens."""
    model, batch = compressed_batch()
    policy = VisualElisionPolicy(selection=selection, keep_ratio=0.5, **SPARSE)
    policy.setup(model)
    plan = policy.plan(batch, step=1)
    assert plan.candidates.sum(1).tolist() == [16 + 3 * 8] * 3  # the placeholders left after compression
    assert ((plan.keep_mask & plan.candidates).sum(1) == 20).all()  # half of them: the two compound
    with torch.no_grad():
        out = forward_active(model, batch, plan.keep_mask)
        reference = token_losses_4d(model, batch, plan.keep_mask)
    assert max_abs_diff(out.token_loss, reference) < TOL
    regions = family_of(model).media_regions(model.config, batch, "video")
    assert [r.num_tokens for r in regions] == [40, 40, 40] and all(r.present is not None for r in regions)


def test_frames_with_every_kept_token_elided_are_not_encoded():
    model, batch = compressed_batch(seed=1)
    keep = VisualElisionPolicy(selection="uniform", keep_ratio=0.5, **SPARSE)
    keep.setup(model)
    mask = keep.plan(batch, step=1).keep_mask
    mask &= partial_mask(batch, equal_rows=False)  # answer tokens too
    out, rows, loss_err, grad_err, _ = skipped_step_errors(model, batch, mask, resolve(model).inner.vision_model)
    assert out.skipped_steps > 0 and rows == [(12 - out.skipped_steps) * 16]  # 16 tokens per encoded frame
    assert loss_err < TOL and grad_err < TOL


def test_images_and_videos_with_their_own_merge_sizes_in_one_batch(folder, images, tmp_path):
    video = write_video(tmp_path / "m.mp4", num_frames=8, fps=4.0, seed=7)
    module, batch, _ = first_batch(str(folder), records(tmp_path, [("image", images[0]), ("video", video)], "m.jsonl"))
    assert batch[IMAGE_MERGE_SIZES].tolist() == [1] and batch[VIDEO_MERGE_SIZES].tolist() == [2]
    model = module.hf_model.eval()
    keep = partial_mask(batch, equal_rows=False)
    policy = VisualElisionPolicy(selection="random", keep_ratio=0.5, images=True, **SPARSE)
    policy.setup(model)
    keep &= policy.plan(batch, step=1).keep_mask
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        reference = token_losses_4d(model, batch, keep)
    assert max_abs_diff(out.token_loss, reference) < TOL
