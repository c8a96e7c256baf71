"""Sim-to-sim domain adaptation: a tiny experiment writes one scored row per model on one target
test split, the target set is really harder, a rerun resumes, and bad inputs are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import open_dataset
from deepmorph.errors import DeepmorphError
from deepmorph.workflows.adapt import (
    MIN_LABELS,
    adapt_config,
    adapt_experiment,
    dex_scatter,
    label_budget,
    label_counts,
    simulate_domains,
)
from tests.cli_errors import error_line as _error_line

STRATEGIES = ("head", "none")
FRACTIONS = (0.025, 0.1)  # 6 and 24 labels of 240 target galaxies
TINY = {"model.kwargs": {"widths": [8, 16, 32], "image_size": 32}, "epochs": 2, "batch_size": 32,
        "progress_bar": False}


def _experiment(out):
    return adapt_experiment(out, fractions=FRACTIONS, strategies=STRATEGIES, n_source=240, n_target=240,
                            config=adapt_config(**TINY), steps=3, stamp_size=32, psf="moffat:0.25,2.5",
                            progress=False)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt")
    return out, _experiment(out)


def test_every_model_is_scored_on_the_target_test_split(done):
    out, table = done
    for name in ("adapt.ecsv", "adapt.json", "adapt.png", "adapt_examples.png", "source.h5", "target.h5"):
        assert (out / name).is_file(), name
    saved = Table.read(out / "adapt.ecsv")
    for name in ("method", "strategy", "labels"):
        assert saved[name].tolist() == table[name].tolist()
    rows = {(r["method"], r["strategy"], r["labels"]): r for r in table}
    labels = label_counts(FRACTIONS, 240)
    assert labels == [6, 24]
    expected = [("source-domain", "-", 0), ("unadapted", "-", 0)]
    expected += [("finetune", s, n) for n in labels for s in STRATEGIES] + [("scratch", "-", n) for n in labels]
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        for name in ("mag", "hlr", "n", "q", "hlr_dex", "n_dex"):
            assert np.isfinite(row[f"{name}_scatter"]) and row[f"{name}_scatter"] > 0, key
        for name in ("mag", "hlr", "n", "q"):
            assert 0 <= row[f"{name}_outlier_fraction"] <= 1
    # One target test split (10% of 240) for every target row; the source row uses the source's.
    assert {int(r["n_test"]) for r in table if r["method"] != "source-domain"} == {24}
    # Gap closed: (un-adapted - row) / (un-adapted - source domain), NaN where there is no gap.
    low, high = rows[("source-domain", "-", 0)], rows[("unadapted", "-", 0)]
    for row in table:
        for name in ("mag", "hlr", "n", "q"):
            gap = high[f"{name}_scatter"] - low[f"{name}_scatter"]
            want = (high[f"{name}_scatter"] - row[f"{name}_scatter"]) / gap if gap > 0 else np.nan
            np.testing.assert_allclose(row[f"{name}_gap_closed"], want)


def test_finetuning_and_scratch_use_the_same_labels(done):
    out, _ = done
    record = json.loads((out / "adapt.json").read_text())
    for n in (6, 24):
        items = record["labelled_items"][str(n)]
        assert len(items) == len(set(items)) == n
        runs = [out / f"finetune-{s.replace(':', '')}-{n}" for s in STRATEGIES] + [out / f"scratch-{n}"]
        metas = [json.loads((run / "run.json").read_text()) for run in runs]
        assert {m["train_size"] for m in metas} == {n}
        # Each run refits the asinh softening on its own training images: same labels, same value.
        assert len({json.dumps(m["normalization"]) for m in metas}) == 1
    assert set(record["labelled_items"]["6"]) <= set(record["labelled_items"]["24"])  # nested label sets


def test_the_target_set_is_harder(done):
    out, _ = done
    record = json.loads((out / "adapt.json").read_text())
    light = record["excess_light"]
    # Neighbours, clumps and the real sky's sources add light beyond the galaxy's; the idealised set has none.
    assert light["source"]["fraction_over_10pc"] < 0.05 and light["source"]["mean"] < 0.05, light
    assert light["target"]["fraction_over_10pc"] > 0.3 and light["target"]["mean"] > 0.2, light
    make_up = record["target_make_up"]
    with open_dataset(out / "target.h5") as target, open_dataset(out / "source.h5") as source:
        noise = target.attrs["noise"]
        assert target.attrs["neighbors"] and target.attrs["clumps"] and not source.attrs["neighbors"]
        assert source.attrs["noise"]["type"] == "gaussian"
    assert noise["type"] == "background"
    # The real sky was scaled to the survey's sky noise, and the factor is recorded.
    assert noise["sky_sigma"] == pytest.approx(make_up["sky_sigma"], rel=1e-3)
    assert noise["scale"] == pytest.approx(make_up["background_scale"])


def test_rerun_resumes_without_training(done):
    out, table = done
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.pt")}
    again = _experiment(out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.pt")} == stamps
    np.testing.assert_allclose(np.asarray(again["mag_scatter"]), np.asarray(table["mag_scatter"]))


def test_dex_scatter_ignores_a_common_factor(tmp_path):
    rng = np.random.default_rng(1)
    truth = 10 ** rng.uniform(-1, 0.5, 4000)
    measured = truth * 10 ** rng.normal(0.0, 0.1, truth.size)
    for factor, run in ((1.0, tmp_path / "a"), (0.5, tmp_path / "b")):
        run.mkdir()
        Table({"true_hlr": truth, "hlr": factor * measured}).write(run / "test_predictions.ecsv")
    # The same 0.1 dex scatter whether or not every radius is halved; the fractional NMAD halves.
    assert dex_scatter(tmp_path / "a", "hlr") == pytest.approx(0.1, rel=0.05)
    assert dex_scatter(tmp_path / "b", "hlr") == pytest.approx(dex_scatter(tmp_path / "a", "hlr"))
    assert np.isnan(dex_scatter(tmp_path / "a", "n"))


def test_label_budget_and_counts():
    assert label_budget(6) == (8, 100)  # 1 step per epoch, capped
    assert label_budget(100) == (25, 38)  # 4 steps per epoch
    batch, epochs = label_budget(2000, steps=150)
    assert batch == 128 and epochs == 10  # 15 steps per epoch
    with pytest.raises(DeepmorphError, match=f"at least {MIN_LABELS}"):
        label_counts([0.0001], 20000)
    with pytest.raises(DeepmorphError, match="in \\(0, 1\\)"):
        label_counts([1.5], 20000)


def test_simulated_files_are_reused_or_refused(tmp_path):
    paths = simulate_domains(tmp_path, 12, 12, seed=3, stamp_size=32, psf="moffat:0.25,2.5", progress=False)
    assert paths["info"]["background_scale"] > 0 and paths["info"]["psf"] == "moffat:0.25,2.5"
    assert simulate_domains(tmp_path, 12, 12, seed=3, stamp_size=32, psf="moffat:0.25,2.5",
                            progress=False)["target"] == paths["target"]
    with pytest.raises(DeepmorphError, match="exists with 12 stamps"):
        simulate_domains(tmp_path, 12, 20, seed=3, stamp_size=32, psf="moffat:0.25,2.5", progress=False)


def test_without_shared_data_the_fallbacks_are_used_and_said(monkeypatch):
    import deepmorph.workflows.adapt as adapt

    monkeypatch.setattr(adapt, "shared_data_file", lambda relative: None)
    source, target, info = adapt.domain_simulators(stamp_size=32)
    assert "hubble_deep_field" in info["background"] and info["psf"] == adapt.FALLBACK_PSF
    assert "fallback" in info["psf_origin"]
    # The Hubble Deep Field's grey levels are scaled to the survey's sky noise.
    assert target.noise.sky_sigma == pytest.approx(source.default_sky_sigma, rel=1e-3)




@pytest.mark.parametrize("args, problem", [
    (["--strategies", "head,frozen"], "freeze mode must be"),
    (["--strategies", "blocks:9"], "K must be in [1, 3]"),
    (["--fractions", "0.0001"], "gives 1 labels; at least 5"),
    (["--fractions", "ten"], "comma-separated numbers"),
    (["--target-data", "missing.h5"], "missing.h5: no such file"),
    (["--source-run", "nowhere"], "nowhere: no such file"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch, args, problem):
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "adapt", "--out", str(tmp_path / "x"), *args]) == 2
    assert problem in _error_line(capsys)
    assert not (tmp_path / "x").exists()  # nothing simulated or trained
