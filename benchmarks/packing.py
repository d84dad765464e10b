"""Padded against packed steps, baseline and ReGATE, on a length mix shaped like LLaVA-Video-178K.

**The set** (generated, tokens only). Each sample is ``[bos] [video] [prompt] [answer] [eos]``: a clip of 5 to
60 s (uniform) sampled at ``--fps`` (1 frame per second, at most ``--max-frames``), ``--tokens-per-frame`` visual
tokens per frame; a prompt of 16 to 64 tokens; an answer drawn from LLaVA-Video-178K's three kinds of
annotation in their proportions (1.3M samples: 178K detailed captions, 960K open-ended and 196K multiple-choice
answers): a caption of 150 to 400 tokens (13 %), an open-ended answer of 10 to 80 (72 %) or a multiple-choice
answer of 5 to 8 (15 %). The answer is supervised. The visual tokens are plain token ids run by a text decoder
(``Qwen2ForCausalLM``): the decoder computes a visual position as it computes any other, and the vision tower,
whose cost neither padding nor packing changes, is left out. ``--tokens-per-frame`` scales the visual part to
the machine (16 on the CPU: 80 to 960 visual tokens per clip; a real Qwen2-VL at 448x448 has 256 per 2 frames).

**Positions per epoch** (no model): what a padded step computes (``samples x longest``, per batch) for random
batches of ``--batch-size``, length-grouped batches of ``--batch-size`` and token-budget batches of
``--max-tokens``, against what a packed step computes (the tokens, no padding), without and with ReGATE's
elision at ``p`` (the keep count of the policy: ``ceil(p x candidates)`` per sample).

**Step time** (the model): ``--batches`` random batches of ``--batch-size`` samples, each run as four steps,
interleaved in a rotating order so that machine load hits them alike: baseline padded, baseline packed, ReGATE
padded, ReGATE packed (every ReGATE step sparse, keep ratio ``p``; the policy's ``plan`` and ``observe`` timed
inside the step, the teacher's reference losses computed in an untimed first round, as in
``benchmarks/throughput.py``). A step is ``forward_active`` + backward + AdamW. Packed steps run the decoder
on ``sdpa_varlen`` (SDPA per sample, ``MLLMModule(packed=True)``'s choice) or on FlashAttention-2 with
``--attn flash_attention_2``; ``--block-mask`` adds a packed step on SDPA with transformers' block-diagonal
mask. Reported per variant: the median step time, positions computed per step (padding included), the share
of padding, and the ratio to its pair (median of per-batch ratios of the batch's median times) against the
token-count ideal. The machine's load average is recorded before and after (other processes share the CPU).

Targets (issue 21): padding below 2 % of the positions a packed step computes; ReGATE-packed's step-time ratio
to baseline-packed within 10 % of the token-count ideal (kept tokens / tokens).

Examples:
    python benchmarks/packing.py --smoke
    nice -n 10 python benchmarks/packing.py --out docs/results/packing_cpu
    python benchmarks/packing.py --device cuda --dtype bfloat16 --preset gpu --out gpu_results
"""

from __future__ import annotations

import argparse
import math
import os
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
    decoder_kwargs,
    environment,
    fmt_float,
    fmt_str,
    format_table,
    instantiate,
    load_average,
    median,
    now,
    write_json,
)

PADDING_LIMIT = 0.02
"""Target: padding below 2 % of the positions a packed step computes."""
RATIO_TOLERANCE = 0.10
"""Target: ReGATE-packed's step-time ratio to baseline-packed within 10 % of the token-count ideal."""
VARIANTS = ("padded", "packed", "regate_padded", "regate_packed")
BLOCK_MASK = "packed_block_mask"
ANSWER_KINDS = (("caption", 0.13, 150, 400), ("open-ended", 0.72, 10, 80), ("multiple-choice", 0.15, 5, 8))
"""LLaVA-Video-178K's answers: (kind, share of the samples, fewest tokens, most tokens)."""


# --------------------------------------------------------------------------------------------------
# The length mix.


@dataclass(frozen=True)
class LengthMix:
    """How the generated samples are drawn (see the module docstring).

    Attributes:
        min_seconds: shortest clip.
        max_seconds: longest clip.
        fps: frames sampled per second of video.
        max_frames: the cap of frames per clip.
        tokens_per_frame: visual tokens per sampled frame.
        prompt: fewest and most prompt tokens.
    """

    min_seconds: float = 5.0
    max_seconds: float = 60.0
    fps: float = 1.0
    max_frames: int = 64
    tokens_per_frame: int = 16
    prompt: tuple[int, int] = (16, 64)


