"""The tour: a small run writes a self-contained report with the GalSim accuracy numbers."""

from __future__ import annotations

import json

import pytest

from deepmorph import tour
from deepmorph.errors import DeepmorphValueError
from deepmorph.simulate import SURVEYS
from deepmorph.workflows.detect import MASK_THRESHOLDS

SURVEYS_TESTED = ("candels-f160w", "sdss-r")
N = 8
CLASSIFY_SMALL = {"n": 240, "stamp": 32, "sizes": (60, 144), "epochs": 3, "batch": 16, "widths": [8, 16],
                  "fractions": (0.6, 0.1, 0.3)}
IMAGE_SMALL = {"clumps": {"n": 200, "stamp": 32, "epochs": 2, "batch": 16, "width": 4, "fractions": (0.6, 0.1, 0.3),
                          "hdf": True},
               "decompose": {"n": 160, "stamp": 32, "epochs": 2, "batch": 16, "width": 4,
                             "fractions": (0.6, 0.1, 0.3), "baseline_max": 4},
               "morphometry": {"n": 240, "n_neighbours": 40, "epochs": 1, "batch": 32, "transfer_n": 300,
                               "transfer_labels": (0, 20), "transfer_epochs": 1, "frame_n": 200, "frame_epochs": 1,
                               "adapt_n": 120, "adapt_fractions": (0.1,), "adapt_strategies": ("head",),
                               "adapt_steps": 4},
               "vae": {"n": 300, "stamp": 32, "epochs": 2, "batch": 32, "latent": 4},
               "gan": {"n": 300, "epochs": 1, "width": 8, "latent": 8, "encoder_epochs": 1, "bench_normal": 40,
                       "bench_per_kind": 6, "steps": 3, "n_eval": 100, "vae_epochs": 1, "vae_latent": 4,
                       "vae_refine": 2},
               "recover": {"n": 120, "stamp": 32, "epochs": 1, "batch": 16, "width": 4, "d_width": 4,
                           "fractions": (0.6, 0.2, 0.2)},
               "detect": {"n": 8, "size": 64, "epochs": 1, "batch": 2, "fractions": (0.5, 0.25, 0.25), "map_every": 1,
                          "real": (), "model": {"fpn_channels": 16, "mask_channels": 16, "mask_layers": 1,
                                                "box_head_size": 32, "detections_per_img": 50}},
               "tune": {"n": 200, "trials": 3, "epochs": 1, "fine_trials": 0, "fine_epochs": 1, "workers": 1,
                        "top_k": 2, "fractions": (0.5, 0.25, 0.25), "widths": ([4, 8], [8, 16]),
                        "default_widths": [4, 8]}}


@pytest.fixture(scope="module")
def tour_run(tmp_path_factory):
    pytest.importorskip("galsim")
    out = tmp_path_factory.mktemp("tour")
    path = tour.run_tour(out, quick=True, n_stamps=N, surveys=SURVEYS_TESTED, progress=False,
                         classify_options=CLASSIFY_SMALL, options=IMAGE_SMALL)
    return out, path, json.loads((out / "metrics.json").read_text())


def test_report_written(tour_run):
    out, path, metrics = tour_run
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    # 2 figures per survey (gallery, parameters), the speed bar and the GalSim residual; then the
    # learning curves, two confusion matrices and the size curve of the classification section.
    n_figures = 2 * len(SURVEYS_TESTED) + 2 + 4 + 1  # ... and the convolution matrix
    n_figures += 4 + 1 + 2  # clumps: history, 3 curves, the Hubble Deep Field; decomposition: history, degeneracies
    n_figures += 2 + 1 + 1 + ("ntt_field" in metrics)  # morphometry: isolated, environments; adapt; transfer; NTT
    n_figures += 3 + 3  # VAE: latent maps, decoded grid, interpolation; GAN: samples, statistics; anomalies
    n_figures += 1  # image recovery: degraded, recovered, original and residual stamps
    n_figures += 3  # detection: completeness and purity vs magnitude, mask threshold, a field's outlines
    n_figures += 2  # hyper-parameter search: optimisation history, parameter importances
    assert text.count("data:image/png;base64,") == n_figures
    assert text.count("<figcaption>") == n_figures
    assert "1. Simulating galaxies" in text and "Accuracy against GalSim" in text
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(pngs) == n_figures and "galsim-residual.png" in pngs


