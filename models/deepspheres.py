"""DeepSpheres: stacked equivariant hypersphere layers with an O(n)-invariant readout.

The network maps a set (or sequence) of points to predictions that do not change when every
point is transformed by the same element of O(n):

1. ``depth`` layers of :class:`EquivariantHyperspheres`, each followed by a per-channel bias
   and a gated normalization, both of which commute with the layer's representation;
2. per sample and channel, the Gram matrix of the points' final responses, which is
   O(n)-invariant;
3. a readout of the Gram matrix: sorted rows pooled by maximum and mean (invariant to the order
   of the points) or its upper triangle (ordered points);
4. a two-layer perceptron head.

On the CPU, steps 1 to 3 run in compiled kernels where they can be built (:mod:`models.native`),
with the same numbers as the tensor code here up to rounding.
"""

import functools
import inspect
import math
from typing import Callable, Sequence

import torch
from torch import nn

from models import native
from models.hyperspheres import EquivariantHyperspheres

# Keeps the normalization's denominator away from zero.
NORM_EPS = 1e-12

# The sorting network pays a fixed cost per comparator, so it is used for at most this many
# points per set, and when at least this many Gram entries share each comparator.
MAX_NETWORK_SIZE = 32
MIN_NETWORK_SLICE = 16384


@functools.cache
def sorting_network(size: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort for ``size`` inputs.

    Applying them in order, each putting the smaller value at ``i`` and the larger at ``j``,
    sorts any ``size`` values ascending. Built for the next power of two; comparators that
    reach past ``size`` are dropped, which is the same as padding with ``+inf``.
    """
    power = 1 << max(size - 1, 0).bit_length()
    pairs = []

    def merge(low: int, length: int, stride: int):
        # Merge the two sorted halves of [low, low + length) seen at the given stride.
        if 2 * stride < length:
            merge(low, length, 2 * stride)
            merge(low + stride, length, 2 * stride)
            pairs.extend((i, i + stride)
                         for i in range(low + stride, low + length - stride, 2 * stride))
        else:
            pairs.append((low, low + stride))

    def sort(low: int, length: int):
        if length > 1:
            sort(low, length // 2)
            sort(low + length // 2, length // 2)
            merge(low, length, 1)

    sort(0, power)
    return tuple((i, j) for i, j in pairs if j < size)


class _PooledSortedGram(torch.autograd.Function):
    """Gram matrices, each row sorted, pooled over the rows by maximum and mean.

    ``torch.sort`` and batched matrix products are slow on many tiny matrices, so everything
    runs on slices that span all matrices at once, each operation a single pass over memory:
    the Gram matrix accumulates one outer product per vector dimension, and a sorting network
    of element-wise minima and maxima sorts the rows. Gram matrices are symmetric, so slice
    ``r`` of the first dimension holds element ``r`` of every row. The backward runs the
    network in reverse, routing each gradient to where its value came from by the swaps the
    forward recorded.
    """

    @staticmethod
    def forward(ctx, vectors: torch.Tensor):
        num_rows, rest = vectors.shape[1], vectors.shape[2:]
        pairs = sorting_network(num_rows)

        # Gram matrices (N, N, rest) in the first N of N + 1 slots; the last one is spare.
        slots = vectors.new_empty(num_rows + 1, num_rows, *rest)
        gram = torch.mul(vectors[0, :, None], vectors[0, None], out=slots[:num_rows])
        for column in vectors[1:]:
            gram.addcmul_(column[:, None], column[None])

        # Sort every row in place: slot where[r] holds element r of each row, (N, rest).
        where, spare = list(range(num_rows)), num_rows
        swaps = (vectors.new_empty(len(pairs), num_rows, *rest, dtype=torch.uint8)
                 if ctx.needs_input_grad[0] else None)
        for k, (i, j) in enumerate(pairs):
            low, high = slots[where[i]], slots[where[j]]
            if swaps is not None:
                torch.gt(low, high, out=swaps[k])
            torch.maximum(low, high, out=slots[spare])
            torch.minimum(low, high, out=low)
            where[j], spare = spare, where[j]
        ordered = slots[where]  # (position, row, rest)
        top = ordered.amax(dim=1)
        ctx.save_for_backward(vectors, ordered, top, swaps)
        return top, ordered.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_top, grad_mean):
        vectors, ordered, top, swaps = ctx.saved_tensors
        num_rows = ordered.shape[1]

        # Gradient at each sorted position; the maximum's is shared among tied rows.
        grad = torch.eq(ordered, top.unsqueeze(1), out=torch.empty_like(ordered))
        grad.mul_((grad_top / grad.sum(dim=1)).unsqueeze(1))
        grad.add_((grad_mean / num_rows).unsqueeze(1))

        # Undo the comparators in reverse order, giving the gradient of the Gram matrices.
        moved = torch.empty_like(grad[0])
        pairs = sorting_network(num_rows)
        for k in reversed(range(len(pairs))):
            i, j = pairs[k]
            torch.sub(grad[j], grad[i], out=moved).mul_(swaps[k])
            grad[i].add_(moved)
            grad[j].sub_(moved)
        grad_gram = grad + grad.transpose(0, 1)

        # Through the Gram matrices: grad_vectors[:, p] = sum_q grad_gram[p, q] vectors[:, q].
        grad_vectors = torch.zeros_like(vectors)
        for q in range(num_rows):
            grad_vectors.addcmul_(grad_gram[None, :, q], vectors[:, None, q])
        return grad_vectors


def pooled_sorted_gram(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices of sets of vectors, each row sorted, then pooled over the rows.

    Args:
        vectors: ``N`` vectors per set, the vector dimension first: ``(dim, N, ...)``.

    Returns:
        ``(maximum, mean)`` over the rows at each sorted position, each ``(N, ...)``.
    """
    num_rows = vectors.shape[1]
    if num_rows > MAX_NETWORK_SIZE or vectors[0].numel() < MIN_NETWORK_SLICE:
        rows = torch.einsum("dp...,dq...->...pq", vectors, vectors).sort(dim=-1).values
        return rows.amax(dim=-2).movedim(-1, 0), rows.mean(dim=-2).movedim(-1, 0)
    return _PooledSortedGram.apply(vectors.contiguous())


class GatedNormalization(nn.Module):
    """Divide each channel's response vector by ``sigmoid(a) * (m - 1) + 1``.

    ``m`` is the norm of the response vector, or its maximum over the points when
    ``pool_points``. The gate ``sigmoid(a)`` blends between no scaling and dividing by ``m``.
    Norms are O(n)-invariant, so the operation commutes with the layers' representations.

    Args:
        num_gates: number of gates ``a``: channels, or points times channels.
        init: initial value of every gate.
        pool_points: take the maximum norm over the points (keeps permutation invariance).
        grad_through_norm: let gradients flow through ``m``; when False it is a constant.
    """

    def __init__(self, num_gates: int, init: float = 0.0, pool_points: bool = True,
                 grad_through_norm: bool = True):
        super().__init__()
        self.a = nn.Parameter(torch.full((num_gates,), float(init)))
        self.pool_points = pool_points
        self.grad_through_norm = grad_through_norm

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Args: y, shape ``(batch, points, channels, dim)``. Returns the same shape."""
        norms = y.norm(dim=-1)  # (batch, points, channels)
        if self.pool_points:
            norms = norms.amax(dim=1, keepdim=True)
        if not self.grad_through_norm:
            norms = norms.detach()
        gate = torch.sigmoid(self.a).view(-1, y.shape[2])  # (1 or points, channels)
        return y / (gate * (norms - 1) + 1 + NORM_EPS).unsqueeze(-1)


class DeepSpheres(nn.Module):
    """The Deep Equivariant Hyperspheres network.

    Args:
        depth: number of hypersphere layers.
        width: spheres per input channel in each layer (length ``depth``; an int repeats).
            Layer ``l`` has ``width[0] * ... * width[l]`` channels.
        hidden_features: width of the head's hidden layer.
        output_channels: number of outputs per sample.
        space_dim: ``n``, the dimension of the input points (at least 2).
        num_points: number of points per sample.
        nonlinear_init: initial value of the normalization gates.
        sphere_bias: learn a bias per channel (per point and channel for ordered points);
            when False the biases stay zero.
        normalized_spheres: fix the last entry of every sphere to 1.
        fix_spheres: keep the spheres at their initial values.
        norm_activations_grad: let gradients flow through the normalization's norms.
        permutation_invariant: treat the points as a set (sorted, pooled Gram readout) rather
            than a sequence (upper-triangle readout).
    """

    def __init__(self, depth: int = 1, width: Sequence[int] | int = (2,),
                 hidden_features: int = 32, output_channels: int = 1, space_dim: int = 5,
                 num_points: int = 2, nonlinear_init: float = 0.0, sphere_bias: bool = True,
                 normalized_spheres: bool = False, fix_spheres: bool = False,
                 norm_activations_grad: bool = True, permutation_invariant: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        widths = [width] * depth if isinstance(width, int) else list(width)
        if len(widths) != depth:
            raise ValueError(f"width must list one entry per layer (depth = {depth}), "
                             f"got {width!r}")
        for name, value in (("hidden_features", hidden_features),
                            ("output_channels", output_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_points < 1 or space_dim < 2:
            raise ValueError(f"need num_points >= 1 and space_dim >= 2, got {num_points} and "
                             f"{space_dim}")
        self.space_dim = space_dim
        self.num_points = num_points
        self.permutation_invariant = permutation_invariant
        per_point = 1 if permutation_invariant else num_points

        # Hypersphere layers, each raising the dimension by one, with biases and normalization.
        self.spheres = nn.ModuleList()
        self.biases = nn.ParameterList()
        self.norm_layers = nn.ModuleList()
        channels, dim = 1, space_dim
        for layer_width in widths:
            layer = EquivariantHyperspheres(dim, channels, layer_width, normalized_spheres)
            layer.weight.requires_grad_(not fix_spheres)
            channels, dim = channels * layer_width, dim + 1
            self.spheres.append(layer)
            self.biases.append(nn.Parameter(torch.zeros(1, per_point * channels),
                                            requires_grad=sphere_bias))
            self.norm_layers.append(GatedNormalization(
                per_point * channels, nonlinear_init, pool_points=permutation_invariant,
                grad_through_norm=norm_activations_grad))
        self.out_channels = channels

        # Invariant readout, then the head.
        if permutation_invariant:
            num_features = 2 * num_points * channels
        else:
            num_features = channels * num_points * (num_points + 1) // 2
            rows, cols = torch.triu_indices(num_points, num_points)
            self.register_buffer("_triu_rows", rows, persistent=False)
            self.register_buffer("_triu_cols", cols, persistent=False)
        self.linear1 = nn.Linear(num_features, hidden_features)
        self.linear2 = nn.Linear(hidden_features, output_channels)

    def equivariant_features(self, points: torch.Tensor) -> torch.Tensor:
        """Responses of the last layer, which transform under O(n) channel by channel.

        Args:
            points: shape ``(batch, num_points, space_dim)``.

        Returns:
            Responses, shape ``(batch, num_points, channels, space_dim + depth)``.
        """
        self._check_input(points)
        if native.usable(points):
            return native.from_lanes(self.native_features(points), self.num_points)
        y = points.unsqueeze(2)  # (batch, points, 1, n)
        for layer, bias, normalize in zip(self.spheres, self.biases, self.norm_layers):
            y = layer(y)  # (batch, points, channels, dim)
            y = y + bias.view(-1, y.shape[2], 1)
            y = normalize(y)
        return y

    def native_features(self, points: torch.Tensor) -> torch.Tensor:
        """The responses of :meth:`equivariant_features`, computed by the CPU kernels.

        Args:
            points: shape ``(batch, num_points, space_dim)``, on the CPU.

        Returns:
            Responses in the kernels' layout, shape ``(batch, channels, space_dim + depth,
            lanes)``: the points along the last dimension, zero-padded to 16 or 32 lanes
            (see :mod:`models.native`).
        """
        # The tensor code adds the biases and gates to the responses, which promotes them to
        # the parameters' dtype: float32 points in a float64 network give float64 features.
        dtype = points.dtype
        for parameter in [*self.biases, *(normalize.a for normalize in self.norm_layers)]:
            dtype = torch.promote_types(dtype, parameter.dtype)
        y = native.to_lanes(points.to(dtype))
        for layer, bias, normalize in zip(self.spheres, self.biases, self.norm_layers):
            y = native.sphere_block(y, layer.filter_bank().to(y.dtype), bias.view(-1).to(y.dtype),
                                    torch.sigmoid(normalize.a).to(y.dtype), self.num_points,
                                    normalize.pool_points, normalize.grad_through_norm)
        return y

    def invariant_features(self, points: torch.Tensor) -> torch.Tensor:
        """The readout of the Gram matrices, the head's input.

        Args:
            points: shape ``(batch, num_points, space_dim)``.

        Returns:
            Features, shape ``(batch, 2 * num_points * channels)`` for sets, ordered by
            (statistic, column, channel), or ``(batch, channels * num_points (num_points + 1)
            / 2)`` for sequences, ordered by (upper-triangle entry, channel).
        """
        self._check_input(points)
        if native.usable(points):
            y = self.native_features(points)  # (batch, channels, dim, lanes)
            if self.permutation_invariant:
                return native.sorted_gram_readout(y, self.num_points).flatten(1)
            y = y[..., :self.num_points]
            return self._triangle(y.transpose(2, 3) @ y)
        y = self.equivariant_features(points)
        if self.permutation_invariant:
            pooled = torch.stack(pooled_sorted_gram(y.permute(3, 1, 0, 2)))  # (2, q, batch, c)
            return pooled.permute(2, 0, 1, 3).flatten(1)
        return self._triangle(torch.einsum("bpcd,bqcd->bcpq", y, y))

    def _triangle(self, gram: torch.Tensor) -> torch.Tensor:
        """Upper triangles of Gram matrices ``(batch, channels, points, points)`` as features
        ``(batch, entries * channels)``, ordered by (entry, channel)."""
        last = self.num_points - 1
        if last > 0:
            # Weigh the corner entry like the symmetric pair it stands for.
            scale = gram.new_ones(gram.shape[-2:])
            scale[0, last] = math.sqrt(2)
            gram = gram * scale
        triangle = gram[:, :, self._triu_rows, self._triu_cols]  # (batch, channels, entries)
        return triangle.transpose(1, 2).flatten(1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Args: points, shape ``(batch, num_points, space_dim)``.

        Returns:
            Raw head outputs, shape ``(batch, output_channels)``.
        """
        features = self.invariant_features(points)
        return self.linear2(nn.functional.silu(self.linear1(features)))

    def _check_input(self, points: torch.Tensor):
        if points.ndim != 3 or points.shape[1:] != (self.num_points, self.space_dim):
            raise ValueError(
                f"expected points of shape (batch, {self.num_points}, {self.space_dim}), "
                f"got {tuple(points.shape)}")


