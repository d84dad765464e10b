"""Video and image decoding with PyAV and Pillow, frame sampling, resizing and normalisation (torch).

Decoding and frame sampling are this package's own on every machine (transformers' video decoding
needs torchvision or torchcodec). Frames are ``uint8 [T, 3, H, W]`` (RGB). A student loaded from a
checkpoint with processor configs gets them at their decoded size and resized, normalised and patched
by the checkpoint's own processor (:mod:`regate_lightning.data.processors`); otherwise, and for an
explicit ``frame_size``, :func:`resize_frames` resizes them and :func:`normalize` turns them into
``float32`` (the built-in path).

Frame sampling (:func:`frame_indices`):

- ``"uniform"``: ``N`` frames at the centres of ``N`` equal segments of the ``n`` decoded frames,
  ``index_k = floor((k + 0.5) * n / N)`` for ``k = 0 .. N-1``. A clip *shorter* than ``N`` frames goes
  through the same formula, which then repeats frames (nearest-index uniform sampling), so exactly ``N``
  frames always come out, in time order.
- ``"fps"``: one frame every ``1 / fps`` seconds from the first frame (the frame on screen at each
  time ``k / fps`` that falls inside the clip, at least one), i.e. about ``duration * fps`` frames.
  ``N`` is a cap: when the clip would give more than ``N``, ``N`` frames are sampled uniformly
  instead (as HF's Qwen2-VL video processor does); likewise, below a floor ``min_frames`` (a
  checkpoint's, e.g. Qwen2-VL's 4), ``min_frames`` frames are sampled uniformly. Clips of different
  lengths then give different ``T``; every supported family takes them in one batch (see
  :func:`~regate_lightning.data.vision.join_media`).

**Folders of frames.** A video given as a folder of image files (some MVBench tasks ship theirs so) is
read as a clip of those frames in natural name order (``2.jpg`` before ``10.jpg``) at ``folder_fps``
frames per second (default :data:`FOLDER_FPS`, the rate MVBench reads its frame folders at), sampled by
the same rules; only the chosen frames are decoded (Pillow).
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from regate_lightning.data.errors import MediaError

MediaSource = str | os.PathLike[str] | io.BytesIO | bytes
Sampling = Literal["uniform", "fps"]
Fit = Literal["stretch", "crop"]

FOLDER_FPS = 3.0
"""Frame rate of a video given as a folder of frames, unless the caller says otherwise."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""File endings read as frames in a folder of frames (case-insensitive); other files are ignored."""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames of one clip.

    Attributes:
        frames: uint8 ``[T, 3, H, W]``, RGB.
        times: float64 ``[T]``, presentation time of each frame in seconds from the first frame.
        duration: length of the clip in seconds.
        num_source_frames: frames in the clip before sampling.
        indices: the index of each sampled frame in the clip (what transformers' ``VideoMetadata`` calls
            ``frames_indices``).
        source_fps: the clip's frame rate (the stream's average rate; a folder's ``folder_fps``), 0 if unknown.
    """

    frames: torch.Tensor
    times: torch.Tensor
    duration: float
    num_source_frames: int
    indices: tuple[int, ...] = ()
    source_fps: float = 0.0

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames over the clip (HF's ``sampled_fps``)."""
        return self.frames.shape[0] / self.duration if self.duration > 0 else 1.0

    @property
    def frame_seconds(self) -> tuple[float, ...] | None:
        """Each sampled frame's time as transformers' processors compute it: frame index / source fps.

        (Qwen3-VL's timestamps; equal to :attr:`times` for a clip of constant frame rate.) None when the
        indices or the frame rate are unknown.
        """
        if not self.indices or self.source_fps <= 0:
            return None
        return tuple(i / self.source_fps for i in self.indices)


def source_name(source: MediaSource) -> str:
    """A printable name of a media source (the path, or ``<in-memory>``)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<in-memory>"))


def frame_indices(num_available: int, num_frames: int) -> list[int]:
    """Uniform frame indices: the centres of ``num_frames`` equal segments.

    Args:
        num_available: frames in the clip, ``n >= 1``.
        num_frames: frames wanted, ``N >= 1``.

    Returns:
        ``N`` non-decreasing indices in ``[0, n)``; indices repeat when ``n < N``.

    Example:
        >>> frame_indices(16, 4)
        [2, 6, 10, 14]
        >>> frame_indices(3, 8)
        [0, 0, 0, 1, 1, 2, 2, 2]
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"need num_available >= 1 and num_frames >= 1, got {num_available}, {num_frames}")
    return [min(num_available - 1, math.floor((k + 0.5) * num_available / num_frames)) for k in range(num_frames)]


