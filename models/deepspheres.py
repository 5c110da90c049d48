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
"""

import inspect
import math
from typing import Sequence

import torch
from torch import nn

from models.hyperspheres import EquivariantHyperspheres

# Keeps the normalization's denominator away from zero.
NORM_EPS = 1e-12


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
        widths = [width] * depth if isinstance(width, int) else list(width)
        if depth < 1 or len(widths) != depth:
            raise ValueError(f"width must list one entry per layer (depth = {depth}), "
                             f"got {width!r}")
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
        y = points.unsqueeze(2)  # (batch, points, 1, n)
        for layer, bias, normalize in zip(self.spheres, self.biases, self.norm_layers):
            y = layer(y)  # (batch, points, channels, dim)
            y = y + bias.view(-1, y.shape[2], 1)
            y = normalize(y)
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
        y = self.equivariant_features(points)
        gram = torch.einsum("bpcd,bqcd->bcpq", y, y)  # (batch, channels, points, points)
        if self.permutation_invariant:
            rows = gram.sort(dim=-1).values
            pooled = torch.stack([rows.amax(dim=2), rows.mean(dim=2)], dim=1)  # (b, 2, c, q)
            return pooled.transpose(2, 3).flatten(1)
        last = self.num_points - 1
        if last > 0:
            # Weigh the corner entry like the symmetric pair it stands for.
            scale = torch.ones_like(gram[0, 0])
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


def _preset(name: str, summary: str, **defaults) -> callable:
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
