"""Test-suite settings shared by every test file."""

from __future__ import annotations

import torch

# Tiny models spend their time in small ops where a second intra-op thread costs more than it gains,
# and several test processes (DDP ranks, console scripts) must not oversubscribe two cores.
torch.set_num_threads(1)
