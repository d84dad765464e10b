"""Time to accuracy on the synthetic video QA set: baseline vs ReGATE, its ablations, random and adaptive elision.

Every run trains the demo's student (:func:`regate_lightning.demo.demo_student`: the text-pretrained
language model in a LLaVA-NeXT-Video with a frozen CLIP tower, 64 video tokens per clip) on the synthetic
moving-shapes set with a real Lightning ``Trainer`` and the real callbacks, for the same number of
optimizer steps (default 1500: 6 epochs of 2000 clips at batch 8, AdamW 2e-3, cosine schedule with 100
warm-up steps, as ``recipes/demo.yaml``), and evaluates multiple-choice accuracy on 1000 questions
every ``--val-every`` steps (default 150: 10 points). A recorder callback notes at every validation: the
optimizer step, the cumulative tokens the decoder processed (the training step's ``num_active``:
every non-padding token for the baseline, the kept ones under elision), the tokens before elision, the
training wall clock so far (validation excluded), ``val/acc`` overall and per task, and ``val/video_gap``
(the answer loss with another clip minus with its own: > 0 means the student reads its video). In
sparse steps it also counts which answer words the selection kept: words that need the video (colour,
shape, direction, count: :func:`regate_lightning.data.synthetic.needs_video`) against the others.

Variants (``--variants``), all with the paper's p = 0.5, beta = 0.9 and W/C/F = 100/128/16:

- ``baseline``: no callback.
- ``regate``: ReGATE, lambda = 0.5; ``ema_only``: lambda = 0; ``ref_only``: lambda = 1.
- ``random``: the same schedule and keep count, candidates chosen at random.
- ``adaptive``: the keep count set per sample by ``AdaptiveSelection`` (the fewest candidates whose fused
  difficulty covers ``--coverage`` of the sample's total).
- ``regate_loss_only``: a diagnostic, not a method: ReGATE's selection applied to the loss only (the elided
  tokens stay in the sequence as context; :func:`loss_mask_from_keep`), which saves nothing; beside
  ``regate`` it separates what elision costs through the missing context from what it costs through the
  missing losses.
- ``visual_{temporal,random}_{0.5,0.25}``: ``VisualTokenElision`` alone (issue 13), keeping that share of
  each clip's video tokens in sparse steps, those that changed most since the previous frame
  (``temporal``) or at random; ``regate+visual_...``: the same with ReGATE. Selected with ``--variants``
  (the default runs the six above).

- ``blind``: a video-blind student: every training sample gets the video of the next sample of its batch
  (:func:`roll_videos`), so its clips say nothing about its answers; validation shows each question its
  own clip. What a student that does not read its video scores.

**Tasks** (``--task``): ``shapes``, the demo's set (short answers, 27 % of a sequence; the defaults above),
and ``descriptions``, the long-answer set (:mod:`regate_lightning.data.synthetic_descriptions`: detailed
descriptions 56-74 % of a sequence, 1200 questions of six kinds), whose default variants are
:data:`ISSUE_22` and whose results go to ``docs/results/time_to_accuracy_descriptions``.

Each (variant, seed) is one run, ``--jobs`` at a time in worker processes with one torch thread each;
``--jobs 1`` runs them one after the other in this process, the variants of one seed back to back, so
that their wall clocks are comparable (each run also records its CPU seconds and the machine's load).
The seed sets the data order and the random vision tower and projector; the synthetic set and the text
language model's pretraining are shared by all runs.

Summary per variant (over seeds): peak and final accuracy (mean, sd), final accuracy per task, the
cumulative tokens and training seconds at which the variant's mean curve first reaches the *target*,
the peak of the baseline's mean curve (ratios to the baseline's own), the same per seed against that
seed's baseline peak, on how many seeds the variant reaches its target before random elision does, the
video gap and the kept-word shares. Reaching is read at the validation points, without interpolation.
For issue 22 also the costs (:data:`COSTS`: decoder tokens, target tokens, training wall clock and CPU
seconds) to the baseline's peak and to the baseline's final accuracy minus one seed sd, on the mean
curves and per seed, and whether ReGATE reaches the latter before random elision.

Usage::

    REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/time_to_accuracy.py --jobs 2
    REGATE_LIGHTNING_CACHE=/tmp/tta_desc nice -n 10 python benchmarks/time_to_accuracy.py --task descriptions --jobs 1
    python benchmarks/time_to_accuracy.py --summarise docs/results/time_to_accuracy/time_to_accuracy.json
    python benchmarks/time_to_accuracy.py --smoke --out /tmp/tta_smoke     # tiny, about a minute
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "time_to_accuracy"
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "shapes": {"steps": 1500, "val_every": 150, "num_train": 2000, "num_val": 1000},
    "descriptions": {"steps": 1500, "val_every": 150, "num_train": 2000, "num_val": 1200},
}
"""Per embedded task: optimizer steps, validation interval, training clips, validation questions."""
NEAR = 0.015
"""The second, looser target: the baseline's peak minus this, one binomial sd of a 1000-question accuracy."""
TASKS = ("colour", "shape", "direction", "count")


@dataclass
class RunConfig:
    """One training run.

    Attributes:
        variant: a key of :data:`VARIANTS`.
        seed: model-init and data-order seed.
        steps: optimizer steps.
        num_train: training clips.
        num_val: multiple-choice questions.
        num_frames: frames per clip.
        batch_size: training batch.
        lr: AdamW learning rate (projector and language model; the tower is frozen).
        warmup_ratio: share of the steps that warm the learning rate up before the cosine decay.
        val_every: validate every this many optimizer steps.
        keep_ratio: p.
        ema_decay: beta.
        warmup: W.
        cycle: C.
        full: F.
        coverage: the adaptive selection's share of the fused difficulty.
        pretrain_steps: text-only pretraining steps of the student's language model (cached).
        root: the synthetic set's folder (None: the cache).
        task: the embedded task: ``"shapes"`` (the demo's, short answers) or ``"descriptions"`` (long answers).
    """

    variant: str
    seed: int
    steps: int = 1500
    num_train: int = 2000
    num_val: int = 1000
    num_frames: int = 4
    batch_size: int = 8
    lr: float = 2e-3
    warmup_ratio: float = 0.067
    val_every: int = 150
    keep_ratio: float = 0.5
    ema_decay: float = 0.9
    warmup: int = 100
    cycle: int = 128
    full: int = 16
    coverage: float = 0.95
    pretrain_steps: int = 200
    root: str | None = None
    task: str = "shapes"


