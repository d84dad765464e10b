"""Qwen3-VL and Qwen3-VL-MoE: what the family does beyond the Qwen-VL rules, against transformers' own code.

``tests/test_elision.py`` runs both classes through the generic exactness tests. Here: DeepStack features on
elided steps (and the refusal of a family that leaves them at the full length), images and videos in one row,
temporal patches skipped in the tower, the teacher from the text backbone, visual-token elision on the
timestamped layout, and the data side: the checkpoint's image processor (patch 16), the built-in copy of
``Qwen3VLVideoProcessor``'s rules, and the timestamp text of ``Qwen3VLProcessor``. The MoE load-balancing loss over
the kept tokens is tested in ``tests/test_router_loss.py``, ``score`` on the debug recipe in ``tests/test_score.py``.

``Qwen3VLProcessor`` cannot be built here: its video processor needs torchvision, which cannot be imported beside
this machine's torch. The text tests therefore call the processor's own ``replace_video_token``,
``_calculate_timestamps`` and ``get_text_with_replacements`` on an instance made without ``__init__`` (the token
strings its ``__init__`` sets, the video processor's class defaults for merge and temporal patch sizes); the
tests marked ``needs_torchvision`` build the real processor and run where torchvision imports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from data_fixtures import (
    CORPUS,
    MEAN,
    STD,
    first_batch,
    image_records,
    messages,
    needs_torchvision,
    parity_diff,
    row_ids,
    run_model,
    save_checkpoint,
    video_paths,
    video_records,
    write_images,
    write_video,
)
from PIL import Image
from references import TOL, max_abs_diff, partial_mask, skipped_step_errors, token_losses_4d
from test_processors import QWEN_IDS, QWEN_MEDIA, QWEN_SPECIALS

import regate_lightning.families as registry
from regate_lightning.data import FrameSampling, VisionSpec, sample_video, train_tokenizer
from regate_lightning.data.processors import (
    VIDEO_PROCESSOR_DEFAULTS,
    CheckpointProcessor,
    VideoSettings,
    frames_for_video,
)
from regate_lightning.elision import forward_active
from regate_lightning.families import FAMILIES, family_of, resolve, vision_parts
from regate_lightning.families.qwen2_vl import QwenVLFamily
from regate_lightning.families.qwen3_vl import FAMILY, temporal_timestamps
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, LABELS, MM_TOKEN_TYPE_IDS, VIDEO_TYPE
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import Teacher, text_mask
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import VisualElisionPolicy

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = "Qwen3VLForConditionalGeneration"
QWEN3_MOE = "Qwen3VLMoeForConditionalGeneration"
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A chat template written like the Qwen3-VL checkpoints': ``<|im_start|>`` turns without a default system turn,
an image as vision start, image pad, vision end, a video as vision start, video pad, vision end."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny.tiny_model(QWEN3).eval()


# ------------------------------------------------------------------------------------------------
# The engine: DeepStack, images and videos together, skipped temporal patches, the refusal.


def image_and_video_batch(model, seed: int = 0) -> dict:
    """Two rows, each an image and a video (the model joins their DeepStack features), ragged answers."""
    family, config = resolve(model).family, model.config
    video = random_batch(model, batch_size=2, num_frames=4, seed=seed, ragged=True)
    gen = torch.Generator().manual_seed(seed + 1)
    grid = (1, 4, 6)  # one image of 4 x 6 patches: 6 tokens
    image = int(config.image_token_id)
    start, end = family.marker_token_ids(config)
    block = [start, *[image] * 6, end]
    rows = video[INPUT_IDS].shape[0]
    pad = torch.zeros(rows, len(block), dtype=torch.long)
    ids = torch.cat([video[INPUT_IDS][:, :1], torch.tensor([block] * rows), video[INPUT_IDS][:, 1:]], 1)
    block_types = torch.tensor([[0, *[1] * 6, 0]] * rows)
    types = torch.cat([video[MM_TOKEN_TYPE_IDS][:, :1], block_types, video[MM_TOKEN_TYPE_IDS][:, 1:]], 1)
    labels = torch.cat([video[LABELS][:, :1], torch.full_like(pad, -100), video[LABELS][:, 1:]], 1)
    attention = torch.cat([video[ATTENTION_MASK][:, :1], torch.ones_like(pad), video[ATTENTION_MASK][:, 1:]], 1)
    patch = int(config.vision_config.patch_size)
    return {
        **video,
        INPUT_IDS: ids,
        MM_TOKEN_TYPE_IDS: types,
        LABELS: labels,
        ATTENTION_MASK: attention,
        "pixel_values": torch.randn(rows * 24, 3 * 2 * patch * patch, generator=gen),
        "image_grid_thw": torch.tensor([grid] * rows),
    }


def test_deepstack_features_follow_the_kept_positions(model):
    """Visual and answer tokens elided in rows with an image and a video: the 4-D-mask full run, exactly."""
    batch = image_and_video_batch(model)
    keep = partial_mask(batch, equal_rows=False)
    visual = (batch[INPUT_IDS] == model.config.image_token_id) | (batch[INPUT_IDS] == model.config.video_token_id)
    keep[visual.nonzero()[::3].unbind(1)] = False
    seen: dict = {}

    def grab(module, args, kwargs, output):  # a forward hook sees the arguments the decoder ran with
        seen.update(kwargs)

    handle = resolve(model).decoder.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = forward_active(model, batch, keep)
    finally:
        handle.remove()
    with torch.no_grad():
        reference = token_losses_4d(model, batch, keep)
    assert max_abs_diff(out.token_loss, reference) < TOL
    active = keep & batch[ATTENTION_MASK].bool()
    assert seen["visual_pos_masks"].shape == (2, out.decoder_length)
    assert int(seen["visual_pos_masks"].sum()) == int((visual & active).sum())
    depth = len(model.config.vision_config.deepstack_visual_indexes)
    assert [f.shape[0] for f in seen["deepstack_visual_embeds"]] == [int((visual & active).sum())] * depth


def test_text_only_rows_elide_exactly(model):
    """A batch without media: no DeepStack inputs, 1-D positions made 3-row by the engine, as the decoder would."""
    batch = random_batch(tiny.tiny_llama(), batch_size=2, ragged=True)
    batch[MM_TOKEN_TYPE_IDS] = torch.zeros_like(batch[INPUT_IDS])
    keep = partial_mask(batch, equal_rows=False)
    with torch.no_grad():
        assert max_abs_diff(forward_active(model, batch, keep).token_loss, token_losses_4d(model, batch, keep)) < TOL


def test_a_family_that_leaves_deepstack_at_full_length_is_refused(model, monkeypatch):
    """Without the family's ``shorten_decoder_inputs`` the engine refuses ``visual_pos_masks`` by name (a naive
    registry entry met HF's ``IndexError: The shape of the mask [2, 34] ... does not match``)."""
    fields = {f.name: getattr(FAMILY, f.name) for f in dataclasses.fields(FAMILY)}
    naive = QwenVLFamily(**fields)
    monkeypatch.setitem(registry._BY_CLASS, QWEN3, naive)
    assert resolve(model).family is naive
    batch = random_batch(model, batch_size=2, num_frames=2)
    refusal = r"passes `visual_pos_masks` over the full sequence.*Family.shorten_decoder_inputs"
    with pytest.raises(RuntimeError, match=refusal):
        forward_active(model, batch, partial_mask(batch, equal_rows=True))


