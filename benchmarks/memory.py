"""Memory, file sizes, start time and per-step time of the score store and the reference cache at scale.

Builds a :class:`~regate_lightning.ScoreBank` for ``--samples`` samples of ``--candidates`` candidate
answer tokens each (every sample registered and given reference losses, as after a complete
``regate-lightning score``), then reports, beside the formulas' predictions:

* the bank's bytes in memory, used and allocated (``ScoreBank.nbytes``);
* the bytes on disk of the reference cache (``cache.save_cache``) and of the bank's
  ``state_dict`` saved with ``torch.save`` (what a checkpoint holds);
* the time to build the bank and to write the cache;
* **the start of a fit with the cache**: ``cache.open_cache`` (what ``ReGATECallback.setup`` does: map the
  file, check it; a sample's losses are read when training first meets it), beside reading the whole
  file into a fresh store (``load_cache`` + ``load_into``: what ``fit`` did before, and what
  ``regate-lightning score`` still does to merge files), and the cost of a first-epoch step that meets
  ``--batch`` unseen samples and reads them from the opened cache;
* **the policy's time per training step** with the full store: ``ReGATEPolicy.plan`` +
  ``ReGATEPolicy.observe`` (what ``ReGATECallback``'s hooks call) on batches of already-stored samples
  (the steady state: every step sparse, the teacher never runs), for each ``--batch`` size and each
  ``--threads`` count, median and 90th percentile over ``--repeats`` steps. The batches are text rows of
  ``--prompt-len`` tokens before an answer of ``--candidates + 1`` tokens, with their real content
  digests; the student's losses are random. ``--busy N`` keeps N other processes spinning on the CPU
  meanwhile (the DataLoader workers of a real node, which share its cores with the training process);
* the store's own calls per step (``register`` + ``has_ref`` + ``difficulty`` + ``get_ref`` + ``update``)
  for the first batch size, and the time to register a batch of unseen samples into the full store.

Samples are keyed as ``ConversationDataset`` keys them: random 63-bit keys, each with a content digest.

Formulas (N_cand candidates in all, N_samples samples, V = vocabulary size): bank used bytes =
``8 N_cand + 32 N_samples + 4 V`` (float32 EMA and reference per candidate, int64 key, offset, length
and digest per sample, float32 EMA per vocabulary id); cache file = ``4 N_cand + 24 N_samples`` plus a
few hundred bytes of container (float32 reference per candidate, int64 key, count and digest per
sample); bank state_dict file = used bytes plus the container.

The script measures another version of the package too (``--package``: a folder holding a checkout of
this repository, or a git revision of it, which is extracted into a temporary folder), for before/after
figures with one command; what that code does not have is reported as ``n/a``.

Examples:
    python benchmarks/memory.py --smoke
    python benchmarks/memory.py --samples 1000000 --candidates 100 --threads 1 2 --batch 64 8
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"samples": 2000, "candidates": 20, "vocab": 1000, "repeats": 5, "prompt_len": 16}
WARMUP = 3
"""Untimed steps before each timed series."""


def checkout(package: str | None, folder: Path) -> Path | None:
    """The package to measure as a folder: ``package`` itself if it is a folder, else the tree of the git
    revision ``package`` of this repository, extracted into ``folder`` (None: this repository)."""
    if package is None or Path(package).is_dir():
        return None if package is None else Path(package)
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", package], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def import_package(package: Path | None) -> dict[str, Any]:
    """The package's pieces this script uses, from ``package`` (a repository checkout) or this repository.

    Returns:
        ``ScoreBank``, ``ReGATEPolicy``, ``save_cache``, ``load_cache``, ``load_into``, ``open_cache`` (None
        where the checkout predates it), ``sample_digest``, ``candidate_mask``, ``tiny_llava``.
    """
    root = str(package.resolve() if package else ROOT)
    if root not in sys.path:  # run as a script: make `regate_lightning` importable
        sys.path.insert(0, root)
    cache = importlib.import_module("regate_lightning.cache")
    imported = {
        "ScoreBank": importlib.import_module("regate_lightning.bank").ScoreBank,
        "ReGATEPolicy": importlib.import_module("regate_lightning.policy").ReGATEPolicy,
        "save_cache": cache.save_cache,
        "load_cache": cache.load_cache,
        "load_into": cache.load_into,
        "open_cache": getattr(cache, "open_cache", None),
        "sample_digest": importlib.import_module("regate_lightning.targets").sample_digest,
        "candidate_mask": importlib.import_module("regate_lightning.targets").candidate_mask,
        "tiny_llava": importlib.import_module("regate_lightning.testing").tiny_llava,
    }
    where = Path(cache.__file__).resolve().parents[1]
    if where != Path(root):
        raise RuntimeError(f"regate_lightning was imported from {where}, not from {root}")
    return imported


@dataclass
class Timing:
    """Median and 90th percentile of a series of step times (milliseconds)."""

    median_ms: float
    p90_ms: float
    parts_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, seconds: Sequence[float], parts: dict[str, Sequence[float]] | None = None) -> Timing:
        """From seconds per step (and per part of a step)."""
        ordered = sorted(seconds)
        ninety = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return cls(
            median_ms=1e3 * statistics.median(seconds),
            p90_ms=1e3 * ninety,
            parts_ms={k: 1e3 * statistics.median(v) for k, v in (parts or {}).items()},
        )


@dataclass
class Report:
    """What :func:`run` measured (bytes, seconds, milliseconds)."""

    samples: int
    candidates: int
    vocab: int
    batches: list[int]
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
    open_s: float | None
    load_s: float
    first_meet: Timing | None
    policy: dict[tuple[int, int], Timing]
    store_calls: Timing
    register_unseen: Timing


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


def stand_in_digests(keys: torch.Tensor) -> torch.Tensor:
    """A stand-in content digest per sample (any non-zero int64 derived from the key)."""
    return keys % 1_000_003 + 1


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fill(
    bank: Any, keys: torch.Tensor, digests: torch.Tensor, candidates: int, chunk: int = 10_000, seed: int = 0
) -> Any:
    """Register ``keys`` (with ``digests``) in ``bank`` and give them random reference losses, in chunks.

    Also what ``benchmarks/gpu_throughput.py`` uses to time the policy on a GPU step with a large store.

    Returns:
        ``bank``.
    """
    generator = torch.Generator().manual_seed(seed)
    for idx, dig in zip(keys.split(chunk), digests.split(chunk), strict=True):
        counts = torch.full_like(idx, candidates)
        bank.register(idx, counts, dig)
        bank.set_ref(idx, torch.rand(idx.numel() * candidates, generator=generator) * 8, counts)
    return bank


def text_batches(
    pkg: dict[str, Any], keys: torch.Tensor, batch: int, candidates: int, prompt_len: int, vocab: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Text batches of ``keys`` (``batch`` rows each): ``prompt_len`` prompt tokens, ``candidates + 1`` answer tokens.

    Returns:
        Batches with ``input_ids``, ``labels``, ``attention_mask``, ``sample_idx`` and, for the store,
        ``digest`` (each row's content digest, as the policy computes it).
    """
    generator = torch.Generator().manual_seed(seed)
    length = prompt_len + candidates + 1
    out = []
    for idx in keys.split(batch):
        input_ids = torch.randint(3, vocab - 8, (idx.numel(), length), generator=generator)
        labels = input_ids.clone()
        labels[:, :prompt_len] = -100
        attention = torch.ones_like(input_ids)
        rows = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "sample_idx": idx}
        rows["digest"] = pkg["sample_digest"](input_ids, pkg["candidate_mask"](labels), attention)
        out.append(rows)
    return out


