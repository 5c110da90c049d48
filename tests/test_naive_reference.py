"""The naive reference, the benchmarks' stand-in for the published code, agrees with the model."""

import pytest
import torch

from models import deepspheres
from models.deepspheres import DEH_hulls, DEH_o5reg, DEH_skeletons
from models.hyperspheres import filter_banks
from tests import naive_reference as naive
from tests.equivariance import MODEL_ATOL_FLOAT64

PRESETS = {"o5reg": DEH_o5reg, "hulls": DEH_hulls, "skeletons": DEH_skeletons}


@pytest.fixture(params=["sorting network", "torch.sort"])
def readout_path(request, monkeypatch):
    """Run a test with the model's readout sorting by its network, or by torch.sort."""
    network = request.param == "sorting network"
    monkeypatch.setattr(deepspheres, "MIN_NETWORK_SLICE", 0 if network else 10**12)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_dense_filter_banks_match_the_model(n):
    generator = torch.Generator().manual_seed(n)
    spheres = torch.rand(6, n + 2, generator=generator, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(naive.dense_filter_banks(spheres), filter_banks(spheres),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", PRESETS)
def test_naive_forward_matches_the_model_in_float64(name, readout_path):
    torch.manual_seed(0)
    model = PRESETS[name]().double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in [*model.biases, *(norm.a for norm in model.norm_layers)]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    points = torch.randn(5, model.num_points, model.space_dim, generator=generator,
                         dtype=torch.float64)
    torch.testing.assert_close(naive.naive_forward(model, points), model(points), rtol=0,
                               atol=MODEL_ATOL_FLOAT64)


@pytest.mark.parametrize("name", PRESETS)
def test_naive_gradients_match_the_model(name, readout_path):
    torch.manual_seed(2)
    model = PRESETS[name]().double()
    points = torch.randn(4, model.num_points, model.space_dim, dtype=torch.float64)
    gradients = []
    for forward in (model, lambda x: naive.naive_forward(model, x)):
        model.zero_grad()
        forward(points).square().sum().backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for fast, slow in zip(*gradients, strict=True):
        torch.testing.assert_close(slow, fast, rtol=1e-9, atol=1e-9)
