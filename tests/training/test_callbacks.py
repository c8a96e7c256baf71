"""Early stopping on scripted loss sequences: the stopping epoch, the restored weights, and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.training import EarlyStopping, History, RunConfig, fit
from tests.training.toys import ScriptedTask, regression_loader


class Snapshots(L.Callback):
    """The model's weight at the end of every epoch."""

    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(pl_module.model.weight.detach().clone())


def _run(script, epochs, metric="val_loss", **early):
    task = ScriptedTask(RunConfig(optimizer={"name": "sgd", "lr": 0.05}), script, metric)
    stopper, snapshots = EarlyStopping(monitor=metric, **early), Snapshots()
    trainer = L.Trainer(max_epochs=epochs, callbacks=[stopper, snapshots], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, regression_loader(), regression_loader())
    return task, stopper, snapshots.weights


# (script, monitor, early-stopping options, epochs, expected stopped_epoch, expected best_epoch)
CASES = [
    # min_delta 0.1: 2.95, 2.92, 2.91 do not improve on 3 by 0.1; 3 epochs of patience end at epoch 5
    ([5, 4, 3, 2.95, 2.92, 2.91, 2.0, 1.0], "val_loss", {"patience": 3, "min_delta": 0.1}, 8, 5, 2),
    # min_delta 0: every epoch improves, no stop, the last epoch is the best
    ([5, 4, 3, 2.95, 2.92, 2.91, 2.0, 1.0], "val_loss", {"patience": 3}, 8, None, 7),
    # not stopped (patience 10) but the best epoch is 2: its weights are restored all the same
    ([5, 4, 3, 3.5, 3.2, 3.1], "val_loss", {"patience": 10}, 6, None, 2),
    # mode max: 0.79 and 0.8 are not above 0.8 + 0.01
    ([0.5, 0.7, 0.8, 0.79, 0.8, 0.9], "val_acc", {"mode": "max", "patience": 2, "min_delta": 0.01}, 6, 4, 2),
    # patience 0: stop at the first epoch without improvement
    ([3, 2, 2.5, 1], "val_loss", {"patience": 0}, 4, 2, 1),
]


@pytest.mark.parametrize("script, metric, options, epochs, stopped, best", CASES)
def test_early_stopping_on_scripted_losses(script, metric, options, epochs, stopped, best):
    task, stopper, weights = _run(script, epochs, metric, **options)
    assert stopper.stopped_epoch == stopped
    assert stopper.best_epoch == best
    assert stopper.best_score == pytest.approx(script[best])  # logged as float32
    assert len(weights) == (epochs if stopped is None else stopped + 1)
    assert torch.equal(task.model.weight, weights[best])  # the best epoch's weights are restored
    if best != len(weights) - 1:
        assert not torch.equal(weights[best], weights[-1])


def test_early_stopping_without_restore_keeps_last_weights():
    task, stopper, weights = _run([5, 4, 3, 3.5, 3.2, 3.1], 6, patience=2, restore_best_weights=False)
    assert stopper.stopped_epoch == 4 and stopper.best_epoch == 2
    assert torch.equal(task.model.weight, weights[-1])


def test_early_stopping_needs_a_logged_metric():
    with pytest.raises(DeepmorphValueError, match="'val_acc', which is not logged; logged metrics: .*val_loss"):
        _run_missing()


def _run_missing():
    task = ScriptedTask(RunConfig(), [1, 2])
    trainer = L.Trainer(max_epochs=2, callbacks=[EarlyStopping("val_acc")], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, regression_loader(), regression_loader())


class Killed(Exception):
    pass


class KillAt(L.Callback):
    """Crash at the start of an epoch, as a killed job would (its last checkpoint is the previous epoch's)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Killed


def test_early_stopping_state_survives_a_resume(tmp_path):
    script = [5, 4, 3, 2.95, 2.92, 2.91, 2.0, 1.0]
    config = RunConfig(optimizer={"name": "sgd", "lr": 0.05}, epochs=8, progress_bar=False, accelerator="cpu",
                       early_stopping={"patience": 3, "min_delta": 0.1})
    whole = fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path / "whole")
    assert len(whole) == 6  # stopped at epoch 5

    with pytest.raises(Killed):  # killed during epoch 4, with two epochs of patience used up
        fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path / "cut",
            callbacks=[KillAt(4)])
    assert len(History.load(tmp_path / "cut")) == 4
    resumed = fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path / "cut")
    assert resumed == whole
    best = torch.load(tmp_path / "whole" / "model.pt")
    assert all(torch.equal(v, torch.load(tmp_path / "cut" / "model.pt")[k]) for k, v in best.items())
    # a stopped run resumed again trains no further
    again = fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path / "cut")
    assert again == whole
