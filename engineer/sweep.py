"""Run one experiment over a grid of options, in local worker processes or through submitit.

A sweep file names the experiment, fixed options, and a grid:

    experiment: o5_regression
    options: {trainer.max_steps: 131072}       # passed to every run
    grid:                                       # every combination of these lists
      dataset.num_samples: [30, 100, 300]
      seed: [0, 1, 2]
    cases:                                      # optional: crossed with the grid
      - {dataset.num_samples: 256, trainer.max_steps: 131072}
    metric: loss                                # test metric for engineer.aggregate
    reference: {num_samples: 30000, value: 0.00067, label: released checkpoint}
    target: {num_samples: 30000, at_most: 0.0009}

Each run is one call of the experiment's entry script with ``--key=value`` options and its own
base directory ``<sweep dir>/<run key>``, so a sweep knows which runs are done: those whose
``results.json`` says they finished. An interrupted run with a ``last.pt`` is resumed from it,
one interrupted before its first checkpoint starts again; finished runs are skipped, so a
sweep started again continues where it stopped. Options that change only how a run goes, not
its numbers (``trainer.compile``, ``trainer.num_threads``...), are left out of the key: the
same sweep with ``--set trainer.compile=True`` continues the same runs, faster.

    python -m engineer.sweep configs/sweeps/o5_regression.yaml --workers 2
    python -m engineer.sweep configs/sweeps/hulls.yaml --executor slurm \
        --slurm slurm_partition=gpu --slurm timeout_min=600
"""

import argparse
import concurrent.futures
import itertools
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engineer.config import ConfigError, HelpRequested, parse
from engineer.experiments import EXPERIMENTS as EXPERIMENT_SETUPS
from engineer.trainer import NEUTRAL_OPTIONS
from loggers.console import setup_console_logging

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# Entry scripts and the experiments they run.
SCRIPTS = {"o5_regression": "o5_regression", "hulls": "hulls", "o3_skeletons": "skeletons"}
SWEEP_KEYS = {"experiment", "configs", "options", "grid", "cases", "name", "metric",
              "reference", "target", "paper_steps"}


class SweepError(Exception):
    """A sweep file is wrong, or runs of a sweep failed."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its options and the directory that holds its run directory."""

    key: str
    options: dict[str, Any]
    base: Path

    def results(self) -> Path | None:
        """The run's ``results.json``, when the run has finished."""
        for path in sorted(self.base.glob("*/*/results.json")):
            if _status(path) == "finished":
                return path
        return None

    def interrupted_checkpoint(self) -> Path | None:
        """``last.pt`` of an interrupted run, to resume it."""
        for path in sorted(self.base.glob("*/*/last.pt")):
            if _status(path.with_name("results.json")) != "finished":
                return path
        return None


def _status(results: Path) -> str | None:
    try:
        return json.loads(results.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def read_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file; raises SweepError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist; see configs/sweeps/ for examples")
    try:
        sweep = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SweepError(f"sweep file {path} is not valid YAML: {reason}") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path} must hold a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; accepted: {sorted(SWEEP_KEYS)}")
    if sweep.get("experiment") not in SCRIPTS:
        raise SweepError(f"{path}: experiment must be one of {', '.join(SCRIPTS)}, got "
                         f"{sweep.get('experiment')!r}")
    for key in ("options", "grid"):
        if not isinstance(sweep.get(key, {}), dict):
            raise SweepError(f"{path}: {key} must be a mapping of option names to values")
    for key, values in sweep.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list")
    cases = sweep.get("cases", [{}])
    if not isinstance(cases, list) or not all(isinstance(case, dict) for case in cases):
        raise SweepError(f"{path}: cases must be a list of mappings of options")
    sweep.setdefault("name", path.stem)
    return sweep


def expand(sweep: dict[str, Any], sweeps_dir: Path) -> list[Run]:
    """Every run of a sweep, in a stable order."""
    grid = sweep.get("grid", {})
    runs = []
    for case in sweep.get("cases", [{}]):
        for values in itertools.product(*grid.values()):
            options = {**sweep.get("options", {}), **case, **dict(zip(grid, values))}
            key = ",".join(f"{name}={_text(value)}" for name, value in sorted(options.items())
                           if not _neutral(name))
            runs.append(Run(key, options, sweeps_dir / sweep["name"] / key.replace("/", "_")))
    return runs


def _neutral(name: str) -> bool:
    """Whether option ``group.key`` leaves a run's numbers unchanged (see NEUTRAL_OPTIONS)."""
    group, _, key = name.partition(".")
    return key in NEUTRAL_OPTIONS.get(group, ())


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def command(sweep: dict[str, Any], run: Run) -> list[str]:
    """The entry-script call of one run."""
    arguments = [sys.executable, str(REPO / f"{sweep['experiment']}.py")]
    for config in sweep.get("configs", []):
        arguments += ["-C", str(REPO / config)]
    arguments += [f"--{name}={_text(value)}" for name, value in run.options.items()]
    arguments += [f"--trainer.runs_dir={run.base}", "--trainer.progress_bar=False"]
    checkpoint = run.interrupted_checkpoint()
    if checkpoint is not None:
        arguments.append(f"--trainer.resume={checkpoint}")
    return arguments


