"""The CPU demo's student: a small LLaVA-NeXT-Video whose language model first learned the text.

Real MLLMs start from a pretrained LLM and a pretrained vision tower; ReGATE's teacher
(``teacher="student"``) is that LLM before multimodal tuning, and it is useful only because it already
knows the language of the answers. The demo reproduces that on CPU in seconds:

- :func:`pretrained_text_lm` trains a small Llama on the text of the synthetic training conversations (no
  video), so it predicts template words ("The video shows ... moving ... across a dark background") well
  and the words that need the video (colour, shape, direction, count) no better than chance;
- :func:`demo_student` grafts it into a LLaVA-NeXT-Video with a small random CLIP tower that stays frozen
  during fine-tuning (as LLaVA keeps its tower frozen), and initialises the projector from data
  (:func:`init_projector_from_features`).

**Why the projector is initialised from data.** The frames are mostly dark background, so the random
tower's features are mostly one constant vector with a small per-clip part on top (measured: the mean
feature carries 0.909 of the features' energy in the demo's layout, 0.969 with the old 2x2 pooling). A
projector initialised at random passes the constant on at full scale and the informative part at a few
percent; whether the student then learns to read its video depends on the seed
(``benchmarks/demo_ablation.py``: 0.807 and 0.295 on two seeds, the second with a media gap of 0.003
nats, against 0.930 and 0.923 with the initialisation). Centring and scaling the features per channel
before the projector's first layer (a data-dependent initialisation, folded into that layer's weight and
bias, so the model stays a plain HF model) makes them informative from the first step. See ``docs/demo.md``.

Why not SmolLM2-135M (see ``regate_lightning.demo.smollm2``)? On a 2-core CPU a 135M-parameter student
leaves time for a few dozen steps in the demo's budget, too few to learn the videos; a teacher that
is not the student's own backbone would also depart from the paper's choice. The slow test suite
shows SmolLM2 as a real teacher on real English instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlavaNextVideoForConditionalGeneration

from regate_lightning.data.conversations import read_records
from regate_lightning.data.synthetic import SyntheticPaths, ensure_synthetic, synthetic_tokenizer
from regate_lightning.keys import IGNORE_INDEX
from regate_lightning.testing.tiny import clip_vision_config, llava_next_video_config, text_config

log = logging.getLogger(__name__)

VOCAB_SIZE = 512  # the shapes task's tokenizer stays below 508; the placeholders take the top ids
VIDEO_TOKEN_ID = 510
IMAGE_TOKEN_ID = 511
VOCAB_SIZES: dict[str, int] = {"shapes": VOCAB_SIZE, "descriptions": 768}
"""The student's vocabulary per embedded task: the set's tokenizer, then room, then ``<video>`` and ``<image>``."""


def vocab_size(task: str) -> int:
    """The demo student's vocabulary for an embedded task (video and image placeholders are its last two ids)."""
    if task not in VOCAB_SIZES:
        raise ValueError(f"`task` must be one of {tuple(VOCAB_SIZES)}, got {task!r}")
    return VOCAB_SIZES[task]


def _text_config(hidden_size: int, num_layers: int, vocab: int = VOCAB_SIZE) -> dict[str, Any]:
    """The language model's config: 4 KV heads (no grouping), 1024 positions, an untied head."""
    return text_config(vocab, hidden_size, num_layers, num_kv_heads=4, max_positions=1024, tie_word_embeddings=False)


def conversation_texts(paths: SyntheticPaths, tokenizer: Any) -> list[list[int]]:
    """Token ids of every training conversation rendered with the chat template, video marker removed."""
    out = []
    for record in read_records(paths.train, check_media=False):
        messages = [{"role": t.role, "content": t.text.replace("<video>", "").strip()} for t in record.turns]
        out.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return out


