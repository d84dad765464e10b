"""regate-lightning: ReGATE token elision for fine-tuning multimodal LLMs with PyTorch Lightning."""

from __future__ import annotations

__version__ = "0.1.0"
