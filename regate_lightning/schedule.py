"""Which optimizer steps train on every token and which elide: pure functions of the step.

Steps are optimizer steps (``trainer.global_step``, starting at 0), so gradient accumulation never
changes the phase inside one optimizer step. The first ``warmup_steps`` steps are full. After them the
steps run in cycles of ``cycle_steps``; the first ``full_steps`` steps of every cycle are full, the rest
are sparse (they keep a fraction ``keep_ratio`` of the candidate tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from regate_lightning.scoring import check_int, check_keep_ratio


@dataclass(frozen=True)
class Schedule:
    """The full/sparse step schedule (paper defaults: W = 100, C = 128, F = 16).

    Attributes:
        warmup_steps: ``W >= 0``; optimizer steps ``0 .. W - 1`` keep every token.
        cycle_steps: ``C >= 1``; length of one cycle after the warm-up.
        full_steps: ``0 <= F <= C``; full steps at the start of every cycle. ``F = C`` never elides,
            ``F = 0`` elides in every step after the warm-up.

    Raises:
        TypeError: if a field is not an ``int``.
        ValueError: if a field is out of range.
    """

    warmup_steps: int = 100
    cycle_steps: int = 128
    full_steps: int = 16

    def __post_init__(self) -> None:
        """Validate the fields."""
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("cycle_steps", self.cycle_steps, minimum=1)
        check_int("full_steps", self.full_steps, minimum=0)
        if self.full_steps > self.cycle_steps:
            raise ValueError(f"`full_steps` must be in [0, cycle_steps={self.cycle_steps}], got {self.full_steps}")


def is_full_step(step: int, schedule: Schedule) -> bool:
    """Whether optimizer step ``step`` trains on every token.

    Args:
        step: the optimizer step (``trainer.global_step``), ``>= 0``.
        schedule: the schedule.

    Returns:
        ``True`` for a full step (warm-up, or among the first ``full_steps`` of a cycle), ``False`` for a
        sparse step.

    Example:
        >>> s = Schedule(warmup_steps=2, cycle_steps=4, full_steps=1)
        >>> [is_full_step(t, s) for t in range(8)]
        [True, True, True, False, False, False, True, False]
    """
    check_int("step", step, minimum=0)
    if step < schedule.warmup_steps:
        return True
    return (step - schedule.warmup_steps) % schedule.cycle_steps < schedule.full_steps


def count_sparse_steps(num_steps: int, schedule: Schedule) -> int:
    """Number of sparse steps among the optimizer steps ``0 .. num_steps - 1`` (closed form).

    Args:
        num_steps: number of optimizer steps, ``>= 0``.
        schedule: the schedule.

    Returns:
        The number of steps ``t < num_steps`` with ``is_full_step(t, schedule) == False``.

    Example:
        >>> count_sparse_steps(8, Schedule(warmup_steps=2, cycle_steps=4, full_steps=1))
        4
    """
    check_int("num_steps", num_steps, minimum=0)
    after_warmup = max(0, num_steps - schedule.warmup_steps)
    cycles, rest = divmod(after_warmup, schedule.cycle_steps)
    sparse_per_cycle = schedule.cycle_steps - schedule.full_steps
    return cycles * sparse_per_cycle + max(0, rest - schedule.full_steps)


def expected_kept_fraction(num_steps: int, schedule: Schedule, keep_ratio: float) -> float:
    """Expected fraction of candidate tokens kept over the first ``num_steps`` optimizer steps.

    Assumes every step sees the same number of candidates and ignores the rounding of the per-sample
    keep count (``ceil`` and ``min_keep``), so it is ``(full + sparse * keep_ratio) / num_steps``.

    Args:
        num_steps: number of optimizer steps, ``>= 1``.
        schedule: the schedule.
        keep_ratio: fraction of candidates kept in a sparse step, in ``(0, 1]``.

    Returns:
        A float in ``(0, 1]``.

    Example:
        >>> expected_kept_fraction(8, Schedule(warmup_steps=2, cycle_steps=4, full_steps=1), 0.5)
        0.75
    """
    check_int("num_steps", num_steps, minimum=1)
    check_keep_ratio(keep_ratio)
    sparse = count_sparse_steps(num_steps, schedule)
    return (num_steps - sparse + sparse * keep_ratio) / num_steps


def steady_state_saving(schedule: Schedule, keep_ratio: float) -> float:
    """Fraction of candidate tokens saved per cycle after the warm-up: ``(C - F) / C * (1 - p)``.

    Args:
        schedule: the schedule.
        keep_ratio: fraction ``p`` of candidates kept in a sparse step, in ``(0, 1]``.

    Returns:
        A float in ``[0, 1)``.

    Example:
        >>> steady_state_saving(Schedule(), 0.5)
        0.4375
    """
    check_keep_ratio(keep_ratio)
    sparse_share = (schedule.cycle_steps - schedule.full_steps) / schedule.cycle_steps
    return sparse_share * (1.0 - keep_ratio)
