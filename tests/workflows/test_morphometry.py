"""Morphometry: target coding round trips, and a small CNN measures single-Sersic galaxies far
better than guessing, with errors whose coverage is reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.table import Table

from deepmorph.data import write_dataset
from deepmorph.errors import DeepmorphError
from deepmorph.simulate import Priors, Simulator
from deepmorph.tasks.regress import TargetCoder
from deepmorph.workflows.classify import Split
from deepmorph.workflows.morphometry import (
    ENVIRONMENTS,
    coder_for,
    default_config,
    environments,
    evaluate_morphometry,
    match_psf,
    measure,
    nmad,
    parameter_errors,
    train_morphometry,
)

SERSIC = Priors(mag=(18.0, 21.0), bulge_to_total=(1.0, 1.0), bulge_n=(1.0, 4.0), log10_bulge_hlr_pix=(0.3, 0.8))


def test_target_coder_round_trip_and_angles():
    values = np.array([[20.0, 0.3, 1.5, 0.5, 10.0], [22.0, 0.1, 4.0, 0.9, 170.0], [21.0, 0.2, 2.0, 0.7, 90.0]])
    coder = coder_for().fit(values)
    assert coder.size == 6 and coder.columns[1] == "bulge_hlr_arcsec"
    encoded = coder.encode(torch.tensor(values))
    assert encoded.shape == (3, 6)
    decoded = coder.decode(encoded.numpy(), np.full((3, 6), 0.01))
    for k, col in enumerate(coder.columns):
        np.testing.assert_allclose(decoded[col][0], values[:, k], atol=1e-6)
    assert np.all(decoded["pa_deg"][1] > 0)
    # 10 and 170 degrees are 20 degrees apart, not 160: their encodings are closer than 10 and 90.
    pa = coder_for(("pa",)).fit(np.arange(0.0, 180.0, 10.0)[:, None])
    near = pa.encode(torch.tensor([[10.0], [170.0]], dtype=torch.float64))
    far = pa.encode(torch.tensor([[10.0], [90.0]], dtype=torch.float64))
    assert float((near[0] - near[1]).norm()) < float((far[0] - far[1]).norm())
    assert TargetCoder.from_dict(coder.to_dict()) == coder
    assert parameter_errors("pa", [179.0], [1.0])[0] == pytest.approx(2.0)
    assert parameter_errors("hlr", [0.2], [0.22])[0] == pytest.approx(0.1)
    assert nmad([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(1.4826)
    with pytest.raises(DeepmorphError, match="unknown"):
        coder_for(("size",))


@pytest.fixture(scope="module")
def sersic(tmp_path_factory):
    path = tmp_path_factory.mktemp("morph") / "sersic.h5"
    write_dataset(path, Simulator("candels-f160w", 32, priors=SERSIC), 600, seed=4, progress=False)
    return path


def test_cnn_measures_sersic_parameters(sersic, tmp_path):
    config = default_config(**{"epochs": 12, "batch_size": 32, "progress_bar": False, "optimizer.lr": 2e-3,
                               "model.kwargs": {"widths": [16, 32, 32], "blocks_per_stage": 1}})
    run = tmp_path / "run"
    result = train_morphometry(sersic, run, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)))
    assert result["n_test"] == 120 and result["train_size"] == 420
    # Better than knowing only the priors (guessing every galaxy's median value), after seconds of training.
    rows = Table.read(run / "test_predictions.ecsv")
    for name in ("mag", "hlr", "q"):
        truth = np.asarray(rows[f"true_{name}"])
        guess = nmad(parameter_errors(name, truth, np.full_like(truth, np.median(truth))))
        assert result[name]["scatter"] < 0.8 * guess, (name, result[name], guess)
    assert result["mag"]["scatter"] < 0.15
    for name in ("mag", "hlr", "n", "q", "pa"):
        m = result[name]
        assert 0 <= m["coverage_1sigma"] <= m["coverage_2sigma"] <= 1 and 0 <= m["outlier_fraction"] <= 1
    assert json.loads((run / "test_metrics.json").read_text())["mag"] == result["mag"]
    assert (run / "test_predictions.ecsv").is_file() and (run / "test_predictions.png").is_file()
    # Errors recalibrated on the validation split: there, 68% of truths lie within 1 sigma.
    scales = json.loads((run / "run.json").read_text())["coder"]["sigma_scale"]
    assert len(scales) == 5 and all(s > 0 for s in scales)
    val = Split(seed=0, fractions=(0.7, 0.1, 0.2)).indices(600)["val"]
    on_val = evaluate_morphometry(run, sersic, val, figures=False)
    for name in ("mag", "hlr", "n", "q", "pa"):
        assert on_val[name]["coverage_1sigma"] == pytest.approx(0.683, abs=0.04), name
        assert 0.4 < result[name]["coverage_1sigma"] < 0.9, (name, result[name])
    # The Python measuring API on raw stamps (counts) gives sensible magnitudes with errors.
    sim = Simulator("candels-f160w", 32, priors=SERSIC).simulate(np.arange(5), seed=4)
    values = measure(run, sim["images"])
    assert set(values) == {"mag", "hlr", "n", "q", "pa"}
    assert values["mag"][0].shape == (5,) and np.all(values["mag"][1] > 0)
    assert np.median(np.abs(values["mag"][0] - sim["catalog"]["mag"])) < 0.5


def test_morphometry_needs_single_sersic_galaxies(tmp_path):
    path = tmp_path / "bd.h5"
    write_dataset(path, Simulator("candels-f160w", 32), 8, seed=1, progress=False)
    with pytest.raises(DeepmorphError, match="bulge-to-total 1 1"):
        train_morphometry(path, tmp_path / "run", default_config(epochs=1, progress_bar=False))


def test_cli_train_morphometry(sersic, tmp_path, capsys):
    from deepmorph.cli import main

    out = tmp_path / "run"
    assert main(["train", "morphometry", "--data", str(sersic), "--out", str(out), "--epochs", "1", "--quiet",
                 "--parameters", "mag,q", "--set", "model.kwargs.widths=[8,16]"]) == 0
    text = capsys.readouterr().out
    assert "mag" in text and "scatter" in text and "test galaxies" in text
    assert main(["train", "morphometry", "--data", str(sersic), "--out", str(out), "--parameters", "size"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown morphometry parameter" in err


def test_finetune_freezes_and_grows_a_new_head(sersic, tmp_path, capsys):
    from deepmorph.cli import main
    from deepmorph.workflows.finetune import finetune

    source = tmp_path / "source"
    config = default_config(**{"epochs": 2, "batch_size": 32, "progress_bar": False,
                               "model.kwargs": {"widths": [8, 16], "blocks_per_stage": 1}})
    train_morphometry(sersic, source, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), parameters=("mag", "q"))
    before = torch.load(source / "model.pt", weights_only=True)
    # Same parameters, head only: the feature blocks come back unchanged, the head moved.
    r = finetune("morphometry", source, sersic, tmp_path / "ft", "head", Split(seed=1, train_size=100),
                 {"epochs": 2, "progress_bar": False})
    after = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    assert r["new_head"] is False and r["train_size"] == 100
    blocks = [k for k in before if k.startswith("blocks.")]
    assert blocks and all(torch.equal(before[k], after[k]) for k in blocks)
    assert not torch.equal(before["head.2.weight"], after["head.2.weight"])
    # More parameters than the source: a new, larger head on the recycled features.
    r = finetune("morphometry", source, sersic, tmp_path / "ft2", "blocks:1", Split(seed=1, train_size=100),
                 {"epochs": 1, "progress_bar": False}, parameters=("mag", "hlr", "q"))
    assert r["new_head"] is True and {"mag", "hlr", "q"} <= set(r)
    assert main(["finetune", "morphometry", "--model", str(source), "--data", str(sersic), "--out",
                 str(tmp_path / "ft3"), "--freeze", "none", "--epochs", "1", "--train-size", "50", "--quiet"]) == 0
    assert "fine-tuned" in capsys.readouterr().out
    assert main(["finetune", "morphometry", "--model", str(source), "--data", str(sersic), "--out",
                 str(tmp_path / "ft4"), "--freeze", "blocks:x"]) == 2
    assert "freeze mode" in capsys.readouterr().err


def test_predict_real_cutouts_resamples_and_flags(sersic, tmp_path, capsys):
    from astropy.io import fits

    from deepmorph.cli import main
    from deepmorph.workflows.morphometry import predict_cutouts, prepare_cutout

    run = tmp_path / "run"
    config = default_config(**{"epochs": 10, "batch_size": 32, "progress_bar": False, "optimizer.lr": 2e-3,
                               "model.kwargs": {"widths": [16, 32, 32], "blocks_per_stage": 1}})
    train_morphometry(sersic, run, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), parameters=("mag", "hlr"))
    # Resampling conserves counts and centres the cutout.
    image = np.zeros((1, 64, 64), np.float32)
    image[0, 30:34, 30:34] = 1.0
    stamp, flag = prepare_cutout(image, 0.03, 0.06, 32)
    assert flag == "" and stamp.shape == (1, 32, 32) and stamp.sum() == pytest.approx(16.0, rel=0.02)
    assert prepare_cutout(image, 0.12, 0.06, 200) == (None, "smaller_than_field")

    # The same galaxies drawn at twice the resolution (0.03"/px, 64 px) measure like the originals.
    fine = Simulator("candels-f160w", 64, priors=SERSIC, pixel_scale_arcsec=0.03).simulate(np.arange(4), seed=8)
    paths = []
    for i, img in enumerate(fine["images"][:, 0]):
        hdu = fits.PrimaryHDU(img.astype(">f4"))
        hdu.header["PIXSCALE"] = 0.03
        paths.append(tmp_path / f"g{i}.fits")
        hdu.writeto(paths[-1])
    nan = np.ones((40, 40), np.float32)
    nan[3, 3] = np.nan
    fits.PrimaryHDU(nan).writeto(tmp_path / "nan.fits")
    fits.PrimaryHDU(np.ones((40, 40), np.float32)).writeto(tmp_path / "noscale.fits")
    fits.PrimaryHDU(np.zeros((40, 40), np.float32)).writeto(tmp_path / "empty.fits")
    (tmp_path / "broken.fits").write_bytes(b"not a fits file")
    bad = [tmp_path / n for n in ("nan.fits", "noscale.fits", "empty.fits", "broken.fits")]
    table = predict_cutouts(run, paths + bad)
    assert list(table["flag"]) == ["", "", "", "", "nan_pixels", "no_pixel_scale", "empty", "unreadable"]
    assert np.isfinite(table["mag"][:4]).all() and np.isnan(table["mag"][4:]).all()
    assert np.median(np.abs(np.asarray(table["mag"][:4]) - fine["catalog"]["mag"])) < 0.5
    # A zero point moves the magnitudes by its difference from the training survey's.
    shifted = predict_cutouts(run, paths, zeropoint=table.meta["zeropoint_mag"] + 1.0)
    np.testing.assert_allclose(shifted["mag"], np.asarray(table["mag"][:4]) + 1.0, rtol=1e-6)
    out = tmp_path / "params.ecsv"
    assert main(["predict", "morphometry", "--model", str(run), "--images", *map(str, paths + bad),
                 "--out", str(out)]) == 0
    assert "4 cutouts measured, 4 flagged" in capsys.readouterr().out


def test_environments_split_isolated_faint_and_bright_neighbours(sersic, tmp_path):
    path = tmp_path / "nbr.h5"
    priors = Priors(mag=(18.0, 21.0), bulge_to_total=(1.0, 1.0), log10_bulge_hlr_pix=(0.3, 0.8),
                    neighbor_fraction=0.7, neighbor_dmag=(-1.5, 1.5))
    write_dataset(path, Simulator("candels-f160w", 32, priors=priors, neighbors=True), 60, seed=2, progress=False)
    from deepmorph.data import open_dataset

    with open_dataset(path) as ds:
        cat, nbr = ds.catalog, ds.neighbor_table
    env = environments(path)
    assert set(env) == set(ENVIRONMENTS)
    np.testing.assert_array_equal(env == "isolated", np.asarray(cat["n_neighbors"]) == 0)
    for gid in np.unique(nbr["id"]):
        row = int(np.flatnonzero(np.asarray(cat["id"]) == gid)[0])
        bright = np.min(nbr["mag"][nbr["id"] == gid]) <= cat["mag"][row]
        assert env[row] == ("bright neighbours" if bright else "faint neighbours")
    assert list(environments(path, [5, 1])) == [env[5], env[1]]
    # Scoring a run on it reports each environment and writes the per-magnitude table and figures.
    run = tmp_path / "run"
    config = default_config(**{"epochs": 1, "batch_size": 32, "progress_bar": False,
                               "model.kwargs": {"widths": [8, 16], "blocks_per_stage": 1}})
    train_morphometry(sersic, run, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), parameters=("mag", "q"),
                      evaluate=False)
    metrics = evaluate_morphometry(run, path)
    assert set(metrics["environments"]) == set(ENVIRONMENTS)
    assert sum(m["mag"]["n"] for m in metrics["environments"].values()) == metrics["n_test"] == 60
    rows = Table.read(run / "test_predictions.ecsv")
    assert list(rows["environment"]) == list(env)
    assert (run / "test_predictions.png").is_file()


def test_flatten_head_needs_its_image_size():
    from deepmorph.models.cnn import SimpleCNN

    net = SimpleCNN(1, 4, widths=(8, 16), head="flatten", hidden=16, image_size=32)
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(DeepmorphError, match="32x32"):
        net(torch.zeros(2, 1, 64, 64))
    with pytest.raises(DeepmorphError, match="divisible"):
        SimpleCNN(1, 4, widths=(8, 16), head="flatten", image_size=30)


@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
def test_fast_inference_copy_gives_the_same_outputs(downsample):
    from deepmorph.models.cnn import SimpleCNN
    from deepmorph.models.inference import for_inference

    torch.manual_seed(0)
    net = SimpleCNN(1, 6, widths=(8, 16, 32), head="flatten", image_size=32, downsample=downsample)
    net.train()
    for _ in range(3):  # give the batch norms non-trivial running statistics
        net(torch.randn(16, 1, 32, 32) * 3 + 1)
    net.eval()
    fast = for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), net(x),
                                   atol=1e-4, rtol=1e-4)


def test_psf_matching_degrades_sharper_cutouts_and_flags_wider(sersic, tmp_path):
    from deepmorph.simulate.psf import GaussianPSF
    from deepmorph.workflows.morphometry import predict_cutouts

    scale = 0.03
    size = 65
    yy, xx = np.mgrid[:size, :size] - size // 2

    def gaussian(fwhm):
        sigma = fwhm / 2.3548 / scale
        return np.exp(-(xx**2 + yy**2) / (2 * sigma**2))[None]

    def fwhm_of(img):
        img = img[0] / img[0].sum()
        return 2.3548 * np.sqrt(0.5 * (img * (xx**2 + yy**2)).sum()) * scale

    matched, flag = match_psf(gaussian(0.12), 0.12, 0.18, scale)
    assert flag == "" and fwhm_of(matched) == pytest.approx(0.18, rel=0.02)
    assert matched.sum() == pytest.approx(gaussian(0.12).sum(), rel=1e-3)
    assert match_psf(gaussian(0.19), 0.19, 0.18, scale)[1] == ""  # within tolerance: left as is
    assert match_psf(gaussian(0.3), 0.3, 0.18, scale) == (None, "psf_wider_than_model")
    # Through predict_cutouts: a PSF wider than the model's flags every cutout.
    from astropy.io import fits

    run = tmp_path / "run"
    config = default_config(**{"epochs": 1, "batch_size": 32, "progress_bar": False,
                               "model.kwargs": {"widths": [8, 16], "blocks_per_stage": 1}})
    train_morphometry(sersic, run, config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), parameters=("mag",),
                      evaluate=False)
    hdu = fits.PrimaryHDU(gaussian(0.12)[0].astype(np.float32))
    hdu.header["PIXSCALE"] = scale
    hdu.writeto(tmp_path / "g.fits")
    assert list(predict_cutouts(run, [tmp_path / "g.fits"], psf=GaussianPSF(0.5))["flag"]) == ["psf_wider_than_model"]
    table = predict_cutouts(run, [tmp_path / "g.fits"], psf="gaussian:0.12")
    assert list(table["flag"]) == [""] and np.isfinite(table["mag"][0])
