"""What each model family expects of its pixels and placeholder tokens: the checkpoint's or the built-in rules.

:class:`VisionSpec` is read from an HF model or config (:meth:`VisionSpec.from_model`) and turns decoded
``uint8`` frames into the model's own tensors and the number of placeholder tokens they need. Which keys
and which placeholder rule a family has is written once, in :mod:`regate_lightning.families` (its table
lists them); this module applies them to pixels, by one of two paths:

- **The checkpoint's processor** (:class:`~regate_lightning.data.processors.CheckpointProcessor`), when
  the model was loaded from an HF id or folder with processor configs (``preprocessor_config.json``,
  ``video_preprocessor_config.json``, ``processor_config.json``): its mean/std, resize rule and sizes
  (Qwen's ``smart_resize`` per image or video, LLaVA's shortest-edge resize and centre crop, LLaVA-NeXT's
  anyres tiling), through transformers' own image processor (PIL backend) and video processor (where
  torchvision is importable; else the built-in copy of its rules). Placeholder counts follow from the
  processed media (Qwen: its grid; anyres: :func:`anyres_image_tokens` of the image's size).
- **The built-in path**, for models built in memory (the tiny random models, the synthetic demo's
  student): every image and frame is resized to one :attr:`VisionSpec.size` and normalised with CLIP's
  mean/std for CLIP and Qwen towers, ``0.5`` for SigLIP. Qwen2-VL frames default to
  ``4 * patch * merge`` pixels a side.

Qwen2.5-VL also gets ``second_per_grid_ts`` [1] (``temporal_patch_size / sampled fps``) per video, as
its processor does. Qwen2-VL patches are flattened exactly like HF's ``Qwen2VLImageProcessor`` /
``Qwen2VLVideoProcessor``: grid order ``(t, h / m, w / m, m, m)`` and, inside a patch, ``(channel,
temporal, P, P)``. An image is one frame repeated ``temporal_patch_size`` times; a video whose frame
count is not a multiple of ``temporal_patch_size`` repeats its last frame.

A media that is more than a run of placeholders in its processor's text (Qwen3-VL's timestamp before every temporal
patch of a video, InternVL's ``<img> ... </img>`` spans and ``Frame{i}:`` lines, SmolVLM's tile and frame markers,
VideoLLaMA3's per-frame times, Gemma 3's begin / end of image) gets the family's text in ``ProcessedMedia.expansion``
(:meth:`~regate_lightning.families.Family.media_expansion`); :meth:`VisionSpec.process_video` takes each frame's
time in its source video (frame index / source fps, which :func:`~regate_lightning.data.video.sample_video`
records) for the timestamps.

An explicit ``size`` (a data module's ``frame_size``) overrides the resize rule on both paths: every
image and frame is resized to it (:func:`~regate_lightning.data.video.resize_frames`), then normalised
and patched by the path's rules; a size the model cannot take is refused, naming ``frame_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from regate_lightning.data.processors import (
    FRAME_IMAGE_VIDEO_PROCESSORS,
    VIDEO_PROCESSOR_DEFAULTS,
    CheckpointProcessor,
    Pixels,
    checkpoint_of,
    qwen_patchify,
)
from regate_lightning.data.video import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, normalize
from regate_lightning.families import (
    FAMILIES,
    FIXED,
    GRID,
    MERGED,
    NO_CLS_TOWERS,
    PATCHES,
    TILES,
    Family,
    MediaText,
    config_of,
    family_of,
    patch_grid,
    tower_has_cls,
)
from regate_lightning.keys import (
    FRAME_INDEX,
    IMAGE_GRID_THW,
    IMAGE_MERGE_SIZES,
    IMAGE_SIZES,
    PIXEL_ATTENTION_MASK,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    SECOND_PER_GRID_TS,
    VIDEO_COMPRESSION_MASK,
    VIDEO_GRID_THW,
    VIDEO_MERGE_SIZES,
)

DEFAULT_VIDEO_FPS = 24.0
"""The frame rate transformers' processors assume for a video without metadata (``VideoMetadata.fps`` None):
Qwen3-VL's timestamps of frames given without their times."""


@dataclass(frozen=True)
class ProcessedMedia:
    """One image or video turned into model tensors.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        tensors: HF batch key -> tensor whose dim 0 concatenates across media and samples.
        num_tokens: placeholder tokens the model expects (pads only, without Qwen's start/end).
        expansion: for a family whose media are more than a run of placeholders (per-frame timestamps,
            tile markers, ...): what replaces the media's one placeholder token in the chat template's text,
            as token ids (int) and text to tokenize (str), in order, exactly as the family's processor writes
            it (``ProcessorMixin.replace_image_token`` / ``replace_video_token``); None for a run of
            ``num_tokens`` placeholders.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    num_tokens: int
    expansion: tuple[int | str, ...] | None = None


def _triple(values: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"`mean` and `std` need 3 values (RGB), got {values}")
    return (float(values[0]), float(values[1]), float(values[2]))


def _height_width(size: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a transformers size (dict or ``SizeDict``) that names both, else None."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    return (int(height), int(width)) if height and width else None


@dataclass(frozen=True)
class _Request:
    """What :meth:`VisionSpec.from_model` read, for the family's builder."""

    family: Family
    config: Any
    vocab: int
    size: Sequence[int] | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    checkpoint: CheckpointProcessor | None


def _check_square(family: Family, size: Sequence[int] | None, side: int, takes: str) -> None:
    """Refuse a ``frame_size`` other than the family's ``side x side`` (``takes`` says why, with ``{side}``)."""
    if size is not None and tuple(size) != (side, side):
        raise ValueError(
            f"`frame_size` {list(size)} cannot be used with {family.name}: {takes.format(side=side)}; "
            f"set frame_size: [{side}, {side}] or leave it unset"
        )


