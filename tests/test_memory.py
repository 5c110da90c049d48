"""The malloc setting that stops a training step from faulting its memory in at every step."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Page faults per hulls training step, averaged over eight steps after four warm-up steps.
FAULTS_PER_STEP = textwrap.dedent("""
    import resource, sys
    import torch
    from engineer.memory import keep_freed_memory
    from models.deepspheres import DEH_hulls
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.set_num_threads(1)
    model = DEH_hulls()
    points = torch.randn(128, 16, 5)
    faults = []
    for _ in range(13):
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        model(points).square().mean().backward()
    print((faults[-1] - faults[4]) / 8)
""")


def faults_per_step(mode: str) -> float:
    # On the tensor code: the compiled kernels (models/native.py) keep their work in small
    # per-sample buffers and fault in little memory either way.
    environment = {**os.environ, "DEEPSPHERES_NATIVE": "0"}
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=REPO,
                            capture_output=True, text=True, check=True, env=environment)
    return float(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux only")
def test_training_steps_reuse_freed_memory():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    # A step needs tens of megabytes, thousands of 4 KiB pages: by default they are faulted
    # in again at every step; kept, they are reused.
    assert default > 2000
    assert kept < min(1000, default / 4)
