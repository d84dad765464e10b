"""One ReGATE fit on a tiny LLaVA, under two-process DDP on CPU (gloo) or on one process.

DDP needs a script file, run once per rank: ``python tests/ddp_worker.py --out DIR`` (see :func:`main`)
lets Lightning's DDP launcher start rank 1 by running this same script again; ``tests/test_ddp.py``
instead starts both ranks itself with torchrun's variables (``LOCAL_RANK=0/1``, ``WORLD_SIZE=2``,
``MASTER_ADDR``, ``MASTER_PORT``), so their imports overlap. Every rank writes, per fit, its score
store, its totals, how many samples its own teacher scored, and the store as it was when training
started (after a resume). The test imports
:func:`fit` to make the single-process runs, which read the *global* batches: batch ``i`` is the
concatenation, in rank order, of what each DDP rank reads as its batch ``i`` (see
:class:`GlobalBatches`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.datamodule import RandomDataModule, concat_collate

WORLD_SIZE = 2
NUM_SAMPLES = 16
PER_RANK_BATCH = 2
EPOCHS = 2
SEED = 0
DDP_STRATEGY = "ddp_find_unused_parameters_true"  # a LLaVA never uses its CLIP tower's post_layernorm
CALLBACK = {"keep_ratio": 0.5, "warmup_steps": 1, "cycle_steps": 2, "full_steps": 1, "min_keep": 1}


class GlobalBatches(Sampler[list[int]]):
    """The batches a single process must read to see what all DDP ranks see together.

    ``DistributedSampler(rank=r, shuffle, seed)`` (what Lightning injects under DDP) gives rank ``r`` its
    index list for the epoch; batch ``i`` here is rank 0's batch ``i``, then rank 1's, and so on.

    Args:
        num_samples: size of the data set.
        world_size: number of DDP ranks to imitate.
        batch_size: per-rank batch size.
        shuffle: as the DDP run's loader.
        seed: the DistributedSampler's seed (Lightning uses ``PL_GLOBAL_SEED``, 0 by default).
    """

    def __init__(self, num_samples: int, world_size: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.samplers = [
            DistributedSampler(range(num_samples), num_replicas=world_size, rank=r, shuffle=shuffle, seed=seed)
            for r in range(world_size)
        ]
        self.batch_size = batch_size
        self.sampler = self  # Lightning calls `batch_sampler.sampler.set_epoch(epoch)` every epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle like the DDP ranks' samplers do in this epoch."""
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = [list(s) for s in self.samplers]
        for start in range(0, len(per_rank[0]), self.batch_size):
            yield [i for indices in per_rank for i in indices[start : start + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(len(self.samplers[0]) / self.batch_size)


class Data(RandomDataModule):
    """The debug data, read per rank (``layout="ddp"``) or as global batches (``layout="global"``)."""

    def __init__(self, layout: str, shuffle: bool) -> None:
        super().__init__(
            num_samples=NUM_SAMPLES, batch_size=PER_RANK_BATCH, prompt_len=8, answer_len=16, seed=SEED, shuffle=shuffle
        )
        self.layout = layout

    def train_dataloader(self) -> DataLoader:
        """Per-rank batches (Lightning adds the DistributedSampler) or the matching global batches."""
        if self.layout == "ddp":
            return super().train_dataloader()
        batches = GlobalBatches(NUM_SAMPLES, WORLD_SIZE, PER_RANK_BATCH, self.hparams.shuffle, SEED)
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=concat_collate)


COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)
"""The collectives of ``torch.distributed`` (Lightning's strategies call these; DDP's gradient buckets do not)."""


