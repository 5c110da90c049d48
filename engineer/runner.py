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

from data.common import DataError
from engineer import distributed, memory
from engineer.checkpoint import CheckpointError, load_weights, read_checkpoint
from engineer.config import (Config, ConfigError, HelpRequested, coerce, group_kind, parse,
                             signature_of)
from engineer.experiments import EXPERIMENTS, Experiment
from engineer.trainer import NEUTRAL_OPTIONS, Trainer, TrainingError, seed_everything
from loggers.console import setup_console_logging
from loggers.run_directory import RunDirectoryError, check_writable, run_name

logger = logging.getLogger(__name__)


def build(config: Config, group: str, **supplied: Any) -> Any:
    """Call a group's constructor; argument errors it raises become configuration errors."""
    name = config.groups[group]["module"]
    try:
        built = config.build(group, **supplied)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{group} ({name}): {error}") from None
    if not isinstance(built, group_kind(group)):
        raise ConfigError(f"{group}.module={name} returned a {type(built).__name__}")
    return built


def schedule_value(config: Config, experiment: Experiment, key: str, num_samples: Any) -> Any:
    """A trainer option as a run uses it: a null schedule is the experiment's for the size."""
    value = config.value("trainer", key)
    if value is None and key == "max_steps":
        return experiment.max_steps(num_samples)
    if value is None and key == "val_check_interval":
        return experiment.val_check_interval
    return value


def changed_options(config: Config, defaults: Config, experiment: Experiment) -> dict[str, Any]:
    """Options (as `key=value`) that change results and differ from the experiment's defaults.

    The schedule is compared as a run uses it, for the configuration's training size: a
    spelled-out `max_steps=72000` for the skeletons' full training set equals its null default.
    """
    num_samples = config.value("dataset", "num_samples")
    changed = {}
    for group in config.groups:
        for key in sorted(set(config.groups[group]) | set(defaults.groups[group])):
            if key in NEUTRAL_OPTIONS.get(group, ()):
                continue
            value, default = config.value(group, key), defaults.value(group, key)
            if group == "trainer" and key in ("max_steps", "val_check_interval"):
                value = schedule_value(config, experiment, key, num_samples)
                default = schedule_value(defaults, experiment, key, num_samples)
            if json.dumps(value, default=str) != json.dumps(default, default=str):
                changed[key if key != "module" else f"{group}"] = (
                    str(value).rsplit(".", 1)[-1] if key == "module" else value
                )
    return changed


def use_checkpoint_data(config: Config, checkpoint: dict, path: str) -> None:
    """Evaluate our checkpoint on the data it was trained with: its dataset options and seed.

    A released checkpoint stores no configuration and keeps the command line's options.
    """
    stored = checkpoint.get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("dataset"), dict):
        return
    dataset, module = stored["dataset"], config.groups["dataset"]["module"]
    if dataset.get("module") != module:
        raise ConfigError(f"checkpoint {path} was trained on {dataset.get('module')} data, "
                          f"this experiment uses {module}")
    parameters = signature_of(config.target("dataset"), "dataset")
    taken = []
    for key, value in dataset.items():
        if key not in parameters or key in NEUTRAL_OPTIONS["dataset"]:
            continue
        value = coerce(value, parameters[key].annotation, f"dataset.{key}")
        if json.dumps(value) != json.dumps(config.value("dataset", key)):
            taken.append(f"dataset.{key}={value}")
        config.groups["dataset"][key] = value
    seed = checkpoint.get("seed", stored.get("seed"))
    if isinstance(seed, int) and seed != config.seed:
        taken.append(f"seed={seed}")
        config.seed = seed
    if taken:
        logger.info("evaluating on the checkpoint's data options: %s", ", ".join(taken))


def run(experiment: Experiment, config: Config) -> dict[str, Any]:
    """Build the parts a configuration names and train, or evaluate a checkpoint.

    Everything that can be checked cheaply (options, model, checkpoint, run directory) is
    checked before the data are built, which can take minutes.
    """
    trainer: Trainer = build(config, "trainer")
    if trainer.num_threads is not None:
        torch.set_num_threads(trainer.num_threads)
    memory.keep_freed_memory()

    # Fail on an unwritable or full disk before spending time on data or training.
    if not trainer.test_only:
        check_writable(Path(trainer.resume).parent if trainer.resume
                       else Path(trainer.runs_dir) / experiment.name)

    trainer.device = distributed.setup(trainer.device)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
        trainer.progress_bar = False

    # The checkpoint to evaluate, and the data options it was trained with.
    checkpoint = None
    if trainer.resume:  # a damaged file is reported now, not after the data are built
        read_checkpoint(trainer.resume, trainer.device)
    if trainer.test_only:
        checkpoint = read_checkpoint(trainer.checkpoint, trainer.device)
        use_checkpoint_data(config, checkpoint, trainer.checkpoint)
    seed_everything(config.seed)

    model = build(config, "model")
    model.to(trainer.device)
    if any(p.dtype != trainer.dtype for p in model.parameters()):
        model.to(trainer.dtype)
    if checkpoint is not None:
        load_weights(model, checkpoint, trainer.checkpoint)

    # The data use their own random generators, so building them after the model changes
    # neither.
    with distributed.main_first():  # a data cache is filled by one process
        data = build(config, "dataset", seed=config.seed)

    if trainer.test_only:
        return trainer.evaluate_checkpoint(experiment, model, data, checkpoint)
    optimizer = build(config, "optimizer", params=model.parameters())
    defaults = parse([], experiment.configs, experiment.seed)
    name = run_name(changed_options(config, defaults, experiment), config.seed)
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
