"""The frozen text-only reference model and its per-token losses at candidate positions.

The teacher reads the same text tokens at the same positions as the student, with the visual
positions removed: it answers "how predictable is this answer token from the text alone?". It
computes logits only at candidate positions, in chunks, so its peak memory never holds
``[B, L, vocab]``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regate_lightning.elision import active_index, gather_positions
from regate_lightning.families import resolve
from regate_lightning.keys import IGNORE_INDEX
from regate_lightning.targets import shift_targets

STUDENT = "student"
"""The ``teacher`` spec of a frozen copy of the student's language backbone (the paper's choice)."""

MIXED_PRECISION_DTYPES: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Lightning's mixed precisions and their autocast dtypes."""


def strip_adapters(module: nn.Module) -> nn.Module:
    """Replace every peft adapter layer in ``module`` by the layer it wraps (in place).

    LoRA layers keep the frozen original as ``base_layer``; ``modules_to_save`` wrappers keep it as
    ``original_module``. What is left is the backbone as it was before adapters were added.
    """
    inner = _wrapped(module)
    if inner is not None:
        return strip_adapters(inner)
    for name, child in list(module.named_children()):
        stripped = strip_adapters(child)
        if stripped is not child:
            setattr(module, name, stripped)
    return module


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The original layer inside a peft adapter wrapper, or None for any other module."""
    inner = getattr(module, "base_layer", None)
    if inner is None and hasattr(module, "modules_to_save"):
        inner = getattr(module, "original_module", None)
    return inner if isinstance(inner, nn.Module) else None


class Teacher(nn.Module):
    """A frozen causal decoder and head that scores answer tokens from text alone.

    Build it with :meth:`from_student` (a copy of the student's language backbone, the paper's
    choice) or :meth:`from_pretrained` (any causal LM sharing the student's tokenizer).

    Args:
        decoder: a text decoder taking ``inputs_embeds``, ``position_ids`` and ``attention_mask``.
        lm_head: projection to the vocabulary.
        chunk_size: candidate positions per LM-head chunk (bounds the logits' memory).
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.decoder = decoder
        self.lm_head = lm_head
        self.chunk_size = chunk_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode (no dropout), whatever the trainer asks."""
        return super().train(False)

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head."""
        return int(self.lm_head.weight.shape[0])

    @classmethod
    def from_student(cls, model: nn.Module, chunk_size: int = 1024) -> Teacher:
        """A frozen copy of the student's language backbone and head, without peft adapters."""
        parts = resolve(model)
        decoder = strip_adapters(copy.deepcopy(parts.decoder))
        head = strip_adapters(copy.deepcopy(parts.lm_head))
        return cls(decoder, head, chunk_size)

    @classmethod
    def from_pretrained(cls, name: str, chunk_size: int = 1024, **kwargs: Any) -> Teacher:
        """Load a causal LM by HF id or local path (``kwargs`` go to ``from_pretrained``)."""
        from transformers import AutoModelForCausalLM

        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        lm = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        parts = resolve(lm)
        return cls(parts.decoder, parts.lm_head, chunk_size)

    @torch.no_grad()
    def reference_losses(
        self, input_ids: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Negative log-likelihood of ``target[t]`` given the text tokens up to ``t``, at candidates.

        Args:
            input_ids: int64 ``[B, L]`` (the student's).
            labels: int64 ``[B, L]``, not shifted.
            text: bool ``[B, L]``: attended text positions (visual placeholders and padding False).
            candidates: bool ``[B, L]``: where to compute; must be text positions.

        Returns:
            float32 ``[B, L]``: the loss at candidate positions, NaN elsewhere.
        """
        if (candidates & ~text).any():
            raise ValueError("candidate positions must be text positions")
        device = self.lm_head.weight.device
        input_ids, labels, text, candidates = (x.to(device) for x in (input_ids, labels, text, candidates))
        out = torch.full(input_ids.shape, float("nan"), dtype=torch.float32, device=device)
        rows = candidates.any(1)
        if not rows.any():
            return out
        index, valid = active_index(text[rows])
        ids = gather_positions(input_ids[rows], index, seq_dim=1)
        embeds = self.decoder.get_input_embeddings()(ids)
        hidden = self.decoder(
            inputs_embeds=embeds, position_ids=index, attention_mask=valid.long(), use_cache=False
        ).last_hidden_state
        wanted = gather_positions(candidates[rows], index, seq_dim=1) & valid
        targets = gather_positions(shift_targets(labels[rows]), index, seq_dim=1)[wanted]
        if (targets == IGNORE_INDEX).any():
            raise ValueError("a candidate position has no supervised target")
        if int(targets.max()) >= self.vocab_size:
            raise ValueError(
                f"a target token id ({int(targets.max())}) is outside the teacher's vocabulary ({self.vocab_size}); "
                "the teacher must share the student's tokenizer"
            )
        selected = hidden[wanted]
        losses = torch.cat(
            [
                F.cross_entropy(self.lm_head(h).float(), t, reduction="none")
                for h, t in zip(selected.split(self.chunk_size), targets.split(self.chunk_size), strict=True)
            ]
        )
        row_ids = rows.nonzero().flatten()[:, None].expand_as(index)[wanted]
        out[row_ids, index[wanted]] = losses
        return out


def text_mask(
    media_token_ids: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attended positions that hold text (not an image/video placeholder, not padding).

    Args:
        media_token_ids: the placeholder ids (``resolve(model).media_token_ids``).
        input_ids: int64 ``[B, L]``.
        attention_mask: ``[B, L]``, 0 at padding, or None (no padding).

    Returns:
        bool ``[B, L]``.

    Example:
        >>> text_mask((9,), torch.tensor([[1, 9, 9, 5, 0]]), torch.tensor([[1, 1, 1, 1, 0]]))
        tensor([[ True, False, False,  True, False]])
    """
    text = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for token_id in media_token_ids:
        text = text & (input_ids != token_id)
    return text


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any, media_token_ids: tuple[int, ...]) -> None:
    """Refuse a teacher whose tokenizer maps text tokens differently from the student's.

    Every student token (except the multimodal placeholders, which the teacher never sees) must have
    the same id in the teacher's vocabulary.

    Raises:
        ValueError: naming how many tokens differ and a few examples.
    """
    student = student_tokenizer.get_vocab()
    teacher = teacher_tokenizer.get_vocab()
    media = set(media_token_ids)
    wrong = [(tok, i, teacher.get(tok)) for tok, i in student.items() if i not in media and teacher.get(tok) != i]
    if wrong:
        examples = ", ".join(f"{tok!r}: student {i}, teacher {j}" for tok, i, j in wrong[:5])
        raise ValueError(
            f"the teacher's tokenizer does not match the student's: {len(wrong)} of {len(student)} tokens differ "
            f"({examples}). ReGATE compares per-token losses, so the teacher must share the student's tokenizer: "
            "use teacher='student' or a text LLM of the same family"
        )


def build_teacher(
    spec: str,
    model: nn.Module,
    teacher_kwargs: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    datamodule: Any = None,
) -> Teacher:
    """The teacher of a spec: a frozen copy of the student, or a loaded causal LM (fitting and scoring).

    A teacher that is not the student must share the student's tokenizer: the ``tokenizer`` path, else
    the data module's ``tokenizer`` attribute, is compared with the teacher's.

    Args:
        spec: :data:`STUDENT` or an HF id / local path of a causal LM.
        model: the student HF model.
        teacher_kwargs: keyword arguments of ``from_pretrained`` (``dtype``, ...).
        tokenizer: HF id / path of the student's tokenizer.
        datamodule: the training data (or None); its ``tokenizer`` is used when ``tokenizer`` is None.

    Returns:
        The teacher, on the CPU, in the dtype it was built in.

    Raises:
        ValueError: no student tokenizer to check a loaded teacher against, or tokenizers that differ.
    """
    if spec == STUDENT:
        return Teacher.from_student(model)
    from transformers import AutoTokenizer

    teacher = Teacher.from_pretrained(spec, **dict(teacher_kwargs or {}))
    student_tok = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        student_tok = AutoTokenizer.from_pretrained(tokenizer)
    if student_tok is None:
        raise ValueError(
            f"teacher {spec!r} is not the student, so its tokenizer must be checked against the student's: "
            "pass `tokenizer=` (the student's HF id or path) or give the datamodule a `tokenizer`"
        )
    check_tokenizers(student_tok, AutoTokenizer.from_pretrained(spec), resolve(model).media_token_ids)
    return teacher


def teacher_dtype(
    teacher_kwargs: dict[str, Any] | None, precision: str | None, student_dtype: torch.dtype
) -> torch.dtype:
    """The dtype the teacher runs in, in fitting and in scoring alike.

    ``teacher_kwargs["dtype"]`` when given; else, under mixed precision, the autocast dtype (the teacher
    only runs forward, under the same autocast, so float32 weights would double its memory for
    nothing); else the student's parameter dtype (as the precision plugin left it).

    Args:
        teacher_kwargs: the teacher's ``from_pretrained`` arguments.
        precision: Lightning's precision string (``"bf16-mixed"``, ``"32-true"``, ...), or None.
        student_dtype: the student's floating-point parameter dtype.

    Example:
        >>> teacher_dtype({}, "bf16-mixed", torch.float32), teacher_dtype({"dtype": "float16"}, None, torch.float32)
        (torch.bfloat16, torch.float16)
    """
    dtype = (teacher_kwargs or {}).get("dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = MIXED_PRECISION_DTYPES.get(str(precision))
    return student_dtype if dtype is None else dtype
