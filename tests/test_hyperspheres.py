"""The layer and its pure functions: known values, equivariance, degenerate spheres."""

import math

import pytest
import torch

from models import hyperspheres as hs
from tests import plain_reference as plain
from tests.equivariance import LAYER_ATOL_FLOAT64, group_elements

DIMENSIONS = [2, 3, 4, 5, 8, 16]


def random_spheres(num: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(num, n + 2, generator=generator, dtype=torch.float64)


def layer_from_spheres(spheres: torch.Tensor) -> hs.EquivariantHyperspheres:
    """A one-channel float64 layer holding the given spheres ``(K, n + 2)``."""
    layer = hs.EquivariantHyperspheres(spheres.shape[1] - 2, 1, spheres.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(spheres[..., None])
    return layer


# Known values

@pytest.mark.parametrize("n", DIMENSIONS)
def test_simplex_vertices_are_unit_with_inner_products_minus_one_over_n(n):
    vertices = hs.regular_simplex(n)
    expected = torch.full((n + 1, n + 1), -1 / n, dtype=torch.float64)
    expected.fill_diagonal_(1)
    torch.testing.assert_close(vertices @ vertices.T, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(vertices[0], torch.full((n,), 1 / math.sqrt(n),
                                                       dtype=torch.float64))
    torch.testing.assert_close(vertices, plain.simplex(n), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", DIMENSIONS)
def test_change_of_basis_is_orthogonal_and_maps_ones_to_last_axis(n):
    m = hs.change_of_basis(n)
    eye = torch.eye(n + 1, dtype=torch.float64)
    torch.testing.assert_close(m.T @ m, eye, rtol=0, atol=1e-14)
    expected = torch.zeros(n + 1, dtype=torch.float64)
    expected[-1] = math.sqrt(n + 1)
    torch.testing.assert_close(m @ torch.ones(n + 1, dtype=torch.float64), expected,
                               rtol=0, atol=1e-14)


def test_change_of_basis_closed_form_for_n_3():
    expected = 0.5 * torch.tensor([[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1],
                                   [1, 1, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(hs.change_of_basis(3), expected, rtol=0, atol=1e-15)


def test_embedding_inner_product_gives_sign_of_inside_and_outside():
    # A sphere with centre c and radius r is s = (c, (|c|^2 - r^2) / 2, 1): then
    # <X, s> = (r^2 - |x - c|^2) / 2, positive inside and negative outside.
    centre, radius = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 1.5
    sphere = torch.cat([centre, torch.tensor([(centre @ centre - radius**2) / 2, 1.0],
                                             dtype=torch.float64)])
    points = torch.randn(100, 3, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64) * 2 + centre
    expected = (radius**2 - ((points - centre) ** 2).sum(dim=1)) / 2
    torch.testing.assert_close(hs.embed_points(points) @ sphere, expected)


@pytest.mark.parametrize("n", DIMENSIONS)
def test_rotations_map_p_to_q_with_determinant_one(n):
    generator = torch.Generator().manual_seed(n)
    p = torch.nn.functional.normalize(torch.randn(10, n, generator=generator,
                                                  dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(torch.randn(10, n, generator=generator,
                                                  dtype=torch.float64), dim=1)
    q[0] = -p[0]  # antipodal pair
    rotations = hs.rotation_between(p, q)
    torch.testing.assert_close((rotations @ p[..., None])[..., 0], q, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(rotations[1:], torch.stack([plain.rotation(a, b) for a, b in
                                                           zip(p[1:], q[1:])]))


@pytest.mark.parametrize("n", DIMENSIONS)
def test_simplex_rotations_take_vertex_0_to_each_vertex(n):
    vertices = hs.regular_simplex(n)
    rotations = hs.simplex_rotations(vertices)
    torch.testing.assert_close(rotations @ vertices[0], vertices, rtol=0, atol=1e-14)
    torch.testing.assert_close(rotations[0], torch.eye(n, dtype=torch.float64))


# Filter banks and equivariance

@pytest.mark.parametrize("n", DIMENSIONS)
def test_filter_banks_match_plain_reference(n):
    spheres = random_spheres(5, n, torch.Generator().manual_seed(n))
    expected = torch.stack([plain.filter_bank(s) for s in spheres])
    torch.testing.assert_close(hs.filter_banks(spheres), expected, rtol=0, atol=1e-12)
    expected = torch.stack([plain.sphere_rotation(s) for s in spheres])
    torch.testing.assert_close(hs.sphere_rotations(spheres), expected, rtol=0, atol=1e-12)


def test_normalized_spheres_have_last_entry_one():
    layer = hs.EquivariantHyperspheres(4, 2, 3, normalized_spheres=True)
    assert layer.weight.shape == (6, 5, 1)
    spheres = layer.spheres()
    assert spheres.shape == (6, 6)
    torch.testing.assert_close(spheres[:, -1], torch.ones(6))


def check_layer_equivariance(spheres: torch.Tensor, generator: torch.Generator):
    """Responses to ``Q x`` equal ``V(Q)`` times the responses to ``x``, for both
    determinants; ``V(Q)`` is orthogonal and fixes the all-ones vector."""
    n = spheres.shape[1] - 2
    layer = layer_from_spheres(spheres)
    rotations = hs.sphere_rotations(spheres)
    points = torch.randn(3, 7, 1, n, generator=generator, dtype=torch.float64)
    responses = layer(points)  # (batch, points, K, n + 1)
    assert torch.isfinite(responses).all()
    eye, ones = torch.eye(n + 1, dtype=torch.float64), torch.ones(n + 1, dtype=torch.float64)
    for q in group_elements(n, generator):
        v = hs.response_representation(q, rotations)  # (K, n + 1, n + 1)
        expected = torch.einsum("kij,bpkj->bpki", v, responses)
        error = (layer(points @ q.T) - expected).abs().max().item()
        assert error < LAYER_ATOL_FLOAT64 * max(1.0, responses.abs().max().item()), error
        torch.testing.assert_close(v @ v.transpose(1, 2), eye.expand_as(v), rtol=0, atol=1e-12)
        torch.testing.assert_close(v @ ones, ones.expand(len(v), -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", DIMENSIONS)
def test_layer_is_equivariant(n):
    generator = torch.Generator().manual_seed(100 + n)
    check_layer_equivariance(random_spheres(6, n, generator), generator)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_degenerate_spheres_stay_finite_and_equivariant(n):
    generator = torch.Generator().manual_seed(200 + n)
    spheres = random_spheres(5, n, generator)
    spheres[0, :n] = 0  # centre at the origin
    spheres[1, :n] = -torch.rand(()).item() * hs.regular_simplex(n)[0]  # opposite vertex 0
    spheres[1, n + 1] = abs(spheres[1, n + 1])
    spheres[2, n + 1] = 0  # last entry zero: centre at infinity
    spheres[3, :n] = 0  # centre at the origin and last entry zero
    spheres[3, n + 1] = 0
    check_layer_equivariance(spheres, generator)
    banks = hs.filter_banks(spheres)
    assert torch.isfinite(banks).all()
    # The rotation still takes the centre direction to vertex 0 in the antipodal case.
    o = hs.sphere_rotations(spheres[1:2])[0]
    torch.testing.assert_close(o @ -hs.regular_simplex(n)[0], hs.regular_simplex(n)[0])


def test_degenerate_spheres_have_finite_gradients():
    n = 4
    spheres = random_spheres(3, n, torch.Generator().manual_seed(3))
    spheres[0, :n] = 0
    spheres[1, :n] = -hs.regular_simplex(n)[0]
    spheres[2, n + 1] = 0
    layer = layer_from_spheres(spheres)
    layer(torch.randn(2, 5, 1, n, dtype=torch.float64)).square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("n,channels,width", [(3, 1, 4), (4, 3, 2), (2, 2, 3)])
def test_layer_matches_plain_reference(n, channels, width):
    generator = torch.Generator().manual_seed(n * 10 + channels)
    layer = hs.EquivariantHyperspheres(n, channels, width).double()
    points = torch.randn(2, 4, channels, n, generator=generator, dtype=torch.float64)
    expected = torch.stack([plain.layer(sample, layer.spheres().detach(), width)
                            for sample in points])
    torch.testing.assert_close(layer(points), expected, rtol=1e-12, atol=1e-12)


def test_layer_follows_input_dtype():
    layer = hs.EquivariantHyperspheres(3, 1, 2)
    assert layer(torch.randn(2, 4, 1, 3)).dtype == torch.float32
    assert layer.double()(torch.randn(2, 4, 1, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("shape", [(4, 1, 3), (2, 4, 1, 4), (2, 4, 2, 3), (2, 4, 1, 3, 1)])
def test_layer_rejects_wrong_shapes(shape):
    layer = hs.EquivariantHyperspheres(3, 1, 2)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, points, 1, 3\)"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("arguments", [dict(space_dim=1), dict(space_dim=3, width=0),
                                       dict(space_dim=3, in_channels=0)])
def test_layer_rejects_bad_sizes(arguments):
    with pytest.raises(ValueError, match="must be an integer"):
        hs.EquivariantHyperspheres(**arguments)
