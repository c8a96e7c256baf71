"""The `deepmorph` command: it writes what the simulator makes, and user errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import astropy.units as u
import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from deepmorph import __version__
from deepmorph.cli import main
from deepmorph.data import open_dataset
from deepmorph.simulate import Priors, Simulator
from tests.cli_errors import error_line as _error_line

N, SEED, SIZE = 24, 3, 32
FAST = ["--psf", "gaussian:0.18", "--stamp-size", str(SIZE), "--no-progress"]




@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One run with the survey's own PSF, clumps, a prior override and a catalogue export."""
    folder = tmp_path_factory.mktemp("cli")
    out, cat = folder / "sims.h5", folder / "cat.ecsv"
    argv = ["simulate", "--survey", "candels-f160w", "--n", str(N), "--out", str(out), "--seed", str(SEED),
            "--stamp-size", str(SIZE), "--clumps", "--mag", "20", "21", "--batch-size", "10",
            "--catalog-out", str(cat), "--no-progress"]
    assert main(argv) == 0
    return out, cat


def test_simulate_writes_what_the_simulator_makes(made):
    out, _ = made
    sim = Simulator("candels-f160w", stamp_size=SIZE, clumps=True, priors=Priors(mag=(20.0, 21.0)))
    direct = sim.simulate(range(N), SEED)
    with open_dataset(out) as ds:
        np.testing.assert_array_equal(ds.images[...], direct["images"])
        np.testing.assert_array_equal(ds.array("clump_mask")[...], direct["clump_mask"])
        np.testing.assert_array_equal(ds.catalog["mag"], direct["catalog"]["mag"])
        assert ds.catalog["mag"].min() >= 20 and ds.catalog["mag"].max() <= 21  # --mag 20 21 was applied
        assert ds.attrs["priors"]["mag"] == [20.0, 21.0]
        assert ds.attrs["psf"] == {"type": "moffat", "fwhm_arcsec": 0.18, "beta": 3.5}  # the preset's
        assert ds.array_names == ("images", "clump_mask")


def test_catalog_out_is_ecsv_with_units(made):
    out, cat = made
    table = Table.read(cat)
    with open_dataset(out) as ds:
        np.testing.assert_array_equal(table["bulge_n"], ds.catalog["bulge_n"])
    assert len(table) == N
    assert table["disk_hlr_arcsec"].unit == u.arcsec and table["pa_deg"].unit == u.deg


def test_batch_size_does_not_change_items(made, tmp_path):
    out = tmp_path / "b7.h5"
    argv = ["simulate", "--n", str(N), "--out", str(out), "--seed", str(SEED), "--stamp-size", str(SIZE),
            "--clumps", "--mag", "20", "21", "--batch-size", "7", "--no-progress"]
    assert main(argv) == 0
    with h5py.File(made[0]) as a, h5py.File(out) as b:
        for name in ("images", "clump_mask", "catalog/mag", "catalog/bulge_n", "clump_table/id"):
            assert a[name][...].tobytes() == b[name][...].tobytes(), name
        # Clump fluxes can differ in the last bit with the batch length (torch's vectorised float64 pow
        # rounds its SIMD body and scalar tail differently); the stamps themselves are bit-identical.
        np.testing.assert_array_max_ulp(a["clump_table/flux"][...], b["clump_table/flux"][...], maxulp=1)


def test_info_prints_survey_and_n(made, capsys):
    assert main(["info", str(made[0])]) == 0
    text = capsys.readouterr().out
    assert "candels-f160w" in text and f"{N} stamps" in text and "clump_table" in text


