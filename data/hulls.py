"""Volumes of convex hulls of 16 random points in R^5, an O(5)- and permutation-invariant target.

The data are generated once per `(data_seed, split_size)` with scipy's ConvexHull, spread over
processes, and cached under `<root>/hulls/`. Run `python -m data.hulls` to generate them ahead.
"""

import argparse
import logging
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.common import SPLITS, DataError, TensorSplits, atomic_save_npz, data_root

logger = logging.getLogger(__name__)

NUM_POINTS = 16
SPACE_DIM = 5
CHUNK = 1024


def hull_volumes(points: np.ndarray) -> np.ndarray:
    """Convex hull volumes.

    Args:
        points: `(samples, points, dimension)`.

    Returns:
        `(samples,)` float64.
    """
    from scipy.spatial import ConvexHull

    return np.array([ConvexHull(cloud).volume for cloud in points])


def split_points(data_seed: int, split: str, split_size: int) -> np.ndarray:
    """Standard normal points `(split_size, 16, 5)` of one split, fixed by the data seed."""
    stream = np.random.default_rng([data_seed, SPLITS.index(split)])
    return stream.standard_normal((split_size, NUM_POINTS, SPACE_DIM))


def cache_path(root: Path, data_seed: int, split_size: int) -> Path:
    return root / "hulls" / f"hulls_seed{data_seed}_size{split_size}.npz"


def generate_hulls(
    path: Path, data_seed: int, split_size: int, workers: int | None = None,
    progress_bar: bool = True,
) -> None:
    """Generate the three splits and write them to `path` (temporary name, then rename)."""
    workers = workers or os.cpu_count() or 1
    arrays = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for split in SPLITS:
            points = split_points(data_seed, split, split_size)
            chunks = [points[i:i + CHUNK] for i in range(0, split_size, CHUNK)]
            volumes = []
            bar = tqdm(
                total=split_size, desc=f"hull volumes ({split})", disable=not progress_bar,
                unit="hull",
            )
            with bar:
                for chunk_volumes in pool.map(hull_volumes, chunks):
                    volumes.append(chunk_volumes)
                    bar.update(len(chunk_volumes))
            arrays[f"points_{split}"] = points
            arrays[f"volumes_{split}"] = np.concatenate(volumes)
    atomic_save_npz(path, **arrays)
    logger.info("wrote %s", path)


def read_hulls(path: Path, split_size: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None with a warning when the file is unreadable or wrong."""
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {key: file[key] for key in file.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("cannot read %s (%s); generating it again", path, error)
        return None
    for split in SPLITS:
        points, volumes = arrays.get(f"points_{split}"), arrays.get(f"volumes_{split}")
        valid = (
            points is not None and volumes is not None
            and points.shape == (split_size, NUM_POINTS, SPACE_DIM)
            and volumes.shape == (split_size,)
            and points.dtype == np.float64 and volumes.dtype == np.float64
            and np.isfinite(points).all() and np.isfinite(volumes).all()
        )
        if not valid:
            logger.warning("%s has a wrong %s split; generating it again", path, split)
            return None
    return arrays


class Hulls(TensorSplits):
    """Convex hull volumes: inputs `(samples, 16, 5)`, targets `(samples, 1)` (raw volumes).

    Args:
        root: data directory (default `$DATAROOT`, else `./datasets`).
        num_samples: training samples, the first ones of the training split; the paper uses
            256, 1024, 4096, 16384, 65536; None takes the whole training split.
        split_size: samples generated per split.
        data_seed: seed of the generated data (independent of the run seed).
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test (speed only).
        workers: processes used to generate the data (default: all cores).
        progress_bar: show a progress bar while generating.
        seed: run seed; it fixes the training order.
    """

    def __init__(
        self,
        root: str | None = None,
        num_samples: int | None = None,
        split_size: int = 65536,
        data_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 4096,
        workers: int | None = None,
        progress_bar: bool = True,
        seed: int = 0,
    ):
        super().__init__(batch_size, eval_batch_size, seed)
        num_samples = split_size if num_samples is None else num_samples
        if not 1 <= num_samples <= split_size:
            raise DataError(
                f"dataset.num_samples must be between 1 and dataset.split_size={split_size}, "
                f"got {num_samples}"
            )
        path = cache_path(data_root(root), data_seed, split_size)
        arrays = read_hulls(path, split_size) if path.exists() else None
        if arrays is None:
            logger.info("generating convex hull data into %s", path)
            try:
                generate_hulls(path, data_seed, split_size, workers, progress_bar)
            except OSError as error:  # e.g. a full disk, or a directory in the file's place
                raise DataError(f"cannot write the hull data {path}: {error.strerror}") from None
            arrays = read_hulls(path, split_size)
            if arrays is None:
                raise DataError(f"generated {path} but cannot read it back")

        for split in SPLITS:
            points, volumes = arrays[f"points_{split}"], arrays[f"volumes_{split}"]
            if split == "train":
                points, volumes = points[:num_samples], volumes[:num_samples]
            self.splits[split] = (
                torch.from_numpy(points),  # (samples, 16, 5)
                torch.from_numpy(volumes)[:, None],  # (samples, 1)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the convex hull volume data.")
    parser.add_argument(
        "--root", default=None, help="data directory (default $DATAROOT, else ./datasets)"
    )
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--split_size", type=int, default=65536)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no_progress_bar", action="store_true")
    parser.add_argument("--force", action="store_true", help="regenerate even when cached")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    path = cache_path(data_root(options.root), options.data_seed, options.split_size)
    if not options.force and path.exists() and read_hulls(path, options.split_size) is not None:
        logger.info("%s is already there and valid", path)
        return
    generate_hulls(
        path, options.data_seed, options.split_size, options.workers,
        not options.no_progress_bar,
    )


if __name__ == "__main__":
    main()
