"""Classification metrics agree with scikit-learn; calibration error; figures."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from deepmorph.errors import DeepmorphValueError
from deepmorph.measure import calibration, classification_metrics, confusion_figure, reliability_figure

NAMES = ("spheroid", "disk", "edge-on", "clumpy")
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1, 1, 0]


def test_metrics_match_sklearn():
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    assert m["n"] == 12
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert m["confusion_matrix"] == confusion_matrix(Y_TRUE, Y_PRED, labels=range(4)).tolist()
    assert m["confusion_matrix"][3] == [0, 1, 0, 0]  # rows: true class; the clumpy one called a disk
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=range(4), zero_division=0)
    for i, name in enumerate(NAMES):
        assert m["per_class"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert m["per_class"]["clumpy"]["precision"] == 0.0  # never predicted: 0, as zero_division=0
    json.dumps(m)  # JSON-able as it is


def test_metrics_errors():
    with pytest.raises(DeepmorphValueError, match="outside"):
        classification_metrics([0, 4], [0, 1], NAMES)
    with pytest.raises(DeepmorphValueError, match="predictions"):
        classification_metrics([0, 1], [0], NAMES)
    with pytest.raises(DeepmorphValueError, match="shape"):
        classification_metrics([0, 1], [0, 1], NAMES, proba=np.full((2, 3), 1 / 3))
    with pytest.raises(DeepmorphValueError, match="sum to 1"):
        classification_metrics([0, 1], [0, 1], NAMES, proba=np.full((2, 4), 0.5))


def test_calibrated_probabilities_have_small_ece():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.full(4, 0.7), size=20000)
    y = np.array([rng.choice(4, p=p) for p in proba])  # labels drawn from the probabilities: calibrated
    m = classification_metrics(y, proba.argmax(axis=1), NAMES, proba=proba)
    assert m["ece"] < 0.02
    assert sum(b["count"] for b in m["reliability"]) == 20000 and len(m["reliability"]) == 10
    for b in m["reliability"]:
        if b["count"] > 500:
            assert b["accuracy"] == pytest.approx(b["confidence"], abs=0.05)
    # Over-confident: the same argmax, with all the mass on it.
    sharp = np.eye(4)[proba.argmax(axis=1)]
    assert calibration(y, sharp)[0] > 0.2


def test_figures():
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES, proba=np.eye(4)[Y_PRED] * 0.7 + 0.075)
    fig = confusion_figure(m["confusion_matrix"], NAMES, "forest")
    assert isinstance(fig, Figure) and fig.canvas is not None
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
    fig2 = reliability_figure(m["reliability"], "forest", ece=m["ece"])
    fig2.savefig(io.BytesIO(), format="png")
    with pytest.raises(DeepmorphValueError, match="4 x 4"):
        confusion_figure(np.zeros((3, 3)), NAMES)
