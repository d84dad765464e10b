"""Why the old demo's student never read its video: the demo's baseline, with one of its choices undone at a time.

The demo's student (``recipes/demo.yaml``, no elision) learns the synthetic video QA set. Each ablation
changes one thing back towards the old demo and trains the same 1500 steps (same schedule, data order and
evaluation as ``benchmarks/time_to_accuracy.py``), so its effect on accuracy and on the video gap can be
read directly:

- ``demo``: the demo as it is (frozen tower, projector initialised from the tower's features, 16 tokens
  per frame over 4 frames, 2000 clips);
- ``no_projector_init``: the projector left at its random initialisation (``demo_student(init_clips=0)``);
- ``trainable_tower``: the random vision tower trained with the rest (``freeze_vision_tower: false``);
- ``pooled_8_frames``: the old layout, 2x2-pooled features (4 tokens per frame) over 8 frames;
- ``clips_500``: 500 training clips instead of 2000 (in its own synthetic folder).

Each row also gives the *constant share* of the projector's input before training: the share of the
tower's features' energy in their mean vector on 64 training clips
(:func:`regate_lightning.demo.student.constant_share`; 1 = every token alike).

Usage::

    REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/demo_ablation.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_accuracy as tta

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "demo_ablation"
ABLATIONS: dict[str, dict[str, Any]] = {
    "demo": {},
    "no_projector_init": {"init_clips": 0},
    "trainable_tower": {"freeze_vision_tower": False},
    "pooled_8_frames": {"pool_stride": 2, "num_frames": 8},
    "clips_500": {"num_train": 500},
}
"""Ablation name -> what it changes in the demo's student, module or data."""


@dataclass
class Ablation:
    """One run: an ablation and a seed, with the demo's training settings."""

    name: str
    seed: int
    steps: int = 1500
    val_every: int = 750
    root: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    num_train: int = 2000
    num_val: int = 1000
    pretrain_steps: int = 200


def run_one(run: Ablation) -> dict[str, Any]:
    """Train the demo's baseline with the ablation's change; return its validation points."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from regate_lightning import MLLMModule
    from regate_lightning.data.datamodule import SyntheticVideoQADataModule
    from regate_lightning.demo import demo_student

    changes = dict(run.changes)
    num_train = changes.pop("num_train", run.num_train)
    num_frames = changes.get("num_frames", 4)
    freeze = changes.pop("freeze_vision_tower", True)
    root = run.root
    if num_train != run.num_train:  # another training set: its own folder beside the cache's
        base = root or os.environ.get("REGATE_LIGHTNING_CACHE") or "~/.cache/regate_lightning"
        root = str(Path(base).expanduser() / f"synthetic_{num_train}")
    pl.seed_everything(run.seed, verbose=False)
    size = {"num_train": num_train, "num_val": run.num_val}
    student = demo_student(root, **size, seed=run.seed, pretrain_steps=run.pretrain_steps, **changes)
    from regate_lightning.data.synthetic import ensure_synthetic
    from regate_lightning.demo.student import constant_share, projector_inputs, training_clips

    clips = training_clips(ensure_synthetic(root, **size), student, 64, num_frames)
    share = constant_share(projector_inputs(student, clips))  # the tower's features before training
    module = MLLMModule(
        student,
        freeze_vision_tower=freeze,
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0),
        lr_schedule="cosine",
        warmup_ratio=0.067,
    )
    data = SyntheticVideoQADataModule(root=root, **size, num_frames=num_frames, batch_size=8, val_batch_questions=16)
    data.media_cache = tta._media_cache()
    recorder = tta._recorder_class()(None)
    trainer = tta.quiet_trainer(run.steps, run.val_every, [recorder])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {
        "run": asdict(run),
        "points": recorder.points,
        "constant_share": share,
        "total_s": round(time.perf_counter() - start, 1),
    }


def _worker(run: Ablation) -> dict[str, Any]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = run_one(run)
    last = result["points"][-1]
    print(f"[ablation] {run.name} seed {run.seed}: acc {last['acc']:.3f}, gap {last['video_gap']:.3f}", flush=True)
    return result


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ablation, over seeds: final accuracy (mean, sd), per task, and the video gap."""
    rows = []
    for name in ABLATIONS:
        group = [r for r in results if r["run"]["name"] == name]
        if not group:
            continue
        finals = [r["points"][-1] for r in group]
        accs = [p["acc"] for p in finals]
        rows.append(
            {
                "name": name,
                "seeds": len(group),
                "acc": sum(accs) / len(accs),
                "acc_sd": tta._std(accs),
                "tasks": {t: sum(p.get(f"acc_{t}", math.nan) for p in finals) / len(finals) for t in tta.TASKS},
                "video_gap": sum(p["video_gap"] for p in finals) / len(finals),
                "constant_share": sum(r["constant_share"] for r in group) / len(group),
                "train_s": sum(p["train_s"] for p in finals) / len(finals),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`summarise`."""
    lines = [
        "| ablation | final acc (mean ± sd) | "
        + " | ".join(tta.TASKS)
        + " | video gap (nats) | constant share of the features | train s |",
        "|---|---|" + "---|" * (len(tta.TASKS) + 3),
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['acc']:.3f} ± {row['acc_sd']:.3f} | "
            + " | ".join(f"{row['tasks'][t]:.2f}" for t in tta.TASKS)
            + f" | {row['video_gap']:.3f} | {row['constant_share']:.3f} | {row['train_s']:.0f} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--val-every", type=int, default=750)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", default=None, help="synthetic set folder (default: the cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--smoke", action="store_true", help="tiny: 2 ablations, 40 clips, 16 questions, 4 steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ablations (see the module docstring)."""
    args = parser().parse_args(argv)
    size = {}
    if args.smoke:
        args.ablations, args.seeds, args.steps, args.val_every = ["demo", "no_projector_init"], [0], 4, 2
        size = {"num_train": 40, "num_val": 16, "pretrain_steps": 20}
    runs = [
        Ablation(name, seed, args.steps, args.val_every, args.root, ABLATIONS[name], **size)
        for seed in args.seeds
        for name in args.ablations
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        results = [f.result() for f in as_completed([pool.submit(_worker, r) for r in runs])]
    rows = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        **tta.run_environment(argv, args.jobs),
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average_end": tta._load_average(),
    }
    payload = {"meta": meta, "summary": rows, "runs": results}
    (args.out / "demo_ablation.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
