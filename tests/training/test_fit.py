"""fit: exact resume after a kill, and refusing to mix runs."""

from __future__ import annotations

import pytest
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.tasks import ClassifyTask
from deepmorph.training import History, RunConfig, build_model, fit
from tests.training.test_callbacks import KillAt, Killed
from tests.training.toys import loaders

# Everything random is on: shuffling, dropout, input noise and a random-flip augmentation.
CONFIG = RunConfig(
    model={"kwargs": {"widths": [4, 8], "dropout": 0.25, "noise_sigma": 0.1}},
    optimizer={"lr": 0.01}, schedule={"kind": "step", "step_size": 2, "gamma": 0.5},
    early_stopping={"patience": 10}, epochs=5, progress_bar=False, accelerator="cpu", seed=3,
)


def random_flips(images, masks=None, pa_deg=None, generator=None):
    """A stand-in for deepmorph.data.augment: flip half the images left-right, from torch's global generator."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images), masks, pa_deg


def _fit(out_dir, callbacks=(), config=CONFIG):
    train, val = loaders(n_train=64, n_val=32, batch_size=16)
    task = ClassifyTask(build_model(config, num_outputs=2), config, 2, augmentation=random_flips)
    return fit(task, train, val, config, out_dir, callbacks=callbacks)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    whole = _fit(tmp_path / "whole")
    assert len(whole) == 5 and whole["lr"] == [0.01, 0.01, 0.005, 0.005, 0.0025]

    with pytest.raises(Killed):
        _fit(tmp_path / "cut", callbacks=[KillAt(3)])
    assert History.load(tmp_path / "cut").epoch == [0, 1, 2]  # saved after every epoch
    resumed = _fit(tmp_path / "cut")

    assert resumed == whole  # every metric of every epoch, bit for bit
    for name in ("model.pt", "checkpoints/last.ckpt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / name, weights_only=True)
        a, b = (a["state_dict"], b["state_dict"]) if "state_dict" in a else (a, b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_last_checkpoint_is_the_last_epoch_even_when_the_best_is_older(tmp_path):
    # "max" of a falling validation loss: the best epoch is the first one, the last is the fifth
    config = CONFIG.with_overrides({"early_stopping.mode": "max"})
    history = _fit(tmp_path / "run", config=config)
    assert len(history) == 5
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)
    assert last["epoch"] == 4 and best["epoch"] < 4
    # more epochs continue from the fifth, not from the best
    more = _fit(tmp_path / "run", config=config.with_overrides({"epochs": 6}))
    assert more.epoch == [0, 1, 2, 3, 4, 5] and more["val_loss"][:5] == history["val_loss"]


def test_refuses_to_mix_runs(tmp_path):
    config = CONFIG.with_overrides({"epochs": 1, "model.kwargs.dropout": 0.0})
    _fit(tmp_path / "run", config=config)
    with pytest.raises(DeepmorphValueError, match="another config .*model"):
        _fit(tmp_path / "run", config=config.with_overrides({"model.kwargs.dropout": 0.5}))
    train, val = loaders(n_train=16, n_val=16)
    task = ClassifyTask(build_model(config, num_outputs=2), config, 2)
    with pytest.raises(DeepmorphIOError, match="holds a run already"):
        fit(task, train, val, config, tmp_path / "run", resume=False)
    # more epochs is a legitimate change: the run continues
    assert len(_fit(tmp_path / "run", config=config.with_overrides({"epochs": 2}))) == 2


def test_restart_on_config_change_starts_afresh_and_keeps_the_old_checkpoints(tmp_path):
    from deepmorph.training.fit import restart_on_config_change

    config = CONFIG.with_overrides({"epochs": 2, "model.kwargs.dropout": 0.0})
    _fit(tmp_path / "run", config=config)
    old = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    changed = config.with_overrides({"model.kwargs.widths": [4, 4]})
    with restart_on_config_change():
        history = _fit(tmp_path / "run", config=changed)
    assert history.epoch == [0, 1]  # from the start, not resumed
    kept = torch.load(tmp_path / "run" / "checkpoints.previous" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(old[k], kept[k]) for k in old)
    assert RunConfig.from_yaml(tmp_path / "run" / "config.yaml").model.kwargs["widths"] == [4, 4]
    with pytest.raises(DeepmorphValueError, match="another config"):  # outside the block: refused as before
        _fit(tmp_path / "run", config=config)
