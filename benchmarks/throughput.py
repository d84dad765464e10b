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
import contextlib
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
    QWEN3_5_CPU_SPEC,
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
FAMILY_CPU_SPECS = {QWEN3_5_CPU_SPEC.family: QWEN3_5_CPU_SPEC}
"""The default CPU model of a ``--family`` other than ``CPU_SPEC``'s (its sizes, overridable one by one)."""


# --------------------------------------------------------------------------------------------------
# One step.


@dataclass(frozen=True)
class Variant:
    """An elision variant of the step: ReGATE at ``regate`` (its ``p``), visual-token elision at ``visual``
    (its keep ratio), or both (visual first, as in ``recipes/demo_visual.yaml``).

    Example:
        >>> Variant(0.5).label, Variant(0.5, 0.25).short, Variant(visual=0.5).label
        ('regate p=0.5', 'p=0.5+v=0.25', 'visual v=0.5')
    """

    regate: float | None = None
    visual: float | None = None

    @property
    def label(self) -> str:
        """The table's name of the variant."""
        parts = [f"regate p={self.regate:g}"] if self.regate is not None else []
        return " + ".join(parts + ([f"visual v={self.visual:g}"] if self.visual is not None else []))

    @property
    def short(self) -> str:
        """A compact name (the targets' ``where``)."""
        parts = [f"p={self.regate:g}"] if self.regate is not None else []
        return "+".join(parts + ([f"v={self.visual:g}"] if self.visual is not None else []))


def as_variant(variant: Variant | float) -> Variant:
    """A :class:`Variant` from itself or from a ReGATE keep ratio."""
    return variant if isinstance(variant, Variant) else Variant(regate=float(variant))


@dataclass
class StepRecord:
    """What one timed step measured.

    Attributes:
        seconds: wall time of the whole step (the policies' calls included).
        hook_seconds: time inside the policies' ``plan`` and ``observe`` (0 for the baseline).
        hook_end_seconds: the part of ``hook_seconds`` spent in ``observe`` (the EMA update).
        num_active: positions the decoder processed.
        num_tokens: non-padding positions of the batch.
        num_targets: supervised targets whose loss was computed.
        peak_bytes: ``torch.cuda.max_memory_allocated`` during the step (None on CPU).
        cpu_seconds: CPU time of this process during the step (``time.process_time``). On a CPU run
            with one thread it is the compute time without the time other processes took the core.
        decoder_length: the sequence length the decoder ran on (after the gather).
        skipped_steps: media steps the vision tower did not encode (every token of them elided).
        profile: seconds per segment (:data:`benchmarks.step_profile.SEGMENTS`) of a profiled step, else None.
    """

    seconds: float
    hook_seconds: float
    hook_end_seconds: float
    num_active: int
    num_tokens: int
    num_targets: int
    peak_bytes: int | None
    cpu_seconds: float
    decoder_length: int = 0
    profile: dict[str, float] | None = None
    skipped_steps: int = 0


