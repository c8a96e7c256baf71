"""Clump detection: truth S/N, the classical detector, probability-map extraction, matching and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from matplotlib.figure import Figure
from scipy import ndimage

from deepmorph.errors import DeepmorphValueError
from deepmorph.measure import clumps as mc
from deepmorph.measure.plots import completeness_figure, precision_recall_figure
from deepmorph.simulate import Priors, Simulator

STAMP = 64
# Large disks with a few bright clumps: most clumps lie well apart and away from the centre.
SPARSE = Priors(clumpy_fraction=1.0, n_clumps=(1, 3), log10_disk_hlr_pix=(0.9, 1.3), bulge_to_total=(0.0, 0.5),
                mag=(19.0, 22.0))


def _simulate(priors: Priors | None, n: int, seed: int, clumps: bool = True) -> tuple[Simulator, dict]:
    sim = Simulator("candels-f160w", stamp_size=STAMP, priors=priors, clumps=clumps)
    return sim, sim.simulate(np.arange(n), seed=seed)


def _snr(sim: Simulator, out: dict) -> np.ndarray:
    return mc.clump_snr(out["clump_table"], out["noiseless"], sim.noise.sky_sigma, sim.noise.gain_e_per_count,
                        sim.psf_nea_pix, ids=out["catalog"]["id"])


def _nearest_other(truth) -> np.ndarray:
    """Distance of each true clump to the nearest other clump of its galaxy, pixels (inf if alone)."""
    ids, x, y = (np.asarray(truth[k]) for k in ("id", "x_pix", "y_pix"))
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    d[(ids[:, None] != ids[None, :]) | np.eye(len(ids), dtype=bool)] = np.inf
    return d.min(axis=1) if len(ids) else d.sum(axis=1)


@pytest.fixture(scope="module")
def sparse():
    """150 galaxies with 1-3 clumps each, their clumps' S/N and the classical detections."""
    sim, out = _simulate(SPARSE, 150, seed=5)
    det = mc.classical_clumps(out["images"], sim.noise.sky_sigma, ids=out["catalog"]["id"],
                              gain=sim.noise.gain_e_per_count, fwhm_pix=sim.psf_fwhm_pix)
    return sim, out, _snr(sim, out), det


@pytest.fixture(scope="module")
def default_set():
    """200 galaxies with the default priors (half of them clumpy, up to 6 clumps)."""
    sim, out = _simulate(None, 200, seed=1)
    return sim, out, _snr(sim, out)


# -- truth S/N -----------------------------------------------------------------------------------
def test_clump_snr_by_hand():
    noiseless = np.zeros((2, 1, 8, 8))
    noiseless[1, 0, 4, 4] = 3.0  # counts per pixel under the clump, at row 4, column 4
    truth = {"id": np.array([7]), "x_pix": np.array([0.4]), "y_pix": np.array([0.6]), "flux": np.array([10.0])}
    # Stamp centre 3.5: the clump sits at column 3.9 and row 4.1 of the stamp with id 7 (the second).
    snr = mc.clump_snr(truth, noiseless, sky_sigma=0.5, gain=2.0, psf_nea_pix=20.0, ids=[3, 7])
    assert snr[0] == pytest.approx(10.0 / math.sqrt(20.0 * (0.25 + 3.0 / 2.0)))
    sky_only = mc.clump_snr(truth, noiseless, 0.5, None, 20.0, ids=[3, 7])
    assert sky_only[0] == pytest.approx(10.0 / math.sqrt(20.0 * 0.25))
    brighter = dict(truth, flux=np.array([20.0]))
    assert mc.clump_snr(brighter, noiseless, 0.5, 2.0, 20.0, ids=[3, 7])[0] == pytest.approx(2 * snr[0])


def test_clump_snr_rises_with_flux_and_falls_on_bright_galaxies(default_set):
    sim, out, snr = default_set
    truth = out["clump_table"]
    assert len(snr) > 100 and np.all(snr > 0)
    ranks = [np.argsort(np.argsort(v)) for v in (truth["flux"], snr)]
    assert np.corrcoef(*ranks)[0, 1] > 0.8  # Spearman rank correlation of flux and S/N
    # The galaxy's photon noise only lowers the S/N, and much so for clumps on bright galaxies.
    sky_only = mc.clump_snr(truth, out["noiseless"], sim.noise.sky_sigma, None, sim.psf_nea_pix,
                            ids=out["catalog"]["id"])
    assert np.all(snr <= sky_only * (1 + 1e-12)) and np.any(snr < 0.5 * sky_only)


