"""Optimisers and learning-rate schedules, stepped once per epoch.

With ``t`` the epoch (0 for the first) and ``lr0`` the optimiser's learning rate, the learning
rate used during epoch ``t`` is (the lecture's formulas):

============== ===========================================================================
kind           learning rate at epoch ``t``
============== ===========================================================================
none           ``lr0``
step           ``lr0 * gamma ** floor(t / step_size)``
exponential    ``lr0 * exp(-decay_rate * t)``
inverse_time   ``lr0 / (1 + decay_rate * t)``
cosine         ``eta_min + (lr0 - eta_min) * (1 + cos(pi * min(t, t_max) / t_max)) / 2``
plateau        ``lr0``, multiplied by ``factor`` (not below ``min_lr``) whenever ``val_loss`` has
               not improved for more than ``patience`` epochs (PyTorch's ``ReduceLROnPlateau``)
============== ===========================================================================

The closed forms are evaluated directly (``LambdaLR``), not by repeated multiplication, so
they hold to rounding at any epoch and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from deepmorph.errors import DeepmorphValueError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "exponential", "inverse_time", "cosine", "plateau")


def make_optimizer(
    params: Iterable,
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Build an optimiser.

    Parameters
    ----------
    params : iterable of Parameters or parameter-group dicts
        What to optimise (only trainable parameters: frozen ones should be left out).
    name : {"adam", "adamw", "sgd"}
        Adam (L2 penalty added to the gradient), AdamW (decoupled weight decay, Loshchilov &
        Hutter 2019) or SGD.
    lr : float
        Initial learning rate ``lr0``.
    weight_decay : float
        L2 penalty (Adam, SGD) or decoupled weight decay (AdamW), per unit learning rate.
    momentum : float
        SGD momentum (ignored by Adam/AdamW).
    nesterov : bool
        Nesterov momentum for SGD (needs ``momentum > 0``).
    """
    if name not in OPTIMIZERS:
        raise DeepmorphValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0 or not weight_decay >= 0 or not momentum >= 0:
        raise DeepmorphValueError(
            f"optimizer: need lr > 0, weight_decay >= 0 and momentum >= 0, got {lr}, {weight_decay}, {momentum}"
        )
    params = list(params)
    if not params:
        raise DeepmorphValueError("optimizer: no trainable parameters (is every layer frozen?)")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if nesterov and momentum == 0:
        raise DeepmorphValueError("optimizer: Nesterov SGD needs momentum > 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str = "none",
    *,
    step_size: int = 10,
    gamma: float = 0.5,
    decay_rate: float = 0.05,
    t_max: int | None = None,
    eta_min: float = 0.0,
    factor: float = 0.1,
    patience: int = 5,
    min_lr: float = 0.0,
    epochs: int | None = None,
) -> dict | None:
    """A per-epoch learning-rate schedule as a Lightning ``lr_scheduler`` configuration.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its learning rates at call time are the ``lr0`` of the formulas (one per parameter group).
    kind : {"none", "step", "exponential", "inverse_time", "cosine", "plateau"}
        The schedule (formulas in the module docstring).
    step_size : int
        Step decay: epochs between decays.
    gamma : float
        Step decay: factor applied every ``step_size`` epochs.
    decay_rate : float
        ``k`` of the exponential and inverse-time decays, per epoch.
    t_max : int, optional
        Cosine: epochs to reach ``eta_min`` (default ``epochs``); constant afterwards.
    eta_min : float
        Cosine: final learning rate.
    factor, patience, min_lr : float, int, float
        Reduce-on-plateau: factor applied, epochs without improvement of ``val_loss`` tolerated,
        floor of the learning rate.
    epochs : int, optional
        Length of the run, the default of ``t_max``.

    Returns
    -------
    dict or None
        ``{"scheduler", "interval": "epoch", "frequency": 1, "name": "lr"}`` (plus
        ``"monitor": "val_loss"`` for ``plateau``), for ``configure_optimizers``; None for ``none``.
    """
    if kind not in SCHEDULES:
        raise DeepmorphValueError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if kind == "none":
        return None
    config = {"interval": "epoch", "frequency": 1, "name": "lr"}
    if kind == "plateau":
        if not 0 < factor < 1 or patience < 0:
            raise DeepmorphValueError(
                f"plateau schedule: need 0 < factor < 1 and patience >= 0, got {factor}, {patience}"
            )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=patience, min_lr=min_lr
        )
        return {"scheduler": scheduler, "monitor": "val_loss", **config}
    lr0s = [group["lr"] for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_factor(kind, lr0, step_size, gamma, decay_rate, t_max or epochs, eta_min) for lr0 in lr0s]
    )
    return {"scheduler": scheduler, **config}


def _factor(
    kind: str, lr0: float, step_size: int, gamma: float, decay_rate: float, t_max: int | None, eta_min: float
) -> Callable[[int], float]:
    """``lr(t) / lr0`` for the closed-form schedules."""
    if kind == "step":
        if step_size < 1 or not gamma > 0:
            raise DeepmorphValueError(f"step schedule: need step_size >= 1 and gamma > 0, got {step_size}, {gamma}")
        return lambda t: gamma ** (t // step_size)
    if kind == "exponential":
        if not decay_rate >= 0:
            raise DeepmorphValueError(f"exponential schedule: need decay_rate >= 0, got {decay_rate}")
        return lambda t: math.exp(-decay_rate * t)
    if kind == "inverse_time":
        if not decay_rate >= 0:
            raise DeepmorphValueError(f"inverse_time schedule: need decay_rate >= 0, got {decay_rate}")
        return lambda t: 1.0 / (1.0 + decay_rate * t)
    if t_max is None or t_max < 1 or not 0 <= eta_min <= lr0:
        raise DeepmorphValueError(
            f"cosine schedule: need t_max >= 1 (or epochs) and 0 <= eta_min <= lr, got {t_max}, {eta_min}, {lr0}"
        )
    return lambda t: (eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * min(t, t_max) / t_max)) / 2) / lr0
