"""The compiled CPU kernels: gradients, agreement with the tensor code, and their limits.

Outputs of whole networks on both code paths are tested in ``tests/test_deepspheres.py``
(invariance, the plain reference, the released checkpoints); here the kernels' own gradients
are checked numerically and against autograd of the tensor code.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from models import deepspheres, native
from tests.conftest import REPO
from tests.test_deepspheres import perturb


@pytest.fixture(autouse=True)
def kernels():
    """Skip without a C++ compiler; with one, a failed build fails every test here."""
    if not native.available():
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is not None:
            pytest.fail(f"the CPU kernels did not build although {compiler} exists (see the log)")
        pytest.skip(f"no C++ compiler ({compiler}) to build the CPU kernels")


def block_inputs(batch, channels, width, n, num_points, pool_points, generator):
    """Random float64 inputs of :func:`native.sphere_block`, padding lanes zero."""
    spheres = channels * width
    lanes = native.lanes(num_points)
    x = torch.randn(batch, channels, n, lanes, generator=generator, dtype=torch.float64)
    x[..., num_points:] = 0
    per = spheres if pool_points else num_points * spheres
    banks = torch.randn(spheres, n + 1, n + 2, generator=generator, dtype=torch.float64)
    bias = torch.randn(per, generator=generator, dtype=torch.float64)
    gates = torch.rand(per, generator=generator, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, banks, bias, gates)]


def block_in_tensors(x, banks, bias, gates, num_points, pool_points, grad_through_norm):
    """What :func:`native.sphere_block` computes, written with tensor operations."""
    spheres, lanes = banks.shape[0], x.shape[-1]
    x = x[:, torch.arange(spheres) // (spheres // x.shape[1])]  # (batch, K, n, lanes)
    ones = torch.ones_like(x[:, :, :1])
    embedded = torch.cat([x, -ones, -x.square().sum(2, keepdim=True) / 2], 2)
    r = torch.einsum("kij,bkjp->bkip", banks, embedded)  # (batch, K, n + 1, lanes)
    if pool_points:
        bias, gates = bias.view(1, -1, 1, 1), gates.view(1, -1, 1, 1)
    else:  # point-major values, padded with zeros
        shape = (1, num_points, spheres)
        bias, gates = (torch.nn.functional.pad(t.view(shape).transpose(1, 2),
                                               (0, lanes - num_points)).unsqueeze(2)
                       for t in (bias, gates))
    r = r + bias
    real = torch.arange(lanes) < num_points
    norms = r.norm(dim=2, keepdim=True)
    if pool_points:
        norms = norms.masked_fill(~real, -1).amax(3, keepdim=True)
    if not grad_through_norm:
        norms = norms.detach()
    return torch.where(real, r / (gates * (norms - 1) + 1 + 1e-12), 0)


@pytest.mark.parametrize("num_points", [3, 16, 20])
@pytest.mark.parametrize("pool_points", [True, False])
@pytest.mark.parametrize("grad_through_norm", [True, False])
def test_sphere_block_matches_tensor_code_and_finite_differences(num_points, pool_points,
                                                                 grad_through_norm):
    generator = torch.Generator().manual_seed(num_points)
    inputs = block_inputs(2, 2, 3, 4, num_points, pool_points, generator)
    options = (num_points, pool_points, grad_through_norm)
    y = native.sphere_block(*inputs, *options)
    expected = block_in_tensors(*inputs, *options)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert (y[..., num_points:] == 0).all()
    weights = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    for actual, wanted in zip(torch.autograd.grad((y * weights).sum(), inputs),
                              torch.autograd.grad((expected * weights).sum(), inputs)):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)
    if grad_through_norm:
        assert torch.autograd.gradcheck(lambda *t: native.sphere_block(*t, *options), inputs)


@pytest.mark.parametrize("num_points", [1, 11, 16, 17, 20, 32])
def test_sorted_gram_readout_gradients_are_numerically_right(num_points):
    generator = torch.Generator().manual_seed(num_points)
    y = torch.randn(3, 2, 5, native.lanes(num_points), generator=generator, dtype=torch.float64)
    y[..., num_points:] = 0
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda y: native.sorted_gram_readout(y, num_points), (y,))


@pytest.mark.parametrize("preset", [deepspheres.DEH_hulls, deepspheres.DEH_o5reg,
                                    deepspheres.DEH_skeletons])
@pytest.mark.parametrize("norm_activations_grad", [True, False])
def test_gradients_match_the_tensor_code(preset, norm_activations_grad, monkeypatch):
    model = perturb(preset(norm_activations_grad=norm_activations_grad), 0).double()
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(6, model.num_points, model.space_dim, generator=generator,
                         dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, model.linear2.out_features, generator=generator,
                          dtype=torch.float64)
    inputs = [points] + [p for p in model.parameters() if p.requires_grad]

    def gradients():
        return torch.autograd.grad((model(points) * weights).sum(), inputs)

    with_kernels = gradients()
    monkeypatch.setattr(native, "usable", lambda points: False)
    for actual, expected in zip(with_kernels, gradients()):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_float32_training_step_matches_float64():
    torch.manual_seed(0)
    model = perturb(deepspheres.DEH_hulls(), 2)
    points = torch.randn(4, 16, 5)
    loss = model(points).square().sum()
    loss.backward()
    reference = perturb(deepspheres.DEH_hulls(), 2).double()
    reference.load_state_dict(model.state_dict())
    reference(points.double()).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        if p.grad is not None:
            scale = q.grad.abs().max().clamp_min(1e-12)
            assert ((p.grad.double() - q.grad).abs().max() / scale) < 1e-4


def test_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_SWITCH, "0")
    native.reset()
    try:
        assert not native.usable(torch.zeros(1, 4, 3))
    finally:
        monkeypatch.undo()
        native.reset()
    assert native.usable(torch.zeros(1, 4, 3))


def test_what_the_kernels_do_not_take_goes_to_the_tensor_code():
    assert not native.usable(torch.zeros(1, native.MAX_POINTS + 1, 3))
    assert not native.usable(torch.zeros(1, 4, native.MAX_SPACE_DIM + 1))
    assert not native.usable(torch.zeros(1, 4, 3, dtype=torch.float16))
    assert not native.usable(torch.zeros(1, 4, 3, device="meta"))
    model = deepspheres.DeepSpheres(depth=1, width=[2], space_dim=3, num_points=40)
    assert model(torch.randn(2, 40, 3)).shape == (2, 1)


def test_bad_kernel_inputs_are_named():
    with pytest.raises(ValueError, match="1 to 32 points"):
        native.lanes(33)
    with pytest.raises(RuntimeError, match="16 or 32 lanes"):
        native.sorted_gram_readout(torch.zeros(1, 2, 3, 24), 20)
    with pytest.raises(RuntimeError, match="do not fit"):
        native.sorted_gram_readout(torch.zeros(1, 2, 3, 16), 17)


def test_failed_build_falls_back_to_the_tensor_code(tmp_path):
    script = ("import torch\n"
              "from models import deepspheres, native\n"
              "print(tuple(deepspheres.DEH_hulls()(torch.randn(2, 16, 5)).shape), "
              "native.available())\n"
              "try:\n"
              "    native.sorted_gram_readout(torch.zeros(1, 1, 3, 16), 3)\n"
              "except RuntimeError as error:\n"
              "    print('not available' in str(error))\n")
    environment = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, env=environment, check=True)
    assert done.stdout.split() == ["(2,", "1)", "False", "True"]
    assert "could not be built" in done.stderr and "Traceback" not in done.stderr


def on_both_paths(function, monkeypatch):
    """``function()`` on the kernels, then on the tensor code alone."""
    with_kernels = function()
    with monkeypatch.context() as patch:
        patch.setattr(native, "usable", lambda points: False)
        return with_kernels, function()


@pytest.mark.parametrize("preset", [deepspheres.DEH_hulls, deepspheres.DEH_skeletons])
def test_a_nan_spreads_over_its_sample_as_in_the_tensor_code(preset, monkeypatch):
    # The maximum norm over the points, and the maximum over the Gram rows, take in the NaN,
    # as torch.amax does: no finite or -inf feature hides it.
    model = perturb(preset(), 0).double()
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(3, model.num_points, model.space_dim, generator=generator,
                         dtype=torch.float64)
    points[1, 3, 1] = float("nan")
    for features in (model.equivariant_features, model.invariant_features):
        with_kernels, expected = on_both_paths(lambda: features(points), monkeypatch)
        assert expected[1].isnan().all()
        torch.testing.assert_close(with_kernels, expected, rtol=1e-12, atol=1e-12,
                                   equal_nan=True)


def test_float32_points_in_a_float64_network(monkeypatch):
    # The tensor code promotes the responses to the parameters' dtype when adding the biases.
    model = perturb(deepspheres.DEH_hulls(), 0).double()
    points = torch.randn(4, 16, 5, generator=torch.Generator().manual_seed(0))
    with_kernels, in_tensors = on_both_paths(lambda: model(points), monkeypatch)
    assert with_kernels.dtype == in_tensors.dtype == torch.float64
    torch.testing.assert_close(with_kernels, model(points.double()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_kernels, in_tensors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", [deepspheres.DEH_hulls, deepspheres.DEH_o5reg])
def test_second_derivatives_are_refused_not_wrong(preset, monkeypatch):
    model = perturb(preset(), 0).double()
    points = torch.randn(2, model.num_points, model.space_dim, dtype=torch.float64,
                         requires_grad=True)

    def gradient_penalty():
        gradient, = torch.autograd.grad(model(points).sum(), points, create_graph=True)
        return gradient.square().sum()

    with pytest.raises(RuntimeError, match="first derivatives only"):
        gradient_penalty()
    monkeypatch.setattr(native, "usable", lambda points: False)
    gradient_penalty().backward()
    assert points.grad.isfinite().all()


@pytest.mark.parametrize("preset", [deepspheres.DEH_hulls, deepspheres.DEH_o5reg])
def test_an_empty_batch(preset, monkeypatch):
    model = preset().double()
    points = torch.zeros(0, model.num_points, model.space_dim, dtype=torch.float64,
                         requires_grad=True)
    for outputs in on_both_paths(lambda: model(points), monkeypatch):
        assert outputs.shape == (0, model.linear2.out_features)
        outputs.sum().backward()
