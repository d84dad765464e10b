"""The student checkpoint's own preprocessing: its processor configs, applied to decoded pixels.

A checkpoint (an HF id or a local folder) that was saved with its processor carries the settings its
model was trained with: ``preprocessor_config.json`` (images), ``video_preprocessor_config.json``
(videos), ``processor_config.json`` (both, nested, transformers 5) and a chat template
(``chat_template.jinja`` / ``chat_template.json``). :class:`CheckpointProcessor` reads them the way
transformers does and applies them to the frames this package decodes (PyAV, Pillow):

- **Images** go through transformers' own image processor of the checkpoint, always its PIL backend
  (``AutoImageProcessor.from_pretrained(checkpoint, backend="pil")``: ``Qwen2VLImageProcessorPil``,
  ``CLIPImageProcessorPil``, ``LlavaNextImageProcessorPil``, ...). It needs no torchvision, and it gives the
  same numbers on every machine (the torchvision backend resizes differently).
- **Videos** go through transformers' own video processor of the checkpoint (the family's class,
  e.g. ``Qwen2VLVideoProcessor.from_pretrained(checkpoint)``) where torchvision can be imported (GPU
  machines), and otherwise through this module's built-in copy of its rules (:class:`VideoSettings`,
  :meth:`CheckpointProcessor.video`): the same resize rule and sizes (Qwen's ``smart_resize`` between
  ``min_pixels`` and ``max_pixels``, optionally capped per frame; LLaVA's shortest-edge resize and centre
  crop), the same interpolation kernel (torch's, which torchvision calls: uint8 bicubic with
  antialiasing), the same fused rescale-and-normalise and the same patch order. Both are run on the
  frames this package sampled (``do_sample_frames=False``).

Settings are resolved as transformers resolves them: the video settings come from
``processor_config.json``'s ``video_processor`` entry, else ``video_preprocessor_config.json``, else
``preprocessor_config.json``, over the video processor class's defaults (:data:`VIDEO_PROCESSOR_DEFAULTS`,
copied from transformers and checked against it where torchvision is importable); Qwen's
``min_pixels`` / ``max_pixels`` override ``size``.

The built-in path of :mod:`regate_lightning.data.vision` (fixed constants, one size for every frame) is
used only for models that were not loaded from a checkpoint with processor configs (the tiny random test
models, the synthetic demo).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from regate_lightning.data.errors import DataError
from regate_lightning.data.video import CLIP_MEAN, CLIP_STD
from regate_lightning.families import GRID, MERGED, Family, unwrap

DEFAULT_NUM_FRAMES = 8
"""Frames per video when neither the user nor the checkpoint says (uniform sampling)."""

PIL_RESAMPLE_MODES: dict[int, str] = {2: "bilinear", 3: "bicubic"}
"""PIL resampling ids (``PILImageResampling``) the built-in video path implements -> torch interpolate mode."""

_CLIP_BICUBIC: dict[str, Any] = {
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "do_convert_rgb": True,
}
_LLAVA_VIDEO_DEFAULTS: dict[str, Any] = {
    **_CLIP_BICUBIC,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "default_to_square": False,
}
VIDEO_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen2VLVideoProcessor": {
        **_CLIP_BICUBIC,
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_frames": 4,
        "max_frames": 768,
        "cap_pixels_per_frame": None,
        "max_video_tokens": 128000,
        "default_to_square": True,
    },
    "Qwen3VLVideoProcessor": {
        **_CLIP_BICUBIC,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "fps": 2,
        "num_frames": None,
        "min_frames": 4,
        "max_frames": 768,
        "cap_pixels_per_frame": None,
        "max_video_tokens": 768,
        "default_to_square": True,
    },
    "LlavaNextVideoVideoProcessor": _LLAVA_VIDEO_DEFAULTS,
    "VideoLlavaVideoProcessor": _LLAVA_VIDEO_DEFAULTS,
    "LlavaOnevisionVideoProcessor": {
        **_CLIP_BICUBIC,
        "size": {"height": 384, "width": 384},
        "do_center_crop": None,
        "crop_size": None,
        "default_to_square": False,
    },
    "InternVLVideoProcessor": {**_CLIP_BICUBIC, "size": {"height": 384, "width": 384}, "default_to_square": True},
    "VideoLlama3VideoProcessor": {
        **_CLIP_BICUBIC,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
        "patch_size": 14,
        "temporal_patch_size": 1,
        "merge_size": 2,
        "min_frames": 4,
        "max_frames": 180,
        "use_token_compression": True,
    },
    "SmolVLMVideoProcessor": {
        "do_resize": True,
        "resample": 1,  # LANCZOS
        "size": {"longest_edge": 4 * 364},
        "max_image_size": {"longest_edge": 364},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "do_pad": True,
    },
}
"""Class defaults of transformers' video processors (transformers 5.24), for the built-in video path.

