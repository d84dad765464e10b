"""Gemma 3 (``Gemma3ForConditionalGeneration``, images): image tokens attend to each other both ways.

An image (and each pan-and-scan crop of it) is one ``S x S`` picture; the SigLIP tower's ``(S / P) ** 2`` patches
are average-pooled to ``mm_tokens_per_image`` tokens (``k x k`` patches each, ``k = (S / P) / sqrt(tokens)``), so
every image gives a fixed number of tokens, and each image is encoded alone. Its text is
``\\n\\n<start_of_image>`` + ``<image_soft_token>`` per token + ``<end_of_image>\\n\\n``
(``Gemma3Processor.full_image_sequence``), and ``token_type_ids`` marks the image tokens with 1.

**Attention.** ``Gemma3Model`` builds its decoder's masks itself, before calling the decoder: a dict of 4-D masks
per layer type, where every token sees the tokens before it and the tokens of its own image (a contiguous run of
``token_type_ids == 1``) see each other both ways; the sliding-window layers also limit that to a window of
positions. The elided step keeps exactly this pattern: :meth:`Gemma3Family.decoder_mask` restricts the model's own
masks to the kept rows and columns (:func:`~regate_lightning.families.base.gather_mask`), so a kept image token
still sees every kept token of its image, before or after it, and a window still spans the original positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regate_lightning.families.base import (
    DEFAULT_VOCAB,
    FIXED,
    Family,
    MediaRegions,
    MediaSteps,
    MediaText,
    ModelParts,
    RandomMedia,
    expansion_parts,
    frame_regions,
    gather_mask,
    text_config,
    top_id,
    tower_config,
)
from regate_lightning.keys import IMAGE_TYPE, PIXEL_VALUES, TOKEN_TYPE_IDS

IMAGE_SIZE = 32
"""Tower input side of the tiny test models."""
PATCH_SIZE = 8
"""Patch side of the tiny test models."""
BOI_TOKEN = "<start_of_image>"
"""What Gemma 3's chat template writes for an image (``tokenizer.boi_token``), replaced by the image's text."""
IMAGE_TOKEN = "<image_soft_token>"
"""The placeholder of every image token (``tokenizer.image_token``)."""
EOI_TOKEN = "<end_of_image>"
"""The token after an image's placeholders (``tokenizer.eoi_token``)."""


def image_tokens(config: Any) -> int:
    """Placeholder tokens per image (and per crop): ``mm_tokens_per_image``.

    Raises:
        ValueError: a token count the projector cannot pool the tower's patch grid into.
    """
    tokens = int(config.mm_tokens_per_image)
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    per_side = round(tokens**0.5)
    if per_side * per_side != tokens or side % per_side:
        raise ValueError(f"Gemma 3 cannot pool {side} x {side} patches into mm_tokens_per_image={tokens} tokens")
    return tokens


def image_expansion(crops: int, tokens: int, image_token_id: int) -> tuple[int | str, ...]:
    """The text Gemma 3's processor writes for an image with ``crops`` pan-and-scan crops, from transformers' own
    ``Gemma3Processor.replace_image_token``, as expansion parts (placeholders as ids)."""
    from types import SimpleNamespace

    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    sequence = f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * tokens}{EOI_TOKEN}\n\n"
    text = Gemma3Processor.replace_image_token(SimpleNamespace(full_image_sequence=sequence), {"num_crops": [crops]}, 0)
    return expansion_parts(text, IMAGE_TOKEN, image_token_id)