def test_galsim_accuracy(tour_run):
    _, _, metrics = tour_run
    g = metrics["galsim"]
    assert g["available"] is True
    assert g["n"] == N * len(SURVEYS_TESTED)
    assert 0 < g["median_rel_l2"] < 0.005
    assert g["median_rel_l2"] <= g["max_rel_l2"] < 0.02
    assert set(g["per_survey"]) == set(SURVEYS_TESTED)
    for per in g["per_survey"].values():
        assert per["n"] == N and per["median_rel_l2"] < 0.005


def test_survey_metrics(tour_run):
    _, _, metrics = tour_run
    assert metrics["tour"]["n_stamps"] == N and metrics["tour"]["surveys"] == list(SURVEYS_TESTED)
    assert metrics["tour"]["section_s"]["1. Simulating galaxies"] > 0
    for name in SURVEYS_TESTED:
        m, preset = metrics["simulate"][name], SURVEYS[name]
        assert m["pixel_scale_arcsec"] == preset.pixel_scale_arcsec
        assert m["zeropoint_mag"] == preset.zeropoint_mag
        assert m["psf_fwhm_arcsec"] == preset.psf["fwhm_arcsec"]
        assert m["psf_fwhm_pix"] == pytest.approx(preset.psf["fwhm_arcsec"] / preset.pixel_scale_arcsec)
        assert m["sky_sigma_counts"] > 0 and m["stamps_per_s"] > 0
        assert sum(m["label_counts"].values()) == N
        assert 0 <= m["clumpy_fraction"] <= 1 and 0 <= m["neighbor_fraction"] <= 1
    # deeper preset (relative to its zero point) -> smaller sky noise in counts
    assert metrics["simulate"]["candels-f160w"]["sky_sigma_counts"] < metrics["simulate"]["sdss-r"]["sky_sigma_counts"]


def test_classification_section(tour_run):
    out, path, metrics = tour_run
    c = metrics["classify"]
    assert c["n_test"] == 72 and c["stamp_size"] == 32
    assert 0.0 <= c["cnn_accuracy"] <= 1.0 and 0.0 <= c["forest_accuracy"] <= 1.0
    curve = {(r["method"], r["train_size"]) for r in c["size_curve"]}
    assert curve == {("cnn", 60), ("cnn", 144), ("forest", 60), ("forest", 144)}
    # The forest is far better than chance (4 balanced classes) even on 144 galaxies.
    assert c["forest_accuracy"] > 0.5
    text = path.read_text(encoding="utf-8")
    assert "2. Classifying galaxies, with and without deep learning" in text
    assert (out / "classify" / "cnn-144" / "model.pt").is_file()


def test_transposed_convolution_section(tour_run):
    _, path, metrics = tour_run
    t = metrics["transposed_convolution"]
    assert t["conv_max_abs_err"] < 1e-12 and t["conv_transpose_max_abs_err"] < 1e-12
    assert "3. The transposed convolution, shown" in path.read_text(encoding="utf-8")


def test_image_to_image_sections(tour_run):
    out, path, metrics = tour_run
    text = path.read_text(encoding="utf-8")
    assert "4. Finding clumps with a U-Net" in text and "5. Bulge/disk decomposition with a U-Net" in text
    c = metrics["clumps"]
    assert c["n_galaxies"] == 60 and c["n_clumps_snr5"] > 0
    for method in ("unet", "classical"):
        assert 0 <= c[method]["completeness_at_purity_90"] <= 1
    hdf = c["hubble_deep_field"]
    assert hdf["n_galaxies"] == 8 and 0 <= hdf["n_on_galaxies"] <= hdf["n_detections"]
    d = metrics["decompose"]
    assert d["n_test"] == 48 and d["imfit"]["n"] + d["imfit"]["n_failed"] >= 1
    assert 0 <= d["unet"]["bt_rmse"] < 1 and d["speedup"] > 1
    assert (out / "clumps" / "model.pt").is_file() and (out / "decompose" / "decomposition.png").is_file()


