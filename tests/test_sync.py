"""The one-collective gather of ragged per-rank tensors (``regate_lightning.sync``).

The packing and the unpacking run here on buffers made as several ranks make them; the collective
itself, with a real two-process gloo group, runs in ``tests/test_ddp.py`` (stores identical on both
ranks, and the number of collectives per training step counted).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from regate_lightning.sync import RaggedGather, pack, unpack


def ranks() -> list[list[torch.Tensor]]:
    """What three ranks send in one call: the same dtypes, other lengths, edge values."""
    nan_payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    return [
        [torch.tensor([2**62, -1, 0]), torch.tensor([0.5, math.nan, -math.inf]), torch.tensor([True, False])],
        [torch.zeros(0, dtype=torch.int64), nan_payload, torch.tensor([True])],
        [torch.tensor([7]), torch.zeros(0), torch.zeros(0, dtype=torch.bool)],
    ]


def test_buffers_of_several_ranks_unpack_to_the_concatenation_bit_for_bit():
    sent = ranks()
    width = 64
    gathered = torch.stack([pack(tensors, width) for tensors in sent])
    assert gathered.shape == (3, 8 * 4 + width) and gathered.dtype == torch.uint8
    got = unpack(gathered, [t.dtype for t in sent[0]])
    for i, out in enumerate(got):
        expected = torch.cat([tensors[i] for tensors in sent])
        assert out.dtype == expected.dtype
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), i  # NaN payloads too


def test_a_payload_wider_than_the_width_is_cut_and_its_size_announced():
    tensors = [torch.arange(10), torch.ones(3)]
    buffer = pack(tensors, width=16)
    assert buffer.numel() == 8 * 3 + 16
    header = buffer[:24].view(torch.int64).tolist()
    assert header == [80 + 16, 10, 3]  # the whole payload: the receivers gather again at a wider width
    again = pack(tensors, width=128)
    assert [t.tolist() for t in unpack(again[None], [torch.int64, torch.float32])] == [list(range(10)), [1.0] * 3]


def test_one_process_returns_the_tensors_themselves_without_a_collective():
    gather = RaggedGather(SingleDeviceStrategy("cpu"))
    tensors = [torch.arange(3), torch.ones(2)]
    out = gather(tensors)
    assert all(a is b for a, b in zip(out, tensors, strict=True)) and gather.collectives == 0
