"""Adversarial training (a GAN) and the f-AnoGAN encoder, as tasks trained by :func:`deepmorph.training.fit`.

:class:`AdversarialTask` trains a :class:`~deepmorph.models.gan.GAN` with Lightning's manual
optimisation, the lecture's alternating schedule: every training batch is one discriminator step,
and every ``d_steps``-th batch is also one generator step (k discriminator steps per generator
step). Two objectives:

- ``"bce"``: the original GAN loss with the non-saturating generator loss (Goodfellow et al. 2014);
  ``label_smoothing`` = s trains the discriminator towards ``1 - s`` on real images only
  (one-sided label smoothing, Salimans et al. 2016);
- ``"wgan-gp"``: the Wasserstein critic loss with a gradient penalty ``gp_weight * (|grad D(x_hat)| - 1)^2``
  on random interpolates of real and generated images (Gulrajani et al. 2017); use a discriminator
  without batch norm.

A :class:`~deepmorph.models.gan.GAN` built with ``noise_sigma > 0`` adds the survey's sky (and
Poisson) noise to its galaxies itself (``GAN.observe``): the discriminator sees generated galaxies
observed, and the transposed convolutions need not imitate white noise.

Optionally the generator also matches the mean discriminator features of the real batch
(``feature_matching``, Salimans et al. 2016). Logged once per epoch: ``d_loss``, ``g_loss``,
``d_real`` and ``d_fake`` (mean discriminator outputs), and on the validation split ``val_d_loss``,
``val_g_loss`` and ``val_loss`` (= ``val_d_loss``: the discriminator's loss on held-out real
images against fresh samples, which grows when it memorises the training set). A grid of samples
from fixed latents is written after every epoch to ``sample_dir/epoch_NNN.png``.

Images arrive normalised (:class:`~deepmorph.data.Normalization`) and are divided by
``data_scale`` and clipped to ``[-1, 1]``, the range of the generator's tanh.

:class:`EncoderTask` trains the encoder ``E`` of f-AnoGAN's izi_f architecture (Schlegl et al.
2019) with the generator and the discriminator frozen: ``x -> E -> z -> G -> x'`` with the loss
``mean (x - x')^2 + kappa * mean (f(x) - f(x'))^2``, ``f`` the discriminator's features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.base import Task

LOSSES = ("bce", "wgan-gp")


def to_unit(images: torch.Tensor, data_scale: float) -> torch.Tensor:
    """Normalised images -> the generator's range: ``clamp(x / data_scale, -1, 1)``."""
    return (images / data_scale).clamp(-1.0, 1.0)