def check_options(sweep: dict[str, Any], runs: list[Run]) -> None:
    """Parse every run's options as its entry script will, so a typo fails before any run."""
    experiment = EXPERIMENT_SETUPS[SCRIPTS[sweep["experiment"]]]
    for run in runs:
        arguments = [argument for argument in command(sweep, run)[2:]
                     if not argument.startswith("--trainer.resume=")]
        try:
            parse(arguments, experiment.configs, experiment.seed)
        except ConfigError as error:
            raise SweepError(f"run {run.key}: {error}") from None
        except HelpRequested:
            raise SweepError(f"run {run.key}: an option asks for --help") from None


def execute(run: Run, arguments: list[str]) -> int:
    """Run one command with its output in the run's ``sweep.log``; returns its exit status.

    A run that another sweep finished after this one started is not run again. (Two sweeps
    that start the same run at the same time both run it.)
    """
    if run.results() is not None:
        return 0
    with open(run.base / "sweep.log", "a") as log:
        return subprocess.run(arguments, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode


def run_local(jobs: list[tuple[Run, list[str]]], workers: int) -> dict[str, int]:
    """Run the jobs in ``workers`` processes; returns the exit status per run key."""
    statuses = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(execute, run, arguments): run for run, arguments in jobs}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            statuses[run.key] = future.result()
            logger.info("%s %s", "done" if statuses[run.key] == 0 else "FAILED", run.key)
    except KeyboardInterrupt:
        # Ctrl-C reached the running commands too; the queued ones must not start.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return statuses


def run_submitit(jobs: list[tuple[Run, list[str]]], executor: str, folder: Path,
                 slurm: dict[str, Any]) -> dict[str, int]:
    """Submit each run as one job: a SLURM array, or submitit's local executor."""
    import submitit

    if executor == "slurm":
        pool = submitit.AutoExecutor(folder=folder, cluster="slurm")
        pool.update_parameters(**slurm)
    else:
        pool = submitit.LocalExecutor(folder=folder)
        pool.update_parameters(timeout_min=slurm.get("timeout_min", 24 * 60))
    with pool.batch():
        submitted = [(run, pool.submit(execute, run, arguments)) for run, arguments in jobs]
    statuses = {}
    for run, job in submitted:
        try:
            statuses[run.key] = job.result()
        except Exception as error:  # a job that died reports its error here; keep the others
            logger.error("job of %s failed: %s", run.key, error)
            statuses[run.key] = 1
        logger.info("%s %s", "done" if statuses[run.key] == 0 else "FAILED", run.key)
    return statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engineer.sweep", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file, e.g. configs/sweeps/o5_regression.yaml")
    parser.add_argument("--workers", type=int, default=1, help="parallel local runs")
    parser.add_argument("--executor", choices=("processes", "submitit-local", "slurm"),
                        default="processes", help="how runs are started (default: processes)")
    parser.add_argument("--sweeps-dir", default="sweeps", help="base directory of all sweeps")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, start none")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="run only the runs with this option value (may repeat)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="add or change an option of every run, e.g. a shorter "
                             "--set trainer.max_steps=16384 (may repeat)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="submitit parameter for slurm, e.g. --slurm slurm_partition=gpu")
    args = parser.parse_args(argv)
    setup_console_logging()
    try:
        if args.workers < 1:
            raise SweepError(f"--workers must be at least 1, got {args.workers}")
        sweep = read_sweep(args.sweep)
        slurm = dict(_parse_pair(pair, "--slurm") for pair in args.slurm)
        only = dict(_parse_pair(pair, "--only") for pair in args.only)
        sweep["options"] = {**sweep.get("options", {}),
                            **dict(_parse_pair(pair, "--set") for pair in args.set)}
    except SweepError as error:
        logger.error("%s", error)
        return 2
    runs = [run for run in expand(sweep, Path(args.sweeps_dir).resolve())
            if all(run.options.get(key) == value for key, value in only.items())]
    pending = [run for run in runs if run.results() is None]
    try:
        check_options(sweep, pending)
    except SweepError as error:
        logger.error("%s", error)
        return 2
    logger.info("sweep %s: %d runs, %d already finished", sweep["name"], len(runs),
                len(runs) - len(pending))
    if args.dry_run:
        for run in pending:
            logger.info("would run %s", " ".join(command(sweep, run)))
        return 0
    for run in pending:
        run.base.mkdir(parents=True, exist_ok=True)
    jobs = [(run, command(sweep, run)) for run in pending]

    start = time.perf_counter()
    try:
        if args.executor == "processes":
            statuses = run_local(jobs, args.workers)
        else:
            folder = Path(args.sweeps_dir) / sweep["name"] / "submitit"
            statuses = run_submitit(jobs, args.executor.removeprefix("submitit-"), folder,
                                    slurm)
    except KeyboardInterrupt:
        logger.warning("sweep %s interrupted; the same command continues it", sweep["name"])
        return 130
    failed = sorted(key for key, status in statuses.items() if status != 0)
    logger.info("sweep %s: %d runs in %.0f s, %d failed", sweep["name"], len(jobs),
                time.perf_counter() - start, len(failed))
    for key in failed:
        logger.error("failed: %s (see its sweep.log)", key)
    return 1 if failed else 0


def _parse_pair(pair: str, option: str) -> tuple[str, Any]:
    if "=" not in pair:
        raise SweepError(f"{option} {pair!r}: expected KEY=VALUE")
    key, value = pair.split("=", 1)
    return key, yaml.safe_load(value)


if __name__ == "__main__":
    sys.exit(main())
