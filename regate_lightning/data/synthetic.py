"""The embedded demo data set: short clips of moving coloured shapes, generated on first use.

:func:`ensure_synthetic` writes, deterministically from a seed, into a cache folder (default
``~/.cache/regate_lightning/synthetic``, or ``$REGATE_LIGHTNING_CACHE/synthetic``, or a given folder)::

    videos/train_00000.mp4 ...  videos/val_00000.mp4 ...   clips, 8 frames of 64x64 at 3 fps (2.7 s), H.264 lossless
    train.json                                             conversations, LLaVA / VideoLLaMA2 format
    val_mc.json                                            multiple-choice questions
    manifest.json                                          the parameters; written last
    tokenizer/                                             byte-level BPE (see synthetic_tokenizer)

Generation is idempotent (a folder whose manifest matches is reused; another is regenerated) and
guarded by a file lock, so concurrent ranks do it once. 500 training clips take a few seconds.

**Clips.** Each clip shows ``count`` (one to three) shapes of one colour (6 colours) and one kind
(circle, square, triangle), all moving in one direction (left, right, up, down) across a dark
background, each in its own lane.

**Training conversations** open, right after the video, with one short-answer turn in the validation
style: the multiple-choice question of a task drawn from :data:`TASKS`, answered by the one word that
is the correct option's text (as real instruction data mixes short answers with long ones, and so that
validation scores a format the student was trained on). Then come the **long answers** (15-30 words,
5 templates, a quarter of the records with a follow-up turn); they mix
words a text-only model can predict from the question and the template ("The video shows ... moving
... across a dark background") with words that need the video: the colour, shape, direction and count
words, listed by :func:`visual_words` and marked per word by :func:`classify_words`.

**Validation** (``val_mc.json``, read by
:func:`~regate_lightning.data.conversations.read_choice_records`): a JSON list of
``{"id", "video", "task", "question", "options", "answer"}`` where ``task`` is one of :data:`TASKS`,
``options`` holds four candidate answers (one word each; the shape and count tasks add one distractor
that never occurs, ``"star"`` and ``"four"``) and ``answer`` is the index of the correct one. Tasks
rotate through the clips.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regate_lightning.data.render import FALLBACK_CHAT_TEMPLATE
from regate_lightning.data.video import encode_video_hwc

SYNTHETIC_VERSION = 2
CLIP_ENCODING = "h264-lossless"
"""How the clips are encoded (:func:`~regate_lightning.data.video.encode_video`); part of the manifest."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 235),
    "yellow": (240, 225, 40),
    "purple": (165, 60, 215),
    "orange": (250, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COUNTS: tuple[str, ...] = ("one", "two", "three")
TASKS: tuple[str, ...] = ("colour", "shape", "direction", "count")
BACKGROUND = (28, 28, 36)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<image>", "<video>")
"""Special tokens of the synthetic tokenizer; ids 0-4 in this order (pad, bos, eos match the tiny models)."""

_QA_TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "Describe the moving shapes in this video.",
        "The video shows {count} {colour} {shapes} moving {direction} across a dark background. Each "
        "shape in the video keeps moving {direction} at a steady speed until the end of the clip.",
    ),
    (
        "What colour are the shapes in this video, and which way are they moving?",
        "The shapes in this video are {colour}, and they are moving {direction}. In total the video shows "
        "{count} {colour} {shapes} moving {direction} across the frame.",
    ),
    (
        "How many shapes are moving in this video, and what do they look like?",
        "The number of shapes moving in this video is {count}. The shapes look like {colour} {shapes}, and "
        "they keep moving {direction} from the start of the clip to the end.",
    ),
    (
        "In which direction are the shapes in this video moving?",
        "The shapes in this video are moving {direction}. The video shows {count} {colour} {shapes}, and all "
        "of them move {direction} across the dark background at the same speed.",
    ),
    (
        "What shape is moving in this video?",
        "The shape moving in this video is a {shape}. The video shows {count} {colour} {shapes} moving "
        "{direction}, and the {shapes} stay the same size while moving.",
    ),
)
_FOLLOW_UP: tuple[str, str] = (
    "How many shapes are there, and what colour are they?",
    "There are {count} shapes in the video, and the colour of the shapes is {colour}. All of the {shapes} "
    "keep moving {direction}.",
)
_MC_QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "colour": ("What colour are the moving shapes?", tuple(COLOURS)),
    "shape": ("What shape is moving in the video?", (*SHAPES, "star")),
    "direction": ("In which direction are the shapes moving?", DIRECTIONS),
    "count": ("How many shapes are moving in the video?", (*COUNTS, "four")),
}
_WORD_RE = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class ClipSpec:
    """What one synthetic clip shows.

    Attributes:
        colour: a key of :data:`COLOURS`.
        shape: one of :data:`SHAPES`.
        direction: one of :data:`DIRECTIONS`.
        count: 1 to 3.
        seed: seeds the positions.
    """

    colour: str
    shape: str
    direction: str
    count: int
    seed: int

    def words(self) -> dict[str, str]:
        """Template slot values: colour, shape, shapes (plural by count), direction, count."""
        plural = self.shape + ("s" if self.count > 1 else "")
        return {
            "colour": self.colour,
            "shape": self.shape,
            "shapes": plural,
            "direction": self.direction,
            "count": COUNTS[self.count - 1],
        }


