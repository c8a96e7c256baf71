"""torchvision's ResNet-18, trained from scratch, with the registry's interface.

He et al. 2016, "Deep Residual Learning for Image Recognition". For small stamps
(``small_input=True``, the default) the 7 x 7 stride-2 stem and its max-pool are replaced by one
3 x 3 stride-1 convolution, as for CIFAR, so a 64 x 64 stamp reaches the last stage at 8 x 8
instead of 2 x 2.
"""

from __future__ import annotations

import torch
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.layers import GlobalAvgPool2d
from deepmorph.models.registry import register_model


@register_model("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 split into ``blocks`` (stem, then the four residual stages) and a linear ``head``.

    Parameters
    ----------
    in_channels : int
        Image channels (bands).
    num_outputs : int
        Outputs (class logits or regressed parameters).
    small_input : bool
        Use a 3 x 3 stride-1 stem without max-pool (stamps of tens of pixels) instead of
        ImageNet's 7 x 7 stride-2 stem and max-pool.
    """

    def __init__(self, in_channels: int = 1, num_outputs: int = 4, small_input: bool = True):
        super().__init__()
        from torchvision.models import resnet18  # deferred: torchvision is slow to import

        if in_channels < 1 or num_outputs < 1:
            raise DeepmorphValueError(f"ResNet18: in_channels and num_outputs must be positive, got "
                                      f"{in_channels}, {num_outputs}")
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        self.num_features = 512
        net = resnet18(weights=None, num_classes=num_outputs)
        if small_input:
            stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), net.bn1, net.relu)
        else:
            conv = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            stem = nn.Sequential(conv, net.bn1, net.relu, net.maxpool)
        nn.init.kaiming_normal_(stem[0].weight, mode="fan_out", nonlinearity="relu")
        self.blocks = nn.ModuleList([stem, net.layer1, net.layer2, net.layer3, net.layer4])
        self.head = nn.Sequential(GlobalAvgPool2d(), net.fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 512, H / 8, W / 8) (H / 32 with the ImageNet stem)."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 512, h, w) -> (B, num_outputs)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, num_outputs)."""
        return self.forward_head(self.forward_features(x))