# -- the classical detector ----------------------------------------------------------------------
def test_fast_median_matches_scipy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 1, 20, 17)).astype(np.float32)
    model = mc.smooth_galaxy_model(images, size_pix=5)
    assert model.shape == images.shape
    np.testing.assert_array_equal(model, ndimage.median_filter(images, size=(1, 1, 5, 5), mode="reflect"))
    large = rng.normal(size=(1200, 1100)).astype(np.float32)  # filtered in strips of rows
    np.testing.assert_array_equal(mc.smooth_galaxy_model(large, size_pix=3),
                                  ndimage.median_filter(large, size=3, mode="reflect"))


def test_classical_finds_bright_isolated_clumps(sparse):
    sim, out, snr, det = sparse
    truth = out["clump_table"]
    assert set(det.colnames) >= {"id", "x_pix", "y_pix", "flux", "flux_err", "score"}
    isolated = (snr > 20) & (_nearest_other(truth) >= 2 * sim.psf_fwhm_pix) & \
        (np.hypot(truth["x_pix"], truth["y_pix"]) >= sim.psf_fwhm_pix)
    assert isolated.sum() > 100
    di, ti = mc.match_detections(det, truth, radius_pix=2.0)
    found = np.zeros(len(snr), dtype=bool)
    found[ti] = True
    assert found[isolated].mean() > 0.9
    sel = isolated[ti]
    err = np.hypot(det["x_pix"][di] - truth["x_pix"][ti], det["y_pix"][di] - truth["y_pix"][ti])[sel]
    assert np.median(err) < 0.3 and np.mean(err < 1.0) > 0.95
    # Aperture fluxes within one FWHM: ~80% of a Moffat PSF's light, less what the model absorbs.
    ratio = np.asarray(det["flux"][di] / truth["flux"][ti])[sel]
    assert 0.45 < np.median(ratio) < 0.9
    assert np.all(det["flux_err"] > 0)
    # Most detections are real at 5 sigma, and precision-recall reaches 90% purity.
    curves = mc.detection_curves(det, truth, snr, np.arange(3.0, 30.0, 0.5))
    best = mc.completeness_at_purity(curves, 0.9)
    assert best["completeness"] > 0.7 and best["purity"] >= 0.9


def test_classical_score_tracks_the_truth_snr(sparse):
    _, out, snr, det = sparse
    di, ti = mc.match_detections(det, out["clump_table"])
    ratio = np.asarray(det["score"][di]) / snr[ti]
    # The tight median model takes ~40% of a clump's light, and a Gaussian kernel is not quite the PSF.
    assert 0.45 < np.median(ratio) < 0.8
    rho = np.corrcoef(np.log(det["score"][di]), np.log(snr[ti]))[0, 1]
    assert rho > 0.8


def test_classical_rarely_fires_on_smooth_galaxies():
    sim, out = _simulate(None, 200, seed=6, clumps=False)
    det = mc.classical_clumps(out["images"], sim.noise.sky_sigma, gain=sim.noise.gain_e_per_count)
    assert np.sum(det["score"] >= 5.0) <= 0.05 * 200
    # Without the centre cut, the residual of bright cores would be picked up as clumps.
    with_core = mc.classical_clumps(out["images"], sim.noise.sky_sigma, gain=sim.noise.gain_e_per_count,
                                    exclude_center_pix=None)
    assert np.sum(with_core["score"] >= 5.0) > 5 * max(1, np.sum(det["score"] >= 5.0))


# -- probability maps ----------------------------------------------------------------------------
def test_true_mask_as_a_perfect_map_recovers_unblended_clumps(default_set):
    sim, out, snr = default_set
    truth = out["clump_table"]
    ids = out["catalog"]["id"]
    det = mc.extract_from_maps(out["clump_mask"].astype(np.float32), out["images"], ids=ids,
                               sky_sigma=sim.noise.sky_sigma, fwhm_pix=sim.psf_fwhm_pix)
    assert np.all(det["score"] == 1.0) and np.all(det["probability"] == 1.0)
    di, ti = mc.match_detections(det, truth)
    assert len(di) >= 0.98 * len(det)  # every detection is a clump, or a blend whose centroid may fall between
    # Mask disks of radius 1.5 px touch (8-connected) when clumps are closer than ~4-5 px.
    alone = _nearest_other(truth) >= 5.0
    assert alone.sum() > 50
    found = np.zeros(len(truth["id"]), dtype=bool)
    found[ti] = True
    assert found[alone].all()
    err = np.hypot(det["x_pix"][di] - truth["x_pix"][ti], det["y_pix"][di] - truth["y_pix"][ti])
    assert err[alone[ti]].max() < 0.5
    curves = mc.detection_curves(det, truth, snr, [0.5])
    assert curves["purity"][0] >= 0.98 and curves["n_detections"][0] == len(det)


