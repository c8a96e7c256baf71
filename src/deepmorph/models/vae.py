"""Convolutional autoencoder and variational autoencoder (VAE) for galaxy stamps.

The encoder has one stage per entry of ``widths``; each stage halves the image with a stride-2
3 x 3 convolution (then ``blocks_per_stage - 1`` more 3 x 3 convolutions), each followed by
[batch norm] and the activation. The last feature map, ``(widths[-1], S / 2**k, S / 2**k)`` for
``k`` stages, is flattened into one linear layer that gives the latent code: the posterior mean
and log-variance of each latent dimension (VAE, Kingma & Welling 2014), or the code itself
(autoencoder). The decoder mirrors the encoder: a linear layer back to the smallest feature map,
then one stage per width, each doubling the image with a transposed convolution (stride 2, kernel
4) or an interpolation followed by a 3 x 3 convolution, and a final 3 x 3 convolution to
``num_outputs`` channels with no activation: the decoded image is in the units of the
(normalised) input, which may be negative.

Registered as ``"vae"`` (:class:`ConvVAE`) and ``"ae"`` (:class:`ConvAE`, the same network with a
deterministic code). Both share the registry's interface: ``blocks`` are the encoder stages,
``head`` holds the latent layer and the decoder, ``forward(x)`` is the reconstruction from the
posterior mean; :meth:`ConvVAE.encode`, :meth:`ConvVAE.reparameterize` and
:meth:`ConvVAE.decode` are the pieces a training objective needs.

Pose normalisation (``align=True``): before encoding, each image is rotated about the stamp centre
so that its major axis lies along +x (:func:`pose_angle`: the orientation of the galaxy's adaptive
second moments, Bernstein & Jarvis 2002 style, measured on the channel mean; :func:`rotate_images`:
bilinear resampling, reflecting at the edges). The code then describes a galaxy's shape (axis
ratio, profile, size, brightness) but not its orientation, which is the measured angle
(:meth:`ConvVAE.pose`); the decoder draws the aligned galaxy (:meth:`ConvVAE.pose_normalize` gives
the image it reconstructs).

>>> import torch
>>> vae = ConvVAE(in_channels=1, image_size=32, latent_dim=4, widths=(8, 16))
>>> mu, logvar = vae.encode(torch.zeros(2, 1, 32, 32))
>>> tuple(mu.shape), tuple(vae.decode(mu).shape)
((2, 4), (2, 1, 32, 32))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.cnn import ACTIVATIONS, _activation
from deepmorph.models.registry import register_model

UPSAMPLING = ("transpose", "nearest", "bilinear")

#: Posterior log-variances are clamped to this range (numerical safety of exp()).
LOGVAR_RANGE = (-15.0, 10.0)


def pose_angle(images: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Major-axis angle of the galaxy at the centre of each image, radians in ``(-pi/2, pi/2]``.

    The angle of the second moments of the light weighted by an elliptical Gaussian window
    matched to the galaxy (adaptive moments): the window starts as a circle of sigma ``S / 8``
    at the stamp centre, and each iteration re-centres it on the windowed centroid (kept within
    ``S / 8`` of the centre) and sets its covariance to twice the windowed second moments (the
    fixed point for a Gaussian galaxy). The window keeps noise and neighbours far from the centre
    out of the moments; zero-mean sky noise cancels in them.

    Parameters
    ----------
    images : Tensor (B, C, H, W)
        Sky-subtracted (e.g. ``asinh``-normalised) images; channels are averaged.
    iterations : int
        Window updates.

    Returns
    -------
    Tensor (B,)
        Counter-clockwise from the +x (column) axis towards +y (row index); 0 where the moments are
        undefined (no positive light in the window).
    """
    img = images.detach().float().mean(dim=1)  # (B, H, W)
    b, h, w = img.shape
    ys = torch.arange(h, dtype=img.dtype, device=img.device) - 0.5 * (h - 1)
    xs = torch.arange(w, dtype=img.dtype, device=img.device) - 0.5 * (w - 1)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    s0 = min(h, w) / 8.0
    lo, hi = 0.25, (min(h, w) / 2.0) ** 2  # bounds on the window's variances, pixels^2
    cx = torch.zeros(b, dtype=img.dtype, device=img.device)
    cy = torch.zeros_like(cx)
    vxx, vyy, vxy = torch.full_like(cx, s0**2), torch.full_like(cx, s0**2), torch.zeros_like(cx)
    mxx, myy, mxy = vxx.clone(), vyy.clone(), vxy.clone()
    for _ in range(max(1, int(iterations))):
        dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
        det = (vxx * vyy - vxy**2).clamp(min=1e-6)
        r2 = (vyy[:, None, None] * dx**2 - 2 * vxy[:, None, None] * dx * dy + vxx[:, None, None] * dy**2) \
            / det[:, None, None]
        wgt = img * torch.exp(-0.5 * r2)
        tot = wgt.sum(dim=(1, 2))
        good = tot > 0
        safe = torch.where(good, tot, torch.ones_like(tot))
        ncx = cx + (wgt * dx).sum(dim=(1, 2)) / safe
        ncy = cy + (wgt * dy).sum(dim=(1, 2)) / safe
        shift = torch.hypot(ncx, ncy).clamp(min=1e-9)
        scale = (s0 / shift).clamp(max=1.0)
        ncx, ncy = torch.where(good, ncx * scale, cx), torch.where(good, ncy * scale, cy)
        dx, dy = xx - ncx[:, None, None], yy - ncy[:, None, None]
        mxx = torch.where(good, (wgt * dx**2).sum(dim=(1, 2)) / safe, mxx)
        myy = torch.where(good, (wgt * dy**2).sum(dim=(1, 2)) / safe, myy)
        mxy = torch.where(good, (wgt * dx * dy).sum(dim=(1, 2)) / safe, mxy)
        cx, cy = ncx, ncy
        # The next window: twice the moments, its variances kept within [lo, hi] (a valid ellipse).
        vxx, vyy = (2 * mxx).clamp(lo, hi), (2 * myy).clamp(lo, hi)
        lim = 0.95 * torch.sqrt(vxx * vyy)
        vxy = torch.maximum(torch.minimum(2 * mxy, lim), -lim)
    angle = 0.5 * torch.atan2(2 * mxy, mxx - myy)
    return torch.where(torch.isfinite(angle), angle, torch.zeros_like(angle))


