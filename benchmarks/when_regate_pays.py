"""When does ReGATE pay? The per-step saving against the answer share, beside both embedded tasks' learning results.

Reads measurements other benchmarks wrote (it trains and times nothing itself):

- ``benchmarks/throughput.py`` (CPU): the step-time ratio of a sparse ReGATE step to a baseline step at
  answer shares 11, 25, 50 and 75 % and keep ratios 0.25-1, and the ideal ratio (the decoder's active
  tokens / all tokens) of the same batches;
- ``benchmarks/gpu_throughput.py`` (NVIDIA H200, bf16, Qwen2-VL-2B-shaped): the same at a 39 % answer share;
- ``benchmarks/time_to_accuracy.py`` on the two embedded tasks (``--task shapes``, the demo, and ``--task
  descriptions``, long answers): each task's candidate share (the answer tokens ReGATE may elide / every
  token, from the ReGATE runs' totals), the decoder tokens ReGATE processed over the run against the
  baseline's, and the paired final-accuracy difference.

Prints one table and writes one figure (``when_regate_pays.png`` in ``--out``): the per-step saving
``1 - ratio`` of a sparse step against the answer share, measured and ideal, with each task's answer share
marked and its learning result written beside it.

Usage::

    python benchmarks/when_regate_pays.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
CPU = RESULTS / "throughput_cpu" / "throughput.json"
GPU = (RESULTS / "gpu_h200" / "gpu_throughput-a1024-p0.5.json", RESULTS / "gpu_h200" / "gpu_throughput-a1024-more.json")
TASKS = {
    "shapes (the demo)": RESULTS / "time_to_accuracy" / "time_to_accuracy.json",
    "descriptions (long answers)": RESULTS / "time_to_accuracy_descriptions" / "time_to_accuracy.json",
}


def step_points(paths: list[Path], where: str) -> list[dict[str, Any]]:
    """One row per (answer share, keep ratio) of a throughput JSON: measured and ideal ratios of a sparse step."""
    rows = []
    for path in paths:
        if not path.is_file():
            continue
        for shape in json.loads(path.read_text(encoding="utf-8"))["shapes"]:
            for r in shape["regate"]:
                if r.get("keep_ratio") is None or r.get("visual_keep_ratio") is not None:
                    continue  # visual-token elision rows belong to another figure
                rows.append(
                    {
                        "where": where,
                        "answer_share": shape["shape"]["answer_share"],
                        "keep_ratio": r["keep_ratio"],
                        "ratio": r["ratio"],
                        "ideal": r["ideal_ratio"],
                    }
                )
    return rows


def task_point(name: str, path: Path) -> dict[str, Any] | None:
    """A task's candidate share (from the ReGATE runs' totals) and its learning result, from a results JSON."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    runs = [r for r in report["runs"] if r["config"]["variant"] == "regate" and r.get("totals")]
    if not runs:
        return None
    tokens = sum(r["totals"]["tokens"] for r in runs)
    candidates = sum(r["totals"]["candidates"] for r in runs)
    rows = report["summary"]["variants"]
    paired = {(p["a"], p["b"]): p for p in report["summary"].get("paired_final", [])}
    diff = paired.get(("regate", "baseline"))
    return {
        "task": name,
        "candidate_share": candidates / tokens,
        "tokens_ratio": rows["regate"]["total_tokens"] / rows["baseline"]["total_tokens"],
        "final_baseline": rows["baseline"]["final_mean"],
        "final_regate": rows["regate"]["final_mean"],
        "paired": None if diff is None else (diff["mean"], diff["se"]),
        "steps": runs[0]["config"]["steps"],
    }


