"""Memory, file sizes and per-step lookup time of the score store and the reference cache at scale.

Builds a :class:`~regate_lightning.ScoreBank` for ``--samples`` samples of ``--candidates`` candidate
answer tokens each (every sample registered and given reference losses, as after a complete
``regate-lightning score``), then reports, beside the formulas' predictions:

* the bank's bytes in memory, used and allocated (``ScoreBank.nbytes``);
* the bytes on disk of the reference cache (``cache.save_cache``) and of the bank's
  ``state_dict`` saved with ``torch.save`` (what a checkpoint holds);
* the time to build the bank, to write the cache and to read it back into a fresh bank (what
  ``fit`` does at start);
* the per-step lookup time of a training batch of ``--batch`` samples: ``register`` + ``has_ref`` +
  ``difficulty`` + ``get_ref`` + ``update``, what ``ReGATECallback`` calls per step, median over
  ``--repeats`` random batches of already-registered samples (the steady state), and the time to
  register a batch of unseen samples into the full store (a first-epoch step: the key index grows).

Samples are keyed as ``ConversationDataset`` keys them: random 63-bit keys, each with a content digest.

Formulas (N_cand candidates in all, N_samples samples, V = vocabulary size): bank used bytes =
``8 N_cand + 32 N_samples + 4 V`` (float32 EMA and reference per candidate, int64 key, offset, length
and digest per sample, float32 EMA per vocabulary id); cache file = ``4 N_cand + 24 N_samples`` plus a
few hundred bytes of container (float32 reference per candidate, int64 key, count and digest per
sample); bank state_dict file = used bytes plus the container.

Examples:
    python benchmarks/memory.py --smoke
    python benchmarks/memory.py --samples 1000000 --candidates 100
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `regate_lightning` importable
    sys.path.insert(0, str(ROOT))

from regate_lightning.bank import ScoreBank  # noqa: E402
from regate_lightning.cache import load_cache, load_into, save_cache  # noqa: E402

SMOKE = {"samples": 2000, "candidates": 20, "vocab": 1000, "repeats": 5}


@dataclass
class Report:
    """What :func:`run` measured (bytes, seconds)."""

    samples: int
    candidates: int
    vocab: int
    batch: int
    bank_used: int
    bank_allocated: int
    bank_used_formula: int
    cache_file: int
    cache_file_formula: int
    state_file: int
    state_file_formula: int
    rss_after: dict[str, int]
    build_s: float
    save_s: float
    load_s: float
    step_ms: float
    step_p90_ms: float
    parts_ms: dict[str, float]


def bank_formula(num_candidates: int, num_samples: int, vocab: int) -> int:
    """Used bytes of a ScoreBank: ``8 N_cand + 32 N_samples + 4 V``."""
    return 8 * num_candidates + 32 * num_samples + 4 * vocab


def cache_formula(num_candidates: int, num_samples: int) -> int:
    """Payload bytes of a reference cache file: ``4 N_cand + 24 N_samples`` (container excluded)."""
    return 4 * num_candidates + 24 * num_samples


def random_keys(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct random keys in ``[0, 2**63)``, as ``sample_key`` hashes give them."""
    keys = torch.randint(0, 2**63 - 1, (count,), generator=generator).unique()
    while keys.numel() < count:  # a collision among 63-bit keys: draw the missing ones again
        keys = torch.cat([keys, torch.randint(0, 2**63 - 1, (count - keys.numel(),), generator=generator)]).unique()
    return keys[torch.randperm(count, generator=generator)]


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(keys: torch.Tensor, candidates: int, vocab: int, chunk: int, generator: torch.Generator) -> ScoreBank:
    """A bank with every sample registered (with a digest) and given random reference losses, in chunks."""
    bank = ScoreBank(vocab_size=vocab)
    for idx in keys.split(chunk):
        counts = torch.full_like(idx, candidates)
        bank.register(idx, counts, digests(idx))
        bank.set_ref(idx, torch.rand(idx.numel() * candidates, generator=generator) * 8, counts)
    return bank


