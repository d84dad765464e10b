"""Step time, throughput and memory of ReGATE against the full-token baseline, in one process.

A *step* is ``forward_active`` + backward + an AdamW step on the student. The baseline step runs every
token. The ReGATE step also runs the policy that ``ReGATECallback``'s hooks call around it
(``ReGATEPolicy.plan`` scores the batch and writes the keep mask, ``ReGATEPolicy.observe`` folds the token
losses into the EMA store), with every step sparse (no warm-up, no full steps). The callback adds to
that one all-reduce of five counts per step and Lightning's logging on logging steps, which the
benchmark does not time (results up to November 2026 timed the callback's hooks, logging every step).
Reference losses are computed in an untimed first pair per shape and cached, as in training after
the first epoch.

Baseline and ReGATE steps alternate (``B R B R ...``, the order flipped every other pair) so that
machine noise hits both alike; the measured ratio is the median of the per-pair ratios. The ideal
ratio is active tokens / total tokens of the same batches: what the step time would be if it were
proportional to the tokens the decoder processes.

Memory: on CPU, "activation memory" = peak bytes of tensors saved for backward (measured with
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded); on CUDA also
``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer states and the teacher included).

Examples:
    python benchmarks/throughput.py --smoke
    python benchmarks/throughput.py --out docs/results/throughput_cpu
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --attn sdpa --hidden-size 1536 ...
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `regate_lightning` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    FAMILIES,
    ActivationMeter,
    ModelSpec,
    Shape,
    build_model,
    count_parameters,
    environment,
    fixed_shape,
    fmt_float,
    fmt_str,
    format_table,
    make_batch,
    median,
    now,
    peak_allocated,
    reset_peak,
    shape_for_share,
    to_device,
    write_json,
)

RATIO_TOLERANCE = 0.10
"""Target: measured step-time ratio within 10 % of the ideal ratio ..."""
RATIO_MIN_SHARE = 0.25
"""... at answer shares of at least 25 % ..."""
SHARE_SLACK = 0.01
"""... give or take one percentage point (the sweep rounds the video to whole frames)."""
OVERHEAD_LIMIT = 0.03
"""Target: the policy's own time (plan + observe) below 3 % of a baseline step."""

SMOKE_SPEC = ModelSpec(
    family="qwen2_vl",
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    vision_depth=1,
    vision_width=32,
    vision_heads=4,
    patch_size=8,
)
CPU_SPEC = ModelSpec()
"""Default CPU model: Qwen2-VL with a 512-wide, 4-layer decoder (8/2 heads, MLP 1536, vocabulary 4096,
16.6 M parameters) and a 2-layer, 64-wide vision tower: a step of one to two seconds at 1 x 1024 tokens
on the 2-core development machines."""


# --------------------------------------------------------------------------------------------------
# One step.


@dataclass
class StepRecord:
    """What one timed step measured.

    Attributes:
        seconds: wall time of the whole step (the policy's calls included for ReGATE).
        hook_seconds: time inside the policy's ``plan`` and ``observe`` (0 for the baseline).
        hook_end_seconds: the part of ``hook_seconds`` spent in ``observe`` (the EMA update).
        num_active: positions the decoder processed.
        num_tokens: non-padding positions of the batch.
        num_targets: supervised targets whose loss was computed.
        peak_bytes: ``torch.cuda.max_memory_allocated`` during the step (None on CPU).
        cpu_seconds: CPU time of this process during the step (``time.process_time``). On a CPU run
            with one thread it is the compute time without the time other processes took the core.
    """

    seconds: float
    hook_seconds: float
    hook_end_seconds: float
    num_active: int
    num_tokens: int
    num_targets: int
    peak_bytes: int | None
    cpu_seconds: float


