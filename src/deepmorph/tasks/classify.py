"""Morphology classification: a model's logits, cross-entropy, accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.base import PREFIXES, Task
from deepmorph.training.config import RunConfig


class ClassifyTask(Task):
    """Classify images into ``num_classes`` classes: softmax cross-entropy, accuracy as ``acc``/``val_acc``.

    Parameters
    ----------
    model : nn.Module
        Maps (B, C, H, W) images to (B, num_classes) logits.
    config : RunConfig
        The run's options.
    num_classes : int
        Number of classes; targets are integers in ``[0, num_classes)``.
    label_names : sequence of str, optional
        Class names (saved in checkpoints for prediction tables), default ``"0", "1", ...``.
    augmentation : callable, optional
        Batched training augmentation (see :class:`~deepmorph.tasks.base.Task`).
    class_weights : sequence of float, optional
        Weight of each class in the loss (e.g. inverse frequencies for unbalanced classes).
    """

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        augmentation: Callable | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        if num_classes < 2:
            raise DeepmorphValueError(f"ClassifyTask: need at least 2 classes, got {num_classes}")
        label_names = [str(i) for i in range(num_classes)] if label_names is None else [str(n) for n in label_names]
        if len(label_names) != num_classes:
            raise DeepmorphValueError(f"ClassifyTask: {len(label_names)} label names for {num_classes} classes")
        if class_weights is not None and len(class_weights) != num_classes:
            raise DeepmorphValueError(f"ClassifyTask: {len(class_weights)} class weights for {num_classes} classes")
        super().__init__(model, config, augmentation,
                         hparams={"num_classes": num_classes, "label_names": label_names})
        self.num_classes = num_classes
        self.label_names = label_names
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)
        # One accuracy per stage ("train" cannot be a key: it is a Module method); torchmetrics
        # accumulates over the epoch and Lightning resets it.
        self.accuracy = nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")
                                       for stage in PREFIXES})

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self.model(batch["image"])  # (B, num_classes)
        target = batch["target"]  # (B,) int64
        loss = F.cross_entropy(logits, target, weight=self.class_weights)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy.update(logits, target)
        self.log_epoch("loss", loss, stage, len(target))
        self.log_epoch("acc", accuracy, stage, len(target))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Class probabilities, (B, num_classes)."""
        return torch.softmax(self.model(batch["image"]), dim=-1)