def table(steps: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> str:
    """The Markdown tables of the measurements read."""
    lines = [
        "| machine | answer share | keep ratio | sparse step / baseline step | ideal (active tokens) | saving per "
        "sparse step |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(steps, key=lambda r: (r["where"], r["answer_share"], r["keep_ratio"])):
        if r["keep_ratio"] >= 1.0:
            continue
        lines.append(
            f"| {r['where']} | {100 * r['answer_share']:.0f} % | {r['keep_ratio']:g} | {r['ratio']:.3f} | "
            f"{r['ideal']:.3f} | {100 * (1 - r['ratio']):.0f} % |"
        )
    lines += [
        "",
        "| task | candidate share | ReGATE's decoder tokens over the run / baseline's | final accuracy: baseline, "
        "ReGATE | ReGATE - baseline (paired, mean ± se) |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        paired = "-" if t["paired"] is None else f"{t['paired'][0]:+.3f} ± {t['paired'][1]:.3f}"
        lines.append(
            f"| {t['task']} | {100 * t['candidate_share']:.0f} % | {t['tokens_ratio']:.3f} | "
            f"{t['final_baseline']:.3f}, {t['final_regate']:.3f} | {paired} |"
        )
    return "\n".join(lines)


def plot(steps: list[dict[str, Any]], tasks: list[dict[str, Any]], out: Path) -> Path | None:
    """Saving per sparse step against the answer share: measured (CPU, GPU), ideal, and the two tasks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    for p, colour in ((0.25, "tab:blue"), (0.5, "tab:orange"), (0.75, "tab:green")):
        cpu = sorted(
            (r for r in steps if r["where"] == "CPU" and r["keep_ratio"] == p), key=lambda r: r["answer_share"]
        )
        if cpu:
            xs = [100 * r["answer_share"] for r in cpu]
            ax.plot(xs, [100 * (1 - r["ratio"]) for r in cpu], "o-", color=colour, label=f"CPU measured, p = {p:g}")
            ax.plot(xs, [100 * (1 - r["ideal"]) for r in cpu], ":", color=colour, label=f"ideal (tokens), p = {p:g}")
        for r in steps:
            if r["where"] == "H200" and r["keep_ratio"] == p:
                ax.plot(100 * r["answer_share"], 100 * (1 - r["ratio"]), "s", color=colour, ms=8, mfc="none")
    ax.plot([], [], "ks", mfc="none", label="H200 measured (bf16, 2B)")
    for t in tasks:
        x = 100 * t["candidate_share"]
        ax.axvline(x, color="grey", lw=1, ls="--")
        paired = "" if t["paired"] is None else f"\nfinal {t['paired'][0]:+.3f} vs baseline"
        ax.text(x + 0.8, 52, f"{t['task']}\nrun tokens {t['tokens_ratio']:.2f}x{paired}", fontsize=7, va="top")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("answer share of the sequence, % (tasks: candidate share)")
    ax.set_ylabel("saving per sparse step, % of the baseline step")
    ax.set_xlim(0, 80)
    ax.set_ylim(-15, 60)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("When does ReGATE pay: per-step saving against the answer share", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "when_regate_pays.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=Path, default=CPU, help="throughput.py's JSON (CPU)")
    parser.add_argument("--gpu", type=Path, nargs="*", default=list(GPU), help="gpu_throughput.py's JSONs")
    parser.add_argument("--shapes", type=Path, default=TASKS["shapes (the demo)"], help="time_to_accuracy, shapes")
    parser.add_argument(
        "--descriptions", type=Path, default=TASKS["descriptions (long answers)"], help="time_to_accuracy, descriptions"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "when_regate_pays")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Read, print, plot."""
    args = parser().parse_args(argv)
    steps = step_points([args.cpu], "CPU") + step_points(args.gpu, "H200")
    tasks = [
        t
        for t in (
            task_point("shapes (the demo)", args.shapes),
            task_point("descriptions (long answers)", args.descriptions),
        )
        if t is not None
    ]
    print(table(steps, tasks))
    path = plot(steps, tasks, args.out)
    if path is not None:
        print(f"wrote {path}")
    return 0 if steps and not any(math.isnan(r["ratio"]) for r in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
