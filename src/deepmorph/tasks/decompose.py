"""Image-to-image regression of galaxy components: the bulge and disk images from the observed galaxy.

The lecture's "DeepLegato_2c" (after DeepLeGATo, Tuccillo et al. 2018): a U-Net with two output
channels predicts the noise-free, PSF-convolved bulge and disk images. Fluxes differ by orders of
magnitude between galaxies, so each image is divided by its own brightness scale
(:func:`peak_scale`) before the network sees it, and the network's outputs are multiplied back:
the predicted components are in the input's units (counts), and the bulge-to-total ratio follows
from their sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanSquaredError

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.base import PREFIXES, Task
from deepmorph.training.config import RunConfig


def peak_scale(images: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Brightness scale of each image: the brightest 3 x 3 mean of its first channel, (B, 1, 1, 1).

    A smoothed peak is positive for any detected galaxy and, unlike the pixel sum, barely changes
    with the noise; ``floor`` (image units) keeps it positive for empty stamps.
    """
    smooth = F.avg_pool2d(images[:, :1], 3, stride=1, padding=1, count_include_pad=False)
    return smooth.amax(dim=(-3, -2, -1), keepdim=True).clamp_min(floor)


def bulge_to_total(components: torch.Tensor) -> torch.Tensor:
    """B/T of (B, 2, H, W) bulge and disk images from their pixel sums (negative sums count as 0)."""
    flux = components.sum(dim=(-2, -1)).clamp_min(0)  # (B, 2)
    return flux[:, 0] / flux.sum(dim=1).clamp_min(torch.finfo(flux.dtype).tiny)


class Decomposer(nn.Module):
    """A network wrapped with the per-image scaling: counts in, component images in counts out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) counts -> (B, K, H, W) component images, counts."""
        scale = peak_scale(images)
        return self.model(images / scale) * scale


class DecomposeTask(Task):
    """Predict component images (bulge, disk): scaled pixel MSE plus flux terms; ``bt_rmse``/``val_bt_rmse``.

    Parameters
    ----------
    model : nn.Module
        Maps (B, C, H, W) scaled images to (B, len(components), H, W) scaled components.
    config : RunConfig
        The run's options (the dataset's normalisation must be ``none``: scaling happens here).
    components : sequence of str
        Batch entries holding the (B, 1, H, W) target images in counts, in output-channel order.
    flux_weight : float
        Weight of the flux terms in the loss (0: pixels only): the squared error of each
        component's flux as a fraction of the galaxy's, plus (with two components) the squared
        B/T error. The pixel loss is dominated by bright cores and barely sees a small offset
        spread over the whole stamp; the flux terms ask for the right totals and the right split.
    augmentation : callable, optional
        Batched training augmentation, applied alike to the image and the targets (use flips or
        right-angle rotations: they move pixels without interpolating them).
    """

    def __init__(self, model: nn.Module, config: RunConfig, components: Sequence[str] = ("bulge", "disk"),
                 flux_weight: float = 1.0, augmentation: Callable | None = None):
        components = tuple(components)
        if not components:
            raise DeepmorphValueError("DecomposeTask: need at least one component")
        if flux_weight < 0:
            raise DeepmorphValueError(f"DecomposeTask: flux_weight must be >= 0, got {flux_weight}")
        super().__init__(model, config, augmentation,
                         hparams={"components": list(components), "flux_weight": float(flux_weight)})
        self.components = components
        self.flux_weight = float(flux_weight)
        self.decomposer = Decomposer(model)
        self.bt_rmse = nn.ModuleDict({f"{stage}_bt": MeanSquaredError(squared=False) for stage in PREFIXES})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Component images in counts, (B, K, H, W)."""
        return self.decomposer(images)

    def augment(self, batch: dict) -> dict:
        if self.augmentation is None:
            return batch
        c = batch["image"].shape[1]
        stacked = torch.cat([batch["image"], *(batch[k] for k in self.components)], dim=1)
        out, _, _ = self.augmentation(stacked)
        parts = {k: out[:, c + i:c + i + 1] for i, k in enumerate(self.components)}
        return {**batch, "image": out[:, :c], **parts}

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        images = batch["image"]
        scale = peak_scale(images)
        pred = self.model(images / scale)  # (B, K, H, W), in units of the scale
        target = torch.cat([batch[k] for k in self.components], dim=1) / scale
        loss = F.mse_loss(pred, target)
        flux_pred, flux_true = pred.sum(dim=(-2, -1)), target.sum(dim=(-2, -1))  # (B, K), scale units
        total = flux_true.sum(dim=1, keepdim=True).clamp_min(1e-6)
        loss = loss + self.flux_weight * (((flux_pred - flux_true) / total) ** 2).sum(dim=1).mean()
        if len(self.components) == 2:
            bt_pred, bt_true = bulge_to_total(pred), bulge_to_total(target)
            loss = loss + self.flux_weight * F.mse_loss(bt_pred, bt_true)
            rmse = self.bt_rmse[f"{stage}_bt"]
            rmse.update(bt_pred.detach(), bt_true)
            self.log_epoch("bt_rmse", rmse, stage, len(images))
        self.log_epoch("loss", loss, stage, len(images))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Component images in counts, (B, K, H, W)."""
        return self.decomposer(batch["image"])
