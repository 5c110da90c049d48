"""The training loop: steps, validation, best checkpoint, test at each improvement, resuming.

The trainer is configured by the `trainer` group. It trains for `max_steps` optimizer steps,
validates every `val_check_interval` steps, and when the experiment's validation score
improves it saves `best.pt` and evaluates the test split: the reported test numbers are those
of the best validation. `last.pt` is saved at every validation with everything needed to
resume (model, optimizer, step, data position and the random states of torch, NumPy and
Python), so a resumed run ends with the same numbers as an uninterrupted one.

Under `torchrun` the model is wrapped in DistributedDataParallel, each process trains on its
shard of every batch and evaluates its shard of every split, scores are summed over the
processes, and only the first process writes the run directory (see `engineer.distributed`).
"""

import json
import logging
import random
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.common import TensorSplits
from engineer import distributed
from engineer.checkpoint import CheckpointError, load_weights, read_checkpoint
from engineer.config import Config, ConfigError
from engineer.experiments import Experiment
from loggers.run_directory import RunDirectory, RunDirectoryError
from models import native

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Options that change where or how fast a run goes, not its numbers.
NEUTRAL_OPTIONS = {
    "trainer": {"device", "test_only", "checkpoint", "resume", "progress_bar", "runs_dir",
                "log_every", "num_threads", "compile"},
    "dataset": {"root", "eval_batch_size", "workers", "progress_bar"},
}


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what is kept."""


class _NoFiles:
    """Stands in for the run directory on every process but the first: it writes nothing."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def save_checkpoint(self, name: str, state: dict) -> None:
        pass

    def write_results(self, results: dict) -> None:
        pass


def random_states() -> dict[str, Any]:
    """The global random states of torch, NumPy and Python as checkpoint-safe values."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    numpy = states["numpy"]
    np.random.set_state((
        "MT19937", numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"],
        numpy["has_gauss"], numpy["gauss"],
    ))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` for training steps, one static graph per batch size."""
    # Dynamo warns that it traces through the cached simplex constants instead of reading
    # the cache; they depend only on the dimension, so tracing gives the same values.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    native.available()  # load the CPU kernels now: a build is not something to trace
    return torch.compile(model, dynamic=False)


