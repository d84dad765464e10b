"""ReGATE under FSDP and DeepSpeed on one GPU: the strategy checks that ``benchmarks/gpu.sh`` runs.

Lightning refuses both strategies without CUDA; the test suite runs them on two CPU processes through
test-only subclasses (``regate_lightning.testing.strategies``, ``tests/test_scale.py``), and this script
checks Lightning's own classes on a real GPU, with bf16 and the GPU's kernels. Each
scenario fits a tiny LLaVA with ``ReGATECallback(teacher="student")`` for 3 optimizer steps (full,
sparse, full) on one GPU and asserts:

* ``check_strategy`` accepted the strategy as the expected kind, and the strategy wrapped the student
  (an FSDP module, or a DeepSpeed engine);
* the teacher is a whole, plain module: no FSDP wrapper, no ZeRO-3 partitioned or DTensor parameter,
  on the GPU, with as many parameters as the student's language backbone and head had before
  wrapping, and in the student's stored dtype;
* the store is filled: every sample seen has finite reference losses, the EMA was measured, the
  sparse step wrote a keep mask, and the teacher ran once per sample.

Scenarios: FSDP ``32-true``; FSDP ``bf16-mixed``; DeepSpeed ZeRO stage 2 and stage 3 (``bf16-mixed``),
only when ``import deepspeed`` works, else ``deepspeed not installed: skipped``. Every scenario runs
even if an earlier one failed. Results go to ``$OUT/gpu_strategies.json`` (``$OUT`` defaults to
``./gpu_results``); the exit status is 1 when any scenario failed.

``--cpu-smoke`` runs the same checks with the single-device strategy on the CPU (a few seconds), to
check this script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `regate_lightning` importable
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402

from regate_lightning import MLLMModule, ReGATECallback  # noqa: E402
from regate_lightning.families import resolve  # noqa: E402
from regate_lightning.keys import KEEP_MASK  # noqa: E402
from regate_lightning.strategies import check_strategy, sharded_reason  # noqa: E402
from regate_lightning.testing import quiet_trainer, tiny  # noqa: E402
from regate_lightning.testing.datamodule import RandomDataModule  # noqa: E402

STEPS = 3
BATCH = 2
SCHEDULE = {"keep_ratio": 0.5, "warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}  # full, sparse, full


class Probe(pl.Callback):
    """Placed after ReGATE: records the strategy kind, the backbone size before wrapping and the teacher."""

    def __init__(self, regate: ReGATECallback) -> None:
        self.regate = regate
        self.kind = ""
        self.backbone_numel = 0
        self.keep_masks: list[bool] = []
        self.teacher: dict[str, Any] = {}
        self.wrapper = ""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Still before ``strategy.setup``: the student is whole."""
        self.kind = check_strategy(trainer)
        parts = resolve(pl_module.model)
        params = {id(p): p for m in (parts.decoder, parts.lm_head) for p in m.parameters()}
        self.backbone_numel = sum(p.numel() for p in params.values())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """Whether ReGATE wrote a keep mask into this batch."""
        self.keep_masks.append(KEEP_MASK in batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The teacher as it is after training (it is freed in teardown), and what wraps the student."""
        self.wrapper = type(trainer.strategy.model).__name__
        teacher = self.regate.teacher
        assert teacher is not None
        params = list(teacher.parameters())
        self.teacher = {
            "sharded_reason": sharded_reason(teacher),
            "class": type(teacher).__name__,
            "devices": sorted({str(p.device) for p in params}),
            "dtypes": sorted({str(p.dtype) for p in params}),
            "numel": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
        }


def scenario(name: str, strategy: Callable[[], Any], precision: str, kind: str, accelerator: str) -> dict[str, Any]:
    """Fit 3 steps and check; return a JSON-able record (``ok`` plus what was measured)."""
    record: dict[str, Any] = {"name": name, "precision": precision, "ok": False}
    start = time.perf_counter()
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        pl.seed_everything(0, verbose=False)
        module = MLLMModule(tiny.tiny_llava(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        regate = ReGATECallback(**SCHEDULE)
        probe = Probe(regate)
        data = RandomDataModule(num_samples=4 * BATCH, batch_size=BATCH, answer_len=16, shuffle=False)
        trainer = quiet_trainer(
            accelerator=accelerator,
            devices=1,
            strategy=strategy(),
            precision=precision,
            max_steps=STEPS,
            callbacks=[regate, probe],
        )
        trainer.fit(module, data)
        wrapper = probe.wrapper
        bank = regate.bank
        assert bank is not None
        seen = STEPS * BATCH
        ref = bank.ref[: bank.num_candidates]
        record.update(
            kind=probe.kind,
            wrapper=wrapper,
            teacher=probe.teacher,
            backbone_numel=probe.backbone_numel,
            keep_masks=probe.keep_masks,
            samples=bank.num_samples,
            teacher_samples=regate.totals["teacher_samples"],
            kept=regate.totals["kept"],
            candidates=regate.totals["candidates"],
            peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        )
        checks = {
            f"check_strategy gave {kind!r}": probe.kind == kind,
            "the strategy wrapped the student": kind == "single_device"
            or wrapper in ("FullyShardedDataParallel", "DeepSpeedEngine"),
            "the teacher is whole (no shard, no wrapper)": probe.teacher["sharded_reason"] is None,
            "the teacher has the backbone's parameters": probe.teacher["numel"] == probe.backbone_numel,
            f"the teacher is on {accelerator}": all(d.startswith(accelerator) for d in probe.teacher["devices"]),
            "every sample seen is stored": bank.num_samples == seen,
            "finite reference losses": bool(torch.isfinite(ref).all()) and ref.numel() > 0,
            "the EMA was measured": bool((~bank.ema[: bank.num_candidates].isnan()).any()),
            "keep mask only in the sparse step": probe.keep_masks == [False, True, False],
            "the teacher ran once per sample": regate.totals["teacher_samples"] == seen,
        }
        failed = [what for what, ok in checks.items() if not ok]
        record["failed_checks"] = failed
        record["ok"] = not failed
    except Exception as exc:  # every scenario runs; the traceback is printed and recorded
        traceback.print_exc()
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.perf_counter() - start, 1)
    status = "ok" if record["ok"] else f"FAILED {record.get('failed_checks') or record.get('error')}"
    print(f"[{name}] {status} ({record['seconds']} s)", flush=True)
    return record


def main() -> int:
    """Run the scenarios; write ``$OUT/gpu_strategies.json``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="single device on the CPU, to check this script")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "gpu_results"))
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    if args.cpu_smoke:
        records.append(scenario("cpu-smoke", lambda: "auto", "32-true", "single_device", "cpu"))
    elif not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    else:
        from lightning.pytorch.strategies import FSDPStrategy

        records.append(scenario("fsdp 32-true", FSDPStrategy, "32-true", "fsdp", "cuda"))
        records.append(scenario("fsdp bf16-mixed", FSDPStrategy, "bf16-mixed", "fsdp", "cuda"))
        if importlib.util.find_spec("deepspeed") is None:
            print("deepspeed not installed: skipped")
            skipped.append("deepspeed not installed")
        else:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            for stage in (2, 3):
                records.append(
                    scenario(
                        f"deepspeed stage {stage} bf16-mixed",
                        lambda stage=stage: DeepSpeedStrategy(stage=stage),
                        "bf16-mixed",
                        "deepspeed",
                        "cuda",
                    )
                )
    path = out / "gpu_strategies.json"
    path.write_text(json.dumps({"records": records, "skipped": skipped}, indent=2, default=str))
    print(f"wrote {path}")
    for r in records:
        teacher = r.get("teacher") or {}
        print(
            f"  {r['name']:<28} {'ok' if r['ok'] else 'FAILED':<6} wrapper={r.get('wrapper')} "
            f"teacher={teacher.get('numel')} params {teacher.get('dtypes')} on {teacher.get('devices')} "
            f"peak={r.get('peak_gpu_mib')} MiB"
        )
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
