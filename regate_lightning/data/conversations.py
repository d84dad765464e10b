r"""Readers of annotation files: conversations (LLaVA / VideoLLaMA2 and HF ``messages``) and multiple choice.

Both conversation formats are normalised into one :class:`Record`: an id, the media (kind and
absolute path, in the order their placeholders appear) and the turns as ``(role, text)`` where the
text holds a marker (:data:`IMAGE_MARKER` / :data:`VIDEO_MARKER`) at each media position.

Files are a JSON list of records or JSONL (one record per line, blank lines ignored); the format is
told by the first non-blank character (``[`` = JSON list). Relative media paths are resolved against
``media_root`` (default: the annotation file's folder).

**LLaVA / VideoLLaMA2**::

    {"id": "0", "video": "clips/a.mp4",            # or "image": "x.jpg"; a list of paths also works
     "conversations": [{"from": "human", "value": "<video>\nWhat is moving?"},
                       {"from": "gpt", "value": "A red circle."}, ...]}

Roles: ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system`` -> system. The k-th
``<image>`` placeholder refers to the k-th image path, the k-th ``<video>`` to the k-th video path.
LLaVA-Video-178K and LLaVA-NeXT write ``<image>`` in the text of records whose media is a ``video``:
when a record's media are all of one kind and it has one marker (``<image>`` or ``<video>``) per media
item, the markers are matched to the media in order, whatever their spelling. A video may be a file or
a folder of frames (image files, in natural name order), as some MVBench tasks ship them.

**HF messages**::

    {"id": "0", "messages": [
        {"role": "user", "content": [{"type": "video", "path": "clips/a.mp4"},
                                     {"type": "text", "text": "What is moving?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]}

A media item (path in ``path``, ``url`` (local), ``video`` or ``image``) becomes a marker at its place
in the turn, followed by a newline when text follows; ``content`` may also be a plain string.

**Multiple choice** (:func:`read_choice_records`)::

    {"id": "q0", "video": "clips/a.mp4", "task": "colour", "question": "What colour is the shape?",
     "options": ["red", "blue", "green", "yellow"], "answer": 0}

MVBench's own files (``"candidates"`` and the answer as text) are read too. A record without ``task``
gets the reader's ``task`` argument, by default the file's name without its extension (MVBench keeps
one task per file, e.g. ``action_sequence.json``).

**Sample identity.** Every record gets a :attr:`Record.key`: ``"id <id>"`` from its ``"id"`` field, or
``"at <file name>:<line>"`` (JSONL) / ``"at <file name>#<index>"`` (JSON list) without one (a data
set appends ``"#k"`` to the k-th repeat of an id). It does not depend on which other records were
read or skipped, so ReGATE's score store and reference cache (keyed by a hash of it) stay attached to
the right record when the set of usable records changes.

**Bad input.** Every check a file allows without decoding media runs eagerly in the reader, in the
main process: unreadable JSON line, missing fields, a conversation without an assistant turn or with
an empty one, a question with two equal options, placeholders that do not match the media, a missing
media file. A file without records, or one whose records are all skipped, raises in both modes, naming
the file (and the skip counts). ``on_error="raise"`` raises
:class:`~regate_lightning.data.errors.DataError` naming the file, the line (JSONL) or the record's place
in a JSON list (``record 3 of the list``, counted from 1), the record id and the fix; ``on_error="skip"``
drops the record and counts it in a :class:`~regate_lightning.data.errors.SkipCounter`. Media that exist
but do not decode are found later, in the dataset's ``__getitem__`` (a DataLoader worker): with
``"skip"`` it returns ``None``, counts the sample in the worker's row of the shared counter, and the
collator drops ``None`` from the batch. A
JSON list file that does not parse raises in both modes: there is no record to skip to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from regate_lightning.data.errors import DataError, OnError, SkipCounter, check_on_error

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
MARKERS: dict[str, str] = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
MediaKind = Literal["image", "video"]
Role = Literal["system", "user", "assistant"]
_KIND_OF_MARKER: dict[str, MediaKind] = {IMAGE_MARKER: "image", VIDEO_MARKER: "video"}
_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Media:
    """One image or video of a record.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        path: absolute path.
    """

    kind: MediaKind
    path: Path


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation.

    Attributes:
        role: ``"system"``, ``"user"`` or ``"assistant"``.
        text: the turn's text with :data:`IMAGE_MARKER` / :data:`VIDEO_MARKER` at media positions.
    """

    role: Role
    text: str