def _check_multiple(family: Family, size: Sequence[int] | None, factor: int, of: str) -> None:
    """Refuse a ``frame_size`` whose sides are not positive multiples of ``factor`` (``of``: what it is)."""
    if size is not None and (size[0] % factor or size[1] % factor or min(size) < factor):
        raise ValueError(
            f"`frame_size` {list(size)} cannot be used with {family.name}: height and width must be positive "
            f"multiples of {of} = {factor} (e.g. [{4 * factor}, {4 * factor}])"
        )


def anyres_image_tokens(
    image_size: tuple[int, int], grid_pinpoints: list[list[int]], tower_size: int, patch_size: int
) -> int:
    """Placeholder tokens of one LLaVA-NeXT anyres image, by the model's own rule.

    The base tile gives ``(S / P) ** 2`` tokens; the tiles of the best resolution among
    ``grid_pinpoints`` form a ``rows x cols`` grid of ``S / P`` features a side, from which the padding
    is removed (transformers' ``unpad_image``) and one newline token is added per row. The shapes come
    from transformers' own ``get_anyres_image_grid_shape`` and ``unpad_image`` (on an empty meta tensor).

    Args:
        image_size: the original ``(H, W)`` of the image.
        grid_pinpoints: the model config's ``image_grid_pinpoints`` (``[H, W]`` resolutions).
        tower_size: the vision tower's ``image_size`` ``S``.
        patch_size: the vision tower's ``patch_size`` ``P``.

    Returns:
        The number of image tokens the model produces for that image.
    """
    from transformers.models.llava_next_video.modeling_llava_next_video import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    side = tower_size // patch_size
    rows, cols = get_anyres_image_grid_shape(list(image_size), grid_pinpoints, tower_size)
    features = torch.empty(0, rows * side, cols * side, device="meta")
    height, width = unpad_image(features, list(image_size)).shape[1:]
    return side * side + height * (width + 1)


def _of_family(read: Callable[[Family], Any], doc: str) -> Any:
    """A :class:`VisionSpec` property that reads the spec's family entry (:data:`FAMILIES`)."""
    return property(lambda spec: read(FAMILIES[spec.family]), doc=doc)


