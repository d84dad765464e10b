"""``benchmarks/time_to_accuracy.py --smoke`` still runs (a subprocess, own cache), and its summary helpers.

The smoke size trains the baseline, ReGATE and ReGATE with visual-token elision for 10 steps each on 40
clips with 16 validation questions (the script's default of two processes is kept so the process pool is
exercised), with a text LM pretrained for 20 steps into a temporary cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))


def run_script(script: str, tmp_path: Path, *args: str) -> tuple[str, Path]:
    """Run ``benchmarks/<script> --smoke --out <tmp>`` in a subprocess with its own cache; its stdout and out folder."""
    env = {**os.environ, "REGATE_LIGHTNING_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, out


def test_time_to_accuracy_smoke(tmp_path):
    stdout, out = run_script("time_to_accuracy.py", tmp_path)
    assert "| variant |" in stdout
    report = json.loads((out / "time_to_accuracy.json").read_text())
    runs = {r["config"]["variant"]: r for r in report["runs"]}
    assert set(runs) == {"baseline", "regate", "regate+visual_temporal_0.5"}
    for run in runs.values():
        steps = [p["step"] for p in run["points"]]
        assert steps == [5, 10]  # one validation per (capped) epoch
        assert all(0.0 <= p["acc"] <= 1.0 and p["train_s"] > 0 for p in run["points"])
        tokens = [p["tokens"] for p in run["points"]]
        assert 0 < tokens[0] < tokens[1]
    base, regate = runs["baseline"], runs["regate"]
    assert all(p["tokens"] == p["tokens_all"] for p in base["points"])  # the baseline processes every token
    assert regate["points"][-1]["tokens"] < regate["points"][-1]["tokens_all"]  # elision happened
    assert regate["points"][-1]["tokens"] == regate["totals"]["active"]  # our count = the callback's
    assert regate["kept_words"]["visual"] > 0 and regate["kept_words"]["text"] > 0
    assert all(math.isfinite(p["video_gap"]) for p in regate["points"])
    both = runs["regate+visual_temporal_0.5"]
    assert both["visual_totals"]["visual_kept"] < both["visual_totals"]["visual"]  # video tokens were elided
    assert both["points"][-1]["tokens"] < regate["points"][-1]["tokens"]  # fewer tokens than ReGATE alone
    summary = report["summary"]
    assert summary["variants"]["regate+visual_temporal_0.5"]["video_tokens_kept"] < 1.0
    assert summary["target_acc"] == pytest.approx(max(p["acc"] for p in base["points"]))
    assert summary["variants"]["baseline"]["tokens_ratio"] == 1.0
    if (out / "acc_vs_tokens.png").exists():
        assert (out / "acc_vs_wallclock.png").stat().st_size > 0

    # --resume: a finished run of the same configuration is kept, one made with other settings is run again.
    other = json.loads(json.dumps(regate))
    other["config"]["steps"] = 7
    lines = [json.dumps(base), json.dumps(other), '{"cut short']
    (out / "runs.partial.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    stdout, out = run_script("time_to_accuracy.py", tmp_path, "--resume")
    assert "resuming: 1 finished runs kept" in stdout and "2 to run" in stdout
    assert "regate seed 0 was made with other settings; not kept" in stdout and ":3: not a JSON run" in stdout
    resumed = json.loads((out / "time_to_accuracy.json").read_text())
    assert resumed["meta"]["resumed_runs"] == 1
    again = {r["config"]["variant"]: r for r in resumed["runs"]}
    assert again["baseline"] == base  # kept as it was, not retrained
    assert again["regate"]["config"]["steps"] == 10 and not (out / "runs.partial.jsonl").exists()

    # --combine: runs split over a results JSON and a runs.partial.jsonl give the summary of all of them; the
    # same (variant, seed) twice, or a run made with other settings, is refused naming the files.
    from benchmarks.time_to_accuracy import main

    first, rest = tmp_path / "first.json", tmp_path / "rest.jsonl"
    first.write_text(json.dumps({**resumed, "runs": resumed["runs"][:1]}), encoding="utf-8")
    rest.write_text("".join(json.dumps(r) + "\n" for r in resumed["runs"][1:]), encoding="utf-8")
    assert main(["--combine", str(first), str(rest), "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "time_to_accuracy.json").read_text())
    assert len(both["runs"]) == 3 and [s["runs"] for s in both["meta"]["combined_from"]] == [1, 2]
    assert json.dumps(both["summary"], sort_keys=True) == json.dumps(resumed["summary"], sort_keys=True)
    with pytest.raises(SystemExit, match=f"baseline seed 0 is in both {first} and {first}"):
        main(["--combine", str(first), str(first), "--out", str(tmp_path / "twice")])
    other = {**resumed["runs"][1], "config": {**resumed["runs"][1]["config"], "lr": 1.0}}
    rest.write_text(json.dumps(other) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"made with other settings than the runs of .*first.json \(lr\)"):
        main(["--combine", str(first), str(rest), "--out", str(tmp_path / "other")])


def test_summary_reaches_and_ratios():
    from benchmarks.time_to_accuracy import format_table, summarise

    def run(variant: str, seed: int, accs: list[float], per_step: int) -> dict:
        points = [
            {
                "step": 10 * (i + 1),
                "tokens": per_step * (i + 1),
                "tokens_all": 100 * (i + 1),
                "train_s": i + 1.0,
                "acc": a,
            }
            for i, a in enumerate(accs)
        ]
        return {"config": {"variant": variant, "seed": seed}, "points": points}

    runs = [
        run("baseline", 0, [0.3, 0.5, 0.6], 100),
        run("baseline", 1, [0.3, 0.4, 0.4], 100),
        run("regate", 0, [0.4, 0.6, 0.6], 50),
        run("regate", 1, [0.4, 0.5, 0.6], 50),
        run("random", 0, [0.2, 0.2, 0.2], 50),
    ]
    summary = summarise(runs)
    assert summary["target_acc"] == pytest.approx(0.5)  # the peak of the baseline's mean curve
    base, regate, rand = (summary["variants"][k] for k in ("baseline", "regate", "random"))
    assert base["tokens_to_target"] == 300 and base["peak_mean"] == pytest.approx(0.5)  # mean curve .3 .45 .5
    assert regate["tokens_to_target"] == 100 and regate["tokens_ratio"] == pytest.approx(1 / 3)  # mean .4 .55
    assert rand["tokens_to_target"] is None and rand["tokens_ratio"] is None
    assert regate["paired"][0] == {"seed": 0, "target": 0.6, "tokens": 100, "train_s": 2.0, "tokens_ratio": 1 / 3}
    assert regate["paired"][1]["tokens_ratio"] == 0.25 and regate["paired_reached"] == "2/2"  # .4 at 50 vs 200
    assert regate["paired_median_ratio"] == pytest.approx((1 / 3 + 0.25) / 2) and rand["paired_reached"] == "0/1"
    assert regate["before_random"] == "1/1"  # seed 0: random never reaches; seed 1 has no random run
    assert base["tokens_ratio_near"] == 1.0 and regate["tokens_ratio_near"] == pytest.approx(1 / 3)  # 0.485
    assert "not reached" in format_table(summary)


def test_demo_ablation_smoke(tmp_path):
    """``benchmarks/demo_ablation.py --smoke``: the demo's baseline and one ablation train and are summarised."""
    stdout, out = run_script("demo_ablation.py", tmp_path, "--jobs", "1")
    assert "| ablation |" in stdout
    report = json.loads((out / "demo_ablation.json").read_text())
    assert [row["name"] for row in report["summary"]] == ["demo", "no_projector_init"]
    for run in report["runs"]:
        assert [p["step"] for p in run["points"]] == [2, 4]
        assert all(math.isfinite(p["video_gap"]) and 0.0 <= p["acc"] <= 1.0 for p in run["points"])


def test_time_to_accuracy_doctests():
    import doctest

    import benchmarks.time_to_accuracy as tta

    result = doctest.testmod(tta)
    assert result.attempted > 0 and result.failed == 0
