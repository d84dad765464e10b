"""Real checkpoints: the data pipeline applies the checkpoint's own processor, equal to transformers' processors.

Each test saves a tiny model with processor configs of non-default values into a folder, loads the student
from that folder as a user would (``MLLMModule(model=folder)``), builds the ``ConversationDataModule`` batch
and compares it with transformers' own processor classes run on the same files; the model's forward on the
batch checks the placeholder counts (HF raises on a mismatch). Tests that need torchvision (transformers'
video processors, ``Qwen2VLProcessor``) skip here with the reason and run where torchvision is installed
(docs/data.md records the command and the measured differences).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    CORPUS,
    IMAGE_QUESTION,
    MEAN,
    PARITY,
    STD,
    clip_frames,
    data_module,
    first_batch,
    image_ids_equal_the_processors,
    image_records,
    needs_torchvision,
    parity_diff,
    run_model,
    save_checkpoint,
    tokenizer,
    video_paths,
    video_records,
    write_images,
    write_video,
)
from PIL import Image

from regate_lightning import MLLMModule
from regate_lightning.data import FrameSampling, VisionSpec, sample_video, train_tokenizer
from regate_lightning.data.processors import (
    VIDEO_PROCESSOR_DEFAULTS,
    CheckpointProcessor,
    VideoSettings,
    checkpoint_of,
    frames_for_video,
)
from regate_lightning.elision import forward_active
from regate_lightning.families import FAMILIES
from regate_lightning.keys import IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES
from regate_lightning.testing import tiny

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
QWEN_MEDIA = ("<|image_pad|>", "<|video_pad|>")
QWEN_IDS = dict(
    zip(
        ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
        QWEN_MEDIA + QWEN_SPECIALS[3:],
        strict=True,
    )
)
"""A Qwen-VL config's placeholder and marker ids, and their tokens."""
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A Qwen2-VL-style chat template: ``<|im_start|>`` turns, media as vision start, pad, vision end."""

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""LLaVA-1.5-hf's chat template (without generation tags): images first in a turn, as ``<image>\\n``."""


def qwen_tokenizer(template: str | None = QWEN_TEMPLATE):
    return train_tokenizer(CORPUS, vocab_size=350, special_tokens=QWEN_SPECIALS + QWEN_MEDIA, chat_template=template)


def save_qwen(folder: Path, video: dict | None = None) -> Path:
    """A tiny Qwen2-VL with a Qwen-style tokenizer and template, and non-default processor configs."""
    layout = {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 2}
    image = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 1024, "max_pixels": 4096, **layout}
    return save_checkpoint(
        folder,
        tiny.tiny_qwen2_vl(),
        qwen_tokenizer(),
        QWEN_IDS,
        image={**image, "image_mean": MEAN, "image_std": STD},
        video=None if video is None else {"video_processor_type": "Qwen2VLVideoProcessor", **layout, **video},
    )


def save_llava(folder: Path, factory=tiny.tiny_llava, processor: dict | None = None, **config) -> Path:
    """A tiny LLaVA-family model whose ``<image>`` id is the test tokenizer's, with a CLIP-style processor config."""
    model = factory()
    for key, value in config.items():
        setattr(model.config, key, value)
    processor = processor or {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "image_mean": MEAN,
        "image_std": STD,
    }
    return save_checkpoint(folder, model, tokenizer(), {"image_token_id": "<image>"}, image=processor)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    video = {"min_pixels": 1024, "max_pixels": 2048, "image_mean": STD, "image_std": MEAN, "fps": 2.0}
    return save_qwen(tmp_path_factory.mktemp("qwen"), video={**video, "min_frames": 2, "max_frames": 6})