@dataclass(frozen=True)
class SyntheticPaths:
    """Where the synthetic set lies.

    Attributes:
        root: the folder.
        train: the conversation file (LLaVA format).
        val: the multiple-choice file.
        tokenizer: the tokenizer folder (created by :func:`synthetic_tokenizer`).
        task: the embedded task (:data:`SYNTHETIC_TASKS`).
    """

    root: Path
    train: Path
    val: Path
    tokenizer: Path
    task: str = "shapes"


def default_root(task: str = "shapes") -> Path:
    """``$REGATE_LIGHTNING_CACHE/<folder>``, else ``~/.cache/regate_lightning/<folder>``, the task's folder.

    ``synthetic`` for ``task="shapes"``, ``synthetic_descriptions`` for ``task="descriptions"``.
    """
    base = os.environ.get("REGATE_LIGHTNING_CACHE") or "~/.cache/regate_lightning"
    return Path(base).expanduser() / synthetic_task(task).folder


def visual_words() -> frozenset[str]:
    """Answer words that need the video: colours, shapes (singular and plural), directions, counts."""
    shapes = {*SHAPES, *(s + "s" for s in SHAPES)}
    return frozenset({*COLOURS, *shapes, *DIRECTIONS, *COUNTS})


def needs_video(word: str) -> bool:
    """Whether one answer word needs the video (see :func:`visual_words`).

    Example:
        >>> needs_video("Red"), needs_video("moving")
        (True, False)
    """
    return word.lower() in visual_words()


def classify_words(text: str) -> list[tuple[str, bool]]:
    """Split an answer into words, each marked ``True`` if it needs the video.

    Example:
        >>> classify_words("The video shows two red circles.")[2:5]
        [('shows', False), ('two', True), ('red', True)]
    """
    visual = visual_words()
    return [(w, w.lower() in visual) for w in _WORD_RE.findall(text)]


