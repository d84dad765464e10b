"""What each model family expects of its pixels and placeholder tokens, derived from the model's config.

:class:`VisionSpec` is read from an HF config (:meth:`VisionSpec.from_model`) and turns decoded
``uint8`` frames into the model's own tensors and the number of placeholder tokens they need. Which
keys and which placeholder rule a family has is written once, in :mod:`regate_lightning.families`
(its table lists them); this module applies them to pixels.

Qwen2.5-VL also gets ``second_per_grid_ts`` [1] (``temporal_patch_size / sampled fps``) per video, as
its processor does. Qwen2-VL patches are flattened exactly like HF's ``Qwen2VLImageProcessor`` /
``Qwen2VLVideoProcessor``: grid order ``(t, h / m, w / m, m, m)`` and, inside a patch, ``(channel,
temporal, P, P)``. An image is one frame repeated ``temporal_patch_size`` times; a video whose frame
count is not a multiple of ``temporal_patch_size`` repeats its last frame.

Normalisation defaults to CLIP's mean/std for CLIP and Qwen towers and ``0.5`` for SigLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from regate_lightning.data.video import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, normalize
from regate_lightning.families import FAMILIES, GRID, NO_CLS_TOWERS, Family, config_of, family_of, patch_grid
from regate_lightning.keys import IMAGE_GRID_THW, PIXEL_VALUES, PIXEL_VALUES_VIDEOS, SECOND_PER_GRID_TS, VIDEO_GRID_THW


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


def _triple(values: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"`mean` and `std` need 3 values (RGB), got {values}")
    return (float(values[0]), float(values[1]), float(values[2]))


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
        config = config_of(model_or_config)
        family = family_of(config)
        vision = config.vision_config
        vocab = int(config.get_text_config().vocab_size)
        if family.placeholders == GRID:
            return cls._grid(family, config, vocab, size, mean, std)
        siglip = getattr(vision, "model_type", "") in NO_CLS_TOWERS
        side = int(vision.image_size)
        patch_grid(vision)  # refuses a tower whose image size is no whole number of patches
        if size is not None and tuple(size) != (side, side):
            raise ValueError(f"`size` must be the tower's image size ({side}, {side}) for {family.name}, got {size}")
        images = family.image_key is not None
        videos = family.video_key is not None
        return cls(
            family=family.name,
            size=(side, side),
            mean=_triple(mean or (SIGLIP_MEAN if siglip else CLIP_MEAN)),
            std=_triple(std or (SIGLIP_STD if siglip else CLIP_STD)),
            vocab_size=vocab,
            image_token_id=int(config.image_token_id) if images else None,
            video_token_id=int(config.video_token_id) if videos else None,
            tokens_per_image=family.image_tokens(config) if images else 0,
            tokens_per_frame=family.frame_tokens(config) if videos else 0,
            image_refusal=family.image_refusal,
            image_key=family.image_key,
            video_key=family.video_key,
        )

    @classmethod
    def _grid(
        cls,
        family: Family,
        config: Any,
        vocab: int,
        size: tuple[int, int] | None,
        mean: tuple[float, float, float] | None,
        std: tuple[float, float, float] | None,
    ) -> VisionSpec:
        vision = config.vision_config
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        factor = patch * merge
        size = (int(size[0]), int(size[1])) if size is not None else (4 * factor, 4 * factor)
        if size[0] % factor or size[1] % factor or min(size) < factor:
            raise ValueError(
                f"`size` must be positive multiples of patch_size * merge_size = {factor}, got {size}"
            )
        return cls(
            family=family.name,
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
            seconds_per_grid=config.model_type in family.seconds_per_grid,
            image_key=family.image_key,
            video_key=family.video_key,
        )

    @property
    def is_qwen(self) -> bool:
        """Whether the family counts placeholders by grid (Qwen2-VL / Qwen2.5-VL: patches, grids, markers)."""
        return FAMILIES[self.family].placeholders == GRID

    @property
    def token_types(self) -> bool:
        """Whether the model needs ``mm_token_type_ids`` beside ``input_ids``."""
        return FAMILIES[self.family].token_types

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
            return (
                f"{self.family} takes no {kind}s; use a model family that does, or remove them from the data"
            )
        return ""

    def placeholder_ids(self, kind: str, num_tokens: int) -> list[int]:
        """The token ids that stand for one media of ``kind`` in ``input_ids``."""
        token = self.image_token_id if kind == "image" else self.video_token_id
        assert token is not None
        ids = [token] * num_tokens
        if FAMILIES[self.family].vision_markers:
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
    raise ValueError(
        f"cannot batch `{key}` of shapes {sorted(shapes)}: every image and frame of a batch must have one size "
        "(set `frame_size`, or the tower's image size)"
    )


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