def _regate(config: RunConfig, **overrides: Any) -> list[Any]:
    from regate_lightning import ReGATECallback

    options: dict[str, Any] = {
        "keep_ratio": config.keep_ratio,
        "ema_decay": config.ema_decay,
        "ref_weight": 0.5,
        "warmup_steps": config.warmup,
        "cycle_steps": config.cycle,
        "full_steps": config.full,
        "teacher": "student",
        "seed": config.seed,
    }
    options.update(overrides)
    return [ReGATECallback(**options)]


def _adaptive(config: RunConfig) -> list[Any]:
    from regate_lightning.selection import AdaptiveSelection

    return _regate(config, selection=AdaptiveSelection(coverage=config.coverage))


def _visual(config: RunConfig, keep_ratio: float, selection: str) -> list[Any]:
    from regate_lightning import VisualTokenElision

    return [
        VisualTokenElision(
            keep_ratio=keep_ratio,
            selection=selection,
            warmup_steps=config.warmup,
            cycle_steps=config.cycle,
            full_steps=config.full,
            seed=config.seed,
        )
    ]


def loss_mask_from_keep(batch: dict[str, Any]) -> None:
    """Turn a policy's keep mask into a loss mask, in place: every position stays in the decoder's sequence.

    Position ``t`` kept False means the loss of token ``t + 1`` is not computed; here that token's label
    becomes ``IGNORE_INDEX`` instead, and ``keep_mask`` leaves the batch, so the student sees the whole
    sequence (the elided tokens as context) and learns only from the kept candidates, as ReGATE's selection
    chose them. A diagnostic: it saves no compute.

    >>> import torch
    >>> batch = {"labels": torch.tensor([[-100, 5, 6, 7]]), "keep_mask": torch.tensor([[True, False, True, True]])}
    >>> loss_mask_from_keep(batch)
    >>> batch["labels"], "keep_mask" in batch
    (tensor([[-100,    5, -100,    7]]), False)
    """
    from regate_lightning.keys import KEEP_MASK
    from regate_lightning.targets import IGNORE_INDEX

    keep = batch.pop(KEEP_MASK, None)
    if keep is None:
        return
    labels = batch["labels"].clone()
    labels[:, 1:][~keep[:, :-1].to(labels.device)] = IGNORE_INDEX
    batch["labels"] = labels


def roll_videos(batch: dict[str, Any]) -> None:
    """Give every training sample the video of the next sample of its batch, in place (the last gets the first's).

    The student then trains on clips that say nothing about its answers: a video-blind student, with the
    statistics of real clips (validation still shows each question its own clip).

    >>> import torch
    >>> batch = {"pixel_values_videos": torch.arange(3).view(3, 1)}
    >>> roll_videos(batch)
    >>> batch["pixel_values_videos"].flatten().tolist()
    [1, 2, 0]
    """
    for key in ("pixel_values_videos", "pixel_values"):
        if key in batch:
            batch[key] = batch[key].roll(-1, dims=0)


def _blind(config: RunConfig) -> list[Any]:
    import lightning.pytorch as pl

    class Blind(pl.Callback):
        """Training batches with their videos rolled by one sample (:func:`roll_videos`)."""

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
        ) -> None:
            roll_videos(batch)

    return [Blind()]


def _loss_only(config: RunConfig) -> list[Any]:
    import lightning.pytorch as pl

    class LossOnly(pl.Callback):
        """After ReGATE's plan: its selection applied to the loss only (:func:`loss_mask_from_keep`)."""

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
        ) -> None:
            loss_mask_from_keep(batch)

    return [*_regate(config), LossOnly()]


VARIANTS: dict[str, tuple[str, Callable[[RunConfig], list[Any]]]] = {
    "baseline": ("baseline (all tokens)", lambda c: []),
    "regate": ("ReGATE (lambda 0.5)", _regate),
    "ema_only": ("ReGATE, EMA only (lambda 0)", lambda c: _regate(c, ref_weight=0.0)),
    "ref_only": ("ReGATE, reference only (lambda 1)", lambda c: _regate(c, ref_weight=1.0)),
    "random": ("random elision (same keep count)", lambda c: _regate(c, selection="random")),
    "adaptive": ("ReGATE, adaptive keep count", _adaptive),
    "regate_loss_only": ("ReGATE's selection on the loss only (no elision)", _loss_only),
    "blind": ("video-blind student (each sample trained on another's video)", _blind),
}
"""Variant name -> (label, callbacks for a run)."""
for _ratio in (0.5, 0.25):
    for _selection in ("temporal", "random"):
        _name = f"visual_{_selection}_{_ratio}"
        VARIANTS[_name] = (
            f"visual {_selection} {_ratio}",
            lambda c, r=_ratio, s=_selection: _visual(c, r, s),
        )
        VARIANTS[f"regate+{_name}"] = (
            f"ReGATE + visual {_selection} {_ratio}",
            lambda c, r=_ratio, s=_selection: _visual(c, r, s) + _regate(c),
        )
SMOKE_VARIANTS = ["baseline", "regate", "regate+visual_temporal_0.5"]
ISSUE_9 = ("baseline", "regate", "ema_only", "ref_only", "random", "adaptive")
"""The variants of the learning issue (the default); the visual ones are selected with ``--variants``."""
ISSUE_22 = ("baseline", "regate", "ema_only", "ref_only", "random", "regate+visual_temporal_0.5", "blind")
"""The variants of the long-answer issue (the default of ``--task descriptions``)."""


@dataclass
class RunResult:
    """What one run measured.

    Attributes:
        config: the run.
        points: one dict per validation: ``step``, ``tokens`` (cumulative active), ``tokens_all``
            (cumulative before elision), ``supervised`` (cumulative trained targets), ``train_s``, ``acc``,
            ``acc_<task>``, ``video_gap``.
        kept_words: in sparse steps, candidates whose target needs the video / does not, and how many of
            each were kept: ``visual``, ``visual_kept``, ``text``, ``text_kept``.
        total_s: wall clock of the whole fit, validation included.
        totals: the ReGATE callback's ``totals`` at the end (None without one).
        visual_totals: the visual-token elision callback's ``totals`` at the end (None without one).
        load: the machine's 1-minute load average when the run started and when it ended.
        cpu_s: CPU seconds of the whole fit in this process (validation included).
    """

    config: RunConfig
    points: list[dict[str, float]] = field(default_factory=list)
    kept_words: dict[str, int] = field(default_factory=dict)
    total_s: float = 0.0
    totals: dict[str, int] | None = None
    visual_totals: dict[str, int] | None = None
    load: list[float] = field(default_factory=list)
    cpu_s: float = 0.0


