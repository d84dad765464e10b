"""Batch keys, output keys and logged metric names, defined once.

The batch keys of the student are the HF model's own (``input_ids``, ``attention_mask``, ``labels``,
``pixel_values``, ``pixel_values_videos``, ``image_grid_thw``, ...); the ones below are those this
package adds or reads itself.
"""

from __future__ import annotations

from collections.abc import Mapping

IGNORE_INDEX: int = -100
"""Label value that marks a position as not supervised (HF convention)."""

# Batch keys.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LABELS = "labels"
KEEP_MASK = "keep_mask"
"""bool [B, L]; True = the position stays in the decoder's sequence. Written by a policy (see ``ReGATEPolicy``)."""
SAMPLE_IDX = "sample_idx"
"""int64 [B]; a stable non-negative key per sample, the same in every epoch and run (the data sets of
``regate_lightning.data`` use a 63-bit hash of the record's id, else of its file and line)."""
MM_TOKEN_TYPE_IDS = "mm_token_type_ids"
"""int64 [B, L]; Qwen2-VL's media type of each position: :data:`TEXT_TYPE`, :data:`IMAGE_TYPE` or :data:`VIDEO_TYPE`."""
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2

IMAGE, VIDEO = "image", "video"
MEDIA_KINDS = (IMAGE, VIDEO)
"""The kinds of media a sample can hold."""

# HF batch keys of the media tensors (which family reads which: regate_lightning.families).
PIXEL_VALUES = "pixel_values"
PIXEL_VALUES_IMAGES = "pixel_values_images"
PIXEL_VALUES_VIDEOS = "pixel_values_videos"
IMAGE_GRID_THW = "image_grid_thw"
VIDEO_GRID_THW = "video_grid_thw"
IMAGE_SIZES = "image_sizes"
"""int64 [N, 2]; the original (H, W) of each LLaVA-NeXT anyres image (its tiles depend on it)."""
SECOND_PER_GRID_TS = "second_per_grid_ts"
PIXEL_ATTENTION_MASK = "pixel_attention_mask"
"""SmolVLM: int64 [N, 1, H, W]; 1 on the real pixels of each image tile or video frame, 0 on padding."""
FRAME_INDEX = "frame_index"
"""SmolVLM, InternVL: int64 [N]; per tile or frame of ``pixel_values``, its frame number in its video (0 = a video's
first frame), -1 for an image's tile. These models take images and video frames alike, behind one placeholder
token; this package's data records which are frames of which video (the model ignores the key)."""
IMAGE_MERGE_SIZES = "image_merge_sizes"
VIDEO_MERGE_SIZES = "video_merge_sizes"
VIDEO_COMPRESSION_MASK = "video_compression_mask"
"""VideoLLaMA3: bool [sum of video tokens before compression]; the video tokens its processor keeps (the model
drops the others' features before placing them; they have no placeholder)."""
TOKEN_TYPE_IDS = "token_type_ids"
"""Gemma 3: int64 [B, L]; 1 at image placeholders (its image tokens attend to each other both ways), else 0."""

# Multiple-choice evaluation batches (one row per option; int64 [B]).
QUESTION_IDX = "question_idx"
OPTION_IDX = "option_idx"
ANSWER_IDX = "answer_idx"
NUM_OPTIONS = "num_options"
"""The question's number of options: a question is scored only when every one of them is in the batch."""
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

# Logged metric names. Evaluation metrics are named per stage ("val", "test"): build them with the helpers.
TRAIN_LOSS = "train/loss"
TRAIN_AUX_LOSS = "train/aux_loss"
"""A mixture-of-experts student's load-balancing loss (over the tokens its router saw); ``train/loss`` includes it."""
DATA_SKIPPED = "data/skipped"
"""Training records skipped by the data's ``on_error="skip"`` policy so far, each counted once."""
DATA_SKIPPED_EPOCH = "data/skipped_epoch"
"""Training samples skipped in the epoch that just ended."""
DATA_TRUNCATED = "data/truncated"
"""Training records cut to ``max_length`` (``overlong="truncate"``) so far, each counted once."""
VAL, TEST = "val", "test"
"""The evaluation stages, as metric prefixes."""
TRAIN = "train"
"""The training stage (the data module's skip reports are per stage)."""


def loss_metric(stage: str) -> str:
    """Mean loss of a stage's plain (not multiple-choice) batches, e.g. ``"val/loss"``."""
    return f"{stage}/loss"


def option_loss_metric(stage: str) -> str:
    """Mean loss of a stage's multiple-choice option tokens, e.g. ``"val/option_loss"``."""
    return f"{stage}/option_loss"


def skipped_questions_metric(stage: str) -> str:
    """Multiple-choice questions a stage's run left out (media that failed, an option over ``max_length``),
    e.g. ``"val/skipped_questions"``."""
    return f"{stage}/skipped_questions"


