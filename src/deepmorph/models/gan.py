"""DCGAN networks for galaxy stamps (Radford et al. 2016), and the f-AnoGAN encoder (Schlegl et al. 2019).

- :class:`DCGANGenerator`: ``z (B, latent_dim) -> (B, C, S, S)`` in ``[-1, 1]`` (tanh), transposed
  convolutions doubling the image from ``base x base`` (``S = base * 2**L``, ``base`` 3 to 7);
- :class:`DCGANDiscriminator`: strided convolutions halving the image ``L`` times, then one linear
  logit; batch, layer or no normalisation, optional spectral norm (Miyato et al. 2018) on every
  layer. :meth:`~DCGANDiscriminator.features` gives the last convolution stage, flattened: the
  feature space of AnoGAN's discrimination loss and of f-AnoGAN's izi_f encoder loss;
  :meth:`~DCGANDiscriminator.intermediate` every stage's output;
- :class:`DCGANEncoder`: the discriminator's trunk with a linear head to the latent, ``E(x) -> z``;
- :class:`GAN`: the three together (what a ``deepmorph train gan`` run saves as ``model.pt``).

Registered as ``dcgan`` (the container), ``dcgan_generator``, ``dcgan_discriminator``,
``dcgan_encoder``. Stamps from 32 to 128 pixels work (any ``S = base * 2**L`` with
``3 <= base <= 7`` and ``S >= 16``); the latent is a standard normal of ``latent_dim`` dimensions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.registry import register_model

NORMS = ("batch", "layer", "none")


def stages(image_size: int) -> tuple[int, int]:
    """``(L, base)`` with ``image_size = base * 2**L``, ``3 <= base <= 7``, as many stages as possible.

    Raises
    ------
    DeepmorphValueError
        For a size that is not of that form or smaller than 16 pixels.
    """
    size = int(image_size)
    if size != image_size or size < 16:
        raise DeepmorphValueError(f"DCGAN: image size must be an integer >= 16 pixels, got {image_size}")
    n, base = 0, size
    while base % 2 == 0 and base // 2 >= 3:
        base //= 2
        n += 1
    if base > 7:
        raise DeepmorphValueError(f"DCGAN: image size must be base * 2**L with base in 3..7 (e.g. 32, 48, 64, 96, "
                                  f"128), got {image_size}")
    return n, base


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # layer norm over (C, H, W): no batch coupling, WGAN-GP safe
    return nn.Identity()


def _check(name: str, latent_dim: int | None, channels: int, width: int, norm: str | None = None) -> None:
    if latent_dim is not None and int(latent_dim) < 1:
        raise DeepmorphValueError(f"{name}: latent_dim must be positive, got {latent_dim}")
    if int(channels) < 1 or int(width) < 1:
        raise DeepmorphValueError(f"{name}: channels and width must be positive, got {channels}, {width}")
    if norm is not None and norm not in NORMS:
        raise DeepmorphValueError(f"{name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")


def _check_images(name: str, x: torch.Tensor, channels: int, size: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != (size, size):
        raise DeepmorphValueError(f"{name} expects (B, {channels}, {size}, {size}) images, got shape {tuple(x.shape)}")


@register_model("dcgan_generator")
class DCGANGenerator(nn.Module):
    """DCGAN generator: a latent vector to a stamp in ``[-1, 1]``.

    ``z`` -> transposed convolution to ``(width * 2**(L-1), base, base)`` -> ``L - 1`` x (transposed
    convolution doubling the size, halving the channels, batch norm, ReLU) -> a last transposed
    convolution to ``out_channels`` at full size -> tanh.

    Parameters
    ----------
    latent_dim : int
        Size of ``z``.
    out_channels : int
        Image channels.
    image_size : int
        Stamp side ``S`` (see :func:`stages`).
    width : int
        Channels of the last hidden stage (each earlier stage has twice as many).
    """

    #: Not a classifier/regressor: no (B, num_outputs) head (the registry-wide model tests skip it).
    generative = True

    def __init__(self, latent_dim: int = 64, out_channels: int = 1, image_size: int = 32, width: int = 64):
        super().__init__()
        _check("DCGANGenerator", latent_dim, out_channels, width)
        n, base = stages(image_size)
        self.latent_dim, self.out_channels, self.image_size = int(latent_dim), int(out_channels), int(image_size)
        channels = width * 2 ** (n - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, channels, base, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                       nn.ReLU(inplace=True)]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init_dcgan(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim)`` -> ``(B, out_channels, S, S)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise DeepmorphValueError(f"DCGANGenerator expects (B, {self.latent_dim}) latents, got {tuple(z.shape)}")
        return self.net(z[:, :, None, None])


class _Trunk(nn.Module):
    """Strided 4x4 convolutions halving the image ``L`` times (LeakyReLU 0.2), shared by D and E."""

    def __init__(self, in_channels: int, image_size: int, width: int, norm: str, spectral: bool):
        super().__init__()
        n, base = stages(image_size)
        wrap = _sn if spectral else (lambda m: m)
        self.blocks = nn.ModuleList()
        channels, out = in_channels, width
        for k in range(n):
            layers: list[nn.Module] = [wrap(nn.Conv2d(channels, out, 4, 2, 1, bias=(k == 0 or norm == "none")))]
            if k > 0:
                layers.append(_norm2d(norm, out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            self.blocks.append(nn.Sequential(*layers))
            channels, out = out, out * 2
        self.num_features = channels * base * base
        self.channels, self.base = channels, base


@register_model("dcgan_discriminator")
class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator (a critic for WGAN-GP): a stamp to one logit.

    Parameters
    ----------
    in_channels : int
        Image channels.
    image_size : int
        Stamp side (see :func:`stages`).
    width : int
        Channels of the first stage (each later stage has twice as many).
    norm : {"batch", "layer", "none"}
        Normalisation after each convolution but the first; WGAN-GP needs ``layer`` or ``none``
        (the gradient penalty is per sample).
    spectral_norm : bool
        Spectral normalisation of every convolution and of the linear head.
    dropout : float
        Dropout before the head.

    Notes
    -----
    The registry's interface: ``blocks`` (the stages), ``head``, ``forward_features`` (last
    feature map), ``forward_head`` and ``forward`` (``(B, 1)`` logits), ``num_outputs = 1``.
    """

    #: Not a classifier/regressor: no (B, num_outputs) head (the registry-wide model tests skip it).
    generative = True

    def __init__(self, in_channels: int = 1, image_size: int = 32, width: int = 64, norm: str = "batch",
                 spectral_norm: bool = False, dropout: float = 0.0, num_outputs: int = 1):
        super().__init__()
        _check("DCGANDiscriminator", None, in_channels, width, norm)
        if num_outputs != 1:
            raise DeepmorphValueError(f"DCGANDiscriminator has one output (a logit), got num_outputs={num_outputs}")
        trunk = _Trunk(in_channels, image_size, width, norm, spectral_norm)
        self.in_channels, self.image_size, self.num_outputs = int(in_channels), int(image_size), 1
        self.spectral_norm, self.norm = bool(spectral_norm), norm
        self.blocks = trunk.blocks
        self.num_features = trunk.num_features
        linear = nn.Linear(self.num_features, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                                  _sn(linear) if spectral_norm else linear)
        _init_dcgan(self)

    def intermediate(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, ``(B, C_k, S / 2**(k+1), S / 2**(k+1))``."""
        _check_images("DCGANDiscriminator", x, self.in_channels, self.image_size)
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, C, base, base)``."""
        return self.intermediate(x)[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, flattened ``(B, num_features)`` (AnoGAN's feature-matching space)."""
        return self.forward_features(x).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` -> ``(B, 1)`` logits."""
        return self.forward_head(self.forward_features(x))

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` logits and ``(B, num_features)`` features in one pass."""
        f = self.forward_features(x)
        return self.head(f)[:, 0], f.flatten(1)


@register_model("dcgan_encoder")
class DCGANEncoder(nn.Module):
    """f-AnoGAN's encoder: a stamp to the latent vector ``z`` that the generator maps back to it.

    The discriminator's convolution trunk (batch norm, or ``norm``), then a linear layer to
    ``latent_dim`` (no activation: the latent prior is a standard normal).
    """

    #: Not a classifier/regressor: no (B, num_outputs) head (the registry-wide model tests skip it).
    generative = True

    def __init__(self, latent_dim: int = 64, in_channels: int = 1, image_size: int = 32, width: int = 64,
                 norm: str = "batch"):
        super().__init__()
        _check("DCGANEncoder", latent_dim, in_channels, width, norm)
        trunk = _Trunk(in_channels, image_size, width, norm, False)
        self.latent_dim, self.in_channels, self.image_size = int(latent_dim), int(in_channels), int(image_size)
        self.blocks = trunk.blocks
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(trunk.num_features, latent_dim))
        _init_dcgan(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` -> ``(B, latent_dim)``."""
        _check_images("DCGANEncoder", x, self.in_channels, self.image_size)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@register_model("dcgan")
class GAN(nn.Module):
    """Generator, discriminator and (optionally) encoder of one DCGAN, saved and loaded together.

    Parameters
    ----------
    latent_dim, in_channels, image_size : int
        Latent size, image channels, stamp side.
    g_width, d_width : int
        Widths of the generator and the discriminator (see their classes); the encoder has ``d_width``.
    d_norm : {"batch", "layer", "none"}
        The discriminator's normalisation.
    spectral_norm : bool
        Spectral norm in the discriminator.
    encoder : bool
        Also hold an :class:`DCGANEncoder` (trained later, by ``train_encoder``).
    noise_sigma : float
        Sky noise the GAN adds to its galaxies itself (:meth:`observe`), in units of the asinh
        normalisation's scale ``s`` (``sigma_sky / s``); 0: the generator draws the noise too.
    poisson_scale : float
        Poisson noise of the galaxy light in the same units: the variance of a pixel of
        normalised flux ``c / s`` grows by ``poisson_scale * c / s`` (``1 / (gain * s)``, gain in
        electrons per count).
    data_scale : float
        The generator's range ``[-1, 1]`` is ``asinh(c / s) / data_scale``.
    """

    #: Not a classifier/regressor: no (B, num_outputs) head (the registry-wide model tests skip it).
    generative = True

    def __init__(self, latent_dim: int = 64, in_channels: int = 1, image_size: int = 32, g_width: int = 64,
                 d_width: int = 64, d_norm: str = "batch", spectral_norm: bool = False, encoder: bool = False,
                 noise_sigma: float = 0.0, poisson_scale: float = 0.0, data_scale: float = 1.0):
        super().__init__()
        if not (noise_sigma >= 0 and poisson_scale >= 0 and data_scale > 0):
            raise DeepmorphValueError(f"GAN: noise_sigma and poisson_scale must be >= 0 and data_scale > 0, got "
                                      f"{noise_sigma}, {poisson_scale}, {data_scale}")
        self.latent_dim, self.in_channels, self.image_size = int(latent_dim), int(in_channels), int(image_size)
        self.noise_sigma, self.poisson_scale = float(noise_sigma), float(poisson_scale)
        self.data_scale = float(data_scale)
        self.generator = DCGANGenerator(latent_dim, in_channels, image_size, g_width)
        self.discriminator = DCGANDiscriminator(in_channels, image_size, d_width, d_norm, spectral_norm)
        self.encoder = DCGANEncoder(latent_dim, in_channels, image_size, d_width) if encoder else None

    def sample_latent(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` standard normal latents ``(n, latent_dim)``."""
        device = device if device is not None else next(self.parameters()).device
        if generator is not None:
            return torch.randn(n, self.latent_dim, generator=generator).to(device)
        return torch.randn(n, self.latent_dim, device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generated stamps for latents ``z``."""
        return self.generator(z)

    @property
    def adds_noise(self) -> bool:
        """Whether :meth:`observe` adds noise (the generator draws noise-free galaxies)."""
        return self.noise_sigma > 0 or self.poisson_scale > 0

    def observe(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-free stamps (the generator's range) as a survey observes them: ``+ sigma * eps``.

        The stamps are mapped back to normalised flux ``c / s = sinh(data_scale * u)``, given sky
        and Poisson noise ``sqrt(noise_sigma^2 + poisson_scale * max(c / s, 0)) * eps`` and
        mapped forward again (clipped to ``[-1, 1]``), all differentiably. The generator then
        learns the galaxies and leaves the noise, whose law is known, to the survey's model.

        Parameters
        ----------
        images : Tensor
            ``(B, C, S, S)`` in ``[-1, 1]``.
        noise : Tensor, optional
            The standard normal ``eps`` to use (same shape); drawn (with ``generator``) when None.

        Returns
        -------
        Tensor
            ``images`` unchanged when the GAN adds no noise.
        """
        if not self.adds_noise:
            return images
        if noise is None:
            noise = torch.randn(images.shape, generator=generator).to(images) if generator is not None \
                else torch.randn_like(images)
        flux = torch.sinh(images * self.data_scale)
        sigma = torch.sqrt(self.noise_sigma ** 2 + self.poisson_scale * flux.clamp(min=0.0))
        return (torch.asinh(flux + sigma * noise) / self.data_scale).clamp(-1.0, 1.0)


def _init_dcgan(module: nn.Module) -> None:
    """DCGAN's initialisation: convolution weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def has_spectral_norm(module: nn.Module) -> bool:
    """Whether any layer of ``module`` is spectrally normalised."""
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m, "weight") and any(
        type(p).__name__ == "_SpectralNorm" for p in m.parametrizations.weight) for m in module.modules())


__all__ = ["GAN", "DCGANDiscriminator", "DCGANEncoder", "DCGANGenerator", "has_spectral_norm", "stages"]
