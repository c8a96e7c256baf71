"""Per-pixel detection: a network's logit maps, binary cross-entropy against masks (e.g. clumps)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryF1Score

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.base import PREFIXES, Task
from deepmorph.training.config import RunConfig


class SegmentTask(Task):
    """Learn a per-pixel probability map from masks: BCE with logits, pixel F1 as ``f1``/``val_f1``.

    Parameters
    ----------
    model : nn.Module
        Maps (B, C, H, W) images to (B, 1, H, W) logits (a :class:`~deepmorph.models.UNet`).
    config : RunConfig
        The run's options.
    mask : str
        The batch entry holding the (B, 1, H, W) target in [0, 1]: a 0/1 mask (a
        :class:`~deepmorph.data.StampDataset` mask array, e.g. ``"clump_mask"``) or a soft "heat
        map" (the F1 score counts target pixels >= 0.5 as positive).
    pos_weight : float
        Weight of the positive pixels in the loss: clumps cover ~1% of a stamp, and weighting them
        up keeps the network from predicting "no clump" everywhere.
    augmentation : callable, optional
        Batched training augmentation; the mask gets the same transform (nearest neighbour).
    """

    def __init__(self, model: nn.Module, config: RunConfig, mask: str = "clump_mask", pos_weight: float = 1.0,
                 augmentation: Callable | None = None):
        if not pos_weight > 0:
            raise DeepmorphValueError(f"SegmentTask: pos_weight must be positive, got {pos_weight}")
        super().__init__(model, config, augmentation, hparams={"mask": mask, "pos_weight": float(pos_weight)})
        self.mask = mask
        self.register_buffer("pos_weight", torch.tensor([float(pos_weight)]))
        self.f1 = nn.ModuleDict({f"{stage}_f1": BinaryF1Score() for stage in PREFIXES})

    def augment(self, batch: dict) -> dict:
        if self.augmentation is None:
            return batch
        images, masks, _ = self.augmentation(batch["image"], masks=batch[self.mask])
        return {**batch, "image": images, self.mask: masks}

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self.model(batch["image"])  # (B, 1, H, W)
        target = batch[self.mask].to(logits.dtype)  # (B, 1, H, W) in [0, 1]
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        f1 = self.f1[f"{stage}_f1"]
        f1.update(logits.detach().sigmoid().flatten(), (target.flatten() >= 0.5).long())
        self.log_epoch("loss", loss, stage, len(target))
        self.log_epoch("f1", f1, stage, len(target))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Probability maps, (B, 1, H, W)."""
        return torch.sigmoid(self.model(batch["image"]))
