"""Collating rendered samples into a batch of the HF model's own keys.

A batch holds exactly: ``input_ids`` int64 ``[B, L]``, ``attention_mask`` int64 ``[B, L]``, ``labels``
int64 ``[B, L]`` (``-100`` on padding), ``mm_token_type_ids`` int64 ``[B, L]`` (Qwen2-VL families only),
the media tensors of the family (``pixel_values``, ``pixel_values_videos``, ``image_grid_thw``, ...,
each concatenated on dim 0 over the batch in sample order, which is the order in which the model
assigns features to placeholders), ``sample_idx`` int64 ``[B]``, and the samples' extras (int64 ``[B]``,
e.g. the multiple-choice ids). Padding is on the right with the tokenizer's pad id.

**Dropped samples.** ``None`` items (samples whose media failed under ``on_error="skip"``; the dataset
counted them) are dropped; a list item (one question's options) is flattened, and kept whole or not at
all: a question is never truncated (a cut option would be scored on the tokens that happened to fit),
so if one option is longer than ``max_length`` the whole question is left out and counted once as
``overlong`` under ``"truncate"`` and ``"skip"``, and raises under ``"raise"``. If nothing is left, the
collator returns ``None``; :class:`NonEmptyDataLoader` leaves such batches out, so the trainer never
sees them (Lightning would count one as a step in its logs' ``step`` column without training on it).
Under several processes a rank cannot leave a step out alone (DDP synchronises every step): there an
empty batch stops the run with an error that says so.

**Videos of different lengths** (``fps`` sampling) are batched by
:func:`~regate_lightning.data.vision.join_media`.

**max_length** (:func:`fit_length`) never cuts through visual tokens. A sample longer than
``max_length`` is, by ``overlong``:

- ``"truncate"``: cut to ``max_length`` if every visual token stays and at least one supervised label
  remains at a position ``>= 1`` (a label at position 0 is never a target), counted in
  :meth:`SkipCounter.truncated <regate_lightning.data.errors.SkipCounter.truncated>` (``data/truncated``)
  with the first one logged by name; otherwise it is skipped and counted as ``overlong``;
- ``"skip"``: skipped and counted as ``overlong``;
- ``"raise"``: :class:`~regate_lightning.data.errors.DataError` naming the file, line and record id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from regate_lightning.data.errors import DataError, SkipCounter
from regate_lightning.data.render import Sample
from regate_lightning.data.vision import join_media
from regate_lightning.keys import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    SAMPLE_IDX,
)

Overlong = Literal["truncate", "skip", "raise"]
OVERLONG_CHOICES: tuple[str, ...] = ("truncate", "skip", "raise")


def fit_length(sample: Sample, max_length: int, overlong: Overlong = "truncate") -> Sample | None:
    """Apply the ``max_length`` policy to one sample (see the module docstring).

    Args:
        sample: a rendered sample.
        max_length: the longest sequence allowed.
        overlong: ``"truncate"``, ``"skip"`` or ``"raise"``.

    Returns:
        The sample (truncated if needed), or ``None`` if it must be skipped.

    Raises:
        DataError: the sample is too long and ``overlong == "raise"``.
    """
    length = len(sample)
    if length <= max_length:
        return sample
    if overlong == "truncate":
        keeps_visual = sample.visual_end <= max_length
        keeps_answer = bool((sample.labels[1:max_length] != IGNORE_INDEX).any())
        if keeps_visual and keeps_answer:
            return dataclasses.replace(
                sample,
                input_ids=sample.input_ids[:max_length],
                labels=sample.labels[:max_length],
                token_types=sample.token_types[:max_length],
            )
        return None
    if overlong == "skip":
        return None
    raise DataError(
        f"{_name(sample)}: {length} tokens > max_length {max_length} (visual tokens end at "
        f"{sample.visual_end}); raise `max_length`, use fewer frames, or set overlong='truncate'/'skip'",
        "overlong",
    )


def _name(sample: Sample) -> str:
    """The sample as messages name it: its file, line and record id when known."""
    return sample.source or f"sample {sample.sample_idx}"


class Collator:
    """Pads and stacks :class:`~regate_lightning.data.render.Sample` objects into an HF batch.

    Args:
        pad_token_id: the pad id, or a tokenizer (its ``pad_token_id``, else its ``eos_token_id``).
        max_length: the longest sequence allowed; ``None`` for no limit.
        overlong: what to do with longer samples: ``"truncate"``, ``"skip"`` or ``"raise"``.
        counter: where skipped samples are counted; a new one by default (:attr:`counter`).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(
        self,
        pad_token_id: int | Any,
        max_length: int | None = None,
        overlong: Overlong = "truncate",
        counter: SkipCounter | None = None,
        pad_to_multiple_of: int = 1,
    ) -> None:
        if not isinstance(pad_token_id, int):
            tok = pad_token_id
            pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; pass `pad_token_id`")
        if max_length is not None and max_length < 2:
            raise ValueError(f"`max_length` must be >= 2 or None, got {max_length}")
        if overlong not in OVERLONG_CHOICES:
            raise ValueError(f"`overlong` must be one of {OVERLONG_CHOICES}, got {overlong!r}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"`pad_to_multiple_of` must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.overlong = overlong
        self.counter = counter if counter is not None else SkipCounter()
        self.pad_to_multiple_of = pad_to_multiple_of

    def _flatten(self, items: Sequence[Sample | Sequence[Sample] | None]) -> list[Sample]:
        samples: list[Sample] = []
        for item in items:
            if item is None:
                continue
            question = not isinstance(item, Sample)
            group = list(item) if question else [item]
            # A question is scored whole or not at all, and never on options cut short.
            policy: Overlong = "skip" if question and self.overlong == "truncate" else self.overlong
            fitted = [self._fit(sample, policy) for sample in group]
            dropped = [s for s, f in zip(group, fitted, strict=True) if f is None]
            index = group[0].index if group and group[0].index >= 0 else None
            if dropped:
                first = dropped[0]
                why = "a question is never truncated" if question else "it cannot be truncated"
                what = "the question (all its options)" if question else "the sample"
                self.counter.skip(
                    DataError(
                        f"{_name(first)}: {len(first)} tokens > max_length {self.max_length} and {why}; {what} "
                        "is left out",
                        "overlong",
                    ),
                    index=index,
                )
                continue
            for before, after in zip(group, fitted, strict=True):
                if after is not None and len(after) < len(before):
                    kept = int((after.labels != IGNORE_INDEX).sum())
                    total = int((before.labels != IGNORE_INDEX).sum())
                    self.counter.truncate(
                        f"{_name(before)}: {len(before)} tokens > max_length {self.max_length}: cut to "
                        f"{len(after)} ({kept} of its {total} supervised tokens kept)",
                        index=index,
                    )
            samples += [f for f in fitted if f is not None]
        return samples

    def _fit(self, sample: Sample, overlong: Overlong) -> Sample | None:
        return sample if self.max_length is None else fit_length(sample, self.max_length, overlong)

    def __call__(self, items: Sequence[Sample | Sequence[Sample] | None]) -> dict[str, torch.Tensor] | None:
        """Collate a list of samples (``None`` and lists of samples allowed).

        Returns:
            The batch (see the module docstring), or ``None`` when every sample was dropped.
        """
        samples = self._flatten(items)
        if not samples:
            return None
        length = max(len(s) for s in samples)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.int64)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.int64)
        attention = torch.zeros((batch_size, length), dtype=torch.int64)
        types = torch.zeros((batch_size, length), dtype=torch.int64)
        for row, s in enumerate(samples):
            n = len(s)
            input_ids[row, :n] = s.input_ids
            labels[row, :n] = s.labels
            attention[row, :n] = 1
            types[row, :n] = s.token_types
        batch = {INPUT_IDS: input_ids, ATTENTION_MASK: attention, LABELS: labels}
        if any(s.emit_token_types for s in samples):
            batch[next(s.token_types_key for s in samples if s.emit_token_types)] = types
        frame_keys = tuple(k for s in samples for k in s.frame_keys)
        for key in dict.fromkeys(k for s in samples for k in s.media):
            batch[key] = join_media(key, [s.media[key] for s in samples if key in s.media], frame_keys)
        batch[SAMPLE_IDX] = torch.tensor([s.sample_idx for s in samples], dtype=torch.int64)
        for key in dict.fromkeys(k for s in samples for k in s.extras):
            batch[key] = torch.tensor([s.extras.get(key, -1) for s in samples], dtype=torch.int64)
        return batch


class NonEmptyDataLoader(DataLoader):
    """A ``DataLoader`` that leaves out the batches its collator returned as ``None`` (every sample skipped).

    It takes ``DataLoader``'s arguments, so Lightning re-creates it with a distributed sampler as it does
    any ``DataLoader``. Its length is the number of batches before any is left out; :attr:`batches_read` counts
    the batches of the current iteration read so far, those left out included.

    Raises:
        RuntimeError: (while iterating) an empty batch under several processes, where one rank cannot
            leave out a step that the others take.
    """

    batches_read = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.batches_read = 0
        for batch in super().__iter__():
            self.batches_read += 1
            if batch is not None:
                yield batch
            elif (
                torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and (torch.distributed.get_world_size() > 1)
            ):
                raise RuntimeError(
                    "every sample of a training batch was skipped by the data's on_error='skip' policy on one "
                    "process; under several processes every rank must run every step (DDP synchronises them), so "
                    "fix or remove the bad records (the warnings name them), or use a larger batch size"
                )