def test_existing_output_needs_overwrite(made, tmp_path, capsys):
    out = tmp_path / "sims.h5"
    out.write_bytes(made[0].read_bytes())
    before = out.read_bytes()
    assert main(["simulate", "--n", "4", "--out", str(out), *FAST]) == 2
    line = _error_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert out.read_bytes() == before
    assert main(["simulate", "--n", "4", "--out", str(out), "--overwrite", *FAST]) == 0
    with open_dataset(out) as ds:
        assert len(ds) == 4


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--survey", "euclid-vis"], "unknown survey 'euclid-vis'"),
        (["--n", "0"], "n must be a positive integer, got 0"),
        (["--n", "-5"], "n must be a positive integer, got -5"),
        (["--bulge-n", "-1", "3"], "prior bulge_n must lie within"),
        (["--bulge-to-total", "0.5", "2"], "prior bulge_to_total"),
        (["--mag", "18"], "--mag: expected 2 arguments"),
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["--clumpy-fraction", "2"], "prior clumpy_fraction must lie within [0, 1], got 2.0"),
        (["--max-neighbors", "-1"], "prior max_neighbors must be >= 0, got -1"),
        (["--clump-flux-fraction", "-1", "2"], "prior clump_flux_fraction must lie within (0, 1)"),
        (["--stamp-size", "0"], "argument --stamp-size: expected an integer within [8, 1024], got '0'"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
        (["--gain", "nan"], "argument --gain: expected a finite number > 0, got 'nan'"),
        (["--catalog-out", "cat.txt"], "cat.txt: catalogue format from the extension must be .ecsv or .fits"),
    ],
)
def test_bad_simulate_arguments(tmp_path, capsys, args, problem, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x.h5"
    argv = ["simulate", "--n", "4", "--out", str(out), *FAST, *args]
    assert main(argv) == 2
    assert problem in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


def test_unreadable_psf_file(tmp_path, capsys):
    psf = tmp_path / "psf.fits"
    psf.write_text("this is not FITS")
    assert main(["simulate", "--n", "4", "--out", str(tmp_path / "x.h5"), "--psf", f"{psf}@0.03"]) == 2
    line = _error_line(capsys)
    assert str(psf) in line and "not a readable FITS file" in line
    assert main(["simulate", "--n", "4", "--out", str(tmp_path / "x.h5"), "--psf", str(tmp_path / "no.fits")]) == 2
    assert "no.fits: PSF file not found" in _error_line(capsys)
    whole = tmp_path / "whole.fits"
    fits.PrimaryHDU(np.ones((64, 64), np.float32)).writeto(whole)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(whole.read_bytes()[:-15000])  # a truncated download
    for option in ("--psf", "--background"):
        assert main(["simulate", "--n", "4", "--out", str(tmp_path / "x.h5"), option, f"{cut}@0.03"
                     if option == "--psf" else str(cut)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(cut) in err[0] and "not a readable FITS file" in err[0]  # no astropy warning
    tiny = tmp_path / "tiny.fits"
    fits.PrimaryHDU(np.ones((16, 16), np.float32)).writeto(tiny)
    assert main(["simulate", "--n", "4", "--out", str(tmp_path / "x.h5"), "--background", str(tiny), *FAST]) == 2
    assert "background 16x16 is smaller than the 32x32 stamps" in _error_line(capsys)
    assert not list(tmp_path.glob("x.h5*"))  # nothing written, not even a partial file


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    assert main(["simulate", "--n", "4", "--out", str(tmp_path / "x.h5"), "--device", "cuda"]) == 2
    assert "argument --device: 'cuda': no CUDA GPU on this machine" in _error_line(capsys)


@pytest.mark.parametrize("name", ["missing.h5", "bad.h5"])
def test_info_on_a_missing_or_bad_file(tmp_path, capsys, name):
    path = tmp_path / name
    if name == "bad.h5":
        path.write_text("not HDF5")
    assert main(["info", str(path)]) == 2
    line = _error_line(capsys)
    assert str(path) in line and ("no such file" in line or "not an HDF5 file" in line)


def test_usage_errors_are_one_line(capsys):
    assert main(["simulate", "--n", "4"]) == 2
    assert "the following arguments are required: --out" in _error_line(capsys)
    assert main([]) == 2
    _error_line(capsys)
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in _error_line(capsys)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"deepmorph {__version__}"


def test_interrupt_exits_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import deepmorph.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deepmorph.data, "write_dataset", interrupted)
    assert main(["simulate", "--n", "4", "--out", str(tmp_path / "x.h5"), *FAST]) == 130
    line = _error_line(capsys)
    assert "interrupted" in line and "x.h5.partial" in line and "resume" in line


def test_background_fits_is_the_noise(tmp_path):
    rng = np.random.default_rng(0)
    background = tmp_path / "sky.fits"
    fits.writeto(background, rng.normal(0.0, 0.05, (80, 90)).astype(">f4"))  # big-endian, as FITS files are
    out = tmp_path / "bg.h5"
    assert main(["simulate", "--n", "4", "--out", str(out), "--background", str(background), *FAST]) == 0
    with open_dataset(out) as ds:
        noise = ds.attrs["noise"]
        assert noise["type"] == "background" and noise["source"] == str(background)
        assert noise["gain_e_per_count"] == 3000.0  # the survey's gain
        assert 0.04 < noise["sky_sigma"] < 0.06


def test_tour_calls_run_tour(tmp_path, capsys, monkeypatch):
    seen = {}

    def run_tour(out: Path, quick: bool) -> Path:
        seen.update(out=out, quick=quick)
        return out / "report.html"

    monkeypatch.setitem(sys.modules, "deepmorph.tour", types.SimpleNamespace(run_tour=run_tour))
    assert main(["tour", "--quick", "--out", str(tmp_path / "t")]) == 0
    assert seen == {"out": tmp_path / "t", "quick": True}
    assert "report.html" in capsys.readouterr().out


def test_real_hst_psf_file(hst_psf_file, tmp_path):
    out = tmp_path / "hst.h5"
    assert main(["simulate", "--n", "4", "--out", str(out), "--psf", f"{hst_psf_file}:1@0.03",
                 "--stamp-size", str(SIZE), "--no-progress"]) == 0
    with open_dataset(out) as ds:
        assert ds.attrs["psf"]["type"] == "image"
        assert ds.attrs["psf"]["pixel_scale_arcsec"] == 0.03
        psf = ds.psf_image
    assert psf is not None and psf.ndim == 2 and psf.dtype == np.float32
    assert psf.sum() == pytest.approx(1.0, rel=1e-5)


def test_console_script_error_is_one_line(tmp_path):
    out = tmp_path / "exists.h5"
    out.write_text("")
    script = Path(sys.executable).parent / "deepmorph"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "deepmorph.cli"]
    proc = subprocess.run([*command, "simulate", "--n", "4", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"deepmorph: error: {out}: file exists; pass --overwrite to replace it\n"


@pytest.mark.parametrize(("argv", "problem"), [
    ("latent maps --max-items -5", "argument --max-items: expected an integer >= 1, got '-5'"),
    ("latent maps --seed -1", "argument --seed: expected an integer >= 0, got '-1'"),
    ("latent grid --span 0", "argument --span: expected a finite number > 0, got '0'"),
    ("latent compare --permutations 0", "argument --permutations: expected an integer >= 1, got '0'"),
    ("anomalies --n-reference 0", "argument --n-reference: expected an integer >= 1, got '0'"),
    ("evaluate anomalies --smooth -1", "argument --smooth: expected a finite number >= 0, got '-1'"),
    ("evaluate detect --score 2", "argument --score: expected a finite number within [0, 1], got '2'"),
    ("evaluate detect-baseline --deblend-cont nan", "argument --deblend-cont: expected a finite number within [0, 1]"),
    ("predict morphometry --pixel-scale 0", "argument --pixel-scale: expected a finite number > 0, got '0'"),
    ("simulate-pairs --stamp-size 0", "argument --stamp-size: expected an integer within [8, 1024], got '0'"),
    ("simulate-anomalies --stamp-size x", "argument --stamp-size: expected an integer, got 'x'"),
    ("simulate-fields --device bogus", "argument --device: expected cpu, cuda or cuda:N, got 'bogus'"),
])
def test_out_of_range_options_are_one_line_errors(capsys, argv, problem):
    assert main(argv.split()) == 2
    assert problem in _error_line(capsys)