@dataclass(frozen=True)
class VisionSpec:
    """Pixel and placeholder-token layout of one model family (see the module docstring).

    Build it with :meth:`from_model`; the fields are plain values (and the checkpoint's processor) so it
    pickles to DataLoader workers.

    Attributes:
        family: the name of the model's family (:data:`~regate_lightning.families.FAMILIES`).
        size: ``(H, W)`` every image and frame is resized to; None on the checkpoint path without an
            explicit size (each media then follows the checkpoint's resize rule).
        mean: normalisation mean (RGB): the built-in one, or the checkpoint's (for information).
        std: normalisation standard deviation (RGB), likewise.
        vocab_size: the language model's vocabulary size (text ids must be below it).
        image_token_id: placeholder id of images, ``None`` if the family takes no images.
        video_token_id: placeholder id of videos, ``None`` if the family takes no videos.
        vision_start_token_id: Qwen2-VL's token before each media, else ``None``.
        vision_end_token_id: Qwen2-VL's token after each media, else ``None``.
        tokens_per_image: LLaVA / Video-LLaVA: tokens per image.
        tokens_per_frame: LLaVA families: tokens per video frame.
        tokens_per_video: tokens every video has beyond its frames' (LLaVA-OneVision's newline).
        patch_size: Qwen2-VL spatial patch size; LLaVA-NeXT: the tower's patch size.
        temporal_patch_size: Qwen2-VL temporal patch size.
        merge_size: Qwen2-VL spatial merge size.
        seconds_per_grid: whether to emit ``second_per_grid_ts`` (Qwen2.5-VL).
        image_refusal: why images are refused, else ``""``.
        image_key: HF batch key of image pixels, ``None`` if the family takes no images.
        video_key: HF batch key of video pixels, ``None`` if the family takes no videos.
        tower_size: LLaVA families: the vision tower's ``image_size``.
        image_grid_pinpoints: LLaVA-NeXT: the model config's anyres resolutions.
        vision_aspect_ratio: LLaVA-OneVision: the config's ``"anyres_max_N"`` (its anyres count,
            :func:`~regate_lightning.families.llava_onevision.image_tokens`); ``""`` for LLaVA-NeXT's.
        processor: the checkpoint's processor, or None on the built-in path.
        tile_tokens: tile families (SmolVLM, InternVL): placeholder tokens per tile or video frame.
        image_merge: VideoLLaMA3: the merge size of images (built-in path; the checkpoint's processor says its own).
        compression: VideoLLaMA3: whether videos are compressed on the built-in path (the video processor's default).
        template_tokens: the family's :attr:`~regate_lightning.families.Family.template_tokens`.
    """

    family: str
    size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocab_size: int
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tokens_per_image: int = 0
    tokens_per_frame: int = 0
    tokens_per_video: int = 0
    patch_size: int = 0
    temporal_patch_size: int = 1
    merge_size: int = 1
    seconds_per_grid: bool = False
    image_refusal: str = ""
    image_key: str | None = None
    video_key: str | None = None
    tower_size: int = 0
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    vision_aspect_ratio: str = ""
    processor: CheckpointProcessor | None = None
    tile_tokens: int = 0
    template_tokens: tuple[tuple[str, str], ...] = ()
    image_merge: int = 1
    compression: bool = False

    @classmethod
    def from_model(
        cls,
        model_or_config: Any,
        size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        processor: bool | str = True,
        video_backend: str = "auto",
    ) -> VisionSpec:
        """Read the layout from an HF multimodal model or its config, and the checkpoint's processor.

        Args:
            model_or_config: a supported ``*ForConditionalGeneration`` (possibly peft-wrapped) or its
                config.
            size: ``(H, W)`` (a data module's ``frame_size``). LLaVA families take only the tower's
                ``image_size``; Qwen2-VL any multiple of ``patch_size * merge_size``. Default: the
                checkpoint's resize rule, or on the built-in path the tower's size (LLaVA) and
                ``4 * patch * merge`` per side (Qwen2-VL, 16 tokens per image).
            mean: override the built-in normalisation mean (built-in path only).
            std: override the built-in normalisation standard deviation (built-in path only).
            processor: True: the checkpoint the model was loaded from (its ``name_or_path``), if it has
                processor configs; a string: that HF id or folder's processor configs; False: the
                built-in path.
            video_backend: which video path the checkpoint's processor uses: ``"auto"``,
                ``"transformers"`` or ``"builtin"`` (see :meth:`CheckpointProcessor.load`).

        Returns:
            The spec.

        Raises:
            ValueError: unsupported model type, tower, strategy or size, or processor configs that do not
                fit the model; the message names the fix.
        """
        config = config_of(model_or_config)
        family = family_of(config)
        source = processor if isinstance(processor, str) else checkpoint_of(model_or_config) if processor else None
        checkpoint = CheckpointProcessor.load(source, family, video_backend) if source else None
        if checkpoint is not None and (mean is not None or std is not None):
            raise ValueError(
                f"`mean` / `std` set the built-in normalisation; the checkpoint {source} has its own processor "
                "configs: pass processor=False to use the built-in path"
            )
        request = _Request(family, config, int(config.get_text_config().vocab_size), size, mean, std, checkpoint)
        builders = {GRID: cls._grid, TILES: cls._tiles, MERGED: cls._merged, FIXED: cls._fixed}
        return builders.get(family.placeholders, cls._llava)(request)

    @classmethod
    def _spec(
        cls,
        request: _Request,
        size: Sequence[int] | None,
        defaults: tuple[Sequence[float], Sequence[float]],
        **fields: Any,
    ) -> VisionSpec:
        """The spec with what every family sets: its name and keys, ``size``, the checkpoint's normalisation (or the
        one given, or ``defaults``), the vocabulary, the checkpoint's processor; and the family's ``fields``."""
        mean, std = request.mean, request.std
        if request.checkpoint is not None:
            mean, std = _checkpoint_mean_std(request.checkpoint)
        return cls(
            family=request.family.name,
            size=None if size is None else (int(size[0]), int(size[1])),
            mean=_triple(mean or defaults[0]),
            std=_triple(std or defaults[1]),
            vocab_size=request.vocab,
            image_key=request.family.image_key,
            video_key=request.family.video_key,
            processor=request.checkpoint,
            **fields,
        )

    @classmethod
    def _llava(cls, request: _Request) -> VisionSpec:
        """The LLaVA families: every image and frame the tower's ``S x S``; anyres images from the checkpoint."""
        family, config, checkpoint, size = request.family, request.config, request.checkpoint, request.size
        vision = config.vision_config
        siglip = getattr(vision, "model_type", "") in NO_CLS_TOWERS
        side = int(vision.image_size)
        patch_grid(vision)  # refuses a tower whose image size is no whole number of patches
        _check_square(family, size, side, "its vision tower takes {side} x {side} images only")
        images = family.image_key is not None
        videos = family.video_key is not None
        refusal = family.image_refusal
        pinpoints: tuple[tuple[int, int], ...] = ()
        if checkpoint is not None:
            _check_llava_processor(checkpoint, config, family, side)
            refusal = _image_refusal(checkpoint) if images else ""
            if family.anyres_images:
                pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
        else:
            size = (side, side)
        return cls._spec(
            request,
            size,
            (SIGLIP_MEAN, SIGLIP_STD) if siglip else (CLIP_MEAN, CLIP_STD),
            image_token_id=int(config.image_token_id) if images else None,
            video_token_id=int(config.video_token_id) if videos else None,
            tokens_per_image=family.image_tokens(config) if images and family.placeholders == PATCHES else 0,
            tokens_per_frame=family.frame_tokens(config) if videos else 0,
            tokens_per_video=family.tail_tokens(config, "video") if videos else 0,
            patch_size=int(vision.patch_size),
            image_refusal=refusal,
            tower_size=side,
            image_grid_pinpoints=pinpoints,
            vision_aspect_ratio=str(getattr(config, "vision_aspect_ratio", "") or "") if pinpoints else "",
        )

    @classmethod
    def _grid(cls, request: _Request) -> VisionSpec:
        """Qwen-VL families: patch grids, ``4 * patch * merge`` pixels a side on the built-in path."""
        family, config, checkpoint, size = request.family, request.config, request.checkpoint, request.size
        vision = config.vision_config
        patch, merge, temporal = int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size)
        factor = patch * merge
        _check_multiple(family, size, factor, "patch_size * merge_size")
        refusal = ""
        if checkpoint is not None:
            _check_grid_processor(checkpoint, patch, merge, temporal)
            refusal = _image_refusal(checkpoint)
        elif size is None:
            size = (4 * factor, 4 * factor)
        return cls._spec(
            request,
            size,
            (CLIP_MEAN, CLIP_STD),
            image_token_id=int(config.image_token_id),
            video_token_id=int(config.video_token_id),
            vision_start_token_id=int(config.vision_start_token_id),
            vision_end_token_id=int(config.vision_end_token_id),
            patch_size=patch,
            temporal_patch_size=temporal,
            merge_size=merge,
            seconds_per_grid=config.model_type in family.seconds_per_grid,
            image_refusal=refusal,
        )

    @classmethod
    def _tiles(cls, request: _Request) -> VisionSpec:
        """A tile family (SmolVLM, InternVL): every tile and frame ``S x S`` (the family's ``tile_side``),
        ``tile_tokens`` placeholders each, a video's frames images to the model (one placeholder id); on the
        built-in path the normalisation of the family's video processor class."""
        family, config, checkpoint, size = request.family, request.config, request.checkpoint, request.size
        side, tokens = family.tile_side(config), family.tile_tokens(config)
        _check_square(family, size, side, "its tiles and frames are {side} x {side}")
        refusal = ""
        if checkpoint is not None:
            _check_tile_processor(checkpoint, side, tokens)
            refusal = _image_refusal(checkpoint)
        else:
            size = (side, side)
        defaults = VIDEO_PROCESSOR_DEFAULTS[family.video_processor]
        image_id = int(config.image_token_id)
        return cls._spec(
            request,
            size,
            (defaults["image_mean"], defaults["image_std"]),
            image_token_id=image_id,
            video_token_id=image_id,  # every frame is an image to the model
            patch_size=_side(config.vision_config.patch_size),
            image_refusal=refusal,
            tower_size=side,
            tile_tokens=tokens,
            template_tokens=family.template_tokens,
        )

    @classmethod
    def _merged(cls, request: _Request) -> VisionSpec:
        """VideoLLaMA3: patch grids per media; on the built-in path its processors' defaults (image merge 1, video
        merge 2, compression on, mean / std 0.5), every image and frame ``4 * patch * 2`` pixels a side."""
        from regate_lightning.families.video_llama_3 import IMAGE_MERGE, VIDEO_MERGE

        family, config, checkpoint, size = request.family, request.config, request.checkpoint, request.size
        patch = int(config.vision_config.patch_size)
        factor = patch * VIDEO_MERGE
        _check_multiple(family, size, factor, "patch_size * video merge size")
        video_merge, compression = VIDEO_MERGE, True
        if checkpoint is not None:
            for where, found in (("image", checkpoint.image_processor), ("video", checkpoint.video_settings)):
                if found is not None and int(found.patch_size) != patch:
                    raise ValueError(
                        f"{checkpoint.source}: the {where} processor's patch_size {found.patch_size} differs from the "
                        f"model's vision_config.patch_size {patch}; fix the checkpoint's processor config"
                    )
            if checkpoint.video_settings is not None:
                video_merge = checkpoint.video_settings.merge_size
                compression = checkpoint.video_settings.use_token_compression
        elif size is None:
            size = (4 * factor, 4 * factor)
        return cls._spec(
            request,
            size,
            (SIGLIP_MEAN, SIGLIP_STD),
            image_token_id=int(config.image_token_id),
            video_token_id=int(config.video_token_id),
            patch_size=patch,
            merge_size=video_merge,
            image_merge=IMAGE_MERGE,
            compression=compression,
        )

    @classmethod
    def _fixed(cls, request: _Request) -> VisionSpec:
        """Gemma 3: every image (and crop) ``S x S``, ``mm_tokens_per_image`` placeholders between its markers."""
        from regate_lightning.families.gemma3 import image_tokens

        family, config, checkpoint, size = request.family, request.config, request.checkpoint, request.size
        side = int(config.vision_config.image_size)
        _check_square(family, size, side, "its vision tower takes {side} x {side} images only")
        if checkpoint is not None:
            found = _height_width(getattr(checkpoint.image_processor, "size", None) or {})
            if found != (side, side):
                raise ValueError(
                    f"{checkpoint.source}: the image processor makes {found} images but the vision tower takes "
                    f"{side} x {side}; fix size in its preprocessor_config.json"
                )
        else:
            size = (side, side)
        return cls._spec(
            request,
            size,
            (SIGLIP_MEAN, SIGLIP_STD),
            image_token_id=int(config.image_token_id),
            tokens_per_image=image_tokens(config),
            patch_size=int(config.vision_config.patch_size),
            tower_size=side,
            template_tokens=family.template_tokens,
        )

    is_fixed = _of_family(lambda f: f.placeholders == FIXED, "Whether images are Gemma 3's: a fixed token count each.")
    is_merged = _of_family(lambda f: f.placeholders == MERGED, "Whether media are VideoLLaMA3's merged patch grids.")
    is_tiles = _of_family(
        lambda f: f.placeholders == TILES,
        "Whether media are tiles and frames of a fixed count each (SmolVLM, InternVL).",
    )
    is_qwen = _of_family(lambda f: f.placeholders == GRID, "Whether the family counts placeholders by grid (Qwen-VL).")
    token_types = _of_family(
        lambda f: f.token_types, "Whether the model needs the token types (``mm_token_type_ids``, ``token_type_ids``)."
    )
    token_types_key = _of_family(lambda f: f.token_types_key, "The batch key of the token types.")

    @property
    def frame_keys(self) -> tuple[str, ...]:
        """Media keys whose clips of different lengths may be joined (see :func:`join_media`)."""
        family = FAMILIES[self.family]
        return (family.video_key,) if family.frames_alone and family.video_key else ()

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids (and Qwen's vision start/end ids) that text tokens must never produce."""
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)
        return tuple(i for i in ids if i is not None)

    def accepts(self, kind: str) -> str:
        """``""`` if the family takes media of ``kind``, else why not (a message naming the fix)."""
        if kind == "image" and self.image_refusal:
            return self.image_refusal
        if (self.image_key if kind == "image" else self.video_key) is None:
            return f"{self.family} takes no {kind}s; use a model family that does, or remove them from the data"
        return ""

    def placeholder_ids(self, kind: str, num_tokens: int, markers: bool = True) -> list[int]:
        """The token ids that stand for one media of ``kind`` in ``input_ids``.

        Args:
            kind: ``"image"`` or ``"video"``.
            num_tokens: the media's placeholder count.
            markers: wrap them in Qwen's vision start / end ids (False where the chat template writes those).
        """
        token = self.image_token_id if kind == "image" else self.video_token_id
        assert token is not None
        ids = [token] * num_tokens
        return self.wrap_markers(ids) if markers else ids

    def wrap_markers(self, ids: list[int]) -> list[int]:
        """``ids`` wrapped in the family's vision start / end tokens (Qwen-VL), or as they are."""
        if not FAMILIES[self.family].vision_markers:
            return ids
        assert self.vision_start_token_id is not None and self.vision_end_token_id is not None
        return [self.vision_start_token_id, *ids, self.vision_end_token_id]

    def process_image(self, image: torch.Tensor) -> ProcessedMedia:
        """Turn one decoded image into the model's tensors.

        Args:
            image: uint8 ``[3, H, W]``: already at :attr:`size` when it is set, else as decoded.

        Returns:
            The tensors and the token count.
        """
        reason = self.accepts("image")
        if reason:
            raise ValueError(reason)
        if self.is_tiles:
            return self._tile_media("image", image.unsqueeze(0), None, None, None)
        if self.is_merged:
            return self._merged_media("image", image.unsqueeze(0), None, None, None)
        if self.is_fixed:
            return self._fixed_image(image)
        if self.processor is not None:
            return self._from_checkpoint("image", self._checkpoint_pixels("image", image[None]))
        pixels = self._normalized(image)
        if self.is_qwen:
            patches, grid = qwen_patchify(
                pixels.unsqueeze(0), self.patch_size, self.temporal_patch_size, self.merge_size
            )
            tokens = int(grid.prod()) // self.merge_size**2
            return ProcessedMedia("image", {PIXEL_VALUES: patches, IMAGE_GRID_THW: grid.unsqueeze(0)}, tokens)
        assert self.image_key is not None
        return ProcessedMedia("image", {self.image_key: pixels.unsqueeze(0)}, self.tokens_per_image)

    def process_video(
        self,
        frames: torch.Tensor,
        sampled_fps: float | None = None,
        times: torch.Tensor | None = None,
        duration: float | None = None,
        frame_seconds: Sequence[float] | None = None,
    ) -> ProcessedMedia:
        """Turn one decoded video into the model's tensors.

        Args:
            frames: uint8 ``[T, 3, H, W]``: already at :attr:`size` when it is set, else as decoded.
            sampled_fps: frames per second of ``frames`` (Qwen2.5-VL's temporal position spacing);
                ``None`` gives HF's default of one second per temporal patch.
            times: float ``[T]``, each frame's time in seconds (SmolVLM's per-frame timestamps); None: frame
                ``i`` at ``i / sampled_fps`` (``i`` seconds without a rate).
            duration: the clip's length in seconds (SmolVLM's intro); None: ``T / sampled_fps``.
            frame_seconds: each frame's index in its source video divided by the source's frame rate, as
                transformers' ``VideoMetadata`` gives them to ``Qwen3VLProcessor`` (Qwen3-VL's timestamps; equal
                to ``times`` for a clip of constant frame rate up to rounding, which the timestamps' one decimal
                can show); ``None`` gives transformers' default for a video without metadata: frames
                ``0 .. T - 1`` at :data:`DEFAULT_VIDEO_FPS`.

        Returns:
            The tensors, the token count and, for a family whose video is more than one run of placeholders,
            its expansion (:meth:`~regate_lightning.families.Family.media_expansion`).
        """
        reason = self.accepts("video")
        if reason:
            raise ValueError(reason)
        if self.is_tiles:
            return self._tile_media("video", frames, sampled_fps, times, duration)
        if self.is_merged:
            return self._merged_media("video", frames, sampled_fps, times, duration)
        if self.processor is not None:
            media = self._from_checkpoint("video", self._checkpoint_pixels("video", frames))
        else:
            pixels = self._normalized(frames)
            if self.is_qwen:
                patches, grid = qwen_patchify(pixels, self.patch_size, self.temporal_patch_size, self.merge_size)
                media = ProcessedMedia(
                    "video",
                    {PIXEL_VALUES_VIDEOS: patches, VIDEO_GRID_THW: grid.unsqueeze(0)},
                    int(grid.prod()) // self.merge_size**2,
                )
            else:
                assert self.video_key is not None
                tokens = frames.shape[0] * self.tokens_per_frame + self.tokens_per_video
                return ProcessedMedia("video", {self.video_key: pixels.unsqueeze(0)}, tokens)
        if self.seconds_per_grid:
            seconds = self.temporal_patch_size / sampled_fps if sampled_fps else 1.0
            media.tensors[SECOND_PER_GRID_TS] = torch.tensor([seconds], dtype=torch.float32)
        return self._with_expansion(media, frames.shape[0], frame_seconds)

    def _with_expansion(
        self, media: ProcessedMedia, num_frames: int, frame_seconds: Sequence[float] | None
    ) -> ProcessedMedia:
        """A grid family's video with its family's expansion (Qwen3-VL's timestamped temporal patches), if any."""
        grid = media.tensors.get(VIDEO_GRID_THW)
        if grid is None:
            return media
        if frame_seconds is None:
            frame_seconds = [i / DEFAULT_VIDEO_FPS for i in range(num_frames)]
        elif len(frame_seconds) != num_frames:
            raise ValueError(f"`frame_seconds` has {len(frame_seconds)} times for {num_frames} frames")
        assert self.video_token_id is not None
        start, end = self.vision_start_token_id, self.vision_end_token_id
        t, h, w = (int(v) for v in grid[0])
        text = MediaText(
            "video",
            self.video_token_id,
            steps=t,
            tokens_per_step=h * w // self.merge_size**2,
            markers=(start, end) if start is not None and end is not None else None,
            temporal_patch_size=self.temporal_patch_size,
            frame_seconds=tuple(float(v) for v in frame_seconds),
        )
        expansion = FAMILIES[self.family].media_expansion(text)
        return media if expansion is None else replace(media, expansion=expansion)

    def _tile_media(
        self,
        kind: str,
        frames: torch.Tensor,
        sampled_fps: float | None,
        times: torch.Tensor | None,
        duration: float | None,
    ) -> ProcessedMedia:
        """A tile family's image (the checkpoint's image processor cuts it into tiles: SmolVLM's rows and columns
        plus the global image, InternVL's grid plus a thumbnail; one tile on the built-in path) or video (one tile
        per frame), with the family's text for it (:meth:`~regate_lightning.families.Family.media_expansion`)."""
        image = kind == "image"
        rows_cols: tuple[int, int] = (0, 0)
        mask = None
        if self.processor is not None:
            pixels = self._checkpoint_pixels(kind, frames)
            values, mask, rows_cols = pixels.values, pixels.mask, pixels.rows_cols or (0, 0)
            if values.dim() == 5:  # SmolVLM's [n, 1, 3, S, S]; a video processor's [1, T, 3, S, S]
                values = values.flatten(0, 1)
            if mask is not None and mask.dim() == 4:
                mask = mask.flatten(0, 1)
            side = self.tower_size
            if tuple(values.shape[-2:]) != (side, side):
                raise ValueError(
                    f"{self.processor.source}: the checkpoint's processor made {kind} tiles of "
                    f"{tuple(values.shape[-2:])}, but the vision tower takes {side} x {side}"
                )
        else:
            values = self._normalized(frames)
        count = int(values.shape[0])
        stamps = _frame_times(times, count, sampled_fps)
        assert self.image_token_id is not None
        text = MediaText(
            kind,
            self.image_token_id,
            steps=count,
            tokens_per_step=self.tile_tokens,
            tile_grid=rows_cols,
            times=() if image else tuple(stamps),
            duration=None if image else (duration if duration is not None else count / (sampled_fps or 1.0)),
        )
        expansion = FAMILIES[self.family].media_expansion(text)
        return ProcessedMedia(kind, self._tile_tensors(kind, values, mask), count * self.tile_tokens, expansion)

    def _merged_media(
        self,
        kind: str,
        frames: torch.Tensor,
        sampled_fps: float | None,
        times: torch.Tensor | None,
        duration: float | None,
    ) -> ProcessedMedia:
        """VideoLLaMA3: patches, grid and merge size (and a video's compression mask); a video's text names each
        frame's time before its kept tokens (transformers' ``VideoLlama3Processor.replace_video_token``)."""
        from regate_lightning.families.video_llama_3 import compression_mask

        image = kind == "image"
        if self.processor is not None:
            pixels = self._checkpoint_pixels(kind, frames)
            values, grid = pixels.values, pixels.grid
            merge = pixels.merge_sizes if pixels.merge_sizes is not None else torch.tensor([self.merge_size])
            kept = pixels.compression
        else:
            merge = torch.tensor([self.image_merge if image else self.merge_size])
            values, grid = qwen_patchify(self._normalized(frames), self.patch_size, 1, int(merge))
            grid = grid.unsqueeze(0)
            kept = compression_mask(values, grid, merge) if not image and self.compression else None
        assert grid is not None
        tokens = int(grid.prod()) // int(merge) ** 2
        family = FAMILIES[self.family]
        if image:
            assert self.image_token_id is not None
            keys = {PIXEL_VALUES: values, IMAGE_GRID_THW: grid, IMAGE_MERGE_SIZES: merge}
            expansion = family.media_expansion(MediaText("image", self.image_token_id, 1, tokens))
            return ProcessedMedia("image", keys, tokens, expansion)
        if kept is None:
            kept = torch.ones(tokens, dtype=torch.bool)
        stamps = _frame_times(times, frames.shape[0], sampled_fps)
        per_frame = tuple(int(n) for n in kept.view(int(grid[0, 0]), -1).sum(1))
        assert self.video_token_id is not None
        keys = {
            PIXEL_VALUES_VIDEOS: values,
            VIDEO_GRID_THW: grid,
            VIDEO_MERGE_SIZES: merge,
            VIDEO_COMPRESSION_MASK: kept,
        }
        text = MediaText(
            "video",
            self.video_token_id,
            steps=len(per_frame),
            tokens_per_step=tokens // len(per_frame),
            placeholders=per_frame,
            times=tuple(stamps),
        )
        return ProcessedMedia("video", keys, int(kept.sum()), family.media_expansion(text))

    def _fixed_image(self, image: torch.Tensor) -> ProcessedMedia:
        """Gemma 3: the image (and any pan-and-scan crops the checkpoint's processor makes), each
        ``tokens_per_image`` placeholders in the processor's text (``Gemma3Processor.replace_image_token``)."""
        if self.processor is not None:
            values = self._checkpoint_pixels("image", image[None]).values
        else:
            values = self._normalized(image).unsqueeze(0)
        assert self.image_key is not None and self.image_token_id is not None
        steps = int(values.shape[0])  # the image and its crops
        expansion = FAMILIES[self.family].media_expansion(
            MediaText("image", self.image_token_id, steps, self.tokens_per_image)
        )
        return ProcessedMedia("image", {self.image_key: values}, steps * self.tokens_per_image, expansion)

    def _tile_tensors(self, kind: str, values: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A tile family's batch tensors of one image's tiles or one video's frames (``values`` ``[n, 3, S, S]``):
        the pixels and the frame index (0, 1, ... of a video's frames; -1 for an image's tiles); a family whose
        model takes a pixel mask per image (SmolVLM: ``[B, images, 3, S, S]`` and ``pixel_attention_mask``) one
        image per row, ``[n, 1, 3, S, S]``, and its mask ``[n, 1, S, S]`` (ones where ``mask`` is None)."""
        count = int(values.shape[0])
        index = torch.arange(count) if kind == "video" else torch.full((count,), -1, dtype=torch.int64)
        family = FAMILIES[self.family]
        if PIXEL_ATTENTION_MASK not in family.media_keys(kind):
            return {family.media_key(kind): values, FRAME_INDEX: index}
        if mask is None:
            mask = torch.ones(count, *values.shape[-2:], dtype=torch.int64)
        return {PIXEL_VALUES: values.unsqueeze(1), PIXEL_ATTENTION_MASK: mask.unsqueeze(1), FRAME_INDEX: index}

    def _from_checkpoint(self, kind: str, pixels: Pixels) -> ProcessedMedia:
        """The family's keys and placeholder count of media processed by the checkpoint's processor."""
        image = kind == "image"
        if self.is_qwen:
            assert pixels.grid is not None
            keys = (PIXEL_VALUES, IMAGE_GRID_THW) if image else (PIXEL_VALUES_VIDEOS, VIDEO_GRID_THW)
            tokens = int(pixels.grid.prod()) // self.merge_size**2
            return ProcessedMedia(kind, {keys[0]: pixels.values, keys[1]: pixels.grid}, tokens)
        key = self.image_key if image else self.video_key
        assert key is not None
        side = self.tower_size
        if pixels.image_size is not None:  # LLaVA-NeXT / OneVision anyres: [tiles, 3, S, S] and the original size
            height, width = (int(v) for v in pixels.image_size[0])
            pinpoints = [list(p) for p in self.image_grid_pinpoints]
            if self.vision_aspect_ratio:
                from regate_lightning.families.llava_onevision import image_tokens

                tokens = image_tokens((height, width), pinpoints, side, self.patch_size, self.vision_aspect_ratio)
            else:
                tokens = anyres_image_tokens((height, width), pinpoints, side, self.patch_size)
            return ProcessedMedia(kind, {key: pixels.values, IMAGE_SIZES: pixels.image_size}, tokens)
        if tuple(pixels.values.shape[-2:]) != (side, side):
            assert self.processor is not None
            raise ValueError(
                f"{self.processor.source}: the checkpoint's processor made {kind} pixels of "
                f"{tuple(pixels.values.shape[-2:])}, but the vision tower takes {side} x {side}"
            )
        tokens = self.tokens_per_image if image else pixels.values.shape[1] * self.tokens_per_frame
        return ProcessedMedia(kind, {key: pixels.values}, tokens + (0 if image else self.tokens_per_video))

    def _checkpoint_pixels(self, kind: str, frames: torch.Tensor) -> Pixels:
        """One image (``frames[0]``) or video through the checkpoint's processor, resized by its rule unless the spec
        has a size."""
        assert self.processor is not None
        resize = self.size is None
        return (
            self.processor.image(frames[0], resize=resize) if kind == "image" else self.processor.video(frames, resize)
        )

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``[..., 3, H, W]`` at :attr:`size` normalised by the spec's mean and std (built-in path).

        Raises:
            ValueError: pixels of another size.
        """
        if self.size is not None and tuple(pixels.shape[-2:]) != tuple(self.size):
            raise ValueError(f"media must be resized to {self.size} first, got {tuple(pixels.shape[-2:])}")
        return normalize(pixels, self.mean, self.std)


def _frame_times(times: torch.Tensor | None, count: int, sampled_fps: float | None) -> list[float]:
    """Each of ``count`` frames' time in seconds: ``times``, or frame ``i`` at ``i / sampled_fps`` (``i`` without a
    rate)."""
    if times is not None:
        return [float(t) for t in times]
    rate = sampled_fps or 1.0
    return [i / rate for i in range(count)]


def join_media(key: str, parts: list[torch.Tensor], frame_keys: tuple[str, ...] = ()) -> torch.Tensor:
    """Concatenate one media key's tensors of several media (of one sample, or of a batch) in order.

    Tensors of one shape beyond dim 0 are concatenated on dim 0 (what HF's processors do). Videos of a
    family that encodes every frame on its own (``key`` in ``frame_keys``, from
    :attr:`VisionSpec.frame_keys`) may differ in their frame count ``T``: they are joined into one
    ``[1, sum(T), 3, H, W]`` tensor, which the model encodes into the same features in the same order
    (its placeholders are filled in order), so clips sampled by ``fps`` batch whatever their lengths.

    Args:
        key: the HF batch key.
        parts: tensors ``[n_i, ...]``.
        frame_keys: keys whose videos may be joined frame-wise.

    Returns:
        The concatenation.

    Raises:
        ValueError: shapes that cannot be batched (the message names the key and the shapes).

    Example:
        >>> a, b = torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 3, 3, 4, 4)
        >>> tuple(join_media("pixel_values_videos", [a, b], ("pixel_values_videos",)).shape)
        (1, 5, 3, 4, 4)
    """
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) == 1:
        return torch.cat(parts)
    if key in frame_keys and all(p.dim() == 5 for p in parts) and len({tuple(p.shape[2:]) for p in parts}) == 1:
        return torch.cat([p.flatten(0, 1) for p in parts]).unsqueeze(0)
    if all(p.dim() == 5 for p in parts) and len({tuple(p.shape[2:]) for p in parts}) == 1:
        raise ValueError(
            f"cannot batch `{key}` of {sorted({int(p.shape[1]) for p in parts})} frames: this family's model adds "
            "features per video (LLaVA-OneVision's newline), so clips of different frame counts cannot be joined; "
            "sample a fixed `num_frames` (uniform sampling, no `fps`) or use batch_size 1"
        )
    raise ValueError(
        f"cannot batch `{key}` of shapes {sorted(shapes)}: every image and frame of a batch must have one size "
        "(set `frame_size`, or the tower's image size)"
    )


