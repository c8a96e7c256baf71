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


def _ellipse(theta: float, size: int = 32, q: float = 0.4, sigma: float = 4.0) -> torch.Tensor:
    """A noiseless elliptical Gaussian (1, size, size), major axis at ``theta`` radians from +x."""
    c = torch.arange(size, dtype=torch.float32) - 0.5 * (size - 1)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    return torch.exp(-0.5 * (u**2 + (v / q) ** 2) / sigma**2)[None]


def test_pose_angle_and_rotation_align_the_major_axis():
    from deepmorph.models.vae import pose_angle, rotate_images

    thetas = [0.0, 0.4, -1.1, 1.5]
    images = torch.stack([_ellipse(t) for t in thetas])
    torch.testing.assert_close(pose_angle(images), torch.tensor(thetas), atol=1e-3, rtol=0)
    aligned = rotate_images(images, pose_angle(images))
    assert (aligned - _ellipse(0.0)).abs().max() < 0.05  # bilinear resampling only
    assert pose_angle(aligned).abs().max() < 5e-3
    # Sky noise does not move the angle much for an elongated galaxy; an empty stamp gives 0.
    noisy = images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pose_angle(noisy), torch.tensor(thetas), atol=0.05, rtol=0)
    assert pose_angle(torch.zeros(1, 1, 32, 32)).item() == 0.0


def test_aligned_vae_codes_ignore_orientation():
    torch.manual_seed(0)
    plain = ConvVAE(image_size=32, latent_dim=6, widths=(8, 16)).eval()
    aligned = ConvVAE(image_size=32, latent_dim=6, widths=(8, 16), align=True).eval()
    aligned.load_state_dict(plain.state_dict())  # same weights: only the pose normalisation differs
    assert aligned.align and not plain.align and ConvAE(image_size=32, widths=(8, 16), align=True).align
    galaxy = _ellipse(0.3)[None]
    turned = torch.cat([_ellipse(0.3 + a)[None] for a in (0.7, -1.2, math.pi / 2)])
    with torch.no_grad():
        ref, far = aligned.encode(galaxy)[0], plain.encode(galaxy)[0]
        spread_aligned = (aligned.encode(turned)[0] - ref).norm(dim=1).max()
        spread_plain = (plain.encode(turned)[0] - far).norm(dim=1).min()
        # The reconstruction is of the aligned image, the pose is what was removed.
        assert aligned(galaxy).shape == (1, 1, 32, 32)
        torch.testing.assert_close(aligned.pose(turned), torch.tensor([1.0, -0.9, 0.3 + math.pi / 2 - math.pi]),
                                   atol=2e-3, rtol=0)
        assert torch.equal(plain.pose_normalize(galaxy), galaxy)
    assert spread_aligned < 0.1 * spread_plain