class Bench:
    """A student, its optimizer and a ReGATE policy (teacher ``"student"``, every step sparse).

    Args:
        model: the HF student (already on ``device`` in its dtype).
        device: the model's device.
        lr: AdamW learning rate.
        log: where progress lines go.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, lr: float = 1e-5, log: Callable = print) -> None:
        from regate_lightning.policy import ReGATEPolicy

        self.device = device
        self.model = model
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.policy = ReGATEPolicy(keep_ratio=0.5, warmup_steps=0, cycle_steps=1, full_steps=0)
        self.policy.setup(model)
        self.policy.start(device, student_dtype=self.dtype)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.meter = ActivationMeter(model)
        self.log = log

    def _train(self, batch: dict[str, Any]) -> Any:
        from regate_lightning.elision import forward_active
        from regate_lightning.keys import KEEP_MASK

        out = forward_active(self.model, batch, batch.get(KEEP_MASK))
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _plan(self, batch: dict[str, Any], keep_ratio: float) -> Any:
        """The policy's plan at ``keep_ratio``, its keep mask written into ``batch``."""
        self.policy.keep_ratio = keep_ratio  # one policy (one store) for every ratio of the sweep
        plan = self.policy.plan(batch, step=0)
        plan.apply(batch)
        return plan

    def step(self, batch: dict[str, Any], keep_ratio: float | None) -> StepRecord:
        """One training step: the baseline when ``keep_ratio`` is None, else ReGATE at ``keep_ratio``.

        Args:
            batch: the batch on the device (not modified; a shallow copy receives the keep mask).
            keep_ratio: ReGATE's ``p``, or None for the baseline.
        """

        batch = dict(batch)
        reset_peak(self.device)
        cpu_start = time.process_time()
        if keep_ratio is None:
            start = now(self.device)
            out = self._train(batch)
            end = now(self.device)
            hooks = hooks_end = 0.0
        else:
            start = now(self.device)
            plan = self._plan(batch, keep_ratio)
            hooks_start = now(self.device) - start
            out = self._train(batch)
            before_end = now(self.device)
            self.policy.observe(plan, out.token_loss)
            end = now(self.device)
            hooks_end = end - before_end
            hooks = hooks_start + hooks_end
        cpu = time.process_time() - cpu_start
        peak = peak_allocated(self.device)
        return StepRecord(end - start, hooks, hooks_end, out.num_active, out.num_tokens, out.num_targets, peak, cpu)

    def run_shape(
        self,
        shape: Shape,
        keep_ratios: Sequence[float],
        repeats: int,
        warmup: int = 0,
        seed: int = 0,
        frame_grid: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Alternate baseline and ReGATE steps on one batch shape.

        Each round runs, for every keep ratio, one baseline step and one ReGATE step (order flipped
        every other pair). First, always, one untimed baseline step and one untimed ReGATE step prime
        the allocator and compute and cache the reference losses of the batch's samples; then
        ``warmup`` untimed rounds. After the timed rounds, one untimed forward pass per variant
        measures activation memory.

        Returns:
            The shape, the baseline's and each keep ratio's figures (see :func:`summarise`).
        """
        batch = to_device(make_batch(self.model, shape, seed=seed, frame_grid=frame_grid), self.device, self.dtype)
        base: list[StepRecord] = []
        regate: dict[float, list[StepRecord]] = {p: [] for p in keep_ratios}
        pairs: dict[float, list[float]] = {p: [] for p in keep_ratios}
        cpu_pairs: dict[float, list[float]] = {p: [] for p in keep_ratios}
        started = time.perf_counter()
        self.step(batch, None)
        self.step(batch, keep_ratios[0])  # the teacher scores the samples here; cached afterwards
        for round_ in range(warmup + repeats):
            for i, p in enumerate(keep_ratios):
                if (round_ + i) % 2 == 0:
                    b, r = self.step(batch, None), self.step(batch, p)
                else:
                    r, b = self.step(batch, p), self.step(batch, None)
                if round_ >= warmup:
                    base.append(b)
                    regate[p].append(r)
                    pairs[p].append(r.seconds / b.seconds)
                    cpu_pairs[p].append(r.cpu_seconds / max(b.cpu_seconds, 1e-9))
            if round_ == warmup - 1:
                self.log(f"    warm-up done in {time.perf_counter() - started:.1f} s")
        memory = {None: self._activation_bytes(batch, None)}
        for p in keep_ratios:
            memory[p] = self._activation_bytes(batch, p)
        steps = len(base) + sum(map(len, regate.values()))
        self.log(f"    {steps} timed steps in {time.perf_counter() - started:.1f} s")
        return summarise(shape, base, regate, pairs, memory, cpu_pairs)

    def _activation_bytes(self, batch: dict[str, Any], keep_ratio: float | None) -> int:
        """Bytes saved for backward by one forward pass (no backward: the graph is dropped)."""
        from regate_lightning.elision import forward_active
        from regate_lightning.keys import KEEP_MASK

        batch = dict(batch)
        plan = None if keep_ratio is None else self._plan(batch, keep_ratio)
        with self.meter.measure():
            out = forward_active(self.model, batch, batch.get(KEEP_MASK))
        if plan is not None:
            self.policy.observe(plan, out.token_loss)
        del out
        return self.meter.bytes


def _stats(records: Sequence[StepRecord]) -> dict[str, Any]:
    seconds = median([r.seconds for r in records])
    active = sum(r.num_active for r in records) / len(records)
    tokens = sum(r.num_tokens for r in records) / len(records)
    peaks = [r.peak_bytes for r in records if r.peak_bytes is not None]
    return {
        "median_s": seconds,
        "steps_s": [r.seconds for r in records],
        "cpu_median_s": median([r.cpu_seconds for r in records]),
        "active_tokens": active,
        "tokens": tokens,
        "targets": sum(r.num_targets for r in records) / len(records),
        "active_fraction": active / tokens,
        "processed_tokens_per_s": active / seconds,
        "original_tokens_per_s": tokens / seconds,
        "peak_bytes": max(peaks) if peaks else None,
    }


def summarise(
    shape: Shape,
    base: Sequence[StepRecord],
    regate: dict[float, list[StepRecord]],
    pairs: dict[float, list[float]],
    memory: dict[float | None, int],
    cpu_pairs: dict[float, list[float]] | None = None,
) -> dict[str, Any]:
    """Figures of one shape: the baseline's and, per keep ratio, ReGATE's with its ratios and overhead.

    ``ratio`` is the median of the wall-clock ratios of alternated pairs; ``cpu_ratio`` the same with the
    process's CPU time (meaningful on a CPU run, where other processes on a shared machine add wall time).
    """
    baseline = _stats(base)
    baseline["activation_bytes"] = memory[None]
    out: dict[str, Any] = {
        "shape": {**asdict(shape), "length": shape.length, "answer_share": shape.answer_share},
        "baseline": baseline,
        "regate": [],
    }
    for p, records in regate.items():
        stats = _stats(records)
        hooks = median([r.hook_seconds for r in records])
        stats.update(
            keep_ratio=p,
            ratio=median(pairs[p]),
            pair_ratios=pairs[p],
            ratio_of_medians=stats["median_s"] / baseline["median_s"],
            ideal_ratio=stats["active_tokens"] / baseline["tokens"],
            callback_s=hooks,
            callback_end_s=median([r.hook_end_seconds for r in records]),
            callback_fraction=hooks / baseline["median_s"],
            activation_bytes=memory[p],
            cpu_ratio=median(cpu_pairs[p]) if cpu_pairs else None,
        )
        stats["ratio_vs_ideal"] = stats["ratio"] / stats["ideal_ratio"] - 1.0
        cpu_ratio = stats["cpu_ratio"]
        stats["cpu_ratio_vs_ideal"] = None if cpu_ratio is None else cpu_ratio / stats["ideal_ratio"] - 1.0
        out["regate"].append(stats)
    return out


# --------------------------------------------------------------------------------------------------
# Targets and report.


def evaluate_targets(shapes: Sequence[dict[str, Any]], cpu_time: bool = False) -> list[dict[str, Any]]:
    """Check the three targets on every shape.

    1. ``ratio``: measured (wall-clock) step-time ratio within 10 % of the ideal, where the answer share
       is at least 25 % (within one percentage point: a swept share is rounded to whole frames).
       With ``cpu_time`` the CPU-time ratio is shown beside it.
    2. ``overhead``: the policy's calls take < 3 % of a baseline step.
    3. ``memory``: activation memory falls with the active fraction (never rises when fewer tokens
       are active, and the smallest keep ratio saves memory against the baseline).
    """
    results = []
    for result in shapes:
        share = result["shape"]["answer_share"]
        where = f"answer {share:.0%}"
        for r in result["regate"]:
            p = r["keep_ratio"]
            if share >= RATIO_MIN_SHARE - SHARE_SLACK:
                measured = f"{r['ratio']:.3f} vs {r['ideal_ratio']:.3f} ({r['ratio_vs_ideal']:+.1%})"
                if cpu_time and r.get("cpu_ratio") is not None:
                    measured += f"; CPU time {r['cpu_ratio']:.3f} ({r['cpu_ratio_vs_ideal']:+.1%})"
                results.append(
                    {
                        "target": "ratio within 10% of ideal",
                        "where": f"{where}, p={p:g}",
                        "measured": measured,
                        "passed": abs(r["ratio_vs_ideal"]) <= RATIO_TOLERANCE,
                    }
                )
            results.append(
                {
                    "target": "callback overhead < 3%",
                    "where": f"{where}, p={p:g}",
                    "measured": f"{r['callback_fraction']:.2%} ({r['callback_s'] * 1e3:.1f} ms)",
                    "passed": r["callback_fraction"] < OVERHEAD_LIMIT,
                }
            )
        points = sorted(
            [(r["active_fraction"], r["activation_bytes"]) for r in result["regate"]]
            + [(1.0, result["baseline"]["activation_bytes"])]
        )
        monotone = all(b0 <= b1 for (_, b0), (_, b1) in itertools.pairwise(points))
        saves = points[0][1] < result["baseline"]["activation_bytes"] if points[0][0] < 1.0 else True
        results.append(
            {
                "target": "activation memory falls with active fraction",
                "where": where,
                "measured": ", ".join(f"{a:.2f}:{b / 2**20:.0f}" for a, b in points) + " (active frac:MiB)",
                "passed": monotone and saves,
            }
        )
    return results


def table_rows(shapes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (shape, variant), for :func:`format_report`."""
    rows = []
    for result in shapes:
        s = result["shape"]
        base = result["baseline"]
        common = {
            "label": result.get("label"),
            "share": s["answer_share"],
            "length": f"{s['batch_size']}x{s['length']}",
        }
        rows.append(
            {
                **common,
                "variant": "baseline",
                "ms": base["median_s"] * 1e3,
                "ratio": 1.0,
                "ideal": 1.0,
                "tps": base["processed_tokens_per_s"],
                "otps": base["original_tokens_per_s"],
                "act": base["activation_bytes"] / 2**20,
                "peak": None if base["peak_bytes"] is None else base["peak_bytes"] / 2**30,
            }
        )
        for r in result["regate"]:
            rows.append(
                {
                    **common,
                    "variant": f"regate p={r['keep_ratio']:g}",
                    "ms": r["median_s"] * 1e3,
                    "ratio": r["ratio"],
                    "ideal": r["ideal_ratio"],
                    "gap": r["ratio_vs_ideal"] * 100,
                    "cpu_ratio": r.get("cpu_ratio"),
                    "tps": r["processed_tokens_per_s"],
                    "otps": r["original_tokens_per_s"],
                    "act": r["activation_bytes"] / 2**20,
                    "peak": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30,
                    "cb_ms": r["callback_s"] * 1e3,
                    "cb_pct": r["callback_fraction"] * 100,
                }
            )
    return rows


COLUMNS = [
    ("share", "answer share", lambda v: f"{v:.0%}"),
    ("length", "B x L", fmt_str),
    ("variant", "variant", fmt_str),
    ("ms", "step ms (median)", fmt_float(1)),
    ("ratio", "ratio (measured)", fmt_float(3)),
    ("ideal", "ratio (ideal)", fmt_float(3)),
    ("gap", "measured/ideal-1 %", fmt_float(1)),
    ("cpu_ratio", "ratio (CPU time)", fmt_float(3)),
    ("tps", "processed tok/s", fmt_float(0)),
    ("otps", "original tok/s", fmt_float(0)),
    ("act", "activation MiB", fmt_float(0)),
    ("peak", "peak alloc GiB", fmt_float(2)),
    ("cb_ms", "callback ms", fmt_float(2)),
    ("cb_pct", "callback % of step", fmt_float(2)),
]
TARGET_COLUMNS = [
    ("target", "target", fmt_str),
    ("where", "where", fmt_str),
    ("measured", "measured", fmt_str),
    ("passed", "result", lambda v: "pass" if v else "MISS"),
]


def format_report(result: dict[str, Any]) -> str:
    """The results table and the targets table, as text (Markdown-compatible).

    Shapes that carry a ``label`` (the GPU script's parts) get a leading ``run`` column.
    """
    shapes = result["shapes"]
    on_cpu = str((result.get("settings") or {}).get("device", "cpu")).startswith("cpu")
    columns = [c for c in COLUMNS if on_cpu or c[0] != "cpu_ratio"]
    if any("label" in s for s in shapes):
        columns = [("label", "run", fmt_str), *columns]
    env = result.get("environment") or {}
    model = result.get("model") or {}
    settings = result.get("settings") or {}
    params = model.get("parameters") or {"total": float("nan"), "language_model": float("nan")}
    where = f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu_threads', '?')} CPU threads)"
    head = [
        "== ReGATE throughput: baseline vs ReGATE, alternated in one process ==",
        f"device {env.get('device', '?')}{where}, torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, lightning {env.get('lightning', '?')}, {env.get('date', '?')}, "
        f"load average {env.get('load_average')} at start, {env.get('load_average_end', '-')} at end",
        f"model {model.get('family', '?')}: {params['total'] / 1e6:.1f} M parameters "
        f"({params['language_model'] / 1e6:.1f} M language model), dtype {settings.get('dtype', '?')}, "
        f"attention {settings.get('attn', '?')}; {settings.get('repeats', '?')} timed pairs per keep ratio",
        "ratio = ReGATE step / baseline step, wall clock (median of alternated pairs); ideal = active tokens / "
        "total tokens" + ("; CPU time = the same with this process's CPU time" if on_cpu else ""),
        "activation MiB = bytes saved for backward (saved_tensors_hooks, parameters excluded); "
        "peak alloc = torch.cuda.max_memory_allocated (CUDA only)",
        "",
        format_table(table_rows(shapes), columns),
        "",
        "Targets",
        format_table(result["targets"], TARGET_COLUMNS),
    ]
    passed = sum(t["passed"] for t in result["targets"])
    head.append(f"{passed}/{len(result['targets'])} target checks passed")
    return "\n".join(head)


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (the values themselves for fewer than two)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Step-time ratio against keep ratio, one line per answer share, with the ideal as dashed lines.

    Returns:
        The PNG's path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_share: dict[float, list[dict[str, Any]]] = {}
    for shape in result["shapes"]:  # shapes of the same answer share (GPU parts) share one line
        by_share.setdefault(round(shape["shape"]["answer_share"], 4), []).extend(shape["regate"])
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (share, regate) in enumerate(sorted(by_share.items())):
        colour = f"C{i}"
        rows = sorted(regate, key=lambda r: r["keep_ratio"])
        ps = [r["keep_ratio"] for r in rows]
        label = f"answer {share:.0%}"
        ratios = [r["ratio"] for r in rows]
        quartiles = [_quartiles(r.get("pair_ratios") or [r["ratio"]]) for r in rows]
        spread = [
            [m - q[0] for m, q in zip(ratios, quartiles, strict=True)],
            [q[1] - m for m, q in zip(ratios, quartiles, strict=True)],
        ]
        ax.errorbar(ps, ratios, yerr=spread, fmt="o-", color=colour, capsize=3, label=f"{label}: measured")
        ax.plot(ps, [r["ideal_ratio"] for r in rows], "--", color=colour, alpha=0.6, label=f"{label}: ideal")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("keep ratio p (fraction of candidate answer tokens kept)")
    ax.set_ylabel("step time ReGATE / baseline")
    env = result.get("environment") or {}
    threads = env.get("cpu_threads", "?")
    where = env.get("gpu") or f"CPU, {threads} thread{'' if threads == 1 else 's'}"
    ax.set_title(f"ReGATE step time vs keep ratio ({where}); bars: quartiles of the pairs", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Command line.


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _grid(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    h, w = _ints(text)
    return h, w


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 repeats: a few seconds, for CI")
    ap.add_argument("--out", type=Path, default=None, help="folder for throughput.json (and the PNG)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)")
    m = ap.add_argument_group("model (random init)")
    m.add_argument("--family", default=CPU_SPEC.family, choices=list(FAMILIES))
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "vision_depth",
        "vision_width",
        "vision_heads",
        "patch_size",
        "image_size",
    ):
        m.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {getattr(CPU_SPEC, name)}")
    s = ap.add_argument_group("sequence")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--seq-len", type=int, default=1024, help="tokens per row in the answer-share sweep")
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--answer-shares", type=_floats, default=[0.10, 0.25, 0.50, 0.75])
    s.add_argument(
        "--visual-tokens",
        type=int,
        default=None,
        help="fixed video length instead of the share sweep (with --answer-lens)",
    )
    s.add_argument("--answer-lens", type=_ints, default=[512], help="answer lengths with --visual-tokens")
    s.add_argument("--frame-grid", default=None, help="qwen2_vl frame size in patches, e.g. 24,32")
    r = ap.add_argument_group("measurement")
    r.add_argument("--keep-ratios", type=_floats, default=[0.25, 0.5, 0.75, 1.0])
    r.add_argument("--repeats", type=int, default=5, help="timed pairs per keep ratio and shape")
    r.add_argument(
        "--warmup", type=int, default=0, help="untimed rounds after one untimed pair that fills the reference cache"
    )
    r.add_argument("--lr", type=float, default=1e-5)
    r.add_argument("--seed", type=int, default=0)
    return ap


def settings_from_args(args: argparse.Namespace) -> tuple[ModelSpec, dict[str, Any]]:
    """The model spec and run settings the arguments describe (``--smoke`` shrinks both)."""
    base = SMOKE_SPEC if args.smoke else CPU_SPEC
    overrides = {k: getattr(args, k) for k in asdict(base) if k != "family" and getattr(args, k, None) is not None}
    spec = ModelSpec(**{**asdict(base), **overrides, "family": args.family})
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    settings = {
        "device": str(device),
        "dtype": dtype,
        "attn": args.attn,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "prompt_len": args.prompt_len,
        "answer_shares": args.answer_shares,
        "visual_tokens": args.visual_tokens,
        "answer_lens": args.answer_lens,
        "frame_grid": _grid(args.frame_grid),
        "keep_ratios": args.keep_ratios,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lr": args.lr,
        "seed": args.seed,
    }
    if args.smoke:
        settings.update(seq_len=min(args.seq_len, 160), prompt_len=min(args.prompt_len, 8), answer_shares=[0.25, 0.5])
        settings.update(keep_ratios=[0.5, 1.0], repeats=min(args.repeats, 2), warmup=min(args.warmup, 1))
        settings.update(answer_lens=[min(a, 48) for a in args.answer_lens], batch_size=min(args.batch_size, 2))
    return spec, settings


def shapes_for(model: torch.nn.Module, settings: dict[str, Any]) -> list[Shape]:
    """The shapes of the sweep: by answer share at a fixed length, or a fixed video with several answers."""
    if settings["visual_tokens"] is not None:
        return [
            fixed_shape(model, settings["batch_size"], settings["visual_tokens"], settings["prompt_len"], a)
            for a in settings["answer_lens"]
        ]
    return [
        shape_for_share(
            model, settings["seq_len"], share, settings["prompt_len"], settings["batch_size"], settings["frame_grid"]
        )
        for share in settings["answer_shares"]
    ]


def run(spec: ModelSpec, settings: dict[str, Any], log: Callable = print) -> dict[str, Any]:
    """Build the model, run every shape, evaluate the targets.

    Returns:
        ``environment``, ``model``, ``settings``, ``shapes`` (per-shape figures) and ``targets``.
    """
    device = torch.device(settings["device"])
    dtype = getattr(torch, settings["dtype"])
    started = time.perf_counter()
    env = environment(device)
    model = build_model(spec, device=device, dtype=dtype, attn=settings["attn"], seed=settings["seed"])
    params = count_parameters(model)
    log(f"built {spec.family} ({params['total'] / 1e6:.1f} M parameters) in {time.perf_counter() - started:.1f} s")
    bench = Bench(model, device, lr=settings["lr"], log=log)
    shapes = []
    for i, shape in enumerate(shapes_for(model, settings)):
        log(
            f"  shape {i}: B={shape.batch_size} L={shape.length} (visual {shape.visual_tokens}, prompt "
            f"{shape.prompt_len}, answer {shape.answer_len} = {shape.answer_share:.0%})"
        )
        shapes.append(
            bench.run_shape(
                shape,
                settings["keep_ratios"],
                settings["repeats"],
                settings["warmup"],
                seed=settings["seed"] + i + 1,
                frame_grid=settings["frame_grid"],
            )
        )
    env["load_average_end"] = environment(device)["load_average"]
    return {
        "environment": env,
        "model": {"family": spec.family, "spec": asdict(spec), "parameters": params},
        "settings": settings,
        "shapes": shapes,
        "targets": evaluate_targets(shapes, cpu_time=device.type == "cpu"),
        "wall_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; write JSON (and a PNG) with ``--out``."""
    args = parser().parse_args(argv)
    threads = args.threads or (1 if args.smoke else None)  # one thread: a smoke run is not slowed by busy CI cores
    if threads:
        torch.set_num_threads(threads)
    spec, settings = settings_from_args(args)
    result = run(spec, settings, log=lambda msg: print(msg, flush=True))
    result["command"] = " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(format_report(result), flush=True)
    if args.out is not None:
        path = write_json(args.out / "throughput.json", result)
        print(f"wrote {path}")
        png = plot(result, args.out / "step_time_vs_keep_ratio.png")
        print(f"wrote {png}" if png else "matplotlib not installed: no plot (pip install 'regate-lightning[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
