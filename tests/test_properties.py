"""Property tests: random configurations and damaged data files meet the project's own errors.

Whatever a configuration file, a command line, a skeleton `.npy` file or the hull cache holds,
the outcome is either a working object or one of the project's error classes with a one-line
message, never an exception from deep inside a library.
"""

import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from data import hulls
from data.common import DataError, atomic_save_npz
from data.hulls import NUM_POINTS, SPACE_DIM, Hulls, cache_path, generate_hulls
from data.skeletons import Skeletons
from engineer.config import GROUPS, Config, ConfigError, parse, signature_of
from engineer.experiments import EXPERIMENTS
from engineer.runner import build

# Modest and reproducible: the same examples on every run, a few seconds per test.
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

O5 = EXPERIMENTS["o5_regression"]
DEFAULTS = parse([], O5.configs, O5.seed)
OPTION_NAMES = sorted({key for group in GROUPS
                       for key in signature_of(DEFAULTS.target(group), group)} | {"module"})
MODULES = ["models.deepspheres.DeepSpheres", "models.deepspheres.DEH_hulls", "torch.optim.SGD",
           "data.hulls.Hulls", "engineer.trainer.Trainer", "os.system", "data.common.np",
           "models", "torch.optim.Adam.__init__"]


def one_line(error: Exception) -> bool:
    return bool(str(error)) and "\n" not in str(error)


# ---------------------------------------------------------------------------------------------
# Configuration

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(MODULES),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
groups = st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=6), values,
                         max_size=5)
documents = st.one_of(
    st.dictionaries(st.sampled_from([*GROUPS, "seed"]) | st.text(max_size=6),
                    groups | values, max_size=4).map(yaml.safe_dump),
    values.map(yaml.safe_dump),
    st.text(max_size=60),  # anything, most of it not YAML of a mapping
    st.binary(max_size=30),
)


def write(directory: Path, index: int, content: str | bytes) -> str:
    path = directory / f"{index}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def check_parsed(config: Config) -> None:
    """A configuration that parsed is complete and typed: its resolved form can be listed."""
    resolved = config.resolved()
    assert set(resolved) == {"seed", *GROUPS}
    assert 0 <= config.seed < 2**32


@PROPERTY
@given(stack=st.lists(documents, min_size=1, max_size=3))
def test_stacks_of_random_files_parse_or_raise_config_error(stack):
    with tempfile.TemporaryDirectory() as directory:
        argv = []
        for index, content in enumerate(stack):
            argv += ["-C", write(Path(directory), index, content)]
        try:
            config = parse(argv, O5.configs, O5.seed)
        except ConfigError as error:
            assert one_line(error), error
        else:
            check_parsed(config)


keys = st.one_of(
    st.builds(lambda group, option: f"{group}.{option}",
              st.sampled_from(GROUPS), st.sampled_from(OPTION_NAMES)),
    st.sampled_from(["seed", "trainer", "model.", ".lr", "a.b.c"]),
    st.text(string.ascii_letters + "._-", max_size=10),
)
texts = st.one_of(
    st.text(string.ascii_letters + string.punctuation + " ", max_size=8),  # no long numbers
    st.integers(-3, 12).map(str),
    st.lists(st.integers(-3, 12), max_size=3).map(str),
    st.sampled_from(["null", "None", "true", "[", "{a: 1}", ".nan", ".inf", "1e-3", "-0",
                     "4294967296", "-1", "1e400", "float64", "cuda", "[2, 2]", *MODULES]),
)
arguments = st.lists(
    st.one_of(st.builds(lambda key, text: f"--{key}={text}", keys, texts),
              st.sampled_from(["-C", "--seed", "stray", "--model.width"])),
    max_size=5,
)


@PROPERTY
@given(argv=arguments)
def test_random_command_lines_parse_and_build_or_raise_config_error(argv):
    # A parsed configuration also builds its trainer and model (both cheap) or says why not.
    try:
        config = parse(argv, O5.configs, O5.seed)
        check_parsed(config)
        build(config, "trainer")
        model = build(config, "model")
    except ConfigError as error:
        assert one_line(error), error
    else:
        assert sum(p.numel() for p in model.parameters()) > 0


# ---------------------------------------------------------------------------------------------
# Skeleton files

SKELETON_FILES = [f"{axis}{name}.npy" for name in ("train", "val", "test") for axis in "XY"]
DTYPES = [np.float16, np.float32, np.float64, np.longdouble, np.int8, np.int64, np.uint8,
          np.uint64, np.bool_, np.complex64, np.dtype("<U3"), np.dtype("S2"),
          np.dtype("M8[s]")]
finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


def npy_bytes(array: np.ndarray) -> bytes:
    with tempfile.TemporaryFile() as file:
        np.save(file, array)
        file.seek(0)
        return file.read()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    with tempfile.TemporaryFile() as file:
        np.savez(file, **arrays)
        file.seek(0)
        return file.read()


