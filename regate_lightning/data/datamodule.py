"""LightningDataModules over conversation data: user files, and the embedded synthetic video QA set.

``ConversationDataModule`` reads a training file in the LLaVA / VideoLLaMA2 or HF ``messages`` format
and, optionally, one or more multiple-choice validation files (MVBench style), each with its own media
folder if need be (:class:`DataFile`); it renders them with the student's tokenizer and its chat
template, decodes media lazily in DataLoader workers and collates into the student's own keys plus
``labels`` and ``sample_idx``. The student's vision layout
(:class:`~regate_lightning.data.vision.VisionSpec`) is read from the attached module's model in
``setup``, so a recipe never repeats image sizes or placeholder counts.

**From the student's checkpoint.** When the student was loaded from an HF id or a folder (its
``name_or_path``), ``setup`` takes from there, unless overridden: the tokenizer (``tokenizer:`` overrides
it), the chat template (the checkpoint's processor template ``chat_template.json`` /
``chat_template.jinja``, else the tokenizer's own; with ``tokenizer:`` both are looked up there), the
image and video preprocessing (:mod:`regate_lightning.data.processors`; ``frame_size:`` overrides the
resize rule) and the frame sampling defaults (its video processor's ``num_frames``, or ``fps`` with
``min_frames`` / ``max_frames``; ``num_frames:`` / ``fps:`` override them).

Skipped inputs (``on_error="skip"``) are counted per epoch and in total, each record once
(:meth:`ConversationDataModule.report_skips`); an epoch in which every training sample was skipped
stops the run, naming the file.

``SyntheticVideoQADataModule`` generates the embedded default set on first use (see
:mod:`regate_lightning.data.synthetic`) and then behaves the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from regate_lightning._imports import import_object, is_dotted_path
from regate_lightning.data.batching import ResumableDataLoader, check_batching, make_batch_sampler, sample_lengths
from regate_lightning.data.collate import Collator, NonEmptyDataLoader
from regate_lightning.data.conversations import ChoiceRecord, read_choice_records
from regate_lightning.data.datasets import ConversationDataset, FrameSampling, MediaCache, MultipleChoiceDataset
from regate_lightning.data.errors import DataError, SkipCounter, describe_counts
from regate_lightning.data.processors import chat_template_of, checkpoint_of, frames_for_video
from regate_lightning.data.render import ChatRenderer
from regate_lightning.data.synthetic import ensure_synthetic, synthetic_task, synthetic_tokenizer
from regate_lightning.data.video import FOLDER_FPS
from regate_lightning.data.vision import VisionSpec
from regate_lightning.keys import TRAIN, VAL

log = logging.getLogger("regate_lightning.data")


@dataclass(frozen=True)
class DataFile:
    """An annotation file with its own media folder (and, for multiple choice, its task name).

    In a recipe: ``{path: mvbench/json/action_sequence.json, media_root: mvbench/video/star/Charades_v1_480}``.

    A ``DataFile`` is path-like (``os.fspath`` gives its ``path``). That also tells the recipe parser
    (jsonargparse) that ``train_file`` and ``val_file`` name files: a string there stays the file's path,
    where the parser would otherwise read a JSON or YAML file it names as the value itself (a task file of N
    questions became N copies of its path).

    Attributes:
        path: the annotation file.
        media_root: folder of its relative media paths; default the data module's ``media_root``, else the
            file's own folder.
        task: multiple choice: the task of its records that have no ``task`` field; default the file's name
            without extension.
    """

    path: str
    media_root: str | None = None
    task: str | None = None

    def __fspath__(self) -> str:
        """The annotation file's path."""
        return self.path


@dataclass(frozen=True)
class SkipReport:
    """Skipped inputs of one stage, by reason.

    Attributes:
        period: skips since the stage's previous report (one training epoch, one validation run).
        total: every record skipped so far, each once (those dropped while reading the file included).
        truncated: records cut to ``max_length`` so far (``overlong="truncate"``, training only), each once.
    """

    period: dict[str, int]
    total: dict[str, int]
    truncated: int = 0


