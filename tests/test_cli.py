"""The ``regate-lightning`` command's own words: its subcommands, and one line for a refused value (issue 11)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from regate_lightning.cache import load_cache
from regate_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "recipes" / "debug_regate.yaml")


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


def test_help_usage_and_errors_name_score(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "{fit,validate,test,predict,score}" in out
    assert "Run the ReGATE teacher over the training set once" in out
    code, _, err = run([], capsys)
    assert code == 2 and "to be one of {fit,validate,test,predict,score}" in err
    code, out, _ = run(["score", "--help"], capsys)
    assert code == 0 and "--score.ref_cache" in out and "--trainer.callbacks" in out


def _recipe(tmp_path: Path, **init_args: object) -> str:
    config = yaml.safe_load(Path(DEBUG).read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(init_args)
    config["trainer"]["logger"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("cli", "--trainer.callbacks.keep_ratio=0", "`keep_ratio` must be in (0, 1], got 0.0"),
        ("yaml", {"keep_ratio": 0}, "`keep_ratio` must be in (0, 1], got 0.0"),
        ("yaml", {"warmup_steps": -1}, "`warmup_steps` must be >= 0, got -1"),
        ("yaml", {"full_steps": 9}, "`full_steps` must be in [0, cycle_steps=4], got 9"),
    ],
    ids=["cli-keep_ratio", "yaml-keep_ratio", "yaml-warmup_steps", "yaml-full_steps"],
)
def test_a_refused_callback_value_is_one_line_naming_the_argument(tmp_path, capsys, where, value, message):
    args = ["fit", "--config", DEBUG, value] if where == "cli" else ["fit", "--config", _recipe(tmp_path, **value)]
    code, _, err = run(args, capsys)
    assert code == 2
    line = f"regate-lightning: error: regate_lightning.callback.ReGATECallback refused its arguments: {message}"
    assert err.strip().splitlines()[-1] == line
    assert "Traceback" not in err and "Not a valid subclass" not in err
    code, _, err = run(["score", *args[1:]], capsys)  # the same for `score`
    assert code == 2 and err.strip().splitlines()[-1] == line


class _NotATensor:
    pass


@pytest.mark.parametrize("content", ["truncated", "object"])
def test_a_corrupt_cache_is_named_as_not_a_readable_cache(tmp_path, content):
    path = tmp_path / "ref_cache.pt"
    if content == "truncated":
        torch.save({"version": 2, "ref": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        with open(path, "wb") as handle:
            pickle.dump(_NotATensor(), handle)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as info:
        warnings.simplefilter("always")
        load_cache(path, {})
    assert not [w for w in caught if "file an issue" in str(w.message)]
    message = str(info.value)
    assert message.startswith(f"reference cache {path} is not a readable reference cache (")
    assert message.endswith(
        "delete it (or point `ref_cache` at another file) and the reference losses are computed again"
    )
    assert "weights_only" not in message and "file an issue" not in message.lower() and "\n" not in message
