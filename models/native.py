"""Compiled CPU kernels for the sphere layers and the sorted Gram readout of DeepSpheres.

``csrc/deepspheres_cpu.cpp`` computes two steps of the network, forward and backward, one
sample at a time in buffers that stay in the processor's caches:

- :func:`sphere_block`: a layer's filter banks applied to the embedded points, the bias and
  the gated normalization (see :class:`models.deepspheres.GatedNormalization`);
- :func:`sorted_gram_readout`: the Gram matrix of each sample and channel with every row
  sorted, pooled over the rows by maximum and mean.

They give the numbers of the tensor code in :mod:`models.deepspheres` up to rounding, which
the tests check; the network uses them for float32 and float64 inputs on the CPU with at most
``MAX_POINTS`` points in at most ``MAX_SPACE_DIM`` dimensions (:func:`usable`), and the tensor
code for everything else. The kernels are compiled with
``torch.utils.cpp_extension`` the first time they are needed, which takes half a minute
and needs a C++ compiler; the build is kept in ``$TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``) and reused by later processes. Without a compiler, or with the
environment variable ``DEEPSPHERES_NATIVE=0``, the network runs on the tensor code alone.
"""

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "deepspheres_cpu.cpp"
# Set to 0 to run on the tensor code alone.
ENVIRONMENT_SWITCH = "DEEPSPHERES_NATIVE"
# Largest number of points per sample that the kernels take.
MAX_POINTS = 32
# Largest space dimension for which the network uses the kernels: they apply each filter bank
# point by point, and from n = 64 on the tensor code's matrix products are faster
# (docs/benchmarks.md, scaling table).
MAX_SPACE_DIM = 32


def _build_name() -> str:
    """The build's name: a short hash of the source and of this processor.

    The kernels are compiled for the processor they are built on, and checkouts with other
    versions of the source may share one build directory, so each pair gets its own build.
    """
    description = platform.machine() + platform.processor() + SOURCE.read_text()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            description += "".join(sorted({line for line in cpuinfo
                                           if line.startswith(("flags", "model name"))}))
    except OSError:
        pass
    return "deepspheres_cpu_" + hashlib.sha1(description.encode()).hexdigest()[:12]


def _compiler_flags() -> list[str]:
    flags = ["-O3", "-fno-math-errno"]  # square roots need not set errno, so they vectorize
    if platform.system() == "Linux":
        flags.append("-fopenmp")  # at::parallel_for runs on OpenMP threads
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
    return flags


# Whether the kernels are loaded: None until available() first looks.
_loaded: bool | None = None


def available() -> bool:
    """Build (or load the kept build of) the kernels; False where that is not possible.

    The answer is kept in a module variable rather than a functools cache, so that
    ``torch.compile`` reads it as a constant instead of tracing the build.
    """
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def reset() -> None:
    """Forget the answer of :func:`available`, so that the next call reads the environment
    variable ``DEEPSPHERES_NATIVE`` again (for tests and benchmarks in one process)."""
    global _loaded
    _loaded = None