class CollectiveCounter:
    """Counts the calls of ``torch.distributed``'s collectives while :meth:`installed` is active.

    A collective that calls another (``all_gather_object`` calls ``all_gather``) counts once.
    """

    def __init__(self) -> None:
        self.count = 0
        self._depth = 0

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap every function of :data:`COLLECTIVES` in ``torch.distributed``; unwrap at the end."""
        originals = {name: getattr(torch.distributed, name) for name in COLLECTIVES}

        def counted(function: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.count += self._depth == 0
                self._depth += 1
                try:
                    return function(*args, **kwargs)
                finally:
                    self._depth -= 1

            return call

        for name, function in originals.items():
            setattr(torch.distributed, name, counted(function))
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(torch.distributed, name, function)


def count_per_hook(regate: ReGATECallback, counter: CollectiveCounter) -> dict[str, list[int]]:
    """The collectives each training-batch hook of ``regate`` issues, one list entry per batch."""
    per_hook: dict[str, list[int]] = {"on_train_batch_start": [], "on_train_batch_end": []}
    for name, counts in per_hook.items():
        hook = getattr(regate, name)

        def call(*args: Any, _hook: Callable[..., Any] = hook, _counts: list[int] = counts) -> None:
            before = counter.count
            _hook(*args)
            _counts.append(counter.count - before)

        setattr(regate, name, call)  # Lightning looks the hook up on the instance
    return per_hook


class Record(pl.Callback):
    """Counts the rows this rank's teacher scores; keeps the store when training starts and after step 1."""

    def __init__(self, regate: ReGATECallback) -> None:
        self.regate = regate
        self.teacher_rows = 0
        self.at_train_start: dict[str, Any] | None = None
        self.after_first_step: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the teacher's decoder (it exists from ``setup`` on)."""
        assert self.regate.teacher is not None

        def count(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.teacher_rows += int(output.last_hidden_state.shape[0])

        self.regate.teacher.decoder.register_forward_hook(count)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint was restored: the store that training resumes from."""
        assert self.regate.bank is not None
        self.at_train_start = bank_state(self.regate)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The store after the first optimizer step of a fresh run (student weights still the initial ones)."""
        if trainer.global_step == 1 and self.after_first_step is None:
            self.after_first_step = bank_state(self.regate)


def bank_state(callback: ReGATECallback) -> dict[str, Any]:
    """A CPU copy of the callback's store."""
    assert callback.bank is not None
    state = callback.bank.state_dict()
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def fit(
    layout: str,
    devices: int,
    shuffle: bool,
    resume: str | None = None,
    checkpoint_dir: str | None = None,
    ref_cache: str | None = None,
    counter: CollectiveCounter | None = None,
) -> dict[str, Any]:
    """Train ``EPOCHS`` epochs (from ``resume`` if given); return what this rank saw.

    Args:
        layout: ``"ddp"`` (per-rank batches) or ``"global"`` (concatenated batches, one process).
        devices: CPU processes; 2 runs DDP.
        shuffle: shuffle the training set each epoch (``set_epoch`` moves samples between ranks).
        resume: checkpoint to resume from.
        checkpoint_dir: save a checkpoint at the end of every epoch there (``e0.ckpt``, ``e1.ckpt``).
        ref_cache: the callback's reference cache file.
        counter: counts the collectives of the callback's training-batch hooks (installed by the caller).

    Returns:
        ``rank``, ``global_step``, ``bank`` (state dict), ``totals``, ``teacher_rows`` (rows this rank's
        teacher scored), ``at_train_start`` (the store when training started, after any restore),
        ``after_first_step`` (the store after optimizer step 1 of a fresh run), ``cache_samples`` and, with
        a ``counter``, ``collectives`` (per hook, per batch).
    """
    pl.seed_everything(SEED, verbose=False)  # also fixes the DistributedSampler's seed (PL_GLOBAL_SEED)
    module = MLLMModule(tiny.tiny_llava(seed=SEED), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    regate = ReGATECallback(**CALLBACK, ref_cache=ref_cache)
    collectives = None if counter is None else count_per_hook(regate, counter)
    record = Record(regate)
    callbacks: list[pl.Callback] = [regate, record]
    if checkpoint_dir is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=checkpoint_dir, filename="e{epoch}", auto_insert_metric_name=False, save_top_k=-1
            )
        )
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDP_STRATEGY if devices > 1 else "auto",
        max_epochs=EPOCHS,
        callbacks=callbacks,
        enable_checkpointing=checkpoint_dir is not None,
        deterministic=True,
    )
    trainer.fit(module, Data(layout, shuffle), ckpt_path=resume)
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "bank": bank_state(regate),
        "totals": dict(regate.totals),
        "teacher_rows": record.teacher_rows,
        "at_train_start": record.at_train_start,
        "after_first_step": record.after_first_step,
        "cache_samples": regate.cache_samples,
        "collectives": collectives,
    }


BATCHING = {"batching": "token_budget", "max_tokens": 200, "min_answer_len": 4}
"""The length-aware fit: samples of 30 to 58 tokens in batches of at most 200 padded positions, packed steps."""


class Batches(pl.Callback):
    """The ``sample_idx`` of every training batch this rank reads, and its shape."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record the batch."""
        self.batches.append(batch["sample_idx"].tolist())
        self.shapes.append(tuple(batch["input_ids"].shape))


