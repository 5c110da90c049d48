"""Reading checkpoints, ours and the released reference ones.

Both are dicts with at least `model` (a state dict); ours add `optimizer`, `step`, the
configuration, the seed, facts about the data, and random states for resuming. They are read
with `weights_only=True`, which refuses any file that would run code when unpickled.
"""

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the model; the message says which."""


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint at `path`, tensors placed on `device`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0][:200]
        raise CheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain values ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or not a torch checkpoint ({reason})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint: expected a dict with a 'model' entry")
    return checkpoint


def load_weights(model: nn.Module, checkpoint: dict, path: str | Path) -> None:
    """Load the checkpoint's model weights, with a one-line error when they do not fit."""
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = " ".join(lines[1:3] if len(lines) > 1 else lines)[:300]
        raise CheckpointError(
            f"checkpoint {path} does not fit this {type(model).__name__} "
            f"(is it from another model or configuration?): {detail}"
        ) from None
