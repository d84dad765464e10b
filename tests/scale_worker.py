"""Scale-out scenarios on two simulated nodes of one CPU process each (gloo), run by ``tests/test_scale.py``.

Each of the two processes is started with the variables a cluster scheduler sets for one node of two
(``NODE_RANK`` 0 or 1, ``LOCAL_RANK=0``, ``WORLD_SIZE=2``, ``MASTER_ADDR``, ``MASTER_PORT``), and every
``Trainer`` is built with ``num_nodes=2, devices=1``: Lightning then joins them into one process group
without starting processes itself, exactly as on two machines. Two kinds of folder:

* ``BASE/shared``: one folder both "nodes" see (a shared file system);
* ``BASE/node<NODE_RANK>``: a folder only this node sees (node-local scratch space).

``python tests/scale_worker.py --base BASE --out OUT SCENARIO ...`` runs the named scenarios in order in
the same two processes (the process group is reused by every ``Trainer``) and writes, per scenario and
rank, ``OUT/<scenario>_rank<r>.pt``: what the rank saw, or the error it raised (``error``: the exception's
type and message). A scenario that fails does not stop the others, except ``hang`` (it breaks the process
group on purpose and is run last).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from ddp_worker import Record, bank_state
from lightning.pytorch.strategies import DDPStrategy

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.score import SCORING_TRAINER, score
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.datamodule import RandomDataModule

NODES = 2
NUM_SAMPLES = 16
PER_RANK_BATCH = 2
EPOCHS = 2
SEED = 0
CALLBACK = {"keep_ratio": 0.5, "warmup_steps": 1, "cycle_steps": 2, "full_steps": 1, "min_keep": 1}
GROUP_TIMEOUT = datetime.timedelta(seconds=120)  # a scenario that goes wrong fails in 2 minutes, not 30
HANG_TIMEOUT_S = 3.0
HANG_SLEEP_S = 8.0
ZERO_BUCKETS = {"allgather_bucket_size": 1_000_000, "reduce_bucket_size": 1_000_000}
"""Lightning's default buckets (2e8 elements each) cost 14 s of allocation per fit on CPU, for a 1M-parameter model."""


def ddp() -> DDPStrategy:
    """Plain DDP (MLLMModule freezes what never gets a gradient: issue 20, item 4)."""
    return DDPStrategy(timeout=GROUP_TIMEOUT)


class Folders:
    """This node's view: ``shared`` (both nodes) and ``local`` (this node only)."""

    def __init__(self, base: Path, node: int) -> None:
        self.shared = base / "shared"
        self.local = base / f"node{node}"
        for folder in (self.shared, self.local):
            folder.mkdir(parents=True, exist_ok=True)


def data() -> RandomDataModule:
    """The debug data, shuffled (``set_epoch`` moves samples between the ranks in epoch 1)."""
    return RandomDataModule(num_samples=NUM_SAMPLES, batch_size=PER_RANK_BATCH, prompt_len=8, answer_len=16, seed=SEED)


def student(**kwargs: Any) -> MLLMModule:
    return MLLMModule(tiny.tiny_llava(seed=SEED, **kwargs), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))


def trainer(strategy: Any = None, callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    """Two nodes of one CPU process each."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": NODES,
        "strategy": ddp() if strategy is None else strategy,
        "max_epochs": EPOCHS,
        "callbacks": callbacks or [],
        "deterministic": True,
    }
    return quiet_trainer(**{**options, **kwargs})


def fit(
    strategy: Any = None,
    ref_cache: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: Path | None = None,
    extra: list[pl.Callback] | None = None,
) -> dict[str, Any]:
    """A ReGATE fit of ``EPOCHS`` epochs; what this rank saw (as ``tests/ddp_worker.py``'s ``fit``)."""
    pl.seed_everything(SEED, verbose=False)
    module = student()
    regate = ReGATECallback(**CALLBACK, ref_cache=None if ref_cache is None else str(ref_cache))
    record = Record(regate)
    callbacks: list[pl.Callback] = [*(extra or []), regate, record]
    if checkpoint_dir is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=checkpoint_dir, filename="e{epoch}", auto_insert_metric_name=False, save_top_k=-1
            )
        )
    run = trainer(strategy, callbacks, enable_checkpointing=checkpoint_dir is not None)
    run.fit(module, data(), ckpt_path=None if resume is None else str(resume))
    return {
        "rank": run.global_rank,
        "node": run.node_rank,
        "global_step": run.global_step,
        "bank": bank_state(regate),
        "totals": dict(regate.totals),
        "teacher_rows": record.teacher_rows,
        "at_train_start": record.at_train_start,
        "cache_samples": regate.cache_samples,
        "strategy": type(run.strategy).__name__,
        "wrapper": type(run.strategy.model).__name__,
    }


