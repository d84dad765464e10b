"""Video and image decoding: frame counts, sampling rules, sizes, sources, corrupt files."""

from __future__ import annotations

import io

import pytest
import torch
from data_fixtures import frame_ids, level_video, tokenizer, video_bytes, write_image

from regate_lightning.data import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    decode_video,
    encode_video,
    load_image,
    normalize,
    resize_frames,
    sample_video,
)
from regate_lightning.data.video import frame_indices, to_rgb


def test_uniform_long_clip_gives_exactly_n_centred_frames():
    frames = decode_video(video_bytes(20), num_frames=4)
    assert frames.shape == (4, 3, 48, 64) and frames.dtype == torch.uint8
    assert frame_ids(frames) == frame_indices(20, 4) == [2, 7, 12, 17]


def test_short_clip_repeats_frames_by_nearest_index():
    frames = decode_video(video_bytes(3), num_frames=8)
    assert frames.shape[0] == 8
    assert frame_ids(frames) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_single_frame_clip():
    assert frame_ids(decode_video(video_bytes(1), num_frames=5)) == [0] * 5


def test_fps_sampling_and_cap():
    clip = video_bytes(12, fps=4.0)  # 3 s
    video = sample_video(clip, num_frames=16, sample="fps", fps=2.0)
    assert frame_ids(video.frames) == [0, 2, 4, 6, 8, 10]
    assert video.times.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert video.duration == pytest.approx(3.0)
    capped = decode_video(clip, num_frames=4, sample="fps", fps=2.0)  # 6 would exceed the cap: uniform 4
    assert frame_ids(capped) == frame_indices(12, 4)
    # A rate above the clip's frame rate repeats frames, as the time grid asks.
    assert frame_ids(decode_video(video_bytes(2, fps=2.0), num_frames=8, sample="fps", fps=4.0)) == [
        0,
        0,
        1,
        1,
    ]


def test_sampling_arguments_are_validated():
    with pytest.raises(ValueError, match="fps"):
        decode_video(video_bytes(4), 4, sample="fps")
    with pytest.raises(ValueError, match="sample"):
        decode_video(video_bytes(4), 4, sample="every")  # type: ignore[arg-type]


def test_resize_sizes_and_crop():
    frames = decode_video(video_bytes(4), num_frames=2, size=(24, 40))
    assert frames.shape == (2, 3, 24, 40)
    assert frame_ids(frames) == [1, 3]  # flat frames stay flat through antialiased resizing
    x = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    x[..., 6:34] = 255  # a bright centre band, wider than the crop
    cropped = resize_frames(x, (10, 10), fit="crop")
    assert cropped.shape == (1, 3, 10, 10) and int(cropped.min()) == 255


def test_path_and_bytesio_decode_identically(tmp_path):
    path = tmp_path / "clip.mp4"
    encode_video(level_video(9), path, fps=8)
    from_path = decode_video(path, num_frames=5)
    from_bytes = decode_video(io.BytesIO(path.read_bytes()), num_frames=5)
    from_raw = decode_video(path.read_bytes(), num_frames=5)
    assert torch.equal(from_path, from_bytes) and torch.equal(from_path, from_raw)


def test_single_thread_conversion_gives_the_bytes_of_to_ndarray():
    """``to_rgb`` (one swscale thread) gives the bytes of PyAV's default conversion, at several sizes."""
    import av
    import numpy as np

    for size in ((48, 64), (64, 32), (48, 64)):
        with av.open(video_bytes(3, size=size), mode="r") as container:
            frames = list(container.decode(video=0))
        assert frames
        for frame in frames:
            assert np.array_equal(to_rgb(frame), frame.to_ndarray(format="rgb24"))


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 50])
def test_corrupt_or_empty_video_raises_media_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=r"broken\.mp4") as info:
        decode_video(path, num_frames=4)
    assert isinstance(info.value, ValueError) and info.value.reason == "unreadable_media"


def test_truncated_and_missing_video(tmp_path):
    data = video_bytes(8).getvalue()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"truncated\.mp4"):
        decode_video(path, num_frames=4)
    with pytest.raises(MediaError, match=r"nowhere\.mp4") as info:
        decode_video(tmp_path / "nowhere.mp4", num_frames=4)
    assert info.value.reason == "missing_media"
    with pytest.raises(MediaError, match="in-memory"):
        decode_video(io.BytesIO(b"\x00" * 100), num_frames=4)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_load_image_any_mode_to_rgb(tmp_path, mode):
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    path = write_image(tmp_path / f"img.{ext}", mode)
    image = load_image(path)
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    assert load_image(io.BytesIO(path.read_bytes()), size=(16, 12)).shape == (3, 16, 12)


def test_transparent_image_is_composited_on_white(tmp_path):
    from PIL import Image

    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert int(load_image(path).min()) == 255


def test_bad_image_raises_media_error(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8 nope")
    with pytest.raises(MediaError, match=r"bad\.jpg"):
        load_image(path)


def test_normalize():
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = normalize(frames, CLIP_MEAN, CLIP_STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[1, :, 0, 0], expected)
    with pytest.raises(TypeError):
        normalize(frames.float())


def test_a_folder_of_frames_is_read_as_a_video(tmp_path):
    """Issue 11, item 6: MVBench ships some tasks' videos as folders of frames."""
    from PIL import Image

    from regate_lightning.data import ChatRenderer, MultipleChoiceDataset, VisionSpec, read_choice_records
    from regate_lightning.testing import tiny

    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(level_video(12)):  # frame_10 after frame_9: natural order, not text order
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    video = sample_video(folder, num_frames=4)
    assert frame_ids(video.frames) == frame_indices(12, 4) == [1, 4, 7, 10]
    assert video.duration == 12 / 3.0 and video.num_source_frames == 12  # FOLDER_FPS = 3
    by_time = sample_video(folder, num_frames=8, sample="fps", fps=1.5, folder_fps=6.0)
    assert frame_ids(by_time.frames) == [0, 4, 8]  # 2 s at 6 fps, one frame every 1/1.5 s
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="must hold its frames as image files"):
        sample_video(tmp_path / "empty", num_frames=2)
    # Through the reader and a data set: the folder is the record's video.
    path = tmp_path / "frames_task.jsonl"
    path.write_text('{"video": "clip", "question": "Q?", "candidates": ["a", "b"], "answer": "b"}\n')
    records = read_choice_records(path)
    spec = VisionSpec.from_model(tiny.tiny_llava_next_video())
    samples = MultipleChoiceDataset(records, ChatRenderer(tokenizer(), spec))[0]
    assert [s.media["pixel_values_videos"].shape[:2] for s in samples] == [(1, 8)] * 2
