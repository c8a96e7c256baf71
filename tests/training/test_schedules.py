"""Optimisers and learning-rate schedules: the learning rate of each epoch against the closed forms."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.training import RunConfig, fit, make_optimizer, make_scheduler
from tests.training.test_callbacks import KillAt, Killed
from tests.training.toys import ScriptedTask, regression_loader

LR0 = 0.1


class LrProbe(L.LightningModule):
    """Records the learning rate of each epoch; logs a scripted ``val_loss`` for the plateau schedule."""

    def __init__(self, kind, val_losses=None, epochs=None, **options):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.kind, self.options, self.epochs = kind, options, epochs
        self.val_losses = val_losses
        self.lrs = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"]).square().mean()

    def validation_step(self, batch, batch_idx):
        value = self.val_losses[self.current_epoch] if self.val_losses else 1.0
        self.log("val_loss", float(value), batch_size=1)

    def on_train_epoch_start(self):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        optimizer = make_optimizer(self.parameters(), "sgd", lr=LR0)
        scheduler = make_scheduler(optimizer, self.kind, epochs=self.epochs, **self.options)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}


def _lrs(kind, epochs, val_losses=None, **options):
    probe = LrProbe(kind, val_losses, epochs, **options)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, regression_loader(), regression_loader())
    return probe.lrs


# The lecture's formulas, written out independently of deepmorph.training.schedules; t = epoch.
CLOSED_FORMS = [
    ("none", {}, lambda t: LR0),
    ("step", {"step_size": 3, "gamma": 0.5}, lambda t: LR0 * 0.5 ** math.floor(t / 3)),
    ("exponential", {"decay_rate": 0.3}, lambda t: LR0 * math.exp(-0.3 * t)),
    ("inverse_time", {"decay_rate": 0.5}, lambda t: LR0 / (1 + 0.5 * t)),
    ("cosine", {"t_max": 5, "eta_min": 0.01},
     lambda t: 0.01 + (LR0 - 0.01) * (1 + math.cos(math.pi * min(t, 5) / 5)) / 2),
]


@pytest.mark.parametrize("kind, options, formula", CLOSED_FORMS, ids=[c[0] for c in CLOSED_FORMS])
def test_schedule_follows_its_closed_form(kind, options, formula):
    epochs = 8
    assert _lrs(kind, epochs, **options) == pytest.approx([formula(t) for t in range(epochs)], rel=1e-12)


def test_cosine_defaults_to_the_run_length():
    lrs = _lrs("cosine", 5)
    assert lrs == pytest.approx([LR0 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)], rel=1e-12)


def test_reduce_on_plateau():
    # val_loss stops improving after epoch 1; with patience 1 the rate halves after the second
    # epoch without improvement (epoch 3, then epoch 5), to be used from the next epoch on.
    lrs = _lrs("plateau", 7, val_losses=[3, 2, 2, 2, 2, 2, 2], patience=1, factor=0.5)
    assert lrs == pytest.approx([LR0, LR0, LR0, LR0, LR0 / 2, LR0 / 2, LR0 / 4])


def test_schedule_per_parameter_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([{"params": [a]}, {"params": [b], "lr": 0.01}], "adam", lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", t_max=4, eta_min=0.001)["scheduler"]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.001])


def test_optimizers():
    params = list(torch.nn.Linear(2, 2).parameters())
    assert isinstance(make_optimizer(params, "adam"), torch.optim.Adam)
    adamw = make_optimizer(params, "adamw", lr=0.01, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    sgd = make_optimizer(params, "sgd", lr=0.01, momentum=0.8, nesterov=True)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.8


def test_bad_options():
    params = list(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(DeepmorphValueError, match="unknown optimizer 'rmsprop'; choose one of adam, adamw, sgd"):
        make_optimizer(params, "rmsprop")
    with pytest.raises(DeepmorphValueError, match="Nesterov"):
        make_optimizer(params, "sgd", momentum=0.0, nesterov=True)
    with pytest.raises(DeepmorphValueError, match="no trainable parameters"):
        make_optimizer([], "adam")
    with pytest.raises(DeepmorphValueError, match="lr > 0"):
        make_optimizer(params, "adam", lr=0)
    optimizer = make_optimizer(params)
    with pytest.raises(DeepmorphValueError, match="unknown learning-rate schedule 'linear'"):
        make_scheduler(optimizer, "linear")
    with pytest.raises(DeepmorphValueError, match="t_max"):
        make_scheduler(optimizer, "cosine")
    assert make_scheduler(optimizer, "none") is None


@pytest.mark.parametrize("kill_at", [3, 4])
def test_plateau_schedule_survives_a_resume(tmp_path, kill_at):
    config = RunConfig(optimizer={"name": "sgd", "lr": LR0}, schedule={"kind": "plateau", "patience": 1, "factor": 0.5},
                       early_stopping={"enabled": False}, epochs=7, progress_bar=False, accelerator="cpu")
    script = [3, 2, 2, 2, 2, 2, 2]
    with pytest.raises(Killed):
        fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path,
            callbacks=[KillAt(kill_at)])
    history = fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path)
    assert history["lr"] == pytest.approx([LR0, LR0, LR0, LR0, LR0 / 2, LR0 / 2, LR0 / 4])
