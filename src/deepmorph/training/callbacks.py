"""Callbacks of the training core: early stopping that restores the best weights, and the random state.

Both keep their state in checkpoints, so that a run resumed from ``last.ckpt`` behaves as if it
had never stopped: it stops at the same epoch and restores the same weights, and it draws the same
random numbers (shuffling, dropout, noise, augmentation).
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch

from deepmorph.errors import DeepmorphValueError


class EarlyStopping(L.Callback):
    """Stop when a monitored metric stops improving; restore the best weights at the end (Keras').

    After each epoch the metric ``monitor`` improves if it is below ``best - min_delta`` (mode
    ``min``) or above ``best + min_delta`` (mode ``max``). After ``patience`` epochs in a row
    without improvement, training stops. With ``restore_best_weights`` the module's weights (a copy
    of its state dict kept in memory, and in the checkpoints) are those of the best epoch when fit
    ends, whether it stopped early or ran all its epochs. Unlike Keras and Lightning the check
    happens at the end of the training epoch, after validation, like the checkpoints. With several
    processes (DDP) each one decides on global rank 0's value of ``monitor`` (the same value in all
    of them when it is logged with ``sync_dist``), so they all stop at the same epoch.

    Parameters
    ----------
    monitor : str
        Logged metric to watch, e.g. ``val_loss`` or ``val_acc``.
    mode : {"min", "max"}
        Whether smaller or larger values are better.
    patience : int
        Epochs without improvement before stopping.
    min_delta : float
        Smallest change of ``monitor`` that counts as an improvement, in the metric's units.
    restore_best_weights : bool
        Load the best epoch's weights when fit ends.

    Attributes
    ----------
    best_score : float
        Best value of ``monitor`` so far.
    best_epoch : int or None
        Epoch (from 0) of ``best_score``.
    stopped_epoch : int or None
        Epoch at whose end training was stopped, None if it was not stopped early.
    wait_count : int
        Epochs since the last improvement.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 10,
        min_delta: float = 0.0,
        restore_best_weights: bool = True,
    ):
        if mode not in ("min", "max"):
            raise DeepmorphValueError(f"early stopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 0 or not min_delta >= 0:
            raise DeepmorphValueError(f"early stopping: need patience >= 0 and min_delta >= 0, got {patience}, "
                                      f"{min_delta}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.restore_best_weights = restore_best_weights
        self.best_score = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.wait_count = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best_score - self.min_delta
        return value > self.best_score + self.min_delta

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_epoch is not None:  # resumed from a run that had already stopped
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise DeepmorphValueError(
                f"early stopping monitors {self.monitor!r}, which is not logged; logged metrics: "
                f"{', '.join(sorted(trainer.callback_metrics)) or 'none'}"
            )
        # Every process decides on global rank 0's value, so all of them stop at the same epoch
        # (with DDP a process that stopped alone would leave the others waiting for it).
        value = float(trainer.strategy.broadcast(float(trainer.callback_metrics[self.monitor]), src=0))
        if math.isfinite(value) and self._improved(value):
            self.best_score, self.best_epoch, self.wait_count = value, trainer.current_epoch, 0
            if self.restore_best_weights:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            return
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restore_best_weights and self.best_state is not None:
            pl_module.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {
            "best_score": self.best_score, "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
            "wait_count": self.wait_count, "best_state": self.best_state,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)


class RandomStateCallback(L.Callback):
    """Save the global random states (torch, CUDA, NumPy, Python) in checkpoints and restore them on resume.

    Lightning does not: without it a resumed run shuffles, drops out and augments with other
    random numbers than the uninterrupted run. The states are stored as plain tensors and tuples,
    loadable with ``torch.load(weights_only=True)``. With several processes (DDP) only rank 0's
    states are saved, so exact resume holds for single-process runs.
    """

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global one)
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": {
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                "pos": int(numpy_state["state"]["pos"]),
                "has_gauss": int(numpy_state["has_gauss"]),
                "gauss": float(numpy_state["gauss"]),
            },
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        numpy_state = state_dict["numpy"]
        np.random.set_state({  # noqa: NPY002
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        })
        if "cuda" in state_dict and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
