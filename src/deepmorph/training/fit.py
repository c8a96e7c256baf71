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

Several processes (``config.devices``, ``num_nodes``, ``strategy``) train with Lightning's DDP:
each process reads its share of every epoch, gradients are averaged, the logged metrics of
:class:`deepmorph.tasks.Task` are averaged over the processes, and early stopping follows global
rank 0's value of its metric, so that every process stops at the same epoch. Only global rank 0
writes the run's files. With ``ddp_spawn``/``ddp_fork`` the calling process only waits: it gets
the trained weights (the best epoch's with early stopping) and reads the history rank 0 wrote.
With ``ddp`` every process runs the caller's code, before and after ``fit`` (code that writes
files there should do it where :func:`is_rank_zero`). A run may be resumed
with another number of processes (or precision): it continues from the same checkpoint, but bit
for bit reproduction needs the same number.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.training._io import write_atomic, write_text_atomic
from deepmorph.training.callbacks import EarlyStopping, RandomStateCallback
from deepmorph.training.config import RunConfig
from deepmorph.training.history import History, HistoryCallback

#: Config keys that may change when a run is resumed: how long it runs, and where and how fast it is
#: computed (a run may continue on other hardware, with more or fewer processes).
RESUMABLE_CHANGES = ("epochs", "num_workers", "progress_bar", "accelerator", "devices", "num_nodes", "strategy",
                     "precision", "channels_last", "sync_batchnorm")


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
        Extra Lightning callbacks (e.g. an Optuna pruning callback). With ``ddp_spawn``/``ddp_fork``
        they run in the training processes: what they change there stays there.

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
    # With a launcher that starts every process (ddp, torchrun, srun), each one runs this: only
    # rank 0 touches the directory before training.
    first = is_rank_zero()
    if resuming:
        try:
            _check_resumable(out_dir / "config.yaml", config)
        except DeepmorphValueError as error:
            if not _RESTART_CHANGED.get():
                raise
            previous = out_dir / "checkpoints.previous"
            if first:
                shutil.rmtree(previous, ignore_errors=True)
                (out_dir / "checkpoints").rename(previous)
                logger.warning("%s; starting afresh, the old checkpoints are in %s", error, previous)
            resuming = False
    if first:
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
    # has updated its state for the epoch: last.ckpt is then a clean point to resume from. Two
    # callbacks, because Lightning's ``save_last=True`` writes last.ckpt only at epochs that also
    # write a best checkpoint: a run whose monitored value stopped improving would resume from its
    # best epoch instead of its last.
    best = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="best", monitor=stopping.monitor, mode=stopping.mode,
        save_top_k=1, save_last=False, save_on_train_epoch_end=True, enable_version_counter=False,
    )
    latest = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, save_last=False,
        save_on_train_epoch_end=True, enable_version_counter=False,
    )
    # The run's files once training ends (after early stopping restored the best weights), written
    # by global rank 0 in whichever process trained it.
    files = RunFilesCallback(out_dir, history, early)
    steps = _length(train_loader) // (config.processes or 1)  # each process takes its share of the batches
    trainer = _trainer(config, out_dir, [*run_callbacks, *callbacks, files, best, latest], steps)
    if config.channels_last:
        task.to(memory_format=torch.channels_last)  # 4-D weights; Task moves its input batches
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")  # as it should
        trainer.fit(task, datamodule=_RunData(train_loader, val_loader), ckpt_path=last if resuming else None)
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return History.load(out_dir)  # trained in child processes: this one has the weights and the files
    return history.history


