"""Tests of the pure scoring functions: fusion, selection, EMA, flat layout."""

from __future__ import annotations

import math

import pytest
import torch

from regate_lightning.scoring import (
    adaptive_keep,
    ema_update,
    fuse_scores,
    gather_candidates,
    num_kept,
    random_keep,
    scatter_candidates,
    select_keep,
)

NAN = math.nan
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# fuse_scores


def test_fuse_hand_values() -> None:
    m, ref = _t(1.0, 2.0, 4.0), _t(3.0, 2.0, 0.0)
    assert torch.equal(fuse_scores(m, ref, 0.0), m)
    assert torch.equal(fuse_scores(m, ref, 1.0), ref)
    assert torch.equal(fuse_scores(m, ref, 0.5), _t(2.0, 2.0, 2.0))
    assert torch.allclose(fuse_scores(m, ref, 0.25), _t(1.5, 2.0, 3.0))


def test_fuse_nan_handling() -> None:
    m, ref = _t(1.0, NAN), _t(NAN, 3.0)
    out0 = fuse_scores(_t(1.0, 2.0), _t(NAN, NAN), 0.0)
    assert torch.equal(out0, _t(1.0, 2.0))  # weight-0 input is not read
    out1 = fuse_scores(_t(NAN, NAN), _t(1.0, 2.0), 1.0)
    assert torch.equal(out1, _t(1.0, 2.0))
    assert fuse_scores(m, ref, 0.5).isnan().all()  # otherwise NaN propagates


def test_fuse_dtype_shape_and_errors() -> None:
    out = fuse_scores(torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.float64), 0.5)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3)
    a = torch.ones(3)
    assert fuse_scores(a, a, 0.0) is not a  # a new tensor, never an alias of the input
    with pytest.raises(ValueError, match=r"`ref_weight` must be in \[0, 1\], got 1.5"):
        fuse_scores(a, a, 1.5)
    with pytest.raises(ValueError, match=r"`ref_weight` must be in \[0, 1\], got -0.1"):
        fuse_scores(a, a, -0.1)
    with pytest.raises(ValueError, match=r"`ema` and `ref` must have the same shape"):
        fuse_scores(a, torch.ones(4), 0.5)


# --------------------------------------------------------------------------------------------------
# num_kept


@pytest.mark.parametrize("p", [0.5, 0.3, 0.1, 0.7, 0.56, 1 / 3, 0.999, 1.0])
def test_num_kept_equals_math_ceil(p: float) -> None:
    n = torch.arange(0, 201)
    expected = [min(i, max(1, math.ceil(p * i))) for i in range(201)]
    assert num_kept(n, p).tolist() == expected


def test_num_kept_hand_values() -> None:
    n = torch.arange(1, 11)
    assert num_kept(n, 0.5).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert num_kept(n, 0.3).tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert num_kept(n, 1.0).tolist() == list(range(1, 11))
    assert num_kept(n, 0.3, min_keep=4).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert num_kept(torch.tensor([0, 5]), 0.5, min_keep=0).tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"`min_keep` must be >= 0, got -1"):
        num_kept(n, 0.5, min_keep=-1)


# --------------------------------------------------------------------------------------------------
# select_keep


def _reference_keep(scores: torch.Tensor, candidates: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """Row-by-row Python reference: sort candidates by (-score, position)."""
    keep = torch.ones_like(candidates)
    for b in range(candidates.shape[0]):
        pos = candidates[b].nonzero().flatten().tolist()
        k = min(len(pos), max(min_keep, math.ceil(p * len(pos))))
        ranked = sorted(pos, key=lambda t: (-float(scores[b, t]), t))
        for t in ranked[k:]:
            keep[b, t] = False
    return keep


@pytest.mark.parametrize("device", DEVICES)
def test_select_keep_hand_example(device: str) -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.7], [5.0, 4.0, 3.0, 2.0, 1.0]], device=device)
    candidates = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]], device=device)
    keep = select_keep(scores, candidates, keep_ratio=0.5)
    # Row 0: n = 4, k = 2 -> keep 0.9 (pos 1) and 0.7 (pos 4). Row 1: n = 5, k = 3 -> first three.
    expected = [[True, True, False, False, True], [True, True, True, False, False]]
    assert keep.tolist() == expected
    assert keep.device.type == device