def pretrained_text_lm(
    paths: SyntheticPaths,
    hidden_size: int = 96,
    num_layers: int = 3,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama trained on the text of the training conversations (cached beside the data).

    Every token of the conversation is supervised, as in LLM pretraining.

    Returns:
        The trained model (eval mode, float32).
    """
    vocab = vocab_size(paths.task)
    options = {"h": hidden_size, "l": num_layers, "s": steps, "b": batch_size, "lr": lr, "seed": seed}
    if vocab != VOCAB_SIZE:  # the shapes task's key is unchanged, so that its cached models stay valid
        options["v"] = vocab
    key = json.dumps(options)
    folder = paths.root / f"text_lm_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (folder / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = synthetic_tokenizer(paths)
    texts = conversation_texts(paths, tokenizer)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(**_text_config(hidden_size, num_layers, vocab)))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    lm.train()
    for step in range(steps):
        rows = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=generator).tolist()]
        length = max(len(r) for r in rows)
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = ids[i, : len(row)]
        loss = lm(input_ids=ids, attention_mask=(labels != IGNORE_INDEX).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("text LM pretraining step %d: loss %.3f", step, float(loss.detach()))
    lm.eval()
    lm.save_pretrained(folder)
    return lm


@torch.no_grad()
def projector_inputs(model: nn.Module, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """The features a LLaVA-NeXT-Video's projector receives for some clips: the pooled tower outputs.

    Args:
        model: a LLaVA-NeXT-Video model.
        pixel_values_videos: float ``[N, T, 3, H, W]``, normalised clips.

    Returns:
        float32 ``[N * T * tokens_per_frame, D]``, one row per video token.
    """
    inner = model.model
    seen: dict[str, torch.Tensor] = {}
    handle = inner.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        inner.get_video_features(pixel_values_videos=pixel_values_videos)
    finally:
        handle.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1]).float()


def constant_share(features: torch.Tensor) -> float:
    """The share of the features' energy in their mean vector: ``|mean|^2 / mean(|x|^2)``, in ``[0, 1]``.

    1 means every token gets the same features (nothing to read); the old demo's were 0.967.

    Example:
        >>> constant_share(torch.tensor([[1.0, 0.0], [1.0, 0.0]])), constant_share(torch.tensor([[1.0], [-1.0]]))
        (1.0, 0.0)
    """
    return float(features.mean(0).pow(2).sum() / features.pow(2).sum(1).mean())


@torch.no_grad()
def init_projector_from_features(model: nn.Module, pixel_values_videos: torch.Tensor, eps: float = 1e-6) -> None:
    """Centre and scale the tower's features per channel in the projector's first layer (data-dependent init).

    With ``mu`` and ``sigma`` the per-channel mean and standard deviation of the features the projector
    receives for ``pixel_values_videos`` (:func:`projector_inputs`), the first linear layer ``y = W x + b``
    becomes ``y = (W / sigma) (x - mu) + b``: its weight is divided by ``sigma`` column by column and ``W
    mu / sigma`` is taken from its bias. A plain change of the layer's parameters: the model stays an HF
    model that saves, loads and trains as any other.

    Args:
        model: a LLaVA-NeXT-Video model whose projector starts with a linear layer (``linear_1``).
        pixel_values_videos: float ``[N, T, 3, H, W]``, normalised clips the features are measured on.
        eps: added to ``sigma``.
    """
    features = projector_inputs(model, pixel_values_videos)
    mean, std = features.mean(0), features.std(0) + eps
    first = model.model.multi_modal_projector.linear_1
    weight = first.weight / std[None, :]
    first.bias -= weight @ mean
    first.weight.copy_(weight)


def training_clips(paths: SyntheticPaths, model: nn.Module, num_clips: int, num_frames: int) -> torch.Tensor:
    """The first ``num_clips`` training clips, decoded and normalised as the data module does for ``model``.

    Returns:
        float32 ``[num_clips, num_frames, 3, H, W]``.
    """
    from regate_lightning.data.datasets import FrameSampling, load_media
    from regate_lightning.data.vision import VisionSpec

    spec = VisionSpec.from_model(model)
    frames = FrameSampling(num_frames=num_frames)
    records = read_records(paths.train, check_media=False)[:num_clips]
    return torch.cat([load_media(r.media[0], spec, frames).tensors[spec.video_key] for r in records])


def demo_student(
    root: str | None = None,
    num_train: int = 2000,
    num_val: int = 1000,
    hidden_size: int = 96,
    num_layers: int = 3,
    image_size: int = 64,
    patch_size: int = 16,
    pool_stride: int = 1,
    num_frames: int = 4,
    pretrain_steps: int = 200,
    init_clips: int = 64,
    seed: int = 0,
    task: str = "shapes",
) -> LlavaNextVideoForConditionalGeneration:
    """The demo's student: the pretrained text LM inside a LLaVA-NeXT-Video with a small CLIP tower.

    A clip of T frames gives ``T * (image_size / patch_size / pool_stride) ** 2`` video tokens: 16 per
    frame, 64 for 4 frames at the defaults. The projector is initialised from the tower's features on the
    first ``init_clips`` training clips (:func:`init_projector_from_features`), decoded as the data module
    decodes them. Freeze the tower when fine-tuning (``freeze_vision_tower: true``): training a random
    tower erases the information its features carry.

    Args:
        root: the synthetic set's folder (the data module must use the same one); default cache.
        num_train: training clips (must match the data module's).
        num_val: validation questions (must match the data module's).
        hidden_size: the language model's width.
        num_layers: the language model's depth.
        image_size: the vision tower's input side; frames are resized to it.
        patch_size: the tower's patch side.
        pool_stride: LLaVA-NeXT-Video's spatial pooling of the tower's patch features (1 = none).
        num_frames: frames per clip of the projector's initialisation (the data module's ``num_frames``).
        pretrain_steps: text-only pretraining steps of the language model.
        init_clips: training clips the projector's initialisation is measured on; 0 leaves the projector as
            initialised at random (the old demo's student, which never learned to read its video).
        seed: seed of the random vision tower and projector.
        task: the embedded task (``"shapes"``, the demo's; ``"descriptions"``, long answers); the data module's
            ``task`` must match.
    """
    vocab = vocab_size(task)
    paths = ensure_synthetic(root, num_train=num_train, num_val=num_val, seed=0, task=task)
    lm = pretrained_text_lm(paths, hidden_size=hidden_size, num_layers=num_layers, steps=pretrain_steps)
    torch.manual_seed(seed)
    vision = clip_vision_config(image_size, patch_size, hidden_size=64)
    config = llava_next_video_config(
        vision, _text_config(hidden_size, num_layers, vocab), vocab - 2, vocab - 1, spatial_pool_stride=pool_stride
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.config.use_cache = False
    model = model.float()
    if init_clips < 0:
        raise ValueError(f"`init_clips` must be >= 0, got {init_clips}")
    if init_clips:
        init_projector_from_features(model, training_clips(paths, model, init_clips, num_frames))
    return model