def test_qwen_images_equal_qwen2vl_image_processor(qwen_folder, images, tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    module, batch, _ = first_batch(str(qwen_folder), image_records(tmp_path, images))
    hf = Qwen2VLImageProcessorPil(
        min_pixels=1024,
        max_pixels=4096,
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=MEAN,
        image_std=STD,
    )(images=[Image.open(p) for p in images], return_tensors="pt")
    assert torch.equal(batch["image_grid_thw"], hf["image_grid_thw"])
    assert parity_diff(batch["pixel_values"], hf["pixel_values"], "image qwen2_vl vs Qwen2VLImageProcessorPil") == 0
    assert len({tuple(g) for g in hf["image_grid_thw"].tolist()}) == len(images)  # every image its own grid
    image_id = module.hf_model.config.image_token_id
    per_row = (batch[INPUT_IDS] == image_id).sum(1)
    assert per_row.tolist() == (hf["image_grid_thw"].prod(1) // 4).tolist()
    run_model(module, batch)


@pytest.mark.parametrize(
    ("family", "processor_class"), [("llava", "CLIPImageProcessor"), ("video_llava", "VideoLlavaImageProcessor")]
)
def test_llava_images_equal_clip_image_processor(family, processor_class, tmp_path, images):
    """LLaVA's and Video-LLaVA's images: shortest-edge resize and centre crop as their PIL image processors."""
    import transformers

    factory = tiny.tiny_llava if family == "llava" else tiny.tiny_video_llava
    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    config = {"image_processor_type": processor_class, **settings, "image_mean": MEAN, "image_std": STD}
    module, batch, _ = first_batch(str(save_llava(tmp_path / family, factory, config)), image_records(tmp_path, images))
    pil_class = getattr(transformers, f"{processor_class}Pil", None) or getattr(transformers, processor_class)
    hf = pil_class(**settings, image_mean=MEAN, image_std=STD)(
        images=[Image.open(p) for p in images], return_tensors="pt"
    )
    key = FAMILIES[family].image_key
    assert parity_diff(batch[key], hf[key], f"image {family} vs {pil_class.__name__}") == 0
    image_id = module.hf_model.config.image_token_id
    assert (batch[INPUT_IDS] == image_id).sum(1).tolist() == [16] * len(images)  # (32 / 8) ** 2, CLS dropped
    run_model(module, batch)


def anyres_folder(tmp_path: Path) -> Path:
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    processor = {
        "image_processor_type": "LlavaNextImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "image_grid_pinpoints": pinpoints,
        "image_mean": MEAN,
        "image_std": STD,
    }
    return save_llava(
        tmp_path / "next", tiny.tiny_llava_next_video, processor=processor, image_grid_pinpoints=pinpoints
    )


def test_llava_next_video_images_through_anyres(tmp_path, images):
    """Item 2: LLaVA-NeXT-Video images as transformers' anyres processor tiles them, counted as the model does."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    folder = anyres_folder(tmp_path)
    module, batch, _ = first_batch(str(folder), image_records(tmp_path, images))
    image_processor = LlavaNextImageProcessorPil.from_pretrained(folder)
    hf = image_processor(images=[Image.open(p) for p in images], return_tensors="pt")
    assert torch.equal(batch[IMAGE_SIZES], hf["image_sizes"])
    tiles = [
        hf["pixel_values"][i][: len(t)]
        for i, t in enumerate(torch.split(batch[PIXEL_VALUES], _tile_counts(hf["image_sizes"], folder)))
    ]
    assert (
        parity_diff(batch[PIXEL_VALUES], torch.cat(tiles), "image llava_next_video vs LlavaNextImageProcessorPil") == 0
    )
    assert len(set(_tile_counts(hf["image_sizes"], folder))) > 1  # the sizes choose different tilings
    # transformers' own processor expands each <image> to the count the data module used
    processor = LlavaNextProcessor(  # as llava-hf's checkpoints configure it: CLIP's CLS token, dropped
        image_processor=image_processor,
        tokenizer=tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    image_id = module.hf_model.config.image_token_id
    for row, path in enumerate(images):
        expanded = processor(text=["<image>"], images=[Image.open(path)])["input_ids"][0]
        assert (batch[INPUT_IDS][row] == image_id).sum() == expanded.count(image_id)
    run_model(module, batch)


def _tile_counts(image_sizes: torch.Tensor, folder: Path) -> list[int]:
    from transformers.models.llava_next_video.modeling_llava_next_video import image_size_to_num_patches

    pinpoints = json.loads((folder / "config.json").read_text())["image_grid_pinpoints"]
    return [image_size_to_num_patches(s, pinpoints, 32) for s in image_sizes.tolist()]


def test_anyres_batch_elides_like_the_unmodified_model(tmp_path, images):
    """The elision path on anyres images equals the full model run with a 4-D mask hiding the dropped keys."""
    from references import token_losses_4d

    from regate_lightning.targets import candidate_mask

    module, batch, _ = first_batch(str(anyres_folder(tmp_path)), image_records(tmp_path, images[:2]))
    keep = torch.ones_like(batch[INPUT_IDS], dtype=torch.bool)
    candidates = candidate_mask(batch[LABELS])
    for row in range(keep.shape[0]):
        keep[row, candidates[row].nonzero().flatten()[::2]] = False
    model = module.hf_model.eval()
    with torch.no_grad():
        ours = forward_active(model, batch, keep).token_loss
        reference = token_losses_4d(model, batch, keep)
    computed = ~torch.isnan(reference)
    assert computed.any() and torch.equal(computed, ~torch.isnan(ours))
    assert parity_diff(ours[computed], reference[computed], "anyres elision vs unmodified model (4-D mask)") < 1e-5


def test_llava_input_ids_equal_llava_processor(tmp_path, images):
    """Item 4: the checkpoint's chat template and tokenizer by default; input_ids equal LlavaProcessor's."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    folder = save_llava(tmp_path / "llava")
    (folder / "chat_template.jinja").write_text(LLAVA_TEMPLATE)
    module, batch, data = first_batch(str(folder), image_records(tmp_path, images[:2]))
    assert data.tokenizer.get_vocab() == tokenizer().get_vocab()  # no `tokenizer:` given
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(folder),
        tokenizer=tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    image_ids_equal_the_processors(processor, batch, images[:2])
    labels = batch[LABELS][0][batch[LABELS][0] != -100]
    assert tokenizer().decode(labels) == " It is green. "  # what the template writes after the prompt
    run_model(module, batch)


@needs_torchvision
def test_qwen_input_ids_equal_qwen2vl_processor(qwen_folder, images, tmp_path):
    """Item 4 for Qwen2-VL: input_ids equal Qwen2VLProcessor's (apply_chat_template, then the pad expansion)."""
    from transformers import AutoImageProcessor, AutoVideoProcessor, Qwen2VLProcessor

    module, batch, _ = first_batch(str(qwen_folder), image_records(tmp_path, images))
    processor = Qwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(qwen_folder, backend="pil"),
        tokenizer=qwen_tokenizer(),
        video_processor=AutoVideoProcessor.from_pretrained(qwen_folder),
        chat_template=QWEN_TEMPLATE,
    )
    for row, expected in enumerate(image_ids_equal_the_processors(processor, batch, images)):
        attended = batch["attention_mask"][row].bool()
        if "mm_token_type_ids" in expected:
            assert batch["mm_token_type_ids"][row][attended].tolist() == expected["mm_token_type_ids"][0].tolist()
    run_model(module, batch)


def test_qwen_template_without_torchvision_renders_like_the_processor(qwen_folder, images, tmp_path):
    """Where Qwen2VLProcessor cannot be built, its two steps by hand: the template's text, pads expanded."""
    module, batch, data = first_batch(str(qwen_folder), image_records(tmp_path, images[:1]))
    assert data.tokenizer.chat_template == QWEN_TEMPLATE
    spec = data.train_set.renderer.spec
    assert data.train_set.renderer.template_media == {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    grid = batch["image_grid_thw"][0]
    text = data.tokenizer.apply_chat_template(IMAGE_QUESTION, tokenize=False, chat_template=QWEN_TEMPLATE)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))
    assert batch[INPUT_IDS][0].tolist() == data.tokenizer(text)["input_ids"]
    assert spec.vision_start_token_id in batch[INPUT_IDS][0].tolist()
    run_model(module, batch)


