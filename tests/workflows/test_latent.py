"""Autoencoders and VAEs of simulated galaxies: the latent space carries the galaxies' parameters, the
latent tools (maps, grids, interpolation, population comparison) work on runs, and the CLI fails in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import import_images, open_dataset, write_dataset
from deepmorph.errors import DeepmorphError
from deepmorph.simulate import Priors, Simulator
from deepmorph.workflows.classify import Split
from deepmorph.workflows.latent import (
    catalog_parameters,
    classifier_auc,
    compare_populations,
    composite_hlr,
    decode,
    decoded_grid,
    default_config,
    encode,
    energy_distance,
    evaluate_latent,
    interpolate,
    latent_correlations,
    latent_maps,
    latent_plane,
    mmd_rbf,
    pose_angles,
    train_autoencoder,
)
from tests.cli_errors import error_line

PRIORS = Priors(mag=(18.0, 22.0), log10_bulge_hlr_pix=(0.2, 0.7), log10_disk_hlr_pix=(0.4, 1.0))
TINY = {"epochs": 8, "batch_size": 32, "progress_bar": False, "optimizer.lr": 2e-3, "accelerator": "cpu",
        "model.kwargs": {"latent_dim": 4, "widths": [16, 32, 64]}}


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent") / "sims32.h5"
    write_dataset(path, Simulator("candels-f160w", 32, priors=PRIORS), 600, seed=1, progress=False)
    return path


@pytest.fixture(scope="module")
def vae_run(sims, tmp_path_factory):
    run = tmp_path_factory.mktemp("latent") / "vae"
    result = train_autoencoder(sims, run, default_config("vae", **TINY), "vae", Split(0, (0.6, 0.1, 0.3)),
                               kl_warmup=2)
    return run, result


def test_composite_half_light_radius():
    # One component only, or two identical ones: that component's radius.
    np.testing.assert_allclose(composite_hlr([1.0, 0.0, 0.3], [0.2, 0.2, 0.5], [4.0, 4.0, 1.0],
                                             [0.6, 0.6, 0.5]), [0.2, 0.6, 0.5], rtol=1e-6)
    # Between the two radii, shrinking as the compact bulge takes more of the light.
    r = composite_hlr(np.linspace(0.0, 1.0, 11), 0.1, 4.0, 0.8)
    assert np.all(np.diff(r) < 0) and 0.1 <= r.min() and r.max() <= 0.8
    # Half the light within it, checked by integrating both profiles numerically.
    from deepmorph.simulate.profiles import sersic_profile

    radii = np.linspace(0, 40, 400001)
    half = composite_hlr(0.4, 0.3, 3.0, 1.2)

    def enclosed(n, hlr, upto):
        f = sersic_profile(radii, n, hlr) * 2 * np.pi * radii
        inside = radii <= upto
        return np.trapezoid(f[inside], radii[inside]) / np.trapezoid(f, radii)

    assert 0.4 * enclosed(3.0, 0.3, half) + 0.6 * enclosed(1.0, 1.2, half) == pytest.approx(0.5, abs=2e-3)


def test_catalog_parameters_and_correlations_of_synthetic_codes():
    rng = np.random.default_rng(0)
    n = 2000
    cat = Table({"mag": rng.uniform(18, 24, n), "bulge_to_total": rng.uniform(0, 1, n), "bulge_n": rng.uniform(1, 6, n),
                 "bulge_hlr_arcsec": rng.uniform(0.1, 0.5, n), "disk_hlr_arcsec": rng.uniform(0.2, 1.0, n),
                 "bulge_q": rng.uniform(0.3, 1, n), "disk_q": rng.uniform(0.1, 1, n), "pa_deg": rng.uniform(0, 180, n)})
    params = catalog_parameters(cat)
    assert set(params) == {"mag", "hlr", "q", "bt", "n", "pa", "e1", "e2"}
    e = (1 - params["q"]) / (1 + params["q"])
    np.testing.assert_allclose(np.hypot(params["e1"], params["e2"]), e)
    assert np.isnan(params["n"][cat["bulge_to_total"] < 0.5]).all() and np.isnan(params["pa"][params["q"] >= 0.8]).all()
    bt = params["bt"]
    np.testing.assert_allclose(params["q"], bt * cat["bulge_q"] + (1 - bt) * cat["disk_q"])
    assert catalog_parameters(Table({"file": ["a"], "label": [1]})) == {}
    # Dimension 1 is the magnitude (monotonic), dimension 2 carries B/T squared, the rest is noise.
    z = np.stack([rng.normal(size=n), np.exp(0.3 * params["mag"]), bt**2 + 0.01 * rng.normal(size=n),
                  rng.normal(size=n)], axis=1)
    table = latent_correlations(z, params, seed=1)
    rows = {r["parameter"]: r for r in table}
    assert set(rows) == {"mag", "log10_hlr", "q", "bt", "n", "cos_2pa", "sin_2pa", "e1", "e2", "q_via_e1e2"}
    assert rows["mag"]["best_dim"] == 1 and rows["mag"]["best_abs_spearman"] == pytest.approx(1.0)
    assert rows["mag"]["probe_spearman"] > 0.99 and rows["mag"]["linear_r2"] > 0.9  # exp(): monotonic, not linear
    assert rows["bt"]["best_dim"] == 2 and rows["bt"]["best_abs_spearman"] > 0.99 and rows["bt"]["knn_r2"] > 0.85
    assert rows["q"]["best_abs_spearman"] < 0.1 and rows["q"]["linear_r2"] < 0.02
    assert rows["bt"]["n_fit"] + rows["bt"]["n_test"] == n == rows["bt"]["n"]
    assert rows["mag"]["mutual_info"] > 1.0 > rows["q"]["mutual_info"]
    # A code holding the shape vector (e1, e2): q is its length, read through two linear probes.
    e = np.stack([params["e1"], params["e2"]], axis=1)
    shape = latent_correlations(np.concatenate([e @ [[1.0, 0.5], [-0.5, 1.0]], z[:, :1]], axis=1), params)
    rows = {r["parameter"]: r for r in shape}
    assert rows["e1"]["linear_r2"] > 0.99 and rows["e2"]["linear_r2"] > 0.99
    assert rows["q"]["linear_r2"] < 0.3 < 0.99 < rows["q_via_e1e2"]["linear_r2"]
    assert rows["q_via_e1e2"]["probe"] == "linear e1, e2 -> q"


def test_two_sample_distances():
    rng = np.random.default_rng(0)
    a, b, shifted = rng.normal(size=(300, 3)), rng.normal(size=(300, 3)), rng.normal(size=(300, 3)) + [2.0, 0, 0]
    assert energy_distance(a, b) < 0.05 < 1.0 < energy_distance(a, shifted)
    same, far = mmd_rbf(a, b, permutations=100), mmd_rbf(a, shifted, permutations=100)
    assert same["p_value"] > 0.05 and far["p_value"] < 0.02 and far["mmd2"] > 5 * same["mmd2"]
    assert 0.35 < classifier_auc(a, b) < 0.65 and classifier_auc(a, shifted) > 0.8
    plane = latent_plane(np.concatenate([a, shifted]))
    assert plane.kind == "pca" and abs(plane.axes[0, 0]) > 0.9  # the shift is the main direction


def test_vae_latent_carries_magnitude_and_size(vae_run, sims):
    run, result = vae_run
    meta = json.loads((run / "run.json").read_text())
    assert meta["task"] == "vae" and meta["latent_dim"] == 4 and meta["stamp_size"] == 32
    assert result["train_size"] == 360 and result["n_eval"] == 180 and result["epochs_run"] == 8
    rows = {r["parameter"]: r for r in result["correlations"]}
    assert set(rows) == {"mag", "log10_hlr", "q", "bt", "n", "cos_2pa", "sin_2pa", "e1", "e2", "q_via_e1e2"}
    # After seconds of training, a held-out linear probe reads the magnitude off the 4-D code, and so does
    # one latent dimension on its own.
    assert rows["mag"]["linear_r2"] > 0.8 and rows["mag"]["best_abs_spearman"] > 0.8
    assert rows["mag"]["n_fit"] + rows["mag"]["n_test"] == 180
    for name in ("latent_correlations.ecsv", "latent_maps.png", "latent_maps.ecsv", "decoded_grid.png",
                 "interpolation.png", "reconstructions.png", "latent_metrics.json", "model.pt"):
        assert (run / name).is_file(), name
    table = Table.read(run / "latent_correlations.ecsv")
    assert table["linear_r2"][list(table["parameter"]).index("mag")] == pytest.approx(rows["mag"]["linear_r2"])


def test_encode_decode_interpolate_grid(vae_run, sims):
    run, _ = vae_run
    with open_dataset(sims) as ds:
        stamps = ds.images[:6]
    z_arrays = encode(run, stamps)
    z_file, logvar = encode(run, sims, items=np.arange(6), with_logvar=True)
    assert z_arrays.shape == (6, 4) and logvar.shape == (6, 4)
    np.testing.assert_allclose(z_arrays, z_file, rtol=1e-5, atol=1e-5)
    path = interpolate(run, stamps[0], stamps[1], steps=5)
    assert path.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(path[[0, -1]], decode(run, z_arrays[:2]), rtol=1e-4, atol=1e-4)
    grid = decoded_grid(run, sims, n=3, span=1.0)
    assert grid["images"].shape == (3, 3, 1, 32, 32) and grid["z"].shape == (3, 3, 4)
    np.testing.assert_allclose(grid["z"][1, 1], grid["plane"].origin, atol=1e-9)  # the centre is the mean code
    with pytest.raises(DeepmorphError, match="trained on"):
        encode(run, np.zeros((2, 1, 48, 48), np.float32))


def test_compare_populations_tells_faint_from_bright(vae_run, sims, tmp_path):
    run, _ = vae_run
    faint = tmp_path / "faint.h5"
    write_dataset(faint, Simulator("candels-f160w", 32, priors=Priors(mag=(23.0, 24.5), log10_bulge_hlr_pix=(0.2, 0.7),
                                                                       log10_disk_hlr_pix=(0.4, 1.0))),
                  200, seed=2, progress=False)
    r = compare_populations(run, sims, faint, tmp_path / "cmp", labels=("bright", "faint"), permutations=50)
    assert r["n_a"] == 180 and r["n_b"] == 200
    assert r["classifier_auc"] > 0.9 and r["mmd_p_value"] < 0.05
    assert r["energy_distance"] > 5 * r["energy_distance_null"]
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["labels"] == ["bright", "faint"]


def test_cli_train_and_latent_tools(sims, vae_run, tmp_path, capsys):
    run = tmp_path / "ae"
    assert main(["train", "ae", "--data", str(sims), "--out", str(run), "--latent-dim", "2", "--epochs", "2",
                 "--batch-size", "64", "--quiet", "--fractions", "0.6", "0.1", "0.3",
                 "--set", "model.kwargs.widths=[8,16]"]) == 0
    out = capsys.readouterr().out
    assert "ae trained on 360 galaxies" in out and "mag" in out
    meta = json.loads((run / "run.json").read_text())
    assert meta["task"] == "ae" and meta["latent_dim"] == 2 and meta["beta"] == 0.0
    vae, _ = vae_run
    maps = tmp_path / "maps"
    assert main(["latent", "maps", "--model", str(vae), "--out", str(maps)]) == 0
    assert (maps / "latent_maps.png").is_file() and (maps / "latent_correlations.ecsv").is_file()
    assert main(["latent", "grid", "--model", str(run), "--out", str(maps), "--n", "4"]) == 0
    assert main(["latent", "interpolate", "--model", str(vae), "--data", str(sims), "--out", str(maps),
                 "--pairs", "0:5,7:9", "--steps", "4"]) == 0
    assert (maps / "decoded_grid.png").is_file() and (maps / "interpolation.png").is_file()
    capsys.readouterr()


def test_aligned_vae_codes_ignore_orientation(sims, tmp_path, capsys):
    run = tmp_path / "aligned"
    assert main(["train", "vae", "--data", str(sims), "--out", str(run), "--align", "--latent-dim", "4",
                 "--epochs", "3", "--batch-size", "32", "--quiet", "--fractions", "0.6", "0.1", "0.3",
                 "--set", "model.kwargs.widths=[16,32,64]", "--no-evaluate"]) == 0
    capsys.readouterr()
    assert json.loads((run / "run.json").read_text())["align"] is True
    with open_dataset(sims) as ds:
        stamps, catalog = ds.images[:40], ds.catalog[:40]
    # A galaxy turned by a right angle (exact, no resampling) is aligned back: nearly the same code,
    # while different galaxies have different codes.
    z, z_turned = encode(run, stamps), encode(run, np.rot90(stamps, 1, axes=(-2, -1)).copy())
    spread = np.linalg.norm(z - z.mean(axis=0), axis=1).mean()
    assert np.linalg.norm(z - z_turned, axis=1).mean() < 0.2 * spread
    # The removed orientation is the catalogue's position angle for elongated galaxies.
    params = catalog_parameters(catalog)
    elongated = params["q"] < 0.6
    diff = (pose_angles(run, stamps) - np.asarray(catalog["pa_deg"]) + 90.0) % 180.0 - 90.0
    assert elongated.sum() >= 5 and np.median(np.abs(diff[elongated])) < 5.0
    maps = latent_maps(run, sims, tmp_path / "maps", max_items=100)
    table = Table.read(tmp_path / "maps" / "latent_maps.ecsv")
    assert "pose_pa_deg" in table.colnames and len(table) == len(maps["z"]) == 100
    np.testing.assert_allclose(table["pose_pa_deg"], maps["pose_pa_deg"])
    scored = evaluate_latent(run, out=tmp_path / "eval", max_items=100)
    assert scored["pose_pa_error_deg"]["n"] > 10 and scored["pose_pa_error_deg"]["median"] < 10.0
    assert (tmp_path / "eval" / "reconstructions.png").is_file()


def test_cli_errors_are_one_line(sims, vae_run, tmp_path, capsys):
    vae, _ = vae_run
    missing = tmp_path / "missing.h5"
    assert main(["train", "vae", "--data", str(missing), "--out", str(tmp_path / "r")]) == 2
    assert "missing.h5" in error_line(capsys)
    assert main(["latent", "maps", "--model", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert str(tmp_path) in (line := error_line(capsys)) and "not a VAE or autoencoder run" in line
    assert main(["latent", "compare", "--model", str(vae), "--data", str(sims), "--other", str(missing),
                 "--out", str(tmp_path / "c")]) == 2
    assert "missing.h5" in error_line(capsys)
    assert main(["latent", "interpolate", "--model", str(vae), "--data", str(sims), "--out", str(tmp_path),
                 "--pairs", "0:99999"]) == 2
    assert "out of range" in error_line(capsys)
    assert main(["train", "vae", "--data", str(sims), "--out", str(tmp_path / "r"), "--model", "cnn"]) == 2
    assert "not 'vae'" in error_line(capsys)
    # Real cutouts with labels only: no catalogue parameter to colour the latent by.
    folder = tmp_path / "cutouts"
    folder.mkdir()
    for k in range(3):
        fits.writeto(folder / f"g{k}.fits", np.random.default_rng(k).normal(size=(32, 32)).astype(np.float32))
    Table({"file": [f"g{k}.fits" for k in range(3)], "label": [0, 1, 0]}).write(tmp_path / "labels.csv")
    imported = tmp_path / "real.h5"
    import_images(folder, tmp_path / "labels.csv", imported, size=32)
    assert main(["latent", "maps", "--model", str(vae), "--data", str(imported), "--out", str(tmp_path / "m")]) == 2
    assert "real.h5" in (line := error_line(capsys)) and "catalogue has none" in line
    # The stamps of another size.
    big = tmp_path / "big.h5"
    write_dataset(big, Simulator("candels-f160w", 48, priors=PRIORS), 4, seed=0, progress=False)
    assert main(["latent", "maps", "--model", str(vae), "--data", str(big), "--out", str(tmp_path / "m")]) == 2
    assert "big.h5" in error_line(capsys)
