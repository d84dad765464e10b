"""MediaCache: each file decoded once, equal to decoding afresh, invalidated when the file changes."""

from __future__ import annotations

import os

import pytest
import torch
from data_fixtures import write_video

from regate_lightning.data.conversations import Media
from regate_lightning.data.datasets import FrameSampling, MediaCache, decode_media, load_media, process_media
from regate_lightning.data.vision import VisionSpec
from regate_lightning.testing import tiny


@pytest.fixture(scope="module")
def spec() -> VisionSpec:
    return VisionSpec.from_model(tiny.tiny_llava_next_video())


def test_cached_media_equal_fresh_decoding_and_decode_once(tmp_path, spec):
    paths = [write_video(tmp_path / f"v{i}.mp4", seed=i) for i in range(3)]
    frames = FrameSampling(num_frames=4)
    cache = MediaCache(max_bytes=1 << 24)
    for _ in range(3):  # three epochs
        for path in paths:
            media = Media("video", path)
            got = process_media(cache.get(media, spec, frames), spec)
            fresh = load_media(media, spec, frames)
            assert torch.equal(got.tensors["pixel_values_videos"], fresh.tensors["pixel_values_videos"])
    assert (cache.hits, cache.misses, len(cache)) == (6, 3, 3)  # each file decoded once


def test_a_changed_file_is_decoded_again(tmp_path, spec):
    path = write_video(tmp_path / "v.mp4", seed=0)
    frames = FrameSampling(num_frames=2)
    cache = MediaCache(max_bytes=1 << 24)
    first = cache.get(Media("video", path), spec, frames).pixels
    write_video(path, seed=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new modification time, whatever the clock
    second = cache.get(Media("video", path), spec, frames).pixels
    assert cache.misses == 2
    assert not torch.equal(first, second)
    assert torch.equal(second, decode_media(Media("video", path), spec, frames).pixels)


def test_least_recently_used_entries_go_first(tmp_path, spec):
    paths = [write_video(tmp_path / f"v{i}.mp4", seed=i) for i in range(3)]
    frames = FrameSampling(num_frames=2)
    one = decode_media(Media("video", paths[0]), spec, frames).nbytes
    cache = MediaCache(max_bytes=2 * one)
    for path in (paths[0], paths[1], paths[0], paths[2]):  # paths[1] is the least recently used at the end
        cache.get(Media("video", path), spec, frames)
    assert len(cache) == 2 and cache.nbytes == 2 * one
    cache.get(Media("video", paths[0]), spec, frames)
    assert cache.hits == 2
    cache.get(Media("video", paths[1]), spec, frames)
    assert cache.misses == 4


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="`max_bytes` must be > 0"):
        MediaCache(0)
