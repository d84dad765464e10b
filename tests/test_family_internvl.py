"""InternVL: what the family does beyond the generic rules, against transformers' own code.

``tests/test_elision.py`` runs ``InternVLForConditionalGeneration`` through the generic exactness tests (one
video of one-tile frames per row). Here: images cut into tiles by the checkpoint's image processor
(``GotOcr2ImageProcessorPil`` with ``crop_to_patches``, as ``InternVLProcessor`` calls it) and their ``<img>``
spans, equal to ``InternVLProcessor``'s; a video's ``Frame{i}:`` lines; images and videos in one batch elided
exactly, with tiles and frames whose every token is elided not encoded; the pixel shuffle's token -> region
layout; the data's videos told apart from images for visual-token elision; the teacher from the Qwen2 / Qwen3
text backbone (fit and score); and refusals of processor configs that do not fit the model.

``InternVLProcessor`` checks that its ``video_processor`` argument is a ``BaseVideoProcessor``, a class that needs
torchvision, which cannot be imported beside this machine's torch. The tests here build the real processor with
``video_processor=None`` after letting that one class check pass (``data_fixtures.processor_without_video``);
everything the processor then runs (its chat template, its ``replace_image_token`` / ``replace_video_token``, the
image processor) is transformers' own. The ``needs_torchvision`` tests run its video processor where torchvision
imports. The teacher (Qwen2 and Qwen3 text backbones) is tested in ``tests/test_families.py``, ``score`` on the
debug recipe in ``tests/test_score.py``.
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
    image_ids_equal_the_processors,
    image_records,
    media_records,
    messages,
    needs_torchvision,
    parity_diff,
    processor_without_video,
    row_ids,
    run_model,
    save_checkpoint,
    video_paths,
    video_records,
    write_images,
    write_video,
)
from references import TOL, max_abs_diff, skipped_step_errors, token_losses_4d

from regate_lightning.data import VisionSpec, train_tokenizer
from regate_lightning.elision import forward_active
from regate_lightning.families import family_of, resolve
from regate_lightning.families.base import runs
from regate_lightning.families.internvl import FAMILY, tiny_config
from regate_lightning.keys import ATTENTION_MASK, FRAME_INDEX, INPUT_IDS, LABELS, PIXEL_VALUES
from regate_lightning.targets import candidate_mask
from regate_lightning.testing import random_batch, tiny
from regate_lightning.testing.batches import media_layout
from regate_lightning.visual import VisualElisionPolicy, temporal_change

NAME = "InternVLForConditionalGeneration"
SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
NAMED = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}
"""The named special tokens of InternVL's ``-HF`` tokenizers, which ``InternVLProcessor`` reads."""
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
"""The chat template of the InternVL ``-HF`` checkpoints (transformers' conversion script writes it)."""


def internvl_tokenizer():
    """A trained byte-level BPE tokenizer with InternVL's special tokens, named as its checkpoints name them."""
    from transformers import PreTrainedTokenizerFast

    core = train_tokenizer(CORPUS, vocab_size=350, special_tokens=SPECIALS, chat_template=None).backend_tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=NAMED,
        chat_template=TEMPLATE,
    )


def save_internvl(folder: Path, max_patches: int = 6, **processor) -> Path:
    """A tiny InternVL with its tokenizer, template and image / video / processor configs (non-default values)."""
    tok = internvl_tokenizer()
    image = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "size": {"height": 32, "width": 32},
        "min_patches": 1,
        "max_patches": max_patches,
        "image_mean": MEAN,
        "image_std": STD,
    }
    video = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": 32, "width": 32}}
    return save_checkpoint(
        folder,
        tiny.tiny_model(NAME, image_token_id=tok.context_image_token_id),
        tok,
        image={**image, **processor},
        video={**video, "image_mean": STD, "image_std": MEAN},
        processor={"processor_class": "InternVLProcessor", "image_seq_length": 4},
    )


