"""LightningDataModules over conversation data: user files, and the embedded synthetic video QA set.

``ConversationDataModule`` reads a training file in the LLaVA / VideoLLaMA2 or HF ``messages`` format
and, optionally, a multiple-choice validation file (MVBench style); it renders both with the
student's tokenizer and its chat template, decodes media lazily in DataLoader workers and collates
into the student's own keys plus ``labels`` and ``sample_idx``. The student's vision layout
(:class:`~regate_lightning.data.vision.VisionSpec`) is read from the attached module's model in
``setup``, so a recipe never repeats image sizes or placeholder counts.

**From the student's checkpoint.** When the student was loaded from an HF id or a folder (its
``name_or_path``), ``setup`` takes from there, unless overridden: the tokenizer (``tokenizer:`` overrides
it), the chat template (the checkpoint's processor template ``chat_template.json`` /
``chat_template.jinja``, else the tokenizer's own; with ``tokenizer:`` both are looked up there), the
image and video preprocessing (:mod:`regate_lightning.data.processors`; ``frame_size:`` overrides the
resize rule) and the frame sampling defaults (its video processor's ``num_frames``, or ``fps`` with
``min_frames`` / ``max_frames``; ``num_frames:`` / ``fps:`` override them).

``SyntheticVideoQADataModule`` generates the embedded default set on first use (see
:mod:`regate_lightning.data.synthetic`) and then behaves the same.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from regate_lightning.data.collate import Collator
from regate_lightning.data.datasets import ConversationDataset, FrameSampling, MediaCache, MultipleChoiceDataset
from regate_lightning.data.errors import SkipCounter
from regate_lightning.data.processors import chat_template_of, checkpoint_of, frames_for_video
from regate_lightning.data.render import ChatRenderer
from regate_lightning.data.synthetic import ensure_synthetic, synthetic_tokenizer
from regate_lightning.data.vision import VisionSpec

log = logging.getLogger("regate_lightning.data")


class ConversationDataModule(pl.LightningDataModule):
    """Instruction-tuning data from annotation files, for any supported student.

    Args:
        train_file: conversations (JSON list or JSONL; LLaVA or HF ``messages`` format).
        val_file: multiple-choice questions for validation (see ``read_choice_records``), or None.
        media_root: folder of relative media paths; default each file's folder.
        tokenizer: HF id or path of the tokenizer (and chat template) to use instead of the student
            checkpoint's; required when the student was not loaded from an HF id or folder.
        num_frames: frames per video (uniform sampling, or the cap with ``fps``); default the student
            checkpoint's, else 8.
        fps: sample videos at this rate instead of uniformly; default the student checkpoint's, if any.
        frame_size: ``[H, W]`` every image and frame is resized to, instead of the checkpoint's resize
            rule: a multiple of patch x merge for Qwen2-VL; the tower's size for LLaVA families.
        batch_size: training samples per batch.
        val_batch_questions: questions per validation batch (each contributes one row per option).
        num_workers: DataLoader worker processes (media decoding runs there).
        media_cache_mb: keep up to this many MiB of decoded frames in memory per process (each worker has its
            own; workers persist across epochs), so that a file is decoded once, not once per epoch; 0 = off.
            Decoded uint8 frames take ``T * 3 * H * W`` bytes per clip (4 frames of 64x64: 48 KiB).
        max_length: longest sequence; never cut through visual tokens (see ``overlong``).
        overlong: ``"truncate"`` (the text after the last visual token), ``"skip"`` or ``"raise"``.
        on_error: bad records and media: ``"raise"`` (a clear error naming the record) or ``"skip"``
            (counted, logged, and reported at every epoch end).
        list_options: list the lettered options in the multiple-choice question.
        system_prompt: a system turn for conversations that have none.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        media_root: str | None = None,
        tokenizer: str | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        frame_size: list[int] | None = None,
        batch_size: int = 4,
        val_batch_questions: int = 4,
        num_workers: int = 0,
        media_cache_mb: int = 0,
        max_length: int | None = 2048,
        overlong: str = "truncate",
        on_error: str = "raise",
        list_options: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
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
        self.frames = FrameSampling(**frames_for_video(None, fps, num_frames))
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
        self.counter = SkipCounter()
        self.tokenizer: Any = None
        self.train_set: ConversationDataset | None = None
        self.val_set: MultipleChoiceDataset | None = None
        self.task_names: list[str] = []

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
                "so give the HF id or path of its tokenizer"
            )
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            where = "`tokenizer`" if self.tokenizer_name is not None else "the student checkpoint"
            raise ValueError(
                f"cannot load a tokenizer from {where} {source} ({type(err).__name__}: {err}); "
                "set `tokenizer` to the HF id or path of the student's tokenizer"
            ) from err

    def load_chat_template(self) -> str | None:
        """The processor chat template of :meth:`tokenizer_source`; None lets the tokenizer's own apply."""
        source = self.tokenizer_source()
        return chat_template_of(source) if source is not None else None

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
            self.frames = FrameSampling(**frames_for_video(spec.processor.video_settings, self.fps, self.num_frames))
        elif checkpoint_of(student) is not None:
            rank_zero_warn(
                f"the student checkpoint {checkpoint_of(student)} has no processor configs that can be read "
                "(preprocessor_config.json, video_preprocessor_config.json, processor_config.json): the built-in "
                "preprocessing applies (one frame size, CLIP mean/std); see docs/data.md"
            )
        renderer = ChatRenderer(
            self.tokenizer, spec, chat_template=self.load_chat_template(), system_prompt=self.system_prompt
        )
        common = {
            "frames": self.frames,
            "media_root": self.media_root,
            "on_error": self.on_error,
            "counter": self.counter,
            "media_cache": self.media_cache,
        }
        self.train_set = ConversationDataset(self.train_file, renderer, **common)
        if self.val_file:
            self.val_set = MultipleChoiceDataset(self.val_file, renderer, list_options=self.list_options, **common)
            self.task_names = list(self.val_set.task_names)
        if self.counter.total:
            self.report_skips("reading the annotation files")

    def _collator(self) -> Collator:
        return Collator(self.tokenizer, max_length=self.max_length, overlong=self.overlong, counter=self.counter)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=self._collator(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Multiple-choice batches: whole questions, every option of a question in the same batch."""
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.val_batch_questions, num_workers=self.num_workers, collate_fn=self._collator()
        )

    def test_dataloader(self) -> DataLoader | list:
        """The validation questions."""
        return self.val_dataloader()

    def report_skips(self, when: str = "this epoch") -> dict[str, int]:
        """Log the counts of skipped inputs so far by reason; returns them."""
        counts = {k: v for k, v in self.counter.counts().items() if v}
        if counts:
            log.warning("data: skipped %d inputs %s: %s", sum(counts.values()), when, counts)
        return counts

    def fingerprint(self) -> str:
        """Identifies the training data for the reference cache: file contents, tokenizer, frames."""
        digest = hashlib.sha256(Path(self.train_file).read_bytes())
        digest.update(
            repr(
                (self.tokenizer_name, len(self.tokenizer) if self.tokenizer else None, self.max_length, self.overlong)
            ).encode()
        )
        return digest.hexdigest()[:16]


class SyntheticVideoQADataModule(ConversationDataModule):
    """The embedded default: moving coloured shapes, generated on first use into a cache folder.

    Args:
        root: cache folder; default ``$REGATE_LIGHTNING_CACHE/synthetic`` or ``~/.cache/regate_lightning/synthetic``.
        num_train: training clips (conversations).
        num_val: multiple-choice validation questions.
        seed: generation seed; the same arguments give the same files.
        **kwargs: the other arguments of :class:`ConversationDataModule` (not the files nor the tokenizer).
    """

    def __init__(
        self, root: str | None = None, num_train: int = 2000, num_val: int = 1000, seed: int = 0, **kwargs: Any
    ) -> None:
        kwargs.setdefault("num_frames", 4)
        super().__init__(train_file="", **kwargs)
        self.root = root
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.paths: Any = None

    def prepare_data(self) -> None:
        """Generate the clips, the annotation files and the tokenizer (once; later calls find them)."""
        self.paths = ensure_synthetic(self.root, num_train=self.num_train, num_val=self.num_val, seed=self.seed)
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
