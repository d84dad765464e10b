"""Visual-token elision: which image and video tokens a sparse step drops, without Lightning.

ReGATE elides answer tokens; in video instruction tuning the visual tokens are most of the sequence.
:class:`VisualElisionPolicy` removes visual positions from the decoder's sequence in the sparse steps
of the same kind of schedule (:class:`~regate_lightning.schedule.Schedule`). Per step it answers one
call::

    plan = policy.plan(batch, step)          # visual candidates, keep mask
    plan.apply(batch)                        # batch["keep_mask"] = plan.keep_mask (when there is one)

:class:`~regate_lightning.VisualTokenElision` calls exactly this from Lightning's
``on_train_batch_start``. The engine (:func:`~regate_lightning.elision.forward_active`) then runs the
decoder on the kept positions with their original (M-RoPE) position ids. The vision tower still encodes
every frame: the features of the elided positions are computed and dropped before the decoder.

**Candidates.** The placeholder tokens of every video of the batch (and of every image with
``images=True``) that are attended and that a keep mask already in the batch keeps. Per sample, a
sparse step keeps ``k = max(min_keep, ceil(keep_ratio * n))`` of its ``n`` candidates (never more than
``n``; :func:`~regate_lightning.scoring.num_kept`), and never touches a text position.

**Selections** (:class:`VisualSelection`; by name in YAML):

============  =========================  ======================================================
name          class                      keeps per sample
============  =========================  ======================================================
``temporal``  :class:`TemporalSelection`  the ``k`` tokens whose pixels changed most since the same
                                          region of the previous frame (:func:`temporal_change`)
``temporal_   :class:`TemporalSelection`  whole frames, the most changed first (``whole_frames=True``);
frames``                                  the vision tower skips the elided frames
``uniform``   :class:`UniformSelection`   whole frames, evenly spread over time (every other frame at
                                          0.5, every fourth at 0.25, ...)
``random``    :class:`RandomSelection`    ``k`` tokens uniformly at random (a control)
============  =========================  ======================================================

**Several policies on one batch.** Like :class:`~regate_lightning.ReGATEPolicy`, the plan starts from
any ``keep_mask`` already in the batch and only removes positions from it; in a full step it leaves
that mask as it is, and without one it writes none.

Pure torch: nothing here imports Lightning or transformers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import torch
from torch import Tensor, nn

from regate_lightning._imports import import_object, is_dotted_path
from regate_lightning.elision import check_keep_mask
from regate_lightning.families import Family, MediaRegions, resolve
from regate_lightning.families.base import runs
from regate_lightning.keys import ATTENTION_MASK, INPUT_IDS, KEEP_MASK
from regate_lightning.schedule import Schedule, is_full_step
from regate_lightning.scoring import check_int, check_keep_ratio, random_keep, select_keep

__all__ = [
    "VISUAL_SELECTIONS",
    "RandomSelection",
    "ScoredSelection",
    "TemporalSelection",
    "UniformSelection",
    "VisualElisionPolicy",
    "VisualPlan",
    "VisualSelection",
    "VisualTokens",
    "as_visual_selection",
    "even_spread_ranks",
    "temporal_change",
]

SCALE_EPS = 1e-6
"""Floor of a media's pixel standard deviation in :func:`temporal_change` (a constant video changes by 0)."""


# --------------------------------------------------------------------------------------------------
# The visual tokens of one batch.


@dataclass(frozen=True)
class MediaTokens:
    """The placeholder positions of one kind of media in a batch, and the media behind them.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        positions: bool ``[B, L]``, the attended placeholder positions of this kind.
        media: one :class:`~regate_lightning.families.MediaRegions` per media, in placeholder order.
    """

    kind: str
    positions: Tensor
    media: tuple[MediaRegions, ...]

    def scatter(self, flat: Tensor, fill: float = float("nan")) -> Tensor:
        """Place per-token values (media by media, in token order) at :attr:`positions`.

        Args:
            flat: ``[sum of num_tokens]`` values.
            fill: value elsewhere.

        Returns:
            float32 ``[B, L]``.
        """
        out = torch.full(self.positions.shape, fill, dtype=torch.float32, device=self.positions.device)
        out[self.positions] = flat.to(device=out.device, dtype=torch.float32)
        return out


