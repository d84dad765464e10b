"""``sdpa_varlen``: transformers' SDPA attention run sample by sample on a packed row.

transformers gives a packed row to SDPA as one ``[T, T]`` block-diagonal mask (what
:func:`~regate_lightning.elision.packed_attention_mask` builds for ``attn_implementation="sdpa"``): the attention
then costs ``T ** 2`` however short the samples are, and the mask takes ``T ** 2`` bytes. FlashAttention-2's
variable-length path costs ``sum(L_i ** 2) / 2`` instead, but it needs a CUDA build of ``flash-attn``, and
``torch.nn.attention.varlen`` is CUDA-only too. ``sdpa_varlen`` is transformers' own
``sdpa_attention_forward`` called once per sample of the row, causal, on that sample's slice, with the sample
boundaries a packed step passes to every attention layer (``cu_seq_lens_q``, as FlashAttention-2 reads them):
what FlashAttention-2 computes, on any device. On the 2-core CPU a packed training step on the block-diagonal
mask took 3.9x the time of one on ``sdpa_varlen`` (``benchmarks/packing.py``, docs/results.md).

Called without ``cu_seq_lens_q`` (a padded batch, validation) it is ``sdpa_attention_forward`` itself, with
SDPA's mask rule, so a model switched to it computes what it computed before on every other path.
A sliding-window layer (``module.sliding_window``) gets the window as a mask on a sample longer than it.

:func:`register` makes the name known to transformers (its ``AttentionInterface`` and mask interface);
:func:`use_packed_sdpa` switches a model's text decoder from ``sdpa`` to it (``MLLMModule(packed=True)`` does).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

PACKED_SDPA = "sdpa_varlen"
"""The attention implementation's name."""


def sdpa_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one layer: per sample of a packed row when ``cu_seq_lens_q`` is given, else plain SDPA.

    Args:
        module: the attention layer (its ``num_key_value_groups``, ``is_causal``, ``sliding_window``).
        query: ``[1, heads, T, D]`` on a packed row (``[B, heads, L, D]`` otherwise).
        key: ``[1, kv_heads, T, D]``.
        value: ``[1, kv_heads, T, D]``.
        attention_mask: on a packed row, :func:`row_marker` or None (the samples' boundaries are in
            ``cu_seq_lens_q``); SDPA's mask otherwise.
        dropout: attention dropout.
        scaling: the softmax scale.
        **kwargs: ``cu_seq_lens_q`` (int32 ``[S + 1]``, the samples' cumulative lengths) and ``cu_seq_lens_k`` (the
            same) on a packed row; the rest goes to ``sdpa_attention_forward``.

    Returns:
        ``(output [1, T, heads, D], None)``.

    Raises:
        ValueError: a packed row with a mask, or with other key than query boundaries.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.pop("cu_seq_lens_q", None)
    cu_k = kwargs.pop("cu_seq_lens_k", None)
    for name in ("max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if cu_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if (attention_mask is not None and not is_row_marker(attention_mask)) or query.shape[0] != 1:
        raise ValueError(f"{PACKED_SDPA} runs one packed row without a mask (the boundaries are cu_seq_lens_q)")
    if cu_k is not None and not torch.equal(cu_k, cu_q):
        raise ValueError(f"{PACKED_SDPA} needs the same sample boundaries for queries and keys")
    window = getattr(module, "sliding_window", None)
    bounds = cu_q.tolist()
    outputs = []
    for start, end in itertools.pairwise(bounds):
        length = end - start
        mask = None
        if window is not None and length > window:  # the window counted within the sample, as a padded row has it
            rows = torch.arange(length, device=query.device)
            distance = rows[:, None] - rows[None, :]
            mask = ((distance >= 0) & (distance < window))[None, None]
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            mask,
            dropout,
            scaling,
            **kwargs,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def row_marker(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """What a packed step passes as the decoder's attention mask for :data:`PACKED_SDPA`: an all-True 4-D view.

    A decoder given no mask builds one from the position ids, and transformers reads every gap that elision leaves
    in them as a sample boundary; a 4-D mask is passed to the layers untouched. This one is one stored value
    broadcast to ``[1, 1, T, T]`` (no memory); :func:`sdpa_varlen_attention` reads the boundaries from
    ``cu_seq_lens_q`` instead.
    """
    return torch.ones((), dtype=torch.bool, device=device).expand(1, 1, length, length)


def is_row_marker(mask: torch.Tensor) -> bool:
    """Whether ``mask`` is a :func:`row_marker`."""
    return mask.dtype == torch.bool and mask.dim() == 4 and not any(mask.stride()) and bool(mask.reshape(-1)[0])


def register() -> None:
    """Register :data:`PACKED_SDPA` with transformers: the attention function and SDPA's mask rule."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, sdpa_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def use_packed_sdpa(decoder: nn.Module) -> bool:
    """Switch a text decoder that runs ``sdpa`` to :data:`PACKED_SDPA` (registering it); other implementations stay.

    Args:
        decoder: the text decoder (its ``config._attn_implementation``; the vision tower keeps its own config).

    Returns:
        Whether the decoder now runs :data:`PACKED_SDPA`.
    """
    config = getattr(decoder, "config", None)
    if config is None:
        return False
    if config._attn_implementation == PACKED_SDPA:
        return True
    if config._attn_implementation != "sdpa":
        return False
    register()
    config._attn_implementation = PACKED_SDPA
    return True
