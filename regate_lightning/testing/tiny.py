"""Tiny random-initialised models of every supported family, built from configs (no download).

They serve the tests, the ``debug`` recipes and the benchmarks' smoke runs. Each factory returns a real HF
model class; only the sizes are small. The configs are the families' own
(:attr:`regate_lightning.families.Family.tiny`, one builder per HF class, in the family's module), so
:func:`tiny_model` builds any class of any family, and a new family needs nothing here. Placeholder token ids
default to the last ids of the vocabulary, as transformers 5 requires them to be smaller than ``vocab_size``.

The config builders (:func:`text_config`, :func:`clip_vision_config`, :func:`llava_next_video_config`,
:func:`qwen_vl_kwargs`) are re-exported here for the demo's student and the benchmarks' models of any size.

A recipe names a factory by its dotted path, e.g. ``model: regate_lightning.testing.tiny_llava``, or
``model: regate_lightning.testing.tiny_model`` with ``model_kwargs: {name: Qwen3VLForConditionalGeneration}``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from regate_lightning.families import FAMILIES, family_of_class
from regate_lightning.families.base import DEFAULT_VOCAB, text_config
from regate_lightning.families.llava import IMAGE_SIZE, PATCH_SIZE, clip_vision_config
from regate_lightning.families.llava_next_video import llava_next_video_config
from regate_lightning.families.qwen2_vl import mrope_section, qwen_vl_kwargs

__all__ = [
    "DEFAULT_VOCAB",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "byte_tokenizer",
    "clip_vision_config",
    "llava_next_video_config",
    "mrope_section",
    "qwen_vl_kwargs",
    "text_config",
    "tiny_classes",
    "tiny_llama",
    "tiny_llava",
    "tiny_llava_next_video",
    "tiny_model",
    "tiny_qwen2",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_video_llava",
]


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.config.use_cache = False
    return model.float()


def tiny_classes() -> list[str]:
    """Every HF class that a family builds tiny, family by family (the test suite runs each)."""
    return [cls for family in FAMILIES.values() for cls in family.tiny]


def tiny_model(name: str, seed: int = 0, **kwargs: Any) -> PreTrainedModel:
    """A tiny random model of an HF multimodal class of a supported family, from the family's own config.

    Args:
        name: the HF class name (``"Qwen3VLForConditionalGeneration"``) or a family name (its first class).
        seed: the seed of the random weights.
        **kwargs: arguments of the family's config builder (``vocab_size``, ``hidden_size``, ``num_layers``,
            and the family's own).

    Returns:
        The model in float32 with ``use_cache=False``.

    Raises:
        ValueError: a name no family builds.
    """
    import transformers

    family = FAMILIES.get(name) or family_of_class(name)
    if family is None or (name not in family.tiny and name not in FAMILIES):
        raise ValueError(f"no tiny model for {name!r}; known classes: {tiny_classes()}")
    cls = name if name in family.tiny else next(iter(family.tiny))
    config = family.tiny[cls](**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    family.init_tiny(model)
    return _finish(model)


def tiny_llama(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A tiny ``LlamaForCausalLM`` (text-only student or teacher)."""
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(LlamaConfig(**text_config(vocab_size, hidden_size, num_layers))))


def tiny_qwen2(
    vocab_size: int = DEFAULT_VOCAB, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Qwen2ForCausalLM:
    """A tiny ``Qwen2ForCausalLM`` (text-only student or teacher)."""
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(Qwen2Config(**text_config(vocab_size, hidden_size, num_layers))))


def _named(cls: str, doc: str) -> Any:
    """A factory of one class (the names recipes and tests use), keyword arguments as the family's config."""

    def factory(seed: int = 0, **kwargs: Any) -> PreTrainedModel:
        return tiny_model(cls, seed, **kwargs)

    factory.__doc__ = f"A tiny ``{cls}``: {doc} Keyword arguments: the family's tiny config builder's."
    return factory


tiny_llava = _named(
    "LlavaForConditionalGeneration", "a CLIP (or ``vision='siglip'``) tower, ``(image_size / 8) ** 2`` image tokens."
)
tiny_llava_next_video = _named(
    "LlavaNextVideoForConditionalGeneration", "``T * (image_size / 8 / 2) ** 2`` tokens per video of T frames."
)
tiny_video_llava = _named(
    "VideoLlavaForConditionalGeneration", "``T * ((image_size / 8) ** 2 + 1)`` tokens per video of T frames."
)
tiny_qwen2_vl = _named("Qwen2VLForConditionalGeneration", "grid ``(t, h, w)`` gives ``t * h * w / 4`` tokens.")
tiny_qwen2_5_vl = _named("Qwen2_5_VLForConditionalGeneration", "patch 8, temporal patch 2, merge 2.")


def byte_tokenizer() -> Any:
    """A tokenizer for the tiny models: one token per UTF-8 byte, no merges, nothing to download.

    ``<pad>``, ``<s>``, ``</s>``, ``<image>``, ``<video>`` are ids 0-4 and the 256 bytes ids 5-260, so every
    id stays below the tiny models' placeholder ids (their last vocabulary ids, 508-511 of 512). It has the
    "USER: ... ASSISTANT: ..." chat template of :mod:`regate_lightning.data.render`. A recipe names it as
    ``tokenizer: regate_lightning.testing.byte_tokenizer``; a real checkpoint brings its own tokenizer.

    Example:
        >>> tok = byte_tokenizer()
        >>> len(tok), tok("hi")["input_ids"]
        (261, [76, 77])
    """
    from regate_lightning.data.synthetic import SPECIAL_TOKENS, train_tokenizer

    return train_tokenizer([], vocab_size=256 + len(SPECIAL_TOKENS))
