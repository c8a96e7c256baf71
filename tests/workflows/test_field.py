"""Morphometry of a real field: sep reproduces SExtractor on the NTT frame, the frame's PSF and
gain are recovered from a synthetic frame, the frame's training set is reproducible from the
command line, and the field pipeline gives one flagged row per detection (bad inputs: one line)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import open_dataset
from deepmorph.errors import DeepmorphError
from deepmorph.workflows.field import (
    Detection,
    _pixel_gaussian,
    compare_with_sextractor,
    detect_sources,
    frame_settings,
    match_sources,
    measure_field,
    read_sextractor_catalog,
    read_sextractor_config,
    train_frame_model,
)
from deepmorph.workflows.runs import read_image_file
from tests.cli_errors import error_line as _error_line
from tests.conftest import shared_file

FWHM, GAIN, SKY, SATURATE = 3.0, 2.0, 1000.0, 30000.0
#: (x, y, flux) of the synthetic frame's stars: one on the edge, one saturated (peak ~49000 ADU).
STARS = [(30, 30, 2e4), (90, 25, 5e4), (30, 95, 1e4), (95, 100, 3e4), (60, 62, 8e3), (3, 64, 2e4), (100, 60, 5e5)]
#: (x, y, flux, sigma) of round Gaussian "galaxies".
GALAXIES = [(62, 20, 3e4, 3.0), (20, 62, 2e4, 2.5)]




@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    """A 128 x 128 frame: sky 1000 ADU with Poisson noise at gain 2, Gaussian stars of FWHM 3 px,
    two extended sources and a cosmic ray; big-endian with SATURATE, as real FITS frames come."""
    rng = np.random.default_rng(1)
    model = np.zeros((128, 128))
    sigma = FWHM / (2 * math.sqrt(2 * math.log(2)))
    for x, y, flux in STARS:
        model += _pixel_gaussian(model.shape, flux, x, y, sigma)
    for x, y, flux, s in GALAXIES:
        model += _pixel_gaussian(model.shape, flux, x, y, math.hypot(s, sigma))
    image = SKY + model + rng.normal(0.0, 1.0, model.shape) * np.sqrt((SKY + model) / GAIN)
    image[75, 45] += 3000.0  # a cosmic ray: sharper than any star
    image = np.minimum(image, SATURATE)
    path = tmp_path_factory.mktemp("field") / "frame.fits"
    header = fits.Header({"SATURATE": SATURATE})
    fits.writeto(path, image.astype(">f4"), header)
    return path


def test_frame_settings_recover_psf_gain_and_fluxes(frame):
    s = frame_settings(frame, 25.0, 0.5)
    assert s.psf_fwhm_pix == pytest.approx(FWHM, rel=0.05)  # pixel-integrated Gaussian fit to the stars
    assert s.n_stars >= 3  # the cosmic ray and the saturated star are not among them
    assert s.gain_e_per_count == pytest.approx(GAIN, rel=0.1)  # sky / rms^2
    assert s.sky_level == pytest.approx(SKY, rel=0.01)
    unsaturated = [f for x, _, f in STARS if f < 1e5 and x > 10]
    lo, hi = s.mag_range
    assert lo < 25 - 2.5 * math.log10(max(unsaturated)) and hi > 25 - 2.5 * math.log10(min(unsaturated))
    assert s.log10_hlr_pix_range[1] >= math.log10(3.0)
    assert s.psf == f"gaussian:{0.5 * s.psf_fwhm_pix!r}"  # arcsec, for --psf


def test_frame_training_set_is_reproducible_from_the_command_line(frame, tmp_path):
    s = frame_settings(frame, 25.0, 0.5)
    out = tmp_path / "cli.h5"
    assert main([*s.simulate_argv(out, 6, seed=3), "--no-progress"]) == 0
    direct = s.simulator().simulate(range(6), seed=3)
    with open_dataset(out) as ds:
        np.testing.assert_array_equal(ds.images[...], direct["images"])
        assert ds.attrs["zeropoint_mag"] == 25.0
        assert ds.attrs["noise"]["gain_e_per_count"] == s.gain_e_per_count
        assert ds.attrs["survey_preset"]["image_unit"] == "count (zero point 25)"
        assert np.all(ds.catalog["bulge_to_total"] == 1.0)


def test_simulate_zeropoint_scales_fluxes_and_is_recorded(tmp_path, capsys):
    base = ["simulate", "--n", "5", "--seed", "2", "--stamp-size", "32", "--psf", "gaussian:0.18", "--noise", "none",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "zp27.h5"), "--zeropoint", "27"]) == 0
    assert main([*base, "--out", str(tmp_path / "preset.h5")]) == 0  # candels-f160w: 25.95
    with open_dataset(tmp_path / "zp27.h5") as a, open_dataset(tmp_path / "preset.h5") as b:
        assert a.attrs["zeropoint_mag"] == 27.0 and b.attrs["zeropoint_mag"] == 25.95
        np.testing.assert_array_equal(a.catalog["mag"], b.catalog["mag"])  # same galaxies, other counts
        ratio = a.images[...].sum(axis=(1, 2, 3)) / b.images[...].sum(axis=(1, 2, 3))
        np.testing.assert_allclose(ratio, 10 ** (0.4 * (27.0 - 25.95)), rtol=1e-4)
        np.testing.assert_allclose(a.catalog["flux"], 10 ** (-0.4 * (a.catalog["mag"] - 27.0)), rtol=1e-10)
    assert main(["simulate", "--n", "2", "--out", str(tmp_path / "g.h5"), "--gain", "5", "--stamp-size", "32",
                 "--psf", "gaussian:0.18", "--no-progress"]) == 0
    with open_dataset(tmp_path / "g.h5") as ds:
        assert ds.attrs["noise"]["gain_e_per_count"] == 5.0
    capsys.readouterr()
    assert main(["simulate", "--n", "2", "--out", str(tmp_path / "bad.h5"), "--gain", "-1", "--no-progress"]) == 2
    assert "argument --gain: expected a finite number > 0, got '-1'" in _error_line(capsys)


def test_sep_reproduces_sextractor_on_the_ntt_frame(ntt_image_file):
    config = shared_file("ntt_emmi_field/default.sex")
    reference = read_sextractor_catalog(shared_file("ntt_emmi_field/image.cat"))
    image = read_image_file(ntt_image_file)[0]  # BSCALE/BZERO int16, big-endian on disk
    for detection in (read_sextractor_config(config), Detection()):  # the catalogue's settings; SExtractor's defaults
        sources = detect_sources(image, detection=detection)
        ref_i, cat_i, dist = match_sources(sources, reference, radius=2.0)
        assert len(ref_i) >= 0.9 * len(reference)
        assert np.median(dist) < 0.01  # 0-based x = X_IMAGE - 1
        flux_ref = np.asarray(reference["FLUX_AUTO"], float)[ref_i]
        ok = flux_ref > 0
        dmag = 2.5 * np.log10(np.asarray(sources["flux_auto"], float)[cat_i][ok] / flux_ref[ok])
        assert np.median(np.abs(dmag)) < 0.01
    # With default.sex's settings it is SExtractor's catalogue: same sources, saturated ones flagged alike.
    assert len(sources) >= len(reference)
    exact = detect_sources(image, detection=read_sextractor_config(config))
    assert len(exact) == len(reference)
    ref_i, cat_i, _ = match_sources(exact, reference)
    saturated = (np.asarray(reference["FLAGS"])[ref_i] & 4) > 0  # SExtractor's bit 4
    np.testing.assert_array_equal(np.asarray(exact["saturated"])[cat_i], saturated)


@pytest.fixture(scope="module")
def tiny_model(frame, tmp_path_factory):
    """A frame model trained on 300 simulated stamps for one epoch (shapes and flags, not accuracy)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    s = frame_settings(frame, 25.0, 0.5)
    train_frame_model(frame, run, 25.0, 0.5, n=300, epochs=1, settings=s, evaluate=False)
    return run