def _recorder_class() -> type:
    import lightning.pytorch as pl
    import torch

    from regate_lightning.data.synthetic import synthetic_task
    from regate_lightning.keys import KEEP_MASK, NUM_ACTIVE, NUM_TARGETS, NUM_TOKENS, VAL, acc_metric, media_gap_metric

    class Recorder(pl.Callback):
        """Cumulative tokens, training seconds (validation excluded), accuracy, video gap and kept words."""

        def __init__(self, regate: Any | None, task: str = "shapes") -> None:
            self.regate = regate
            self.needs_video = synthetic_task(task).needs_video
            self.points: list[dict[str, float]] = []
            self.tokens = self.tokens_all = self.supervised = 0
            self.kept = {"visual": 0, "visual_kept": 0, "text": 0, "text_kept": 0}
            self.visual_ids: torch.Tensor | None = None
            self.start = self.val_s = self._val_start = self._train_s = 0.0
            self.cpu_start = self.val_cpu = self._val_cpu_start = self._train_cpu = 0.0

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            tokenizer = trainer.datamodule.tokenizer
            words = [tokenizer.decode([i]).strip() for i in range(len(tokenizer))]
            size = int(pl_module.model.get_output_embeddings().weight.shape[0])
            self.visual_ids = torch.zeros(size, dtype=torch.bool)
            for i, word in enumerate(words):
                self.visual_ids[i] = word.isalpha() and self.needs_video(word)
            _warm(trainer.datamodule)
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if not isinstance(outputs, dict) or NUM_ACTIVE not in outputs:
                return
            self.tokens += int(outputs[NUM_ACTIVE])
            self.tokens_all += int(outputs[NUM_TOKENS])
            self.supervised += int(outputs[NUM_TARGETS])
            plan = None if self.regate is None else self.regate.last_plan
            if plan is None or not plan.sparse or KEEP_MASK not in batch:
                return
            from regate_lightning.targets import shift_targets

            assert self.visual_ids is not None
            cand = plan.candidates.cpu()
            targets = shift_targets(batch["labels"].cpu()).clamp(min=0)
            visual = self.visual_ids[targets] & cand
            text = cand & ~visual
            keep = batch[KEEP_MASK].cpu()
            self.kept["visual"] += int(visual.sum())
            self.kept["visual_kept"] += int((visual & keep).sum())
            self.kept["text"] += int(text.sum())
            self.kept["text_kept"] += int((text & keep).sum())

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._val_start = time.perf_counter()
            self._train_s = self._val_start - self.start - self.val_s
            self._val_cpu_start = time.process_time()
            self._train_cpu = self._val_cpu_start - self.cpu_start - self.val_cpu

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.val_s += time.perf_counter() - self._val_start
            self.val_cpu += time.process_time() - self._val_cpu_start
            metrics = trainer.callback_metrics
            if trainer.sanity_checking or acc_metric(VAL) not in metrics:
                return
            point = {
                "step": int(trainer.global_step),
                "tokens": self.tokens,
                "tokens_all": self.tokens_all,
                "supervised": self.supervised,
                "train_s": round(self._train_s, 3),
                "train_cpu_s": round(self._train_cpu, 3),
                "acc": float(metrics[acc_metric(VAL)]),
                "video_gap": float(metrics.get(media_gap_metric(VAL, "video"), math.nan)),
            }
            for task in getattr(trainer.datamodule, "task_names", None) or TASKS:
                if acc_metric(VAL, task) in metrics:
                    point[f"acc_{task}"] = float(metrics[acc_metric(VAL, task)])
            self.points.append(point)

    return Recorder


_CACHE: Any = None


def _media_cache() -> Any:
    """One decoded-media cache per worker process, shared by its runs (all read the same clips)."""
    global _CACHE
    if _CACHE is None:
        from regate_lightning.data.datasets import MediaCache

        _CACHE = MediaCache(2 << 30)
    return _CACHE


def quiet_trainer(steps: int, val_every: int, callbacks: list[Any]) -> Any:
    """A CPU ``Trainer`` for ``steps`` optimizer steps that validates every ``val_every`` steps, logs nothing."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _warm(data: Any) -> None:
    """Decode the training clips into the process's media cache (once per process) before timing starts.

    Without it the first run in each worker process pays for decoding every clip inside its training
    time and the runs after it do not (about 20 s of a 120 s run in the 2026-11-30 run), which skews the
    wall clock of whichever variants a worker happens to run first.
    """
    cache = getattr(data, "media_cache", None)
    if cache is not None and len(cache) == 0:
        for index in range(len(data.train_set)):
            data.train_set[index]


def run_one(config: RunConfig) -> RunResult:
    """Train one (variant, seed) in this process (one torch thread) and return its curve."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from regate_lightning import MLLMModule, ReGATECallback, VisualTokenElision
    from regate_lightning.data.datamodule import SyntheticVideoQADataModule
    from regate_lightning.demo import demo_student

    pl.seed_everything(config.seed, verbose=False)
    size = {"num_train": config.num_train, "num_val": config.num_val}
    student = demo_student(
        config.root,
        **size,
        num_frames=config.num_frames,
        pretrain_steps=config.pretrain_steps,
        seed=config.seed,
        task=config.task,
    )
    module = MLLMModule(
        student,
        freeze_vision_tower=True,
        optimizer=lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0),
        lr_schedule="cosine",
        warmup_ratio=config.warmup_ratio,
    )
    data = SyntheticVideoQADataModule(
        root=config.root,
        **size,
        task=config.task,
        num_frames=config.num_frames,
        batch_size=config.batch_size,
        val_batch_questions=16,
    )
    data.media_cache = _media_cache()
    callbacks = VARIANTS[config.variant][1](config)
    regate = next((c for c in callbacks if isinstance(c, ReGATECallback)), None)
    recorder = _recorder_class()(regate, config.task)
    trainer = quiet_trainer(config.steps, config.val_every, [*callbacks, recorder])
    start, cpu, load = time.perf_counter(), time.process_time(), _load_average()
    trainer.fit(module, datamodule=data)
    result = RunResult(config, recorder.points, dict(recorder.kept), round(time.perf_counter() - start, 3))
    result.load = [(load or [math.nan])[0], (_load_average() or [math.nan])[0]]
    result.cpu_s = round(time.process_time() - cpu, 3)
    if regate is not None:
        result.totals = dict(regate.totals)
    visual = next((c for c in callbacks if isinstance(c, VisualTokenElision)), None)
    if visual is not None:
        result.visual_totals = dict(visual.totals)
    return result


