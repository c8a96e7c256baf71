"""Classification metrics: pure functions from labels (and probabilities) to JSON-able dicts.

Shared by the CNN and the random forest so that both are scored the same way on the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepmorph.errors import DeepmorphValueError


def _labels(name: str, values, k: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DeepmorphValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DeepmorphValueError(f"{name} must hold integer class indices")
    elif arr.dtype.kind not in "iu" and arr.size:
        raise DeepmorphValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        raise DeepmorphValueError(f"{name} holds labels outside 0..{k - 1}")
    return arr


def calibration(y_true, proba, n_bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error and reliability table of predicted probabilities.

    Parameters
    ----------
    y_true : array_like of int
        True classes ``(N,)``.
    proba : array_like
        Class probabilities ``(N, K)``.
    n_bins : int
        Equal-width bins of confidence over [0, 1].

    Returns
    -------
    ece : float
        ``sum_b (n_b / N) |accuracy_b - confidence_b|`` (Naeini et al. 2015; Guo et al. 2017), where
        the confidence is the top probability and accuracy that of its class (the argmax).
    reliability : list of dict
        One entry per bin: ``lo``, ``hi``, ``count``, mean ``confidence`` and ``accuracy`` (None for
        an empty bin).
    """
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise DeepmorphValueError(f"proba must be (N, K) with N = {len(y)}, got shape {p.shape}")
    if int(n_bins) != n_bins or n_bins < 1:
        raise DeepmorphValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 falls into the first bin.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(n_bins) - 1)
    ece, table = 0.0, []
    n = max(len(y), 1)
    for b in range(int(n_bins)):
        sel = which == b
        count = int(sel.sum())
        entry = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "confidence": None,
                 "accuracy": None}
        if count:
            c, a = float(conf[sel].mean()), float(correct[sel].mean())
            entry.update(confidence=c, accuracy=a)
            ece += count / n * abs(a - c)
        table.append(entry)
    return float(ece), table


def classification_metrics(y_true, y_pred, label_names: Sequence[str], proba=None, n_bins: int = 10) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion matrix and (with probabilities) calibration.

    Parameters
    ----------
    y_true, y_pred : array_like of int
        True and predicted classes ``(N,)``, indices into ``label_names``.
    label_names : sequence of str
        Class names; their number ``K`` fixes the confusion matrix size.
    proba : array_like, optional
        Predicted probabilities ``(N, K)``, rows summing to 1.
    n_bins : int
        Confidence bins of the calibration error.

    Returns
    -------
    dict
        JSON-able: ``n``, ``accuracy``, ``balanced_accuracy`` (mean recall), ``macro_f1``,
        ``label_names``, ``per_class`` (name -> ``precision``, ``recall``, ``f1``, ``support``; 0
        where undefined, as scikit-learn's ``zero_division=0``), ``confusion_matrix`` (K x K nested
        lists, rows = true class, columns = predicted) and, with ``proba``, ``ece``, ``log_loss``
        and ``reliability`` (see :func:`calibration`).

    Raises
    ------
    DeepmorphValueError
        Mismatched lengths, labels outside ``0..K-1``, or bad probabilities.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    names = [str(x) for x in label_names]
    k = len(names)
    if k < 1:
        raise DeepmorphValueError("label_names is empty")
    y_true = _labels("y_true", y_true, k)
    y_pred = _labels("y_pred", y_pred, k)
    if len(y_true) != len(y_pred):
        raise DeepmorphValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise DeepmorphValueError("no predictions to score")
    classes = np.arange(k)
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    present = support > 0
    out = {
        "n": len(y_true),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "label_names": names,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
    }
    if proba is not None:
        p = np.asarray(proba, dtype=np.float64)
        if p.shape != (len(y_true), k):
            raise DeepmorphValueError(f"proba must have shape ({len(y_true)}, {k}), got {p.shape}")
        if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
            raise DeepmorphValueError("proba rows must be finite, non-negative and sum to 1")
        ece, table = calibration(y_true, p, n_bins)
        out["ece"] = ece
        out["log_loss"] = float(-np.mean(np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-15, None))))
        out["reliability"] = table
    return out


__all__ = ["calibration", "classification_metrics"]
