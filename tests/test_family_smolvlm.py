"""SmolVLM / SmolVLM2: its processors' tiles, frames and text; tiles and frames skipped in the tower; visual-token
elision over tiles and frames.

The generic exactness tests (answer and visual elision, gradients) run for ``SmolVLMForConditionalGeneration`` in
``tests/test_elision.py``, the teacher from its own text backbone in ``tests/test_families.py``; what is particular
to the family is here. Checkpoint folders are built in ``tmp_path``
(a tiny model, a trained tokenizer with SmolVLM's special tokens, SmolVLM2's chat template, processor configs of
non-default values); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_fixtures import (
    CORPUS,
    MEAN,
    STD,
    clip_frames,
    first_batch,
    image_records,
    messages,
    needs_torchvision,
    row_ids,
    run_model,
    save_checkpoint,
    video_paths,
    video_records,
    write_records,
    write_video,
)
from PIL import Image
from references import TOL, max_abs_diff, skipped_step_errors, token_losses_4d

from regate_lightning import MLLMModule
from regate_lightning.data import sample_video, train_tokenizer
from regate_lightning.elision import forward_active
from regate_lightning.families import family_of, resolve
from regate_lightning.families.smolvlm import FAKE_TOKEN, GLOBAL_TOKEN, tile_tokens
from regate_lightning.keys import (
    FRAME_INDEX,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    PIXEL_ATTENTION_MASK,
    PIXEL_VALUES,
)
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy, temporal_change

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
    model = tiny.tiny_model("SmolVLMForConditionalGeneration")
    ids = {"image_token_id": "<image>"}
    return save_checkpoint(folder, model, smol_tokenizer(), ids, image=IMAGE_PROCESSOR, video=VIDEO_PROCESSOR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_smolvlm(tmp_path_factory.mktemp("smolvlm"))


IMAGE_HW, IMAGE_SEED = [(30, 90), (80, 40), (64, 60), (20, 24)], 3
"""The ``images`` fixture's (H, W): landscape, portrait, near square, small (upsized to the longest edge, then
split)."""


def smol_processor_text(config):
    """SmolVLMProcessor's own text rules (``replace_image_token``, ``replace_video_token``) on an instance with its
    token strings only, without its video processor (torchvision)."""
    processor = type("P", (), {})()
    processor.__dict__.update(
        image_seq_len=tile_tokens(config),
        image_token="<image>",
        fake_image_token=FAKE_TOKEN,
        global_image_token=GLOBAL_TOKEN,
    )
    return processor


# ------------------------------------------------------------------------------------------------
# The checkpoint's processors: tiles, frames and the text around them.


def test_images_equal_smolvlm_image_processor_and_processor_text(folder, images, tmp_path):
    """Tiles as SmolVLMImageProcessorPil splits them; input_ids as SmolVLMProcessor writes the prompt."""
    from transformers import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    module, batch, _ = first_batch(str(folder), image_records(tmp_path, images, question="What is it?"))
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
    processor = smol_processor_text(module.hf_model.config)
    conversation = messages("What is it?", "It is green.", ("image", None))
    text = tok.apply_chat_template(conversation, tokenize=False, chat_template=smol_template())
    for row in range(len(images)):
        prompt = SmolVLMProcessor.replace_image_token(processor, {"rows": hf["rows"], "cols": hf["cols"]}, row)
        expected = tok(text.replace("<image>", prompt), add_special_tokens=False)["input_ids"]
        assert row_ids(batch, row) == expected, row
    assert tok.decode(batch[LABELS][0][batch[LABELS][0] != IGNORE_INDEX]) == " It is green.<end_of_utterance>\n"
    run_model(module, batch)  # HF checks the token count


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
    processor = smol_processor_text(module.hf_model.config)
    conversation = messages("What moves?", "A square.", ("video", None))
    text = tok.apply_chat_template(conversation, tokenize=False, chat_template=smol_template())
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
        assert row_ids(batch, row) == expected, row
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
    run_model(module, batch)


@needs_torchvision
def test_builtin_video_rule_against_smolvlm_video_processor(folder, tmp_path):
    """Where torchvision imports: the built-in rule (PIL's LANCZOS) against SmolVLMVideoProcessor (torchvision's)."""
    transformers_side, builtin = video_paths(folder, "smolvlm")
    decoded = clip_frames(tmp_path / "c.mp4", 5, seed=2)
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
            "messages": messages("What moves?", "A square moves up.", ("image", images[2]), ("video", video)),
        },
        {"id": "video", "messages": messages("And?", "It is yellow.", ("video", video))},
        {"id": "image", "messages": messages("?", "There are three shapes.", ("image", images[0]))},
    ]
    module, batch, _ = first_batch(str(folder), write_records(tmp_path / "mixed.jsonl", records))
    return module, batch


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
    out, rows, loss_err, grad_err, _ = skipped_step_errors(model, batch, keep, resolve(model).inner.vision_model)
    tiles = batch[PIXEL_VALUES].shape[0]  # 10 tiles + 4 frames, 4 frames, 4 tiles
    assert out.skipped_steps == 2 + 2 + 1 and rows == [tiles - 5]
    assert loss_err < TOL and grad_err < TOL


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
