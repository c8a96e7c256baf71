"""Instance detection: a Mask R-CNN's losses, and its average precision on the validation fields.

Batches are dicts made by :func:`collate_fields`: ``image`` (B, C, H, W) normalised images (or a
list of (C, H, W) tensors of different sizes), ``targets`` a list of B dicts with ``boxes`` (N, 4)
float32 ``x0, y0, x1, y1`` pixel corners, ``labels`` (N,) int64 in ``1..num_classes`` and
``masks`` (N, H, W) uint8, and ``index`` (B,).

Training sums torchvision's five losses (RPN objectness and box regression; box classifier, box
regression and mask BCE of the RoI heads) and logs each under its name (``loss_mask``,
``val_loss_mask``, ...). torchvision computes losses only in training mode, so validation runs
the model twice per batch: in training mode with batch norm frozen to its running statistics
(``val_loss``; the random proposal sampling of that pass uses a forked random state, so training
draws the same numbers with or without validation) and in eval mode for the detections, scored
by COCO average precision at IoU 0.5, class-agnostic, over every true object (``val_ap50`` for
boxes, ``val_mask_ap50`` for masks; torchmetrics' ``MeanAveragePrecision`` with the
faster-coco-eval backend) every ``map_every`` epochs (classification is scored on held-out fields by
:func:`deepmorph.measure.detection.detection_scores`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.base import PREFIXES, Task
from deepmorph.training.config import RunConfig

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def collate_fields(items: list[dict]) -> dict:
    """Batch field items (``image``, ``boxes``, ``labels``, ``masks``, ``index``) for :class:`DetectTask`."""
    images = [item["image"] for item in items]
    same = all(im.shape == images[0].shape for im in images)
    return {
        "image": torch.stack(images) if same else images,
        "targets": [{"boxes": it["boxes"], "labels": it["labels"], "masks": it["masks"]} for it in items],
        "index": torch.as_tensor([int(it.get("index", i)) for i, it in enumerate(items)]),
    }


def dihedral(image: torch.Tensor, target: dict, k: int, flip: bool) -> tuple[torch.Tensor, dict]:
    """Rotate an image (C, H, W) and its target by ``k`` quarter turns, after an optional left-right flip.

    Boxes are pixel-corner coordinates ``x0, y0, x1, y1`` (a pixel spans ``[i, i + 1)``), masks
    (N, H, W); both move exactly with the pixels, as :func:`torch.rot90` on dims (-2, -1) moves them.
    """
    boxes = target["boxes"].clone()
    masks = target["masks"]
    h, w = image.shape[-2:]
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    for _ in range(int(k) % 4):
        # rot90: pixel (y, x) goes to (w - 1 - x, y); corners: x' = y, y' = w - x; the shape becomes (w, h)
        image, masks = torch.rot90(image, 1, (-2, -1)), torch.rot90(masks, 1, (-2, -1))
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
        h, w = w, h
    return image.contiguous(), {**target, "boxes": boxes, "masks": masks.contiguous()}


class DetectTask(Task):
    """Train a Mask R-CNN (:func:`deepmorph.models.maskrcnn.maskrcnn`) on fields with instance masks.

    Parameters
    ----------
    model : GalaxyMaskRCNN
        The detector.
    config : RunConfig
        The run's options (optimiser, schedule, ...). ``config.augmentation``: ``"dihedral"`` flips
        each training field and turns it by a random multiple of 90 degrees (boxes and masks with
        it: the sky has no preferred orientation), ``"flips"`` only flips it, None/``"none"``.
    map_every : int
        Compute the validation average precision every this many epochs (and at the last one).
    class_names : sequence of str, optional
        Names of labels ``1..num_classes``, saved with the checkpoints.
    """

    def __init__(self, model: nn.Module, config: RunConfig, map_every: int = 1, class_names=None):
        if isinstance(map_every, bool) or not isinstance(map_every, int) or map_every < 1:
            raise DeepmorphValueError(f"DetectTask: map_every must be a positive integer, got {map_every!r}")
        super().__init__(model, config, None, hparams={"map_every": map_every,
                                                       "class_names": list(class_names or [])})
        from torchmetrics.detection import MeanAveragePrecision

        self.map_every = map_every
        if config.augmentation not in (None, "none", "flips", "dihedral"):
            raise DeepmorphValueError(f"augmentation {config.augmentation!r}: a detector takes none, flips or dihedral "
                                      "(boxes and masks move with the image)")
        self.quarter_turns = config.augmentation == "dihedral"
        self.flips = config.augmentation in ("flips", "dihedral")
        # a child module: with several processes (DDP) its state is gathered from all before computing
        self.ap = MeanAveragePrecision(iou_type=("bbox", "segm"), iou_thresholds=[0.5], backend="faster_coco_eval",
                                       max_detection_thresholds=[1, 10, 300])

    def forward(self, images) -> list[dict]:
        """Detections of (B, C, H, W) normalised images (eval mode): one dict per image."""
        return self.model(list(images))

    # -- training -------------------------------------------------------------------------------
    def augment(self, batch: dict) -> dict:
        """Random flips (``flips``: left-right, up-down) or any of the 8 orientations of the pixel grid
        (``dihedral``), drawn from the global random state (seeded and checkpointed by ``fit``)."""
        if not self.flips:
            return batch
        images, targets = [], []
        for image, target in zip(batch["image"], batch["targets"], strict=True):
            k = int(torch.randint(4, (1,))) if self.quarter_turns else 2 * int(torch.randint(2, (1,)))
            flip = bool(torch.rand(1) < 0.5)
            image, target = dihedral(image, target, k, flip)
            images.append(image)
            targets.append(target)
        same = all(im.shape == images[0].shape for im in images)
        return {**batch, "image": torch.stack(images) if same else images, "targets": targets}

    def _log_losses(self, losses: dict, stage: str, n: int) -> torch.Tensor:
        total = sum(losses.values())
        self.log_epoch("loss", total.detach() if stage != "train" else total, stage, n)
        for name, value in losses.items():
            self.log_epoch(name, value.detach(), stage, n)
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = self.augment(batch)
        losses = self.model(list(batch["image"]), batch["targets"])
        total = self._log_losses(losses, "train", len(batch["targets"]))
        if not torch.isfinite(total):
            raise DeepmorphValueError("Mask R-CNN training diverged (non-finite loss); lower the learning rate "
                                      "or set gradient_clip")
        return total

    # -- validation -----------------------------------------------------------------------------
    def _losses_without_training(self, images, targets) -> dict:
        """torchvision's losses (it computes them in training mode only), batch norm kept frozen and
        the random proposal sampling drawn from a forked random state."""
        was_training = self.model.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.model.train()
            for module in self.model.modules():
                if isinstance(module, _BATCHNORMS):
                    module.eval()
            try:
                return self.model(list(images), targets)
            finally:
                self.model.train(was_training)

    def _map_due(self) -> bool:
        if self.trainer is None or self.trainer.sanity_checking:
            return False
        epoch = self.current_epoch
        return (epoch + 1) % self.map_every == 0 or epoch + 1 >= (self.trainer.max_epochs or 0)

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        images, targets = batch["image"], batch["targets"]
        loss = self._log_losses(self._losses_without_training(images, targets), stage, len(targets))
        if stage == "test" or (stage == "val" and self._map_due()):
            self.model.eval()
            preds = self.model(list(images))
            self.ap.update(*map_inputs(preds, targets))
        return loss

    def _log_map(self, stage: str) -> None:
        """Log ``ap50`` and ``mask_ap50`` of the epoch: NaN at epochs without them (``map_every``), so
        that the history never repeats an old value."""
        if self.trainer is not None and self.trainer.sanity_checking:
            self.ap.reset()
            return
        values = {"ap50": math.nan, "mask_ap50": math.nan}
        if self.ap._update_count:
            result = self.ap.compute()
            self.ap.reset()
            for key, name in (("bbox_map", "ap50"), ("segm_map", "mask_ap50")):
                value = float(result[key])
                values[name] = value if value >= 0 else math.nan  # -1: no true object at all
        for name, value in values.items():
            self.log(PREFIXES[stage] + name, value, on_epoch=True, prog_bar=True, batch_size=1)

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_map("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        self.model.eval()
        return self.model(list(batch["image"]))


def map_inputs(preds: list[dict], targets: list[dict], mask_threshold: float = 0.5,
               class_agnostic: bool = True) -> tuple[list, list]:
    """Detections and truth as torchmetrics' ``MeanAveragePrecision`` takes them (boolean masks).

    ``class_agnostic``: every label set to 1, so that AP scores finding and outlining objects, and
    classification is scored apart (the detector's score is the probability of being an object).
    """
    def labels(x):
        x = x.detach().cpu()
        return torch.ones_like(x) if class_agnostic else x

    p = [{"boxes": d["boxes"].detach().cpu(), "scores": d["scores"].detach().cpu(), "labels": labels(d["labels"]),
          "masks": ((d["masks"][:, 0] > mask_threshold) if d["masks"].ndim == 4 else d["masks"].bool()).cpu()}
         for d in preds]
    t = [{"boxes": g["boxes"].cpu(), "labels": labels(g["labels"]), "masks": g["masks"].bool().cpu()} for g in targets]
    return p, t


__all__ = ["DetectTask", "collate_fields", "dihedral", "map_inputs"]
