"""Detection scores and the sep (SExtractor) baseline on simulated fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.errors import DeepmorphValueError
from deepmorph.measure.detection import (
    completeness_limit,
    detection_figure,
    detection_scores,
    match_catalogs,
    prediction_catalog,
    sep_catalog,
    touching_segments,
)
from deepmorph.simulate.fields import STAR_LABEL, FieldSimulator, objects_table, write_fields


def _truth(sim, n, seed=0):
    fields = [sim.simulate_field(i, seed) for i in range(n)]
    return fields, [objects_table(f["objects"], sim) for f in fields], [f["segmap"] for f in fields]


@pytest.fixture(scope="module")
def isolated():
    """Fields without forced pairs, and sep on them."""
    sim = FieldSimulator(size=128, pair_fraction=0.0, density=8)
    fields, tables, segmaps = _truth(sim, 6)
    seps = [sep_catalog(f["image"], sky_sigma=sim.sky_sigma, zeropoint=sim.zeropoint, gain=sim.gain) for f in fields]
    return sim, fields, tables, segmaps, [s[0] for s in seps], [s[1] for s in seps]


@pytest.fixture(scope="module")
def paired():
    sim = FieldSimulator(size=96, pair_fraction=1.0, star_fraction=0.0, density=10)
    return (sim, *_truth(sim, 4, seed=1))


def _perfect(tables):
    """The truth as a prediction: segment ids k + 1, a score, the true class."""
    out = []
    for t in tables:
        p = t.copy()
        p["id"] = p["id"] + 1
        p["score"] = 1.0 + np.asarray(t["snr"])
        out.append(p)
    return out


def test_sep_finds_a_star_where_it_is(isolated):
    sim = isolated[0]
    yy, xx = np.indices((40, 40))
    sigma = 1.5
    star = 1000.0 * np.exp(-((xx - 20.3) ** 2 + (yy - 17.6) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    rng = np.random.default_rng(0)
    table, seg = sep_catalog(star + rng.normal(0, 1.0, star.shape), sky_sigma=1.0, zeropoint=sim.zeropoint)
    assert len(table) == 1
    assert table["x"][0] == pytest.approx(20.3, abs=0.05) and table["y"][0] == pytest.approx(17.6, abs=0.05)
    # Isophotal flux above 1.5 sigma holds nearly all the light of an S/N ~ 200 star.
    assert table["flux"][0] == pytest.approx(1000.0, rel=0.04)
    assert table["mag"][0] == pytest.approx(sim.zeropoint - 2.5 * np.log10(table["flux"][0]))
    assert table["npix"][0] == (seg == 1).sum() and table["x0"][0] <= 20.3 <= table["x1"][0]
    assert table["score"][0] == pytest.approx(table["flux"][0] / table["flux_err"][0])


def test_sep_is_complete_and_pure_for_bright_isolated_galaxies(isolated):
    sim, fields, tables, segmaps, sep_t, sep_s = isolated
    scores = detection_scores(sep_t, sep_s, tables, segmaps, ap=False)
    mags, found = [], []
    for t, s, p in zip(tables, segmaps, sep_t, strict=True):
        _, ti, _ = match_catalogs(p, t)
        hit = np.zeros(len(t), bool)
        hit[ti] = True
        keep = (np.asarray(t["label"]) != STAR_LABEL) & (np.asarray(t["npix"]) > 0) & ~touching_segments(s, len(t))
        mags.append(np.asarray(t["mag"])[keep])
        found.append(hit[keep])
    mags, found = np.concatenate(mags), np.concatenate(found)
    # The depth: CANDELS' 5-sigma point-source limit is 27; galaxies are lost ~1.5 mag brighter.
    assert 24.5 < scores["mag_limit"] < 27.0
    bright = mags < scores["mag_limit"] - 1
    assert bright.sum() >= 20 and found[bright].mean() > 0.9
    # SExtractor shreds a few big bright galaxies into fragments: purity ~0.88 here, 0.92 on 20 fields.
    assert scores["purity"] > 0.8
    # Isophotal fluxes miss the wings below the threshold: a few percent low, ~10-20% scatter.
    assert -0.15 < scores["flux_rel_error_median"] < 0.0 and scores["flux_rel_error_nmad"] < 0.3


def test_perfect_prediction_scores_one(isolated):
    _, _, tables, segmaps, sep_t, sep_s = isolated
    sep_scores = detection_scores(sep_t, sep_s, tables, segmaps, ap=False)
    s = detection_scores(_perfect(tables), segmaps, tables, segmaps, bright_mag=sep_scores["bright_mag"])
    assert s["completeness"] == 1.0 and s["purity"] == 1.0
    assert s["ap50_box"] == pytest.approx(1.0) and s["ap50_mask"] == pytest.approx(1.0)
    assert s["classification_accuracy"] == 1.0 and s["flux_rel_error_median"] == 0.0
    assert s["galaxy_accuracy_bright"] == 1.0
    assert np.trace(np.asarray(s["confusion"])) == s["n_matched"]
    # every bright galaxy called a star: the bright accuracy falls to 0, the faint ones keep theirs
    wrong = _perfect(tables)
    for t in wrong:
        bright = (np.asarray(t["mag"]) < sep_scores["bright_mag"]) & (np.asarray(t["label"]) != STAR_LABEL)
        t["label"][bright] = STAR_LABEL
    w = detection_scores(wrong, segmaps, tables, segmaps, bright_mag=sep_scores["bright_mag"], ap=False)
    assert w["galaxy_accuracy_bright"] == 0.0 and 0.0 < w["galaxy_accuracy"] < 1.0


def test_prediction_missing_half_the_objects(isolated):
    _, _, tables, segmaps, sep_t, sep_s = isolated
    bright_mag = detection_scores(sep_t, sep_s, tables, segmaps, ap=False)["bright_mag"]
    half_t, half_s, kept_bright, n_bright, kept, n_vis = [], [], 0, 0, 0, 0
    for t, s in zip(_perfect(tables), segmaps, strict=True):
        keep = np.arange(len(t)) % 2 == 0
        half_t.append(t[keep])
        half_s.append(np.where(np.isin(s, np.asarray(t["id"])[keep]), s, 0))
        vis = np.asarray(t["npix"]) > 0
        bright = vis & (np.asarray(t["label"]) != STAR_LABEL) & (np.asarray(t["mag"]) < bright_mag)
        kept_bright += (bright & keep).sum()
        n_bright += bright.sum()
        kept += (vis & keep).sum()
        n_vis += vis.sum()
    s = detection_scores(half_t, half_s, tables, segmaps, bright_mag=bright_mag)
    assert s["completeness"] == pytest.approx(kept / n_vis) and 0.35 < s["completeness"] < 0.65
    assert s["purity"] == 1.0
    # Every detection is right, half are missing: AP = recall (COCO's 101-point interpolation).
    assert s["ap50_box"] == pytest.approx(kept_bright / n_bright, abs=0.02)
    assert s["ap50_mask"] == pytest.approx(kept_bright / n_bright, abs=0.02)


def test_sep_splits_few_forced_pairs(paired):
    _, fields, tables, segmaps = paired
    sim = paired[0]
    seps = [sep_catalog(f["image"], sky_sigma=sim.sky_sigma, zeropoint=sim.zeropoint) for f in fields]
    s = detection_scores([p[0] for p in seps], [p[1] for p in seps], tables, segmaps, ap=False)
    perfect = detection_scores(_perfect(tables), segmaps, tables, segmaps, ap=False)
    assert s["n_blend_pairs"] >= 10
    assert perfect["blend_split_fraction"] == 1.0
    # Pairs at 1-2 half-light radii: SExtractor's deblending splits a minority of them.
    assert s["blend_split_fraction"] < 0.6


def test_prediction_catalog_from_torchvision_outputs(isolated):
    _, fields, tables, segmaps, _, _ = isolated
    t, seg, image = tables[0], segmaps[0], fields[0]["image"]
    vis = np.flatnonzero(np.asarray(t["npix"]) > 0)
    boxes = np.stack([np.asarray(t[c])[vis] for c in ("x0", "y0", "x1", "y1")], axis=1) + 0.5
    masks = (seg[None] == (vis[:, None, None] + 1)).astype(np.float32)[:, None]
    pred = {"boxes": torch.as_tensor(boxes), "labels": torch.as_tensor(np.asarray(t["label"])[vis] + 1),
            "scores": torch.linspace(0.9, 0.5, len(vis)), "masks": torch.as_tensor(masks)}
    table, pseg = prediction_catalog(pred, image, sky_sigma=1.0, zeropoint=25.0)
    np.testing.assert_array_equal(table["label"], np.asarray(t["label"])[vis])
    np.testing.assert_allclose(table["x0"], np.asarray(t["x0"])[vis])
    np.testing.assert_array_equal(table["npix"], np.asarray(t["npix"])[vis])
    np.testing.assert_array_equal(pseg > 0, seg > 0)
    np.testing.assert_allclose(table["flux"], [image[seg == k + 1].sum() for k in vis], rtol=1e-5)
    # Overlapping masks: the higher score keeps the pixel.
    both = {"boxes": torch.tensor([[0.0, 0, 4, 4], [2.0, 2, 6, 6]]), "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.3, 0.8]), "masks": torch.zeros(2, 1, 8, 8)}
    both["masks"][0, 0, :4, :4] = 1
    both["masks"][1, 0, 2:6, 2:6] = 1
    tb, sb = prediction_catalog(both, np.ones((8, 8)), sky_sigma=1.0)
    assert tb["score"].tolist() == pytest.approx([0.8, 0.3]) and sb[3, 3] == 1 and tb["npix"].tolist() == [16, 12]


def test_match_catalogs_is_one_to_one_and_optimal():
    truth = Table({"x": [10.0, 12.0, 50.0], "y": [10.0, 10.0, 50.0]})
    pred = Table({"x": [11.2, 10.5, 30.0], "y": [10.0, 10.0, 30.0]})
    pi, ti, d = match_catalogs(pred, truth, max_dist=3.0)
    # Greedy nearest would give pred 0 to truth 1 and pred 1 to truth 0 anyway; Hungarian minimises the sum.
    assert ti.tolist() == [0, 1] and pi.tolist() == [1, 0] and d == pytest.approx([0.5, 0.8])
    assert match_catalogs(pred[:0], truth)[0].size == 0


def test_completeness_limit_of_a_known_curve():
    rng = np.random.default_rng(1)
    mags = rng.uniform(20, 28, 20000)
    detected = rng.uniform(size=mags.size) < 1 / (1 + np.exp((mags - 25.3) / 0.3))
    assert completeness_limit(mags, detected) == pytest.approx(25.3, abs=0.1)


def test_touching_segments():
    seg = np.zeros((6, 6), int)
    seg[:2, :2], seg[2, 2], seg[4:, 4:], seg[5, 0] = 1, 2, 3, 4
    assert touching_segments(seg, 4).tolist() == [True, True, False, False]


def test_bad_inputs_raise_clear_errors(isolated):
    _, _, tables, segmaps, _, _ = isolated
    with pytest.raises(DeepmorphValueError, match="2-D"):
        sep_catalog(np.zeros((2, 8, 8)))
    with pytest.raises(DeepmorphValueError, match="NaN"):
        sep_catalog(np.full((8, 8), np.nan), sky_sigma=1.0)
    with pytest.raises(DeepmorphValueError, match="same number of fields"):
        detection_scores(tables[:1], segmaps, tables, segmaps)
    with pytest.raises(DeepmorphValueError, match="no masks"):
        prediction_catalog({"boxes": [], "labels": [], "scores": []}, np.zeros((8, 8)), sky_sigma=1.0)


def test_cli_detect_baseline_writes_scores_and_figure(tmp_path, capsys):
    data = write_fields(tmp_path / "f.h5", FieldSimulator(size=64), 3, seed=2, progress=False)
    out = tmp_path / "base"
    assert main(["evaluate", "detect-baseline", "--data", str(data), "--out", str(out)]) == 0
    assert "sep on 3 fields" in capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    assert scores["method"] == "sep" and scores["n_fields"] == 3 and 0 < scores["purity"] <= 1
    assert (out / "detection.png").stat().st_size > 1000
    catalogue = Table.read(out / "catalogue.ecsv")
    assert set(catalogue["field"]) <= {0, 1, 2} and "truth_id" in catalogue.colnames
    assert main(["evaluate", "detect-baseline", "--data", str(tmp_path / "nope.h5"), "--out", str(out / "x")]) == 2
    assert "nope.h5: no such file" in capsys.readouterr().err
    fig = detection_figure({"a": scores, "b": scores})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) >= 2