def rotate_images(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) rotated about the stamp centre by ``-angle`` (B,) radians.

    A feature at angle ``angle`` (counter-clockwise from +x towards +y, as :func:`pose_angle`
    measures it) ends up along +x. Bilinear resampling; where the rotated stamp needs pixels from
    outside the input, the input is reflected at its edges (sky-like pixels, no hard border that
    would tell the angle).
    """
    b, _, h, w = images.shape
    c, s = torch.cos(angle).to(images.dtype), torch.sin(angle).to(images.dtype)
    zero = torch.zeros_like(c)
    # Output pixel (x, y) samples the input at R(angle) (x, y); grid x is the column, y the row axis.
    # Normalised coordinates span the width and the height; rescale so that the rotation is isotropic.
    theta = torch.stack([torch.stack([c, -s * h / w, zero], dim=1), torch.stack([s * w / h, c, zero], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(mu, exp(logvar))`` from the prior ``N(0, I)``, summed over the latent.

    Parameters
    ----------
    mu, logvar : Tensor (B, K)
        Posterior means and log-variances (natural log) of the ``K`` latent dimensions.

    Returns
    -------
    Tensor (B,)
        ``0.5 * sum_k (mu_k^2 + exp(logvar_k) - 1 - logvar_k)``, nats per image.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def _conv_block(c_in: int, c_out: int, stride: int, batchnorm: bool, activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(_activation(activation, c_out))
    return layers


class _UpStage(nn.Module):
    """Double the image (learned or interpolated), then ``extra`` 3 x 3 convolutions."""

    def __init__(self, c_in: int, c_out: int, upsample: str, extra: int, batchnorm: bool, activation: str):
        super().__init__()
        self.mode = upsample
        if upsample == "transpose":
            up: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=not batchnorm)]
        else:
            up = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            up.append(nn.BatchNorm2d(c_out))
        up.append(_activation(activation, c_out))
        self.up = nn.Sequential(*up)
        layers: list[nn.Module] = []
        for _ in range(extra):
            layers += _conv_block(c_out, c_out, 1, batchnorm, activation)
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, h, w) -> (B, c_out, 2h, 2w)."""
        if self.mode != "transpose":
            kwargs = {"align_corners": False} if self.mode == "bilinear" else {}
            x = F.interpolate(x, scale_factor=2.0, mode=self.mode, **kwargs)
        return self.convs(self.up(x))


