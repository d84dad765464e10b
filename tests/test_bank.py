"""Tests of the per-(sample, candidate) score store."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from regate_lightning.bank import BANK_FORMAT_VERSION, KeyIndex, ScoreBank, flat_ranges
from regate_lightning.scoring import gather_candidates

NAN = math.nan
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _i(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.cpu(), b.cpu(), equal_nan=True)


def _serialized_bytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


# --------------------------------------------------------------------------------------------------
# Construction and registration.


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match=r"`vocab_size` must be >= 1, got 0"):
        ScoreBank(vocab_size=0)
    with pytest.raises(ValueError, match=r"`initial_capacity` must be >= 0, got -1"):
        ScoreBank(vocab_size=5, initial_capacity=-1)
    with pytest.raises(TypeError, match=r"`vocab_size` must be an int"):
        ScoreBank(vocab_size=5.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_register_allocates_contiguous_slots(device: str) -> None:
    bank = ScoreBank(vocab_size=8, initial_capacity=4).to(device)
    bank.register(_i(5, 2), _i(3, 2))
    # One call allocates in key order: sample 2 first (row 0, slots 0-1), then 5 (row 1, slots 2-4).
    assert bank.sample_keys().tolist() == [2, 5]
    assert bank.offset[:2].tolist() == [0, 2]
    assert bank.candidate_counts(_i(5, 2)).tolist() == [3, 2]
    assert (bank.num_samples, bank.num_candidates) == (2, 5)
    assert bank.capacity >= 5
    assert bank.is_registered(_i(0, 2, 5, 100)).tolist() == [False, True, True, False]
    # Registering a seen sample again with the same count is a no-op.
    bank.register(_i(2), _i(2))
    assert (bank.num_samples, bank.num_candidates) == (2, 5)


def test_register_grows_past_capacity_and_keeps_values() -> None:
    bank = ScoreBank(vocab_size=8, initial_capacity=2)
    bank.register(_i(0), _i(2))
    bank.set_ref(_i(0), _t(0.5, 1.5), _i(2))
    capacities = []
    for s in range(1, 40):
        bank.register(_i(s), _i(3))
        capacities.append(bank.capacity)
    assert bank.num_candidates == 2 + 39 * 3
    assert bank.capacity < 2 * bank.num_candidates  # amortised doubling
    assert len(set(capacities)) <= 7  # few reallocations
    assert _close(bank.get_ref(_i(0), _i(2)), _t(0.5, 1.5))
    assert bank.get_ref(_i(39), _i(3)).isnan().all()
    # Grown tensors are still registered buffers.
    buffers = dict(bank.named_buffers())
    assert buffers["ema"] is bank.ema and buffers["ema"].numel() == bank.capacity
    assert buffers["offset"] is bank.offset and buffers["offset"].numel() >= 40
    assert "index.main_keys" in buffers and "index.main_keys" not in bank.state_dict()


def test_register_count_mismatch() -> None:
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(17, 3), _i(12, 1))
    message = (
        "sample 17 had 12 candidates (content digest 0) when first seen and has 13 (digest 0) now; the data "
        "must render each sample identically (same template, same truncation) across epochs, and sample keys "
        "must be unique"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        bank.register(_i(4, 17), _i(2, 13))
    # Atomic: the unseen sample 4 of the failed call was not registered.
    assert bank.num_samples == 2
    assert not bank.is_registered(_i(4)).item()
    with pytest.raises(ValueError, match=r"sample 17 had 12 candidates when first seen and has 11 now"):
        bank.get_ema(_i(17), _i(11))


def test_register_duplicates_in_one_call() -> None:
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(3, 3, 1), _i(2, 2, 1))
    assert (bank.num_samples, bank.num_candidates) == (2, 3)
    with pytest.raises(ValueError, match=r"sample 6 occurs more than once in one batch with different candidates"):
        bank.register(_i(6, 6), _i(2, 3))
    with pytest.raises(ValueError, match=r"sample 6 occurs more than once in one batch with different content"):
        bank.register(_i(6, 6), _i(2, 2), _i(11, 12))


def test_register_input_validation() -> None:
    bank = ScoreBank(vocab_size=8)
    with pytest.raises(ValueError, match=r"`sample_idx` must be >= 0, got -1"):
        bank.register(_i(-1), _i(1))
    with pytest.raises(ValueError, match=r"`counts` must be >= 0, got -2"):
        bank.register(_i(1), _i(-2))
    with pytest.raises(TypeError, match=r"`sample_idx` must be an integer tensor"):
        bank.register(_t(1.0), _i(1))
    with pytest.raises(ValueError, match=r"`counts` must be a tensor of shape \(2,\)"):
        bank.register(_i(1, 2), _i(1))
    with pytest.raises(ValueError, match=r"`sample_idx` must be a 1-D tensor"):
        bank.register(torch.zeros(2, 2, dtype=torch.int64), _i(1))


def test_unregistered_samples_are_rejected() -> None:
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(0), _i(1))
    with pytest.raises(ValueError, match=r"samples \[1, 7\] are not registered; call `register\(\)` first"):
        bank.get_ema(_i(0, 7, 1), _i(1, 1, 1))


def test_zero_candidate_samples_and_empty_batches() -> None:
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(0, 1), _i(0, 2))
    assert bank.get_ema(_i(0), _i(0)).shape == (0,)
    assert bank.has_ref(_i(0, 1)).tolist() == [True, False]  # no candidates: vacuously complete
    empty = torch.zeros(0, dtype=torch.int64)
    bank.register(empty, empty)
    bank.update(empty, torch.zeros(0), empty, empty, 0.9)
    assert bank.difficulty(empty, empty, empty).shape == (0,)
    assert bank.has_ref(empty).shape == (0,)


# --------------------------------------------------------------------------------------------------
# Reference losses.


def test_ref_round_trip_and_has_ref() -> None:
    bank = ScoreBank(vocab_size=8)
    idx, counts = _i(4, 1, 9), _i(2, 3, 1)
    bank.register(idx, counts)
    assert bank.has_ref(_i(4, 1, 9, 2, 100)).tolist() == [False] * 5
    bank.set_ref(_i(1, 4), _t(1.0, 2.0, 3.0, 4.0, 5.0), _i(3, 2))
    assert bank.has_ref(_i(4, 1, 9, 2)).tolist() == [True, True, False, False]
    assert _close(bank.get_ref(idx, counts), _t(4.0, 5.0, 1.0, 2.0, 3.0, NAN))
    # A non-finite value is stored as "not computed", so the sample is recomputed.
    bank.set_ref(_i(9), _t(math.inf), _i(1))
    assert not bank.has_ref(_i(9)).item()
    bank.set_ref(_i(9), _t(0.25), _i(1))
    assert bank.has_ref(_i(9)).item()
    with pytest.raises(ValueError, match=r"`flat_values` must have shape \[counts.sum\(\)\] = \(1,\)"):
        bank.set_ref(_i(9), _t(1.0, 2.0), _i(1))


# --------------------------------------------------------------------------------------------------
# EMA updates.


@pytest.mark.parametrize("device", DEVICES)
def test_update_matches_hand_computed_ema(device: str) -> None:
    bank = ScoreBank(vocab_size=10).to(device)
    idx, counts = _i(0, 1), _i(2, 1)
    ids = _i(3, 4, 3)
    bank.register(idx, counts)
    # Step 1: sample 0 measured on both candidates, sample 1 elided.
    bank.update(idx, _t(2.0, 4.0, NAN), counts, ids, decay=0.5)
    assert _close(bank.get_ema(idx, counts), _t(2.0, 4.0, NAN))
    # Step 2: candidate 0 of sample 0 elided; the others measured.
    bank.update(idx, _t(NAN, 0.0, 6.0), counts, ids, decay=0.5)
    assert _close(bank.get_ema(idx, counts), _t(2.0, 0.5 * 4.0 + 0.5 * 0.0, 6.0))
    # Step 3: only sample 1, passed alone.
    bank.update(_i(1), _t(2.0), _i(1), _i(3), decay=0.5)
    assert _close(bank.get_ema(idx, counts), _t(2.0, 2.0, 4.0))
    assert bank.ema.device.type == device


def test_update_layout_matches_gather_candidates() -> None:
    bank = ScoreBank(vocab_size=50)
    g = torch.Generator().manual_seed(0)
    candidates = torch.rand(4, 12, generator=g) < 0.5
    losses = torch.rand(4, 12, generator=g)
    targets = torch.randint(0, 50, (4, 12), generator=g)
    idx, counts = _i(10, 3, 7, 0), candidates.sum(1)
    bank.register(idx, counts)
    flat = gather_candidates(losses, candidates)
    bank.update(idx, flat, counts, gather_candidates(targets, candidates), decay=0.9)
    assert torch.equal(bank.get_ema(idx, counts), flat)
    # Reading in another batch order gives each sample its own values.
    perm = [2, 0, 3, 1]
    assert torch.equal(bank.get_ema(idx[perm], counts[perm]), gather_candidates(losses[perm], candidates[perm]))


def test_update_duplicate_samples_use_the_mean() -> None:
    bank = ScoreBank(vocab_size=10)
    bank.register(_i(5), _i(2))
    bank.update(_i(5, 5), _t(1.0, NAN, 3.0, 2.0), _i(2, 2), _i(1, 2, 1, 2), decay=0.9)
    assert _close(bank.get_ema(_i(5), _i(2)), _t(2.0, 2.0))


def test_vocab_ema() -> None:
    bank = ScoreBank(vocab_size=6)
    idx, counts = _i(0, 1), _i(3, 2)
    bank.register(idx, counts)
    # id 2 occurs with losses 1, 3 and an elided one -> mean 2; id 4 with 5; id 5 only elided.
    bank.update(idx, _t(1.0, NAN, 5.0, 3.0, NAN), counts, _i(2, 2, 4, 2, 5), decay=0.5)
    assert _close(bank.vocab_ema, _t(NAN, NAN, 2.0, NAN, 5.0, NAN))
    # Next step: id 2 mean loss 4 -> 0.5 * 2 + 0.5 * 4 = 3 (one EMA step per call, not per occurrence).
    bank.update(idx, _t(4.0, 4.0, NAN, NAN, 1.0), counts, _i(2, 2, 4, 2, 5), decay=0.5)
    assert _close(bank.vocab_ema, _t(NAN, NAN, 3.0, NAN, 5.0, 1.0))
    with pytest.raises(ValueError, match=r"`target_ids_flat` must be in \[0, 6\), got 6"):
        bank.update(idx, _t(1.0, 1.0, 1.0, 1.0, 1.0), counts, _i(0, 1, 2, 3, 6), decay=0.5)
    with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\], got 1.5"):
        bank.update(idx, _t(1.0, 1.0, 1.0, 1.0, 1.0), counts, _i(0, 1, 2, 3, 4), decay=1.5)


# --------------------------------------------------------------------------------------------------
# Difficulty with fallback.


def test_difficulty_fallback_order() -> None:
    bank = ScoreBank(vocab_size=6)
    idx, counts = _i(0, 1), _i(2, 2)
    bank.register(idx, counts)
    bank.set_ref(idx, _t(10.0, 20.0, 30.0, 40.0), counts)
    # Measure candidate 0 of sample 0 (target id 1) only.
    bank.update(idx, _t(2.0, NAN, NAN, NAN), counts, _i(1, 3, 1, 4), decay=0.9)
    ids = _i(1, 3, 1, 4)
    # measured -> per-sample EMA; unmeasured with seen id 1 -> vocab EMA; unseen ids 3, 4 -> ref.
    assert _close(bank.difficulty(idx, counts, ids), _t(2.0, 20.0, 2.0, 40.0))
    assert _close(bank.difficulty(idx, counts, ids, fallback="vocab"), _t(2.0, 20.0, 2.0, 40.0))
    assert _close(bank.difficulty(idx, counts, ids, fallback="ref"), _t(2.0, 20.0, 30.0, 40.0))
    with pytest.raises(ValueError, match=r"`fallback` must be one of \('vocab', 'ref'\), got 'none'"):
        bank.difficulty(idx, counts, ids, fallback="none")


def test_difficulty_nan_only_when_every_source_is_missing() -> None:
    bank = ScoreBank(vocab_size=6)
    bank.register(_i(0), _i(2))
    bank.set_ref(_i(0), _t(NAN, 7.0), _i(2))
    assert _close(bank.difficulty(_i(0), _i(2), _i(1, 1)), _t(NAN, 7.0))


# --------------------------------------------------------------------------------------------------
# Checkpointing, memory, devices.


def _filled_bank(num_samples: int, candidates_per_sample: int = 5, initial_capacity: int = 8) -> ScoreBank:
    bank = ScoreBank(vocab_size=32, initial_capacity=initial_capacity)
    g = torch.Generator().manual_seed(num_samples)
    idx = torch.randperm(num_samples, generator=g)
    counts = torch.randint(0, candidates_per_sample + 1, (num_samples,), generator=g)
    half = num_samples // 2  # two calls, so that capacity ends above the used size
    bank.register(idx[:half], counts[:half])
    bank.register(idx[half:], counts[half:])
    n = int(counts.sum())
    bank.set_ref(idx, torch.rand(n, generator=g), counts)
    loss = torch.rand(n, generator=g)
    loss[torch.rand(n, generator=g) < 0.3] = NAN
    bank.update(idx, loss, counts, torch.randint(0, 32, (n,), generator=g), decay=0.9)
    return bank


def test_state_dict_round_trip_into_a_bank_of_other_capacity() -> None:
    bank = _filled_bank(50)
    state = bank.state_dict()
    assert state["_extra_state"] == {"format_version": BANK_FORMAT_VERSION, "vocab_size": 32}
    assert state["ema"].numel() == bank.num_candidates < bank.capacity
    fresh = ScoreBank(vocab_size=32, initial_capacity=3)
    fresh.load_state_dict(state)
    assert (fresh.num_samples, fresh.num_candidates) == (bank.num_samples, bank.num_candidates)
    idx = torch.arange(50)
    counts = bank.candidate_counts(idx)
    ids = torch.randint(0, 32, (int(counts.sum()),))
    assert _close(fresh.get_ema(idx, counts), bank.get_ema(idx, counts))
    assert _close(fresh.get_ref(idx, counts), bank.get_ref(idx, counts))
    assert _close(fresh.vocab_ema, bank.vocab_ema)
    assert torch.equal(fresh.has_ref(idx), bank.has_ref(idx))
    assert _close(fresh.difficulty(idx, counts, ids), bank.difficulty(idx, counts, ids))
    # Both continue identically: the same registration and update give the same state.
    for b in (bank, fresh):
        b.register(_i(60, 3), _i(4, int(counts[3])))
        b.update(_i(60), _t(1.0, 2.0, NAN, 4.0), _i(4), _i(0, 1, 2, 3), decay=0.9)
    s1, s2 = bank.state_dict(), fresh.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        if key != "_extra_state":
            assert _close(s1[key].float(), s2[key].float()), key


def test_load_into_a_bank_that_has_content() -> None:
    small = _filled_bank(5)
    big = _filled_bank(80)
    big.load_state_dict(small.state_dict())
    assert (big.num_samples, big.num_candidates) == (small.num_samples, small.num_candidates)
    assert not big.is_registered(_i(50)).item()


def test_state_dict_size_is_proportional_to_used_slots() -> None:
    tiny = ScoreBank(vocab_size=32, initial_capacity=1_000_000)
    tiny.register(_i(0), _i(3))
    assert _serialized_bytes(tiny.state_dict()) < 10_000  # not 8 MB of unused capacity
    b1 = _serialized_bytes(_filled_bank(2000, candidates_per_sample=20).state_dict())
    b2 = _serialized_bytes(_filled_bank(4000, candidates_per_sample=20).state_dict())
    assert 1.8 < b2 / b1 < 2.2


def test_nbytes() -> None:
    bank = ScoreBank(vocab_size=10, initial_capacity=100)
    bank.register(_i(0, 4), _i(3, 2))
    assert bank.nbytes(used_only=True) == 8 * 5 + 32 * 2 + 4 * 10
    rows = bank.offset.numel()
    assert bank.nbytes() == 8 * bank.capacity + 32 * rows + rows + 16 * 2 + 4 * 10  # + pending flags, key index
    assert bank.nbytes() >= bank.nbytes(used_only=True)


def test_load_rejects_incompatible_states() -> None:
    state = _filled_bank(5).state_dict()
    with pytest.raises(ValueError, match=r"saved with vocab_size=32, this bank has vocab_size=16"):
        ScoreBank(vocab_size=16).load_state_dict(state)
    bad_version = dict(state, _extra_state={"format_version": 999, "vocab_size": 32})
    with pytest.raises(ValueError, match=r"format version 999, this code reads version 2$"):
        ScoreBank(vocab_size=32).load_state_dict(bad_version)
    old = dict(state, _extra_state={"format_version": 1, "vocab_size": 32})
    with pytest.raises(ValueError, match=r"version 1 keyed samples by their position .* start the store afresh"):
        ScoreBank(vocab_size=32).load_state_dict(old)
    partial = {k: v for k, v in state.items() if k != "ref"}
    with pytest.raises(ValueError, match=r"must hold all of"):
        ScoreBank(vocab_size=32).load_state_dict(partial)
    corrupt = dict(state, offset=state["offset"].clone())
    corrupt["offset"][0] = state["ema"].numel()
    corrupt["length"] = state["length"].clone()
    corrupt["length"][0] = 1
    with pytest.raises(ValueError, match=r"corrupt"):
        ScoreBank(vocab_size=32).load_state_dict(corrupt)
    twice = dict(state, keys=torch.zeros_like(state["keys"]))
    with pytest.raises(ValueError, match=r"keys must be distinct"):
        ScoreBank(vocab_size=32).load_state_dict(twice)


def test_state_dict_nested_in_a_parent_module() -> None:
    parent = torch.nn.Module()
    parent.bank = _filled_bank(7)
    other = torch.nn.Module()
    other.bank = ScoreBank(vocab_size=32, initial_capacity=0)
    other.load_state_dict(parent.state_dict())
    assert other.bank.num_candidates == parent.bank.num_candidates


@pytest.mark.parametrize("device", DEVICES)
def test_device_move(device: str) -> None:
    bank = _filled_bank(10).to(device)
    assert {b.device.type for b in bank.buffers()} == {device}
    assert bank.device.type == device
    # Inputs on the CPU are moved to the bank's device; results live there.
    idx = torch.arange(10)
    counts = bank.candidate_counts(idx).cpu()
    ema = bank.get_ema(idx, counts)
    assert ema.device.type == device
    bank.register(_i(11), _i(300))  # growth stays on the device
    assert {b.device.type for b in bank.buffers()} == {device}
    back = bank.to("cpu")
    assert _close(back.get_ema(idx, counts), ema)
    # A CPU state dict loads into a bank on the device.
    target = ScoreBank(vocab_size=32).to(device)
    target.load_state_dict(back.state_dict())
    assert target.ema.device.type == device
    assert _close(target.get_ema(idx, counts), ema)


def test_update_is_deterministic() -> None:
    a, b = _filled_bank(30), _filled_bank(30)
    for s1, s2 in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        if isinstance(s1, torch.Tensor):
            assert torch.equal(s1.nan_to_num(-1), s2.nan_to_num(-1))


# --------------------------------------------------------------------------------------------------
# Keys of any size, content digests, values restored from a checkpoint or a cache.


def test_key_index_matches_a_dict_across_merges() -> None:
    index = KeyIndex(recent_limit=8)
    g = torch.Generator().manual_seed(0)
    truth: dict[int, int] = {}
    for _ in range(12):
        fresh = torch.randint(0, 2**62, (5,), generator=g).unique()
        fresh = fresh[index.find(fresh) < 0]
        rows = torch.arange(len(truth), len(truth) + fresh.numel())
        index.add(fresh, rows)
        truth.update(zip(fresh.tolist(), rows.tolist(), strict=True))
        assert index.main_keys.numel() > 0 or len(truth) <= 8
    queries = torch.tensor([*truth, 3, 2**63 - 1])
    assert index.find(queries).tolist() == [*truth.values(), -1, -1]
    assert len(index) == len(truth)


def test_keys_are_any_non_negative_int64() -> None:
    bank = ScoreBank(vocab_size=8, initial_capacity=0)
    keys = _i(2**62 + 5, 7, 2**63 - 1)
    bank.register(keys, _i(2, 1, 3))
    bank.set_ref(keys, _t(1, 2, 3, 4, 5, 6), _i(2, 1, 3))
    assert bank.get_ref(_i(7, 2**63 - 1), _i(1, 3)).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert bank.nbytes(used_only=True) == 8 * 6 + 32 * 3 + 4 * 8  # independent of the keys' size


def _restored(digest: int = 11) -> ScoreBank:
    """A bank with sample 9 (2 candidates, digest ``digest``, ref and EMA set) loaded from a state dict."""
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(9), _i(2), _i(digest))
    bank.set_ref(_i(9), _t(0.5, 0.25), _i(2))
    bank.update(_i(9), _t(1.0, 2.0), _i(2), _i(3, 4), decay=0.9)
    fresh = ScoreBank(vocab_size=8)
    fresh.load_state_dict(bank.state_dict())
    return fresh


def test_restored_values_are_used_when_the_content_matches() -> None:
    bank = _restored()
    assert bank.pending.tolist() == [True]
    bank.register(_i(9), _i(2), _i(11))
    assert bank.pending.tolist() == [False] and bank.num_replaced == 0
    assert bank.get_ref(_i(9), _i(2)).tolist() == [0.5, 0.25]
    assert bank.get_ema(_i(9), _i(2)).tolist() == [1.0, 2.0]
    # Confirmed from live data: a change now is an error, not a silent reset.
    with pytest.raises(ValueError, match=r"sample 9 had 2 candidates \(content digest 11\) when first seen"):
        bank.register(_i(9), _i(2), _i(12))


def test_restored_values_of_other_content_are_reset_and_counted() -> None:
    bank = _restored()
    bank.register(_i(9), _i(2), _i(12))  # same count, other tokens
    assert bank.num_replaced == 1 and bank.pending.tolist() == [False]
    assert bank.get_ref(_i(9), _i(2)).isnan().all() and bank.get_ema(_i(9), _i(2)).isnan().all()
    assert not bank.has_ref(_i(9)).item()
    assert bank.digests(_i(9)).tolist() == [12]
    other = _restored()
    other.register(_i(9), _i(3), _i(11))  # another candidate count: new slots
    assert other.num_replaced == 1 and other.candidate_counts(_i(9)).tolist() == [3]
    assert other.get_ref(_i(9), _i(3)).isnan().all()
    # An unknown digest (0) on either side matches any digest; the count still has to match.
    unknown = _restored(digest=0)
    unknown.register(_i(9), _i(2), _i(12))
    assert unknown.num_replaced == 0 and unknown.digests(_i(9)).tolist() == [12]


def test_register_stored_accepts_only_matching_entries() -> None:
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(1), _i(2), _i(5))
    accepted = bank.register_stored(_i(1, 2, 3), _i(2, 1, 1), _i(6, 7, 0))
    assert accepted.tolist() == [False, True, True]  # sample 1 is live with another digest: kept as it is
    assert bank.digests(_i(1, 2, 3)).tolist() == [5, 7, 0]
    assert bank.pending.tolist() == [False, True, True]
    assert bank.register_stored(_i(2), _i(2), _i(7)).tolist() == [False]  # another count


# --------------------------------------------------------------------------------------------------
# The per-step path (issue 13): first meetings, kept lookups, one value per slot.


def test_register_reports_the_samples_met_for_the_first_time() -> None:
    bank = ScoreBank(vocab_size=8)
    assert bank.register(_i(4, 2, 4), _i(1, 2, 1), _i(7, 8, 7)).tolist() == [True, True, True]
    assert bank.register(_i(2, 9), _i(2, 3), _i(8, 5)).tolist() == [False, True]
    assert bank.register(_i(9, 4), _i(3, 1), _i(5, 7)).tolist() == [False, False]  # the read-only path
    restored = ScoreBank(vocab_size=8)
    restored.load_state_dict(bank.state_dict())
    assert restored.register(_i(2, 4), _i(2, 1), _i(8, 6)).tolist() == [True, True]  # confirmed, replaced
    assert restored.num_replaced == 1
    # A known digest replaces an unknown one, live: the call goes past the read-only path and records it.
    bank.register(_i(30), _i(1))
    assert bank.register(_i(30), _i(1), _i(12)).tolist() == [False] and bank.digests(_i(30)).tolist() == [12]
    assert bank.register(_i(30), _i(1)).tolist() == [False] and bank.digests(_i(30)).tolist() == [12]


def test_flat_ranges_on_the_grid_and_on_uneven_lists() -> None:
    g = torch.Generator().manual_seed(0)
    for counts in (torch.randint(0, 6, (50,), generator=g), torch.tensor([1, 0, 2, 500, 3, 0])):  # even; uneven
        starts = torch.randint(0, 1000, (counts.numel(),), generator=g)
        expected = [s + j for s, c in zip(starts.tolist(), counts.tolist(), strict=True) for j in range(c)]
        assert flat_ranges(starts, counts).tolist() == expected
    assert flat_ranges(_i(), _i()).tolist() == [] and flat_ranges(_i(3, 4), _i(0, 0)).tolist() == []


def test_kept_lookups_follow_in_place_changes_moves_and_replaced_rows() -> None:
    bank = ScoreBank(vocab_size=8)
    bank.register(_i(1, 2), _i(2, 1), _i(5, 6))
    bank.set_ref(_i(1, 2), _t(1.0, 2.0, 3.0), _i(2, 1))
    idx, counts = _i(2, 1), _i(1, 2)
    assert bank.get_ref(idx, counts).tolist() == [3.0, 1.0, 2.0]
    idx[:] = _i(1, 2)  # the same tensors, changed in place: looked up again
    counts[:] = _i(2, 1)
    assert bank.get_ref(idx, counts).tolist() == [1.0, 2.0, 3.0]
    # A restored sample that comes back with another count gets new slots: looked up again.
    restored = ScoreBank(vocab_size=8)
    restored.load_state_dict(bank.state_dict())
    one, two = _i(1), _i(2)
    assert restored.get_ref(one, two).tolist() == [1.0, 2.0]
    restored.register(one, _i(3), _i(5))
    assert restored.get_ref(one, _i(3)).isnan().all()
    with pytest.raises(ValueError, match=r"sample 1 had 3 candidates when first seen and has 2 now"):
        restored.get_ref(one, two)


def test_one_value_per_slot_equals_the_mean_of_repeats() -> None:
    """The path for distinct samples (no mean to take) stores bitwise what the mean of repeats stores."""
    g = torch.Generator().manual_seed(1)
    idx, counts = _i(8, 3, 5), _i(4, 0, 3)
    loss, ids = torch.rand(7, generator=g) * 5, torch.randint(0, 16, (7,), generator=g)
    loss[[1, 5]] = NAN
    loss[2] = math.inf
    distinct, repeated = ScoreBank(vocab_size=16), ScoreBank(vocab_size=16)
    for bank in (distinct, repeated):
        bank.register(idx, counts)
    for step in range(3):
        step_loss = loss + step
        distinct.set_ref(idx, step_loss, counts)
        distinct.update(idx, step_loss, counts, ids, decay=0.7)
        twice = (torch.cat([idx, idx]), torch.cat([step_loss, step_loss]), torch.cat([counts, counts]))
        repeated.set_ref(twice[0], twice[1], twice[2])
        repeated.update(twice[0], twice[1], twice[2], torch.cat([ids, ids]), decay=0.7)
    for key in ("ema", "ref", "vocab_ema"):
        assert torch.equal(getattr(distinct, key).nan_to_num(-1), getattr(repeated, key).nan_to_num(-1)), key
