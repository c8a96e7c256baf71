"""Classification end to end on a tiny simulated dataset: CNN and random forest on the same split,
prediction, evaluation and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from deepmorph.cli import main
from deepmorph.data import write_dataset
from deepmorph.errors import DeepmorphError
from deepmorph.simulate import Priors, Simulator
from deepmorph.training import RunConfig
from deepmorph.workflows.classify import Split, evaluate, predict, train_cnn


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Spheroids, disks and edge-on disks (balanced, unambiguous), bright, 32 px."""
    path = tmp_path_factory.mktemp("cls") / "cls.h5"
    sim = Simulator("candels-f160w", 32, priors=Priors(balanced_classes=True, mag=(18.0, 21.0),
                                                        log10_disk_hlr_pix=(0.3, 0.9),
                                                        log10_bulge_hlr_pix=(0.2, 0.7)))
    write_dataset(path, sim, 480, seed=3, progress=False)
    return path


def _config(**extra):
    base = {"epochs": 12, "batch_size": 16, "progress_bar": False, "augmentation": "flips",
            "model.kwargs": {"widths": [16, 32, 32], "dropout": 0.1}, "optimizer.lr": 3e-3}
    return RunConfig().with_overrides({**base, **extra})


def test_cnn_learns_morphology_and_writes_a_complete_run(labelled, tmp_path):
    run = tmp_path / "cnn"
    result = train_cnn(labelled, run, _config(), Split(seed=0, fractions=(0.6, 0.15, 0.25)))
    assert result["train_size"] == 288
    # Three balanced classes: chance is 33%.
    assert result["accuracy"] > 0.8
    for name in ("run.json", "config.yaml", "history.csv", "learning_curves.png", "model.pt",
                 "test_metrics.json", "confusion.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    history = json.loads((run / "history.json").read_text())["history"]
    assert {"loss", "val_loss", "acc", "val_acc", "lr"} <= set(history)
    # Prediction and evaluation use the recorded normalisation and the best weights.
    table = predict(run, labelled)
    assert len(table) == 480 and {"label", "label_name", "p_spheroid", "p_disk", "p_edge-on"} <= set(table.colnames)
    total = sum(np.asarray(table[c]) for c in table.colnames if c.startswith("p_"))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    metrics = evaluate(run, labelled)
    truth = Simulator("candels-f160w", 32, priors=Priors(balanced_classes=True)).simulate(range(480), 3)["catalog"]
    assert metrics["accuracy"] == pytest.approx(np.mean(np.asarray(table["label"]) == truth["label"]))
    assert metrics["accuracy"] > 0.8


def test_training_size_subsets_are_nested():
    small = Split(seed=1, train_size=50).indices(1000)["train"]
    large = Split(seed=1, train_size=300).indices(1000)["train"]
    assert set(small) <= set(large)
    assert len(small) == 50
    fixed = Split(seed=1).indices(1000)["test"]
    np.testing.assert_array_equal(fixed, Split(seed=1, train_size=50).indices(1000)["test"])


def test_cli_train_predict_evaluate(labelled, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "classify", "--data", str(labelled), "--out", str(run), "--epochs", "2", "--batch-size",
                 "32", "--quiet", "--set", "model.kwargs.widths=[8, 16]", "--augmentation", "none"])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    preds = tmp_path / "preds.ecsv"
    assert main(["predict", "classify", "--model", str(run), "--images", str(labelled), "--out", str(preds)]) == 0
    assert len(Table.read(preds)) == 480
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "classify", "--model", str(run), "--data", str(labelled), "--json", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["accuracy"] <= 1
    # An existing output is not overwritten.
    assert main(["predict", "classify", "--model", str(run), "--images", str(labelled), "--out", str(preds)]) == 2


def test_cli_errors_are_one_line(labelled, tmp_path, capsys):
    assert main(["predict", "classify", "--model", str(tmp_path), "--images", str(labelled),
                 "--out", str(tmp_path / "p.ecsv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a classification run" in err[0]
    assert main(["train", "classify", "--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert main(["train", "classify", "--data", str(labelled), "--out", str(tmp_path / "r2"),
                 "--set", "optimizer.name=rmsprop"]) == 2
    assert "optimizer.name" in capsys.readouterr().err


def test_finetune_a_classifier_on_new_data(labelled, tmp_path):
    from deepmorph.workflows.finetune import finetune

    source = tmp_path / "source"
    train_cnn(labelled, source, _config(epochs=2), Split(seed=0, fractions=(0.6, 0.15, 0.25)))
    r = finetune("classify", source, labelled, tmp_path / "ft", "blocks:2", Split(seed=2, train_size=60),
                 {"epochs": 1, "progress_bar": False})
    assert r["new_head"] is False and r["train_size"] == 60 and 0 <= r["accuracy"] <= 1
    forest = tmp_path / "forest-run"
    forest.mkdir()
    (forest / "run.json").write_text(json.dumps({"task": "classify", "method": "forest", "label_names": []}))
    with pytest.raises(DeepmorphError, match="no network"):
        finetune("classify", forest, labelled, tmp_path / "x")
    with pytest.raises(DeepmorphError, match="unknown task"):
        finetune("clumps", source, labelled, tmp_path / "x")
