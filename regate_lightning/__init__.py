"""regate-lightning: ReGATE token elision for fine-tuning multimodal LLMs with PyTorch Lightning.

The names below are imported on first use, so that the pure-torch core (``regate_lightning.policy``,
``regate_lightning.scoring``, ...) can be imported without Lightning; see ``docs/architecture.md``.
"""

from __future__ import annotations

from regate_lightning._imports import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ElidedOutput": "regate_lightning.elision",
    "forward_active": "regate_lightning.elision",
    "LoraOptions": "regate_lightning.module",
    "MLLMModule": "regate_lightning.module",
    "ReGATECallback": "regate_lightning.callback",
    "Schedule": "regate_lightning.schedule",
    "is_full_step": "regate_lightning.schedule",
    "ScoreBank": "regate_lightning.bank",
    "Teacher": "regate_lightning.teacher",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
