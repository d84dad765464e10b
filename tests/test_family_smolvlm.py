"""SmolVLM / SmolVLM2: its processors' tiles, frames and text; tiles and frames skipped in the tower; visual-token
elision over tiles and frames; the teacher from its own text backbone.

The generic exactness tests (answer and visual elision, gradients) run for ``SmolVLMForConditionalGeneration`` in
``tests/test_elision.py``; what is particular to the family is here. Checkpoint folders are built in ``tmp_path``
(a tiny model, a trained tokenizer with SmolVLM's special tokens, SmolVLM2's chat template, processor configs of
non-default values); nothing is downloaded.
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
from references import max_abs_diff, token_losses_4d

from regate_lightning import MLLMModule
from regate_lightning.data import sample_video, train_tokenizer
from regate_lightning.data.datamodule import ConversationDataModule
from regate_lightning.data.processors import CheckpointProcessor, torchvision_usable
from regate_lightning.elision import forward_active
from regate_lightning.families import FAMILIES, family_of, resolve
from regate_lightning.families.smolvlm import FAKE_TOKEN, GLOBAL_TOKEN, tile_tokens
from regate_lightning.keys import (
    ATTENTION_MASK,
    FRAME_INDEX,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    PIXEL_ATTENTION_MASK,
    PIXEL_VALUES,
    SAMPLE_IDX,
)
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import Teacher
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy, temporal_change

TOL = 1e-5
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
SPECIALS = (
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "<video>",
    FAKE_TOKEN,
    GLOBAL_TOKEN,
    "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)),
)
SPARSE = {"warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}  # step 1 is sparse


def smol_template() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE


def smol_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=420, special_tokens=SPECIALS, chat_template=smol_template())


IMAGE_PROCESSOR = {
    "image_processor_type": "SmolVLMImageProcessor",
    "do_image_splitting": True,
    "size": {"longest_edge": 96},
    "max_image_size": {"longest_edge": 32},
    "image_mean": MEAN,
    "image_std": STD,
}
VIDEO_PROCESSOR = {
    "video_processor_type": "SmolVLMVideoProcessor",
    "size": {"longest_edge": 48},
    "max_image_size": {"longest_edge": 32},
    "image_mean": STD,
    "image_std": MEAN,
    "video_sampling": {"max_frames": 4, "fps": 2.0, "video_size": {"longest_edge": 48}},
}


def save_smolvlm(folder: Path) -> Path:
    """A tiny SmolVLM whose ``<image>`` is the tokenizer's, SmolVLM2's chat template, non-default processor configs."""
    tok = smol_tokenizer()
    model = tiny.tiny_model("SmolVLMForConditionalGeneration")
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_smolvlm(tmp_path_factory.mktemp("smolvlm"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """(H, W): landscape, portrait, near square, small (upsized to the longest edge, then split)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(30, 90), (80, 40), (64, 60), (20, 24)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


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


def video_records(folder: Path, videos: list[Path]) -> Path:
    records = [
        {
            "id": f"v{i}",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video", "path": str(v)}, {"type": "text", "text": "What moves?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
            ],
        }
        for i, v in enumerate(videos)
    ]
    return write_records(folder / "videos.jsonl", records)


def first_batch(student: str, train_file: Path, **kwargs) -> tuple[MLLMModule, dict, ConversationDataModule]:
    module = MLLMModule(model=student)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    data = ConversationDataModule(train_file=str(train_file), max_length=None, batch_size=8, **kwargs)
    data.trainer = trainer
    data.setup("fit")
    dataset = data.train_set
    assert dataset is not None
    batch = data.train_dataloader().collate_fn([dataset[i] for i in range(len(dataset))])
    return module, batch, data


def hf_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != SAMPLE_IDX}


# ------------------------------------------------------------------------------------------------
# The checkpoint's processors: tiles, frames and the text around them.