def test_qwen_video_follows_the_checkpoint_rules(qwen_folder, tmp_path):
    """Built-in video path (no torchvision needed): the video config's pixels, sampling and grid."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    videos = [write_video(tmp_path / "a.mp4", num_frames=12, fps=4.0)]  # 3 s at 4 fps, 64 x 64
    module, batch, data = first_batch(str(qwen_folder), video_records(tmp_path, videos))
    assert data.frames == FrameSampling(num_frames=6, sample="fps", fps=2.0, min_frames=2)  # fps 2, capped at 6
    assert batch["video_grid_thw"].tolist() == [[3, *(s // 8 for s in smart_resize(64, 64, 16, 1024, 2048))]]
    # two equal frames at a size smart_resize keeps: the video path gives the image processor's patches
    processor = data.train_set.renderer.spec.processor
    frame = sample_video(videos[0], 1, size=(32, 32)).frames
    ours = CheckpointProcessor(qwen_folder, FAMILIES["qwen2_vl"], None, processor.video_settings).video(
        frame.repeat(2, 1, 1, 1)
    )
    hf = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, image_mean=STD, image_std=MEAN, do_resize=False)(
        images=[frame[0].numpy()], input_data_format="channels_first", return_tensors="pt"
    )
    assert torch.equal(ours.grid, hf["image_grid_thw"])
    name = "video qwen2_vl built-in (2 equal frames) vs Qwen2VLImageProcessorPil"
    assert parity_diff(ours.values, hf["pixel_values"], name) < 1e-5  # fused vs separate rescale/normalise
    run_model(module, batch)


@needs_torchvision
@pytest.mark.parametrize("case", ["qwen2_vl", "qwen2_vl_capped", "llava_next_video", "video_llava"])
def test_builtin_video_path_equals_transformers_video_processor(case, qwen_folder, tmp_path):
    """Where torchvision imports: the built-in video path gives transformers' video processor's numbers."""
    family = case.removesuffix("_capped")
    if case == "qwen2_vl":
        folder = qwen_folder
    elif case == "qwen2_vl_capped":  # qwen-vl-utils' per-frame share of a (small) video token budget
        capped = {"min_pixels": 1024, "max_pixels": 4096, "cap_pixels_per_frame": True, "max_video_tokens": 8}
        folder = save_qwen(tmp_path / "capped", video=capped)
    else:
        folder = save_llava(tmp_path / case, getattr(tiny, f"tiny_{case}"))
        (folder / "video_preprocessor_config.json").write_text(
            json.dumps(
                {
                    "video_processor_type": FAMILIES[family].video_processor,
                    "size": {"shortest_edge": 40},
                    "crop_size": {"height": 32, "width": 32},
                    "image_mean": MEAN,
                    "image_std": STD,
                }
            )
        )
    transformers_side, builtin = video_paths(folder, family)
    for i, (frames, size) in enumerate([(6, (48, 64)), (3, (90, 40)), (4, (64, 64))]):
        decoded = clip_frames(tmp_path / f"v{i}.mp4", frames, seed=i, size=size)
        a, b = transformers_side.video(decoded), builtin.video(decoded)
        if a.grid is not None:
            assert torch.equal(a.grid, b.grid)
        if case == "qwen2_vl_capped":  # the cap binds: 64 x 64 frames fit max_pixels but not the budget
            assert int(a.grid[0, 1:].prod()) * 8 * 8 < 2048
        name = f"video {case} built-in vs {FAMILIES[family].video_processor}"
        assert parity_diff(a.values, b.values, name) <= 1e-5


@needs_torchvision
def test_video_defaults_equal_transformers_classes():
    import transformers

    for name, defaults in VIDEO_PROCESSOR_DEFAULTS.items():
        cls = getattr(transformers, name)
        for key, value in defaults.items():
            found = getattr(cls, key)
            assert (list(found) if isinstance(found, (list, tuple)) else found) == value, (name, key)


def test_frame_size_overrides_the_checkpoint_rule_or_is_refused(qwen_folder, tmp_path, images):
    """Item 3: frame_size resizes every image to it (then the checkpoint's normalisation); bad values named."""
    from transformers import Qwen2VLImageProcessorPil

    from regate_lightning.data import load_image

    module, batch, _ = first_batch(str(qwen_folder), image_records(tmp_path, images), frame_size=[48, 32])
    assert batch["image_grid_thw"].tolist() == [[1, 6, 4]] * len(images)
    hf = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, image_mean=MEAN, image_std=STD, do_resize=False)(
        images=[load_image(p, (48, 32)).numpy() for p in images],
        input_data_format="channels_first",
        return_tensors="pt",
    )
    assert (
        parity_diff(batch["pixel_values"], hf["pixel_values"], "image qwen2_vl frame_size vs Qwen2VLImageProcessorPil")
        == 0
    )
    run_model(module, batch)
    with pytest.raises(ValueError, match=r"`frame_size` \[40, 32\].*multiples of patch_size \* merge_size = 16"):
        first_batch(module, image_records(tmp_path, images), frame_size=[40, 32])
    llava = save_llava(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"`frame_size` \[64, 64\].*takes 32 x 32"):
        first_batch(str(llava), image_records(tmp_path, images), frame_size=[64, 64])


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    folder = save_qwen(tmp_path / "qwen")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "patch_size": 14}))
    model = MLLMModule(model=str(folder)).hf_model
    with pytest.raises(ValueError, match=r"patch_size.*do not match the model's vision config"):
        VisionSpec.from_model(model)
    llava = save_llava(tmp_path / "llava", processor={"image_processor_type": "CLIPImageProcessor", "crop_size": 24})
    with pytest.raises(ValueError, match=r"makes \(24, 24\) images but the vision tower takes 32 x 32"):
        VisionSpec.from_model(MLLMModule(model=str(llava)).hf_model)


