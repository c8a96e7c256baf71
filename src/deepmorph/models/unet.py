"""A configurable U-Net (Ronneberger et al. 2015): an encoder-decoder with skip connections.

The encoder has ``depth + 1`` stages of two 3 x 3 convolutions ([batch norm], activation); each
stage after the first starts with a 2 x 2 max-pool, halving the image, and doubles the channels
(up to ``max_width``). The decoder mirrors it: each step doubles the image again, with a
transposed convolution (stride 2, the lecture's "learned upsampling") or an interpolation
followed by a 1 x 1 convolution, concatenates the encoder stage of the same size (the skip
connection), and applies two convolutions. A final 1 x 1 convolution gives ``num_outputs`` maps
of the input's size: logits of a per-pixel probability (clump detection) or images (bulge and
disk decomposition).

It shares the registry's interface: ``blocks`` are the encoder stages (fine-tuning freezes the
first ``K``), ``head`` is the decoder with its output convolution, ``forward_features`` returns
the list of encoder feature maps (finest first) that ``forward_head`` decodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.cnn import ACTIVATIONS, _activation
from deepmorph.models.registry import register_model

UPSAMPLING = ("transpose", "bilinear", "nearest")


def _double_conv(c_in: int, c_out: int, kernel_size: int, batchnorm: bool, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, kernel_size, padding=kernel_size // 2, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(_activation(activation, c_out))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    """Double the image (learned or interpolated), concatenate the skip, two convolutions."""

    def __init__(self, c_in: int, c_skip: int, upsample: str, kernel_size: int, batchnorm: bool, activation: str):
        super().__init__()
        self.mode = upsample
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_skip, kernel_size=2, stride=2)
        else:
            self.up = nn.Conv2d(c_in, c_skip, kernel_size=1)  # after interpolation: match the skip's channels
        self.conv = _double_conv(2 * c_skip, c_skip, kernel_size, batchnorm, activation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            x = self.up(x)  # (B, c_skip, 2h, 2w)
        else:
            x = self.up(F.interpolate(x, scale_factor=2.0, mode=self.mode))
        return self.conv(torch.cat([skip, x], dim=1))  # (B, c_skip, 2h, 2w)


class _Decoder(nn.Module):
    def __init__(self, widths: list[int], num_outputs: int, upsample: str, kernel_size: int, batchnorm: bool,
                 activation: str, zero_init: bool):
        super().__init__()
        self.ups = nn.ModuleList(
            _Up(widths[i], widths[i - 1], upsample, kernel_size, batchnorm, activation)
            for i in range(len(widths) - 1, 0, -1)
        )
        self.out = nn.Conv2d(widths[0], num_outputs, kernel_size=1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]  # the bottleneck
        for up, skip in zip(self.ups, reversed(features[:-1]), strict=True):
            x = up(x, skip)
        return self.out(x)


@register_model("unet")
class UNet(nn.Module):
    """U-Net mapping (B, C_in, H, W) images to (B, num_outputs, H, W) maps.

    Parameters
    ----------
    in_channels : int
        Image channels (bands).
    num_outputs : int
        Output maps: 1 for a clump probability (logits), 2 for bulge and disk images.
    depth : int
        Number of 2 x 2 poolings; H and W must be divisible by ``2 ** depth``.
    width : int
        Channels of the first stage; each deeper stage doubles them.
    max_width : int, optional
        Cap on the channels of the deeper stages (default: no cap).
    upsample : {"transpose", "bilinear", "nearest"}
        Transposed convolution (learned), or interpolation followed by a 1 x 1 convolution.
    kernel_size : int
        Odd side of the convolution kernels, pixels.
    batchnorm : bool
        Batch normalisation after each convolution.
    dropout : float
        Dropout2d probability at the end of each pooled encoder stage (0 disables it).
    activation : {"relu", "leakyrelu", "prelu"}
        Non-linearity after each convolution.
    zero_init : bool
        Start the output convolution at zero, so that the maps start empty: for outputs that are
        summed over many pixels (component images and their fluxes), where a random initial
        offset becomes a huge flux error in the first steps.
    """

    dense_output = True

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int = 1,
        depth: int = 3,
        width: int = 16,
        max_width: int | None = None,
        upsample: str = "transpose",
        kernel_size: int = 3,
        batchnorm: bool = True,
        dropout: float = 0.0,
        activation: str = "relu",
        zero_init: bool = False,
    ):
        super().__init__()
        if in_channels < 1 or num_outputs < 1 or depth < 1 or width < 1:
            raise DeepmorphValueError(
                f"UNet: in_channels, num_outputs, depth and width must be positive, got {in_channels}, "
                f"{num_outputs}, {depth}, {width}"
            )
        if max_width is not None and max_width < width:
            raise DeepmorphValueError(f"UNet: max_width ({max_width}) must be at least width ({width})")
        if upsample not in UPSAMPLING:
            raise DeepmorphValueError(f"UNet: upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise DeepmorphValueError(f"UNet: kernel_size must be odd and positive, got {kernel_size}")
        if not 0 <= dropout < 1:
            raise DeepmorphValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
        if activation not in ACTIVATIONS:
            raise DeepmorphValueError(f"UNet: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        self.depth = depth
        widths = [min(width * 2**i, max_width or width * 2**i) for i in range(depth + 1)]
        self.widths = widths
        self.num_features = widths[-1]
        self.blocks = nn.ModuleList()
        channels = in_channels
        for i, w in enumerate(widths):
            stage: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            stage.append(_double_conv(channels, w, kernel_size, batchnorm, activation))
            if i > 0 and dropout > 0:
                stage.append(nn.Dropout2d(dropout))
            self.blocks.append(nn.Sequential(*stage))
            channels = w
        self.head = _Decoder(widths, num_outputs, upsample, kernel_size, batchnorm, activation, zero_init)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (``2 ** depth``)."""
        return 2**self.depth

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps, finest first: stage ``i`` is (B, widths[i], H / 2**i, W / 2**i)."""
        m = self.multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % m or x.shape[-1] % m or min(x.shape[-2:]) < m:
            raise DeepmorphValueError(
                f"UNet expects (B, {self.in_channels}, H, W) images with H and W multiples of {m} "
                f"(depth {self.depth}), got shape {tuple(x.shape)}"
            )
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Decode encoder features into (B, num_outputs, H, W) maps."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, num_outputs, H, W)."""
        return self.forward_head(self.forward_features(x))