def _as_file(value: str | os.PathLike[str] | DataFile | dict[str, Any], default_root: str | None) -> DataFile:
    if isinstance(value, dict):
        file = DataFile(**value)
    elif isinstance(value, DataFile):
        file = value
    else:
        file = DataFile(os.fspath(value) if isinstance(value, os.PathLike) else value)
    if not isinstance(file.path, str) or not file.path:
        raise ValueError(f"a data file needs a `path`, got {value!r}")
    return file if file.media_root is not None else dataclasses.replace(file, media_root=default_root)


def load_tokenizer(spec: str) -> Any:
    """A tokenizer by HF id, local folder, or dotted path of a factory (``regate_lightning.testing.byte_tokenizer``)."""
    if not os.path.isdir(spec) and is_dotted_path(spec):
        return import_object(spec, "tokenizer")()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


class ConversationDataModule(pl.LightningDataModule):
    """Instruction-tuning data from annotation files, for any supported student.

    Args:
        train_file: conversations (JSON list or JSONL; LLaVA or HF ``messages`` format): a path or a
            :class:`DataFile` (path and media folder).
        val_file: multiple-choice questions for validation (see ``read_choice_records``): a path, a
            :class:`DataFile`, a list of them (e.g. MVBench's 20 task files), or None. One path is one file,
            also on the command line and in YAML (the parser does not read the file it names).
        media_root: folder of relative media paths of files without their own; default each file's folder.
        tokenizer: the tokenizer (and chat template) to use instead of the student checkpoint's: HF id,
            local folder, or dotted path of a factory (``regate_lightning.testing.byte_tokenizer`` for the
            tiny test models); required when the student was not loaded from an HF id or folder.
        num_frames: frames per video (uniform sampling, or the cap with ``fps``); default the student
            checkpoint's, else 8.
        fps: sample videos at this rate instead of uniformly (clips of different lengths batch together);
            default the student checkpoint's, if any.
        frame_size: ``[H, W]`` every image and frame is resized to, instead of the checkpoint's resize
            rule: a multiple of patch x merge for Qwen2-VL; the tower's size for LLaVA families.
        folder_fps: frame rate of videos given as folders of frames.
        batch_size: training samples per batch.
        val_batch_questions: questions per validation batch (each contributes one row per option).
        num_workers: DataLoader worker processes (media decoding runs there).
        media_cache_mb: keep up to this many MiB of decoded frames in memory per process (each worker has its
            own; workers persist across epochs), so that a file is decoded once, not once per epoch; 0 = off.
            Decoded uint8 frames take ``T * 3 * H * W`` bytes per clip (4 frames of 64x64: 48 KiB).
        max_length: longest sequence; never cut through visual tokens (see ``overlong``).
        overlong: ``"truncate"`` (the text after the last visual token), ``"skip"`` or ``"raise"``. A
            multiple-choice question with an option that does not fit is left out whole.
        on_error: bad records and media: ``"raise"`` (a clear error naming the record) or ``"skip"``
            (counted, logged, and reported at every epoch end: per epoch and in total).
        list_options: list the lettered options in the multiple-choice question.
        system_prompt: a system turn for conversations that have none.
        batching: how training samples form batches: ``"random"`` (``batch_size`` random samples),
            ``"length_grouped"`` (``batch_size`` samples of similar length) or ``"token_budget"`` (as many
            samples as fit ``max_tokens``); both length-aware ones are DDP-aware and resume mid-epoch
            (:mod:`regate_lightning.data.batching`). They need every sample's length: ``setup`` loads each
            training sample once for it (media decoded, in ``num_workers`` workers).
        max_tokens: ``"token_budget"``: the most padded positions (samples x longest) in one batch of one rank;
            ``batch_size`` then caps the samples per batch.
        group_size: ``"length_grouped"``: batches sorted together (a larger group: more alike lengths).
    """

    def __init__(
        self,
        train_file: str | DataFile,
        val_file: str | DataFile | list[str | DataFile] | None = None,
        media_root: str | None = None,
        tokenizer: str | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        frame_size: list[int] | None = None,
        folder_fps: float = FOLDER_FPS,
        batch_size: int = 4,
        val_batch_questions: int = 4,
        num_workers: int = 0,
        media_cache_mb: int = 0,
        max_length: int | None = 2048,
        overlong: str = "truncate",
        on_error: str = "raise",
        list_options: bool = False,
        system_prompt: str | None = None,
        batching: str = "random",
        max_tokens: int | None = None,
        group_size: int = 50,
    ) -> None:
        super().__init__()
        check_batching(batching, max_tokens, group_size)
        for name, value in (("batch_size", batch_size), ("val_batch_questions", val_batch_questions)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if media_cache_mb < 0:
            raise ValueError(f"`media_cache_mb` must be >= 0 (0 = no cache), got {media_cache_mb}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"`num_frames` must be >= 1, got {num_frames}")
        if fps is not None and fps <= 0:
            raise ValueError(f"`fps` must be > 0, got {fps}")
        self.train_file = train_file
        self.val_file = val_file
        self.media_root = media_root
        self.tokenizer_name = tokenizer
        self.num_frames = num_frames
        self.fps = fps
        self.folder_fps = folder_fps
        self.frames = FrameSampling(**frames_for_video(None, fps, num_frames), folder_fps=folder_fps)
        self.frame_size = tuple(frame_size) if frame_size else None
        self.batch_size = batch_size
        self.val_batch_questions = val_batch_questions
        self.num_workers = num_workers
        self.media_cache = MediaCache(media_cache_mb << 20) if media_cache_mb else None
        self.max_length = max_length
        self.overlong = overlong
        self.on_error = on_error
        self.list_options = list_options
        self.system_prompt = system_prompt
        self.batching = batching
        self.max_tokens = max_tokens
        self.group_size = group_size
        self.train_lengths: list[int] | None = None
        self.counter = SkipCounter()
        self.val_counter = SkipCounter()
        self._marks = {TRAIN: self.counter.snapshot(), VAL: self.val_counter.snapshot()}
        self.tokenizer: Any = None
        self.renderer: ChatRenderer | None = None
        self.train_set: ConversationDataset | None = None
        self.val_set: MultipleChoiceDataset | None = None
        self.task_names: list[str] = []

    def train_files(self) -> DataFile:
        """The training file, with its media folder."""
        return _as_file(self.train_file, self.media_root)

    def val_files(self) -> list[DataFile]:
        """The validation files, each with its media folder and task."""
        if not self.val_file:
            return []
        files = self.val_file if isinstance(self.val_file, (list, tuple)) else [self.val_file]
        return [_as_file(f, self.media_root) for f in files]

    def tokenizer_source(self) -> str | None:
        """Where the tokenizer and chat template come from: ``tokenizer``, else the student's checkpoint."""
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        module = self.trainer.lightning_module if self.trainer is not None else None
        return checkpoint_of(module.model) if module is not None else None

    def load_tokenizer(self) -> Any:
        """The tokenizer of :meth:`tokenizer_source`."""
        source = self.tokenizer_source()
        if source is None:
            raise ValueError(
                "`tokenizer` is required: the student was built in memory (not loaded from an HF id or folder), "
                "so give the HF id, folder or factory path of its tokenizer (for the tiny test models: "
                "regate_lightning.testing.byte_tokenizer)"
            )
        try:
            return load_tokenizer(source)
        except (OSError, ValueError) as err:
            where = "`tokenizer`" if self.tokenizer_name is not None else "the student checkpoint"
            raise ValueError(
                f"cannot load a tokenizer from {where} {source} ({type(err).__name__}: {err}); "
                "set `tokenizer` to the HF id or path of the student's tokenizer"
            ) from err

    def load_chat_template(self) -> str | None:
        """The processor chat template of :meth:`tokenizer_source`; None lets the tokenizer's own apply."""
        source = self.tokenizer_source()
        if source is None or (not os.path.isdir(source) and is_dotted_path(source)):
            return None
        return chat_template_of(source)

    def setup(self, stage: str) -> None:
        """Build the data sets for the attached module's student (reads its vision layout)."""
        if self.train_set is not None:
            return
        if self.trainer is None or self.trainer.lightning_module is None:
            raise RuntimeError(
                f"{type(self).__name__} reads the student's layout: attach it to a Trainer with a module"
            )
        self.tokenizer = self.load_tokenizer()
        student = self.trainer.lightning_module.model
        spec = VisionSpec.from_model(student, size=self.frame_size)
        if spec.processor is not None:
            self.frames = FrameSampling(
                **frames_for_video(spec.processor.video_settings, self.fps, self.num_frames),
                folder_fps=self.folder_fps,
            )
        elif checkpoint_of(student) is not None:
            rank_zero_warn(
                f"the student checkpoint {checkpoint_of(student)} has no processor configs that can be read "
                "(preprocessor_config.json, video_preprocessor_config.json, processor_config.json): the built-in "
                "preprocessing applies (one frame size, CLIP mean/std); see docs/data.md"
            )
        self.renderer = ChatRenderer(
            self.tokenizer, spec, chat_template=self.load_chat_template(), system_prompt=self.system_prompt
        )
        train = self.train_files()
        self.train_set = ConversationDataset(
            train.path,
            self.renderer,
            self.frames,
            train.media_root,
            self.on_error,
            self.counter,
            media_cache=self.media_cache,
        )
        if self.batching != "random":
            self.train_lengths = sample_lengths(self.train_set, self.max_length, self.num_workers)
        files = self.val_files()
        if files:
            records: list[ChoiceRecord] = []
            for file in files:
                records += read_choice_records(
                    file.path, file.media_root, self.on_error, self.val_counter, task=file.task
                )
            self.val_set = MultipleChoiceDataset(
                records,
                self.renderer,
                self.frames,
                list_options=self.list_options,
                on_error=self.on_error,
                counter=self.val_counter,
                media_cache=self.media_cache,
            )
            self.task_names = list(self.val_set.task_names)
        for name, counter in ((train.path, self.counter), (", ".join(f.path for f in files), self.val_counter)):
            if counter.total:
                log.warning(
                    "data: skipped %d records of %s while reading: %s",
                    counter.total,
                    name,
                    describe_counts(counter.counts()),
                )
        self._marks = {TRAIN: self.counter.snapshot(), VAL: self.val_counter.snapshot()}

    def _collator(self, counter: SkipCounter) -> Collator:
        return Collator(self.tokenizer, max_length=self.max_length, overlong=self.overlong, counter=counter)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (of ``batching``); a batch whose every sample was skipped is left out."""
        if self.train_lengths is not None:
            sampler = make_batch_sampler(
                self.batching,
                self.train_lengths,
                self.batch_size,
                self.max_tokens,
                self.group_size,
                seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),  # seed_everything's, as Lightning's samplers
            )
            return ResumableDataLoader(
                self.train_set,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=self._collator(self.counter),
                persistent_workers=self.num_workers > 0,
            )
        return NonEmptyDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=self._collator(self.counter),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Multiple-choice batches: whole questions, every option of a question in the same batch."""
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_questions,
            num_workers=self.num_workers,
            collate_fn=self._collator(self.val_counter),
        )

    def test_dataloader(self) -> DataLoader | list:
        """The validation questions."""
        return self.val_dataloader()

    def report_skips(self, stage: str = TRAIN, epoch: int | None = None) -> SkipReport:
        """Log and return the inputs skipped since this stage's previous report, and each record once in total.

        Args:
            stage: ``"train"`` (call at every epoch end) or ``"val"`` (after every validation run).
            epoch: the epoch, for the message.

        Returns:
            The counts by reason.

        Raises:
            DataError: every training sample of the epoch was skipped (names the file and the counts).
        """
        counter = self.counter if stage == TRAIN else self.val_counter
        period = counter.since(self._marks[stage])
        self._marks[stage] = counter.snapshot()
        report = SkipReport(period=period, total=counter.records(), truncated=counter.truncated())
        dataset = self.train_set if stage == TRAIN else self.val_set
        what = "training samples" if stage == TRAIN else "validation questions"
        when = f"epoch {epoch}" if epoch is not None else ("this epoch" if stage == TRAIN else "this validation run")
        skipped = sum(period.values())
        if skipped:
            log.warning(
                "data: %s: %d %s skipped (%s); in total %d records skipped, each counted once (%s)",
                when,
                skipped,
                what,
                describe_counts(period),
                sum(report.total.values()),
                describe_counts(report.total),
            )
        if stage == TRAIN and dataset is not None and skipped >= len(dataset):
            raise DataError(
                f"{self.train_files().path}: every one of its {len(dataset)} training samples was skipped in {when} "
                f"({describe_counts(period)}); the warnings above name the first of each reason: fix the media or "
                "the records"
            )
        return report

    def sample_keys(self) -> list[int]:
        """The ``sample_idx`` of every training record now in the data (after ``setup``), in file order.

        A reference cache written by ``fit`` or ``score`` keeps only these: entries of records that were
        removed, or edited to another identity, are dropped (:func:`~regate_lightning.cache.save_cache`).
        """
        if self.train_set is None:
            raise RuntimeError("the training records are known after `setup`")
        return list(self.train_set.keys)

    def sample_name(self, key: int) -> str:
        """The record identity behind a training ``sample_idx`` (e.g. ``"id train-00089"``)."""
        return self.train_set.sample_name(key) if self.train_set is not None else str(key)

    def fingerprint(self) -> str:
        """Identifies how the training data are rendered, for the reference cache.

        It covers what changes the tokens of every sample: the tokenizer (name, size), the chat template
        and system prompt, frame sampling and size, the family's placeholder layout, ``max_length`` and
        ``overlong``, and the scheme of the sample keys. The records themselves are not in it: each cached
        sample is checked against its own content digest when training meets it (see
        :class:`~regate_lightning.bank.ScoreBank`), so one changed record costs one recomputation, not
        the whole cache.
        """
        if self.renderer is None:
            raise RuntimeError("the data module's fingerprint is known after `setup`")
        parts = {
            "tokenizer": self.tokenizer_source(),
            "vocab": len(self.tokenizer),
            "chat_template": self.renderer.chat_template,
            "system_prompt": self.system_prompt,
            "frames": dataclasses.asdict(self.frames),
            "vision": dataclasses.asdict(self.renderer.spec),
            "max_length": self.max_length,
            "overlong": self.overlong,
            "sample_keys": "blake2b-63 of the record identity, v1",
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SyntheticVideoQADataModule(ConversationDataModule):
    """The embedded default: moving coloured shapes, generated on first use into a cache folder.

    Args:
        root: cache folder; default ``$REGATE_LIGHTNING_CACHE/synthetic`` or ``~/.cache/regate_lightning/synthetic``.
        num_train: training clips (conversations).
        num_val: multiple-choice validation questions.
        seed: generation seed; the same arguments give the same files.
        task: ``"shapes"`` (the demo: short answers) or ``"descriptions"`` (long detailed descriptions, see
            :mod:`regate_lightning.data.synthetic_descriptions`); the default folder is the task's.
        **kwargs: the other arguments of :class:`ConversationDataModule` (not the files nor the tokenizer).
    """

    def __init__(
        self,
        root: str | None = None,
        num_train: int = 2000,
        num_val: int = 1000,
        seed: int = 0,
        task: str = "shapes",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_frames", 4)
        synthetic_task(task)  # refuses an unknown task now, naming the known ones
        super().__init__(train_file="", **kwargs)
        self.root = root
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.task = task
        self.paths: Any = None

    def prepare_data(self) -> None:
        """Generate the clips, the annotation files and the tokenizer (once; later calls find them)."""
        self.paths = ensure_synthetic(
            self.root, num_train=self.num_train, num_val=self.num_val, seed=self.seed, task=self.task
        )
        synthetic_tokenizer(self.paths)

    def load_chat_template(self) -> str | None:
        """None: the synthetic set's tokenizer carries its template."""
        return None

    def load_tokenizer(self) -> Any:
        """The synthetic set's own tokenizer."""
        if self.paths is None:
            self.prepare_data()
        self.train_file = str(self.paths.train)
        self.val_file = str(self.paths.val)
        return synthetic_tokenizer(self.paths)
