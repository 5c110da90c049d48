"""The run directory: checkpoints, `metrics.jsonl` and `results.json` of one training run.

The directory is `<base>/<experiment>/<options>-seed<N>`, where `<options>` lists the options
that differ from the experiment's defaults (`default` when none do, a hash when the list is
long). Metric records are kept in memory and the whole `metrics.jsonl` is rewritten at every
checkpoint, so the file always matches the last checkpoint and a resumed run can continue it.

Every file is written under a temporary name (`.<name>.<pid>.tmp`) and renamed, so a run killed
at any moment leaves only complete files, plus possibly one temporary file, which nothing
reads and which is deleted when the run is resumed.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from loggers.files import save_torch_atomic, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)

MAX_NAME = 80
# Free space a run needs at start-up: its checkpoints and logs take a few megabytes.
MIN_FREE_BYTES = 100 * 2**20


def run_name(changed: dict[str, Any], seed: int) -> str:
    """A readable directory name from the options that differ from the defaults."""
    if not changed:
        options = "default"
    else:
        options = ",".join(f"{key}={value}" for key, value in sorted(changed.items()))
        options = options.replace("/", "_").replace(" ", "")
        if len(options) > MAX_NAME:
            digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode())
            options = f"options-{digest.hexdigest()[:10]}"
    return f"{options}-seed{seed}"


class RunDirectoryError(Exception):
    """The run directory cannot be created or written."""


def check_writable(path: str | Path) -> None:
    """Refuse a run directory that could not be written, or whose disk is nearly full.

    The directory need not exist yet; its nearest existing ancestor is checked, and nothing
    is created.

    Raises:
        RunDirectoryError: the path is blocked by a file, not writable, or on a disk with less
            than `MIN_FREE_BYTES` free.
    """
    path = Path(path)
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(
            f"cannot create the run directory {path}: {existing} is not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"the run directory {path} is not writable ({existing})")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise RunDirectoryError(
            f"the disk of the run directory {path} is full: {free / 2**20:.1f} MiB free, a run "
            f"needs at least {MIN_FREE_BYTES // 2**20} MiB"
        )


class RunDirectory:
    """Files of one run.

    Args:
        path: the run directory; created if needed.
        resume_step: when resuming, the step of the checkpoint: metric records after it are
            dropped from the existing `metrics.jsonl`.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirectoryError(
                f"cannot create the run directory {self.path}: {error.strerror}"
            ) from None
        check_writable(self.path)
        for stale in self.path.glob(".*.tmp"):  # left by a killed run; never read
            stale.unlink(missing_ok=True)
        metrics = self.path / "metrics.jsonl"
        if resume_step is not None and metrics.exists():
            lines = metrics.read_text().splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            self.records = [record for record in records if record["step"] <= resume_step]

    @classmethod
    def fresh(cls, base: str | Path, experiment: str, name: str) -> "RunDirectory":
        """A new run directory; a numbered suffix avoids overwriting an earlier run."""
        path = Path(base) / experiment / name
        suffix = 1
        while path.exists() and any(path.iterdir()):
            path = Path(base) / experiment / f"{name}-{suffix}"
            suffix += 1
        return cls(path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics of a step (one record per step); they reach the disk at `flush`."""
        if self.records and self.records[-1]["step"] == step:
            self.records[-1].update(metrics)
        else:
            self.records.append({"step": step, **metrics})

    def flush(self) -> None:
        write_jsonl_atomic(self.path / "metrics.jsonl", self.records)

    def save_checkpoint(self, name: str, state: dict) -> Path:
        path = self.path / name
        save_torch_atomic(path, state)
        return path

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.path / "results.json", results)
