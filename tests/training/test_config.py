"""The run config: YAML round trip, overrides, clear errors for unknown keys and bad values."""

from __future__ import annotations

import dataclasses

import pytest

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.training import RunConfig


def test_yaml_round_trip(tmp_path):
    config = RunConfig(model={"name": "cnn", "kwargs": {"widths": (8, 16), "dropout": 0.1}},
                       schedule={"kind": "step", "step_size": 3}, normalization={"kind": "asinh", "scale": 2.0},
                       devices=1, epochs=7)
    text = config.to_yaml(tmp_path / "run.yaml")
    assert text.startswith("# deepmorph run config")
    loaded = RunConfig.from_yaml(tmp_path / "run.yaml")
    assert loaded == config
    assert loaded.model.kwargs["widths"] == [8, 16] and loaded.devices == 1


def test_yaml_values_are_converted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {lr: 1e-3, weight_decay: 0}\nepochs: 5\n")  # PyYAML reads 1e-3 as a string
    config = RunConfig.from_yaml(path)
    assert config.optimizer.lr == 0.001 and isinstance(config.optimizer.weight_decay, float)
    assert RunConfig.from_yaml(_write(tmp_path, "")) == RunConfig()


def _write(tmp_path, text):
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return path


def test_overrides():
    config = RunConfig(model={"kwargs": {"widths": [8], "dropout": 0.1}})
    new = config.with_overrides({"optimizer.lr": 0.01, "model.kwargs.dropout": 0.5, "schedule": {"kind": "cosine"}})
    assert new.optimizer.lr == 0.01 and new.schedule.kind == "cosine"
    assert new.model.kwargs == {"widths": [8], "dropout": 0.5}
    assert config.optimizer.lr == 0.001 and config.model.kwargs["dropout"] == 0.1  # unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3


@pytest.mark.parametrize("data, message", [
    ({"optimiser": {"lr": 0.1}}, "RunConfig: unknown key.* optimiser; known keys: model, optimizer"),
    ({"optimizer": {"learning_rate": 0.1}}, "OptimizerConfig: unknown key.* learning_rate; known keys: name, lr"),
    ({"schedule": {"kind": "linear"}}, "schedule.kind: 'linear' is not one of none, step, exponential"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: 'rmsprop' is not one of adam, adamw, sgd"),
    ({"finetune": {"freeze": "blocks:two"}}, "freeze mode must be 'none', 'head' or 'blocks:K'"),
    ({"epochs": 0}, "epochs: must be > 0"),
    ({"epochs": 2.5}, "RunConfig.epochs: expected an integer, got 2.5"),
    ({"batch_size": "big"}, "RunConfig.batch_size: expected an integer"),
    ({"optimizer": {"lr": "fast"}}, "OptimizerConfig.lr: expected a number, got 'fast'"),
    ({"early_stopping": {"enabled": "yes"}}, "EarlyStoppingConfig.enabled: expected true or false"),
    ({"early_stopping": {"mode": "best"}}, "early_stopping.mode: 'best' is not one of min, max"),
    ({"model": "cnn"}, "ModelConfig: expected a mapping"),
    ({"deterministic": "yes"}, "deterministic: must be true, false or 'warn'"),
])
def test_bad_config_is_a_clear_error(data, message):
    with pytest.raises(DeepmorphValueError, match=message):
        RunConfig.from_dict(data)


def test_bad_files(tmp_path):
    with pytest.raises(DeepmorphIOError, match="cannot read the run config"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(DeepmorphValueError, match="not valid YAML"):
        RunConfig.from_yaml(_write(tmp_path, "epochs: [1\n"))
    with pytest.raises(DeepmorphValueError, match="other.yaml: RunConfig: unknown key"):
        RunConfig.from_yaml(_write(tmp_path, "epoch: 3\n"))
    with pytest.raises(DeepmorphValueError, match="unknown key"):
        RunConfig().with_overrides({"optimizer.lrr": 1.0})
