"""``ReGATEPolicy`` without a Trainer: imports, prior keep masks, pluggable selection and fallback, YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from regate_lightning.cli import build_cli
from regate_lightning.keys import KEEP_MASK, LABELS
from regate_lightning.policy import ReGATEPolicy
from regate_lightning.score import find_callback
from regate_lightning.scoring import scatter_candidates, select_keep
from regate_lightning.selection import (
    AdaptiveSelection,
    RandomSelection,
    Selection,
    StoreFallback,
    TopKSelection,
    as_selection,
)
from regate_lightning.targets import candidate_mask
from regate_lightning.testing import random_batch, tiny_llava

ROOT = Path(__file__).resolve().parents[1]
SPARSE = {"keep_ratio": 0.5, "warmup_steps": 0, "cycle_steps": 2, "full_steps": 1}  # step 0 full, step 1 sparse


def test_the_core_imports_without_lightning_or_transformers():
    code = (
        "import sys, regate_lightning.policy, regate_lightning.selection, regate_lightning.visual\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'transformers'})\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_public_names_resolve():
    import regate_lightning
    import regate_lightning.data
    import regate_lightning.demo
    import regate_lightning.testing

    for package in (regate_lightning, regate_lightning.data, regate_lightning.demo, regate_lightning.testing):
        missing = [name for name in package.__all__ if getattr(package, name, None) is None]
        assert not missing, (package.__name__, missing)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llava()


def policy_for(model: torch.nn.Module, **kwargs) -> ReGATEPolicy:
    policy = ReGATEPolicy(**{**SPARSE, **kwargs})
    policy.setup(model)
    policy.start(torch.device("cpu"))
    return policy


def batch_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return random_batch(model, batch_size=3, answer_len=12, seed=5)


def test_plan_needs_setup_and_builds_the_batch_mask_only_when_applied(model):
    with pytest.raises(RuntimeError, match=r"call ReGATEPolicy.setup\(model\) and .start\(device\)"):
        ReGATEPolicy().plan(batch_of(model), step=0)
    policy = policy_for(model)
    batch = batch_of(model)
    full = policy.plan(batch, step=0)
    assert not full.sparse and full.keep_mask is None and full.scored == 3
    sparse = policy.plan(batch, step=1)
    assert sparse.sparse and sparse.scored == 0, "the teacher ran once per sample"
    assert KEEP_MASK not in batch
    sparse.apply(batch)
    assert torch.equal(batch[KEEP_MASK], sparse.keep_mask)
    assert sparse.kept == int((sparse.keep_mask & sparse.candidates).sum()) == 3 * 6  # ceil(0.5 * 11) per row


def test_a_prior_keep_mask_is_only_narrowed(model):
    """Another policy's mask: never re-added, left as is in a full step, its elisions not re-selected."""
    policy = policy_for(model)
    batch = batch_of(model)
    cand = candidate_mask(batch[LABELS])
    prior = torch.ones_like(cand)
    rows, cols = cand.nonzero(as_tuple=True)
    prior[rows[::3], cols[::3]] = False  # a third of the candidates elided by someone else
    prior[:, 1] = False  # and a visual position
    batch[KEEP_MASK] = prior

    full = policy.plan(batch, step=0)
    assert full.keep_mask is prior and full.kept == int((prior & cand).sum())

    plan = policy.plan(batch, step=1)
    keep = plan.keep_mask
    assert keep is not None and not bool((keep & ~prior).any()), "nothing the prior mask elided comes back"
    available = cand & prior
    expected = select_keep(plan.scores, available, 0.5, 1) & prior
    assert torch.equal(keep, expected), "the selection sees only the candidates the prior mask kept"
    assert plan.kept == int((keep & cand).sum()) < int(available.sum())

    # The student computes nothing at elided positions (NaN): the EMA keeps them unmeasured.
    token_loss = torch.where(keep & cand, torch.full(cand.shape, 2.0), torch.full(cand.shape, float("nan")))
    policy.observe(plan, token_loss)
    ema = scatter_candidates(policy.bank.get_ema(plan.sample_idx, plan.counts), cand)
    assert torch.equal(~ema.isnan(), keep & cand)