def fit_batching(devices: int) -> dict[str, Any]:
    """One epoch of packed ReGATE steps over token-budget batches (:data:`BATCHING`); what this rank read."""
    pl.seed_everything(SEED, verbose=False)
    module = MLLMModule(tiny.tiny_llava(seed=SEED), packed=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    regate = ReGATECallback(**CALLBACK)
    batches = Batches()
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDP_STRATEGY if devices > 1 else "auto",
        max_epochs=1,
        callbacks=[regate, batches],
    )
    data = RandomDataModule(num_samples=NUM_SAMPLES, batch_size=8, prompt_len=8, answer_len=32, seed=SEED, **BATCHING)
    trainer.fit(module, data)
    assert data.train_set is not None
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "batches": batches.batches,
        "shapes": batches.shapes,
        "lengths": data.train_set.lengths,
        "totals": dict(regate.totals),
    }


def fit_families(devices: int) -> dict[str, Any]:
    """Every class of every family (:func:`~regate_lightning.testing.tiny.tiny_classes`): three steps under plain
    ``ddp`` (no search for unused parameters) with ReGATE and visual-token elision; what each rank ended with.

    The students are the tiny random models with their own random batches (``RandomDataModule`` says the
    batches hold one media kind, so the module freezes parameters only the other kind would use).
    """
    from regate_lightning import VisualTokenElision

    out: dict[str, Any] = {"rank": None, "classes": {}}
    for name in tiny.tiny_classes():
        pl.seed_everything(SEED, verbose=False)
        module = MLLMModule(tiny.tiny_model(name, SEED), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        regate = ReGATECallback(**{**CALLBACK, "warmup_steps": 1, "cycle_steps": 3})
        visual = VisualTokenElision(keep_ratio=0.5, selection="random", images=True, seed=SEED)
        trainer = quiet_trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_steps=3,
            callbacks=[regate, visual],
        )
        data = RandomDataModule(num_samples=8, batch_size=2, prompt_len=4, answer_len=12, num_frames=2, seed=SEED)
        trainer.fit(module, data)
        weights = torch.cat([p.detach().flatten() for p in module.parameters()])
        out["rank"] = trainer.global_rank
        out["classes"][name] = {
            "global_step": trainer.global_step,
            "weights": weights,
            "bank": bank_state(regate),
            "totals": dict(regate.totals),
        }
    return out


def main() -> None:
    """The DDP scenario of ``tests/test_ddp.py``: a fit with a checkpoint per epoch and a reference cache, a
    resume from epoch 0, a fresh fit that reads the cache, a packed fit over token-budget batches
    (:func:`fit_batching`), and three plain-``ddp`` steps of every model class (:func:`fit_families`).

    The fits run in the same two processes: for a second ``Trainer`` Lightning finds ``LOCAL_RANK`` set
    (by its own first launch, or by the caller) and reuses the process group instead of starting new
    processes. Each rank writes ``OUT/full_rank{r}.pt``, ``OUT/resumed_rank{r}.pt``, ``OUT/cached_rank{r}.pt``
    ``OUT/batching_rank{r}.pt`` and ``OUT/families_rank{r}.pt``;
    the callback's collectives are counted in the first fit.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder for the results and OUT/ckpt/e{epoch}.ckpt")
    parser.add_argument("--no-shuffle", action="store_true", help="keep every sample on one rank")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes share the machine's cores
    out = Path(args.out)
    shuffle = not args.no_shuffle
    cache = str(out / "ref_cache.pt")
    counter = CollectiveCounter()
    with counter.installed():
        full = fit("ddp", WORLD_SIZE, shuffle, checkpoint_dir=str(out / "ckpt"), ref_cache=cache, counter=counter)
    resumed = fit("ddp", WORLD_SIZE, shuffle, resume=str(out / "ckpt" / "e0.ckpt"))
    cached = fit("ddp", WORLD_SIZE, shuffle, ref_cache=cache)
    batching = fit_batching(WORLD_SIZE)
    families = fit_families(WORLD_SIZE)
    results = (("full", full), ("resumed", resumed), ("cached", cached), ("batching", batching))
    for name, result in (*results, ("families", families)):
        path = out / f"{name}_rank{result['rank']}.pt"
        torch.save(result, path)
        print(f"rank {result['rank']} (pid {os.getpid()}): wrote {path}", flush=True)


if __name__ == "__main__":
    main()
