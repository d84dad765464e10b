"""The reference cache read lazily (issue 13): mapped at the start of a fit, a sample read when first met.

What a cache may be used for does not change: only the data it was made from (the fingerprint for the
file, the count and content digest for each sample), with clear refusals of damaged and foreign files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_callback import module, trainer

from regate_lightning import ReGATECallback
from regate_lightning.bank import ScoreBank
from regate_lightning.cache import load_cache, load_into, open_cache, save_cache, write_atomic
from regate_lightning.keys import TEACHER_SAMPLES
from regate_lightning.testing.datamodule import RandomDataModule

FINGERPRINT = {"teacher": "t", "vocab_size": 16}


def stored(keys: list[int], counts: list[int], seed: int = 0) -> ScoreBank:
    """A store holding ``keys`` with ``counts`` candidates, digest ``key + 100``, random reference losses."""
    bank = ScoreBank(vocab_size=16)
    idx, cnt = torch.tensor(keys), torch.tensor(counts)
    bank.register(idx, cnt, idx + 100)
    bank.set_ref(idx, torch.rand(int(cnt.sum()), generator=torch.Generator().manual_seed(seed)), cnt)
    return bank


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data (Linux: ``/proc/self/maps``), or None."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # range, permissions, offset, device, inode[, path]
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


def test_opening_maps_the_file_and_a_sample_is_read_only_for_its_own_content(tmp_path):
    path = tmp_path / "ref.pt"
    bank = stored([40, 7, 3], [2, 0, 3])
    save_cache(path, bank, FINGERPRINT)
    cache = open_cache(path, FINGERPRINT)
    assert cache is not None and len(cache) == 3
    # Memory-mapped: the arrays are pages of the file (read when touched), not copies in memory.
    for array in (cache.sample_idx, cache.counts, cache.digests, cache.ref):
        assert mapped_file(array) == str(path)
    asked, counts, digests = torch.tensor([3, 40, 9, 7]), torch.tensor([3, 2, 1, 0]), torch.tensor([103, 999, 5, 107])
    found, usable, values = cache.read(asked, counts, digests)
    assert found.tolist() == [True, True, False, True]
    assert usable.tolist() == [True, False, False, True]  # 40 is cached for other content (its digest differs)
    assert torch.equal(values, bank.get_ref(torch.tensor([3]), torch.tensor([3])))
    # Another candidate count is other content too; an unknown digest (0) agrees with any.
    assert cache.read(torch.tensor([40]), torch.tensor([3]), torch.tensor([140]))[1].tolist() == [False]
    assert cache.read(torch.tensor([40]), torch.tensor([2]), torch.tensor([0]))[1].tolist() == [True]
    assert open_cache(tmp_path / "none.pt", FINGERPRINT) is None
    with pytest.raises(ValueError, match="was made for another setup"):
        open_cache(path, {**FINGERPRINT, "teacher": "other"})


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        ({"sample_idx": torch.tensor([7, 3])}, "the sample keys are not distinct, non-negative and ascending"),
        ({"sample_idx": torch.tensor([3, 3])}, "the sample keys are not distinct, non-negative and ascending"),
        ({"counts": torch.tensor([2, 2])}, "the candidate counts add up to 4, but the file holds 3 losses"),
        ({"counts": torch.tensor([1])}, "`sample_idx`, `counts` and `digests` differ in length (2, 1, 2)"),
        ({"ref": torch.zeros(3, dtype=torch.float64)}, "`ref` must be a 1-D torch.float32 tensor, got torch.float64"),
        ({"digests": None}, "`digests` must be a 1-D torch.int64 tensor, got None"),
    ],
)
def test_a_damaged_cache_is_refused_naming_the_file_the_fault_and_the_fix(tmp_path, change, fault):
    path = tmp_path / "ref.pt"
    payload = {
        "version": 2,
        "fingerprint": FINGERPRINT,
        "sample_idx": torch.tensor([3, 7]),
        "counts": torch.tensor([2, 1]),
        "digests": torch.tensor([103, 107]),
        "ref": torch.zeros(3),
    }
    write_atomic(path, {**payload, **change})
    message = (
        f"reference cache {path} is damaged: {fault}; delete it (or point `ref_cache` at another file) and the "
        "reference losses are computed again"
    )
    for reader in (load_cache, open_cache):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            reader(path, FINGERPRINT)


def test_an_older_format_is_refused_by_its_version(tmp_path):
    path = tmp_path / "ref.pt"
    write_atomic(path, {"version": 1, "fingerprint": {}, "sample_idx": torch.tensor([0])})
    with pytest.raises(ValueError, match=r"is not a reference cache of version 2 \(found 1\); delete it"):
        open_cache(path, FINGERPRINT)


def test_writing_with_an_open_cache_keeps_the_samples_not_met_yet(tmp_path):
    """``fit`` reads lazily, so what it writes is the store's samples plus the cached ones it never met."""
    path = tmp_path / "ref.pt"
    original = stored([40, 7, 3, 12], [2, 0, 3, 1], seed=1)
    save_cache(path, original, FINGERPRINT)
    cache = open_cache(path, FINGERPRINT)
    assert cache is not None
    met = stored([12, 5], [1, 4], seed=2)  # 12 recomputed (its values differ now); 5 new; 3, 7, 40 never met
    save_cache(path, met, FINGERPRINT, base=cache)  # replaces the file that is still mapped
    merged = load_cache(path, FINGERPRINT)
    assert merged is not None
    assert merged["sample_idx"].tolist() == [3, 5, 7, 12, 40] and merged["counts"].tolist() == [3, 4, 0, 1, 2]
    assert merged["digests"].tolist() == [103, 105, 107, 112, 140]
    whole = ScoreBank(vocab_size=16)
    load_into(whole, merged)
    for key, source in ((3, original), (7, original), (40, original), (12, met), (5, met)):
        idx = torch.tensor([key])
        count = source.candidate_counts(idx)
        assert torch.equal(whole.get_ref(idx, count), source.get_ref(idx, count)), key


def test_a_fit_reads_the_samples_it_meets_and_writes_back_the_rest(tmp_path):
    path = tmp_path / "ref.pt"
    data = {"num_samples": 8, "batch_size": 4, "answer_len": 12, "shuffle": False}
    first = ReGATECallback(warmup_steps=0, full_steps=0, ref_cache=str(path))
    trainer(2, [first]).fit(module(), RandomDataModule(**data))  # one epoch: all 8 scored and written
    written = load_cache(path, first.fingerprint)
    assert written is not None and written["sample_idx"].numel() == 8
    second = ReGATECallback(warmup_steps=0, full_steps=0, ref_cache=str(path))
    trainer(1, [second]).fit(module(), RandomDataModule(**data))  # one step: 4 samples met
    assert second.cache_samples == 4 and second.totals[TEACHER_SAMPLES] == 0
    assert second.bank is not None and second.bank.num_samples == 4
    again = load_cache(path, first.fingerprint)
    assert again is not None
    for key in ("sample_idx", "counts", "digests", "ref"):
        assert torch.equal(again[key], written[key]), key
