"""Where the time of a hulls training step goes, printed as Markdown tables.

Table 1 splits a training step of the hulls preset (batch 128, one thread, fused Adam, freed
memory kept as the entry scripts keep it) into phases timed one after the other: the sphere
layers with their biases and normalizations, the readout (Gram matrices, sorted rows, pooling),
the head and loss, the backward pass, and the optimizer step. The backward pass is timed as a
whole; the readout's share of it is timed again on its own, from the same inputs and output
gradients. Table 2 lists the operators with the most self time under ``torch.profiler``. The
step runs on the compiled CPU kernels of ``models/native.py`` unless the environment variable
``DEEPSPHERES_NATIVE=0`` turns them off.

Usage: ``python -m benchmarks.profile_hulls [--steps 50] [--threads 1]``.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engineer.memory import keep_freed_memory  # noqa: E402
from models import native  # noqa: E402
from models.deepspheres import DEH_hulls, pooled_sorted_gram  # noqa: E402

BATCH = 128


def detached(tensor: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``tensor`` that collects its gradient, to cut the graph between phases."""
    return tensor.detach().requires_grad_()


def cut_backward(model, points: torch.Tensor, targets: torch.Tensor, lap) -> None:
    """Forward and backward of the mean squared error, with the graph cut between phases.

    The graph is cut between the layers, the readout and the head, and the backward pass runs
    through the three pieces in turn, so that each phase's backward can be timed alone; the
    parameters get the same gradients as from one uncut backward. ``lap(name)`` is called as
    each phase ends.
    """
    if native.usable(points):  # the compiled kernels, in their layout
        y = model.native_features(points)  # (batch, channels, dim, lanes)
        lap("sphere layers, forward")
        y_cut = detached(y)
        features = native.sorted_gram_readout(y_cut, model.num_points).flatten(1)
    else:
        y = model.equivariant_features(points)  # (batch, points, channels, dim)
        lap("sphere layers, forward")
        y_cut = detached(y)
        pooled = torch.stack(pooled_sorted_gram(y_cut.permute(3, 1, 0, 2)))
        features = pooled.permute(2, 0, 1, 3).flatten(1)  # (batch, features)
    lap("readout, forward")
    features_cut = detached(features)
    output = model.linear2(torch.nn.functional.silu(model.linear1(features_cut)))
    loss = (output - targets).square().mean()
    lap("head and loss, forward")
    loss.backward()
    lap("head and loss, backward")
    features.backward(features_cut.grad)
    lap("readout, backward")
    y.backward(y_cut.grad)
    lap("sphere layers, backward")


def phase_times(steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each phase of a hulls training step, and of the whole step."""
    torch.manual_seed(0)
    model = DEH_hulls()
    points = torch.randn(BATCH, model.num_points, model.space_dim)
    targets = torch.randn(BATCH, model.linear2.out_features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    times: dict[str, list[float]] = {}
    last = 0.0

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times.setdefault(name, []).append((now - last) * 1e3)
        last = now

    for step in range(warmup + steps):
        if step == warmup:
            times.clear()
        optimizer.zero_grad()
        start = last = time.perf_counter()
        cut_backward(model, points, targets, lap)
        optimizer.step()
        lap("Adam step")
        times.setdefault("whole step", []).append((last - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def operator_table(steps: int, rows: int) -> str:
    """The operators with the most self CPU time over ``steps`` uncut training steps."""
    torch.manual_seed(0)
    model = DEH_hulls()
    points = torch.randn(BATCH, model.num_points, model.space_dim)
    targets = torch.randn(BATCH, model.linear2.out_features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def train_step():
        optimizer.zero_grad()
        (model(points) - targets).square().mean().backward()
        optimizer.step()

    for _ in range(5):
        train_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            train_step()
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | calls per step | self time per step (ms) | share |",
             "| --- | ---: | ---: | ---: |"]
    for event in events[:rows]:
        lines.append(f"| `{event.key}` | {event.count / steps:.0f} | "
                     f"{event.self_cpu_time_total / steps / 1e3:.2f} | "
                     f"{event.self_cpu_time_total / total:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--rows", type=int, default=12, help="operators in table 2")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    keep_freed_memory()

    phases = phase_times(options.steps, warmup=10)
    whole = phases.pop("whole step")
    print(f"Hulls training step, batch {BATCH}, {options.threads} thread(s), median of "
          f"{options.steps} steps: {whole:.1f} ms\n")
    print("| phase | ms | share |\n| --- | ---: | ---: |")
    for name, milliseconds in phases.items():
        print(f"| {name} | {milliseconds:.2f} | {milliseconds / whole:.0%} |")
    print(f"\nOperators by self time under torch.profiler ({options.steps} steps):\n")
    print(operator_table(options.steps, options.rows))


if __name__ == "__main__":
    main()