def test_field_pipeline_gives_one_flagged_row_per_detection(tiny_model, frame, tmp_path):
    out = tmp_path / "cat.ecsv"
    catalog = measure_field(tiny_model, frame, 26.0, 0.5, out=out)
    detection = Detection(saturation=SATURATE)
    assert len(catalog) == len(detect_sources(fits.getdata(frame), detection=detection))
    for col in ("id", "x", "y", "flux_auto", "mag_auto", "mag", "mag_err", "hlr", "hlr_err", "hlr_pix", "n", "n_err",
                "q", "q_err", "pa", "pa_err", "sep_flag", "flag"):
        assert col in catalog.colnames
    assert str(catalog["hlr"].unit) == "arcsec" and str(catalog["mag"].unit) == "mag"
    np.testing.assert_allclose(catalog["hlr_pix"], catalog["hlr"] / 0.5)
    good = np.asarray(catalog["flux_auto"]) > 0
    np.testing.assert_allclose(catalog["mag_auto"][good], 26.0 - 2.5 * np.log10(catalog["flux_auto"][good]))
    assert np.all(np.isfinite(catalog["mag"])) and np.all(catalog["mag_err"] > 0)

    def flag_at(x, y):
        k = int(np.argmin(np.hypot(catalog["x"] - x, catalog["y"] - y)))
        return set(str(catalog["flag"][k]).split(",")) - {""}

    assert "edge" in flag_at(3, 64) and "saturated" in flag_at(100, 60) and not flag_at(60, 62)
    assert len(Table.read(out, format="ascii.ecsv")) == len(catalog)
    run_zp = json.loads((tiny_model / "run.json").read_text())["zeropoint_mag"]
    assert run_zp == 25.0  # the model's zero point; magnitudes above are shifted to the user's 26
    with pytest.raises(DeepmorphError, match="exists"):
        measure_field(tiny_model, frame, 26.0, 0.5, out=out)
    # Another pixel scale: a wider cut, resampled to the model's grid.
    assert measure_field(tiny_model, frame, 26.0, 0.25).meta["stamp_size_frame_pix"] == 64


