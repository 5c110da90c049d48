"""Numerical edge cases of the model: extreme scales, coincident points, wild parameters."""

import pytest
import torch

from models.deepspheres import DEH_hulls, DEH_o5reg, DEH_skeletons, DeepSpheres
from tests.equivariance import group_elements, max_relative_error

# Relative output error allowed under O(n) in float64 at extreme input scales: the embedding
# squares coordinates, so 1e6 becomes 1e12 and leaves about four fewer significant digits.
EXTREME_RTOL_FLOAT64 = 1e-7


def check_invariant(model, points, rtol):
    generator = torch.Generator().manual_seed(0)
    outputs = model(points)
    assert torch.isfinite(outputs).all()
    for q in group_elements(model.space_dim, generator, dtype=points.dtype):
        transformed = points @ q.T
        if model.permutation_invariant:
            transformed = transformed[:, torch.randperm(model.num_points, generator=generator)]
        assert max_relative_error(model(transformed), outputs) < rtol


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("preset", [DEH_o5reg, DEH_hulls, DEH_skeletons])
def test_extreme_coordinate_scales(preset, scale):
    torch.manual_seed(1)
    model = preset().double()
    points = scale * torch.randn(4, model.num_points, model.space_dim, dtype=torch.float64)
    check_invariant(model, points, EXTREME_RTOL_FLOAT64)
    assert torch.isfinite(model.float()(points.float())).all()


@pytest.mark.parametrize("preset", [DEH_hulls, DEH_skeletons])
def test_duplicate_points_and_all_points_at_origin(preset):
    torch.manual_seed(2)
    model = preset().double()
    points = torch.randn(3, model.num_points, model.space_dim, dtype=torch.float64)
    points[:, 1::2] = points[:, ::2][:, : points[:, 1::2].shape[1]]  # every point twice
    check_invariant(model, points, 1e-10)
    origin = torch.zeros(2, model.num_points, model.space_dim, dtype=torch.float64)
    outputs = model(origin)
    assert torch.isfinite(outputs).all()
    torch.testing.assert_close(outputs[0], outputs[1])


def test_single_point():
    torch.manual_seed(3)
    model = DeepSpheres(depth=2, width=[3, 2], space_dim=3, num_points=1).double()
    check_invariant(model, torch.randn(5, 1, 3, dtype=torch.float64), 1e-10)


def test_spheres_driven_wild_by_a_large_learning_rate_stay_finite_and_invariant():
    # Adam moves every parameter by about the learning rate per step, so after a few steps
    # at lr = 100 the spheres are far from their initial scale of 0.4 and many last entries
    # have crossed zero (centres through infinity).
    torch.manual_seed(4)
    model = DEH_hulls().double()
    initial = model.spheres[0].spheres().detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=100.0)
    points = torch.randn(16, 16, 5, dtype=torch.float64)
    targets = 1e3 * torch.randn(16, 1, dtype=torch.float64)
    for _ in range(10):
        optimizer.zero_grad()
        (model(points) - targets).square().mean().backward()
        optimizer.step()
    spheres = model.spheres[0].spheres()
    assert spheres.abs().max() > 100
    assert (torch.sign(spheres[:, -1]) != torch.sign(initial[:, -1])).any()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    check_invariant(model, points, 1e-8)


def test_spheres_with_zero_entries_give_finite_outputs():
    model = DEH_skeletons().double()
    with torch.no_grad():
        model.spheres[0].weight.zero_()  # every centre at the origin, every last entry zero
        model.spheres[1].weight[:, -1] = 0
    check_invariant(model, torch.randn(3, 20, 3, dtype=torch.float64), 1e-10)