``tests/test_processors.py`` compares them with the classes themselves where torchvision is importable;
``tests/test_family_qwen3_vl.py`` compares the Qwen3-VL entry on every machine (its module imports without
torchvision, only its constructor needs it)."""

SMART_RESIZE_CLASSES = ("Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor", "VideoLlama3VideoProcessor")
"""Video processors that resize by Qwen's ``smart_resize`` (``size`` in pixels, aspect ratio kept)."""

FRAME_IMAGE_VIDEO_PROCESSORS = ("SmolVLMVideoProcessor",)
"""Video processors that make every frame one image of the family's image processor (``[T, 1, 3, S, S]`` with a
pixel mask): where torchvision does not import, the built-in path runs the checkpoint's image processor on every
frame with the video config's settings (:func:`tile_video_overrides`)."""


@functools.cache
def torchvision_usable() -> bool:
    """Whether torchvision imports here (transformers' video processors and fast image processors need it).

    A torchvision built for another torch is installed but fails to import (``operator torchvision::nms
    does not exist``); that counts as absent.
    """
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:  # absent, or built for another torch
        return False
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


def checkpoint_of(model_or_config: Any) -> str | None:
    """The HF id or folder a model (possibly peft-wrapped) or config was loaded from; None if built in memory."""
    target = unwrap(model_or_config)
    config = getattr(target, "config", target)
    name = getattr(target, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


def chat_template_of(source: str) -> str | None:
    """The processor chat template of a checkpoint (``chat_template.json``, else ``chat_template.jinja``).

    Read with transformers' own lookup (``ProcessorMixin.get_processor_dict``); None when the checkpoint
    has none or cannot be read. Of several named templates the ``"default"`` one is returned.
    """
    from transformers.processing_utils import ProcessorMixin

    try:
        template = ProcessorMixin.get_processor_dict(source)[0].get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _image_processor_dict(source: str) -> dict[str, Any] | None:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return dict(ImageProcessingMixin.get_image_processor_dict(source)[0])
    except (OSError, ValueError):
        return None


def _video_processor_dict(source: str) -> dict[str, Any] | None:
    from transformers.video_processing_utils import VideoProcessorMixin

    try:
        return dict(VideoProcessorMixin.get_video_processor_dict(source)[0])
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class VideoSettings:
    """A checkpoint's video processor settings, resolved as transformers resolves them.

    Attributes:
        processor_class: the transformers video processor class these settings belong to.
        source: the checkpoint (for messages).
        do_resize: whether frames are resized.
        size: ``shortest_edge`` / ``longest_edge`` (pixels per frame for Qwen, an edge length otherwise)
            or ``height`` / ``width``.
        resample: the PIL resampling id (3 bicubic, 2 bilinear).
        do_center_crop: whether frames are centre-cropped to :attr:`crop_size`.
        crop_size: ``height`` / ``width`` of the crop, or None.
        do_rescale: whether pixels are multiplied by :attr:`rescale_factor`.
        rescale_factor: usually ``1 / 255``.
        do_normalize: whether ``(x - mean) / std`` is applied.
        image_mean: per-channel mean (RGB).
        image_std: per-channel standard deviation (RGB).
        patch_size: Qwen: spatial patch size.
        temporal_patch_size: Qwen: frames per temporal patch.
        merge_size: Qwen: spatial merge size.
        fps: frames per second to sample when the user gives no sampling, or None.
        num_frames: frames to sample when the user gives no sampling, or None.
        min_frames: fewest frames an fps-sampled video gets.
        max_frames: most frames an fps-sampled video gets, or None (then ``num_frames`` caps it).
        cap_pixels_per_frame: Qwen: bound each frame by an even share of ``max_video_tokens`` worth of
            pixels (qwen-vl-utils' rule); transformers' unset value means False.
        max_video_tokens: Qwen: the token budget behind :attr:`cap_pixels_per_frame`.
    """

    processor_class: str
    source: str
    do_resize: bool
    size: dict[str, int]
    resample: int
    do_center_crop: bool
    crop_size: dict[str, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    patch_size: int = 0
    temporal_patch_size: int = 1
    merge_size: int = 1
    fps: float | None = None
    num_frames: int | None = None
    min_frames: int = 1
    max_frames: int | None = None
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 0
    use_token_compression: bool = False

    @property
    def smart_resize(self) -> bool:
        """Whether frames are resized by Qwen's ``smart_resize`` (pixels between min and max, aspect kept)."""
        return self.processor_class in SMART_RESIZE_CLASSES

    @classmethod
    def resolve(cls, source: str, processor_class: str, found: dict[str, Any]) -> VideoSettings:
        """Apply a checkpoint's video processor dict over the class defaults, as the class's ``__init__`` does.

        Args:
            source: the checkpoint, for messages.
            processor_class: a key of :data:`VIDEO_PROCESSOR_DEFAULTS`.
            found: the checkpoint's resolved video processor dict (see the module docstring).

        Returns:
            The settings.
        """
        from transformers.image_processing_utils import get_size_dict

        merged = {**VIDEO_PROCESSOR_DEFAULTS[processor_class], **{k: v for k, v in found.items() if v is not None}}
        square = bool(merged.get("default_to_square", True))
        size = dict(get_size_dict(merged["size"], default_to_square=square))
        if processor_class in ("Qwen2VLVideoProcessor", "VideoLlama3VideoProcessor"):  # __init__'s compatibility
            if found.get("min_pixels") is not None:
                size["shortest_edge"] = int(found["min_pixels"])
            if found.get("max_pixels") is not None:
                size["longest_edge"] = int(found["max_pixels"])
        crop = merged.get("crop_size")
        crop = dict(get_size_dict(crop, param_name="crop_size")) if crop is not None else None
        fps, num_frames, max_frames = merged.get("fps"), merged.get("num_frames"), merged.get("max_frames")
        return cls(
            processor_class=processor_class,
            source=source,
            do_resize=bool(merged.get("do_resize", True)),
            size={k: int(v) for k, v in size.items() if v is not None},
            resample=int(merged.get("resample", 3)),
            do_center_crop=bool(merged.get("do_center_crop", False)),
            crop_size={k: int(v) for k, v in crop.items() if v is not None} if crop else None,
            do_rescale=bool(merged.get("do_rescale", True)),
            rescale_factor=float(merged.get("rescale_factor", 1 / 255)),
            do_normalize=bool(merged.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in merged["image_mean"]),
            image_std=tuple(float(v) for v in merged["image_std"]),
            patch_size=int(merged.get("patch_size", 0) or 0),
            temporal_patch_size=int(merged.get("temporal_patch_size", 1) or 1),
            merge_size=int(merged.get("merge_size", 1) or 1),
            fps=float(fps) if fps is not None else None,
            num_frames=int(num_frames) if num_frames is not None else None,
            min_frames=int(merged.get("min_frames", 1) or 1),
            max_frames=int(max_frames) if max_frames is not None else None,
            cap_pixels_per_frame=bool(merged.get("cap_pixels_per_frame")),
            max_video_tokens=int(merged.get("max_video_tokens", 0) or 0),
            use_token_compression=bool(merged.get("use_token_compression", False)),
        )

    def output_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        """``(H, W)`` of a ``height x width`` frame after the resize step (before any crop).

        Qwen2-VL: ``smart_resize`` with ``factor = patch_size * merge_size`` between ``size["shortest_edge"]``
        and ``size["longest_edge"]`` pixels per frame (the latter capped per frame with
        :attr:`cap_pixels_per_frame`, which needs ``num_frames``). Qwen3-VL: its video ``smart_resize``, whose
        bounds are pixels of the whole clip (frames rounded to whole temporal patches), with its own per-frame
        cap. Others: transformers' shortest-edge / height-width rules.

        Raises:
            ValueError: a frame whose aspect ratio exceeds 200 (Qwen's ``smart_resize``), a Qwen3-VL clip of
                fewer frames than a temporal patch; settings the built-in path lacks are refused earlier, by
                :meth:`check_builtin`.
        """
        if self.processor_class == "Qwen3VLVideoProcessor":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_smart_resize

            factor = self.patch_size * self.merge_size
            max_pixels = self.size["longest_edge"]
            if self.cap_pixels_per_frame:  # Qwen3VLVideoProcessor.resize
                frame_cap = self.max_video_tokens * factor * factor
                per_frame = max(min(frame_cap, max_pixels // num_frames), int(self.size["shortest_edge"] * 1.05))
                max_pixels = per_frame * num_frames
            return tuple(
                clip_smart_resize(
                    num_frames,
                    height,
                    width,
                    temporal_factor=self.temporal_patch_size,
                    factor=factor,
                    min_pixels=self.size["shortest_edge"],
                    max_pixels=max_pixels,
                )
            )  # type: ignore[return-value]
        if self.processor_class == "VideoLlama3VideoProcessor":  # its own smart_resize, max pixels per frame
            from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import smart_resize as vl3_resize

            factor = self.patch_size * self.merge_size
            pixels = self.size["longest_edge"] // num_frames
            return tuple(vl3_resize(height, width, factor, self.size["shortest_edge"], pixels))  # type: ignore[return-value]
        if self.smart_resize:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

            factor = self.patch_size * self.merge_size
            max_pixels = self.size["longest_edge"]
            if self.cap_pixels_per_frame:  # Qwen2VLVideoProcessor.resize
                total = int(self.max_video_tokens * factor * factor * 0.9)
                max_pixels = max(
                    min(max_pixels, total * self.temporal_patch_size // num_frames),
                    int(self.size["shortest_edge"] * 1.05),
                )
            return tuple(smart_resize(height, width, factor, self.size["shortest_edge"], max_pixels))  # type: ignore[return-value]
        from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio

        if "shortest_edge" in self.size and "longest_edge" in self.size:
            return tuple(
                get_size_with_aspect_ratio((height, width), self.size["shortest_edge"], self.size["longest_edge"])
            )  # type: ignore[return-value]
        if "shortest_edge" in self.size:
            dummy = np.empty((1, height, width), dtype=np.uint8)
            return tuple(
                get_resize_output_image_size(
                    dummy, self.size["shortest_edge"], default_to_square=False, input_data_format="channels_first"
                )
            )  # type: ignore[return-value]
        return self.size["height"], self.size["width"]

    def check_builtin(self) -> None:
        """Refuse settings the built-in video path does not implement (before any data is read).

        Raises:
            ValueError: naming the setting, and torchvision (with which transformers' own processor runs).
        """
        fix = "install torchvision so that transformers' own video processor runs"
        if self.resample not in PIL_RESAMPLE_MODES:
            raise ValueError(
                f"{self.source}: video resample {self.resample} is not implemented by the built-in video path "
                f"(it has {PIL_RESAMPLE_MODES}); {fix}"
            )
        if not self.smart_resize and "shortest_edge" not in self.size and not {"height", "width"} <= set(self.size):
            raise ValueError(
                f"{self.source}: the video processor's size {self.size} is not implemented by the built-in video "
                f"path (it has shortest_edge, shortest_edge + longest_edge, height + width); {fix}"
            )


def resize_uint8(frames: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize uint8 frames exactly as torchvision's ``resize`` does on CPU tensors (antialiased).

    torchvision calls ``torch.nn.functional.interpolate``: directly on uint8 for bicubic (and for bilinear
    on AVX2/AVX512/arm64 CPUs), else in float32, then rounded back to uint8 (bicubic clamped first).

    Args:
        frames: uint8 ``[..., 3, h, w]``.
        size: ``(H, W)``.
        resample: PIL resampling id, a key of :data:`PIL_RESAMPLE_MODES`.

    Returns:
        uint8 ``[..., 3, H, W]``.
    """
    mode = PIL_RESAMPLE_MODES.get(int(resample))
    if mode is None:
        raise ValueError(
            f"resample {resample} is not implemented by the built-in video path (it has bilinear 2 and bicubic 3); "
            "install torchvision so that transformers' own video processor runs"
        )
    shape = frames.shape
    if tuple(shape[-2:]) == tuple(size):
        return frames
    x = frames.reshape(-1, *shape[-3:])
    native = mode == "bicubic" or (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    )
    if native:
        y = F.interpolate(x, size=list(size), mode=mode, align_corners=False, antialias=True)
    else:
        y = F.interpolate(x.float(), size=list(size), mode=mode, align_corners=False, antialias=True)
        if mode == "bicubic":
            y = y.clamp_(0, 255)
        y = y.round_().to(torch.uint8)
    return y.reshape(*shape[:-2], *size)


def center_crop(frames: torch.Tensor, size: dict[str, int]) -> torch.Tensor:
    """transformers' centre crop (its torchvision backend): top ``int((h - H) / 2)``, zero-padded if smaller.

    Args:
        frames: ``[..., C, h, w]``.
        size: ``{"height": H, "width": W}``.

    Returns:
        ``[..., C, H, W]``.
    """
    crop_h, crop_w = size["height"], size["width"]
    height, width = frames.shape[-2:]
    if crop_w > width or crop_h > height:
        left, top = max(crop_w - width, 0) // 2, max(crop_h - height, 0) // 2
        right, bottom = (max(crop_w - width, 0) + 1) // 2, (max(crop_h - height, 0) + 1) // 2
        frames = F.pad(frames, (left, right, top, bottom), value=0)
        height, width = frames.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return frames[..., top : top + crop_h, left : left + crop_w]


def rescale_and_normalize(frames: torch.Tensor, settings: VideoSettings) -> torch.Tensor:
    """transformers' fused rescale and normalise: ``(x - mean / r) / (std / r)`` in float32 (``r`` the factor).

    Args:
        frames: uint8 ``[..., 3, H, W]``.
        settings: the checkpoint's video settings.

    Returns:
        float32 ``[..., 3, H, W]``.
    """
    x = frames.to(torch.float32)
    if settings.do_normalize:
        mean = torch.tensor(settings.image_mean) * (1.0 / settings.rescale_factor if settings.do_rescale else 1.0)
        std = torch.tensor(settings.image_std) * (1.0 / settings.rescale_factor if settings.do_rescale else 1.0)
        return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return x * settings.rescale_factor if settings.do_rescale else x


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


@dataclass(frozen=True)
class Pixels:
    """One image or video after the checkpoint's processor.

    Attributes:
        values: float32 pixels: Qwen ``[patches, C * tp * P * P]``; LLaVA image ``[1, 3, S, S]``;
            LLaVA-NeXT anyres image ``[tiles, 3, S, S]`` (the base image first); LLaVA video
            ``[1, T, 3, S, S]``.
        grid: Qwen: int64 ``[1, 3]`` = ``(t, h, w)``; else None.
        image_size: LLaVA-NeXT anyres image: int64 ``[1, 2]`` = the original ``(H, W)``; else None.
        mask: SmolVLM: int64 ``[n, 1, S, S]``, the processor's ``pixel_attention_mask`` of its ``n`` tiles or
            frames (``values`` is then ``[n, 1, 3, S, S]``); else None.
        rows_cols: SmolVLM image: the ``(rows, cols)`` of sub-images it was split into (``(0, 0)``: not split).
        merge_sizes: VideoLLaMA3: int64 ``[1]``, the media's merge size; else None.
        compression: VideoLLaMA3 video: bool ``[t * h * w / m ** 2]``, the tokens its compression keeps; else None.
    """

    values: torch.Tensor
    grid: torch.Tensor | None = None
    image_size: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    rows_cols: tuple[int, int] | None = None
    merge_sizes: torch.Tensor | None = None
    compression: torch.Tensor | None = None


class CheckpointProcessor:
    """A checkpoint's image processor and video settings, applied to decoded frames (see the module docstring).

    Build it with :meth:`load`. It pickles (DataLoader workers with ``spawn``).

    Args:
        source: the checkpoint (HF id or folder).
        family: the student's model family.
        image_processor: transformers' image processor of the checkpoint (PIL backend), or None.
        video: the checkpoint's video settings, or None (the family takes no videos).
        video_processor: transformers' video processor of the checkpoint where torchvision is usable;
            None runs the built-in copy of its rules.
        image_kwargs: the arguments the family's transformers processor passes to its image processor over the
            image processor's own config (its class-level ``images_kwargs``: InternVL's ``crop_to_patches``,
            SmolVLM's ``return_row_col_info``).
        processor_settings: the checkpoint's processor settings (``processor_config.json``), for checks.
    """

    def __init__(
        self,
        source: str,
        family: Family,
        image_processor: Any | None,
        video: VideoSettings | None,
        video_processor: Any | None = None,
        image_kwargs: dict[str, Any] | None = None,
        processor_settings: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.family = family
        self.image_processor = image_processor
        self.video_settings = video
        self.video_processor = video_processor
        self.image_kwargs = dict(image_kwargs or {})
        self.processor_settings = dict(processor_settings or {})
        self.video_overrides: dict[str, Any] = {}  # SmolVLM: the video config's settings for its image processor

    @classmethod
    def load(cls, source: str, family: Family, video_backend: str = "auto") -> CheckpointProcessor | None:
        """Read a checkpoint's processor configs; None when it has none (the built-in path then applies).

        Args:
            source: an HF id or a local folder.
            family: the student's family (which image and video processors it has).
            video_backend: ``"auto"`` (transformers' video processor where torchvision is usable, else
                the built-in copy), ``"transformers"`` or ``"builtin"``.

        Returns:
            The processor, or None.

        Raises:
            ValueError: a configuration this package cannot apply, or an unknown ``video_backend``.
        """
        if video_backend not in ("auto", "transformers", "builtin"):
            raise ValueError(f"`video_backend` must be 'auto', 'transformers' or 'builtin', got {video_backend!r}")
        image_dict = _image_processor_dict(source) if family.image_key is not None else None
        video_dict = _video_processor_dict(source) if family.video_key is not None else None
        if image_dict is None and video_dict is None:
            return None
        image_processor = None
        if image_dict is not None:
            from transformers import AutoImageProcessor

            try:
                image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
            except (ImportError, OSError, ValueError) as err:
                raise ValueError(
                    f"{source}: transformers cannot build the checkpoint's image processor with its PIL backend "
                    f"({type(err).__name__}: {err})"
                ) from err
        video = video_processor = None
        overrides: dict[str, Any] = {}
        if video_dict is not None:
            if family.video_processor not in VIDEO_PROCESSOR_DEFAULTS:
                raise ValueError(f"{family.name} has no known video processor class ({family.video_processor!r})")
            frame_images = family.video_processor in FRAME_IMAGE_VIDEO_PROCESSORS
            if frame_images:  # SmolVLM: video_sampling holds the frame sampling
                sampling = video_dict.get("video_sampling") or {}
                video_dict = {"max_frames": sampling.get("max_frames"), "fps": sampling.get("fps"), **video_dict}
            video = VideoSettings.resolve(source, family.video_processor, video_dict)
            use_transformers = video_backend == "transformers" or (video_backend == "auto" and torchvision_usable())
            if frame_images:
                overrides = tile_video_overrides(video_dict)
                if image_processor is None:
                    raise ValueError(
                        f"{source}: SmolVLM's built-in video path runs the checkpoint's image processor on every "
                        "frame, but the checkpoint has no preprocessor_config.json"
                    )
            elif not use_transformers:
                video.check_builtin()
            if use_transformers:
                if not torchvision_usable():
                    raise ValueError("video_backend='transformers' needs torchvision, which cannot be imported here")
                import transformers

                # the family's class, not AutoVideoProcessor: on a folder whose only config is an image
                # processor's (LLaVA-NeXT-Video's preprocessor_config.json), AutoVideoProcessor recurses
                # (transformers 5.24)
                video_processor = getattr(transformers, family.video_processor).from_pretrained(source)
        image_kwargs, settings = _processor_defaults(source, family)
        processor = cls(source, family, image_processor, video, video_processor, image_kwargs, settings)
        processor.video_overrides = overrides
        return processor

    @property
    def video_backend(self) -> str:
        """``"transformers"`` (its video processor runs) or ``"builtin"`` (this module's copy of its rules)."""
        return "transformers" if self.video_processor is not None else "builtin"

    def image(self, image: torch.Tensor, resize: bool = True) -> Pixels:
        """Run the checkpoint's image processor on one decoded image.

        Args:
            image: uint8 ``[3, H, W]`` (RGB).
            resize: False when the image was already resized to an explicit ``frame_size`` (the
                processor's own resize step is then skipped).

        Returns:
            The processed pixels.

        Raises:
            ValueError: the checkpoint has no image processor config.
        """
        if self.image_processor is None:
            raise ValueError(f"{self.source} has no image processor config (preprocessor_config.json)")
        extra: dict[str, Any] = {**self.image_kwargs, **({} if resize else {"do_resize": False})}
        try:
            out = self.image_processor(
                images=[image.numpy()], input_data_format="channels_first", return_tensors="pt", **extra
            )
        except ValueError as err:  # e.g. smart_resize's "absolute aspect ratio must be smaller than 200"
            raise DataError(
                f"the checkpoint's image processor refuses this image ({err})", "unsupported_media"
            ) from err
        key = next(k for k in ("pixel_values", "pixel_values_images") if k in out)
        values = out[key].to(torch.float32)
        if "rows" in out:  # SmolVLM's split image: [1, n, 3, S, S] -> one tile per row, [n, 1, 3, S, S]
            rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
            return Pixels(values[0].unsqueeze(1), mask=_tile_mask(out, values), rows_cols=(rows, cols))
        if "image_sizes" in out:  # LLaVA-NeXT anyres: [1, tiles, 3, S, S] -> [tiles, 3, S, S]
            return Pixels(values[0], image_size=out["image_sizes"].to(torch.int64))
        grid = out.get("image_grid_thw")
        merge = out.get("image_merge_sizes")
        return Pixels(
            values,
            grid=grid.to(torch.int64) if grid is not None else None,
            merge_sizes=merge.to(torch.int64) if merge is not None else None,
        )

    def video(self, frames: torch.Tensor, resize: bool = True) -> Pixels:
        """Run the checkpoint's video processor (or the built-in copy of its rules) on sampled frames.

        Args:
            frames: uint8 ``[T, 3, H, W]`` (RGB).
            resize: False when the frames were already resized to an explicit ``frame_size``.

        Returns:
            The processed pixels.
        """
        settings = self.video_settings
        if settings is None:
            raise ValueError(f"{self.source}: {self.family.name} takes no videos")
        grid_family = self.family.placeholders == GRID
        if self.family.video_processor in FRAME_IMAGE_VIDEO_PROCESSORS:
            return self._tile_video(frames, resize)
        if self.video_processor is not None:
            extra: dict[str, Any] = {} if resize else {"do_resize": False}
            if grid_family:
                extra["cap_pixels_per_frame"] = settings.cap_pixels_per_frame
            try:
                out = self.video_processor(
                    videos=[frames],
                    do_sample_frames=False,
                    input_data_format="channels_first",
                    return_tensors="pt",
                    **extra,
                )
            except ValueError as err:  # e.g. smart_resize's "absolute aspect ratio must be smaller than 200"
                raise DataError(
                    f"the checkpoint's video processor refuses this video ({err})", "unsupported_media"
                ) from err
            grid = out.get("video_grid_thw")
            merge, kept = out.get("video_merge_sizes"), out.get("video_compression_mask")
            return Pixels(
                out["pixel_values_videos"].to(torch.float32),
                grid=grid.to(torch.int64) if grid is not None else None,
                merge_sizes=merge.to(torch.int64) if merge is not None else None,
                compression=kept.bool() if kept is not None else None,
            )
        x = frames
        if resize and settings.do_resize:
            try:
                size = settings.output_size(*x.shape[-2:], num_frames=x.shape[0])
            except ValueError as err:  # smart_resize's aspect-ratio limit (the settings were checked in load)
                raise DataError(f"the checkpoint's video rules refuse this video ({err})", "unsupported_media") from err
            x = resize_uint8(x, size, settings.resample)
        if settings.do_center_crop and settings.crop_size:
            x = center_crop(x, settings.crop_size)
        pixels = rescale_and_normalize(x, settings)
        if grid_family or self.family.placeholders == MERGED:
            patches, grid = qwen_patchify(
                pixels, settings.patch_size, settings.temporal_patch_size, settings.merge_size
            )
            if self.family.placeholders != MERGED:
                return Pixels(patches, grid=grid.unsqueeze(0))
            from regate_lightning.families.video_llama_3 import compression_mask

            merge = torch.tensor([settings.merge_size])
            kept = compression_mask(patches, grid.unsqueeze(0), merge) if settings.use_token_compression else None
            return Pixels(patches, grid=grid.unsqueeze(0), merge_sizes=merge, compression=kept)
        return Pixels(pixels.unsqueeze(0))

    def _tile_video(self, frames: torch.Tensor, resize: bool) -> Pixels:
        """SmolVLM: every frame one ``S x S`` image, ``[T, 1, 3, S, S]`` and its mask ``[T, 1, S, S]``.

        Where torchvision imports, transformers' ``SmolVLMVideoProcessor`` of the checkpoint; elsewhere the
        checkpoint's image processor (PIL backend) on every frame without splitting, with the video config's
        settings (:func:`tile_video_overrides`): the same two resizes and normalisation, PIL's LANCZOS kernel.
        """
        extra: dict[str, Any] = {} if resize else {"do_resize": False}
        try:
            if self.video_processor is not None:
                out = self.video_processor(
                    videos=[frames],
                    do_sample_frames=False,
                    input_data_format="channels_first",
                    return_tensors="pt",
                    **extra,
                )
            else:
                if self.image_processor is None:
                    raise ValueError(f"{self.source} has no image processor config (preprocessor_config.json)")
                out = self.image_processor(
                    images=[list(frames.numpy())],
                    input_data_format="channels_first",
                    return_tensors="pt",
                    do_image_splitting=False,
                    **{**self.video_overrides, **extra},
                )
        except ValueError as err:
            raise DataError(f"the checkpoint's processor refuses this video ({err})", "unsupported_media") from err
        values = out["pixel_values"].to(torch.float32)
        return Pixels(values[0].unsqueeze(1), mask=_tile_mask(out, values))


def _tile_mask(out: Any, values: torch.Tensor) -> torch.Tensor:
    """A SmolVLM processor's ``pixel_attention_mask`` ``[1, n, S, S]`` as ``[n, 1, S, S]`` (all ones without one)."""
    mask = out.get("pixel_attention_mask")
    if mask is None:
        return torch.ones(values.shape[1], 1, *values.shape[-2:], dtype=torch.int64)
    return mask[0].to(torch.int64).unsqueeze(1)


def tile_video_overrides(found: dict[str, Any]) -> dict[str, Any]:
    """The settings of a SmolVLM video processor config that its image processor takes per call.

    ``SmolVLMVideoProcessor`` resizes a frame's longest edge to ``size["longest_edge"]`` (its ``video_sampling``'s
    ``video_size`` where the config has one), then to ``max_image_size`` square, and normalises it: the steps of
    ``SmolVLMImageProcessor`` without image splitting. The built-in video path runs the checkpoint's own image
    processor (PIL backend) on every frame with these settings and ``do_image_splitting=False``.
    """
    keys = ("do_resize", "size", "max_image_size", "resample", "do_rescale", "rescale_factor", "do_normalize")
    out = {k: found[k] for k in (*keys, "image_mean", "image_std") if found.get(k) is not None}
    sampling = found.get("video_sampling") or {}
    if sampling.get("video_size") is not None:
        out["size"] = sampling["video_size"]
    return out


def _processor_defaults(source: str, family: Family) -> tuple[dict[str, Any], dict[str, Any]]:
    """The family processor's class-level image arguments, and the checkpoint's processor settings.

    ``ProcessorMixin._merge_kwargs`` passes a processor class's ``images_kwargs`` to its image processor over
    the image processor's own config (InternVLProcessor: ``crop_to_patches=True``); the checkpoint's
    ``processor_config.json`` holds the processor's own settings (InternVL's ``image_seq_length``).
    """
    if not family.processor_class:
        return {}, {}
    import transformers
    from transformers.processing_utils import ProcessorMixin

    image_kwargs = dict(getattr(getattr(transformers, family.processor_class), "images_kwargs", None) or {})
    try:
        settings = dict(ProcessorMixin.get_processor_dict(source)[0])
    except (OSError, ValueError):
        settings = {}
    return image_kwargs, settings


def frames_for_video(settings: VideoSettings | None, fps: float | None, num_frames: int | None) -> dict[str, Any]:
    """The frame sampling of a data module: the user's ``fps`` / ``num_frames``, else the checkpoint's.

    Args:
        settings: the checkpoint's video settings, or None (built-in path).
        fps: the user's rate, or None.
        num_frames: the user's count (uniform) or cap (with ``fps``), or None.

    Returns:
        Keyword arguments of :class:`~regate_lightning.data.datasets.FrameSampling`: with the user's
        values when given; else the checkpoint's ``num_frames`` (uniform) or ``fps`` (with its
        ``min_frames`` / ``max_frames`` as floor and cap); else 8 uniform frames.

    Example:
        >>> frames_for_video(None, None, None)
        {'num_frames': 8, 'sample': 'uniform', 'fps': None, 'min_frames': 1}
    """
    if fps is None and num_frames is None and settings is not None:
        if settings.num_frames is not None:
            num_frames = settings.num_frames
        elif settings.fps is not None:
            fps = settings.fps
    if fps is None:
        return {"num_frames": num_frames or DEFAULT_NUM_FRAMES, "sample": "uniform", "fps": None, "min_frames": 1}
    cap = num_frames or (settings.max_frames if settings is not None and settings.max_frames else DEFAULT_NUM_FRAMES)
    floor = min(settings.min_frames, cap) if settings is not None else 1
    return {"num_frames": cap, "sample": "fps", "fps": fps, "min_frames": max(1, floor)}
