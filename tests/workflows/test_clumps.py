"""Clump detection end to end on a tiny simulated set: train, score against the classical method,
detect on a dataset and on a FITS image larger than a tile, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import write_dataset
from deepmorph.errors import DeepmorphError
from deepmorph.simulate import Priors, Simulator
from deepmorph.training import RunConfig
from deepmorph.workflows.classify import Split
from deepmorph.workflows.clumps import default_config, detect_clumps, train_clumps

PRIORS = Priors(mag=(18.0, 21.0), clumpy_fraction=0.8, clump_flux_fraction=(0.05, 0.15),
                log10_disk_hlr_pix=(0.5, 0.9))


@pytest.fixture(scope="module")
def clumpy(tmp_path_factory):
    path = tmp_path_factory.mktemp("clumps") / "clumps.h5"
    sim = Simulator("candels-f160w", 32, priors=PRIORS, clumps=True, components=True)
    write_dataset(path, sim, 400, seed=5, progress=False)
    return path


@pytest.fixture(scope="module")
def run(clumpy, tmp_path_factory):
    out = tmp_path_factory.mktemp("clump-run") / "run"
    config = default_config(**{"epochs": 12, "batch_size": 16, "progress_bar": False,
                               "model.kwargs": {"depth": 2, "width": 8}, "optimizer.lr": 3e-3})
    result = train_clumps(clumpy, out, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), pos_weight=3.0)
    return out, result


def test_training_scores_both_methods_on_the_test_split(run):
    out, result = run
    assert result["train_size"] == 280 and result["n_galaxies"] == 80
    assert result["n_clumps"] > 50
    for method in ("unet", "classical"):
        m = result[method]
        assert 0 <= m["completeness_at_purity_90"] <= 1
        assert m["seconds_per_galaxy"] > 0
    # Even this tiny U-Net, after seconds of training, finds most bright clumps at threshold 0.5.
    assert result["unet"]["completeness_at_threshold"] > 0.4 and result["unet"]["purity_at_threshold"] > 0.5
    for name in ("model.pt", "test_metrics.json", "curves_unet.ecsv", "curves_classical.ecsv", "precision_recall.png",
                 "completeness_snr.png", "completeness_flux_ratio.png", "completeness_snr.ecsv",
                 "purity_flux_ratio.ecsv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "test_metrics.json").read_text())["unet"] == result["unet"]
    curves = Table.read(out / "curves_unet.ecsv")
    assert np.all(np.diff(np.asarray(curves["completeness"])) <= 1e-12)  # higher thresholds find fewer


def test_detect_on_a_dataset_and_a_large_fits_image(run, clumpy, tmp_path):
    out, _ = run
    table = detect_clumps(out, clumpy, threshold=0.5, maps_out=tmp_path / "maps.fits", progress=False)
    assert {"id", "x_pix", "y_pix", "x_image", "y_image", "probability", "flux"} <= set(table.colnames)
    assert len(table) > 100
    np.testing.assert_allclose(np.asarray(table["x_image"]) - np.asarray(table["x_pix"]), 15.5)
    with fits.open(tmp_path / "maps.fits") as hdul:
        assert hdul[1].data.shape == (400, 32, 32)
        assert 0 <= hdul[1].data.min() and hdul[1].data.max() <= 1

    # A 3 x 2 mosaic of stamps in one FITS image, tiled at 32 px: the clumps come out at the
    # right places in image coordinates.
    sim = Simulator("candels-f160w", 32, priors=PRIORS, clumps=True)
    sims = sim.simulate(np.arange(6), seed=9)
    mosaic = np.block([[sims["images"][3 * r + c, 0] for c in range(3)] for r in range(2)])
    path = tmp_path / "mosaic.fits"
    fits.PrimaryHDU(mosaic.astype(">f4")).writeto(path)  # big-endian, as FITS files are
    found = detect_clumps(out, [path], threshold=0.5, maps_out=tmp_path / "m.fits", tile=32, overlap=8,
                          progress=False)
    truth = sims["clump_table"]
    tx = 15.5 + truth["x_pix"] + 32 * (truth["id"] % 3)
    ty = 15.5 + truth["y_pix"] + 32 * (truth["id"] // 3)
    bright = truth["flux_fraction"] >= 0.08
    if len(found):
        d = np.hypot(tx[:, None] - np.asarray(found["x_image"])[None], ty[:, None] - np.asarray(found["y_image"])[None])
        assert (d[bright].min(axis=1) < 2).mean() > 0.5
    assert set(found["id"]) <= {"mosaic"}


def test_clump_errors(clumpy, run, tmp_path):
    plain = tmp_path / "plain.h5"
    write_dataset(plain, Simulator("candels-f160w", 32), 8, seed=1, progress=False)
    with pytest.raises(DeepmorphError, match="clump_mask"):
        train_clumps(plain, tmp_path / "r", default_config(epochs=1, progress_bar=False))
    no_truth = tmp_path / "no-components.h5"
    write_dataset(no_truth, Simulator("candels-f160w", 32, clumps=True), 8, seed=1, progress=False)
    with pytest.raises(DeepmorphError, match="noiseless.*--components"):
        train_clumps(no_truth, tmp_path / "r", default_config(epochs=1, progress_bar=False))
    out, _ = run
    (tmp_path / "empty.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    with pytest.raises(DeepmorphError, match="empty.fits"):
        detect_clumps(out, [tmp_path / "empty.fits"])
    nan = np.ones((40, 40), np.float32)
    nan[5, 5] = np.nan
    fits.PrimaryHDU(nan).writeto(tmp_path / "nan.fits")
    with pytest.raises(DeepmorphError, match="NaN"):
        detect_clumps(out, [tmp_path / "nan.fits"], progress=False)
    with pytest.raises(DeepmorphError, match="not a clumps run"):
        detect_clumps(tmp_path, clumpy)
    with pytest.raises(DeepmorphError, match="does not output images"):
        train_clumps(clumpy, tmp_path / "r", RunConfig(progress_bar=False))  # the default model is the CNN


def test_cli_detect_clumps(run, clumpy, tmp_path, capsys):
    out, _ = run
    cat = tmp_path / "clumps.ecsv"
    assert main(["detect", "clumps", "--model", str(out), "--images", str(clumpy), "--out", str(cat)]) == 0
    assert "clumps" in capsys.readouterr().out
    assert len(Table.read(cat)) > 0 and (tmp_path / "clumps_maps.fits").is_file()
    assert main(["detect", "clumps", "--model", str(out), "--images", str(clumpy), "--out", str(cat)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["detect", "clumps", "--model", str(tmp_path), "--images", str(clumpy), "--out",
                 str(tmp_path / "x.ecsv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a clumps run" in err
