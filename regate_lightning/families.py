"""The HF model families this package supports: one registry entry per family, read by every part.

:data:`FAMILIES` holds one :class:`Family` per supported family: its HF classes and config model types,
where its vision parts live, its placeholder rule (tokens per image and per video frame, the CLS rule),
its pixel keys and whether it uses M-RoPE. The elision engine and the teacher read it through
:func:`resolve` (the parts of a model), the data pipeline through :func:`family_of` (a config's family,
:class:`~regate_lightning.data.vision.VisionSpec`), the random test batches and the benchmarks through
both. Any ``*ForCausalLM`` with a ``model`` decoder and an ``lm_head`` is supported too, as the text-only
family :data:`CAUSAL_LM` (a student without media, or a teacher).

===================  ====================================  =============================================
family               pixel keys                            placeholder tokens
===================  ====================================  =============================================
llava                ``pixel_values``                      image: ``(S / P) ** 2 + CLS - [default]``
llava_next_video     ``pixel_values_videos``,              frame: ``((S / P) // stride) ** 2``; image: anyres
                     ``pixel_values``, ``image_sizes``     (by its size; checkpoint processor only)
video_llava          ``pixel_values_images``,              image: as llava; frame: ``(S / P) ** 2 + CLS``
                     ``pixel_values_videos``
qwen2_vl             ``pixel_values(_videos)``,            ``t * h * w / merge ** 2`` per media (its grid),
                     ``image_grid_thw``, ``video_grid_thw`` wrapped in vision start ... end
===================  ====================================  =============================================

``S`` is the tower's ``image_size``, ``P`` its ``patch_size``, ``CLS`` 1 for a tower with a class token
(CLIP) and 0 without (SigLIP); ``[default]`` is 1 under ``vision_feature_select_strategy="default"``,
which drops the first feature (HF's LLaVA does ``[:, 1:]``), and 0 under ``"full"``. An anyres image
(LLaVA-NeXT) is tiled by the config's ``image_grid_pinpoints``; its count is
:func:`regate_lightning.data.vision.anyres_image_tokens` of its original size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regate_lightning.keys import (
    IMAGE_GRID_THW,
    IMAGE_SIZES,
    PIXEL_VALUES,
    PIXEL_VALUES_IMAGES,
    PIXEL_VALUES_VIDEOS,
    VIDEO_GRID_THW,
)

# Family names (the values of ``Family.name``).
LLAVA = "llava"
LLAVA_NEXT_VIDEO = "llava_next_video"
VIDEO_LLAVA = "video_llava"
QWEN2_VL = "qwen2_vl"
CAUSAL_LM = "causal_lm"

# Placeholder rules (the values of ``Family.placeholders``).
PATCHES = "patches"
"""One token per tower patch of an image or frame (LLaVA, Video-LLaVA)."""
POOLED = "pooled"
"""One token per pooled patch of a frame: ``spatial_pool_stride`` x ``spatial_pool_stride`` pooling."""
GRID = "grid"
"""Qwen2-VL: one token per ``merge x merge`` patches of the media's ``(t, h, w)`` grid."""
NONE = "none"
"""A text-only model."""

CLS_TOWERS = ("clip_vision_model",)
"""Vision towers (config ``model_type``) whose features start with a class token."""
NO_CLS_TOWERS = ("siglip_vision_model", "siglip2_vision_model")
"""Vision towers without a class token."""


