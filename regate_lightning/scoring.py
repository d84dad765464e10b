"""The method's arithmetic (pure torch): fused score, keep masks (top-k, random, adaptive), EMA update, layout.

Per-candidate values travel in one *flat* layout throughout the package: ``flat = x[candidates]`` for
an ``[B, L]`` tensor ``x`` and a bool ``[B, L]`` candidate mask, i.e. row by row and, inside a row, in
position order, so the ``i``-th value of a sample belongs to its ``i``-th candidate position. The
number of values per row is ``counts = candidates.sum(1)``. :func:`gather_candidates` and
:func:`scatter_candidates` convert between the two layouts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "adaptive_keep",
    "check_fraction",
    "check_int",
    "check_keep_ratio",
    "ema_update",
    "fuse_scores",
    "gather_candidates",
    "num_kept",
    "random_keep",
    "scatter_candidates",
    "select_keep",
]


# --------------------------------------------------------------------------------------------------
# Argument checks, shared by the whole package so that every message has the same shape.


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise unless ``value`` is an ``int`` (not a ``bool``) with ``value >= minimum``.

    Args:
        name: the argument's name, quoted in the message.
        value: the value to check.
        minimum: the smallest allowed value.

    Raises:
        TypeError: if ``value`` is not an ``int``.
        ValueError: if ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


def check_fraction(name: str, value: object, *, allow_zero: bool = True) -> None:
    """Raise unless ``value`` is a real number in ``[0, 1]`` (or ``(0, 1]`` if not ``allow_zero``).

    Args:
        name: the argument's name, quoted in the message.
        value: the value to check.
        allow_zero: whether 0 is allowed.

    Raises:
        TypeError: if ``value`` is not an ``int`` or ``float``.
        ValueError: if ``value`` is out of range (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"`{name}` must be in {interval}, got {value}")


def check_keep_ratio(keep_ratio: object) -> None:
    """Raise unless ``keep_ratio`` is in ``(0, 1]``; see :func:`check_fraction`."""
    check_fraction("keep_ratio", keep_ratio, allow_zero=False)


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_candidates(candidates: Tensor) -> None:
    if candidates.dtype != torch.bool:
        raise TypeError(f"`candidates` must be a bool tensor, got {candidates.dtype}")
    if candidates.dim() != 2:
        raise ValueError(f"`candidates` must have shape [B, L], got {tuple(candidates.shape)}")


# --------------------------------------------------------------------------------------------------
# Fused score and selection.


def fuse_scores(ema: Tensor, ref: Tensor, ref_weight: float) -> Tensor:
    """Fused difficulty ``d = (1 - lambda) * m + lambda * ref``.

    A convex mix, so ``ref_weight = 0`` is "EMA only" and ``ref_weight = 1`` is "reference only", as
    in the paper's ablation. An input whose weight is 0 is not read at all: at ``ref_weight = 0`` the
    result is ``ema`` even where ``ref`` is NaN (and vice versa), so each ablation needs only its own
    signal. Otherwise a NaN in either input gives NaN in the output; fill missing values first (the
    bank's :meth:`~regate_lightning.bank.ScoreBank.difficulty` does this for ``m``).

    Args:
        ema: float ``[*]``, the student difficulty ``m`` (EMA of the student's loss).
        ref: float ``[*]``, same shape, the reference (teacher) loss.
        ref_weight: ``lambda`` in ``[0, 1]``.

    Returns:
        float32 ``[*]``, a new tensor.

    Raises:
        ValueError: if ``ref_weight`` is out of range or the shapes differ.

    Example:
        >>> fuse_scores(torch.tensor([1.0, 3.0]), torch.tensor([3.0, float("nan")]), 0.0)
        tensor([1., 3.])
        >>> fuse_scores(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0]), 0.5)
        tensor([2., 4.])
    """
    check_fraction("ref_weight", ref_weight)
    _check_same_shape("ema", ema, "ref", ref)
    ema = ema.to(torch.float32)
    ref = ref.to(torch.float32)
    if ref_weight == 0:
        return ema.clone()
    if ref_weight == 1:
        return ref.clone()
    return (1.0 - ref_weight) * ema + ref_weight * ref


