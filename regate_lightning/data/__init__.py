"""Conversation data sets, video and image decoding, rendering, collation and the synthetic demo set.

The pipeline, one file per step::

    conversations.py  annotation file -> Record / ChoiceRecord    (eager checks, on_error policy)
    video.py          path or bytes -> uint8 frames [T, 3, H, W]    (PyAV, Pillow, torch resizing)
    processors.py     the student checkpoint's own processor configs, applied to frames (CheckpointProcessor)
    vision.py         frames -> the model family's tensors and placeholder-token counts (VisionSpec)
    render.py         turns + media -> input_ids, labels (assistant turns only)   (ChatRenderer)
    datasets.py       ConversationDataset / MultipleChoiceDataset: lazy decoding in __getitem__
    collate.py        samples -> batch of the HF model's own keys + labels + sample_idx (max_length)
    batching.py       length-grouped and token-budget batch samplers (DDP-aware, resumable mid-epoch)
    synthetic.py      the demo set of moving shapes, and its tokenizer
    datamodule.py     ConversationDataModule (user files, DataFile), SyntheticVideoQADataModule (the demo set)
    errors.py         DataError, MediaError, SkipCounter (per epoch and per record)

Typical use::

    spec = VisionSpec.from_model(model)   # the checkpoint's processor when `model` was loaded from one
    renderer = ChatRenderer(tokenizer, spec, chat_template=chat_template_of(checkpoint))
    dataset = ConversationDataset("train.json", renderer, FrameSampling(num_frames=8), on_error="skip")
    loader = NonEmptyDataLoader(dataset, batch_size=4, collate_fn=Collator(tokenizer, max_length=2048))
"""

from __future__ import annotations

from regate_lightning._imports import lazy_exports

# Names are imported on first use (PEP 562): importing one submodule costs only its own imports (PyAV and
# Pillow only where decoding is needed).
_EXPORTS: dict[str, str] = {
    "BATCHING_CHOICES": "regate_lightning.data.batching",
    "LengthGroupedBatchSampler": "regate_lightning.data.batching",
    "ResumableDataLoader": "regate_lightning.data.batching",
    "TokenBudgetBatchSampler": "regate_lightning.data.batching",
    "sample_lengths": "regate_lightning.data.batching",
    "Collator": "regate_lightning.data.collate",
    "NonEmptyDataLoader": "regate_lightning.data.collate",
    "ConversationDataModule": "regate_lightning.data.datamodule",
    "DataFile": "regate_lightning.data.datamodule",
    "SkipReport": "regate_lightning.data.datamodule",
    "SyntheticVideoQADataModule": "regate_lightning.data.datamodule",
    "load_tokenizer": "regate_lightning.data.datamodule",
    "fit_length": "regate_lightning.data.collate",
    "IMAGE_MARKER": "regate_lightning.data.conversations",
    "VIDEO_MARKER": "regate_lightning.data.conversations",
    "ChoiceRecord": "regate_lightning.data.conversations",
    "Media": "regate_lightning.data.conversations",
    "Record": "regate_lightning.data.conversations",
    "Turn": "regate_lightning.data.conversations",
    "read_choice_records": "regate_lightning.data.conversations",
    "read_records": "regate_lightning.data.conversations",
    "ANSWER_IDX": "regate_lightning.data.datasets",
    "OPTION_IDX": "regate_lightning.data.datasets",
    "QUESTION_IDX": "regate_lightning.data.datasets",
    "TASK": "regate_lightning.data.datasets",
    "ConversationDataset": "regate_lightning.data.datasets",
    "FrameSampling": "regate_lightning.data.datasets",
    "MultipleChoiceDataset": "regate_lightning.data.datasets",
    "load_media": "regate_lightning.data.datasets",
    "sample_key": "regate_lightning.data.datasets",
    "SKIP_REASONS": "regate_lightning.data.errors",
    "DataError": "regate_lightning.data.errors",
    "MediaError": "regate_lightning.data.errors",
    "SkipCounter": "regate_lightning.data.errors",
    "describe_counts": "regate_lightning.data.errors",
    "FALLBACK_CHAT_TEMPLATE": "regate_lightning.data.render",
    "ChatRenderer": "regate_lightning.data.render",
    "Sample": "regate_lightning.data.render",
    "SyntheticPaths": "regate_lightning.data.synthetic",
    "classify_words": "regate_lightning.data.synthetic",
    "ensure_synthetic": "regate_lightning.data.synthetic",
    "synthetic_tokenizer": "regate_lightning.data.synthetic",
    "train_tokenizer": "regate_lightning.data.synthetic",
    "visual_words": "regate_lightning.data.synthetic",
    "CLIP_MEAN": "regate_lightning.data.video",
    "CLIP_STD": "regate_lightning.data.video",
    "SIGLIP_MEAN": "regate_lightning.data.video",
    "SIGLIP_STD": "regate_lightning.data.video",
    "FOLDER_FPS": "regate_lightning.data.video",
    "DecodedVideo": "regate_lightning.data.video",
    "frame_files": "regate_lightning.data.video",
    "decode_video": "regate_lightning.data.video",
    "encode_video": "regate_lightning.data.video",
    "load_image": "regate_lightning.data.video",
    "normalize": "regate_lightning.data.video",
    "resize_frames": "regate_lightning.data.video",
    "sample_video": "regate_lightning.data.video",
    "CheckpointProcessor": "regate_lightning.data.processors",
    "VideoSettings": "regate_lightning.data.processors",
    "chat_template_of": "regate_lightning.data.processors",
    "checkpoint_of": "regate_lightning.data.processors",
    "qwen_patchify": "regate_lightning.data.processors",
    "torchvision_usable": "regate_lightning.data.processors",
    "ProcessedMedia": "regate_lightning.data.vision",
    "VisionSpec": "regate_lightning.data.vision",
    "anyres_image_tokens": "regate_lightning.data.vision",
    "join_media": "regate_lightning.data.vision",
    "DecodedMedia": "regate_lightning.data.datasets",
    "MediaCache": "regate_lightning.data.datasets",
    "decode_media": "regate_lightning.data.datasets",
    "process_media": "regate_lightning.data.datasets",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