def test_media_the_checkpoint_refuses_is_a_counted_skip(qwen_folder, tmp_path):
    """An image transformers' processor refuses (aspect ratio over 200) is bad input, not a crash."""
    path = tmp_path / "strip.png"
    Image.fromarray(np.zeros((1, 250, 3), dtype=np.uint8)).save(path)
    _, data = data_module(str(qwen_folder), image_records(tmp_path, [path]), on_error="skip")
    assert data.train_set is not None and data.train_set[0] is None
    assert data.counter.counts()["unsupported_media"] == 1
    settings = VideoSettings.resolve("ckpt", "LlavaNextVideoVideoProcessor", {"resample": 0})
    with pytest.raises(ValueError, match="video resample 0 is not implemented by the built-in video path"):
        settings.check_builtin()


def test_models_without_processor_configs_keep_the_builtin_path(tmp_path):
    """The tiny random models and a folder without processor configs: the built-in numbers, unchanged."""
    model = tiny.tiny_qwen2_vl()
    assert checkpoint_of(model) is None
    spec = VisionSpec.from_model(model)
    assert spec.processor is None and spec.size == (64, 64)  # 4 * patch * merge a side
    model.save_pretrained(tmp_path / "bare")
    loaded = MLLMModule(model=str(tmp_path / "bare")).hf_model
    assert checkpoint_of(loaded) == str(tmp_path / "bare")
    assert VisionSpec.from_model(loaded) == spec
    tokenizer().save_pretrained(tmp_path / "bare")  # the tokenizer still comes from the folder
    with pytest.warns(UserWarning, match="has no processor configs.*the built-in preprocessing applies"):
        _, batch, _ = first_batch(str(tmp_path / "bare"), image_records(tmp_path, write_images(tmp_path)[:1]))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]  # 64 x 64, the built-in size
    with pytest.raises(ValueError, match="`tokenizer` is required: the student was built in memory"):
        first_batch(MLLMModule(model=tiny.tiny_qwen2_vl()), tmp_path / "none.jsonl")


