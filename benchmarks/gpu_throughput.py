"""Elision throughput at a realistic size on one GPU: the prepared check that ``benchmarks/gpu.sh`` runs.

A random-initialised model shaped like Qwen2-VL-2B (text: hidden 1536, 28 layers, 12/2 heads, MLP 8960,
vocabulary 151936; vision tower: 16 blocks of width 1280, half the real depth), bf16 weights, SDPA
attention, built directly on the GPU. Each row: ``[bos] <video 1536 tokens: 16 frames of 336x448>
[prompt 64] [answer]``, batch 2. Baseline and elision steps alternate in one process (see
``benchmarks/throughput.py``; the same code runs here), and each part profiles the baseline's and each
variant's step (``benchmarks/step_profile.py``: vision tower, decoder, LM head, optimizer, policies,
gather) and compares the measured ratio with the profile's cost model. Variants: ReGATE at ``p``
(``p=``), visual-token elision at keep ratio ``v`` (``v=``), and both.

Parts, each guarded (an error is printed and the next part runs):

1. ``a1024``: answer 1024 (39 %): p=0.5, v=0.5, p=0.5+v=0.5 (temporal selection): the headline;
2. ``a512``: answer 512 (24 %): the same variants;
3. ``a1024-frames``: answer 1024, v=0.5 and p=0.5+v=0.5 with ``temporal_frames`` (whole frames elided:
   the vision tower skips them);
4. ``a1024-frames-noskip``: part 3 with the engine's frame skipping off (what it saves);
5. ``a1024-more``: answer 1024, p=0.25, p=1 (the callback around the full computation), v=0.25 and
   p=0.25+v=0.25;
6. ``a1024-store``: answer 1024, p=0.5 with a score store that already holds 1M samples x 100 candidates
   (``benchmarks/memory.py``'s ``fill``): the policy's time per step at that scale (issue 13: under 1 %).

Parts after the first run only if the time budget (``--budget-s``) allows. On a CUDA out-of-memory error
a part is retried once at half the batch size. Results go to ``$OUT/gpu_throughput.json`` (``$OUT``
defaults to ``./gpu_results``), rewritten after every part, and the tables are printed at the end.

``--smoke`` runs the same code on the CPU with a tiny model (a few seconds), for the test suite;
``--cpu`` runs the same parts on the CPU at a small size (a Qwen2-VL with a 4-layer, 512-wide decoder
and a 3-block, 256-wide tower; a quarter of the sequence; batch 1), the CPU stand-in of the GPU table.

``--family qwen3_5`` measures a Qwen3.5-0.8B-shaped model instead (:data:`benchmarks.common.QWEN3_5_08B_LIKE`:
the hybrid decoder, 18 gated delta-net and 6 full-attention layers; the published sizes of the text model and
the vision tower), bf16, batch 2, rows ``[bos] <video 1536 tokens: 8 temporal patches of 384x512 pixels, each
with its timestamp> [prompt 64] [answer 1024]``. Parts: ``a1024`` (p=0.5, v=0.5, p=0.5+v=0.5, one profiled
step each) and ``a1024-frames`` (whole temporal patches elided). Results go to ``gpu_qwen3_5_throughput*.json``.
Without the ``flash-linear-attention`` and ``causal-conv1d`` kernels, transformers runs its PyTorch fallback of
the gated delta rule (the log says which ran).

``--family qwen3_vl`` measures a model of Qwen3-VL-2B-Instruct's published sizes
(:data:`benchmarks.common.QWEN3_VL_2B_LIKE`: text hidden 2048, 28 layers, 16/8 heads, MLP 6144, vocabulary 151936,
tied embeddings; tower 24 blocks of width 1024, patch 16, DeepStack from blocks 5, 11, 17), bf16, batch 2, rows
``[bos] <video 1536 tokens: 8 temporal patches of 384x512 pixels, each after its timestamp> [prompt 64]
[answer 1024]``, with the same two parts. Results go to ``gpu_qwen3_vl_throughput*.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `regate_lightning` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    QWEN2_VL_2B_LIKE,
    QWEN3_5_08B_LIKE,
    QWEN3_VL_2B_LIKE,
    ModelSpec,
    build_model,
    count_parameters,
    environment,
    fixed_shape,
    load_average,
    write_json,
)
from benchmarks.throughput import (  # noqa: E402
    CPU_SPEC,
    SMOKE_SPEC,
    Bench,
    Variant,
    evaluate_targets,
    format_report,
    plot,
    set_step_skip,
)
from regate_lightning.families import QWEN2_VL, QWEN3_5, QWEN3_VL  # noqa: E402
from regate_lightning.visual import as_visual_selection  # noqa: E402

P, V, PV = Variant(regate=0.5), Variant(visual=0.5), Variant(regate=0.5, visual=0.5)


@dataclass
class Part:
    """One measured configuration.

    Attributes:
        name: label in the table and the JSON.
        answer_len: answer tokens per row.
        variants: the elision variants, each alternated with the baseline.
        selection: the visual policy's selection.
        step_skip: whether the engine skips media steps whose every token is elided (its default).
        profile_repeats: profiled steps of the baseline and of each variant.
        optional: skipped when the time budget would be exceeded.
    """

    name: str
    answer_len: int
    variants: tuple[Variant, ...]
    selection: str = "temporal"
    step_skip: bool = True
    profile_repeats: int = 3
    optional: bool = True
    store_samples: int = 0
    store_candidates: int = 100


def parts_for(
    answer_long: int, answer_short: int, profile_repeats: int, store: tuple[int, int] = (1_000_000, 100)
) -> tuple[Part, ...]:
    """The six parts (see the module docstring) at two answer lengths; ``store``: samples and candidates of
    the large store of the last part."""
    frames = (Variant(visual=0.5), PV)
    return (
        Part(f"a{answer_long}", answer_long, (P, V, PV), profile_repeats=profile_repeats, optional=False),
        Part(f"a{answer_short}", answer_short, (P, V, PV), profile_repeats=profile_repeats),
        Part(f"a{answer_long}-frames", answer_long, frames, "temporal_frames", profile_repeats=profile_repeats),
        Part(f"a{answer_long}-frames-noskip", answer_long, frames, "temporal_frames", False, profile_repeats),
        Part(
            f"a{answer_long}-more",
            answer_long,
            (Variant(0.25), Variant(1.0), Variant(visual=0.25), Variant(0.25, 0.25)),
            profile_repeats=max(profile_repeats - 1, 1),
        ),
        Part(
            f"a{answer_long}-store",
            answer_long,
            (P,),
            profile_repeats=1,
            store_samples=store[0],
            store_candidates=store[1],
        ),
    )


@dataclass
class Config:
    """Sizes and settings of the GPU run (``smoke()`` and ``cpu()`` give the CPU stand-ins)."""

    spec: ModelSpec
    device: str = "cuda"
    dtype: str = "bfloat16"
    attn: str = "sdpa"
    batch_size: int = 2
    visual_tokens: int = 1536
    frame_grid: tuple[int, int] = (24, 32)  # 336x448 pixels at patch 14: 192 tokens per 2 frames
    prompt_len: int = 64
    repeats: int = 10
    warmup: int = 2
    lr: float = 1e-5
    budget_s: float = 150.0
    parts: tuple[Part, ...] = parts_for(1024, 512, 3)

    @property
    def tag(self) -> str:
        """Suffix of the output files: empty for the default parts, ``-<names>`` for a selection."""
        names = [p.name for p in self.parts]
        return "" if set(names) == {p.name for p in self.defaults().parts} else "-" + "-".join(names)

    @property
    def prefix(self) -> str:
        """Prefix of the output files: ``cpu`` for the small CPU stand-in, ``gpu`` otherwise (the smoke run too);
        ``gpu_qwen3_5`` / ``gpu_qwen3_vl`` for the Qwen3.5- / Qwen3-VL-shaped runs (their smoke runs too)."""
        if self.spec.family in (QWEN3_5, QWEN3_VL):
            return f"gpu_{self.spec.family}"
        return "cpu" if self.device == "cpu" and self.spec != SMOKE_SPEC else "gpu"

    def defaults(self) -> Config:
        """The configuration of the same kind (GPU, CPU stand-in or smoke) with its default parts."""
        if self.spec.family in (QWEN3_5, QWEN3_VL):
            return Config.shaped(self.spec.family, smoke=self.device == "cpu")
        if self.device != "cpu":
            return Config(spec=self.spec)
        return Config.smoke() if self.spec == SMOKE_SPEC else Config.cpu()

    @staticmethod
    def smoke() -> Config:
        """The same parts on the CPU with a tiny model."""
        return Config(
            spec=SMOKE_SPEC,
            device="cpu",
            dtype="float32",
            batch_size=2,
            visual_tokens=32,
            frame_grid=(4, 8),
            prompt_len=8,
            repeats=2,
            warmup=0,
            budget_s=60.0,
            parts=parts_for(48, 24, 1, store=(2000, 20)),
        )

    @staticmethod
    def cpu() -> Config:
        """The same parts on the CPU at a small size: a quarter of the sequence, batch 1."""
        return Config(
            spec=CPU_VISUAL_SPEC,
            device="cpu",
            dtype="float32",
            batch_size=1,
            visual_tokens=384,
            frame_grid=(8, 8),  # 64x64 pixels at patch 8: 16 tokens per 2 frames, 48 frames
            prompt_len=16,
            repeats=5,
            warmup=1,
            budget_s=1800.0,
            parts=parts_for(256, 128, 3),
        )

    @staticmethod
    def qwen3_5(smoke: bool = False) -> Config:
        """The Qwen3.5-0.8B-shaped step (see the module docstring); ``smoke``: the same parts on the CPU, tiny."""
        return Config.shaped(QWEN3_5, smoke)

    @staticmethod
    def shaped(family: str, smoke: bool = False) -> Config:
        """The step of a model of a released checkpoint's sizes (:data:`SHAPED`; see the module docstring):
        parts ``a1024`` and ``a1024-frames``, 5 pairs; ``smoke``: the same parts on the CPU, tiny."""
        answer = 48 if smoke else 1024
        parts = (
            Part(f"a{answer}", answer, (P, V, PV), profile_repeats=1, optional=False),
            Part(f"a{answer}-frames", answer, (Variant(visual=0.5), PV), "temporal_frames", profile_repeats=1),
        )
        if not smoke:
            return Config(spec=SHAPED[family], repeats=5, warmup=1, frame_grid=(24, 32), parts=parts)
        spec = replace(SMOKE_SPEC, family=family)
        return replace(Config.smoke(), spec=spec, visual_tokens=32, frame_grid=(4, 8), parts=parts)


SHAPED = {QWEN3_5: QWEN3_5_08B_LIKE, QWEN3_VL: QWEN3_VL_2B_LIKE}
"""The models of ``--family``: Qwen3.5-0.8B's and Qwen3-VL-2B-Instruct's published sizes."""


CPU_VISUAL_SPEC = replace(CPU_SPEC, vision_depth=3, vision_width=256, vision_heads=4)
"""The CPU stand-in's model: ``CPU_SPEC``'s decoder (hidden 512, 4 layers, vocabulary 4096) with a tower of
3 blocks of width 256, so that the tower's share of a step is about the 2B model's (a third)."""


def _log(message: str) -> None:
    print(message, flush=True)


def _release(device: torch.device) -> None:
    gc.collect()  # reference cycles in model outputs can keep a whole autograd graph alive
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_part(bench: Bench, config: Config, part: Part, index: int) -> dict[str, Any]:
    """Run one part; on CUDA out-of-memory retry once at half the batch size."""
    batch_size = config.batch_size
    while True:
        shape = fixed_shape(
            bench.model, batch_size, config.visual_tokens, config.prompt_len, part.answer_len, config.frame_grid
        )
        _log(
            f"  part {part.name}: B={shape.batch_size} L={shape.length} (video {shape.visual_tokens}, prompt "
            f"{shape.prompt_len}, answer {shape.answer_len} = {shape.answer_share:.0%}), "
            f"{', '.join(v.short for v in part.variants)}, visual selection {part.selection}"
            + ("" if part.step_skip else ", frame skipping off")
        )
        bench.visual.selection = as_visual_selection(part.selection)
        set_step_skip(part.step_skip)
        filled = fill_store(bench, part, index) if part.store_samples else None
        try:
            result = bench.run_shape(
                shape,
                part.variants,
                config.repeats,
                config.warmup,
                seed=index + 1,
                frame_grid=config.frame_grid,
                profile_repeats=part.profile_repeats,
            )
        except torch.cuda.OutOfMemoryError:
            bench.optimizer.zero_grad(set_to_none=True)
            _release(bench.device)
            if batch_size == 1:
                raise
            batch_size //= 2
            _log(f"    CUDA out of memory: retrying at batch size {batch_size}")
            continue
        result["label"] = part.name
        result["visual_selection"] = part.selection
        result["step_skip"] = part.step_skip
        if filled is not None:
            result["store"] = filled
        return result


def fill_store(bench: Bench, part: Part, index: int) -> dict[str, Any]:
    """Fill the ReGATE policy's store with ``part.store_samples`` stored samples (random keys), as after a
    long run or a complete ``regate-lightning score``; the part then times the policy at that scale."""
    from benchmarks.memory import fill, random_keys, stand_in_digests

    bank = bench.policy.bank
    assert bank is not None
    t0 = time.perf_counter()
    keys = random_keys(part.store_samples, torch.Generator().manual_seed(index))
    fill(bank, keys, stand_in_digests(keys), part.store_candidates, seed=index)
    took = time.perf_counter() - t0
    _log(f"    store filled with {bank.num_samples:,} samples ({bank.num_candidates:,} candidates) in {took:.1f} s")
    return {"samples": bank.num_samples, "candidates": bank.num_candidates, "fill_s": took}


def estimate_s(config: Config, part: Part, step_s: float) -> float:
    """Seconds a part should take, from a baseline step time (elision steps count as baseline steps)."""
    n = len(part.variants)
    steps = (config.warmup + config.repeats) * 2 * n + 1 + n + part.profile_repeats * (n + 1) * 1.5 + n + 1
    return steps * step_s


def linear_attention_kernels() -> dict[str, bool]:
    """Whether the packages of the fused gated delta-net kernels import (``fla``: flash-linear-attention, the
    chunked delta rule; ``causal_conv1d``); without them transformers runs its PyTorch fallbacks."""
    import importlib.util

    return {name: importlib.util.find_spec(name) is not None for name in ("fla", "causal_conv1d")}


def run(config: Config, out_dir: Path) -> dict[str, Any]:
    """Run every part that fits the budget; write the JSON after each; return the result."""
    started = time.perf_counter()
    device = torch.device(config.device)
    result: dict[str, Any] = {
        "environment": {},
        "model": {"family": config.spec.family, "spec": asdict(config.spec)},
        "settings": {k: v for k, v in asdict(config).items() if k not in ("spec", "parts")},
        "parts": [asdict(p) for p in config.parts],
        "shapes": [],
        "errors": [],
    }
    result["settings"]["repeats"] = config.repeats
    json_path = out_dir / f"{config.prefix}_throughput{config.tag}.json"

    def save() -> None:
        result["environment"]["load_average_end"] = load_average()
        result["targets"] = evaluate_targets(result["shapes"]) if result["shapes"] else []
        result["wall_s"] = time.perf_counter() - started
        write_json(json_path, result)

    try:
        result["environment"] = environment(device)
        if config.spec.family == QWEN3_5:  # which gated delta-net kernels transformers finds (else its fallback)
            result["environment"]["linear_attention_kernels"] = linear_attention_kernels()
        _log("environment: " + ", ".join(f"{k}={v}" for k, v in result["environment"].items()))
    except Exception as error:  # report and go on: the versions are nice to have, not needed
        result["errors"].append({"part": "environment", "error": repr(error)})
        traceback.print_exc()
    try:
        t0 = time.perf_counter()
        model = build_model(config.spec, device=device, dtype=getattr(torch, config.dtype), attn=config.attn)
        result["model"]["parameters"] = count_parameters(model)
        result["model"]["build_s"] = time.perf_counter() - t0
        params = result["model"]["parameters"]
        _log(
            f"built {config.spec.family}: {params['total'] / 1e6:.1f} M parameters "
            f"({params['language_model'] / 1e6:.1f} M language model), {config.dtype}, "
            f"in {result['model']['build_s']:.1f} s"
        )
        t0 = time.perf_counter()
        bench = Bench(model, device, lr=config.lr, log=_log)
        result["model"]["callback_setup_s"] = time.perf_counter() - t0
    except Exception as error:
        result["errors"].append({"part": "build", "error": repr(error)})
        traceback.print_exc()
        save()
        return result
    step_s: float | None = None
    for index, part in enumerate(config.parts):
        elapsed = time.perf_counter() - started
        if part.optional and step_s is not None and elapsed + estimate_s(config, part, step_s) > config.budget_s:
            _log(
                f"  part {part.name}: skipped (about {estimate_s(config, part, step_s):.0f} s more would pass the "
                f"{config.budget_s:.0f} s budget at {elapsed:.0f} s)"
            )
            result["errors"].append({"part": part.name, "error": "skipped: time budget"})
            continue
        t0 = time.perf_counter()
        try:
            shape = run_part(bench, config, part, index)
            result["shapes"].append(shape)
            step_s = shape["baseline"]["median_s"]
            _log(f"    done in {time.perf_counter() - t0:.1f} s")
        except Exception as error:
            result["errors"].append({"part": part.name, "error": repr(error)})
            _log(f"  part {part.name} FAILED: {error!r}")
            traceback.print_exc()
            bench.optimizer.zero_grad(set_to_none=True)
            _release(device)
        save()
    save()
    return result


def parser() -> argparse.ArgumentParser:
    """Command-line options (sizes other than these are fixed: edit ``Config`` to change them)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated part names to run (one process per part avoids "
        "carrying allocator state between parts); results go to gpu_throughput-<names>.json",
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, same code path (seconds)")
    ap.add_argument(
        "--family",
        default=QWEN2_VL,
        choices=[QWEN2_VL, QWEN3_5, QWEN3_VL],
        help="qwen2_vl (the Qwen2-VL-2B-shaped parts), qwen3_5 (the Qwen3.5-0.8B-shaped parts) or qwen3_vl (the "
        "Qwen3-VL-2B-shaped parts)",
    )
    ap.add_argument("--cpu", action="store_true", help="the same parts on the CPU at a small size (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads with --smoke / --cpu (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else ./gpu_results)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed pairs per variant")
    ap.add_argument("--budget-s", type=float, default=None, help="skip optional parts past this many seconds")
    ap.add_argument("--num-layers", type=int, default=None, help="decoder layers (default 28)")
    ap.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default 16)")
    ap.add_argument("--attn", default=None, help="attention implementation (default sdpa)")
    ap.add_argument("--dtype", default=None, help="weight dtype (default bfloat16; float32 with --smoke)")
    return ap


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's configuration: the GPU defaults, or a CPU stand-in (smoke, small), with overrides."""
    if args.smoke and args.cpu:
        raise SystemExit("--smoke and --cpu are two different CPU runs: give one")
    config = Config.smoke() if args.smoke else Config.cpu() if args.cpu else Config(spec=QWEN2_VL_2B_LIKE)
    if args.family in SHAPED:
        if args.cpu:
            raise SystemExit(f"--family {args.family} has no --cpu configuration: use --smoke, or throughput.py")
        config = Config.shaped(args.family, smoke=args.smoke)
    spec_overrides = {k: getattr(args, k) for k in ("num_layers", "vision_depth") if getattr(args, k) is not None}
    overrides = {
        k: getattr(args, k) for k in ("batch_size", "repeats", "budget_s", "attn", "dtype") if getattr(args, k)
    }
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {p.name for p in config.parts})
        if unknown:
            raise SystemExit(f"--only: no part named {unknown}; parts are {[p.name for p in config.parts]}")
        overrides["parts"] = tuple(replace(p, optional=False) for p in config.parts if p.name in wanted)
    return replace(config, spec=replace(config.spec, **spec_overrides), **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPU throughput check; 0 when at least the headline part produced figures."""
    args = parser().parse_args(argv)
    config = config_from_args(args)
    if config.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --cpu (or --smoke) for the CPU stand-in", file=sys.stderr)
        return 2
    out_dir = args.out or Path(os.environ.get("OUT") or "gpu_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    where = "smoke, CPU" if args.smoke else "small, CPU" if args.cpu else config.device
    _log(f"== Elision GPU throughput ({where}) -> {out_dir} ==")
    result = run(config, out_dir)
    if result["shapes"]:
        for key in ("dtype", "attn"):
            result["settings"].setdefault(key, getattr(config, key))
        print()
        print(format_report(result), flush=True)
        try:
            png = plot(result, out_dir / f"{config.prefix}_step_time_vs_keep_ratio{config.tag}.png")
            if png:
                _log(f"wrote {png}")
        except Exception as error:  # a plot is optional
            _log(f"plot failed: {error!r}")
    for error in result["errors"]:
        _log(f"note: {error['part']}: {error['error']}")
    _log(f"wrote {out_dir / f'{config.prefix}_throughput{config.tag}.json'} ({result.get('wall_s', 0):.0f} s)")
    return 0 if result["shapes"] else 1


if __name__ == "__main__":
    sys.exit(main())
