"""What every model family declares, and the generic behaviour a family inherits unless it says otherwise.

A family is one :class:`Family` object (a frozen dataclass, subclassed where the family's rules differ from the
generic ones), declared in its own module of this package and collected by :mod:`regate_lightning.families`.
The engine (:mod:`regate_lightning.elision`), the visual policy, the media gap, the teacher, the data pipeline,
the random test batches and the benchmarks read a family only through the methods below, so a new family is
one module (its declaration, its overrides, its tiny config) plus its tests.

Nothing here imports transformers at import time (classes are named by string; configs are built lazily).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from regate_lightning.keys import FRAME_INDEX, PIXEL_VALUES

# Placeholder rules (the values of ``Family.placeholders``).
PATCHES = "patches"
"""One token per tower patch of an image or frame (LLaVA, Video-LLaVA)."""
POOLED = "pooled"
"""One token per pooled patch of a frame: ``spatial_pool_stride`` x ``spatial_pool_stride`` pooling."""
GRID = "grid"
"""Qwen-VL families: one token per ``merge x merge`` patches of the media's ``(t, h, w)`` grid."""
TILES = "tiles"
"""A fixed number of tokens per image tile or frame after a pixel-shuffle / pooling connector (InternVL, SmolVLM)."""
FIXED = "fixed"
"""Gemma 3: a fixed number of tokens per image (``mm_tokens_per_image``, the tower's patches average-pooled),
wrapped in begin / end of image tokens; image tokens attend to each other both ways."""
MERGED = "merged"
"""VideoLLaMA3: one token per ``merge x merge`` patches of each frame's ``(h, w)`` grid, with a merge size per media
(its processors: 1 for images, 2 for videos), and videos pruned by the processor's compression mask."""
NONE = "none"
"""A text-only model."""

CLS_TOWERS = ("clip_vision_model", "internvl_vision")
"""Vision towers (config ``model_type``) whose features start with a class token."""
NO_CLS_TOWERS = ("siglip_vision_model", "siglip2_vision_model")
"""Vision towers without a class token."""

MEDIA_KINDS = ("image", "video")
"""The kinds of media a family may take."""

DEFAULT_VOCAB = 512
"""Vocabulary of the tiny test models (placeholder ids at its top)."""


def tower_has_cls(vision_config: Any) -> bool:
    """Whether a vision tower's features start with a class token (CLIP) or not (SigLIP).

    Raises:
        ValueError: for a tower not in :data:`CLS_TOWERS` or :data:`NO_CLS_TOWERS`.
    """
    kind = getattr(vision_config, "model_type", "")
    if kind in NO_CLS_TOWERS:
        return False
    if kind in CLS_TOWERS:
        return True
    raise ValueError(
        f"unknown vision tower {kind!r}: cannot tell whether it has a CLS token; supported towers are "
        f"{CLS_TOWERS + NO_CLS_TOWERS}"
    )


def patch_grid(vision_config: Any) -> int:
    """Patches per side of a tower's square input (``image_size / patch_size``).

    Raises:
        ValueError: the image size is not a multiple of the patch size.
    """
    size, patch = int(vision_config.image_size), int(vision_config.patch_size)
    if size % patch:
        raise ValueError(f"image_size {size} is not a multiple of patch_size {patch}")
    return size // patch


def unwrap(model: Any) -> Any:
    """Return the HF model inside a peft ``PeftModel`` (or the argument itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def config_of(model_or_config: Any) -> Any:
    """The HF config of a model (possibly peft-wrapped), or the argument itself when it is a config."""
    return getattr(unwrap(model_or_config), "config", model_or_config)


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` at a dotted attribute ``path`` (``"visual.merger"``), or None."""
    module: Any = root
    for name in path.split("."):
        module = getattr(module, name, None)
    return module if isinstance(module, nn.Module) else None


def text_config(
    vocab_size: int = DEFAULT_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 4096,
    tie_word_embeddings: bool | None = None,
) -> dict[str, Any]:
    """Keyword arguments of a small Llama-style decoder config (``LlamaConfig``, ``Qwen2Config`` or a VLM's
    ``text_config``): pad/bos/eos ids 0/1/2, the MLP twice the hidden size unless given.

    Args:
        vocab_size: vocabulary size; multimodal builders put the placeholder ids at its top.
        hidden_size: hidden size.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention).
        intermediate_size: MLP width; default ``2 * hidden_size``.
        max_positions: ``max_position_embeddings``.
        tie_word_embeddings: set the key only when given (the config class's default otherwise).

    Returns:
        A new dict.

    Example:
        >>> text_config(hidden_size=32)["intermediate_size"]
        64
    """
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size if intermediate_size is None else intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_positions,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    return config


