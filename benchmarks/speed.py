"""Speed of the model against the naive reference, printed as Markdown tables.

Table 1, per preset at the paper's batch size and per number of threads: the median time of a
training step (forward, backward, Adam step) after a warm-up, inference throughput (forward
without gradients), and the peak resident memory a training step adds, for the model (on the
compiled CPU kernels of ``models/native.py``), for the model on its tensor code alone (kernels
switched off), and for ``tests/naive_reference.py`` (a batched stand-in for the published code
that computes what it computes, the way it computes it). The model runs as the entry scripts
run it, with fused Adam and freed memory kept in the process (``engineer/memory.py``); the
naive one with torch's defaults. With ``--compiled`` the table also trains the model through
``torch.compile`` (``trainer.compile=True``, with the kernels): the step time once compiled,
and how long compiling took. Each configuration runs in a fresh subprocess, so that the thread
setting and ``ru_maxrss`` (the peak resident set size, a high-water mark) belong to it alone;
memory is that peak after the timed steps minus the one before the first step.

Table 2: one layer of spheres over the space dimension ``n`` and the number of spheres ``K``
(4 input channels, ``K / 4`` spheres each, 32 samples of 16 points): time to build the filter
banks, and a forward and backward pass, for both implementations; then a block (the layer with
a bias and the gated normalization, as in the network) forward and backward, in the tensor code
and in the CPU kernel. The naive one is skipped where its dense matrices would take more than
100 MB.

Usage: ``python -m benchmarks.speed [--quick] [--threads 1 2] [--steps 200] [--compiled]``.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engineer.memory import keep_freed_memory  # noqa: E402
from engineer.trainer import compiled  # noqa: E402
from models import native  # noqa: E402
from models.deepspheres import (DEH_hulls, DEH_o5reg, DEH_skeletons,  # noqa: E402
                                GatedNormalization)
from models.hyperspheres import EquivariantHyperspheres  # noqa: E402
from tests import naive_reference as naive  # noqa: E402

PRESETS = {"O(5) regression": (DEH_o5reg, 32), "O(5) hulls": (DEH_hulls, 128),
           "O(3) skeletons": (DEH_skeletons, 32)}
IMPLEMENTATIONS = ("model", "tensors", "naive")
SCALING_DIMS = (3, 5, 8, 16, 32, 64)
SCALING_SPHERES = (8, 64, 512)
SCALING_CHANNELS = 4
# Largest dense (K, n + 1, n + 2, n + 2) float64 tensor the naive filter banks may build.
NAIVE_MAX_BYTES = 100e6
# Run every measurement in its own subprocess (see run_child).
ISOLATED = True


def median_time(function, steps: int, warmup: int) -> float:
    """Median wall time of ``function()`` in seconds over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_preset(preset: str, implementation: str, threads: int, steps: int,
                   warmup: int) -> dict:
    """Training-step time, inference throughput and training memory of one configuration.

    The model trains as the entry scripts train it (fused Adam, freed memory kept in the
    process); the naive stand-in with torch's defaults, as the published code does.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    os.environ[native.ENVIRONMENT_SWITCH] = "0" if implementation == "tensors" else "1"
    native.reset()
    build, batch = PRESETS[preset]
    model = build()
    ours = implementation != "naive"
    if ours:
        keep_freed_memory()
    forward = model if ours else (lambda x: naive.naive_forward(model, x))
    points = torch.randn(batch, model.num_points, model.space_dim)
    targets = torch.randn(batch, model.linear2.out_features)
    compile_time = None
    if implementation == "compiled":
        forward = compiled(model)
        started = time.perf_counter()
        forward(points).square().mean().backward()
        compile_time = time.perf_counter() - started
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=ours or None)

    def train_step():
        optimizer.zero_grad()
        loss = (forward(points) - targets).square().mean()
        loss.backward()
        optimizer.step()

    before = peak_rss_mib()
    step_time = median_time(train_step, steps, warmup)
    memory = peak_rss_mib() - before
    if compile_time is not None:  # inference would compile another graph
        return {"step_ms": step_time * 1e3, "compile_s": compile_time}
    with torch.no_grad():
        inference_time = median_time(lambda: forward(points), steps, warmup)
    return {"step_ms": step_time * 1e3, "samples_per_s": batch / inference_time,
            "memory_mib": memory}


def measure_scaling(n: int, num_spheres: int, implementation: str, steps: int,
                    warmup: int) -> dict:
    """Filter-bank time and layer forward-and-backward time of one layer, one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if implementation != "naive":
        keep_freed_memory()
    layer = EquivariantHyperspheres(n, SCALING_CHANNELS, num_spheres // SCALING_CHANNELS)
    points = torch.randn(32, 16, SCALING_CHANNELS, n)
    # A block: the layer, a bias per sphere and the gated normalization (gates at 0.5).
    bias = torch.zeros(num_spheres, requires_grad=True)
    normalize = GatedNormalization(num_spheres)
    if implementation == "model":
        banks, forward = layer.filter_bank, layer
    elif implementation == "block":
        banks = layer.filter_bank

        def forward(x):
            return normalize(layer(x) + bias.view(-1, 1))
    elif implementation == "kernel":  # the same block, in the kernels' layout
        points = points.permute(0, 2, 3, 1).contiguous()  # (batch, channels, n, 16 lanes)
        banks = layer.filter_bank

        def forward(x):
            return native.sphere_block(x, banks(), bias, torch.sigmoid(normalize.a), 16,
                                       pool_points=True)
    else:
        def banks():
            return naive.dense_filter_banks(layer.spheres())

        def forward(x):
            return naive.all_channels_layer(x, banks(), layer.width)

    def train_step():
        layer.zero_grad()
        forward(points).square().sum().backward()

    with torch.no_grad():
        bank_time = median_time(banks, steps, warmup)
    return {"bank_ms": bank_time * 1e3, "layer_ms": median_time(train_step, steps, warmup) * 1e3}


def run_child(task: dict) -> dict:
    """Run one measurement in a fresh interpreter and return its result.

    With ``ISOLATED`` off (the quick smoke run) it runs in this process instead: faster to
    start, but memory and thread settings then carry over between measurements.
    """
    if not ISOLATED:
        task = dict(task)
        kind = task.pop("kind")
        return measure_preset(**task) if kind == "preset" else measure_scaling(**task)
    command = [sys.executable, "-m", "benchmarks.speed", "--child", json.dumps(task)]
    # Compile from scratch, as a first run does, rather than from inductor's on-disk cache.
    environment = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True,
                          env=environment)
    return json.loads(done.stdout.strip().splitlines()[-1])