def num_kept(num_candidates: Tensor, keep_ratio: float, min_keep: int = 1) -> Tensor:
    """Per-sample keep count ``k = min(n, max(min_keep, ceil(keep_ratio * n)))``.

    ``keep_ratio * n`` is computed in IEEE float64, exactly as Python computes ``keep_ratio * n`` for a
    float and an int, so ``k`` equals ``min(n, max(min_keep, math.ceil(keep_ratio * n)))`` for every
    ``n``. Note that this inherits float rounding of the product: ``0.56 * 100`` is
    ``56.00000000000001`` in float64, so ``k = 57`` there. ``keep_ratio = 1`` always gives ``k = n``.

    Args:
        num_candidates: integer ``[B]``, number of candidates ``n`` per sample.
        keep_ratio: ``p`` in ``(0, 1]``.
        min_keep: lower bound on ``k`` (capped at ``n``), ``>= 0``.

    Returns:
        int64 ``[B]`` on the device of ``num_candidates``.

    Example:
        >>> num_kept(torch.tensor([0, 1, 3, 10]), 0.3, min_keep=2)
        tensor([0, 1, 2, 3])
    """
    check_keep_ratio(keep_ratio)
    check_int("min_keep", min_keep, minimum=0)
    n = num_candidates.to(torch.int64)
    k = torch.ceil(n.to(torch.float64) * keep_ratio).to(torch.int64)
    return torch.minimum(k.clamp(min=min_keep), n)


def select_keep(scores: Tensor, candidates: Tensor, keep_ratio: float, min_keep: int = 1) -> Tensor:
    """Keep mask: every position except the candidates that are not among the top ``k`` of their row.

    Per row with ``n`` candidates, the ``k`` candidates with the highest score stay (``k`` as in
    :func:`num_kept`). Ties are broken by position: among equal scores the earlier position wins.
    NaN scores rank above every number (``torch.sort``'s order), so a candidate without a score is
    kept before scored ones. Rows without candidates are all ``True``. Fully vectorised: two stable
    sorts, no loop over rows.

    Args:
        scores: float ``[B, L]``; only values at candidate positions are read.
        candidates: bool ``[B, L]``, the positions that may be elided.
        keep_ratio: ``p`` in ``(0, 1]``; ``1`` keeps everything.
        min_keep: lower bound on the kept candidates per row (capped at ``n``), ``>= 0``.

    Returns:
        bool ``[B, L]``; ``False`` exactly at the elided candidates.

    Raises:
        TypeError: if ``candidates`` is not bool.
        ValueError: if the shapes differ or an argument is out of range.

    Example:
        >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.5]])
        >>> candidates = torch.tensor([[False, True, True, True, True]])
        >>> select_keep(scores, candidates, keep_ratio=0.5)
        tensor([[ True,  True,  True, False, False]])
    """
    _check_candidates(candidates)
    _check_same_shape("scores", scores, "candidates", candidates)
    k = num_kept(candidates.sum(1), keep_ratio, min_keep)
    return _keep_first(_rank_order(scores, candidates), candidates, k)


def _rank_order(scores: Tensor, candidates: Tensor) -> Tensor:
    """Positions of each row, candidates first in descending score order, then the non-candidates.

    Every row is ordered by score (descending, stable: earlier position first among ties; NaN first),
    then the candidates are moved to the front with a second stable sort, so the first ``n`` entries of
    a row with ``n`` candidates are its candidates in rank order, whatever the other scores are.

    Returns:
        int64 ``[B, L]``.
    """
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    is_cand = torch.gather(candidates, 1, by_score).to(torch.uint8)
    return torch.gather(by_score, 1, torch.sort(is_cand, dim=1, descending=True, stable=True).indices)