any_array = st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(
    dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))
skeleton_points = st.sampled_from([0, 1, 12]).flatmap(lambda samples: hnp.arrays(
    st.sampled_from([np.float16, np.float32, np.float64]), (samples, 20, 3),
    elements=st.floats(-1e3, 1e3, width=16) | finite_or_not))
skeleton_labels = st.sampled_from([0, 11, 12, 13]).flatmap(lambda samples: hnp.arrays(
    st.sampled_from([np.int8, np.int64, np.uint64, np.float64]), (samples,),
    elements=st.integers(-2, 12)))
damaged_files = st.one_of(
    any_array.map(npy_bytes),
    skeleton_points.map(npy_bytes),
    skeleton_labels.map(npy_bytes),
    st.just(b""),
    st.binary(max_size=200),
    st.builds(lambda cut: npy_bytes(np.zeros((12, 20, 3)))[:cut], st.integers(0, 200)),
    st.just(npz_bytes(a=np.zeros((12, 20, 3)))),  # an .npz under an .npy name
)


def fake_skeletons(directory: Path) -> None:
    generator = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        np.save(directory / f"X{name}.npy", generator.standard_normal((12, 20, 3)))
        np.save(directory / f"Y{name}.npy", np.arange(12) % 10)


@PROPERTY
@given(damage=st.dictionaries(st.sampled_from(SKELETON_FILES), damaged_files, min_size=1,
                              max_size=2))
def test_damaged_skeleton_files_load_or_raise_data_error(damage):
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / "utkinect_skeletons"
        fake_skeletons(directory)
        for name, content in damage.items():
            (directory / name).write_bytes(content)
        try:
            data = Skeletons(root=root, batch_size=4, seed=0)
        except DataError as error:
            assert one_line(error), error
        else:
            for split, (inputs, labels) in data.splits.items():
                assert inputs.shape[1:] == (20, 3) and len(inputs) == len(labels) > 0
                assert inputs.dtype == torch.float64 and torch.isfinite(inputs).all()
                assert labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() < 10
            inputs, labels = data.train_batch()
            assert len(inputs) == len(labels) > 0


# ---------------------------------------------------------------------------------------------
# The hull cache

SPLIT_SIZE = 8
HULL_KEYS = [f"{kind}_{split}" for split in ("train", "val", "test")
             for kind in ("points", "volumes")]


@pytest.fixture(scope="module")
def valid_hulls(tmp_path_factory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("hulls") / "cache.npz"
    generate_hulls(path, data_seed=0, split_size=SPLIT_SIZE, workers=1, progress_bar=False)
    with np.load(path) as file:
        return {key: file[key] for key in file.files}


hull_arrays = st.one_of(
    any_array,
    hnp.arrays(st.sampled_from([np.float32, np.float64]),
               st.sampled_from([(SPLIT_SIZE, NUM_POINTS, SPACE_DIM), (SPLIT_SIZE,), (0,),
                                (SPLIT_SIZE, 1)]),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
)
hull_damage = st.one_of(
    st.dictionaries(st.sampled_from(HULL_KEYS) | st.text(string.ascii_letters, max_size=4),
                    hull_arrays, max_size=3).map(lambda arrays: ("replace", arrays)),
    st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY"]).map(lambda raw: ("bytes", raw)),
    st.binary(max_size=100).map(lambda raw: ("bytes", raw)),
    st.integers(0, 3000).map(lambda cut: ("truncate", cut)),
    st.just(("directory", None)),
)


@pytest.fixture
def quick_generation(monkeypatch, valid_hulls):
    """Regeneration writes the valid arrays the way the generator does, without the pool."""
    monkeypatch.setattr(hulls, "generate_hulls",
                        lambda path, *args: atomic_save_npz(path, **valid_hulls))


@PROPERTY
@given(damage=hull_damage)
def test_damaged_hull_cache_is_regenerated_or_raises_data_error(valid_hulls, quick_generation,
                                                                 damage):
    kind, detail = damage
    with tempfile.TemporaryDirectory() as root:
        path = cache_path(Path(root), data_seed=0, split_size=SPLIT_SIZE)
        path.parent.mkdir(parents=True)
        if kind == "replace":  # the valid cache with some arrays replaced or added
            path.write_bytes(npz_bytes(**(valid_hulls | detail)))
        elif kind == "bytes":
            path.write_bytes(detail)
        elif kind == "truncate":
            path.write_bytes(npz_bytes(**valid_hulls)[:detail])
        else:
            path.mkdir()
        try:
            data = Hulls(root=root, split_size=SPLIT_SIZE, workers=1, progress_bar=False)
        except DataError as error:
            assert one_line(error), error
        else:
            for split, (points, volumes) in data.splits.items():
                np.testing.assert_array_equal(points.numpy(), valid_hulls[f"points_{split}"])
                np.testing.assert_array_equal(volumes[:, 0].numpy(),
                                              valid_hulls[f"volumes_{split}"])
