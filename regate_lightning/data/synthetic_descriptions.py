"""The second embedded task: long, detailed video descriptions (the regime ReGATE was made for).

The demo's task (:mod:`regate_lightning.data.synthetic`, ``task="shapes"``) answers short: its answer
tokens are about a quarter of a sequence, so eliding half of them in sparse steps saves about 11 % of
the decoder's tokens at most. Instruction-tuning sets such as LLaVA-Video-178K are mostly detailed
captions of hundreds of tokens, most of which a text-only model predicts; ``task="descriptions"`` makes
that regime on a CPU. :func:`~regate_lightning.data.synthetic.ensure_synthetic` writes it (``task=
"descriptions"``, default folder ``$REGATE_LIGHTNING_CACHE/synthetic_descriptions``) with the same files,
manifest, lock and tokenizer as the shapes task.

**Clips** (8 frames of 64x64 at 3 fps, PyAV): two groups of shapes, one after the other. The first group
is on screen in the first half of the clip, the second in the second half (the order of events). A group
has a colour (the two differ), a shape (circle, square, triangle), a count (one to three, in lanes), a
direction (left, right, up, down) and a speed: a *fast* group enters from the edge it comes from, crosses
the whole frame and leaves through the opposite edge (31 pixels between the student's two sampled frames
of it, two 16-pixel patches); a *slow* group appears near the middle and drifts a short way (8 pixels). A
student that samples 4 frames uniformly sees frames 1, 3, 5, 7: two of each group. (Two other layouts
were tried and dropped: slow groups drifting 16 pixels, and a motion trail behind every shape; with them
the demo's student learned neither speed nor direction within 1500 steps, see ``docs/demo.md``.)

**Training records.** 75 % are a request for a detailed description ("Describe this video in detail.",
several phrasings) answered by a paragraph in the style of LLaVA-Video-178K's captions: an optional
opening, the two events in order, two to six detail sentences in random order (sizes and lanes, the speed
and direction of each group against the other, which group came first, the total count, the camera and
the background), an optional closing; each sentence in two to four phrasings and three paragraph orders.
The facts that need the video (colour, shape, count, direction, speed, the edge a group enters from and
leaves through, which group comes first) are embedded in words a text-only model predicts, and repeated
later in the paragraph, where the text itself predicts them. The answer is 80-250 tokens with the set's
tokenizer, 60-80 % of a sequence with 64 video tokens (``tests/test_data_synthetic.py`` checks both). The
other 25 % ask one to three short questions of the validation's kinds, each answered by one word.

**Validation** (``val_mc.json``): one multiple-choice question per clip, the task rotating through
:data:`TASKS`: ``order`` (which colour of shapes appears first: the other group's colour is always among
the options), ``shape``, ``count``, ``direction``, ``speed`` (slowly or quickly: two options) and
``entry`` (where a group first appears: an edge, or the middle for a slow group), asked about one of the
two groups named by its colour. Options that never occur in the data (``star``, ``four``) are distractors,
as in the shapes task, so a student that ignores the video does better than one over the number of
options: measure it (``benchmarks/time_to_accuracy.py --task descriptions --variants blind``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from regate_lightning.data.synthetic import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, choice_record, shape_mask

VERSION = 4
"""Bump when the clips or the text change: a cached set with another version is regenerated."""
TASKS: tuple[str, ...] = ("order", "shape", "count", "direction", "speed", "entry")
"""Validation question kinds, in the order they rotate through the clips."""
SPEEDS: tuple[str, ...] = ("slow", "fast")
EDGES: dict[str, str] = {"left": "left", "right": "right", "up": "top", "down": "bottom"}
"""The edge a group moving in a direction leaves through."""
ENTRY_EDGES: dict[str, str] = {"left": "right", "right": "left", "up": "bottom", "down": "top"}
"""The edge a fast group moving in a direction enters from."""
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
DESCRIBE_SHARE = 0.75
"""Share of the training records that ask for a detailed description; the others ask short questions."""

_SPEED_WORD = {"slow": "slowly", "fast": "quickly"}
_VISUAL = frozenset(
    {*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *DIRECTIONS, *NUMBERS, "top", "bottom", "middle", "centre"}
    | {"slowly", "quickly", "slow", "fast", "faster", "slower"}
)
_WORD_RE = re.compile(r"[A-Za-z]+")

_REQUESTS: tuple[str, ...] = (
    "Describe this video in detail.",
    "Please give a detailed description of the video.",
    "What happens in this video? Describe it thoroughly.",
    "Can you describe everything that happens in this clip?",
)
_QUESTIONS: dict[str, str] = {
    "order": "Which shapes appear first? Answer with their colour.",
    "shape": "What shape are the {colour} shapes?",
    "count": "How many {colour} shapes are in the video?",
    "direction": "In which direction do the {colour} shapes move?",
    "speed": "How fast do the {colour} shapes move?",
    "entry": "Where do the {colour} shapes first appear?",
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "order": tuple(COLOURS),
    "shape": (*SHAPES, "star"),
    "count": ("one", "two", "three", "four"),
    "direction": DIRECTIONS,
    "speed": ("slowly", "quickly"),
    "entry": ("left", "right", "top", "bottom", "middle"),
}

_OPENINGS: tuple[str, ...] = (
    "The video shows a short animation of coloured shapes on a plain dark background.",
    "This clip is a simple animation in which coloured shapes move over a dark, empty background.",
    "The video begins with an empty, dark frame, and the background stays the same for the whole clip.",
    "In this short video, groups of coloured shapes move across a dark scene, each group in its turn.",
)
_FIRST = ("First,", "At the start of the clip,", "In the opening frames,", "To begin with,")
_SECOND = ("Then,", "After that,", "Once the {p_colour} {p_noun} {p_be} gone,", "Later in the video,")
_FAST: tuple[str, ...] = (
    "{opener} {np} {enter} from the {entry} edge, {move} quickly {direction} across the whole frame and {leave} "
    "through the {exit} edge.",
    "{opener} {np} {come} in from the {entry} side of the frame. {They} {move} {direction} quickly, at a high "
    "speed, and {be} gone through the {exit} edge a moment later.",
    "{opener} {np} {race} {direction} across the screen: {they} {enter} at the {entry} edge and quickly {leave} "
    "at the {exit} edge.",
)
_SLOW: tuple[str, ...] = (
    "{opener} {np} {appear} near the middle of the frame and {drift} slowly {direction}, staying inside the frame.",
    "{opener} {np} {show} up close to the centre of the frame. {They} {move} {direction} at a slow, gentle pace "
    "and never {reach} an edge.",
    "{opener} {np} slowly {drift} {direction} from the middle of the frame, covering only a short distance.",
)
_CLOSINGS: tuple[str, ...] = (
    "The video ends with the frame empty again.",
    "By the end of the clip, nothing is left on the screen but the dark background.",
    "After the {colour} {noun} {be} gone, the video ends.",
)


@dataclass(frozen=True)
class Group:
    """One group of identical shapes moving together.

    Attributes:
        colour: a key of :data:`~regate_lightning.data.synthetic.COLOURS`.
        shape: one of :data:`~regate_lightning.data.synthetic.SHAPES`.
        count: 1 to 3.
        direction: one of :data:`~regate_lightning.data.synthetic.DIRECTIONS`.
        speed: ``"slow"`` or ``"fast"``.
    """

    colour: str
    shape: str
    count: int
    direction: str
    speed: str

    def entry(self) -> str:
        """Where the group first appears: the edge a fast group enters from, ``"middle"`` for a slow one."""
        return ENTRY_EDGES[self.direction] if self.speed == "fast" else "middle"

    def answer(self, task: str) -> str:
        """The one-word answer to a question of ``task`` about this group (not ``order``)."""
        values = {
            "shape": self.shape,
            "count": NUMBERS[self.count - 1],
            "direction": self.direction,
            "speed": _SPEED_WORD[self.speed],
            "entry": self.entry(),
        }
        return values[task]

    def words(self) -> dict[str, str]:
        """Template slots: the noun phrase, the verbs agreeing with the count, the pronouns, the edges."""
        plural = self.count > 1
        noun = self.shape + ("s" if plural else "")

        def verb(stem: str) -> str:
            return stem if plural else (stem + "es" if stem.endswith(("sh", "ch")) else stem + "s")

        words = {
            "colour": self.colour,
            "noun": noun,
            "np": f"{NUMBERS[self.count - 1]} {self.colour} {noun}",
            "direction": self.direction,
            "speed": _SPEED_WORD[self.speed],
            "entry": ENTRY_EDGES[self.direction],
            "exit": EDGES[self.direction],
            "be": "are" if plural else "is",
            "They": "They" if plural else "It",
            "they": "they" if plural else "it",
            "their": "their" if plural else "its",
        }
        for stem in ("enter", "move", "leave", "come", "race", "appear", "drift", "show", "travel", "reach"):
            words[stem] = verb(stem)
        return words


@dataclass(frozen=True)
class SceneSpec:
    """What one clip shows: two groups, the first in the first half of the clip, the second after it.

    Attributes:
        first: the group on screen first.
        second: the group on screen second (another colour).
        seed: seeds the lanes and positions.
    """

    first: Group
    second: Group
    seed: int


def random_clip(rng: np.random.Generator) -> SceneSpec:
    """Draw the content of one clip (two groups of different colours)."""
    colours = rng.permutation(list(COLOURS))[:2]
    groups = [
        Group(
            colour=str(colour),
            shape=str(rng.choice(SHAPES)),
            count=int(rng.integers(1, 4)),
            direction=str(rng.choice(DIRECTIONS)),
            speed=str(rng.choice(SPEEDS)),
        )
        for colour in colours
    ]
    return SceneSpec(groups[0], groups[1], seed=int(rng.integers(0, 2**31 - 1)))


def draw(spec: SceneSpec, num_frames: int, size: int) -> np.ndarray:
    """Draw one clip, channels last: uint8 ``[num_frames, size, size, 3]``.

    The first ``num_frames // 2`` frames show the first group, the rest the second. In its half, frame ``f``
    of ``n`` puts a group at ``t = (f + 1) / (n + 1)`` along its path: a fast group's path runs from just
    outside the edge it enters from to just outside the opposite one, a slow group's covers 30 % of the
    frame around the middle.
    """
    rng = np.random.default_rng(spec.seed)
    radius = size / 10
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    half = max(num_frames // 2, 1)
    for index, group in enumerate((spec.first, spec.second)):
        span = range(0, half) if index == 0 else range(half, num_frames)
        lanes = np.linspace(0, size, group.count + 2)[1:-1] if group.count > 1 else np.array([size / 2])
        lanes = lanes + rng.uniform(-2, 2, size=group.count)
        if group.speed == "fast":
            start, stop = -radius, size + radius
        else:
            centre = size / 2 + rng.uniform(-4, 4)
            start, stop = centre - 0.15 * size, centre + 0.15 * size
        if group.direction in ("left", "up"):
            start, stop = stop, start
        colour = np.array(COLOURS[group.colour], dtype=np.uint8)
        steps = len(span)
        for local, frame in enumerate(span):
            pos = start + (stop - start) * (local + 1) / (steps + 1)
            for lane in lanes:
                cy, cx = (lane, pos) if group.direction in ("left", "right") else (pos, lane)
                frames[frame][shape_mask(group.shape, ys, xs, cy, cx, radius)] = colour
    return frames


def _event(group: Group, opener: str, rng: np.random.Generator) -> str:
    templates = _FAST if group.speed == "fast" else _SLOW
    return templates[int(rng.integers(len(templates)))].format(opener=opener, **group.words())


def _details(spec: SceneSpec, rng: np.random.Generator) -> list[str]:
    """Detail sentences about the scene, each a fact restated or derived from the two events."""
    a, b = spec.first.words(), spec.second.words()
    total = NUMBERS[spec.first.count + spec.second.count - 1]
    out = [
        "All of the shapes have the same size, and each shape keeps its form and colour while it moves.",
        f"The {a['colour']} {a['noun']} {a['appear']} first and the {b['colour']} {b['noun']} {b['appear']} "
        "second; the groups are never on screen at the same time.",
        f"In total, the video shows {total} shapes: {a['np']} and {b['np']}.",
        "The camera stays still throughout the video, and there is no text on the screen.",
        "Apart from the moving shapes, the frame is completely dark and empty.",
    ]
    for group, w in ((spec.first, a), (spec.second, b)):
        if group.count > 1:
            out.append(f"The {w['colour']} {w['noun']} move side by side in separate lanes and never touch.")
    if spec.first.speed != spec.second.speed:
        fast, slow = (a, b) if spec.first.speed == "fast" else (b, a)
        out.append(
            f"The {fast['colour']} {fast['noun']} {fast['move']} much faster than the {slow['colour']} {slow['noun']}."
        )
    else:
        out.append(f"Both groups move at about the same speed, {a['speed']} in each case.")
    if spec.first.direction == spec.second.direction:
        out.append(f"Both groups travel in the same direction, {a['direction']}.")
    else:
        out.append(
            f"The {a['colour']} {a['noun']} {a['travel']} {a['direction']}, while the {b['colour']} {b['noun']} "
            f"{b['travel']} {b['direction']}."
        )
    return out


def describe(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A detailed description of the clip: opening, the two events in order, details, closing (see the module)."""
    a = spec.first.words()
    first = _event(spec.first, _FIRST[int(rng.integers(len(_FIRST)))], rng)
    opener = _SECOND[int(rng.integers(len(_SECOND)))].format(p_colour=a["colour"], p_noun=a["noun"], p_be=a["be"])
    second = _event(spec.second, opener, rng)
    details = _details(spec, rng)
    chosen = [details[int(i)] for i in rng.permutation(len(details))[: int(rng.integers(3, 8))]]
    opening = [_OPENINGS[int(rng.integers(len(_OPENINGS)))]] if rng.random() < 0.8 else []
    b = spec.second.words()
    closing = [_CLOSINGS[int(rng.integers(len(_CLOSINGS)))].format(**b)] if rng.random() < 0.8 else []
    layout = int(rng.integers(3))
    if layout == 0:  # opening, events, details, closing
        parts = [*opening, first, second, *chosen, *closing]
    elif layout == 1:  # a detail first, as a summary, then the events
        parts = [*opening, *chosen[:1], first, second, *chosen[1:], *closing]
    else:  # the events first, the opening after them as a summary
        parts = [first, second, *opening, *chosen, *closing]
    return " ".join(parts)