@dataclass(frozen=True)
class MediaSteps:
    """How one image or video divides into time steps (:meth:`Family.media_steps`).

    A media's placeholders come step by step, then its tail: ``placeholders[0]`` tokens of step 0 (or
    ``tokens_per_step`` each), ..., then ``tail`` tokens that belong to no step.

    Attributes:
        steps: time steps ``T`` (frames; Qwen's temporal patches; tiles; 1 for a plain image).
        tokens_per_step: the tower's feature rows per step (placeholder tokens per step, unless ``placeholders``
            says otherwise).
        rows_per_step: rows of the vision tower's input per step (1 for a LLaVA family's frame, ``h * w``
            patches for Qwen-VL, the tiles of a LLaVA-OneVision anyres image).
        placeholders: the placeholder tokens of each step where some of a step's features have none (VideoLLaMA3's
            compression keeps only the video tokens that changed); None: ``tokens_per_step`` each. The tower's
            output still has ``tokens_per_step`` rows per step.
        tail: placeholder tokens after the last step that come from no step and need no tower work (the newline
            feature LLaVA-OneVision appends to every video); 0 for most families. They never keep a step encoded.
    """

    steps: int
    tokens_per_step: int
    rows_per_step: int
    placeholders: tuple[int, ...] | None = None
    tail: int = 0

    @property
    def num_placeholders(self) -> int:
        """Placeholder tokens of the media: its steps' and its tail's."""
        body = sum(self.placeholders) if self.placeholders is not None else self.steps * self.tokens_per_step
        return body + self.tail

    def steps_with_a_token(self, flags: Tensor) -> Tensor:
        """Which steps keep at least one of their placeholders (bool ``[steps]``); the tail's are not read.

        Args:
            flags: bool ``[num_placeholders]``, the media's placeholders that are kept, in order.
        """
        body = flags[: flags.numel() - self.tail]
        if self.placeholders is None:
            return body.view(self.steps, self.tokens_per_step).any(1)
        return torch.stack([part.any() for part in body.split(list(self.placeholders))])


