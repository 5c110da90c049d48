"""Equivariant hyperspheres: the pure functions and the layer built from them.

A point ``x`` in R^n is embedded as ``X = (x, -1, -|x|^2 / 2)`` in R^(n+2); a sphere is a vector
``s`` in R^(n+2) with centre ``c = s[:n] / s[n+1]``, and the sign of ``<X, s>`` tells on which
side of the sphere ``x`` lies. A sphere is turned into an O(n)-equivariant *filter bank* of
``n + 1`` spheres by rotating its centre onto each vertex of a regular n-simplex: row ``i`` is
``pad(O^T T_i O) s``, where ``O`` rotates the centre direction onto vertex 0 and ``T_i`` rotates
vertex 0 onto vertex ``i``. The ``n + 1`` responses of a point to a filter bank then transform
under an orthogonal ``Q`` by the fixed orthogonal matrix ``V(Q)`` of
:func:`response_representation`.

Shapes use ``n`` for the space dimension and ``K`` for the number of spheres.
"""

import functools
import math

import torch
from torch import nn

# Added to the last sphere entry before dividing by it, so that a zero entry gives a finite centre.
CENTRE_EPS = 1e-12

# Below this squared length, p + q is too short to give an accurate reflection axis (the rotation
# error grows like 1e-16 / |p + q| in float64), and rotation_between takes its antipodal branch.
ANTIPODAL_TOL = 1e-12


def embed_points(x: torch.Tensor) -> torch.Tensor:
    """Conformal embedding ``x -> (x, -1, -|x|^2 / 2)``.

    Args:
        x: points, shape ``(..., n)``.

    Returns:
        Embedded points, shape ``(..., n + 2)``.
    """
    minus_one = -torch.ones_like(x[..., :1])
    half_square = -0.5 * (x * x).sum(dim=-1, keepdim=True)
    return torch.cat([x, minus_one, half_square], dim=-1)