class VisualTokens:
    """What a :class:`VisualSelection` sees of one batch: the candidates, and the pixels behind them.

    The media's pixel regions are built on first use (a selection that does not read pixels never
    builds them), from the family's token -> region rule
    (:meth:`~regate_lightning.families.Family.media_regions`).

    Args:
        family: the student's family.
        config: the student's HF config.
        batch: the model's inputs.
        kinds: the media kinds that are candidates.
        candidates: bool ``[B, L]``, the visual positions a sparse step may elide.
    """

    def __init__(
        self, family: Family, config: Any, batch: Mapping[str, Any], kinds: tuple[str, ...], candidates: Tensor
    ) -> None:
        self.family = family
        self.config = config
        self.batch = batch
        self.kinds = kinds
        self.candidates = candidates

    @cached_property
    def media(self) -> tuple[MediaTokens, ...]:
        """Per candidate kind, its positions and regions; the token counts are checked against the placeholders.

        Raises:
            ValueError: the media's token count differs from the batch's placeholder count of that kind.
        """
        out = []
        for kind in self.kinds:
            positions = placeholder_positions(self.family, self.config, self.batch, kind)
            media = tuple(self.family.media_regions(self.config, self.batch, kind))
            if self.family.frames_alone:
                media = _per_item(media, positions)
            tokens = sum(m.num_tokens for m in media)
            placeholders = int(positions.sum())
            if tokens != placeholders:
                raise ValueError(
                    f"{self.family.name}: the batch's {kind} pixels make {tokens} tokens but its input_ids hold "
                    f"{placeholders} attended {kind} placeholders; the data must put one placeholder per visual "
                    "token (regate_lightning.data does) and must not cut media off"
                )
            out.append(MediaTokens(kind, positions, media))
        return tuple(out)


