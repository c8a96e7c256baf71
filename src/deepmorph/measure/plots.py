"""Figures of classification results: confusion matrix and reliability diagram.

Each function returns a new :class:`matplotlib.figure.Figure` with an Agg canvas, built without
pyplot (no window, no global figure list, the session's backend untouched).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepmorph.errors import DeepmorphValueError


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_figure(cm, label_names: Sequence[str], title: str = "", normalize: bool = True) -> Figure:
    """Confusion matrix as a colour-coded grid with counts (and row fractions) in each cell.

    Parameters
    ----------
    cm : array_like
        ``(K, K)`` counts, rows = true class, columns = predicted (as in
        :func:`~deepmorph.measure.classification_metrics`).
    label_names : sequence of str
        The ``K`` class names.
    title : str
        Axes title.
    normalize : bool
        Colour by the fraction of each true class (recall on the diagonal); else by counts.

    Returns
    -------
    matplotlib.figure.Figure
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = len(label_names)
    if cm.shape != (k, k):
        raise DeepmorphValueError(f"confusion matrix must be {k} x {k} for {k} labels, got shape {cm.shape}")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    shown = frac if normalize else cm
    fig = _figure((1.2 * k + 2.2, 1.1 * k + 1.6))
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(im, ax=ax, label="fraction of true class" if normalize else "count", shrink=0.8)
    top = shown.max() if shown.size else 1
    for i in range(k):
        for j in range(k):
            text = f"{int(cm[i, j])}\n{frac[i, j]:.0%}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if shown[i, j] > 0.6 * top else "black")
    ax.set_xticks(range(k), labels=list(label_names), rotation=30, ha="right")
    ax.set_yticks(range(k), labels=list(label_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = cm.sum()
    acc = np.trace(cm) / total if total else float("nan")
    ax.set_title(f"{title}{' - ' if title else ''}accuracy {acc:.1%} (N={int(total)})", fontsize=10)
    return fig


def reliability_figure(reliability: Sequence[dict], title: str = "", ece: float | None = None) -> Figure:
    """Reliability diagram: accuracy vs confidence per bin, with the diagonal of perfect calibration.

    Parameters
    ----------
    reliability : sequence of dict
        The ``reliability`` table of :func:`~deepmorph.measure.classification_metrics`.
    title : str
        Axes title.
    ece : float, optional
        Expected calibration error, written in the title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure((4.2, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    filled = [b for b in reliability if b.get("count")]
    if filled:
        lo = np.array([b["lo"] for b in filled])
        hi = np.array([b["hi"] for b in filled])
        acc = np.array([b["accuracy"] for b in filled])
        conf = np.array([b["confidence"] for b in filled])
        ax.bar(lo, acc, width=hi - lo, align="edge", alpha=0.6, edgecolor="C0", label="accuracy")
        ax.plot(conf, acc, "o", color="C1", ms=4, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    suffix = f"ECE {ece:.3f}" if ece is not None else ""
    ax.set_title(" - ".join(s for s in (title, suffix) if s), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return fig


__all__ = ["confusion_figure", "reliability_figure"]