def _keep_first(by_rank: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """Keep mask that drops every candidate of row ``b`` ranked ``k[b]`` or later in ``by_rank``."""
    rank = torch.arange(candidates.shape[1], device=candidates.device)
    n = candidates.sum(1, keepdim=True)
    dropped_in_rank_order = (rank >= k.unsqueeze(1)) & (rank < n)
    dropped = torch.zeros_like(candidates).scatter_(1, by_rank, dropped_in_rank_order)
    return ~dropped


def adaptive_keep(scores: Tensor, candidates: Tensor, coverage: float, min_keep: int = 1) -> Tensor:
    """Keep mask with a keep count per sample from its own scores: the fewest top candidates covering ``coverage``.

    Per row, candidates are ranked as in :func:`select_keep` (descending score, earlier position first
    among ties, NaN first) and the shortest prefix of that ranking whose scores sum to at least
    ``coverage`` times the row's total is kept, with at least ``min_keep`` candidates (capped at ``n``).
    Scores are clamped at 0 for the sums, and a NaN score counts 0 (it is kept, being ranked first,
    but covers nothing). A row whose scores are all 0 keeps ``min_keep``. A row with a few dominant
    scores keeps few candidates; a row of even scores keeps about ``coverage * n``. Sums are float64.
    Fully vectorised, like :func:`select_keep`.

    Args:
        scores: float ``[B, L]``; only values at candidate positions are read.
        candidates: bool ``[B, L]``, the positions that may be elided.
        coverage: share of the row's total score to keep, in ``(0, 1]``.
        min_keep: lower bound on the kept candidates per row (capped at ``n``), ``>= 0``.

    Returns:
        bool ``[B, L]``; ``False`` exactly at the elided candidates.

    Raises:
        TypeError: if ``candidates`` is not bool.
        ValueError: if the shapes differ or an argument is out of range.

    Example:
        >>> scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
        >>> adaptive_keep(scores, torch.ones(2, 5, dtype=torch.bool), coverage=0.7)
        tensor([[ True,  True, False, False, False],
                [ True,  True,  True,  True, False]])
    """
    _check_candidates(candidates)
    _check_same_shape("scores", scores, "candidates", candidates)
    check_fraction("coverage", coverage, allow_zero=False)
    check_int("min_keep", min_keep, minimum=0)
    by_rank = _rank_order(scores, candidates)
    mass = torch.where(candidates, scores.to(torch.float64).nan_to_num(0.0).clamp(min=0.0), 0.0)
    ranked = torch.gather(mass, 1, by_rank)  # non-candidates sit at the end with mass 0
    before = torch.cumsum(ranked, dim=1) - ranked  # mass of the candidates ranked above each entry
    need = coverage * ranked.sum(1, keepdim=True)
    n = candidates.sum(1)
    # The fewest first k whose mass reaches `need`: the entries that still see less than `need` above them.
    k = ((before < need) & (torch.arange(scores.shape[1], device=scores.device) < n.unsqueeze(1))).sum(1)
    return _keep_first(by_rank, candidates, torch.minimum(k.clamp(min=min_keep), n))


def random_keep(
    candidates: Tensor,
    keep_ratio: float,
    min_keep: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep mask with the same ``k`` per row as :func:`select_keep`, chosen uniformly at random.

    The baseline "random elision at the same keep ratio".

    Args:
        candidates: bool ``[B, L]``.
        keep_ratio: ``p`` in ``(0, 1]``.
        min_keep: lower bound on the kept candidates per row, ``>= 0``.
        generator: random generator on the device of ``candidates``; the global one if ``None``.

    Returns:
        bool ``[B, L]``; ``False`` exactly at the elided candidates.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> keep = random_keep(torch.ones(2, 10, dtype=torch.bool), 0.3, generator=g)
        >>> keep.sum(1)
        tensor([3, 3])
    """
    _check_candidates(candidates)
    scores = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    return select_keep(scores, candidates, keep_ratio, min_keep)


# --------------------------------------------------------------------------------------------------
# Student-difficulty EMA.


def ema_update(ema: Tensor, loss: Tensor, decay: float) -> Tensor:
    """One EMA step ``m <- decay * m + (1 - decay) * loss``, elementwise, with missing values.

    NaN marks a missing value on both sides:

    * where ``ema`` is NaN (never measured) the result is ``loss``: the first measurement initialises
      the EMA (a decision; starting from 0 would bias young EMAs towards "easy", starting from the
      reference loss would mix the two signals that the fused score weighs separately);
    * where ``loss`` is not finite (NaN: not computed, e.g. elided; +-inf: an overflow) the old value
      stays, so one bad step cannot poison a value for the rest of training.

    Args:
        ema: float ``[*]``, the current EMA, NaN where never measured.
        loss: float ``[*]``, same shape, the new losses.
        decay: ``beta`` in ``[0, 1]``.

    Returns:
        float32 ``[*]``, a new tensor.

    Example:
        >>> nan = float("nan")
        >>> ema_update(torch.tensor([1.0, nan, 2.0, nan]), torch.tensor([2.0, 3.0, nan, nan]), 0.9)
        tensor([1.1000, 3.0000, 2.0000,    nan])
    """
    check_fraction("decay", decay)
    _check_same_shape("ema", ema, "loss", loss)
    ema = ema.to(torch.float32)
    loss = loss.to(torch.float32)
    updated = torch.where(torch.isnan(ema), loss, decay * ema + (1.0 - decay) * loss)
    return torch.where(torch.isfinite(loss), updated, ema)


# --------------------------------------------------------------------------------------------------
# Flat candidate layout.


def gather_candidates(x: Tensor, candidates: Tensor) -> Tensor:
    """Values of ``x`` at the candidate positions, row by row, in position order.

    Args:
        x: ``[B, L, *]``, any dtype.
        candidates: bool ``[B, L]``.

    Returns:
        ``[N, *]`` with ``N = candidates.sum()``, same dtype and device as ``x``. Row ``b`` owns the
        ``candidates[b].sum()`` consecutive values after those of rows ``0 .. b - 1``.

    Example:
        >>> gather_candidates(torch.tensor([[1, 2, 3], [4, 5, 6]]),
        ...                   torch.tensor([[False, True, True], [True, False, False]]))
        tensor([2, 3, 4])
    """
    _check_candidates(candidates)
    if x.shape[:2] != candidates.shape:
        raise ValueError(
            f"`x` must have shape [B, L, ...] with [B, L] = {tuple(candidates.shape)}, got {tuple(x.shape)}"
        )
    # masked_select, not x[candidates]: the same values, and it stays on one thread at batch sizes where
    # boolean indexing starts threads (a training step should not wait for a busy core; docs/memory.md).
    return x.masked_select(candidates) if x.dim() == 2 else x[candidates]


def scatter_candidates(flat: Tensor, candidates: Tensor, fill: float = math.nan) -> Tensor:
    """Inverse of :func:`gather_candidates`: place flat values back at the candidate positions.

    Args:
        flat: ``[N, *]`` with ``N = candidates.sum()``.
        candidates: bool ``[B, L]``.
        fill: value outside the candidates (NaN by default, so an integer ``flat`` needs a finite one).

    Returns:
        ``[B, L, *]`` with the dtype of ``flat`` on the device of ``candidates``.

    Example:
        >>> scatter_candidates(torch.tensor([2.0, 3.0, 4.0]),
        ...                    torch.tensor([[False, True, True], [True, False, False]]))
        tensor([[nan, 2., 3.],
                [4., nan, nan]])
    """
    _check_candidates(candidates)
    num = int(candidates.sum())
    if flat.dim() < 1 or flat.shape[0] != num:
        raise ValueError(f"`flat` must have {num} rows (one per candidate), got shape {tuple(flat.shape)}")
    out = torch.full((*candidates.shape, *flat.shape[1:]), fill, dtype=flat.dtype, device=candidates.device)
    if flat.dim() == 1:  # masked_scatter_: one thread at batch sizes (see gather_candidates)
        return out.masked_scatter_(candidates, flat.to(candidates.device))
    out[candidates] = flat.to(candidates.device)
    return out