def test_images_equal_smolvlm_image_processor_and_processor_text(folder, images, tmp_path):
    """Tiles as SmolVLMImageProcessorPil splits them; input_ids as SmolVLMProcessor writes the prompt."""
    from transformers import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    module, batch, _ = first_batch(str(folder), image_records(tmp_path, images))
    hf = SmolVLMImageProcessorPil(**{k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"})(
        images=[[Image.open(p)] for p in images], return_tensors="pt", return_row_col_info=True
    )
    real = hf[PIXEL_VALUES].flatten(0, 1).flatten(1).ne(0).any(1)  # the processor pads rows with empty images
    assert max_abs_diff(batch[PIXEL_VALUES].flatten(0, 1), hf[PIXEL_VALUES].flatten(0, 1)[real]) == 0
    assert torch.equal(batch[PIXEL_ATTENTION_MASK].flatten(0, 1), hf[PIXEL_ATTENTION_MASK].flatten(0, 1)[real])
    splits = [(r[0], c[0]) for r, c in zip(hf["rows"], hf["cols"], strict=True)]
    assert splits == [(1, 3), (3, 2), (3, 3), (3, 3)], splits  # the sizes choose different splits
    assert batch[FRAME_INDEX].eq(-1).all()
    tok = smol_tokenizer()
    seq = tile_tokens(module.hf_model.config)
    processor = type("P", (), {})()  # SmolVLMProcessor's own text rule, without its video processor (torchvision)
    processor.__dict__.update(
        image_seq_len=seq, image_token="<image>", fake_image_token=FAKE_TOKEN, global_image_token=GLOBAL_TOKEN
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is green."}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=smol_template())
    for row in range(len(images)):
        prompt = SmolVLMProcessor.replace_image_token(processor, {"rows": hf["rows"], "cols": hf["cols"]}, row)
        expected = tok(text.replace("<image>", prompt), add_special_tokens=False)["input_ids"]
        ours = batch[INPUT_IDS][row][batch[ATTENTION_MASK][row].bool()].tolist()
        assert ours == expected, row
    assert tok.decode(batch[LABELS][0][batch[LABELS][0] != IGNORE_INDEX]) == " It is green.<end_of_utterance>\n"
    with torch.no_grad():
        assert torch.isfinite(forward_active(module.model, hf_batch(batch)).loss)  # HF checks the token count


def test_videos_follow_smolvlm2_frames_and_timestamps(folder, tmp_path):
    """Frames sampled by the checkpoint's video_sampling, each one global image after its timestamp; input_ids as
    SmolVLMProcessor.replace_video_token writes them into SmolVLM2's chat template."""
    from transformers import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
    from transformers.video_utils import VideoMetadata

    videos = [write_video(tmp_path / "a.mp4", num_frames=12, fps=4.0), write_video(tmp_path / "b.mp4", 4, 2.0, 1)]
    module, batch, data = first_batch(str(folder), video_records(tmp_path, videos))
    assert data.frames.fps == 2.0 and data.frames.num_frames == 4  # video_sampling: fps 2, at most 4 frames
    assert batch[FRAME_INDEX].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    tok = smol_tokenizer()
    seq = tile_tokens(module.hf_model.config)
    processor = type("P", (), {})()
    processor.__dict__.update(
        image_seq_len=seq, image_token="<image>", fake_image_token=FAKE_TOKEN, global_image_token=GLOBAL_TOKEN
    )
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=smol_template())
    frames = []
    for row, path in enumerate(videos):
        decoded = sample_video(path, data.frames.num_frames, data.frames.sample, data.frames.fps)
        frames.append(decoded.frames)
        metadata = VideoMetadata(
            total_num_frames=len(decoded.times), fps=1.0, duration=decoded.duration, frames_indices=decoded.times
        )
        prompt = SmolVLMProcessor.replace_video_token(
            processor, {"pixel_values": torch.empty(1, len(decoded.times)), "video_metadata": [metadata]}, 0
        )
        expected = tok(text.replace("<video>", prompt), add_special_tokens=False)["input_ids"]
        ours = batch[INPUT_IDS][row][batch[ATTENTION_MASK][row].bool()].tolist()
        assert ours == expected, row
        assert "Frame from 00:01:" in prompt and "series of four frames" in prompt
    # the built-in video rule: SmolVLM's image processor on every frame, without splitting, with the video settings
    # (where torchvision imports, the data runs transformers' SmolVLMVideoProcessor instead: compared with the
    # built-in rule in test_builtin_video_rule_against_smolvlm_video_processor)
    if data.train_set.renderer.spec.processor.video_backend == "builtin":
        settings = {k: v for k, v in VIDEO_PROCESSOR.items() if k not in ("video_processor_type", "video_sampling")}
        hf = SmolVLMImageProcessorPil(**settings, do_image_splitting=False)(
            images=[[f.numpy() for f in frames[0]]], input_data_format="channels_first", return_tensors="pt"
        )
        assert max_abs_diff(batch[PIXEL_VALUES][:4, 0], hf[PIXEL_VALUES][0]) == 0
    with torch.no_grad():
        assert torch.isfinite(forward_active(module.model, hf_batch(batch)).loss)


@pytest.mark.skipif(not torchvision_usable(), reason="transformers' SmolVLMVideoProcessor needs torchvision")
def test_builtin_video_rule_against_smolvlm_video_processor(folder, tmp_path):
    """Where torchvision imports: the built-in rule (PIL's LANCZOS) against SmolVLMVideoProcessor (torchvision's)."""
    builtin = CheckpointProcessor.load(str(folder), FAMILIES["smolvlm"], video_backend="builtin")
    transformers_side = CheckpointProcessor.load(str(folder), FAMILIES["smolvlm"], video_backend="transformers")
    assert builtin is not None and transformers_side is not None
    decoded = sample_video(write_video(tmp_path / "c.mp4", num_frames=5, seed=2), 5).frames
    a, b = transformers_side.video(decoded), builtin.video(decoded)
    diff = max_abs_diff(a.values, b.values)
    print(f"max|diff| smolvlm video built-in (PIL LANCZOS) vs SmolVLMVideoProcessor: {diff:.2e}")
    assert torch.equal(a.mask, b.mask)
    assert diff < 0.03  # kernels differ (PIL vs torchvision LANCZOS): 1.96e-02 measured, normalised units


def test_tiles_of_other_size_than_the_tower_are_refused(tmp_path):
    folder = save_smolvlm(tmp_path / "bad")
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**IMAGE_PROCESSOR, "max_image_size": {"longest_edge": 48}})
    )
    from regate_lightning.data.vision import VisionSpec

    with pytest.raises(ValueError, match=r"max_image_size .* makes tiles of 48 pixels, but .* takes 32 x 32"):
        VisionSpec.from_model(MLLMModule(model=str(folder)).hf_model)


