"""A batched reference that computes the network the way the published code does.

It gives the same outputs as :class:`models.deepspheres.DeepSpheres` from the same
parameters, but spends its work as the published implementation spends it, so that the
benchmarks can time a fair stand-in for that code:

- each sphere's filter bank is built with dense matrices: the rotation ``O`` as a product of
  two dense Householder matrices, every simplex rotation ``T_i`` the same way, the products
  ``O^T T_i O`` padded to ``(n + 2, n + 2)`` and multiplied with the sphere, in float64;
- each layer multiplies every sphere with every input channel and then keeps, for each
  sphere, the one channel it reads (``K_(l-1)`` times the necessary work);
- the readout sorts the rows of the Gram matrices with ``torch.sort``.

Like the published code it has no special case for degenerate spheres (a centre at the
origin or exactly opposite simplex vertex 0 divides by zero); random spheres never hit them.

Shapes use ``B`` for the batch, ``N`` for the points, ``C`` for the input channels of a layer,
``K`` for its spheres and ``n`` for its input dimension.
"""

import math

import torch

import models.deepspheres as deepspheres


def simplex_vertices(n: int) -> torch.Tensor:
    """The regular n-simplex on the unit sphere, vertex 0 along ``(1, ..., 1)``: ``(n + 1, n)``."""
    a = (1 + math.sqrt(n + 1)) / n
    rows = torch.cat([torch.full((1, n), a, dtype=torch.float64),
                      torch.eye(n, dtype=torch.float64)])
    rows = rows - rows.mean(dim=0)
    return rows / rows.norm(dim=1, keepdim=True)


def dense_householder(u: torch.Tensor) -> torch.Tensor:
    """Dense reflections ``I - 2 u u^T / |u|^2`` for axes ``(..., n)``: ``(..., n, n)``."""
    eye = torch.eye(u.shape[-1], dtype=u.dtype)
    return eye - 2 * u[..., :, None] * u[..., None, :] / (u * u).sum(-1)[..., None, None]


def dense_rotation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Dense rotations ``H(q) H(p + q)`` taking unit vectors ``p`` to ``q``: ``(..., n, n)``."""
    return dense_householder(q) @ dense_householder(p + q)


def dense_filter_banks(spheres: torch.Tensor) -> torch.Tensor:
    """Filter banks ``(K, n + 1, n + 2)`` of spheres ``(K, n + 2)``, from dense matrices.

    Row ``i`` of a bank is ``pad(O^T T_i O) s``; computed in float64, returned in the
    spheres' dtype.
    """
    num_spheres, n = spheres.shape[0], spheres.shape[1] - 2
    s = spheres.double()
    vertices = simplex_vertices(n)

    # Sphere rotations O (K, n, n): centre direction onto vertex 0.
    centres = s[:, :n] / (s[:, n + 1:] + 1e-12)
    directions = centres / centres.norm(dim=1, keepdim=True)
    o = dense_rotation(directions, vertices[0].expand_as(directions))

    # Simplex rotations T_i (n + 1, n, n), T_0 = I.
    t = dense_rotation(vertices[0].expand_as(vertices), vertices)
    t[0] = torch.eye(n, dtype=torch.float64)

    # pad(O^T T_i O) (K, n + 1, n + 2, n + 2), then applied to each sphere.
    inner = o.transpose(1, 2)[:, None] @ t[None] @ o[:, None]
    padded = torch.eye(n + 2, dtype=torch.float64).repeat(num_spheres, n + 1, 1, 1)
    padded[:, :, :n, :n] = inner
    banks = padded @ s[:, None, :, None]  # (K, n + 1, n + 2, 1)
    return banks[..., 0].to(spheres.dtype)


def embed(x: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` to ``(x, -1, -|x|^2 / 2)``, shape ``(..., n + 2)``."""
    return torch.cat([x, -torch.ones_like(x[..., :1]), -0.5 * (x * x).sum(-1, keepdim=True)], -1)


def all_channels_layer(x: torch.Tensor, banks: torch.Tensor, width: int) -> torch.Tensor:
    """Responses ``(B, N, K, n + 1)`` of points ``(B, N, C, n)`` to banks ``(K, n + 1, n + 2)``.

    Every sphere meets every channel, ``(B, N, C, K, n + 1)``; sphere ``j`` keeps channel
    ``j // width``.
    """
    every = torch.einsum("bpck,jmk->bpcjm", embed(x), banks)
    spheres = torch.arange(banks.shape[0])
    return every[:, :, spheres // width, spheres]


def naive_forward(net: deepspheres.DeepSpheres, points: torch.Tensor) -> torch.Tensor:
    """Outputs ``(B, output_channels)`` of ``net`` for points ``(B, N, n)``, computed the way
    the published code computes them, from ``net``'s parameters (gradients reach them)."""
    batch, num_points = points.shape[:2]
    y = points[:, :, None, :]
    for layer, bias, norm in zip(net.spheres, net.biases, net.norm_layers):
        banks = dense_filter_banks(layer.spheres()).to(points.dtype)
        y = all_channels_layer(y, banks, layer.width)  # (B, N, K, n + 1)
        channels = y.shape[2]

        # Bias per channel (or per point and channel), then the gated normalization.
        y = y + bias.view(1, -1, channels, 1)
        norms = y.norm(dim=-1)  # (B, N, K)
        if net.permutation_invariant:
            norms = norms.max(dim=1, keepdim=True).values
        gates = torch.sigmoid(norm.a).view(-1, channels)
        y = y / (gates * (norms - 1) + 1 + 1e-12)[..., None]

    # Gram matrices per channel (B, K, N, N) and their readout.
    gram = torch.einsum("bpkd,bqkd->bkpq", y, y)
    if net.permutation_invariant:
        rows = torch.sort(gram, dim=-1).values
        features = torch.cat([rows.max(dim=2).values, rows.mean(dim=2)], dim=1)  # (B, 2K, N)
        features = features.view(batch, 2, -1, num_points).transpose(2, 3).reshape(batch, -1)
    else:
        if num_points > 1:
            gram = gram.clone()
            gram[:, :, 0, -1] = gram[:, :, 0, -1] * math.sqrt(2)
        rows, cols = torch.triu_indices(num_points, num_points)
        features = gram[:, :, rows, cols].transpose(1, 2).reshape(batch, -1)

    hidden = torch.nn.functional.silu(features @ net.linear1.weight.T + net.linear1.bias)
    return hidden @ net.linear2.weight.T + net.linear2.bias
