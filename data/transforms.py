"""Random orthogonal matrices, for test-time transforms and training augmentation."""

import torch


def random_orthogonal(
    count: int, dim: int, generator: torch.Generator, determinant: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Random orthogonal matrices `(count, dim, dim)`.

    A uniform (Haar) rotation is drawn from the QR decomposition of a Gaussian matrix. For
    `determinant=-1` one random axis is then flipped; for `determinant=None` the flip happens
    with probability 1/2, which gives the uniform distribution on O(dim).

    Args:
        count: number of matrices.
        dim: dimension of the space.
        generator: source of randomness (CPU).
        determinant: 1 (rotations), -1 (rotation followed by a reflection) or None (either).
    """
    if determinant not in (1, -1, None):
        raise ValueError(f"determinant must be 1, -1 or None, got {determinant!r}")
    gaussian = torch.randn(count, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar on O(dim)

    # Make every matrix a rotation, then flip a random axis where a reflection is wanted.
    q[:, :, 0] *= torch.sign(torch.linalg.det(q))[:, None]
    if determinant == 1:
        return q.to(dtype)
    axis = torch.randint(dim, (count,), generator=generator)
    if determinant == -1:
        flip = torch.ones(count, dtype=torch.bool)
    else:
        flip = torch.rand(count, generator=generator) < 0.5
    signs = torch.ones(count, dim, dtype=torch.float64)
    signs[torch.arange(count)[flip], axis[flip]] = -1.0
    return (signs[:, :, None] * q).to(dtype)  # flip row `axis`: reflect the image axis