class RunFilesCallback(L.Callback):
    """Write the finished run's files (history, learning curves, ``model.pt``, ``summary.json``) on global rank 0.

    Parameters
    ----------
    out_dir : path
        The run directory.
    history : HistoryCallback
        Whose history is saved.
    early : EarlyStopping, optional
        Whose best and stopped epochs go into the summary.
    """

    def __init__(self, out_dir: str | Path, history: HistoryCallback, early: EarlyStopping | None):
        self.out_dir, self.history, self.early = Path(out_dir), history, early

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out_dir, result = self.out_dir, self.history.history
        result.save(out_dir)
        result.save_plot(out_dir / "learning_curves.png", title=out_dir.name)
        state = {key: value.detach().cpu() for key, value in _model_of(pl_module).state_dict().items()}
        write_atomic(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
        write_text_atomic(out_dir / "summary.json", json.dumps(_summary(result, self.early), indent=1) + "\n")


class _RunData(L.LightningDataModule):
    """The loaders of a run. With several processes Lightning gives each one a share of every epoch
    through a ``DistributedSampler``, shuffled for training whatever the loader did; here an
    unshuffled training loader (a plain sequential sampler) keeps its order: process ``r`` of ``W``
    takes items ``r, r + W, ...``, so that together they see each batch of the single-process run.
    """

    def __init__(self, train: DataLoader, val: DataLoader):
        super().__init__()
        self.train, self.val = train, val

    def train_dataloader(self):
        loader, trainer = self.train, self.trainer
        in_order = (isinstance(loader, DataLoader) and type(loader.sampler) is SequentialSampler
                    and type(loader.batch_sampler) is BatchSampler and not isinstance(loader.dataset, IterableDataset))
        if trainer is None or trainer.world_size == 1 or not in_order:
            return loader
        sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=False)
        return _update_dataloader(loader, sampler, RunningStage.TRAINING)

    def val_dataloader(self):
        return self.val


def _trainer(config: RunConfig, out_dir: Path, callbacks: list[L.Callback], steps_per_epoch: int) -> L.Trainer:
    """The Lightning Trainer of a run; Lightning's refusals of the hardware options as one-line errors."""
    try:
        trainer = L.Trainer(
            max_epochs=config.epochs,
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=config.strategy,
            precision=config.precision,
            sync_batchnorm=config.sync_batchnorm,
            deterministic=config.deterministic,
            gradient_clip_val=config.gradient_clip,
            logger=TensorBoardLogger(out_dir, name="tb", version="", default_hp_metric=False),
            callbacks=callbacks,
            enable_progress_bar=config.progress_bar,
            enable_model_summary=config.progress_bar,
            log_every_n_steps=max(1, min(50, steps_per_epoch)),
            default_root_dir=out_dir,
        )
    except (ValueError, RuntimeError) as error:  # MisconfigurationException is a ValueError
        reason = " ".join(str(error).split())
        raise DeepmorphValueError(
            f"{out_dir}: cannot train with accelerator={config.accelerator!r}, devices={config.devices!r}, "
            f"num_nodes={config.num_nodes}, strategy={config.strategy!r}, precision={config.precision!r} "
            f"({reason})"
        ) from None
    if config.sync_batchnorm and trainer.world_size > 1 and trainer.accelerator.__class__.__name__ == "CPUAccelerator":
        raise DeepmorphValueError(f"{out_dir}: sync_batchnorm needs GPUs (torch's SyncBatchNorm has no CPU version)")
    return trainer


def is_rank_zero() -> bool:
    """Whether this process is the first (or only) one of a data-parallel command.

    With ``strategy="ddp"`` (or torchrun, srun) every process runs the whole command, the code
    around :func:`fit` included: files written before or after it should be written where this is
    True only. Known from what the launcher set, before Lightning starts: its own ``ddp`` launcher
    gives the processes it starts ``LOCAL_RANK`` (and ``NODE_RANK``), torchrun sets ``RANK``, SLURM
    ``SLURM_PROCID``; a process with none of them is the first. With ``ddp_spawn``/``ddp_fork`` the
    calling process is the first, and the only one that runs the command.
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "LOCAL_RANK" in os.environ:
        node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
        return int(os.environ["LOCAL_RANK"]) == 0 and int(node) == 0
    for key in ("SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return True


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