def preset_table(threads: list[int], steps: int, warmup: int, with_compiled: bool) -> str:
    header = ("| preset | batch | threads | model step (ms) | tensor-code step (ms) "
              "| naive step (ms) | step speed-up "
              "| model inference (samples/s) | naive inference (samples/s) "
              "| model memory (MiB) | naive memory (MiB) |")
    if with_compiled:
        header += " compiled step (ms) | compiled speed-up | compile time (s) |"
    lines = [header, "|" + " --- |" * 3 + " ---: |" * (header.count("|") - 4)]
    for preset, (_, batch) in PRESETS.items():
        implementations = IMPLEMENTATIONS + (("compiled",) if with_compiled else ())
        for count in threads:
            results = {implementation: run_child(dict(
                kind="preset", preset=preset, implementation=implementation, threads=count,
                steps=steps, warmup=warmup)) for implementation in implementations}
            fast, slow = results["model"], results["naive"]
            line = (f"| {preset} | {batch} | {count} | {fast['step_ms']:.2f} | "
                    f"{results['tensors']['step_ms']:.2f} | {slow['step_ms']:.2f} | "
                    f"{slow['step_ms'] / fast['step_ms']:.1f}x | "
                    f"{fast['samples_per_s']:,.0f} | {slow['samples_per_s']:,.0f} | "
                    f"{fast['memory_mib']:.1f} | {slow['memory_mib']:.1f} |")
            if with_compiled:
                ahead = results["compiled"]
                line += (f" {ahead['step_ms']:.2f} | {slow['step_ms'] / ahead['step_ms']:.1f}x | "
                         f"{ahead['compile_s']:.0f} |")
            lines.append(line)
    return "\n".join(lines)


def scaling_table(dims, spheres, steps: int, warmup: int) -> str:
    lines = ["| n | spheres K | model banks (ms) | naive banks (ms) | model layer fwd+bwd (ms) "
             "| naive layer fwd+bwd (ms) | layer speed-up | tensor-code block fwd+bwd (ms) "
             "| kernel block fwd+bwd (ms) | block speed-up |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in dims:
        for num_spheres in spheres:
            fast, block, kernel = (
                run_child(dict(kind="scaling", n=n, num_spheres=num_spheres,
                               implementation=implementation, steps=steps, warmup=warmup))
                for implementation in ("model", "block", "kernel"))
            dense_bytes = num_spheres * (n + 1) * (n + 2) ** 2 * 8
            if dense_bytes <= NAIVE_MAX_BYTES:
                slow = run_child(dict(kind="scaling", n=n, num_spheres=num_spheres,
                                      implementation="naive", steps=steps, warmup=warmup))
                naive_bank, naive_layer = f"{slow['bank_ms']:.3f}", f"{slow['layer_ms']:.2f}"
                ratio = f"{slow['layer_ms'] / fast['layer_ms']:.1f}x"
            else:
                naive_bank = naive_layer = ratio = "skipped"
            lines.append(f"| {n} | {num_spheres} | {fast['bank_ms']:.3f} | {naive_bank} | "
                         f"{fast['layer_ms']:.2f} | {naive_layer} | {ratio} | "
                         f"{block['layer_ms']:.2f} | {kernel['layer_ms']:.2f} | "
                         f"{block['layer_ms'] / kernel['layer_ms']:.1f}x |")
    return "\n".join(lines)


def machine_description() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, load average {load} "
            "(1, 5, 15 min) at the start")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in this process: few steps, the smallest scaling "
                        "sizes; memory figures are then not isolated")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="intra-op thread counts of table 1")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--tables", nargs="+", choices=["presets", "scaling"],
                        default=["presets", "scaling"], help="which tables to print")
    parser.add_argument("--compiled", action="store_true",
                        help="add training steps through torch.compile (trainer.compile) to "
                        "table 1; each configuration compiles for tens of seconds first")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        task = json.loads(args.child)
        kind = task.pop("kind")
        result = measure_preset(**task) if kind == "preset" else measure_scaling(**task)
        print(json.dumps(result))
        return

    global ISOLATED
    ISOLATED = not args.quick
    steps, warmup = (3, 1) if args.quick else (args.steps, max(10, args.steps // 10))
    dims, spheres = ((3, 5), (8,)) if args.quick else (SCALING_DIMS, SCALING_SPHERES)
    print(f"Machine: {machine_description()}.", flush=True)
    if "presets" in args.tables:
        print(f"\nTraining step and inference, median of {steps} after {warmup} warm-up "
              "steps:\n")
        print(preset_table(args.threads, steps, warmup, args.compiled), flush=True)
    if "scaling" in args.tables:
        print(f"\nOne layer, {SCALING_CHANNELS} input channels, batch 32 of 16 points, one "
              f"thread (median of {steps}):\n")
        print(scaling_table(dims, spheres, steps, warmup), flush=True)


if __name__ == "__main__":
    main()