@dataclass(frozen=True)
class Family:
    """What one supported model family is, written once.

    Attributes:
        name: the family's name (:data:`LLAVA`, ...).
        classes: the HF model classes, by name (so nothing here imports transformers).
        model_types: the config ``model_type`` values of those classes.
        towers: attribute paths, on the inner model (``model.model``), of the vision encoder(s).
        projectors: attribute paths of the projector(s); one inside a tower (Qwen2-VL's patch merger)
            is taken out of that tower.
        placeholders: the placeholder rule: :data:`PATCHES`, :data:`POOLED`, :data:`GRID` or :data:`NONE`.
        video_cls: whether every video frame keeps the tower's class token (Video-LLaVA).
        image_key: batch key of image pixels, None if the family takes no images.
        video_key: batch key of video pixels, None if the family takes no videos.
        grid_keys: batch keys of the image and video grids (``(t, h, w)`` per media), for :data:`GRID`.
        image_refusal: why images are refused on the built-in path (a model without processor configs)
            where the HF class takes them, else ``""``.
        anyres_images: whether images are tiled by ``image_grid_pinpoints`` (LLaVA-NeXT "anyres"): pixels
            ``[tiles, 3, S, S]`` per image plus ``image_sizes``, and a placeholder count that depends on
            the image's size; only through the checkpoint's own image processor.
        image_sizes_key: batch key of the anyres images' original sizes, None without anyres images.
        video_processor: the transformers video processor class of the family (its defaults are in
            :data:`regate_lightning.data.processors.VIDEO_PROCESSOR_DEFAULTS`), ``""`` without videos.
        mrope: whether position ids are Qwen2-VL's 3-D M-RoPE ids.
        vision_markers: whether each media's placeholders are wrapped in vision start / end tokens.
        token_types: whether the model needs ``mm_token_type_ids`` (0 text, 1 image, 2 video).
        seconds_per_grid: the model types that also take ``second_per_grid_ts`` per video (Qwen2.5-VL).
        unused_tower_heads: whether the tower's final norm and pooling head never reach the loss (the
            family reads the tower's hidden states, so under DDP those parameters get no gradient).
        encoders: per media kind, in the order the model encodes them, ``(kind, tower, output)``: the module
            (path on the inner model) that takes the kind's pixels (one time step per row, or per
            ``rows_per_step`` rows), and the module whose output holds its features, one row per step (LLaVA
            families' projector) or per token (Qwen2-VL's ``visual``, its ``pooler_output``). Each step is
            encoded independently of the others (per-frame towers; Qwen2-VL attends within a temporal patch),
            which lets the engine skip the steps whose every token is elided.
        frames_alone: whether the model encodes every frame of a ``[N, T, 3, H, W]`` video tensor on its
            own (tower, resampler and projector per frame, features in frame order), so clips of different
            lengths can be passed as one ``[1, sum(T), 3, H, W]`` tensor with the same features in the same
            order (checked against per-sample runs in ``tests/test_data_collate.py``).
        media_only: ``(kind, path)`` pairs: a module or parameter (path on the inner model) that only batches
            holding media of ``kind`` use (Video-LLaVA's ``image_tower``, LLaVA-NeXT-Video's ``image_newline``),
            so that it gets no gradient in a batch without that kind (:func:`media_only_parameters`).
    """

    name: str
    classes: tuple[str, ...]
    model_types: tuple[str, ...]
    towers: tuple[str, ...] = ()
    projectors: tuple[str, ...] = ()
    placeholders: str = NONE
    video_cls: bool = False
    image_key: str | None = None
    video_key: str | None = None
    grid_keys: tuple[str, str] | None = None
    image_refusal: str = ""
    anyres_images: bool = False
    image_sizes_key: str | None = None
    video_processor: str = ""
    mrope: bool = False
    vision_markers: bool = False
    token_types: bool = False
    seconds_per_grid: tuple[str, ...] = ()
    unused_tower_heads: bool = False
    encoders: tuple[tuple[str, str, str], ...] = ()
    frames_alone: bool = False
    media_only: tuple[tuple[str, str], ...] = ()

    @property
    def multimodal(self) -> bool:
        """Whether the family takes images or videos."""
        return self.placeholders != NONE

    def image_tokens(self, config: Any) -> int:
        """Placeholder tokens per image of a :data:`PATCHES` family.

        Args:
            config: the HF model config.

        Raises:
            ValueError: the family has no per-image count (grid families count per media) or takes no
                images; an unknown tower.
        """
        if self.placeholders != PATCHES or self.image_key is None:
            raise ValueError(f"{self.name} has no fixed number of placeholder tokens per image")
        grid = patch_grid(config.vision_config)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return grid * grid + int(tower_has_cls(config.vision_config)) - int(strategy == "default")

    def frame_tokens(self, config: Any) -> int:
        """Placeholder tokens per video frame of a :data:`PATCHES` or :data:`POOLED` family.

        Args:
            config: the HF model config.

        Raises:
            ValueError: the family has no per-frame count or takes no videos; an unknown tower; a pooled
                family whose features cannot form a square grid.
        """
        if self.placeholders not in (PATCHES, POOLED) or self.video_key is None:
            raise ValueError(f"{self.name} has no fixed number of placeholder tokens per video frame")
        vision = config.vision_config
        grid = patch_grid(vision)
        cls = tower_has_cls(vision)
        if self.placeholders == PATCHES:
            return grid * grid + int(cls and self.video_cls)
        if getattr(config, "vision_feature_select_strategy", "default") == "full" and cls:
            raise ValueError(
                f"{self.name} with vision_feature_select_strategy='full' and a CLS tower cannot pool: use 'default'"
            )
        pooled = grid // int(config.spatial_pool_stride)
        return pooled * pooled

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """How the batch's media of ``kind`` divide into time steps, without reading their pixel values.

        Args:
            config: the HF model config.
            batch: the model's inputs.
            kind: ``"image"`` or ``"video"``.

        Returns:
            One :class:`MediaSteps` per media, in placeholder order (empty if the batch has none).

        Raises:
            ValueError: the family takes no media of ``kind``.
        """
        key = self.media_key(kind)
        pixels = batch.get(key)
        if pixels is None:
            return []
        if self.placeholders == GRID:
            merge = int(config.vision_config.spatial_merge_size)
            return [MediaSteps(t, h * w // (merge * merge), h * w) for t, h, w in self.grids(batch, kind).tolist()]
        if kind == "image":
            return [MediaSteps(1, self.image_tokens(config), 1)] * int(pixels.shape[0])
        return [MediaSteps(int(pixels.shape[1]), self.frame_tokens(config), 1)] * int(pixels.shape[0])

    def media_key(self, kind: str) -> str:
        """The batch key of the pixels of ``kind``.

        Raises:
            ValueError: an unknown kind, or one the family does not take.
        """
        if kind not in MEDIA_KINDS:
            raise ValueError(f"`kind` must be one of {MEDIA_KINDS}, got {kind!r}")
        key = self.image_key if kind == "image" else self.video_key
        if key is None:
            raise ValueError(f"{self.name} takes no {kind}s")
        return key

    def grids(self, batch: Mapping[str, Any], kind: str) -> Any:
        """The batch's ``(t, h, w)`` grids of the media of ``kind`` (grid families; int64 ``[N, 3]``)."""
        assert self.grid_keys is not None
        name = self.grid_keys[0 if kind == "image" else 1]
        grids = batch.get(name)
        if grids is None:
            raise ValueError(f"the batch has `{self.media_key(kind)}` but no `{name}`")
        return grids

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """The pixel region behind every placeholder token of the batch's media of ``kind``, media by media.

        The media come in the order in which the model fills their features into the placeholder positions
        (the batch's dim 0, which is the row-major order of the placeholders). The token -> region rule:

        * :data:`PATCHES`: a token is one tower patch (``P x P`` pixels); a CLS token (Video-LLaVA's frames,
          a CLIP image under ``"full"``) stands for the whole frame; under ``"default"`` the first feature is
          dropped, as HF's LLaVA does;
        * :data:`POOLED`: a token is ``stride x stride`` patches (``stride * P`` pixels a side), as
          ``LlavaNextVideoPooler`` pools them (a remainder of patches that does not fill a pool is dropped);
        * :data:`GRID`: a token is one ``merge x merge`` block of patches of one temporal patch, in the
          order of ``qwen_patchify`` (grid order ``(t, h / m, w / m, m, m)``: the ``m * m`` patches of a token
          are consecutive rows of the pixel tensor).

        Args:
            config: the HF model config.
            batch: the model's inputs (pixel tensors and, for grid families, the grids).
            kind: ``"image"`` or ``"video"``.

        Returns:
            One :class:`MediaRegions` per media of ``kind`` (empty if the batch has none).

        Raises:
            ValueError: the family takes no media of ``kind``, or a pixel tensor of the wrong shape.
        """
        key = self.media_key(kind)
        pixels = batch.get(key)
        if pixels is None:
            return []
        if self.placeholders == GRID:
            return _grid_regions(kind, pixels, self.grids(batch, kind), int(config.vision_config.spatial_merge_size))
        vision = config.vision_config
        grid, patch = patch_grid(vision), int(vision.patch_size)
        frames = pixels.unsqueeze(1) if kind == "image" else pixels
        if frames.dim() != 5:
            want = "[N, C, H, W]" if kind == "image" else "[N, F, C, H, W]"
            raise ValueError(f"`{key}` must be {want}, got shape {tuple(pixels.shape)}")
        if self.placeholders == POOLED:
            stride = int(config.spatial_pool_stride)
            return _frame_regions(kind, frames, patch * stride, grid // stride, lead=False, drop_first=False)
        cls = tower_has_cls(vision)
        if kind == "video":
            return _frame_regions(kind, frames, patch, grid, lead=cls and self.video_cls, drop_first=False)
        default = getattr(config, "vision_feature_select_strategy", "default") == "default"
        # Features are [CLS] + patches; "default" drops the first: the CLS token, or a CLS-less tower's first patch.
        return _frame_regions(kind, frames, patch, grid, lead=cls and not default, drop_first=default and not cls)


MEDIA_KINDS = ("image", "video")
"""The kinds of media a family may take."""


@dataclass(frozen=True)
class MediaSteps:
    """How one image or video divides into time steps (:meth:`Family.media_steps`).

    Attributes:
        steps: time steps ``T`` (frames; Qwen2-VL's temporal patches; 1 for an image).
        tokens_per_step: placeholder tokens per step.
        rows_per_step: rows of the vision tower's input per step (1 for a LLaVA family's frame, ``h * w``
            patches for Qwen2-VL).
    """

    steps: int
    tokens_per_step: int
    rows_per_step: int


@dataclass(frozen=True)
class MediaRegions:
    """The pixels behind the placeholder tokens of one image or video (:meth:`Family.media_regions`).

    A media's tokens come time step by time step (a frame; a temporal patch of Qwen2-VL; one step for an
    image); inside a step, an optional whole-frame token (a CLS token) first, then the spatial tokens in
    the model's order.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        regions: float ``[T, N, D]``: per time step, the ``D`` pixel values (normalised, as the model sees
            them) of each of its ``N`` spatial tokens.
        lead: whether every time step starts with one token that stands for the whole frame (CLS).
    """

    kind: str
    regions: torch.Tensor
    lead: bool = False

    @property
    def steps(self) -> int:
        """Time steps ``T``."""
        return int(self.regions.shape[0])

    @property
    def tokens_per_step(self) -> int:
        """Placeholder tokens per time step: ``N``, plus one with a whole-frame token."""
        return int(self.regions.shape[1]) + int(self.lead)

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens of the media."""
        return self.steps * self.tokens_per_step


def _frame_regions(
    kind: str, frames: torch.Tensor, cell: int, cells: int, *, lead: bool, drop_first: bool
) -> list[MediaRegions]:
    """Square cells of ``cell`` pixels, ``cells`` a side, row by row, of frames ``[N, F, C, H, W]``."""
    num, steps, channels = frames.shape[:3]
    x = frames[..., : cells * cell, : cells * cell]
    x = x.reshape(num, steps, channels, cells, cell, cells, cell).permute(0, 1, 3, 5, 2, 4, 6)
    x = x.reshape(num, steps, cells * cells, channels * cell * cell)
    if drop_first:
        x = x[:, :, 1:]
    return [MediaRegions(kind, x[i], lead) for i in range(num)]


def _grid_regions(kind: str, pixels: torch.Tensor, grids: torch.Tensor, merge: int) -> list[MediaRegions]:
    """Qwen2-VL patch rows ``[sum t*h*w, D]`` cut per media of grid ``(t, h, w)`` into ``merge x merge`` blocks."""
    sizes = [(int(t), int(h), int(w)) for t, h, w in grids.tolist()]
    total = sum(t * h * w for t, h, w in sizes)
    if pixels.dim() != 2 or pixels.shape[0] != total:
        raise ValueError(f"{kind} patches have shape {tuple(pixels.shape)}, but the grids {sizes} need {total} rows")
    out, start = [], 0
    for t, h, w in sizes:
        rows = pixels[start : start + t * h * w]
        out.append(MediaRegions(kind, rows.reshape(t, h * w // (merge * merge), merge * merge * pixels.shape[1])))
        start += t * h * w
    return out


_LLAVA_IMAGE_REFUSAL = (
    "LLaVA-NeXT-Video encodes images with anyres tiling, which runs through the checkpoint's own image "
    "processor only: load the student from a checkpoint whose folder has its preprocessor_config.json "
    "(with image_grid_pinpoints), or give the image as a one-frame video"
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            LLAVA,
            classes=("LlavaForConditionalGeneration",),
            model_types=("llava",),
            towers=("vision_tower",),
            projectors=("multi_modal_projector",),
            placeholders=PATCHES,
            image_key=PIXEL_VALUES,
            unused_tower_heads=True,
            encoders=(("image", "vision_tower", "multi_modal_projector"),),
        ),
        Family(
            LLAVA_NEXT_VIDEO,
            classes=("LlavaNextVideoForConditionalGeneration",),
            model_types=("llava_next_video",),
            towers=("vision_tower",),
            projectors=("multi_modal_projector", "vision_resampler"),
            placeholders=POOLED,
            image_key=PIXEL_VALUES,
            video_key=PIXEL_VALUES_VIDEOS,
            image_refusal=_LLAVA_IMAGE_REFUSAL,
            anyres_images=True,
            image_sizes_key=IMAGE_SIZES,
            video_processor="LlavaNextVideoVideoProcessor",
            unused_tower_heads=True,
            encoders=(("video", "vision_tower", "multi_modal_projector"),),
            frames_alone=True,
            media_only=(("image", "image_newline"), ("video", "vision_resampler")),
        ),
        Family(
            VIDEO_LLAVA,
            classes=("VideoLlavaForConditionalGeneration",),
            model_types=("video_llava",),
            towers=("video_tower", "image_tower"),
            projectors=("multi_modal_projector",),
            placeholders=PATCHES,
            video_cls=True,
            image_key=PIXEL_VALUES_IMAGES,
            video_key=PIXEL_VALUES_VIDEOS,
            video_processor="VideoLlavaVideoProcessor",
            unused_tower_heads=True,
            encoders=(
                ("image", "image_tower", "multi_modal_projector"),
                ("video", "video_tower", "multi_modal_projector"),
            ),
            frames_alone=True,
            media_only=(("image", "image_tower"), ("video", "video_tower")),
        ),
        Family(
            QWEN2_VL,
            classes=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
            model_types=("qwen2_vl", "qwen2_5_vl"),
            towers=("visual",),
            projectors=("visual.merger",),
            placeholders=GRID,
            image_key=PIXEL_VALUES,
            video_key=PIXEL_VALUES_VIDEOS,
            grid_keys=(IMAGE_GRID_THW, VIDEO_GRID_THW),
            video_processor="Qwen2VLVideoProcessor",
            mrope=True,
            vision_markers=True,
            token_types=True,
            seconds_per_grid=("qwen2_5_vl",),
            encoders=(("image", "visual", "visual"), ("video", "visual", "visual")),
        ),
    )
}
"""The supported multimodal families by name."""

TEXT_ONLY = Family(CAUSAL_LM, classes=(), model_types=())
"""Any ``*ForCausalLM`` with a ``model`` decoder and an ``lm_head``."""

_BY_CLASS = {cls: family for family in FAMILIES.values() for cls in family.classes}
_BY_MODEL_TYPE = {kind: family for family in FAMILIES.values() for kind in family.model_types}


def tower_has_cls(vision_config: Any) -> bool:
    """Whether a vision tower's features start with a class token (CLIP) or not (SigLIP).

    Raises:
        ValueError: for a tower not in :data:`CLS_TOWERS` or :data:`NO_CLS_TOWERS`.
    """
    kind = getattr(vision_config, "model_type", "")
    if kind in NO_CLS_TOWERS:
        return False
    if kind in CLS_TOWERS:
        return True
    raise ValueError(
        f"unknown vision tower {kind!r}: cannot tell whether it has a CLS token; supported towers are "
        f"{CLS_TOWERS + NO_CLS_TOWERS}"
    )


def patch_grid(vision_config: Any) -> int:
    """Patches per side of a tower's square input (``image_size / patch_size``).

    Raises:
        ValueError: the image size is not a multiple of the patch size.
    """
    size, patch = int(vision_config.image_size), int(vision_config.patch_size)
    if size % patch:
        raise ValueError(f"image_size {size} is not a multiple of patch_size {patch}")
    return size // patch


def config_of(model_or_config: Any) -> Any:
    """The HF config of a model (possibly peft-wrapped), or the argument itself when it is a config."""
    return getattr(unwrap(model_or_config), "config", model_or_config)


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


@dataclass(frozen=True)
class ModelParts:
    """The pieces of one HF model that this package drives.

    Attributes:
        family: the model's :class:`Family` (:data:`TEXT_ONLY` for a causal LM).
        model: the unwrapped HF model (``*ForConditionalGeneration`` / ``*ForCausalLM``).
        inner: the model without its head (``model.model``); returns ``last_hidden_state``.
        decoder: the text decoder that takes ``inputs_embeds`` (for a causal LM, ``inner`` itself).
        lm_head: the output projection to the vocabulary.
        media_token_ids: ids of image/video placeholder tokens (empty for a causal LM).
    """

    family: Family
    model: nn.Module
    inner: nn.Module
    decoder: nn.Module
    lm_head: nn.Module
    media_token_ids: tuple[int, ...]

    @property
    def mrope(self) -> bool:
        """Whether position ids are Qwen2-VL's 3-D M-RoPE ids."""
        return self.family.mrope


def unwrap(model: Any) -> Any:
    """Return the HF model inside a peft ``PeftModel`` (or the argument itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _supported_message(name: str) -> str:
    classes = ", ".join(sorted(_BY_CLASS))
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
    family = _BY_CLASS.get(name)
    if family is not None:
        inner = hf.model
        cfg = hf.config
        ids = tuple(
            int(i)
            for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
            if i is not None
        )
        return ModelParts(family, hf, inner, inner.language_model, hf.lm_head, ids)
    if name.endswith("ForCausalLM") and isinstance(getattr(hf, "model", None), nn.Module) and hasattr(hf, "lm_head"):
        return ModelParts(TEXT_ONLY, hf, hf.model, hf.model, hf.lm_head, ())
    raise TypeError(_supported_message(name))


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` at a dotted attribute ``path`` (``"visual.merger"``), or None."""
    module: Any = root
    for name in path.split("."):
        module = getattr(module, name, None)
    return module if isinstance(module, nn.Module) else None


def vision_parts(parts: ModelParts) -> tuple[list[nn.Module], list[nn.Module]]:
    """The vision encoder's modules and the projector's modules of a multimodal model.

    A projector inside a tower (Qwen2-VL's patch merger inside ``visual``) is taken out of it: the tower
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
    """Vision-tower modules that never reach the loss in this family.

    LLaVA-family models read the tower's hidden states (``vision_feature_layer``), so CLIP's
    ``post_layernorm``, SigLIP's pooling ``head`` and every encoder layer after the deepest selected hidden
    state (the last layer under LLaVA's usual ``vision_feature_layer=-2``) get no gradient; under plain DDP
    such parameters stop training with "parameters that were not used". :class:`~regate_lightning.MLLMModule`
    freezes them (their values do not affect any output).
    """
    if not parts.family.unused_tower_heads:
        return []
    tower, _ = vision_parts(parts)
    found = []
    for module in tower:
        vision_model = getattr(module, "vision_model", module)
        found += [
            getattr(vision_model, n)
            for n in ("post_layernorm", "head")
            if isinstance(getattr(vision_model, n, None), nn.Module)
        ]
        found += layers_after_feature_layer(vision_model, getattr(parts.model.config, "vision_feature_layer", -1))
    return found


def layers_after_feature_layer(vision_model: nn.Module, feature_layer: int | list[int]) -> list[nn.Module]:
    """The encoder layers of a CLIP/SigLIP tower that come after every hidden state the model reads.

    ``hidden_states[k]`` is the output of the first ``k`` of the tower's ``N`` layers (``k = 0``: the
    embeddings), so with the deepest selected index ``K`` (negative indices counted from ``N + 1``) the
    layers ``K .. N - 1`` never reach the features: LLaVA's ``vision_feature_layer=-2`` leaves the last one.

    Args:
        vision_model: the tower's transformer (with ``encoder.layers``).
        feature_layer: the config's ``vision_feature_layer`` (an index or a list of indices).

    Returns:
        The unused layers (empty for a tower without ``encoder.layers``).
    """
    layers = getattr(getattr(vision_model, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    states = len(layers) + 1
    indices = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    deepest = max(int(i) % states for i in indices)
    return list(layers)[deepest:]


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