class Trainer:
    """Trains and evaluates a model on a dataset for an experiment.

    Args:
        max_steps: optimizer steps; None takes the paper's schedule for the training size.
        val_check_interval: steps between validations; None takes the paper's.
        device: `cpu`, `cuda`, `cuda:1`...; None picks CUDA when available, else the CPU.
        dtype: floating point type of the model and data, `float32` or `float64`.
        test_only: evaluate `checkpoint` on the validation and test splits, without training.
        checkpoint: checkpoint to evaluate with `test_only` (ours or a released one).
        resume: our `last.pt` (or `best.pt`) of an interrupted run, to continue it.
        progress_bar: show a progress bar.
        runs_dir: base directory of the run directories.
        log_every: steps between training-loss records in `metrics.jsonl`.
        num_threads: CPU threads of this process (torch.set_num_threads); None keeps torch's
            choice. The networks are small, so one thread is usually fastest, and much faster
            when other processes share the cores.
        compile: train through ``torch.compile`` (needs a C++ compiler on the CPU): the first
            steps take tens of seconds to compile, after which a step of the small networks
            is several times faster. Evaluation stays uncompiled.
    """

    def __init__(
        self,
        max_steps: int | None = None,
        val_check_interval: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        test_only: bool = False,
        checkpoint: str | None = None,
        resume: str | None = None,
        progress_bar: bool = True,
        runs_dir: str = "runs",
        log_every: int = 100,
        num_threads: int | None = None,
        compile: bool = False,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"trainer.dtype={dtype!r}; accepted: {', '.join(DTYPES)}")
        for name, value in (("max_steps", max_steps), ("val_check_interval", val_check_interval),
                            ("log_every", log_every), ("num_threads", num_threads)):
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{name}={value} must be a positive integer")
        if test_only and not checkpoint:
            raise ConfigError("trainer.test_only=True needs trainer.checkpoint=PATH")
        if test_only and resume:
            raise ConfigError("trainer.test_only and trainer.resume exclude each other")
        if checkpoint and not test_only:
            raise ConfigError(
                "trainer.checkpoint is for evaluation with trainer.test_only=True; to continue "
                "an interrupted run use trainer.resume=PATH"
            )
        for name, path in (("checkpoint", checkpoint), ("resume", resume)):
            if path and not Path(path).is_file():
                problem = "is a directory" if Path(path).is_dir() else "does not exist"
                raise ConfigError(f"trainer.{name}={path} {problem}; give a checkpoint file")
        try:
            self.device = torch.device(
                device or ("cuda" if torch.cuda.is_available() else "cpu")
            )
        except RuntimeError:
            raise ConfigError(f"trainer.device={device!r} is not a device (cpu, cuda, cuda:0...)")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={device}: CUDA is not available; use cpu")
        if self.device.type == "cpu" and self.device.index not in (None, 0):
            raise ConfigError(f"trainer.device={device}: there is one CPU device; use cpu")
        self.dtype = DTYPES[dtype]
        self.max_steps = max_steps
        self.val_check_interval = val_check_interval
        self.test_only = test_only
        self.checkpoint = checkpoint
        self.resume = resume
        self.progress_bar = progress_bar
        self.runs_dir = runs_dir
        self.log_every = log_every
        self.num_threads = num_threads
        self.compile = compile

    # -----------------------------------------------------------------------------------------
    # Evaluation

    def _move(self, inputs: torch.Tensor, targets: torch.Tensor):
        inputs = inputs.to(self.device, self.dtype)
        dtype = self.dtype if targets.is_floating_point() else targets.dtype
        return inputs, targets.to(self.device, dtype)

    @torch.no_grad()
    def evaluate_split(
        self, model: nn.Module, data: TensorSplits, experiment: Experiment, split: str
    ) -> dict[str, float]:
        """Scores averaged over every sample of a split, e.g. `{"loss": ..., "acc": ...}`.

        With several processes each scores its shard of every batch and the sums are added.
        """
        was_training = model.training
        model.eval()
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for batch in data.eval_batches(split):
            (inputs, targets), samples = distributed.shard(batch)
            inputs, targets = self._move(inputs, targets)
            scores = experiment.score(data.decode(model(inputs)), targets)
            for name, values in scores.items():
                sums[name] += values[:samples].double().sum().item()
            count += samples
        model.train(was_training)
        *totals, count = distributed.sum_over_processes([*sums.values(), count], self.device)
        return {name: total / count for name, total in zip(sums, totals)}

    def evaluate_checkpoint(
        self, experiment: Experiment, model: nn.Module, data: TensorSplits,
        checkpoint: dict | None = None,
    ) -> dict[str, dict[str, float]]:
        """Score the validation and test splits with the weights of `self.checkpoint`.

        Args:
            checkpoint: the file's content when already read and loaded into the model.
        """
        if checkpoint is None:
            checkpoint = read_checkpoint(self.checkpoint, self.device)
            load_weights(model, checkpoint, self.checkpoint)
        stored, current = checkpoint.get("data"), data.checkpoint_state()
        if stored and stored != current:
            differing = sorted(key for key in stored if stored[key] != current.get(key))
            logger.warning("the checkpoint's data statistics (%s) differ from this dataset's; "
                           "check the dataset options and seed", ", ".join(differing))
        results = {split: self.evaluate_split(model, data, experiment, split)
                   for split in ("val", "test")}
        for split, scores in results.items():
            logger.info("%s %s: %s", self.checkpoint, split, _format(scores))
        return results

    # -----------------------------------------------------------------------------------------
    # Training

    def _train_step(
        self, experiment: Experiment, model: nn.Module, data: TensorSplits,
        optimizer: torch.optim.Optimizer, step: int, run_path: Path,
    ) -> float:
        """One optimizer step on the next training batch; returns the batch's loss."""
        batch = data.train_batch()
        (inputs, targets), samples = distributed.shard(batch)
        inputs, targets = self._move(inputs, targets)
        scores = experiment.score(data.decode(model(inputs)), targets)
        if distributed.world_size() == 1:
            loss = scores["loss"].mean()
            loss_value = loss.item()
        else:
            # Gradients are averaged over the processes: weighting each shard's sum by
            # processes / batch makes that average the gradient of the global batch mean.
            size = len(batch[0])
            shard_sum = scores["loss"][:samples].sum()
            loss = shard_sum * (distributed.world_size() / size)
            [total] = distributed.sum_over_processes([shard_sum.item()], self.device)
            loss_value = total / size
        if not np.isfinite(loss_value):
            raise TrainingError(_non_finite_message(step, batch[0], run_path))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss_value

    def fit(
        self,
        experiment: Experiment,
        model: nn.Module,
        data: TensorSplits,
        optimizer: torch.optim.Optimizer,
        config: Config,
        run_name: str,
    ) -> dict[str, Any]:
        """Train, validate, checkpoint and test; returns the summary also in `results.json`."""
        num_samples = data.num_samples("train")
        max_steps = self.max_steps or experiment.max_steps(num_samples)
        interval = self.val_check_interval or experiment.val_check_interval
        best_name = experiment.best

        # Start fresh or from a checkpoint of an interrupted run.
        step, elapsed, best = 0, 0.0, None
        resume_step = None
        interval_loss = [0.0, 0]
        if self.resume:
            state = read_checkpoint(self.resume, self.device)
            if "train" not in state:
                raise CheckpointError(
                    f"{self.resume} has no training state (a released checkpoint?); "
                    "evaluate it with --trainer.test_only=True --trainer.checkpoint=PATH"
                )
            _check_same_run(state["config"], config, self.resume)
            load_weights(model, state, self.resume)
            optimizer.load_state_dict(state["optimizer"])
            data.load_state_dict(state["train"]["data"])
            set_random_states(state["train"]["random"])
            step, elapsed, best = state["step"], state["train"]["elapsed"], state["best"]
            interval_loss = list(state["train"]["interval_loss"])
            resume_step = step
        run = self._run_directory(experiment, run_name, resume_step)
        if resume_step is not None:
            logger.info("resuming %s at step %d", run.path, step)
        logger.info("run directory %s", run.path)
        network = model
        if distributed.world_size() > 1:
            network = DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,  # the model's buffers are constants
            )
        if self.compile:
            network = compiled(network)
        parameters = sum(parameter.numel() for parameter in model.parameters())

        def summary(status: str) -> dict[str, Any]:
            results = {
                "experiment": experiment.name, "status": status, "config": config.resolved(),
                "seed": config.seed, "steps": step, "max_steps": max_steps,
                "wall_time_s": round(elapsed + time.perf_counter() - started, 3),
                "parameters": parameters, "train_samples": num_samples,
                "best_metric": f"val/{best_name}", "best": best, "run_dir": str(run.path),
            }
            run.flush()
            run.write_results(results)
            return results

        def checkpoint_state() -> dict[str, Any]:
            return {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "metrics": {f"val/{best_name}": best["val"][best_name]} if best else {},
                "epoch": data.train_stream.epoch, "step": step, "best": best,
                "experiment": experiment.name, "config": config.resolved(), "seed": config.seed,
                "data": data.checkpoint_state(),
                "train": {
                    "data": data.state_dict(), "random": random_states(),
                    "elapsed": elapsed + time.perf_counter() - started,
                    "interval_loss": list(interval_loss),
                },
            }

        started = time.perf_counter()
        bar = tqdm(total=max_steps, initial=step, disable=not self.progress_bar,
                   desc=experiment.name, dynamic_ncols=True, leave=False)
        model.train()
        try:
            with logging_redirect_tqdm(), bar:
                while step < max_steps:
                    loss_value = self._train_step(experiment, network, data, optimizer,
                                                  step + 1, run.path)
                    step += 1
                    bar.update(1)
                    interval_loss[0] += loss_value
                    interval_loss[1] += 1

                    if step % self.log_every == 0:
                        run.log(step, {"train/loss": interval_loss[0] / interval_loss[1]})
                        bar.set_postfix(loss=f"{interval_loss[0] / interval_loss[1]:.4g}")
                        interval_loss = [0.0, 0]

                    # Validate; on improvement, test and keep the checkpoint as the best.
                    if step % interval == 0 or step == max_steps:
                        val = self.evaluate_split(model, data, experiment, "val")
                        run.log(step, {f"val/{name}": value for name, value in val.items()})
                        message = f"step {step}: val {_format(val)}"
                        if experiment.improves(val[best_name], best and best["val"][best_name]):
                            test = self.evaluate_split(model, data, experiment, "test")
                            best = {"step": step, "val": val, "test": test}
                            run.log(step, {f"test/{name}": value for name, value in test.items()})
                            message += f" (best) test {_format(test)}"
                            run.save_checkpoint("best.pt", checkpoint_state())
                        run.save_checkpoint("last.pt", checkpoint_state())
                        run.flush()
                        logger.info(message)
        except TrainingError:
            summary(f"stopped at step {step + 1}: non-finite loss")
            raise
        except KeyboardInterrupt:
            summary(f"interrupted at step {step}")
            if (run.path / "last.pt").is_file():
                logger.warning("interrupted at step %d; continue with --trainer.resume=%s",
                               step, run.path / "last.pt")
            else:
                logger.warning("interrupted at step %d, before the first validation: no "
                               "checkpoint was written, so start the run again", step)
            raise

        results = summary("finished")
        if best:
            logger.info(
                "best val/%s %.6g at step %d; its test scores: %s (run directory %s)",
                best_name, best["val"][best_name], best["step"], _format(best["test"]), run.path,
            )
        return results

    def _run_directory(
        self, experiment: Experiment, run_name: str, resume_step: int | None
    ) -> "RunDirectory | _NoFiles":
        """The run directory, made by the first process; the others learn its path."""
        run, failure = None, None
        if distributed.is_main():
            try:
                if resume_step is not None:
                    run = RunDirectory(Path(self.resume).parent, resume_step=resume_step)
                else:
                    run = RunDirectory.fresh(self.runs_dir, experiment.name, run_name)
            except RunDirectoryError as error:
                failure = str(error)
        path, failure = distributed.broadcast((run and str(run.path), failure))
        if failure:
            raise RunDirectoryError(failure)
        return run if run is not None else _NoFiles(Path(path))


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.6g}" for name, value in scores.items())


