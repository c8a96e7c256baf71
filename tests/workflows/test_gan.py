"""GAN training, quality statistics, anomaly scores, and the gan/anomaly command lines."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import Normalization
from deepmorph.simulate.anomalies import AnomalySimulator, write_benchmark
from deepmorph.workflows.anomaly import (
    ResidualCalibration,
    anomaly_score,
    anomaly_table,
    auc_by_kind,
    calibrate_scan,
    choose_threshold,
    latent_search,
    mask_iou,
    reconstruction_scorer,
    score_images,
)
from deepmorph.workflows.gan import (
    compare_statistics,
    default_config,
    frechet_distance,
    image_statistics,
    ks_test,
    train_gan,
)
from tests.cli_errors import error_line

TINY = ["--epochs", "1", "--batch-size", "32", "--quiet", "--set", "model.kwargs.g_width=8",
        "--set", "model.kwargs.d_width=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    normal = write_benchmark(root / "normal.h5", 240, 0, seed=0, progress=False)
    bench = write_benchmark(root / "bench.h5", 16, 4, seed=1, kinds=["cosmic_ray", "bad_column"], progress=False)
    return root, normal, bench


@pytest.fixture(scope="module")
def runs(files):
    """A tiny GAN and its encoder, trained through the command line."""
    root, normal, _ = files
    assert main(["train", "gan", "--data", str(normal), "--out", str(root / "gan"), "--latent-dim", "8",
                 "--spectral-norm", "--label-smoothing", "0.1", "--d-steps", "2", "--n-eval", "100", *TINY]) == 0
    assert main(["train", "anomaly-encoder", "--model", str(root / "gan"), "--out", str(root / "enc"),
                 "--epochs", "1", "--batch-size", "32", "--quiet"]) == 0
    return root / "gan", root / "enc"


# -- training --------------------------------------------------------------------------------------------

def test_tiny_gan_trains_with_finite_losses(runs):
    gan, enc = runs
    history = json.loads((gan / "history.json").read_text())
    for key in ("d_loss", "g_loss", "val_d_loss", "val_g_loss"):
        values = history["history"][key] if "history" in history else history[key]
        assert np.all(np.isfinite(values)), key
    assert (gan / "samples" / "epoch_000.png").is_file()
    assert (gan / "samples.png").is_file() and (gan / "statistics.png").is_file()
    meta = json.loads((gan / "run.json").read_text())
    assert meta["task"] == "gan" and meta["spectral_norm"] and meta["d_steps"] == 2 and meta["latent_dim"] == 8
    quality = json.loads((gan / "quality.json").read_text())
    assert set(quality["ks"]) == {"flux", "r50_pix", "concentration", "ellipticity", "asymmetry"}
    assert json.loads((enc / "run.json").read_text())["task"] == "gan-encoder"
    # The generator draws noise-free galaxies; the GAN adds the dataset's recorded sky and Poisson noise.
    kw, scale = meta["model_kwargs"], meta["normalization"]["scale"][0]
    with h5py.File(meta["data"]) as f:
        noise = json.loads(f.attrs["noise"])
    assert kw["noise_sigma"] == pytest.approx(noise["sky_sigma"] / scale)
    assert 0.8 < kw["noise_sigma"] < 1.25  # the fitted asinh scale is the sky sigma, measured
    assert kw["poisson_scale"] == pytest.approx(1.0 / (noise["gain_e_per_count"] * scale))


def test_training_is_reproducible_and_wgan_gp_runs(files, tmp_path):
    _, normal, _ = files
    cfg = default_config(epochs=1, batch_size=32, progress_bar=False,
                         **{"model.kwargs.g_width": 8, "model.kwargs.d_width": 8, "model.kwargs.latent_dim": 8})
    states = []
    for name in ("a", "b"):
        train_gan(normal, tmp_path / name, cfg, evaluate=False)
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    r = train_gan(normal, tmp_path / "wgan", cfg, loss="wgan-gp", d_steps=3, evaluate=False)
    assert np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"])


# -- quality statistics -----------------------------------------------------------------------------------

def test_ks_test_on_known_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=2000), rng.normal(size=2000)
    d, p = ks_test(a, b)
    assert p > 0.01 and d < 0.05
    d, p = ks_test(a, rng.normal(0.5, 1.0, size=2000))
    assert p < 1e-10 and d == pytest.approx(0.197, abs=0.04)  # sup |Phi(x) - Phi(x - 0.5)| = 0.197
    t = compare_statistics({"flux": a}, {"flux": b}, names=("flux",))
    assert t["ks_p"][0] > 0.01


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3))
    assert frechet_distance(a, b) < 0.02
    assert frechet_distance(a, b + [1.0, 0.0, 2.0]) == pytest.approx(5.0, rel=0.05)
    assert frechet_distance(a, 2 * b) == pytest.approx(3.0, rel=0.1)  # 3 (1 + 4 - 2*2)


def test_image_statistics_of_known_profiles():
    s = 48
    yy, xx = np.mgrid[0:s, 0:s] - 0.5 * (s - 1)
    round_ = np.exp(-0.5 * (xx**2 + yy**2) / 3.0**2)
    long_ = np.exp(-0.5 * ((xx / 5.0) ** 2 + (yy / 2.5) ** 2))
    lopsided = round_ + 0.5 * np.exp(-0.5 * ((xx - 8) ** 2 + yy**2) / 1.5**2)
    st = image_statistics(np.stack([round_, long_, lopsided])[:, None] * 100, sky_sigma=0.1)
    assert st["r50_pix"][0] == pytest.approx(3.0 * np.sqrt(2 * np.log(2)), abs=0.5)
    assert st["ellipticity"][0] < 0.05 and st["ellipticity"][1] == pytest.approx(0.5, abs=0.1)
    assert st["asymmetry"][0] < 0.02 and st["asymmetry"][2] > 0.1
    assert st["concentration"][0] == pytest.approx(5 * np.log10(np.sqrt(np.log(25)) / np.sqrt(np.log(1.5625))),
                                                   abs=0.4)


# -- anomaly scores ---------------------------------------------------------------------------------------

class _PCA(torch.nn.Module):
    """A hand-made 'GAN': G(z) = mean + z @ components (a PCA of normal galaxies), features = 4x4 pooling."""

    def __init__(self, images: torch.Tensor, k: int = 6):
        super().__init__()
        flat = images.flatten(1)
        self.register_buffer("mean", flat.mean(0))
        _, _, v = torch.linalg.svd(flat - self.mean, full_matrices=False)
        self.register_buffer("components", v[:k])
        self.latent_dim, self.side = k, images.shape[-1]
        self.generator = self.forward_g = _Gen(self)
        self.discriminator = _Disc()

    def encode(self, x):
        return (x.flatten(1) - self.mean) @ self.components.T


class _Gen(torch.nn.Module):
    def __init__(self, pca):
        super().__init__()
        self.pca = [pca]

    def forward(self, z):
        p = self.pca[0]
        return (p.mean + z @ p.components).reshape(-1, 1, p.side, p.side)


class _Disc(torch.nn.Module):
    def features(self, x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)


def _space(images):
    return Normalization("asinh", scale=0.0134)(torch.as_tensor(images)) / 8.0


def test_score_formula_against_a_hand_computed_case():
    class G(torch.nn.Module):
        def forward(self, z):
            return z[:, :1, None, None].expand(-1, 1, 2, 2)

    class D(torch.nn.Module):
        def features(self, x):
            return x.flatten(1).sum(1, keepdim=True)

    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    z = torch.tensor([[2.0]])
    s = anomaly_score(G(), D(), x, z, lam=0.25)
    # R = |1-2| + |2-2| + |3-2| + |4-2| = 4; D = |10 - 8| = 2; A = 0.75 * 4 + 0.25 * 2 = 3.5
    assert float(s["residual"]) == 4.0 and float(s["feature"]) == 2.0 and float(s["score"]) == 3.5


def test_encoder_path_equals_zero_step_latent_search_and_search_lowers_the_score():
    sim = AnomalySimulator(stamp_size=32)
    x = _space(sim.simulate(np.arange(60), seed=0)["images"])
    pca = _PCA(x[:40])
    izi = score_images(pca, x[40:], "izi", encoder=pca.encode, lam=0.1)
    zero = score_images(pca, x[40:], "anogan", encoder=pca.encode, lam=0.1, steps=0, init="encoder")
    assert np.allclose(izi["score"], zero["score"]) and np.allclose(izi["z"], zero["z"])
    z0 = torch.zeros(20, pca.latent_dim)
    s0 = anomaly_score(pca.generator, pca.discriminator, x[40:], z0)["score"]
    z = latent_search(pca, x[40:], steps=60, lr=0.1, z0=z0)
    s1 = anomaly_score(pca.generator, pca.discriminator, x[40:], z)["score"]
    assert bool((s1 < s0).all())


class _Oracle(torch.nn.Module):
    """A hand-made 'GAN' that knows the noise-free normal galaxies: G(z) = z @ dictionary (z one-hot picks one)."""

    def __init__(self, dictionary: torch.Tensor):
        super().__init__()
        self.register_buffer("dictionary", dictionary.flatten(1))
        self.latent_dim, self.side = len(dictionary), dictionary.shape[-1]
        self.generator = _OracleGen(self)
        self.discriminator = _Disc()


class _OracleGen(torch.nn.Module):
    def __init__(self, oracle):
        super().__init__()
        self.oracle = [oracle]

    def forward(self, z):
        o = self.oracle[0]
        return (z @ o.dictionary).reshape(-1, 1, o.side, o.side)


def test_obvious_artefacts_are_found_with_high_auc():
    sim = AnomalySimulator(stamp_size=32)
    idx = np.arange(1000, 1120)
    kinds = np.array(["normal"] * 60 + ["cosmic_ray"] * 30 + ["bad_column"] * 30)
    b = sim.simulate(idx, seed=0, kinds=kinds)
    x = _space(b["images"])
    clean = _space(sim.simulate(idx, seed=0, kinds=["normal"])["noiseless"])
    oracle = _Oracle(clean)
    eye = torch.eye(len(idx))

    def encoder(t):  # knows which galaxy each image shows
        return eye[: len(t)] if len(t) == len(idx) else eye[torch.arange(len(t))]

    # The summed residual (AnoGAN's R) hardly sees a few bright pixels under the noise of 1024 others,
    # even with a perfect generator; the largest pixel residual does.
    summed = score_images(oracle, x, "izi", encoder, lam=0.0, batch_size=len(idx))
    assert auc_by_kind(summed["score"], kinds)["cosmic_ray"] < 0.8
    results = {"anogan": score_images(oracle, x, "anogan", encoder, lam=0.1, steps=0, init="encoder",
                                      reduce="max", batch_size=len(idx)),
               "izi": score_images(oracle, x, "izi", encoder, lam=0.1, reduce="max", batch_size=len(idx))}
    results["vae"] = reconstruction_scorer(type("AE", (torch.nn.Module,), {
        "forward": lambda self, t: oracle.generator(eye[: len(t)])})(), _space, batch_size=len(idx))(b["images"])
    for name in ("anogan", "izi"):
        aucs = auc_by_kind(results[name]["score"], kinds)
        assert aucs["cosmic_ray"] > 0.8 and aucs["bad_column"] > 0.8 and aucs["artefacts"] > 0.8, (name, aucs)
    table = anomaly_table(results, kinds, b["anomaly_mask"], fpr=0.1, pixel_fpr=0.01)
    assert list(table["method"]) == ["anogan", "izi", "vae"]
    expected = {"auc_cosmic_ray", "tpr_bad_column", "iou_cosmic_ray", "fpr_test", "seconds_per_image"}
    assert expected <= set(table.colnames)
    assert np.all(table["iou_bad_column"] > 0.3)


def test_latent_search_on_a_pca_generator_finds_bad_columns():
    sim = AnomalySimulator(stamp_size=32)
    pca = _PCA(_space(sim.simulate(np.arange(300), seed=0)["images"]), k=8)
    kinds = np.array(["normal"] * 40 + ["bad_column"] * 40)
    x = _space(sim.simulate(np.arange(2000, 2080), seed=0, kinds=kinds)["images"])
    r = score_images(pca, x, "anogan", lam=0.0, steps=40, lr=0.1, power=2.0, seed=1)
    assert auc_by_kind(r["score"], kinds)["bad_column"] > 0.7


def _heteroscedastic(n: int, seed: int):
    """Reconstructions of galaxies and residuals whose scale grows in the cores (model error), as for a VAE."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32] - 15.5
    amp = rng.uniform(2.0, 8.0, (n, 1, 1))
    level = amp * np.exp(-(xx ** 2 + yy ** 2) / (2 * rng.uniform(2.0, 4.0, (n, 1, 1)) ** 2))
    return level, (1.0 + 0.5 * level) * rng.standard_normal((n, 32, 32))