def digests(keys: torch.Tensor) -> torch.Tensor:
    """A stand-in content digest per sample (any non-zero int64 derived from the key)."""
    return keys % 1_000_003 + 1


def time_step(
    bank: ScoreBank, keys: torch.Tensor, candidates: int, batch: int, repeats: int, generator: torch.Generator
) -> tuple[list[float], dict[str, list[float]]]:
    """Per-step lookup times (seconds) of ``repeats`` random batches, in total and per call."""
    names = ("register", "has_ref", "difficulty", "get_ref", "update")
    parts: dict[str, list[float]] = {n: [] for n in names}
    totals: list[float] = []
    for repeat in range(repeats + 3):  # three warm-up steps, not recorded
        idx = keys[torch.randperm(keys.numel(), generator=generator)[:batch]]
        counts = torch.full_like(idx, candidates)
        ids = torch.randint(bank.vocab_size, (idx.numel() * candidates,), generator=generator)
        loss = torch.rand(idx.numel() * candidates, generator=generator) * 8
        calls: Sequence[tuple[str, Callable[[], object]]] = (
            ("register", partial(bank.register, idx, counts, digests(idx))),
            ("has_ref", partial(bank.has_ref, idx)),
            ("difficulty", partial(bank.difficulty, idx, counts, ids, "vocab")),
            ("get_ref", partial(bank.get_ref, idx, counts)),
            ("update", partial(bank.update, idx, loss, counts, ids, 0.9)),
        )
        step = 0.0
        for name, call in calls:
            start = time.perf_counter()
            call()
            took = time.perf_counter() - start
            step += took
            if repeat >= 3:
                parts[name].append(took)
        if repeat >= 3:
            totals.append(step)
    return totals, parts


def time_new(bank: ScoreBank, candidates: int, batch: int, repeats: int, generator: torch.Generator) -> list[float]:
    """Times (seconds) to register ``repeats`` batches of unseen samples into the bank (first-epoch steps)."""
    times = []
    for repeat in range(repeats + 3):
        idx = random_keys(batch, generator)
        idx = idx[~bank.is_registered(idx)]
        counts = torch.full_like(idx, candidates)
        start = time.perf_counter()
        bank.register(idx, counts, digests(idx))
        if repeat >= 3:
            times.append(time.perf_counter() - start)
    return times


