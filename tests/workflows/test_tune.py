"""Hyper-parameter search for classification, end to end on a tiny simulated set, and ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import write_dataset
from deepmorph.simulate import Priors, Simulator
from deepmorph.training import RunConfig
from deepmorph.workflows.ensemble import average_probabilities
from tests.cli_errors import error_line

#: The default config of the tests' searches: a tiny CNN, 2 epochs.
DEFAULT = ["--set", "model.kwargs.widths=[4, 8]", "--set", "batch_size=32", "--set", "accelerator=cpu"]
SPACE = {"optimizer.lr": {"low": 3e-4, "high": 3e-2, "log": True},
         "model.kwargs.widths": {"choices": [[4, 8], [8, 16]]},
         "model.kwargs.dropout": {"low": 0.0, "high": 0.5},
         "coarse": {"trials": 4, "epochs": 2}}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Bright spheroids, disks and edge-on disks (balanced), 32 px."""
    path = tmp_path_factory.mktemp("tune-data") / "cls.h5"
    sim = Simulator("candels-f160w", 32, priors=Priors(balanced_classes=True, mag=(18.0, 21.0),
                                                        log10_disk_hlr_pix=(0.3, 0.9),
                                                        log10_bulge_hlr_pix=(0.2, 0.7)))
    write_dataset(path, sim, 320, seed=5, progress=False)
    return path


@pytest.fixture(scope="module")
def tuned(labelled, tmp_path_factory):
    """``deepmorph tune classify``: 4 trials of 2 epochs, then the default against the best."""
    root = tmp_path_factory.mktemp("tune")
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = root / "run"
    code = main(["tune", "classify", "--data", str(labelled), "--space", str(space), "--out", str(out), "--quiet",
                 "--fractions", "0.5", "0.25", "0.25", *DEFAULT])
    assert code == 0
    return out


def test_tune_finds_and_writes_the_best_config_and_compares_it_with_the_default(tuned, capsys):
    table = Table.read(tuned / "trials.ecsv")
    assert list(table["number"]) == [0, 1, 2, 3] and set(table["state"]) <= {"complete", "pruned"}
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["trials"]["coarse"].get("complete", 0) + summary["trials"]["coarse"].get("pruned", 0) == 4
    # Trial 0 is the default config; the best trial is at least as good on the validation split.
    first = table[0]
    assert first["state"] == "complete" and first["optimizer.lr"] == 1e-3 and first["model.kwargs.widths"] == "[4, 8]"
    best = table[table["number"] == summary["best"]["trial"]][0]
    assert best["value"] == summary["best"]["value"] == np.nanmin(table["value"][table["state"] == "complete"])
    assert best["value"] <= first["value"]
    # The default, trained again for the same epochs with the same seed, gives trial 0's score exactly.
    assert summary["default"]["val"] == pytest.approx(first["value"], rel=1e-6)
    assert summary["default"]["epochs"] == 2 and summary["selected"] == "search"
    # Best vs default on the 80 held-out test galaxies.
    assert summary["n_test"] == 80
    for who in ("best", "default"):
        assert 0 <= summary[who]["test_accuracy"] <= 1
    assert summary["gain_test_accuracy"] == pytest.approx(summary["best"]["test_accuracy"]
                                                          - summary["default"]["test_accuracy"])
    # best_config.yaml is a run config with the best trial's values, for `train classify --config`.
    config = RunConfig.from_yaml(tuned / "best_config.yaml")
    assert config.optimizer.lr == best["optimizer.lr"]
    assert config.model.kwargs["dropout"] == best["model.kwargs.dropout"]
    assert json.dumps(config.model.kwargs["widths"]) == best["model.kwargs.widths"]
    assert config.epochs == 2 and config.batch_size == 32 and config.normalization["kind"] == "asinh"
    for name in ("optimization_history.png", "param_importances.png", "default/model.pt",
                 f"{best['run']}/test_metrics.json", "study.journal"):
        assert (tuned / name).is_file(), name
    # Every trial is a classification run.
    run_info = json.loads((tuned / best["run"] / "run.json").read_text())
    assert run_info["task"] == "classify" and run_info["train_size"] == 160
    # Rerunning the finished search changes nothing and trains nothing.
    assert main(["tune", "classify", "--data", run_info["data"], "--space", str(tuned.parent / "space.yaml"),
                 "--out", str(tuned), "--quiet", "--fractions", "0.5", "0.25", "0.25", *DEFAULT]) == 0
    assert "4 coarse trials" in capsys.readouterr().out
    assert len(Table.read(tuned / "trials.ecsv")) == 4