def test_scan_calibration_finds_compact_and_linear_anomalies_the_sum_misses():
    level, residual = _heteroscedastic(240, 0)
    kinds = np.array(["normal"] * 120 + ["cosmic_ray"] * 40 + ["bad_column"] * 40 + ["clumps"] * 40)
    rows = np.flatnonzero(kinds == "cosmic_ray")
    residual[rows, 5, 7] += 12.0  # one hot pixel in the sky
    for k, i in enumerate(np.flatnonzero(kinds == "bad_column")):
        residual[i, 4:28, 3 + k % 5] += 2.5  # a faint 24-pixel column
    yy, xx = np.mgrid[:32, :32]
    for i in np.flatnonzero(kinds == "clumps"):
        residual[i] += 3.0 * np.exp(-((xx - 24) ** 2 + (yy - 8) ** 2) / (2 * 1.5 ** 2))  # a faint blob
    calibration = np.zeros(len(kinds), bool)
    calibration[:60] = True
    fit = ResidualCalibration.fit(residual[calibration], level[calibration])
    z = fit.z(residual[60:120], level[60:120])
    faint, bright = level[60:120] < 0.3, level[60:120] > 4.0
    for sel in (faint, bright):  # unit scale at every level, sky and core alike
        assert 1.4826 * np.median(np.abs(z[sel])) == pytest.approx(1.0, abs=0.1)
    raw = {"signed_residual": residual, "level": level, "score": np.abs(residual).reshape(240, -1).sum(1),
           "residual_map": np.abs(residual)}
    scan = calibrate_scan({"x": raw}, calibration)["x"]
    held = ~calibration
    summed, scanned = auc_by_kind(raw["score"][held], kinds[held]), auc_by_kind(scan["score"][held], kinds[held])
    assert summed["cosmic_ray"] < 0.75 and summed["bad_column"] < 0.75
    for kind in ("cosmic_ray", "bad_column", "clumps"):
        assert scanned[kind] > 0.95, (kind, scanned)
    assert ResidualCalibration.from_dict(fit.to_dict()).peaks == fit.peaks
    table = anomaly_table({"sum": raw, "scan": scan}, kinds, calibration=calibration)
    assert table["auc_artefacts"][1] > 0.95 > table["auc_artefacts"][0]
    with pytest.raises(Exception, match="calibration"):
        ResidualCalibration.fit(residual[:1], level[:1])