class _Decoder(nn.Module):
    """Latent code (B, K) -> image (B, num_outputs, S, S)."""

    def __init__(self, latent_dim: int, widths: tuple[int, ...], side: int, num_outputs: int, upsample: str,
                 blocks_per_stage: int, batchnorm: bool, activation: str):
        super().__init__()
        self.side = side
        self.top = widths[-1]
        self.fc = nn.Linear(latent_dim, widths[-1] * side * side)
        self.fc_act = _activation(activation, widths[-1])
        outs = list(reversed(widths[:-1])) + [widths[0]]  # channels after each doubling
        ins = [widths[-1]] + outs[:-1]
        self.stages = nn.ModuleList(
            _UpStage(c_in, c_out, upsample, blocks_per_stage - 1, batchnorm, activation)
            for c_in, c_out in zip(ins, outs, strict=True)
        )
        self.out = nn.Conv2d(widths[0], num_outputs, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc_act(self.fc(z).view(len(z), self.top, self.side, self.side))  # (B, widths[-1], s, s)
        for stage in self.stages:
            x = stage(x)  # doubles the image
        return self.out(x)  # (B, num_outputs, S, S)


@register_model("vae")
class ConvVAE(nn.Module):
    """Convolutional VAE (or, with ``variational=False``, autoencoder) for square stamps.

    Parameters
    ----------
    in_channels : int
        Image channels (bands).
    num_outputs : int, optional
        Channels of the decoded image (default ``in_channels``: a reconstruction).
    image_size : int
        Side of the (square) stamps, pixels, 16 to 256 (32 to 128 in practice); a multiple of
        ``2 ** len(widths)``.
    latent_dim : int
        Dimensions of the latent code (2 for maps of the latent plane, 8-32 for analysis).
    widths : sequence of int
        Channels of each encoder stage (the decoder uses them in reverse order).
    blocks_per_stage : int
        Convolutions per stage (the first one strides / upsamples).
    batchnorm : bool
        Batch normalisation after every convolution but the last.
    activation : {"relu", "leakyrelu", "prelu"}
        Non-linearity after every convolution but the last.
    upsample : {"transpose", "nearest", "bilinear"}
        How the decoder doubles the image: a 4 x 4 transposed convolution of stride 2, or an
        interpolation followed by a 3 x 3 convolution (no checkerboard artefacts).
    variational : bool
        True: the encoder gives a mean and a log-variance per latent dimension (a VAE); False: a
        code only (an autoencoder; :meth:`encode` returns ``(code, None)``).

    Attributes
    ----------
    side : int
        Side of the smallest feature map, ``image_size // 2 ** len(widths)``.
    """

    #: Not a classifier/regressor: no (B, num_outputs) head (the registry-wide model tests skip it).
    generative = True

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int | None = None,
        image_size: int = 64,
        latent_dim: int = 16,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks_per_stage: int = 1,
        batchnorm: bool = True,
        activation: str = "leakyrelu",
        upsample: str = "transpose",
        variational: bool = True,
        align: bool = False,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        num_outputs = in_channels if num_outputs is None else int(num_outputs)
        name = type(self).__name__
        if in_channels < 1 or num_outputs < 1 or latent_dim < 1 or not widths or min(widths) < 1 \
                or blocks_per_stage < 1:
            raise DeepmorphValueError(
                f"{name}: in_channels, num_outputs, latent_dim, widths and blocks_per_stage must be positive, got "
                f"{in_channels}, {num_outputs}, {latent_dim}, {widths}, {blocks_per_stage}")
        if activation not in ACTIVATIONS:
            raise DeepmorphValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if upsample not in UPSAMPLING:
            raise DeepmorphValueError(f"{name}: upsample must be one of {UPSAMPLING}, got {upsample!r}")
        factor = 2 ** len(widths)
        if not 16 <= int(image_size) <= 256 or int(image_size) % factor:
            raise DeepmorphValueError(
                f"{name}: image_size must be in [16, 256] and a multiple of 2**len(widths) = {factor}, "
                f"got {image_size}")
        self.in_channels = int(in_channels)
        self.num_outputs = num_outputs
        self.image_size = int(image_size)
        self.latent_dim = int(latent_dim)
        self.variational = bool(variational)
        self.align = bool(align)
        self.side = self.image_size // factor

        self.blocks = nn.ModuleList()
        channels = self.in_channels
        for width in widths:
            layers = _conv_block(channels, width, 2, batchnorm, activation)
            for _ in range(blocks_per_stage - 1):
                layers += _conv_block(width, width, 1, batchnorm, activation)
            self.blocks.append(nn.Sequential(*layers))
            channels = width
        codes = 2 * self.latent_dim if self.variational else self.latent_dim
        self.head = nn.ModuleDict({
            "latent": nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * self.side**2, codes)),
            "decoder": _Decoder(self.latent_dim, widths, self.side, num_outputs, upsample, blocks_per_stage,
                                batchnorm, activation),
        })

    # -- the pieces --------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise DeepmorphValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, {self.image_size}, {self.image_size}) "
                f"images, got shape {tuple(x.shape)}")

    def pose(self, x: torch.Tensor) -> torch.Tensor:
        """Major-axis angles (B,) of images (B, C, S, S), radians counter-clockwise from +x
        (:func:`pose_angle`): what ``align=True`` removes before encoding."""
        self._check(x)
        return pose_angle(x)

    def pose_normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The images the encoder sees and the decoder reconstructs: rotated so that each major axis
        lies along +x with ``align=True`` (:func:`rotate_images`), ``x`` itself otherwise."""
        self._check(x)
        if not self.align:
            return x
        return rotate_images(x, pose_angle(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder feature map: (B, C, S, S) -> (B, widths[-1], side, side) (of the pose-normalised
        images with ``align=True``)."""
        x = self.pose_normalize(x)
        for block in self.blocks:
            x = block(x)  # halves the image
        return x

    def latent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mu, logvar)`` (B, K) each from encoder features (``logvar`` None for an autoencoder)."""
        code = self.head["latent"](features)
        if not self.variational:
            return code, None
        mu, logvar = code.chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior of images (B, C, S, S): means and log-variances (natural log), each (B, latent_dim).

        For an autoencoder (``variational=False``) the code is returned as the mean and the
        log-variance is None.
        """
        return self.latent(self.forward_features(x))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor | None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (``mu`` itself when
        ``logvar`` is None), (B, K); ``eps`` from ``generator`` or torch's global generator."""
        if logvar is None:
            return mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded images (B, num_outputs, S, S), in the input's (normalised) units, of codes (B, K)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise DeepmorphValueError(f"{type(self).__name__}.decode expects (B, {self.latent_dim}) codes, "
                                      f"got shape {tuple(z.shape)}")
        return self.head["decoder"](z)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean of encoder features: (B, widths[-1], s, s) -> (B, C, S, S)."""
        return self.decode(self.latent(features)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (from the posterior mean): (B, C, S, S) -> (B, num_outputs, S, S)
        (of :meth:`pose_normalize`'s images with ``align=True``)."""
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images decoded from codes drawn from the prior ``N(0, I)``: (n, num_outputs, S, S)."""
        device = next(self.parameters()).device
        z = torch.randn((int(n), self.latent_dim), generator=generator, device=device)
        return self.decode(z)


@register_model("ae")
class ConvAE(ConvVAE):
    """Convolutional autoencoder: :class:`ConvVAE` with a deterministic code (same parameters,
    without ``variational``); :meth:`encode` returns ``(code, None)``."""

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int | None = None,
        image_size: int = 64,
        latent_dim: int = 16,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks_per_stage: int = 1,
        batchnorm: bool = True,
        activation: str = "leakyrelu",
        upsample: str = "transpose",
        align: bool = False,
    ):
        super().__init__(in_channels, num_outputs, image_size, latent_dim, widths, blocks_per_stage, batchnorm,
                         activation, upsample, variational=False, align=align)
