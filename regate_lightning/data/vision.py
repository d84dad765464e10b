"""What each model family expects of its pixels and placeholder tokens, derived from the model's config.

:class:`VisionSpec` is read from an HF config (:meth:`VisionSpec.from_model`) and turns decoded
``uint8`` frames into the model's own tensors and the number of placeholder tokens they need:

===================  ==================================  ============================================
family               tensors (per media, cat on dim 0)    placeholder tokens
===================  ==================================  ============================================
llava                ``pixel_values`` [1, 3, H, W]         image: ``(S / P) ** 2`` (+1 if the strategy is
                                                          ``"full"`` and the tower has a CLS token)
llava_next_video     ``pixel_values_videos`` [1,T,3,H,W]   video: ``T * ((S / P) // stride) ** 2``;
                                                          images refused (they need anyres tiling)
video_llava          ``pixel_values_images`` [1,3,H,W],    image: as llava; video: ``T * ((S / P) ** 2
                     ``pixel_values_videos`` [1,T,3,H,W]   + CLS)`` (the CLS token is kept for video)
qwen2_vl             ``pixel_values(_videos)`` [t*h*w,     ``t * h * w / merge ** 2`` pads, wrapped in
                     3*tp*P*P], ``*_grid_thw`` [1, 3]      vision_start ... vision_end
===================  ==================================  ============================================

``S`` is the tower's ``image_size``, ``P`` its ``patch_size``; ``(t, h, w)`` is the Qwen2-VL grid in
patches. Qwen2.5-VL also gets ``second_per_grid_ts`` [1] (``temporal_patch_size / sampled fps``) per
video, as its processor does. Qwen2-VL patches are flattened exactly like HF's
``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``: grid order ``(t, h / m, w / m, m, m)`` and, inside
a patch, ``(channel, temporal, P, P)``. An image is one frame repeated ``temporal_patch_size`` times; a
video whose frame count is not a multiple of ``temporal_patch_size`` repeats its last frame.

Normalisation defaults to CLIP's mean/std for CLIP and Qwen towers and ``0.5`` for SigLIP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from regate_lightning.data.video import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, normalize

LLAVA = "llava"
LLAVA_NEXT_VIDEO = "llava_next_video"
VIDEO_LLAVA = "video_llava"
QWEN2_VL = "qwen2_vl"

_FAMILIES: dict[str, str] = {
    "llava": LLAVA,
    "llava_next_video": LLAVA_NEXT_VIDEO,
    "video_llava": VIDEO_LLAVA,
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_VL,
}
_NO_CLS_TOWERS = ("siglip_vision_model", "siglip2_vision_model")
_CLS_TOWERS = ("clip_vision_model",)

# HF batch keys of the media tensors.
PIXEL_VALUES = "pixel_values"
PIXEL_VALUES_IMAGES = "pixel_values_images"
PIXEL_VALUES_VIDEOS = "pixel_values_videos"
IMAGE_GRID_THW = "image_grid_thw"
VIDEO_GRID_THW = "video_grid_thw"
SECOND_PER_GRID_TS = "second_per_grid_ts"

TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2
"""Values of ``mm_token_type_ids``."""


@dataclass(frozen=True)
class ProcessedMedia:
    """One image or video turned into model tensors.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        tensors: HF batch key -> tensor whose dim 0 concatenates across media and samples.
        num_tokens: placeholder tokens the model expects (pads only, without Qwen's start/end).
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    num_tokens: int


def _tower_has_cls(vision_config: Any) -> bool:
    kind = getattr(vision_config, "model_type", "")
    if kind in _NO_CLS_TOWERS:
        return False
    if kind in _CLS_TOWERS:
        return True
    raise ValueError(
        f"unknown vision tower {kind!r}: cannot tell whether it has a CLS token; supported towers are "
        f"{_CLS_TOWERS + _NO_CLS_TOWERS}"
    )


def _triple(values: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"`mean` and `std` need 3 values (RGB), got {values}")
    return (float(values[0]), float(values[1]), float(values[2]))


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        # A peft wrapper exposes the HF model through get_base_model().
        base = getattr(model_or_config, "get_base_model", None)
        config = base().config if callable(base) else config
    return config


@dataclass(frozen=True)
class VisionSpec:
    """Pixel and placeholder-token layout of one model family (see the module docstring).

    Build it with :meth:`from_model`; the fields are plain values so it pickles to DataLoader workers.

    Attributes:
        family: ``"llava"``, ``"llava_next_video"``, ``"video_llava"`` or ``"qwen2_vl"``.
        size: ``(H, W)`` every image and frame is resized to.
        mean: normalisation mean (RGB).
        std: normalisation standard deviation (RGB).
        vocab_size: the language model's vocabulary size (text ids must be below it).
        image_token_id: placeholder id of images, ``None`` if the family takes no images.
        video_token_id: placeholder id of videos, ``None`` if the family takes no videos.
        vision_start_token_id: Qwen2-VL's token before each media, else ``None``.
        vision_end_token_id: Qwen2-VL's token after each media, else ``None``.
        tokens_per_image: LLaVA families: tokens per image.
        tokens_per_frame: LLaVA families: tokens per video frame.
        patch_size: Qwen2-VL spatial patch size.
        temporal_patch_size: Qwen2-VL temporal patch size.
        merge_size: Qwen2-VL spatial merge size.
        seconds_per_grid: whether to emit ``second_per_grid_ts`` (Qwen2.5-VL).
        image_refusal: why images are refused (``llava_next_video``), else ``""``.
        image_key: HF batch key of image pixels, ``None`` if the family takes no images.
        video_key: HF batch key of video pixels, ``None`` if the family takes no videos.
    """

    family: str
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocab_size: int
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tokens_per_image: int = 0
    tokens_per_frame: int = 0
    patch_size: int = 0
    temporal_patch_size: int = 1
    merge_size: int = 1
    seconds_per_grid: bool = False
    image_refusal: str = ""
    image_key: str | None = None
    video_key: str | None = None

    @classmethod
    def from_model(
        cls,
        model_or_config: Any,
        size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> VisionSpec:
        """Read the layout from an HF multimodal model or its config.

        Args:
            model_or_config: a supported ``*ForConditionalGeneration`` (possibly peft-wrapped) or its
                config.
            size: ``(H, W)``. LLaVA families must use the tower's ``image_size`` (the default). Qwen2-VL
                takes any multiple of ``patch_size * merge_size``; default ``4 * patch * merge`` per side
                (16 tokens per image).
            mean: override the normalisation mean.
            std: override the normalisation standard deviation.

        Returns:
            The spec.

        Raises:
            ValueError: unsupported model type, tower, strategy or size; the message names the fix.
        """
        config = _config_of(model_or_config)
        model_type = getattr(config, "model_type", None)
        family = _FAMILIES.get(str(model_type))
        if family is None:
            raise ValueError(f"model type {model_type!r} is not supported; supported are {sorted(_FAMILIES)}")
        vision = config.vision_config
        vocab = int(config.get_text_config().vocab_size)
        if family == QWEN2_VL:
            return cls._qwen(config, vision, vocab, size, mean, std)
        siglip = getattr(vision, "model_type", "") in _NO_CLS_TOWERS
        side, patch = int(vision.image_size), int(vision.patch_size)
        if size is not None and tuple(size) != (side, side):
            raise ValueError(
                f"`size` must be the tower's image size ({side}, {side}) for {family}, got {size}"
            )
        grid = side // patch
        cls_token = int(_tower_has_cls(vision))
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        image_tokens = grid * grid + (cls_token if strategy == "full" else 0)
        base = cls(
            family=family,
            size=(side, side),
            mean=_triple(mean or (SIGLIP_MEAN if siglip else CLIP_MEAN)),
            std=_triple(std or (SIGLIP_STD if siglip else CLIP_STD)),
            vocab_size=vocab,
        )
        if family == LLAVA:
            return dataclasses.replace(
                base,
                image_token_id=int(config.image_token_id),
                tokens_per_image=image_tokens,
                image_key=PIXEL_VALUES,
            )
        if family == VIDEO_LLAVA:
            return dataclasses.replace(
                base,
                image_token_id=int(config.image_token_id),
                video_token_id=int(config.video_token_id),
                tokens_per_image=image_tokens,
                tokens_per_frame=grid * grid + cls_token,
                image_key=PIXEL_VALUES_IMAGES,
                video_key=PIXEL_VALUES_VIDEOS,
            )
        # llava_next_video: its pooler reshapes patch features to a square grid: no room for a CLS token.
        if strategy == "full" and cls_token:
            raise ValueError(
                "llava_next_video with vision_feature_select_strategy='full' and a CLS tower cannot pool"
            )
        per_frame = (grid // int(config.spatial_pool_stride)) ** 2
        refusal = (
            "LLaVA-NeXT-Video encodes images with anyres tiling, which this package does not implement; "
            "give it videos (an image can be a one-frame video), or use another family for images"
        )
        return dataclasses.replace(
            base,
            video_token_id=int(config.video_token_id),
            tokens_per_frame=per_frame,
            image_refusal=refusal,
            video_key=PIXEL_VALUES_VIDEOS,
        )

    @classmethod
    def _qwen(
        cls,
        config: Any,
        vision: Any,
        vocab: int,
        size: tuple[int, int] | None,
        mean: tuple[float, float, float] | None,
        std: tuple[float, float, float] | None,
    ) -> VisionSpec:
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        factor = patch * merge
        size = (int(size[0]), int(size[1])) if size is not None else (4 * factor, 4 * factor)
        if size[0] % factor or size[1] % factor or min(size) < factor:
            raise ValueError(
                f"`size` must be positive multiples of patch_size * merge_size = {factor}, got {size}"
            )
        return cls(
            family=QWEN2_VL,
            size=(int(size[0]), int(size[1])),
            mean=_triple(mean or CLIP_MEAN),
            std=_triple(std or CLIP_STD),
            vocab_size=vocab,
            image_token_id=int(config.image_token_id),
            video_token_id=int(config.video_token_id),
            vision_start_token_id=int(config.vision_start_token_id),
            vision_end_token_id=int(config.vision_end_token_id),
            patch_size=patch,
            temporal_patch_size=int(vision.temporal_patch_size),
            merge_size=merge,
            seconds_per_grid=config.model_type == "qwen2_5_vl",
            image_key=PIXEL_VALUES,
            video_key=PIXEL_VALUES_VIDEOS,
        )

    @property
    def is_qwen(self) -> bool:
        """Whether the family is Qwen2-VL / Qwen2.5-VL (grids, M-RoPE, ``mm_token_type_ids``)."""
        return self.family == QWEN2_VL

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
            return (
                f"{self.family} takes no {kind}s; use a model family that does, or remove them from the data"
            )
        return ""

    def placeholder_ids(self, kind: str, num_tokens: int) -> list[int]:
        """The token ids that stand for one media of ``kind`` in ``input_ids``."""
        token = self.image_token_id if kind == "image" else self.video_token_id
        assert token is not None
        ids = [token] * num_tokens
        if self.is_qwen:
            assert self.vision_start_token_id is not None and self.vision_end_token_id is not None
            ids = [self.vision_start_token_id, *ids, self.vision_end_token_id]
        return ids

    def process_image(self, image: torch.Tensor) -> ProcessedMedia:
        """Turn one decoded image into the model's tensors.

        Args:
            image: uint8 ``[3, H, W]`` already at :attr:`size`.

        Returns:
            The tensors and the token count.
        """
        reason = self.accepts("image")
        if reason:
            raise ValueError(reason)
        self._check_size(image)
        pixels = normalize(image, self.mean, self.std)
        if self.is_qwen:
            patches, grid = qwen_patchify(
                pixels.unsqueeze(0), self.patch_size, self.temporal_patch_size, self.merge_size
            )
            tokens = int(grid.prod()) // self.merge_size**2
            return ProcessedMedia("image", {PIXEL_VALUES: patches, IMAGE_GRID_THW: grid.unsqueeze(0)}, tokens)
        assert self.image_key is not None
        return ProcessedMedia("image", {self.image_key: pixels.unsqueeze(0)}, self.tokens_per_image)

    def process_video(self, frames: torch.Tensor, sampled_fps: float | None = None) -> ProcessedMedia:
        """Turn one decoded video into the model's tensors.

        Args:
            frames: uint8 ``[T, 3, H, W]`` already at :attr:`size`.
            sampled_fps: frames per second of ``frames`` (Qwen2.5-VL's temporal position spacing);
                ``None`` gives HF's default of one second per temporal patch.

        Returns:
            The tensors and the token count.
        """
        reason = self.accepts("video")
        if reason:
            raise ValueError(reason)
        self._check_size(frames)
        pixels = normalize(frames, self.mean, self.std)
        if self.is_qwen:
            patches, grid = qwen_patchify(pixels, self.patch_size, self.temporal_patch_size, self.merge_size)
            tensors = {PIXEL_VALUES_VIDEOS: patches, VIDEO_GRID_THW: grid.unsqueeze(0)}
            if self.seconds_per_grid:
                seconds = self.temporal_patch_size / sampled_fps if sampled_fps else 1.0
                tensors[SECOND_PER_GRID_TS] = torch.tensor([seconds], dtype=torch.float32)
            return ProcessedMedia("video", tensors, int(grid.prod()) // self.merge_size**2)
        assert self.video_key is not None
        return ProcessedMedia(
            "video", {self.video_key: pixels.unsqueeze(0)}, frames.shape[0] * self.tokens_per_frame
        )

    def _check_size(self, pixels: torch.Tensor) -> None:
        if tuple(pixels.shape[-2:]) != tuple(self.size):
            raise ValueError(f"media must be resized to {self.size} first, got {tuple(pixels.shape[-2:])}")


def qwen_patchify(
    frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten frames into Qwen2-VL patches, in the order of HF's Qwen2-VL image/video processors.

    Args:
        frames: float32 ``[T, C, H, W]`` (normalised); ``H`` and ``W`` multiples of
            ``patch_size * merge_size``. ``T`` is padded to a multiple of ``temporal_patch_size`` by
            repeating the last frame (an image, ``T = 1``, becomes ``temporal_patch_size`` copies).
        patch_size: spatial patch size ``P``.
        temporal_patch_size: temporal patch size ``tp``.
        merge_size: spatial merge size ``m``.

    Returns:
        float32 ``[t * h * w, C * tp * P * P]`` and the grid, int64 ``[3]`` = ``(t, h, w)``.

    Example:
        >>> p, g = qwen_patchify(torch.zeros(1, 3, 32, 32), 8, 2, 2)
        >>> tuple(p.shape), g.tolist()
        ((16, 384), [1, 4, 4])
    """
    num, channels, height, width = frames.shape
    if pad := -num % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        num += pad
    t, h, w = num // temporal_patch_size, height // patch_size, width // patch_size
    if h % merge_size or w % merge_size or height % patch_size or width % patch_size:
        raise ValueError(f"frame size {(height, width)} must be a multiple of patch_size * merge_size")
    x = frames.reshape(
        t,
        temporal_patch_size,
        channels,
        h // merge_size,
        merge_size,
        patch_size,
        w // merge_size,
        merge_size,
        patch_size,
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(t * h * w, channels * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([t, h, w], dtype=torch.int64)
