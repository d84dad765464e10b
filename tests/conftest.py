"""Test-suite settings and fixtures shared by every test file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import IMAGE_SIZES_HW, write_images

# Tiny models spend their time in small ops where a second intra-op thread costs more than it gains,
# and several test processes (DDP ranks, console scripts) must not oversubscribe two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every test, whatever a test before it set (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(request, tmp_path_factory) -> list[Path]:
    """The test images of :func:`data_fixtures.write_images`: the sizes ``(H, W)`` and seed of the module's
    ``IMAGE_HW`` and ``IMAGE_SEED`` where it sets them."""
    sizes = getattr(request.module, "IMAGE_HW", IMAGE_SIZES_HW)
    return write_images(tmp_path_factory.mktemp("images"), sizes, getattr(request.module, "IMAGE_SEED", 1))
