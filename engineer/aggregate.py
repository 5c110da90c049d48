"""Summarize a sweep: a Markdown table, a CSV and a plot of the test metric per training size.

Reads every ``results.json`` below the sweep's directory and groups runs by training size and
step count; for each group it gives the mean and standard deviation over seeds of the test
metric at the best validation step, the number of runs and the mean wall time. The sweep
file's ``metric`` names the test metric (``loss`` or ``acc``), ``reference`` marks the released
checkpoint's number on the plot, and ``target`` the number a reproduction must reach.

    python -m engineer.aggregate configs/sweeps/o5_regression.yaml --out docs/results
"""

import argparse
import csv
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from engineer.sweep import SweepError, read_sweep
from loggers.console import setup_console_logging
from loggers.files import write_bytes_atomic

logger = logging.getLogger(__name__)

COLUMNS = ["num_samples", "max_steps", "runs", "mean", "std", "min", "max", "wall_time_s",
           "target"]


def collect(sweep_dir: Path, metric: str) -> list[dict[str, Any]]:
    """One record per finished run: training size, steps, seed, test metric, wall time."""
    records = []
    for path in sorted(sweep_dir.glob("*/*/*/results.json")):
        results = json.loads(path.read_text())
        if results.get("status") != "finished" or not results.get("best"):
            continue
        records.append({
            "num_samples": results["train_samples"],
            "max_steps": results["max_steps"],
            "seed": results["seed"],
            "value": results["best"]["test"][metric],
            "wall_time_s": results["wall_time_s"],
        })
    return records


def summarize(records: list[dict[str, Any]], target: dict[str, Any] | None,
              paper_steps: int | None = None) -> list[dict]:
    """Rows of the table: one per (training size, steps), sorted."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["num_samples"], record["max_steps"]), []).append(record)
    rows = []
    for (num_samples, max_steps), group in sorted(groups.items()):
        values = [record["value"] for record in group]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
            if len(values) > 1 else 0.0
        rows.append({
            "num_samples": num_samples, "max_steps": max_steps, "runs": len(values),
            "mean": mean, "std": std, "min": min(values), "max": max(values),
            "wall_time_s": sum(r["wall_time_s"] for r in group) / len(group),
            "target": _verdict(num_samples, max_steps, mean, target, paper_steps),
        })
    return rows


def _verdict(num_samples: int, max_steps: int, mean: float, target: dict[str, Any] | None,
             paper_steps: int | None) -> str:
    if not target or target.get("num_samples") != num_samples:
        return ""
    if paper_steps and max_steps < paper_steps:
        return "not judged: fewer steps than the paper"
    if "at_most" in target:
        return f"{'met' if mean <= target['at_most'] else 'MISSED'} (<= {target['at_most']})"
    return f"{'met' if mean >= target['at_least'] else 'MISSED'} (>= {target['at_least']})"


def markdown(rows: list[dict], metric: str, paper_steps: int | None) -> str:
    header = (f"| training size | steps | runs | test {metric} mean | std | min | max | "
              "wall time per run (s) | target |")
    lines = [header, "|" + " --- |" * 9]
    for row in rows:
        steps = f"{row['max_steps']}"
        if paper_steps and row["max_steps"] < paper_steps:
            steps += " (reduced)"
        std = f"{row['std']:.2g}" if row["runs"] > 1 else "-"
        wall = f"{row['wall_time_s']:.0f}" if row["wall_time_s"] >= 10 else \
            f"{row['wall_time_s']:.2g}"
        lines.append(
            f"| {row['num_samples']} | {steps} | {row['runs']} | {row['mean']:.5g} | {std} | "
            f"{row['min']:.5g} | {row['max']:.5g} | {wall} | {row['target']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], sweep: dict[str, Any], metric: str, path: Path) -> None:
    """Test metric against training size: log-log for losses, log-x for accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(5.5, 3.8), dpi=100)
    # One line per step count; without a fixed paper step count (it depends on the size),
    # one line for all sizes.
    fixed = sweep.get("paper_steps") is not None
    for max_steps in sorted({row["max_steps"] if fixed else 0 for row in rows}, reverse=True):
        chosen = [row for row in rows if not fixed or row["max_steps"] == max_steps]
        steps = f"{max_steps} steps" if fixed else "the paper's steps per size"
        axes.errorbar([row["num_samples"] for row in chosen], [row["mean"] for row in chosen],
                      yerr=[row["std"] for row in chosen], marker="o", capsize=3,
                      label=f"this repository, {steps} (mean ± std)")
    reference = sweep.get("reference")
    if reference:
        axes.scatter([reference["num_samples"]], [reference["value"]], marker="*", s=150,
                     color="black", zorder=3, label=reference.get("label", "reference"))
    axes.set_xscale("log")
    sizes = sorted({row["num_samples"] for row in rows})
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if metric != "acc":
        axes.set_yscale("log")
    axes.set_xlabel("training samples")
    axes.set_ylabel("test accuracy" if metric == "acc" else f"test {metric} (MSE)")
    axes.set_title(sweep["name"])
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def aggregate(sweep_file: str | Path, sweeps_dir: str | Path, out: str | Path) -> list[dict]:
    """Write ``<out>/<sweep>.md``, ``.csv`` and ``.png``; returns the table rows."""
    sweep = read_sweep(sweep_file)
    metric = sweep.get("metric", "loss")
    records = collect(Path(sweeps_dir) / sweep["name"], metric)
    if not records:
        raise SweepError(f"no finished runs of sweep {sweep['name']} under {sweeps_dir}; "
                         f"run python -m engineer.sweep {sweep_file} first")
    rows = summarize(records, sweep.get("target"), sweep.get("paper_steps"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / f"{sweep['name']}.md",
                  markdown(rows, metric, sweep.get("paper_steps")).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / f"{sweep['name']}.csv", text.getvalue().encode())
    plot(rows, sweep, metric, out / f"{sweep['name']}.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engineer.aggregate",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file the runs came from")
    parser.add_argument("--sweeps-dir", default="sweeps", help="base directory of all sweeps")
    parser.add_argument("--out", default="docs/results", help="where the table and plot go")
    args = parser.parse_args(argv)
    setup_console_logging()
    try:
        rows = aggregate(args.sweep, args.sweeps_dir, args.out)
    except SweepError as error:
        logger.error("%s", error)
        return 2
    sweep = read_sweep(args.sweep)
    sys.stdout.write(markdown(rows, sweep.get("metric", "loss"), sweep.get("paper_steps")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
