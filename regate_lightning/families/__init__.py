"""The HF model families this package supports: one module per family, collected here.

Each module of this package named in :data:`FAMILY_MODULES` declares one :class:`Family` as ``FAMILY``: its HF
classes and config model types, where its decoder and vision parts live, its placeholder rule, its pixel keys,
its position ids, what its tower encodes alone, and the config of a tiny random model of it. The engine and the
teacher read a family through :func:`resolve` (the parts of a model), the data pipeline through
:func:`family_of` (a config's family), the random test batches and the benchmarks through both. Any
``*ForCausalLM`` with a ``model`` decoder and an ``lm_head`` is supported too, as the text-only family
:data:`TEXT_ONLY` (a student without media, or a teacher).

=====================  ==============================================  ======================================
family (module)        classes                                         placeholder tokens
=====================  ==============================================  ======================================
``llava``              ``LlavaForConditionalGeneration``               image: ``(S / P) ** 2 + CLS - [default]``
``llava_next_video``   ``LlavaNextVideoForConditionalGeneration``      frame: ``((S / P) // stride) ** 2``;
                                                                       image: anyres (checkpoint processor)
``video_llava``        ``VideoLlavaForConditionalGeneration``          image: as llava; frame: ``(S / P) ** 2 + CLS``
``qwen2_vl``           ``Qwen2VLForConditionalGeneration``,            ``t * h * w / merge ** 2`` per media,
                       ``Qwen2_5_VLForConditionalGeneration``          wrapped in vision start ... end
``qwen3_vl``           ``Qwen3VLForConditionalGeneration``,            image: as qwen2_vl; video: per temporal
                       ``Qwen3VLMoeForConditionalGeneration``          patch ``<t seconds>`` + start, ``h * w /
                                                                       merge ** 2`` pads, end; all in start/end
``qwen3_5``            ``Qwen3_5ForConditionalGeneration``,            as qwen2_vl; a video: per temporal
                       ``Qwen3_5MoeForConditionalGeneration``          patch its timestamp, then its tokens
                                                                       in vision start ... end
``smolvlm``            ``SmolVLMForConditionalGeneration``             per tile or frame:
                                                                       ``(S / P) ** 2 / scale ** 2``
``video_llama_3``      ``VideoLlama3ForConditionalGeneration``         ``h * w / m ** 2`` per frame, ``m`` per
                                                                       media; videos compressed
``gemma3``             ``Gemma3ForConditionalGeneration``              ``mm_tokens_per_image`` per image or crop,
                                                                       bidirectional within an image
``llava_onevision``    ``LlavaOnevisionForConditionalGeneration``      frame: ``ceil(S / P / 2) ** 2``, plus one
                                                                       newline per video; image: anyres-max
``internvl``           ``InternVLForConditionalGeneration``            ``(S / P) ** 2 * r ** 2`` per tile or
                                                                       frame, in ``<img> ... </img>`` spans
=====================  ==============================================  ======================================

``docs/models.md`` has the support table (what is exact, what is tested) and "Adding a family".
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from regate_lightning.families.base import (
    CLS_TOWERS,
    FIXED,
    GRID,
    MEDIA_KINDS,
    MERGED,
    NO_CLS_TOWERS,
    NONE,
    PATCHES,
    POOLED,
    TILES,
    Family,
    MediaRegions,
    MediaSteps,
    MediaText,
    ModelParts,
    RandomMedia,
    config_of,
    find_module,
    patch_grid,
    tower_has_cls,
    unwrap,
)

FAMILY_MODULES = (
    "llava",
    "llava_next_video",
    "video_llava",
    "qwen2_vl",
    "qwen3_vl",
    "qwen3_5",
    "smolvlm",
    "video_llama_3",
    "gemma3",
    "llava_onevision",
    "internvl",
)
"""The modules of this package that declare a family (each as ``FAMILY``), in the order they are listed."""

# Family names (the values of ``Family.name``), for the code that names a family.
LLAVA = "llava"
LLAVA_NEXT_VIDEO = "llava_next_video"
VIDEO_LLAVA = "video_llava"
QWEN2_VL = "qwen2_vl"
QWEN3_VL = "qwen3_vl"
QWEN3_5 = "qwen3_5"
GEMMA3 = "gemma3"
SMOLVLM = "smolvlm"
VIDEO_LLAMA_3 = "video_llama_3"
LLAVA_ONEVISION = "llava_onevision"
INTERNVL = "internvl"
CAUSAL_LM = "causal_lm"


def _collect() -> dict[str, Family]:
    families: dict[str, Family] = {}
    for module_name in FAMILY_MODULES:
        family = importlib.import_module(f"{__name__}.{module_name}").FAMILY
        if family.name != module_name:
            raise RuntimeError(f"the family in {__name__}.{module_name} is named {family.name!r}")
        families[family.name] = family
    return families


FAMILIES: dict[str, Family] = _collect()
"""The supported multimodal families by name."""

TEXT_ONLY = Family(CAUSAL_LM, classes=(), model_types=(), decoder="")
"""Any ``*ForCausalLM`` with a ``model`` decoder and an ``lm_head``."""

_BY_CLASS = {cls: family for family in FAMILIES.values() for cls in family.classes}
_BY_MODEL_TYPE = {kind: family for family in FAMILIES.values() for kind in family.model_types}


def family_of(model_or_config: Any) -> Family:
    """The family of an HF multimodal model (possibly peft-wrapped) or of its config, by ``model_type``.

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones).
    """
    kind = getattr(config_of(model_or_config), "model_type", None)
    family = _BY_MODEL_TYPE.get(str(kind))
    if family is None:
        raise ValueError(f"model type {kind!r} is not supported; supported are {sorted(_BY_MODEL_TYPE)}")
    return family


def family_of_class(name: str) -> Family | None:
    """The family of an HF model class name, None if no family declares it."""
    return _BY_CLASS.get(name)


def _supported_message(name: str) -> str:
    classes = ", ".join(sorted(_BY_CLASS))
    return (
        f"model class {name} is not supported; supported are {classes}, and text-only *ForCausalLM models "
        "with a `model` decoder and an `lm_head` (docs/models.md)"
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
    family = _BY_CLASS.get(name)
    if family is not None:
        inner = hf.model
        decoder = find_module(inner, family.decoder)
        if decoder is None:
            raise TypeError(f"{name} has no text decoder at `model.{family.decoder}` (this transformers version?)")
        return ModelParts(family, hf, inner, decoder, hf.lm_head, family.media_token_ids(hf.config))
    if name.endswith("ForCausalLM") and isinstance(getattr(hf, "model", None), nn.Module) and hasattr(hf, "lm_head"):
        return ModelParts(TEXT_ONLY, hf, hf.model, hf.model, hf.lm_head, ())
    raise TypeError(_supported_message(name))


def vision_parts(parts: ModelParts) -> tuple[list[nn.Module], list[nn.Module]]:
    """The vision encoder's modules and the projector's modules of a multimodal model.

    A projector inside a tower (Qwen-VL's patch merger inside ``visual``) is taken out of it: the tower
    is then the tower's other children, so freezing the tower freezes every ``visual`` parameter outside
    the merger.

    Returns:
        ``(tower, projector)``, empty lists for a causal LM.
    """
    family, inner = parts.family, parts.inner
    projector = [m for m in (find_module(inner, p) for p in family.projectors) if m is not None]
    tower: list[nn.Module] = []
    for path in family.towers:
        module = find_module(inner, path)
        if module is None:
            continue
        inside = {p[len(path) + 1 :] for p in family.projectors if p.startswith(path + ".")}
        tower += [m for n, m in module.named_children() if n not in inside] if inside else [module]
    return tower, projector


PARTS = ("vision_tower", "projector", "language_model")
"""The parts of a model that can be frozen or given their own learning rate (:func:`parameter_parts`)."""


def parameter_parts(parts: ModelParts) -> dict[str, list[nn.Parameter]]:
    """Every parameter of the model, by part: vision tower, projector, language model.

    The tower and the projector are those of :func:`vision_parts`; the language model is everything else
    (decoder, embeddings, LM head, and any adapter inside them). A causal LM is all language model.

    Args:
        parts: the model's parts (:func:`resolve`); the parameters are those of ``parts.model``'s modules,
            so a peft wrapper's adapters are found inside the modules they wrap.

    Returns:
        ``{part: [parameters]}`` for each of :data:`PARTS`, in the model's parameter order; every parameter
        is in exactly one part.
    """
    tower, projector = vision_parts(parts)
    owner: dict[int, str] = {}
    for part, modules in (("vision_tower", tower), ("projector", projector)):
        for module in modules:
            for param in module.parameters():
                owner[id(param)] = part
    out: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
    for param in parts.model.parameters():
        out[owner.get(id(param), "language_model")].append(param)
    return out


def unused_vision_modules(parts: ModelParts) -> list[nn.Module]:
    """Vision-tower modules that never reach the loss in the model's family (:meth:`Family.unused_vision_modules`)."""
    return parts.family.unused_vision_modules(parts)


def media_only_parameters(parts: ModelParts) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The named parameters that only batches holding media of one kind use, by kind (:attr:`Family.media_only`).

    Returns:
        ``{kind: [(name, parameter), ...]}`` with the parameters' names in ``parts.model``; kinds without
        such parameters are absent.
    """
    names = {id(p): n for n, p in parts.model.named_parameters()}
    out: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for kind, path in parts.family.media_only:
        head, _, last = path.rpartition(".")
        owner = find_module(parts.inner, head) if head else parts.inner
        found = getattr(owner, last, None) if owner is not None else None
        params = [found] if isinstance(found, nn.Parameter) else list(found.parameters()) if found is not None else []
        out.setdefault(kind, []).extend((names.get(id(p), path), p) for p in params)
    return {kind: params for kind, params in out.items() if params}


__all__ = [
    "CAUSAL_LM",
    "CLS_TOWERS",
    "FAMILIES",
    "FAMILY_MODULES",
    "FIXED",
    "GEMMA3",
    "GRID",
    "INTERNVL",
    "LLAVA",
    "LLAVA_NEXT_VIDEO",
    "LLAVA_ONEVISION",
    "MEDIA_KINDS",
    "MERGED",
    "NONE",
    "NO_CLS_TOWERS",
    "PARTS",
    "PATCHES",
    "POOLED",
    "QWEN2_VL",
    "QWEN3_5",
    "QWEN3_VL",
    "SMOLVLM",
    "TEXT_ONLY",
    "TILES",
    "VIDEO_LLAMA_3",
    "VIDEO_LLAVA",
    "Family",
    "MediaRegions",
    "MediaSteps",
    "MediaText",
    "ModelParts",
    "RandomMedia",
    "config_of",
    "family_of",
    "family_of_class",
    "find_module",
    "media_only_parameters",
    "parameter_parts",
    "patch_grid",
    "resolve",
    "tower_has_cls",
    "unused_vision_modules",
    "unwrap",
    "vision_parts",
]