def run_score(path: Path, strategy: Any = None) -> dict[str, Any]:
    """``regate-lightning score`` as the command runs it, into ``path``; what this rank's folder then holds."""
    pl.seed_everything(SEED, verbose=False)
    callback = ReGATECallback(**CALLBACK, ref_cache=str(path))
    run = trainer(strategy, **SCORING_TRAINER)
    result = score(run, student(), data(), callback)
    return {
        "rank": run.global_rank,
        "num_samples": result.num_samples,
        "scored": result.scored,
        "files": sorted(p.name for p in path.parent.iterdir()),
        "cache": torch.load(path, weights_only=True) if path.exists() else None,
    }


# ------------------------------------------------------------------------------------------------
# The scenarios: each returns this rank's record.


def local_score(f: Folders) -> dict[str, Any]:
    """Item 1: score into node-local folders; every node must end with the complete cache."""
    return run_score(f.local / "scored.pt")


def local_score_again(f: Folders) -> dict[str, Any]:
    """Item 1: score again when only node 0 still holds the cache: the ranks share what they read, the teacher
    runs on no sample, and node 1 gets the whole file back."""
    if f.local.name == "node1":
        (f.local / "scored.pt").rename(f.local / "scored_before.pt")
    out = run_score(f.local / "scored.pt")
    if f.local.name == "node1":
        (f.local / "scored_before.pt").unlink()
        out["files"] = sorted(p.name for p in f.local.iterdir())
    return out


def local_fit_cached(f: Folders) -> dict[str, Any]:
    """Items 2 and 6: a fit on node-local folders from each node's copy of the scored cache."""
    return fit(ref_cache=f.local / "scored.pt")


def split_cache(f: Folders) -> dict[str, Any]:
    """Item 2: a cache that only node 0 holds: both ranks must refuse at the start, naming the folder."""
    if f.local.name == "node0":
        shutil.copy(f.local / "scored.pt", f.local / "only_node0.pt")
    return fit(ref_cache=f.local / "only_node0.pt")


def local_fit(f: Folders) -> dict[str, Any]:
    """Item 6: a fresh fit on node-local folders (checkpoints and cache); each node must get the cache."""
    out = fit(ref_cache=f.local / "fitted.pt", checkpoint_dir=f.local / "ckpt")
    out["files"] = sorted(p.name for p in f.local.iterdir())
    out["checkpoints"] = sorted(p.name for p in (f.local / "ckpt").iterdir()) if (f.local / "ckpt").exists() else []
    out["cache"] = torch.load(f.local / "fitted.pt", weights_only=True)
    return out


def local_resume(f: Folders) -> dict[str, Any]:
    """Item 3: resuming from a checkpoint only node 0 has: both ranks must refuse, naming what to share."""
    return fit(resume=f.local / "ckpt" / "e0.ckpt")


def shared_fit(f: Folders) -> dict[str, Any]:
    """Item 6: the fit on a shared folder (checkpoints and cache there)."""
    out = fit(ref_cache=f.shared / "fitted.pt", checkpoint_dir=f.shared / "ckpt")
    out["cache"] = torch.load(f.shared / "fitted.pt", weights_only=True)
    return out


def shared_score(f: Folders) -> dict[str, Any]:
    """Item 6: score into a shared folder."""
    return run_score(f.shared / "scored.pt")


def shared_fit_cached(f: Folders) -> dict[str, Any]:
    """Item 6: a fit from the shared scored cache."""
    return fit(ref_cache=f.shared / "scored.pt")


def shared_resume(f: Folders) -> dict[str, Any]:
    """Item 6: resume from the shared epoch-0 checkpoint (must equal the uninterrupted ``shared_fit``)."""
    return fit(resume=f.shared / "ckpt" / "e0.ckpt")


