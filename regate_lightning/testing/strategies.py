"""FSDP and DeepSpeed on CPU processes (gloo): the strategies the test suite runs them with.

Lightning 2.6 refuses both without CUDA, although torch's FSDP and DeepSpeed's CPU accelerator run on a
CPU; these subclasses change only what stands in the way, so that ``tests/test_scale.py`` fits ReGATE
under FSDP and ZeRO 1 / 2 / 3 on every commit instead of only on a lent GPU. They are not for training:
on a GPU machine use Lightning's own ``FSDPStrategy`` and ``DeepSpeedStrategy``.

* :class:`CPUFSDPStrategy`: Lightning passes FSDP ``device_id=root_device.index``, None on a CPU, and
  FSDP then looks for an accelerator and raises "FSDP needs a non-CPU accelerator device"; here
  ``device_id`` is the CPU device. Build the trainer with ``accelerator="cpu"`` and this strategy as an
  object (the string ``"fsdp"`` with ``accelerator="cpu"`` is refused by Lightning's connector).
* :class:`CPUDeepSpeedStrategy`: Lightning's ``setup_environment`` refuses a non-CUDA accelerator and
  ``setup_distributed`` checks GPU indices; ``deepspeed.initialize`` receives ``device_rank=None`` (the
  CPU device's index) where it needs the local rank. DeepSpeed's shared-memory collective, which its
  CPU accelerator would compile with a C++ toolchain at the first start (about two minutes), is turned
  off: collectives go through the gloo process group.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

__all__ = ["CPUDeepSpeedStrategy", "CPUFSDPStrategy"]


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose FSDP wrapper is given the CPU as its device (gloo process group by default)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Lightning's wrapping (``FSDPStrategy._setup_model``) with ``device_id`` the CPU."""
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes: DeepSpeed's CPU accelerator, a gloo process group.

    Args:
        kwargs: those of ``DeepSpeedStrategy`` (``stage``, ``config``, ...); ``process_group_backend``
            defaults to ``"gloo"``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        """``DDPStrategy.setup_environment`` without DeepSpeedStrategy's refusal of a non-CUDA accelerator."""
        Strategy.setup_environment(self)
        self.setup_distributed()

    def setup_distributed(self) -> None:
        """Lightning's, without its check of GPU indices; DeepSpeed's compiled shared-memory collective off."""
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a C++ build at first use; gloo suffices
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        with self._device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        with self._device_rank():
            super()._initialize_deepspeed_inference(model)

    @contextmanager
    def _device_rank(self) -> Iterator[None]:
        """``deepspeed.initialize`` with ``args.device_rank`` = the local rank (Lightning passes the CPU's None)."""
        import deepspeed

        initialize = deepspeed.initialize

        def with_rank(*args: Any, **kwargs: Any) -> Any:
            namespace = kwargs.get("args")
            if isinstance(namespace, argparse.Namespace) and getattr(namespace, "device_rank", None) is None:
                namespace.device_rank = self.local_rank
            return initialize(*args, **kwargs)

        deepspeed.initialize = with_rank
        try:
            yield
        finally:
            deepspeed.initialize = initialize
