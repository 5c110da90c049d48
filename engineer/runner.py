"""The shared runner behind the entry scripts: configuration, data, model, training or evaluation.

An entry script only names its experiment; `main` parses the command line against that
experiment's default files, builds everything and trains (or evaluates a checkpoint). Errors a
user can fix are reported in one line with exit status 2 (1 when training itself fails). Under
`torchrun` every process runs `main`; only the first one logs below the warning level.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.common import DataError, TensorSplits
from engineer import distributed
from engineer.checkpoint import CheckpointError
from engineer.config import Config, ConfigError, HelpRequested, parse
from engineer.experiments import EXPERIMENTS, Experiment
from engineer.trainer import NEUTRAL_OPTIONS, Trainer, TrainingError, seed_everything
from loggers.console import setup_console_logging
from loggers.run_directory import RunDirectoryError, check_writable, run_name

logger = logging.getLogger(__name__)

# What each group must build.
KINDS = {"trainer": Trainer, "dataset": TensorSplits, "optimizer": torch.optim.Optimizer,
         "model": nn.Module}


def build(config: Config, group: str, **supplied: Any) -> Any:
    """Call a group's constructor; argument errors it raises become configuration errors."""
    name = config.groups[group]["module"]
    try:
        built = config.build(group, **supplied)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{group} ({name}): {error}") from None
    if not isinstance(built, KINDS[group]):
        raise ConfigError(f"{group}.module={name} returned a {type(built).__name__}")
    return built


def changed_options(config: Config, defaults: Config) -> dict[str, Any]:
    """Options (as `key=value`) that differ from the experiment's defaults and change results."""
    changed = {}
    for group in config.groups:
        for key in sorted(set(config.groups[group]) | set(defaults.groups[group])):
            if key in NEUTRAL_OPTIONS.get(group, ()):
                continue
            value, default = config.value(group, key), defaults.value(group, key)
            if json.dumps(value, default=str) != json.dumps(default, default=str):
                changed[key if key != "module" else f"{group}"] = (
                    str(value).rsplit(".", 1)[-1] if key == "module" else value
                )
    return changed


def run(experiment: Experiment, config: Config) -> dict[str, Any]:
    """Build the parts a configuration names and train, or evaluate a checkpoint."""
    trainer: Trainer = build(config, "trainer")
    if trainer.num_threads is not None:
        torch.set_num_threads(trainer.num_threads)

    # Fail on an unwritable or full disk before spending time on data or training.
    if not trainer.test_only:
        check_writable(Path(trainer.resume).parent if trainer.resume
                       else Path(trainer.runs_dir) / experiment.name)

    trainer.device = distributed.setup(trainer.device)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
        trainer.progress_bar = False
    seed_everything(config.seed)

    with distributed.main_first():  # a data cache is filled by one process
        data = build(config, "dataset", seed=config.seed)
    model = build(config, "model")
    model.to(trainer.device)
    if any(p.dtype != trainer.dtype for p in model.parameters()):
        model.to(trainer.dtype)

    if trainer.test_only:
        return trainer.evaluate_checkpoint(experiment, model, data)
    optimizer = build(config, "optimizer", params=model.parameters())
    defaults = parse([], experiment.configs, experiment.seed)
    name = run_name(changed_options(config, defaults), config.seed)
    return trainer.fit(experiment, model, data, optimizer, config, name)


def main(experiment_name: str, argv: list[str] | None = None) -> int:
    """Run an experiment from command-line arguments; returns the process exit status."""
    setup_console_logging()
    experiment = EXPERIMENTS[experiment_name]
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse(argv, experiment.configs, experiment.seed)
        run(experiment, config)
    except HelpRequested as help_text:
        sys.stdout.write(f"{experiment.name}: {str(help_text)}\n")
        return 0
    except (ConfigError, DataError, CheckpointError, RunDirectoryError) as error:
        logger.error("%s", error)
        return 2
    except TrainingError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.teardown()
    return 0
