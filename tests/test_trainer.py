"""The trainer on short O(5) runs: learning, resuming, stopping on bad input, checkpoint errors."""

import functools
import json
import logging
import os

import pytest
import torch

from data.o5_regression import O5Regression
from engineer.checkpoint import CheckpointError
from engineer.config import ConfigError, parse
from engineer.experiments import EXPERIMENTS
from engineer.runner import main, run
from engineer.trainer import TrainingError
from models.deepspheres import DEH_skeletons

O5 = EXPERIMENTS["o5_regression"]


def o5_arguments(tmp_path, *argv):
    return [f"--trainer.runs_dir={tmp_path / 'runs'}", "--trainer.progress_bar=False",
            "--dataset.num_samples=256", "--trainer.log_every=10", *argv]


def run_o5(tmp_path, *argv):
    return run(O5, parse(o5_arguments(tmp_path, *argv), O5.configs, O5.seed))


def leftovers(directory):
    """Temporary files a writer left behind."""
    return [name for _, _, names in os.walk(directory) for name in names if "tmp" in name]


def break_training_at(monkeypatch, call, replacement):
    """Make the `call`-th training batch of the O(5) data misbehave via `replacement(batch)`."""
    original = O5Regression.train_batch
    calls = {"count": 0}

    def train_batch(self):
        calls["count"] += 1
        batch = original(self)
        return replacement(batch) if calls["count"] == call else batch

    monkeypatch.setattr(O5Regression, "train_batch", train_batch)