def test_select_keep_ties_earlier_position_wins() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.0]])
    candidates = torch.ones(1, 6, dtype=torch.bool)
    # n = 6, k = 3: position 1..4 tie at 2.0, the earliest two of them join the top-3 (with nothing
    # higher), so positions 1, 2, 3 stay.
    assert select_keep(scores, candidates, 0.5).tolist() == [[False, True, True, True, False, False]]
    equal = torch.zeros(2, 7)
    cand = torch.tensor([[True] * 7, [False, True, False, True, True, True, True]])
    keep = select_keep(equal, cand, 0.5)
    assert keep.tolist() == [
        [True, True, True, True, False, False, False],
        [True, True, True, True, True, False, False],
    ]


def test_select_keep_rows_without_candidates_are_untouched() -> None:
    scores = torch.randn(3, 5)
    candidates = torch.tensor([[False] * 5, [True, True, False, False, False], [False] * 5])
    keep = select_keep(scores, candidates, 0.5)
    assert keep[0].all() and keep[2].all()
    assert keep[1].sum() == 4  # one of the two candidates dropped


def test_select_keep_min_keep() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    candidates = torch.ones(1, 5, dtype=torch.bool)
    # ceil(0.2 * 5) = 1 < min_keep = 3
    assert select_keep(scores, candidates, 0.2, min_keep=3).tolist() == [[True, True, True, False, False]]
    # min_keep > n keeps every candidate
    assert select_keep(scores, candidates, 0.2, min_keep=10).all()


def test_select_keep_ratio_one_keeps_all() -> None:
    torch.manual_seed(0)
    scores = torch.randn(4, 33)
    candidates = torch.rand(4, 33) < 0.7
    assert select_keep(scores, candidates, 1.0).all()


def test_select_keep_only_touches_candidates() -> None:
    # Non-candidates have the highest scores and NaN; they must neither be dropped nor take a rank.
    scores = torch.tensor([[100.0, NAN, 1.0, 2.0, 3.0, 4.0]])
    candidates = torch.tensor([[False, False, True, True, True, True]])
    assert select_keep(scores, candidates, 0.5).tolist() == [[True, True, False, False, True, True]]


def test_select_keep_nan_and_inf_scores() -> None:
    scores = torch.tensor([[-math.inf, 1.0, NAN, math.inf]])
    candidates = torch.ones(1, 4, dtype=torch.bool)
    # NaN ranks above +inf, then +inf, then 1.0, then -inf.
    assert select_keep(scores, candidates, 0.25).tolist() == [[False, False, True, False]]
    assert select_keep(scores, candidates, 0.5).tolist() == [[False, False, True, True]]
    assert select_keep(scores, candidates, 0.75).tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
@pytest.mark.parametrize("min_keep", [0, 1, 4])
def test_select_keep_matches_reference(device: str, p: float, min_keep: int) -> None:
    g = torch.Generator().manual_seed(1234)
    scores = torch.randint(0, 4, (16, 40), generator=g).float()  # many ties
    candidates = torch.rand(16, 40, generator=g) < 0.6
    candidates[3] = False
    keep = select_keep(scores.to(device), candidates.to(device), p, min_keep)
    assert torch.equal(keep.cpu(), _reference_keep(scores, candidates, p, min_keep))
    dropped = (~keep.cpu()).sum(1)
    assert torch.equal(dropped, candidates.sum(1) - num_kept(candidates.sum(1), p, min_keep))