@dataclass(frozen=True)
class Record:
    """A normalised conversation.

    Attributes:
        id: the record's id (its ``"id"`` field, else ``file:line``).
        media: images and videos in the order of their markers in the turns.
        turns: the conversation.
        source: ``file:line`` (JSONL) or ``file, record k of the list`` (JSON list, k from 1), for messages.
        key: the record's stable identity (see the module docstring); ``""`` for records built in code,
            which :class:`~regate_lightning.data.datasets.ConversationDataset` then keys by ``id``.
    """

    id: str
    media: tuple[Media, ...]
    turns: tuple[Turn, ...]
    source: str = ""
    key: str = ""

    def placeholder_positions(self) -> list[tuple[int, int, MediaKind]]:
        """Where the media markers are: ``(turn index, character offset, kind)`` in media order."""
        return [
            (i, m.start(), _KIND_OF_MARKER[m.group(0)])
            for i, turn in enumerate(self.turns)
            for m in _MARKER_RE.finditer(turn.text)
        ]


@dataclass(frozen=True)
class ChoiceRecord:
    """A multiple-choice question about one image or video.

    Attributes:
        id: the record's id.
        media: the image or video asked about.
        question: the question text (without a marker).
        options: the candidate answers.
        answer: index of the correct option.
        task: the task name (e.g. ``"colour"``; :func:`read_choice_records` names it after the file when the
            record has none).
        source: ``file:line`` or ``file, record k of the list``, for messages.
        key: the record's stable identity (see the module docstring).
    """

    id: str
    media: Media
    question: str
    options: tuple[str, ...]
    answer: int
    task: str = ""
    source: str = ""
    key: str = ""


def _iter_json(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(location, short location, parsed object or DataError)`` per record of a JSON list or JSONL file.

    The location, for messages, names the file as given and the record by its line (``file:line``, JSONL) or
    its place in the list counted from 1 (``file, record 3 of the list``). The short one is the record's
    identity without an id (:attr:`Record.key`): the file's name and the line, or the index in the list
    counted from 0 (``file#2``), which sample keys are hashed from and therefore never change. A UTF-8
    byte-order mark at the start of the file is read as what it is, not as text.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the annotation file as UTF-8"
        ) from err
    except OSError as err:
        raise DataError(f"{path}: cannot read the annotation file ({err})") from err
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON at line {err.lineno} column {err.colno} ({err.msg}); fix the file "
                "(a JSON list cannot skip a broken record: use JSONL, one record per line, for that)",
                "bad_json",
            ) from err
        if not isinstance(items, list):
            raise DataError(f"{path}: a JSON file must hold a list of records, got {type(items).__name__}")
        for i, item in enumerate(items):
            yield f"{path}, record {i + 1} of the list", f"{path.name}#{i}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", f"{path.name}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield (
                f"{path}:{lineno}",
                f"{path.name}:{lineno}",
                DataError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); fix or remove the line",
                    "bad_json",
                ),
            )


