"""Random forest on statmorph features: beats chance widely, reproducible, saved and loaded whole."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.measure import (
    FEATURE_COLUMNS,
    ForestClassifier,
    classification_metrics,
    morphology_features,
    train_forest,
)

NAMES = ("spheroid", "disk", "edge-on")
N_TRAIN = 160


@pytest.fixture(scope="module")
def split(forest_sim):
    """240 spheroids / disks / edge-on disks (48 x 48 px) and their features, over 2 processes (~15 s)."""
    batch = forest_sim.simulate(range(240), seed=11)
    features = morphology_features(batch["images"], forest_sim.noise.sky_sigma, n_jobs=2, progress=False)
    labels = batch["catalog"]["label"]
    assert set(np.unique(labels)) == {0, 1, 2}
    return features[:N_TRAIN], labels[:N_TRAIN], features[N_TRAIN:], labels[N_TRAIN:]


@pytest.fixture(scope="module")
def forest(split):
    x, y, _, _ = split
    return train_forest(x, y, seed=0, n_estimators=200, n_jobs=2, label_names=NAMES)


def test_forest_beats_chance_on_held_out_galaxies(forest, split):
    _, _, x_test, y_test = split
    metrics = classification_metrics(y_test, forest.predict(x_test), NAMES, proba=forest.predict_proba(x_test))
    assert metrics["accuracy"] > 0.75  # chance is 1/3; ~0.9 seen with 160 training galaxies
    assert all(metrics["per_class"][name]["recall"] > 0.5 for name in NAMES)
    assert forest.columns[: len(FEATURE_COLUMNS)] == FEATURE_COLUMNS and "failed" in forest.columns
    importances = forest.feature_importances
    assert sum(importances.values()) == pytest.approx(1.0)


def test_same_seed_same_forest(forest, split):
    x, y, x_test, _ = split
    again = train_forest(x, y, seed=0, n_estimators=200, n_jobs=1, label_names=NAMES)
    np.testing.assert_array_equal(again.predict_proba(x_test), forest.predict_proba(x_test))
    other = train_forest(x, y, seed=1, n_estimators=200, n_jobs=2, label_names=NAMES)
    assert not np.array_equal(other.predict_proba(x_test), forest.predict_proba(x_test))


def test_nan_features_are_imputed_and_failed_is_a_feature(split):
    x, y, x_test, _ = split
    x = x.copy()
    x["sersic_n"][:20] = np.nan
    x["failed"][:20] = True
    model = train_forest(x, y, seed=0, n_estimators=50, label_names=NAMES)
    test = x_test.copy()
    test["gini"][:5] = np.nan
    proba = model.predict_proba(test)
    assert proba.shape == (len(test), 3) and np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_unseen_class_gets_zero_probability(split):
    x, y, x_test, _ = split
    keep = y != 2
    model = train_forest(x[keep], y[keep], seed=0, n_estimators=20, label_names=NAMES)
    proba = model.predict_proba(x_test)
    assert proba.shape == (len(x_test), 3) and np.all(proba[:, 2] == 0)
    assert set(model.predict(x_test)) <= {0, 1}


def test_save_load_round_trip(forest, split, tmp_path):
    _, _, x_test, _ = split
    path = forest.save(tmp_path / "model" / "forest.pkl")
    loaded = ForestClassifier.load(path)
    assert loaded.columns == forest.columns and loaded.label_names == NAMES
    np.testing.assert_array_equal(loaded.predict_proba(x_test), forest.predict_proba(x_test))
    assert sorted(p.name for p in path.parent.iterdir()) == ["forest.pkl"]  # no temporary file left
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DeepmorphIOError):
        ForestClassifier.load(bad)
    with pytest.raises(DeepmorphIOError, match="no such file"):
        ForestClassifier.load(tmp_path / "missing.pkl")


def test_forest_errors(split):
    x, y, _, _ = split
    with pytest.raises(DeepmorphValueError, match="lacks the columns"):
        train_forest(Table({"gini": [0.5, 0.6]}), [0, 1])
    with pytest.raises(DeepmorphValueError, match="labels"):
        train_forest(x, y[:10])
    with pytest.raises(DeepmorphValueError, match="not among"):
        train_forest(x, np.full(len(x), 5), label_names=NAMES)
