"""Helpers for tests, the ``debug`` recipes and benchmarks: tiny random models and random batches.

Nothing here is part of the method. Everything builds from configs, without a download::

    tiny.py        tiny random-initialised models of every supported family, the one tiny-config builder, and
                   ``byte_tokenizer`` (a tokenizer that fits every tiny model's vocabulary)
    batches.py     random token batches in a model's own keys (``random_batch``)
    datamodule.py  ``RandomDataModule``: those batches as a LightningDataModule (the ``debug`` recipes), and
                   ``quiet_trainer`` (a Trainer without logger, checkpoints, progress bar or validation)
    strategies.py  FSDP and DeepSpeed on CPU processes (gloo), for the multi-process tests

A recipe names them by dotted path, e.g. ``model: regate_lightning.testing.tiny_llava_next_video`` and
``class_path: regate_lightning.testing.RandomDataModule``.
"""

from __future__ import annotations

from regate_lightning._imports import lazy_exports

_EXPORTS: dict[str, str] = {
    **{
        name: "regate_lightning.testing.tiny"
        for name in (
            "tiny_llama",
            "tiny_qwen2",
            "tiny_llava",
            "tiny_llava_next_video",
            "tiny_video_llava",
            "tiny_qwen2_vl",
            "tiny_qwen2_5_vl",
            "tiny_model",
            "tiny_classes",
            "byte_tokenizer",
        )
    },
    "media_layout": "regate_lightning.testing.batches",
    "random_batch": "regate_lightning.testing.batches",
    "RandomDataModule": "regate_lightning.testing.datamodule",
    "concat_collate": "regate_lightning.testing.datamodule",
    "quiet_trainer": "regate_lightning.testing.datamodule",
    "CPUFSDPStrategy": "regate_lightning.testing.strategies",
    "CPUDeepSpeedStrategy": "regate_lightning.testing.strategies",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
