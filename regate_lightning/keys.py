"""Batch keys, output keys and logged metric names, defined once.

The batch keys of the student are the HF model's own (``input_ids``, ``attention_mask``, ``labels``,
``pixel_values``, ``pixel_values_videos``, ``image_grid_thw``, ...); the ones below are those this
package adds or reads itself.
"""

from __future__ import annotations

IGNORE_INDEX: int = -100
"""Label value that marks a position as not supervised (HF convention)."""

# Batch keys.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LABELS = "labels"
KEEP_MASK = "keep_mask"
"""bool [B, L]; True = the position stays in the decoder's sequence. Written by the callback."""
SAMPLE_IDX = "sample_idx"
"""int64 [B]; a stable integer id per sample (its index in the training set)."""
MM_TOKEN_TYPE_IDS = "mm_token_type_ids"
"""int64 [B, L]; Qwen2-VL's media type of each position: :data:`TEXT_TYPE`, :data:`IMAGE_TYPE` or :data:`VIDEO_TYPE`."""
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2

# HF batch keys of the media tensors (which family reads which: regate_lightning.families).
PIXEL_VALUES = "pixel_values"
PIXEL_VALUES_IMAGES = "pixel_values_images"
PIXEL_VALUES_VIDEOS = "pixel_values_videos"
IMAGE_GRID_THW = "image_grid_thw"
VIDEO_GRID_THW = "video_grid_thw"
SECOND_PER_GRID_TS = "second_per_grid_ts"

# Multiple-choice evaluation batches (one row per option; int64 [B]).
QUESTION_IDX = "question_idx"
OPTION_IDX = "option_idx"
ANSWER_IDX = "answer_idx"
TASK = "task"

# Keys of the dict returned by ``MLLMModule.training_step``.
LOSS = "loss"
TOKEN_LOSS = "token_loss"
"""float32 [B, L]; loss of predicting token t+1 at position t, NaN where nothing was computed."""
NUM_ACTIVE = "num_active"
"""int; positions the decoder really processed in this step (sum over the batch)."""
NUM_TOKENS = "num_tokens"
"""int; non-padding positions of the batch (what the decoder would process without elision)."""

NUM_TARGETS = "num_targets"
"""int; supervised targets whose loss was computed in this step."""

# Logged metric names.
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
TEST_ACC = "test/acc"
