"""Classification: a CNN learns discs vs bars through fit; the task's loss, metrics and augmentation."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from deepmorph.errors import DeepmorphValueError
from deepmorph.models import SimpleCNN
from deepmorph.tasks import ClassifyTask
from deepmorph.training import History, RunConfig, build_model, fit
from tests.training.toys import discs_and_bars, loaders

CONFIG = RunConfig(model={"kwargs": {"widths": [8, 16], "dropout": 0.1}}, optimizer={"lr": 0.01},
                   schedule={"kind": "exponential", "decay_rate": 0.1}, epochs=8, batch_size=32,
                   progress_bar=False, accelerator="cpu")


def test_cnn_learns_discs_from_bars(tmp_path):
    train, val = loaders(n_train=256, n_val=128, batch_size=CONFIG.batch_size)
    task = ClassifyTask(build_model(CONFIG, num_outputs=2), CONFIG, 2, ["disc", "bar"])
    history = fit(task, train, val, CONFIG, tmp_path)

    assert history.keys() == ["loss", "val_loss", "acc", "val_acc", "lr"]
    n = len(history)
    assert all(len(history[key]) == n for key in history.keys()) and history.epoch == list(range(n))
    assert history["lr"] == pytest.approx([0.01 * 2.718281828459045 ** (-0.1 * t) for t in range(n)])
    assert history["loss"][-1] < history["loss"][0]

    # the restored model (best val_loss) classifies held-out images, scored here independently
    images, labels = discs_and_bars(256, seed=7)
    task.eval()
    with torch.no_grad():
        probabilities = task.predict_step({"image": images}, 0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(256))
    accuracy = (probabilities.argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9, history.history
    assert max(history["val_acc"]) > 0.9

    for name in ("history.csv", "history.json", "learning_curves.png", "config.yaml", "model.pt", "summary.json",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert History.load(tmp_path) == history
    assert RunConfig.from_yaml(tmp_path / "config.yaml") == CONFIG
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == n and summary["best_epoch"] == min(range(n), key=history["val_loss"].__getitem__)
    hparams = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["label_names"] == ["disc", "bar"] and hparams["config"] == CONFIG.to_dict()


def test_augmentation_applies_to_training_batches_only():
    seen = []

    def spy(images, masks=None, pa_deg=None, generator=None):
        seen.append(len(images))
        return images.flip(-1), masks, pa_deg

    train, val = loaders(n_train=48, n_val=32, batch_size=16)
    task = ClassifyTask(SimpleCNN(1, 2, widths=(4,)), CONFIG, 2, augmentation=spy)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(task, train, val)
    assert seen == [16, 16, 16]  # the three training batches, not the validation ones
    assert {"loss", "acc", "val_loss", "val_acc", "lr"} <= set(trainer.callback_metrics)


def test_class_weights_weight_the_loss():
    images, labels = discs_and_bars(8)
    task = ClassifyTask(SimpleCNN(1, 2, widths=(4,)), CONFIG, 2, class_weights=[1.0, 0.0]).eval()
    task.log_epoch = lambda *args, **kwargs: None  # no trainer to log to
    with torch.no_grad():
        loss = task.shared_step({"image": images, "target": labels}, "val")
        logits = task.model(images)
    # weight 0 for class 1: the loss is the mean cross-entropy of the class-0 images alone
    torch.testing.assert_close(loss, F.cross_entropy(logits[labels == 0], labels[labels == 0]))


def test_bad_arguments():
    model = SimpleCNN(1, 3, widths=(4,))
    with pytest.raises(DeepmorphValueError, match="2 label names for 3 classes"):
        ClassifyTask(model, CONFIG, 3, ["a", "b"])
    with pytest.raises(DeepmorphValueError, match="2 class weights for 3 classes"):
        ClassifyTask(model, CONFIG, 3, class_weights=[1, 2])
    with pytest.raises(DeepmorphValueError, match="at least 2 classes"):
        ClassifyTask(model, CONFIG, 1)