@dataclass(frozen=True)
class SampleShape:
    """One generated sample: its parts' token counts."""

    seconds: float
    visual: int
    prompt: int
    answer: int
    kind: str

    @property
    def length(self) -> int:
        """Tokens: bos, visual, prompt, answer, eos."""
        return 1 + self.visual + self.prompt + self.answer + 1


def generate(mix: LengthMix, num: int, seed: int = 0) -> list[SampleShape]:
    """``num`` samples of ``mix`` (the same seed gives the same samples)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=gen))

    def integer(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    shares = torch.tensor([share for _, share, _, _ in ANSWER_KINDS])
    samples = []
    for _ in range(num):
        seconds = uniform(mix.min_seconds, mix.max_seconds)
        frames = max(1, min(mix.max_frames, round(seconds * mix.fps)))
        kind, _, low, high = ANSWER_KINDS[int(torch.multinomial(shares, 1, generator=gen))]
        samples.append(
            SampleShape(seconds, frames * mix.tokens_per_frame, integer(*mix.prompt), integer(low, high), kind)
        )
    return samples


def make_batch(samples: Sequence[SampleShape], vocab: int, seed: int, first_key: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``samples`` in a causal LM's keys, labels on the answers and the eos."""
    gen = torch.Generator().manual_seed(seed)
    length = max(s.length for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        body = torch.randint(3, vocab, (s.length - 2,), generator=gen)
        ids[row, : s.length] = torch.cat([torch.tensor([1]), body, torch.tensor([2])])
        attention[row, : s.length] = 1
        head = 1 + s.visual + s.prompt
        labels[row, head : s.length] = ids[row, head : s.length]
    keys = torch.arange(len(samples), dtype=torch.long) + first_key
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "sample_idx": keys}


def kept_tokens(sample: SampleShape, keep_ratio: float, min_keep: int = 1) -> int:
    """Positions a ReGATE step keeps: all but the elided candidates (answer tokens that predict an answer token)."""
    candidates = sample.answer  # the answer's tokens after its first, and the eos: each predicts a supervised token
    keep = min(candidates, max(min_keep, math.ceil(keep_ratio * candidates)))
    return sample.length - (candidates - keep)