@dataclass(frozen=True)
class MediaRegions:
    """The pixels behind the placeholder tokens of one image or video (:meth:`Family.media_regions`).

    A media's tokens come time step by time step (a frame; a temporal patch of Qwen-VL; one step for an
    image); inside a step, an optional whole-frame token (a CLS token) first, then the spatial tokens in
    the model's order; after the last step, optionally ``tail`` tokens that stand for no pixels (a learned
    feature the model appends: LLaVA-OneVision's video newline).

    Attributes:
        kind: ``"image"`` or ``"video"``.
        regions: float ``[T, N, D]``: per time step, the ``D`` pixel values (normalised, as the model sees
            them) of each of its ``N`` spatial tokens.
        lead: whether every time step starts with one token that stands for the whole frame (CLS).
        present: bool ``[T, N]``: the spatial tokens that have a placeholder, where the model's own pruning removed
            others (VideoLLaMA3's compression); None: all. Scores are computed on the whole grid (a token is
            compared with the same region of the previous step, whether or not that one has a placeholder) and
            read at the present tokens (:meth:`flat`).
        tail: tokens after the last step with no pixel region of their own (they belong to no step).
    """

    kind: str
    regions: torch.Tensor
    lead: bool = False
    present: torch.Tensor | None = None
    tail: int = 0

    @property
    def steps(self) -> int:
        """Time steps ``T``."""
        return int(self.regions.shape[0])

    @property
    def tokens_per_step(self) -> int:
        """Tokens per time step of the grid: ``N``, plus one with a whole-frame token."""
        return int(self.regions.shape[1]) + int(self.lead)

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens of the media: the present tokens of its steps, and its tail."""
        if self.present is None:
            return self.steps * self.tokens_per_step + self.tail
        return int(self.present.sum()) + self.steps * int(self.lead) + self.tail

    def flat(self, grid: torch.Tensor) -> torch.Tensor:
        """Per-token values on the grid (``[T, tokens_per_step]``) in the media's token order, present tokens
        only, then ``+inf`` for each tail token (a token that stands for the whole media is kept first).

        Returns:
            ``[num_tokens]`` values of ``grid``'s dtype.
        """
        if self.present is None:
            values = grid.flatten()
        else:
            present = self.present.to(grid.device)
            if self.lead:
                present = torch.cat([present.new_ones(self.steps, 1), present], dim=1)
            values = grid[present]
        if not self.tail:
            return values
        return torch.cat([values, values.new_full((self.tail,), float("inf"))])


@dataclass(frozen=True)
class RandomMedia:
    """One sample's media in a family's own layout, for random test batches (:meth:`Family.random_media`).

    Attributes:
        ids: the token ids that stand for the media in ``input_ids`` (placeholders and the family's markers).
        token_types: per id of :attr:`ids`: 0 text, 1 image, 2 video (``mm_token_type_ids``).
        tensors: batch key -> tensor whose dim 0 concatenates across samples (the data pipeline's layout).
        kind: ``"image"`` or ``"video"``.
    """

    ids: list[int]
    token_types: list[int]
    tensors: dict[str, Tensor]
    kind: str


@dataclass(frozen=True)
class MediaText:
    """What the data side knows of one processed image or video when it writes the media's text
    (:meth:`Family.media_expansion`).

    Attributes:
        kind: ``"image"`` or ``"video"``.
        token_id: the media's placeholder id.
        steps: the media's steps: tiles or crops of an image (1 for a plain image), frames of a video (Qwen: its
            temporal patches).
        tokens_per_step: placeholders per step.
        placeholders: the placeholders of each step where they differ (VideoLLaMA3's compressed frames); None:
            ``tokens_per_step`` each.
        markers: the ``(vision start, vision end)`` ids of a family that has them (Qwen-VL), else None.
        tile_grid: ``(rows, cols)`` of the sub-images an image was split into beside its global image (SmolVLM);
            ``(0, 0)``: not split.
        temporal_patch_size: frames per step (Qwen-VL).
        times: each frame's time in seconds (SmolVLM's and VideoLLaMA3's timestamps).
        frame_seconds: each frame's index in its source video over the source's frame rate, before any temporal
            padding (Qwen3-VL's timestamps, as transformers' ``VideoMetadata`` gives them).
        duration: the clip's length in seconds (SmolVLM's intro), None where unknown.
    """

    kind: str
    token_id: int
    steps: int
    tokens_per_step: int
    placeholders: tuple[int, ...] | None = None
    markers: tuple[int, int] | None = None
    tile_grid: tuple[int, int] = (0, 0)
    temporal_patch_size: int = 1
    times: tuple[float, ...] = ()
    frame_seconds: tuple[float, ...] = ()
    duration: float | None = None


def frame_regions(
    kind: str, frames: torch.Tensor, cell: int, cells: int, *, lead: bool = False, drop_first: bool = False
) -> list[MediaRegions]:
    """Square cells of ``cell`` pixels, ``cells`` a side, row by row, of frames ``[N, F, C, H, W]``."""
    num, steps, channels = frames.shape[:3]
    x = frames[..., : cells * cell, : cells * cell]
    x = x.reshape(num, steps, channels, cells, cell, cells, cell).permute(0, 1, 3, 5, 2, 4, 6)
    x = x.reshape(num, steps, cells * cells, channels * cell * cell)
    if drop_first:
        x = x[:, :, 1:]
    return [MediaRegions(kind, x[i], lead) for i in range(num)]


def _run_starts(mask: Tensor) -> Tensor:
    """Where a run of True begins (bool ``[B, L]``)."""
    return mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]


def count_runs(mask: Tensor) -> Tensor:
    """Number of contiguous runs of True per row (int64 ``[B]``).

    Example:
        >>> count_runs(torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool))
        tensor([2, 0])
    """
    return _run_starts(mask).sum(1)


def runs(mask: Tensor) -> list[tuple[int, int, int]]:
    """The contiguous runs of True of ``mask`` (bool ``[B, L]``), row by row: ``(row, start, length)``.

    Example:
        >>> runs(torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool))
        [(0, 1, 2), (0, 4, 1), (1, 0, 1)]
    """
    ends = mask & ~torch.nn.functional.pad(mask, (0, 1))[:, 1:]
    pairs = zip(_run_starts(mask).nonzero().tolist(), ends.nonzero().tolist(), strict=True)
    return [(row, start, end - start + 1) for (row, start), (_, end) in pairs]


def expansion_parts(text: str, placeholder: str, token_id: int) -> tuple[int | str, ...]:
    """A processor's text for one media as :attr:`~regate_lightning.data.vision.ProcessedMedia.expansion` parts:
    every ``placeholder`` becomes ``token_id``, the text between them stays text (tokenized as a whole).

    Example:
        >>> expansion_parts("<a><image><image> <a>", "<image>", 9)
        ('<a>', 9, 9, ' <a>')
    """
    out: list[int | str] = []
    for j, piece in enumerate(text.split(placeholder)):
        if j:
            out.append(token_id)
        if piece:
            out.append(piece)
    return tuple(out)


def top_id(vocab_size: int, rank: int, given: int | None = None) -> int:
    """``given``, or the ``rank``-th id from the top of the vocabulary (1: the last), where the tiny configs put their
    placeholder and marker ids (random text never uses them)."""
    return vocab_size - rank if given is None else given


def tower_config(image_size: int | None, patch_size: int, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of the tiny vision towers: 2 layers of width 32 (MLP 64), 4 heads, ``patch_size`` pixel
    patches of ``image_size`` images (left to the config class when None), and ``extra``."""
    config: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": patch_size,
    }
    if image_size is not None:
        config["image_size"] = image_size
    return {**config, **extra}


