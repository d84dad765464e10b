"""Every recipe parses (LightningCLI, no class built), and baseline and ReGATE recipes differ only in callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regate_lightning.cli import build_cli, main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as done:
        build_cli(["fit", "--config", str(recipe), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] and printed["data"]["class_path"]


@pytest.mark.parametrize(
    ("name", "other"),
    [
        ("debug", "debug_regate"),
        ("demo", "demo_regate"),
        ("demo_regate", "demo_visual"),
        ("demo_descriptions", "demo_descriptions_regate"),
    ],
)
def test_regate_recipe_differs_only_in_callbacks(name, other):
    folder = RECIPES[0].parent
    base = yaml.safe_load((folder / f"{name}.yaml").read_text())
    regate = yaml.safe_load((folder / f"{other}.yaml").read_text())
    for config in (base, regate):
        config["trainer"].pop("callbacks", None)
        config["trainer"].pop("logger", None)  # each writes its own run folder
    assert base == regate


DEBUG_RUNS = [p for p in RECIPES if p.name.startswith("debug") and p.name != "debug_regate.yaml"]


@pytest.mark.parametrize("recipe", DEBUG_RUNS, ids=lambda p: p.name)
def test_every_debug_recipe_trains(recipe, tmp_path, monkeypatch):
    """Two optimizer steps and one validation batch of every debug recipe (a family's ``debug_<family>.yaml``
    included); ``debug_regate.yaml`` runs in ``tests/test_docs_commands.py``."""
    monkeypatch.chdir(tmp_path)
    train_two_steps(recipe)


def train_two_steps(recipe: Path, *overrides: str) -> None:
    """``regate-lightning fit`` of ``recipe`` (and ``overrides``) for two optimizer steps and one validation batch."""
    args = ["fit", "--config", str(recipe), *overrides, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    args += ["--trainer.val_check_interval=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    try:
        main(args)
    except SystemExit as done:  # the command ends with an exit code only on an error
        assert not done.code, done.code


@pytest.mark.parametrize(
    ("recipe", "name"),
    [
        ("debug_qwen3_vl.yaml", "Qwen3VLMoeForConditionalGeneration"),
        ("debug_qwen3_5.yaml", "Qwen3_5MoeForConditionalGeneration"),
    ],
)
def test_the_moe_classes_train_on_their_familys_debug_recipe(recipe, name, tmp_path, monkeypatch):
    """The MoE classes, which the recipes name in a comment, train through the same recipe (ReGATE and
    visual-token elision), with only the class changed on the command line."""
    monkeypatch.chdir(tmp_path)
    train_two_steps(next(p for p in RECIPES if p.name == recipe), f"--model.model_kwargs.name={name}")
