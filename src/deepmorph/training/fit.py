"""``fit``: train a task with the run's callbacks, logs and checkpoints, resuming where it stopped.

A run directory holds::

    config.yaml              the RunConfig (rewritten at each start)
    history.csv, .json       the learning history, rewritten after every epoch
    learning_curves.png      loss and metrics vs epoch, training and validation
    model.pt                 the final model's state dict (best epoch's with early stopping)
    summary.json             epochs run, best epoch and score, stopped epoch
    checkpoints/best.ckpt    best epoch by ``early_stopping.monitor``; checkpoints/last.ckpt: last epoch
    tb/                      TensorBoard event files, written live (``tensorboard --logdir RUN/tb``)

If ``checkpoints/last.ckpt`` exists, ``fit`` continues from it (weights, optimiser, schedule,
early stopping, history and random state), so an interrupted run ends as the uninterrupted one
would have (exactly on CPU with ``deterministic``). Checkpoints are taken at the end of the
training epoch, once the history, early stopping and the schedule have been updated; a
reduce-on-plateau schedule resumes exactly with tasks derived from :class:`deepmorph.tasks.Task`,
which step it before that checkpoint (Lightning steps it after).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.training._io import write_atomic, write_text_atomic
from deepmorph.training.callbacks import EarlyStopping, RandomStateCallback
from deepmorph.training.config import RunConfig
from deepmorph.training.history import History, HistoryCallback

#: Config keys that may change when a run is resumed.
RESUMABLE_CHANGES = ("epochs", "num_workers", "progress_bar", "accelerator", "devices")


logger = logging.getLogger(__name__)

#: Inside :func:`restart_on_config_change`: a run directory whose config changed starts afresh.
_RESTART_CHANGED: contextvars.ContextVar[bool] = contextvars.ContextVar("restart_changed", default=False)


@contextlib.contextmanager
def restart_on_config_change() -> Iterator[None]:
    """Within this block, :func:`fit` restarts a run whose saved config differs beyond
    :data:`RESUMABLE_CHANGES` instead of refusing it: the old checkpoints move to
    ``checkpoints.previous`` (replacing an older such folder) and training starts from epoch 0.
    For directories a program owns and reruns, such as the tour's; a user's run keeps the error."""
    token = _RESTART_CHANGED.set(True)
    try:
        yield
    finally:
        _RESTART_CHANGED.reset(token)


def fit(
    task: L.LightningModule,
    train_loader: DataLoader,
    val_loader: DataLoader,
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = True,
    callbacks: Sequence[L.Callback] = (),
) -> History:
    """Train ``task`` for ``config.epochs`` epochs (or until early stopping) and write the run to ``out_dir``.

    Parameters
    ----------
    task : LightningModule
        What to train, e.g. :class:`deepmorph.tasks.ClassifyTask`; it must log ``val_loss`` (and
        ``early_stopping.monitor``) once per epoch.
    train_loader, val_loader : DataLoader
        Training and validation batches. Validation runs after every epoch.
    config : RunConfig
        Trainer, early-stopping and seed options (the task has already used the model/optimiser ones).
    out_dir : path
        The run directory (layout in the module docstring).
    resume : bool
        Continue from ``out_dir/checkpoints/last.ckpt`` if it exists. With False, an existing
        checkpoint is an error rather than silently overwritten.
    callbacks : sequence of Callback
        Extra Lightning callbacks (e.g. an Optuna pruning callback).

    Returns
    -------
    History
        One entry per epoch run (those before a resume included).

    Raises
    ------
    DeepmorphIOError
        If ``out_dir`` holds a checkpoint and ``resume`` is False.
    DeepmorphValueError
        If a run is resumed with a config that differs beyond :data:`RESUMABLE_CHANGES`.
    """
    out_dir = Path(out_dir)
    last = out_dir / "checkpoints" / "last.ckpt"
    resuming = last.is_file()
    if resuming and not resume:
        raise DeepmorphIOError(f"{out_dir}: holds a run already; resume it or choose another directory")
    if resuming:
        try:
            _check_resumable(out_dir / "config.yaml", config)
        except DeepmorphValueError as error:
            if not _RESTART_CHANGED.get():
                raise
            previous = out_dir / "checkpoints.previous"
            shutil.rmtree(previous, ignore_errors=True)
            (out_dir / "checkpoints").rename(previous)
            logger.warning("%s; starting afresh, the old checkpoints are in %s", error, previous)
            resuming = False
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(out_dir / "config.yaml")
    L.seed_everything(config.seed, workers=True, verbose=False)

    history = HistoryCallback(save_dir=out_dir)
    stopping = config.early_stopping
    run_callbacks: list[L.Callback] = [history, RandomStateCallback()]
    early = None
    if stopping.enabled:
        early = EarlyStopping(stopping.monitor, stopping.mode, stopping.patience, stopping.min_delta,
                              stopping.restore_best_weights)
        run_callbacks.append(early)
    # Checkpoints at the end of the training epoch (not of validation), once every other callback
    # has updated its state for the epoch: last.ckpt is then a clean point to resume from.
    run_callbacks.append(ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="best", monitor=stopping.monitor, mode=stopping.mode,
        save_top_k=1, save_last=True, save_on_train_epoch_end=True, enable_version_counter=False,
    ))
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        precision=config.precision,
        deterministic=config.deterministic,
        gradient_clip_val=config.gradient_clip,
        logger=TensorBoardLogger(out_dir, name="tb", version="", default_hp_metric=False),
        callbacks=[*run_callbacks, *callbacks],
        enable_progress_bar=config.progress_bar,
        enable_model_summary=config.progress_bar,
        log_every_n_steps=max(1, min(50, _length(train_loader))),
        default_root_dir=out_dir,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(task, train_loader, val_loader, ckpt_path=last if resuming else None)

    result = history.history
    if trainer.is_global_zero:
        result.save(out_dir)
        result.save_plot(out_dir / "learning_curves.png", title=out_dir.name)
        state = {key: value.detach().cpu() for key, value in _model_of(task).state_dict().items()}
        write_atomic(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
        write_text_atomic(out_dir / "summary.json", json.dumps(_summary(result, early), indent=1) + "\n")
    return result


def _length(loader) -> int:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset
        return 50


def _model_of(task: L.LightningModule) -> torch.nn.Module:
    """The task's network (``task.model``), or the task itself for modules without one."""
    model = getattr(task, "model", None)
    return model if isinstance(model, torch.nn.Module) else task


def _summary(history: History, early: EarlyStopping | None) -> dict:
    summary = {"epochs_run": len(history), "best_epoch": None, "best_score": None, "stopped_epoch": None}
    if early is not None:
        summary.update(best_epoch=early.best_epoch, stopped_epoch=early.stopped_epoch, monitor=early.monitor,
                       best_score=early.best_score if math.isfinite(early.best_score) else None)
    return summary


def _check_resumable(path: Path, config: RunConfig) -> None:
    """Refuse to resume a run whose saved config differs in more than :data:`RESUMABLE_CHANGES`."""
    if not path.is_file():
        return
    try:
        old = RunConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8"))).to_dict()
    except (OSError, yaml.YAMLError, DeepmorphValueError) as error:
        raise DeepmorphIOError(f"{path}: cannot read the config of the run to resume ({error})") from error
    new = config.to_dict()
    changed = [key for key in new if key not in RESUMABLE_CHANGES and old.get(key) != new[key]]
    if changed:
        raise DeepmorphValueError(
            f"{path.parent}: the run to resume has another config ({', '.join(changed)} differ); "
            "use another output directory"
        )