@dataclass(frozen=True)
class Family:
    """What one supported model family is, written once (see the module docstring).

    The fields are the family's declaration; the methods are the generic rules, which a family's subclass
    overrides where its model differs.

    Attributes:
        name: the family's name (its module's name in this package).
        classes: the HF model classes, by name (so nothing here imports transformers).
        model_types: the config ``model_type`` values of those classes.
        decoder: attribute path, on the inner model (``model.model``), of the text decoder that takes
            ``inputs_embeds``.
        towers: attribute paths, on the inner model, of the vision encoder(s).
        projectors: attribute paths of the projector(s); one inside a tower (Qwen-VL's patch merger) is
            taken out of that tower.
        placeholders: the placeholder rule (:data:`PATCHES`, :data:`POOLED`, :data:`GRID`, :data:`TILES`,
            :data:`FIXED`, :data:`MERGED`, :data:`NONE`).
        image_key: batch key of image pixels, None if the family takes no images.
        video_key: batch key of video pixels, None if the family takes no videos.
        grid_keys: batch keys of the image and video grids (``(t, h, w)`` per media), for :data:`GRID`.
        image_refusal: why images are refused on the built-in path (a model without processor configs)
            where the HF class takes them, else ``""``.
        anyres_images: whether images are tiled by ``image_grid_pinpoints`` (LLaVA-NeXT "anyres"); only
            through the checkpoint's own image processor.
        image_sizes_key: batch key of the anyres images' original sizes, None without anyres images.
        video_processor: the transformers video processor class of the family, ``""`` without videos.
        template_tokens: ``(kind, token)`` pairs: the token the checkpoints' chat template writes for a media of
            ``kind`` where it is not the placeholder itself (SmolVLM2's and InternVL's ``<video>``, whose frames are
            images to the model; Gemma 3's ``<start_of_image>``), which the media's expansion replaces.
        processor_class: the transformers processor class of the family, ``""`` where it adds nothing to its
            image processor: its class-level ``images_kwargs`` (InternVL's ``crop_to_patches=True``, SmolVLM's
            ``return_row_col_info=True``) take precedence over the image processor's config, as the processor's
            own call applies them.
        mrope: whether position ids are Qwen's multi-row M-RoPE ids (``[3, B, L]``).
        vision_markers: whether each media's placeholders are wrapped in vision start / end tokens.
        token_types: whether the model needs the media type of every position (0 text, 1 image, 2 video).
        token_types_key: the batch key it reads them from (``mm_token_type_ids``; Gemma 3's ``token_type_ids``).
        seconds_per_grid: the model types that also take ``second_per_grid_ts`` per video (Qwen2.5-VL).
        unused_tower_heads: whether the tower's final norm and pooling head never reach the loss.
        encoders: per media kind, in the order the model encodes them, ``(kind, tower, output)``: the module
            (path on the inner model) that takes the kind's pixels (one time step per row, or per
            ``rows_per_step`` rows), and the module whose output holds its features, one row per row of the
            tower's input (LLaVA families' projector) or per token (Qwen-VL's ``visual``). Each step is encoded
            independently of the others, which lets the engine skip the steps whose every token is elided. Empty
            where the tower mixes steps (the engine then encodes every step).
        frames_alone: whether the model encodes every frame of a ``[N, T, 3, H, W]`` video tensor on its
            own, so clips of different lengths can be passed as one ``[1, sum(T), 3, H, W]`` tensor.
        media_only: ``(kind, path)`` pairs: a module or parameter (path on the inner model) that only batches
            holding media of ``kind`` use (Video-LLaVA's ``image_tower``, LLaVA-NeXT-Video's ``image_newline``),
            so that it gets no gradient in a batch without that kind (``families.media_only_parameters``).
        recurrent: whether the decoder has recurrent (linear-attention / state-space) layers, whose state
            runs over the sequence in order: elided positions never enter it, and a 4-D attention mask
            cannot stand in for elision there.
        tiny: per HF class of the family, the builder of a small random model's config (tests, debug recipes,
            benchmarks); keyword arguments as :func:`text_config` plus the family's own.
    """

    name: str
    classes: tuple[str, ...]
    model_types: tuple[str, ...]
    decoder: str = "language_model"
    towers: tuple[str, ...] = ()
    projectors: tuple[str, ...] = ()
    placeholders: str = NONE
    image_key: str | None = None
    video_key: str | None = None
    grid_keys: tuple[str, str] | None = None
    image_refusal: str = ""
    anyres_images: bool = False
    image_sizes_key: str | None = None
    video_processor: str = ""
    template_tokens: tuple[tuple[str, str], ...] = ()
    processor_class: str = ""
    mrope: bool = False
    vision_markers: bool = False
    token_types: bool = False
    token_types_key: str = "mm_token_type_ids"
    seconds_per_grid: tuple[str, ...] = ()
    unused_tower_heads: bool = False
    encoders: tuple[tuple[str, str, str], ...] = ()
    frames_alone: bool = False
    media_only: tuple[tuple[str, str], ...] = ()
    recurrent: bool = False
    tiny: Mapping[str, Callable[..., Any]] = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------------------------------------
    # What the family takes.

    @property
    def multimodal(self) -> bool:
        """Whether the family takes images or videos."""
        return self.placeholders != NONE

    def media_key(self, kind: str) -> str:
        """The batch key of the pixels of ``kind``.

        Raises:
            ValueError: an unknown kind, or one the family does not take.
        """
        if kind not in MEDIA_KINDS:
            raise ValueError(f"`kind` must be one of {MEDIA_KINDS}, got {kind!r}")
        key = self.image_key if kind == "image" else self.video_key
        if key is None:
            raise ValueError(f"{self.name} takes no {kind}s")
        return key

    def takes(self, kind: str) -> bool:
        """Whether the family takes media of ``kind``."""
        return (self.image_key if kind == "image" else self.video_key) is not None

    def media_keys(self, kind: str) -> tuple[str, ...]:
        """Every batch key that belongs to the media of ``kind`` (pixels, grids, sizes, ...)."""
        return (self.media_key(kind),) if self.takes(kind) else ()

    def media_token_id(self, config: Any, kind: str) -> int | None:
        """The placeholder id of ``kind`` (one per visual token), None if the family takes no such media."""
        if not self.takes(kind):
            return None
        value = getattr(config, f"{kind}_token_id", None)
        return None if value is None else int(value)

    def media_token_ids(self, config: Any) -> tuple[int, ...]:
        """The placeholder ids of the family's media kinds (what a text-only teacher never sees)."""
        ids = (self.media_token_id(config, kind) for kind in MEDIA_KINDS)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def marker_token_ids(self, config: Any) -> tuple[int, ...]:
        """Ids of the structural tokens around media (vision start / end, ...), which text must never produce."""
        return ()

    def placeholder_mask(self, config: Any, input_ids: Tensor, kind: str) -> Tensor:
        """The positions of the placeholders of ``kind`` (bool ``[B, L]``; all False if the family takes none)."""
        token = self.media_token_id(config, kind)
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    def media_positions(self, config: Any, batch: Mapping[str, Any], kind: str) -> Tensor:
        """The placeholder positions (bool ``[B, L]``) of the batch's media of ``kind``, as the data tells them apart.

        By default :meth:`placeholder_mask` of the batch's ``input_ids`` (each kind has its own placeholder id).
        A family whose model takes a video's frames as images through one placeholder id (SmolVLM, InternVL) keeps
        its ``"image"`` kind every placeholder (the model's view, which :meth:`media_steps` and
        :meth:`media_regions` share) and gives here, for ``"video"``, the placeholders of the frames, told apart by
        the rest of the batch (:data:`~regate_lightning.keys.FRAME_INDEX`). The visual-token policy reads the
        positions of each kind through this method; the engine and the model read :meth:`placeholder_mask`.
        """
        return self.placeholder_mask(config, batch["input_ids"], kind)

    def media_per_row(self, config: Any, input_ids: Tensor, kind: str) -> Tensor:
        """Media items of ``kind`` per row (int64 ``[B]``): by default the contiguous runs of its placeholders."""
        return count_runs(self.placeholder_mask(config, input_ids, kind))

    def tail_tokens(self, config: Any, kind: str) -> int:
        """Placeholder tokens every media of ``kind`` has after its steps (:attr:`MediaSteps.tail`): 0 by default.

        LLaVA-OneVision appends one newline feature to every video.
        """
        return 0

    def media_expansion(self, text: MediaText) -> tuple[int | str, ...] | None:
        """What stands for one media in the text where it is more than one run of placeholders, else None.

        The data side (:class:`~regate_lightning.data.vision.VisionSpec`) puts the result into
        ``ProcessedMedia.expansion``: token ids (int) and text to tokenize (str), in order, exactly as the family's
        transformers processor writes the media (its ``replace_image_token`` / ``replace_video_token``), inside the
        media's own vision start / end where the family has them. Qwen3-VL writes a timestamp and its own vision
        start / end around every temporal patch of a video; InternVL wraps an image's tiles in ``<img> ... </img>``
        and writes ``Frame{i}: <img> ... </img>`` per frame; SmolVLM names each tile's row and column and each
        frame's time; VideoLLaMA3 each frame's time; Gemma 3 writes begin / end of image tokens around each crop.
        The generic rule: one run of ``steps * tokens_per_step`` placeholders, None.

        Args:
            text: what the data side knows of the media.

        Returns:
            The expansion, or None for a run of placeholders.
        """
        return None

    # ----------------------------------------------------------------------------------------------
    # How media divide into steps and regions (skipping steps in the tower; visual-token elision).

    def media_steps(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaSteps]:
        """How the batch's media of ``kind`` divide into time steps, without reading their pixel values.

        The engine reads it for the kinds of :attr:`encoders` (what the tower encodes, in the order of
        :meth:`placeholder_mask`) to skip steps.

        Returns:
            One :class:`MediaSteps` per media, in placeholder order (empty if the batch has none).
        """
        raise NotImplementedError(f"{self.name} does not declare its media steps")

    def media_regions(self, config: Any, batch: Mapping[str, Any], kind: str) -> list[MediaRegions]:
        """The pixel region behind every placeholder token of the batch's media of ``kind``, media by media.

        The media come in the order in which the model fills their features into the placeholder positions.

        Returns:
            One :class:`MediaRegions` per media of ``kind`` (empty if the batch has none).
        """
        raise NotImplementedError(f"{self.name} does not declare the pixel regions of its tokens")

    def split_media(self, config: Any, batch: Mapping[str, Any], kind: str, count: int) -> list[dict[str, Tensor]]:
        """The batch's media items of ``kind`` in placeholder order, each as its own small dict of tensors.

        The generic layout: every key of :meth:`media_keys` holds one entry per media item along dim 0. A family
        whose items are cut by the model's rules reads ``config`` (LLaVA-OneVision's concatenated anyres tiles, by
        ``image_grid_pinpoints``; InternVL's tiles, by the text's ``<img>`` spans).

        Raises:
            ValueError: a tensor whose item count differs from ``count`` (the text's).
        """
        if count == 0 or not self.takes(kind):
            return []
        items: list[dict[str, Tensor]] = [{} for _ in range(count)]
        for key in self.media_keys(kind):
            value = batch.get(key)
            if value is None:
                continue
            if value.shape[0] != count:
                raise ValueError(f"`{key}` holds {value.shape[0]} {kind}s but the text has {count}")
            for i in range(count):
                items[i][key] = value[i : i + 1]
        return items

    # ----------------------------------------------------------------------------------------------
    # The engine: what the decoder receives on a shortened sequence, what the tower returns for skipped steps.

    def position_rows(self) -> int:
        """Rows of the position ids the decoder takes: 1 (``[B, L]``) or 3 (M-RoPE ``[3, B, L]``)."""
        return 3 if self.mrope else 1

    def decoder_mask(self, mask: Any, index: Tensor, valid: Tensor, length: int) -> Any:
        """The attention mask the decoder gets on the shortened sequence.

        By default the 2-D mask of the kept positions (``valid``), from which the decoder builds its causal mask
        (the model's own ``attention_mask`` is then a 2-D padding mask, which ``valid`` already accounts for). A
        model that builds the decoder's masks itself before calling it (Gemma 3: a dict of 4-D masks per layer
        type, with image tokens attending to each other both ways) gets its own masks restricted to the kept
        queries and keys (:func:`gather_mask`).

        Args:
            mask: the ``attention_mask`` the model passes to its decoder on the full sequence.
            index: int64 ``[B, L']``, the kept positions of each row, right-padded with 0.
            valid: bool ``[B, L']``, the real entries of ``index``.
            length: ``L``, the full sequence length.

        Returns:
            The decoder's ``attention_mask``.
        """
        return valid.long()

    def shorten_decoder_inputs(
        self, kwargs: dict[str, Any], index: Tensor, valid: Tensor, length: int
    ) -> dict[str, Any]:
        """Shorten the family's own per-position decoder inputs (beyond embeddings, positions and the mask).

        The engine has already gathered ``inputs_embeds`` and ``position_ids`` and set the 2-D attention mask.
        A family whose decoder takes more per-position inputs (Qwen3-VL's DeepStack features) gathers them
        here; the engine refuses any other argument that still has the full length.

        On a packed step (``forward_active(..., packed=True)``) the same method serves one row: the engine has
        flattened every ``[B, L, ...]`` argument row by row to ``[1, B * L, ...]`` (the order in which the model
        filled per-position features), ``index`` is ``[1, T]`` into those ``B * L`` positions, ``valid`` is all
        True and ``length`` is ``B * L``; the attention mask is the engine's and must stay as it is.

        Args:
            kwargs: the decoder's keyword arguments (a copy the method may change).
            index: int64 ``[B, L']``, the kept positions of each row, right-padded with 0.
            valid: bool ``[B, L']``, the real entries of ``index``.
            length: ``L``, the full sequence length.

        Returns:
            The keyword arguments.
        """
        return kwargs

    def skip_tower_kwargs(self, batch: Mapping[str, Any], kind: str, keep: list[Tensor]) -> dict[str, Any]:
        """The tower's arguments beside the pixels when it encodes only the kept steps of ``kind``.

        Args:
            batch: the model's inputs.
            kind: ``"image"`` or ``"video"``.
            keep: per media of ``kind``, bool ``[steps]``: the steps that are encoded.

        Returns:
            Keyword arguments that replace the model's own in the tower call (none by default); tensors are moved
            to the pixels' device, other values (None) passed as they are.
        """
        return {}

    def fill_skipped(self, output: Any, keep: Tensor) -> Any:
        """Put zero rows back for the skipped steps into a feature module's output.

        Args:
            output: the module's output: a tensor ``[kept rows, ...]`` or a model output with ``pooler_output``.
            keep: bool ``[rows]``, the rows that were encoded.

        Returns:
            The output with ``rows`` rows.
        """
        if isinstance(output, Tensor):
            return scatter_rows(output, keep)
        output.pooler_output = scatter_rows(output.pooler_output, keep)
        return output

    # ----------------------------------------------------------------------------------------------
    # Parts the training never reaches.

    def unused_vision_modules(self, parts: ModelParts) -> list[nn.Module]:
        """Vision-tower modules that never reach the loss in this family (frozen by the module; DDP needs it)."""
        return []

    # ----------------------------------------------------------------------------------------------
    # Random batches (tests, the debug recipes, benchmarks).

    def init_tiny(self, model: nn.Module) -> None:
        """Set weights that a tiny random model needs beyond its class's initialisation (none by default).

        Called by :func:`regate_lightning.testing.tiny.tiny_model` right after building, under its seed. Gemma 3's
        class starts its projector at zero, which would make every image token carry nothing.
        """

    def random_media(
        self, config: Any, num_frames: int, generator: torch.Generator, grid: tuple[int, int] | None = None
    ) -> RandomMedia:
        """One sample's media in the family's layout: a video of ``num_frames`` frames, or an image.

        Args:
            config: the model's config.
            num_frames: frames of the video (video families).
            generator: the random generator of the pixels.
            grid: grid families: ``(height, width)`` of a frame in patches (default: the family's own small
                frame); families without grids do not take it.

        Raises:
            ValueError: the family takes no media, or cannot take ``num_frames`` or ``grid``.
        """
        raise ValueError(f"no random media layout for family {self.name!r}")


