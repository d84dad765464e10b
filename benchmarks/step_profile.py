"""Where a training step's time goes, and a cost model that says what elision can and cannot save.

:class:`StepProfiler` times one real training step (``forward_active`` + backward + AdamW, with the
policies around it) in segments, with module hooks on the student's parts and gradient hooks on the
tensors between them. On CUDA every mark synchronises the device first, so each segment holds the GPU
work of that segment (a profiled step is therefore a little slower than an unprofiled one; the benchmark
times its ratios on unprofiled steps). The segments, in the order a step runs them:

==============  ===================================================================================
``plan``        the policies' ``plan`` (visual-token elision, ReGATE): what the callbacks' first hooks do
``vision_fwd``  the vision tower and projector(s), forward (the family's ``towers`` and ``projectors``)
``other_fwd``   the rest of the model before the text decoder: embeddings, merging the media features,
                position ids (Qwen2-VL's M-RoPE index), the engine's own preparation
``gather_fwd``  from the text decoder's call to its first layer: the engine's gather of the kept
                positions, the decoder's attention mask and rotary embeddings
``decoder_fwd`` the decoder's layers and final norm
``head_fwd``    the LM head at the kept supervised positions, the loss and the per-token losses
``head_bwd``    backward from the loss to the decoder's output
``decoder_bwd`` backward through the decoder's layers (to the first layer's input)
``other_bwd``   backward from the decoder's input to the media features (the gather's and the merge's)
``vision_bwd``  backward through the projector(s) and the tower, and the embedding table's gradient
``optimizer``   ``AdamW.step`` and ``zero_grad``
``observe``     ReGATE's ``observe`` (the EMA store update): what the callback's last hook does
==============  ===================================================================================

:func:`cost_model` reads the baseline's profile: elision does not touch the vision tower, the rest of
the model around the decoder and the optimizer (**fixed**), it adds the policies' time (**policy**,
measured), and it shrinks the decoder (**decoder**, scaled by its FLOPs at the decoded length: a linear
part per token and a causal-attention part per token pair) and the LM head (**head**, scaled by the
supervised targets computed). The predicted step-time ratio of a variant is then compared with the
measured one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from regate_lightning.families import find_module, resolve

SEGMENTS = (
    "plan",
    "vision_fwd",
    "other_fwd",
    "gather_fwd",
    "decoder_fwd",
    "head_fwd",
    "head_bwd",
    "decoder_bwd",
    "other_bwd",
    "vision_bwd",
    "optimizer",
    "observe",
)
"""The segments of a profiled step, in the order a step runs them."""
FIXED = ("vision_fwd", "other_fwd", "other_bwd", "vision_bwd", "optimizer")
"""Segments elision does not shrink."""
POLICY = ("plan", "observe")
DECODER = ("gather_fwd", "decoder_fwd", "decoder_bwd")
HEAD = ("head_fwd", "head_bwd")
GROUPS = {"fixed": FIXED, "policy": POLICY, "decoder": DECODER, "head": HEAD}
"""The cost model's four terms and the segments each sums ("fixed" shrinks only with skipped media steps)."""


