"""Image-recovery pairs: the same galaxy, a PSF wider and noise higher by the requested factors, reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import fftconvolve

from deepmorph.cli import main
from deepmorph.data import open_dataset, summarize
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import Priors
from deepmorph.simulate.pairs import (
    ConvolvedPSF,
    PairSimulator,
    blur_sigma_arcsec,
    convolved_fwhm_arcsec,
    gaussian_kernel,
    read_pairs,
    write_pairs,
)
from deepmorph.simulate.psf import FWHM_PER_SIGMA, GaussianPSF, MoffatPSF
from deepmorph.simulate.render import Renderer
from deepmorph.workflows.runs import dataset_psf
from tests.cli_errors import error_line

ARRAYS = ("images", "noiseless", "original", "original_noiseless")


@pytest.fixture(scope="module")
def sim():
    return PairSimulator(stamp_size=32, psf_factor=2.0, noise_factor=3.0)


@pytest.fixture(scope="module")
def batch(sim):
    return sim.simulate(np.arange(200), seed=4)


def test_items_depend_only_on_seed_and_index(sim, batch):
    again = sim.simulate([7, 3, 150], seed=4)
    for name in ARRAYS:
        assert np.array_equal(again[name], batch[name][[7, 3, 150]]), name
    other = sim.simulate([7], seed=5)
    assert not np.array_equal(other["original"][0], batch["original"][7])
    # one galaxy per item: the degraded and the original simulators drew the same parameters
    cat = sim.original.simulate(np.arange(200), seed=4)["catalog"]
    for col in ("mag", "flux", "bulge_hlr_arcsec", "disk_q", "pa_deg", "x_offset_pix"):
        assert np.array_equal(cat[col], batch["catalog"][col]), col


@pytest.mark.parametrize("psf", [GaussianPSF(0.18), MoffatPSF(0.18, 3.5), MoffatPSF(1.4, 2.5)], ids=str)
@pytest.mark.parametrize("factor", [1.5, 2.0, 2.5])
def test_degraded_psf_fwhm_is_the_requested_multiple(psf, factor):
    sigma = blur_sigma_arcsec(psf, factor)
    assert convolved_fwhm_arcsec(psf, sigma) == pytest.approx(factor * psf.fwhm_arcsec, rel=1e-6)
    if isinstance(psf, GaussianPSF):  # closed form: the variances add
        assert sigma == pytest.approx(psf.fwhm_arcsec / FWHM_PER_SIGMA * math.sqrt(factor**2 - 1), rel=1e-12)
    # independently: the half maximum of the degraded PSF drawn by the renderer on a fine grid
    scale = psf.fwhm_arcsec / 20.0
    degraded = ConvolvedPSF(psf, sigma) if isinstance(psf, MoffatPSF) else GaussianPSF(factor * psf.fwhm_arcsec)
    size = 2 * int(2.5 * factor * 20) + 1
    image = Renderer(size, scale, degraded, "cpu").psf_image(size).numpy().astype(np.float64)
    row = image[size // 2]
    above = np.flatnonzero(row >= 0.5 * row.max())
    lo, hi = above[0], above[-1]  # interpolate the crossings on each side
    left = lo - (row[lo] - 0.5 * row.max()) / (row[lo] - row[lo - 1])
    right = hi + (row[hi] - 0.5 * row.max()) / (row[hi] - row[hi + 1])
    assert (right - left) * scale == pytest.approx(factor * psf.fwhm_arcsec, rel=0.01)


def test_degraded_is_the_original_convolved_with_the_kernel(sim, batch):
    """The stored kernel maps the noise-free original onto the noise-free degraded stamp."""
    kernel = sim.kernel
    assert kernel.sum() == pytest.approx(1.0) and kernel.shape[0] % 2 == 1
    assert sim.kernel_sigma_pix == pytest.approx(blur_sigma_arcsec(sim.original.psf, 2.0) / sim.pixel_scale)
    o, d = batch["original_noiseless"][:, 0].astype(np.float64), batch["noiseless"][:, 0].astype(np.float64)
    m = kernel.shape[0] // 2
    inner = slice(m, -m)  # where the kernel stays inside the stamp
    conv = np.stack([fftconvolve(x, kernel, mode="same") for x in o])[:, inner, inner]
    err = np.linalg.norm((conv - d[:, inner, inner]).reshape(len(o), -1), axis=1) / \
        np.linalg.norm(d[:, inner, inner].reshape(len(o), -1), axis=1)
    assert np.median(err) < 1e-4 and err.max() < 1e-3


def test_degraded_galaxies_are_wider_by_the_kernel():
    """Second moments add under convolution: T_degraded - T_original = 2 sigma_kernel^2 (compact galaxies)."""
    priors = Priors(mag=(19.0, 21.0), log10_bulge_hlr_pix=(0.0, 0.3), log10_disk_hlr_pix=(0.1, 0.4),
                    max_offset_pix=0.0)
    pairs = PairSimulator(stamp_size=48, priors=priors, psf="gaussian:0.18", psf_factor=2.0)
    b = pairs.simulate(np.arange(40), seed=1)
    yy, xx = np.mgrid[0:48, 0:48] - 23.5

    def trace(img):
        w = img.astype(np.float64)
        return ((xx**2 + yy**2) * w).sum(axis=(-2, -1)) / w.sum(axis=(-2, -1))

    grow = trace(b["noiseless"][:, 0]) - trace(b["original_noiseless"][:, 0])
    assert np.all(grow > 0)
    assert np.median(grow / (2 * pairs.kernel_sigma_pix**2)) == pytest.approx(1.0, abs=0.03)


def test_degraded_noise_is_the_requested_multiple_and_independent(sim, batch):
    faint = (batch["original_noiseless"] < 0.05 * sim.sky_sigma_original) & \
        (batch["noiseless"] < 0.05 * sim.sky_sigma_original)
    noise_o = (batch["original"] - batch["original_noiseless"])[faint]
    noise_d = (batch["images"] - batch["noiseless"])[faint]
    assert faint.sum() > 20000
    assert noise_o.std() == pytest.approx(sim.sky_sigma_original, rel=0.02)
    assert noise_d.std() / noise_o.std() == pytest.approx(3.0, rel=0.02)
    assert abs(np.corrcoef(noise_o, noise_d)[0, 1]) < 0.02  # no network can learn one noise field from the other
    assert sim.sky_sigma_degraded == pytest.approx(3.0 * sim.sky_sigma_original)
    assert sim.sky_sigma_original == pytest.approx(sim.original.default_sky_sigma)  # the survey's depth


def test_gaussian_kernel():
    k = gaussian_kernel(1.5)
    assert k.shape == (13, 13) and k.sum() == pytest.approx(1.0)
    yy, xx = np.mgrid[-6:7, -6:7]
    assert (k * xx**2).sum() == pytest.approx(1.5**2, rel=1e-3)  # truncated at 4 sigma
    assert gaussian_kernel(0.0).tolist() == [[1.0]]
    with pytest.raises(DeepmorphValueError):
        gaussian_kernel(-1.0)


def test_write_read_and_command_line(tmp_path, capsys):
    path = write_pairs(tmp_path / "pairs.h5", 30, seed=2, stamp_size=32, noise_factor=1.5, batch_size=16,
                       progress=False)
    data = read_pairs(path)
    direct = PairSimulator(stamp_size=32, noise_factor=1.5).simulate(np.arange(30), seed=2)
    for name in ("images", "original", "original_noiseless"):
        assert np.array_equal(data[name], direct[name]), name
    part = read_pairs(path, [5, 2])
    assert np.array_equal(part["original"], direct["original"][[5, 2]])
    assert list(part["catalog"]["id"]) == [5, 2]
    a = data["attrs"]
    assert a["psf_factor"] == 2.0 and a["noise_factor"] == 1.5 and a["pair_format"] == "deepmorph.pairs"
    assert a["psf"]["type"] == "convolved" and a["psf_original"]["type"] == "moffat"
    assert a["sky_sigma_degraded"] == pytest.approx(1.5 * a["sky_sigma_original"])
    assert data["rl_kernel"].sum() == pytest.approx(1.0)
    assert data["psf_degraded"].max() < data["psf_original"].max()  # the wider PSF has the lower peak
    assert "30 stamps" in summarize(path)
    # the degraded PSF the file records is rebuilt (deepmorph info, dataset_psf) as the simulator drew it
    assert "PSF:         Moffat, FWHM 0.18 arcsec, beta 3.5 convolved with a Gaussian of sigma" in summarize(path)
    rebuilt = dataset_psf(path, size=data["psf_degraded"].shape[-1])
    np.testing.assert_allclose(rebuilt, data["psf_degraded"], atol=1e-6)

    # the command line writes the same file
    out = tmp_path / "cli.h5"
    assert main(["simulate-pairs", "--out", str(out), "--n", "30", "--seed", "2", "--stamp-size", "32",
                 "--noise-factor", "1.5", "--no-progress"]) == 0
    with open_dataset(out) as ds:
        assert np.array_equal(ds.images[...], data["images"])
    capsys.readouterr()
    for args, message in (
        (["--psf-factor", "0.5"], "psf_factor"),
        (["--noise-factor", "-1"], "noise_factor"),
        (["--psf", "none"], "analytic original PSF"),
    ):
        assert main(["simulate-pairs", "--out", str(tmp_path / "bad.h5"), "--n", "4", "--stamp-size", "32",
                     "--no-progress", *args]) == 2
        assert message in error_line(capsys)
    assert main(["simulate-pairs", "--out", str(out), "--n", "4", "--stamp-size", "32", "--no-progress"]) == 2
    assert "exists" in error_line(capsys)
    with pytest.raises(DeepmorphIOError, match="not an image-recovery pairs file"):
        from deepmorph.simulate.anomalies import write_benchmark

        read_pairs(write_benchmark(tmp_path / "plain.h5", 4, 0, progress=False))