def _worker(config: RunConfig) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = run_one(config)
    last = result.points[-1] if result.points else {}
    print(
        f"[tta] {config.variant} seed {config.seed}: "
        + ", ".join(f"{p['step']}:{p['acc']:.3f}" for p in result.points)
        + f"; gap {last.get('video_gap', math.nan):.3f} ({result.total_s:.0f} s)",
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


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


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
                "tokens": _mean([p["tokens"] for p in pts]),
                "supervised": _mean([p.get("supervised", math.nan) for p in pts]),
                "train_s": _mean([p["train_s"] for p in pts]),
                "train_cpu_s": _mean([p.get("train_cpu_s", math.nan) for p in pts]),
                "acc": _mean(accs),
                "acc_std": _std(accs),
            }
        )
    return out


def _video_share(group: list[dict[str, Any]]) -> float | None:
    """Video tokens the decoder processed / video tokens, over the run (visual elision variants)."""
    totals = [r.get("visual_totals") for r in group if r.get("visual_totals")]
    seen = sum(t["visual"] for t in totals)
    return sum(t["visual_kept"] for t in totals) / seen if seen else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: accuracy, tokens and seconds to the baseline's peak, ratios, wins against random."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["points"]:
            by_variant.setdefault(r["config"]["variant"], []).append(r)
    for group in by_variant.values():
        group.sort(key=lambda r: r["config"]["seed"])
    base_runs = by_variant.get("baseline", [])
    seed_targets = {r["config"]["seed"]: max(p["acc"] for p in r["points"]) for r in base_runs}
    base_tokens = {
        r["config"]["seed"]: _first_reach(r["points"], seed_targets[r["config"]["seed"]], "tokens") for r in base_runs
    }
    target = max(p["acc"] for p in _mean_curve(base_runs)) if base_runs else None
    base_finals = [r["points"][-1]["acc"] for r in base_runs]
    summary: dict[str, Any] = {
        "task": runs[0]["config"].get("task", "shapes") if runs else None,
        "target_acc": target,
        "baseline_final_mean": _mean(base_finals) if base_finals else None,
        "baseline_final_sd": _std(base_finals) if base_finals else None,
        "variants": {},
    }
    reach: dict[str, dict[int, float | None]] = {}
    near: dict[str, dict[int, float | None]] = {}
    for name in [v for v in VARIANTS if v in by_variant] + [v for v in by_variant if v not in VARIANTS]:
        group = by_variant[name]
        curve = _mean_curve(group)
        peaks = [max(p["acc"] for p in r["points"]) for r in group]
        finals = [r["points"][-1]["acc"] for r in group]
        kept = {
            k: sum(r.get("kept_words", {}).get(k, 0) for r in group)
            for k in ("visual", "visual_kept", "text", "text_kept")
        }
        row: dict[str, Any] = {
            "seeds": [r["config"]["seed"] for r in group],
            "peak_mean": _mean(peaks),
            "peak_sd": _std(peaks),
            "final_mean": _mean(finals),
            "final_sd": _std(finals),
            "final_tasks": {
                t: _mean([r["points"][-1].get(f"acc_{t}", math.nan) for r in group]) for t in _tasks(group)
            },
            "video_gap": _mean([r["points"][-1].get("video_gap", math.nan) for r in group]),
            "total_tokens": _mean([r["points"][-1]["tokens"] for r in group]),
            "total_tokens_all": _mean([r["points"][-1]["tokens_all"] for r in group]),
            "total_train_s": _mean([r["points"][-1]["train_s"] for r in group]),
            "kept_visual_share": kept["visual_kept"] / kept["visual"] if kept["visual"] else None,
            "video_tokens_kept": _video_share(group),
            "kept_text_share": kept["text_kept"] / kept["text"] if kept["text"] else None,
            "curve": curve,
        }
        row["tokens_to_level"] = {f"{level:.2f}": _first_reach(curve, level, "tokens") for level in LEVELS}
        if target is not None:
            row["tokens_to_near"] = _first_reach(curve, target - NEAR, "tokens")
            row["seconds_to_near"] = _first_reach(curve, target - NEAR, "train_s")
            row["tokens_to_target"] = _first_reach(curve, target, "tokens")
            row["seconds_to_target"] = _first_reach(curve, target, "train_s")
            row["step_to_target"] = _first_reach(curve, target, "step")
            paired, reach[name], near[name] = [], {}, {}
            for r in group:
                seed = r["config"]["seed"]
                if seed not in seed_targets:
                    continue
                tokens = _first_reach(r["points"], seed_targets[seed], "tokens")
                reach[name][seed] = tokens
                near[name][seed] = _first_reach(r["points"], seed_targets[seed] - NEAR, "tokens")
                base = base_tokens[seed]
                paired.append(
                    {
                        "seed": seed,
                        "target": seed_targets[seed],
                        "tokens": tokens,
                        "train_s": _first_reach(r["points"], seed_targets[seed], "train_s"),
                        "tokens_ratio": tokens / base if tokens is not None and base else None,
                    }
                )
            row["paired"] = paired
            ratios = [x["tokens_ratio"] for x in paired if x["tokens_ratio"] is not None]
            row["paired_reached"] = f"{len(ratios)}/{len(paired)}"
            row["paired_median_ratio"] = _median(ratios)
        summary["variants"][name] = row
    base_row = summary["variants"].get("baseline", {})
    for name, row in summary["variants"].items():
        for key in ("tokens", "seconds"):
            for goal, suffix in (("target", ""), ("near", "_near")):
                value, base = row.get(f"{key}_to_{goal}"), base_row.get(f"{key}_to_{goal}")
                row[f"{key}_ratio{suffix}"] = value / base if value is not None and base else None
        if "random" in reach and name in reach and name not in ("random", "baseline"):
            row["before_random"] = _wins(reach[name], reach["random"])
            row["before_random_near"] = _wins(near[name], near["random"])
    summary["floor"] = _floor_summary(by_variant, summary)
    by_seed = {name: {r["config"]["seed"]: r["points"][-1]["acc"] for r in group} for name, group in by_variant.items()}
    summary["paired_final"] = [
        {"a": a, "b": b, **_paired(by_seed[a], by_seed[b])} for a, b in PAIRS if a in by_seed and b in by_seed
    ]
    return summary


