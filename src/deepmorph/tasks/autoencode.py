"""Autoencoding: reconstruct the (normalised) image through a low-dimensional latent code.

The objective of a VAE is the negative evidence lower bound with a weight on its KL term (a
beta-VAE, Higgins et al. 2017)::

    loss = recon + beta * w(t) * kl,

``recon`` the negative log-likelihood of the image given its decoded code, summed over pixels
(nats per image), under a Gaussian or a Laplace likelihood whose scale (one per channel, in
normalised units) is learned with the network unless fixed; ``kl`` the KL divergence of the
posterior from the prior ``N(0, I)``, summed over the latent dimensions (nats per image); and
``w(t)`` the linear KL warm-up (Bowman et al. 2016), rising from 0 at the start of training to 1
after ``kl_warmup`` epochs (:func:`kl_warmup_weight`; ``t`` in fractional epochs, so it rises
every step). An autoencoder's loss is ``recon`` alone.

Logged per epoch (Keras' names): ``loss``/``val_loss``, ``recon``/``val_recon``, ``kl``/``val_kl``,
``mse``/``val_mse`` (mean squared error per pixel, normalised units) and ``kl_weight``. Training
decodes a sample of the posterior and weighs the KL term with ``w(t)``; validation and testing
decode the posterior mean and weigh it with the full ``beta``, so ``val_loss`` measures one fixed
objective from the first epoch on (early stopping is not fooled by the warm-up).

With a pose-normalising model (``ConvVAE(align=True)``) the decoded image is compared with the
input rotated so that its major axis lies along +x (the image the encoder saw), so the code need
not hold the orientation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.vae import kl_divergence
from deepmorph.tasks.base import Task
from deepmorph.training.config import RunConfig

LIKELIHOODS = ("gaussian", "laplace")

#: Learned log-scales of the likelihood are kept within this range (normalised units, natural log).
LOG_SCALE_RANGE = (-7.0, 5.0)


def kl_warmup_weight(epoch: float, warmup_epochs: float) -> float:
    """Weight of the KL term after ``epoch`` (fractional) epochs of a linear warm-up.

    ``min(1, epoch / warmup_epochs)``: 0 at the start, 0.5 halfway, 1 from ``warmup_epochs`` on;
    always 1 without a warm-up (``warmup_epochs <= 0``).
    """
    if warmup_epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, epoch) / warmup_epochs))


def negative_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                            likelihood: str = "gaussian") -> torch.Tensor:
    """Negative log-likelihood of images under a per-pixel Gaussian or Laplace, summed per image.

    Parameters
    ----------
    x, mean : Tensor (B, C, H, W)
        Images and their decoded means (normalised units).
    log_scale : Tensor (C,) or scalar
        Natural log of the Gaussian sigma or the Laplace scale ``b`` of each channel.
    likelihood : {"gaussian", "laplace"}
        ``gaussian``: ``0.5 ((x - m) / s)^2 + log s + 0.5 log 2 pi``; ``laplace``:
        ``|x - m| / b + log 2b``.

    Returns
    -------
    Tensor (B,)
        Nats per image.
    """
    log_scale = torch.as_tensor(log_scale, dtype=x.dtype, device=x.device)
    if log_scale.ndim == 1:
        log_scale = log_scale[:, None, None]  # (C, 1, 1)
    inv = torch.exp(-log_scale)
    if likelihood == "gaussian":
        nll = 0.5 * ((x - mean) * inv) ** 2 + log_scale + 0.5 * math.log(2.0 * math.pi)
    elif likelihood == "laplace":
        nll = (x - mean).abs() * inv + log_scale + math.log(2.0)
    else:
        raise DeepmorphValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    return nll.flatten(1).sum(dim=1)


class AutoencodeTask(Task):
    """Train an autoencoder or a VAE (:class:`deepmorph.models.ConvVAE`) to reconstruct its input.

    Parameters
    ----------
    model : nn.Module
        With ``encode(x) -> (mu, logvar)`` (``logvar`` None for an autoencoder),
        ``reparameterize(mu, logvar)``, ``decode(z)``, ``in_channels`` and ``variational``.
    config : RunConfig
        The run's options.
    likelihood : {"gaussian", "laplace"}
        Per-pixel likelihood of the normalised image given the decoded one.
    beta : float
        Weight of the KL term (1: the ELBO; < 1 favours reconstruction, > 1 a disentangled,
        smoother latent). Ignored for an autoencoder.
    kl_warmup : float
        Epochs over which the KL weight rises linearly from 0 to ``beta`` (0: no warm-up).
    scale : float, optional
        Fixed likelihood scale (Gaussian sigma or Laplace ``b``), normalised units; default:
        learned, one per channel (starting at 1, the sky noise of an ``asinh``-normalised image).
    augmentation : callable, optional
        Batched training augmentation (flips and right-angle rotations suit galaxies).
    """

    def __init__(self, model: nn.Module, config: RunConfig, likelihood: str = "gaussian", beta: float = 1.0,
                 kl_warmup: float = 0.0, scale: float | None = None, augmentation: Callable | None = None):
        if likelihood not in LIKELIHOODS:
            raise DeepmorphValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        if not (math.isfinite(beta) and beta >= 0):
            raise DeepmorphValueError(f"beta must be a number >= 0, got {beta}")
        if not (math.isfinite(kl_warmup) and kl_warmup >= 0):
            raise DeepmorphValueError(f"kl_warmup must be a number of epochs >= 0, got {kl_warmup}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise DeepmorphValueError(f"the likelihood scale must be positive, got {scale}")
        for name in ("encode", "decode", "reparameterize"):
            if not callable(getattr(model, name, None)):
                raise DeepmorphValueError(f"AutoencodeTask: the model has no {name}() (use 'vae' or 'ae')")
        super().__init__(model, config, augmentation, hparams={
            "likelihood": likelihood, "beta": float(beta), "kl_warmup": float(kl_warmup), "scale": scale})
        self.likelihood = likelihood
        self.beta = float(beta)
        self.kl_warmup = float(kl_warmup)
        self.variational = bool(getattr(model, "variational", True))
        channels = int(model.in_channels)
        if scale is None:
            self.log_scale = nn.Parameter(torch.zeros(channels))
        else:
            self.register_buffer("log_scale", torch.full((channels,), math.log(scale)))

    def current_log_scale(self) -> torch.Tensor:
        """The likelihood's log-scale per channel (C,), clamped to :data:`LOG_SCALE_RANGE`."""
        return self.log_scale.clamp(*LOG_SCALE_RANGE)

    def kl_weight(self, batch_idx: int = 0) -> float:
        """The warm-up weight ``w(t)`` at this training step (t in fractional epochs)."""
        if self.kl_warmup <= 0:
            return 1.0
        try:
            per_epoch = max(1, int(self.trainer.num_training_batches))
            epoch = self.current_epoch + batch_idx / per_epoch
        except (RuntimeError, TypeError, ValueError, OverflowError, AttributeError):  # no trainer attached
            epoch = float(self.current_epoch)
        return kl_warmup_weight(epoch, self.kl_warmup)

    def terms(self, images: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        """Per-image ``recon`` and ``kl`` (B,), the decoded ``mean`` and the ``target`` it is compared
        with (B, C, H, W: the images, or their pose-normalised versions) of normalised images."""
        mu, logvar = self.model.encode(images)
        z = self.model.reparameterize(mu, logvar) if (sample and logvar is not None) else mu
        decoded = self.model.decode(z)
        images = self.reconstruction_target(images)
        recon = negative_log_likelihood(images, decoded, self.current_log_scale(), self.likelihood)
        kl = kl_divergence(mu, logvar) if logvar is not None else torch.zeros_like(recon)
        return {"recon": recon, "kl": kl, "mean": decoded, "target": images}

    def reconstruction_target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder must reproduce: the images, pose-normalised when the model aligns them
        (``model.pose_normalize``, :class:`~deepmorph.models.ConvVAE` with ``align=True``)."""
        align = getattr(self.model, "pose_normalize", None)
        return align(images) if callable(align) and getattr(self.model, "align", False) else images

    def shared_step(self, batch: dict, stage: str, batch_idx: int = 0) -> torch.Tensor:
        images = batch["image"]
        t = self.terms(images, sample=stage == "train")
        weight = self.kl_weight(batch_idx) if stage == "train" else 1.0
        recon, kl = t["recon"].mean(), t["kl"].mean()
        loss = recon + (self.beta * weight * kl if self.variational else 0.0)
        n = len(images)
        self.log_epoch("loss", loss, stage, n)
        self.log_epoch("recon", recon.detach(), stage, n)
        self.log_epoch("kl", kl.detach(), stage, n)
        self.log_epoch("mse", ((t["mean"].detach() - t["target"]) ** 2).mean(), stage, n)
        if stage == "train":
            self.log("kl_weight", weight, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.shared_step(self.augment(batch), "train", batch_idx)

    def predict_step(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior means and log-variances (B, K) (log-variances None for an autoencoder)."""
        return self.model.encode(batch["image"])
