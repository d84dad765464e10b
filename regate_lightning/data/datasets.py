"""Datasets over normalised records: conversations for training, multiple choice for evaluation.

Both decode their media lazily in ``__getitem__`` (so in DataLoader workers), turn them into the
model's tensors with the renderer's :class:`~regate_lightning.data.vision.VisionSpec` and render the
text with its :class:`~regate_lightning.data.render.ChatRenderer`. Every check that needs no decoding
runs in the constructor (see :mod:`regate_lightning.data.conversations`); with ``on_error="skip"`` a
media file that fails to decode makes ``__getitem__`` return ``None`` (counted in :attr:`counter`),
which :class:`~regate_lightning.data.collate.Collator` drops.

:class:`MultipleChoiceDataset` returns, per question, one sample per option: the question in the user
turn and the option as the assistant's answer, with labels on the option text only (no end-of-turn),
so that the sum of the option's token log-likelihoods scores it. Each sample carries ``question_idx``,
``option_idx``, ``answer_idx``, ``num_options`` and ``task`` (an index into
:attr:`MultipleChoiceDataset.task_names`), which the collator turns into int64 ``[B]`` batch entries.

**Sample keys.** ``sample_idx`` of a training sample is :func:`sample_key` of its record's identity
(:attr:`~regate_lightning.data.conversations.Record.key`), so it names the same record whatever other
records were read, skipped or accepted by the model family; :meth:`ConversationDataset.sample_name`
turns it back into the record's identity. An empty data set (every record unusable) is refused, naming
the file and the counts.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from regate_lightning.data.conversations import (
    MARKERS,
    ChoiceRecord,
    Media,
    Record,
    Turn,
    read_choice_records,
    read_records,
)
from regate_lightning.data.errors import (
    DataError,
    MediaError,
    OnError,
    SkipCounter,
    check_on_error,
    describe_counts,
)
from regate_lightning.data.render import ChatRenderer, Sample
from regate_lightning.data.video import FOLDER_FPS, Fit, Sampling, load_image, sample_video
from regate_lightning.data.vision import ProcessedMedia, VisionSpec
from regate_lightning.keys import ANSWER_IDX, NUM_OPTIONS, OPTION_IDX, QUESTION_IDX, TASK

OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class FrameSampling:
    """How videos are sampled and images and frames resized (see :mod:`regate_lightning.data.video`).

    Attributes:
        num_frames: frames per video (``"uniform"``) or their cap (``"fps"``).
        sample: ``"uniform"`` or ``"fps"``.
        fps: the rate for ``"fps"``.
        fit: ``"stretch"`` or ``"crop"`` resizing (to an explicit size).
        min_frames: the floor of ``"fps"`` sampling (a checkpoint's ``min_frames``), at most ``num_frames``.
        folder_fps: the frame rate of videos given as folders of frames.
    """

    num_frames: int = 8
    sample: Sampling = "uniform"
    fps: float | None = None
    fit: Fit = "stretch"
    min_frames: int = 1
    folder_fps: float = FOLDER_FPS

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"`num_frames` must be >= 1, got {self.num_frames}")
        if not 1 <= self.min_frames <= self.num_frames:
            raise ValueError(f"`min_frames` must be in [1, num_frames={self.num_frames}], got {self.min_frames}")
        if self.sample not in ("uniform", "fps"):
            raise ValueError(f"`sample` must be 'uniform' or 'fps', got {self.sample!r}")
        if (self.sample == "fps") != (self.fps is not None):
            raise ValueError(f"`fps` must be given with sample='fps' only, got sample={self.sample!r}, fps={self.fps}")
        if not self.folder_fps > 0:
            raise ValueError(f"`folder_fps` must be > 0, got {self.folder_fps}")


def sample_key(identity: str) -> int:
    """The ``sample_idx`` of a record: a 63-bit hash (BLAKE2b) of its identity string, the same everywhere.

    Example:
        >>> sample_key("id 42") == sample_key("id 42") != sample_key("id 43")
        True
        >>> 0 <= sample_key("at train.jsonl:7") < 2**63
        True
    """
    return int.from_bytes(hashlib.blake2b(identity.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def unique_identities(records: Sequence[Record | ChoiceRecord]) -> list[str]:
    """Each record's identity (its ``key``, else ``"id <id>"``), with ``"#k"`` appended to the k-th repeat."""
    seen: dict[str, int] = {}
    out = []
    for record in records:
        base = record.key or f"id {record.id}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return out


@dataclass(frozen=True)
class DecodedMedia:
    """One image or video, decoded, sampled and resized, before normalisation.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        pixels: uint8 ``[3, H, W]`` (image) or ``[T, 3, H, W]`` (video).
        fps: frames per second of the sampled frames (videos), else None.
        times: float64 ``[T]``, each sampled frame's time in seconds (videos), else None.
        duration: the clip's length in seconds (videos), else None.
        frame_seconds: each sampled frame's time in its source video (frame index / source fps; videos),
            else None (Qwen3-VL's timestamps).
    """

    kind: str
    pixels: torch.Tensor
    fps: float | None = None
    times: torch.Tensor | None = None
    duration: float | None = None
    frame_seconds: tuple[float, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the pixels."""
        return self.pixels.numel() * self.pixels.element_size()


def decode_media(media: Media, spec: VisionSpec, frames: FrameSampling) -> DecodedMedia:
    """Decode one image or video file, sample its frames and resize them to the model's size.

    Raises:
        MediaError: the file is missing or does not decode.
    """
    if media.kind == "image":
        return DecodedMedia("image", load_image(media.path, spec.size, frames.fit))
    video = sample_video(
        media.path,
        frames.num_frames,
        frames.sample,
        frames.fps,
        spec.size,
        frames.fit,
        frames.min_frames,
        frames.folder_fps,
    )
    return DecodedMedia("video", video.frames, video.sampled_fps, video.times, video.duration, video.frame_seconds)


def process_media(decoded: DecodedMedia, spec: VisionSpec) -> ProcessedMedia:
    """Turn decoded pixels into the model family's tensors and placeholder count."""
    if decoded.kind == "image":
        return spec.process_image(decoded.pixels)
    return spec.process_video(decoded.pixels, decoded.fps, decoded.times, decoded.duration, decoded.frame_seconds)


def load_media(media: Media, spec: VisionSpec, frames: FrameSampling) -> ProcessedMedia:
    """Decode one image or video and turn it into the model's tensors.

    Args:
        media: kind and path.
        spec: the model family's layout.
        frames: the sampling and resizing rule.

    Returns:
        The processed media.

    Raises:
        MediaError: the file is missing or does not decode.
    """
    return process_media(decode_media(media, spec, frames), spec)


class MediaCache:
    """Decoded media kept in memory, so that each file is decoded once per process, not once per epoch.

    Entries are the decoded, sampled and resized uint8 pixels (:class:`DecodedMedia`; normalisation runs
    on every read, it is cheap and would take 4x the memory as float32). An entry is keyed by the file's
    path, size and modification time, so a file that changes is decoded again. When the entries exceed
    ``max_bytes`` the least recently used are dropped. In DataLoader workers each worker holds its own
    cache (use ``persistent_workers`` so that it outlives the epoch).

    Args:
        max_bytes: the most bytes of pixels to keep (``> 0``).

    Example:
        >>> cache = MediaCache(max_bytes=1 << 20)
        >>> len(cache), cache.nbytes
        (0, 0)
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"`max_bytes` must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, DecodedMedia] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, media: Media, spec: VisionSpec, frames: FrameSampling) -> DecodedMedia:
        """The decoded media, from the cache or decoded now (and kept)."""
        stat = os.stat(media.path) if os.path.exists(media.path) else None
        key = (str(media.path), media.kind, stat and stat.st_size, stat and stat.st_mtime_ns, spec.size, frames)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return found
        decoded = decode_media(media, spec, frames)
        self.misses += 1
        if decoded.nbytes <= self.max_bytes:
            self._entries[key] = decoded
            self.nbytes += decoded.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= dropped.nbytes
        return decoded


class _MediaDataset(Dataset):
    """Shared policy of both datasets: eager checks, lazy decoding (optionally cached), ``on_error``."""

    def __init__(
        self,
        renderer: ChatRenderer,
        frames: FrameSampling,
        on_error: OnError,
        counter: SkipCounter | None,
        media_cache: MediaCache | None = None,
    ):
        check_on_error(on_error)
        self.renderer = renderer
        self.frames = frames
        self.on_error = on_error
        self.counter = counter if counter is not None else SkipCounter()
        self.media_cache = media_cache

    def _load(self, media: Media) -> ProcessedMedia:
        """Decode (or take from the cache) and process one media item."""
        spec = self.renderer.spec
        if self.media_cache is None:
            return load_media(media, spec, self.frames)
        return process_media(self.media_cache.get(media, spec, self.frames), spec)

    def _supported(self, records: Sequence[Record | ChoiceRecord], name: str) -> list:
        """The records whose media the family takes; refuses an empty result, naming ``name`` and why."""
        kept = []
        refused: dict[str, int] = {}
        for record in records:
            media = record.media if isinstance(record, Record) else (record.media,)
            reasons = [self.renderer.spec.accepts(m.kind) for m in media]
            reason = next((r for r in reasons if r), "")
            if not reason:
                kept.append(record)
                continue
            error = DataError(f"{record.source or record.id}: {reason}", "unsupported_media")
            if self.on_error == "raise":
                raise error
            refused["unsupported_media"] = refused.get("unsupported_media", 0) + 1
            self.counter.skip(error)
        if not kept:
            why = (
                f"none of its {len(records)} records can be used ({describe_counts(refused)}); the warnings above "
                "say why"
                if records
                else "no records"
            )
            raise DataError(f"{name}: {why}", "unsupported_media" if refused else "bad_record")
        self.counter.track(len(kept))
        return kept

    def _fail(self, index: int, record: Record | ChoiceRecord, err: DataError) -> None:
        where = record.source or f"id {record.id}"
        error = type(err)(f"{where}: {err}", err.reason)
        if self.on_error == "raise":
            raise error from err
        self.counter.skip(error, index=index)


class ConversationDataset(_MediaDataset):
    """Training samples from conversation records (LLaVA / VideoLLaMA2 or HF messages format).

    Args:
        records: an annotation file (JSON list or JSONL) or already normalised records.
        renderer: renders with the student's tokenizer and :class:`VisionSpec`.
        frames: video sampling and resizing; default 8 uniform frames, stretched.
        media_root: folder for relative media paths (files only); default the file's folder.
        on_error: ``"raise"`` or ``"skip"`` (see :mod:`regate_lightning.data.conversations`).
        counter: where skips are counted; a new one by default (:attr:`counter`).
        check_media: whether the constructor checks that media files exist.
        media_cache: keep decoded media in memory across epochs (:class:`MediaCache`); None decodes every time.
    """

    def __init__(
        self,
        records: str | os.PathLike[str] | Sequence[Record],
        renderer: ChatRenderer,
        frames: FrameSampling | None = None,
        media_root: str | os.PathLike[str] | None = None,
        on_error: OnError = "raise",
        counter: SkipCounter | None = None,
        check_media: bool = True,
        media_cache: MediaCache | None = None,
    ) -> None:
        super().__init__(renderer, frames or FrameSampling(), on_error, counter, media_cache)
        name = "the records given"
        if isinstance(records, (str, os.PathLike)):
            name = str(records)
            records = read_records(records, media_root, on_error, self.counter, check_media)
        self.records: list[Record] = self._supported(records, name)
        self.identities: list[str] = unique_identities(self.records)
        self.keys: list[int] = [sample_key(identity) for identity in self.identities]
        self._names = dict(zip(self.keys, self.identities, strict=True))
        if len(self._names) != len(self.keys):  # two identities with one 63-bit hash: never seen, but refused
            raise ValueError(f"{name}: two records share a sample key; give them distinct ids")

    def __len__(self) -> int:
        return len(self.records)

    def sample_name(self, key: int) -> str:
        """The identity of the record whose ``sample_idx`` is ``key`` (e.g. ``"id train-00089"``)."""
        return self._names.get(int(key), str(key))

    def __getitem__(self, index: int) -> Sample | None:
        """Decode and render sample ``index``; ``None`` if it fails under ``on_error="skip"``."""
        record = self.records[index]
        try:
            media = [self._load(m) for m in record.media]
            return self.renderer.render(
                record.turns,
                media,
                sample_idx=self.keys[index],
                record_id=record.id,
                index=index,
                source=record.source or f"id {record.id}",
            )
        except (MediaError, DataError) as err:
            self._fail(index, record, err)
            return None


class MultipleChoiceDataset(_MediaDataset):
    """MVBench-style evaluation: one sample per option, labels on the option text only.

    Args:
        records: a multiple-choice file (see :func:`~regate_lightning.data.conversations.read_choice_records`)
            or records.
        renderer: renders with the student's tokenizer and :class:`VisionSpec`.
        frames: video sampling and resizing.
        list_options: also list the lettered options in the question (``"(A) red"`` ...).
        task_names: the task vocabulary (ids are indices into it); default the sorted tasks of the records.
        media_root: folder for relative media paths (files only).
        on_error: ``"raise"`` or ``"skip"``.
        counter: where skips are counted.
        check_media: whether the constructor checks that media files exist.
        media_cache: keep decoded media in memory across epochs (:class:`MediaCache`); None decodes every time.
    """

    def __init__(
        self,
        records: str | os.PathLike[str] | Sequence[ChoiceRecord],
        renderer: ChatRenderer,
        frames: FrameSampling | None = None,
        list_options: bool = False,
        task_names: Sequence[str] | None = None,
        media_root: str | os.PathLike[str] | None = None,
        on_error: OnError = "raise",
        counter: SkipCounter | None = None,
        check_media: bool = True,
        media_cache: MediaCache | None = None,
    ) -> None:
        super().__init__(renderer, frames or FrameSampling(), on_error, counter, media_cache)
        name = "the records given"
        if isinstance(records, (str, os.PathLike)):
            name = str(records)
            records = read_choice_records(records, media_root, on_error, self.counter, check_media)
        self.records: list[ChoiceRecord] = self._supported(records, name)
        self.task_names: tuple[str, ...] = tuple(task_names or sorted({r.task for r in self.records}))
        unknown = {r.task for r in self.records} - set(self.task_names)
        if unknown:
            raise ValueError(f"`task_names` lacks the tasks {sorted(unknown)} found in the records")
        if list_options and max((len(r.options) for r in self.records), default=0) > len(OPTION_LETTERS):
            raise ValueError(f"`list_options` supports at most {len(OPTION_LETTERS)} options")
        self.list_options = list_options

    def __len__(self) -> int:
        return len(self.records)

    def question_text(self, record: ChoiceRecord) -> str:
        """The user turn: marker, question and, with ``list_options``, the lettered options."""
        text = f"{MARKERS[record.media.kind]}\n{record.question}"
        if self.list_options:
            text += "\n" + "\n".join(f"({OPTION_LETTERS[i]}) {o}" for i, o in enumerate(record.options))
        return text

    def __getitem__(self, index: int) -> list[Sample] | None:
        """One sample per option of question ``index``; ``None`` if it fails under ``on_error="skip"``."""
        record = self.records[index]
        try:
            media = [self._load(record.media)]
            question = Turn("user", self.question_text(record))
            samples = []
            for j, option in enumerate(record.options):
                sample = self.renderer.render(
                    [question, Turn("assistant", option)],
                    media,
                    sample_idx=index,
                    record_id=record.id,
                    end_of_turn=False,
                    index=index,
                    source=record.source or f"id {record.id}",
                )
                sample.extras = {
                    QUESTION_IDX: index,
                    OPTION_IDX: j,
                    ANSWER_IDX: record.answer,
                    NUM_OPTIONS: len(record.options),
                    TASK: self.task_names.index(record.task),
                }
                samples.append(sample)
            return samples
        except (MediaError, DataError) as err:
            self._fail(index, record, err)
            return None
