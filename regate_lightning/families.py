"""The HF model families this package supports, and where their parts live.

One table (:data:`SUPPORTED`) maps each supported model class to its family; :func:`resolve`
finds, in a (possibly peft-wrapped) model, the pieces the elision engine and the teacher need: the
inner model that merges visual features, the text decoder, the LM head and the placeholder ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
    "VideoLlavaForConditionalGeneration": "video_llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}
"""Multimodal classes by name -> family. Any ``*ForCausalLM`` with a decoder and a head is also supported."""

CAUSAL_LM = "causal_lm"


@dataclass(frozen=True)
class ModelParts:
    """The pieces of one HF model that this package drives.

    Attributes:
        family: a value of :data:`SUPPORTED`, or ``"causal_lm"``.
        model: the unwrapped HF model (``*ForConditionalGeneration`` / ``*ForCausalLM``).
        inner: the model without its head (``model.model``); returns ``last_hidden_state``.
        decoder: the text decoder that takes ``inputs_embeds`` (for a causal LM, ``inner`` itself).
        lm_head: the output projection to the vocabulary.
        media_token_ids: ids of image/video placeholder tokens (empty for a causal LM).
        mrope: whether position ids are Qwen2-VL's 3-D M-RoPE ids.
    """

    family: str
    model: nn.Module
    inner: nn.Module
    decoder: nn.Module
    lm_head: nn.Module
    media_token_ids: tuple[int, ...]
    mrope: bool


def unwrap(model: nn.Module) -> nn.Module:
    """Return the HF model inside a peft ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _supported_message(name: str) -> str:
    classes = ", ".join(sorted(SUPPORTED))
    return (
        f"model class {name} is not supported; supported are {classes}, and text-only *ForCausalLM models "
        "with a `model` decoder and an `lm_head`"
    )


def resolve(model: nn.Module) -> ModelParts:
    """Find the parts of ``model`` that elision and scoring need.

    Args:
        model: an HF model of a supported class, optionally wrapped by peft.

    Returns:
        The model's :class:`ModelParts`.

    Raises:
        TypeError: for an unsupported class; the message lists the supported ones.
    """
    hf = unwrap(model)
    name = type(hf).__name__
    family = SUPPORTED.get(name)
    if family is not None:
        inner = hf.model
        cfg = hf.config
        ids = tuple(
            int(i)
            for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
            if i is not None
        )
        return ModelParts(family, hf, inner, inner.language_model, hf.lm_head, ids, family == "qwen2_vl")
    if name.endswith("ForCausalLM") and isinstance(getattr(hf, "model", None), nn.Module) and hasattr(hf, "lm_head"):
        return ModelParts(CAUSAL_LM, hf, hf.model, hf.model, hf.lm_head, (), False)
    raise TypeError(_supported_message(name))


def vision_parts(parts: ModelParts) -> tuple[list[nn.Module], list[nn.Module]]:
    """The vision encoder's modules and the projector's modules of a multimodal model.

    For Qwen2-VL the projector is the patch merger inside ``visual``; freezing the tower then
    freezes every ``visual`` parameter outside the merger.

    Returns:
        ``(tower, projector)``, empty lists for a causal LM.
    """
    inner = parts.inner
    if parts.family == "qwen2_vl":
        visual = inner.visual
        tower = [m for name, m in visual.named_children() if name != "merger"]
        return tower, [visual.merger]
    if parts.family == CAUSAL_LM:
        return [], []
    tower = [getattr(inner, n) for n in ("vision_tower", "video_tower", "image_tower") if hasattr(inner, n)]
    projector = [getattr(inner, n) for n in ("multi_modal_projector", "vision_resampler") if hasattr(inner, n)]
    return tower, projector


def unused_vision_modules(parts: ModelParts) -> list[nn.Module]:
    """Vision-tower modules that never reach the loss in this family.

    LLaVA-family models read the tower's hidden states, so CLIP's ``post_layernorm`` and SigLIP's
    pooling ``head`` get no gradient; under DDP such parameters stop training with "parameters that
    were not used" unless ``find_unused_parameters`` is on. :class:`~regate_lightning.MLLMModule`
    freezes them (their values do not affect any output).
    """
    tower, _ = vision_parts(parts)
    if parts.family in (CAUSAL_LM, "qwen2_vl"):
        return []
    found = []
    for module in tower:
        vision_model = getattr(module, "vision_model", module)
        found += [
            getattr(vision_model, n)
            for n in ("post_layernorm", "head")
            if isinstance(getattr(vision_model, n, None), nn.Module)
        ]
    return found
