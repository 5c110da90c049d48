"""Configuration: stacking files, overrides, types, refused modules and one-line errors."""

import functools
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.o5_regression import O5Regression
from engineer import load_model
from engineer.config import ConfigError, parse, resolve
from engineer.experiments import EXPERIMENTS
from engineer.runner import main

REPO = Path(__file__).resolve().parents[1]
O5 = EXPERIMENTS["o5_regression"]


def o5_config(*argv):
    return parse(list(argv), O5.configs, O5.seed)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_default_stacks_resolve(name):
    experiment = EXPERIMENTS[name]
    config = parse([], experiment.configs, experiment.seed)
    assert config.seed == {"o5_regression": 42, "hulls": 0, "skeletons": 1}[name]
    for group in ("trainer", "optimizer", "dataset", "model"):
        assert callable(config.target(group))


def test_later_sources_win_and_values_are_typed(tmp_path):
    first = write(tmp_path / "a.yaml", "optimizer: {lr: 0.1}\ndataset: {num_samples: 100}\n")
    second = write(tmp_path / "b.yaml", "optimizer: {lr: 1e-2}\n")
    config = o5_config("-C", str(first), "-C", str(second), "--dataset.batch_size=8",
                       "--model.width", "[3]", "--seed=7")
    assert config.groups["optimizer"]["lr"] == 0.01  # YAML reads 1e-2 as text; coerced
    assert config.groups["dataset"] == {
        "module": "data.o5_regression.O5Regression", "num_samples": 100, "batch_size": 8}
    assert config.groups["model"]["width"] == [3]
    assert config.seed == 7
    assert config.value("dataset", "eval_batch_size") == 4096  # constructor default


def test_a_new_module_starts_the_group_afresh(tmp_path):
    other = write(tmp_path / "sgd.yaml", "optimizer: {module: torch.optim.SGD, momentum: 0.9}\n")
    config = o5_config("-C", str(other))
    assert config.groups["optimizer"] == {"module": "torch.optim.SGD", "momentum": 0.9}


def test_unknown_key_names_the_key_and_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"unknown option --dataset\.num_sample; accepted: "
                       r"num_samples, batch_size, eval_batch_size"):
        o5_config("--dataset.num_sample=10")


def test_unknown_key_in_a_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: {widht: [2]}\n")
    with pytest.raises(ConfigError, match=r"unknown option model\.widht; accepted: depth, width"):
        o5_config("-C", str(bad))


def test_wrong_type_names_the_key_and_the_type():
    with pytest.raises(ConfigError, match=r"dataset\.num_samples='many' is not of type int"):
        o5_config("--dataset.num_samples=many")
    with pytest.raises(ConfigError, match=r"model\.sphere_bias=3 is not of type bool"):
        o5_config("--model.sphere_bias=3")


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'nope.yaml'} does not exist"):
        o5_config("-C", str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", [
    "os.system", "subprocess.run", "builtins.eval", "torch.load", "models.deepspheres.torch",
    "models.deepspheres.inspect.signature", "data.common.Path", "data.common.np",
    "engineer.config._split_arguments", "models.deepspheres.__builtins__", "numpy.load",
    "torch.optim.Adam.__init__", "not a name",
])
def test_modules_outside_the_project_are_refused(name):
    with pytest.raises(ConfigError, match=r"module"):
        resolve(name, "model")


@pytest.mark.parametrize("group,name", [
    ("model", "engineer.runner.main"), ("dataset", "data.hulls.main"),
    ("optimizer", "models.deepspheres.DeepSpheres"), ("trainer", "data.hulls.Hulls"),
])
def test_a_group_builds_only_its_kind(tmp_path, caplog, group, name):
    status = main("o5_regression", [f"--{group}.module={name}",
                                    f"--trainer.runs_dir={tmp_path / 'runs'}"])
    assert status == 2
    assert f"{group}.module={name} does not build a" in caplog.text


def test_modules_inside_the_project_and_torch_optim_resolve():
    assert resolve("torch.optim.AdamW", "optimizer") is torch.optim.AdamW
    assert resolve("models.deepspheres.DeepSpheres", "model").__name__ == "DeepSpheres"


