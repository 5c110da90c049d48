"""The DeepSpheres network: invariance, the plain reference, the released checkpoints."""

import copy

import numpy as np
import pytest
import torch

from models import deepspheres
from models.deepspheres import DEH_hulls, DEH_o5reg, DEH_skeletons, DeepSpheres
from tests import plain_reference as plain
from tests.equivariance import (MODEL_ATOL_FLOAT64, MODEL_RTOL_FLOAT32, group_elements,
                                max_relative_error)

PRESETS = {"o5reg": DEH_o5reg, "hulls": DEH_hulls, "skeletons": DEH_skeletons}
OTHER_CONFIGS = [
    dict(depth=3, width=[2, 2, 2], space_dim=4, num_points=5, permutation_invariant=True),
    dict(depth=1, width=[5], space_dim=2, num_points=7, permutation_invariant=True),
    dict(depth=2, width=3, space_dim=6, num_points=3, permutation_invariant=False),
    dict(depth=2, width=[1, 4], space_dim=3, num_points=1, permutation_invariant=True),
    dict(depth=2, width=[2, 3], space_dim=3, num_points=4, normalized_spheres=True,
         output_channels=3, nonlinear_init=0.5),
]
CONFIGS = [pytest.param(preset(), id=name) for name, preset in PRESETS.items()] + [
    pytest.param(DeepSpheres(**config), id=f"config{i}") for i, config in enumerate(OTHER_CONFIGS)]