def _preset(name: str, summary: str, **defaults) -> Callable[..., DeepSpheres]:
    """A function building :class:`DeepSpheres` with other defaults, keyword overrides allowed.

    Its signature is that of the class with the new defaults, so configuration tools that read
    signatures see the same keys and types.
    """
    signature = inspect.signature(DeepSpheres)
    signature = signature.replace(parameters=[
        parameter.replace(default=defaults.get(parameter.name, parameter.default))
        for parameter in signature.parameters.values()], return_annotation=DeepSpheres)

    def build(**options) -> DeepSpheres:
        unknown = sorted(set(options) - set(signature.parameters))
        if unknown:
            raise TypeError(f"{name} got unknown options {unknown}; accepted: "
                            f"{sorted(signature.parameters)}")
        return DeepSpheres(**(defaults | options))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{summary}\n\nOptions and their types are those of DeepSpheres."
    build.__signature__ = signature
    return build


DEH_o5reg = _preset(
    "DEH_o5reg", "The O(5) regression network: two ordered 5D points, one layer of 2 spheres.",
    depth=1, width=[2], hidden_features=32, output_channels=1, space_dim=5, num_points=2,
    sphere_bias=False, permutation_invariant=False)

DEH_hulls = _preset(
    "DEH_hulls", "The convex-hull volume network: 16 points in 5D, layers of 8 and 6 spheres.",
    depth=2, width=[8, 6], hidden_features=32, output_channels=1, space_dim=5, num_points=16,
    sphere_bias=True, permutation_invariant=True)

DEH_skeletons = _preset(
    "DEH_skeletons", "The skeleton classifier: 20 joints in 3D, 10 classes, layers of 3 and 2.",
    depth=2, width=[3, 2], hidden_features=32, output_channels=10, space_dim=3, num_points=20,
    sphere_bias=True, permutation_invariant=True)