def test_without_prior_mask_the_plan_is_the_paper_selection(model):
    policy = policy_for(model, selection="topk")
    batch = batch_of(model)
    plan = policy.plan(batch, step=1)
    assert torch.equal(plan.keep_mask, select_keep(plan.scores, plan.candidates, 0.5, 1))


def test_selection_is_pluggable(model):
    calls = []

    def keep_first(scores, candidates, keep_ratio, min_keep, generator):
        calls.append(keep_ratio)
        keep = torch.ones_like(candidates)
        keep[:, candidates.nonzero(as_tuple=True)[1].max()] = False  # elide the last candidate column
        return keep | ~candidates

    policy = policy_for(model, selection=keep_first)
    plan = policy.plan(batch_of(model), step=1)
    assert calls == [0.5] and plan.kept == int(plan.counts.sum()) - 3

    class ElideEverything(Selection):
        def select(self, scores, candidates, keep_ratio, min_keep, generator):
            return torch.zeros_like(candidates)

    with pytest.raises(ValueError, match="elided a position that is not an available candidate"):
        policy_for(model, selection=ElideEverything()).plan(batch_of(model), step=1)
    with pytest.raises(ValueError, match="`selection` must be one of"):
        as_selection("best")
    with pytest.raises(ValueError, match=r"`selection` 'regate_lightning.selection.Nothing': module .* no attribute"):
        as_selection("regate_lightning.selection.Nothing")
    assert isinstance(as_selection("regate_lightning.selection.RandomSelection"), RandomSelection)


def test_adaptive_selection_keeps_per_sample_counts(model):
    policy = policy_for(model, selection=AdaptiveSelection(coverage=0.5), ref_weight=1.0, min_keep=0)
    plan = policy.plan(batch_of(model), step=1)
    kept = (plan.keep_mask & plan.candidates).sum(1)
    mass = plan.scores.nan_to_num(0.0)
    for row in range(3):  # the fewest top candidates whose reference losses reach half the row's total
        ranked = mass[row][plan.candidates[row]].sort(descending=True).values
        need = 0.5 * ranked.sum()
        assert float(ranked[: int(kept[row])].sum()) >= need > float(ranked[: int(kept[row]) - 1].sum())


def test_fallback_is_pluggable(model):
    class Constant(StoreFallback):
        def difficulty(self, bank, sample_idx, counts, target_ids):
            return torch.full((int(counts.sum()),), 7.0)

    policy = policy_for(model, fallback=Constant("ref"), ref_weight=0.0)
    plan = policy.plan(batch_of(model), step=1)
    assert torch.equal(plan.difficulty[plan.candidates], torch.full((int(plan.counts.sum()),), 7.0))
    assert policy.arguments() == {"teacher": "student", "fallback": "ref"}


def recipe_with(tmp_path: Path, selection: object) -> list[str]:
    config = yaml.safe_load((ROOT / "recipes" / "debug_regate.yaml").read_text())
    config["trainer"].update(logger=False, enable_progress_bar=False, enable_model_summary=False)
    config["trainer"]["callbacks"][0]["init_args"]["selection"] = selection
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path)]


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("regate", TopKSelection()),
        ("random", RandomSelection()),
        ("adaptive", AdaptiveSelection()),
        (
            {"class_path": "regate_lightning.selection.AdaptiveSelection", "init_args": {"coverage": 0.6}},
            AdaptiveSelection(coverage=0.6),
        ),
    ],
)
def test_selection_from_yaml(tmp_path, selection, expected):
    cli = build_cli(recipe_with(tmp_path, selection), run=False)
    assert repr(find_callback(cli.trainer).policy.selection) == repr(expected)