def test_entry_point_reports_one_line_and_exit_code_2(tmp_path, caplog):
    status = main("o5_regression", ["--dataset.num_samples=x",
                                    f"--trainer.runs_dir={tmp_path / 'runs'}"])
    assert status == 2
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert "dataset.num_samples" in errors[0].getMessage()
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_option_with_its_default(capsys):
    assert main("skeletons", ["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--trainer.max_steps", "--trainer.resume", "--optimizer.lr",
                   "--dataset.augmentation", "--dataset.root", "--model.width", "--seed"):
        assert option in text
    assert "'I'" in text and "2295" in text


def test_cli_error_is_one_line_without_traceback(tmp_path):
    """The command line as a user meets it: a subprocess, stderr, the exit status."""
    result = subprocess.run(
        [sys.executable, "o5_regression.py", "-C", str(tmp_path / "missing.yaml"),
         f"--trainer.runs_dir={tmp_path / 'runs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    missing = tmp_path / "missing.yaml"
    assert result.stderr.strip() == f"error: config file {missing} does not exist"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_load_model_from_a_yaml_file_and_a_dict():
    model = load_model(REPO / "configs" / "model" / "o5_deh_reg.yaml")
    assert not model.training
    assert model(torch.randn(4, 2, 5)).shape == (4, 1)
    model = load_model({"module": "models.deepspheres.DEH_skeletons", "hidden_features": 8})
    assert model(torch.randn(3, 20, 3)).shape == (3, 10)
    with pytest.raises(ConfigError, match="unknown option model.size"):
        load_model({"module": "models.deepspheres.DEH_skeletons", "size": 8})
    with pytest.raises(ConfigError, match=r"^model \(DEH_skeletons\): depth must be >= 1, got 0$"):
        load_model({"module": "models.deepspheres.DEH_skeletons", "depth": 0})


def test_load_model_with_a_released_checkpoint(reference_dir):
    model = load_model(
        REPO / "configs" / "model" / "o3_deh_skeletons.yaml",
        reference_dir / "log-o3-skeletons" / "best_val_acc_2295",
    )
    stored = np.load(reference_dir / "outputs" / "skeletons.npz")
    with torch.no_grad():
        outputs = model(torch.from_numpy(stored["inputs"]).float())
    torch.testing.assert_close(outputs, torch.from_numpy(stored["outputs"]), rtol=1e-4,
                               atol=1e-4)


def test_unavailable_device_and_unwritable_run_directory(tmp_path, caplog):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.device=cuda: CUDA is not available"):
            o5_config("--trainer.device=cuda").build("trainer")
    with pytest.raises(ConfigError, match="trainer.device=cpu:1: there is one CPU device"):
        o5_config("--trainer.device=cpu:1").build("trainer")
    blocker = tmp_path / "file"
    blocker.write_text("")
    status = main("o5_regression", ["--dataset.num_samples=100", "--trainer.progress_bar=False",
                                    f"--trainer.runs_dir={blocker}"])
    assert status == 2
    assert f"cannot create the run directory {blocker / 'o5_regression'}" in caplog.text


@pytest.mark.parametrize("argv,error", [
    (["--model.width=[2,3]"], "model (models.deepspheres.DEH_o5reg): width must list one entry "
                              "per layer (depth = 1), got [2, 3]"),
    (["--model.depth=0"], "model (models.deepspheres.DEH_o5reg): depth must be >= 1, got 0"),
    (["--model.hidden_features=0"],
     "model (models.deepspheres.DEH_o5reg): hidden_features must be >= 1, got 0"),
    (["--trainer.test_only=True", "--trainer.checkpoint={tmp}/missing.pt"],
     "trainer.checkpoint={tmp}/missing.pt does not exist; give a checkpoint file"),
    (["--trainer.resume={tmp}/missing.pt"],
     "trainer.resume={tmp}/missing.pt does not exist; give a checkpoint file"),
    (["--trainer.resume={tmp}"], "trainer.resume={tmp} is a directory; give a checkpoint file"),
    (["--trainer.checkpoint={tmp}/missing.pt"],
     "trainer.checkpoint is for evaluation with trainer.test_only=True; to continue an "
     "interrupted run use trainer.resume=PATH"),
    (["--trainer.test_only=True", "--trainer.checkpoint={tmp}/other.pt"],
     "checkpoint {tmp}/other.pt does not fit this DeepSpheres (is it from another model or "
     "configuration?): 3 mismatches: linear1.weight has shape [8, 6] in the checkpoint, "
     "[32, 6] in the model; linear1.bias has shape [8] in the checkpoint, [32] in the model; "
     "and 1 more"),
])
def test_options_model_and_checkpoint_are_checked_before_the_data(tmp_path, monkeypatch, caplog,
                                                                  argv, error):
    @functools.wraps(O5Regression.__init__)  # keeps the signature the configuration reads
    def build(*args, **kwargs):
        raise AssertionError("the data were built before the options were checked")

    monkeypatch.setattr(O5Regression, "__init__", build)
    torch.save({"model": load_model({"module": "models.deepspheres.DEH_o5reg",
                                     "hidden_features": 8}).state_dict()}, tmp_path / "other.pt")
    status = main("o5_regression", [f"--trainer.runs_dir={tmp_path / 'runs'}",
                                    *(a.format(tmp=tmp_path) for a in argv)])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 2 and errors == [error.format(tmp=tmp_path)]