def random_clip(rng: np.random.Generator) -> ClipSpec:
    """Draw the content of one clip."""
    return ClipSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        direction=str(rng.choice(DIRECTIONS)),
        count=int(rng.integers(1, 4)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def shape_mask(shape: str, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of one shape of "radius" ``r`` centred at ``(cy, cx)`` on the pixel grid ``ys, xs``."""
    if shape == "circle":
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    if shape == "square":
        side = 0.85 * r
        return (np.abs(ys - cy) <= side) & (np.abs(xs - cx) <= side)
    # Triangle pointing up: the half-width grows linearly from the apex to the base.
    top, bottom = cy - r, cy + 0.8 * r
    half = (ys - top) / (bottom - top) * r
    return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half)


def render_clip(spec: ClipSpec, num_frames: int = 8, size: int = 64) -> torch.Tensor:
    """Draw one clip.

    Args:
        spec: what to draw.
        num_frames: frames.
        size: height and width in pixels (even).

    Returns:
        uint8 ``[num_frames, 3, size, size]``.
    """
    return torch.from_numpy(_draw(spec, num_frames, size)).permute(0, 3, 1, 2)


def _draw(spec: ClipSpec, num_frames: int, size: int) -> np.ndarray:
    """:func:`render_clip`, channels last: uint8 ``[num_frames, size, size, 3]``."""
    rng = np.random.default_rng(spec.seed)
    radius = size / 10
    margin = radius + 2
    lanes = np.linspace(0, size, spec.count + 2)[1:-1] if spec.count > 1 else np.array([size / 2])
    lanes = lanes + rng.uniform(-2, 2, size=spec.count)
    start, stop = margin + rng.uniform(0, 4), size - margin - rng.uniform(0, 4)
    if spec.direction in ("left", "up"):
        start, stop = stop, start
    travel = np.linspace(start, stop, num_frames)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    for t in range(num_frames):
        for lane in lanes:
            cy, cx = (lane, travel[t]) if spec.direction in ("left", "right") else (travel[t], lane)
            frames[t][shape_mask(spec.shape, ys, xs, cy, cx, radius)] = colour
    return frames


def _train_record(index: int, spec: ClipSpec, rng: np.random.Generator, video: str) -> dict[str, Any]:
    """One training conversation: a short-answer turn in the validation style, then the long answers.

    The first turn asks one of the multiple-choice questions of a random task of :data:`TASKS`, right
    after the video, and is answered by the single word that is the correct option's text, exactly as
    validation scores it. The long template answer (and, for a quarter of the records, a follow-up)
    come after it; they are most of the answer tokens, and what ReGATE elides.
    """
    words = spec.words()
    task = TASKS[int(rng.integers(len(TASKS)))]
    short_question = _MC_QUESTIONS[task][0]
    question, answer = _QA_TEMPLATES[int(rng.integers(len(_QA_TEMPLATES)))]
    conversations = [
        {"from": "human", "value": f"<video>\n{short_question}"},
        {"from": "gpt", "value": words[task]},
        {"from": "human", "value": question},
        {"from": "gpt", "value": answer.format(**words)},
    ]
    if rng.random() < 0.25:
        conversations += [
            {"from": "human", "value": _FOLLOW_UP[0]},
            {"from": "gpt", "value": _FOLLOW_UP[1].format(**words)},
        ]
    return {"id": f"train-{index:05d}", "video": video, "conversations": conversations, "clip": asdict(spec)}


def _val_record(index: int, spec: ClipSpec, rng: np.random.Generator, video: str) -> dict[str, Any]:
    task = TASKS[index % len(TASKS)]
    question, vocabulary = _MC_QUESTIONS[task]
    words = spec.words()
    correct = words["shape" if task == "shape" else task]
    distractors = [w for w in vocabulary if w != correct]
    chosen = [distractors[int(i)] for i in rng.permutation(len(distractors))[:3]]
    return choice_record(index, video, task, question, correct, chosen, asdict(spec), rng)


def choice_record(
    index: int,
    video: str,
    task: str,
    question: str,
    correct: str,
    distractors: list[str],
    clip: dict[str, Any],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """A multiple-choice validation record: ``correct`` and ``distractors`` in an order drawn from ``rng``.

    Both embedded tasks write their questions with it (this module's and
    :mod:`~regate_lightning.data.synthetic_descriptions`'s), so the two sets have one record layout.
    """
    options = [correct, *distractors]
    options = [options[int(i)] for i in rng.permutation(len(options))]
    return {
        "id": f"val-{index:05d}",
        "video": video,
        "task": task,
        "question": question,
        "options": options,
        "answer": options.index(correct),
        "clip": clip,
    }


@dataclass(frozen=True)
class SyntheticTask:
    """How one embedded task makes its clips and records (see :func:`synthetic_task`).

    Attributes:
        name: ``"shapes"`` or ``"descriptions"``.
        version: the generator's version (a cached set of another version is regenerated).
        folder: the default folder's name under the cache.
        random_clip: ``rng -> spec``, the content of one clip.
        draw: ``(spec, num_frames, size) -> uint8 [T, H, W, 3]``.
        train_record: ``(index, spec, rng, video) -> record`` (LLaVA format, with ``clip``).
        val_record: ``(index, spec, rng, video) -> multiple-choice record``.
        needs_video: ``word -> bool``: the answer words that need the video.
        vocab_size: the set's tokenizer's vocabulary (:func:`synthetic_tokenizer`); the demo student's
            embedding has room for it and its two placeholder tokens.
        stream: extra entropy of the generator's seed, so that the tasks draw different clips.
    """

    name: str
    version: int
    folder: str
    random_clip: Callable[[np.random.Generator], Any]
    draw: Callable[[Any, int, int], np.ndarray]
    train_record: Callable[[int, Any, np.random.Generator, str], dict[str, Any]]
    val_record: Callable[[int, Any, np.random.Generator, str], dict[str, Any]]
    needs_video: Callable[[str], bool]
    vocab_size: int = 500
    stream: tuple[int, ...] = ()


SYNTHETIC_TASKS: tuple[str, ...] = ("shapes", "descriptions")
"""The embedded tasks: ``shapes`` (the demo: short answers) and ``descriptions`` (long answers, issue 22)."""


def synthetic_task(name: str) -> SyntheticTask:
    """The embedded task called ``name`` (one of :data:`SYNTHETIC_TASKS`).

    Example:
        >>> synthetic_task("descriptions").folder
        'synthetic_descriptions'
    """
    if name == "shapes":
        return SyntheticTask(
            "shapes", SYNTHETIC_VERSION, "synthetic", random_clip, _draw, _train_record, _val_record, needs_video
        )
    if name == "descriptions":
        from regate_lightning.data import synthetic_descriptions as d

        return SyntheticTask(
            "descriptions", d.VERSION, "synthetic_descriptions", d.random_clip, d.draw, d.train_record,
            d.val_record, d.needs_video, vocab_size=760, stream=(1,),
        )  # fmt: skip
    raise ValueError(f"`task` must be one of {SYNTHETIC_TASKS}, got {name!r}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def ensure_synthetic(
    root: str | os.PathLike[str] | None = None,
    num_train: int = 500,
    num_val: int = 200,
    seed: int = 0,
    num_frames: int = 8,
    size: int = 64,
    fps: float = 3.0,
    task: str = "shapes",
    workers: int | None = None,
) -> SyntheticPaths:
    """Generate an embedded task's set into ``root`` unless it is there already (see the module docstring).

    Args:
        root: the folder; default :func:`default_root` of the task.
        num_train: training clips.
        num_val: validation clips (multiple-choice questions).
        seed: the seed; the same arguments give byte-identical JSON and identical decoded frames.
        num_frames: frames per clip.
        size: frame height and width (even).
        fps: frame rate of the encoded clips.
        task: ``"shapes"`` (the demo's moving shapes, short answers) or ``"descriptions"`` (two groups of
            shapes one after the other, long detailed descriptions; see
            :mod:`regate_lightning.data.synthetic_descriptions`).
        workers: processes that draw and encode the clips (forked); default one per CPU core, at most 4. A
            clip's file depends on its content alone (lossless encoding), so any number writes the same bytes.

    Returns:
        The paths.
    """
    if num_train < 1 or num_val < 0 or num_frames < 1 or size < 16 or size % 2:
        raise ValueError(
            f"need num_train >= 1, num_val >= 0, num_frames >= 1 and an even size >= 16; got {num_train}, "
            f"{num_val}, {num_frames}, {size}"
        )
    maker = synthetic_task(task)
    folder = Path(root).expanduser() if root is not None else default_root(task)
    folder.mkdir(parents=True, exist_ok=True)
    paths = SyntheticPaths(folder, folder / "train.json", folder / "val_mc.json", folder / "tokenizer", task)
    manifest = {
        "version": maker.version,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "num_frames": num_frames,
        "size": size,
        "fps": fps,
    }
    if task != "shapes":  # the shapes task's manifest keeps its keys
        manifest["task"] = task
    manifest["encoding"] = CLIP_ENCODING  # a cache of lossy clips (before issue 22) is encoded again
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _read_manifest(folder) == manifest:
                return paths
            (folder / "manifest.json").unlink(missing_ok=True)
            shutil.rmtree(folder / "videos", ignore_errors=True)
            shutil.rmtree(paths.tokenizer, ignore_errors=True)
            for stale in folder.glob("text_lm_*"):  # language models pretrained on the old text and tokenizer
                shutil.rmtree(stale, ignore_errors=True)
            (folder / "videos").mkdir()
            clips: list[tuple[str, Any]] = []
            for split, count, make in (("train", num_train, maker.train_record), ("val", num_val, maker.val_record)):
                rng = np.random.default_rng([seed, maker.version, 0 if split == "train" else 1, *maker.stream])
                records = []
                for i in range(count):
                    spec = maker.random_clip(rng)
                    video = f"videos/{split}_{i:05d}.mp4"
                    clips.append((str(folder / video), spec))
                    records.append(make(i, spec, rng, video))
                _write_json(paths.train if split == "train" else paths.val, records)
            _encode_all(task, clips, num_frames, size, fps, workers)
            _write_json(folder / "manifest.json", manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return paths


def _encode_clips(task: str, clips: list[tuple[str, Any]], num_frames: int, size: int, fps: float) -> None:
    """Draw and encode ``clips`` (``(path, spec)``) one after the other."""
    maker = synthetic_task(task)
    for path, spec in clips:
        encode_video_hwc(maker.draw(spec, num_frames, size), path, fps=fps)


def _encode_all(
    task: str, clips: list[tuple[str, Any]], num_frames: int, size: int, fps: float, workers: int | None
) -> None:
    """Draw and encode ``clips``, split over ``workers`` forked processes when there are enough of them."""
    count = min(workers or min(os.cpu_count() or 1, 4), max(len(clips) // 250, 1))
    if count <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        _encode_clips(task, clips, num_frames, size, fps)
        return
    # Forked, not spawned: a spawned process imports the package and torch again, which takes longer than its
    # share of the work. The children draw with numpy and encode with PyAV; they never enter torch.
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork")) as pool:
        for done in [pool.submit(_encode_clips, task, clips[i::count], num_frames, size, fps) for i in range(count)]:
            done.result()


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def synthetic_texts(paths: SyntheticPaths) -> list[str]:
    """Every question, answer and option of the synthetic set (the tokenizer's training text)."""
    texts = ["USER: ASSISTANT:"]
    for record in json.loads(paths.train.read_text(encoding="utf-8")):
        texts += [turn["value"].replace("<video>\n", "") for turn in record["conversations"]]
    if paths.val.is_file():
        for record in json.loads(paths.val.read_text(encoding="utf-8")):
            texts += [record["question"], *record["options"]]
    return texts


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 500,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    chat_template: str | None = FALLBACK_CHAT_TEMPLATE,
) -> Any:
    """Train a byte-level BPE tokenizer and wrap it in ``PreTrainedTokenizerFast``.

    Args:
        texts: the training text.
        vocab_size: the vocabulary size including the 256 bytes and the special tokens; keep it below
            the model's placeholder ids (the tiny models' are their last ids, 508-511 of 512).
        special_tokens: pad, bos, eos, then any others (ids in this order from 0).
        chat_template: set as the tokenizer's chat template (default: the "USER: ... ASSISTANT: ..."
            template of :mod:`regate_lightning.data.render`).

    Returns:
        The tokenizer, with ``pad_token``, ``bos_token``, ``eos_token`` set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) < 3:
        raise ValueError(f"`special_tokens` must start with pad, bos, eos; got {special_tokens}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    pad, bos, eos, *others = special_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=others,
        chat_template=chat_template,
    )


def synthetic_tokenizer(paths: SyntheticPaths | None = None, vocab_size: int | None = None) -> Any:
    """The synthetic set's tokenizer: loaded from ``paths.tokenizer``, or trained there on first use.

    Args:
        paths: from :func:`ensure_synthetic` (default: ``ensure_synthetic()``).
        vocab_size: see :func:`train_tokenizer`; default the task's (500 for ``shapes``, 760 for
            ``descriptions``, where every word of the set then is one token).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<image>``, ``<video>``
        and the "USER: ... ASSISTANT: ..." chat template.
    """
    from transformers import PreTrainedTokenizerFast

    paths = paths or ensure_synthetic()
    vocab_size = vocab_size or synthetic_task(paths.task).vocab_size
    with open(paths.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            marker = paths.tokenizer / "vocab_size.txt"
            if marker.is_file() and marker.read_text().strip() == str(vocab_size):
                return PreTrainedTokenizerFast.from_pretrained(paths.tokenizer)
            tokenizer = train_tokenizer(synthetic_texts(paths), vocab_size)
            tokenizer.save_pretrained(paths.tokenizer)
            marker.write_text(f"{vocab_size}\n")
            return tokenizer
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