def test_extract_from_maps_position_score_and_flux():
    c = 0.5 * (STAMP - 1)
    yy, xx = np.mgrid[:STAMP, :STAMP]
    x0, y0, fwhm, flux, sky = 40.3, 20.7, 3.0, 50.0, 0.1
    sig = fwhm / (2 * math.sqrt(2 * math.log(2)))
    psf = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sig**2) / (2 * math.pi * sig**2)
    image = (flux * psf + np.random.default_rng(1).normal(0, sky, psf.shape))[None]
    prob = (0.8 * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 1.5**2))[None]
    det = mc.extract_from_maps(prob, image.astype(">f4"), threshold=0.3, sky_sigma=sky, fwhm_pix=fwhm, ids=[11])
    assert len(det) == 1 and det["id"][0] == 11
    assert det["x_pix"][0] == pytest.approx(x0 - c, abs=0.05) and det["y_pix"][0] == pytest.approx(y0 - c, abs=0.05)
    assert det["score"][0] == pytest.approx(prob.max()) and det["probability"][0] == det["score"][0]
    # A Gaussian PSF puts 1 - 2^-4 = 94% of its light within one FWHM of its centre; the median model
    # takes a few percent more.
    assert 0.85 * 0.9375 * flux < det["flux"][0] < 0.9375 * flux
    assert det["flux_err"][0] == pytest.approx(sky * math.sqrt(math.pi * fwhm**2), rel=0.02)
    # Without a sky noise the robust scatter of the galaxy-subtracted image stands in for it.
    guessed = mc.extract_from_maps(prob, image, threshold=0.3, fwhm_pix=fwhm)
    assert guessed["flux_err"][0] == pytest.approx(det["flux_err"][0], rel=0.15)
    assert len(mc.extract_from_maps(np.zeros_like(prob), image)) == 0


# -- matching and metrics ------------------------------------------------------------------------
def _table(ids, xs, ys, scores=None) -> Table:
    t = Table({"id": np.asarray(ids, dtype=np.int64), "x_pix": np.asarray(xs, dtype=float),
               "y_pix": np.asarray(ys, dtype=float)})
    if scores is not None:
        t["score"] = np.asarray(scores, dtype=float)
    return t


def test_match_detections_is_one_to_one_within_a_galaxy():
    truth = _table([1, 1, 2], [0.0, 10.0, 0.0], [0.0, 0.0, 0.0])
    det = _table([1, 1, 2, 3], [0.5, 1.5, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 9.0, 5.0, 5.0])
    d, t = mc.match_detections(det, truth, radius_pix=2.0)
    assert d.tolist() == [0] and t.tolist() == [0]  # two near clump 0: the nearer wins; no match elsewhere
    d, t = mc.match_detections(det, truth, radius_pix=2.0, priority="score")
    assert d.tolist() == [1] and t.tolist() == [0]  # by score, the brighter detection claims the clump
    for empty in (_table([], [], [], []), {"id": [], "x_pix": [], "y_pix": []}):
        d, t = mc.match_detections(empty, truth)
        assert d.size == 0 and t.size == 0 and d.dtype == np.int64
        d, t = mc.match_detections(det, _table([], [], []))
        assert d.size == 0 and t.size == 0


def test_detection_curves_and_completeness_at_purity(sparse):
    _, out, snr, det = sparse
    truth = out["clump_table"]
    thresholds = np.linspace(3.0, 200.0, 40)
    curves = mc.detection_curves(det, truth, snr, thresholds[::-1])
    assert np.all(np.diff(curves["threshold"]) > 0)
    for col in ("completeness", "completeness_all", "n_detections", "n_matched"):
        assert np.all(np.diff(curves[col]) <= 0), col
    assert np.all(curves["completeness"] >= curves["completeness_all"] - 0.05)
    assert curves.meta["default_threshold"] == 5.0 and curves.meta["n_true"] == len(snr)
    best = mc.completeness_at_purity(curves, 0.9)
    ok = curves["purity"] >= 0.9
    assert best["completeness"] == pytest.approx(curves["completeness"][ok].max())
    none = mc.completeness_at_purity(curves, 1.01)
    assert none["completeness"] == 0.0 and math.isnan(none["threshold"])
    # No detection above the threshold: purity is undefined, completeness 0.
    high = mc.detection_curves(det, truth, snr, [1e9])
    assert math.isnan(high["purity"][0]) and high["completeness"][0] == 0.0


