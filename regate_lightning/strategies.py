"""Which Lightning strategies and accelerators ``ReGATECallback`` runs under, checked before any work.

The callback keeps two things outside the LightningModule, so no strategy wraps, shards or casts
them:

* the **teacher**, a frozen module replicated whole on every device (a copy of the student's
  language backbone taken in ``Callback.setup``, or a causal LM loaded by HF id), and
* the **score store** (:class:`~regate_lightning.bank.ScoreBank`), identical on every rank because
  every rank gathers each step's samples and losses from all ranks (:mod:`regate_lightning.sync`).

That works wherever every rank is a data-parallel replica that trains on its own samples and
``strategy.all_gather`` concatenates one tensor per rank: single device, DDP in all its launch
variants, FSDP and DeepSpeed (ZeRO 1/2/3). It does not work for tensor or pipeline parallelism
(ranks of one model replica share a batch) nor where this project cannot vouch for the device
(XLA/TPU, MPS). :func:`check_strategy` refuses those in ``setup``, with the reason and the fix, before
a teacher is built or a step runs.

Why ``teacher="student"`` is a full, unsharded copy. In Lightning 2.6 ``Trainer._run`` calls, in this
order: ``strategy.setup_environment()`` (process group), the ``setup`` hooks (callbacks first: the
teacher is copied here), ``configure_model``, checkpoint restore (for strategies that restore before
setup), ``strategy.setup()`` (DDP wraps, FSDP wraps and shards, DeepSpeed's ``deepspeed.initialize``
partitions ZeRO-3 parameters), then ``on_fit_start`` (the callback moves the teacher to the device).
So a model built in the LightningModule's ``__init__`` (as :class:`~regate_lightning.MLLMModule`
does) is still whole when it is copied. It is not whole when it was already sharded before ``fit``
(built on the meta device, inside ``deepspeed.zero.Init`` or HF's ZeRO-3 loading, or wrapped in
FSDP by hand): :func:`sharded_reason` detects those cases and the copy is refused. A model created
in ``configure_model`` does not exist yet in ``setup``; the callback refuses it as well.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from torch import nn

try:  # torch.distributed is optional in some torch builds
    from torch.distributed.fsdp import FullyShardedDataParallel as _FSDP1
    from torch.distributed.tensor import DTensor as _DTensor
except (ImportError, RuntimeError):  # pragma: no cover
    _FSDP1 = _DTensor = None

__all__ = [
    "DDP",
    "DEEPSPEED",
    "FSDP",
    "SINGLE_DEVICE",
    "UnsupportedStrategyError",
    "check_strategy",
    "check_unsharded",
    "sharded_reason",
]

SINGLE_DEVICE = "single_device"
DDP = "ddp"
FSDP = "fsdp"
DEEPSPEED = "deepspeed"

_SUPPORTED = (
    "supported: a single device (CPU or CUDA), DDPStrategy (ddp, ddp_spawn, ddp_fork, ddp_notebook, "
    "*_find_unused_parameters_*), FSDPStrategy and DeepSpeedStrategy"
)


class UnsupportedStrategyError(ValueError):
    """The trainer's strategy, accelerator or model layout cannot run ``ReGATECallback``."""


