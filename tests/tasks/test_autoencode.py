"""The autoencoding task: likelihoods, the KL warm-up schedule, and a VAE whose loss falls as it trains."""

from __future__ import annotations

import math

import pytest
import torch

from deepmorph.errors import DeepmorphError
from deepmorph.models import ConvVAE
from deepmorph.tasks.autoencode import AutoencodeTask, kl_warmup_weight, negative_log_likelihood
from deepmorph.training import RunConfig, build_model, fit
from tests.training.toys import discs_and_bars

CONFIG = RunConfig(model={"name": "vae", "kwargs": {"image_size": 16, "latent_dim": 4, "widths": [8, 16]}},
                   optimizer={"lr": 3e-3}, epochs=6, batch_size=32, progress_bar=False, accelerator="cpu",
                   early_stopping={"enabled": False})


def test_warmup_schedule_values():
    assert [kl_warmup_weight(e, 4) for e in (0, 1, 2, 3, 4, 9)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_warmup_weight(1.5, 3) == pytest.approx(0.5)
    assert kl_warmup_weight(0, 0) == 1.0 and kl_warmup_weight(-1, 2) == 0.0


def test_likelihoods_of_known_cases():
    x = torch.zeros(2, 1, 4, 4)
    # A perfect reconstruction at unit scale: only the normalising constants, 16 pixels per image.
    torch.testing.assert_close(negative_log_likelihood(x, x, torch.zeros(1)),
                               torch.full((2,), 8 * math.log(2 * math.pi)))
    torch.testing.assert_close(negative_log_likelihood(x, x, torch.zeros(1), "laplace"),
                               torch.full((2,), 16 * math.log(2.0)))
    # One pixel off by 2 at sigma = 2: (0.5 * 1 + 16 * (log 2 + 0.5 log 2 pi)).
    mean = x.clone()
    mean[0, 0, 1, 1] = 2.0
    nll = negative_log_likelihood(x, mean, torch.full((1,), math.log(2.0)))
    assert nll[0].item() == pytest.approx(0.5 + 16 * (math.log(2.0) + 0.5 * math.log(2 * math.pi)), rel=1e-6)
    with pytest.raises(DeepmorphError, match="likelihood"):
        negative_log_likelihood(x, x, torch.zeros(1), "poisson")


def _loader(images: torch.Tensor, shuffle: bool):
    items = [{"image": img, "index": i} for i, img in enumerate(images)]
    return torch.utils.data.DataLoader(items, batch_size=32, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_vae_loss_falls_and_warmup_is_logged(tmp_path, likelihood):
    train, _ = discs_and_bars(256, 16, seed=0)
    val, _ = discs_and_bars(64, 16, seed=1)
    task = AutoencodeTask(build_model(CONFIG, in_channels=1, num_outputs=1), CONFIG, likelihood=likelihood,
                          beta=1.0, kl_warmup=3)
    history = fit(task, _loader(train, True), _loader(val, False), CONFIG, tmp_path)
    assert {"loss", "val_loss", "recon", "val_recon", "kl", "val_kl", "mse", "kl_weight"} <= set(history.keys())
    assert history["val_loss"][-1] < 0.9 * history["val_loss"][0]
    assert history["val_mse"][-1] < 0.6 * history["val_mse"][0]
    # Per-step linear warm-up over 3 epochs: epoch means 1/6, 1/2, 5/6, then 1.
    weights = history["kl_weight"]
    assert weights[0] < weights[1] < weights[2] < 1.0 and weights[3:] == pytest.approx([1.0] * 3)
    assert weights[1] == pytest.approx(0.5, abs=0.05)
    # Validation uses the full KL weight: val_loss = val_recon + beta * val_kl.
    assert history["val_loss"][0] == pytest.approx(history["val_recon"][0] + history["val_kl"][0], rel=1e-4)


def test_autoencoder_has_no_kl_and_options_are_checked():
    ae_config = CONFIG.with_overrides({"model.name": "ae"})
    ae = AutoencodeTask(build_model(ae_config, in_channels=1, num_outputs=1), ae_config, scale=0.5)
    assert not ae.variational and torch.exp(ae.current_log_scale()).item() == pytest.approx(0.5)
    terms = ae.terms(torch.randn(4, 1, 16, 16), sample=True)
    assert torch.equal(terms["kl"], torch.zeros(4))
    model = ConvVAE(image_size=16, latent_dim=2, widths=(8,))
    for kwargs, match in (({"likelihood": "cauchy"}, "likelihood"), ({"beta": -1.0}, "beta"),
                          ({"kl_warmup": -2.0}, "kl_warmup"), ({"scale": 0.0}, "scale")):
        with pytest.raises(DeepmorphError, match=match):
            AutoencodeTask(model, CONFIG, **kwargs)
    with pytest.raises(DeepmorphError, match="encode"):
        AutoencodeTask(torch.nn.Linear(2, 2), CONFIG)


def test_aligned_model_reconstructs_the_aligned_image():
    from deepmorph.models.vae import rotate_images

    config = CONFIG.with_overrides({"model.kwargs.align": True})
    model = build_model(config, in_channels=1, num_outputs=1)
    assert model.align
    task = AutoencodeTask(model, config)
    images, _ = discs_and_bars(8, 16, seed=2)
    terms = task.terms(images, sample=False)
    expected = rotate_images(images, model.pose(images))
    torch.testing.assert_close(terms["target"], expected)
    torch.testing.assert_close(terms["recon"], negative_log_likelihood(expected, terms["mean"],
                                                                       task.current_log_scale()))
    plain = AutoencodeTask(build_model(CONFIG, in_channels=1, num_outputs=1), CONFIG)
    assert torch.equal(plain.terms(images, sample=False)["target"], images)