def fps_indices(times: list[float], duration: float, fps: float, max_frames: int, min_frames: int = 1) -> list[int]:
    """Indices of the frames on screen at times ``0, 1/fps, 2/fps, ...`` (see the module docstring).

    Args:
        times: sorted presentation times in seconds, the first one ``0``.
        duration: clip length in seconds.
        fps: sampling rate, ``> 0``.
        max_frames: cap; above it, ``max_frames`` uniform indices are returned instead.
        min_frames: floor; below it, ``min_frames`` uniform indices are returned instead.

    Returns:
        Between ``min_frames`` and ``max_frames`` non-decreasing indices into ``times``.

    Example:
        >>> fps_indices([0.0, 0.5, 1.0, 1.5], 2.0, 1.0, max_frames=8), fps_indices([0.0, 0.5], 1.0, 1.0, 8, 4)
        ([0, 2], [0, 0, 1, 1])
    """
    count = max(1, math.ceil(duration * fps - 1e-6))
    if count > max_frames:
        return frame_indices(len(times), max_frames)
    if count < min_frames:
        return frame_indices(len(times), min_frames)
    out = []
    j = 0
    for k in range(count):
        t = k / fps + 1e-6
        while j + 1 < len(times) and times[j + 1] <= t:
            j += 1
        out.append(j)
    return out


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as uint8 ``[H, W, 3]`` RGB, the bytes of ``frame.to_ndarray(format="rgb24")``.

    ``to_ndarray(format=...)`` converts with swscale's default ``threads=0`` (as many threads as cores),
    which starts a pool of slice threads for every frame: about 1.2 ms a frame on this project's CPU, five
    times the cost of decoding a 64x64 frame. One thread converts a small frame at once and starts nothing
    (the bytes are the same: ``tests/test_data_video.py``); a converter that keeps no threads is also safe
    in forked DataLoader workers.
    """
    return frame.reformat(format="rgb24", threads=1).to_ndarray()


def _check_exists(source: MediaSource, name: str) -> None:
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise MediaError(f"{name}: no such file; check the path and the media root", reason="missing_media")


def _open(source: MediaSource) -> av.container.InputContainer:
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
        return av.open(source, mode="r")
    return av.open(os.fspath(source), mode="r")


def sample_video(
    source: MediaSource,
    num_frames: int,
    sample: Sampling = "uniform",
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    fit: Fit = "stretch",
    min_frames: int = 1,
    folder_fps: float = FOLDER_FPS,
) -> DecodedVideo:
    """Decode a clip and sample frames from it (see the module docstring for the rules).

    The clip is demuxed once (compressed packets are kept), the frame times are read from the packets,
    the indices are chosen, and only the chosen frames are converted to RGB.

    Args:
        source: a file path, an in-memory ``io.BytesIO`` or ``bytes`` of a container PyAV can read, or the
            path of a folder of frames.
        num_frames: frames to return (``"uniform"``) or the cap (``"fps"``).
        sample: ``"uniform"`` or ``"fps"``.
        fps: sampling rate for ``"fps"``; must be ``None`` for ``"uniform"``.
        size: ``(H, W)`` to resize to, or ``None`` to keep the decoded size (a folder's frames must then
            all have one size).
        fit: how to resize, see :func:`resize_frames`.
        min_frames: the floor of ``"fps"`` sampling.
        folder_fps: the frame rate of a folder of frames.

    Returns:
        The sampled frames (uint8 ``[T, 3, H, W]``) with their times.

    Raises:
        MediaError: the source is missing, unreadable, corrupt, or has no video frame.
        ValueError: bad arguments.
    """
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1, got {num_frames}")
    if sample == "fps":
        if fps is None or fps <= 0:
            raise ValueError(f"`fps` must be > 0 with sample='fps', got {fps}")
    elif sample == "uniform":
        if fps is not None:
            raise ValueError(f"`fps` is only used with sample='fps', got fps={fps} with sample='uniform'")
    else:
        raise ValueError(f"`sample` must be 'uniform' or 'fps', got {sample!r}")
    name = source_name(source)
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return _sample_folder(Path(source), num_frames, sample, fps, size, fit, folder_fps, min_frames)
    _check_exists(source, name)
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise MediaError(f"{name}: no video stream; expected a video file (mp4, webm, avi, ...)")
            stream = container.streams.video[0]
            packets = list(container.demux(stream))
            pts = [p.pts for p in packets if p.size > 0]
            if not pts:
                raise MediaError(f"{name}: the video has no frames")
            frame_rate = float(stream.average_rate or stream.guessed_rate or 25)
            known = [p for p in pts if p is not None]
            if len(known) < len(pts) or stream.time_base is None:
                times = [i / frame_rate for i in range(len(pts))]
            else:
                tb = float(stream.time_base)
                start = min(known)
                times = sorted((p - start) * tb for p in known)
            duration = times[-1] + 1.0 / frame_rate
            if sample == "uniform":
                indices = frame_indices(len(times), num_frames)
            else:
                assert fps is not None
                indices = fps_indices(times, duration, fps, num_frames, min_frames)
            wanted = set(indices)
            converted: dict[int, np.ndarray] = {}
            last: av.VideoFrame | None = None
            decoded = 0
            for packet in packets:
                for frame in stream.codec_context.decode(packet):
                    if decoded in wanted:
                        converted[decoded] = to_rgb(frame)
                    last = frame
                    decoded += 1
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise MediaError(f"{name}: cannot decode video ({type(err).__name__}: {err}); check the file") from err
    if last is None:
        raise MediaError(f"{name}: no frame could be decoded; the file is corrupt or empty")
    # A damaged tail can decode fewer frames than it has packets: the missing ones repeat the last frame.
    fallback = to_rgb(last)
    arrays = [converted.get(i, fallback) for i in indices]
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if size is not None:
        frames = resize_frames(frames, size, fit)
    times_t = torch.tensor([times[min(i, len(times) - 1)] for i in indices], dtype=torch.float64)
    return DecodedVideo(frames, times_t, duration, len(times), tuple(indices), frame_rate)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``frame2`` before ``frame10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def frame_files(folder: Path) -> list[Path]:
    """The frames of a folder of frames: image files (:data:`IMAGE_SUFFIXES`), in natural name order.

    Raises:
        MediaError: the folder holds no image file.
    """
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise MediaError(
            f"{folder}: a folder given as a video must hold its frames as image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


def _sample_folder(
    folder: Path,
    num_frames: int,
    sample: Sampling,
    fps: float | None,
    size: tuple[int, int] | None,
    fit: Fit,
    folder_fps: float,
    min_frames: int = 1,
) -> DecodedVideo:
    """:func:`sample_video` for a folder of frames at ``folder_fps``."""
    if not folder_fps > 0:
        raise ValueError(f"`folder_fps` must be > 0, got {folder_fps}")
    files = frame_files(folder)
    times = [i / folder_fps for i in range(len(files))]
    duration = len(files) / folder_fps
    if sample == "uniform":
        indices = frame_indices(len(files), num_frames)
    else:
        assert fps is not None
        indices = fps_indices(times, duration, fps, num_frames, min_frames)
    loaded = {i: load_image(files[i], size, fit) for i in sorted(set(indices))}
    shapes = {tuple(f.shape) for f in loaded.values()}
    if len(shapes) > 1:
        raise MediaError(f"{folder}: its frames have different sizes {sorted(shapes)}; give a `size` to resize them")
    frames = torch.stack([loaded[i] for i in indices])
    times_t = torch.tensor([times[i] for i in indices], dtype=torch.float64)
    return DecodedVideo(frames, times_t, duration, len(files), tuple(indices), float(folder_fps))


def decode_video(
    source: MediaSource,
    num_frames: int,
    sample: Sampling = "uniform",
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    fit: Fit = "stretch",
) -> torch.Tensor:
    """Decode a clip into sampled, resized RGB frames.

    ``"uniform"`` gives exactly ``num_frames`` frames at indices ``floor((k + 0.5) * n / num_frames)``
    of the ``n`` frames of the clip; a clip shorter than ``num_frames`` repeats frames by that same
    nearest-index rule, so exactly ``num_frames`` still come out. ``"fps"`` gives one frame every
    ``1 / fps`` seconds, at most ``num_frames`` (above the cap it samples ``num_frames`` uniformly).

    Args:
        source: a file path, an in-memory ``io.BytesIO`` or ``bytes``.
        num_frames: frames to return (``"uniform"``) or the cap (``"fps"``).
        sample: ``"uniform"`` or ``"fps"``.
        fps: sampling rate for ``"fps"``.
        size: ``(H, W)`` to resize to (bilinear, antialiased), or ``None``.
        fit: ``"stretch"`` or ``"crop"``, see :func:`resize_frames`.

    Returns:
        uint8 ``[T, 3, H, W]``.

    Raises:
        MediaError: corrupt, unreadable or empty video; the message names the file.
    """
    return sample_video(source, num_frames, sample, fps, size, fit).frames


def resize_frames(frames: torch.Tensor, size: tuple[int, int], fit: Fit = "stretch") -> torch.Tensor:
    """Resize frames with ``F.interpolate`` (bilinear, antialiased).

    Args:
        frames: uint8 ``[T, 3, h, w]`` (or ``[3, h, w]``).
        size: ``(H, W)``.
        fit: ``"stretch"`` resizes to ``(H, W)`` whatever the aspect ratio; ``"crop"`` keeps the aspect
            ratio, resizing so the frame covers ``(H, W)`` and cropping the centre.

    Returns:
        uint8 ``[T, 3, H, W]`` (or ``[3, H, W]``).
    """
    single = frames.dim() == 3
    x = frames.unsqueeze(0) if single else frames
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"`size` must be positive (H, W), got {size}")
    h, w = x.shape[-2:]
    if fit == "crop":
        scale = max(out_h / h, out_w / w)
        mid_h, mid_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    elif fit == "stretch":
        mid_h, mid_w = out_h, out_w
    else:
        raise ValueError(f"`fit` must be 'stretch' or 'crop', got {fit!r}")
    if (mid_h, mid_w) != (h, w):
        y = F.interpolate(x.float(), size=(mid_h, mid_w), mode="bilinear", antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    if (mid_h, mid_w) != (out_h, out_w):
        top, left = (mid_h - out_h) // 2, (mid_w - out_w) // 2
        x = x[..., top : top + out_h, left : left + out_w].contiguous()
    return x[0] if single else x


def load_image(source: MediaSource, size: tuple[int, int] | None = None, fit: Fit = "stretch") -> torch.Tensor:
    """Load an image with Pillow as RGB.

    Any mode is converted to RGB; transparent images are composited on white; EXIF orientation is
    applied.

    Args:
        source: a file path, an in-memory ``io.BytesIO`` or ``bytes``.
        size: ``(H, W)`` to resize to, or ``None``.
        fit: ``"stretch"`` or ``"crop"``, see :func:`resize_frames`.

    Returns:
        uint8 ``[3, H, W]``.

    Raises:
        MediaError: missing, unreadable or corrupt image; the message names the file.
    """
    name = source_name(source)
    _check_exists(source, name)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with Image.open(source) as opened:
            opened.load()
            img: Image.Image = ImageOps.exif_transpose(opened)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise MediaError(f"{name}: cannot read image ({type(err).__name__}: {err}); check the file") from err
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return resize_frames(tensor, size, fit) if size is not None else tensor


def normalize(
    frames: torch.Tensor,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """Rescale uint8 pixels to ``[0, 1]`` and normalise per channel: ``(x / 255 - mean) / std``.

    Args:
        frames: uint8 ``[..., 3, H, W]``.
        mean: per-channel mean (RGB).
        std: per-channel standard deviation (RGB).

    Returns:
        float32 ``[..., 3, H, W]``.

    Example:
        >>> normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3).flatten()
        tensor([1., 1., 1.])
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"`frames` must be uint8, got {frames.dtype}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (frames.float() / 255.0 - m) / s