def test_whole_temporal_patches_elided_are_not_encoded(model):
    """Every other temporal patch elided: the tower encodes the rest only; losses and gradients are exact."""
    batch = random_batch(model, batch_size=2, num_frames=8, seed=3, ragged=True)
    policy = VisualElisionPolicy(keep_ratio=0.5, selection="uniform", warmup_steps=0, cycle_steps=2, full_steps=1)
    policy.setup(model)
    keep = policy.plan(batch, step=1).keep_mask
    out, rows, loss_err, grad_err, trained = skipped_step_errors(model, batch, keep, resolve(model).inner.visual)
    assert out.skipped_steps == 4  # 2 of each video's 4 temporal patches
    assert rows == [batch["pixel_values_videos"].shape[0] // 2], "the tower encoded half of the patch rows"
    assert any("deepstack_merger_list" in k for k in trained)
    assert loss_err < TOL and grad_err < TOL


def test_a_video_is_one_item_although_its_patches_are_separate_runs(model):
    batch = random_batch(model, batch_size=3, num_frames=6)
    family = family_of(model)
    pads = batch[INPUT_IDS] == model.config.video_token_id
    from regate_lightning.families.base import count_runs

    assert count_runs(pads).tolist() == [3, 3, 3]  # three temporal patches each
    assert family.media_per_row(model.config, batch[INPUT_IDS], "video").tolist() == [1, 1, 1]
    assert len(family.split_media(model.config, batch, "video", 3)) == 3
    two = torch.cat([batch[INPUT_IDS][:1], batch[INPUT_IDS][:1]], 1)  # two videos in one row
    assert family.media_per_row(model.config, two, "video").tolist() == [2]
    bare = torch.tensor([[5, *[model.config.video_token_id] * 4, 6, model.config.video_token_id, 7]])
    assert family.media_per_row(model.config, bare, "video").tolist() == [2]  # no markers: by runs


def test_the_media_gap_swaps_whole_videos(model):
    """The media gap (reliance.py) swaps each row's one video, all its temporal patches, with the next row's."""
    from regate_lightning.reliance import swap_media

    batch = random_batch(model, batch_size=3, num_frames=4, seed=1)
    (swap,) = swap_media(batch, resolve(model))
    assert swap.rows.tolist() == [0, 1, 2]
    rows = batch["pixel_values_videos"].chunk(3)
    assert torch.equal(swap.swapped["pixel_values_videos"], torch.cat([rows[1], rows[2], rows[0]]))
    with torch.no_grad():
        assert torch.isfinite(forward_active(model, swap.swapped).loss)


def test_tower_and_projector_parts():
    tower, projector = vision_parts(resolve(tiny.tiny_model(QWEN3)))
    names = {type(m).__name__ for m in projector}
    assert names == {"Qwen3VLVisionPatchMerger", "ModuleList"}  # the merger and the DeepStack mergers
    assert {type(m).__name__ for m in tower} >= {"Qwen3VLVisionPatchEmbed", "ModuleList"}


# ------------------------------------------------------------------------------------------------
# The teacher: the student's text backbone, without DeepStack, on the text positions; fit and score.


def test_teacher_is_the_text_backbone_on_the_text_positions(model):
    batch = random_batch(model, batch_size=2, num_frames=4, ragged=True, seed=5)
    text = text_mask(resolve(model).media_token_ids, batch[INPUT_IDS], batch[ATTENTION_MASK])
    candidates = candidate_mask(batch[LABELS]) & text
    ours = Teacher.from_student(model).reference_losses(batch[INPUT_IDS], batch[LABELS], text, candidates)
    backbone = model.model.language_model  # a Qwen3VLTextModel; called without DeepStack inputs
    targets = shift_targets(batch[LABELS])
    for row in range(2):
        idx = text[row].nonzero().flatten()
        with torch.no_grad():
            hidden = backbone(input_ids=batch[INPUT_IDS][row : row + 1, idx], position_ids=idx[None]).last_hidden_state
            losses = torch.nn.functional.cross_entropy(model.lm_head(hidden[0]), targets[row, idx], reduction="none")
        wanted = candidates[row, idx]
        assert torch.allclose(ours[row, idx[wanted]], losses[wanted], atol=1e-5)
        assert ours[row, ~candidates[row]].isnan().all()


# ------------------------------------------------------------------------------------------------
# Visual-token elision on the timestamped layout.


@pytest.mark.parametrize("selection", ["temporal", "temporal_frames"])
def test_visual_elision_on_the_timestamped_layout(model, selection):
    batch = random_batch(model, batch_size=3, num_frames=6, ragged=True, seed=2)
    policy = VisualElisionPolicy(keep_ratio=0.4, selection=selection, warmup_steps=0, cycle_steps=2, full_steps=1)
    policy.setup(model)
    plan = policy.plan(batch, step=1)
    video = batch[INPUT_IDS] == model.config.video_token_id
    assert torch.equal(plan.candidates, video)  # the timestamps and markers are text, never candidates
    kept = (plan.keep_mask & video).sum(1)
    assert kept.tolist() == [int(np.ceil(0.4 * int(n))) for n in video.sum(1)]
    with torch.no_grad():
        out = forward_active(model, batch, plan.keep_mask)
        reference = token_losses_4d(model, batch, plan.keep_mask)
    assert max_abs_diff(out.token_loss, reference) < TOL
    if selection == "temporal_frames":
        assert out.skipped_steps > 0


def test_regions_are_the_pixels_of_each_token():
    model = tiny.tiny_model(QWEN3)
    spec = VisionSpec.from_model(model)
    frames = torch.randint(0, 256, (4, 3, *spec.size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    media = spec.process_video(frames)
    [regions] = family_of(model).media_regions(model.config, media.tensors, "video")
    from regate_lightning.data.video import normalize

    pixels = normalize(frames, spec.mean, spec.std)
    cell = 2 * int(model.config.vision_config.patch_size)
    for t in range(2):
        clip = pixels[2 * t : 2 * t + 2]
        for n in range(regions.tokens_per_step):
            i, j = divmod(n, spec.size[1] // cell)
            crop = clip[..., i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
            assert torch.equal(regions.regions[t, n].sort().values, crop.flatten().sort().values)


# ------------------------------------------------------------------------------------------------
# The data side: the checkpoint's processors, the timestamps, the chat template.


def qwen3_tokenizer():
    specials = QWEN_SPECIALS + QWEN_MEDIA
    return train_tokenizer(CORPUS, vocab_size=350, special_tokens=specials, chat_template=QWEN3_TEMPLATE)


IMAGE_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 16,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 4096, "longest_edge": 16384},
    "image_mean": MEAN,
    "image_std": STD,
}
VIDEO_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "patch_size": 16,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 4096, "longest_edge": 65536},
    "image_mean": STD,
    "image_std": MEAN,
    "fps": 2,
    "min_frames": 4,
    "max_frames": 8,
}
"""Processor configs laid out like the Qwen3-VL checkpoints' (patch 16, sizes as pixel budgets), with other
values, so that the test sees them applied."""


def save_qwen3(folder: Path, factory: str = QWEN3) -> Path:
    model = tiny.tiny_model(factory)
    return save_checkpoint(folder, model, qwen3_tokenizer(), QWEN_IDS, image=IMAGE_CONFIG, video=VIDEO_CONFIG)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> Path:
    return save_qwen3(tmp_path_factory.mktemp("qwen3"))


CLIPS = [(12, 4.0, (64, 64)), (7, 3.0, (48, 80)), (10, 5.0, (96, 64))]
"""(frames, fps, (H, W)) of the test videos: 6 frames sampled at 2 fps; 5 (an odd count: the last repeats in
the last temporal patch); 4 (the checkpoint's min_frames)."""
VIDEO_QUESTION = messages("What moves?", "It is red.", ("video", None))
"""The conversation of the test videos' records, as a processor's chat template is given it."""


def write_clips(folder: Path, name: str = "c") -> list[Path]:
    """The :data:`CLIPS` videos."""
    return [write_video(folder / f"{name}{i}.mp4", n, fps, i, size) for i, (n, fps, size) in enumerate(CLIPS)]


def clip_records(folder: Path) -> tuple[list[Path], Path]:
    """The :data:`CLIPS` videos and their records (LLaVA's format)."""
    paths = write_clips(folder)
    return paths, video_records(folder, paths, answer="It is red.")


def sampled_clip(path: Path):
    """The checkpoint's frames of a clip (8 at most, 2 per second, 4 at least) and their ``VideoMetadata``, with the
    source fps as transformers' PyAV reader takes it."""
    from transformers.video_utils import VideoMetadata

    sampled = sample_video(path, 8, "fps", 2.0, min_frames=4)
    with av.open(str(path)) as container:
        source_fps = float(container.streams.video[0].average_rate)
    metadata = VideoMetadata(total_num_frames=sampled.num_source_frames, fps=source_fps)
    metadata.frames_indices = np.array(sampled.indices)
    return sampled, metadata


def processor_without_init():
    """``Qwen3VLProcessor`` without its constructor (see the module docstring): its own methods, its token strings."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    processor = object.__new__(Qwen3VLProcessor)
    processor.video_processor = object.__new__(Qwen3VLVideoProcessor)  # merge_size, temporal_patch_size: class defaults
    processor.image_token, processor.video_token = QWEN_MEDIA
    processor.vision_start_token, processor.vision_end_token = QWEN_SPECIALS[3:]
    return processor


def test_timestamps_equal_the_processors():
    from transformers import Qwen3VLProcessor

    for indices, fps in (([0, 2, 4, 6, 8, 10], 4.0), ([0, 1, 3, 4, 6], 3.0), ([0, 3, 7], 29.97), ([5], 24.0)):
        hf = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
        assert temporal_timestamps([i / fps for i in indices], 2) == hf


def test_video_ids_equal_the_processors_text(qwen3_folder, tmp_path):
    """The checkpoint's chat template, then the processor's replacement of each video pad: our input ids."""
    assert_video_ids_equal_the_processors(qwen3_folder, tmp_path)


def assert_video_ids_equal_the_processors(folder: Path, tmp_path: Path) -> None:
    """A checkpoint folder of a Qwen3-VL-processed family (Qwen3-VL, Qwen3.5): the data's input ids of three clips
    equal the chat template's text with each video pad replaced by ``Qwen3VLProcessor``, and the model runs them."""
    paths, records = clip_records(tmp_path)
    module, batch, data = first_batch(str(folder), records)
    assert data.train_set.renderer.template_media == {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    assert data.frames == FrameSampling(num_frames=8, sample="fps", fps=2.0, min_frames=4)
    processor = processor_without_init()
    tok = qwen3_tokenizer()
    text = tok.apply_chat_template(VIDEO_QUESTION, tokenize=False, chat_template=QWEN3_TEMPLATE)
    grids = batch["video_grid_thw"]
    counts = []
    for row, path in enumerate(paths):
        sampled, metadata = sampled_clip(path)
        inputs = {"video_grid_thw": grids[row : row + 1], "video_metadata": [metadata]}
        expanded, _ = processor.get_text_with_replacements(
            [text], videos_replacements=[processor.replace_video_token(inputs, 0)]
        )
        expected = tok(expanded[0])["input_ids"]
        ours = row_ids(batch, row)
        assert ours == expected, (tok.decode(ours), expanded[0])
        types = batch[MM_TOKEN_TYPE_IDS][row][batch[ATTENTION_MASK][row].bool()]
        assert torch.equal(types == VIDEO_TYPE, torch.tensor(expected) == module.hf_model.config.video_token_id)
        counts.append(len(sampled.indices))
    assert counts == [6, 5, 4]
    assert "<|vision_start|><0.2 seconds><|vision_start|>" in tok.decode(batch[INPUT_IDS][0])
    run_model(module, batch)


def test_images_equal_qwen2vl_image_processor_at_patch_16(qwen3_folder, tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    images = write_images(tmp_path)
    module, batch, _ = first_batch(str(qwen3_folder), image_records(tmp_path, images))
    settings = {k: v for k, v in IMAGE_CONFIG.items() if k != "image_processor_type"}
    hf = Qwen2VLImageProcessorPil(**settings)(images=[Image.open(p) for p in images], return_tensors="pt")
    assert torch.equal(batch["image_grid_thw"], hf["image_grid_thw"])
    assert parity_diff(batch["pixel_values"], hf["pixel_values"], "image qwen3_vl vs Qwen2VLImageProcessorPil") == 0
    assert batch["pixel_values"].shape[1] == 3 * 2 * 16 * 16
    per_row = (batch[INPUT_IDS] == module.hf_model.config.image_token_id).sum(1)
    assert per_row.tolist() == (hf["image_grid_thw"].prod(1) // 4).tolist()
    run_model(module, batch)


def test_builtin_video_rules_are_qwen3vls(qwen3_folder, tmp_path):
    """The clip-level smart_resize of ``Qwen3VLVideoProcessor``, its defaults, its normalisation and patch order."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize

    for name, value in VIDEO_PROCESSOR_DEFAULTS["Qwen3VLVideoProcessor"].items():
        found = getattr(Qwen3VLVideoProcessor, name)
        assert (list(found) if isinstance(found, (list, tuple)) else found) == value, name
    processor = CheckpointProcessor.load(str(qwen3_folder), FAMILIES["qwen3_vl"], video_backend="builtin")
    assert processor is not None and processor.video_backend == "builtin"
    settings = processor.video_settings
    for frames, (h, w) in ((6, (64, 64)), (5, (90, 40)), (2, (300, 420))):
        expected = smart_resize(frames, h, w, temporal_factor=2, factor=32, min_pixels=4096, max_pixels=65536)
        assert settings.output_size(h, w, frames) == expected
    # qwen-vl-utils' per-frame cap, against the class's own patch count (an instance without __init__: class defaults)
    capped = VideoSettings.resolve(
        "ckpt", "Qwen3VLVideoProcessor", {"cap_pixels_per_frame": True, "max_video_tokens": 4}
    )
    hf = object.__new__(Qwen3VLVideoProcessor)
    hf.max_video_tokens = 4
    for frames, (h, w) in ((8, (640, 480)), (4, (200, 900))):
        height, width = capped.output_size(h, w, frames)
        patches = hf.get_num_of_video_patches(frames, h, w, {"cap_pixels_per_frame": True})
        assert patches == frames // 2 * (height // 16) * (width // 16) < frames // 2 * (h // 16) * (w // 16)
    with pytest.raises(ValueError, match="must be larger than temporal_factor"):
        settings.output_size(64, 64, 1)  # as Qwen3VLVideoProcessor refuses a one-frame clip
    frame = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = processor.video(frame.repeat(2, 1, 1, 1), resize=False)
    hf = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=STD, image_std=MEAN, do_resize=False)(
        images=[frame[0].numpy()], input_data_format="channels_first", return_tensors="pt"
    )
    assert torch.equal(ours.grid, hf["image_grid_thw"])
    name = "video qwen3_vl built-in (2 equal frames) vs Qwen2VLImageProcessorPil"
    assert parity_diff(ours.values, hf["pixel_values"], name) < 1e-5  # fused vs separate rescale/normalise


def test_frame_sampling_defaults_are_the_checkpoints():
    settings = VideoSettings.resolve("ckpt", "Qwen3VLVideoProcessor", {})
    assert frames_for_video(settings, None, None) == {"num_frames": 768, "sample": "fps", "fps": 2.0, "min_frames": 4}
    assert settings.size == {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}


def test_random_batches_count_what_the_data_counts(model):
    """The random layout is the data side's: the same placeholders, timestamps and markers per temporal patch."""
    spec = VisionSpec.from_model(model)
    media = spec.process_video(torch.zeros(4, 3, *spec.size, dtype=torch.uint8), frame_seconds=[0.0, 0.5, 1.0, 1.5])
    assert media.expansion is not None and [p for p in media.expansion if isinstance(p, str)] == [
        "<0.2 seconds>",
        "<1.2 seconds>",
    ]
    layout = family_of(model).random_media(model.config, 4, torch.Generator().manual_seed(0))
    token = model.config.video_token_id
    assert sum(i == token for i in layout.ids) == media.num_tokens == sum(p == token for p in media.expansion)
    assert spec.process_video(torch.zeros(3, 3, *spec.size, dtype=torch.uint8)).expansion[0] == "<0.0 seconds>"


@needs_torchvision
def test_input_ids_equal_qwen3vl_processor(qwen3_folder, tmp_path):
    """Where torchvision imports: the real ``Qwen3VLProcessor`` (its video processor on our sampled frames)."""
    from transformers import AutoImageProcessor, AutoVideoProcessor, Qwen3VLProcessor

    paths, records = clip_records(tmp_path)
    module, batch, _ = first_batch(str(qwen3_folder), records)
    processor = Qwen3VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(qwen3_folder, backend="pil"),
        tokenizer=qwen3_tokenizer(),
        video_processor=AutoVideoProcessor.from_pretrained(qwen3_folder),
        chat_template=QWEN3_TEMPLATE,
    )
    text = processor.apply_chat_template(VIDEO_QUESTION, tokenize=False)
    for row, path in enumerate(paths):
        sampled, metadata = sampled_clip(path)
        expected = processor(
            text=[text], videos=[sampled.frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
        )
        assert row_ids(batch, row) == expected["input_ids"][0].tolist()
        attended = batch[ATTENTION_MASK][row].bool()
        assert batch[MM_TOKEN_TYPE_IDS][row][attended].tolist() == expected["mm_token_type_ids"][0].tolist()
    run_model(module, batch)


@needs_torchvision
def test_builtin_video_path_equals_qwen3vl_video_processor(qwen3_folder, tmp_path):
    hf, ours = video_paths(qwen3_folder, "qwen3_vl")
    for path in write_clips(tmp_path, "p"):
        frames = sampled_clip(path)[0].frames
        a, b = hf.video(frames), ours.video(frames)
        assert torch.equal(a.grid, b.grid)
        assert parity_diff(a.values, b.values, "video qwen3_vl built-in vs Qwen3VLVideoProcessor") <= 1e-5


# ------------------------------------------------------------------------------------------------
# The benchmarks' Qwen3-VL model: shapes with a timestamp per temporal patch, the GPU part at smoke size.


def test_benchmark_shapes_count_the_timestamps():
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import ModelSpec, build_model, fixed_shape, make_batch, media_overhead, shape_for_share

    model = build_model(
        ModelSpec(family="qwen3_vl", vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    )
    # bos and the video's markers; per temporal patch of 16 tokens, its timestamp (4) and markers (2)
    assert media_overhead(model) == 3 and media_overhead(model, 64) == 3 + 4 * 6
    shape = fixed_shape(model, batch_size=2, visual_tokens=32, prompt_len=4, answer_len=10, frame_grid=(4, 8))
    batch = make_batch(model, shape, frame_grid=(4, 8))  # 8 tokens per temporal patch: 4 patches
    assert batch["video_grid_thw"].tolist() == [[4, 4, 8], [4, 4, 8]]
    assert batch[INPUT_IDS].shape == (2, shape.length) == (2, 3 + 4 * 6 + 32 + 4 + 10)
    assert family_of(model).media_per_row(model.config, batch[INPUT_IDS], "video").tolist() == [1, 1]
    assert forward_active(model, batch).num_tokens == 2 * shape.length
    swept = shape_for_share(model, length=300, answer_share=0.5, prompt_len=4, batch_size=1)
    assert swept.length == 300 and swept.visual_tokens % 16 == 0 and abs(swept.answer_share - 0.5) < 0.05
    assert make_batch(model, swept)[INPUT_IDS].shape == (1, 300)


def test_gpu_part_runs_at_smoke_size(tmp_path):
    import sys
    from dataclasses import replace

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import QWEN3_VL_2B_LIKE, model_config
    from benchmarks.gpu_throughput import config_from_args, parser, run

    gpu = config_from_args(parser().parse_args(["--family", "qwen3_vl", "--only", "a1024"]))
    assert gpu.spec == QWEN3_VL_2B_LIKE and gpu.repeats == 5 and gpu.frame_grid == (24, 32)
    assert [p.name for p in gpu.parts] == ["a1024"] and gpu.prefix == "gpu_qwen3_vl" and gpu.tag == "-a1024"
    config = model_config(QWEN3_VL_2B_LIKE)
    assert config.vision_config.deepstack_visual_indexes == [5, 11, 17] and config.tie_word_embeddings
    assert config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    smoke = config_from_args(parser().parse_args(["--smoke", "--family", "qwen3_vl", "--only", "a48"]))
    result = run(replace(smoke, repeats=1), tmp_path)
    assert result["errors"] == [] and result["model"]["family"] == "qwen3_vl"
    assert (tmp_path / "gpu_qwen3_vl_throughput-a48.json").exists()
    [shape] = result["shapes"]
    assert [r["variant_short"] for r in shape["regate"]] == ["p=0.5", "v=0.5", "p=0.5+v=0.5"]
    assert all(0 < r["ideal_ratio"] < 1 for r in shape["regate"])