COSTS = ("tokens", "supervised", "train_s", "train_cpu_s")
"""What reaching an accuracy costs: decoder tokens, target tokens (supervised answer tokens whose loss was
computed: the paper's counter), training wall clock and training CPU seconds (validation excluded)."""


def _floor_summary(by_variant: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> dict[str, Any]:
    """Costs to the baseline's peak and to its final accuracy minus one seed sd (the *floor*), per variant.

    For each goal (``peak``: the peak of the baseline's mean curve; ``floor``: the baseline's mean final accuracy
    minus its seed sd) and each of :data:`COSTS`: the cost at which the variant's mean curve first reaches the
    goal, its ratio to the baseline's, the per-seed ratios (each seed against the baseline of the same seed,
    both reaching the same goal) with their median, and on how many seeds the variant reaches the floor with
    fewer decoder tokens than random elision of the same seed.
    """
    base = by_variant.get("baseline")
    if not base or summary.get("target_acc") is None:
        return {}
    goals = {"peak": summary["target_acc"], "floor": summary["baseline_final_mean"] - summary["baseline_final_sd"]}
    out: dict[str, Any] = {"goals": goals, "variants": {}}
    base_curve = _mean_curve(base)
    base_seed = {r["config"]["seed"]: r for r in base}
    reach_floor: dict[str, dict[int, float | None]] = {}
    for name, group in by_variant.items():
        curve = _mean_curve(group)
        row: dict[str, Any] = {}
        for goal, level in goals.items():
            cell: dict[str, Any] = {}
            for cost in COSTS:
                mine, theirs = _first_reach(curve, level, cost), _first_reach(base_curve, level, cost)
                ratios = []
                for r in group:
                    other = base_seed.get(r["config"]["seed"])
                    a = _first_reach(r["points"], level, cost) if cost in r["points"][0] else None
                    b = _first_reach(other["points"], level, cost) if other and cost in other["points"][0] else None
                    if a is not None and b:
                        ratios.append(a / b)
                cell[cost] = mine
                cell[f"{cost}_ratio"] = mine / theirs if mine is not None and theirs else None
                cell[f"{cost}_seed_ratios"] = ratios
                cell[f"{cost}_seed_median"] = _median(ratios)
            cell["seeds_reached"] = sum(_first_reach(r["points"], level, "tokens") is not None for r in group)
            cell["seeds"] = len(group)
            row[goal] = cell
        reach_floor[name] = {r["config"]["seed"]: _first_reach(r["points"], goals["floor"], "tokens") for r in group}
        out["variants"][name] = row
    if "random" in reach_floor:
        for name, row in out["variants"].items():
            if name not in ("random", "baseline"):
                row["floor_before_random"] = _wins(reach_floor[name], reach_floor["random"])
    return out


def format_floor_table(summary: dict[str, Any]) -> str:
    """Markdown: per variant, the costs to the baseline's peak and to its final minus one sd (ratios to its)."""
    floor = summary.get("floor") or {}
    if not floor:
        return ""
    goals = floor["goals"]
    lines = [
        f"Costs to the baseline's peak ({goals['peak']:.3f}) and to its final accuracy minus one seed sd "
        f"({goals['floor']:.3f}), on the mean curves (ratio to the baseline's; per seed: median ratio):",
        "",
        "| variant | goal | reached (seeds) | decoder tokens (ratio; per seed) | target tokens (ratio; per seed) "
        "| wall s (ratio; per seed) | CPU s (ratio; per seed) | before random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in floor["variants"].items():
        for goal in ("peak", "floor"):
            cell = row[goal]
            parts = []
            for cost, fmt in (("tokens", ",.0f"), ("supervised", ",.0f"), ("train_s", ".0f"), ("train_cpu_s", ".0f")):
                parts.append(
                    f"{_num(cell[cost], fmt)} ({_num(cell[f'{cost}_ratio'], '.2f')}; "
                    f"{_num(cell[f'{cost}_seed_median'], '.2f')})"
                )
            label = VARIANTS[name][0] if name in VARIANTS else name
            wins = row.get("floor_before_random", "-") if goal == "floor" else "-"
            lines.append(
                f"| {label} | {goal} | {cell['seeds_reached']}/{cell['seeds']} | " + " | ".join(parts) + f" | {wins} |"
            )
    return "\n".join(lines)


LEVELS = (0.7, 0.8, 0.85, 0.9)
"""Fixed accuracies at which every variant's mean curve is read (tokens to reach them), beside the baseline's peak."""

PAIRS = (
    ("regate", "random"),
    ("regate", "baseline"),
    ("ema_only", "regate"),
    ("ref_only", "regate"),
    ("adaptive", "regate"),
    ("regate_loss_only", "regate"),
    ("regate_loss_only", "baseline"),
    ("visual_temporal_0.5", "visual_random_0.5"),
    ("visual_temporal_0.25", "visual_random_0.25"),
    ("regate+visual_temporal_0.5", "regate+visual_random_0.5"),
    ("regate+visual_temporal_0.5", "baseline"),
    ("baseline", "blind"),
    ("random", "baseline"),
    ("ema_only", "baseline"),
    ("ref_only", "baseline"),
)
"""Variant pairs whose final accuracies are compared seed by seed (same data order, same initial weights)."""


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """``a - b`` per common seed: mean, standard error of the mean, and on how many seeds ``a`` is higher.

    >>> r = _paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.8, 2: 0.6})
    >>> (round(r["mean"], 3), round(r["se"], 3), r["higher"], r["seeds"])
    (0.067, 0.033, 2, 3)
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean = _mean(diffs) if diffs else math.nan
    se = _std(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"seeds": len(seeds), "mean": mean, "se": se, "higher": sum(d > 0 for d in diffs), "diffs": diffs}


def _wins(mine: dict[int, float | None], random: dict[int, float | None]) -> str:
    """On how many seeds (of those both ran) ``mine`` reached its target with fewer tokens than random."""
    seeds = [s for s in mine if s in random]
    wins = [s for s in seeds if mine[s] is not None and (random[s] is None or mine[s] < random[s])]
    return f"{len(wins)}/{len(seeds)}"


def _tasks(runs: list[dict[str, Any]]) -> list[str]:
    """The question types the runs' validation points report (``acc_<task>``), in their order.

    >>> _tasks([{"points": [{"acc": 0.5, "acc_order": 0.4, "acc_shape": 0.6}]}])
    ['order', 'shape']
    """
    names: dict[str, None] = {}
    for run in runs:
        for point in run["points"][-1:]:
            names.update((k.removeprefix("acc_"), None) for k in point if k.startswith("acc_"))
    return list(names)


def _num(x: float | None, fmt: str) -> str:
    return "not reached" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_table(summary: dict[str, Any]) -> str:
    """The Markdown tables of :func:`summarise`: time to accuracy, then final accuracy per task and kept words."""
    lines = [
        "| variant | peak acc | final acc | tokens to target | ratio | train s to target | ratio | per seed: "
        f"reached, median ratio | before random | to target - {NEAR}: tokens ratio, s ratio, before random "
        "| total tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["variants"].items():
        lines.append(
            f"| {VARIANTS[name][0] if name in VARIANTS else name} | {row['peak_mean']:.3f} ± {row['peak_sd']:.3f} "
            f"| {row['final_mean']:.3f} ± {row['final_sd']:.3f} "
            f"| {_num(row.get('tokens_to_target'), ',.0f')} | {_num(row.get('tokens_ratio'), '.2f')} "
            f"| {_num(row.get('seconds_to_target'), '.0f')} | {_num(row.get('seconds_ratio'), '.2f')} "
            f"| {row.get('paired_reached', '-')}, {_num(row.get('paired_median_ratio'), '.2f')} "
            f"| {row.get('before_random', '-')} "
            f"| {_num(row.get('tokens_ratio_near'), '.2f')}, {_num(row.get('seconds_ratio_near'), '.2f')}, "
            f"{row.get('before_random_near', '-')} | {row['total_tokens']:,.0f} |"
        )
    tasks = list(next(iter(summary["variants"].values()), {}).get("final_tasks", {}))
    lines += [
        "",
        "| variant | "
        + " | ".join(f"final {t}" for t in tasks)
        + " | video gap | kept: answer words that need the video | kept: other answer words | video tokens kept |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    for name, row in summary["variants"].items():
        shares = [row.get("kept_visual_share"), row.get("kept_text_share"), row.get("video_tokens_kept")]
        lines.append(
            f"| {VARIANTS[name][0] if name in VARIANTS else name} | "
            + " | ".join(_num(row["final_tasks"].get(t), ".3f") for t in tasks)
            + f" | {_num(row['video_gap'], '.3f')} | "
            + " | ".join("-" if s is None else f"{100 * s:.1f} %" for s in shares)
            + " |"
        )
    levels = list(summary["variants"].get("baseline", {}).get("tokens_to_level", {}))
    if levels:
        base = summary["variants"]["baseline"]["tokens_to_level"]
        lines += [
            "",
            "| variant | " + " | ".join(f"tokens to {lv} (ratio)" for lv in levels) + " |",
            "|---|" + "---|" * len(levels),
        ]
        for name, row in summary["variants"].items():
            cells = []
            for lv in levels:
                mine, theirs = row["tokens_to_level"].get(lv), base.get(lv)
                ratio = f" ({mine / theirs:.2f})" if mine is not None and theirs else ""
                cells.append(f"{_num(mine, ',.0f')}{ratio}")
            lines.append(f"| {VARIANTS[name][0] if name in VARIANTS else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_long_answers(summary: dict[str, Any]) -> list[str]:
    """Issue 22's targets on the long-answer task, each checked against the summary, in plain words."""
    rows, floor = summary["variants"], summary.get("floor") or {}
    base, blind = rows.get("baseline"), rows.get("blind")
    if base is None:
        return ["no baseline run: nothing to compare"]
    out = [
        f"the baseline learns the task and reads its video: final accuracy {base['final_mean']:.3f} ± "
        f"{base['final_sd']:.3f}, video gap {_num(base['video_gap'], '.3f')} nats per answer token"
    ]
    if blind is not None:
        gap = base["final_mean"] - blind["final_mean"]
        noise = max(base["final_sd"], blind["final_sd"])
        out.append(
            f"a video-blind student (trained on other samples' videos) ends at {blind['final_mean']:.3f} ± "
            f"{blind['final_sd']:.3f} (video gap {_num(blind['video_gap'], '.3f')}): the baseline is {gap:+.3f} above "
            f"it, {gap / noise if noise else math.inf:.0f} times the larger seed sd"
        )
    cell = (floor.get("variants", {}).get("regate") or {}).get("floor")
    if cell is None:
        return out
    goal = floor["goals"]["floor"]
    for cost, limit, what in (
        ("tokens", 0.70, "decoder tokens"),
        ("supervised", 0.55, "target tokens"),
        ("train_s", 0.75, "wall clock"),
    ):
        ratio, median = cell[f"{cost}_ratio"], cell[f"{cost}_seed_median"]
        met = ratio is not None and ratio <= limit
        out.append(
            f"ReGATE reaches the baseline's final minus one sd ({goal:.3f}) with {_num(ratio, '.2f')} of its {what} "
            f"on the mean curves (per seed: median {_num(median, '.2f')}; target <= {limit:.2f}): "
            + ("met" if met else "missed")
        )
    cpu = cell["train_cpu_s_ratio"]
    out.append(f"the same in CPU seconds (less sensitive to the other jobs on the machine): {_num(cpu, '.2f')}")
    wins = floor["variants"]["regate"].get("floor_before_random", "-")
    won = int(wins.split("/")[0]) if "/" in wins else 0
    out.append(
        f"ReGATE reaches it with fewer decoder tokens than random elision on {wins} seeds (target >= 4 of 5): "
        + ("met" if won >= 4 else "missed")
    )
    return out


def verdict(summary: dict[str, Any]) -> list[str]:
    """The issue's targets, each checked against the summary, in plain words."""
    if summary.get("task") == "descriptions":
        return verdict_long_answers(summary)
    out = []
    rows = summary["variants"]
    base, regate = rows.get("baseline"), rows.get("regate")
    if base is None:
        return ["no baseline run: nothing to compare"]
    out.append(
        f"the student reads its video: baseline video gap {_num(base['video_gap'], '.3f')} nats per answer token, "
        f"final accuracy {base['final_mean']:.3f} ± {base['final_sd']:.3f} (chance 0.25)"
    )
    if regate is None:
        return out
    ratio = regate.get("tokens_ratio")
    out.append(
        f"ReGATE {_reached(ratio)} the baseline's peak ({summary['target_acc']:.3f}) on the mean curve "
        "(target: with <= 60 % of its tokens): " + ("met" if ratio is not None and ratio <= 0.60 else "missed")
    )
    wins = regate.get("before_random", "-")
    won = int(wins.split("/")[0]) if "/" in wins else 0
    out.append(f"ReGATE before random elision on {wins} seeds (target >= 4 of 5): {'met' if won >= 4 else 'missed'}")
    floor = summary["baseline_final_mean"] - summary["baseline_final_sd"]
    out.append(
        f"ReGATE's final accuracy {regate['final_mean']:.3f} vs the baseline's final minus one seed sd {floor:.3f}: "
        + ("met" if regate["final_mean"] >= floor else "missed")
    )
    both = rows.get("regate+visual_temporal_0.5")
    if both is not None:
        ratio_both = both.get("tokens_ratio")
        floor = summary["baseline_final_mean"] - summary["baseline_final_sd"]
        out.append(
            f"ReGATE + temporal visual elision at 0.5 {_reached(ratio_both)} the baseline's peak "
            "(target: with <= 40 % of its tokens): "
            + ("met" if ratio_both is not None and ratio_both <= 0.40 else "missed")
            + f"; final accuracy {both['final_mean']:.3f} vs the baseline's minus one seed sd {floor:.3f}: "
            + ("met" if both["final_mean"] >= floor else "missed")
        )
    for name in ("adaptive",):
        if name in rows:
            r = rows[name]
            out.append(
                f"{VARIANTS[name][0]}: tokens ratio {_num(r.get('tokens_ratio'), '.2f')} (ReGATE "
                f"{_num(ratio, '.2f')}), final {r['final_mean']:.3f}, total tokens {r['total_tokens']:,.0f} (ReGATE "
                f"{regate['total_tokens']:,.0f})"
            )
    return out


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    """Accuracy vs cumulative tokens and vs training seconds, mean over seeds with a ±1 sd band.

    One pair of figures for the learning issue's variants (``acc_vs_*.png``) and, when the summary has
    visual-token elision variants, one for them beside the baseline and ReGATE (``visual_acc_vs_*.png``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = summary["variants"]
    groups = [("", [v for v in rows if not v.startswith(("visual", "regate+visual"))])]
    visual = [v for v in rows if v.startswith(("visual", "regate+visual"))]
    if visual:
        groups.append(("visual_", [v for v in ("baseline", "regate") if v in rows] + visual))
    written = []
    target = summary.get("target_acc")
    for prefix, variants in groups:
        for key, xlabel, name in (
            ("tokens", "cumulative tokens processed by the decoder", "acc_vs_tokens.png"),
            ("train_s", "training wall clock, s (validation excluded)", "acc_vs_wallclock.png"),
        ):
            fig, ax = plt.subplots(figsize=(7.6, 4.8))
            for variant in variants:
                row = rows[variant]
                xs = [p[key] for p in row["curve"]]
                ys = [p["acc"] for p in row["curve"]]
                sd = [p["acc_std"] for p in row["curve"]]
                style = {"lw": 2.4, "color": "black"} if variant == "baseline" else {"lw": 1.5}
                if variant.startswith("regate+"):
                    style["ls"] = "--"
                label = VARIANTS[variant][0] if variant in VARIANTS else variant
                (line,) = ax.plot(xs, ys, marker="o", ms=3, label=label, **style)
                low = [y - s for y, s in zip(ys, sd, strict=True)]
                high = [y + s for y, s in zip(ys, sd, strict=True)]
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.10)
            if target is not None:
                ax.axhline(target, color="grey", ls=":", lw=1, label=f"baseline peak {target:.3f}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("multiple-choice accuracy")
            ax.set_title("Time to accuracy, synthetic video QA (CPU), mean ± sd over seeds", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{prefix}{name}"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def _report(summary: dict[str, Any]) -> str:
    return "\n".join(
        [format_table(summary), "", format_floor_table(summary), ""]
        + [f"target (peak of the baseline's mean curve): {summary['target_acc']}", ""]
        + [f"- {line}" for line in verdict(summary)]
        + ["", "final accuracy, paired by seed (a - b: mean ± standard error; seeds where a is higher):"]
        + [
            f"- {p['a']} - {p['b']}: {p['mean']:+.3f} ± {p['se']:.3f} ({p['higher']}/{p['seeds']} seeds)"
            for p in summary.get("paired_final", [])
        ]
    )


# --------------------------------------------------------------------------------------------------
# Main.


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: the task's (ISSUE_9, ISSUE_22)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--task", default="shapes", choices=list(TASK_DEFAULTS), help="the embedded task (sets the defaults below)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the task's)")
    parser.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: the task's)")
    parser.add_argument("--num-train", type=int, default=None, help="training clips (default: the task's)")
    parser.add_argument("--num-val", type=int, default=None, help="validation questions (default: the task's)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--coverage", type=float, default=0.95)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--cycle", type=int, default=128)
    parser.add_argument("--full", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    parser.add_argument("--root", default=None, help="synthetic set folder (default: the cache)")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/results/time_to_accuracy[_<task>]")
    parser.add_argument("--smoke", action="store_true", help="tiny: 40 clips, 16 questions, 1 seed, 3 variants")
    parser.add_argument("--summarise", type=Path, default=None, help="re-summarise a results JSON; no training")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="results JSONs (or runs.partial.jsonl files) of runs made apart, summarised together into OUT; no "
        "training. Refused where two files hold the same (variant, seed) or settings other than variant and seed "
        "differ",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs in OUT/runs.partial.jsonl whose configuration matches one planned; run the rest",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    args = parser().parse_args(argv)
    if args.summarise is not None:
        report = json.loads(args.summarise.read_text(encoding="utf-8"))
        _publish(args.summarise, report["meta"], report["runs"])
        return 0
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = DEFAULT_OUT if args.task == "shapes" else DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}_{args.task}")
    if args.combine is not None:
        return _combine(args.combine, args.out, argv)
    if args.variants is None:
        args.variants = list(ISSUE_22 if args.task == "descriptions" else ISSUE_9)
    pretrain = 200
    if args.smoke:
        args.variants, args.seeds, args.steps, args.val_every = SMOKE_VARIANTS, [0], 10, 5
        args.num_train, args.num_val = 40, 16
        args.warmup, args.cycle, args.full = 2, 4, 1
        pretrain = 20
    import torch

    torch.set_num_threads(1)
    from regate_lightning.demo import demo_student

    # Generate the data and pretrain the text LM once, before the workers share them.
    demo_student(args.root, num_train=args.num_train, num_val=args.num_val, pretrain_steps=pretrain, task=args.task)
    configs = [
        RunConfig(
            variant=v,
            seed=s,
            steps=args.steps,
            num_train=args.num_train,
            num_val=args.num_val,
            lr=args.lr,
            val_every=args.val_every,
            keep_ratio=args.keep_ratio,
            warmup=args.warmup,
            cycle=args.cycle,
            full=args.full,
            coverage=args.coverage,
            pretrain_steps=pretrain,
            root=args.root,
            task=args.task,
        )
        for s in args.seeds
        for v in args.variants
    ]
    start = time.perf_counter()
    load_start = _load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "runs.partial.jsonl"  # each finished run, as it finishes: a crash keeps the others
    runs = _resumed(partial, configs) if args.resume else []
    done = {(r["config"]["variant"], r["config"]["seed"]) for r in runs}
    if runs:
        print(f"[tta] resuming: {len(runs)} finished runs kept from {partial}, {len(configs) - len(runs)} to run")
    else:
        partial.unlink(missing_ok=True)
    todo = [c for c in configs if (c.variant, c.seed) not in done]

    def keep(run: dict[str, Any]) -> None:
        runs.append(run)
        with open(partial, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(run) + "\n")

    if args.jobs <= 1:
        for config in todo:
            keep(_worker(config))
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_worker, c) for c in todo]):
                keep(future.result())
    order = {(c.variant, c.seed): i for i, c in enumerate(configs)}
    runs.sort(key=lambda r: order[(r["config"]["variant"], r["config"]["seed"])])
    meta = {
        **run_environment(argv, args.jobs),
        "load_average": {"start": load_start, "end": _load_average()},
        "wall_s": round(time.perf_counter() - start, 1),
        "resumed_runs": len(done),
        "smoke": args.smoke,
    }
    _publish(args.out / "time_to_accuracy.json", meta, runs)
    partial.unlink(missing_ok=True)
    return 0


def _publish(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Summarise ``runs``, write the result (meta, summary, runs) to ``path`` and its plots beside it, and print
    the report: what a run, ``--summarise`` and ``--combine`` end with."""
    summary = summarise(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n", encoding="utf-8")
    pngs = plot(summary, path.parent)
    print(_report(summary))
    print(f"wrote {path} from {len(runs)} runs" + "".join(f", {p}" for p in pngs))


def _runs_of(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The runs of a results JSON (with its ``meta``) or of a ``runs.partial.jsonl`` (one run per line, no meta)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        runs = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{number}: not a JSON run ({err}); remove the line or run it again") from None
        return runs, None
    report = json.loads(text)
    return report["runs"], report.get("meta")


def _combine(paths: list[Path], out: Path, argv: list[str] | None) -> int:
    """Summarise runs made by several invocations (other seeds or variants, resumed elsewhere) as one result.

    Every run must have been made with the same settings apart from its variant and seed (steps, data, keep
    ratio, task, ...), and no (variant, seed) may come twice: either is refused naming the two files.
    """
    runs: list[dict[str, Any]] = []
    where: dict[tuple[str, int], Path] = {}
    sources = []
    reference: tuple[dict[str, Any], Path] | None = None
    for path in paths:
        found, meta = _runs_of(path)
        sources.append({"file": str(path), "runs": len(found), "meta": meta})
        for run in found:
            config = run["config"]
            key = (config["variant"], config["seed"])
            if key in where:
                raise SystemExit(f"--combine: {key[0]} seed {key[1]} is in both {where[key]} and {path}; keep one")
            settings = {k: v for k, v in config.items() if k not in ("variant", "seed")}
            if reference is None:
                reference = (settings, path)
            elif settings != reference[0]:
                differ = sorted(
                    k for k in settings.keys() | reference[0].keys() if settings.get(k) != reference[0].get(k)
                )
                raise SystemExit(
                    f"--combine: {key[0]} seed {key[1]} in {path} was made with other settings than the runs of "
                    f"{reference[1]} ({', '.join(differ)}); runs of one result must differ only in variant and seed"
                )
            where[key] = path
            runs.append(run)
    order = {name: i for i, name in enumerate(VARIANTS)}
    runs.sort(key=lambda r: (order.get(r["config"]["variant"], len(order)), r["config"]["seed"]))
    meta = {**run_environment(argv, 0), "combined_from": sources}
    meta.pop("machine")  # the runs' machines are their sources' (a .jsonl file records none)
    _publish(out / "time_to_accuracy.json", meta, runs)
    return 0


def _reached(ratio: float | None) -> str:
    """How a variant meets the baseline's peak, in words: with what share of the baseline's tokens, or not."""
    return "does not reach" if ratio is None else f"reaches with {100 * ratio:.0f} % of the baseline's tokens"


def _resumed(partial: Path, configs: list[RunConfig]) -> list[dict[str, Any]]:
    """The finished runs in ``partial`` whose configuration is exactly one of ``configs`` (the others are dropped).

    A run made with other settings (steps, data size, keep ratio, ...) never enters this run's summary.
    """
    if not partial.exists():
        return []
    planned = {(c.variant, c.seed): asdict(c) for c in configs}
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for number, line in enumerate(partial.read_text(encoding="utf-8").splitlines(), 1):
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            print(f"[tta] {partial}:{number}: not a JSON run (a run cut short while written?); it is run again")
            continue
        key = (run["config"]["variant"], run["config"]["seed"])
        if planned.get(key) == run["config"]:
            kept[key] = run
        else:
            print(f"[tta] {partial}:{number}: {key[0]} seed {key[1]} was made with other settings; not kept")
    return list(kept.values())


def run_environment(argv: list[str] | None, jobs: int) -> dict[str, Any]:
    """When, with what command, on what machine and with which library versions a benchmark ran."""
    import lightning
    import torch
    import transformers

    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; 1 torch thread per "
        f"run, {jobs} runs at a time",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
