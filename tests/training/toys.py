"""Tiny in-memory data for the training tests: items are dicts, as deepmorph.data's datasets make them."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from deepmorph.tasks import Task
from deepmorph.training import RunConfig


class DictDataset(Dataset):
    """``{"image": (C, H, W) float32, "target": int64 scalar, "index": int}`` items from tensors."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i], "index": i}


def discs_and_bars(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy round Gaussian blobs (label 0) and elongated bars at random angles (label 1), (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    u = torch.rand(n, 5, generator=g)
    angle = math.pi * u[:, 0]
    major = torch.where(labels == 1, 3.0 + u[:, 1], 1.5 + u[:, 1])  # sigma along the major axis, pixels
    minor = torch.where(labels == 1, 0.8 + 0.2 * u[:, 2], major)
    centre = (size - 1) / 2 + 2 * (u[:, 3:5] - 0.5)  # (n, 2): x, y
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    dx, dy = x - centre[:, 0, None, None], y - centre[:, 1, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along, across = c * dx + s * dy, -s * dx + c * dy
    images = torch.exp(-0.5 * ((along / major[:, None, None]) ** 2 + (across / minor[:, None, None]) ** 2))
    images = images + 0.1 * torch.randn(images.shape, generator=g)
    images = (images - 0.09) / 0.22  # about zero mean, unit variance, as a normalised dataset
    return images[:, None].float(), labels


def loaders(n_train: int = 256, n_val: int = 128, size: int = 16, batch_size: int = 32, seed: int = 0):
    """Shuffled training and ordered validation DataLoaders of :func:`discs_and_bars`."""
    train = DictDataset(*discs_and_bars(n_train, size, seed))
    val = DictDataset(*discs_and_bars(n_val, size, seed + 1))
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(val, batch_size=batch_size))


class ScriptedTask(Task):
    """A linear regression whose ``val_loss`` (or another metric) is read from a script, one value per epoch.

    The weights change every epoch (plain training on random data), so the weights of each epoch
    can be told apart.
    """

    def __init__(self, config: RunConfig, script, metric: str = "val_loss"):
        torch.manual_seed(0)
        super().__init__(torch.nn.Linear(4, 1), config)
        self.script, self.metric = list(script), metric

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.model(batch["image"]).squeeze(1), batch["target"])
        if stage == "train":
            self.log_epoch("loss", loss, stage, len(loss.reshape(-1)))
        else:
            self.log(self.metric, float(self.script[self.current_epoch]), on_epoch=True, batch_size=1)
        return loss


def regression_loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(DictDataset(x, x.sum(1) + 1.0), batch_size=batch_size)