def _side(value: Any) -> int:
    """One side of a size given as an int or a ``(height, width)`` pair (InternVL's configs give both)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _image_refusal(checkpoint: CheckpointProcessor) -> str:
    """Why a checkpoint with video processor settings only cannot take images, or ``""``."""
    if checkpoint.image_processor is not None:
        return ""
    return (
        f"the student checkpoint {checkpoint.source} has video processor settings but no image processor config "
        "(preprocessor_config.json), so it cannot take images; add the config or give images as one-frame videos"
    )


def _checkpoint_mean_std(
    checkpoint: CheckpointProcessor,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    source = checkpoint.image_processor or checkpoint.video_settings
    return _triple(list(source.image_mean)), _triple(list(source.image_std))


def _check_tile_processor(checkpoint: CheckpointProcessor, side: int, tokens: int) -> None:
    """Refuse tile-family processor settings whose tiles are not the tower's ``side x side`` images.

    SmolVLM's processors make every tile and frame ``max_image_size`` square (its video config's settings run
    through the image processor); InternVL's resize to ``size``. InternVL's ``processor_config.json`` also names
    the tokens per tile (``image_seq_length``).
    """
    frame_images = checkpoint.family.video_processor in FRAME_IMAGE_VIDEO_PROCESSORS
    video = (checkpoint.video_overrides or None) if frame_images else checkpoint.video_settings
    for where, found in (("image", checkpoint.image_processor), ("video", video)):
        if found is None:
            continue
        get = found.get if isinstance(found, dict) else partial(getattr, found)
        if frame_images:
            max_size = get("max_image_size", None)
            edge = (max_size or {}).get("longest_edge")
            if edge is not None and int(edge) != side:
                raise ValueError(
                    f"{checkpoint.source}: the {where} processor's max_image_size {max_size} makes tiles of {edge} "
                    f"pixels, but the model's vision tower takes {side} x {side} (vision_config.image_size); they must "
                    "be equal"
                )
            continue
        out = _height_width(get("size", None) or {})
        if out != (side, side):
            raise ValueError(
                f"{checkpoint.source}: the {where} processor makes {out or 'aspect-dependent'} tiles but the vision "
                f"tower takes {side} x {side}; fix `size` in its processor config"
            )
    found = checkpoint.processor_settings.get("image_seq_length")
    if found is not None and int(found) != tokens:
        raise ValueError(
            f"{checkpoint.source}: processor_config.json's image_seq_length {found} differs from the model's "
            f"{tokens} tokens per tile (vision image_size, patch_size and downsample_ratio); fix the processor config"
        )


def _check_grid_processor(checkpoint: CheckpointProcessor, patch: int, merge: int, temporal: int) -> None:
    """Refuse Qwen processor settings that do not match the model's vision config."""
    model = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": temporal}
    for where, settings in (("image", checkpoint.image_processor), ("video", checkpoint.video_settings)):
        if settings is None:
            continue
        found = {k: int(getattr(settings, k)) for k in model}
        if found != model:
            raise ValueError(
                f"{checkpoint.source}: the {where} processor's {found} do not match the model's vision config "
                f"{model}; fix the checkpoint's processor config"
            )