def _non_finite_message(step: int, inputs: torch.Tensor, run_path: Path) -> str:
    cause = (
        "the input batch contains NaN or infinite values"
        if not torch.isfinite(inputs).all() else "the model diverged"
    )
    return (
        f"non-finite loss at step {step}: {cause}; training stopped, the best checkpoint so "
        f"far is kept in {run_path}"
    )


def _check_same_run(stored: dict, config: Config, path: str) -> None:
    """Refuse to resume a checkpoint made with options that change the numbers of a run."""
    current = config.resolved()
    differences = []
    for group in ("trainer", "optimizer", "dataset", "model"):
        neutral = NEUTRAL_OPTIONS.get(group, set()) | {"max_steps"}  # may train on longer
        for key in sorted(set(stored.get(group, {})) | set(current[group])):
            old, new = stored.get(group, {}).get(key), current[group].get(key)
            if key not in neutral and json.dumps(old, default=str) != json.dumps(new, default=str):
                differences.append(f"{group}.{key}: {old!r} in the checkpoint, {new!r} now")
    if stored.get("seed") != current["seed"]:
        differences.append(f"seed: {stored.get('seed')} in the checkpoint, {current['seed']} now")
    if differences:
        raise ConfigError(
            f"cannot resume {path} with different options: {'; '.join(differences)}"
        )
