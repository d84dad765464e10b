"""Time to accuracy on the synthetic video QA set: baseline vs ReGATE, its ablations and random elision.

Every run trains the demo's student (:func:`regate_lightning.demo.demo_student`) on the synthetic
moving-shapes set in process with a Lightning ``Trainer`` for the same number of optimizer steps and
evaluates multiple-choice accuracy every ``--val-every`` steps (default: one epoch). A small callback
records at every validation: the optimizer step, the cumulative tokens the decoder processed (the
training step's ``num_active``: every non-padding token for the baseline, the kept ones under elision;
``num_tokens``, the tokens before elision, is recorded too), the wall-clock seconds of training so far
(everything from the start of fitting except validation) and ``val/acc``.

Variants (``--variants``):

- ``baseline``: no callback.
- ``regate``: the paper's defaults (p 0.5, beta 0.9, lambda 0.5), W/C/F scaled to the run like
  ``recipes/demo_regate.yaml`` (40/64/8 for 378 steps; ``--warmup/--cycle/--full`` change them).
- ``ema_only``: the same with ``ref_weight`` 0; ``ref_only``: ``ref_weight`` 1.
- ``random``: the same schedule and keep count, candidates chosen at random (``selection="random"``).

Each (variant, seed) runs in its own process with one torch thread, ``--jobs`` at a time. The seed
sets ``pl.seed_everything`` (data order) and ``demo_student(seed=...)`` (the vision tower and the
projector); the text language model's pretraining is cached beside the data and shared by all runs.

Summary per variant: peak accuracy (mean and standard deviation over seeds of each seed's peak),
and the cumulative tokens and training seconds at which the variant's mean curve over seeds first
reaches the *target*, the peak of the baseline's mean curve (so the baseline itself reaches it, at
ratio 1), with the ratios to the baseline's. (The mean of the baseline seeds' peaks would be a
target that the baseline's own mean curve need not reach, when the seeds peak at different steps.)
Per seed pairing is reported too: variant seed s against baseline seed s's own peak, the tokens
ratio to the baseline seed's tokens at that peak; the table gives how many seeds reach it and their
median ratio. Reaching is read at the validation points, without interpolation.

``--summarise FILE`` recomputes the summary, the table and the plots from a results JSON.

Usage::

    REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/time_to_accuracy.py --jobs 2
    python benchmarks/time_to_accuracy.py --smoke --out /tmp/tta_smoke     # tiny, < 60 s
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "regate": {"ref_weight": 0.5},
    "ema_only": {"ref_weight": 0.0},
    "ref_only": {"ref_weight": 1.0},
    "random": {"ref_weight": 0.5, "selection": "random"},
}
LABELS = {
    "baseline": "baseline (all tokens)",
    "regate": "ReGATE (lambda 0.5)",
    "ema_only": "ReGATE, EMA only (lambda 0)",
    "ref_only": "ReGATE, reference only (lambda 1)",
    "random": "random elision (p 0.5)",
}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "time_to_accuracy"


@dataclass
class RunConfig:
    """One training run.

    Attributes:
        variant: a key of :data:`VARIANTS`.
        seed: model-init and data-order seed.
        epochs: training epochs.
        num_train: training clips.
        num_val: multiple-choice questions.
        batch_size: training batch.
        lr: AdamW learning rate.
        val_every: validate every this many optimizer steps (0: at every epoch end).
        keep_ratio: p.
        ema_decay: beta.
        warmup: W.
        cycle: C.
        full: F.
        limit_train_batches: cap on batches per epoch (None: all).
        pretrain_steps: text-only pretraining steps of the student's language model (cached).
    """

    variant: str
    seed: int
    epochs: int = 6
    num_train: int = 500
    num_val: int = 200
    batch_size: int = 8
    lr: float = 0.002
    val_every: int = 0
    keep_ratio: float = 0.5
    ema_decay: float = 0.9
    warmup: int = 40
    cycle: int = 64
    full: int = 8
    limit_train_batches: int | None = None
    pretrain_steps: int = 250


@dataclass
class RunResult:
    """What one run measured.

    Attributes:
        config: the run.
        points: one dict per validation: ``step``, ``tokens`` (cumulative active), ``tokens_all``
            (cumulative before elision), ``train_s``, ``acc``.
        total_s: wall clock of the whole fit, validation included.
        regate_totals: the callback's ``totals`` at the end (None for the baseline).
    """

    config: RunConfig
    points: list[dict[str, float]] = field(default_factory=list)
    total_s: float = 0.0
    regate_totals: dict[str, int] | None = None


def _recorder_class() -> type:
    import lightning.pytorch as pl

    from regate_lightning.keys import NUM_ACTIVE, NUM_TOKENS, VAL, acc_metric

    class Recorder(pl.Callback):
        """Cumulative tokens, training seconds (validation excluded) and ``val/acc`` at each validation."""

        def __init__(self) -> None:
            self.points: list[dict[str, float]] = []
            self.tokens = 0
            self.tokens_all = 0
            self.start = 0.0
            self.val_s = 0.0
            self._val_start = 0.0
            self._train_s = 0.0

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if isinstance(outputs, dict) and NUM_ACTIVE in outputs:
                self.tokens += int(outputs[NUM_ACTIVE])
                self.tokens_all += int(outputs[NUM_TOKENS])

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._val_start = time.perf_counter()
            self._train_s = self._val_start - self.start - self.val_s

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.val_s += time.perf_counter() - self._val_start
            if trainer.sanity_checking:
                return
            acc = trainer.callback_metrics.get(acc_metric(VAL))
            if acc is None:
                return
            self.points.append(
                {
                    "step": int(trainer.global_step),
                    "tokens": self.tokens,
                    "tokens_all": self.tokens_all,
                    "train_s": round(self._train_s, 3),
                    "acc": float(acc),
                }
            )

    return Recorder


def run_one(config: RunConfig, root: str | None = None) -> RunResult:
    """Train one (variant, seed) in this process (one torch thread) and return its curve."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from regate_lightning import ReGATECallback
    from regate_lightning.data.datamodule import SyntheticVideoQADataModule
    from regate_lightning.demo import demo_student
    from regate_lightning.module import MLLMModule

    pl.seed_everything(config.seed, verbose=False)
    model = demo_student(
        root, num_train=config.num_train, num_val=config.num_val, pretrain_steps=config.pretrain_steps, seed=config.seed
    )
    module = MLLMModule(
        model,
        optimizer=lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0),
        option_score="sum",
    )
    data = SyntheticVideoQADataModule(
        root=root,
        num_train=config.num_train,
        num_val=config.num_val,
        batch_size=config.batch_size,
        val_batch_questions=16,
        num_workers=0,
        max_length=512,
    )
    recorder = _recorder_class()()
    callbacks: list[pl.Callback] = [recorder]
    regate: ReGATECallback | None = None
    options = VARIANTS[config.variant]
    if options is not None:
        regate = ReGATECallback(
            keep_ratio=config.keep_ratio,
            ema_decay=config.ema_decay,
            warmup_steps=config.warmup,
            cycle_steps=config.cycle,
            full_steps=config.full,
            teacher="student",
            seed=config.seed,
            **options,
        )
        callbacks.insert(0, regate)
    every: dict[str, Any] = (
        {"val_check_interval": config.val_every, "check_val_every_n_epoch": None}
        if config.val_every
        else {"check_val_every_n_epoch": 1}
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=config.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        limit_train_batches=config.limit_train_batches,
        **every,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    result = RunResult(config, recorder.points, round(time.perf_counter() - start, 3))
    if regate is not None:
        result.regate_totals = dict(regate.totals)
    return result


def _worker(config: RunConfig, root: str | None) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = run_one(config, root)
    print(
        f"[tta] {config.variant} seed {config.seed}: "
        + ", ".join(f"{p['step']}:{p['acc']:.3f}" for p in result.points)
        + f" ({result.total_s:.0f} s)",
        flush=True,
    )
    return asdict(result)


# --------------------------------------------------------------------------------------------------
# Summary.


def _first_reach(points: list[dict[str, float]], target: float, key: str) -> float | None:
    """``key`` at the first point whose accuracy reaches ``target`` (no interpolation); None if never."""
    for p in points:
        if p["acc"] >= target - 1e-9:
            return float(p[key])
    return None


def _mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Mean over seeds at each validation index (runs of one variant validate at the same steps)."""
    n = min(len(r["points"]) for r in runs)
    out = []
    for i in range(n):
        pts = [r["points"][i] for r in runs]
        accs = [p["acc"] for p in pts]
        out.append(
            {
                "step": pts[0]["step"],
                "tokens": sum(p["tokens"] for p in pts) / len(pts),
                "train_s": sum(p["train_s"] for p in pts) / len(pts),
                "acc": sum(accs) / len(accs),
                "acc_std": _std(accs),
            }
        )
    return out


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: peak accuracy, tokens and seconds to the baseline's peak, ratios to the baseline."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_variant.setdefault(r["config"]["variant"], []).append(r)
    for group in by_variant.values():
        group.sort(key=lambda r: r["config"]["seed"])
    base_runs = [r for r in by_variant.get("baseline", []) if r["points"]]
    base_peaks: dict[int, tuple[float, float]] = {}  # seed -> (peak accuracy, tokens at its first reach)
    for r in base_runs:
        peak = max(p["acc"] for p in r["points"])
        base_peaks[r["config"]["seed"]] = (peak, float(_first_reach(r["points"], peak, "tokens") or 0.0))
    target = max(p["acc"] for p in _mean_curve(base_runs)) if base_runs else None
    summary: dict[str, Any] = {"target_acc": target, "variants": {}}
    base_reach: dict[str, float | None] = {}
    for name in [v for v in VARIANTS if v in by_variant]:
        group = [r for r in by_variant[name] if r["points"]]
        if not group:
            continue
        curve = _mean_curve(group)
        peaks = [max(p["acc"] for p in r["points"]) for r in group]
        row: dict[str, Any] = {
            "seeds": [r["config"]["seed"] for r in group],
            "peak_mean": sum(peaks) / len(peaks),
            "peak_std": _std(peaks),
            "peaks": peaks,
            "final_mean": sum(r["points"][-1]["acc"] for r in group) / len(group),
            "total_tokens": sum(r["points"][-1]["tokens"] for r in group) / len(group),
            "total_train_s": sum(r["points"][-1]["train_s"] for r in group) / len(group),
            "curve": curve,
        }
        if target is not None:
            row["tokens_to_target"] = _first_reach(curve, target, "tokens")
            row["seconds_to_target"] = _first_reach(curve, target, "train_s")
            row["step_to_target"] = _first_reach(curve, target, "step")
            paired = []
            for r in group:
                if r["config"]["seed"] not in base_peaks:
                    continue
                seed_target, base_tokens = base_peaks[r["config"]["seed"]]
                tokens = _first_reach(r["points"], seed_target, "tokens")
                paired.append(
                    {
                        "seed": r["config"]["seed"],
                        "target": seed_target,
                        "tokens": tokens,
                        "train_s": _first_reach(r["points"], seed_target, "train_s"),
                        "tokens_ratio": tokens / base_tokens if tokens is not None and base_tokens else None,
                    }
                )
            row["paired"] = paired
            ratios = sorted(x["tokens_ratio"] for x in paired if x["tokens_ratio"] is not None)
            row["paired_reached"] = f"{len(ratios)}/{len(paired)}"
            row["paired_median_ratio"] = _median(ratios)
            if name == "baseline":
                base_reach = {"tokens": row["tokens_to_target"], "train_s": row["seconds_to_target"]}
        summary["variants"][name] = row
    for row in summary["variants"].values():
        for key, base_key in (("tokens_to_target", "tokens"), ("seconds_to_target", "train_s")):
            value, base = row.get(key), base_reach.get(base_key)
            row[key.replace("_to_target", "_ratio")] = value / base if value is not None and base else None
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The Markdown table of :func:`summarise`."""

    def num(x: float | None, fmt: str) -> str:
        return "not reached" if x is None else format(x, fmt)

    lines = [
        "| variant | peak acc (mean ± sd) | final acc | tokens to target | ratio | train s to target | ratio | "
        "per seed: reached, median ratio | total tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["variants"].items():
        lines.append(
            f"| {LABELS.get(name, name)} | {row['peak_mean']:.3f} ± {row['peak_std']:.3f} | {row['final_mean']:.3f} "
            f"| {num(row.get('tokens_to_target'), ',.0f')} | {num(row.get('tokens_ratio'), '.2f')} "
            f"| {num(row.get('seconds_to_target'), '.0f')} | {num(row.get('seconds_ratio'), '.2f')} "
            f"| {row.get('paired_reached', '-')}, {num(row.get('paired_median_ratio'), '.2f')} "
            f"| {row['total_tokens']:,.0f} |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    """Accuracy vs cumulative tokens and vs training seconds, mean over seeds with a ±1 sd band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    target = summary.get("target_acc")
    for key, xlabel, name in (
        ("tokens", "cumulative tokens processed by the decoder", "acc_vs_tokens.png"),
        ("train_s", "training wall clock, s (validation excluded)", "acc_vs_wallclock.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant, row in summary["variants"].items():
            xs = [p[key] for p in row["curve"]]
            ys = [p["acc"] for p in row["curve"]]
            sd = [p["acc_std"] for p in row["curve"]]
            style = {"lw": 2.4, "color": "black"} if variant == "baseline" else {"lw": 1.8}
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=LABELS.get(variant, variant), **style)
            low = [y - s for y, s in zip(ys, sd, strict=True)]
            high = [y + s for y, s in zip(ys, sd, strict=True)]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.12)
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=1, label=f"baseline peak {target:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("multiple-choice accuracy")
        ax.set_title("Time to accuracy, synthetic video QA (CPU)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# Main.


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: every epoch)")
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--cycle", type=int, default=64)
    parser.add_argument("--full", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    parser.add_argument("--root", default=None, help="synthetic set folder (default: the cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--smoke", action="store_true", help="tiny: 40 clips, 16 questions, 1 seed, 2 variants")
    parser.add_argument("--summarise", type=Path, default=None, help="re-summarise a results JSON; no training")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    args = parser().parse_args(argv)
    if args.summarise is not None:
        report = json.loads(args.summarise.read_text(encoding="utf-8"))
        report["summary"] = summarise(report["runs"])
        args.summarise.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        plot(report["summary"], args.summarise.parent)
        print(format_table(report["summary"]))
        print(f"target (peak of the baseline's mean curve): {report['summary']['target_acc']}")
        return 0
    limit, pretrain = None, 250
    if args.smoke:
        args.variants, args.seeds, args.epochs = ["baseline", "regate"], [0], 2
        args.num_train, args.num_val, args.val_every = 40, 16, 0
        args.warmup, args.cycle, args.full = 2, 4, 1
        limit, pretrain = 5, 20
    import torch

    torch.set_num_threads(1)
    from regate_lightning.demo import demo_student

    # Generate the data and pretrain the text LM once, before the workers share them.
    demo_student(args.root, num_train=args.num_train, num_val=args.num_val, pretrain_steps=pretrain)
    configs = [
        RunConfig(
            variant=v,
            seed=s,
            epochs=args.epochs,
            num_train=args.num_train,
            num_val=args.num_val,
            lr=args.lr,
            val_every=args.val_every,
            warmup=args.warmup,
            cycle=args.cycle,
            full=args.full,
            limit_train_batches=limit,
            pretrain_steps=pretrain,
        )
        for s in args.seeds
        for v in args.variants
    ]
    start = time.perf_counter()
    if args.jobs <= 1:
        runs = [_worker(c, args.root) for c in configs]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            runs = list(pool.map(_worker, configs, [args.root] * len(configs)))
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    import lightning
    import transformers

    meta = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; 1 torch thread per "
        f"run, {args.jobs} runs at a time",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "smoke": args.smoke,
    }
    (args.out / "time_to_accuracy.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n", encoding="utf-8"
    )
    pngs = plot(summary, args.out)
    print(format_table(summary))
    print(f"target (peak of the baseline's mean curve): {summary['target_acc']}")
    print(f"wrote {args.out / 'time_to_accuracy.json'}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
