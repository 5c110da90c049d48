"""A slow reference of the model, written plainly: one sphere, one point, explicit matrices.

Every formula is spelled out with loops and dense matrices so that it can be read against its
description; the fast implementation in ``models`` is tested against it.
"""

import math

import torch


def embed(x: torch.Tensor) -> torch.Tensor:
    """One point ``(n,)`` to ``(x, -1, -|x|^2 / 2)``, shape ``(n + 2,)``."""
    return torch.cat([x, torch.tensor([-1.0, -0.5 * float(x @ x)], dtype=x.dtype)])


def simplex(n: int) -> torch.Tensor:
    """Regular simplex vertices as rows ``(n + 1, n)``: the row ``a (1, ..., 1)`` over the
    identity, centred, each row scaled to unit length."""
    a = (1 + math.sqrt(n + 1)) / n
    rows = [[a] * n] + [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    rows = torch.tensor(rows, dtype=torch.float64)
    rows = rows - rows.mean(dim=0)
    return torch.stack([row / row.norm() for row in rows])


def householder(u: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(u), dtype=u.dtype) - 2 * torch.outer(u, u) / (u @ u)


def rotation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation ``H(q) H(p + q)`` taking the unit vector ``p`` to the unit vector ``q``."""
    return householder(q) @ householder(p + q)


def pad(matrix: torch.Tensor, extra: int) -> torch.Tensor:
    """Append ``extra`` ones on the diagonal of a square matrix."""
    n = matrix.shape[0]
    padded = torch.eye(n + extra, dtype=matrix.dtype)
    padded[:n, :n] = matrix
    return padded


def filter_bank(sphere: torch.Tensor) -> torch.Tensor:
    """The ``(n + 1, n + 2)`` filter bank of one sphere ``(n + 2,)``, row ``i`` being
    ``pad(O^T T_i O) s``."""
    n = len(sphere) - 2
    vertices = simplex(n)
    centre = sphere[:n] / (sphere[n + 1] + 1e-12)
    o = rotation(centre / centre.norm(), vertices[0])
    rows = []
    for i in range(n + 1):
        t = torch.eye(n, dtype=sphere.dtype) if i == 0 else rotation(vertices[0], vertices[i])
        rows.append(pad(o.T @ t @ o, 2) @ sphere)
    return torch.stack(rows)


def sphere_rotation(sphere: torch.Tensor) -> torch.Tensor:
    n = len(sphere) - 2
    centre = sphere[:n] / (sphere[n + 1] + 1e-12)
    return rotation(centre / centre.norm(), simplex(n)[0])


def layer(points: torch.Tensor, spheres: torch.Tensor, width: int) -> torch.Tensor:
    """Responses ``(N, K, n + 1)`` of points ``(N, C, n)`` to spheres ``(K, n + 2)``, sphere
    ``j`` reading channel ``j // width``."""
    out = torch.zeros(points.shape[0], spheres.shape[0], points.shape[2] + 1,
                      dtype=points.dtype)
    for j, sphere in enumerate(spheres):
        bank = filter_bank(sphere)
        for p in range(points.shape[0]):
            out[p, j] = bank @ embed(points[p, j // width])
    return out


def model(net, points: torch.Tensor) -> torch.Tensor:
    """The output ``(output_channels,)`` of a ``DeepSpheres`` network for one sample
    ``(N, n)``, computed from its parameters with the plain functions above."""
    num_points = points.shape[0]
    y = points[:, None, :]
    for layer_module, bias, norm in zip(net.spheres, net.biases, net.norm_layers):
        spheres = layer_module.spheres()
        y = layer(y, spheres, layer_module.width)
        channels = y.shape[1]
        per_point = bias.shape[1] // channels
        gates = torch.sigmoid(norm.a)
        for p in range(num_points):
            for c in range(channels):
                index = c if per_point == 1 else p * channels + c
                y[p, c] = y[p, c] + bias[0, index]
        norms = torch.stack([torch.stack([y[p, c].norm() for c in range(channels)])
                             for p in range(num_points)])
        if net.permutation_invariant:
            norms = norms.max(dim=0).values.expand(num_points, channels)
        scaled = torch.empty_like(y)
        for p in range(num_points):
            for c in range(channels):
                index = c if per_point == 1 else p * channels + c
                scaled[p, c] = y[p, c] / (gates[index] * (norms[p, c] - 1) + 1 + 1e-12)
        y = scaled

    channels = y.shape[1]
    features = []
    if net.permutation_invariant:
        sorted_rows = []
        for c in range(channels):
            gram = torch.stack([torch.stack([y[p, c] @ y[r, c] for r in range(num_points)])
                                for p in range(num_points)])
            sorted_rows.append(torch.sort(gram, dim=1).values)
        for statistic in ("max", "mean"):
            for q in range(num_points):
                for c in range(channels):
                    column = sorted_rows[c][:, q]
                    features.append(column.max() if statistic == "max" else column.mean())
    else:
        for p in range(num_points):
            for q in range(p, num_points):
                for c in range(channels):
                    value = y[p, c] @ y[q, c]
                    if p == 0 and q == num_points - 1 and num_points > 1:
                        value = value * math.sqrt(2)
                    features.append(value)
    features = torch.stack(features)
    hidden = net.linear1.weight @ features + net.linear1.bias
    hidden = hidden * torch.sigmoid(hidden)
    return net.linear2.weight @ hidden + net.linear2.bias
