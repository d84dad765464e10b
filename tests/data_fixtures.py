"""Test data shared by the test files: real media files, records, a small trained tokenizer, checkpoint folders and
the data module's batches of them."""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from regate_lightning.data import encode_video, sample_video, train_tokenizer
from regate_lightning.data.processors import CheckpointProcessor, torchvision_usable
from regate_lightning.families import FAMILIES
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, SAMPLE_IDX

CORPUS = [
    "What is moving in the video? Describe it.",
    "The video shows two red circles moving left across a dark background.",
    "A blue square moves up. The answer is yes, and the colour is green.",
    "How many shapes are there? There are three shapes in the picture.",
    "USER: ASSISTANT: Thanks, and what colour is it? It is yellow.",
] * 20
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
"""A normalisation other than every processor's default, for the processor configs of test checkpoints."""
IMAGE_SIZES_HW = [(60, 90), (33, 100), (128, 64), (20, 24)]
"""(H, W) of the test images: landscape, very wide, portrait, and one smaller than min_pixels."""

NO_TORCHVISION = "torchvision cannot be imported here (it cannot be installed beside torch 2.13 CPU); " + (
    "transformers' video processors and Qwen2VLProcessor need it"
)
needs_torchvision = pytest.mark.skipif(not torchvision_usable(), reason=NO_TORCHVISION)


@functools.cache
def tokenizer() -> Any:
    """A byte-level BPE tokenizer (pad 0, bos 1, eos 2, ``<image>``, ``<video>``), fallback chat template."""
    return train_tokenizer(CORPUS, vocab_size=400)


def level_video(num_frames: int, size: tuple[int, int] = (48, 64)) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]``: frame ``i`` is a flat grey of level ``8 + 12 * i`` (decodes back to ``i``)."""
    levels = torch.tensor([8 + 12 * i for i in range(num_frames)], dtype=torch.uint8)
    return levels.view(-1, 1, 1, 1).expand(num_frames, 3, *size).contiguous()


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Invert :func:`level_video` on decoded frames (robust to compression noise)."""
    return [round((float(f.float().mean()) - 8) / 12) for f in frames]


def video_bytes(num_frames: int, fps: float = 8.0, size: tuple[int, int] = (48, 64)) -> io.BytesIO:
    """An in-memory mp4 of :func:`level_video`."""
    buf = io.BytesIO()
    encode_video(level_video(num_frames, size), buf, fps=fps)
    buf.seek(0)
    return buf


def write_video(
    path: str | os.PathLike[str],
    num_frames: int = 6,
    fps: float = 4.0,
    seed: int = 0,
    size: tuple[int, int] = (64, 64),
) -> Path:
    """Write a small random-texture mp4 (8 x 8 pixel cells, ``size`` ``(H, W)``) and return its path."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (num_frames, 3, size[0] // 8, size[1] // 8), generator=gen, dtype=torch.uint8)
    frames = frames.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    encode_video(frames, path, fps=fps)
    return Path(path)


def clip_frames(path: Path, num_frames: int, seed: int = 0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Every frame of a :func:`write_video` clip at ``path``, decoded (uint8 ``[T, 3, H, W]``), resized to ``size``."""
    frames = sample_video(write_video(path, num_frames=num_frames, seed=seed), num_frames).frames
    if size is None or tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return torch.nn.functional.interpolate(frames.float(), size=size).round().to(torch.uint8)