def _as_paths(value: Any, field: str, where: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise DataError(f"{where}: `{field}` must be a path or a list of paths, got {value!r}")
    return values


def _resolve(rel: str, media_root: Path, kind: MediaKind, where: str, check_media: bool) -> Media:
    path = Path(rel).expanduser()
    path = path if path.is_absolute() else media_root / path
    if check_media and not (path.is_file() or (kind == "video" and path.is_dir())):
        what = "file (or folder of frames)" if kind == "video" else "file"
        raise DataError(
            f"{where}: {kind} {what} {path} does not exist; "
            f"fix the path or set the file's `media_root` (now {media_root})",
            "missing_media",
        )
    return Media(kind, path.resolve())


def _llava_turns(obj: dict[str, Any], where: str) -> list[Turn]:
    conv = obj["conversations"]
    if not isinstance(conv, list):
        raise DataError(f"{where}: `conversations` must be a list of turns, got {type(conv).__name__}")
    turns = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {j} must be {{'from': ..., 'value': str}}, got {turn!r}")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"{where}: turn {j} has unknown role {turn.get('from')!r}; use one of {sorted(_ROLES)}")
        turns.append(Turn(role, turn["value"]))
    return turns


def _messages_turns(obj: dict[str, Any], where: str) -> tuple[list[Turn], list[tuple[MediaKind, str]]]:
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: `messages` must be a list, got {type(messages).__name__}")
    turns: list[Turn] = []
    media: list[tuple[MediaKind, str]] = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {j} must be an object, got {msg!r}")
        role = _ROLES.get(str(msg.get("role", "")).lower())
        if role is None:
            raise DataError(f"{where}: message {j} has unknown role {msg.get('role')!r}; use user/assistant/system")
        content = msg.get("content")
        if isinstance(content, str):
            turns.append(Turn(role, content))
            continue
        if not isinstance(content, list):
            raise DataError(f"{where}: message {j} `content` must be a string or a list of items")
        parts: list[str] = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                if parts and parts[-1] in (IMAGE_MARKER, VIDEO_MARKER) and not item["text"][:1].isspace():
                    parts.append("\n")
                parts.append(item["text"])
            elif kind == "image" or kind == "video":
                path = next((item[k] for k in ("path", "url", kind) if isinstance(item.get(k), str)), None)
                if not path:
                    raise DataError(f"{where}: message {j} has a {kind} item without a `path`: {item!r}")
                media.append((kind, path))
                parts.append(MARKERS[kind])
            else:
                raise DataError(f"{where}: message {j} has an unknown content item {item!r}")
        turns.append(Turn(role, "".join(parts)))
    return turns, media


def _match_markers(turns: list[Turn], declared: dict[MediaKind, list[str]], where: str) -> list[Turn]:
    """The turns with one marker of the right kind per media item (see the module docstring).

    Markers that count the media of each kind are kept. Otherwise, a record whose media are all of one
    kind and whose markers (``<image>`` or ``<video>``) are as many as its media gets every marker
    rewritten to that kind (LLaVA-Video-178K writes ``<image>`` for its videos).

    Raises:
        DataError: the markers cannot be matched to the media (``placeholder_mismatch``).
    """
    order = [m.group(0) for t in turns for m in _MARKER_RE.finditer(t.text)]
    if all(order.count(MARKERS[kind]) == len(paths) for kind, paths in declared.items()):
        return turns
    kinds = [kind for kind, paths in declared.items() if paths]
    total = sum(len(paths) for paths in declared.values())
    if len(kinds) == 1 and len(order) == total:
        marker = MARKERS[kinds[0]]
        return [Turn(t.role, _MARKER_RE.sub(marker, t.text)) for t in turns]
    media = " and ".join(f"{len(paths)} {kind} path(s)" for kind, paths in declared.items())
    found = " and ".join(f"{order.count(m)} {m}" for m in (IMAGE_MARKER, VIDEO_MARKER))
    raise DataError(
        f"{where}: {found} placeholder(s) in the turns but {media}; put one placeholder in the text per media "
        f"item (<image> per image, <video> per video; a record with media of one kind may use either)",
        "placeholder_mismatch",
    )


def parse_record(obj: Any, where: str, media_root: Path, check_media: bool = True) -> Record:
    """Normalise one LLaVA-format or HF-messages-format record.

    Args:
        obj: the parsed JSON object.
        where: ``file:line`` or ``file, record k of the list``, for messages.
        media_root: folder that relative media paths are resolved against.
        check_media: whether to check that media files exist.

    Returns:
        The :class:`Record`.

    Raises:
        DataError: with the reason and a message naming ``where``, the id and the fix.
    """
    if isinstance(obj, DataError):
        raise obj
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", where))
    where = f"{where} (id {rid})" if "id" in obj else where
    if "conversations" in obj:
        turns = _llava_turns(obj, where)
        declared = {k: _as_paths(obj.get(k), k, where) for k in ("image", "video")}
        turns = _match_markers(turns, declared, where)
        order = [m.group(0) for t in turns for m in _MARKER_RE.finditer(t.text)]
        iters = {k: iter(v) for k, v in declared.items()}
        pairs = [(_KIND_OF_MARKER[m], next(iters[_KIND_OF_MARKER[m]])) for m in order]
    elif "messages" in obj:
        turns, pairs = _messages_turns(obj, where)
        inline = sum(len(_MARKER_RE.findall(t.text)) for t in turns)
        if inline != len(pairs):
            raise DataError(
                f"{where}: the text contains {inline - len(pairs)} literal <image>/<video> placeholder(s) "
                "beyond the media items; remove them (media are given as content items)",
                "placeholder_mismatch",
            )
    else:
        raise DataError(f"{where}: neither `conversations` (LLaVA format) nor `messages` (HF format) found")
    if next((t.role for t in turns if t.role != "system"), "user") != "user":
        raise DataError(f"{where}: the conversation must start with a user turn (after any system turn)")
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise DataError(f"{where}: no assistant turn with text; nothing to supervise; add an answer", "no_assistant")
    empty = [j for j, t in enumerate(turns) if t.role == "assistant" and not t.text.strip()]
    if empty:
        raise DataError(
            f"{where}: turn {empty[0]} (counted from 0) is an assistant turn without text, so it would train an "
            "empty answer; write its answer or remove it with the question before it",
            "empty_answer",
        )
    for t in turns:
        if t.role != "user" and _MARKER_RE.search(t.text):
            raise DataError(
                f"{where}: a {t.role} turn holds a media placeholder; media belong in user turns",
                "placeholder_mismatch",
            )
    media = tuple(_resolve(p, media_root, k, where, check_media) for k, p in pairs)
    return Record(rid, media, tuple(turns), where)


def _read(
    path: str | os.PathLike[str],
    parse: Any,
    media_root: str | os.PathLike[str] | None,
    on_error: OnError,
    counter: SkipCounter | None,
    check_media: bool,
) -> list[Any]:
    """Parse every record of ``path`` with ``parse``; give each its stable key; refuse a file with none left."""
    check_on_error(on_error)
    file = Path(path)
    root = Path(media_root) if media_root is not None else file.parent
    out = []
    skipped: dict[str, int] = {}
    for where, short, obj in _iter_json(file):
        try:
            record = parse(obj, where, root, check_media)
        except DataError as err:
            if on_error == "raise":
                raise
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            if counter is not None:
                counter.skip(err)
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        out.append(dataclasses.replace(record, key=f"id {rid}" if rid is not None else f"at {short}"))
    if not out:
        raise DataError(f"{file}: {_no_records(file, skipped)}", "bad_record")
    return out


def _no_records(file: Path, skipped: dict[str, int]) -> str:
    """Why a file gave no record, and the fix."""
    if skipped:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        return (
            f"every one of its {sum(skipped.values())} records was skipped ({counts}); the warnings above name "
            "the first of each reason: fix those records, the media paths or the file's `media_root`"
        )
    text = file.read_text(encoding="utf-8-sig").strip()
    what = "holds an empty JSON list" if text.startswith("[") else "is empty"
    return f"the file {what}: there is nothing to train or evaluate on; point the data module at a file with records"


def read_records(
    path: str | os.PathLike[str],
    media_root: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    counter: SkipCounter | None = None,
    check_media: bool = True,
) -> list[Record]:
    """Read a conversation file (LLaVA or HF-messages format, JSON list or JSONL).

    Args:
        path: the annotation file.
        media_root: folder for relative media paths; default the file's folder.
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        counter: where skipped records are counted (``"skip"``).
        check_media: whether to check that media files exist.

    Returns:
        The valid records, in file order, each with its stable :attr:`Record.key`.

    Raises:
        DataError: on the first bad record with ``on_error="raise"``; on an unparsable JSON list, a file
            without records or one whose records were all skipped always.
    """
    return _read(path, parse_record, media_root, on_error, counter, check_media)


def _repeated(options: list[str]) -> tuple[int, int] | None:
    """The first two options (indices) that are equal up to surrounding whitespace, or None.

    Example:
        >>> _repeated(["red", "blue", " red"]), _repeated(["red", "Red"])
        ((0, 2), None)
    """
    first: dict[str, int] = {}
    for j, option in enumerate(options):
        text = option.strip()
        if text in first:
            return first[text], j
        first[text] = j
    return None


def parse_choice_record(obj: Any, where: str, media_root: Path, check_media: bool = True) -> ChoiceRecord:
    """Normalise one multiple-choice record (this package's format or MVBench's).

    Args:
        obj: the parsed JSON object.
        where: ``file:line`` or ``file, record k of the list``.
        media_root: folder that relative media paths are resolved against.
        check_media: whether to check that the media file exists.

    Returns:
        The :class:`ChoiceRecord`.

    Raises:
        DataError: naming ``where``, the id and the fix.
    """
    if isinstance(obj, DataError):
        raise obj
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", where))
    where = f"{where} (id {rid})" if "id" in obj else where
    options = obj.get("options", obj.get("candidates"))
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise DataError(f"{where}: `options` must be a list of at least two non-empty strings, got {options!r}")
    same = _repeated(options)
    if same is not None:
        raise DataError(
            f"{where}: options {same[0]} and {same[1]} are equal ({options[same[0]]!r}), so the question cannot be "
            "scored (equal options get equal likelihoods); make the options distinct or remove the question",
            "duplicate_options",
        )
    answer = given = obj.get("answer")
    if isinstance(answer, str) and answer in options:
        answer = options.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        raise DataError(
            f"{where}: `answer` {given!r} matches none of the options {options!r}; it must be an option index in "
            f"[0, {len(options)}) or an option's exact text"
        )
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: `question` must be a non-empty string")
    kinds: list[MediaKind] = [k for k in ("video", "image") if obj.get(k)]
    if len(kinds) != 1 or not isinstance(obj[kinds[0]], str):
        raise DataError(f"{where}: give exactly one `video` or `image` path", "placeholder_mismatch")
    media = _resolve(obj[kinds[0]], media_root, kinds[0], where, check_media)
    question = _MARKER_RE.sub("", question).strip()
    return ChoiceRecord(rid, media, question, tuple(options), answer, str(obj.get("task") or ""), where)


def read_choice_records(
    path: str | os.PathLike[str],
    media_root: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    counter: SkipCounter | None = None,
    check_media: bool = True,
    task: str | None = None,
) -> list[ChoiceRecord]:
    """Read a multiple-choice file (JSON list or JSONL); arguments as :func:`read_records`, plus:

    Args:
        task: the task of records without a ``task`` field; default the file's name without extension.
    """
    default = task if task is not None else Path(path).stem
    records = _read(path, parse_choice_record, media_root, on_error, counter, check_media)
    return [r if r.task else dataclasses.replace(r, task=default) for r in records]
