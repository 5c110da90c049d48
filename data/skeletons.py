"""UTKinect-Action3D skeletons: 20 joints in 3D, 10 action classes.

Classes 0-9: sitDown, throw, carry, push, waveHands, walk, clapHands, pull, pickUp, standUp.
Every validation and test sample is moved by its own random orthogonal matrix of
determinant -1, drawn once from a fixed seed, so the evaluation measures O(3) invariance.
"""

import logging

import torch

from data.common import DataError, TensorSplits, data_root, load_npy
from data.transforms import random_orthogonal

logger = logging.getLogger(__name__)

CLASSES = (
    "sitDown", "throw", "carry", "push", "waveHands",
    "walk", "clapHands", "pull", "pickUp", "standUp",
)
TRAIN_PARTITIONS = {260: "train_1", 520: "train_2", 710: "train_3", 2295: "train"}
AUGMENTATIONS = ("I", "so3", "o3")
SOURCE = (
    "the preprocessed UTKinect-Action3D frames used by Melnyk et al. (ICML 2024); place the "
    "X*.npy and Y*.npy files there, or point --dataset.root or $DATAROOT at their parent"
)


class Skeletons(TensorSplits):
    """Skeleton classification: inputs `(samples, 20, 3)`, integer labels `(samples,)`.

    Args:
        root: data directory holding `utkinect_skeletons/` (default `$DATAROOT`, else
            `./datasets`).
        num_samples: training size, one of 260, 520, 710, 2295 (nested, class-balanced
            subsets for the three small ones).
        augmentation: training augmentation: `I` none, `so3` a random rotation per sample,
            `o3` a random orthogonal matrix per sample.
        transform_seed: seed of the fixed random transforms of validation and test samples.
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test (speed only).
        seed: run seed; it fixes the training order and augmentation.
    """

    def __init__(
        self,
        root: str | None = None,
        num_samples: int = 2295,
        augmentation: str = "I",
        transform_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 4096,
        seed: int = 0,
    ):
        super().__init__(batch_size, eval_batch_size, seed)
        if num_samples not in TRAIN_PARTITIONS:
            raise DataError(
                f"dataset.num_samples={num_samples} is not a training size; "
                f"accepted: {', '.join(map(str, TRAIN_PARTITIONS))}"
            )
        if augmentation not in AUGMENTATIONS:
            raise DataError(
                f"dataset.augmentation={augmentation!r} is unknown; "
                f"accepted: {', '.join(AUGMENTATIONS)}"
            )
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)

        # Read the three partitions, naming every expected file when one is missing.
        directory = data_root(root) / "utkinect_skeletons"
        partitions = {"train": TRAIN_PARTITIONS[num_samples], "val": "val", "test": "test"}
        expected = [f"{axis}{name}.npy" for name in partitions.values() for axis in "XY"]
        missing = [name for name in expected if not (directory / name).is_file()]
        if missing:
            what = "no skeleton files" if len(missing) == len(expected) else (
                f"missing {', '.join(missing)}")
            raise DataError(
                f"{what} in {directory.resolve()} (expected {', '.join(expected)}); "
                f"these files are {SOURCE}"
            )
        transforms = torch.Generator().manual_seed(transform_seed)
        for split, name in partitions.items():
            points = load_npy(directory / f"X{name}.npy", ndim=3, dtype_kind="f")
            labels = load_npy(directory / f"Y{name}.npy", ndim=1, dtype_kind="iu")
            if points.shape[1:] != (20, 3) or len(labels) != len(points):
                raise DataError(
                    f"X{name}.npy {points.shape} and Y{name}.npy {labels.shape} in {directory} "
                    "do not form (samples, 20, 3) skeletons with one label each"
                )
            if labels.min() < 0 or labels.max() >= len(CLASSES):
                raise DataError(f"Y{name}.npy in {directory} has labels outside 0-9")
            inputs = torch.from_numpy(points)  # (samples, 20, 3) float64
            if split != "train":
                matrices = random_orthogonal(len(inputs), 3, transforms, determinant=-1)
                inputs = torch.einsum("sij,spj->spi", matrices, inputs)
                if not torch.isfinite(inputs).all():
                    raise DataError(
                        f"X{name}.npy in {directory} holds values too large to transform"
                    )
            self.splits[split] = (inputs, torch.from_numpy(labels).long())
        logger.info(
            "skeletons: %d training, %d validation, %d test samples from %s",
            *(self.num_samples(split) for split in ("train", "val", "test")), directory,
        )

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch, `(batch, 20, 3)` and `(batch,)`, augmented if asked."""
        inputs, labels = next(self.train_stream)
        if self.augmentation != "I":
            determinant = 1 if self.augmentation == "so3" else None
            matrices = random_orthogonal(
                len(inputs), 3, self.generator, determinant, dtype=inputs.dtype
            )
            inputs = torch.einsum("sij,spj->spi", matrices, inputs)
        return inputs, labels

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())