class _LinearAE(torch.nn.Module):
    """An "autoencoder" spanned by two templates, whose encoder is the least-squares fit: it absorbs
    whatever else is in the stamp as far as the templates allow."""

    def __init__(self, templates: np.ndarray):
        super().__init__()
        self.t = torch.as_tensor(templates, dtype=torch.float32).reshape(len(templates), -1)

    def encode(self, x):
        return torch.linalg.lstsq(self.t.T, x.flatten(1).T).solution.T, None

    def decode(self, z):
        return (z @ self.t).reshape(len(z), 1, 32, 32)


def test_robust_refit_leaves_a_companion_in_the_residual():
    yy, xx = np.mgrid[:32, :32] - 15.5
    templates = np.stack([np.exp(-(xx**2 + yy**2) / (2 * s**2)) for s in (2.0, 5.0)]) * 20.0
    rng = np.random.default_rng(0)
    n = 60
    coef = rng.uniform(0.5, 1.5, (n, 2))
    galaxy = np.einsum("nk,kij->nij", coef, templates)
    companion = 15.0 * np.exp(-((xx - 6) ** 2 + (yy - 4) ** 2) / (2 * 1.5**2))  # the same place in every stamp
    kinds = np.array(["normal"] * 30 + ["companion"] * 30)
    x = (galaxy + (kinds == "companion")[:, None, None] * companion + rng.standard_normal((n, 32, 32)))
    x = x[:, None].astype(np.float32)
    model = _LinearAE(templates)
    plain = reconstruction_scorer(model)(x)
    refit = reconstruction_scorer(model, refine_steps=150, refine_scale=1.0, refine_lr=0.02)(x)
    anomalous = kinds == "companion"
    encoded = model.encode(torch.as_tensor(x))[0].numpy()
    refitted = model.encode(torch.as_tensor(x - refit["signed_residual"][:, None]))[0].numpy()
    # the least-squares encoder takes the companion's light for the galaxy's; the robust refit does not
    err_plain = np.abs(encoded[anomalous] - coef[anomalous]).mean()
    err_refit = np.abs(refitted[anomalous] - coef[anomalous]).mean()
    assert err_refit < 0.3 * err_plain, (err_plain, err_refit)
    assert np.abs(refitted[~anomalous] - coef[~anomalous]).mean() < 0.05  # normal galaxies keep their fit
    masks = np.repeat((anomalous[:, None, None] & (companion > 2.0))[:, None], 1, axis=1)
    calibration = ~anomalous & (np.arange(n) % 2 == 0)
    tables = [anomaly_table(calibrate_scan({"m": r}, calibration), kinds, masks, calibration=calibration)
              for r in (plain, refit)]
    assert tables[1]["iou_companion"][0] > tables[0]["iou_companion"][0] + 0.05
    assert tables[1]["iou_companion"][0] > 0.65
    with pytest.raises(Exception, match="refine_steps"):
        reconstruction_scorer(model, refine_steps=-1)