def write_image(path: str | os.PathLike[str], mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    """Write an image of the given PIL mode (``size`` is ``(W, H)``) and return its path."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "RGB" else rgb
    image.save(path)
    return Path(path)


def write_images(folder: Path, sizes: Sequence[tuple[int, int]] = IMAGE_SIZES_HW, seed: int = 1) -> list[Path]:
    """PNG files ``img{i}.png`` of random pixels, one per ``(H, W)`` of ``sizes``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_records(path: str | os.PathLike[str], records: list[Any], jsonl: bool = True) -> Path:
    """Write records as JSONL (strings are written as raw lines) or as a JSON list."""
    path = Path(path)
    if jsonl:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def llava_record(
    rid: str,
    kind: str,
    path: str,
    turns: int = 1,
    question: str = "What is moving in the video?",
    answer: str = "The video shows two red circles moving left.",
) -> dict[str, Any]:
    """A LLaVA-format record with one media and ``turns`` question/answer pairs (the first ones given)."""
    conv = [
        {"from": "human", "value": f"<{kind}>\n{question}"},
        {"from": "gpt", "value": answer},
    ]
    for k in range(1, turns):
        conv += [
            {"from": "human", "value": f"And what colour is it {k}?"},
            {"from": "gpt", "value": "It is yellow."},
        ]
    return {"id": rid, kind: path, "conversations": conv}


def messages(question: str, answer: str, *media: tuple[str, str | os.PathLike[str] | None]) -> list[dict[str, Any]]:
    """One user turn (each ``(kind, path)`` media, then the question) and the assistant's answer, in HF's messages
    format; a media whose path is None is a bare placeholder, as a processor's chat template is given it."""
    content = [{"type": kind} if path is None else {"type": kind, "path": str(path)} for kind, path in media]
    return [
        {"role": "user", "content": [*content, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def messages_record(
    rid: str, kind: str, path: str, question: str = "Describe it.", answer: str = "A blue square moves up."
) -> dict[str, Any]:
    """An HF-messages-format record with one media."""
    return {"id": rid, "messages": messages(question, answer, (kind, path))}


def media_records(
    folder: Path,
    media: Sequence[tuple[str, Path]],
    question: str = "What colour is it?",
    answer: str = "It is green.",
    name: str = "train.jsonl",
) -> Path:
    """One HF-messages conversation per ``(kind, path)`` media (the media, then the question; one answer)."""
    records = [messages_record(f"r{i}", kind, str(path), question, answer) for i, (kind, path) in enumerate(media)]
    return write_records(folder / name, records)


def image_records(folder: Path, paths: Sequence[Path], **text: str) -> Path:
    """:func:`media_records` of images."""
    return media_records(folder, [("image", p) for p in paths], **text)


IMAGE_QUESTION = messages("What colour is it?", "It is green.", ("image", None))
"""The conversation of :func:`image_records`, as a processor's chat template is given it."""


def video_records(folder: Path, paths: Sequence[Path], answer: str = "A square.") -> Path:
    """One LLaVA-format conversation per video (``<video>\nWhat moves?``; one answer)."""
    records = [
        llava_record(f"v{i}", "video", str(p), question="What moves?", answer=answer) for i, p in enumerate(paths)
    ]
    return write_records(folder / "videos.jsonl", records)


def row_ids(batch: Mapping[str, torch.Tensor], row: int) -> list[int]:
    """The attended ``input_ids`` of one row of a batch."""
    return batch[INPUT_IDS][row][batch[ATTENTION_MASK][row].bool()].tolist()


# ------------------------------------------------------------------------------------------------
# Checkpoint folders and the data module's batches of them.


def save_checkpoint(
    folder: Path,
    model: Any,
    tok: Any,
    token_ids: Mapping[str, str] | None = None,
    image: Mapping[str, Any] | None = None,
    video: Mapping[str, Any] | None = None,
    processor: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Save a (tiny) model and its tokenizer as a checkpoint folder, with the processor configs given.

    Args:
        folder: where to save.
        model: the model; each config attribute of ``token_ids`` is set to its token's id in ``tok`` first.
        tok: the tokenizer.
        token_ids: config attribute -> token (e.g. ``{"image_token_id": "<image>"}``).
        image: ``preprocessor_config.json``.
        video: ``video_preprocessor_config.json``.
        processor: ``processor_config.json``.
        chat_template: ``chat_template.jinja``.
    """
    for key, token in (token_ids or {}).items():
        setattr(model.config, key, tok.convert_tokens_to_ids(token))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for name, settings in (
        ("preprocessor_config.json", image),
        ("video_preprocessor_config.json", video),
        ("processor_config.json", processor),
    ):
        if settings is not None:
            (folder / name).write_text(json.dumps(settings))
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
    return folder


def data_module(student: Any, train_file: Path, **kwargs: Any) -> tuple[Any, Any]:
    """The student (a :class:`~regate_lightning.MLLMModule`, or a checkpoint to load as one) and a set-up
    ``ConversationDataModule`` of ``train_file`` for it (batches of 8, no length limit unless given)."""
    import lightning.pytorch as pl

    from regate_lightning import MLLMModule
    from regate_lightning.data.datamodule import ConversationDataModule

    module = student if isinstance(student, MLLMModule) else MLLMModule(model=student)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    data = ConversationDataModule(train_file=str(train_file), **{"max_length": None, "batch_size": 8, **kwargs})
    data.trainer = trainer
    data.setup("fit")
    return module, data


def first_batch(student: Any, train_file: Path, **kwargs: Any) -> tuple[Any, dict, Any]:
    """The module, the data module's first training batch (every sample, in file order) and the data module."""
    module, data = data_module(student, train_file, **kwargs)
    dataset = data.train_set
    assert dataset is not None
    batch = data.train_dataloader().collate_fn([dataset[i] for i in range(len(dataset))])
    assert batch is not None and batch[SAMPLE_IDX].tolist() == list(dataset.keys)  # in file order
    return module, batch, data


def run_model(module: Any, batch: dict) -> None:
    """The student's forward on the batch: HF checks that placeholders and features have the same count."""
    from regate_lightning.elision import forward_active

    with torch.no_grad():
        assert torch.isfinite(forward_active(module.model, batch).loss)


def processor_without_video(
    monkeypatch: pytest.MonkeyPatch, processor_class: Any, image_processor_class: Any, folder: Path, **kwargs: Any
) -> Any:
    """transformers' ``processor_class`` with the checkpoint's image processor (``image_processor_class``, from
    ``folder``) and ``video_processor=None``.

    A processor checks that its ``video_processor`` argument is a ``BaseVideoProcessor``, a class that needs
    torchvision, which cannot be imported beside this machine's torch: that one check is let pass for None;
    everything the processor then runs (its chat template, its ``replace_image_token`` / ``replace_video_token``,
    the image processor) is transformers' own.
    """
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, argument):  # the one check that imports torchvision: no video processor given
        return None if name == "video_processor" and argument is None else check(self, name, argument)

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lenient)
    image_processor = image_processor_class.from_pretrained(folder)
    return processor_class(image_processor=image_processor, video_processor=None, **kwargs)


def image_ids_equal_the_processors(processor: Any, batch: Mapping[str, torch.Tensor], images: Sequence[Path]) -> list:
    """Assert that each row of a batch of :func:`image_records` holds the input ids transformers' ``processor``
    writes for :data:`IMAGE_QUESTION` with that row's image; the processor's outputs, row by row."""
    text = processor.apply_chat_template(IMAGE_QUESTION, tokenize=False)
    outputs = []
    for row, path in enumerate(images):
        expected = processor(text=[text], images=[Image.open(path)], return_tensors="pt")
        assert row_ids(batch, row) == expected["input_ids"][0].tolist(), row
        outputs.append(expected)
    return outputs


def video_paths(folder: Path, family: str) -> tuple[CheckpointProcessor, CheckpointProcessor]:
    """The checkpoint's processors with transformers' video processor and with the built-in video rules."""
    transformers_side = CheckpointProcessor.load(str(folder), FAMILIES[family], video_backend="transformers")
    builtin = CheckpointProcessor.load(str(folder), FAMILIES[family], video_backend="builtin")
    assert transformers_side is not None and builtin is not None
    return transformers_side, builtin


PARITY: dict[str, float] = {}
"""Measured max |difference| of every parity check, printed by ``tests/test_processors.py`` (read by docs/data.md)."""


def parity_diff(a: torch.Tensor, b: torch.Tensor, name: str | None = None) -> float:
    """max |a - b| (shapes must match); recorded in :data:`PARITY` under ``name`` (the largest seen)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if name is not None:
        PARITY[name] = max(diff, PARITY.get(name, 0.0))
    return diff


def iterate_with_an_empty_batch(rank: int, world: int, init: str, errors: Any) -> None:
    """One rank of a gloo group (spawned by a test): iterate a loader whose second batch has no sample left."""
    import torch.distributed as dist

    from regate_lightning.data import NonEmptyDataLoader

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loader = NonEmptyDataLoader(list(range(4)), batch_size=2, collate_fn=lambda xs: None if 2 in xs else xs)
        list(loader)
    except RuntimeError as err:
        errors.put(str(err))
    finally:
        dist.destroy_process_group()
