"""LLaVA-OneVision: what the family does beyond the LLaVA rules, against transformers' own code.

``tests/test_elision.py`` runs ``LlavaOnevisionForConditionalGeneration`` through the generic exactness tests (one
video per row, its newline token included). Here: anyres-max images through the checkpoint's
``LlavaOnevisionImageProcessorPil`` and counted by the model's own ``pack_image_features``, equal to
``LlavaOnevisionProcessor``'s counts and ids; the video's newline token as the media's tail (steps, regions,
scores, skipped frames); images and videos in one batch elided exactly, with whole images and frames not encoded;
the pooled token -> region layout against the model's own ``apply_pooling``. The teacher from the Qwen2 text
backbone is tested in ``tests/test_families.py``, ``score`` on the debug recipe in ``tests/test_score.py``.

``LlavaOnevisionProcessor`` checks that its ``video_processor`` argument is a ``BaseVideoProcessor``, a class that
needs torchvision, which cannot be imported beside this machine's torch: the processor is built with
``video_processor=None`` after letting that one class check pass (``data_fixtures.processor_without_video``);
everything it then runs is transformers' own. The ``needs_torchvision`` test runs its video processor where
torchvision imports.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from data_fixtures import (
    MEAN,
    STD,
    clip_frames,
    first_batch,
    image_ids_equal_the_processors,
    image_records,
    media_records,
    messages,
    needs_torchvision,
    parity_diff,
    processor_without_video,
    run_model,
    save_checkpoint,
    tokenizer,
    video_paths,
    video_records,
    write_images,
    write_video,
)
from references import TOL, max_abs_diff, skipped_step_errors, token_losses_4d, tower_rows

from regate_lightning.elision import forward_active
from regate_lightning.families import resolve
from regate_lightning.families.llava_onevision import FAMILY, image_tokens, pool_windows
from regate_lightning.keys import ATTENTION_MASK, IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES, PIXEL_VALUES_VIDEOS
from regate_lightning.targets import candidate_mask
from regate_lightning.testing import random_batch, tiny
from regate_lightning.testing.batches import media_layout
from regate_lightning.visual import TemporalSelection, UniformSelection, VisualElisionPolicy, temporal_change

NAME = "LlavaOnevisionForConditionalGeneration"
ASPECT = "anyres_max_2"
"""A small ``max_num_patches``: the tiny images' larger tilings are shrunk, as anyres_max_9 shrinks large ones."""
PINPOINTS = [[32 * r, 32 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""A template written like llava-onevision-hf's: per turn its images, then its videos, then its text."""


def save_onevision(folder: Path) -> Path:
    """A tiny LLaVA-OneVision whose placeholders are the test tokenizer's, with image and video processor configs."""
    tok = tokenizer()
    model = tiny.tiny_model(
        NAME,
        vision_aspect_ratio=ASPECT,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
    )
    image = {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "size": {"height": 32, "width": 32},
        "image_grid_pinpoints": PINPOINTS,
        "image_mean": MEAN,
        "image_std": STD,
    }
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32}}
    video = {**video, "image_mean": STD, "image_std": MEAN}
    return save_checkpoint(folder, model, tok, image=image, video=video, chat_template=TEMPLATE)