def check_strategy(trainer: pl.Trainer, teacher: str = "student") -> str:
    """Refuse what cannot work; return the kind of strategy otherwise.

    Args:
        trainer: the trainer, in ``Callback.setup`` (strategy connected, model not yet wrapped).
        teacher: the callback's ``teacher`` argument; ``"student"`` also checks that the student's
            parameters are whole, since the teacher is copied from them.

    Returns:
        ``"single_device"``, ``"ddp"``, ``"fsdp"`` or ``"deepspeed"``.

    Raises:
        UnsupportedStrategyError: naming the strategy (or accelerator) and the fix.
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    kind = _strategy_kind(strategy, name)
    _check_accelerator(strategy, name)
    if teacher == "student":
        module = getattr(trainer.lightning_module, "model", None)
        reason = sharded_reason(module) if isinstance(module, nn.Module) else None
        if reason is not None:
            stage = " (ZeRO stage 3)" if kind == DEEPSPEED and _zero_stage(strategy) == 3 else ""
            raise UnsupportedStrategyError(
                f"ReGATECallback(teacher='student') under {name}{stage}: the student's parameters are already "
                f"sharded when the callback copies them ({reason}), so the copy would hold shards, not weights. "
                "Build the student whole in the LightningModule's __init__ (MLLMModule does; do not create it "
                "in configure_model, on the meta device or under deepspeed.zero.Init), or pass the backbone's "
                "text LLM as `teacher=<HF id or path>`"
            )
    return kind


def _strategy_kind(strategy: Strategy, name: str) -> str:
    # Subclass order matters: XLAStrategy and DeepSpeedStrategy are DDPStrategy subclasses,
    # SingleDeviceXLAStrategy is a SingleDeviceStrategy subclass.
    if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy)):
        raise UnsupportedStrategyError(
            f"ReGATECallback does not support {name} (XLA/TPU): the callback reads counts back to the host at "
            "every step (a graph break on XLA) and has never been run on TPUs. Use CUDA GPUs with DDPStrategy "
            "or FSDPStrategy"
        )
    if isinstance(strategy, ModelParallelStrategy):
        raise UnsupportedStrategyError(
            f"ReGATECallback does not support {name}: with tensor parallelism several ranks share one batch, "
            "while the callback treats every rank as a data-parallel replica with its own samples, and the "
            "student is only built in configure_model, after the callback copies the teacher. Use "
            "FSDPStrategy (sharded data parallel) or DDPStrategy"
        )
    if isinstance(strategy, DeepSpeedStrategy):
        return DEEPSPEED
    if isinstance(strategy, FSDPStrategy):
        return FSDP
    if isinstance(strategy, DDPStrategy):
        return DDP
    if isinstance(strategy, SingleDeviceStrategy):
        return SINGLE_DEVICE
    raise UnsupportedStrategyError(
        f"ReGATECallback does not support the strategy {name}: it is none of those it was built and tested "
        f"for ({_SUPPORTED}). If it is data parallel, subclass DDPStrategy or FSDPStrategy"
    )


def _check_accelerator(strategy: Strategy, name: str) -> None:
    accelerator = getattr(strategy, "accelerator", None)
    if accelerator is None or isinstance(accelerator, (CPUAccelerator, CUDAAccelerator)):
        return
    accel = type(accelerator).__name__
    why = (
        "the score store sums in float64, which MPS lacks"
        if accel == "MPSAccelerator"
        else "this project has only been run on CPUs and CUDA GPUs"
    )
    raise UnsupportedStrategyError(
        f"ReGATECallback does not support {accel} (strategy {name}): {why}. Use accelerator='cpu' or 'cuda'"
    )


def _zero_stage(strategy: Strategy) -> int | None:
    """DeepSpeed's ZeRO stage from the strategy's config dict, without importing deepspeed."""
    config = getattr(strategy, "config", None)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return int(stage) if stage is not None else None


def sharded_reason(module: nn.Module) -> str | None:
    """Why ``module``'s weights are not all present on this rank, or ``None`` when they are.

    Detects, without importing deepspeed: parameters on the meta device, DeepSpeed ZeRO-3 partitioned
    parameters (they carry ``ds_id``), DTensor parameters (FSDP2, tensor parallel) and FSDP1 wrappers.

    Args:
        module: the module to inspect.

    Returns:
        A short description naming the first offending parameter or submodule, or ``None``.
    """
    for sub_name, sub in module.named_modules():
        fsdp1 = _FSDP1 is not None and isinstance(sub, _FSDP1)
        if fsdp1 or any(cls.__name__ == "FSDPModule" for cls in type(sub).__mro__):
            return f"`{sub_name or type(module).__name__}` is wrapped by FSDP"
    for param_name, param in module.named_parameters():
        if param.is_meta:
            return f"`{param_name}` is on the meta device"
        if hasattr(param, "ds_id"):
            return f"`{param_name}` is a DeepSpeed ZeRO-3 partitioned parameter"
        if _DTensor is not None and isinstance(param, _DTensor):
            return f"`{param_name}` is a DTensor (FSDP2 or tensor-parallel shard)"
    return None


def check_unsharded(module: nn.Module, what: str, strategy_name: str) -> None:
    """Raise when ``module`` (e.g. a teacher loaded by HF id) does not hold its whole weights.

    Args:
        module: the module to check.
        what: how the message names it, e.g. ``"the teacher 'org/model'"``.
        strategy_name: the trainer's strategy class name, for the message.

    Raises:
        UnsupportedStrategyError: when :func:`sharded_reason` finds a shard.
    """
    reason = sharded_reason(module)
    if reason is not None:
        raise UnsupportedStrategyError(
            f"{what} under {strategy_name} did not load whole ({reason}); the teacher is replicated on every "
            "device outside the strategy and needs its full weights. Load it outside any sharding context "
            "(for example without an active transformers HfDeepSpeedConfig)"
        )