def test_cli_field_and_comparison_on_the_ntt_frame(tiny_model, ntt_image_file, tmp_path, capsys):
    cat = shared_file("ntt_emmi_field/image.cat")
    out = tmp_path / "ntt.ecsv"
    assert main(["predict", "morphometry", "--model", str(tiny_model), "--field", str(ntt_image_file),
                 "--zeropoint", "25", "--pixel-scale", "0.5", "--compare", str(cat), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SExtractor sources matched" in printed and "sep mag_auto" in printed
    assert (tmp_path / "ntt_vs_sextractor.png").stat().st_size > 0
    r = compare_with_sextractor(Table.read(out), cat, 25.0)
    assert r["matched_fraction"] >= 0.9 and r["sep"]["median_abs_dmag"] < 0.01


def test_cli_field_bad_inputs_are_one_line(tmp_path, capsys):
    base = ["predict", "morphometry", "--model", str(tmp_path / "no_run"), "--zeropoint", "25",
            "--out", str(tmp_path / "c.ecsv")]
    assert main([*base, "--field", str(tmp_path / "missing.fits")]) == 2
    assert "missing.fits" in (line := _error_line(capsys)) and "not found" in line
    nan = tmp_path / "nan.fits"
    fits.writeto(nan, np.full((64, 64), np.nan, dtype=">f4"))
    assert main([*base, "--field", str(nan)]) == 2
    assert "nan.fits" in (line := _error_line(capsys)) and "no finite pixels" in line
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"not a fits file at all" * 10)
    assert main([*base, "--field", str(junk)]) == 2
    assert "junk.fits" in _error_line(capsys)
    assert main([*base, "--field", str(nan), "--images", str(nan)]) == 2
    assert "not allowed with" in _error_line(capsys)
    assert main(base) == 2
    assert "one of the arguments --images --field is required" in _error_line(capsys)