def acc_metric(stage: str, task: str | None = None) -> str:
    """Multiple-choice accuracy of a stage, overall (``"val/acc"``) or of one task (``"val/acc_colour"``).

    Example:
        >>> acc_metric("val"), acc_metric("test", "count")
        ('val/acc', 'test/acc_count')
    """
    return f"{stage}/acc" if task is None else f"{stage}/acc_{task}"


def media_gap_metric(stage: str, kind: str) -> str:
    """The media-reliance gap of a stage (:mod:`regate_lightning.reliance`), e.g. ``"val/video_gap"``.

    Example:
        >>> media_gap_metric("val", "video")
        'val/video_gap'
    """
    return f"{stage}/{kind}_gap"


def task_accuracies(metrics: Mapping[str, float], stage: str) -> dict[str, float]:
    """The per-task accuracies among logged ``metrics``, by task: the inverse of :func:`acc_metric`.

    Example:
        >>> task_accuracies({"val/acc": 0.5, "val/acc_count": 0.7, "test/acc_count": 0.1}, "val")
        {'count': 0.7}
    """
    prefix = acc_metric(stage, "")
    return {name.removeprefix(prefix): float(v) for name, v in metrics.items() if name.startswith(prefix)}


REGATE_PREFIX = "regate/"
"""Prefix of everything ``ReGATECallback`` logs."""
KEPT_FRAC = REGATE_PREFIX + "kept_frac"
"""Kept candidates / candidates in the step (all ranks); shown in the progress bar."""
ACTIVE_FRAC = REGATE_PREFIX + "active_frac"
"""Positions the decoder processed / non-padding positions."""
CUM_ACTIVE_TOKENS = REGATE_PREFIX + "cum_active_tokens"
CUM_TOKENS = REGATE_PREFIX + "cum_tokens"
CUM_SUPERVISED_TOKENS = REGATE_PREFIX + "cum_supervised_tokens"
MEAN_REF = REGATE_PREFIX + "mean_ref"
MEAN_EMA = REGATE_PREFIX + "mean_ema"
SPARSE_STEP = REGATE_PREFIX + "sparse_step"
TEACHER_CALLS = REGATE_PREFIX + "teacher_samples"
REPLACED_SAMPLES = REGATE_PREFIX + "replaced_samples"
"""Cumulative samples whose restored values (checkpoint or reference cache) belonged to other content and
were dropped and recomputed (all ranks)."""

# Keys of ``ReGATECallback.totals``: counters over the run, summed over ranks, saved in its checkpoint state.
ACTIVE = "active"
"""Positions the decoder processed."""
TOKENS = "tokens"
"""Non-padding positions (what the baseline processes)."""
SUPERVISED = "supervised"
"""Supervised targets whose loss was trained."""
TEACHER_SAMPLES = "teacher_samples"
"""Samples the teacher scored."""
CANDIDATES = "candidates"
"""Elision candidates seen."""
KEPT = "kept"
"""Candidates kept (computed by the student)."""
REPLACED = "replaced"
"""Samples whose restored values did not match their content and were recomputed."""
TOTALS = (ACTIVE, TOKENS, SUPERVISED, TEACHER_SAMPLES, CANDIDATES, KEPT, REPLACED)

VISUAL_PREFIX = "visual/"
"""Prefix of everything ``VisualTokenElision`` logs."""
VISUAL_KEPT_FRAC = VISUAL_PREFIX + "kept_frac"
"""Kept visual candidates / visual candidates in the step (all ranks); shown in the progress bar."""
VISUAL_ACTIVE_FRAC = VISUAL_PREFIX + "active_frac"
"""Positions the decoder processed / non-padding positions (every policy's elisions counted)."""
VISUAL_CUM_ACTIVE_TOKENS = VISUAL_PREFIX + "cum_active_tokens"
VISUAL_CUM_TOKENS = VISUAL_PREFIX + "cum_tokens"
VISUAL_CUM_VISUAL_TOKENS = VISUAL_PREFIX + "cum_visual_tokens"
VISUAL_CUM_KEPT_VISUAL_TOKENS = VISUAL_PREFIX + "cum_kept_visual_tokens"
VISUAL_SPARSE_STEP = VISUAL_PREFIX + "sparse_step"

# Keys of ``VisualTokenElision.totals`` (besides ACTIVE and TOKENS): summed over ranks, saved in its state.
VISUAL = "visual"
"""Visual candidates seen."""
VISUAL_KEPT = "visual_kept"
"""Visual candidates kept (processed by the decoder)."""
VISUAL_TOTALS = (ACTIVE, TOKENS, VISUAL, VISUAL_KEPT)
