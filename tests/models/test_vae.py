"""The convolutional autoencoder and VAE: shapes over stamp sizes, the KL term, reproducible builds and samples."""

from __future__ import annotations

import math

import pytest
import torch

from deepmorph.errors import DeepmorphError
from deepmorph.models import ConvAE, ConvVAE, create_model, kl_divergence, list_models
from deepmorph.training import RunConfig, build_model


@pytest.mark.parametrize(("size", "widths", "upsample"), [
    (32, (8, 16), "transpose"), (48, (8, 16, 16, 32), "nearest"), (64, (8, 16, 32), "bilinear"),
    (128, (4, 8, 8, 16, 16), "transpose"),
])
def test_shapes_over_stamp_sizes(size, widths, upsample):
    vae = create_model("vae", in_channels=2, image_size=size, latent_dim=5, widths=widths, upsample=upsample)
    x = torch.randn(3, 2, size, size)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    assert vae.forward_features(x).shape == (3, widths[-1], size // 2 ** len(widths), size // 2 ** len(widths))
    assert vae.decode(mu).shape == vae(x).shape == (3, 2, size, size)
    assert vae.sample(4, torch.Generator().manual_seed(0)).shape == (4, 2, size, size)
    assert len(vae.blocks) == len(widths) and vae.num_outputs == vae.in_channels == 2


def test_autoencoder_is_deterministic_and_registered():
    assert {"ae", "vae"} <= set(list_models())
    ae = create_model("ae", in_channels=1, image_size=32, latent_dim=3, widths=(8, 16))
    assert isinstance(ae, ConvAE) and not ae.variational
    code, logvar = ae.encode(torch.randn(2, 1, 32, 32))
    assert code.shape == (2, 3) and logvar is None
    assert torch.equal(ae.reparameterize(code, logvar), code)


def test_bad_sizes_and_inputs_are_one_line_errors():
    with pytest.raises(DeepmorphError, match="multiple of"):
        ConvVAE(image_size=40, widths=(8, 16, 32, 64))
    with pytest.raises(DeepmorphError, match="upsample"):
        ConvVAE(image_size=32, upsample="cubic")
    vae = ConvVAE(image_size=32, latent_dim=2, widths=(8, 16))
    with pytest.raises(DeepmorphError, match="expects"):
        vae(torch.zeros(1, 1, 64, 64))
    with pytest.raises(DeepmorphError, match="codes"):
        vae.decode(torch.zeros(1, 3))


def test_kl_of_known_cases():
    zero = torch.zeros(1, 4)
    assert kl_divergence(zero, zero).item() == 0.0
    # 0.5 * sum(mu^2) for unit variances.
    assert kl_divergence(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)
    # Variance 2, mean 0: 0.5 * (2 - 1 - ln 2) per dimension.
    logvar = torch.full((1, 3), math.log(2.0))
    assert kl_divergence(torch.zeros(1, 3), logvar).item() == pytest.approx(1.5 * (1.0 - math.log(2.0)))
    # Agrees with torch.distributions on random posteriors.
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl_divergence(mu, logvar), torch.distributions.kl_divergence(q, p).sum(-1))


def test_reparameterisation_statistics_and_seeds():
    mu, logvar = torch.full((20000, 2), 3.0), torch.full((20000, 2), math.log(4.0))
    z = ConvVAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(3.0, abs=0.05) and z.std().item() == pytest.approx(2.0, abs=0.05)
    again = ConvVAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    other = ConvVAE.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(z, again) and not torch.equal(z, other)


def test_builds_are_reproducible_from_the_seed():
    def config(seed):
        return RunConfig(model={"name": "vae", "kwargs": {"image_size": 32, "latent_dim": 4, "widths": [8, 16]}},
                         seed=seed)

    a, b, c = (build_model(config(s), in_channels=1, num_outputs=1) for s in (3, 3, 4))
    x = torch.randn(2, 1, 32, 32)
    for m in (a, b, c):
        m.eval()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