def test_significance_map_keeps_added_light_only_by_default():
    level, residual = _heteroscedastic(40, 1)
    fit = ResidualCalibration.fit(residual, level)
    positive, both = fit.significance(residual, level), fit.significance(residual, level, "both")
    assert positive.min() == 0.0 and np.all(positive == np.clip(fit.z(residual, level), 0, None))
    assert np.allclose(both, np.abs(fit.z(residual, level)))
    with pytest.raises(Exception, match="sign"):
        fit.significance(residual, level, "negative")


def test_thresholds_and_iou():
    normal = np.arange(100.0)
    thr = choose_threshold(normal, 0.05)
    assert np.mean(normal > thr) == pytest.approx(0.05, abs=0.011)
    with pytest.raises(Exception, match="false-positive"):
        choose_threshold(normal, 0.0)
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True
    iou = mask_iou(a, b)
    assert iou[0] == pytest.approx(4 / 12) and np.isnan(iou[1])


# -- command lines --------------------------------------------------------------------------------------

def test_cli_anomalies_rank_and_evaluate(runs, files, tmp_path, capsys):
    _, _, bench = files
    gan, enc = runs
    out = tmp_path / "scores.ecsv"
    assert main(["anomalies", "--model", str(enc), "--data", str(bench), "--out", str(out),
                 "--residuals", str(tmp_path / "res.fits"), "--n-reference", "20"]) == 0
    t = Table.read(out)
    assert len(t) == 24 and np.all(np.diff(t["score"]) <= 0) and t.meta["method"] == "izi"
    assert fits.getdata(tmp_path / "res.fits").shape == (24, 32, 32)
    assert main(["anomalies", "--model", str(gan), "--data", str(bench), "--out", str(tmp_path / "a.ecsv"),
                 "--steps", "2", "--n-reference", "10"]) == 0
    assert Table.read(tmp_path / "a.ecsv").meta["method"] == "anogan"
    assert main(["evaluate", "anomalies", "--model", str(enc), "--benchmark", str(bench), "--out",
                 str(tmp_path / "eval"), "--steps", "2"]) == 0
    table = Table.read(tmp_path / "eval" / "anomaly_table.ecsv")
    assert list(table["method"]) == ["izi", "anogan"] and "auc_artefacts" in table.colnames
    # The scan statistic, calibrated on the reference (rank) or the benchmark's normal galaxies (evaluate).
    assert main(["anomalies", "--model", str(enc), "--data", str(bench), "--out", str(tmp_path / "s.ecsv"),
                 "--reduce", "scan", "--n-reference", "20"]) == 0
    t = Table.read(tmp_path / "s.ecsv")
    assert t.meta["reduce"] == "scan" and np.all(np.isfinite(t["score"])) and np.all(np.diff(t["score"]) <= 0)
    assert main(["evaluate", "anomalies", "--model", str(enc), "--benchmark", str(bench), "--out",
                 str(tmp_path / "eval_scan"), "--steps", "2", "--reduce", "scan"]) == 0
    table = Table.read(tmp_path / "eval_scan" / "anomaly_table.ecsv")
    assert table.meta["reduce"] == "scan" and np.all(np.isfinite(table["auc_all"]))
    capsys.readouterr()
    argv = ["evaluate", "anomalies", "--model", str(enc), "--out", str(tmp_path / "bad")]
    assert main([*argv, "--benchmark", str(files[1])]) == 2  # the normal training set: nothing to find
    assert "only normal ones" in error_line(capsys)
    assert main([*argv, "--benchmark", str(bench), "--max-per-kind", "0"]) == 2
    assert "argument --max-per-kind: expected an integer >= 1, got '0'" in error_line(capsys)
    assert not (tmp_path / "bad").exists()