def _first_tensor(output: Any) -> list[torch.Tensor]:
    """The tensors of a module's output that carry the features onward (a ModelOutput's pooled output first)."""
    if isinstance(output, torch.Tensor):
        return [output]
    for key in ("pooler_output", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
            return list(value)
    if isinstance(output, list | tuple):
        return [t for t in output if isinstance(t, torch.Tensor)][:1]
    return []


class StepProfiler:
    """Segment times of training steps of one model (see the module docstring).

    Use :meth:`step` around one step; call :meth:`mark` at the step's own boundaries (``start``,
    ``planned``, ``forward_end``, ``backward_start``, ``backward_end``, ``optimized``, ``end``); the hooks
    mark the rest.

    Args:
        model: the student HF model.
        device: its device (CUDA marks synchronise it).
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        parts = resolve(model)
        family = parts.family
        towers = [p for p in family.towers if find_module(parts.inner, p) is not None]
        inside = tuple(t + "." for t in towers)
        paths = towers + [p for p in family.projectors if not p.startswith(inside)]
        self.vision = [m for m in (find_module(parts.inner, p) for p in paths) if m is not None]
        self.decoder = parts.decoder
        self.first_layer = parts.decoder.layers[0]
        self.device = device
        self.times: dict[str, float] = {}
        self._vision_fwd = 0.0
        self._vision_depth = 0
        self._vision_start = 0.0

    def now(self) -> float:
        """A timestamp after the device's queued work has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        """Record the time of a boundary (the first time it is reached in the step)."""
        self.times.setdefault(name, self.now())

    @contextmanager
    def step(self) -> Iterator[StepProfiler]:
        """Install the hooks for one step; :meth:`segments` reads the result afterwards."""
        self.times = {}
        self._vision_fwd = 0.0
        handles = []
        for module in self.vision:
            handles.append(module.register_forward_pre_hook(self._vision_pre))
            handles.append(module.register_forward_hook(self._vision_post))
        handles.append(self.decoder.register_forward_pre_hook(self._decoder_pre, prepend=True))
        handles.append(self.decoder.register_forward_hook(self._decoder_post))
        handles.append(self.first_layer.register_forward_pre_hook(self._layers_pre, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _grad_mark(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.mark(name)

        return hook

    def _vision_pre(self, module: nn.Module, args: Any) -> None:
        if self._vision_depth == 0:
            self._vision_start = self.now()
        self._vision_depth += 1

    def _vision_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._vision_depth -= 1
        if self._vision_depth == 0:
            self._vision_fwd += self.now() - self._vision_start
        for tensor in _first_tensor(output):
            if tensor.requires_grad:
                tensor.register_hook(self._grad_mark("vision_bwd_start"))

    def _decoder_pre(self, module: nn.Module, args: Any) -> None:
        self.mark("decoder_start")

    def _layers_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.mark("layers_start")
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._grad_mark("decoder_bwd_end"))

    def _decoder_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.mark("decoder_end")
        hidden = output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(self._grad_mark("decoder_bwd_start"))

    def segments(self) -> dict[str, float]:
        """Seconds per segment of the last step (keys :data:`SEGMENTS`), and ``total``.

        Raises:
            RuntimeError: a boundary was never reached (a model whose parts this profiler cannot see).
        """
        t = self.times
        need = (
            "start",
            "planned",
            "decoder_start",
            "layers_start",
            "decoder_end",
            "forward_end",
            "backward_start",
            "decoder_bwd_start",
            "decoder_bwd_end",
            "backward_end",
            "optimized",
            "end",
        )
        missing = [n for n in need if n not in t]
        if missing:
            raise RuntimeError(f"the profiled step never reached {missing}")
        vision_bwd_start = t.get("vision_bwd_start", t["backward_end"])
        out = {
            "plan": t["planned"] - t["start"],
            "vision_fwd": self._vision_fwd,
            "other_fwd": t["decoder_start"] - t["planned"] - self._vision_fwd,
            "gather_fwd": t["layers_start"] - t["decoder_start"],
            "decoder_fwd": t["decoder_end"] - t["layers_start"],
            "head_fwd": t["forward_end"] - t["decoder_end"],
            "head_bwd": t["decoder_bwd_start"] - t["backward_start"],
            "decoder_bwd": t["decoder_bwd_end"] - t["decoder_bwd_start"],
            "other_bwd": vision_bwd_start - t["decoder_bwd_end"],
            "vision_bwd": t["backward_end"] - vision_bwd_start,
            "optimizer": t["optimized"] - t["backward_end"],
            "observe": t["end"] - t["optimized"],
        }
        out["total"] = t["end"] - t["start"]
        return out


def median_segments(profiles: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-segment medians of several profiled steps (``total`` is the median of the totals)."""
    from benchmarks.common import median

    return {key: median([p[key] for p in profiles]) for key in profiles[0]}


def grouped(segments: dict[str, float]) -> dict[str, float]:
    """The cost model's four terms (:data:`GROUPS`) of a profile, in seconds.

    Example:
        >>> grouped({name: 1.0 for name in SEGMENTS})
        {'fixed': 5.0, 'policy': 2.0, 'decoder': 3.0, 'head': 2.0}
    """
    return {name: sum(segments[s] for s in members) for name, members in GROUPS.items()}


def decoder_flops(model: nn.Module, batch_size: int, length: int) -> float:
    """Forward FLOPs of the text decoder on ``batch_size`` rows of ``length`` positions.

    Per layer and row: ``2 * P_layer * L`` for the matrix products (``P_layer`` the layer's parameters)
    and ``2 * hidden * L**2`` for causal attention (``Q K^T`` and ``A V`` over the lower triangle). The
    backward pass costs about twice the forward in both parts, so ratios of this function are ratios of
    the whole decoder's time when the step is compute-bound. A hybrid decoder's linear-attention layers
    (``layer_types`` ``"linear_attention"``, Qwen3.5's gated delta-net) have no quadratic part.

    Example:
        >>> from regate_lightning.testing import tiny_llama
        >>> m = tiny_llama()
        >>> round(decoder_flops(m, 1, 20) / decoder_flops(m, 1, 10), 3)
        2.022
    """
    parts = resolve(model)
    layers = parts.decoder.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    hidden = int(parts.decoder.config.hidden_size)
    kinds = getattr(parts.decoder.config, "layer_types", None)
    if kinds is not None and "linear_attention" in kinds:  # hybrid: every layer's own parameters, attention where it is
        params = sum(p.numel() for p in layers.parameters())
        attention = sum(kind != "linear_attention" for kind in kinds[: len(layers)])
        return float(batch_size * (2 * params * length + attention * 2 * hidden * length * length))
    return float(batch_size * len(layers) * (2 * per_layer * length + 2 * hidden * length * length))


def cost_model(
    model: nn.Module, base: dict[str, Any], variant: dict[str, Any], batch_size: int, media_steps: int = 0
) -> dict[str, float]:
    """The step time the baseline's profile predicts for a variant, and its ratio to the baseline.

    The vision tower is a fixed cost except for the media steps the engine skips (every token elided):
    its forward and backward are scaled by the share of steps encoded.

    Args:
        model: the student (for :func:`decoder_flops`).
        base: the baseline's ``profile`` (median segments), ``decoder_length`` and ``targets``.
        variant: the same for the variant, and its ``skipped_steps``.
        batch_size: rows of the batch.
        media_steps: time steps of all the batch's media (0: no step is ever skipped).

    Returns:
        ``fixed``, ``policy``, ``decoder``, ``head`` (predicted seconds), ``predicted_s`` and
        ``predicted_ratio`` (against the baseline's profiled total of the same four terms).
    """
    b = grouped(base["profile"])
    v = grouped(variant["profile"])
    scale = decoder_flops(model, batch_size, int(variant["decoder_length"])) / decoder_flops(
        model, batch_size, int(base["decoder_length"])
    )
    vision = base["profile"]["vision_fwd"] + base["profile"]["vision_bwd"]
    encoded = 1.0 - float(variant.get("skipped_steps", 0)) / media_steps if media_steps else 1.0
    terms = {
        "fixed": b["fixed"] - vision * (1.0 - encoded),
        "policy": v["policy"],
        "decoder": b["decoder"] * scale,
        "head": b["head"] * float(variant["targets"]) / max(float(base["targets"]), 1.0),
    }
    predicted = sum(terms.values())
    return {**terms, "predicted_s": predicted, "predicted_ratio": predicted / sum(b.values())}
