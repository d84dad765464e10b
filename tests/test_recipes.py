"""Every recipe parses (LightningCLI, no class built), and baseline and ReGATE recipes differ only in callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regate_lightning.cli import build_cli

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