def plain_ddp(f: Folders) -> dict[str, Any]:
    """Item 4: ``strategy="ddp"`` on the debug recipe's student, read as released checkpoints read their tower."""
    from regate_lightning.cli import build_cli

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "debug_regate.yaml"
    args = ["--config", str(recipe), "--trainer.strategy=ddp", "--trainer.num_nodes=2", "--trainer.devices=1"]
    args += ["--trainer.logger=false", "--trainer.max_steps=4", "--trainer.limit_val_batches=0"]
    args += ["--trainer.enable_progress_bar=false", "--model.model_kwargs.vision_feature_layer=-2"]
    args += [f"--trainer.default_root_dir={f.local}"]  # where LightningCLI saves the resolved config
    cli = build_cli(["fit", *args])
    model = cli.model.model
    return {
        "rank": cli.trainer.global_rank,
        "global_step": cli.trainer.global_step,
        "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad),
    }


def fsdp(f: Folders) -> dict[str, Any]:
    """Item 5: FSDP (full sharding) on CPU."""
    from regate_lightning.testing.strategies import CPUFSDPStrategy

    return fit(CPUFSDPStrategy())


def zero(stage: int, **kwargs: Any) -> Callable[[Folders], dict[str, Any]]:
    """Item 5: DeepSpeed ZeRO ``stage`` on CPU."""

    def scenario(f: Folders) -> dict[str, Any]:
        from regate_lightning.testing.strategies import CPUDeepSpeedStrategy

        return fit(CPUDeepSpeedStrategy(stage=stage, **ZERO_BUCKETS), **{k: v(f) for k, v in kwargs.items()})

    return scenario


def zero2_score(f: Folders) -> dict[str, Any]:
    """Item 5: ``score`` under ZeRO-2 (must write the DDP score's cache)."""
    from regate_lightning.testing.strategies import CPUDeepSpeedStrategy

    return run_score(f.shared / "scored_zero2.pt", CPUDeepSpeedStrategy(stage=2, **ZERO_BUCKETS))


class Hang(pl.Callback):
    """Rank 1 stops answering (sleeps) before its third training batch."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if i == 2:
            self.started = time.monotonic()
            if trainer.global_rank == 1:
                time.sleep(HANG_SLEEP_S)


def hang(f: Folders) -> dict[str, Any]:
    """Item 7: a rank that hangs stops the other after the strategy's `timeout`, with a message that says so.

    The timeout is the process group's, fixed when the group starts: the earlier scenarios' group is ended
    and a new one started on ``HANG_PORT`` under this fit's strategy, as a fresh run would.
    """
    torch.distributed.destroy_process_group()
    os.environ["MASTER_PORT"] = os.environ["HANG_PORT"]
    probe = Hang()
    strategy = DDPStrategy(timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
    try:
        fit(strategy, extra=[probe])
    except Exception as err:
        return {"stopped_after_s": time.monotonic() - probe.started, "error": f"{type(err).__name__}: {err}"}
    return {"stopped_after_s": None}


SCENARIOS: dict[str, Callable[[Folders], dict[str, Any]]] = {
    "local_score": local_score,
    "local_score_again": local_score_again,
    "local_fit_cached": local_fit_cached,
    "split_cache": split_cache,
    "local_fit": local_fit,
    "local_resume": local_resume,
    "shared_fit": shared_fit,
    "shared_score": shared_score,
    "shared_fit_cached": shared_fit_cached,
    "shared_resume": shared_resume,
    "plain_ddp": plain_ddp,
    "fsdp": fsdp,
    "zero1": zero(1),
    "zero2": zero(2, checkpoint_dir=lambda f: f.shared / "ckpt_zero2"),
    "zero2_resume": zero(2, resume=lambda f: f.shared / "ckpt_zero2" / "e0.ckpt"),
    "zero3": zero(3),
    "zero2_score": zero2_score,
    "hang": hang,
}


def main() -> None:
    """Run the scenarios named on the command line, in order; one result file per scenario and rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="holds shared/ and node<N>/")
    parser.add_argument("--out", required=True, help="result files")
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    node = int(os.environ["NODE_RANK"])
    folders = Folders(Path(args.base), node)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.scenarios:
        start = time.perf_counter()
        try:
            result = SCENARIOS[name](folders)
        except Exception as err:  # recorded: the test decides whether the error was expected
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
        result["seconds"] = time.perf_counter() - start
        torch.save(result, out / f"{name}_rank{node}.pt")
        print(f"node {node}: {name} done in {result['seconds']:.1f} s", flush=True)
    os._exit(0)  # after `hang` the process group is broken: leave without waiting on it


if __name__ == "__main__":
    main()
