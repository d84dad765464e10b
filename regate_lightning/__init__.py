"""regate-lightning: ReGATE token elision for fine-tuning multimodal LLMs with PyTorch Lightning."""

from __future__ import annotations

from regate_lightning.bank import ScoreBank
from regate_lightning.callback import ReGATECallback
from regate_lightning.elision import ElidedOutput, forward_active
from regate_lightning.module import LoraOptions, MLLMModule
from regate_lightning.schedule import Schedule, is_full_step
from regate_lightning.teacher import Teacher

__version__ = "0.1.0"
__all__ = [
    "ElidedOutput",
    "LoraOptions",
    "MLLMModule",
    "ReGATECallback",
    "Schedule",
    "ScoreBank",
    "Teacher",
    "__version__",
    "forward_active",
    "is_full_step",
]