def onevision_processor(folder: Path, monkeypatch: pytest.MonkeyPatch, aspect: str = ASPECT):
    """transformers' ``LlavaOnevisionProcessor`` of the folder, without a video processor (module docstring)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    return processor_without_video(
        monkeypatch,
        LlavaOnevisionProcessor,
        LlavaOnevisionImageProcessorPil,
        folder,
        tokenizer=tokenizer(),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_onevision(tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_model(NAME).eval()


# ------------------------------------------------------------------------------------------------
# The data side: anyres-max tiles and counts, the video's newline, as transformers writes them.


def test_images_equal_llava_onevision_processor(folder, images, tmp_path, monkeypatch):
    """Tiles of LlavaOnevisionImageProcessorPil; input_ids (the counts) equal LlavaOnevisionProcessor's."""
    module, batch, _ = first_batch(str(folder), image_records(tmp_path, images))
    processor = onevision_processor(folder, monkeypatch)
    tiles = []
    for row, expected in enumerate(image_ids_equal_the_processors(processor, batch, images)):
        assert torch.equal(batch[IMAGE_SIZES][row], expected["image_sizes"][0])
        tiles.append(expected["pixel_values"][0])  # [most tiles, 3, S, S]: this image's, then zeros
    items = FAMILY.split_media(module.hf_model.config, batch, "image", len(images))
    hf = torch.cat([t[: len(item[PIXEL_VALUES])] for t, item in zip(tiles, items, strict=True)])
    assert parity_diff(batch[PIXEL_VALUES], hf, "image llava_onevision vs LlavaOnevisionImageProcessorPil") == 0
    assert len({len(item[PIXEL_VALUES]) for item in items}) > 1, "the sizes choose different tilings"
    run_model(module, batch)


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_the_models_count_is_the_processors(folder, monkeypatch, aspect):
    """pack_image_features' count (on meta tensors) against the processor's own formula, shrunk or not."""
    processor = onevision_processor(folder, monkeypatch, aspect)
    for height, width in [(20, 24), (33, 100), (60, 90), (128, 64), (200, 50), (96, 96), (31, 97), (300, 290)]:
        ours = image_tokens((height, width), PINPOINTS, 32, 8, aspect)
        assert ours == processor._get_number_of_features(height, width, 32, 32), (height, width)


def test_video_count_and_text_equal_the_processors(folder, tmp_path, monkeypatch):
    """A video: ``T`` frames of 4 pooled tokens and one newline, the template's text as the processor expands it."""
    videos = [write_video(tmp_path / "a.mp4", num_frames=6)]
    module, batch, _ = first_batch(str(folder), video_records(tmp_path, videos), num_frames=3)
    processor = onevision_processor(folder, monkeypatch)
    text = processor.apply_chat_template(messages("What moves?", "A square.", ("video", None)), tokenize=False)
    expanded = processor.replace_video_token({"pixel_values_videos": [torch.zeros(3, 3, 32, 32)]}, 0)
    assert expanded.count("<video>") == 3 * 4 + 1
    assert batch[INPUT_IDS][0].tolist() == processor.tokenizer(text.replace("<video>", expanded))["input_ids"]
    assert batch[PIXEL_VALUES_VIDEOS].shape == (1, 3, 3, 32, 32)
    run_model(module, batch)


def test_images_need_the_checkpoints_processor(model):
    from regate_lightning.data import VisionSpec

    spec = VisionSpec.from_model(model)
    assert "anyres-max tiling" in spec.accepts("image") and spec.tokens_per_video == 1
    assert spec.process_video(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).num_tokens == 2 * 4 + 1
    assert media_layout(model, 2)[:2] == (model.config.video_token_id, 2 * 4 + 1), "random batches count the same"


# ------------------------------------------------------------------------------------------------
# The newline: a tail that belongs to no frame.


def test_the_newline_is_each_videos_tail(model):
    batch = random_batch(model, batch_size=2, num_frames=4)
    steps = FAMILY.media_steps(model.config, batch, "video")
    regions = FAMILY.media_regions(model.config, batch, "video")
    assert [(s.steps, s.tokens_per_step, s.tail) for s in steps] == [(4, 4, 1)] * 2
    assert [(r.steps, r.tokens_per_step, r.tail) for r in regions] == [(4, 4, 1)] * 2
    assert sum(s.num_placeholders for s in steps) == int((batch[INPUT_IDS] == model.config.video_token_id).sum())
    change = temporal_change(regions[0])
    assert change.shape == (17,) and torch.isinf(change[-1]) and torch.isinf(change[:4]).all()
    frames = TemporalSelection(whole_frames=True).score(regions[0])
    assert torch.isinf(frames[-1]) and frames[:16].view(4, 4).unique(dim=1).shape[1] == 1
    assert torch.isinf(UniformSelection().score(regions[0])[-1]), "the newline is kept first"


