"""Synthetic O(5)-invariant regression on pairs of 5D points.

For two points `x1, x2` in R^5 the target is

    f(x1, x2) = sin|x1| - |x2|^3 / 2 + <x1, x2> / (|x1| |x2|),

which is unchanged when both points are multiplied by the same orthogonal matrix.
"""

import logging

import numpy as np
import torch

from data.common import DataError, TensorSplits

logger = logging.getLogger(__name__)

SPACE_DIM = 5
EVAL_SAMPLES = 16384


def o5_target(points: np.ndarray) -> np.ndarray:
    """The regression target.

    Args:
        points: `(samples, 2, 5)`.

    Returns:
        `(samples,)`.
    """
    x1, x2 = points[:, 0], points[:, 1]
    norm1, norm2 = np.linalg.norm(x1, axis=-1), np.linalg.norm(x2, axis=-1)
    cosine = np.einsum("sd,sd->s", x1, x2) / (norm1 * norm2)
    return np.sin(norm1) - norm2**3 / 2 + cosine


def draw_o5_samples(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    """Raw samples of the three splits, `(samples, 10)` each, for a run seed.

    One legacy NumPy `RandomState(seed)` stream draws the training set first, then the
    validation set, then the test set, so a seed gives the same numbers as the reference.
    """
    stream = np.random.RandomState(seed)
    train = stream.randn(num_samples, 2 * SPACE_DIM)
    val = stream.randn(EVAL_SAMPLES, 2 * SPACE_DIM)
    test = stream.randn(EVAL_SAMPLES, 2 * SPACE_DIM)
    return {"train": train, "val": val, "test": test}


class O5Regression(TensorSplits):
    """The O(5) regression data: inputs `(samples, 2, 5)`, targets `(samples, 1)`.

    Inputs are scaled, each of the two points by the root-mean-square of its coordinates over
    the training set (no shift; a shift would break the symmetry). The network is trained on
    the target standardized with the training mean and standard deviation, and `decode` turns
    its outputs back into target units, where the loss and the metrics are measured. Targets
    yielded by the batches are in target units.

    Args:
        num_samples: training samples; the paper uses 30, 100, 300, 1000, 3000, 10000, 30000.
        batch_size: training batch size (capped at `num_samples`, so 30 samples give 30).
        eval_batch_size: batch size for validation and test (speed only).
        seed: run seed: it fixes the data and the training order.
    """

    def __init__(
        self,
        num_samples: int = 30000,
        batch_size: int = 32,
        eval_batch_size: int = 4096,
        seed: int = 0,
    ):
        super().__init__(batch_size, eval_batch_size, seed)
        if num_samples < 2:
            raise DataError(f"dataset.num_samples must be at least 2, got {num_samples}")
        raw = draw_o5_samples(seed, num_samples)
        points = {split: x.reshape(len(x), 2, SPACE_DIM) for split, x in raw.items()}
        targets = {split: o5_target(p) for split, p in points.items()}

        # Standardization statistics come from the training set only.
        self.input_scale = np.sqrt((points["train"] ** 2).mean(axis=(0, 2)))  # (2,)
        self.target_mean = float(targets["train"].mean())
        self.target_std = float(targets["train"].std())

        for split in points:
            inputs = points[split] / self.input_scale[:, None]
            self.splits[split] = (
                torch.from_numpy(inputs),  # (samples, 2, 5)
                torch.from_numpy(targets[split])[:, None],  # (samples, 1)
            )
        logger.info(
            "O(5) regression: %d training samples, seed %d, target mean %.4f std %.4f",
            num_samples, seed, self.target_mean, self.target_std,
        )

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Standardized outputs `(batch, 1)` to target units `(batch, 1)`."""
        return outputs * self.target_std + self.target_mean

    def checkpoint_state(self) -> dict:
        return {
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "input_scale": self.input_scale.tolist(),
        }