# ------------------------------------------------------------------------------------------------
# Kinds, regions, skipped tiles and frames.


def mixed_batch(folder: Path, images: list[Path], tmp_path: Path) -> tuple[MLLMModule, dict]:
    """One row with a split image then a video, one with a video, one with an image (the checkpoint's data)."""
    video = write_video(tmp_path / "m.mp4", num_frames=8, fps=4.0, seed=5)
    records = [
        {
            "id": "both",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "path": str(images[2])},
                        {"type": "video", "path": str(video)},
                        {"type": "text", "text": "What moves?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A square moves up."}]},
            ],
        },
        {
            "id": "video",
            "messages": [
                {"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "And?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is yellow."}]},
            ],
        },
        {
            "id": "image",
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": str(images[0])}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "There are three shapes."}]},
            ],
        },
    ]
    module, batch, _ = first_batch(str(folder), write_records(tmp_path / "mixed.jsonl", records))
    return module, hf_batch(batch)


def test_image_and_video_kinds_share_one_placeholder(folder, images, tmp_path):
    module, batch = mixed_batch(folder, images, tmp_path)
    model, family = module.hf_model, family_of(module.hf_model)
    config = model.config
    everything = family.media_positions(config, batch, "image")
    video = family.media_positions(config, batch, "video")
    seq = tile_tokens(config)
    assert torch.equal(everything, batch[INPUT_IDS] == config.image_token_id)
    assert (video & ~everything).sum() == 0
    assert video.sum(1).tolist() == [4 * seq, 4 * seq, 0]  # 4 frames each (fps 2 of a 2 s clip)
    assert (everything & ~video).sum(1).tolist() == [10 * seq, 0, 4 * seq]  # 3 x 3 tiles + global; 1 x 3 + global
    steps = family.media_steps(config, batch, "video")
    regions = family.media_regions(config, batch, "video")
    assert (
        [(s.steps, s.tokens_per_step) for s in steps]
        == [(r.steps, r.tokens_per_step) for r in regions]
        == [
            (4, seq),
            (4, seq),
        ]
    )
    assert sum(r.num_tokens for r in family.media_regions(config, batch, "image")) == int(everything.sum())


def test_regions_follow_the_pixel_shuffle():
    """A token's region is the scale x scale patch block that SmolVLMConnector.pixel_shuffle puts in it."""
    model = tiny.tiny_model("SmolVLMForConditionalGeneration")
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    patches = torch.arange(side * side, dtype=torch.float32).view(1, side * side, 1)  # each patch's own index
    shuffled = model.model.connector.pixel_shuffle(patches, config.scale_factor)[0]  # [tokens, scale ** 2]
    pixels = torch.arange(side * side, dtype=torch.float32).view(side, side)
    pixels = pixels.repeat_interleave(config.vision_config.patch_size, 0).repeat_interleave(
        config.vision_config.patch_size, 1
    )  # every pixel holds its patch's index
    batch = {PIXEL_VALUES: pixels.expand(1, 1, 3, -1, -1).contiguous(), FRAME_INDEX: torch.tensor([-1])}
    [regions] = family_of(model).media_regions(config, batch, "image")
    for token in range(shuffled.shape[0]):
        assert set(regions.regions[0, token].unique().tolist()) == set(shuffled[token].tolist()), token


