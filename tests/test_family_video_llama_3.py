"""VideoLLaMA3: per-media merge sizes, its processors' patches and text, its video compression combined with
visual-token elision, frames skipped in the tower, the teacher from its Qwen2 text backbone.

The generic exactness tests run for ``VideoLlama3ForConditionalGeneration`` in ``tests/test_elision.py`` (its random
batches carry a compression mask, so frames there have different placeholder counts). Checkpoint folders are
built in ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import CORPUS, write_records, write_video
from PIL import Image
from references import max_abs_diff, partial_mask, token_losses_4d

from regate_lightning import MLLMModule
from regate_lightning.data import sample_video, train_tokenizer
from regate_lightning.data.datamodule import ConversationDataModule
from regate_lightning.data.processors import CheckpointProcessor, torchvision_usable
from regate_lightning.elision import forward_active
from regate_lightning.families import FAMILIES, family_of, resolve
from regate_lightning.families.video_llama_3 import compression_mask
from regate_lightning.keys import (
    ATTENTION_MASK,
    IMAGE_GRID_THW,
    IMAGE_MERGE_SIZES,
    INPUT_IDS,
    LABELS,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    SAMPLE_IDX,
    VIDEO_COMPRESSION_MASK,
    VIDEO_GRID_THW,
    VIDEO_MERGE_SIZES,
)
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import Teacher
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy

TOL = 1e-5
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
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
    tok = vl3_tokenizer()
    model = tiny.tiny_model("VideoLlama3ForConditionalGeneration")
    model.config.image_token_id, model.config.video_token_id = tok.convert_tokens_to_ids(list(SPECIALS[3:]))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_vl3(tmp_path_factory.mktemp("vl3"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(4)
    paths = []
    for i, (h, w) in enumerate([(60, 90), (128, 64), (20, 24)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def records(folder: Path, media: list[tuple[str, Path]], name: str = "train.jsonl") -> Path:
    out = []
    for i, (kind, path) in enumerate(media):
        content = [{"type": kind, "path": str(path)}, {"type": "text", "text": "What is it?"}]
        out.append(
            {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": "A square moves up."}]},
                ],
            }
        )
    return write_records(folder / name, out)


def first_batch(student: str, train_file: Path) -> tuple[MLLMModule, dict, ConversationDataModule]:
    module = MLLMModule(model=student)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    data = ConversationDataModule(train_file=str(train_file), max_length=None, batch_size=8)
    data.trainer = trainer
    data.setup("fit")
    assert data.train_set is not None
    batch = data.train_dataloader().collate_fn([data.train_set[i] for i in range(len(data.train_set))])
    return module, {k: v for k, v in batch.items() if k != SAMPLE_IDX}, data


def processor_text(tok, kind: str) -> str:
    messages = [
        {"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square moves up."}]},
    ]
    return tok.apply_chat_template(messages, tokenize=False, chat_template=TEMPLATE)


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
        assert batch[INPUT_IDS][row][batch[ATTENTION_MASK][row].bool()].tolist() == expected
    with torch.no_grad():
        assert torch.isfinite(forward_active(module.model, batch).loss)


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
        assert batch[INPUT_IDS][row][batch[ATTENTION_MASK][row].bool()].tolist() == expected, row
        assert "Time 0.5s:" in prompt
    with torch.no_grad():
        assert torch.isfinite(forward_active(module.model, batch).loss)


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


@pytest.mark.skipif(not torchvision_usable(), reason="transformers' VideoLlama3VideoProcessor needs torchvision")
def test_builtin_video_rule_equals_video_llama_3_video_processor(folder, tmp_path):
    builtin = CheckpointProcessor.load(str(folder), FAMILIES["video_llama_3"], video_backend="builtin")
    transformers_side = CheckpointProcessor.load(str(folder), FAMILIES["video_llama_3"], video_backend="transformers")
    assert builtin is not None and transformers_side is not None
    for i, (frames, size) in enumerate([(4, (48, 64)), (3, (90, 40))]):
        decoded = sample_video(write_video(tmp_path / f"v{i}.mp4", num_frames=frames, seed=i), frames).frames
        decoded = F.interpolate(decoded.float(), size=size).round().to(torch.uint8)
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
    rows: list[int] = []
    handle = resolve(model).inner.vision_model.register_forward_hook(
        lambda m, a, o: rows.append(o.last_hidden_state.shape[0])
    )
    try:
        model.zero_grad()
        out = forward_active(model, batch, mask)
        out.loss.backward()
    finally:
        handle.remove()
    skipped = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    model.zero_grad()
    masked = token_losses_4d(model, batch, mask)
    masked[~masked.isnan()].mean().backward()
    full = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    model.zero_grad()
    assert out.skipped_steps > 0 and rows == [(12 - out.skipped_steps) * 16]  # 16 tokens per encoded frame
    assert max_abs_diff(out.token_loss.detach(), masked.detach()) < TOL
    assert max(float((skipped[k] - full[k]).abs().max()) for k in full) < TOL


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


# ------------------------------------------------------------------------------------------------
# The teacher.


def test_teacher_is_the_qwen2_text_backbone_on_text_positions():
    from transformers import Qwen2ForCausalLM

    model = tiny.tiny_model("VideoLlama3ForConditionalGeneration")
    batch = random_batch(model, batch_size=2, num_frames=2, ragged=True)
    parts = resolve(model)
    text = batch[ATTENTION_MASK].bool() & ~torch.isin(batch[INPUT_IDS], torch.tensor(parts.media_token_ids))
    cand = candidate_mask(batch[LABELS]) & text
    ours = Teacher.from_student(model).reference_losses(batch[INPUT_IDS], batch[LABELS], text, cand)
    backbone = Qwen2ForCausalLM(model.config.text_config)
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
