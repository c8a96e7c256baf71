"""The simulator as users drive it: reproducibility, noise at the survey's depth, clumps,
neighbours, labels, and clear errors for bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import (
    LABEL_NAMES,
    SURVEYS,
    GaussianNoise,
    PointSources,
    Priors,
    Simulator,
    morphology_label,
    parse_psf,
    read_background,
)


def test_same_seed_same_output_whatever_the_batch():
    sim = Simulator("candels-f160w", 32, clumps=True, neighbors=True)
    whole = sim.simulate(range(40), seed=7)
    parts = [sim.simulate(range(a, a + 8), seed=7) for a in range(0, 40, 8)]
    np.testing.assert_array_equal(whole["images"], np.concatenate([p["images"] for p in parts]))
    single = sim.simulate([33], seed=7)
    np.testing.assert_array_equal(single["images"][0], whole["images"][33])
    for key in whole["catalog"]:
        np.testing.assert_array_equal(single["catalog"][key][0], whole["catalog"][key][33])
    again = sim.simulate(range(40), seed=7)
    np.testing.assert_array_equal(again["images"], whole["images"])
    other = sim.simulate(range(40), seed=8)
    assert not np.allclose(other["images"], whole["images"])


def test_priors_are_respected():
    sim = Simulator("candels-f160w", 32, noise="none")
    cat = sim.simulate(range(2000), seed=1)["catalog"]
    assert 18 <= cat["mag"].min() and cat["mag"].max() <= 24
    assert 1 <= cat["bulge_n"].min() and cat["bulge_n"].max() <= 6
    assert 0.05 <= cat["disk_q"].min() and cat["disk_q"].max() <= 0.95
    log_rd = np.log10(cat["disk_hlr_arcsec"] / 0.06)
    assert 0.2 <= log_rd.min() and log_rd.max() <= 1.5
    # Uniform: each decile of B/T holds ~10% of the draws.
    counts, _ = np.histogram(cat["bulge_to_total"], bins=10, range=(0, 1))
    assert counts.min() > 150 and counts.max() < 250
    np.testing.assert_allclose(cat["flux"], 10 ** (-0.4 * (cat["mag"] - 25.95)))


def test_gaussian_noise_has_the_requested_sigma_and_poisson_term():
    sim = Simulator("candels-f160w", 32, noise=GaussianNoise(sky_sigma=0.5, gain_e_per_count=2.0),
                    priors=Priors(mag=(15.0, 15.5)))
    batch = sim.simulate(range(200), seed=3)
    resid = batch["images"] - batch["noiseless"]
    model = batch["noiseless"]
    expected = np.sqrt(0.25 + np.clip(model, 0, None) / 2.0)
    z = resid / expected
    assert z.std() == pytest.approx(1.0, abs=0.01)
    assert abs(z.mean()) < 0.01
    bright = model > 50
    assert z[bright].std() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("survey", sorted(SURVEYS))
def test_default_noise_puts_point_sources_at_the_preset_depth(survey):
    """A point source at the 5-sigma depth has S/N = 5 in an optimal (PSF-weighted) measurement."""
    sim = Simulator(survey, 48)
    psf = sim.renderer.psf_image(48).double().numpy()
    sigma = sim.noise.sky_sigma
    flux = 10 ** (-0.4 * (SURVEYS[survey].depth_5sigma_mag - SURVEYS[survey].zeropoint_mag))
    snr = flux * math.sqrt((psf**2).sum()) / sigma
    assert snr == pytest.approx(5.0, rel=0.01)


def test_psf_image_has_the_requested_fwhm():
    sim = Simulator("sdss-r", 48, psf="gaussian:2.0", pixel_scale_arcsec=0.2)
    img = sim.renderer.psf_image(48).double().numpy()
    assert img.sum() == pytest.approx(1.0, abs=1e-5)
    # Pixel-convolved Gaussian: sigma^2 = (FWHM / 2.3548 / scale)^2 + 1/12 in each axis.
    yy, xx = np.indices(img.shape)
    var = (img * (xx - 23.5) ** 2).sum()
    assert var == pytest.approx((2.0 / 2.35482 / 0.2) ** 2 + 1 / 12, rel=1e-3)


def test_clumps_are_where_the_catalogue_says_with_their_flux():
    sim = Simulator("candels-f160w", 64, clumps=True, components=True, noise="none",
                    priors=Priors(clumpy_fraction=1.0, n_clumps=(1, 3)))
    batch = sim.simulate(range(30), seed=5)
    table = batch["clump_table"]
    smooth = batch["bulge"] + batch["disk"]
    clumps_only = batch["noiseless"] - smooth
    assert (batch["catalog"]["n_clumps"] >= 1).all()
    # Clump light in the stamp equals the catalogued clump flux (PSF wings aside).
    per_galaxy = np.bincount(table["id"], weights=table["flux"], minlength=30)
    np.testing.assert_allclose(clumps_only.sum(axis=(1, 2, 3)), per_galaxy, rtol=0.01)
    # Every catalogued clump lies inside the mask.
    c = 31.5
    xs = np.round(table["x_pix"] + c).astype(int)
    ys = np.round(table["y_pix"] + c).astype(int)
    assert batch["clump_mask"][table["id"], 0, ys, xs].all()
    # The mask covers little of the galaxy: max(1, FWHM/2) pixels around each clump.
    assert batch["clump_mask"].mean() < 0.02


def test_neighbours_are_rendered_and_masked():
    sim = Simulator("candels-f160w", 64, neighbors=True, noise="none",
                    priors=Priors(neighbor_fraction=1.0, neighbor_dmag=(-1.0, -0.5)))
    batch = sim.simulate(range(20), seed=9)
    assert (batch["catalog"]["n_neighbors"] >= 1).all()
    table = batch["neighbor_table"]
    c = 31.5
    xs = np.clip(np.round(table["x_pix"] + c).astype(int), 0, 63)
    ys = np.clip(np.round(table["y_pix"] + c).astype(int), 0, 63)
    # Bright companions dominate their own centres.
    assert batch["neighbor_mask"][table["id"], 0, ys, xs].mean() > 0.9
    assert batch["neighbor_mask"][:, 0, 30:34, 30:34].mean() < 0.05


def test_morphology_labels_follow_the_documented_rule():
    labels = morphology_label(np.array([0.8, 0.2, 0.2, 0.9]), np.array([0.9, 0.8, 0.2, 0.9]),
                              np.array([0.0, 0.0, 0.0, 0.2]))
    assert [LABEL_NAMES[i] for i in labels] == ["spheroid", "disk", "edge-on", "clumpy"]
    cat = Simulator("candels-f160w", 32, clumps=True).simulate(range(500), seed=0)["catalog"]
    assert set(np.unique(cat["label"])) == {0, 1, 2, 3}


def test_balanced_classes_are_balanced_and_agree_with_the_label_rule():
    from deepmorph.simulate.priors import draw_galaxies

    priors = Priors(balanced_classes=True)
    sim = Simulator("candels-f160w", 32, clumps=True, priors=priors)
    cat = sim.simulate(range(2000), seed=4)["catalog"]
    drawn = draw_galaxies(4, torch.arange(2000), priors, sim.zeropoint, 32, clumps=True)["class"].numpy()
    np.testing.assert_array_equal(cat["label"], drawn)
    counts = np.bincount(cat["label"], minlength=4)
    assert counts.min() > 430 and counts.max() < 570
    # Margins around the rule's thresholds make every label unambiguous.
    assert np.all(np.abs(cat["bulge_to_total"] - 0.6) >= 0.2)
    disks = cat["label"] != 0
    assert np.all(np.abs(cat["disk_q"][disks] - 0.35) >= 0.05)


def test_real_background_cutouts_are_added(ntt_image_file):
    bg = read_background(ntt_image_file)
    sim = Simulator("candels-f160w", 32, noise=bg)
    batch = sim.simulate(range(10), seed=0)
    diff = batch["images"] - batch["noiseless"]
    assert not np.allclose(diff[0], diff[1])
    # Each difference is a cutout of the (median-subtracted) real frame.
    cut = diff[0, 0]
    found = any(
        np.allclose(bg.image[y:y + 32, x:x + 32], cut, atol=1e-3)
        for y in range(bg.image.shape[0] - 31) for x in range(bg.image.shape[1] - 31)
        if abs(bg.image[y, x] - cut[0, 0]) < 1e-3
    )
    assert found


# -- bad input ------------------------------------------------------------------------------------

def test_unknown_survey_lists_the_known_ones():
    with pytest.raises(DeepmorphValueError, match="unknown survey 'lsst-z'.*candels-f160w"):
        Simulator("lsst-z")


@pytest.mark.parametrize("bad", [{"bulge_n": (-1.0, 3.0)}, {"bulge_n": (1.0, 8.0)}, {"mag": (24.0, 18.0)},
                                 {"disk_ellipticity": (0.1, 1.2)}, {"clumpy_fraction": 2.0},
                                 {"neighbor_fraction": -0.5}, {"clump_flux_fraction": (-1.0, 2.0)},
                                 {"max_neighbors": -1}, {"max_offset_pix": -3.0}])
def test_bad_priors_are_refused(bad):
    with pytest.raises(DeepmorphValueError, match="prior"):
        Priors(**bad)


def test_bad_psf_specifications(tmp_path):
    with pytest.raises(DeepmorphIOError, match="nope.fits: PSF file not found"):
        parse_psf(str(tmp_path / "nope.fits"))
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"this is not a FITS file")
    with pytest.raises((DeepmorphIOError, DeepmorphValueError), match="broken.fits"):
        parse_psf(f"{broken}@0.03")
    with pytest.raises(DeepmorphValueError, match="bad PSF"):
        parse_psf("moffat:abc")
    with pytest.raises(DeepmorphValueError, match="positive"):
        parse_psf("gaussian:-1")


def test_psf_image_without_pixel_scale_asks_for_one(hst_psf_file):
    with pytest.raises(DeepmorphValueError, match="pixel scale"):
        parse_psf(f"{hst_psf_file}:1")
    psf = parse_psf(f"{hst_psf_file}:1@0.03")
    assert psf.image.dtype.byteorder in "=|" and psf.image.sum() == pytest.approx(1.0)


def test_nan_background_is_refused():
    from deepmorph.simulate import BackgroundNoise

    img = np.zeros((50, 50), dtype=">f4")
    img[3, 4] = np.nan
    with pytest.raises(DeepmorphValueError, match="bg.fits: background image has NaN"):
        BackgroundNoise(img, source="bg.fits")


def test_sersic_index_outside_the_table_is_refused():
    from deepmorph.simulate import Renderer, Sersic

    one = torch.ones(1, dtype=torch.float64)
    comp = Sersic(one, one * 3, one, one * 0, one * 0, one * 0, one * -1.0)
    with pytest.raises(DeepmorphValueError, match="Sersic index"):
        Renderer(32, 0.1, None).render({"g": comp}, {"i": ("g",)})


def test_bad_counts_and_seeds():
    sim = Simulator("candels-f160w", 32)
    with pytest.raises(DeepmorphValueError, match="empty"):
        sim.simulate([], seed=0)
    with pytest.raises(DeepmorphValueError, match="seed"):
        sim.simulate(range(3), seed=-1)
    with pytest.raises(DeepmorphValueError, match="stamp size"):
        Simulator("candels-f160w", 4)


def test_point_sources_render_as_the_psf():
    sim = Simulator("hsc-i", 32)
    z = torch.zeros(1, 1, dtype=torch.float64)
    img = sim.renderer.render({"s": PointSources(z + 10.0, z, z)}, {"i": ("s",)})["i"][0]
    np.testing.assert_allclose(img.numpy() / 10.0, sim.renderer.psf_image(32).numpy(), atol=1e-6)