def test_a_short_run_learns_and_writes_its_run_directory(tmp_path):
    results = run_o5(tmp_path, "--dataset.num_samples=1000", "--trainer.max_steps=600",
                     "--trainer.val_check_interval=200")
    variance = O5Regression(num_samples=1000, seed=42).splits["test"][1].var().item()
    assert results["best"]["test"]["loss"] < 0.1 * variance
    run_dir = tmp_path / "runs" / "o5_regression" / (
        "max_steps=600,num_samples=1000,val_check_interval=200-seed42")
    assert results["run_dir"] == str(run_dir)
    assert sorted(os.listdir(run_dir)) == ["best.pt", "last.pt", "metrics.jsonl", "results.json"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == "finished" and saved["steps"] == 600
    assert saved["parameters"] > 0 and saved["wall_time_s"] > 0
    assert saved["best"] == results["best"] and saved["config"]["seed"] == 42
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [200, 400, 600]
    assert [r["step"] for r in records] == list(range(10, 601, 10))  # one record per step
    assert {"train/loss", "val/loss", "test/loss"} <= set(records[19])
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["data"]["target_std"] == pytest.approx(6.1, abs=0.2)
    assert checkpoint["step"] == results["best"]["step"]


def test_interrupt_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    arguments = ["--trainer.max_steps=60", "--trainer.val_check_interval=20"]
    whole = run_o5(tmp_path / "whole", *arguments)

    def interrupt(batch):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        break_training_at(patch, 47, interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_o5(tmp_path / "parts", *arguments)
    [run_dir] = (tmp_path / "parts" / "runs" / "o5_regression").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted at step 46"
    resumed = run_o5(tmp_path / "parts", *arguments, f"--trainer.resume={run_dir / 'last.pt'}")

    assert resumed["best"] == whole["best"] and resumed["steps"] == 60
    whole_dir = tmp_path / "whole" / "runs" / "o5_regression" / run_dir.name
    assert (run_dir / "metrics.jsonl").read_text() == (whole_dir / "metrics.jsonl").read_text()
    for name, tensor in torch.load(whole_dir / "last.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(
            torch.load(run_dir / "last.pt", weights_only=True)["model"][name], tensor,
            rtol=0, atol=0)


def test_interrupt_before_any_checkpoint_says_to_start_again(tmp_path, monkeypatch, caplog):
    def interrupt(batch):
        raise KeyboardInterrupt

    break_training_at(monkeypatch, 5, interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_o5(tmp_path, "--trainer.max_steps=60", "--trainer.val_check_interval=20")
    [run_dir] = (tmp_path / "runs" / "o5_regression").iterdir()
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl", "results.json"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted at step 4"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["interrupted at step 4, before the first validation: no checkpoint was "
                        "written, so start the run again"]


def test_resume_refuses_other_options(tmp_path):
    run_o5(tmp_path, "--trainer.max_steps=20", "--trainer.val_check_interval=10")
    [run_dir] = (tmp_path / "runs" / "o5_regression").iterdir()
    with pytest.raises(ConfigError, match=r"cannot resume .* optimizer\.lr: 0\.001 in the "
                       r"checkpoint, 0\.01 now"):
        run_o5(tmp_path, "--trainer.max_steps=40", "--optimizer.lr=0.01",
               f"--trainer.resume={run_dir / 'last.pt'}")


def test_non_finite_input_batch_stops_and_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    break_training_at(monkeypatch, 25, lambda batch: (batch[0] * float("nan"), batch[1]))
    with pytest.raises(TrainingError) as error:
        run_o5(tmp_path, "--trainer.max_steps=40", "--trainer.val_check_interval=10")
    [run_dir] = (tmp_path / "runs" / "o5_regression").iterdir()
    assert str(error.value) == (
        "non-finite loss at step 25: the input batch contains NaN or infinite values; training "
        f"stopped, the best checkpoint so far is kept in {run_dir}")
    assert torch.load(run_dir / "best.pt", weights_only=True)["step"] == 20
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "stopped at step 25: non-finite loss"
    assert results["best"]["step"] == 20
    assert leftovers(tmp_path) == []


def evaluate(tmp_path, checkpoint, caplog):
    status = main("o5_regression", o5_arguments(
        tmp_path, "--trainer.test_only=True", f"--trainer.checkpoint={checkpoint}"))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return status, errors


def test_checkpoint_of_another_model_is_refused(tmp_path, caplog):
    path = tmp_path / "skeletons.pt"
    torch.save({"model": DEH_skeletons().state_dict(), "step": 0}, path)
    status, errors = evaluate(tmp_path, path, caplog)
    assert status == 2 and len(errors) == 1
    assert errors[0] == (
        f"checkpoint {path} does not fit this DeepSpheres (is it from another model or "
        "configuration?): 9 mismatches: spheres.1.weight not in the model; biases.1 not in the "
        "model; and 7 more")
    assert not (tmp_path / "runs").exists()


def test_truncated_checkpoint_is_refused(tmp_path, caplog):
    run_o5(tmp_path, "--trainer.max_steps=10", "--trainer.val_check_interval=10")
    [run_dir] = (tmp_path / "runs" / "o5_regression").iterdir()
    truncated = tmp_path / "truncated.pt"
    content = (run_dir / "best.pt").read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    status, errors = evaluate(tmp_path, truncated, caplog)
    assert status == 2 and len(errors) == 1
    assert errors == [f"{truncated} is not a torch checkpoint (or is damaged)"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [b"hello", b"garbage bytes 123", b"", bytes(range(256))])
@pytest.mark.parametrize("option", ["checkpoint", "resume"])
def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, caplog, content,
                                                                  option):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    test_only = ["--trainer.test_only=True"] if option == "checkpoint" else []
    status = main("o5_regression", o5_arguments(tmp_path, *test_only,
                                                f"--trainer.{option}={path}"))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 2 and errors == [f"{path} is not a torch checkpoint (or is damaged)"]
    assert "weights_only" not in caplog.text


def test_a_damaged_resume_file_is_refused_before_the_data_are_built(tmp_path, monkeypatch):
    built = []
    original = O5Regression.__init__

    @functools.wraps(original)  # keeps the signature the configuration reads
    def spy(self, *args, **kwargs):
        built.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(O5Regression, "__init__", spy)
    path = tmp_path / "junk.pt"
    path.write_bytes(b"junk")
    assert main("o5_regression", o5_arguments(tmp_path, f"--trainer.resume={path}")) == 2
    assert built == []
    assert main("o5_regression", o5_arguments(tmp_path, "--trainer.max_steps=2")) == 0
    assert built == [True]  # the spy sees the data being built


class CallsOnLoad:
    """Unpickling this calls a function (a harmless one here)."""

    def __reduce__(self):
        return print, ("this would have run",)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({"model": {}, "payload": CallsOnLoad()}, path)
    with pytest.raises(CheckpointError) as error:
        run_o5(tmp_path, "--trainer.test_only=True", f"--trainer.checkpoint={path}")
    assert str(error.value) == (
        f"refusing to load {path}: it holds code or objects beyond tensors and plain values, "
        "which could run code when read")


def test_our_checkpoint_evaluates_to_its_recorded_numbers(tmp_path, caplog):
    results = run_o5(tmp_path, "--trainer.max_steps=30", "--trainer.val_check_interval=10")
    best = os.path.join(results["run_dir"], "best.pt")
    evaluation = run_o5(tmp_path, "--trainer.test_only=True", f"--trainer.checkpoint={best}")
    assert evaluation["test"]["loss"] == pytest.approx(results["best"]["test"]["loss"], rel=1e-6)


def test_our_checkpoint_is_evaluated_on_the_data_it_was_trained_with(tmp_path, caplog):
    results = run_o5(tmp_path, "--seed=3", "--trainer.max_steps=30",
                     "--trainer.val_check_interval=10")
    best = os.path.join(results["run_dir"], "best.pt")
    recorded = json.loads((tmp_path / results["run_dir"] / "results.json").read_text())

    # Neither the training size nor the seed is repeated.
    arguments = [f"--trainer.runs_dir={tmp_path / 'runs'}", "--trainer.progress_bar=False",
                 "--trainer.test_only=True", f"--trainer.checkpoint={best}"]
    caplog.clear()
    evaluation = run(O5, parse(arguments, O5.configs, O5.seed))
    assert evaluation["test"]["loss"] == pytest.approx(recorded["best"]["test"]["loss"],
                                                       rel=1e-6)
    assert "evaluating on the checkpoint's data options: dataset.num_samples=256, seed=3" in [
        r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_compiled_training_follows_the_uncompiled_run(tmp_path):
    # 256 samples in batches of 32: one batch size, so one compilation (tens of seconds).
    options = ("--trainer.max_steps=64", "--trainer.val_check_interval=32")
    eager = run_o5(tmp_path / "eager", *options)
    compiled = run_o5(tmp_path / "compiled", *options, "--trainer.compile=True")
    assert compiled["config"]["trainer"]["compile"] is True
    for split in ("val", "test"):
        assert compiled["best"][split]["loss"] == pytest.approx(eager["best"][split]["loss"],
                                                                rel=1e-4)
