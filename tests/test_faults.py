"""Faults during a run: a killed process, a full disk, an unwritable run directory.

A run killed at any moment leaves only complete files in its run directory: checkpoints,
`metrics.jsonl` and `results.json` are written under a temporary name (`.<name>.<pid>.tmp`)
and renamed. A kill during a write can leave that temporary file behind; nothing reads it, and
resuming the run deletes it.
"""

import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from data.o5_regression import O5Regression
from engineer.checkpoint import read_checkpoint
from engineer.runner import main
from loggers import run_directory

REPO = Path(__file__).resolve().parents[1]
TEMPORARY = re.compile(r"\.(best\.pt|last\.pt|metrics\.jsonl|results\.json)\.\d+\.tmp")
# About 5 s of training with the CPU kernels, validating (and checkpointing) every 20 steps:
# longer than the moment of the kill, up to 1 s after the first checkpoint.
ARGUMENTS = ["--trainer.progress_bar=False", "--dataset.num_samples=256",
             "--trainer.max_steps=2000", "--trainer.val_check_interval=20",
             "--trainer.log_every=10"]


def check_complete(run_dir: Path) -> list[str]:
    """Assert that every file a reader would open is complete; returns the temporary files."""
    names = os.listdir(run_dir)
    temporary = [name for name in names if TEMPORARY.fullmatch(name)]
    assert set(names) - set(temporary) <= {"best.pt", "last.pt", "metrics.jsonl",
                                           "results.json"}, names
    for name in set(names) & {"best.pt", "last.pt"}:
        assert read_checkpoint(run_dir / name)["step"] > 0
    if "metrics.jsonl" in names:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    if "results.json" in names:
        json.loads((run_dir / "results.json").read_text())
    return temporary


def test_a_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, caplog):
    killed_runs = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "o5_regression.py", f"--trainer.runs_dir={killed_runs}", *ARGUMENTS],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        # Wait for the first checkpoint, then kill at a random but reproducible moment,
        # checking the directory all along.
        run_dir = None
        deadline = time.monotonic() + 60
        while run_dir is None or not (run_dir / "last.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            found = list((killed_runs / "o5_regression").glob("*")) if killed_runs.exists() else []
            run_dir = found[0] if found else None
            time.sleep(0.01)
        kill_at = time.monotonic() + random.Random(6).uniform(0.0, 1.0)
        while time.monotonic() < kill_at:
            check_complete(run_dir)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL, "the run ended before the kill"
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()

    killed_at = read_checkpoint(run_dir / "last.pt")["step"]
    assert 20 <= killed_at < 2000 and not (run_dir / "results.json").exists()
    check_complete(run_dir)

    # Resume from the last checkpoint; compare with a run that was never interrupted.
    resume = f"--trainer.resume={run_dir / 'last.pt'}"
    assert main("o5_regression", [f"--trainer.runs_dir={killed_runs}", *ARGUMENTS, resume]) == 0
    assert main("o5_regression", [f"--trainer.runs_dir={tmp_path / 'whole'}", *ARGUMENTS]) == 0
    whole_dir = tmp_path / "whole" / "o5_regression" / run_dir.name
    resumed, whole = (json.loads((d / "results.json").read_text()) for d in (run_dir, whole_dir))
    assert resumed["status"] == whole["status"] == "finished"
    assert resumed["best"] == whole["best"] and resumed["steps"] == 2000
    assert (run_dir / "metrics.jsonl").read_text() == (whole_dir / "metrics.jsonl").read_text()
    assert check_complete(run_dir) == []  # temporary files of the killed run are gone
    logging.getLogger(__name__).info("killed at step %d", killed_at)


def refuse_to_build_data(monkeypatch):
    @functools.wraps(O5Regression.__init__)  # keeps the signature the configuration reads
    def build(*args, **kwargs):
        raise AssertionError("the data were built before the run directory was checked")

    monkeypatch.setattr(O5Regression, "__init__", build)


def test_a_full_disk_fails_at_start_up(tmp_path, monkeypatch, caplog):
    refuse_to_build_data(monkeypatch)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage._replace(free=5 * 2**20))
    status = main("o5_regression", [f"--trainer.runs_dir={tmp_path / 'runs'}"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 2 and errors == [
        f"the disk of the run directory {tmp_path / 'runs' / 'o5_regression'} is full: 5.0 MiB "
        f"free, a run needs at least {run_directory.MIN_FREE_BYTES // 2**20} MiB"]
    assert os.listdir(tmp_path) == []


def test_an_unwritable_run_directory_fails_at_start_up(tmp_path, monkeypatch, caplog):
    # Permission bits do not stop root, so the refusal of the file system is simulated.
    refuse_to_build_data(monkeypatch)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path
                        else real_access(path, mode))
    status = main("o5_regression", [f"--trainer.runs_dir={tmp_path / 'runs'}"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 2 and errors == [
        f"the run directory {tmp_path / 'runs' / 'o5_regression'} is not writable ({tmp_path})"]
