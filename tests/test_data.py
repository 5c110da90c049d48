"""The data layer: the O(5) stream, random orthogonal matrices, skeleton files, hull caching."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.common import DataError, ShuffledBatches, data_root
from data.hulls import Hulls, cache_path
from data.o5_regression import O5Regression, o5_target
from data.skeletons import Skeletons
from data.transforms import random_orthogonal


def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("DATAROOT", str(tmp_path))
    assert data_root("/elsewhere") == Path("/elsewhere")
    assert data_root(None) == tmp_path
    monkeypatch.delenv("DATAROOT")
    assert data_root(None) == Path("datasets")


def test_o5_draws_the_reference_stream_and_standardizes():
    data = O5Regression(num_samples=100, seed=3)
    stream = np.random.RandomState(3)
    train, val, test = (stream.randn(n, 10) for n in (100, 16384, 16384))
    scale = np.sqrt((train.reshape(100, 2, 5) ** 2).mean(axis=(0, 2)))
    for split, raw in zip(("train", "val", "test"), (train, val, test)):
        inputs, targets = data.splits[split]
        points = raw.reshape(-1, 2, 5)
        np.testing.assert_allclose(inputs.numpy(), points / scale[:, None], rtol=1e-6)
        np.testing.assert_allclose(targets[:, 0].numpy(), o5_target(points), rtol=1e-5,
                                   atol=1e-5)
    target = o5_target(train.reshape(100, 2, 5))
    assert data.target_mean == pytest.approx(target.mean())
    assert data.target_std == pytest.approx(target.std())
    standardized = torch.tensor([[0.0], [1.0]])
    torch.testing.assert_close(
        data.decode(standardized)[:, 0],
        torch.tensor([target.mean(), target.mean() + target.std()], dtype=torch.float32))
    assert data.checkpoint_state()["target_std"] == data.target_std


def test_o5_target_is_invariant():
    points = np.random.default_rng(0).standard_normal((8, 2, 5))
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((5, 5)))
    np.testing.assert_allclose(o5_target(points @ q.T), o5_target(points), atol=1e-12)


def test_shuffled_batches_resume_where_they_stopped():
    tensors = (torch.arange(10), torch.arange(10) * 2)
    stream = ShuffledBatches(tensors, batch_size=4, seed=5)
    first = [next(stream)[0] for _ in range(4)]  # crosses an epoch (batches of 4, 4, 2)
    assert sorted(torch.cat(first[:3]).tolist()) == list(range(10))
    state = stream.state_dict()
    rest = [next(stream)[0] for _ in range(5)]
    again = ShuffledBatches(tensors, batch_size=4, seed=5)
    again.load_state_dict(state)
    for expected in rest:
        torch.testing.assert_close(next(again)[0], expected)


@pytest.mark.parametrize("determinant", [1, -1, None])
def test_random_orthogonal(determinant):
    matrices = random_orthogonal(200, 3, torch.Generator().manual_seed(0), determinant)
    identity = torch.eye(3, dtype=torch.float64).expand(200, 3, 3)
    torch.testing.assert_close(matrices @ matrices.transpose(1, 2), identity)
    determinants = torch.linalg.det(matrices)
    if determinant is None:
        assert 60 < (determinants < 0).sum() < 140
    else:
        torch.testing.assert_close(determinants, torch.full((200,), float(determinant),
                                                             dtype=torch.float64))


def fake_skeletons(root: Path, partitions=("train", "val", "test"), samples=12) -> Path:
    directory = root / "utkinect_skeletons"
    directory.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for name in partitions:
        np.save(directory / f"X{name}.npy", generator.standard_normal((samples, 20, 3)))
        np.save(directory / f"Y{name}.npy", np.arange(samples) % 10)
    return directory


def test_skeletons_transform_val_and_test_by_reflections(tmp_path):
    directory = fake_skeletons(tmp_path)
    data = Skeletons(root=str(tmp_path), seed=0)
    raw = torch.from_numpy(np.load(directory / "Xtest.npy"))
    moved = data.splits["test"][0].double()
    # Each sample is moved by its own orthogonal matrix of determinant -1: solve for it.
    matrices = torch.linalg.lstsq(raw, moved).solution.transpose(1, 2)
    eye = torch.eye(3, dtype=torch.float64).expand(12, 3, 3)
    torch.testing.assert_close(matrices @ matrices.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(matrices), -torch.ones(12, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(matrices[0], matrices[1])
    torch.testing.assert_close(data.splits["train"][0].double(),
                               torch.from_numpy(np.load(directory / "Xtrain.npy")), atol=1e-6,
                               rtol=0)
    # The transforms are drawn once from a fixed seed: the same for another run seed.
    torch.testing.assert_close(Skeletons(root=str(tmp_path), seed=9).splits["test"][0],
                               data.splits["test"][0])


@pytest.mark.parametrize("augmentation,determinant", [("so3", 1.0), ("o3", None)])
def test_skeleton_augmentation(tmp_path, augmentation, determinant):
    fake_skeletons(tmp_path)
    data = Skeletons(root=str(tmp_path), augmentation=augmentation, batch_size=12, seed=0)
    plain = Skeletons(root=str(tmp_path), batch_size=12, seed=0)
    moved, labels = data.train_batch()
    raw, same_labels = plain.train_batch()
    assert torch.equal(labels, same_labels)
    matrices = torch.linalg.lstsq(raw.double(), moved.double()).solution
    determinants = torch.linalg.det(matrices)
    torch.testing.assert_close(determinants.abs(), torch.ones(12, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    if determinant is not None:
        assert (determinants > 0).all()


def test_skeleton_options_are_checked(tmp_path):
    fake_skeletons(tmp_path)
    with pytest.raises(DataError, match="num_samples=300 is not a training size; accepted: 260"):
        Skeletons(root=str(tmp_path), num_samples=300)
    with pytest.raises(DataError, match="augmentation='SO3' is unknown; accepted: I, so3, o3"):
        Skeletons(root=str(tmp_path), augmentation="SO3")


def test_missing_skeleton_files_name_files_place_and_source(tmp_path):
    fake_skeletons(tmp_path, partitions=("train", "val"))
    with pytest.raises(DataError) as error:
        Skeletons(root=str(tmp_path))
    message = str(error.value)
    assert "missing Xtest.npy, Ytest.npy" in message
    assert str((tmp_path / "utkinect_skeletons").resolve()) in message
    assert "UTKinect-Action3D" in message and "\n" not in message


def test_corrupted_npy_is_reported(tmp_path):
    directory = fake_skeletons(tmp_path)
    content = (directory / "Xval.npy").read_bytes()
    (directory / "Xval.npy").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=r"cannot read .*Xval\.npy.*replace the file"):
        Skeletons(root=str(tmp_path))
    np.save(directory / "Xval.npy", np.full((12, 20, 3), np.nan))
    with pytest.raises(DataError, match=r"Xval\.npy contains NaN"):
        Skeletons(root=str(tmp_path))
    assert sorted(os.listdir(directory)) == sorted(
        f"{axis}{name}.npy" for axis in "XY" for name in ("train", "val", "test"))


def test_real_skeletons_load(skeletons_dir):
    data = Skeletons(root=str(skeletons_dir.parent), num_samples=260)
    assert [data.num_samples(split) for split in ("train", "val", "test")] == [260, 670, 3062]
    assert data.splits["test"][0].shape == (3062, 20, 3)


def test_hulls_are_generated_cached_and_regenerated_when_wrong(tmp_path, caplog):
    data = Hulls(root=str(tmp_path), split_size=64, num_samples=32, workers=2,
                 progress_bar=False)
    path = cache_path(tmp_path, 0, 64)
    assert [data.num_samples(split) for split in ("train", "val", "test")] == [32, 64, 64]
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    inputs, volumes = data.splits["test"]
    assert inputs.shape == (64, 16, 5) and volumes.shape == (64, 1) and (volumes > 0).all()
    from scipy.spatial import ConvexHull

    assert volumes[3, 0].item() == pytest.approx(ConvexHull(inputs[3].double()).volume,
                                                 rel=1e-4)

    # Reused as is; the same seed gives the same data wherever generated.
    stamp = path.stat().st_mtime_ns
    again = Hulls(root=str(tmp_path), split_size=64, num_samples=32, progress_bar=False)
    assert path.stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.splits["val"][1], data.splits["val"][1])
    other_root = tmp_path / "other"
    elsewhere = Hulls(root=str(other_root), split_size=64, workers=1, progress_bar=False)
    torch.testing.assert_close(elsewhere.splits["test"][1], data.splits["test"][1])

    # A corrupted cache is detected and regenerated.
    path.write_bytes(path.read_bytes()[:500])
    repaired = Hulls(root=str(tmp_path), split_size=64, num_samples=32, progress_bar=False)
    assert "generating it again" in caplog.text
    torch.testing.assert_close(repaired.splits["test"][1], data.splits["test"][1])
    arrays = dict(np.load(path))
    arrays["volumes_val"][5] = np.inf
    np.savez(path, **arrays)
    Hulls(root=str(tmp_path), split_size=64, num_samples=32, progress_bar=False)
    assert np.isfinite(np.load(path)["volumes_val"]).all()
    shutil.rmtree(other_root)


def test_hull_options_are_checked(tmp_path):
    with pytest.raises(DataError, match="num_samples must be between 1 and"):
        Hulls(root=str(tmp_path), split_size=64, num_samples=65)