@pytest.mark.parametrize("selection", ["uniform", "temporal_frames"])
def test_whole_frames_elided_are_not_encoded_and_the_newline_stays(model, selection):
    """Half the frames elided whole: the tower encodes the other half; losses and gradients equal the 4-D run."""
    batch = random_batch(model, batch_size=2, num_frames=4, ragged=True, seed=4)
    policy = VisualElisionPolicy(keep_ratio=0.5, selection=selection, warmup_steps=0, cycle_steps=2, full_steps=1)
    policy.setup(model)
    keep = policy.plan(batch, step=1).keep_mask
    newline = (batch[INPUT_IDS] == model.config.video_token_id).cumsum(1) == 17
    assert keep[newline].all(), "scored selections keep the newline first"
    out, rows, loss_err, grad_err, _ = skipped_step_errors(model, batch, keep, model.model.vision_tower)
    assert out.skipped_steps == 4 and rows == [4]
    print(f"max|grad diff| llava_onevision/skipped frames ({selection}): {grad_err:.2e}")
    assert loss_err < TOL and grad_err < TOL


def test_an_elided_newline_or_video_equals_the_model(model):
    """The newline alone elided; then every token of a video but its newline (the tower still encodes one frame)."""
    batch = random_batch(model, batch_size=2, num_frames=2, seed=6)
    video = batch[INPUT_IDS] == model.config.video_token_id
    newline = video & (video.cumsum(1) == 9)
    for keep, skipped in ((~newline, 0), (~(video & ~newline), 3)):
        with torch.no_grad():
            out = forward_active(model, batch, keep)
            masked = token_losses_4d(model, batch, keep)
        assert out.skipped_steps == skipped and max_abs_diff(out.token_loss, masked) < TOL


# ------------------------------------------------------------------------------------------------
# Images and videos in one batch, from the data module: whole images and frames not encoded.


def test_images_and_frames_elided_whole_are_not_encoded(folder, images, tmp_path):
    media = [("image", images[0]), ("image", images[1]), ("video", write_video(tmp_path / "v.mp4", num_frames=6))]
    module, batch, _ = first_batch(str(folder), media_records(tmp_path, media), num_frames=3)
    model = module.hf_model.eval()
    # row 0: every token of its image elided; row 2: the video's second frame elided; some answer tokens too
    keep = torch.ones_like(batch[INPUT_IDS], dtype=torch.bool)
    keep[0] &= batch[INPUT_IDS][0] != model.config.image_token_id
    frame = (batch[INPUT_IDS][2] == model.config.video_token_id).nonzero().flatten()[4:8]
    keep[2, frame] = False
    keep[1, candidate_mask(batch[LABELS])[1].nonzero().flatten()[::2]] = False
    tiles = [s.rows_per_step for s in FAMILY.media_steps(model.config, batch, "image")]
    with tower_rows(model.model.vision_tower) as rows, torch.no_grad():
        out = forward_active(model, batch, keep)
    assert out.skipped_steps == 2 and rows == [tiles[1], 2]
    with torch.no_grad():
        assert max_abs_diff(out.token_loss, token_losses_4d(model, batch, keep)) < TOL


# ------------------------------------------------------------------------------------------------
# The pooled token -> region layout, against the model's own pooling.


