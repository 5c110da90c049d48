"""The three experiments of the paper: their default configurations, losses and metrics.

An experiment says which files configure it by default, how a prediction is scored per sample
(the training loss is the batch mean of the `loss` score), which score selects the best
checkpoint and in which direction, and the paper's training schedule for a dataset option.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def squared_error(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample squared error, `(batch, outputs)` twice to `{"loss": (batch,)}`."""
    return {"loss": (predictions - targets).pow(2).mean(dim=-1)}


def classification(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample cross-entropy and correctness: `(batch, classes)`, `(batch,)` to `(batch,)`."""
    return {
        "loss": functional.cross_entropy(logits, labels, reduction="none"),
        "acc": (logits.argmax(dim=-1) == labels).to(logits.dtype),
    }


@dataclass(frozen=True)
class Experiment:
    """What makes one experiment.

    Attributes:
        name: names the run directories.
        configs: default configuration files, applied before any `-C` file.
        seed: default run seed.
        score: per-sample scores of predictions against targets; must contain `loss`.
        best: the validation score that selects the best checkpoint.
        higher_is_better: direction of `best`.
        max_steps: training steps for a value of `dataset.num_samples`.
        val_check_interval: steps between validations.
    """

    name: str
    configs: tuple[Path, ...]
    seed: int
    score: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    best: str
    higher_is_better: bool
    max_steps: Callable[[int], int]
    val_check_interval: int

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def _stack(dataset: str, model: str) -> tuple[Path, ...]:
    return (
        CONFIGS / "engineer" / "trainer.yaml",
        CONFIGS / "optimizer" / "adam.yaml",
        CONFIGS / "dataset" / f"{dataset}.yaml",
        CONFIGS / "model" / f"{model}.yaml",
    )


SKELETON_STEPS = {260: 8125, 520: 16250, 710: 22188, 2295: 72000}

EXPERIMENTS = {
    "o5_regression": Experiment(
        name="o5_regression", configs=_stack("o5_regression", "o5_deh_reg"), seed=42,
        score=squared_error, best="loss", higher_is_better=False,
        max_steps=lambda num_samples: 131072, val_check_interval=1024,
    ),
    "hulls": Experiment(
        name="hulls", configs=_stack("hulls", "o5_deh_hull"), seed=0,
        score=squared_error, best="loss", higher_is_better=False,
        max_steps=lambda num_samples: 131072, val_check_interval=1024,
    ),
    "skeletons": Experiment(
        name="skeletons", configs=_stack("skeletons", "o3_deh_skeletons"), seed=1,
        score=classification, best="acc", higher_is_better=True,
        max_steps=lambda num_samples: SKELETON_STEPS.get(num_samples, 72000),
        val_check_interval=1000,
    ),
}
