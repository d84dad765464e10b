"""The ``regate-lightning`` command's own words: its subcommands, and one line for a refused value (issue 11)."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------------
# Issue 19: a validation path stays one file (item 1), bad data in one line (item 6), old and wrong class
# paths (item 7).

OWN_DATA = str(ROOT / "recipes" / "own_data.yaml")
TASK_FILE = str(ROOT / "examples" / "own_data" / "mvbench" / "json" / "object_colour.json")  # 3 questions


def _val_file(args: list[str], capsys) -> object:
    code, out, _ = run(["fit", "--config", *args, "--print_config"], capsys)
    assert code == 0
    return yaml.safe_load(out)["data"]["init_args"]["val_file"]


def test_a_val_file_given_as_one_path_stays_one_file_in_every_form(tmp_path, capsys):
    """A path to a JSON list of N questions was parsed as N copies of the path (N x N questions validated)."""
    recipe = yaml.safe_load(Path(OWN_DATA).read_text())
    recipe["data"]["init_args"]["val_file"] = TASK_FILE
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(recipe))
    as_dict = {"path": TASK_FILE, "media_root": "clips"}
    assert _val_file([OWN_DATA, "--data.val_file", TASK_FILE], capsys) == TASK_FILE  # command line
    assert _val_file([str(one)], capsys) == TASK_FILE  # YAML
    assert _val_file([OWN_DATA, "--data.val_file", yaml.safe_dump(as_dict, default_flow_style=True)], capsys) == {
        **as_dict,
        "task": None,
    }
    listed = _val_file([OWN_DATA], capsys)  # the recipe's list of two task files
    assert isinstance(listed, list) and [Path(f["path"]).name for f in listed] == [
        "object_colour.json",
        "moving_direction.json",
    ]
    from regate_lightning.data import ConversationDataModule, DataFile

    for value in (TASK_FILE, Path(TASK_FILE), DataFile(TASK_FILE), [TASK_FILE]):  # and from Python
        assert ConversationDataModule("train.jsonl", val_file=value).val_files() == [DataFile(TASK_FILE)]


def _data_recipe(tmp_path: Path, train: Path, **init_args: object) -> str:
    """own_data.yaml on ``train``, without validation, ReGATE or logger, stopping at the first bad record."""
    recipe = yaml.safe_load(Path(OWN_DATA).read_text())
    recipe["trainer"].update(callbacks=[], logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    recipe["data"]["init_args"].update(train_file=str(train), val_file=None, on_error="raise", **init_args)
    path = tmp_path / f"{train.stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_bad_data_is_one_line_and_the_traceback_is_behind_an_environment_variable(tmp_path, capsys, monkeypatch):
    """`on_error: raise` printed a traceback of 41-108 lines before the one line that says what is wrong."""
    from data_fixtures import llava_record, write_records, write_video

    from regate_lightning.data import DataError

    write_video(tmp_path / "ok.mp4", num_frames=4)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing useful" * 10)
    missing = write_records(tmp_path / "missing.jsonl", [llava_record("ok", "video", "ok.mp4")] * 2)
    missing.write_text(missing.read_text() + json.dumps(llava_record("gone", "video", "gone.mp4")) + "\n")
    corrupt = write_records(tmp_path / "corrupt.jsonl", [llava_record("broken", "video", "corrupt.mp4")])
    cases = [  # the reader in the main process; the decoder in a DataLoader worker (PyAV's error chained)
        (_data_recipe(tmp_path, missing), f"{missing}:3 (id gone): video file (or folder of frames) "),
        (_data_recipe(tmp_path, corrupt, num_workers=1), f"{corrupt}:1 (id broken): {tmp_path / 'corrupt.mp4'}: "),
    ]
    for recipe, start in cases:
        code, _, err = run(["fit", "--config", recipe], capsys)
        line = err.strip().splitlines()[-1]
        assert code == 1 and line.startswith(f"regate-lightning: error: {start}"), err
        assert line.endswith("(REGATE_LIGHTNING_TRACEBACK=1 shows the traceback)") and "Traceback" not in err
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "REGATE_LIGHTNING_TRACEBACK=1 adds the traceback" in " ".join(out.split())
    monkeypatch.setenv("REGATE_LIGHTNING_TRACEBACK", "1")
    with pytest.raises(DataError, match="does not exist"):
        main(["fit", "--config", cases[0][0]])


def test_old_paths_warn_once_and_a_path_that_names_nothing_is_one_line(tmp_path, capsys, monkeypatch):
    """Recipes of the previous layout ended in a 69-75-line usage dump ("has no attribute 'debug'")."""
    from regate_lightning import _imports
    from regate_lightning.testing import tiny

    monkeypatch.setattr(_imports, "_warned_moved", set(), raising=False)  # "once" counts from here
    moved = r"regate_lightning\.tiny\.tiny_llava has moved to regate_lightning\.testing\.tiny_llava"
    with pytest.warns(FutureWarning, match=moved):
        assert _imports.import_object("regate_lightning.tiny.tiny_llava", "model") is tiny.tiny_llava
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert _imports.import_object("regate_lightning.tiny.tiny_llava", "model") is tiny.tiny_llava
    with pytest.warns(FutureWarning, match=r"has moved to regate_lightning\.testing\.RandomDataModule"):
        code, out, _ = run(["fit", "--config", DEBUG, "--data", "regate_lightning.data.debug.RandomDataModule",
                            "--print_config"], capsys)  # fmt: skip
    assert code == 0 and yaml.safe_load(out)["data"]["init_args"]["num_samples"] == 32
    recipe = Path(OWN_DATA).read_text().replace("class_path: regate_lightning.data.ConversationDataModule",
                                                 "class_path: ConversationDataModule")  # fmt: skip
    (tmp_path / "short.yaml").write_text(recipe)
    code, out, _ = run(["fit", "--config", str(tmp_path / "short.yaml"), "--print_config"], capsys)
    assert code == 0 and yaml.safe_load(out)["data"]["class_path"] == "regate_lightning.data.ConversationDataModule"
    for value, why, closest in [
        (
            "regate_lightning.data.ConversatonDataModule",
            "module 'regate_lightning.data' has no attribute 'ConversatonDataModule'",
            "regate_lightning.data.ConversationDataModule",
        ),
        ("RandomDataModul", "no imported class has this name", "regate_lightning.testing.RandomDataModule"),
    ]:
        code, _, err = run(["fit", "--config", DEBUG, "--data", value], capsys)
        line = f"regate-lightning: error: `data`: class path {value!r} cannot be resolved ({why}); closest existing "
        assert code == 2 and err.strip() == f"{line}path: {closest}"
    code, _, err = run(["fit", "--config", DEBUG, "--model.model", "regate_lightning.testing.tiny_lava"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "regate-lightning: error: regate_lightning.module.MLLMModule refused its arguments: `model` "
        "'regate_lightning.testing.tiny_lava': module 'regate_lightning.testing' has no attribute 'tiny_lava'; "
        "closest existing path: regate_lightning.testing.tiny_llava"
    )
