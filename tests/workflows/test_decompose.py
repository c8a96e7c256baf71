"""Bulge/disk decomposition end to end on a tiny simulated set: train, score against imfit on the
same galaxies, predict FITS images and a B/T catalogue, and the command line."""

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
from deepmorph.workflows.classify import Split
from deepmorph.workflows.decompose import default_config, predict_decompose, train_decompose

pytest.importorskip("pyimfit")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    path = tmp_path_factory.mktemp("bd") / "bd.h5"
    sim = Simulator("candels-f160w", 32, priors=Priors(mag=(18.0, 22.5), log10_disk_hlr_pix=(0.3, 0.9)),
                    components=True)
    write_dataset(path, sim, 400, seed=6, progress=False)
    return path


@pytest.fixture(scope="module")
def run(components, tmp_path_factory):
    out = tmp_path_factory.mktemp("bd-run") / "run"
    config = default_config(**{"epochs": 12, "batch_size": 16, "progress_bar": False,
                               "model.kwargs": {"depth": 2, "width": 8}, "optimizer.lr": 3e-3})
    result = train_decompose(components, out, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), baseline_max=6,
                             n_jobs=1, progress=False)
    return out, result


def test_training_scores_unet_and_imfit_on_the_same_galaxies(run):
    out, result = run
    assert result["n_test"] == 80 and result["n_bright"] > 20
    unet, imfit = result["unet"], result["imfit"]
    # The tiny U-Net already beats guessing the mean B/T (RMS ~0.29 for B/T uniform in [0, 1]).
    assert unet["bt_rmse"] < 0.25
    assert imfit["n"] + imfit["n_failed"] >= 1 and imfit["seconds_per_galaxy"] > 0
    assert result["unet_on_imfit_sample"]["n"] == imfit["n"]
    assert result["speedup"] > 1
    rows = Table.read(out / "test_predictions.ecsv")
    assert rows["imfit_fitted"].sum() == 6
    assert np.isfinite(rows["unet_bulge_to_total"]).all()
    for name in ("decomposition.png", "bt_by_mag.ecsv", "bt_by_bt.ecsv", "test_metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "test_metrics.json").read_text())["unet"]["bt_rmse"] == pytest.approx(unet["bt_rmse"])


def test_predict_writes_component_images_in_counts(run, components, tmp_path):
    out, _ = run
    table = predict_decompose(out, components, tmp_path / "pred")
    assert len(table) == 400 and {"id", "bulge_flux", "disk_flux", "bulge_to_total"} <= set(table.colnames)
    with fits.open(tmp_path / "pred" / "bulge.fits") as b, fits.open(tmp_path / "pred" / "disk.fits") as d:
        total = b[0].data.sum(axis=(1, 2)) + d[0].data.sum(axis=(1, 2))
    from deepmorph.data import open_dataset

    with open_dataset(components) as ds:
        flux = np.asarray(ds.array("noiseless")[...].sum(axis=(1, 2, 3)))
    assert np.median(np.abs(total / flux - 1)) < 0.15
    assert Table.read(tmp_path / "pred" / "bt.ecsv")["bulge_to_total"] == pytest.approx(table["bulge_to_total"])

    # FITS cutouts work too; a size the U-Net cannot take is a clear error.
    with open_dataset(components) as ds:
        stamps = ds.images[:3, 0]
    paths = []
    for i, s in enumerate(stamps):
        paths.append(tmp_path / f"g{i}.fits")
        fits.PrimaryHDU(s).writeto(paths[-1])
    t = predict_decompose(out, paths, tmp_path / "fits")
    assert list(t["id"]) == ["g0", "g1", "g2"]
    np.testing.assert_allclose(t["bulge_to_total"], table["bulge_to_total"][:3], atol=1e-5)
    fits.PrimaryHDU(np.zeros((30, 30), np.float32)).writeto(tmp_path / "odd.fits")
    with pytest.raises(DeepmorphError, match="multiples of 4"):
        predict_decompose(out, [tmp_path / "odd.fits"], tmp_path / "x")


def test_cli_train_and_predict_decompose(components, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "decompose", "--data", str(components), "--out", str(out), "--epochs", "1",
                 "--set", "model.kwargs.width=4", "--set", "model.kwargs.depth=2", "--quiet", "--baseline-max", "2",
                 "--jobs", "1"]) == 0
    text = capsys.readouterr().out
    assert "RMS B/T error" in text and "imfit" in text
    assert main(["predict", "decompose", "--model", str(out), "--images", str(components), "--out",
                 str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "bt.ecsv").is_file()
    assert main(["predict", "decompose", "--model", str(out), "--images", str(components), "--out",
                 str(tmp_path / "p")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["predict", "decompose", "--model", str(out), "--images", str(components), "--out",
                 str(tmp_path / "p"), "--overwrite"]) == 0
    plain = tmp_path / "plain.h5"
    write_dataset(plain, Simulator("candels-f160w", 32), 4, seed=1, progress=False)
    assert main(["train", "decompose", "--data", str(plain), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bulge" in err
