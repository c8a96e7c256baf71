"""Plain :class:`torch.nn.Module` models, built by name: ``create_model("cnn", num_outputs=4)``.

Registered models (see :mod:`deepmorph.models.registry` for the interface they share):

- ``cnn``: :class:`SimpleCNN`, the lecture's small CNN;
- ``resnet18``: :class:`ResNet18`, torchvision's ResNet-18 trained from scratch;
- ``unet``: :class:`UNet`, an encoder-decoder for per-pixel maps (clumps, bulge and disk images);
- ``dcgan`` (and ``dcgan_generator``, ``dcgan_discriminator``, ``dcgan_encoder``): :class:`GAN`, a DCGAN
  for stamps with the f-AnoGAN encoder;
- ``vae`` and ``ae``: :class:`ConvVAE` and :class:`ConvAE`, a convolutional (variational) autoencoder;
- ``patchgan``: :class:`PatchDiscriminator`, pix2pix's conditional patch discriminator (image recovery).

:func:`predict_tiled` runs an image-to-image network over an image of any size in overlapping tiles.
"""

from deepmorph.models.cnn import SimpleCNN
from deepmorph.models.gan import GAN, DCGANDiscriminator, DCGANEncoder, DCGANGenerator
from deepmorph.models.layers import GaussianNoise, GlobalAvgPool2d
from deepmorph.models.patchgan import PatchDiscriminator
from deepmorph.models.registry import create_model, list_models, register_model
from deepmorph.models.resnet import ResNet18
from deepmorph.models.tiling import predict_tiled
from deepmorph.models.unet import UNet
from deepmorph.models.vae import ConvAE, ConvVAE, kl_divergence

__all__ = [
    "GAN", "DCGANDiscriminator", "DCGANEncoder", "DCGANGenerator",
    "GaussianNoise", "GlobalAvgPool2d", "ResNet18", "SimpleCNN", "UNet", "create_model", "list_models", "predict_tiled",
    "register_model",
    "ConvAE", "ConvVAE", "PatchDiscriminator", "kl_divergence",
]