def _load() -> bool:
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return False
    from torch.utils import cpp_extension

    name = _build_name()
    logger.info("loading the CPU kernels %s (built on first use: half a minute to a minute)", name)
    flags = _compiler_flags()
    try:
        cpp_extension.load(name, sources=[str(SOURCE)], extra_cflags=flags,
                           extra_ldflags=[flag for flag in flags if flag == "-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, or a failed build: the tensor code still works
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        logger.warning("the CPU kernels could not be built (%s); running on the slower tensor "
                       "code. Install a C++ compiler, or set %s=0 to skip the build.",
                       first_line, ENVIRONMENT_SWITCH)
        return False
    _register_fake_kernels()
    return True


def usable(points: torch.Tensor) -> bool:
    """True when the network should run these points ``(batch, N, n)`` on the kernels:
    float32 or float64 on the CPU, at most ``MAX_POINTS`` of them, ``n`` at most
    ``MAX_SPACE_DIM``."""
    return (points.device.type == "cpu" and points.dtype in (torch.float32, torch.float64)
            and points.shape[1] <= MAX_POINTS and points.shape[2] <= MAX_SPACE_DIM
            and available())


def _register_fake_kernels():
    """Output shapes of the kernels, so that ``torch.compile`` can trace through them."""
    @torch.library.register_fake("deepspheres::sphere_block")
    def _(x, banks, bias, gates, points, pool_points):
        batch, lanes = x.shape[0], x.shape[-1]
        return (x.new_empty(batch, banks.shape[0], banks.shape[1], lanes),
                x.new_empty(batch, banks.shape[0], lanes))

    @torch.library.register_fake("deepspheres::sphere_block_backward")
    def _(grad, x, banks, bias, gates, y, norms, points, pool_points, grad_through_norm):
        return (torch.empty_like(x), torch.empty_like(banks), torch.empty_like(bias),
                torch.empty_like(gates))

    @torch.library.register_fake("deepspheres::sorted_gram_readout")
    def _(y, points):
        return y.new_empty(y.shape[0], 2, points, y.shape[1])

    @torch.library.register_fake("deepspheres::sorted_gram_readout_backward")
    def _(grad, y, points):
        return torch.empty_like(y)


class _SphereBlock(torch.autograd.Function):
    """The forward pass keeps the response norms, which the backward reads with the output."""

    @staticmethod
    def forward(ctx, x, banks, bias, gates, points, pool_points, grad_through_norm):
        y, norms = torch.ops.deepspheres.sphere_block(x, banks, bias, gates, points,
                                                      pool_points)
        ctx.save_for_backward(x, banks, bias, gates, y, norms)
        ctx.options = (points, pool_points, grad_through_norm)
        return y

    @staticmethod
    def backward(ctx, grad):
        _refuse_second_derivatives()
        grads = torch.ops.deepspheres.sphere_block_backward(grad, *ctx.saved_tensors,
                                                            *ctx.options)
        return (*grads, None, None, None)


class _SortedGramReadout(torch.autograd.Function):
    """The backward pass sorts again, recording the swaps, and undoes them on the gradient."""

    @staticmethod
    def forward(ctx, y, points):
        ctx.save_for_backward(y)
        ctx.points = points
        return torch.ops.deepspheres.sorted_gram_readout(y, points)

    @staticmethod
    def backward(ctx, grad):
        _refuse_second_derivatives()
        y, = ctx.saved_tensors
        return torch.ops.deepspheres.sorted_gram_readout_backward(grad, y, ctx.points), None


def _refuse_second_derivatives() -> None:
    """Raise in a backward pass that builds a graph (``create_graph=True``): the backward
    kernels are not differentiable, so second derivatives would come out wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the CPU kernels of models.native give first derivatives only, and a backward "
            "pass with create_graph=True (a gradient penalty, a Hessian) needs second ones; "
            f"set {ENVIRONMENT_SWITCH}=0 (and call models.native.reset() if this process has "
            "used the kernels) to run the network on the tensor code")


def _require() -> None:
    if not available():
        raise RuntimeError("the CPU kernels are not available on this machine (the log says "
                           "why); models.deepspheres runs without them")


def lanes(num_points: int) -> int:
    """Length of the padded points dimension of the kernels' tensors: 16 or 32."""
    if not 1 <= num_points <= MAX_POINTS:
        raise ValueError(f"the kernels take 1 to {MAX_POINTS} points, got {num_points}")
    return 16 if num_points <= 16 else 32


def to_lanes(points: torch.Tensor) -> torch.Tensor:
    """Points ``(batch, N, n)`` in the kernels' layout ``(batch, 1, n, lanes)``, zero-padded."""
    num_points = points.shape[1]
    padded = nn.functional.pad(points.transpose(1, 2), (0, lanes(num_points) - num_points))
    return padded.unsqueeze(1).contiguous()


def from_lanes(y: torch.Tensor, num_points: int) -> torch.Tensor:
    """Responses ``(batch, K, dim, lanes)`` as ``(batch, N, K, dim)`` (a view)."""
    return y[..., :num_points].permute(0, 3, 1, 2)


def sphere_block(x: torch.Tensor, banks: torch.Tensor, bias: torch.Tensor, gates: torch.Tensor,
                 num_points: int, pool_points: bool,
                 grad_through_norm: bool = True) -> torch.Tensor:
    """A hypersphere layer with its bias and gated normalization, as one kernel.

    For the points of input channel ``c`` and a sphere ``j`` reading it (``c = j // W``):
    ``r = banks[j] @ (x_c, -1, -|x_c|^2 / 2) + bias_j``, then ``r / (g_j (m - 1) + 1 + 1e-12)``
    with ``m`` the norm of ``r``, or its maximum over the points when ``pool_points``.

    Args:
        x: points in the kernels' layout, shape ``(batch, C, n, lanes)``, the first
            ``num_points`` lanes real and the others zero (see :func:`to_lanes`).
        banks: filter banks, shape ``(K, n + 1, n + 2)``, ``K`` a multiple of ``C``.
        bias: one value per sphere, ``(K,)``, or per point and sphere, ``(num_points * K,)``
            (point-major) when not ``pool_points``.
        gates: ``sigmoid(a)`` of the normalization, shaped like ``bias``.
        num_points: number of real points.
        pool_points: one norm per sample and sphere, the maximum over the points.
        grad_through_norm: let gradients flow through ``m``.

    Returns:
        Normalized responses, shape ``(batch, K, n + 1, lanes)``, zero in the padding lanes.
    """
    _require()
    return _SphereBlock.apply(x.contiguous(), banks.contiguous(), bias.contiguous(),
                              gates.contiguous(), num_points, pool_points, grad_through_norm)


def sorted_gram_readout(y: torch.Tensor, num_points: int) -> torch.Tensor:
    """Gram matrices of each sample and channel, rows sorted, pooled by maximum and mean.

    Args:
        y: responses in the kernels' layout, shape ``(batch, channels, dim, lanes)``.
        num_points: number of real points.

    Returns:
        ``(batch, 2, num_points, channels)``: index 0 of the second dimension holds the
        maximum over the rows at each sorted position, index 1 the mean.
    """
    _require()
    return _SortedGramReadout.apply(y.contiguous(), num_points)