def gradient_penalty(discriminator, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP's ``mean (|grad_x D(x_hat)|_2 - 1)^2`` on ``x_hat`` uniformly between real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator).to(real)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = discriminator(mixed)
    (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` images -> one ``(rows * (H + pad), ncol * (W + pad))`` mosaic of channel 0."""
    images = np.asarray(images)[:, 0]
    n, h, w = images.shape
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), np.nan, dtype=np.float32)
    for k in range(n):
        r, c = divmod(k, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[k]
    return grid


def save_grid(images: np.ndarray, path: str | Path, ncol: int = 8, vmin: float = -1.0, vmax: float = 1.0) -> Path:
    """Write a mosaic of ``(N, C, H, W)`` images as a grey-scale PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from deepmorph.training._io import write_atomic

    grid = image_grid(images, ncol)
    grid = np.where(np.isfinite(grid), grid, vmin)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: plt.imsave(tmp, grid, cmap="gray", vmin=vmin, vmax=vmax, format="png"))


def discriminator_step(task, optimizer, loss: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor,
                       n: int) -> None:
    """One discriminator update of a manual-optimisation task, logging ``d_loss``, ``d_real`` and ``d_fake``
    (mean discriminator outputs) for the epoch."""
    optimizer.zero_grad(set_to_none=True)
    task.manual_backward(loss)
    optimizer.step()
    task.log_epoch("d_loss", loss.detach(), "train", n)
    task.log_epoch("d_real", d_real.detach().mean(), "train", n)
    task.log_epoch("d_fake", d_fake.detach().mean(), "train", n)


class AdversarialTask(Task):
    """A DCGAN trained with manual optimisation (see the module docstring).

    Parameters
    ----------
    model : GAN
        The networks (``model.generator``, ``model.discriminator``).
    config : RunConfig
        ``optimizer.lr`` is the generator's learning rate; ``seed`` seeds the fixed sample latents.
    loss : {"bce", "wgan-gp"}
        The objective.
    d_steps : int
        Discriminator steps per generator step (k).
    label_smoothing : float
        One-sided label smoothing of real images (``bce`` only), in ``[0, 0.5)``.
    gp_weight : float
        Weight of the gradient penalty (``wgan-gp``).
    d_lr_scale : float
        The discriminator's learning rate is ``d_lr_scale * optimizer.lr``.
    betas : (float, float)
        Adam's betas (DCGAN's ``(0.5, 0.999)``; WGAN-GP's ``(0.0, 0.9)``).
    feature_matching : float
        Weight of the feature-matching term in the generator loss (0: none).
    data_scale : float
        Normalised images are divided by it (then clipped to ``[-1, 1]``).
    sample_dir : path, optional
        Where the per-epoch sample grids go (none when None).
    n_samples : int
        Samples in each grid.
    augmentation : callable, optional
        Batched augmentation of the real images (flips and right-angle rotations are safe).
    """

    def __init__(self, model, config, loss: str = "bce", d_steps: int = 1, label_smoothing: float = 0.0,
                 gp_weight: float = 10.0, d_lr_scale: float = 1.0, betas: tuple[float, float] = (0.5, 0.999),
                 feature_matching: float = 0.0, data_scale: float = 1.0, sample_dir: str | Path | None = None,
                 n_samples: int = 64, augmentation=None):
        if loss not in LOSSES:
            raise DeepmorphValueError(f"GAN loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if int(d_steps) != d_steps or d_steps < 1:
            raise DeepmorphValueError(f"d_steps (discriminator steps per generator step) must be >= 1, got {d_steps}")
        if not 0.0 <= label_smoothing < 0.5:
            raise DeepmorphValueError(f"label smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss == "wgan-gp" and getattr(model.discriminator, "norm", "none") == "batch":
            raise DeepmorphValueError("wgan-gp needs a discriminator without batch norm (d_norm 'layer' or 'none')")
        if not data_scale > 0:
            raise DeepmorphValueError(f"data_scale must be positive, got {data_scale}")
        super().__init__(model, config, augmentation, hparams={
            "loss": loss, "d_steps": int(d_steps), "label_smoothing": float(label_smoothing),
            "gp_weight": float(gp_weight), "d_lr_scale": float(d_lr_scale), "betas": list(betas),
            "feature_matching": float(feature_matching), "data_scale": float(data_scale)})
        self.automatic_optimization = False
        self.loss_kind, self.d_steps, self.label_smoothing = loss, int(d_steps), float(label_smoothing)
        self.gp_weight, self.d_lr_scale, self.betas = float(gp_weight), float(d_lr_scale), tuple(betas)
        self.feature_matching, self.data_scale = float(feature_matching), float(data_scale)
        self.sample_dir = Path(sample_dir) if sample_dir is not None else None
        gen = torch.Generator().manual_seed(int(config.seed) + 7919)
        self.register_buffer("fixed_z", torch.randn(int(n_samples), model.latent_dim, generator=gen), persistent=False)

    # -- losses ---------------------------------------------------------------------------------------
    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.model.discriminator
        d_real, d_fake = d(real)[:, 0], d(fake)[:, 0]  # separate batches: batch norm sees one kind at a time
        if self.loss_kind == "bce":
            target = torch.full_like(d_real, 1.0 - self.label_smoothing)
            loss = F.binary_cross_entropy_with_logits(d_real, target) + \
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        else:
            loss = d_fake.mean() - d_real.mean()
            if torch.is_grad_enabled():
                loss = loss + self.gp_weight * gradient_penalty(d, real, fake)
        return loss, d_real, d_fake

    def _g_loss(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        logits, feats = self.model.discriminator.logits_and_features(fake)
        if self.loss_kind == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        else:
            loss = -logits.mean()
        if self.feature_matching > 0 and real is not None:
            with torch.no_grad():
                real_feats = self.model.discriminator.features(real)
            loss = loss + self.feature_matching * ((feats.mean(0) - real_feats.mean(0)) ** 2).mean()
        return loss

    def _observe(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The generator's galaxies with the survey's noise, when the GAN adds it (``GAN.observe``)."""
        observe = getattr(self.model, "observe", None)
        return images if observe is None else observe(images, generator=generator)

    # -- the alternating schedule -----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_d, opt_g = self.optimizers()
        real = to_unit(self.augment(batch)["image"], self.data_scale)
        n = real.shape[0]
        gen = self.model.generator
        z = torch.randn(n, self.model.latent_dim, device=real.device)
        with torch.no_grad():
            fake = self._observe(gen(z))
        discriminator_step(self, opt_d, *self._d_loss(real, fake), n)
        if (batch_idx + 1) % self.d_steps == 0:
            self.model.discriminator.requires_grad_(False)
            z = torch.randn(n, self.model.latent_dim, device=real.device)
            g_loss = self._g_loss(self._observe(gen(z)), real)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()
            self.model.discriminator.requires_grad_(True)
            self.log_epoch("g_loss", g_loss.detach(), "train", n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        real = to_unit(batch["image"], self.data_scale)
        n = real.shape[0]
        gen = torch.Generator().manual_seed(int(self.config.seed) * 1000 + batch_idx)
        z = torch.randn(n, self.model.latent_dim, generator=gen).to(real.device)
        fake = self._observe(self.model.generator(z), gen)
        d_loss, _, _ = self._d_loss(real, fake)
        g_loss = self._g_loss(fake)
        self.log_epoch("d_loss", d_loss, "val", n)
        self.log_epoch("g_loss", g_loss, "val", n)
        self.log_epoch("loss", d_loss, "val", n)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        if self.sample_dir is None or not self.trainer.is_global_zero:
            return
        was_training = self.model.generator.training
        self.model.generator.eval()
        with torch.no_grad():
            samples = self.model.generator(self.fixed_z.to(self.device)).cpu().numpy()
        self.model.generator.train(was_training)
        save_grid(samples, self.sample_dir / f"epoch_{self.current_epoch:03d}.png")

    def configure_optimizers(self):
        """Adam for each network: the discriminator's first (``optimizers()[0]``), then the generator's."""
        lr, wd = self.config.optimizer.lr, self.config.optimizer.weight_decay
        opt_d = torch.optim.Adam(self.model.discriminator.parameters(), lr=lr * self.d_lr_scale, betas=self.betas,
                                 weight_decay=wd)
        opt_g = torch.optim.Adam(self.model.generator.parameters(), lr=lr, betas=self.betas, weight_decay=wd)
        return [opt_d, opt_g]


class EncoderTask(Task):
    """f-AnoGAN's izi_f encoder training: ``E`` learns ``x -> z`` with ``G`` and ``D`` frozen.

    Parameters
    ----------
    encoder : nn.Module
        ``(B, C, S, S) -> (B, latent_dim)``; the task's ``model`` (what ``model.pt`` holds).
    generator, discriminator : nn.Module
        The trained GAN's networks; frozen and kept in evaluation mode.
    config : RunConfig
        Optimiser, schedule, epochs...
    kappa : float
        Weight of the discriminator-feature residual.
    data_scale : float
        As :class:`AdversarialTask`'s.
    observe : callable, optional
        The GAN's noise model (``GAN.observe``) when it adds the noise itself.
    """

    def __init__(self, encoder, generator, discriminator, config, kappa: float = 1.0, data_scale: float = 1.0,
                 augmentation=None, observe=None):
        if not kappa >= 0:
            raise DeepmorphValueError(f"kappa must be non-negative, got {kappa}")
        super().__init__(encoder, config, augmentation, hparams={"kappa": float(kappa),
                                                                 "data_scale": float(data_scale)})
        self.generator = generator.requires_grad_(False).eval()
        self.discriminator = discriminator.requires_grad_(False).eval()
        self.kappa, self.data_scale = float(kappa), float(data_scale)
        self.observe = observe

    def train(self, mode: bool = True):
        super().train(mode)
        self.generator.eval()
        self.discriminator.eval()
        return self

    def izi_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared pixel residual and feature residual of ``x`` (in the generator's range).

        With a GAN that adds the noise itself (``observe``), the pixel residual compares ``x`` with
        the noise-free reconstruction and the discriminator sees the reconstruction observed."""
        rec = self.generator(self.model(x))
        pixel = ((x - rec) ** 2).flatten(1).mean(1)
        seen = rec if self.observe is None else self.observe(rec)
        feature = ((self.discriminator.features(x) - self.discriminator.features(seen)) ** 2).mean(1)
        return pixel, feature

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        x = to_unit(batch["image"], self.data_scale)
        pixel, feature = self.izi_losses(x)
        loss = (pixel + self.kappa * feature).mean()
        n = x.shape[0]
        self.log_epoch("loss", loss, stage, n)
        self.log_epoch("pixel_loss", pixel.mean(), stage, n)
        self.log_epoch("feature_loss", feature.mean(), stage, n)
        return loss


__all__ = ["LOSSES", "AdversarialTask", "EncoderTask", "discriminator_step", "gradient_penalty", "image_grid",
           "save_grid", "to_unit"]