@dataclass(frozen=True)
class TileFamily(Family):
    """A family whose every image tile and video frame is an image to the model (SmolVLM, InternVL): one placeholder
    id, one pixel key; the data's :data:`~regate_lightning.keys.FRAME_INDEX` tells a video's frames from image tiles.

    Its ``"image"`` kind is every placeholder (the model's view: what the tower encodes and the engine's step skipping
    reads); its ``"video"`` kind, which has no token of its own, the subset that are video frames. Its checkpoints'
    chat templates write a video as ``<video>``, which the data replaces by the frames' text.
    """

    placeholders: str = TILES
    image_key: str | None = PIXEL_VALUES
    video_key: str | None = PIXEL_VALUES
    template_tokens: tuple[tuple[str, str], ...] = (("video", "<video>"),)

    def media_token_id(self, config: Any, kind: str) -> int | None:
        """The placeholder for the ``"image"`` kind (every tile and frame); None for ``"video"``."""
        return int(config.image_token_id) if kind == "image" else None

    def frame_index(self, batch: Mapping[str, Any], tiles: int) -> Tensor | None:
        """The batch's :data:`~regate_lightning.keys.FRAME_INDEX` (int64 ``[tiles]``: a frame's number in its video,
        -1 for an image's tile), None without one.

        Raises:
            ValueError: a frame index whose length is not the number of tiles.
        """
        index = batch.get(FRAME_INDEX)
        if index is None:
            return None
        if index.numel() != tiles:
            raise ValueError(f"`{FRAME_INDEX}` has {index.numel()} entries but `{PIXEL_VALUES}` has {tiles} tiles")
        return index.flatten()


