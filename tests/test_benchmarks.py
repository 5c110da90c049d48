"""The benchmark scripts run and print their tables; the profile times a real step."""

import torch

from benchmarks import profile_hulls, speed
from models.deepspheres import DEH_hulls


def test_quick_benchmark_prints_both_tables(capsys):
    speed.main(["--quick", "--threads", "1"])
    output = capsys.readouterr().out
    assert "| preset | batch | threads |" in output
    for preset in speed.PRESETS:
        assert f"| {preset} | " in output
    assert "| n | spheres K |" in output
    assert "| 5 | 8 |" in output


def test_the_profiled_step_computes_the_gradients_of_a_training_step():
    torch.manual_seed(0)
    model = DEH_hulls().double()
    points = torch.randn(4, model.num_points, model.space_dim, dtype=torch.float64)
    targets = torch.randn(4, 1, dtype=torch.float64)
    (model(points) - targets).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    phases = []
    profile_hulls.cut_backward(model, points, targets, phases.append)
    assert len(phases) == 6
    for parameter, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-12, atol=1e-14)


def test_profile_prints_the_phases_and_the_operators(capsys):
    profile_hulls.main(["--steps", "2", "--rows", "3"])
    output = capsys.readouterr().out
    assert "| readout, backward |" in output
    assert output.count("| `") == 3
