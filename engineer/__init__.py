"""Experiment machinery: configuration, the trainer and the shared runner."""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engineer.checkpoint import CheckpointError, load_weights, read_checkpoint
from engineer.config import ConfigError, coerce, read_file, resolve, signature_of


def load_model(
    model_config: str | Path | dict[str, Any],
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The network a model configuration describes, with a checkpoint's weights, in eval mode.

    Args:
        model_config: a YAML file or dict, either a full configuration with a `model` group or
            the group itself (`module:` and the constructor's options).
        checkpoint: our checkpoint or a released reference one; None keeps the initial weights.
        device: where to place the network.

    Raises:
        ConfigError: the configuration is wrong. CheckpointError: the checkpoint is unreadable
            or does not fit.
    """
    content = read_file(model_config) if isinstance(model_config, (str, Path)) else model_config
    options = dict(content.get("model", content))
    if "module" not in options:
        raise ConfigError("model.module is not set; name the model class with module:")
    target = resolve(options.pop("module"), "model")
    parameters = signature_of(target, "model")
    for key, value in options.items():
        if key not in parameters:
            raise ConfigError(f"unknown option model.{key}; accepted: {', '.join(parameters)}")
        options[key] = coerce(value, parameters[key].annotation, f"model.{key}")
    try:
        model = target(**options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model ({target.__name__}): {error}") from None
    model = model.to(device)
    if checkpoint is not None:
        load_weights(model, read_checkpoint(checkpoint, device), checkpoint)
    return model.eval()


__all__ = ["CheckpointError", "ConfigError", "load_model"]
