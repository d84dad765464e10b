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