def test_ensemble_of_the_best_trials(tuned, tmp_path, capsys):
    out = tmp_path / "ensemble"
    assert main(["ensemble", "classify", "--tune", str(tuned), "--top-k", "3", "--out", str(out)]) == 0
    assert "over the best member" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    table = Table.read(tuned / "trials.ecsv")
    done = table[table["state"] == "complete"]
    done.sort(["value", "number"])
    assert [m["member"] for m in summary["members"]] == [str(tuned / r) for r in done["run"][:3]]
    # The best member's numbers are those the search measured on the same test galaxies.
    own = json.loads((tuned / done["run"][0] / "test_metrics.json").read_text())
    assert summary["members"][0]["accuracy"] == own["accuracy"]
    assert summary["members"][0]["log_loss"] == pytest.approx(own["log_loss"])
    # Averaging probabilities never does worse than the members' mean log loss (the log is concave).
    assert summary["log_loss_gain_vs_mean"] >= 0
    assert summary["gain_vs_best"] == pytest.approx(summary["ensemble"]["accuracy"]
                                                    - max(m["accuracy"] for m in summary["members"]))
    assert len(Table.read(out / "ensemble.ecsv")) == 4 and (out / "confusion.png").is_file()


def test_average_probabilities_is_the_weighted_mean():
    # Three classifiers, each wrong on a different galaxy; their average is right on all three.
    p = np.array([[[0.2, 0.8], [0.9, 0.1], [0.8, 0.2]],
                  [[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]],
                  [[0.7, 0.3], [0.9, 0.1], [0.3, 0.7]]])
    truth = np.array([0, 0, 0])
    mean = average_probabilities(list(p))
    np.testing.assert_allclose(mean, p.mean(axis=0))
    assert all(np.mean(m.argmax(1) == truth) == 2 / 3 for m in p) and np.all(mean.argmax(1) == truth)
    np.testing.assert_allclose(average_probabilities(list(p), weights=[2, 1, 1]),
                               (2 * p[0] + p[1] + p[2]) / 4)
    from deepmorph.errors import DeepmorphValueError

    with pytest.raises(DeepmorphValueError, match="share one"):
        average_probabilities([p[0], p[0][:2]])
    with pytest.raises(DeepmorphValueError, match="positive weight"):
        average_probabilities(list(p), weights=[1, 0, 1])


@pytest.mark.parametrize("case, message", [
    ("missing space", "cannot read the search space"),
    ("unknown key", "optimizer.lrr: not a config field"),
    ("unreachable storage", "cannot open the study storage"),
    ("sqlite", "SQLite is not safe"),
    ("no workers", "workers must be >= 1"),
    ("ensemble of nothing", "not a finished search"),
    ("ensemble of one", "at least two runs"),
])
def test_bad_input_gives_one_line_and_exit_2(labelled, tmp_path, capsys, case, message):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optimizer.lrr" if case == "unknown key" else "optimizer.lr":
                                     {"low": 1e-4, "high": 1e-2}}))
    tune = ["tune", "classify", "--data", str(labelled), "--space", str(space), "--out", str(tmp_path / "out"),
            "--quiet"]
    argv = {
        "missing space": [*tune[:5], str(tmp_path / "nope.yaml"), *tune[6:]],
        "unknown key": tune,
        "unreachable storage": [*tune, "--storage", f"postgresql://u:pw@127.0.0.1:{closed}/db"],
        "sqlite": [*tune, "--storage", f"sqlite:///{tmp_path / 'x.db'}"],
        "no workers": [*tune, "--workers", "0"],
        "ensemble of nothing": ["ensemble", "classify", "--tune", str(tmp_path), "--out", str(tmp_path / "e")],
        "ensemble of one": ["ensemble", "classify", "--runs", str(tmp_path), "--out", str(tmp_path / "e")],
    }[case]
    assert main(argv) == 2
    line = error_line(capsys)
    assert message in line and "pw@" not in line
