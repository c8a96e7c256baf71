"""Layers that PyTorch lacks and the lecture uses."""

from __future__ import annotations

import torch
from torch import nn

from deepmorph.errors import DeepmorphValueError


class GaussianNoise(nn.Module):
    """Add zero-mean Gaussian noise of standard deviation ``sigma`` during training only (Keras' layer).

    In evaluation mode the layer is the identity. Placed first in a network it makes the model
    robust to the noise level of the images (the lecture's ``GaussianNoise(0.01)``); the noise
    comes from torch's global generator, like dropout's.

    Parameters
    ----------
    sigma : float
        Standard deviation of the added noise, in the units of the layer's input (for a first
        layer: the normalised pixel values). 0 makes the layer the identity.
    """

    def __init__(self, sigma: float):
        super().__init__()
        if not sigma >= 0:
            raise DeepmorphValueError(f"GaussianNoise: sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sigma > 0:
            return x + self.sigma * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class GlobalAvgPool2d(nn.Module):
    """Mean over the image: (B, C, H, W) -> (B, C).

    The same as ``AdaptiveAvgPool2d(1)`` + ``Flatten()``, but its CUDA backward is deterministic, so
    training runs under ``torch.use_deterministic_algorithms(True)`` (AdaptiveAvgPool2d's raises there).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))