def test_tokenizer_argument_overrides_the_checkpoint(qwen_folder, images, tmp_path):
    other = tmp_path / "other"
    tok = qwen_tokenizer(template=QWEN_TEMPLATE.replace("You are a helpful assistant.", "Be brief."))
    tok.save_pretrained(other)
    _, batch, data = first_batch(str(qwen_folder), image_records(tmp_path, images[:1]), tokenizer=str(other))
    assert data.load_chat_template() == tok.chat_template
    assert "Be brief." in data.tokenizer.decode(batch[INPUT_IDS][0])


def test_frame_sampling_defaults():
    qwen = FAMILIES["qwen2_vl"].video_processor
    settings = VideoSettings.resolve("ckpt", qwen, {"fps": 1.0, "max_frames": 16})
    assert settings.min_frames == 4 and settings.size["longest_edge"] == 28 * 28 * 768
    assert frames_for_video(settings, None, None) == {"num_frames": 16, "sample": "fps", "fps": 1.0, "min_frames": 4}
    assert frames_for_video(settings, None, 6)["sample"] == "uniform"
    assert frames_for_video(settings, 3.0, 2) == {"num_frames": 2, "sample": "fps", "fps": 3.0, "min_frames": 2}
    assert frames_for_video(None, 3.0, None)["num_frames"] == 8


def test_report_parity(capsys):
    """Print the measured max |difference| of every parity check that ran (docs/data.md quotes them)."""
    with capsys.disabled():
        for key, value in sorted(PARITY.items()):
            print(f"max|diff| {key}: {value:.2e}")