def gather_mask(mask: Tensor | None, index: Tensor, valid: Tensor, length: int) -> Tensor:
    """A full-length 4-D attention mask restricted to the kept queries and keys of each row.

    Kept query ``i`` attends kept key ``j`` exactly when the full mask lets position ``index[i]`` attend
    ``index[j]`` (bidirectional blocks, sliding windows over the original positions and padding all carry over);
    padded slots attend to nothing but themselves.

    Args:
        mask: bool or additive float ``[B or 1, H or 1, L, L]``; None for a plain causal mask.
        index: int64 ``[B, L']``.
        valid: bool ``[B, L']``.
        length: ``L``.

    Returns:
        The mask ``[B, H or 1, L', L']`` of ``mask``'s dtype.

    Raises:
        ValueError: a mask that is not ``[., ., L, L]``.

    Example:
        >>> full = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
        >>> full[..., 1, 2] = True  # position 1 sees position 2 (a bidirectional block)
        >>> gather_mask(full, torch.tensor([[1, 2]]), torch.tensor([[True, True]]), 3)[0, 0].int().tolist()
        [[1, 1], [1, 1]]
    """
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=index.device).tril()[None, None]
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (length, length):
        raise ValueError(f"a decoder mask of shape {tuple(mask.shape)} is not [B, H, {length}, {length}]")
    batch, short = index.shape
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    index = index.to(mask.device)
    valid = valid.to(mask.device)
    rows = mask.gather(2, index[:, None, :, None].expand(batch, heads, short, length))
    out = rows.gather(3, index[:, None, None, :].expand(batch, heads, short, short))
    keys = valid[:, None, None, :]
    alone = torch.eye(short, dtype=torch.bool, device=mask.device)[None, None] & ~valid[:, None, :, None]
    if out.dtype == torch.bool:
        return (out & keys) | alone
    return out.masked_fill(~keys, torch.finfo(out.dtype).min).masked_fill(alone, 0.0)


