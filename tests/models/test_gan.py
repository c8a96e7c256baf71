"""DCGAN generator, discriminator and encoder: shapes, spectral norm, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.models import create_model, list_models
from deepmorph.models.gan import GAN, DCGANDiscriminator, DCGANEncoder, DCGANGenerator, has_spectral_norm, stages


@pytest.mark.parametrize("size", [32, 48, 64, 128])
def test_shapes_and_ranges(size):
    gan = create_model("dcgan", latent_dim=8, image_size=size, g_width=8, d_width=8, encoder=True)
    z = torch.randn(3, 8)
    x = gan(z)
    assert x.shape == (3, 1, size, size)
    assert float(x.detach().abs().max()) <= 1.0
    assert gan.discriminator(x).shape == (3, 1)
    n, base = stages(size)
    feats = gan.discriminator.features(x)
    assert feats.shape == (3, 8 * 2 ** (n - 1) * base * base) == (3, gan.discriminator.num_features)
    assert [f.shape[-1] for f in gan.discriminator.intermediate(x)] == [size // 2 ** (k + 1) for k in range(n)]
    logits, f2 = gan.discriminator.logits_and_features(x)
    assert logits.shape == (3,) and torch.allclose(f2, feats)
    assert gan.encoder(x).shape == (3, 8)


def test_stages_and_bad_sizes():
    assert stages(32) == (3, 4) and stages(48) == (4, 3) and stages(40) == (3, 5)
    for bad in (12, 36, 33):
        with pytest.raises(DeepmorphValueError):
            stages(bad)
    g = DCGANGenerator(latent_dim=4, image_size=32, width=8)
    with pytest.raises(DeepmorphValueError, match="latents"):
        g(torch.randn(2, 5))
    d = DCGANDiscriminator(image_size=32, width=8)
    with pytest.raises(DeepmorphValueError, match="expects"):
        d(torch.randn(2, 1, 48, 48))
    with pytest.raises(DeepmorphValueError, match="norm"):
        DCGANDiscriminator(norm="instance")


def test_spectral_norm_present_only_when_asked():
    sn = DCGANDiscriminator(image_size=32, width=8, norm="none", spectral_norm=True)
    plain = DCGANDiscriminator(image_size=32, width=8)
    assert has_spectral_norm(sn) and not has_spectral_norm(plain)
    convs = [m for m in sn.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    # spectral norm bounds each layer's largest singular value by ~1 after a few power iterations
    sn.train()
    x = torch.randn(4, 1, 32, 32)
    for _ in range(20):
        sn(x)
    w = sn.head[-1].weight
    assert float(torch.linalg.matrix_norm(w.detach(), ord=2)) == pytest.approx(1.0, rel=0.05)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in sn.modules())


def test_registered_and_deterministic():
    assert {"dcgan", "dcgan_generator", "dcgan_discriminator", "dcgan_encoder"} <= set(list_models())
    torch.manual_seed(0)
    a = create_model("dcgan", latent_dim=8, image_size=32, g_width=8, d_width=8).eval()
    torch.manual_seed(0)
    b = create_model("dcgan", latent_dim=8, image_size=32, g_width=8, d_width=8).eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    z = torch.randn(5, 8)
    assert torch.equal(a(z), b(z))
    assert torch.equal(a(z), a(z))
    e = DCGANEncoder(latent_dim=8, image_size=32, width=8).eval()
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(e(x), e(x))


def test_observe_adds_the_survey_noise_differentiably():
    gan = GAN(latent_dim=4, image_size=32, g_width=4, d_width=4, noise_sigma=0.5, poisson_scale=0.01, data_scale=8.0)
    assert gan.adds_noise
    gen = torch.Generator().manual_seed(0)
    sky = torch.zeros(64, 1, 32, 32)
    flux = torch.sinh(gan.observe(sky, generator=gen) * 8.0)
    assert float(flux.std()) == pytest.approx(0.5, rel=0.03) and abs(float(flux.mean())) < 0.02
    bright = torch.full((64, 1, 32, 32), float(torch.asinh(torch.tensor(100.0)) / 8.0), requires_grad=True)
    seen = gan.observe(bright, generator=torch.Generator().manual_seed(1))
    # sky plus Poisson: variance 0.5^2 + 0.01 * 100
    assert float(torch.sinh(seen * 8.0).std()) == pytest.approx(np.sqrt(0.25 + 1.0), rel=0.03)
    seen.sum().backward()
    assert torch.isfinite(bright.grad).all() and float(bright.grad.abs().mean()) > 0
    again = gan.observe(bright.detach(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, seen.detach())
    quiet = GAN(latent_dim=4, image_size=32, g_width=4, d_width=4)
    assert not quiet.adds_noise and quiet.observe(sky) is sky
    with pytest.raises(DeepmorphValueError, match="noise_sigma"):
        GAN(noise_sigma=-1.0)