def test_morphometry_section(tour_run):
    out, path, metrics = tour_run
    text = path.read_text(encoding="utf-8")
    assert "6. Morphometry, transfer between surveys, and a real field" in text and "6.2 From SDSS to DES" in text
    m = metrics["morphometry"]
    assert set(m["isolated"]) == {"mag", "hlr", "n", "q", "pa"} and m["isolated"]["mag"]["n"] == 36
    assert sum(e["mag"]["n"] for e in m["environments"].values()) == 40
    t = metrics["transfer"]
    assert 0 <= t["source_accuracy"] <= 1 and {r["labels"] for r in t["rows"]} == {0, 20}
    assert "6.1 Domain adaptation" in text
    rows = metrics["adapt"]["rows"]
    assert [r["method"] for r in rows] == ["source-domain", "unadapted", "finetune", "scratch"]
    assert all(r["mag_scatter"] > 0 for r in rows) and rows[2]["labels"] == rows[3]["labels"] == 12
    if "ntt_field" in metrics:  # ../shared/data present
        assert metrics["ntt_field"]["n_matched"] >= 0.9 * metrics["ntt_field"]["n_sextractor"]
    else:
        assert "was skipped" in text


def test_generative_section(tour_run):
    out, path, metrics = tour_run
    text = path.read_text(encoding="utf-8")
    assert "7. Generative models" in text
    v = metrics["vae"]
    assert v["train_size"] == 240 and v["epochs"] == 2 and v["n_eval"] == 45
    assert {"mag", "log10_hlr", "q", "bt"} <= set(v["best_abs_rho"])
    assert v["best_abs_rho"]["mag"] > 0.8  # even two epochs learn the brightness
    g, a = metrics["gan"], metrics["anomalies"]
    assert g["train_size"] == 240 and set(g["ks"]) == {"flux", "r50_pix", "concentration", "ellipticity", "asymmetry"}
    # None (NaN) where the barely trained generator's stamps hold no source to measure
    assert all(v["p"] is None or (0 <= v["p"] <= 1 and 0 <= v["d"] <= 1) for v in g["ks"].values())
    assert any(v["p"] is not None for v in g["ks"].values())
    assert set(a) == {"anogan", "izi", "vae", "vae, robust refit"}
    assert all(0 <= m["auc_all"] <= 1 and 0 <= m["iou_all"] <= 1 for m in a.values())
    assert a["izi"]["seconds_per_image"] < a["anogan"]["seconds_per_image"]  # one pass vs a latent search


def test_detect_section(tour_run):
    out, path, metrics = tour_run
    text = path.read_text(encoding="utf-8")
    assert "9. Detecting every galaxy in a field (Mask R-CNN)" in text and "test-time augmentation" in text
    d = metrics["detect"]
    assert d["n_fields"] == 2 and d["train_size"] == 4
    for name in ("maskrcnn", "maskrcnn_tta", "sep"):  # the same held-out fields, the same truth
        assert d[name]["n_fields"] == 2 and d[name]["n_truth"] == d["sep"]["n_truth"] > 0
        assert 0 <= d[name]["completeness"] <= 1
    assert (out / "detect" / "tta" / "test_metrics.json").is_file()
    assert d["mask_threshold"] in MASK_THRESHOLDS and d["mask_threshold_tta"] in MASK_THRESHOLDS
    assert "validation fields for the best mask AP@0.5" in text


def test_tune_section(tour_run):
    _, path, metrics = tour_run
    assert "10. Hyper-parameter search" in path.read_text(encoding="utf-8")
    t = metrics["tune"]
    assert t["n_trials"] == 3 and t["states"]["complete"] + t["states"]["pruned"] == 3 and t["n_test"] == 50
    assert t["best_val"] <= t["default_val"] + 1e-6  # trial 0 is the default, trained the same way
    for key in ("best_test_accuracy", "default_test_accuracy", "ensemble_test_accuracy"):
        assert 0 <= t[key] <= 1


def test_sections_are_pluggable(tmp_path, monkeypatch):
    def extra(report, ctx):
        report.section("9. Extra")
        report.metrics["extra"] = {"answer": 42, "n_stamps": ctx.n_stamps}

    monkeypatch.setattr(tour, "SECTIONS", [("9. Extra", extra)])
    path = tour.run_tour(tmp_path, n_stamps=3, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["extra"] == {"answer": 42, "n_stamps": 3}
    assert "9. Extra" in metrics["tour"]["section_s"]
    assert "9. Extra" in path.read_text()


@pytest.mark.parametrize("kwargs", [{"surveys": ["nope"]}, {"surveys": []}, {"n_stamps": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(DeepmorphValueError):
        tour.run_tour(tmp_path, progress=False, **kwargs)