@dataclass(frozen=True)
class Gemma3Family(Family):
    """Gemma 3's rules (see the module docstring)."""

    def marker_token_ids(self, config: Any) -> tuple[int, ...]:
        """The begin and end of image ids."""
        return int(config.boi_token_id), int(config.eoi_token_id)

    def decoder_mask(self, mask: Any, index: torch.Tensor, valid: torch.Tensor, length: int) -> Any:
        """The model's own per-layer-type masks, restricted to the kept queries and keys (see the module docstring).

        Raises:
            TypeError: a mask that is not the dict of 4-D masks ``Gemma3Model`` builds (another transformers version).
        """
        if not isinstance(mask, dict):
            raise TypeError(
                "Gemma3Model passed its decoder an attention mask of type "
                f"{type(mask).__name__}, not its dict of 4-D masks per layer type; the elided step cannot keep the "
                "bidirectional image attention with this transformers version"
            )
        return {kind: gather_mask(value, index, valid, length) for kind, value in mask.items()}

    def media_expansion(self, text: MediaText) -> tuple[int | str, ...]:
        """An image and its pan-and-scan crops (``steps - 1``), each between begin / end of image
        (:func:`image_expansion`)."""
        return image_expansion(text.steps - 1, text.tokens_per_step, text.token_id)

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """One step per image (or crop)."""
        pixels = batch.get(self.media_key(kind))
        if pixels is None:
            return []
        return [MediaSteps(1, image_tokens(config), 1)] * int(pixels.shape[0])

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """A token is one ``k * P`` pixel square of its image, row by row (the projector's average pooling)."""
        pixels = batch.get(self.media_key(kind))
        if pixels is None:
            return []
        per_side = round(image_tokens(config) ** 0.5)
        cell = int(config.vision_config.image_size) // per_side
        return frame_regions(kind, pixels.unsqueeze(1), cell, per_side)

    def unused_vision_modules(self, parts: ModelParts) -> list[nn.Module]:
        """SigLIP's pooling head, if the tower has one: Gemma 3 reads the tower's ``last_hidden_state``."""
        tower = getattr(parts.inner, "vision_tower", None)
        head = getattr(getattr(tower, "vision_model", tower), "head", None)
        return [head] if isinstance(head, nn.Module) else []

    def init_tiny(self, model: nn.Module) -> None:
        """A random projector: the class initialises ``mm_input_projection_weight`` to zero (no image information)."""
        projector = model.model.multi_modal_projector  # type: ignore[union-attr]
        with torch.no_grad():
            projector.mm_input_projection_weight.normal_(std=0.1)

    def random_media(self, config: Any, num_frames: int, generator: torch.Generator) -> RandomMedia:
        """One image of random pixels between its begin and end of image tokens."""
        size = int(config.vision_config.image_size)
        count = image_tokens(config)
        boi, eoi = self.marker_token_ids(config)
        ids = [boi, *[int(config.image_token_id)] * count, eoi]
        types = [0, *[IMAGE_TYPE] * count, 0]
        pixels = torch.randn((1, 3, size, size), generator=generator)
        return RandomMedia(ids, types, {PIXEL_VALUES: pixels}, "image")


def tiny_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    sliding_window: int = 4096,
) -> Any:
    """A tiny ``Gemma3Config``: a SigLIP tower on 32-pixel images of 8-pixel patches pooled to 4 tokens, a Gemma 3
    decoder whose layers alternate sliding-window and full attention (the window spans the test sequences unless
    ``sliding_window`` is given smaller); image, begin and end of image ids at the vocabulary's top."""
    from transformers import Gemma3Config

    text = text_config(vocab_size, hidden_size, num_layers)
    text.update(
        head_dim=hidden_size // text["num_attention_heads"],
        query_pre_attn_scalar=hidden_size // text["num_attention_heads"],
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
        + ["sliding_attention"] * (num_layers % 2),
    )
    vision = tower_config(IMAGE_SIZE, PATCH_SIZE, model_type="siglip_vision_model", vision_use_head=False)
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=top_id(vocab_size, 1),
        boi_token_index=top_id(vocab_size, 2),
        eoi_token_index=top_id(vocab_size, 3),
    )


FAMILY = Gemma3Family(
    "gemma3",
    classes=("Gemma3ForConditionalGeneration",),
    model_types=("gemma3",),
    towers=("vision_tower",),
    projectors=("multi_modal_projector",),
    placeholders=FIXED,
    image_key=PIXEL_VALUES,
    token_types=True,
    token_types_key=TOKEN_TYPE_IDS,
    template_tokens=(("image", BOI_TOKEN),),
    encoders=(("image", "vision_tower", "multi_modal_projector"),),
    tiny={"Gemma3ForConditionalGeneration": tiny_config},
)