def _question(task: str, spec: SceneSpec, which: int) -> tuple[str, str]:
    """A short question of ``task`` about group ``which`` (0 first, 1 second) and its one-word answer."""
    group = (spec.first, spec.second)[which]
    if task == "order":
        return _QUESTIONS["order"], spec.first.colour
    return _QUESTIONS[task].format(colour=group.colour), group.answer(task)


def train_record(index: int, spec: SceneSpec, rng: np.random.Generator, video: str) -> dict[str, Any]:
    """One training conversation: a detailed description (75 %) or one to three short questions."""
    if rng.random() < DESCRIBE_SHARE:
        request = _REQUESTS[int(rng.integers(len(_REQUESTS)))]
        turns = [(request, describe(spec, rng))]
    else:
        tasks = [TASKS[int(i)] for i in rng.permutation(len(TASKS))[: int(rng.integers(1, 4))]]
        turns = [_question(task, spec, int(rng.integers(2))) for task in tasks]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations += [
            {"from": "human", "value": f"<video>\n{question}" if i == 0 else question},
            {"from": "gpt", "value": answer},
        ]
    return {"id": f"train-{index:05d}", "video": video, "conversations": conversations, "clip": asdict(spec)}


def val_record(index: int, spec: SceneSpec, rng: np.random.Generator, video: str) -> dict[str, Any]:
    """One multiple-choice question; the task rotates through :data:`TASKS` with the clip index."""
    task = TASKS[index % len(TASKS)]
    question, correct = _question(task, spec, int(rng.integers(2)))
    vocabulary = _OPTIONS[task]
    if task == "order":  # the other group's colour is always an option: the question is which came first
        pool = [c for c in vocabulary if c not in (spec.first.colour, spec.second.colour)]
        chosen = [spec.second.colour, *[pool[int(i)] for i in rng.permutation(len(pool))[:2]]]
    else:
        pool = [w for w in vocabulary if w != correct]
        chosen = [pool[int(i)] for i in rng.permutation(len(pool))[:3]]
    return choice_record(index, video, task, question, correct, chosen, asdict(spec), rng)


def visual_words() -> frozenset[str]:
    """Words that carry a fact of the video: colours, shapes, numbers, directions, edges, speeds, ``middle``."""
    return _VISUAL


def needs_video(word: str) -> bool:
    """Whether one answer word of this task needs the video (see :func:`visual_words`).

    Example:
        >>> needs_video("Quickly"), needs_video("frame")
        (True, False)
    """
    return word.lower() in _VISUAL


def classify_words(text: str) -> list[tuple[str, bool]]:
    """Split an answer into words, each marked ``True`` if it needs the video."""
    return [(w, w.lower() in _VISUAL) for w in _WORD_RE.findall(text)]
