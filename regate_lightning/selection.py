"""Extension points of the policy: which candidates a sparse step keeps, and an unmeasured candidate's difficulty.

**Selection.** A :class:`Selection` turns the fused scores of one batch into a keep mask. The built-ins
are selectable by name (``selection: regate`` in a recipe):

=============  ==========================  =====================================================
name           class                       keeps per sample
=============  ==========================  =====================================================
``regate``     :class:`TopKSelection`      the top ``k = max(min_keep, ceil(keep_ratio * n))`` by score
``topk``       :class:`TopKSelection`      (the same)
``random``     :class:`RandomSelection`    the same ``k``, uniformly at random (a control)
``adaptive``   :class:`AdaptiveSelection`  the fewest top candidates covering ``coverage`` of the score
=============  ==========================  =====================================================

Your own selection is a subclass of :class:`Selection` (in YAML: ``class_path`` / ``init_args``), or any
callable with the signature of :meth:`Selection.select` (in Python, or by dotted path in YAML).

**Fallback.** A :class:`Fallback` gives the student difficulty ``m`` of every candidate, filling the
candidates the student never computed. The built-ins ``"vocab"`` and ``"ref"`` are the score store's
own modes (:meth:`~regate_lightning.bank.ScoreBank.difficulty`).

Pure torch: nothing here imports Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from regate_lightning._imports import import_object, is_dotted_path
from regate_lightning.bank import FALLBACKS, ScoreBank
from regate_lightning.scoring import adaptive_keep, check_fraction, random_keep, select_keep

__all__ = [
    "SELECTIONS",
    "AdaptiveSelection",
    "Fallback",
    "RandomSelection",
    "Selection",
    "StoreFallback",
    "TopKSelection",
    "as_fallback",
    "as_selection",
    "fallback_name",
]


# --------------------------------------------------------------------------------------------------
# Selection.


class Selection(ABC):
    """Which candidates of each sample a sparse step keeps.

    Subclass it and implement :meth:`select`; the policy calls it once per sparse step with the whole
    batch, on the score store's device.
    """

    @abstractmethod
    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        keep_ratio: float,
        min_keep: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """The keep mask of one batch.

        Args:
            scores: float32 ``[B, L]``, the fused score ``d`` at the candidates (NaN elsewhere, and where
                a candidate has no score yet).
            candidates: bool ``[B, L]``, the positions that may be elided.
            keep_ratio: the policy's ``keep_ratio`` ``p`` in ``(0, 1)``.
            min_keep: keep at least this many candidates of a sample (never more than it has).
            generator: the policy's random generator, on the device of ``scores``.

        Returns:
            bool ``[B, L]``: ``False`` at the elided candidates, ``True`` everywhere else (a selection must
            never elide a position that is not a candidate).
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class TopKSelection(Selection):
    """The paper's selection: per sample, the top ``k = max(min_keep, ceil(keep_ratio * n))`` by fused score.

    Ties go to the earlier position; a candidate without a score (NaN) ranks first
    (:func:`~regate_lightning.scoring.select_keep`).
    """

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        keep_ratio: float,
        min_keep: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """See :meth:`Selection.select`."""
        return select_keep(scores, candidates, keep_ratio, min_keep)


class RandomSelection(Selection):
    """A control: the same keep count per sample as :class:`TopKSelection`, chosen uniformly at random.

    It draws from the policy's generator (seeded with ``seed + rank``), so runs repeat.
    """

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        keep_ratio: float,
        min_keep: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """See :meth:`Selection.select`; ``scores`` is not read."""
        return random_keep(candidates, keep_ratio, min_keep, generator)


class AdaptiveSelection(Selection):
    """Keep count per sample from its own scores: the fewest top candidates whose fused scores cover ``coverage``.

    A sample whose difficulty is concentrated on a few tokens keeps few; a sample of evenly hard tokens
    keeps about ``coverage * n``. ``keep_ratio`` is not read (the logged ``regate/kept_frac`` shows what
    was kept); ``keep_ratio=1.0`` still turns elision off, as for every selection. See
    :func:`~regate_lightning.scoring.adaptive_keep` and ``docs/method.md``.

    Args:
        coverage: share of each sample's total fused score (scores clamped at 0) that the kept candidates
            cover, in ``(0, 1]``. The default 0.95 was chosen on the demo's task (one seed, 1500 steps): 0.8
            and 0.9 dropped answer words that need the video (9 % and 1 % of them) and lost final accuracy
            (0.854, 0.890), 0.95 kept them (99.9 %) and matched the fixed ratio's accuracy (0.914 vs 0.917)
            with 6 % fewer decoder tokens; see ``docs/results.md``.
    """

    def __init__(self, coverage: float = 0.95) -> None:
        check_fraction("coverage", coverage, allow_zero=False)
        self.coverage = float(coverage)

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        keep_ratio: float,
        min_keep: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """See :meth:`Selection.select`; ``keep_ratio`` is not read."""
        return adaptive_keep(scores, candidates, self.coverage, min_keep)