def test_cli_simulate_anomalies(tmp_path):
    out = tmp_path / "b.h5"
    assert main(["simulate-anomalies", "--out", str(out), "--n-normal", "3", "--n-per-kind", "1", "--no-progress"]) == 0
    with h5py.File(out) as f:
        assert f["anomaly_mask"].shape == (9, 1, 32, 32)


def test_cli_one_line_errors(runs, files, tmp_path, capsys):
    root, normal, bench = files
    gan, enc = runs
    missing = tmp_path / "missing.h5"
    assert main(["train", "gan", "--data", str(missing), "--out", str(tmp_path / "g"), *TINY]) == 2
    assert str(missing) in error_line(capsys)
    # a stamp size the DCGAN cannot make
    odd = write_benchmark(tmp_path / "odd.h5", 4, 0, stamp_size=36, progress=False)
    assert main(["train", "gan", "--data", str(odd), "--out", str(tmp_path / "g"), *TINY]) == 2
    assert str(odd) in error_line(capsys)
    # NaN pixels
    nan = tmp_path / "nan.h5"
    nan.write_bytes(normal.read_bytes())
    with h5py.File(nan, "r+") as f:
        f["images"][5, 0, 3, 3] = np.nan
    assert main(["train", "gan", "--data", str(nan), "--out", str(tmp_path / "g"), *TINY]) == 2
    assert str(nan) in error_line(capsys) and "NaN" in capsys.readouterr().err + "NaN"
    # not a run, wrong kind of run
    assert main(["anomalies", "--model", str(tmp_path), "--data", str(bench), "--out", str(tmp_path / "s.ecsv")]) == 2
    assert "not a GAN" in error_line(capsys)
    assert main(["anomalies", "--model", str(gan), "--method", "izi", "--data", str(bench),
                 "--out", str(tmp_path / "s.ecsv")]) == 2
    assert "encoder" in error_line(capsys)
    # images of the wrong size, with NaNs, missing
    big = tmp_path / "big.fits"
    fits.writeto(big, np.zeros((48, 48), np.float32))
    assert main(["anomalies", "--model", str(enc), "--images", str(big), "--out", str(tmp_path / "s.ecsv")]) == 2
    assert str(big) in error_line(capsys)
    bad = tmp_path / "bad.fits"
    img = np.zeros((32, 32), np.float32)
    img[4, 4] = np.nan
    fits.writeto(bad, img)
    assert main(["anomalies", "--model", str(enc), "--images", str(bad), "--out", str(tmp_path / "s.ecsv")]) == 2
    assert str(bad) in error_line(capsys)
    assert main(["anomalies", "--model", str(enc), "--images", str(tmp_path / "nope.fits"),
                 "--out", str(tmp_path / "s.ecsv")]) == 2
    assert "nope.fits" in error_line(capsys)
    assert main(["evaluate", "anomalies", "--model", str(enc), "--benchmark", str(odd), "--out",
                 str(tmp_path / "e")]) == 2
    assert str(odd) in error_line(capsys)
    assert main(["train", "anomaly-encoder", "--model", str(root), "--out", str(tmp_path / "e2")]) == 2
    assert "not a GAN run" in error_line(capsys)


def test_reconstruction_score_of_a_pose_normalised_model_is_in_the_input_frame():
    """A model that reconstructs the aligned galaxy perfectly scores ~0 once its output is turned back."""
    from deepmorph.models.vae import pose_angle, rotate_images

    class Aligned(torch.nn.Module):
        align = True

        def pose(self, x):
            return pose_angle(x)

        def forward(self, x):
            return rotate_images(x, pose_angle(x))

    yy, xx = np.mgrid[:32, :32] - 15.5
    t = 0.6
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    image = (100 * np.exp(-(u**2 / 30 + v**2 / 6)))[None, None].astype(np.float32)
    aligned = reconstruction_scorer(Aligned())(image)
    unaligned = np.abs(image - rotate_images(torch.as_tensor(image), pose_angle(torch.as_tensor(image))).numpy()).sum()
    assert aligned["score"][0] < 0.1 * unaligned
    assert aligned["residual_map"].shape == (1, 32, 32)