@contextmanager
def spinning(processes: int) -> Iterator[None]:
    """``processes`` other Python processes that keep a core busy each, for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def time_policy(
    pkg: dict[str, Any], bank: Any, batches: list[dict[str, torch.Tensor]], vocab: int, seed: int
) -> Timing:
    """``plan`` + ``observe`` per step of a sparse-every-step policy whose store is ``bank`` (timed after warm-up).

    The batches' samples are in the store with their real digests, so no step runs the teacher.
    """
    policy = pkg["ReGATEPolicy"](keep_ratio=0.5, warmup_steps=0, cycle_steps=1, full_steps=0)
    policy.setup(pkg["tiny_llava"](vocab_size=vocab, hidden_size=16, num_layers=1))
    policy.start(torch.device("cpu"))
    policy.bank = bank
    generator = torch.Generator().manual_seed(seed)
    totals: list[float] = []
    parts: dict[str, list[float]] = {"plan": [], "observe": []}
    for i, rows in enumerate(batches):
        batch = {k: v for k, v in rows.items() if k != "digest"}
        loss = torch.rand(batch["input_ids"].shape, generator=generator) * 8
        start = time.perf_counter()
        plan = policy.plan(batch, step=i)
        planned = time.perf_counter()
        policy.observe(plan, loss if plan.keep_mask is None else loss.masked_fill(~plan.keep_mask, torch.nan))
        done = time.perf_counter()
        if plan.scored:
            raise RuntimeError("the teacher ran: the timed samples are not all in the store")
        if i >= WARMUP:
            totals.append(done - start)
            parts["plan"].append(planned - start)
            parts["observe"].append(done - planned)
    return Timing.of(totals, parts)


def time_store_calls(
    bank: Any, rows: list[dict[str, torch.Tensor]], candidates: int, generator: torch.Generator
) -> Timing:
    """The store's own calls per step (what the policy asks of it), on batches of stored samples."""
    names = ("register", "has_ref", "difficulty", "get_ref", "update")
    parts: dict[str, list[float]] = {n: [] for n in names}
    totals: list[float] = []
    for i, batch in enumerate(rows):
        idx, dig = batch["sample_idx"], batch["digest"]
        counts = torch.full_like(idx, candidates)
        ids = torch.randint(bank.vocab_size, (idx.numel() * candidates,), generator=generator)
        loss = torch.rand(idx.numel() * candidates, generator=generator) * 8
        calls: Sequence[tuple[str, Callable[[], object]]] = (
            ("register", partial(bank.register, idx, counts, dig)),
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
            if i >= WARMUP:
                parts[name].append(took)
        if i >= WARMUP:
            totals.append(step)
    return Timing.of(totals, parts)


def time_first_meet(
    pkg: dict[str, Any], cache: Any, keys: torch.Tensor, candidates: int, batch: int, repeats: int, vocab: int
) -> Timing:
    """A first-epoch step with an opened cache: register ``batch`` unseen samples (into a store that starts
    empty), read their losses from the cache, store them."""
    bank = pkg["ScoreBank"](vocab_size=vocab)
    times = []
    for i, idx in enumerate(keys[: (repeats + WARMUP) * batch].split(batch)):
        counts, dig = torch.full_like(idx, candidates), stand_in_digests(idx)
        start = time.perf_counter()
        bank.register(idx, counts, dig)
        _, usable, values = cache.read(idx, counts, dig)
        bank.set_ref(idx[usable], values, counts[usable])
        took = time.perf_counter() - start
        if not bool(usable.all()):
            raise RuntimeError("a cached sample did not match its stand-in digest")
        if i >= WARMUP:
            times.append(took)
    return Timing.of(times)


def time_register_unseen(bank: Any, candidates: int, batch: int, repeats: int, generator: torch.Generator) -> Timing:
    """Registering batches of unseen samples into the full bank (first-epoch steps without a cache)."""
    times = []
    for i in range(repeats + WARMUP):
        idx = random_keys(batch, generator)
        idx = idx[~bank.is_registered(idx)]
        counts = torch.full_like(idx, candidates)
        start = time.perf_counter()
        bank.register(idx, counts, stand_in_digests(idx))
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return Timing.of(times)


def run(
    samples: int,
    candidates: int,
    vocab: int,
    batches: Sequence[int],
    threads: Sequence[int],
    repeats: int,
    chunk: int,
    prompt_len: int,
    out: Path,
    package: Path | None = None,
    seed: int = 0,
    busy: int = 0,
) -> Report:
    """Build, save, open, reload and time; see the module docstring."""
    pkg = import_package(package)
    generator = torch.Generator().manual_seed(seed)
    num_candidates = samples * candidates
    keys = random_keys(samples, generator)
    # The policy's timed batches: the first keys (one range per batch size), as text rows whose real
    # content digests go into the store with them; the other samples get stand-in digests.
    digests, timed, first = stand_in_digests(keys), {}, 0
    for b in batches:
        count = (repeats + WARMUP) * b
        timed[b] = text_batches(pkg, keys[first : first + count], b, candidates, prompt_len, vocab, seed)
        digests[first : first + count] = torch.cat([rows["digest"] for rows in timed[b]])
        first += count

    start = time.perf_counter()
    bank = fill(pkg["ScoreBank"](vocab_size=vocab), keys, digests, candidates, chunk, seed)
    build_s = time.perf_counter() - start
    rss = {"build": peak_rss()}
    assert bank.num_candidates == num_candidates and bank.num_samples == samples

    cache_path = out / "ref_cache.pt"
    fingerprint = {"teacher": "benchmark", "teacher_weights": "0", "vocab_size": vocab, "data": None}
    start = time.perf_counter()
    written = pkg["save_cache"](cache_path, bank, fingerprint)
    save_s = time.perf_counter() - start
    assert written == samples
    rss["save"] = peak_rss()

    state_path = out / "bank_state.pt"
    torch.save(bank.state_dict(), state_path)

    gc.collect()
    open_s, first_meet = None, None
    if pkg["open_cache"] is not None:
        start = time.perf_counter()
        cache = pkg["open_cache"](cache_path, fingerprint)
        open_s = time.perf_counter() - start
        assert cache is not None and len(cache) == samples
        unseen = keys[first:][torch.randperm(samples - first, generator=generator)]  # stand-in digests
        first_meet = time_first_meet(pkg, cache, unseen, candidates, batches[0], repeats, vocab)
        del cache
        rss["open"] = peak_rss()

    gc.collect()
    start = time.perf_counter()
    payload = pkg["load_cache"](cache_path, fingerprint)
    assert payload is not None
    fresh = pkg["ScoreBank"](vocab_size=vocab)
    loaded = pkg["load_into"](fresh, payload)
    load_s = time.perf_counter() - start
    assert loaded == samples
    rss["load"] = peak_rss()
    del payload, fresh
    gc.collect()

    policy: dict[tuple[int, int], Timing] = {}
    before = torch.get_num_threads()
    with spinning(busy):
        for count in threads:
            torch.set_num_threads(count)
            for b in batches:
                policy[(count, b)] = time_policy(pkg, bank, timed[b], vocab, seed)
    torch.set_num_threads(before)
    store_calls = time_store_calls(bank, timed[batches[0]], candidates, generator)
    used = bank.nbytes(used_only=True), bank.nbytes()  # before the unseen samples below join
    register_unseen = time_register_unseen(bank, candidates, batches[0], repeats, generator)
    return Report(
        samples=samples,
        candidates=candidates,
        vocab=vocab,
        batches=list(batches),
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
        open_s=open_s,
        load_s=load_s,
        first_meet=first_meet,
        policy=policy,
        store_calls=store_calls,
        register_unseen=register_unseen,
    )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ms(t: Timing | None) -> str:
    return "n/a" if t is None else f"{t.median_ms:.2f} ms ({t.p90_ms:.2f} ms)"


def table(report: Report) -> str:
    """The report as Markdown tables."""
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
    opened = "n/a" if r.open_s is None else f"{r.open_s:.3f} s"
    lines += [
        "",
        "| time | value |",
        "|---|---:|",
        f"| build (register + set_ref, all samples) | {r.build_s:.1f} s |",
        f"| write the cache file (`save_cache`) | {r.save_s:.1f} s |",
        f"| **start of a fit with the cache** (`open_cache`: map and check the file) | {opened} |",
        f"| first-epoch step with the open cache: register {r.batches[0]} unseen samples, read and store their "
        f"losses, median (p90) | {_ms(r.first_meet)} |",
        f"| read the whole cache into a fresh store (`load_cache` + `load_into`; `score` merging files) | "
        f"{r.load_s:.1f} s |",
    ]
    for (threads, batch), timing in r.policy.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in timing.parts_ms.items())
        lines.append(
            f"| **policy per step** (`plan` + `observe`), batch {batch}, {threads} thread(s), median (p90) | "
            f"{_ms(timing)}; medians {parts} ms |"
        )
    first = r.batches[0]
    lines.append(f"| store calls per step, batch {first}, first thread count, median (p90) | {_ms(r.store_calls)} |")
    lines += [f"| &nbsp;&nbsp;`{k}` median | {v:.2f} ms |" for k, v in r.store_calls.parts_ms.items()]
    lines.append(f"| register {first} unseen samples into the full store, median (p90) | {_ms(r.register_unseen)} |")
    lines += [f"| peak resident memory of the process after {k} | {_size(v)} |" for k, v in r.rss_after.items()]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="training samples (N)")
    parser.add_argument("--candidates", type=int, default=100, help="candidate answer tokens per sample")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V (default: Qwen2's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 8], help="samples per training batch (timings)")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens before the answer in the timed batches")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per setting")
    parser.add_argument("--chunk", type=int, default=10_000, help="samples registered per call while building")
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch intra-op thread counts to time (default: torch's)"
    )
    parser.add_argument(
        "--package", default=None, help="measure another version: a folder with a checkout, or a git revision"
    )
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU during the policy timings")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny size that runs in seconds: {SMOKE}")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    """Parse the arguments, run, print the tables."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    for name in ("samples", "candidates", "vocab", "repeats", "chunk", "prompt_len"):
        if getattr(args, name) < 1:
            cli.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.busy < 0:
        cli.error("--busy must be >= 0")
    if min(args.batch) < 1 or (args.threads and min(args.threads) < 1):
        cli.error("--batch and --threads must be >= 1")
    threads = args.threads or [torch.get_num_threads()]
    # Every timed step has samples of its own (a range of keys per batch size).
    batches = [max(1, min(b, args.samples // ((args.repeats + WARMUP) * len(args.batch)))) for b in args.batch]
    torch.set_num_threads(threads[0])  # the build, the files and the store calls run with the first setting

    with tempfile.TemporaryDirectory(prefix="regate-memory-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        package = checkout(args.package, Path(tmp) / "package")
        report = run(
            args.samples,
            args.candidates,
            args.vocab,
            batches,
            threads,
            args.repeats,
            args.chunk,
            args.prompt_len,
            out,
            package,
            args.seed,
            args.busy,
        )
    print(
        f"ScoreBank and reference cache: N = {args.samples:,} samples x {args.candidates} candidates = "
        f"{args.samples * args.candidates:,} candidates, V = {args.vocab:,}; package "
        f"{args.package or ROOT}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
        f"{' and '.join(map(str, threads))}; {args.busy} spinning processes during the policy timings; load "
        f"average at the end {load}"
    )
    print()
    print(table(report))
    return report


if __name__ == "__main__":
    main()