def scatter_rows(features: Tensor, keep: Tensor) -> Tensor:
    """``features`` (``[kept, ...]``) placed at the True rows of ``keep`` (``[rows]``), zeros elsewhere.

    Raises:
        RuntimeError: the number of feature rows is not the number of kept rows.

    Example:
        >>> scatter_rows(torch.ones(2, 1), torch.tensor([True, False, True])).flatten().tolist()
        [1.0, 0.0, 1.0]
    """
    keep = keep.to(features.device)
    if features.shape[0] != int(keep.sum()):
        raise RuntimeError(f"the encoder returned {features.shape[0]} rows, expected {int(keep.sum())}")
    return features.new_zeros(keep.numel(), *features.shape[1:]).index_copy(0, keep.nonzero().flatten(), features)


@dataclass(frozen=True)
class ModelParts:
    """The pieces of one HF model that this package drives.

    Attributes:
        family: the model's :class:`Family` (``TEXT_ONLY`` for a causal LM).
        model: the unwrapped HF model (``*ForConditionalGeneration`` / ``*ForCausalLM``).
        inner: the model without its head (``model.model``); returns ``last_hidden_state``.
        decoder: the text decoder that takes ``inputs_embeds`` (for a causal LM, ``inner`` itself).
        lm_head: the output projection to the vocabulary.
        media_token_ids: ids of image/video placeholder tokens (empty for a causal LM).
    """

    family: Family
    model: nn.Module
    inner: nn.Module
    decoder: nn.Module
    lm_head: nn.Module
    media_token_ids: tuple[int, ...]

    @property
    def mrope(self) -> bool:
        """Whether position ids are Qwen's multi-row M-RoPE ids."""
        return self.family.mrope
