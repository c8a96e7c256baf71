"""Image recovery: a U-Net that maps degraded stamps to the originals, with an L1 loss or as a pix2pix cGAN.

After Schawinski et al. (2017, MNRAS 467, L110), who recovered SDSS galaxy images degraded to worse
seeing and more noise with a conditional GAN (pix2pix, Isola et al. 2017): the generator is a
U-Net, the discriminator a PatchGAN (:class:`~deepmorph.models.patchgan.PatchDiscriminator`) that
sees (degraded, candidate) pairs. The generator's loss is ``adv + lambda_l1 * L1`` (pix2pix's
``lambda = 100``); with ``discriminator=None`` it is the L1 loss alone (the ablation).

**Scaling.** Fluxes span orders of magnitude between galaxies, so each pair is divided by the
degraded stamp's brightness scale (:func:`~deepmorph.tasks.decompose.peak_scale`, its brightest
3 x 3 mean): the network, the discriminator and the L1 loss work on peak-normalised images (the
PSNR, too, is relative to each stamp's peak), and :class:`Recoverer` multiplies the output back:
counts in, counts out.

**Residual.** The generator predicts the correction to the degraded stamp, ``x + G(x)``, with a
zero-initialised output layer: training starts from the identity (the degraded image itself) and
only has to learn the sharpening and the denoising.

**Schedule.** Without a discriminator, Lightning's automatic optimisation with the run's optimiser
and schedule (:class:`~deepmorph.tasks.Task`). With one, manual optimisation as in
:class:`~deepmorph.tasks.adversarial.AdversarialTask`: every batch is one discriminator step and
every ``d_steps``-th batch also one generator step; Adam for both (``betas``), the discriminator at
``d_lr_scale`` times the learning rate, each stepped by the run's schedule once per epoch. The
adversarial term is ``bce`` (pix2pix's, with one-sided ``label_smoothing``), ``lsgan`` (least
squares, Mao et al. 2017) or ``wgan-gp`` (the critic's gradient penalty on interpolated pairs).

Logged per epoch: ``l1`` (train), and on the validation split ``val_l1`` = ``val_loss`` (the
early-stopping monitor) and ``val_psnr`` (mean PSNR against the original, dB, :func:`psnr`); with
a discriminator also ``d_loss``, ``g_adv``, ``d_real`` and ``d_fake`` (mean patch outputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.adversarial import discriminator_step, gradient_penalty
from deepmorph.tasks.base import Task
from deepmorph.tasks.decompose import peak_scale
from deepmorph.training.config import RunConfig
from deepmorph.training.schedules import make_scheduler

#: Adversarial terms of the cGAN.
GAN_LOSSES = ("bce", "lsgan", "wgan-gp")


def psnr(recovered: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image, dB: ``10 log10(max(original)^2 / mean((recovered - original)^2))``.

    The peak is the original stamp's largest pixel and the mean runs over the whole stamp (all
    channels): ``(B, C, H, W) -> (B,)``.
    """
    peak = original.flatten(1).amax(dim=1)
    mse = ((recovered - original) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(peak.clamp_min(torch.finfo(peak.dtype).tiny) ** 2
                              / mse.clamp_min(torch.finfo(mse.dtype).tiny))


class Recoverer(nn.Module):
    """A generator wrapped with the per-image scaling and the residual: degraded counts in, recovered counts out."""

    def __init__(self, generator: nn.Module, residual: bool = True):
        super().__init__()
        self.generator = generator
        self.residual = bool(residual)

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """The recovered image of peak-normalised degraded images ``x`` (same units)."""
        out = self.generator(x)
        return x + out if self.residual else out

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` degraded stamps, counts -> recovered stamps, counts."""
        scale = peak_scale(degraded)
        return self.normalised(degraded / scale) * scale


class RecoverTask(Task):
    """Learn degraded -> original with L1 (``discriminator=None``) or L1 + a conditional adversarial loss.

    Parameters
    ----------
    model : nn.Module
        The generator (a U-Net, one input and one output channel); what ``model.pt`` holds.
    config : RunConfig
        The run's options (``optimizer.lr``, ``schedule``; the dataset normalisation stays ``none``:
        scaling happens here).
    discriminator : nn.Module, optional
        A conditional discriminator taking ``(B, 2C, H, W)`` (degraded, candidate) pairs and giving
        logits of any shape per image (a :class:`~deepmorph.models.patchgan.PatchDiscriminator`).
    lambda_l1 : float
        Weight of the L1 term next to the adversarial one (pix2pix: 100).
    gan_loss : {"bce", "lsgan", "wgan-gp"}
        The adversarial term.
    d_steps : int
        Discriminator steps per generator step.
    label_smoothing : float
        One-sided label smoothing of real pairs (``bce`` only), in ``[0, 0.5)``.
    gp_weight : float
        Gradient-penalty weight (``wgan-gp``).
    d_lr_scale : float
        The discriminator's learning rate over the generator's.
    betas : (float, float)
        Adam's betas of both networks in the cGAN (pix2pix: ``(0.5, 0.999)``).
    residual : bool
        The generator predicts the correction to the degraded image.
    augmentation : callable, optional
        Batched augmentation applied alike to the degraded and the original stamps (flips and
        right-angle rotations: they move pixels without interpolating them).
    """

    def __init__(self, model: nn.Module, config: RunConfig, discriminator: nn.Module | None = None,
                 lambda_l1: float = 100.0, gan_loss: str = "bce", d_steps: int = 1, label_smoothing: float = 0.0,
                 gp_weight: float = 10.0, d_lr_scale: float = 1.0, betas: tuple[float, float] = (0.5, 0.999),
                 residual: bool = True, augmentation: Callable | None = None):
        if gan_loss not in GAN_LOSSES:
            raise DeepmorphValueError(f"cGAN loss must be one of {', '.join(GAN_LOSSES)}, got {gan_loss!r}")
        if not lambda_l1 >= 0:
            raise DeepmorphValueError(f"lambda_l1 must be >= 0, got {lambda_l1}")
        if discriminator is None and lambda_l1 == 0:
            raise DeepmorphValueError("lambda_l1 = 0 without a discriminator leaves no loss")
        if int(d_steps) != d_steps or d_steps < 1:
            raise DeepmorphValueError(f"d_steps (discriminator steps per generator step) must be >= 1, got {d_steps}")
        if not 0.0 <= label_smoothing < 0.5:
            raise DeepmorphValueError(f"label smoothing must be in [0, 0.5), got {label_smoothing}")
        if gan_loss == "wgan-gp" and getattr(discriminator, "norm", "none") == "batch":
            raise DeepmorphValueError("wgan-gp needs a discriminator without batch norm (norm 'instance' or 'none')")
        if discriminator is not None and config.gradient_clip is not None:
            raise DeepmorphValueError("gradient_clip does not apply to the cGAN's manual optimisation; unset it")
        super().__init__(model, config, augmentation, hparams={
            "adversarial": discriminator is not None, "lambda_l1": float(lambda_l1), "gan_loss": gan_loss,
            "d_steps": int(d_steps), "label_smoothing": float(label_smoothing), "gp_weight": float(gp_weight),
            "d_lr_scale": float(d_lr_scale), "betas": list(betas), "residual": bool(residual)})
        self.recoverer = Recoverer(model, residual)
        self.discriminator = discriminator
        self.automatic_optimization = discriminator is None
        self.lambda_l1, self.gan_loss, self.d_steps = float(lambda_l1), gan_loss, int(d_steps)
        self.label_smoothing, self.gp_weight = float(label_smoothing), float(gp_weight)
        self.d_lr_scale, self.betas = float(d_lr_scale), tuple(betas)

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        """Recovered stamps in counts."""
        return self.recoverer(degraded)

    def augment(self, batch: dict) -> dict:
        if self.augmentation is None:
            return batch
        c = batch["image"].shape[1]
        out, _, _ = self.augmentation(torch.cat([batch["image"], batch["target"]], dim=1))
        return {**batch, "image": out[:, :c], "target": out[:, c:]}

    @staticmethod
    def _scaled(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Degraded and original stamps divided by the degraded stamp's peak scale, and the scale."""
        x = batch["image"]
        scale = peak_scale(x)
        return x / scale, batch["target"] / scale, scale

    # -- adversarial terms ---------------------------------------------------------------------------------
    def _adv(self, logits: torch.Tensor, real: bool, smooth: bool = False) -> torch.Tensor:
        """The adversarial loss of ``logits`` against the label real/fake (critic: +-mean)."""
        if self.gan_loss == "wgan-gp":
            return -logits.mean() if real else logits.mean()
        value = (1.0 - self.label_smoothing) if (real and smooth) else float(real)
        target = torch.full_like(logits, value)
        if self.gan_loss == "lsgan":
            return F.mse_loss(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target)

    def _d_loss(self, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor):
        d = self.discriminator
        real_pair, fake_pair = torch.cat([x, y], dim=1), torch.cat([x, fake], dim=1)
        d_real, d_fake = d(real_pair), d(fake_pair)  # separate batches: batch norm sees one kind at a time
        loss = self._adv(d_real, True, smooth=True) + self._adv(d_fake, False)
        if self.gan_loss == "wgan-gp":
            loss = loss + self.gp_weight * gradient_penalty(d, real_pair, fake_pair)
        else:
            loss = 0.5 * loss  # pix2pix halves D's objective: it then learns no faster than G
        return loss, d_real, d_fake

    # -- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        x, y, _ = self._scaled(self.augment(batch))
        n = x.shape[0]
        if self.discriminator is None:
            loss = F.l1_loss(self.recoverer.normalised(x), y)
            self.log_epoch("l1", loss.detach(), "train", n)
            self.log_epoch("loss", loss.detach(), "train", n)
            return loss
        opt_g, opt_d = self.optimizers()
        fake = self.recoverer.normalised(x)
        discriminator_step(self, opt_d, *self._d_loss(x, y, fake.detach()), n)
        if (batch_idx + 1) % self.d_steps == 0:
            self.discriminator.requires_grad_(False)
            g_adv = self._adv(self.discriminator(torch.cat([x, fake], dim=1)), True)
            l1 = F.l1_loss(fake, y)
            loss = g_adv + self.lambda_l1 * l1
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt_g.step()
            self.discriminator.requires_grad_(True)
            self.log_epoch("g_adv", g_adv.detach(), "train", n)
            self.log_epoch("l1", l1.detach(), "train", n)
            self.log_epoch("loss", loss.detach(), "train", n)
        return None

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        x, y, scale = self._scaled(batch)
        pred = self.recoverer.normalised(x)
        l1 = F.l1_loss(pred, y)
        n = x.shape[0]
        self.log_epoch("l1", l1, stage, n)
        self.log_epoch("loss", l1, stage, n)
        self.log_epoch("psnr", psnr(pred * scale, batch["target"]).mean(), stage, n)
        return l1

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Recovered stamps in counts, (B, C, H, W)."""
        return self.recoverer(batch["image"])

    # -- optimisers ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """The run's optimiser and schedule (L1); Adam for the generator and the discriminator, in that order
        (``optimizers()[0]``, ``[1]``), each with the run's schedule (cGAN)."""
        if self.discriminator is None:
            return super().configure_optimizers()
        lr, wd = self.config.optimizer.lr, self.config.optimizer.weight_decay
        opt_g = torch.optim.Adam(self.model.parameters(), lr=lr, betas=self.betas, weight_decay=wd)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr * self.d_lr_scale, betas=self.betas,
                                 weight_decay=wd)
        s = self.config.schedule
        schedulers = [make_scheduler(opt, s.kind, step_size=s.step_size, gamma=s.gamma, decay_rate=s.decay_rate,
                                     t_max=s.t_max, eta_min=s.eta_min, factor=s.factor, patience=s.patience,
                                     min_lr=s.min_lr, epochs=self.config.epochs) for opt in (opt_g, opt_d)]
        if schedulers[0] is None:
            return [opt_g, opt_d]
        return [opt_g, opt_d], schedulers

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # steps reduce-on-plateau schedules
        if self.discriminator is not None:  # manual optimisation: Lightning steps no schedule itself
            for config in self.trainer.lr_scheduler_configs:
                if not isinstance(config.scheduler, ReduceLROnPlateau):
                    config.scheduler.step()


__all__ = ["GAN_LOSSES", "RecoverTask", "Recoverer", "psnr"]