def _per_item(media: tuple[MediaRegions, ...], positions: Tensor) -> tuple[MediaRegions, ...]:
    """Split clips that the data joined frame-wise (one ``[1, sum T, ...]`` tensor) back into one per sample.

    Families that encode every frame alone take clips of different lengths as one tensor
    (:func:`~regate_lightning.data.vision.join_media`); their regions then come as one media of ``sum T``
    frames. Each sample's clip is cut back out by its run of placeholders, so that the first frame of every
    clip is a first frame (never compared with another clip's last).
    """
    if len(media) != 1:
        return media
    lengths = [length for _, _, length in runs(positions)]  # one run per media item, in batch order
    (joined,) = media
    per_step = joined.tokens_per_step
    if joined.tail or len(lengths) < 2 or sum(lengths) != joined.num_tokens or any(n % per_step for n in lengths):
        return media
    parts = joined.regions.split([n // per_step for n in lengths])
    return tuple(MediaRegions(joined.kind, part, joined.lead) for part in parts)


def placeholder_positions(family: Family, config: Any, batch: Mapping[str, Any], kind: str) -> Tensor:
    """The attended placeholder positions of ``kind`` (bool ``[B, L]``; all False if the family takes none)."""
    positions = family.media_positions(config, batch, kind)
    attention = batch.get(ATTENTION_MASK)
    return positions if attention is None else positions & attention.bool()


# --------------------------------------------------------------------------------------------------
# Scores.


def temporal_change(media: MediaRegions) -> Tensor:
    """The temporal redundancy score of every token of one media: how much its pixels changed.

    For a spatial token at time step ``t >= 1`` (a frame; a temporal patch of Qwen2-VL)::

        change[t, n] = mean_d |x[t, n, d] - x[t - 1, n, d]| / max(std(x), 1e-6)

    the mean absolute difference between the token's pixel region and the same region one step earlier,
    in units of the media's pixel standard deviation (over all its values), so that it does not depend on
    the processor's normalisation or the video's contrast. A token of the first step has ``+inf``: the
    first frame is never penalised. A whole-frame token (CLS) gets the mean of its step's spatial tokens
    (the whole frame's mean absolute difference), ``+inf`` in the first step. A tail token (no pixels of
    its own: LLaVA-OneVision's video newline) gets ``+inf`` too: one token that marks the media's end. Low =
    redundant (it repeats the previous frame), elided first; in the pixel space, like Run-Length
    Tokenization.

    Args:
        media: the media's regions, float ``[T, N, D]``.

    Returns:
        float32 ``[num_tokens]`` (``T * (N + lead) + tail`` without holes), in the media's token order.

    Example:
        >>> from regate_lightning.families import MediaRegions
        >>> x = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [3.0, 3.0]]])  # T=2, N=2, D=2
        >>> (temporal_change(MediaRegions("video", x)) * x.std()).round().tolist()  # in pixel units
        [inf, inf, 0.0, 2.0]
    """
    return media.flat(temporal_change_grid(media))


def temporal_change_grid(media: MediaRegions) -> Tensor:
    """:func:`temporal_change` of every token of the media's grid, present or not (float32 ``[T, N + lead]``)."""
    x = media.regions.float()
    scale = x.std().clamp(min=SCALE_EPS) if x.numel() > 1 else x.new_tensor(1.0)
    change = torch.full(x.shape[:2], float("inf"), dtype=torch.float32, device=x.device)
    if x.shape[0] > 1:
        change[1:] = (x[1:] - x[:-1]).abs().mean(dim=2) / scale
    if media.lead:
        change = torch.cat([change.mean(dim=1, keepdim=True), change], dim=1)
    return change


def even_spread_ranks(steps: int) -> Tensor:
    """The rank of each of ``steps`` time steps in an order that spreads every prefix evenly over time.

    The order is the bit-reversal (van der Corput) order of the next power of two, restricted to
    ``0 .. steps - 1``: for 8 steps ``0, 4, 2, 6, 1, 5, 3, 7``, so the first 4 are every other step and
    the first 2 every fourth.

    Args:
        steps: the number of time steps, ``>= 1``.

    Returns:
        int64 ``[steps]``: ``ranks[t]`` is the place of step ``t`` in the order (0 = first).

    Example:
        >>> even_spread_ranks(8).tolist()
        [0, 4, 2, 6, 1, 5, 3, 7]
        >>> even_spread_ranks(3).tolist()
        [0, 2, 1]
    """
    check_int("steps", steps, minimum=1)
    bits = max(1, (steps - 1).bit_length())
    order = [r for r in (int(f"{i:0{bits}b}"[::-1], 2) for i in range(1 << bits)) if r < steps]
    ranks = torch.empty(steps, dtype=torch.int64)
    ranks[torch.tensor(order)] = torch.arange(steps)
    return ranks


# --------------------------------------------------------------------------------------------------
# Selections.


class VisualSelection(ABC):
    """Which visual candidates of each sample a sparse step keeps.

    Subclass it and implement :meth:`select`, or subclass :class:`ScoredSelection` and score each media's
    tokens. The policy calls it once per sparse step with the whole batch.

    Attributes:
        needs_time: the selection reads the order of frames, so images (one time step) cannot be its
            candidates; the policy refuses ``images=True`` with it.
    """

    needs_time: bool = False

    @abstractmethod
    def select(self, tokens: VisualTokens, keep_ratio: float, min_keep: int, generator: torch.Generator) -> Tensor:
        """The keep mask of one batch.

        Args:
            tokens: the batch's visual candidates (``tokens.candidates``, bool ``[B, L]``) and media.
            keep_ratio: the policy's ``keep_ratio`` in ``(0, 1)``.
            min_keep: keep at least this many candidates of a sample (never more than it has).
            generator: a random generator on the batch's device, seeded per step.

        Returns:
            bool ``[B, L]``: ``False`` at the elided candidates, ``True`` everywhere else; per sample
            ``max(min_keep, ceil(keep_ratio * n))`` candidates kept (a selection must not elide anything
            that is not a candidate).
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ScoredSelection(VisualSelection):
    """A selection that scores every token of a media (higher = kept first) and keeps each sample's top ``k``.

    Ties go to the earlier position (:func:`~regate_lightning.scoring.select_keep`), across the sample's
    media too.
    """

    @abstractmethod
    def score(self, media: MediaRegions) -> Tensor:
        """float ``[media.num_tokens]``, in the media's token order; higher is kept first."""

    def select(self, tokens: VisualTokens, keep_ratio: float, min_keep: int, generator: torch.Generator) -> Tensor:
        """See :meth:`VisualSelection.select`."""
        scores = torch.full(tokens.candidates.shape, float("nan"), device=tokens.candidates.device)
        for kind in tokens.media:
            if kind.media:
                flat = torch.cat([self.score(m).to(scores.device, torch.float32) for m in kind.media])
                scores = torch.where(kind.positions, kind.scatter(flat), scores)
        return select_keep(scores, tokens.candidates, keep_ratio, min_keep)


class TemporalSelection(ScoredSelection):
    """Keep the tokens whose pixels changed most since the previous frame; the first frame before all.

    The score is :func:`temporal_change`. Within a sample, ties (a static region, the first frame) go to
    the earlier position.

    Args:
        whole_frames: score every token of a time step with the step's mean change, so that whole steps
            (frames, Qwen2-VL's temporal patches) are kept or elided together, the most changed first
            (the last kept step may be kept in part). The vision tower then skips the elided steps
            (:mod:`regate_lightning.elision`): fewer tokens *and* less vision work. By name:
            ``"temporal_frames"``.
    """

    needs_time = True

    def __init__(self, whole_frames: bool = False) -> None:
        if not isinstance(whole_frames, bool):
            raise TypeError(f"`whole_frames` must be a bool, got {type(whole_frames).__name__}")
        self.whole_frames = whole_frames

    def score(self, media: MediaRegions) -> Tensor:
        """See :func:`temporal_change`; with ``whole_frames`` the step's mean for each of its tokens."""
        if not self.whole_frames:
            return temporal_change(media)
        per_step = temporal_change_grid(media)
        return media.flat(per_step.mean(dim=1, keepdim=True).expand_as(per_step))


class UniformSelection(ScoredSelection):
    """Keep whole frames, evenly spread over time (:func:`even_spread_ranks`); a control without pixels.

    At ``keep_ratio = 1 / k`` with a frame count divisible by ``k`` (and a power-of-two ratio) it keeps
    every ``k``-th frame, starting with the first; otherwise the last kept frame may be kept in part
    (its earlier tokens), since the keep count is the policy's. A tail token (LLaVA-OneVision's video
    newline) is kept first (:meth:`~regate_lightning.families.MediaRegions.flat`).
    """

    needs_time = True

    def score(self, media: MediaRegions) -> Tensor:
        """Minus the frame's rank in the even-spread order, for every token of the frame."""
        ranks = even_spread_ranks(media.steps).to(media.regions.device)
        return media.flat((-ranks.float())[:, None].expand(media.steps, media.tokens_per_step))


class RandomSelection(VisualSelection):
    """A control: the same keep count per sample, uniformly at random (the policy's generator)."""

    def select(self, tokens: VisualTokens, keep_ratio: float, min_keep: int, generator: torch.Generator) -> Tensor:
        """See :meth:`VisualSelection.select`; no pixel is read."""
        return random_keep(tokens.candidates, keep_ratio, min_keep, generator)


VISUAL_SELECTIONS: dict[str, Callable[[], VisualSelection]] = {
    "temporal": TemporalSelection,
    "temporal_frames": partial(TemporalSelection, whole_frames=True),
    "uniform": UniformSelection,
    "random": RandomSelection,
}
"""The built-in visual selections by name."""


def as_visual_selection(selection: str | VisualSelection) -> VisualSelection:
    """A :class:`VisualSelection` from a name of :data:`VISUAL_SELECTIONS`, a dotted path or an instance.

    Raises:
        ValueError: an unknown name, or a dotted path that does not import.
        TypeError: anything else.

    Example:
        >>> as_visual_selection("temporal_frames")
        TemporalSelection(whole_frames=True)
    """
    if isinstance(selection, VisualSelection):
        return selection
    if isinstance(selection, type) and issubclass(selection, VisualSelection):
        return selection()
    if isinstance(selection, str):
        if selection in VISUAL_SELECTIONS:
            return VISUAL_SELECTIONS[selection]()
        if is_dotted_path(selection):
            return as_visual_selection(import_object(selection, "selection"))
        raise ValueError(
            f"`selection` must be one of {tuple(VISUAL_SELECTIONS)}, a VisualSelection or a dotted path to one, "
            f"got {selection!r}"
        )
    raise TypeError(f"`selection` must be a name or a VisualSelection, got {type(selection).__name__}")


# --------------------------------------------------------------------------------------------------
# The policy.


@dataclass(frozen=True)
class VisualPlan:
    """What the visual policy decided for one training batch.

    Attributes:
        step: the optimizer step.
        sparse: whether the schedule made this step sparse.
        candidates: bool ``[B, L]``, the visual positions in scope (attended placeholders of the candidate
            kinds), whether or not a prior keep mask elides them.
        keep_mask: bool ``[B, L]`` for the batch: the prior mask with this step's elisions removed; the prior
            mask itself in a full step; None when the batch had none and the step is full.
        visual: int64 scalar tensor on the batch's device, visual candidates of the batch (read after the step).
        kept: int64 scalar tensor, those kept (a position a prior mask elided counts as not kept).
    """

    step: int
    sparse: bool
    candidates: Tensor
    keep_mask: Tensor | None
    visual: Tensor
    kept: Tensor

    def apply(self, batch: MutableMapping[str, Any]) -> None:
        """Write :attr:`keep_mask` into ``batch`` (nothing when there is none)."""
        if self.keep_mask is not None:
            batch[KEEP_MASK] = self.keep_mask


class VisualElisionPolicy:
    """Elide visual tokens in sparse steps: schedule, candidates, selection; no Lightning.

    Build it with its arguments (each checked here, naming the argument), then :meth:`setup` with the
    student before the first :meth:`plan`.

    Args:
        keep_ratio: fraction of each sample's visual candidates kept in a sparse step, in (0, 1]; ``1.0``
            turns elision off.
        selection: ``"temporal"``, ``"temporal_frames"``, ``"uniform"``, ``"random"``, a
            :class:`VisualSelection` or a dotted path to one.
        warmup_steps: first optimizer steps that keep every token.
        cycle_steps: cycle length in optimizer steps after the warm-up.
        full_steps: full steps at the start of every cycle (``0 <= full_steps <= cycle_steps``).
        min_keep: at least this many visual candidates of a sample are kept.
        images: image tokens are candidates too (only with a selection that does not need frames: an image
            has no previous frame; ``"random"`` drops image patches as FLIP does).
        seed: seed of the random selection; the generator of a step is seeded from ``(seed, rank, step,
            index)``, so a resumed run draws what an uninterrupted one would, with no state to save.

    Example:
        >>> from regate_lightning.testing import random_batch, tiny_llava_next_video
        >>> model = tiny_llava_next_video()
        >>> policy = VisualElisionPolicy(keep_ratio=0.5, warmup_steps=0, full_steps=0)
        >>> policy.setup(model)
        >>> plan = policy.plan(random_batch(model, batch_size=2, num_frames=4), step=0)
        >>> int(plan.visual), int(plan.kept)  # 4 frames x 4 tokens per sample
        (32, 16)
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        selection: str | VisualSelection = "temporal",
        warmup_steps: int = 100,
        cycle_steps: int = 128,
        full_steps: int = 16,
        min_keep: int = 1,
        images: bool = False,
        seed: int = 0,
    ) -> None:
        check_keep_ratio(keep_ratio)
        check_int("min_keep", min_keep, minimum=0)
        check_int("seed", seed, minimum=0)
        if not isinstance(images, bool):
            raise TypeError(f"`images` must be a bool, got {type(images).__name__} {images!r}")
        self.selection = as_visual_selection(selection)
        if images and self.selection.needs_time:
            raise ValueError(
                f"`images=True` needs a selection that works without frames (an image has no previous frame), "
                f"got {self.selection!r}; use selection='random' to elide image patches, or images=False"
            )
        self.schedule = Schedule(warmup_steps=warmup_steps, cycle_steps=cycle_steps, full_steps=full_steps)
        self.keep_ratio = float(keep_ratio)
        self.min_keep = min_keep
        self.images = images
        self.seed = seed
        self.kinds: tuple[str, ...] = ("image", "video") if images else ("video",)
        self.family: Family | None = None
        self.config: Any = None

    def setup(self, model: nn.Module) -> None:
        """Read the student's family and config (its token -> pixel-region layout).

        Raises:
            ValueError: a text-only student, or one that takes none of the candidate kinds of media.
            TypeError: an unsupported model class.
        """
        parts = resolve(model)
        family = parts.family
        if not family.multimodal:
            raise ValueError(f"visual-token elision needs a multimodal student, got a {type(parts.model).__name__}")
        wanted = ("image", "video") if self.images else ("video",)
        takes = [k for k in wanted if family.takes(k)]
        if not takes:
            raise ValueError(
                f"{family.name} takes no videos, so visual-token elision with images=False has nothing to elide; "
                "use images=True with selection='random' to elide image patches"
            )
        self.kinds = tuple(takes)
        self.family = family
        self.config = parts.model.config

    def arguments(self) -> dict[str, Any]:
        """The arguments a checkpoint records (a resumed run with others is warned, not refused)."""
        return {"keep_ratio": self.keep_ratio, "selection": repr(self.selection), "images": self.images}

    def candidates(self, batch: Mapping[str, Any]) -> Tensor:
        """The visual positions in scope (bool ``[B, L]``): attended placeholders of the candidate kinds."""
        family, config = self._ready()
        out = torch.zeros_like(batch[INPUT_IDS], dtype=torch.bool)
        for kind in self.kinds:
            out |= placeholder_positions(family, config, batch, kind)
        return out

    def plan(self, batch: Mapping[str, Any], step: int, rank: int = 0, index: int = 0) -> VisualPlan:
        """Decide the batch's keep mask (the batch is not modified: :meth:`VisualPlan.apply` writes it).

        Args:
            batch: the model's inputs (``input_ids``, ``attention_mask``, pixel tensors, grids) and
                optionally a prior ``keep_mask``.
            step: the optimizer step (decides full or sparse).
            rank: this process's rank (seeds the random selection).
            index: the batch's index in the epoch (seeds the random selection, so micro-batches of one
                optimizer step draw differently).

        Returns:
            The plan.

        Raises:
            ValueError: pixels and placeholders that do not match; a selection that keeps the wrong
                positions.
        """
        family, config = self._ready()
        check_int("step", step, minimum=0)
        in_scope = self.candidates(batch)
        prior = batch.get(KEEP_MASK)
        available = in_scope
        if prior is not None:
            check_keep_mask(prior, batch[INPUT_IDS])
            prior = prior.to(in_scope.device)
            available = in_scope & prior
        sparse = self.keep_ratio < 1.0 and not is_full_step(step, self.schedule)
        keep_mask = prior
        if sparse:
            tokens = VisualTokens(family, config, batch, self.kinds, available)
            keep = self._select(tokens, self._generator(available.device, rank, step, index))
            keep_mask = keep if prior is None else keep & prior
        kept = (available if keep_mask is None else available & keep_mask).sum()
        return VisualPlan(step, sparse, in_scope, keep_mask, in_scope.sum(), kept)

    # ---------------------------------------------------------------------------------------------
    # Pieces.

    def _ready(self) -> tuple[Family, Any]:
        if self.family is None:
            raise RuntimeError("call VisualElisionPolicy.setup(model) before planning")
        return self.family, self.config

    def _generator(self, device: torch.device, rank: int, step: int, index: int) -> torch.Generator:
        seed = hash((self.seed, rank, step, index)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash the same in every process
        return torch.Generator(device=device).manual_seed(seed)

    def _select(self, tokens: VisualTokens, generator: torch.Generator) -> Tensor:
        keep = self.selection.select(tokens, self.keep_ratio, self.min_keep, generator)
        available = tokens.candidates
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != available.shape:
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
            raise TypeError(f"`selection` {self.selection!r} must return a bool [B, L] tensor, got {got}")
        if not bool((keep | available).all()):
            raise ValueError(f"`selection` {self.selection!r} elided a position that is not a visual candidate")
        return keep