def regular_simplex(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Vertices of a regular n-simplex centred at the origin, on the unit sphere.

    Vertex 0 is ``(1, ..., 1) / sqrt(n)``; pairwise inner products are ``-1 / n``.

    Returns:
        Vertices as rows, shape ``(n + 1, n)``.
    """
    if n < 2:
        raise ValueError(f"the simplex needs a space dimension n >= 2, got n = {n}")
    a = (1 + math.sqrt(n + 1)) / n
    rows = torch.cat([torch.full((1, n), a, dtype=torch.float64),
                      torch.eye(n, dtype=torch.float64)])
    rows = rows - rows.mean(dim=0, keepdim=True)
    rows = rows / rows.norm(dim=1, keepdim=True)
    return rows.to(dtype=dtype, device=device)


def householder(u: torch.Tensor) -> torch.Tensor:
    """Householder reflection ``H(u) = I - 2 u u^T / |u|^2``.

    Args:
        u: reflection axes, shape ``(..., n)``, non-zero.

    Returns:
        Reflection matrices, shape ``(..., n, n)``.
    """
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    outer = u.unsqueeze(-1) * u.unsqueeze(-2)
    return eye - 2 * outer / (u * u).sum(dim=-1)[..., None, None]


def reflect(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Apply ``H(u)`` to vectors without forming the matrix: ``z - 2 u <u, z> / |u|^2``.

    Args:
        z: vectors, shape ``(..., n)``.
        u: non-zero reflection axes, shape broadcastable to ``z``.

    Returns:
        Reflected vectors, shape of ``z`` broadcast with ``u``.
    """
    coefficient = 2 * (u * z).sum(dim=-1, keepdim=True) / (u * u).sum(dim=-1, keepdim=True)
    return z - coefficient * u


def _orthogonal_axis(q: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to each unit vector ``q``, shape ``(..., n)`` as ``q``.

    Gram-Schmidt on the coordinate axis least aligned with ``q``.
    """
    axis = torch.zeros_like(q)
    axis.scatter_(-1, q.abs().argmin(dim=-1, keepdim=True), 1.0)
    axis = axis - (axis * q).sum(dim=-1, keepdim=True) * q
    return axis / axis.norm(dim=-1, keepdim=True)


def _rotation_axes(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Axes ``(first, second)`` with ``H(second) H(first)`` a rotation taking ``p`` to ``q``.

    Usually ``(p + q, q)``. Where ``p`` is (nearly) ``-q`` no rotation is singled out and
    ``p + q`` is too short to use, so take ``(p - q, w)`` with ``w`` orthogonal to ``q``: the
    first reflection swaps ``p`` and ``q``, the second keeps ``q``; any such rotation keeps the
    filter bank equivariant.
    """
    total = p + q
    antipodal = (total * total).sum(dim=-1, keepdim=True) <= ANTIPODAL_TOL
    if not bool(antipodal.any()):
        return total, q.expand_as(total)
    first = torch.where(antipodal, p - q, total)
    second = torch.where(antipodal, _orthogonal_axis(q).expand_as(total), q.expand_as(total))
    return first, second


def rotation_between(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation ``H(q) H(p + q)`` taking the unit vector ``p`` to the unit vector ``q``.

    Two Householder reflections, so the determinant is +1. For ``p = -q`` see
    :func:`_rotation_axes`.

    Args:
        p, q: unit vectors, shapes broadcastable to ``(..., n)``.

    Returns:
        Rotations, shape ``(..., n, n)``.
    """
    p, q = torch.broadcast_tensors(p, q)
    first, second = _rotation_axes(p, q)
    return householder(second) @ householder(first)


def simplex_rotations(vertices: torch.Tensor) -> torch.Tensor:
    """Rotations ``T_i = rotation_between(v_0, v_i)``, with ``T_0 = I``.

    Args:
        vertices: simplex vertices, shape ``(n + 1, n)``.

    Returns:
        Rotations, shape ``(n + 1, n, n)``.
    """
    rotations = rotation_between(vertices[:1], vertices)
    rotations[0] = torch.eye(vertices.shape[1], dtype=vertices.dtype, device=vertices.device)
    return rotations


def change_of_basis(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthogonal matrix ``M`` whose column ``i`` is ``(v_i, 1 / sqrt(n))`` scaled to unit length.

    ``M^T`` maps ``(a, b)`` in R^(n+1) to the responses ``<v_i, a> + b / sqrt(n)`` up to one
    scale, which is what makes :func:`response_representation` orthogonal.

    Returns:
        ``M``, shape ``(n + 1, n + 1)``.
    """
    vertices = regular_simplex(n)
    columns = torch.cat([vertices, torch.full((n + 1, 1), 1 / math.sqrt(n),
                                              dtype=torch.float64)], dim=1)
    columns = columns / columns.norm(dim=1, keepdim=True)
    return columns.T.contiguous().to(dtype=dtype, device=device)


def full_spheres(weight: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Spheres as ``(K, n + 2)`` from a layer weight.

    Args:
        weight: shape ``(K, n + 2, 1)``, or ``(K, n + 1, 1)`` when ``normalized``: the last
            entry is then fixed to 1.

    Returns:
        Spheres, shape ``(K, n + 2)``.
    """
    spheres = weight[..., 0]
    if normalized:
        spheres = torch.cat([spheres, torch.ones_like(spheres[:, :1])], dim=1)
    return spheres


def centre_directions(spheres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit direction and signed length of each sphere's centre ``c = s[:n] / (s[n+1] + 1e-12)``.

    Computed from ``s[:n]`` and the sign of the denominator, so a tiny last entry cannot
    overflow. A sphere centred at the origin gets the zero vector.

    Args:
        spheres: shape ``(K, n + 2)``.

    Returns:
        ``(p, alpha)``: directions ``p``, shape ``(K, n)``, and ``alpha``, shape ``(K, 1)``,
        with ``s[:n] = alpha p``.
    """
    centre = spheres[:, :-2]
    sign = torch.where(spheres[:, -1:] + CENTRE_EPS >= 0, 1.0, -1.0).to(spheres.dtype)
    length = centre.norm(dim=1, keepdim=True)
    direction = centre * (sign / torch.where(length > 0, length, torch.ones_like(length)))
    return direction, sign * length


@functools.lru_cache(maxsize=None)
def _simplex_constants(n: int, dtype: torch.dtype, device: torch.device):
    """Simplex vertices ``(n + 1, n)``, a unit vector ``w`` orthogonal to vertex 0 ``(n,)``, and
    the vertices reflected by ``H(v_0)`` and by ``H(w)``, each ``(n + 1, n)``.

    Cached per dimension, dtype and device; the tensors are shared and never modified.
    """
    vertices = regular_simplex(n)
    axis = _orthogonal_axis(vertices[0])
    constants = (vertices, axis, reflect(vertices, vertices[0]), reflect(vertices, axis))
    return tuple(tensor.to(dtype=dtype, device=device) for tensor in constants)


def _sphere_axes(spheres: torch.Tensor):
    """Sphere rotations ``O = H(second) H(first)`` taking each centre direction to vertex 0.

    Usually ``first = p + v_0`` and ``second = v_0``. A sphere centred at the origin has
    ``p = 0``, so ``O = I``. For ``p = -v_0``, ``first = p - v_0`` and ``second = w``, see
    :func:`_rotation_axes`.

    Returns:
        ``(first, second, antipodal, alpha)``: axes ``(K, n)``, the antipodal mask ``(K, 1)``
        and the signed centre length ``(K, 1)``.
    """
    n = spheres.shape[1] - 2
    vertices, axis, _, _ = _simplex_constants(n, spheres.dtype, spheres.device)
    direction, alpha = centre_directions(spheres)
    first = direction + vertices[0]
    antipodal = (first * first).sum(dim=1, keepdim=True) <= ANTIPODAL_TOL
    first = torch.where(antipodal, direction - vertices[0], first)
    second = torch.where(antipodal, axis, vertices[0])
    return first, second, antipodal, alpha


def sphere_rotations(spheres: torch.Tensor) -> torch.Tensor:
    """Rotation ``O`` of each sphere, taking its centre direction to simplex vertex 0.

    A sphere centred at the origin gets ``O = I``: its centre part is zero, so every rotation
    builds the same filter bank.

    Args:
        spheres: shape ``(K, n + 2)``.

    Returns:
        Rotations, shape ``(K, n, n)``.
    """
    first, second, _, _ = _sphere_axes(spheres)
    return householder(second) @ householder(first)


def filter_banks(spheres: torch.Tensor) -> torch.Tensor:
    """Filter bank of each sphere: row ``i`` is ``pad(O^T T_i O) s``.

    With ``s[:n] = alpha p`` and ``O p = v_0``, the centre part of row ``i`` is
    ``alpha O^T v_i = alpha H(first) H(second) v_i``, where ``H(second) v_i`` is a constant of
    the simplex: one reflection of ``n + 1`` vectors per sphere, a cost of ``O(K n^2)``.

    Args:
        spheres: shape ``(K, n + 2)``.

    Returns:
        Filter banks, shape ``(K, n + 1, n + 2)``.
    """
    num_spheres, n = spheres.shape[0], spheres.shape[1] - 2
    _, _, reflected, reflected_antipodal = _simplex_constants(n, spheres.dtype, spheres.device)
    first, _, antipodal, alpha = _sphere_axes(spheres)
    second_reflected = torch.where(antipodal[:, :, None], reflected_antipodal, reflected)
    centres = alpha[:, :, None] * reflect(second_reflected, first[:, None])  # (K, n + 1, n)
    rest = spheres[:, None, n:].expand(num_spheres, n + 1, 2)
    return torch.cat([centres, rest], dim=2)


def response_representation(q: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``V(Q) = M^T pad(O) pad(Q) pad(O)^T M``: how a filter bank's responses transform.

    If ``B(x)`` are the ``n + 1`` responses of ``x`` to the filter bank of a sphere with
    rotation ``O``, then ``B(Q x) = V(Q) B(x)`` for every orthogonal ``Q``. ``pad`` extends an
    n-by-n matrix to (n+1)-by-(n+1) with a one on the new diagonal entry.

    Args:
        q: orthogonal matrix, shape ``(n, n)``.
        rotations: sphere rotations ``O``, shape ``(..., n, n)``.

    Returns:
        Representations, shape ``(..., n + 1, n + 1)``; each is orthogonal and fixes the
        all-ones vector.
    """
    n = q.shape[-1]
    m = change_of_basis(n, q.dtype, q.device)
    inner = _pad(rotations @ q @ rotations.transpose(-1, -2))
    return m.T @ inner @ m


def _pad(matrix: torch.Tensor) -> torch.Tensor:
    """Extend ``(..., n, n)`` to ``(..., n + 1, n + 1)`` with a one on the new diagonal entry."""
    padded = nn.functional.pad(matrix, (0, 1, 0, 1))
    padded[..., -1, -1] = 1
    return padded


class EquivariantHyperspheres(nn.Module):
    """A layer of learned spheres, each expanded into an O(n)-equivariant filter bank.

    Channels form a tree: with ``width`` spheres per input channel there are
    ``K = in_channels * width`` spheres, and sphere ``j`` reads input channel ``j // width``
    and writes output channel ``j``. Each sphere meets only the channel it reads, so the cost
    is linear in the number of channels. Every output channel holds the ``n + 1`` responses of
    a point to one filter bank and transforms by that sphere's ``V(Q)``, so the next layer
    works in R^(n+1).

    The filter banks are built in float64 (the rotations lose accuracy in float32 for centres
    near the antipode of vertex 0) and cast to the input's dtype.

    Args:
        space_dim: ``n``, the dimension of the input points, at least 2.
        in_channels: number of input channels.
        width: spheres per input channel.
        normalized_spheres: fix the last sphere entry to 1 instead of learning it.
    """

    def __init__(self, space_dim: int, in_channels: int = 1, width: int = 1,
                 normalized_spheres: bool = False):
        super().__init__()
        for name, value, least in (("space_dim", space_dim, 2), ("in_channels", in_channels, 1),
                                   ("width", width, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.space_dim = space_dim
        self.in_channels = in_channels
        self.width = width
        self.normalized_spheres = normalized_spheres
        num_spheres = in_channels * width
        entries = space_dim + 1 if normalized_spheres else space_dim + 2
        bound = 1 / math.sqrt(space_dim + 2)
        self.weight = nn.Parameter(torch.empty(num_spheres, entries, 1).uniform_(-bound, bound))

    @property
    def num_spheres(self) -> int:
        return self.weight.shape[0]

    def spheres(self) -> torch.Tensor:
        """The spheres, shape ``(K, n + 2)``, in the weight's dtype."""
        return full_spheres(self.weight, self.normalized_spheres)

    def filter_bank(self) -> torch.Tensor:
        """The filter banks, shape ``(K, n + 1, n + 2)``, in the weight's dtype."""
        spheres = self.spheres()
        return filter_banks(spheres.double()).to(spheres.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Responses of every point to the filter banks of the spheres reading its channel.

        Args:
            x: points, shape ``(batch, points, in_channels, n)``.

        Returns:
            Responses, shape ``(batch, points, K, n + 1)``.
        """
        if x.ndim != 4 or x.shape[2:] != (self.in_channels, self.space_dim):
            raise ValueError(
                f"expected input of shape (batch, points, {self.in_channels}, "
                f"{self.space_dim}), got {tuple(x.shape)}")
        n = self.space_dim
        bank = self.filter_bank().to(x.dtype)
        bank = bank.view(self.in_channels, self.width * (n + 1), n + 2)
        responses = torch.einsum("bpck,cmk->bpcm", embed_points(x), bank)
        return responses.reshape(*x.shape[:2], self.num_spheres, n + 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints of the published code carry a duplicate of the weight, and the simplex
        # vertex 0 and simplex rotations as constants: drop the duplicate, check the constants.
        state_dict.pop(prefix + "_weight", None)
        constants = {
            "construct_filter_banks.ones_vec": lambda: regular_simplex(self.space_dim)[0],
            "construct_filter_banks.tetra_rotations":
                lambda: simplex_rotations(regular_simplex(self.space_dim)),
        }
        for key, expected in constants.items():
            stored = state_dict.pop(prefix + key, None)
            if stored is None:
                continue
            expected = expected()
            if stored.shape != expected.shape or not torch.allclose(
                    stored.double().cpu(), expected, atol=1e-6):
                error_msgs.append(
                    f"{prefix + key}: stored simplex constants of shape {tuple(stored.shape)} "
                    f"do not match those of a layer in dimension {self.space_dim}; the "
                    "checkpoint belongs to a different model")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"space_dim={self.space_dim}, in_channels={self.in_channels}, "
                f"width={self.width}, normalized_spheres={self.normalized_spheres}")
