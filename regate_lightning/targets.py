"""Pre-shifted targets and elision candidates (pure torch).

HF computes the loss of position ``t`` against the label at ``t + 1``. This package shifts once, up
front, so that every later step (gathering, scoring, elision) indexes by the position that *makes*
the prediction: ``target[t] = labels[t + 1]``.
"""

from __future__ import annotations

import torch

from regate_lightning.keys import IGNORE_INDEX


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Shift labels left by one so that position ``t`` holds the token it must predict.

    Args:
        labels: int64 ``[B, L]``, ``ignore_index`` where unsupervised.
        ignore_index: the label value of unsupervised positions.

    Returns:
        int64 ``[B, L]`` with ``target[:, t] = labels[:, t + 1]`` and ``ignore_index`` at ``L - 1``.

    Example:
        >>> shift_targets(torch.tensor([[-100, 5, 6, 7]]))
        tensor([[   5,    6,    7, -100]])
    """
    if labels.dim() != 2:
        raise ValueError(f"`labels` must have shape [B, L], got {tuple(labels.shape)}")
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def target_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Positions whose prediction is supervised (``target[t] != ignore_index``).

    Args:
        labels: int64 ``[B, L]``.
        ignore_index: the label value of unsupervised positions.

    Returns:
        bool ``[B, L]``.
    """
    return shift_targets(labels, ignore_index) != ignore_index


def candidate_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Positions that may be elided: supervised target *and* a supervised input token.

    An answer token that predicts the next answer token is a candidate. The last prompt token, which
    predicts the first answer token, is not, so the prompt always reaches the student whole.

    Args:
        labels: int64 ``[B, L]``.
        ignore_index: the label value of unsupervised positions.

    Returns:
        bool ``[B, L]``.

    Example:
        >>> candidate_mask(torch.tensor([[-100, -100, 5, 6, 7]]))
        tensor([[False, False,  True,  True, False]])
    """
    return target_mask(labels, ignore_index) & (labels != ignore_index)


_DIGEST_PRIMES = (2_147_483_647, 2_147_483_629)  # the two largest primes below 2**31
_DIGEST_BASES = (1_000_003, 998_244_353)
_powers: dict[tuple[int, int], torch.Tensor] = {}


def _digest_powers(base: int, prime: int, length: int, device: torch.device) -> torch.Tensor:
    """``base ** j mod prime`` for ``j < length`` (int64, cached; computed by doubling, no overflow)."""
    table = _powers.get((base, prime))
    if table is None or table.numel() < length:
        table = torch.ones(1, dtype=torch.int64)
        while table.numel() < length:
            step = pow(base, table.numel(), prime)  # base ** len(table)
            table = torch.cat([table, table * step % prime])
        _powers[(base, prime)] = table
    return table[:length].to(device)


def sample_digest(
    input_ids: torch.Tensor, candidates: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """A content digest per sample: its tokens and which of them are candidates, in order.

    Two polynomial hashes modulo primes below ``2 ** 31`` over the attended positions, numbered from
    the sample's own first token (so padding on either side does not change it), combined into one
    int64 in ``[1, 2 ** 62)``. Integer arithmetic only: the same on every device and process. The score
    store compares it to tell a sample from another one stored under the same key (see
    :class:`~regate_lightning.bank.ScoreBank`).

    Args:
        input_ids: int64 ``[B, L]``.
        candidates: bool ``[B, L]``, the elision candidates.
        attention_mask: ``[B, L]``, 0 at padding, or None (no padding).

    Returns:
        int64 ``[B]``, never 0 (0 means "unknown").

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 0], [0, 5, 6, 7]])
        >>> cand = torch.tensor([[False, True, False, False], [False, False, True, False]])
        >>> d = sample_digest(ids, cand, torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]))
        >>> bool(d[0] == d[1]), bool(d[0] == sample_digest(ids, ~cand)[0])
        (True, False)
    """
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position = (valid.long().cumsum(1) - 1).clamp_(min=0)
    value = (input_ids.long() * 2 + candidates.long() + 1) * valid
    parts = []
    for base, prime in zip(_DIGEST_BASES, _DIGEST_PRIMES, strict=True):
        # index_select, not `table[position]`: advanced indexing runs in threads from a few thousand elements,
        # and a training step should not wait for a busy core for this (docs/memory.md).
        table = _digest_powers(base, prime, input_ids.shape[1], input_ids.device)
        powers = table.index_select(0, position.reshape(-1)).view_as(position)
        parts.append(((value % prime) * powers % prime).sum(1) % prime)
    return parts[0] * _DIGEST_PRIMES[1] + parts[1] + 1
