"""Survey-to-survey transfer (``deepmorph experiment transfer``) on a tiny configuration: the files,
the table's rows, resuming without retraining, the summary, and one-line errors for bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.errors import DeepmorphValueError
from deepmorph.workflows.transfer import (
    TARGET_FRACTIONS,
    label_budget,
    labels_needed,
    population_priors,
    transfer_config,
    transfer_experiment,
)
from tests.cli_errors import error_line as _error_line

LABELS = (0, 20, 40)
STRATEGIES = ("head", "blocks:1", "none")
# 240 SDSS galaxies, 200 DES galaxies (140 training, 50 test), 32 px, one epoch of a small CNN.
TINY = ["--n-source", "240", "--n-target", "200", "--stamp-size", "32", "--epochs", "1", "--steps", "2",
        "--finetune-epochs", "1", "--set", "model.kwargs.widths=[8, 16, 16]", "--quiet"]


def _argv(out, labels=LABELS, *extra):
    return ["experiment", "transfer", "--source", "sdss-r", "--target", "des-r", "--labels",
            ",".join(map(str, labels)), "--strategies", ",".join(STRATEGIES), "--out", str(out), *TINY, *extra]




@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "run"
    assert main(_argv(out)) == 0
    return out


def _weights(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/model.pt"))}


def test_writes_the_table_record_and_figure(experiment):
    for name in ("transfer.ecsv", "transfer.json", "transfer.png", "settings.json", "data/source-sdss-r.h5",
                 "data/target-des-r.h5", "source/model.pt", "no-finetune/test_metrics.json"):
        assert (experiment / name).is_file(), name
    assert (experiment / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((experiment / "transfer.json").read_text())
    assert (record["source"], record["target"]) == ("sdss-r", "des-r")
    assert 0 <= record["source_accuracy"] <= 1
    assert set(record["labels_needed"]) == {"no-finetune", "scratch", *(f"finetune:{s}" for s in STRATEGIES)}
    assert all(v is None or v in LABELS for v in record["labels_needed"].values())


def test_every_method_and_label_count_is_scored_on_one_test_set(experiment):
    table = Table.read(experiment / "transfer.ecsv")
    rows = {(str(r["method"]), str(r["freeze"]), int(r["labels"])): r for r in table}
    expected = {("no-finetune", "-", n) for n in LABELS}
    expected |= {("finetune", s, n) for s in STRATEGIES for n in LABELS if n}
    expected |= {("scratch", "-", n) for n in LABELS if n}
    assert set(rows) == expected and len(table) == len(expected)
    accuracy = np.asarray(table["accuracy"])
    assert np.all((accuracy >= 0) & (accuracy <= 1))
    # One held-out target test split (25% of 200) for every model.
    assert set(table["n_test"]) == {int(200 * TARGET_FRACTIONS[2])}
    # The source CNN as it is: the same accuracy whatever the label count.
    assert len({rows[("no-finetune", "-", n)]["accuracy"] for n in LABELS}) == 1
    # Fine-tuning and training from scratch learn from the same number of labelled galaxies.
    for n in LABELS[1:]:
        sizes = {json.loads((experiment / d / "run.json").read_text())["train_size"]
                 for d in (f"finetune-head-{n}", f"finetune-blocks1-{n}", f"finetune-none-{n}", f"scratch-{n}")}
        assert sizes == {n}


def test_rerun_resumes_without_retraining(experiment, capsys):
    before = _weights(experiment)
    assert len(before) == 1 + 4 * (len(LABELS) - 1)
    table = Table.read(experiment / "transfer.ecsv")
    start = time.perf_counter()
    assert main(_argv(experiment)) == 0
    assert time.perf_counter() - start < 15
    assert _weights(experiment) == before
    text = capsys.readouterr().out
    for started in ("simulating", "training the source", "fine-tuning (", "training from scratch"):
        assert started not in text  # no sub-run started again
    again = Table.read(experiment / "transfer.ecsv")
    np.testing.assert_array_equal(again["accuracy"], table["accuracy"])


def test_other_settings_in_the_same_folder_are_refused(experiment):
    config = transfer_config(epochs=1, progress_bar=False,
                             **{"model.kwargs.widths": [8, 16, 16]})
    with pytest.raises(DeepmorphValueError, match="other .*steps"):
        transfer_experiment(experiment, labels=LABELS, n_source=240, n_target=200, stamp_size=32, config=config,
                            steps=5, finetune_epochs=1, strategies=STRATEGIES, progress=False)


@pytest.mark.parametrize("args, problem", [
    (["--target", "hubble"], "unknown survey 'hubble'"),
    (["--labels", "0,50,500"], "500 target labels asked for, but the target's training split holds 140"),
    (["--labels", "0,many"], "--labels '0,many': give comma-separated integers"),
    (["--labels=-5,50"], "label counts must be integers >= 0"),
    (["--strategies", "head,blocks:3"], "K must be in [1, 2]"),
])
def test_bad_input_is_one_line_and_nothing_is_simulated(tmp_path, capsys, args, problem):
    out = tmp_path / "bad"
    argv = _argv(out) + args
    assert main(argv) == 2
    assert problem in _error_line(capsys)
    assert not (out / "data").exists()


def test_labels_needed_is_the_fewest_labels_reaching_the_accuracy():
    table = Table(rows=[("no-finetune", "-", 0, 0.70), ("no-finetune", "-", 100, 0.70),
                        ("finetune", "head", 100, 0.96), ("finetune", "head", 1000, 0.94),
                        ("scratch", "-", 100, 0.80), ("scratch", "-", 1000, 0.97)],
                  names=("method", "freeze", "labels", "accuracy"))
    assert labels_needed(table) == {"no-finetune": None, "finetune:head": 100, "scratch": 1000}
    assert labels_needed(table, 0.6)["no-finetune"] == 0


def test_label_budget_gives_few_labels_enough_steps():
    assert label_budget(50, steps=200, min_epochs=3) == (12, 50)  # 4 batches of 12 per epoch
    assert label_budget(5000, steps=200, min_epochs=3) == (64, 3)
    assert label_budget(5000, steps=200, min_epochs=10) == (64, 10)


def test_both_surveys_see_the_same_galaxies_in_arcsec():
    sdss, des = population_priors(0.396), population_priors(0.263)
    shift = np.log10(0.396 / 0.263)
    np.testing.assert_allclose(np.subtract(des.log10_disk_hlr_pix, sdss.log10_disk_hlr_pix), shift)
    np.testing.assert_allclose(np.subtract(des.log10_bulge_hlr_pix, sdss.log10_bulge_hlr_pix), shift)
    assert sdss.balanced_classes and sdss.mag == des.mag