def test_frames_and_tiles_whose_tokens_are_all_elided_are_not_encoded(folder, images, tmp_path):
    """Uniform visual elision drops whole frames: the tower encodes fewer tiles, with the same losses and gradients."""
    module, batch = mixed_batch(folder, images, tmp_path)
    model = module.hf_model.eval()
    policy = VisualElisionPolicy(selection="uniform", keep_ratio=0.5, **SPARSE)
    policy.setup(model)
    keep = policy.plan(batch, step=1).keep_mask
    image = model.config.image_token_id
    keep[2, (batch[INPUT_IDS][2] == image).nonzero().flatten()[: tile_tokens(model.config)]] = False  # a tile too
    rows: list[int] = []
    handle = resolve(model).inner.vision_model.register_forward_hook(
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
    tiles = batch[PIXEL_VALUES].shape[0]  # 10 tiles + 4 frames, 4 frames, 4 tiles
    assert out.skipped_steps == 2 + 2 + 1 and rows == [tiles - 5]
    assert max_abs_diff(out.token_loss.detach(), masked.detach()) < TOL
    assert skipped.keys() == full.keys()
    assert max(float((skipped[k] - full[k]).abs().max()) for k in full) < TOL


@pytest.mark.parametrize(("selection", "images_too"), [("temporal", False), ("random", True)])
def test_visual_elision_over_frames_and_tiles_equals_the_model(folder, images, tmp_path, selection, images_too):
    module, batch = mixed_batch(folder, images, tmp_path)
    model = module.hf_model.eval()
    policy = VisualElisionPolicy(selection=selection, keep_ratio=0.4, images=images_too, **SPARSE)
    policy.setup(model)
    plan = policy.plan(batch, step=1)
    family = family_of(model)
    video = family.media_positions(model.config, batch, "video")
    everything = family.media_positions(model.config, batch, "image")
    assert torch.equal(plan.candidates, everything if images_too else video)
    assert plan.keep_mask[~plan.candidates].all()
    if selection == "temporal":  # every video's first frame is kept whole
        seq = tile_tokens(model.config)
        for row in (0, 1):
            assert plan.keep_mask[row, video[row].nonzero().flatten()[:seq]].all()
    with torch.no_grad():
        out = forward_active(model, batch, plan.keep_mask)
        reference = token_losses_4d(model, batch, plan.keep_mask)
    assert max_abs_diff(out.token_loss, reference) < TOL


def test_temporal_score_compares_a_frame_with_its_own_videos_previous_frame(folder, images, tmp_path):
    module, batch = mixed_batch(folder, images, tmp_path)
    regions = family_of(module.hf_model).media_regions(module.hf_model.config, batch, "video")
    for media in regions:
        change = temporal_change(media).view(media.steps, media.tokens_per_step)
        assert torch.isinf(change[0]).all() and torch.isfinite(change[1:]).all()


def test_a_batch_without_frame_index_is_refused_for_video_kinds():
    model = tiny.tiny_model("SmolVLMForConditionalGeneration")
    batch = random_batch(model, batch_size=2, num_frames=2)
    batch.pop(FRAME_INDEX)
    with pytest.raises(ValueError, match="`frame_index`"):
        family_of(model).media_positions(model.config, batch, "video")


# ------------------------------------------------------------------------------------------------
# The teacher: the checkpoint's own text backbone.


def test_teacher_is_the_text_backbone_on_text_positions():
    """Teacher.from_student's reference losses equal a LlamaForCausalLM with the student's text weights, run on
    the text-only positions with their original position ids."""
    from transformers import LlamaForCausalLM

    model = tiny.tiny_model("SmolVLMForConditionalGeneration")
    batch = random_batch(model, batch_size=2, num_frames=2, ragged=True)
    parts = resolve(model)
    text = batch[ATTENTION_MASK].bool() & ~torch.isin(batch[INPUT_IDS], torch.tensor(parts.media_token_ids))
    cand = candidate_mask(batch[LABELS]) & text
    ours = Teacher.from_student(model).reference_losses(batch[INPUT_IDS], batch[LABELS], text, cand)
    backbone = LlamaForCausalLM(model.config.text_config)
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
