"""One place for random group elements and the tolerances of every equivariance test."""

import torch

# Maximum absolute error of a single layer in float64, and of whole networks.
LAYER_ATOL_FLOAT64 = 1e-10
MODEL_ATOL_FLOAT64 = 1e-9
# Maximum error relative to the output scale for whole networks in float32.
MODEL_RTOL_FLOAT32 = 1e-4


def random_orthogonal(n: int, determinant: int, generator: torch.Generator,
                      dtype=torch.float64) -> torch.Tensor:
    """A Haar-random element of O(n) with the given determinant (+1 or -1), shape ``(n, n)``."""
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) * determinant < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def group_elements(n: int, generator: torch.Generator, draws: int = 2, dtype=torch.float64):
    """``draws`` random elements of each determinant, as a list of ``(n, n)`` matrices."""
    return [random_orthogonal(n, det, generator, dtype) for det in (1, -1) for _ in range(draws)]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference divided by the largest absolute expected value."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