def test_select_keep_errors() -> None:
    scores = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"`candidates` must be a bool tensor"):
        select_keep(scores, torch.ones(2, 3), 0.5)
    with pytest.raises(ValueError, match=r"`scores` and `candidates` must have the same shape"):
        select_keep(scores, torch.ones(2, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match=r"`candidates` must have shape \[B, L\]"):
        select_keep(torch.zeros(3), torch.ones(3, dtype=torch.bool), 0.5)
    for bad in (0.0, 1.5, -0.5, NAN):
        with pytest.raises(ValueError, match=r"`keep_ratio` must be in \(0, 1\], got"):
            select_keep(scores, torch.ones(2, 3, dtype=torch.bool), bad)
    with pytest.raises(ValueError, match=r"`keep_ratio` must be in \(0, 1\], got 1.5"):
        select_keep(scores, torch.ones(2, 3, dtype=torch.bool), 1.5)


# --------------------------------------------------------------------------------------------------
# random_keep


@pytest.mark.parametrize("device", DEVICES)
def test_random_keep_counts_and_support(device: str) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    candidates = (torch.rand(8, 30, generator=torch.Generator().manual_seed(1)) < 0.5).to(device)
    keep = random_keep(candidates, 0.3, min_keep=1, generator=g)
    n = candidates.sum(1)
    assert torch.equal((~keep).sum(1), n - num_kept(n, 0.3, 1))
    assert keep[~candidates].all()  # only candidates are ever dropped


def test_random_keep_is_reproducible_and_uniform() -> None:
    candidates = torch.ones(1, 10, dtype=torch.bool)
    a = random_keep(candidates, 0.3, generator=torch.Generator().manual_seed(7))
    b = random_keep(candidates, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    many = random_keep(torch.ones(4000, 10, dtype=torch.bool), 0.3, generator=g)
    freq = many.float().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.3), atol=0.03)


# --------------------------------------------------------------------------------------------------
# adaptive_keep


def _reference_adaptive(scores: torch.Tensor, candidates: torch.Tensor, coverage: float, min_keep: int) -> torch.Tensor:
    """A row-by-row loop: rank as select_keep does, keep the shortest prefix reaching the share."""
    keep = torch.ones_like(candidates)
    for b in range(scores.shape[0]):
        pos = [t for t in range(scores.shape[1]) if candidates[b, t]]
        order = sorted(pos, key=lambda t: (0 if math.isnan(scores[b, t]) else 1, -float(scores[b, t]), t))
        mass = [0.0 if math.isnan(scores[b, t]) else max(float(scores[b, t]), 0.0) for t in order]
        need, k, total = coverage * sum(mass), 0, 0.0
        while k < len(order) and total < need:
            total += mass[k]
            k += 1
        for t in order[min(len(order), max(k, min_keep)) :]:
            keep[b, t] = False
    return keep


