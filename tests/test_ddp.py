"""ReGATE under real two-process DDP on CPU (gloo), and which strategies the callback accepts.

The DDP scenario runs the script ``tests/ddp_worker.py`` as two processes started together, with the
variables torchrun sets (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``), so that
``Trainer(strategy="ddp_find_unused_parameters_true", accelerator="cpu", devices=2)`` joins them into
one gloo process group. (``python tests/ddp_worker.py --out DIR`` alone works too: Lightning's launcher
then starts rank 1 by running the script again, which costs a second import in sequence.) Each
process does a fit of two epochs with a checkpoint per epoch, then a resume from the epoch-0
checkpoint, with ``shuffle=True`` so that ``set_epoch`` sends samples to the other rank in epoch 1, a fit
that reads the reference cache, and one epoch of packed steps over token-budget batches (issue 21).
The single-process runs happen in this process and read the global batches (each one the
concatenation of the two ranks' batches, in rank order).

What must be exact and what may not. Both ranks apply the same gathered values in the same order,
so their stores are bitwise identical; so are the store's layout, the reference losses (the frozen
teacher's output does not depend on the student) and the store after the first optimizer step (the
student's weights are still the initial ones everywhere; the losses of 2-row and 4-row batches agree
bitwise here). After that, DDP averages two per-rank gradients while one process takes the gradient
of the whole batch: the same sum in another order, so the weights differ by float noise, which Adam's
normalised update amplifies a little. The EMA values then agree to about 2e-5 (of losses near 6),
compared with ``atol=1e-4``; the set of measured candidates (the NaN pattern, i.e. which tokens were
kept) must still be identical.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ddp_worker
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from torch.utils.data import DistributedSampler

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.strategies import (
    UnsupportedStrategyError,
    check_strategy,
    check_unsharded,
    sharded_reason,
)
from regate_lightning.testing import quiet_trainer, tiny
from regate_lightning.testing.datamodule import RandomDataModule

REPO = Path(__file__).resolve().parents[1]
EXACT_KEYS = ("ref", "offset", "length")
NOISY_KEYS = ("ema", "vocab_ema")
EMA_ATOL = 1e-4


def assert_same(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...] | None = None, atol: float = 0.0) -> None:
    """Store state dicts agree: same NaN pattern, values equal (``atol=0``) or within ``atol``."""
    for key in keys or tuple(k for k in a if isinstance(a[k], torch.Tensor)):
        x, y = a[key], b[key]
        assert x.shape == y.shape, f"{key}: shapes {tuple(x.shape)} and {tuple(y.shape)}"
        if not x.dtype.is_floating_point:
            assert torch.equal(x, y), key
            continue
        assert torch.equal(x.isnan(), y.isnan()), f"{key}: measured (non-NaN) slots differ"
        finite = ~x.isnan()
        gap = float((x[finite].double() - y[finite].double()).abs().max()) if finite.any() else 0.0
        assert gap <= atol, f"{key}: max difference {gap:.3g} > {atol}"


# ------------------------------------------------------------------------------------------------
# The DDP run and its single-process counterparts.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Both ranks started at once, as torchrun or a cluster scheduler does.

    With ``LOCAL_RANK`` etc. set, Lightning's DDP strategy does not re-run the script for rank 1 (which
    it does for ``python tests/ddp_worker.py --out DIR``); the two imports of torch, transformers and
    Lightning then overlap instead of following each other.
    """
    out = tmp_path_factory.mktemp("ddp")
    launcher_vars = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        NODE_RANK="0",
        WORLD_SIZE=str(ddp_worker.WORLD_SIZE),
    )
    command = [sys.executable, str(Path(ddp_worker.__file__)), "--out", str(out)]
    logs = [out / f"rank{rank}.log" for rank in range(ddp_worker.WORLD_SIZE)]
    start = time.perf_counter()
    procs = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as sink:  # files, not pipes: a full pipe could stall a rank inside a collective
                env_rank = {**env, "LOCAL_RANK": str(rank)}
                procs.append(subprocess.Popen(command, cwd=REPO, env=env_rank, stdout=sink, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    seconds = time.perf_counter() - start
    print(f"\nDDP worker (2 processes, 3 fits of 8 steps, a packed one, 3 steps per model class): {seconds:.1f} s")
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"DDP rank {rank} failed (exit {proc.returncode}):\n{log.read_text()[-8000:]}"

    def load(name: str) -> list[dict[str, Any]]:
        return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(ddp_worker.WORLD_SIZE)]

    return SimpleNamespace(
        full=load("full"),
        resumed=load("resumed"),
        cached=load("cached"),
        batching=load("batching"),
        families=load("families"),
        checkpoint=out / "ckpt" / "e0.ckpt",
    )


@pytest.fixture(scope="module")
def single_runs(ddp_run: SimpleNamespace) -> SimpleNamespace:
    full = ddp_worker.fit("global", 1, shuffle=True)
    resumed = ddp_worker.fit("global", 1, shuffle=True, resume=str(ddp_run.checkpoint))
    return SimpleNamespace(full=full, resumed=resumed)


def test_ddp_ranks_hold_identical_stores(ddp_run):
    for run in (ddp_run.full, ddp_run.resumed, ddp_run.cached):
        rank0, rank1 = run
        assert (rank0["rank"], rank1["rank"]) == (0, 1)
        assert rank0["global_step"] == rank1["global_step"] == 2 * ddp_worker.NUM_SAMPLES // 4
        assert_same(rank0["bank"], rank1["bank"])
        assert rank0["bank"]["_extra_state"] == rank1["bank"]["_extra_state"]
        assert rank0["totals"] == rank1["totals"]
    bank = ddp_run.full[0]["bank"]
    assert int((bank["offset"] >= 0).sum()) == ddp_worker.NUM_SAMPLES
    assert not bank["ref"].isnan().any(), "every sample has its reference losses"
    assert not bank["ema"].isnan().all(), "the EMA was measured"


def test_every_model_class_trains_under_plain_ddp_with_identical_ranks(ddp_run):
    """Plain ``ddp`` (no search for unused parameters) runs every class of every family with ReGATE and
    visual-token elision; the ranks end with the same weights and the same score store."""
    rank0, rank1 = ddp_run.families
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert list(rank0["classes"]) == tiny.tiny_classes()
    for name, first in rank0["classes"].items():
        second = rank1["classes"][name]
        assert first["global_step"] == second["global_step"] == 3, name
        assert torch.equal(first["weights"], second["weights"]), name
        assert_same(first["bank"], second["bank"])
        assert first["totals"] == second["totals"], name
        assert 0 < first["totals"]["kept"] < first["totals"]["candidates"], f"{name}: a sparse step ran"


def test_ddp_store_equals_single_process_on_global_batches(ddp_run, single_runs):
    ddp, single = ddp_run.full[0], single_runs.full
    assert_same(ddp["after_first_step"], single["after_first_step"])  # same weights: bitwise equal
    assert_same(ddp["bank"], single["bank"], EXACT_KEYS)
    assert_same(ddp["bank"], single["bank"], NOISY_KEYS, atol=EMA_ATOL)
    # Token counts are reduced over ranks each step: the same as one process reading the global batches.
    assert ddp["totals"] == single["totals"]
    assert 0 < ddp["totals"]["kept"] < ddp["totals"]["candidates"], "the run had sparse steps"


def test_ddp_checkpoint_resumes_on_one_and_on_two_processes(ddp_run, single_runs):
    saved = torch.load(ddp_run.checkpoint, weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("ReGATECallback")]
    saved_bank = saved["callbacks"][key]["bank"]
    # Right after the restore, one process and both DDP ranks hold exactly the checkpointed store.
    for result in (*ddp_run.resumed, single_runs.resumed):
        assert_same(saved_bank, result["at_train_start"])
        assert result["teacher_rows"] == 0, "the reference losses came from the checkpoint"
    # Resumed on two processes = never interrupted (bitwise); resumed on one = the same up to float noise.
    assert_same(ddp_run.resumed[0]["bank"], ddp_run.full[0]["bank"])
    assert ddp_run.resumed[0]["totals"] == ddp_run.full[0]["totals"]
    assert_same(single_runs.resumed["bank"], ddp_run.resumed[0]["bank"], EXACT_KEYS)
    assert_same(single_runs.resumed["bank"], ddp_run.resumed[0]["bank"], NOISY_KEYS, atol=EMA_ATOL)
    assert single_runs.resumed["totals"] == ddp_run.resumed[0]["totals"]


def test_ddp_samples_change_rank_and_the_teacher_scores_each_once(ddp_run):
    def owner(epoch: int) -> dict[int, int]:
        owners = {}
        for rank in range(ddp_worker.WORLD_SIZE):
            sampler = DistributedSampler(
                range(ddp_worker.NUM_SAMPLES), num_replicas=ddp_worker.WORLD_SIZE, rank=rank, shuffle=True, seed=0
            )
            sampler.set_epoch(epoch)
            owners.update(dict.fromkeys(sampler, rank))
        return owners

    moved = [i for i in range(ddp_worker.NUM_SAMPLES) if owner(0)[i] != owner(1)[i]]
    assert moved, "epoch 1 must send some samples to the other rank"
    rows = [r["teacher_rows"] for r in ddp_run.full]
    assert sum(rows) == ddp_worker.NUM_SAMPLES, f"teacher rows per rank {rows}: each sample once in total"
    assert rows == [ddp_worker.NUM_SAMPLES // 2] * 2, "all in epoch 0, none after a sample moved"
    for result in (*ddp_run.full, *ddp_run.resumed):
        assert result["totals"]["teacher_samples"] == ddp_worker.NUM_SAMPLES  # counted over all ranks


def test_ddp_one_collective_per_hook(ddp_run):
    """Issue 13: the callback's exchanges between ranks, counted per training batch (15 before: 8 + 7; 2 now).

    Each hook packs its tensors into one gather; a hook gathers twice only when a rank's tensors outgrow
    the width agreed so far (the first call of each hook, and when a batch brings more than any before).
    """
    for result in ddp_run.full:
        starts, ends = result["collectives"]["on_train_batch_start"], result["collectives"]["on_train_batch_end"]
        batches = result["global_step"]
        print(f"\nrank {result['rank']}: collectives per batch, plan {starts}, observe {ends}")
        assert len(starts) == len(ends) == batches
        assert all(1 <= n <= 2 for n in (*starts, *ends))
        assert starts[0] == ends[0] == 2, "the first call of each hook agrees on a width"
        assert sum(starts) + sum(ends) <= 2 * batches + 4, "then one per hook, save for a few wider batches"


def test_ddp_fit_from_the_reference_cache_equals_the_fit_that_wrote_it(ddp_run):
    """Both ranks read the cache lazily (each sample when first met) and stay identical; the teacher never runs."""
    for cached, full in zip(ddp_run.cached, ddp_run.full, strict=True):
        assert cached["cache_samples"] == ddp_worker.NUM_SAMPLES and cached["teacher_rows"] == 0
        assert_same(cached["bank"], full["bank"])  # the same references, so the same training, bit for bit
        assert cached["totals"] == {**full["totals"], "teacher_samples": 0}


def test_ddp_token_budget_batches_give_every_rank_the_same_steps(ddp_run):
    """Issue 21: a length-aware batch sampler under DDP (Lightning hands it a DistributedSampler): both ranks run
    the same number of packed steps, each reads its own share of every step, the epoch covers every sample, and
    every batch keeps to the token budget."""
    from regate_lightning.data.batching import TokenBudgetBatchSampler

    rank0, rank1 = ddp_run.batching
    lengths = rank0["lengths"]
    assert rank0["global_step"] == rank1["global_step"] == len(rank0["batches"]) == len(rank1["batches"]) > 1
    plan = TokenBudgetBatchSampler(None, lengths, ddp_worker.BATCHING["max_tokens"], 8).batches
    assert -(-len(plan) // 2) == rank0["global_step"], "the steps of the budget's batches, two per step"
    for a, b in zip(rank0["batches"], rank1["batches"], strict=True):
        assert not set(a) & set(b), "the ranks read different samples in a step"
    seen = {i for result in (rank0, rank1) for batch in result["batches"] for i in batch}
    assert seen == set(range(ddp_worker.NUM_SAMPLES))
    for result in (rank0, rank1):
        for batch, shape in zip(result["batches"], result["shapes"], strict=True):
            assert len(batch) * max(lengths[i] for i in batch) <= ddp_worker.BATCHING["max_tokens"]
            assert shape == (len(batch), max(lengths[i] for i in batch))
    assert rank0["totals"] == rank1["totals"]
    assert rank0["totals"]["active"] < rank0["totals"]["tokens"], "packed ReGATE steps ran"


# ------------------------------------------------------------------------------------------------
# check_strategy with real strategy objects (building them needs no GPU).


def fake_trainer(strategy: Any, model: torch.nn.Module | None = None) -> Any:
    module = SimpleNamespace(model=model if model is not None else tiny.tiny_llama(num_layers=1))
    return SimpleNamespace(strategy=strategy, lightning_module=module)


def deepspeed_strategy(stage: int) -> DeepSpeedStrategy:
    """A DeepSpeedStrategy with a ZeRO config; its __init__ needs deepspeed, which is not installed here."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


def on_gpu(strategy: Any) -> Any:
    strategy.accelerator = CUDAAccelerator()  # what the trainer connects on a GPU machine
    return strategy


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: SingleDeviceStrategy("cpu"), "single_device"),
        (lambda: on_gpu(SingleDeviceStrategy("cuda:0")), "single_device"),
        (DDPStrategy, "ddp"),
        *[
            (lambda name=name: StrategyRegistry.get(name), "ddp")
            for name in ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true")
        ],
        (lambda: on_gpu(FSDPStrategy()), "fsdp"),
        (lambda: StrategyRegistry.get("fsdp_cpu_offload"), "fsdp"),
        (lambda: deepspeed_strategy(2), "deepspeed"),
        (lambda: deepspeed_strategy(3), "deepspeed"),  # the student is whole when the callback copies it
    ],
)
def test_check_strategy_accepts(make, kind):
    assert check_strategy(fake_trainer(make())) == kind


class OtherParallel(ParallelStrategy):
    """A third-party strategy the callback knows nothing about."""

    root_device = torch.device("cpu")

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Unused."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Unused."""
        return obj

    def model_to_device(self) -> None:
        """Unused."""

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        """Unused."""
        return tensor


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (ModelParallelStrategy, r"does not support ModelParallelStrategy: with tensor parallelism"),
        (lambda: XLAStrategy.__new__(XLAStrategy), r"does not support XLAStrategy \(XLA/TPU\)"),
        (lambda: SingleDeviceXLAStrategy.__new__(SingleDeviceXLAStrategy), r"SingleDeviceXLAStrategy \(XLA/TPU\)"),
        (OtherParallel, r"does not support the strategy OtherParallel.*subclass DDPStrategy or FSDPStrategy"),
    ],
)
def test_check_strategy_refuses(make, message):
    with pytest.raises(UnsupportedStrategyError, match=message):
        check_strategy(fake_trainer(make()))


def test_mps_is_refused():
    strategy = SingleDeviceStrategy("cpu")
    strategy.accelerator = MPSAccelerator()
    with pytest.raises(UnsupportedStrategyError, match=r"MPSAccelerator .*float64.*accelerator='cpu' or 'cuda'"):
        check_strategy(fake_trainer(strategy))


def test_a_student_sharded_before_setup_cannot_be_the_teacher():
    partitioned = tiny.tiny_llama(num_layers=1)
    partitioned.lm_head.weight.ds_id = 7  # what deepspeed.zero.Init leaves on a ZeRO-3 parameter
    with pytest.raises(UnsupportedStrategyError, match=r"DeepSpeedStrategy \(ZeRO stage 3\).*teacher=<HF id"):
        check_strategy(fake_trainer(deepspeed_strategy(3), partitioned))
    # With a teacher loaded by HF id the student's parameters are not copied, so this is fine.
    assert check_strategy(fake_trainer(deepspeed_strategy(3), partitioned), teacher="org/text-llm") == "deepspeed"
    with torch.device("meta"):
        on_meta = tiny.tiny_llama(num_layers=1)
    assert "meta device" in (sharded_reason(on_meta) or "")
    with pytest.raises(UnsupportedStrategyError, match=r"a teacher loaded by HF id.*meta device"):
        check_unsharded(on_meta, "a teacher loaded by HF id", "DDPStrategy")
    assert sharded_reason(tiny.tiny_llama(num_layers=1)) is None


# ------------------------------------------------------------------------------------------------
# On a real Trainer.


def test_teacher_is_copied_before_the_strategy_sets_up_the_model():
    """Lightning 2.6's hook order: callback ``setup`` (teacher copy) comes before ``strategy.setup``.

    That is what makes ``teacher="student"`` a whole copy under FSDP and DeepSpeed, which wrap, shard or
    partition the model in ``strategy.setup``; a strategy subclass checks it here on CPU.
    """
    callback = ReGATECallback(warmup_steps=0, full_steps=0)
    seen: dict[str, Any] = {}

    class Spy(SingleDeviceStrategy):
        def setup(self, trainer: pl.Trainer) -> None:
            teacher = callback.teacher
            seen["teacher_ready"] = teacher is not None
            if teacher is not None:
                student = {p.data_ptr() for p in self.lightning_module.parameters()}
                seen["shares_storage"] = any(p.data_ptr() in student for p in teacher.parameters())
            super().setup(trainer)

    module = MLLMModule(tiny.tiny_llava(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = quiet_trainer(
        accelerator="cpu",
        strategy=Spy("cpu"),
        max_steps=1,
        callbacks=[callback],
    )
    trainer.fit(module, RandomDataModule(num_samples=4, batch_size=2, answer_len=8))
    assert seen == {"teacher_ready": True, "shares_storage": False}


def test_refusal_happens_in_setup_on_a_real_trainer():
    student = MLLMModule(tiny.tiny_llava())
    student.model.lm_head.weight.ds_id = 0  # as if built under deepspeed.zero.Init
    built: list[str] = []

    class Spy(SingleDeviceStrategy):
        def setup(self, trainer: pl.Trainer) -> None:
            built.append("strategy.setup")
            super().setup(trainer)

    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=Spy("cpu"),
        max_steps=1,
        callbacks=[callback := ReGATECallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(UnsupportedStrategyError, match=r"under Spy: .*`lm_head.weight` is a DeepSpeed ZeRO-3"):
        trainer.fit(student, RandomDataModule(num_samples=4, batch_size=2))
    assert built == [] and callback.teacher is None, "refused before the strategy set up or a teacher was built"


def test_gpu_strategy_script_checks_pass_on_cpu():
    """``benchmarks/gpu_strategies.py`` (FSDP/DeepSpeed on a GPU) runs its checks on one CPU device."""
    if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
        sys.path.insert(0, str(REPO))
    from benchmarks.gpu_strategies import scenario

    record = scenario("cpu-smoke", lambda: "auto", "32-true", "single_device", "cpu")
    assert record["ok"], record
    assert record["teacher"]["numel"] == record["backbone_numel"] and record["keep_masks"] == [False, True, False]