def perturb(model: DeepSpheres, seed: int) -> DeepSpheres:
    """A copy with random biases and gates, so that their part in the network is tested."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [*model.biases, *(norm.a for norm in model.norm_layers)]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def random_points(model: DeepSpheres, batch: int, generator, dtype=torch.float64):
    return torch.randn(batch, model.num_points, model.space_dim, generator=generator,
                       dtype=dtype)


@pytest.mark.parametrize("model", CONFIGS)
def test_model_is_invariant_in_float64(model, code_path):
    torch.manual_seed(0)
    model = perturb(model, 1).double()
    generator = torch.Generator().manual_seed(2)
    points = random_points(model, 8, generator)
    outputs = model(points)
    for q in group_elements(model.space_dim, generator):
        transformed = points @ q.T
        if model.permutation_invariant:
            transformed = transformed[:, torch.randperm(model.num_points, generator=generator)]
        error = (model(transformed) - outputs).abs().max().item()
        assert error < MODEL_ATOL_FLOAT64, error


@pytest.mark.parametrize("model", CONFIGS)
def test_model_is_invariant_in_float32(model, code_path):
    model = perturb(model, 3)
    generator = torch.Generator().manual_seed(4)
    points = random_points(model, 8, generator, torch.float32)
    outputs = model(points)
    for q in group_elements(model.space_dim, generator, dtype=torch.float32):
        transformed = points @ q.T
        if model.permutation_invariant:
            transformed = transformed[:, torch.randperm(model.num_points, generator=generator)]
        assert max_relative_error(model(transformed), outputs) < MODEL_RTOL_FLOAT32


def test_ordered_model_is_not_permutation_invariant():
    # The check above would pass vacuously if the readout ignored point order.
    model = perturb(DEH_o5reg(), 5).double()
    points = random_points(model, 4, torch.Generator().manual_seed(6))
    assert (model(points) - model(points.flip(1))).abs().max() > 1e-6


@pytest.mark.parametrize("model", CONFIGS)
def test_model_matches_plain_reference(model, code_path):
    model = perturb(model, 7).double()
    points = random_points(model, 2, torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = torch.stack([plain.model(model, sample) for sample in points])
        torch.testing.assert_close(model(points), expected, rtol=1e-10, atol=1e-10)


def test_preset_signatures_carry_their_defaults():
    import inspect
    parameters = inspect.signature(DEH_hulls).parameters
    assert parameters["width"].default == [8, 6] and parameters["num_points"].default == 16
    assert set(parameters) == set(inspect.signature(DeepSpheres).parameters)
    assert isinstance(DEH_skeletons(hidden_features=8), DeepSpheres)
    with pytest.raises(TypeError, match="unknown options"):
        DEH_o5reg(widht=[3])


def test_options_change_what_is_trained():
    fixed = DeepSpheres(depth=1, width=[2], sphere_bias=False, fix_spheres=True)
    trained = {name for name, p in fixed.named_parameters() if p.requires_grad}
    assert "spheres.0.weight" not in trained and "biases.0" not in trained
    assert "norm_layers.0.a" in trained


def test_wrong_input_shape_names_the_expected_shape():
    model = DEH_hulls()
    for bad in (torch.randn(2, 16, 4), torch.randn(16, 5), torch.randn(2, 15, 5)):
        with pytest.raises(ValueError, match=r"expected points of shape \(batch, 16, 5\)"):
            model(bad)


def test_bad_width_is_rejected():
    with pytest.raises(ValueError, match="one entry per layer"):
        DeepSpheres(depth=2, width=[3])


@pytest.mark.parametrize("option,value", [("depth", 0), ("depth", -1), ("hidden_features", 0),
                                          ("output_channels", 0)])
def test_sizes_below_one_are_rejected_by_name(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be >= 1, got {value}$"):
        DeepSpheres(**{option: value})


# The released checkpoints

CHECKPOINTS = [
    ("o5_regression", "log-o5-reg/best_val_loss_30000", DEH_o5reg),
    ("hulls", "log-o5-hull/best_val_loss_65536", DEH_hulls),
    ("skeletons", "log-o3-skeletons/best_val_acc_2295", DEH_skeletons),
]


def load_reference(reference_dir, checkpoint, preset):
    state = torch.load(reference_dir / checkpoint, map_location="cpu", weights_only=True)
    model = preset()
    model.load_state_dict(state["model"])
    return model.eval()


@pytest.mark.parametrize("name,checkpoint,preset", CHECKPOINTS)
def test_released_checkpoints_reproduce_reference_outputs(reference_dir, name, checkpoint,
                                                          preset, code_path):
    model = load_reference(reference_dir, checkpoint, preset)
    data = np.load(reference_dir / "outputs" / f"{name}.npz")
    points = torch.from_numpy(data["inputs"]).reshape(-1, model.num_points, model.space_dim)
    q = torch.from_numpy(data["orthogonal"])
    transformed = points @ q.T
    if "permutation" in data:
        transformed = transformed[:, torch.from_numpy(data["permutation"])]
    with torch.no_grad():
        outputs, outputs_transformed = model(points), model(transformed)
        bank = model.spheres[0].filter_bank()
    for actual, key in [(outputs, "outputs"), (outputs_transformed, "outputs_transformed"),
                        (bank, "layer0_filter_bank")]:
        assert max_relative_error(actual, torch.from_numpy(data[key])) < 1e-4, key
    torch.testing.assert_close(model.spheres[0].weight,
                               torch.from_numpy(data["layer0_sphere_weights"]))


def test_reference_constants_are_checked(reference_dir):
    state = torch.load(reference_dir / CHECKPOINTS[0][1], map_location="cpu",
                       weights_only=True)["model"]
    state["spheres.0.construct_filter_banks.tetra_rotations"] *= -1
    with pytest.raises(RuntimeError, match="do not match"):
        DEH_o5reg().load_state_dict(state)


def test_checkpoint_of_another_model_is_refused(reference_dir):
    state = torch.load(reference_dir / CHECKPOINTS[1][1], map_location="cpu",
                       weights_only=True)["model"]
    with pytest.raises(RuntimeError, match="size mismatch|do not match"):
        DEH_skeletons().load_state_dict(state)


def test_own_state_dict_round_trips():
    model = perturb(DEH_hulls(), 9)
    copy = DEH_hulls()
    copy.load_state_dict(model.state_dict())
    points = torch.randn(3, 16, 5)
    torch.testing.assert_close(copy(points), model(points))
    assert not any("construct_filter_banks" in key for key in model.state_dict())


def test_model_module_exposes_presets_by_reference_name():
    for name in ("DEH_o5reg", "DEH_hulls", "DEH_skeletons"):
        assert callable(getattr(deepspheres, name))