def internvl_processor(folder: Path, monkeypatch: pytest.MonkeyPatch):
    """transformers' ``InternVLProcessor`` of the folder, without a video processor (see the module docstring)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    return processor_without_video(
        monkeypatch,
        InternVLProcessor,
        GotOcr2ImageProcessorPil,
        folder,
        tokenizer=internvl_tokenizer(),
        image_seq_length=4,
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_internvl(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_model(NAME).eval()


# ------------------------------------------------------------------------------------------------
# The data side: tiles, spans and frame lines as transformers writes them.


def test_images_equal_internvl_processor(folder, images, tmp_path, monkeypatch):
    """Tiles of GotOcr2ImageProcessorPil with crop_to_patches (InternVLProcessor's call); input_ids equal its own."""
    module, batch, _ = first_batch(str(folder), image_records(tmp_path, images))
    processor = internvl_processor(folder, monkeypatch)
    hf = torch.cat([out["pixel_values"] for out in image_ids_equal_the_processors(processor, batch, images)])
    assert parity_diff(batch[PIXEL_VALUES], hf, "image internvl vs InternVLProcessor (GotOcr2ImageProcessorPil)") == 0
    counts = [s[2] for s in FAMILY._spans(module.hf_model.config, batch)]
    assert len(set(counts)) > 1 and max(counts) > 2, "the sizes choose different tilings, thumbnails included"
    assert batch[FRAME_INDEX].tolist() == [-1] * hf.shape[0], "every tile an image's"
    assert not FAMILY.media_positions(module.hf_model.config, batch, "video").any()
    run_model(module, batch)


def test_video_lines_equal_the_processors_replace_video_token(folder, tmp_path, monkeypatch):
    """A video's ``Frame{i}: <img>...</img>`` lines from the checkpoint's template, as the processor writes them."""
    videos = [write_video(tmp_path / "a.mp4", num_frames=6), write_video(tmp_path / "b.mp4", num_frames=6, seed=1)]
    module, batch, data = first_batch(str(folder), video_records(tmp_path, videos), num_frames=3)
    processor = internvl_processor(folder, monkeypatch)
    assert data.train_set.renderer.template_media == {"image": "<IMG_CONTEXT>", "video": "<video>"}
    text = processor.apply_chat_template(messages("What moves?", "A square.", ("video", None)), tokenize=False)
    lines = processor.replace_video_token({"pixel_values_videos": [torch.zeros(3, 3, 32, 32)]}, 0)
    expected = processor.tokenizer(text.replace("<video>", lines))["input_ids"]
    for row in range(2):
        assert row_ids(batch, row) == expected
    assert batch[FRAME_INDEX].tolist() == [0, 1, 2, 0, 1, 2] and batch[PIXEL_VALUES].shape == (6, 3, 32, 32)
    assert FAMILY.media_positions(module.hf_model.config, batch, "video").sum().item() == 2 * 3 * 4
    run_model(module, batch)


def test_builtin_path_writes_the_processors_spans():
    """A model without processor configs: one tile per image, the same ``<img>`` text."""
    model = tiny.tiny_model(NAME)
    spec = VisionSpec.from_model(model)
    assert spec.size == (32, 32) and spec.tile_tokens == 4 and spec.is_tiles
    image = spec.process_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    token = model.config.image_token_id
    assert image.expansion == ("<img>", *[token] * 4, "</img>") and image.num_tokens == 4
    video = spec.process_video(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert video.expansion == ("Frame1: <img>", *[token] * 4, "</img>\nFrame2: <img>", *[token] * 4, "</img>")
    assert video.tensors[PIXEL_VALUES].shape == (2, 3, 32, 32) and video.tensors[FRAME_INDEX].tolist() == [0, 1]
    assert media_layout(model, 2)[:2] == (token, video.num_tokens), "random batches count what the data counts"


def test_processor_configs_that_do_not_fit_are_refused(tmp_path):
    from regate_lightning import MLLMModule

    folder = save_internvl(tmp_path / "a", size={"height": 48, "width": 48})
    with pytest.raises(ValueError, match=r"image processor makes \(48, 48\) tiles but the vision tower takes 32 x 32"):
        VisionSpec.from_model(MLLMModule(model=str(folder)).hf_model)
    folder = save_internvl(tmp_path / "b")
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": 256}))
    with pytest.raises(ValueError, match="image_seq_length 256 differs from the model's 4 tokens per tile"):
        VisionSpec.from_model(MLLMModule(model=str(folder)).hf_model)
    with pytest.raises(ValueError, match=r"`frame_size` \[64, 64\].*tiles and frames are 32 x 32"):
        VisionSpec.from_model(tiny.tiny_model(NAME), size=(64, 64))


# ------------------------------------------------------------------------------------------------
# Exactness on the data's own batches: tiles, frames, both in one batch; steps not encoded.


@pytest.fixture(scope="module")
def mixed(folder, images, tmp_path_factory):
    """A batch from the data module: two tiled images and a three-frame video, and the model."""
    tmp = tmp_path_factory.mktemp("mixed")
    media = [("image", images[0]), ("image", images[1]), ("video", write_video(tmp / "v.mp4", num_frames=6))]
    module, batch, _ = first_batch(str(folder), media_records(tmp, media), num_frames=3)
    return module.hf_model.eval(), batch


def test_tiles_and_frames_elided_whole_are_not_encoded(mixed):
    """Every token of an image's first tile and of the video's middle frame elided: 2 fewer tower rows, exact."""
    model, batch = mixed
    config = model.config
    found = FAMILY._spans(config, batch)
    keep = torch.ones_like(batch[INPUT_IDS], dtype=torch.bool)
    keep[0, candidate_mask(batch[LABELS])[0].nonzero().flatten()[::2]] = False  # some answer tokens too
    first_image, frame = found[0], [s for s in found if s[3]][1]
    for row, start, _, _ in (first_image, frame):
        keep[row, start : start + 4] = False  # one tile: 4 tokens
    keep[first_image[0], first_image[1] + 5] = False  # and one token of the next tile (it stays encoded)
    out, rows, loss_err, grad_err, _ = skipped_step_errors(model, batch, keep, model.model.vision_tower)
    total = batch[PIXEL_VALUES].shape[0]
    assert out.skipped_steps == 2 and rows == [total - 2]
    print(f"max|grad diff| internvl/skipped tiles and frames: {grad_err:.2e}")
    assert loss_err < TOL and grad_err < TOL


def test_media_steps_are_the_towers_rows(mixed):
    model, batch = mixed
    steps = FAMILY.media_steps(model.config, batch, "image")
    assert sum(s.steps for s in steps) == batch[PIXEL_VALUES].shape[0]
    assert sum(s.num_placeholders for s in steps) == int((batch[INPUT_IDS] == model.config.image_token_id).sum())
    assert FAMILY.media_steps(model.config, batch, "video") == []
    per_row = FAMILY.media_per_row(model.config, batch[INPUT_IDS], "image")
    items = FAMILY.split_media(model.config, batch, "image", int(per_row.sum()))
    assert [i[PIXEL_VALUES].shape[0] for i in items] == [s.steps for s in steps]
    assert torch.equal(torch.cat([i[FRAME_INDEX] for i in items]), batch[FRAME_INDEX])


# ------------------------------------------------------------------------------------------------
# The token -> region layout and the data's videos.


def test_regions_are_the_pixel_shuffles_patches():
    """Each token's region holds exactly the pixels of the patches the model's pixel_shuffle merges into it."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    config = tiny_config(image_size=64)  # 8 x 8 patches, 4 x 4 tokens
    patch, grid = 8, 8
    ids = torch.arange(grid * grid, dtype=torch.float32).view(1, grid, grid, 1)
    merged = InternVLModel.pixel_shuffle(None, ids, scale_factor=config.downsample_ratio).reshape(-1, 4)
    pixels = torch.randn(1, 3, 64, 64)
    batch = {
        INPUT_IDS: torch.tensor([[1, *[config.image_token_id] * 16, 2]]),
        PIXEL_VALUES: pixels,
    }
    [regions] = FAMILY.media_regions(config, batch, "image")
    assert regions.steps == 1 and regions.tokens_per_step == 16
    for token, members in enumerate(merged.long().tolist()):
        crops = [
            pixels[0, :, (m // grid) * patch : (m // grid + 1) * patch, (m % grid) * patch : (m % grid + 1) * patch]
            for m in members
        ]
        expected = torch.cat([c.flatten() for c in crops]).sort().values
        assert torch.equal(regions.regions[0, token].sort().values, expected), token


def two_videos_and_an_image(model, frames=(3, 2)):
    """One row: an image of one tile, then two videos (``Frame`` lines), as the data writes them."""
    config = model.config
    token, per_tile = config.image_token_id, 4
    media = [FAMILY.random_media(config, n, torch.Generator().manual_seed(n)) for n in frames]
    ids = [1, 300, *[token] * per_tile, 301, 5]
    for m in media:
        ids += [*m.ids, 6]
    answer = list(range(10, 22))
    ids += [*answer, 2]
    input_ids = torch.tensor([ids])
    labels = torch.full_like(input_ids, -100)
    labels[0, -len(answer) - 1 :] = input_ids[0, -len(answer) - 1 :]
    image = torch.randn(1, 3, 32, 32)
    return {
        INPUT_IDS: input_ids,
        ATTENTION_MASK: torch.ones_like(input_ids),
        LABELS: labels,
        PIXEL_VALUES: torch.cat([image, *(m.tensors[PIXEL_VALUES] for m in media)]),
        FRAME_INDEX: torch.cat([torch.tensor([-1]), *(m.tensors[FRAME_INDEX] for m in media)]),
    }


def test_the_datas_videos_are_told_from_images(model):
    batch = two_videos_and_an_image(model)
    config = model.config
    video = FAMILY.media_positions(config, batch, "video")
    everything = FAMILY.media_positions(config, batch, "image")
    assert int(video.sum()) == 5 * 4 and int(everything.sum()) == 6 * 4 and not (video & ~everything).any()
    assert [r.steps for r in FAMILY.media_regions(config, batch, "image")] == [1] * 6, "the model's view: every span"
    regions = FAMILY.media_regions(config, batch, "video")
    assert [(r.steps, r.tokens_per_step) for r in regions] == [(3, 4), (2, 4)]
    assert torch.equal(regions[1].regions[0].flatten().sort().values, batch[PIXEL_VALUES][4].flatten().sort().values)
    change = temporal_change(regions[1])
    assert torch.isinf(change[:4]).all() and torch.isfinite(change[4:]).all(), "each video's first frame is a first"
    without = {k: v for k, v in batch.items() if k != FRAME_INDEX}
    assert not FAMILY.media_positions(config, without, "video").any(), "no frame index: every placeholder an image's"
    bad = {**batch, FRAME_INDEX: torch.tensor([-1, 0, 1, 2])}
    with pytest.raises(ValueError, match="`frame_index` has 4 entries but `pixel_values` has 6 tiles"):
        FAMILY.media_regions(config, bad, "video")


@pytest.mark.parametrize("selection", ["temporal", "uniform"])
def test_visual_elision_of_frames_equals_the_model(model, selection):
    """The policy elides video tokens only (the image stays); whole frames go unencoded; exact against 4-D."""
    batch = two_videos_and_an_image(model, frames=(4, 2))
    policy = VisualElisionPolicy(keep_ratio=0.5, selection=selection, warmup_steps=0, cycle_steps=2, full_steps=1)
    policy.setup(model)
    plan = policy.plan(batch, step=1)
    video = FAMILY.media_positions(model.config, batch, "video")
    image = FAMILY.media_positions(model.config, batch, "image") & ~video
    assert torch.equal(plan.candidates, video)
    assert int(plan.kept) == 12 and plan.keep_mask[image].all()
    with torch.no_grad():
        out = forward_active(model, batch, plan.keep_mask)
        masked = token_losses_4d(model, batch, plan.keep_mask)
    assert max_abs_diff(out.token_loss, masked) < TOL
    if selection == "uniform":  # frames 0, 2 of the first video and frame 0 of the second kept
        assert out.skipped_steps == 3


def test_unused_tower_layers_get_no_gradient():
    model = tiny.tiny_model(NAME)
    model.config.vision_feature_layer = -2
    unused = family_of(model).unused_vision_modules(resolve(model))
    assert unused == [model.model.vision_tower.encoder.layer[1]]
    out = forward_active(model, random_batch(model, batch_size=1, num_frames=1))
    out.loss.backward()
    assert all(p.grad is None for m in unused for p in m.parameters())
    assert all(p.grad is not None for p in model.model.vision_tower.encoder.layer[0].parameters())


# ------------------------------------------------------------------------------------------------
# Where torchvision imports: transformers' own video processor and the whole processor.


@needs_torchvision
def test_builtin_video_rules_equal_internvl_video_processor(folder, tmp_path):
    transformers_side, builtin = video_paths(folder, "internvl")
    for i, frames in enumerate((3, 5)):
        decoded = clip_frames(tmp_path / f"v{i}.mp4", frames, seed=i)
        a, b = transformers_side.video(decoded), builtin.video(decoded)
        assert parity_diff(a.values, b.values, "video internvl built-in vs InternVLVideoProcessor") <= 1e-5


def test_span_helper():
    assert runs(torch.tensor([[5, 5, 0], [0, 0, 5]]) == 5) == [(0, 0, 2), (1, 2, 1)]  # InternVL's <img> spans


def test_the_media_gap_swaps_images_of_equal_tiles(folder, tmp_path):
    """Rows with one image of the same tile count swap images (the video rows' frames are no single item)."""
    from regate_lightning.reliance import swap_media

    paths = write_images(tmp_path, [(60, 90), (40, 40), (62, 88)], seed=0)
    module, batch, _ = first_batch(str(folder), image_records(tmp_path, paths))
    assert [s[2] for s in FAMILY._spans(module.hf_model.config, batch)] == [7, 1, 7]  # 3 x 2 tiles + thumbnail
    [swap] = swap_media(batch, resolve(module.hf_model))
    assert swap.rows.tolist() == [0, 2] and not torch.equal(swap.own[PIXEL_VALUES], swap.swapped[PIXEL_VALUES])
    run_model(module, swap.swapped)