@pytest.mark.parametrize("grid", [4, 5, 27])  # the tiny tower, an odd grid, SigLIP 384 / 14
def test_pool_windows_cover_the_patches_the_model_pools(grid):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    patch = 8
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=grid * patch, patch_size=patch))
    )
    one_hot = torch.eye(grid * grid).unsqueeze(0)  # feature of patch p = e_p
    weights = LlavaOnevisionModel.apply_pooling(fake, one_hot)[0]  # [pooled tokens, patches]
    starts = pool_windows(grid)
    for token, row in enumerate(weights):
        y, x = starts[token // len(starts)], starts[token % len(starts)]
        window = {(y + i) * grid + x + j for i in (0, 1) for j in (0, 1)}
        used = set(row.nonzero().flatten().tolist())
        assert used <= window, (token, used, window)
        if grid % 2 == 0:
            assert used == window


def test_regions_are_the_pooled_windows_pixels(model):
    batch = random_batch(model, batch_size=1, num_frames=2)
    [regions] = FAMILY.media_regions(model.config, batch, "video")
    pixels = batch[PIXEL_VALUES_VIDEOS][0]
    for t in range(2):
        for token in range(4):
            y, x = 16 * (token // 2), 16 * (token % 2)
            assert torch.equal(regions.regions[t, token], pixels[t, :, y : y + 16, x : x + 16].flatten())
    with pytest.raises(ValueError, match="anyres image tokens have no pixel region each"):
        FAMILY.media_regions(model.config, {PIXEL_VALUES: torch.zeros(2, 3, 32, 32)}, "image")


# ------------------------------------------------------------------------------------------------
# Where torchvision imports: transformers' own video processor.


@needs_torchvision
def test_builtin_video_rules_equal_llava_onevision_video_processor(folder, tmp_path):
    transformers_side, builtin = video_paths(folder, "llava_onevision")
    for i, frames in enumerate((3, 5)):
        decoded = clip_frames(tmp_path / f"v{i}.mp4", frames, seed=i)
        a, b = transformers_side.video(decoded), builtin.video(decoded)
        assert parity_diff(a.values, b.values, "video llava_onevision built-in vs LlavaOnevisionVideoProcessor") <= 1e-5


def test_the_media_gap_swaps_only_images_of_one_size(folder, tmp_path):
    """An anyres image's count follows from its size: 60 x 90 and 50 x 90 both make 7 tiles but 44 and 52 tokens,
    so only the two images of one size swap; the swapped rows run (the model checks the counts)."""
    from regate_lightning.reliance import swap_media

    paths = write_images(tmp_path, [(60, 90), (50, 90), (60, 90)], seed=0)
    module, batch, _ = first_batch(str(folder), image_records(tmp_path, paths))
    assert FAMILY.image_tiles(module.hf_model.config, batch) == [7, 7, 7]
    [swap] = swap_media(batch, resolve(module.hf_model))
    assert swap.kind == "image" and swap.rows.tolist() == [0, 2]
    assert not torch.equal(swap.own[PIXEL_VALUES], swap.swapped[PIXEL_VALUES])
    run_model(module, swap.swapped)


def test_clips_of_different_lengths_are_refused_naming_num_frames():
    """One newline per entry of pixel_values_videos: clips cannot be joined frame-wise (frames_alone is off)."""
    from regate_lightning.data.vision import join_media

    assert not FAMILY.frames_alone
    clips = [torch.zeros(1, 2, 3, 32, 32), torch.zeros(1, 3, 3, 32, 32)]
    with pytest.raises(ValueError, match=r"of \[2, 3\] frames.*sample a fixed `num_frames`"):
        join_media(PIXEL_VALUES_VIDEOS, clips, ())


def test_a_multi_image_sample_with_batch_num_images(model):
    """The model's multi-image mode (``batch_num_images``): one tile and one newline per image; an image elided whole
    is not encoded, and the step equals the unmodified model."""
    config = model.config
    count = image_tokens((60, 90), PINPOINTS, 32, 8, config.vision_aspect_ratio, tiles=1)
    assert count == 16 + 1
    ids = [1, *[config.image_token_id] * count, 5, *[config.image_token_id] * count, *range(10, 30), 2]
    input_ids = torch.tensor([ids])
    labels = torch.full_like(input_ids, -100)
    labels[0, -21:] = input_ids[0, -21:]
    batch = {
        INPUT_IDS: input_ids,
        ATTENTION_MASK: torch.ones_like(input_ids),
        LABELS: labels,
        PIXEL_VALUES: torch.randn(2, 3, 32, 32),
        IMAGE_SIZES: torch.tensor([[60, 90], [50, 90]]),
        "batch_num_images": torch.tensor([2]),
    }
    steps = FAMILY.media_steps(config, batch, "image")
    assert [(s.steps, s.tokens_per_step, s.rows_per_step) for s in steps] == [(1, 17, 1)] * 2
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[0, 1 : 1 + count] = False
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        assert out.skipped_steps == 1
        assert max_abs_diff(out.token_loss, token_losses_4d(model, batch, keep)) < TOL
