"""Tests of the full/sparse step schedule."""

from __future__ import annotations

import dataclasses

import pytest

from regate_lightning.schedule import (
    Schedule,
    count_sparse_steps,
    expected_kept_fraction,
    is_full_step,
    steady_state_saving,
)


def test_defaults_are_the_papers() -> None:
    assert Schedule() == Schedule(warmup_steps=100, cycle_steps=128, full_steps=16)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_steps": -1}, ValueError, r"`warmup_steps` must be >= 0, got -1"),
        ({"cycle_steps": 0}, ValueError, r"`cycle_steps` must be >= 1, got 0"),
        ({"full_steps": -1}, ValueError, r"`full_steps` must be >= 0, got -1"),
        ({"full_steps": 129}, ValueError, r"`full_steps` must be in \[0, cycle_steps=128\], got 129"),
        ({"warmup_steps": 1.5}, TypeError, r"`warmup_steps` must be an int, got float 1.5"),
        ({"cycle_steps": True}, TypeError, r"`cycle_steps` must be an int, got bool True"),
    ],
)
def test_schedule_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_schedule_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Schedule().warmup_steps = 3  # type: ignore[misc]


def test_boundaries_at_defaults() -> None:
    s = Schedule()  # W = 100, C = 128, F = 16
    assert is_full_step(0, s)
    assert is_full_step(99, s)  # last warm-up step
    assert is_full_step(100, s)  # first step of the first cycle: full
    assert is_full_step(115, s)  # W + F - 1: last full step of the cycle
    assert not is_full_step(116, s)  # W + F: first sparse step
    assert not is_full_step(227, s)  # W + C - 1: last step of the cycle
    assert is_full_step(228, s)  # W + C: next cycle starts full
    assert is_full_step(243, s)
    assert not is_full_step(244, s)


def test_no_warmup() -> None:
    s = Schedule(warmup_steps=0, cycle_steps=4, full_steps=1)
    assert [is_full_step(t, s) for t in range(9)] == [
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        True,
    ]


def test_no_full_steps_after_warmup() -> None:
    s = Schedule(warmup_steps=3, cycle_steps=4, full_steps=0)
    assert [is_full_step(t, s) for t in range(8)] == [True, True, True] + [False] * 5
    assert not is_full_step(0, Schedule(warmup_steps=0, cycle_steps=4, full_steps=0))


def test_all_full_steps() -> None:
    s = Schedule(warmup_steps=2, cycle_steps=5, full_steps=5)
    assert all(is_full_step(t, s) for t in range(100))
    assert count_sparse_steps(100, s) == 0


def test_negative_step_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"`step` must be >= 0, got -1"):
        is_full_step(-1, Schedule())


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(),
        Schedule(warmup_steps=0, cycle_steps=1, full_steps=0),
        Schedule(warmup_steps=0, cycle_steps=1, full_steps=1),
        Schedule(warmup_steps=3, cycle_steps=7, full_steps=2),
        Schedule(warmup_steps=5, cycle_steps=4, full_steps=0),
        Schedule(warmup_steps=1, cycle_steps=6, full_steps=6),
    ],
)
def test_count_sparse_steps_matches_brute_force(schedule: Schedule) -> None:
    sparse = 0
    for n in range(400):
        assert count_sparse_steps(n, schedule) == sparse, n
        sparse += not is_full_step(n, schedule)


def test_count_sparse_steps_hand_values() -> None:
    s = Schedule()
    assert count_sparse_steps(0, s) == 0
    assert count_sparse_steps(116, s) == 0
    assert count_sparse_steps(117, s) == 1
    assert count_sparse_steps(228, s) == 112
    assert count_sparse_steps(100 + 10 * 128, s) == 1120
    with pytest.raises(ValueError, match=r"`num_steps` must be >= 0, got -1"):
        count_sparse_steps(-1, s)


def test_expected_kept_fraction() -> None:
    s = Schedule(warmup_steps=2, cycle_steps=4, full_steps=1)
    # Steps 0..7: full, full, full, sparse, sparse, sparse, full, sparse -> 4 full, 4 sparse.
    assert expected_kept_fraction(8, s, 0.5) == pytest.approx((4 + 4 * 0.5) / 8)
    assert expected_kept_fraction(2, s, 0.5) == 1.0
    assert expected_kept_fraction(8, s, 1.0) == 1.0
    # Over many cycles it tends to 1 - steady-state saving.
    assert expected_kept_fraction(100 + 1000 * 128, Schedule(), 0.5) == pytest.approx(1 - 0.4375, abs=1e-3)
    with pytest.raises(ValueError, match=r"`num_steps` must be >= 1, got 0"):
        expected_kept_fraction(0, s, 0.5)
    with pytest.raises(ValueError, match=r"`keep_ratio` must be in \(0, 1\], got 1.5"):
        expected_kept_fraction(8, s, 1.5)


def test_steady_state_saving() -> None:
    assert steady_state_saving(Schedule(), 0.5) == 0.4375
    assert steady_state_saving(Schedule(cycle_steps=4, full_steps=4), 0.5) == 0.0
    assert steady_state_saving(Schedule(), 1.0) == 0.0
    assert steady_state_saving(Schedule(cycle_steps=4, full_steps=0), 0.25) == 0.75
    with pytest.raises(ValueError, match=r"`keep_ratio` must be in \(0, 1\], got 0"):
        steady_state_saving(Schedule(), 0)