class Bench:
    """A student, its optimizer, a ReGATE policy (teacher ``"student"``) and a visual-token elision policy,
    every step sparse for both.

    Args:
        model: the HF student (already on ``device`` in its dtype).
        device: the model's device.
        lr: AdamW learning rate.
        log: where progress lines go.
        visual_selection: the visual policy's selection (``"temporal"``, ``"uniform"``, ``"random"``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        lr: float = 1e-5,
        log: Callable = print,
        visual_selection: str = "temporal",
    ) -> None:
        from benchmarks.step_profile import StepProfiler
        from regate_lightning.policy import ReGATEPolicy
        from regate_lightning.visual import VisualElisionPolicy

        self.device = device
        self.model = model
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.policy = ReGATEPolicy(keep_ratio=0.5, warmup_steps=0, cycle_steps=1, full_steps=0)
        self.policy.setup(model)
        self.policy.start(device, student_dtype=self.dtype)
        self.visual = VisualElisionPolicy(
            keep_ratio=0.5, selection=visual_selection, warmup_steps=0, cycle_steps=1, full_steps=0
        )
        self.visual.setup(model)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.meter = ActivationMeter(model)
        self.profiler = StepProfiler(model, device)
        self.log = log

    def _plan(self, batch: dict[str, Any], variant: Variant) -> Any:
        """The policies' plans for ``variant``, their keep masks written into ``batch``; ReGATE's plan or None."""
        if variant.visual is not None:
            self.visual.keep_ratio = variant.visual
            self.visual.plan(batch, step=0).apply(batch)
        if variant.regate is None:
            return None
        self.policy.keep_ratio = variant.regate  # one policy (one store) for every ratio of the sweep
        plan = self.policy.plan(batch, step=0)
        plan.apply(batch)
        return plan

    def step(self, batch: dict[str, Any], variant: Variant | float | None, profile: bool = False) -> StepRecord:
        """One training step: the baseline when ``variant`` is None, else the variant's elision.

        Args:
            batch: the batch on the device (not modified; a shallow copy receives the keep mask).
            variant: a :class:`Variant`, a ReGATE ``p``, or None for the baseline.
            profile: time the step's segments (:class:`~benchmarks.step_profile.StepProfiler`; on CUDA each
                boundary synchronises, so a profiled step is not a timed one).
        """
        from regate_lightning.elision import forward_active
        from regate_lightning.keys import KEEP_MASK

        variant = None if variant is None else as_variant(variant)
        batch = dict(batch)
        clock = self.profiler
        mark = clock.mark if profile else (lambda name: None)
        reset_peak(self.device)
        cpu_start = time.process_time()
        with clock.step() if profile else contextlib.nullcontext():
            start = now(self.device)
            mark("start")
            plan = None if variant is None else self._plan(batch, variant)
            planned = now(self.device) if variant is not None else start
            mark("planned")
            out = forward_active(self.model, batch, batch.get(KEEP_MASK))
            mark("forward_end")
            mark("backward_start")
            out.loss.backward()
            mark("backward_end")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            trained = now(self.device)
            mark("optimized")
            if plan is not None:
                self.policy.observe(plan, out.token_loss)
            end = now(self.device) if plan is not None else trained
            mark("end")
        cpu = time.process_time() - cpu_start
        peak = peak_allocated(self.device)
        hooks_end = end - trained
        return StepRecord(
            end - start,
            planned - start + hooks_end,
            hooks_end,
            out.num_active,
            out.num_tokens,
            out.num_targets,
            peak,
            cpu,
            out.decoder_length,
            clock.segments() if profile else None,
            out.skipped_steps,
        )

    def run_shape(
        self,
        shape: Shape,
        variants: Sequence[Variant | float],
        repeats: int,
        warmup: int = 0,
        seed: int = 0,
        frame_grid: tuple[int, int] | None = None,
        profile_repeats: int = 0,
    ) -> dict[str, Any]:
        """Alternate baseline and elision steps on one batch shape.

        Each round runs, for every variant, one baseline step and one variant step (order flipped every
        other pair). First, always, one untimed baseline step and one untimed step of each variant prime
        the allocator and compute and cache the reference losses of the batch's samples; then ``warmup``
        untimed rounds. After the timed rounds, ``profile_repeats`` profiled steps of the baseline and of
        each variant (their median segments go with the figures, with the cost model's prediction), and
        one untimed forward pass per variant measures activation memory.

        Returns:
            The shape, the baseline's and each variant's figures (see :func:`summarise`).
        """
        variants = [as_variant(v) for v in variants]
        batch = to_device(make_batch(self.model, shape, seed=seed, frame_grid=frame_grid), self.device, self.dtype)
        base: list[StepRecord] = []
        records: dict[Variant, list[StepRecord]] = {v: [] for v in variants}
        pairs: dict[Variant, list[float]] = {v: [] for v in variants}
        cpu_pairs: dict[Variant, list[float]] = {v: [] for v in variants}
        started = time.perf_counter()
        self.step(batch, None)
        for v in variants:
            self.step(batch, v)  # the teacher scores the samples in the first ReGATE step; cached afterwards
        for round_ in range(warmup + repeats):
            for i, v in enumerate(variants):
                if (round_ + i) % 2 == 0:
                    b, r = self.step(batch, None), self.step(batch, v)
                else:
                    r, b = self.step(batch, v), self.step(batch, None)
                if round_ >= warmup:
                    base.append(b)
                    records[v].append(r)
                    pairs[v].append(r.seconds / b.seconds)
                    cpu_pairs[v].append(r.cpu_seconds / max(b.cpu_seconds, 1e-9))
            if round_ == warmup - 1:
                self.log(f"    warm-up done in {time.perf_counter() - started:.1f} s")
        profiles: dict[Variant | None, list[StepRecord]] = {}
        for _ in range(profile_repeats):
            for v in [None, *variants]:
                profiles.setdefault(v, []).append(self.step(batch, v, profile=True))
        memory: dict[Variant | None, int] = {None: self._activation_bytes(batch, None)}
        for v in variants:
            memory[v] = self._activation_bytes(batch, v)
        steps = len(base) + sum(map(len, records.values()))
        self.log(f"    {steps} timed steps in {time.perf_counter() - started:.1f} s")
        result = summarise(shape, base, records, pairs, memory, cpu_pairs, profiles)
        result["media_steps"] = media_step_count(self.model, batch)
        if profiles:
            add_cost_model(self.model, result, shape.batch_size)
        return result

    def _activation_bytes(self, batch: dict[str, Any], variant: Variant | None) -> int:
        """Bytes saved for backward by one forward pass (no backward: the graph is dropped)."""
        from regate_lightning.elision import forward_active
        from regate_lightning.keys import KEEP_MASK

        batch = dict(batch)
        plan = None if variant is None else self._plan(batch, variant)
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
        "decoder_length": median([r.decoder_length for r in records]),
        "skipped_steps": median([r.skipped_steps for r in records]),
        "active_fraction": active / tokens,
        "processed_tokens_per_s": active / seconds,
        "original_tokens_per_s": tokens / seconds,
        "peak_bytes": max(peaks) if peaks else None,
    }


def summarise(
    shape: Shape,
    base: Sequence[StepRecord],
    variants: dict[Variant, list[StepRecord]],
    pairs: dict[Variant, list[float]],
    memory: dict[Variant | None, int],
    cpu_pairs: dict[Variant, list[float]] | None = None,
    profiles: dict[Variant | None, list[StepRecord]] | None = None,
) -> dict[str, Any]:
    """Figures of one shape: the baseline's and, per variant, its ratios and the policies' overhead.

    ``ratio`` is the median of the wall-clock ratios of alternated pairs; ``cpu_ratio`` the same with the
    process's CPU time (meaningful on a CPU run, where other processes on a shared machine add wall time).
    Each entry of ``"regate"`` (the name predates visual-token elision) is one variant: ``keep_ratio`` is
    its ReGATE ``p`` (None without ReGATE), ``visual_keep`` its visual keep ratio (None without).
    With ``profiles``, the baseline and each variant carry ``profile`` (median segment seconds),
    ``decoder_length`` and ``profiled_steps``.
    """
    from benchmarks.step_profile import median_segments

    def profiled(stats: dict[str, Any], key: Variant | None) -> None:
        records = (profiles or {}).get(key)
        if records:
            stats["profile"] = median_segments([r.profile for r in records if r.profile is not None])
            stats["profiled_steps"] = len(records)

    baseline = _stats(base)
    baseline["activation_bytes"] = memory[None]
    profiled(baseline, None)
    out: dict[str, Any] = {
        "shape": {**asdict(shape), "length": shape.length, "answer_share": shape.answer_share},
        "baseline": baseline,
        "regate": [],
    }
    for v, records in variants.items():
        stats = _stats(records)
        hooks = median([r.hook_seconds for r in records])
        stats.update(
            variant=v.label,
            variant_short=v.short,
            keep_ratio=v.regate,
            visual_keep=v.visual,
            ratio=median(pairs[v]),
            pair_ratios=pairs[v],
            ratio_of_medians=stats["median_s"] / baseline["median_s"],
            ideal_ratio=stats["active_tokens"] / baseline["tokens"],
            callback_s=hooks,
            callback_end_s=median([r.hook_end_seconds for r in records]),
            callback_fraction=hooks / baseline["median_s"],
            activation_bytes=memory[v],
            cpu_ratio=median(cpu_pairs[v]) if cpu_pairs else None,
        )
        stats["ratio_vs_ideal"] = stats["ratio"] / stats["ideal_ratio"] - 1.0
        cpu_ratio = stats["cpu_ratio"]
        stats["cpu_ratio_vs_ideal"] = None if cpu_ratio is None else cpu_ratio / stats["ideal_ratio"] - 1.0
        profiled(stats, v)
        out["regate"].append(stats)
    return out


_ENGINE: dict[str, Any] = {}


def set_step_skip(enabled: bool) -> None:
    """Turn the engine's skipping of fully elided media steps on (its default) or off, to measure what it saves.

    ``forward_active`` looks ``plan_step_skips`` up in its module at every call; off replaces it by a plan
    that skips nothing (the engine as it was before it skipped steps).
    """
    from regate_lightning import elision

    engine = _ENGINE.setdefault("plan_step_skips", elision.plan_step_skips)
    elision.plan_step_skips = engine if enabled else (lambda parts, batch, active: [])


def media_step_count(model: torch.nn.Module, batch: dict[str, Any]) -> int:
    """Time steps (frames, Qwen2-VL temporal patches, images) of all the batch's media."""
    from regate_lightning.families import MEDIA_KINDS, resolve

    family, config = resolve(model).family, model.config
    kinds = [k for k in MEDIA_KINDS if (family.image_key if k == "image" else family.video_key) is not None]
    return sum(m.steps for kind in kinds for m in family.media_steps(config, batch, kind))


def add_cost_model(model: torch.nn.Module, result: dict[str, Any], batch_size: int) -> None:
    """Add the baseline-profile cost model's prediction to every profiled variant of one shape.

    Each variant gets ``cost_model`` (:func:`benchmarks.step_profile.cost_model`) and ``model_gap``
    (measured ratio / predicted ratio - 1); the baseline gets its four terms as ``cost_terms``.
    """
    from benchmarks.step_profile import cost_model, grouped

    base = result["baseline"]
    if "profile" not in base:
        return
    base["cost_terms"] = grouped(base["profile"])
    for r in result["regate"]:
        if "profile" in r:
            r["cost_model"] = cost_model(model, base, r, batch_size, result.get("media_steps", 0))
            r["model_gap"] = r["ratio"] / r["cost_model"]["predicted_ratio"] - 1.0


# --------------------------------------------------------------------------------------------------
# Targets and report.


MODEL_TOLERANCE = 0.05
"""Target: the measured step-time ratio within 5 % of the profile's cost model."""
SPEEDUP_TARGET = 1.4
"""Target (issue 13, the Qwen2-VL-2B-shaped GPU step at a 39 % answer share): ReGATE p = 0.5 with visual keep
0.5 at least 1.4x faster than the baseline per step."""
SPEEDUP_VARIANT = "p=0.5+v=0.5"


def variant_short(r: dict[str, Any]) -> str:
    """A variant's compact name (results written before visual-token elision have only ``keep_ratio``)."""
    return r.get("variant_short") or f"p={r['keep_ratio']:g}"


def variant_label(r: dict[str, Any]) -> str:
    """A variant's name in tables."""
    return r.get("variant") or f"regate p={r['keep_ratio']:g}"


def evaluate_targets(shapes: Sequence[dict[str, Any]], cpu_time: bool = False) -> list[dict[str, Any]]:
    """Check the targets on every shape.

    1. ``ratio``: measured (wall-clock) step-time ratio within 10 % of the ideal, where the answer share
       is at least 25 % (within one percentage point: a swept share is rounded to whole frames).
       With ``cpu_time`` the CPU-time ratio is shown beside it.
    2. ``overhead``: the policies' calls take < 3 % of a baseline step.
    3. ``memory``: activation memory falls with the active fraction (never rises when fewer tokens
       are active, and the smallest keep ratio saves memory against the baseline).
    4. ``cost model`` (profiled variants): the measured ratio within 5 % of the cost model's.
    5. ``speed-up`` (a ``p=0.5+v=0.5`` variant): at least 1.4x faster than the baseline.
    """
    results = []
    for result in shapes:
        share = result["shape"]["answer_share"]
        where = f"answer {share:.0%}"
        for r in result["regate"]:
            here = f"{where}, {variant_short(r)}"
            if share >= RATIO_MIN_SHARE - SHARE_SLACK:
                measured = f"{r['ratio']:.3f} vs {r['ideal_ratio']:.3f} ({r['ratio_vs_ideal']:+.1%})"
                if cpu_time and r.get("cpu_ratio") is not None:
                    measured += f"; CPU time {r['cpu_ratio']:.3f} ({r['cpu_ratio_vs_ideal']:+.1%})"
                results.append(
                    {
                        "target": "ratio within 10% of ideal",
                        "where": here,
                        "measured": measured,
                        "passed": abs(r["ratio_vs_ideal"]) <= RATIO_TOLERANCE,
                    }
                )
            results.append(
                {
                    "target": "callback overhead < 3%",
                    "where": here,
                    "measured": f"{r['callback_fraction']:.2%} ({r['callback_s'] * 1e3:.1f} ms)",
                    "passed": r["callback_fraction"] < OVERHEAD_LIMIT,
                }
            )
            if "cost_model" in r:
                predicted = r["cost_model"]["predicted_ratio"]
                results.append(
                    {
                        "target": "ratio within 5% of cost model",
                        "where": here,
                        "measured": f"{r['ratio']:.3f} vs {predicted:.3f} ({r['model_gap']:+.1%})",
                        "passed": abs(r["model_gap"]) <= MODEL_TOLERANCE,
                    }
                )
            if variant_short(r) == SPEEDUP_VARIANT:
                results.append(
                    {
                        "target": f"speed-up >= {SPEEDUP_TARGET}x",
                        "where": here,
                        "measured": f"{1 / r['ratio']:.2f}x (ratio {r['ratio']:.3f})",
                        "passed": 1 / r["ratio"] >= SPEEDUP_TARGET,
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
            model = r.get("cost_model") or {}
            rows.append(
                {
                    **common,
                    "variant": variant_label(r),
                    "ms": r["median_s"] * 1e3,
                    "ratio": r["ratio"],
                    "ideal": r["ideal_ratio"],
                    "gap": r["ratio_vs_ideal"] * 100,
                    "model": model.get("predicted_ratio"),
                    "model_gap": None if "model_gap" not in r else r["model_gap"] * 100,
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


def profile_rows(shapes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per profiled (shape, variant): segment milliseconds and the cost model, for :func:`format_report`."""
    from benchmarks.step_profile import SEGMENTS, grouped

    rows = []
    for result in shapes:
        base = result["baseline"]
        if "profile" not in base:
            continue
        common = {"label": result.get("label"), "share": result["shape"]["answer_share"]}
        for name, r in [("baseline", base), *((variant_label(v), v) for v in result["regate"])]:
            if "profile" not in r:
                continue
            seg = r["profile"]
            row = {**common, "variant": name, "L": r.get("decoder_length")}
            row.update({k: seg[k] * 1e3 for k in SEGMENTS})
            row.update({f"g_{k}": v * 1e3 for k, v in grouped(seg).items()})
            row["total"] = seg["total"] * 1e3
            row["unprofiled"] = r["median_s"] * 1e3
            model = r.get("cost_model")
            if model is not None:
                row["predicted"] = model["predicted_s"] * 1e3
            rows.append(row)
    return rows


COLUMNS = [
    ("share", "answer share", lambda v: f"{v:.0%}"),
    ("length", "B x L", fmt_str),
    ("variant", "variant", fmt_str),
    ("ms", "step ms (median)", fmt_float(1)),
    ("ratio", "ratio (measured)", fmt_float(3)),
    ("ideal", "ratio (ideal)", fmt_float(3)),
    ("gap", "measured/ideal-1 %", fmt_float(1)),
    ("model", "ratio (cost model)", fmt_float(3)),
    ("model_gap", "measured/model-1 %", fmt_float(1)),
    ("cpu_ratio", "ratio (CPU time)", fmt_float(3)),
    ("tps", "processed tok/s", fmt_float(0)),
    ("otps", "original tok/s", fmt_float(0)),
    ("act", "activation MiB", fmt_float(0)),
    ("peak", "peak alloc GiB", fmt_float(2)),
    ("cb_ms", "callback ms", fmt_float(2)),
    ("cb_pct", "callback % of step", fmt_float(2)),
]
PROFILE_COLUMNS = [
    ("share", "answer share", lambda v: f"{v:.0%}"),
    ("variant", "variant", fmt_str),
    ("L", "decoder L", fmt_float(0)),
    ("plan", "plan", fmt_float(1)),
    ("vision_fwd", "vision fwd", fmt_float(1)),
    ("other_fwd", "other fwd", fmt_float(1)),
    ("gather_fwd", "gather fwd", fmt_float(1)),
    ("decoder_fwd", "decoder fwd", fmt_float(1)),
    ("head_fwd", "head fwd", fmt_float(1)),
    ("head_bwd", "head bwd", fmt_float(1)),
    ("decoder_bwd", "decoder bwd", fmt_float(1)),
    ("other_bwd", "other bwd", fmt_float(1)),
    ("vision_bwd", "vision bwd", fmt_float(1)),
    ("optimizer", "optimizer", fmt_float(1)),
    ("observe", "observe", fmt_float(1)),
    ("total", "profiled total", fmt_float(1)),
    ("unprofiled", "unprofiled median", fmt_float(1)),
    ("g_fixed", "fixed", fmt_float(1)),
    ("g_policy", "policy", fmt_float(1)),
    ("g_decoder", "decoder", fmt_float(1)),
    ("g_head", "head", fmt_float(1)),
    ("predicted", "cost model", fmt_float(1)),
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
    rows = table_rows(shapes)
    profiled = profile_rows(shapes)
    columns = [c for c in COLUMNS if (on_cpu or c[0] != "cpu_ratio") and (profiled or not c[0].startswith("model"))]
    profile_columns = PROFILE_COLUMNS
    if any("label" in s for s in shapes):
        columns = [("label", "run", fmt_str), *columns]
        profile_columns = [("label", "run", fmt_str), *profile_columns]
    env = result.get("environment") or {}
    model = result.get("model") or {}
    settings = result.get("settings") or {}
    params = model.get("parameters") or {"total": float("nan"), "language_model": float("nan")}
    where = f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu_threads', '?')} CPU threads)"
    head = [
        "== Elision throughput: baseline vs ReGATE / visual-token elision, alternated in one process ==",
        f"device {env.get('device', '?')}{where}, torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, lightning {env.get('lightning', '?')}, {env.get('date', '?')}, "
        f"load average {env.get('load_average')} at start, {env.get('load_average_end', '-')} at end",
        f"model {model.get('family', '?')}: {params['total'] / 1e6:.1f} M parameters "
        f"({params['language_model'] / 1e6:.1f} M language model), dtype {settings.get('dtype', '?')}, "
        f"attention {settings.get('attn', '?')}; {settings.get('repeats', '?')} timed pairs per variant; visual "
        f"selection {settings.get('visual_selection', 'temporal')}",
        "ratio = variant step / baseline step, wall clock (median of alternated pairs); ideal = active tokens / "
        "total tokens" + ("; CPU time = the same with this process's CPU time" if on_cpu else ""),
        "activation MiB = bytes saved for backward (saved_tensors_hooks, parameters excluded); "
        "peak alloc = torch.cuda.max_memory_allocated (CUDA only)",
        "",
        format_table(rows, columns),
    ]
    if profiled:
        head += [
            "",
            "Profile (ms per segment, median of the profiled steps; on CUDA every boundary synchronises) and the cost "
            "model: fixed = vision + other + optimizer (elision does not touch them), policy = plan + observe, "
            "decoder = gather + layers (scaled by FLOPs at the decoded length), head = LM head + loss (scaled by "
            "targets); 'cost model' = the baseline's fixed + the variant's policy + the scaled decoder and head",
            format_table(profiled, profile_columns),
        ]
    head += [
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
        regate_only = [r for r in shape["regate"] if r.get("keep_ratio") is not None and r.get("visual_keep") is None]
        if regate_only:
            by_share.setdefault(round(shape["shape"]["answer_share"], 4), []).extend(regate_only)
    if not by_share:
        return None
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


def _pairs(text: str) -> list[tuple[float, float]]:
    """``"0.5:0.5,0.25:0.5"`` -> ``[(0.5, 0.5), (0.25, 0.5)]`` (ReGATE p : visual keep ratio)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if item:
            p, _, v = item.partition(":")
            if not v:
                raise argparse.ArgumentTypeError(f"expected P:V pairs (ReGATE p : visual keep), got {item!r}")
            out.append((float(p), float(v)))
    return out


def variants_of(settings: dict[str, Any]) -> list[Variant]:
    """The variants a run measures: ReGATE alone, visual-token elision alone, then both.

    Example:
        >>> [v.short for v in variants_of({"keep_ratios": [0.5], "visual_keeps": [0.25], "both": [(0.5, 0.5)]})]
        ['p=0.5', 'v=0.25', 'p=0.5+v=0.5']
    """
    return (
        [Variant(regate=p) for p in settings["keep_ratios"]]
        + [Variant(visual=v) for v in settings.get("visual_keeps", [])]
        + [Variant(regate=p, visual=v) for p, v in settings.get("both", [])]
    )


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
    for name in ("head_dim", "linear_key_heads", "linear_value_heads", "linear_head_dim"):  # qwen3_5's own sizes
        m.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"qwen3_5: default {getattr(QWEN3_5_CPU_SPEC, name)}",
        )
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
    s.add_argument("--frame-grid", default=None, help="Qwen frame size in patches, e.g. 24,32")
    r = ap.add_argument_group("measurement")
    r.add_argument("--keep-ratios", type=_floats, default=[0.25, 0.5, 0.75, 1.0], help="ReGATE p, alone")
    r.add_argument("--visual-keeps", type=_floats, default=[], help="visual-token elision keep ratios, alone")
    r.add_argument("--both", type=_pairs, default=[], help="ReGATE p and visual keep together, e.g. 0.5:0.5,0.25:0.5")
    r.add_argument(
        "--visual-selection", default="temporal", choices=["temporal", "temporal_frames", "uniform", "random"]
    )
    r.add_argument(
        "--no-step-skip",
        action="store_true",
        help="encode every media step even when all its tokens are elided (the engine before it skipped them)",
    )
    r.add_argument(
        "--profile-repeats", type=int, default=0, help="profiled steps per variant (segment times and the cost model)"
    )
    r.add_argument("--repeats", type=int, default=5, help="timed pairs per variant and shape")
    r.add_argument(
        "--warmup", type=int, default=0, help="untimed rounds after one untimed pair that fills the reference cache"
    )
    r.add_argument("--lr", type=float, default=1e-5)
    r.add_argument("--seed", type=int, default=0)
    return ap


def settings_from_args(args: argparse.Namespace) -> tuple[ModelSpec, dict[str, Any]]:
    """The model spec and run settings the arguments describe (``--smoke`` shrinks both)."""
    base = SMOKE_SPEC if args.smoke else FAMILY_CPU_SPECS.get(args.family, CPU_SPEC)
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
        "visual_keeps": args.visual_keeps,
        "both": args.both,
        "visual_selection": args.visual_selection,
        "step_skip": not args.no_step_skip,
        "profile_repeats": args.profile_repeats,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lr": args.lr,
        "seed": args.seed,
    }
    if args.smoke:
        settings.update(seq_len=min(args.seq_len, 160), prompt_len=min(args.prompt_len, 8), answer_shares=[0.25, 0.5])
        settings.update(keep_ratios=[0.5, 1.0], repeats=min(args.repeats, 2), warmup=min(args.warmup, 1))
        settings.update(visual_keeps=args.visual_keeps[:1], both=args.both[:1])
        settings.update(profile_repeats=min(args.profile_repeats, 1))
        settings.update(answer_lens=[min(a, 48) for a in args.answer_lens], batch_size=min(args.batch_size, 2))
    return spec, settings


def shapes_for(model: torch.nn.Module, settings: dict[str, Any]) -> list[Shape]:
    """The shapes of the sweep: by answer share at a fixed length, or a fixed video with several answers."""
    if settings["visual_tokens"] is not None:
        return [
            fixed_shape(
                model,
                settings["batch_size"],
                settings["visual_tokens"],
                settings["prompt_len"],
                a,
                settings["frame_grid"],
            )
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
    set_step_skip(settings.get("step_skip", True))
    model = build_model(spec, device=device, dtype=dtype, attn=settings["attn"], seed=settings["seed"])
    params = count_parameters(model)
    log(f"built {spec.family} ({params['total'] / 1e6:.1f} M parameters) in {time.perf_counter() - started:.1f} s")
    selection = settings.get("visual_selection", "temporal")
    bench = Bench(model, device, lr=settings["lr"], log=log, visual_selection=selection)
    shapes = []
    for i, shape in enumerate(shapes_for(model, settings)):
        log(
            f"  shape {i}: B={shape.batch_size} L={shape.length} (visual {shape.visual_tokens}, prompt "
            f"{shape.prompt_len}, answer {shape.answer_len} = {shape.answer_share:.0%})"
        )
        shapes.append(
            bench.run_shape(
                shape,
                variants_of(settings),
                settings["repeats"],
                settings["warmup"],
                seed=settings["seed"] + i + 1,
                frame_grid=settings["frame_grid"],
                profile_repeats=settings.get("profile_repeats", 0),
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
