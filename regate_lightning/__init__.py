"""regate-lightning: ReGATE token elision for fine-tuning multimodal LLMs with PyTorch Lightning.

The public API: the Lightning drivers (:class:`ReGATECallback`, :class:`VisualTokenElision`,
:class:`MLLMModule`, :class:`ElisionReport`) and, beside them, the pure-torch core they drive
(:class:`ReGATEPolicy` and :class:`VisualElisionPolicy` and their parts, the selections, the functional
core). Names are imported on first use, so that importing a core module (``regate_lightning.policy``,
``regate_lightning.visual``, ...) never imports Lightning; see ``docs/architecture.md``.
"""

from __future__ import annotations

from regate_lightning._imports import install_moved_modules, lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # Lightning drivers.
    "ReGATECallback": "regate_lightning.callback",
    "VisualTokenElision": "regate_lightning.visual_callback",
    "LoraOptions": "regate_lightning.module",
    "MLLMModule": "regate_lightning.module",
    "ElisionReport": "regate_lightning.report",
    # The policy and its extension points.
    "ReGATEPolicy": "regate_lightning.policy",
    "StepPlan": "regate_lightning.policy",
    "Selection": "regate_lightning.selection",
    "TopKSelection": "regate_lightning.selection",
    "RandomSelection": "regate_lightning.selection",
    "AdaptiveSelection": "regate_lightning.selection",
    "Fallback": "regate_lightning.selection",
    "StoreFallback": "regate_lightning.selection",
    # Visual-token elision and its extension points.
    "VisualElisionPolicy": "regate_lightning.visual",
    "VisualSelection": "regate_lightning.visual",
    "TemporalSelection": "regate_lightning.visual",
    "UniformSelection": "regate_lightning.visual",
    "temporal_change": "regate_lightning.visual",
    # Its parts.
    "Schedule": "regate_lightning.schedule",
    "is_full_step": "regate_lightning.schedule",
    "ScoreBank": "regate_lightning.bank",
    "Teacher": "regate_lightning.teacher",
    "ElidedOutput": "regate_lightning.elision",
    "forward_active": "regate_lightning.elision",
    "pack_layout": "regate_lightning.elision",
    "packing_refusal": "regate_lightning.elision",
    "PACKED_SDPA": "regate_lightning.packed_sdpa",
    "FAMILIES": "regate_lightning.families",
    "resolve": "regate_lightning.families",
    # The functional core.
    "candidate_mask": "regate_lightning.targets",
    "shift_targets": "regate_lightning.targets",
    "fuse_scores": "regate_lightning.scoring",
    "num_kept": "regate_lightning.scoring",
    "select_keep": "regate_lightning.scoring",
    "random_keep": "regate_lightning.scoring",
    "adaptive_keep": "regate_lightning.scoring",
    "ema_update": "regate_lightning.scoring",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

install_moved_modules()  # the modules of an earlier layout, at their old paths (with a warning)
