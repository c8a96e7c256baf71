"""pix2pix's PatchGAN discriminator (Isola et al. 2017), conditioned on the input image.

The discriminator of a conditional GAN sees an (input, output) pair, concatenated along the
channels, and says for every overlapping patch of the pair whether the output is the real target
of that input or a generated one: a map of logits ``(B, 1, H', W')``, not one number. Each logit
looks at a ``receptive_field`` x ``receptive_field`` patch, so the discriminator judges local
texture and sharpness (high frequencies) and leaves the low frequencies to the L1 term of the
generator's loss.

Layers (pix2pix's ``NLayerDiscriminator``): a 4 x 4 convolution of stride 2 to ``width`` channels
and LeakyReLU(0.2) (no normalisation); ``n_layers - 1`` more of stride 2, doubling the channels
(at most 8 x ``width``) with normalisation; one of stride 1; and a 4 x 4 convolution of stride 1
to one channel. ``n_layers = 3`` is pix2pix's 70 x 70 PatchGAN; on 32-64 pixel stamps 2 layers
(34 x 34 patches) keep several independent patches per stamp.

Registered as ``patchgan``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.gan import _init_dcgan
from deepmorph.models.registry import register_model

NORMS = ("batch", "instance", "none")


def receptive_field(n_layers: int) -> int:
    """Side (pixels) of the input patch that one output logit sees: 70 for 3 layers, 34 for 2, 16 for 1."""
    r = 1
    for stride in [1, 1] + [2] * int(n_layers):  # from the output back to the input, all kernels 4
        r = (r - 1) * stride + 4
    return r


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


@register_model("patchgan")
class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``(B, in_channels, H, W)`` pairs -> ``(B, 1, H', W')`` patch logits.

    Parameters
    ----------
    in_channels : int
        Channels of the concatenated pair (2 for a one-band input and a one-band output).
    width : int
        Channels of the first convolution.
    n_layers : int
        Stride-2 convolutions (>= 1); sets the patch size (:func:`receptive_field`).
    norm : {"batch", "instance", "none"}
        Normalisation after each convolution but the first and the last (WGAN-GP needs
        ``instance`` or ``none``: its penalty is per sample).
    spectral_norm : bool
        Spectral normalisation (Miyato et al. 2018) of every convolution.

    Notes
    -----
    The registry's interface: ``blocks`` (the convolution stages), ``head`` (the last convolution),
    ``forward_features``, ``forward_head``, ``num_outputs = 1`` (one logit per patch).
    """

    #: Not a classifier/regressor: no (B, num_outputs) head (the registry-wide model tests skip it).
    generative = True

    def __init__(self, in_channels: int = 2, width: int = 64, n_layers: int = 2, norm: str = "batch",
                 spectral_norm: bool = False, num_outputs: int = 1):
        super().__init__()
        if int(in_channels) < 1 or int(width) < 1 or int(n_layers) < 1:
            raise DeepmorphValueError(f"PatchDiscriminator: in_channels, width and n_layers must be positive, got "
                                      f"{in_channels}, {width}, {n_layers}")
        if norm not in NORMS:
            raise DeepmorphValueError(f"PatchDiscriminator: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if num_outputs != 1:
            raise DeepmorphValueError(f"PatchDiscriminator has one output per patch, got num_outputs={num_outputs}")
        wrap = _sn if spectral_norm else (lambda m: m)
        self.in_channels, self.n_layers, self.norm = int(in_channels), int(n_layers), norm
        self.spectral_norm, self.num_outputs = bool(spectral_norm), 1
        self.receptive_field = receptive_field(n_layers)
        bias = norm != "batch"  # batch norm's shift replaces the bias
        self.blocks = nn.ModuleList([nn.Sequential(wrap(nn.Conv2d(in_channels, width, 4, 2, 1)),
                                                   nn.LeakyReLU(0.2, inplace=True))])
        channels = width
        for k in range(1, n_layers + 1):
            out = width * min(2**k, 8)
            stride = 2 if k < n_layers else 1  # the last stage keeps the size (pix2pix)
            self.blocks.append(nn.Sequential(wrap(nn.Conv2d(channels, out, 4, stride, 1, bias=bias)), _norm(norm, out),
                                             nn.LeakyReLU(0.2, inplace=True)))
            channels = out
        self.num_features = channels
        self.head = wrap(nn.Conv2d(channels, 1, 4, 1, 1))
        _init_dcgan(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, C, H', W')``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DeepmorphValueError(f"PatchDiscriminator expects (B, {self.in_channels}, H, W) pairs, got shape "
                                      f"{tuple(x.shape)}")
        min_side = 3 * 2**self.n_layers  # the two stride-1 convolutions need 3 x 3 left
        if min(x.shape[-2:]) < min_side:
            raise DeepmorphValueError(f"PatchDiscriminator with {self.n_layers} layers needs images of at least "
                                      f"{min_side} px, got {tuple(x.shape[-2:])}")
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 1, H', W')`` logits, one per patch."""
        return self.forward_head(self.forward_features(x))


__all__ = ["NORMS", "PatchDiscriminator", "receptive_field"]