def test_binned_completeness_and_purity_by_hand():
    truth = _table([1, 1, 2, 2], [0.0, 10.0, 0.0, 10.0], [0.0, 0.0, 0.0, 0.0])
    det = _table([1, 2, 2, 2], [0.2, 0.1, 10.3, -10.0], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 2.0, 9.0])
    values = np.array([1.0, 1.5, 3.0, 3.5])  # e.g. the clumps' S/N
    table = mc.binned_completeness(det, truth, values, [0.0, 2.0, 4.0], threshold=5.0)
    assert table["n_true"].tolist() == [2, 2] and table["n_found"].tolist() == [1, 1]  # clump 3's detection is faint
    assert table["completeness"].tolist() == [0.5, 0.5]
    assert np.all(table["completeness_lo"] < 0.5) and np.all(table["completeness_hi"] > 0.5)
    assert table["center"].tolist() == [1.25, 3.25]
    pur = mc.binned_purity(det, truth, np.array([0.05, 0.05, 0.05, 0.2]), [0.0, 0.1, 0.3], threshold=5.0)
    assert pur["n_detections"].tolist() == [2, 1] and pur["purity"].tolist() == [1.0, 0.0]


# -- bad input -----------------------------------------------------------------------------------
def test_bad_inputs_raise():
    images = np.zeros((2, 1, 16, 16), dtype=np.float32)
    nan = images.copy()
    nan[0, 0, 3, 3] = np.nan
    with pytest.raises(DeepmorphValueError, match="NaN"):
        mc.classical_clumps(nan, 0.1)
    with pytest.raises(DeepmorphValueError, match="sky_sigma"):
        mc.classical_clumps(images, -0.1)
    with pytest.raises(DeepmorphValueError, match="differ in shape"):
        mc.extract_from_maps(np.zeros((2, 1, 16, 15)), images)
    with pytest.raises(DeepmorphValueError, match=r"\[0, 1\]"):
        mc.extract_from_maps(images - 1.0, images)
    with pytest.raises(DeepmorphValueError, match="ids"):
        mc.classical_clumps(images, 0.1, ids=[1, 2, 3])
    with pytest.raises(DeepmorphValueError, match="smoothing method"):
        mc.smooth_galaxy_model(images, method="mean")
    truth = {"id": np.array([5]), "x_pix": np.array([0.0]), "y_pix": np.array([0.0]), "flux": np.array([1.0])}
    with pytest.raises(DeepmorphValueError, match="no stamp"):
        mc.clump_snr(truth, images, 0.1, None, 10.0, ids=[0, 1])
    with pytest.raises(DeepmorphValueError, match="columns"):
        mc.match_detections({"id": [1]}, truth)
    with pytest.raises(DeepmorphValueError, match="truth_snr"):
        mc.detection_curves(_table([], [], [], []), truth, [1.0, 2.0], [1.0])


# -- figures -------------------------------------------------------------------------------------
def test_figures(sparse):
    _, out, snr, det = sparse
    truth = out["clump_table"]
    curves = {"classical": mc.detection_curves(det, truth, snr, np.arange(3.0, 50.0, 1.0)),
              "half": mc.detection_curves(det[::2], truth, snr, np.arange(3.0, 50.0, 1.0))}
    fig = precision_recall_figure(curves, markers={"half": 10.0})
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "classical at 5" in labels and "half at 10" in labels
    bins = [0, 5, 10, 20, 50, 1e4]
    tables = {name: mc.binned_completeness(det, truth, snr, bins, 5.0) for name in ("classical", "again")}
    fig = completeness_figure(tables, "clump S/N", xscale="log")
    assert isinstance(fig, Figure) and fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].containers) == 2  # one errorbar series per method
    with pytest.raises(DeepmorphValueError):
        precision_recall_figure({})


def test_merge_close_clumps_links_friends_of_friends_per_galaxy():
    from deepmorph.measure.clumps import merge_close_clumps

    truth = {"id": np.array([0, 0, 0, 1, 1, 2]), "x_pix": np.array([0.0, 2.0, 4.0, 0.0, 10.0, 1.0]),
             "y_pix": np.zeros(6), "flux": np.array([1.0, 1.0, 2.0, 5.0, 5.0, 3.0]),
             "flux_fraction": np.array([0.01, 0.01, 0.02, 0.05, 0.05, 0.03])}
    merged = merge_close_clumps(truth, 2.5)
    # Galaxy 0: a chain 0-2-4 px is one group; galaxy 1's clumps stay apart; ids never mix.
    assert merged["id"].tolist() == [0, 1, 1, 2]
    assert merged["n_merged"].tolist() == [3, 1, 1, 1]
    assert merged["flux"].tolist() == [4.0, 5.0, 5.0, 3.0]
    assert merged["x_pix"][0] == pytest.approx((0 + 2 + 8) / 4.0)
    assert merged["flux_fraction"][0] == pytest.approx(0.04)
    assert len(merge_close_clumps(truth, 0.0)["id"]) == 6
    with pytest.raises(DeepmorphValueError, match="radius_pix"):
        merge_close_clumps(truth, -1)
