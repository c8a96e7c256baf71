"""The base of every task: a model, a run config, and the training loop's plumbing.

A task is a thin :class:`lightning.LightningModule` (Zoobot's habit): it holds ``model`` (a plain
``nn.Module`` from :mod:`deepmorph.models`) and the :class:`~deepmorph.training.RunConfig`, builds
the optimiser and schedule from the config, augments training batches on their device, and logs
epoch metrics under Keras' names: ``loss``/``val_loss``, each metric as ``name``/``val_name``,
and ``lr``. A subclass implements :meth:`Task.shared_step`.

Batches are dicts, as the default collate makes them from :mod:`deepmorph.data` items:
``{"image": (B, C, H, W) float32, "target": (B, ...) , "index": (B,)}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from deepmorph.errors import DeepmorphValueError
from deepmorph.training.config import RunConfig
from deepmorph.training.schedules import make_optimizer, make_scheduler

#: Logged-name prefix of each stage: training metrics have bare names (Keras').
PREFIXES = {"train": "", "val": "val_", "test": "test_"}


class Task(L.LightningModule):
    """Base task: holds the model and config, optimises, augments and logs.

    Parameters
    ----------
    model : nn.Module
        The network, available as ``self.model`` (its weights are the task's ``model.*`` entries).
    config : RunConfig
        The run's options; ``optimizer`` and ``schedule`` are used here.
    augmentation : callable, optional
        Batched augmentation ``(images, masks=None, pa_deg=None, generator=None) -> (images,
        masks, pa_deg)`` (``deepmorph.data.augment.Augmentation``), applied to training batches
        only, on the device where the batch is.
    hparams : mapping, optional
        Extra hyper-parameters to save in checkpoints next to the config (e.g. class names).
    """

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        augmentation: Callable | None = None,
        hparams: Mapping | None = None,
    ):
        super().__init__()
        self.model = model
        self.config = config
        self.augmentation = augmentation
        self.save_hyperparameters({"config": config.to_dict(), **(hparams or {})})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output for (B, C, H, W) images."""
        return self.model(images)

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        """Loss of ``batch`` for ``stage`` ("train", "val" or "test"), logging metrics (override)."""
        raise NotImplementedError

    def augment(self, batch: dict) -> dict:
        """The training batch after augmentation (tasks whose targets move with the image override this)."""
        if self.augmentation is None:
            return batch
        images, _, _ = self.augmentation(batch["image"])
        return {**batch, "image": images}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.shared_step(self.augment(batch), "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def log_epoch(self, name: str, value, stage: str, batch_size: int) -> None:
        """Log ``value`` (a tensor or a torchmetrics Metric) once per epoch as ``<prefix>name``.

        With several processes (DDP) the epoch value is the same in all of them: a tensor's
        batch-weighted epoch mean is averaged over the processes (``sync_dist``; the mean over all
        items when the processes see equally many, as Lightning's sampler arranges), and a Metric
        gathers its state from every process before computing.
        """
        self.log(PREFIXES[stage] + name, value, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=isinstance(value, torch.Tensor))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # channels_last: the images in the layout of the weights (fit converts those)
        if self.config.channels_last and isinstance(batch, dict):
            image = batch.get("image")
            if isinstance(image, torch.Tensor) and image.dim() == 4:
                batch = {**batch, "image": image.contiguous(memory_format=torch.channels_last)}
        return batch

    def on_train_epoch_start(self) -> None:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("lr", lr, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        # Step reduce-on-plateau here rather than where Lightning does (after the end-of-epoch
        # checkpoint, a step a resumed run would miss): last.ckpt then holds the stepped state.
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ReduceLROnPlateau):
                if config.monitor not in self.trainer.callback_metrics:
                    raise DeepmorphValueError(f"reduce-on-plateau monitors {config.monitor!r}, which is not logged")
                config.scheduler.step(float(self.trainer.callback_metrics[config.monitor]))

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not isinstance(scheduler, ReduceLROnPlateau):  # plateau: stepped in on_train_epoch_end
            scheduler.step()

    def configure_optimizers(self):
        """Optimiser over the trainable parameters (frozen ones left out) and the per-epoch schedule."""
        opt = self.config.optimizer
        optimizer = make_optimizer(
            [p for p in self.parameters() if p.requires_grad],
            opt.name, opt.lr, opt.weight_decay, opt.momentum, opt.nesterov,
        )
        sched = self.config.schedule
        scheduler = make_scheduler(
            optimizer, sched.kind, step_size=sched.step_size, gamma=sched.gamma, decay_rate=sched.decay_rate,
            t_max=sched.t_max, eta_min=sched.eta_min, factor=sched.factor, patience=sched.patience,
            min_lr=sched.min_lr, epochs=self.config.epochs,
        )
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}
