"""Helpers shared by the ``tests/test_data_*.py`` files: real media files and a small trained tokenizer."""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from regate_lightning.data import encode_video, train_tokenizer

CORPUS = [
    "What is moving in the video? Describe it.",
    "The video shows two red circles moving left across a dark background.",
    "A blue square moves up. The answer is yes, and the colour is green.",
    "How many shapes are there? There are three shapes in the picture.",
    "USER: ASSISTANT: Thanks, and what colour is it? It is yellow.",
] * 20


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


def write_video(path: str | os.PathLike[str], num_frames: int = 6, fps: float = 4.0, seed: int = 0) -> Path:
    """Write a small random-texture mp4 (64x64) and return its path."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (num_frames, 3, 8, 8), generator=gen, dtype=torch.uint8)
    frames = frames.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    encode_video(frames, path, fps=fps)
    return Path(path)


def write_image(path: str | os.PathLike[str], mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    """Write an image of the given PIL mode (``size`` is ``(W, H)``) and return its path."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "RGB" else rgb
    image.save(path)
    return Path(path)


def write_records(path: str | os.PathLike[str], records: list[Any], jsonl: bool = True) -> Path:
    """Write records as JSONL (strings are written as raw lines) or as a JSON list."""
    path = Path(path)
    if jsonl:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def llava_record(rid: str, kind: str, path: str, turns: int = 1) -> dict[str, Any]:
    """A LLaVA-format record with one media and ``turns`` question/answer pairs."""
    conv = [
        {"from": "human", "value": f"<{kind}>\nWhat is moving in the video?"},
        {"from": "gpt", "value": "The video shows two red circles moving left."},
    ]
    for k in range(1, turns):
        conv += [
            {"from": "human", "value": f"And what colour is it {k}?"},
            {"from": "gpt", "value": "It is yellow."},
        ]
    return {"id": rid, kind: path, "conversations": conv}


def messages_record(rid: str, kind: str, path: str) -> dict[str, Any]:
    """An HF-messages-format record with one media."""
    return {
        "id": rid,
        "messages": [
            {
                "role": "user",
                "content": [{"type": kind, "path": path}, {"type": "text", "text": "Describe it."}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A blue square moves up."}]},
        ],
    }


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
