"""Does the student read its images and videos? The media-reliance gap.

A student that ignores its visual tokens predicts an answer as well from another sample's video as from
its own. The *media gap* measures that: the mean answer-token loss when each sample's media are swapped
for another sample's, minus the mean loss with its own media, over the same answer tokens::

    gap = mean_t [ loss_t(swapped media) - loss_t(own media) ]

A clearly positive gap means the answers depend on the media; zero means the student ignores them.
:class:`~regate_lightning.MLLMModule` logs it at validation as ``val/video_gap`` (``val/image_gap`` for
images), on the correct option of each multiple-choice question, or on every row of a plain batch.

**Which rows.** Only rows holding exactly one media item take part (the usual case: one video per
question), and a row's media can only be swapped for media of the same layout (same kind, the same
tensor shapes and, for Qwen2-VL, the same grid), so that the model still finds one feature per
placeholder. Rows are grouped by layout and each row takes the media of the next row of its group (a
cyclic shift, so no row keeps its own); a group of one row is left out. Pure torch and the family registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regate_lightning.families import ModelParts
from regate_lightning.keys import ANSWER_IDX, IMAGE, IMAGE_SIZES, INPUT_IDS, OPTION_IDX, VIDEO

__all__ = ["MediaSwap", "answer_rows", "media_runs", "swap_media"]


def media_runs(input_ids: Tensor, token_id: int) -> Tensor:
    """Number of media items of one kind per row: the contiguous runs of its placeholder id.

    Args:
        input_ids: int64 ``[B, L]``.
        token_id: the placeholder id of the kind.

    Returns:
        int64 ``[B]``.

    Example:
        >>> media_runs(torch.tensor([[5, 9, 9, 1, 9], [1, 2, 3, 4, 5]]), 9)
        tensor([2, 0])
    """
    hit = input_ids == token_id
    starts = hit & ~torch.nn.functional.pad(hit, (1, 0))[:, :-1]
    return starts.sum(1)


def _signature(item: dict[str, Tensor]) -> tuple:
    """Items with equal signatures can replace each other: same shapes, grids and anyres image sizes.

    An anyres image's token count follows from its original size (LLaVA-NeXT, LLaVA-OneVision), not from its
    tiles' shape alone.
    """
    return tuple(
        (key, tuple(t.shape), tuple(t.flatten().tolist()) if key.endswith("grid_thw") or key == IMAGE_SIZES else None)
        for key, t in sorted(item.items())
    )


@dataclass(frozen=True)
class MediaSwap:
    """Rows of a batch with their media swapped, and the same rows with their own media.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        rows: int64 ``[R]``, the rows of the original batch that take part, in order.
        own: the sub-batch of those rows with their own media.
        swapped: the same sub-batch, each row holding another row's media of the same layout.
    """

    kind: str
    rows: Tensor
    own: dict[str, Any]
    swapped: dict[str, Any]


def _join(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def swap_media(batch: Mapping[str, Any], parts: ModelParts, rows: Tensor | None = None) -> list[MediaSwap]:
    """Build, per media kind, the sub-batch of ``rows`` with each row's media swapped for another row's.

    Args:
        batch: a batch in the model's own keys (``input_ids``, the media tensors, ...); every tensor whose
            first dimension is the batch size is taken row by row, the media tensors item by item.
        parts: the model's parts (:func:`~regate_lightning.families.resolve`).
        rows: bool or int64 ``[B]`` selection of candidate rows (default: all); for multiple-choice
            batches pass the rows of the correct options (:func:`answer_rows`).

    Returns:
        One :class:`MediaSwap` per media kind that has at least two swappable rows (possibly empty).
    """
    input_ids: Tensor = batch[INPUT_IDS]
    size = input_ids.shape[0]
    if rows is None:
        chosen = torch.ones(size, dtype=torch.bool, device=input_ids.device)
    elif rows.dtype == torch.bool:
        chosen = rows.to(input_ids.device)
    else:
        chosen = torch.zeros(size, dtype=torch.bool, device=input_ids.device)
        chosen[rows.to(input_ids.device)] = True
    family, config = parts.family, parts.model.config
    kinds = [kind for kind in (IMAGE, VIDEO) if family.media_token_id(config, kind) is not None]
    none = torch.zeros(size, dtype=torch.long, device=input_ids.device)
    runs = {kind: family.media_per_row(config, input_ids, kind) if kind in kinds else none for kind in (IMAGE, VIDEO)}
    single = (runs[IMAGE] + runs[VIDEO]) == 1
    media_keys = {key for kind in kinds for key in family.media_keys(kind)}
    out = []
    for kind in kinds:
        items = family.split_media(config, batch, kind, int(runs[kind].sum()))
        if not items:
            continue
        first_item = torch.cumsum(runs[kind], 0) - runs[kind]  # index of each row's first item of this kind
        take = (chosen & single & (runs[kind] == 1)).nonzero().flatten().tolist()
        groups: dict[tuple, list[int]] = {}
        for row in take:
            groups.setdefault(_signature(items[int(first_item[row])]), []).append(row)
        members = sorted(row for group in groups.values() if len(group) > 1 for row in group)
        if not members:
            continue
        partner = {}
        for group in groups.values():
            if len(group) > 1:
                partner.update({row: group[(i + 1) % len(group)] for i, row in enumerate(group)})
        index = torch.tensor(members, device=input_ids.device)
        text = {
            key: value[index]
            for key, value in batch.items()
            if key not in media_keys and isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == size
        }
        own = dict(text, **_join([items[int(first_item[r])] for r in members]))
        swapped = dict(text, **_join([items[int(first_item[partner[r]])] for r in members]))
        out.append(MediaSwap(kind, index, own, swapped))
    return out


def answer_rows(batch: Mapping[str, Any]) -> Tensor | None:
    """The rows of a multiple-choice batch that hold the correct option (None for a plain batch).

    Example:
        >>> answer_rows({"option_idx": torch.tensor([0, 1, 0, 1]), "answer_idx": torch.tensor([1, 1, 0, 0])})
        tensor([False,  True,  True, False])
    """
    if OPTION_IDX not in batch or ANSWER_IDX not in batch:
        return None
    return batch[OPTION_IDX] == batch[ANSWER_IDX]
