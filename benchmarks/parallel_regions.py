"""OpenMP parallel regions that the policy's training step opens: the count behind "no waiting for a busy core".

torch runs some CPU operations in OpenMP threads even on small inputs (``repeat_interleave`` always,
advanced indexing from a few thousand elements). With two or more intra-op threads on cores that other
processes (DataLoader workers, other jobs) keep busy, every such *parallel region* waits until all of its
threads got a core: milliseconds each. This script counts the regions that ``ReGATEPolicy.plan`` and
``ReGATEPolicy.observe`` open per step, with a store of ``--samples`` samples, for each ``--batch`` size,
at two intra-op threads (a count, not a time: it does not depend on the machine's load).

How: a small shared library that wraps libgomp's ``GOMP_parallel`` (the entry of every parallel region
in torch's CPU build) and counts its calls is compiled with the system's C compiler into a temporary
folder, and the script runs itself again with it in ``LD_PRELOAD``. Linux with a C compiler (``cc``) and
torch's bundled libgomp (the PyPI CPU and CUDA wheels). The batches, the store and the policy are those
of ``benchmarks/memory.py`` (``--package`` measures another version, a folder or a git revision).

Examples:
    python benchmarks/parallel_regions.py --samples 4000
    python benchmarks/parallel_regions.py --samples 1000000 --batch 64 8
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.memory import (  # noqa: E402
    WARMUP,
    checkout,
    fill,
    import_package,
    random_keys,
    stand_in_digests,
    text_batches,
)

COUNTER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long count = 0;
long gomp_parallel_count(void) { return count; }
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) {
  static gomp_parallel_t real = 0;
  if (!real) real = (gomp_parallel_t)dlsym(RTLD_NEXT, "GOMP_parallel");
  count++;
  real(fn, data, num_threads, flags);
}
"""
ENV = "REGATE_REGION_COUNTER"


def counter_library(folder: Path) -> Path:
    """Compile the counting wrapper of ``GOMP_parallel`` into ``folder``; the path of the library."""
    source, library = folder / "gomp_count.c", folder / "libgomp_count.so"
    source.write_text(COUNTER)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    return library


def count_regions(
    samples: int,
    candidates: int,
    vocab: int,
    batches: Sequence[int],
    prompt_len: int,
    steps: int,
    package: Path | None,
    library: Path,
) -> dict[int, tuple[list[int], list[int]]]:
    """Regions opened by ``plan`` and by ``observe`` in each timed step, per batch size."""
    lib = ctypes.CDLL(str(library))
    lib.gomp_parallel_count.restype = ctypes.c_long
    pkg = import_package(package)
    keys = random_keys(samples, torch.Generator().manual_seed(0))
    digests, timed, first = stand_in_digests(keys), {}, 0
    for b in batches:  # a range of keys per batch size, with the rows' real digests in the store
        count = (steps + WARMUP) * b
        timed[b] = text_batches(pkg, keys[first : first + count], b, candidates, prompt_len, vocab, 0)
        digests[first : first + count] = torch.cat([rows["digest"] for rows in timed[b]])
        first += count
    bank = fill(pkg["ScoreBank"](vocab_size=vocab), keys, digests, candidates)
    torch.set_num_threads(2)
    out = {}
    for b, rows in timed.items():
        policy = pkg["ReGATEPolicy"](keep_ratio=0.5, warmup_steps=0, cycle_steps=1, full_steps=0)
        policy.setup(pkg["tiny_llava"](vocab_size=vocab, hidden_size=16, num_layers=1))
        policy.start(torch.device("cpu"))
        policy.bank = bank
        plans, observes = [], []
        for i, rows_i in enumerate(rows):
            batch = {k: v for k, v in rows_i.items() if k != "digest"}
            loss = torch.rand(batch["input_ids"].shape)
            start = lib.gomp_parallel_count()
            plan = policy.plan(batch, step=i)
            middle = lib.gomp_parallel_count()
            policy.observe(plan, loss if plan.keep_mask is None else loss.masked_fill(~plan.keep_mask, torch.nan))
            if i >= WARMUP:
                plans.append(middle - start)
                observes.append(lib.gomp_parallel_count() - middle)
        out[b] = (plans, observes)
    return out


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples in the store")
    parser.add_argument("--candidates", type=int, default=100, help="candidate answer tokens per sample")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (default: Qwen2's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 8], help="samples per training batch")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens before the answer")
    parser.add_argument("--steps", type=int, default=5, help="counted steps per batch size")
    parser.add_argument(
        "--package", default=None, help="measure another version: a folder with a checkout, or a git revision"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[int, tuple[list[int], list[int]]] | None:
    """Compile the counter and run again under it (first call); count and print (second call)."""
    args = parser().parse_args(argv)
    library = os.environ.get(ENV)
    if library is None:
        with tempfile.TemporaryDirectory(prefix="regate-regions-") as tmp:
            path = counter_library(Path(tmp))
            env = {**os.environ, ENV: str(path), "LD_PRELOAD": str(path)}
            command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
            subprocess.run(command, env=env, check=True)
        return None
    with tempfile.TemporaryDirectory(prefix="regate-regions-") as tmp:
        package = checkout(args.package, Path(tmp))
        counts = count_regions(
            args.samples, args.candidates, args.vocab, args.batch, args.prompt_len, args.steps, package, Path(library)
        )
    print(
        f"OpenMP parallel regions per training step, 2 intra-op threads, store of {args.samples:,} samples x "
        f"{args.candidates} candidates, package {args.package or ROOT}"
    )
    print("| batch | plan (per step) | observe (per step) |\n|---:|---|---|")
    for b, (plans, observes) in counts.items():
        print(f"| {b} | {plans} | {observes} |")
    return counts


if __name__ == "__main__":
    main()