def test_adaptive_keep_covers_the_share_with_the_fewest() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [10.0, 0.1, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    candidates = torch.ones(3, 5, dtype=torch.bool)
    kept = adaptive_keep(scores, candidates, coverage=0.7, min_keep=1).sum(1)
    assert kept.tolist() == [2, 1, 4]  # 7 of 10; one dominant score; even scores: ceil(0.7 * 5)
    assert adaptive_keep(scores, candidates, coverage=1.0, min_keep=0).sum(1).tolist() == [4, 5, 5]  # zeros add nothing


def test_adaptive_keep_ties_zeros_nan_and_min_keep() -> None:
    candidates = torch.ones(1, 4, dtype=torch.bool)
    ties = adaptive_keep(torch.tensor([[1.0, 2.0, 2.0, 1.0]]), candidates, coverage=0.5, min_keep=0)
    assert ties.tolist() == [[False, True, True, False]]
    ties = adaptive_keep(torch.tensor([[2.0, 2.0, 2.0, 2.0]]), candidates, coverage=0.3, min_keep=0)
    assert ties.tolist() == [[True, True, False, False]], "among equal scores the earlier position wins"
    zeros = torch.zeros(1, 4)
    assert adaptive_keep(zeros, candidates, 0.9, min_keep=0).sum().item() == 0
    assert adaptive_keep(zeros, candidates, 0.9, min_keep=2).tolist() == [[True, True, False, False]]
    assert adaptive_keep(zeros, candidates, 0.9, min_keep=9).all(), "min_keep is capped at n"
    # NaN ranks first (kept before scored candidates) but covers nothing; negative scores count 0.
    nan = adaptive_keep(torch.tensor([[1.0, NAN, 5.0, -3.0]]), candidates, coverage=0.5, min_keep=0)
    assert nan.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coverage", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("min_keep", [0, 3])
def test_adaptive_keep_matches_reference(device: str, coverage: float, min_keep: int) -> None:
    g = torch.Generator().manual_seed(99)
    scores = torch.randint(0, 5, (16, 30), generator=g).float()  # ties and zeros
    scores[2, :5] = NAN
    candidates = torch.rand(16, 30, generator=g) < 0.6
    candidates[4] = False
    keep = adaptive_keep(scores.to(device), candidates.to(device), coverage, min_keep)
    assert torch.equal(keep.cpu(), _reference_adaptive(scores, candidates, coverage, min_keep))
    assert keep.cpu()[~candidates].all()


def test_adaptive_keep_errors() -> None:
    candidates = torch.ones(2, 3, dtype=torch.bool)
    for bad in (0.0, 1.5, NAN):
        with pytest.raises(ValueError, match=r"`coverage` must be in \(0, 1\], got"):
            adaptive_keep(torch.zeros(2, 3), candidates, bad)
    with pytest.raises(ValueError, match=r"`scores` and `candidates` must have the same shape"):
        adaptive_keep(torch.zeros(2, 4), candidates, 0.5)


# --------------------------------------------------------------------------------------------------
# ema_update


def test_ema_update_hand_values() -> None:
    out = ema_update(_t(1.0, 2.0, NAN, 5.0, NAN), _t(2.0, NAN, 3.0, math.inf, NAN), 0.9)
    expected = _t(0.9 * 1.0 + 0.1 * 2.0, 2.0, 3.0, 5.0, NAN)
    assert torch.allclose(out, expected, equal_nan=True)
    assert out.dtype == torch.float32
    # Two steps by hand: m = 4 -> 0.5 * 4 + 0.5 * 2 = 3 -> 0.5 * 3 + 0.5 * 1 = 2.
    m = ema_update(_t(NAN), _t(4.0), 0.5)
    m = ema_update(m, _t(2.0), 0.5)
    m = ema_update(m, _t(1.0), 0.5)
    assert m.item() == 2.0


def test_ema_update_extreme_decays_and_errors() -> None:
    assert torch.equal(ema_update(_t(1.0, NAN), _t(3.0, 4.0), 0.0), _t(3.0, 4.0))
    assert torch.equal(ema_update(_t(1.0, NAN), _t(3.0, 4.0), 1.0), _t(1.0, 4.0))
    with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\], got 1.1"):
        ema_update(_t(1.0), _t(1.0), 1.1)
    with pytest.raises(ValueError, match=r"`ema` and `loss` must have the same shape"):
        ema_update(_t(1.0), _t(1.0, 2.0), 0.9)


def test_ema_update_does_not_modify_inputs() -> None:
    m, loss = _t(1.0, NAN), _t(2.0, 3.0)
    ema_update(m, loss, 0.9)
    assert torch.allclose(m, _t(1.0, NAN), equal_nan=True)
    assert torch.equal(loss, _t(2.0, 3.0))


# --------------------------------------------------------------------------------------------------
# gather_candidates / scatter_candidates


def test_gather_order_is_row_then_position() -> None:
    x = torch.arange(12).reshape(3, 4)
    candidates = torch.tensor([[False, True, False, True], [False] * 4, [True, True, False, False]])
    assert gather_candidates(x, candidates).tolist() == [1, 3, 8, 9]


def test_gather_scatter_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 17, generator=g)
    candidates = torch.rand(5, 17, generator=g) < 0.4
    flat = gather_candidates(x, candidates)
    back = scatter_candidates(flat, candidates)
    assert torch.equal(back[candidates], x[candidates])
    assert back[~candidates].isnan().all()
    assert torch.equal(gather_candidates(back, candidates), flat)
    # Trailing dimensions and integer values with a finite fill.
    y = torch.arange(5 * 17 * 2).reshape(5, 17, 2)
    yb = scatter_candidates(gather_candidates(y, candidates), candidates, fill=-1)
    assert torch.equal(torch.where(candidates.unsqueeze(-1), y, -1), yb)


def test_gather_scatter_errors() -> None:
    candidates = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, L, ...\]"):
        gather_candidates(torch.zeros(2, 3), candidates)
    with pytest.raises(ValueError, match=r"`flat` must have 3 rows \(one per candidate\), got shape \(2,\)"):
        scatter_candidates(torch.zeros(2), candidates)
    with pytest.raises(TypeError, match=r"`candidates` must be a bool tensor"):
        scatter_candidates(torch.zeros(3), candidates.int())
