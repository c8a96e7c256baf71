"""Image recovery: Richardson-Lucy with the right kernel, a U-Net that beats the degraded input, the cGAN's
alternating steps, the evaluation table, and the command lines with bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from skimage.restoration import richardson_lucy

from deepmorph.cli import main
from deepmorph.models.patchgan import PatchDiscriminator, receptive_field
from deepmorph.simulate.anomalies import write_benchmark
from deepmorph.simulate.pairs import PairSimulator, gaussian_kernel, read_pairs, write_pairs
from deepmorph.tasks.recover import psnr
from deepmorph.workflows.recover import (
    choose_rl_iterations,
    measure_shapes,
    psnr_db,
    recover,
    richardson_lucy_recover,
)
from tests.cli_errors import error_line

TINY = ["--epochs", "3", "--batch-size", "16", "--lr", "2e-3", "--quiet", "--set", "model.kwargs.width=8",
        "--set", "model.kwargs.depth=2", "--fractions", "0.8", "0.1", "0.1"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    return root, write_pairs(root / "pairs.h5", 300, seed=0, stamp_size=32, progress=False)


@pytest.fixture(scope="module")
def runs(pairs):
    """A tiny L1 U-Net (3 epochs) and a tiny cGAN (1 epoch, 2 discriminator steps per generator step)."""
    root, data = pairs
    assert main(["train", "recover", "--data", str(data), "--out", str(root / "l1"), "--loss", "l1", *TINY]) == 0
    assert main(["train", "recover", "--data", str(data), "--out", str(root / "gan"), "--loss", "gan",
                 "--d-width", "8", "--d-steps", "2", "--spectral-norm", "--no-evaluate", *TINY,
                 "--epochs", "1"]) == 0
    return root / "l1", root / "gan"


def test_psnr_definition():
    original = torch.zeros(2, 1, 8, 8)
    original[:, 0, 4, 4] = 10.0
    recovered = original + 1.0  # MSE 1, peak 10: 20 dB
    assert psnr(recovered, original).tolist() == pytest.approx([20.0, 20.0])
    assert psnr_db(recovered.numpy(), original.numpy()).tolist() == pytest.approx([20.0, 20.0])


def test_richardson_lucy_recovers_a_sharper_image():
    """On nearly noise-free pairs RL with the PSF-ratio kernel gains many dB; a wrong kernel gains less."""
    sim = PairSimulator(stamp_size=32, psf_factor=2.0, noise_factor=1.0, original_noise_factor=0.05)
    b = sim.simulate(np.arange(24), seed=3)
    clean, degraded = b["original_noiseless"], b["images"]
    right = richardson_lucy_recover(degraded, sim.kernel, 20, sim.sky_sigma_degraded)
    wrong = richardson_lucy_recover(degraded, gaussian_kernel(1.6 * sim.kernel_sigma_pix), 20, sim.sky_sigma_degraded)
    before, after, off = (psnr_db(x, clean).mean() for x in (degraded, right, wrong))
    assert after > before + 8.0
    assert after > off + 2.0
    # the batched call is skimage's 2-D deconvolution of each stamp
    one = b["images"][5, 0].astype(np.float64)
    pad, offset = sim.kernel.shape[0], sim.sky_sigma_degraded
    ref = richardson_lucy(np.clip(np.pad(one, pad, mode="reflect") + offset, 1e-3 * offset, None), sim.kernel,
                          num_iter=20, clip=False)[pad:-pad, pad:-pad] - offset
    assert np.allclose(right[5, 0], ref, rtol=1e-5, atol=1e-6 * one.max())
    best, rows = choose_rl_iterations(degraded, clean, sim.kernel, sim.sky_sigma_degraded, grid=(1, 3, 20))
    assert best == 20 and [r["iterations"] for r in rows] == [1, 3, 20]


def test_shape_measurements_see_the_degradation():
    sim = PairSimulator(stamp_size=32, psf_factor=2.0)
    b = sim.simulate(np.arange(30), seed=6)
    ref, deg, noisy = (measure_shapes(b[k]) for k in ("original_noiseless", "noiseless", "original"))
    assert ref["ok"].all() and deg["ok"].all()
    assert np.all(deg["r50_pix"] >= ref["r50_pix"]) and np.median(deg["r50_pix"] / ref["r50_pix"]) > 1.15
    assert np.median(deg["ellipticity"]) < np.median(ref["ellipticity"])  # a round PSF makes galaxies rounder
    # the estimator is robust to the original's noise: a few percent at most
    assert np.median(np.abs(noisy["r50_pix"] / ref["r50_pix"] - 1)) < 0.03
    assert np.median(np.abs(noisy["ellipticity"] - ref["ellipticity"])) < 0.02


def test_patchgan_shapes_and_receptive_field():
    assert [receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]  # pix2pix's 70x70 PatchGAN has 3
    d = PatchDiscriminator(2, width=8, n_layers=2, spectral_norm=True, norm="none").eval()  # no power iteration
    assert d(torch.randn(3, 2, 64, 64)).shape == (3, 1, 14, 14)
    # a logit sees only its patch: a change far outside it leaves it unchanged
    x = torch.randn(1, 2, 64, 64)
    y = x.clone()
    y[..., 60:, 60:] += 5.0
    assert torch.equal(d(x)[..., 0, 0], d(y)[..., 0, 0])
    with pytest.raises(Exception, match="at least 12 px"):
        d(torch.randn(1, 2, 8, 8))


def test_l1_unet_beats_the_degraded_input(pairs, runs):
    root, data = pairs
    table = Table.read(root / "l1" / "evaluation" / "recovery.ecsv")
    rows = {r["method"]: r for r in table}
    assert list(rows) == ["degraded", "richardson-lucy", "unet-l1", "original"]
    assert rows["degraded"]["n"] == 30 and table.meta["rl_iterations"] >= 1
    assert rows["unet-l1"]["psnr_db"] > rows["degraded"]["psnr_db"] + 2.0
    assert rows["richardson-lucy"]["psnr_db"] > rows["degraded"]["psnr_db"] + 2.0
    # the degraded galaxies look bigger; both recoveries shrink that error
    assert rows["degraded"]["hlr_bias"] > 0.1
    assert rows["unet-l1"]["hlr_rel_err"] < rows["degraded"]["hlr_rel_err"]
    assert rows["richardson-lucy"]["hlr_rel_err"] < rows["degraded"]["hlr_rel_err"]
    assert rows["original"]["hlr_rel_err"] < 0.03 and np.isnan(rows["original"]["psnr_db"])
    assert (root / "l1" / "evaluation" / "recovery.png").is_file()


def test_cgan_alternates_and_its_losses_are_finite(pairs, runs):
    _, gan = runs
    hist = Table.read(gan / "history.csv")
    for col in ("d_loss", "g_adv", "l1", "d_real", "d_fake", "val_l1", "val_psnr"):
        assert np.all(np.isfinite(hist[col])), col
    state = torch.load(gan / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps = [max(float(s["step"]) for s in opt["state"].values()) for opt in state["optimizer_states"]]
    # 240 training pairs in batches of 16: 15 discriminator steps, a generator step every second one
    assert steps == [7.0, 15.0]
    assert any(k.startswith("discriminator.") for k in state["state_dict"])


def test_evaluate_and_predict_command_lines(pairs, runs, tmp_path, capsys):
    root, data = pairs
    l1, gan = runs
    out = tmp_path / "eval"
    assert main(["evaluate", "recover", "--model", str(l1), str(gan), "--data", str(data), "--out", str(out),
                 "--rl-iterations", "10"]) == 0
    table = Table.read(out / "recovery.ecsv")
    assert list(table["method"]) == ["degraded", "richardson-lucy", "unet-l1", "unet-cgan", "original"]
    assert table.meta["rl_iterations"] == 10 and np.all(np.isfinite(table["psnr_clean_db"]))
    assert len(Table.read(out / "recovery_per_image.ecsv")) == 30
    # predict: FITS cutouts in, the same recovered stamps out
    stamps = read_pairs(data, [0, 1, 2])["images"]
    paths = []
    for i, s in enumerate(stamps):
        paths.append(tmp_path / f"cut{i}.fits")
        fits.writeto(paths[-1], s[0].astype(">f4"))  # big-endian, as FITS stores it
    assert main(["predict", "recover", "--model", str(l1), "--images", *map(str, paths),
                 "--out", str(tmp_path / "rec.fits")]) == 0
    assert np.allclose(fits.getdata(tmp_path / "rec.fits"), recover(l1, stamps)[:, 0], atol=1e-5)
    capsys.readouterr()
    # bad input: one line, exit 2
    fits.writeto(tmp_path / "odd.fits", np.zeros((30, 30), np.float32))
    nan = np.zeros((32, 32), np.float32)
    nan[3, 3] = np.nan
    fits.writeto(tmp_path / "nan.fits", nan)
    for image, message in ((tmp_path / "odd.fits", "multiples of 4"), (tmp_path / "nan.fits", "NaN")):
        assert main(["predict", "recover", "--model", str(l1), "--images", str(image),
                     "--out", str(tmp_path / "x.fits")]) == 2
        assert message in error_line(capsys)


def test_train_command_line_bad_input(pairs, tmp_path, capsys):
    root, data = pairs
    plain = write_benchmark(tmp_path / "plain.h5", 20, 0, progress=False)
    assert main(["train", "recover", "--data", str(plain), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "not an image-recovery pairs file" in error_line(capsys)
    assert main(["train", "recover", "--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "r"),
                 *TINY]) == 2
    assert "no such file" in error_line(capsys)
    broken = tmp_path / "nan.h5"
    broken.write_bytes(data.read_bytes())
    with h5py.File(broken, "r+") as f:
        f["original"][:20, 0, 3, 3] = np.nan  # in training and validation pairs alike
    assert main(["train", "recover", "--data", str(broken), "--out", str(tmp_path / "r"), "--split-seed", "0",
                 *TINY]) == 2
    assert "NaN/inf" in error_line(capsys)
    odd = write_pairs(tmp_path / "odd.h5", 12, stamp_size=34, progress=False)
    assert main(["train", "recover", "--data", str(odd), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "multiples of 4" in error_line(capsys)
    assert main(["train", "recover", "--data", str(data), "--out", str(tmp_path / "r"), "--lambda-l1", "-1",
                 *TINY]) == 2
    assert "lambda_l1 must be >= 0" in error_line(capsys)
    assert not (tmp_path / "r" / "model.pt").exists()
