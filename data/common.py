"""Pieces shared by every dataset: the data root, the error type, and in-memory batching.

A dataset here is a small object holding its three splits as tensors (training, validation,
test). Batches are taken by indexing those tensors, which is much faster than collating
per-sample Python objects for data this small.
"""

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(Exception):
    """A dataset cannot be found, read or generated; the message says what to do."""


def data_root(root: str | None) -> Path:
    """The directory holding the datasets: `root`, else `$DATAROOT`, else `./datasets`."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("DATAROOT"):
        return Path(os.environ["DATAROOT"]).expanduser()
    return Path("datasets")


def load_npy(path: Path, ndim: int, dtype_kind: str) -> np.ndarray:
    """Read one `.npy` file and check its rank, dtype kind ('f' float, 'i' integer) and values.

    Floating point arrays are returned in float64, the type data are kept in.

    Raises:
        DataError: the file is unreadable, not a single array, has the wrong rank or dtype,
            holds no samples, or holds NaN/infinity.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read {path}: {reason}; replace the file") from None
    if not isinstance(array, np.ndarray):  # np.load opens an .npz archive whatever its name
        array.close()
        raise DataError(f"{path} is an .npz archive, not one .npy array; replace the file")
    if array.ndim != ndim or array.dtype.kind not in dtype_kind:
        raise DataError(
            f"{path} holds an array of shape {array.shape} and dtype {array.dtype}; "
            f"expected {ndim} dimensions of kind {dtype_kind!r}; replace the file"
        )
    if len(array) == 0:
        raise DataError(f"{path} holds no samples; replace the file")
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):
            array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise DataError(f"{path} contains NaN or infinite values; replace the file")
    return array


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays to `path` under a temporary name first, then rename: no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class ShuffledBatches:
    """An endless stream of shuffled mini-batches of in-memory tensors.

    Each epoch uses a fresh permutation drawn from a generator seeded by `(seed, epoch)`, so
    the stream position `(epoch, batch)` is the whole state: saving it and restoring it
    replays exactly the same batches. The last batch of an epoch may be smaller.

    Args:
        tensors: tensors sharing their first dimension `(samples, ...)`.
        batch_size: samples per batch, at most the number of samples.
        seed: seed of the shuffling.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int):
        self.tensors = tensors
        self.samples = len(tensors[0])
        self.batch_size = min(batch_size, self.samples)
        self.seed = seed
        self.epoch = 0
        self.batch = 0
        self._order = None

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.samples, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        start = self.batch * self.batch_size
        if start >= self.samples:
            self.epoch, self.batch, self._order, start = self.epoch + 1, 0, None, 0
        if self._order is None:
            self._order = self._permutation()
        index = self._order[start:start + self.batch_size]
        self.batch += 1
        return tuple(tensor[index] for tensor in self.tensors)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def ordered_batches(
    tensors: tuple[torch.Tensor, ...], batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The tensors in order, `batch_size` samples at a time (the last batch may be smaller)."""
    for start in range(0, len(tensors[0]), batch_size):
        yield tuple(tensor[start:start + batch_size] for tensor in tensors)


class TensorSplits:
    """Base of the datasets: three splits of `(inputs, targets)` tensors and their batching.

    Subclasses fill `self.splits[name] = (inputs, targets)` for `name` in train, val, test
    (floating point data in float64; the trainer casts each batch to its dtype), and
    may override `decode` (network outputs to target units) and `checkpoint_state` (what an
    evaluation of a checkpoint needs to know about the data).

    Args:
        batch_size: training batch size (capped at the number of training samples).
        eval_batch_size: batch size for validation and test, which only changes speed.
        seed: run seed; it seeds the training order.
    """

    def __init__(self, batch_size: int, eval_batch_size: int, seed: int):
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError(
                f"batch sizes must be positive, got batch_size={batch_size}, "
                f"eval_batch_size={eval_batch_size}"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._train_stream: ShuffledBatches | None = None

    def num_samples(self, split: str) -> int:
        return len(self.splits[split][0])

    @property
    def train_stream(self) -> ShuffledBatches:
        if self._train_stream is None:
            self._train_stream = ShuffledBatches(self.splits["train"], self.batch_size, self.seed)
        return self._train_stream

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch `(inputs, targets)`; subclasses may augment it."""
        return next(self.train_stream)

    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the `val` or `test` split, in order."""
        return ordered_batches(self.splits[split], self.eval_batch_size)

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Map raw network outputs to predictions in target units (identity here)."""
        return outputs

    def checkpoint_state(self) -> dict:
        """Facts about the data stored with a checkpoint (none here)."""
        return {}

    def state_dict(self) -> dict:
        """Position of the training stream, for resuming."""
        return {"train_stream": self.train_stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_stream.load_state_dict(state["train_stream"])
