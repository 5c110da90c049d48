"""Two processes under torchrun train like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engineer.config import parse
from engineer.experiments import EXPERIMENTS
from engineer.runner import run

REPO = Path(__file__).resolve().parents[1]
O5 = EXPERIMENTS["o5_regression"]

# Summation order differs between one and two processes (shard sums, gradient all-reduce), so
# numbers agree to float32 rounding, amplified a little by twenty optimizer steps.
RTOL = 1e-5
# A batch of 31 splits into shards of 16 and 15; 256 samples end each epoch with a batch of 8.
ARGUMENTS = ["--trainer.progress_bar=False", "--trainer.device=cpu", "--dataset.num_samples=256",
             "--dataset.batch_size=31", "--trainer.max_steps=20",
             "--trainer.val_check_interval=10", "--trainer.log_every=1"]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "o5_regression.py", f"--trainer.runs_dir={tmp_path / 'two'}", *ARGUMENTS],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = run(O5, parse([f"--trainer.runs_dir={tmp_path / 'one'}", *ARGUMENTS], O5.configs,
                           O5.seed))

    # One run directory, written by the first process only; the other logged no progress.
    [two_dir] = (tmp_path / "two" / "o5_regression").iterdir()
    one_dir = Path(single["run_dir"])
    assert two_dir.name == one_dir.name
    assert sorted(os.listdir(two_dir)) == ["best.pt", "last.pt", "metrics.jsonl", "results.json"]
    assert "process 1 of 2 (gloo on cpu)" in result.stderr
    assert result.stderr.count("step 20: val loss") == 1

    # The same metrics at every step, to float tolerance.
    two = json.loads((two_dir / "results.json").read_text())
    assert two["status"] == "finished" and two["best"]["step"] == single["best"]["step"]
    for split in ("val", "test"):
        assert two["best"][split]["loss"] == pytest.approx(single["best"][split]["loss"],
                                                           rel=RTOL)
    two_records, one_records = read_records(two_dir), read_records(one_dir)
    assert [sorted(r) for r in two_records] == [sorted(r) for r in one_records]
    for two_record, one_record in zip(two_records, one_records):
        for key, value in one_record.items():
            assert two_record[key] == pytest.approx(value, rel=RTOL), (key, one_record["step"])

    # The same checkpoint format: the unwrapped module's weights, no DDP prefix.
    two_state = torch.load(two_dir / "last.pt", weights_only=True)
    one_state = torch.load(one_dir / "last.pt", weights_only=True)
    assert sorted(two_state) == sorted(one_state)
    assert list(two_state["model"]) == list(one_state["model"])
    for name, tensor in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][name], tensor, rtol=1e-4, atol=1e-6)
    assert two_state["train"]["data"] == one_state["train"]["data"]
