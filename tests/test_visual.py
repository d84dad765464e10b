"""Visual-token elision: the family's token -> pixel-region layout, the selections, the policy and its
equivalence with the unmodified model on the kept positions, for every video family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import TOL, max_abs_diff, skipped_step_errors, token_losses_4d, token_losses_decoder

from regate_lightning.data.video import normalize
from regate_lightning.data.vision import VisionSpec
from regate_lightning.elision import forward_active
from regate_lightning.families import MediaRegions, family_of, resolve
from regate_lightning.keys import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, KEEP_MASK, LABELS
from regate_lightning.policy import ReGATEPolicy
from regate_lightning.scoring import num_kept
from regate_lightning.testing import random_batch, tiny
from regate_lightning.visual import (
    RandomSelection,
    TemporalSelection,
    UniformSelection,
    VisualElisionPolicy,
    VisualSelection,
    as_visual_selection,
    even_spread_ranks,
    temporal_change,
)

VIDEO_FAMILIES = {
    "llava_next_video": tiny.tiny_llava_next_video,
    "video_llava": tiny.tiny_video_llava,
    "qwen2_vl": tiny.tiny_qwen2_vl,
    "qwen2_5_vl": tiny.tiny_qwen2_5_vl,
}
SPARSE = {"warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}  # step 0 full, step 1 sparse


def policy_for(model: torch.nn.Module, **kwargs) -> VisualElisionPolicy:
    policy = VisualElisionPolicy(**{"keep_ratio": 0.5, **SPARSE, **kwargs})
    policy.setup(model)
    return policy


@pytest.fixture(scope="module", params=list(VIDEO_FAMILIES))
def video_model(request):
    return request.param, VIDEO_FAMILIES[request.param]().eval()


# ------------------------------------------------------------------------------------------------
# The token -> pixel-region layout of each family (families.Family.media_regions).


def expected_regions(name: str, model: torch.nn.Module, pixels: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each token's pixels, cut directly from the normalised frames ``[T, 3, H, W]`` by the rule HF applies.

    Returns, per time step, the list of its tokens' pixel values (a CLS token: the whole frame).
    """
    vision = model.config.vision_config
    patch = int(vision.patch_size)
    steps: list[list[torch.Tensor]] = []
    if name.startswith("qwen"):
        tp, merge = int(vision.temporal_patch_size), int(vision.spatial_merge_size)
        cell = patch * merge
        for t in range(pixels.shape[0] // tp):
            clip = pixels[t * tp : (t + 1) * tp]
            rows, cols = clip.shape[-2] // cell, clip.shape[-1] // cell
            steps.append(
                [
                    clip[..., i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                    for i in range(rows)
                    for j in range(cols)
                ]
            )
        return steps
    cell = patch * (int(model.config.spatial_pool_stride) if name == "llava_next_video" else 1)
    side = int(vision.image_size) // cell
    for frame in pixels:
        tokens = [
            frame[:, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] for i in range(side) for j in range(side)
        ]
        steps.append(([frame] if name == "video_llava" else []) + tokens)  # Video-LLaVA keeps each frame's CLS
    return steps


def test_regions_follow_each_familys_token_layout(video_model):
    name, model = video_model
    spec = VisionSpec.from_model(model)
    frames = torch.randint(0, 256, (4, 3, *spec.size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    media = spec.process_video(frames)
    [regions] = family_of(model).media_regions(model.config, media.tensors, "video")
    assert regions.num_tokens == media.num_tokens
    expected = expected_regions(name, model, normalize(frames, spec.mean, spec.std))
    assert regions.steps == len(expected) and regions.tokens_per_step == len(expected[0])
    for t, tokens in enumerate(expected):
        spatial = tokens[1:] if regions.lead else tokens
        for n, crop in enumerate(spatial):  # the same pixel values (each family orders a region's values its own way)
            assert torch.equal(regions.regions[t, n].sort().values, crop.flatten().sort().values), (t, n)
    # The score from the cut-out regions: mean |difference| to the previous step, in units of the media's std.
    scale = regions.regions.std()
    change = temporal_change(regions)
    for t in range(1, len(expected)):
        for n, crop in enumerate(expected[t]):
            before = expected[t - 1][n]
            assert float(change[t * len(expected[0]) + n]) == pytest.approx(
                float((crop - before).abs().mean() / scale), rel=1e-5
            )
    assert torch.isinf(change[: regions.tokens_per_step]).all(), "the first frame is never penalised"


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_image_regions_follow_the_cls_rule(vision):
    model = tiny.tiny_llava(vision=vision)
    spec = VisionSpec.from_model(model)
    image = torch.randint(0, 256, (3, *spec.size), dtype=torch.uint8)
    media = spec.process_image(image)
    [regions] = family_of(model).media_regions(model.config, media.tensors, "image")
    assert regions.num_tokens == media.num_tokens and not regions.lead and regions.steps == 1


# ------------------------------------------------------------------------------------------------
# Scores and selections.


def moving_square_video(steps: int = 4, side: int = 4, dim: int = 3) -> MediaRegions:
    """A static background with one token (number ``t`` at step ``t``) changing."""
    x = torch.zeros(steps, side * side, dim)
    for t in range(1, steps):
        x[t] = x[t - 1]
        x[t, t] = float(t + 1)
    return MediaRegions("video", x)


def test_temporal_change_ranks_the_changed_region_and_the_whole_frame_token():
    media = moving_square_video()
    change = temporal_change(media).view(4, 16)
    assert torch.isinf(change[0]).all()
    for t in range(1, 4):
        assert change[t].argmax() == t and (change[t] > 0).sum() == 1
    with_cls = temporal_change(MediaRegions("video", media.regions, lead=True)).view(4, 17)
    assert torch.allclose(with_cls[1:, 0], change[1:].mean(1)) and torch.isinf(with_cls[0, 0])
    constant = temporal_change(MediaRegions("video", torch.ones(3, 2, 5)))
    assert constant[2:].eq(0).all(), "a constant video changes by 0, not NaN"


def test_even_spread_ranks_keep_every_kth_frame():
    ranks = even_spread_ranks(16)
    assert sorted(ranks.argsort()[:8].tolist()) == list(range(0, 16, 2))
    assert sorted(ranks.argsort()[:4].tolist()) == list(range(0, 16, 4))
    assert sorted(even_spread_ranks(5).tolist()) == list(range(5)) and even_spread_ranks(1).tolist() == [0]


def test_selections_by_name_and_refusals():
    assert isinstance(as_visual_selection("temporal"), TemporalSelection)
    assert isinstance(as_visual_selection("uniform"), UniformSelection)
    assert isinstance(as_visual_selection("random"), RandomSelection)
    assert isinstance(as_visual_selection("regate_lightning.visual.UniformSelection"), UniformSelection)
    with pytest.raises(ValueError, match="`selection` must be one of"):
        VisualElisionPolicy(selection="best")
    with pytest.raises(ValueError, match=r"`images=True` needs a selection that works without frames"):
        VisualElisionPolicy(images=True, selection="temporal")
    with pytest.raises(ValueError, match=r"`keep_ratio` must be in \(0, 1\]"):
        VisualElisionPolicy(keep_ratio=0.0)
    with pytest.raises(ValueError, match="`full_steps`"):
        VisualElisionPolicy(cycle_steps=4, full_steps=5)
    with pytest.raises(ValueError, match="takes no videos"):
        VisualElisionPolicy().setup(tiny.tiny_llava())
    with pytest.raises(ValueError, match="needs a multimodal student"):
        VisualElisionPolicy().setup(tiny.tiny_llama())
    with pytest.raises(RuntimeError, match=r"setup\(model\)"):
        VisualElisionPolicy().plan({}, step=0)


def test_temporal_policy_keeps_the_first_frame_and_what_moves():
    model = tiny.tiny_llava_next_video()  # 4 tokens per frame (2x2 pooled cells of 16 pixels)
    batch = random_batch(model, batch_size=1, num_frames=4)
    video = torch.zeros(1, 4, 3, 32, 32)
    for t in range(1, 4):
        video[0, t] = video[0, t - 1]
        video[0, t, :, 16:, 16:] += t  # the bottom-right cell (token 3 of each frame) changes every frame
    batch["pixel_values_videos"] = video
    plan = policy_for(model, keep_ratio=0.5).plan(batch, step=1)
    visual = plan.candidates[0].nonzero().flatten()
    kept = plan.keep_mask[0, visual].view(4, 4)
    # 16 tokens, keep 8: the 4 of the first frame, the moving cell of frames 1-3, then the earliest static one.
    assert kept[0].all() and kept[1:, 3].all() and kept.sum() == 8 and kept[1, 0]
    assert plan.keep_mask[0][~plan.candidates[0]].all(), "text positions are never elided"


def test_clips_joined_frame_wise_are_scored_per_clip():
    """Clips of different lengths arrive as one [1, sum T, ...] tensor (data.vision.join_media): every clip's
    first frame is still a first frame, never compared with the previous clip's last."""
    model = tiny.tiny_llava_next_video()  # 4 tokens per frame
    two = random_batch(model, batch_size=1, num_frames=2, seed=0)
    three = random_batch(model, batch_size=1, num_frames=3, seed=1)
    width = max(two[INPUT_IDS].shape[1], three[INPUT_IDS].shape[1])
    pad = {INPUT_IDS: 0, ATTENTION_MASK: 0, LABELS: IGNORE_INDEX}
    batch = {
        k: torch.cat([F.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in (two, three)]) for k, v in pad.items()
    }
    video = torch.zeros(1, 5, 3, 32, 32)  # clip 1: frames 0-1, static; clip 2: frames 2-4
    video[0, 3] = 1.0  # clip 2's first frame equals clip 1's last; its later frames change everywhere
    video[0, 4] = 2.0
    batch["pixel_values_videos"] = video
    plan = policy_for(model, keep_ratio=0.5).plan(batch, step=1)
    for row, frames in ((0, 2), (1, 3)):
        visual = plan.candidates[row].nonzero().flatten()
        kept = plan.keep_mask[row, visual].view(frames, 4)
        assert kept[0].all(), f"clip {row}: its first frame is kept whole"
        assert kept.sum() == math.ceil(0.5 * 4 * frames)
    assert torch.isfinite(forward_active(model, {**batch, KEEP_MASK: plan.keep_mask}).loss)


def test_uniform_policy_keeps_whole_frames_evenly():
    model = tiny.tiny_video_llava()  # 17 tokens per frame (CLS + 16 patches)
    batch = random_batch(model, batch_size=2, num_frames=4)
    plan = policy_for(model, selection="uniform", keep_ratio=0.5).plan(batch, step=1)
    for row in range(2):
        kept = plan.keep_mask[row, plan.candidates[row]].view(4, 17)
        assert kept[0].all() and kept[2].all() and not kept[1].any() and not kept[3].any()


def test_random_policy_repeats_per_step_and_differs_between_steps():
    model = tiny.tiny_qwen2_vl()
    batch = random_batch(model, batch_size=2, num_frames=4)
    policy = policy_for(model, selection="random", warmup_steps=0, full_steps=0)
    a, b, c = (policy.plan(batch, step=s, index=i).keep_mask for s, i in ((3, 0), (3, 0), (4, 0)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, policy.plan(batch, step=3, index=1).keep_mask), "micro-batches draw differently"


@pytest.mark.parametrize("selection", ["temporal", "uniform", "random"])
def test_keep_count_per_sample_in_every_family(video_model, selection):
    name, model = video_model
    batch = random_batch(model, batch_size=3, num_frames=4, ragged=True)
    for keep_ratio, min_keep in ((0.3, 1), (0.05, 10)):
        plan = policy_for(model, selection=selection, keep_ratio=keep_ratio, min_keep=min_keep).plan(batch, step=1)
        n = plan.candidates.sum(1)
        kept = (plan.keep_mask & plan.candidates).sum(1)
        assert torch.equal(kept, num_kept(n, keep_ratio, min_keep)), (name, keep_ratio)
        assert kept.tolist() == [min(int(v), max(min_keep, math.ceil(keep_ratio * int(v)))) for v in n]
        assert plan.keep_mask[~plan.candidates].all()
        assert int(plan.kept) == int(kept.sum()) and int(plan.visual) == int(n.sum())


def test_full_steps_write_no_mask_and_keep_a_prior_one():
    model = tiny.tiny_llava_next_video()
    batch = random_batch(model, batch_size=2, num_frames=2)
    policy = policy_for(model, warmup_steps=2)
    assert policy.plan(batch, step=0).keep_mask is None and not policy.plan(batch, step=0).sparse
    prior = torch.ones_like(batch[INPUT_IDS], dtype=torch.bool)
    prior[:, -3] = False
    batch[KEEP_MASK] = prior
    assert policy.plan(batch, step=1).keep_mask is prior
    assert policy_for(model, keep_ratio=1.0, warmup_steps=0, full_steps=0).plan(batch, step=5).keep_mask is prior


class _DropEverything(VisualSelection):
    def select(self, tokens, keep_ratio, min_keep, generator):
        return torch.zeros_like(tokens.candidates)


def test_a_selection_that_elides_text_is_refused():
    model = tiny.tiny_llava_next_video()
    with pytest.raises(ValueError, match="not a visual candidate"):
        policy_for(model, selection=_DropEverything()).plan(random_batch(model, num_frames=2), step=1)


def test_pixels_that_do_not_match_the_placeholders_are_refused():
    model = tiny.tiny_llava_next_video()
    batch = random_batch(model, batch_size=2, num_frames=2)
    batch["pixel_values_videos"] = batch["pixel_values_videos"][:, :1]
    with pytest.raises(ValueError, match="pixels make 8 tokens but its input_ids hold 16 attended video placeholders"):
        policy_for(model).plan(batch, step=1)


def test_images_with_random_selection():
    model = tiny.tiny_llava()
    batch = random_batch(model, batch_size=2)
    plan = policy_for(model, selection="random", images=True, keep_ratio=0.25).plan(batch, step=1)
    assert (plan.keep_mask & plan.candidates).sum(1).tolist() == [4, 4]  # 16 image tokens each


# ------------------------------------------------------------------------------------------------
# Equivalence: the elided step equals the unmodified model on the kept positions.


@pytest.mark.parametrize("selection", ["temporal", "random"])
def test_visual_elision_equals_the_model_on_kept_positions(video_model, selection):
    name, model = video_model
    batch = random_batch(model, batch_size=3, num_frames=4, ragged=True, seed=2)
    plan = policy_for(model, selection=selection, keep_ratio=0.4).plan(batch, step=1)
    keep = plan.keep_mask
    assert (~keep).any()
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        short = token_losses_decoder(model, batch, keep)  # the model's merged embeddings, kept positions alone
        masked = token_losses_4d(model, batch, keep)
    err = max(max_abs_diff(out.token_loss, short), max_abs_diff(out.token_loss, masked))
    print(f"max|diff| {name}/visual/{selection}: {err:.2e}")
    assert err < TOL
    assert out.decoder_length == int((batch[ATTENTION_MASK].bool() & keep).sum(1).max())


def test_both_policies_in_either_order_give_the_same_mask(video_model):
    name, model = video_model
    batch = random_batch(model, batch_size=2, num_frames=4, answer_len=12, seed=3)
    visual = policy_for(model, keep_ratio=0.5)
    regate = ReGATEPolicy(keep_ratio=0.5, **SPARSE)
    regate.setup(model)
    regate.start(torch.device("cpu"))
    masks = []
    for order in ((visual, regate), (regate, visual)):
        b = dict(batch)
        for policy in order:
            policy.plan(b, step=1).apply(b)
        masks.append(b[KEEP_MASK])
    alone_visual = visual.plan(batch, step=1).keep_mask
    alone_regate = regate.plan(batch, step=1).keep_mask
    assert torch.equal(masks[0], masks[1]), name
    assert torch.equal(masks[0], alone_visual & alone_regate)


def test_media_steps_count_every_familys_placeholders(video_model):
    _, model = video_model
    batch = random_batch(model, batch_size=2, num_frames=4)
    steps = family_of(model).media_steps(model.config, batch, "video")
    regions = family_of(model).media_regions(model.config, batch, "video")
    assert [(s.steps, s.tokens_per_step) for s in steps] == [(r.steps, r.tokens_per_step) for r in regions]
    placeholders = int((batch[INPUT_IDS] == model.config.video_token_id).sum())
    assert sum(s.steps * s.tokens_per_step for s in steps) == placeholders


def test_fully_elided_frames_are_not_encoded_and_train_the_same(video_model):
    """Uniform selection elides whole frames: the tower skips them, with the same losses and gradients."""
    name, model = video_model
    batch = random_batch(model, batch_size=2, num_frames=4, ragged=True, seed=4)
    keep = policy_for(model, selection="uniform", keep_ratio=0.5).plan(batch, step=1).keep_mask
    _, tower, _ = family_of(model).encoders[-1]
    out, rows, loss_err, worst, _ = skipped_step_errors(model, batch, keep, getattr(resolve(model).inner, tower))
    steps_per_video = 2 if name.startswith("qwen") else 4  # Qwen2-VL: 4 frames are 2 temporal patches
    assert out.skipped_steps == 2 * steps_per_video // 2
    rows_per_step = batch["pixel_values_videos"].shape[0] // (2 * steps_per_video) if name.startswith("qwen") else 1
    assert rows == [rows_per_step * steps_per_video], "the tower encoded only the kept half of the steps"
    print(f"max|grad diff| {name}/skipped frames: {worst:.2e}")
    assert loss_err < TOL and worst < TOL


@pytest.mark.parametrize("name", ["llava_clip", "llava_next_video"])
def test_an_elided_image_or_every_frame_elided_still_equals_the_model(name):
    model = tiny.tiny_llava() if name == "llava_clip" else tiny.tiny_llava_next_video()
    batch = random_batch(model, batch_size=2, num_frames=2, seed=6)
    token = model.config.image_token_id if name == "llava_clip" else model.config.video_token_id
    keep = batch[INPUT_IDS] != token  # every visual token elided: the tower still encodes one step
    if name == "llava_clip":
        keep[1] = True  # the first image elided, the second kept
    with torch.no_grad():
        out = forward_active(model, batch, keep)
        masked = token_losses_4d(model, batch, keep)
    assert out.skipped_steps == (1 if name == "llava_clip" else 3)
    assert max_abs_diff(out.token_loss, masked) < TOL


def test_temporal_frames_keeps_the_most_changed_frames_whole():
    model = tiny.tiny_llava_next_video()
    batch = random_batch(model, batch_size=1, num_frames=4)
    video = torch.zeros(1, 4, 3, 32, 32)
    video[0, 2] = 1.0  # frame 2 differs from frame 1 everywhere; frame 3 repeats frame 2
    batch["pixel_values_videos"] = video
    policy = policy_for(model, selection="temporal_frames", keep_ratio=0.5)
    assert isinstance(policy.selection, TemporalSelection) and policy.selection.whole_frames
    plan = policy.plan(batch, step=1)
    kept = plan.keep_mask[0, plan.candidates[0]].view(4, 4)
    assert kept[0].all() and kept[2].all() and not kept[1].any() and not kept[3].any()
    with torch.no_grad():
        assert forward_active(model, batch, plan.keep_mask).skipped_steps == 2
