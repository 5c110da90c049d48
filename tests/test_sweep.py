"""Sweeps: the smoke version of each runs end to end, with its table, CSV and plot."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from engineer import aggregate, sweep
from tests.conftest import REPO, SKELETONS


def run_sweep(name: str, sweeps_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engineer.sweep", f"configs/sweeps/smoke/{name}.yaml",
         "--sweeps-dir", str(sweeps_dir), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600)


def check_outputs(name: str, sweeps_dir, out, sizes: list[int], runs_per_size: int):
    rows = aggregate.aggregate(REPO / f"configs/sweeps/smoke/{name}.yaml", sweeps_dir, out)
    assert [row["num_samples"] for row in rows] == sizes
    assert all(row["runs"] == runs_per_size for row in rows)
    table = (out / f"smoke_{name}.md").read_text()
    assert table.startswith("| training size |") and len(table.splitlines()) == 2 + len(sizes)
    with open(out / f"smoke_{name}.csv") as file:
        assert [int(row["num_samples"]) for row in csv.DictReader(file)] == sizes
    assert (out / f"smoke_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows, table


def test_o5_regression_smoke_sweep_through_submitit_and_resumes(tmp_path):
    result = run_sweep("o5_regression", tmp_path, "--executor", "submitit-local")
    assert result.returncode == 0, result.stderr
    rows, table = check_outputs("o5_regression", tmp_path, tmp_path / "out", [30, 100], 2)
    assert "40 (reduced)" in table and "not judged: fewer steps than the paper" in table
    assert all(row["std"] > 0 for row in rows)  # the seeds differ

    # A second call finds every run finished and starts none.
    again = run_sweep("o5_regression", tmp_path, "--workers", "2")
    assert again.returncode == 0
    assert "4 runs, 4 already finished" in again.stderr


def test_hulls_smoke_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAROOT", str(tmp_path / "data"))
    result = run_sweep("hulls", tmp_path, "--workers", "2")
    assert result.returncode == 0, result.stderr
    check_outputs("hulls", tmp_path, tmp_path / "out", [64, 256], 1)


def test_skeletons_smoke_sweep(tmp_path, monkeypatch):
    if not SKELETONS.exists():
        pytest.skip(f"{SKELETONS} is absent: the skeleton data live in ../shared")
    monkeypatch.setenv("DATAROOT", str(SKELETONS.parent))
    result = run_sweep("o3_skeletons", tmp_path, "--workers", "2")
    assert result.returncode == 0, result.stderr
    rows, _ = check_outputs("o3_skeletons", tmp_path, tmp_path / "out", [260, 520], 1)
    assert all(0 <= row["mean"] <= 1 for row in rows)


def test_bad_sweep_files_are_one_line_errors(tmp_path):
    missing = run_sweep("nonexistent", tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: o5_regression\ngird: {seed: [1]}\n")
    with pytest.raises(sweep.SweepError, match=r"unknown keys \['gird'\]"):
        sweep.read_sweep(bad)
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(sweep.SweepError, match="is not valid YAML"):
        sweep.read_sweep(bad)
    bad.write_text("experiment: mnist\n")
    with pytest.raises(sweep.SweepError, match="experiment must be one of"):
        sweep.read_sweep(bad)


def test_grid_expands_to_every_combination(tmp_path):
    spec = sweep.read_sweep(REPO / "configs/sweeps/o5_regression.yaml")
    runs = sweep.expand(spec, tmp_path)
    assert len(runs) == 21 and len({run.base for run in runs}) == 21
    arguments = sweep.command(spec, runs[0])
    assert arguments[1].endswith("o5_regression.py")
    assert "--dataset.num_samples=30" in arguments and "--seed=0" in arguments


def test_only_and_set_select_and_change_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "engineer.sweep", "configs/sweeps/o5_regression.yaml",
         "--sweeps-dir", str(tmp_path), "--dry-run", "--only", "dataset.num_samples=300",
         "--set", "trainer.max_steps=64"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    planned = [line for line in result.stderr.splitlines() if "would run" in line]
    assert len(planned) == 3
    assert all("--dataset.num_samples=300 " in line and "--trainer.max_steps=64" in line
               for line in planned)
    assert not any(tmp_path.iterdir())  # a dry run creates nothing


def test_options_that_leave_the_numbers_alone_keep_the_run_key(tmp_path):
    spec = sweep.read_sweep(REPO / "configs/sweeps/smoke/o5_regression.yaml")
    faster = {**spec, "options": {**spec["options"], "trainer.compile": True,
                                  "trainer.num_threads": 2}}
    other = {**spec, "options": {**spec["options"], "trainer.max_steps": 41}}
    keys = [[run.key for run in sweep.expand(s, tmp_path)] for s in (spec, faster, other)]
    assert keys[0] == keys[1] and keys[0] != keys[2]
    assert "--trainer.compile=True" in sweep.command(faster, sweep.expand(faster, tmp_path)[0])


def test_interrupted_runs_are_resumed_not_counted(tmp_path):
    spec = sweep.read_sweep(REPO / "configs/sweeps/smoke/o5_regression.yaml")
    run = sweep.expand(spec, tmp_path)[0]
    run_dir = run.base / "o5_regression" / "default-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text('{"status": "interrupted at step 30"}')
    (run_dir / "last.pt").write_bytes(b"")
    assert run.results() is None
    assert run.interrupted_checkpoint() == run_dir / "last.pt"
    assert f"--trainer.resume={run_dir / 'last.pt'}" in sweep.command(spec, run)
    (run_dir / "results.json").write_text('{"status": "finished"}')
    assert run.results() == run_dir / "results.json"
    assert run.interrupted_checkpoint() is None


def test_ctrl_c_stops_the_sweep_and_starts_no_further_run(tmp_path):
    # Long runs, one at a time: Ctrl-C (SIGINT to the terminal's process group) comes while
    # the first one trains; the three queued ones must not start after it.
    process = subprocess.Popen(
        [sys.executable, "-m", "engineer.sweep", "configs/sweeps/smoke/o5_regression.yaml",
         "--sweeps-dir", str(tmp_path), "--workers", "1", "--set", "trainer.max_steps=10000000",
         "--set", "trainer.val_check_interval=100"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("**/metrics.jsonl")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "interrupted; the same command continues it" in stderr
    assert len(list(tmp_path.glob("**/sweep.log"))) == 1


def test_misspelled_option_fails_before_any_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "engineer.sweep", "configs/sweeps/smoke/o5_regression.yaml",
         "--sweeps-dir", str(tmp_path), "--set", "trainer.max_stepz=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "trainer.max_stepz" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_targets_are_judged_only_at_the_paper_step_count():
    records = [{"num_samples": 100, "max_steps": steps, "seed": seed, "value": value,
                "wall_time_s": 5.0}
               for steps, seed, value in [(50, 0, 1.0), (50, 1, 3.0), (10, 0, 0.1)]]
    target = {"num_samples": 100, "at_most": 2.5}
    rows = aggregate.summarize(records, target, paper_steps=50)
    assert [(row["max_steps"], row["mean"], row["target"]) for row in rows] == [
        (10, 0.1, "not judged: fewer steps than the paper"), (50, 2.0, "met (<= 2.5)")]
    assert aggregate.summarize(records[:2], {"num_samples": 100, "at_least": 2.5})[0][
        "target"] == "MISSED (>= 2.5)"


def test_a_run_finished_by_another_sweep_meanwhile_is_not_run_again(tmp_path):
    run = sweep.Run("seed=0", {"seed": 0}, tmp_path)
    marker = tmp_path / "ran"
    arguments = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    finished = tmp_path / "o5_regression" / "default-seed0" / "results.json"
    finished.parent.mkdir(parents=True)
    finished.write_text('{"status": "running"}')
    assert sweep.execute(run, arguments) == 0 and marker.exists()
    marker.unlink()
    finished.write_text('{"status": "finished"}')
    assert sweep.execute(run, arguments) == 0 and not marker.exists()