def run(
    samples: int,
    candidates: int,
    vocab: int,
    batch: int,
    repeats: int,
    chunk: int,
    out: Path,
    seed: int = 0,
) -> Report:
    """Build, save, reload and time; see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    num_candidates = samples * candidates
    keys = random_keys(samples, generator)
    start = time.perf_counter()
    bank = build(keys, candidates, vocab, chunk, generator)
    build_s = time.perf_counter() - start
    rss = {"build": peak_rss()}
    assert bank.num_candidates == num_candidates and bank.num_samples == samples

    cache_path = out / "ref_cache.pt"
    fingerprint = {"teacher": "benchmark", "teacher_weights": "0", "vocab_size": vocab, "data": None}
    start = time.perf_counter()
    written = save_cache(cache_path, bank, fingerprint)
    save_s = time.perf_counter() - start
    assert written == samples
    rss["save"] = peak_rss()

    state_path = out / "bank_state.pt"
    torch.save(bank.state_dict(), state_path)

    gc.collect()
    start = time.perf_counter()
    payload = load_cache(cache_path, fingerprint)
    assert payload is not None
    fresh = ScoreBank(vocab_size=vocab)
    loaded = load_into(fresh, payload)
    load_s = time.perf_counter() - start
    assert loaded == samples
    rss["load"] = peak_rss()
    del payload, fresh
    gc.collect()

    totals, parts = time_step(bank, keys, candidates, batch, repeats, generator)
    ninety = sorted(totals)[min(len(totals) - 1, int(0.9 * len(totals)))]
    used = bank.nbytes(used_only=True), bank.nbytes()  # before the unseen samples below join
    parts["register (unseen samples)"] = time_new(bank, candidates, batch, repeats, generator)
    return Report(
        samples=samples,
        candidates=candidates,
        vocab=vocab,
        batch=batch,
        bank_used=used[0],
        bank_allocated=used[1],
        bank_used_formula=bank_formula(num_candidates, samples, vocab),
        cache_file=cache_path.stat().st_size,
        cache_file_formula=cache_formula(num_candidates, samples),
        state_file=state_path.stat().st_size,
        state_file_formula=bank_formula(num_candidates, samples, vocab),
        rss_after=rss,
        build_s=build_s,
        save_s=save_s,
        load_s=load_s,
        step_ms=1e3 * statistics.median(totals),
        step_p90_ms=1e3 * ninety,
        parts_ms={k: 1e3 * statistics.median(v) for k, v in parts.items()},
    )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def table(report: Report) -> str:
    """The report as a Markdown table."""
    r = report
    rows = [
        ("bank in memory, used (`nbytes(used_only=True)`)", r.bank_used, r.bank_used_formula, "8 N_cand + 32 N + 4 V"),
        ("bank in memory, allocated (`nbytes()`)", r.bank_allocated, None, "< 2x used (doubling) + key index"),
        ("reference cache file (`save_cache`)", r.cache_file, r.cache_file_formula, "4 N_cand + 24 N + container"),
        ("bank `state_dict` file (`torch.save`)", r.state_file, r.state_file_formula, "bank used + container"),
    ]
    lines = ["| quantity | measured | formula | formula bytes |", "|---|---:|---|---:|"]
    for name, measured, predicted, formula in rows:
        shown = "" if predicted is None else f"{predicted:,} ({_size(predicted)})"
        lines.append(f"| {name} | {measured:,} ({_size(measured)}) | {formula} | {shown} |")
    lines += [
        "",
        "| time | value |",
        "|---|---:|",
        f"| build (register + set_ref, all samples) | {r.build_s:.1f} s |",
        f"| write the cache file | {r.save_s:.1f} s |",
        f"| read the cache into a fresh bank (`load_cache` + `load_into`) | {r.load_s:.1f} s |",
        f"| lookup per step, batch {r.batch}, median (p90) | {r.step_ms:.2f} ms ({r.step_p90_ms:.2f} ms) |",
    ]
    lines += [f"| &nbsp;&nbsp;`{k}` median | {v:.2f} ms |" for k, v in r.parts_ms.items()]
    lines += [f"| peak resident memory of the process after {k} | {_size(v)} |" for k, v in r.rss_after.items()]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="training samples (N)")
    parser.add_argument("--candidates", type=int, default=100, help="candidate answer tokens per sample")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V (default: Qwen2's)")
    parser.add_argument("--batch", type=int, default=64, help="samples per training batch for the lookup timing")
    parser.add_argument("--repeats", type=int, default=50, help="timed lookup steps")
    parser.add_argument("--chunk", type=int, default=10_000, help="samples registered per call while building")
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny size that runs in seconds: {SMOKE}")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    """Parse the arguments, run, print the table."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    for name in ("samples", "candidates", "vocab", "batch", "repeats", "chunk"):
        if getattr(args, name) < 1:
            cli.error(f"--{name} must be >= 1")
    args.batch = min(args.batch, args.samples)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="regate-memory-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = run(args.samples, args.candidates, args.vocab, args.batch, args.repeats, args.chunk, out, args.seed)
    print(
        f"ScoreBank and reference cache: N = {args.samples:,} samples x {args.candidates} candidates = "
        f"{args.samples * args.candidates:,} candidates, V = {args.vocab:,}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average at the end {load}"
    )
    print()
    print(table(report))
    return report


if __name__ == "__main__":
    main()