def encode_video(
    frames: torch.Tensor | np.ndarray,
    dest: str | os.PathLike[str] | io.BytesIO,
    fps: float = 8.0,
    codec: str = "libx264",
) -> None:
    """Encode RGB frames as an mp4 (used by the synthetic set and the tests).

    Args:
        frames: uint8 ``[T, 3, H, W]`` with even ``H`` and ``W`` (yuv420p).
        dest: a path or an ``io.BytesIO``.
        fps: frame rate of the clip.
        codec: a PyAV encoder, ``"libx264"`` (lossless: the same frames decode back on every machine) or
            ``"mpeg4"``.
    """
    array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"`frames` must be uint8 [T, 3, H, W], got {array.dtype} {array.shape}")
    encode_video_hwc(array.transpose(0, 2, 3, 1), dest, fps, codec)


def encode_video_hwc(
    frames: np.ndarray, dest: str | os.PathLike[str] | io.BytesIO, fps: float = 8.0, codec: str = "libx264"
) -> None:
    """:func:`encode_video` for channels-last frames, uint8 ``[T, H, W, 3]``."""
    hwc = np.ascontiguousarray(frames)
    target = os.fspath(dest) if isinstance(dest, (str, os.PathLike)) else dest
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=_as_rate(fps))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = hwc.shape[2], hwc.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # Lossless (qp 0): the decoded frames are exactly the yuv420p frames given. At crf 12, libx264
            # wrote a few clips in a thousand differently from one process to the next (same input, same
            # options: 17 of 3000 synthetic clips between two fresh caches), so a seed did not fix the data.
            stream.options = {"qp": "0", "preset": "veryfast", "threads": "1"}
        else:
            stream.thread_count = 1
        for image in hwc:
            # Converted to yuv420p here with one swscale thread, not by the encoder with one per core.
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p", threads=1)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _as_rate(fps: float) -> int | Fraction:
    rate = Fraction(fps).limit_denominator(1001)
    return int(rate) if rate.denominator == 1 else rate


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FOLDER_FPS",
    "IMAGE_SUFFIXES",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "DecodedVideo",
    "MediaError",
    "decode_video",
    "encode_video",
    "frame_files",
    "frame_indices",
    "load_image",
    "normalize",
    "resize_frames",
    "sample_video",
]
