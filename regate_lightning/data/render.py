r"""Rendering a conversation into ``input_ids`` and ``labels`` with the student's tokenizer.

The conversation is rendered to text with the tokenizer's chat template, or, when it has none, with
:data:`FALLBACK_CHAT_TEMPLATE`::

    {bos}[{system} ]USER: {user} ASSISTANT: {assistant}{eos}USER: {user} ASSISTANT: {assistant}{eos}

(LLaVA-1.5's "USER: ... ASSISTANT: ..." layout; ``bos``/``eos`` only where the tokenizer has them).

**Supervision.** Only assistant turns are supervised, each including what the template writes after
the answer up to the next message (its end-of-turn token, e.g. ``</s>`` or ``<|im_end|>\n``). The
span of assistant turn ``i`` is found by rendering twice: ``render(turns[:i], add_generation_prompt)``
must be a prefix of ``render(turns[:i + 1])``, and the difference is the span. A template that is not
prefix-stable this way (e.g. one that rewrites earlier turns) is refused with a clear error. With a
fast tokenizer, a token is supervised when its characters overlap a span (offsets mapping), so the
text is tokenized as the model would see it at inference; a slow tokenizer tokenizes the spans
separately.

**Media.** Each :data:`~regate_lightning.data.conversations.IMAGE_MARKER` /
:data:`~regate_lightning.data.conversations.VIDEO_MARKER` in the rendered text is replaced by the
exact run of placeholder ids the model expects (:meth:`VisionSpec.placeholder_ids`), inserted as ids
from the model's config, so the tokenizer needs no placeholder tokens of its own; the text around a
marker is tokenized on its own. A text token that equals a placeholder id (a tokenizer/model mismatch)
raises.

**Templates that write media themselves** (a checkpoint's chat template, e.g. Qwen2-VL's
``<|vision_start|><|image_pad|><|vision_end|>`` or LLaVA's ``<image>``): when the tokenizer has tokens
for the model's placeholder ids and the template renders a ``{"type": "image"}`` / ``{"type": "video"}``
content item as exactly that token, the turns are given to the template as HF content lists (text items
and media items at the markers' places; one newline right after a marker is dropped, since the template
writes its own separator), and each media token the template writes is expanded to the media's count
of placeholder ids, the k-th image token to the k-th image and the k-th video token to the k-th video
(what transformers' processors do after ``apply_chat_template``). The template's own text around the
media (Qwen's vision start / end) stays as it wrote it. Where the template writes a token of its own for a kind
(:attr:`VisionSpec.template_tokens`: SmolVLM2's and InternVL's ``<video>``, whose frames are images to the model;
Gemma 3's ``<start_of_image>``), that token is recognised and the media's expansion replaces it.
:attr:`ChatRenderer.template_media` tells which mode is in use.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from regate_lightning.data.conversations import IMAGE_MARKER, VIDEO_MARKER, Turn
from regate_lightning.data.errors import DataError
from regate_lightning.data.vision import ProcessedMedia, VisionSpec, join_media
from regate_lightning.keys import IGNORE_INDEX, IMAGE_TYPE, MM_TOKEN_TYPE_IDS, TEXT_TYPE, VIDEO_TYPE

FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] }}"
    "{% if eos_token %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
"""Jinja chat template used when the tokenizer has none (see the module docstring)."""

_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
_KIND = {IMAGE_MARKER: "image", VIDEO_MARKER: "video"}


@dataclass
class Sample:
    """One rendered sample, before collation.

    Attributes:
        input_ids: int64 ``[L]``.
        labels: int64 ``[L]``, ``-100`` where unsupervised (everything but assistant turns).
        token_types: int64 ``[L]``, 0 text, 1 image placeholder, 2 video placeholder.
        media: HF batch key -> tensor, concatenated over this sample's media by
            :func:`~regate_lightning.data.vision.join_media`.
        sample_idx: the sample's stable key (``batch["sample_idx"]``; see :data:`~regate_lightning.keys.SAMPLE_IDX`).
        visual_end: every visual token (and Qwen's vision-end token) is at a position ``< visual_end``.
        emit_token_types: whether the model takes the token types (Qwen2-VL families, Gemma 3).
        token_types_key: the batch key of the token types (``mm_token_type_ids``; Gemma 3's ``token_type_ids``).
        extras: further int64 ``[B]`` batch entries (e.g. ``option_idx`` for multiple choice).
        index: the record's index in its dataset (skips are counted once per record by it); -1 if none.
        source: where the record comes from (``file:line (id ...)``), for messages.
        frame_keys: media keys whose videos of different lengths may be joined when batching.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    token_types: torch.Tensor
    media: dict[str, torch.Tensor]
    sample_idx: int
    visual_end: int = 0
    emit_token_types: bool = False
    token_types_key: str = MM_TOKEN_TYPE_IDS
    extras: dict[str, int] = field(default_factory=dict)
    index: int = -1
    source: str = ""
    frame_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class ChatRenderer:
    """Renders turns and processed media into a :class:`Sample` (see the module docstring).

    Args:
        tokenizer: the student's HF tokenizer.
        spec: the student's :class:`VisionSpec`.
        chat_template: a Jinja template to use instead of the tokenizer's.
        system_prompt: a system turn prepended to conversations that have none.

    Attributes:
        template_media: media kind -> the placeholder token the chat template writes for it, when the
            template writes media itself (see the module docstring); None when markers are expanded.
    """

    def __init__(
        self,
        tokenizer: Any,
        spec: VisionSpec,
        chat_template: str | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        self.system_prompt = system_prompt
        self.template_media = self._template_media()
        if self.template_media is None:
            self._forbidden = set(spec.media_token_ids)
            self._split = _MARKER_RE
            self._kinds = dict(_KIND)
        else:  # the template writes Qwen's vision start / end as text; only the placeholders are ours
            self._forbidden = {i for i in (spec.image_token_id, spec.video_token_id) if i is not None}
            self._split = re.compile("(" + "|".join(re.escape(t) for t in self.template_media.values()) + ")")
            self._kinds = {token: kind for kind, token in self.template_media.items()}

    def _template_media(self) -> dict[str, str] | None:
        """The placeholder token the chat template writes per media kind, or None (see the module docstring)."""
        from jinja2 import TemplateError

        added = getattr(self.tokenizer, "get_added_vocab", None)
        vocab = added() if callable(added) else {}
        by_id = {i: t for t, i in vocab.items()}
        declared = dict(self.spec.template_tokens)
        tokens: dict[str, str] = {}
        for kind, token_id in (("image", self.spec.image_token_id), ("video", self.spec.video_token_id)):
            if token_id is None:
                continue
            token = declared.get(kind) if declared.get(kind) in vocab else by_id.get(token_id)
            if token is None:
                return None
            probe = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "probe"}]}]
            try:
                rendered = self._text(probe, generation_prompt=True)
            except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError):
                return None  # a template that takes string contents only
            if rendered.count(token) != 1 or rendered.count("probe") != 1:
                return None
            tokens[kind] = token
        return tokens or None

    def _content(self, text: str) -> str | list[dict[str, str]]:
        """A turn's content: the text with markers, or an HF content list for a template that writes media."""
        if self.template_media is None:
            return text
        items: list[dict[str, str]] = []
        pieces = _MARKER_RE.split(text)
        for j, piece in enumerate(pieces):
            if j % 2:
                items.append({"type": _KIND[piece]})
                continue
            if j and piece.startswith("\n"):
                piece = piece[1:]
            if piece:
                items.append({"type": "text", "text": piece})
        return items

    def _text(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        out = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        if not isinstance(out, str):
            raise TypeError(f"the chat template must render to str, got {type(out).__name__}")
        return out

    def _spans(self, turns: Sequence[Turn], end_of_turn: bool, record_id: str) -> tuple[str, list[tuple[int, int]]]:
        turns = list(turns)
        if self.system_prompt is not None and (not turns or turns[0].role != "system"):
            turns.insert(0, Turn("system", self.system_prompt))
        messages = [{"role": t.role, "content": self._content(t.text)} for t in turns]
        text = self._text(messages, generation_prompt=messages[-1]["role"] != "assistant")
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError(f"record {record_id}: the conversation starts with an assistant turn")
            prefix = self._text(messages[:i], generation_prompt=True)
            upto = self._text(messages[: i + 1], generation_prompt=False)
            if not upto.startswith(prefix) or not text.startswith(upto):
                raise ValueError(
                    f"record {record_id}: the chat template is not prefix-stable (rendering the "
                    f"conversation up to turn {i} does not extend the rendering before it), so assistant "
                    "spans cannot be found; pass `chat_template=` (e.g. FALLBACK_CHAT_TEMPLATE)"
                )
            start, stop = len(prefix), len(upto)
            if not end_of_turn:
                answer = turns[i].text
                at = upto.find(answer, start)
                if at < 0:
                    raise ValueError(f"record {record_id}: the chat template altered the answer text of turn {i}")
                start, stop = at, at + len(answer)
            spans.append((start, stop))
        return text, spans

    def _tokenize(
        self, text: str, offset: int, spans: list[tuple[int, int]], prefix: str = "", suffix: str = ""
    ) -> tuple[list[int], list[bool]]:
        """Tokenize ``text`` (starting at character ``offset`` of the rendering); flag supervised tokens.

        ``prefix`` / ``suffix``: a neighbouring media expansion's own text, tokenized together with ``text`` (as a
        processor tokenizes the text it wrote into the prompt) and never supervised.
        """
        if prefix or suffix:
            return self._tokenize_joined(text, offset, spans, prefix, suffix)
        if not text:
            return [], []
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            sup = [
                any(offset + a < e and offset + max(b, a + 1) > s for s, e in spans) for a, b in enc["offset_mapping"]
            ]
            return ids, sup
        cuts = sorted({0, len(text), *(min(max(p - offset, 0), len(text)) for span in spans for p in span)})
        ids, sup = [], []
        for a, b in itertools.pairwise(cuts):
            piece = self.tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(offset + a >= s and offset + b <= e for s, e in spans)
            ids += piece
            sup += [inside] * len(piece)
        return ids, sup

    def _tokenize_joined(
        self, text: str, offset: int, spans: list[tuple[int, int]], prefix: str, suffix: str
    ) -> tuple[list[int], list[bool]]:
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: the three parts one after the other
            ids, sup = self._tokenize(text, offset, spans)
            before = self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            after = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
            return before + ids + after, [False] * len(before) + sup + [False] * len(after)
        enc = self.tokenizer(prefix + text + suffix, add_special_tokens=False, return_offsets_mapping=True)
        start, stop = len(prefix), len(prefix) + len(text)
        sup = []
        for a, b in enc["offset_mapping"]:
            lo, hi = max(a, start), min(max(b, a + 1), stop)  # the token's characters inside `text`
            sup.append(lo < hi and any(offset + lo - start < e and offset + hi - start > s for s, e in spans))
        return list(enc["input_ids"]), sup

    @staticmethod
    def _outer_text(item: ProcessedMedia) -> tuple[str, str]:
        """The text an expansion starts and ends with (tokenized with the template's text around the media)."""
        parts = item.expansion or ()
        head = parts[0] if parts and isinstance(parts[0], str) else ""
        tail = parts[-1] if len(parts) > 1 and isinstance(parts[-1], str) else ""
        return head, tail

    def _media_ids(self, item: ProcessedMedia, inner: bool = False) -> list[int]:
        """The ids that stand for one media: its run of placeholders, or its family's expansion (text tokenized).

        ``inner``: leave out the expansion's leading and trailing text (:meth:`_outer_text`), tokenized with the
        template's text around the media instead.
        """
        markers = self.template_media is None
        if item.expansion is None:
            return self.spec.placeholder_ids(item.kind, item.num_tokens, markers=markers)
        parts = list(item.expansion)
        if inner:
            head, tail = self._outer_text(item)
            parts = parts[int(bool(head)) : len(parts) - int(bool(tail))]
        ids: list[int] = []
        for part in parts:
            ids += [part] if isinstance(part, int) else self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return self.spec.wrap_markers(ids) if markers else ids

    def render(
        self,
        turns: Sequence[Turn],
        media: Sequence[ProcessedMedia],
        sample_idx: int = 0,
        record_id: str = "",
        end_of_turn: bool = True,
        index: int = -1,
        source: str = "",
    ) -> Sample:
        """Render one conversation.

        Args:
            turns: the conversation; media markers in user turns.
            media: one processed media per marker, in marker order.
            sample_idx: the sample's stable key, copied into the sample.
            record_id: for error messages.
            end_of_turn: supervise the template's end-of-turn text after each answer (training);
                ``False`` supervises the answer text only (multiple-choice scoring).
            index: the record's index in its dataset, copied into the sample.
            source: where the record comes from, copied into the sample.

        Returns:
            The :class:`Sample`.

        Raises:
            DataError: the markers do not match ``media`` or nothing is supervised.
            ValueError: the tokenizer produces an id that is a placeholder id or beyond the vocabulary.
        """
        text, spans = self._spans(turns, end_of_turn, record_id)
        pieces = self._split.split(text)
        kinds = [self._kinds[m] for m in pieces[1::2]]
        given = [m.kind for m in media]
        if (sorted(kinds) != sorted(given)) if self.template_media else (kinds != given):
            raise DataError(
                f"record {record_id}: the rendered text has media placeholders {pieces[1::2]} but the media are "
                f"{given}; one placeholder per media, in order",
                "placeholder_mismatch",
            )
        queues = {kind: [m for m in media if m.kind == kind] for kind in set(given)}
        items = [queues[self._kinds[m]].pop(0) for m in pieces[1::2]]  # the media of each marker, in order
        # an expansion's outer text joins the template's text around it when the template writes the media
        joined = self.template_media is not None
        outer = [self._outer_text(item) if joined else ("", "") for item in items]
        ids: list[int] = []
        sup: list[bool] = []
        types: list[int] = []
        offset = 0
        for j, piece in enumerate(pieces):
            if j % 2 == 0:
                before = outer[j // 2 - 1][1] if j else ""
                after = outer[j // 2][0] if j // 2 < len(items) else ""
                piece_ids, piece_sup = self._tokenize(piece, offset, spans, prefix=before, suffix=after)
                bad = self._forbidden.intersection(piece_ids)
                if bad or any(i >= self.spec.vocab_size for i in piece_ids):
                    raise ValueError(
                        f"record {record_id}: the tokenizer produced id(s) {sorted(bad) or max(piece_ids)} "
                        f"that are placeholder ids or >= the model's vocab_size {self.spec.vocab_size}; "
                        "use a tokenizer that matches the model"
                    )
                ids += piece_ids
                sup += piece_sup
                types += [TEXT_TYPE] * len(piece_ids)
            else:
                item = items[j // 2]
                block = self._media_ids(item, inner=joined)
                kind_type = IMAGE_TYPE if item.kind == "image" else VIDEO_TYPE
                ids += block
                sup += [False] * len(block)
                types += [
                    kind_type if t in (self.spec.image_token_id, self.spec.video_token_id) else TEXT_TYPE for t in block
                ]
            offset += len(piece)
        visual = set(self.spec.media_token_ids)
        visual_end = next((len(ids) - k for k, t in enumerate(reversed(ids)) if t in visual), 0)
        if not any(sup):
            raise DataError(f"record {record_id}: no token is supervised (empty answers?)", "no_assistant")
        input_ids = torch.tensor(ids, dtype=torch.int64)
        labels = torch.where(torch.tensor(sup), input_ids, IGNORE_INDEX)
        tensors: dict[str, list[torch.Tensor]] = {}
        for item in media:
            for key, value in item.tensors.items():
                tensors.setdefault(key, []).append(value)
        return Sample(
            input_ids=input_ids,
            labels=labels,
            token_types=torch.tensor(types, dtype=torch.int64),
            media={k: join_media(k, v, self.spec.frame_keys) for k, v in tensors.items()},
            sample_idx=int(sample_idx),
            visual_end=visual_end,
            emit_token_types=self.spec.token_types,
            token_types_key=self.spec.token_types_key,
            index=index,
            source=source,
            frame_keys=self.spec.frame_keys,
        )
