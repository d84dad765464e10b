"""Conversation data sets, video and image decoding, rendering, collation and the synthetic demo set.

The pipeline, one file per step::

    conversations.py  annotation file -> Record / ChoiceRecord    (eager checks, on_error policy)
    video.py          path or bytes -> uint8 frames [T, 3, H, W]    (PyAV, Pillow, torch resizing)
    vision.py         frames -> the model family's tensors and placeholder-token counts (VisionSpec)
    render.py         turns + media -> input_ids, labels (assistant turns only)   (ChatRenderer)
    datasets.py       ConversationDataset / MultipleChoiceDataset: lazy decoding in __getitem__
    collate.py        samples -> batch of the HF model's own keys + labels + sample_idx (max_length)
    synthetic.py      the demo set of moving shapes, and its tokenizer
    errors.py         DataError, MediaError, SkipCounter

Typical use::

    spec = VisionSpec.from_model(model)
    renderer = ChatRenderer(tokenizer, spec)
    dataset = ConversationDataset("train.json", renderer, FrameSampling(num_frames=8), on_error="skip")
    loader = DataLoader(dataset, batch_size=4, collate_fn=Collator(tokenizer, max_length=2048))
"""

from __future__ import annotations

from regate_lightning.data.collate import Collator, fit_length
from regate_lightning.data.conversations import (
    IMAGE_MARKER,
    VIDEO_MARKER,
    ChoiceRecord,
    Media,
    Record,
    Turn,
    read_choice_records,
    read_records,
)
from regate_lightning.data.datasets import (
    ANSWER_IDX,
    OPTION_IDX,
    QUESTION_IDX,
    TASK,
    ConversationDataset,
    FrameSampling,
    MultipleChoiceDataset,
    load_media,
)
from regate_lightning.data.errors import SKIP_REASONS, DataError, MediaError, SkipCounter
from regate_lightning.data.render import FALLBACK_CHAT_TEMPLATE, ChatRenderer, Sample
from regate_lightning.data.synthetic import (
    SyntheticPaths,
    classify_words,
    ensure_synthetic,
    synthetic_tokenizer,
    train_tokenizer,
    visual_words,
)
from regate_lightning.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    DecodedVideo,
    decode_video,
    encode_video,
    load_image,
    normalize,
    resize_frames,
    sample_video,
)
from regate_lightning.data.vision import ProcessedMedia, VisionSpec, qwen_patchify

__all__ = [
    "ANSWER_IDX",
    "CLIP_MEAN",
    "CLIP_STD",
    "FALLBACK_CHAT_TEMPLATE",
    "IMAGE_MARKER",
    "OPTION_IDX",
    "QUESTION_IDX",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "SKIP_REASONS",
    "TASK",
    "VIDEO_MARKER",
    "ChatRenderer",
    "ChoiceRecord",
    "Collator",
    "ConversationDataset",
    "DataError",
    "DecodedVideo",
    "FrameSampling",
    "Media",
    "MediaError",
    "MultipleChoiceDataset",
    "ProcessedMedia",
    "Record",
    "Sample",
    "SkipCounter",
    "SyntheticPaths",
    "Turn",
    "VisionSpec",
    "classify_words",
    "decode_video",
    "encode_video",
    "ensure_synthetic",
    "fit_length",
    "load_image",
    "load_media",
    "normalize",
    "qwen_patchify",
    "read_choice_records",
    "read_records",
    "resize_frames",
    "sample_video",
    "synthetic_tokenizer",
    "train_tokenizer",
    "visual_words",
]
