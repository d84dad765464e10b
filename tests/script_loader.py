"""Repository files as the tests use them: a script (``benchmarks/*.py`` is a folder of scripts, not a package) as
a module, a recipe as a quiet, file-free config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str) -> ModuleType:
    """The script at ``path`` (relative to the repository) as a fresh module, e.g. ``benchmarks/memory.py``."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def recipe(
    tmp_path: Path,
    name: str,
    ref_cache: Path | None,
    source: str = "debug_regate.yaml",
    max_steps: int = 8,
    **data: object,
) -> Path:
    """``recipes/<source>`` with quiet, file-free trainer settings, ``max_steps``, the ReGATE callback's reference
    cache ``ref_cache`` and the data's ``init_args`` updated by ``data``; written to ``tmp_path / name``."""
    config = yaml.safe_load((ROOT / "recipes" / source).read_text())
    trainer = config["trainer"]
    trainer.update(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        max_steps=max_steps,
        default_root_dir=str(tmp_path),  # where `fit` saves config.yaml
    )
    (regate,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("ReGATECallback")]
    regate["init_args"]["ref_cache"] = None if ref_cache is None else str(ref_cache)
    config["data"]["init_args"].update(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path
