"""A small convolutional classifier/regressor: the lecture's Keras CNN, in PyTorch.

Stages of ``blocks_per_stage`` x (conv -> [batch norm] -> activation), each halving the image
with a 2 x 2 max-pool after its convolutions (``downsample="maxpool"``, the lecture's) or with a
stride of 2 in its first convolution (``downsample="stride"``: 4x fewer operations, about 10x faster
on a CPU), then dropout; then global average pooling, dropout and one linear
layer (``head="pool"``), or, for regression of position- and size-dependent quantities, the
flattened feature map through a hidden layer (``head="flatten"``). An optional
:class:`~deepmorph.models.layers.GaussianNoise` layer comes first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.layers import GaussianNoise, GlobalAvgPool2d
from deepmorph.models.registry import register_model

ACTIVATIONS = ("relu", "leakyrelu", "prelu")


def _activation(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    return nn.PReLU(channels)  # one learned slope per channel


@register_model("cnn")
class SimpleCNN(nn.Module):
    """Convolution stages, each halving the image, then a linear head.

    Parameters
    ----------
    in_channels : int
        Image channels (bands).
    num_outputs : int
        Outputs: classes (logits) for classification, parameters for regression.
    widths : sequence of int
        Channels of each stage; the number of stages is ``len(widths)``, so images must be at
        least ``2 ** len(widths)`` pixels on a side.
    blocks_per_stage : int
        Convolutions per stage.
    kernel_size : int
        Odd side of the convolution kernels, pixels.
    dropout : float
        Dropout probability after each stage and before the linear layer (0 disables it).
    batchnorm : bool
        Batch normalisation after each convolution (then the convolutions have no bias).
    noise_sigma : float
        Standard deviation of the train-time Gaussian noise added to the input (0: none).
    activation : {"relu", "leakyrelu", "prelu"}
        Non-linearity after each convolution.
    head : {"pool", "flatten"}
        ``"pool"``: global average pooling then one linear layer (any image size). ``"flatten"``:
        the whole last feature map, flattened, through a hidden layer of ``hidden`` units (keeps
        where the light is, which sizes and fluxes need; images must be ``image_size`` on a side).
    hidden : int
        Units of the hidden layer of the ``"flatten"`` head.
    image_size : int
        Side of the input images, pixels (``"flatten"`` head only).
    downsample : {"maxpool", "stride"}
        How each stage halves the image: a 2 x 2 max-pool after its convolutions, or a stride of 2
        in its first convolution.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int = 4,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        kernel_size: int = 3,
        dropout: float = 0.25,
        batchnorm: bool = True,
        noise_sigma: float = 0.0,
        activation: str = "relu",
        head: str = "pool",
        hidden: int = 128,
        image_size: int = 64,
        downsample: str = "maxpool",
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if in_channels < 1 or num_outputs < 1 or not widths or min(widths) < 1 or blocks_per_stage < 1:
            raise DeepmorphValueError(
                "SimpleCNN: in_channels, num_outputs, widths and blocks_per_stage must be positive, got "
                f"{in_channels}, {num_outputs}, {widths}, {blocks_per_stage}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise DeepmorphValueError(f"SimpleCNN: kernel_size must be odd and positive, got {kernel_size}")
        if not 0 <= dropout < 1:
            raise DeepmorphValueError(f"SimpleCNN: dropout must be in [0, 1), got {dropout}")
        if activation not in ACTIVATIONS:
            raise DeepmorphValueError(f"SimpleCNN: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if downsample not in ("maxpool", "stride"):
            raise DeepmorphValueError(f"SimpleCNN: downsample must be 'maxpool' or 'stride', got {downsample!r}")
        if head not in ("pool", "flatten"):
            raise DeepmorphValueError(f"SimpleCNN: head must be 'pool' or 'flatten', got {head!r}")
        side = int(image_size) // 2 ** len(widths)
        if head == "flatten" and (side < 1 or int(image_size) % 2 ** len(widths)):
            raise DeepmorphValueError(f"SimpleCNN: a flatten head needs image_size divisible by "
                                      f"{2 ** len(widths)}, got {image_size}")
        self.in_channels = in_channels
        self.image_size = int(image_size) if head == "flatten" else None
        self.num_outputs = num_outputs
        self.num_features = widths[-1]

        self.noise = GaussianNoise(noise_sigma)
        self.blocks = nn.ModuleList()
        channels = in_channels
        for width in widths:
            layers: list[nn.Module] = []
            for block in range(blocks_per_stage):
                stride = 2 if downsample == "stride" and block == 0 else 1
                layers.append(nn.Conv2d(channels, width, kernel_size, stride=stride, padding=kernel_size // 2,
                                        bias=not batchnorm))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(_activation(activation, width))
                channels = width
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            self.blocks.append(nn.Sequential(*layers))
        if head == "pool":
            self.head = nn.Sequential(
                GlobalAvgPool2d(),  # (B, widths[-1], h, w) -> (B, widths[-1])
                nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                nn.Linear(self.num_features, num_outputs),
            )
        else:
            self.head = nn.Sequential(
                nn.Flatten(),  # (B, widths[-1], side, side) -> (B, widths[-1] * side**2)
                nn.Linear(self.num_features * side * side, hidden),
                _activation(activation, hidden),
                nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                nn.Linear(hidden, num_outputs),
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps: (B, in_channels, H, W) -> (B, widths[-1], H // 2**S, W // 2**S), S stages."""
        smallest = 2 ** len(self.blocks)
        if self.image_size is not None and (x.ndim != 4 or tuple(x.shape[-2:]) != (self.image_size,) * 2):
            raise DeepmorphValueError(
                f"SimpleCNN with a flatten head expects {self.image_size}x{self.image_size} images, "
                f"got shape {tuple(x.shape)}"
            )
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < smallest:
            raise DeepmorphValueError(
                f"SimpleCNN expects (B, {self.in_channels}, H, W) images with H, W >= {smallest}, "
                f"got shape {tuple(x.shape)}"
            )
        x = self.noise(x)  # (B, C, H, W)
        for block in self.blocks:
            x = block(x)  # (B, width, H / 2, W / 2) after each stage
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Outputs: (B, widths[-1], h, w) -> (B, num_outputs) (logits for a classifier)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, num_outputs)."""
        return self.forward_head(self.forward_features(x))