def batching_rows(
    samples: Sequence[SampleShape], batch_size: int, max_tokens: int, keep_ratio: float, seed: int = 0
) -> list[dict[str, Any]]:
    """Positions per epoch of each batching, padded and packed, without and with ReGATE (no model runs)."""
    from regate_lightning.data.batching import LengthGroupedBatchSampler, TokenBudgetBatchSampler

    lengths = [s.length for s in samples]
    kept = [kept_tokens(s, keep_ratio) for s in samples]
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    plans = {
        f"random, {batch_size} per batch": [order[i : i + batch_size] for i in range(0, len(order), batch_size)],
        f"length-grouped, {batch_size} per batch": list(
            LengthGroupedBatchSampler(None, lengths, batch_size, seed=seed)
        ),
        f"token budget {max_tokens}": list(TokenBudgetBatchSampler(None, lengths, max_tokens, seed=seed)),
    }
    rows = []
    for name, batches in plans.items():
        for regate in (False, True):
            n = kept if regate else lengths
            tokens = sum(n[i] for b in batches for i in b)
            padded = sum(len(b) * max(n[i] for i in b) for b in batches)
            rows.append(
                {
                    "batching": name,
                    "regate": regate,
                    "batches": len(batches),
                    "tokens": tokens,
                    "padded_positions": padded,
                    "padded_padding": 1 - tokens / padded,
                    "packed_positions": tokens,
                    "packed_padding": 0.0,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------------
# The model and the steps.


@dataclass(frozen=True)
class ModelSize:
    """The text decoder's sizes (``Qwen2ForCausalLM``)."""

    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768


PRESETS: dict[str, tuple[ModelSize, LengthMix, int]] = {
    "cpu": (ModelSize(), LengthMix(tokens_per_frame=16), 8),
    "smoke": (ModelSize(256, 64, 1, 4, 2, 128), LengthMix(min_seconds=2, max_seconds=12, tokens_per_frame=2), 4),
    "gpu": (ModelSize(151936, 1536, 28, 12, 2, 8960), LengthMix(tokens_per_frame=32), 8),
}
"""Per preset: the decoder (``gpu``: Qwen2-VL-2B's text backbone), the mix, the batch size."""


def build_model(size: ModelSize, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0) -> Any:
    """A random ``Qwen2ForCausalLM`` of ``size`` on ``device`` in ``dtype``, train mode, no cache."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return instantiate(Qwen2ForCausalLM, Qwen2Config(**decoder_kwargs(size)), device, dtype, attn, seed)


class Steps:
    """The four steps on one student: its optimizer and a ReGATE policy (teacher ``"student"``, every step sparse).

    Args:
        model: the student.
        device: its device.
        keep_ratio: ReGATE's ``p``.
        packed_attention: the decoder's attention implementation on packed steps.
        padded_attention: the decoder's attention implementation on padded steps (and of the teacher).
    """

    def __init__(
        self, model: Any, device: torch.device, keep_ratio: float, packed_attention: str, padded_attention: str
    ) -> None:
        from regate_lightning.packed_sdpa import register
        from regate_lightning.policy import ReGATEPolicy

        register()
        self.model = model
        self.device = device
        self.config = model.config
        self.packed_attention = packed_attention
        self.padded_attention = padded_attention
        self.policy = ReGATEPolicy(keep_ratio=keep_ratio, warmup_steps=0, cycle_steps=1, full_steps=0)
        self.policy.setup(model)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.policy.start(device, student_dtype=dtype)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(self, batch: dict[str, torch.Tensor], variant: str) -> dict[str, float]:
        """One training step of ``variant``; its wall and CPU seconds, and the positions it computed."""
        from regate_lightning.elision import forward_active
        from regate_lightning.keys import KEEP_MASK

        packed = variant != "padded" and variant != "regate_padded"
        attention = self.padded_attention if not packed else "sdpa" if variant == BLOCK_MASK else self.packed_attention
        self.config._attn_implementation = attention
        batch = dict(batch)
        cpu = time.process_time()
        start = now(self.device)
        plan = None
        if variant.startswith("regate"):
            plan = self.policy.plan(batch, step=0)
            plan.apply(batch)
        out = forward_active(self.model, batch, batch.get(KEEP_MASK), packed=packed)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if plan is not None:
            self.policy.observe(plan, out.token_loss)
        seconds = now(self.device) - start
        rows = 1 if packed else int(batch["input_ids"].shape[0])
        return {
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu,
            "positions": rows * out.decoder_length,
            "active": out.num_active,
            "tokens": out.num_tokens,
        }


def run_steps(
    steps: Steps,
    batches: Sequence[dict[str, torch.Tensor]],
    variants: Sequence[str],
    repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every batch with every variant, ``repeats`` rounds after an untimed one, the order rotated each time."""
    records: dict[str, list[list[dict[str, float]]]] = {v: [[] for _ in batches] for v in variants}
    started = time.perf_counter()
    for b, batch in enumerate(batches):
        for v in variants:
            steps.step(batch, v)  # untimed: allocator, and the teacher's reference losses of the batch's samples
        tokens = int(batch["attention_mask"].sum())
        log(f"  batch {b}: {tokens} tokens, warm-up done at {time.perf_counter() - started:.0f} s")
    turn = 0
    for round_ in range(repeats):
        for b, batch in enumerate(batches):
            order = list(variants[turn % len(variants) :]) + list(variants[: turn % len(variants)])
            turn += 1
            for v in order:
                records[v][b].append(steps.step(batch, v))
        log(f"  round {round_ + 1}/{repeats} at {time.perf_counter() - started:.0f} s, load {load_average()}")
    return summarise(records, len(batches[0]["input_ids"]))


def summarise(records: dict[str, list[list[dict[str, float]]]], batch_size: int) -> dict[str, Any]:
    """Per variant: median step time, positions, padding; pairs' ratios (median over batches) against the ideal."""

    def per_batch(variant: str, key: str) -> list[float]:
        return [median([r[key] for r in runs]) for runs in records[variant]]

    out: dict[str, Any] = {"variants": {}}
    for v in records:
        seconds = per_batch(v, "seconds")
        positions = sum(per_batch(v, "positions"))
        active = sum(per_batch(v, "active"))
        tokens = sum(per_batch(v, "tokens"))
        out["variants"][v] = {
            "median_s": median([r["seconds"] for runs in records[v] for r in runs]),
            "batch_median_s": seconds,
            "cpu_median_s": median([r["cpu_seconds"] for runs in records[v] for r in runs]),
            "positions_per_step": positions / len(records[v]),
            "active_per_step": active / len(records[v]),
            "tokens_per_step": tokens / len(records[v]),
            "padding": 1 - active / positions,
            "steps": sum(len(runs) for runs in records[v]),
        }
    pairs = [
        ("packed", "padded"),
        ("regate_padded", "padded"),
        ("regate_packed", "packed"),
        ("regate_packed", "padded"),
        (BLOCK_MASK, "packed"),
    ]
    out["pairs"] = []
    for a, b in pairs:
        if a not in records or b not in records:
            continue
        ratios = [x / y for x, y in zip(per_batch(a, "seconds"), per_batch(b, "seconds"), strict=True)]
        cpu = [x / y for x, y in zip(per_batch(a, "cpu_seconds"), per_batch(b, "cpu_seconds"), strict=True)]
        ideal = sum(per_batch(a, "active")) / sum(per_batch(b, "active"))
        positions = sum(per_batch(a, "positions")) / sum(per_batch(b, "positions"))
        ratio = median(ratios)
        out["pairs"].append(
            {
                "pair": f"{a} / {b}",
                "ratio": ratio,
                "batch_ratios": ratios,
                "cpu_ratio": median(cpu),
                "token_ideal": ideal,
                "position_ratio": positions,
                "vs_ideal": ratio / ideal - 1,
            }
        )
    out["batch_size"] = batch_size
    return out


# --------------------------------------------------------------------------------------------------
# Report.


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The two targets of the module docstring, from the measured steps."""
    targets = []
    for v in ("packed", "regate_packed"):
        if v in result["steps"]["variants"]:
            padding = result["steps"]["variants"][v]["padding"]
            targets.append(
                {
                    "target": "padding < 2% of computed positions when packed",
                    "where": v,
                    "measured": f"{padding:.2%}",
                    "passed": padding < PADDING_LIMIT,
                }
            )
    for pair in result["steps"]["pairs"]:
        if pair["pair"] == "regate_packed / packed":
            targets.append(
                {
                    "target": "ReGATE-packed / baseline-packed within 10% of the token-count ideal",
                    "where": "step time",
                    "measured": f"{pair['ratio']:.3f} vs ideal {pair['token_ideal']:.3f} ({pair['vs_ideal']:+.1%}); "
                    f"CPU time {pair['cpu_ratio']:.3f}",
                    "passed": abs(pair["vs_ideal"]) <= RATIO_TOLERANCE,
                }
            )
    return targets


def format_report(result: dict[str, Any]) -> str:
    """The tables of a result."""
    env = result["environment"]
    lines = [
        f"Packed vs padded steps ({env['date']}; {env['device']}, {env['cpu_threads']} threads; torch {env['torch']}, "
        f"transformers {env['transformers']}); load average before {result['load_before']}, after "
        f"{result['load_after']}",
        f"model: {result['model']}; attention: padded {result['attention']['padded']}, packed "
        f"{result['attention']['packed']}",
        f"set: {result['num_samples']} samples, {result['mix']}; tokens per sample: median {result['length_median']}, "
        f"{result['length_min']} to {result['length_max']}; answers {result['answer_kinds']}",
        "",
        "Positions per epoch (no model):",
        format_table(
            result["batching"],
            [
                ("batching", "batching", fmt_str),
                ("regate", "ReGATE p", lambda r: f"{result['keep_ratio']:g}" if r else "-"),
                ("batches", "batches", fmt_str),
                ("tokens", "tokens", fmt_str),
                ("padded_positions", "padded: positions", fmt_str),
                ("padded_padding", "padded: padding", lambda x: f"{x:.1%}"),
                ("packed_positions", "packed: positions", fmt_str),
                ("packed_padding", "packed: padding", lambda x: f"{x:.1%}"),
            ],
        ),
        "",
        f"Steps ({result['num_batches']} random batches of {result['steps']['batch_size']}, "
        f"{result['repeats']} rounds, order rotated):",
        format_table(
            [{"variant": v, **s} for v, s in result["steps"]["variants"].items()],
            [
                ("variant", "variant", fmt_str),
                ("median_s", "step s (median)", fmt_float(3)),
                ("cpu_median_s", "CPU s", fmt_float(3)),
                ("positions_per_step", "positions / step", fmt_float(0)),
                ("active_per_step", "kept tokens / step", fmt_float(0)),
                ("padding", "padding", lambda x: f"{x:.1%}"),
            ],
        ),
        "",
        format_table(
            result["steps"]["pairs"],
            [
                ("pair", "pair", fmt_str),
                ("ratio", "step-time ratio", fmt_float(3)),
                ("cpu_ratio", "CPU-time ratio", fmt_float(3)),
                ("token_ideal", "token ideal", fmt_float(3)),
                ("position_ratio", "positions ratio", fmt_float(3)),
                ("vs_ideal", "vs ideal", lambda x: f"{x:+.1%}"),
            ],
        ),
        "",
        "Targets:",
    ]
    for t in result["targets"]:
        lines.append(f"  {'met' if t['passed'] else 'MISSED'}: {t['target']} ({t['where']}): {t['measured']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line.


def parser() -> argparse.ArgumentParser:
    """The benchmark's arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model, length mix and batch size")
    p.add_argument("--smoke", action="store_true", help="the smoke preset, 2 batches, 1 round (seconds)")
    p.add_argument("--samples", type=int, default=2000, help="generated samples (the positions-per-epoch table)")
    p.add_argument("--batches", type=int, default=4, help="random batches timed")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over every batch and variant")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: the preset's)")
    p.add_argument("--max-tokens", type=int, default=None, help="the token budget of the table (default: batch x mean)")
    p.add_argument("--tokens-per-frame", type=int, default=None, help="visual tokens per frame (default: the preset's)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="ReGATE's p")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--attn",
        default=None,
        help="packed steps' attention (default: sdpa_varlen; flash_attention_2 where it imports)",
    )
    p.add_argument("--block-mask", action="store_true", help="also time packed steps on SDPA with a block mask")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for packing.json")
    return p


def default_packed_attention(device: torch.device) -> str:
    """FlashAttention-2 on a CUDA device where ``flash_attn`` imports, else ``sdpa_varlen``."""
    from regate_lightning.packed_sdpa import PACKED_SDPA

    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return PACKED_SDPA


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate the set, tabulate the batchings, time the steps; the result with its targets."""
    preset = "smoke" if args.smoke else args.preset
    size, mix, batch_size = PRESETS[preset]
    if args.tokens_per_frame is not None:
        mix = LengthMix(**{**asdict(mix), "tokens_per_frame": args.tokens_per_frame})
    batch_size = args.batch_size or batch_size
    num_batches, repeats = (2, 1) if args.smoke else (args.batches, args.repeats)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    samples = generate(mix, 200 if args.smoke else args.samples, seed=args.seed)
    lengths = [s.length for s in samples]
    max_tokens = args.max_tokens or batch_size * round(statistics.mean(lengths))
    kinds = {k: sum(s.kind == k for s in samples) for k, _, _, _ in ANSWER_KINDS}
    result: dict[str, Any] = {
        "environment": environment(device),
        "load_before": load_average(),
        "preset": preset,
        "model": asdict(size),
        "mix": asdict(mix),
        "num_samples": len(samples),
        "length_median": int(statistics.median(lengths)),
        "length_min": min(lengths),
        "length_max": max(lengths),
        "answer_kinds": kinds,
        "keep_ratio": args.keep_ratio,
        "max_tokens": max_tokens,
        "batching": batching_rows(samples, batch_size, max_tokens, args.keep_ratio, args.seed),
    }
    packed_attention = args.attn or default_packed_attention(device)
    padded_attention = "sdpa"
    result["attention"] = {"padded": padded_attention, "packed": packed_attention}
    model = build_model(size, device, dtype, padded_attention, args.seed)
    steps = Steps(model, device, args.keep_ratio, packed_attention, padded_attention)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    batches = []
    for b in range(num_batches):
        chosen = [samples[i] for i in order[b * batch_size : (b + 1) * batch_size]]
        batch = make_batch(chosen, size.vocab_size, seed=args.seed + b, first_key=b * batch_size)
        batches.append({k: v.to(device) for k, v in batch.items()})
    variants = [*VARIANTS, *([BLOCK_MASK] if args.block_mask else [])]
    log(f"timing {len(variants)} variants on {num_batches} batches x {repeats} rounds ({preset}, {device}, {dtype})")
    result["num_batches"] = num_batches
    result["repeats"] = repeats
    result["steps"] = run_steps(steps, batches, variants, repeats, log)
    result["load_after"] = load_average()
    result["targets"] = evaluate_targets(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; write ``packing.json`` with ``--out``."""
    args = parser().parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    result = run(args, log=lambda msg: print(msg, flush=True))
    result["command"] = " ".join(["python", "benchmarks/packing.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(format_report(result), flush=True)
    if args.out is not None:
        path = write_json(args.out / "packing.json", result)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