class _FunctionSelection(Selection):
    """A plain callable with the signature of :meth:`Selection.select`."""

    def __init__(self, function: Callable[..., Tensor]) -> None:
        self.function = function

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        keep_ratio: float,
        min_keep: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        return self.function(scores, candidates, keep_ratio, min_keep, generator)


SELECTIONS: dict[str, type[Selection]] = {
    "regate": TopKSelection,
    "topk": TopKSelection,
    "random": RandomSelection,
    "adaptive": AdaptiveSelection,
}
"""The built-in selections by name (each built with its default arguments)."""


def as_selection(selection: str | Selection | Callable[..., Tensor]) -> Selection:
    """A :class:`Selection` from a name of :data:`SELECTIONS`, a dotted path, an instance or a callable.

    Args:
        selection: ``"regate"``, ``"topk"``, ``"random"``, ``"adaptive"``; a dotted path to a
            :class:`Selection` subclass (built without arguments) or to a function; a :class:`Selection`;
            or a callable with the signature of :meth:`Selection.select`.

    Raises:
        ValueError: an unknown name, or a dotted path that does not import.
        TypeError: anything else.

    Example:
        >>> as_selection("random")
        RandomSelection()
        >>> as_selection(AdaptiveSelection(coverage=0.5))
        AdaptiveSelection(coverage=0.5)
    """
    if isinstance(selection, Selection):
        return selection
    if isinstance(selection, str):
        if selection in SELECTIONS:
            return SELECTIONS[selection]()
        if not is_dotted_path(selection):
            raise ValueError(
                f"`selection` must be one of {tuple(SELECTIONS)}, a Selection or a dotted path to one, "
                f"got {selection!r}"
            )
        return as_selection(import_object(selection, "selection"))
    if isinstance(selection, type) and issubclass(selection, Selection):
        return selection()
    if callable(selection):
        return _FunctionSelection(selection)
    raise TypeError(f"`selection` must be a name, a Selection or a callable, got {type(selection).__name__}")


# --------------------------------------------------------------------------------------------------
# Fallback.


class Fallback(ABC):
    """The student difficulty ``m`` of a batch's candidates, with a value where the student never computed one.

    Attributes:
        name: what a checkpoint records; a resumed run must use a fallback of the same name.
    """

    name: str = ""

    @abstractmethod
    def difficulty(self, bank: ScoreBank, sample_idx: Tensor, counts: Tensor, target_ids: Tensor) -> Tensor:
        """``m`` for every candidate of the batch.

        Args:
            bank: the score store (EMA per candidate and per target id, reference losses).
            sample_idx: int64 ``[B]`` of registered samples.
            counts: int64 ``[B]``, candidates per sample.
            target_ids: int64 ``[N]``, the target token of each candidate (flat layout).

        Returns:
            float32 ``[N]``, flat layout.
        """


class StoreFallback(Fallback):
    """The score store's own modes: ``"vocab"`` (EMA of the target token id, then the reference loss) or
    ``"ref"`` (the reference loss); see :meth:`~regate_lightning.bank.ScoreBank.difficulty`.

    Args:
        mode: one of :data:`~regate_lightning.bank.FALLBACKS`.
    """

    def __init__(self, mode: str = "vocab") -> None:
        if mode not in FALLBACKS:
            raise ValueError(f"`fallback` must be one of {FALLBACKS}, a Fallback or a dotted path to one, got {mode!r}")
        self.name = mode

    def difficulty(self, bank: ScoreBank, sample_idx: Tensor, counts: Tensor, target_ids: Tensor) -> Tensor:
        """See :meth:`Fallback.difficulty`."""
        return bank.difficulty(sample_idx, counts, target_ids, self.name)

    def __repr__(self) -> str:
        return f"StoreFallback({self.name!r})"


def as_fallback(fallback: str | Fallback) -> Fallback:
    """A :class:`Fallback` from ``"vocab"``, ``"ref"``, a dotted path to a subclass, or an instance.

    Raises:
        ValueError: an unknown name, or a dotted path that does not import.
        TypeError: anything else.
    """
    if isinstance(fallback, Fallback):
        return fallback
    if isinstance(fallback, str):
        if is_dotted_path(fallback):
            found = import_object(fallback, "fallback")
            return as_fallback(found() if isinstance(found, type) else found)
        return StoreFallback(fallback)
    raise TypeError(f"`fallback` must be 'vocab', 'ref' or a Fallback, got {type(fallback).__name__}")


def fallback_name(fallback: Fallback) -> str:
    """What a checkpoint records of a fallback: its ``name``, else its class's dotted path."""
    kind = type(fallback)
    return fallback.name or f"{kind.__module__}.{kind.__qualname__}"
