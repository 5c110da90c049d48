"""Reading checkpoints, ours and the released reference ones.

Both are dicts with at least `model` (a state dict); ours add `optimizer`, `step`, the
configuration, the seed, facts about the data, and random states for resuming. They are read
with `weights_only=True`, which refuses any file that would run code when unpickled.
"""

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

# Pickles of torch's older (non-zip) format: magic number, protocol, system info, the object.
LEGACY_PICKLES = 4


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the model; the message says which."""


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint at `path`, tensors placed on `device`.

    Raises:
        CheckpointError: the file is missing, unreadable, not a torch checkpoint, damaged,
            holds objects beyond tensors and plain values, or has no `model` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        path.open("rb").close()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of junk files
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, weights_only=True, map_location=device)
    except Exception as error:  # torch's loaders raise many kinds of error on a damaged file
        if isinstance(error, pickle.UnpicklingError) and _is_complete_pickle(path):
            raise CheckpointError(
                f"refusing to load {path}: it holds code or objects beyond tensors and plain "
                "values, which could run code when read"
            ) from None
        raise CheckpointError(f"{path} is not a torch checkpoint (or is damaged)") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint: expected a dict with a 'model' entry")
    return checkpoint


def _is_complete_pickle(path: Path) -> bool:
    """Whether `path` is a torch file whose pickles are all whole; nothing is unpickled.

    Tells a well-formed file that the safe loader refused for its content from a damaged one.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.endswith("/data.pkl")]
                if len(names) != 1:
                    return False
                for _ in pickletools.genops(archive.read(names[0])):
                    pass
            return True
        with open(path, "rb") as file:
            for _ in range(LEGACY_PICKLES):
                for _ in pickletools.genops(file):
                    pass
        return True
    except Exception:  # any parse failure means the file is damaged or not a pickle
        return False


def load_weights(model: nn.Module, checkpoint: dict, path: str | Path) -> None:
    """Load the checkpoint's model weights, with a short one-line error when they do not fit."""
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        problems = _mismatches(str(error)) or [type(error).__name__]
        count = f"{len(problems)} mismatch{'es' if len(problems) > 1 else ''}"
        more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit this {type(model).__name__} (is it from another "
            f"model or configuration?): {count}: {'; '.join(problems[:2])}{more}"
        ) from None


def _mismatches(message: str) -> list[str]:
    """Each problem of torch's `load_state_dict` error message as a short complete phrase."""
    problems = []
    for line in message.splitlines():
        line = line.strip()
        keys = re.findall(r'"([^"]+)"', line)
        size = re.fullmatch(r"size mismatch for (\S+): copying a param with shape "
                            r"torch\.Size\((\[.*?\])\) from checkpoint, the shape in current "
                            r"model is torch\.Size\((\[.*?\])\)\.?", line)
        if line.startswith("Error(s) in loading state_dict") or not line:
            continue
        if line.startswith("Missing key(s)"):
            problems += [f"{key} missing from the checkpoint" for key in keys]
        elif line.startswith("Unexpected key(s)"):
            problems += [f"{key} not in the model" for key in keys]
        elif size:
            key, stored, wanted = size.groups()
            problems.append(f"{key} has shape {stored} in the checkpoint, {wanted} in the model")
        else:
            problems.append(line.rstrip("."))
    return problems