def _check_llava_processor(checkpoint: CheckpointProcessor, config: Any, family: Family, side: int) -> None:
    """Refuse LLaVA-family processor settings that do not give the tower's square input."""
    source = checkpoint.source
    image = checkpoint.image_processor
    if image is not None:
        crop = _height_width(getattr(image, "crop_size", None) or {})
        resized = _height_width(getattr(image, "size", None) or {})
        out = crop if getattr(image, "do_center_crop", False) and crop else resized
        if out != (side, side):
            raise ValueError(
                f"{source}: the image processor makes {out or 'aspect-dependent'} images but the vision tower "
                f"takes {side} x {side}; fix crop_size / size in its preprocessor_config.json"
            )
        if family.anyres_images:
            found = [list(map(int, p)) for p in getattr(image, "image_grid_pinpoints", None) or []]
            if found != [list(map(int, p)) for p in config.image_grid_pinpoints]:
                raise ValueError(
                    f"{source}: the image processor's image_grid_pinpoints {found} differ from the model "
                    f"config's {config.image_grid_pinpoints}; they must be equal (the model tiles by its own)"
                )
            if tower_has_cls(config.vision_config) != (config.vision_feature_select_strategy == "default"):
                raise ValueError(
                    f"{family.name} anyres images need {side // config.vision_config.patch_size} ** 2 features "
                    "per tile: vision_feature_select_strategy='default' with a CLS tower, 'full' without"
                )
    video = checkpoint.video_settings
    if video is not None:
        crop = _height_width(video.crop_size or {})
        out = crop if video.do_center_crop and crop else _height_width(video.size)
        if out != (side, side):
            raise ValueError(
                f"{source}: the video processor makes {out or 'aspect-dependent'} frames but the vision tower "
                f"takes {side} x {side}; fix crop_size / size in its video processor config"
            )
