"""Figures of classification and detection results: confusion matrix, reliability diagram, clump detection.

Each function returns a new :class:`matplotlib.figure.Figure` with an Agg canvas, built without
pyplot (no window, no global figure list, the session's backend untouched).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def _marker_row(table, threshold) -> int | None:
    """Row of ``table`` whose threshold is closest to ``threshold`` (None when there is none)."""
    if threshold is None or not np.isfinite(threshold) or len(table) == 0:
        return None
    return int(np.argmin(np.abs(np.asarray(table["threshold"], dtype=np.float64) - float(threshold))))


def precision_recall_figure(curves: Mapping, markers: Mapping[str, float] | None = None, title: str = "") -> Figure:
    """Purity against completeness of several clump detectors, swept over their score thresholds.

    Parameters
    ----------
    curves : mapping of str to astropy.table.Table
        Method name -> :func:`~deepmorph.measure.clumps.detection_curves` table.
    markers : mapping of str to float, optional
        Threshold to mark on each method's curve; default the table's ``meta["default_threshold"]``
        (S/N 5 for the classical detector, probability 0.5 for a network), no marker without one.
    title : str
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not curves:
        raise DeepmorphValueError("precision_recall_figure() needs at least one curve")
    markers = dict(markers or {})
    fig = _figure((4.6, 4.2))
    ax = fig.add_subplot()
    ax.axhline(0.9, ls=":", color="0.5", lw=1)
    ax.axvline(0.9, ls=":", color="0.5", lw=1, label="90% / 90%")
    for k, (name, table) in enumerate(curves.items()):
        color = f"C{k}"
        comp = np.asarray(table["completeness"], dtype=np.float64)
        pur = np.asarray(table["purity"], dtype=np.float64)
        ok = np.isfinite(comp) & np.isfinite(pur)
        ax.plot(comp[ok], pur[ok], "-", marker=".", ms=3, color=color, label=name)
        row = _marker_row(table, markers.get(name, table.meta.get("default_threshold")))
        if row is not None and ok[row]:
            t = float(table["threshold"][row])
            ax.plot(comp[row], pur[row], "o", ms=8, mfc="none", mew=1.5, color=color,
                    label=f"{name} at {t:g}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("completeness")
    ax.set_ylabel("purity")
    snr_min = next((t.meta.get("snr_min") for t in curves.values() if "snr_min" in t.meta), None)
    suffix = f"completeness of S/N >= {snr_min:g} clumps" if snr_min is not None else ""
    ax.set_title(" - ".join(s for s in (title, suffix) if s), fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def completeness_figure(tables: Mapping, xlabel: str, title: str = "", xscale: str | None = None) -> Figure:
    """Completeness of several clump detectors in bins of a truth quantity (S/N, flux ratio).

    Parameters
    ----------
    tables : mapping of str to astropy.table.Table
        Method name -> :func:`~deepmorph.measure.clumps.binned_completeness` table; empty bins are
        left out.
    xlabel : str
        The binned quantity.
    title : str
        Axes title.
    xscale : {"linear", "log"}, optional
        Default: logarithmic when the bin centres are positive and span more than a factor 20.

    Returns
    -------
    matplotlib.figure.Figure
        Completeness at each bin's mean value, with 68% (Wilson) binomial error bars.
    """
    if not tables:
        raise DeepmorphValueError("completeness_figure() needs at least one table")
    fig = _figure((4.8, 3.8))
    ax = fig.add_subplot()
    centres = []
    for k, (name, table) in enumerate(tables.items()):
        x = np.asarray(table["center"], dtype=np.float64)
        p = np.asarray(table["completeness"], dtype=np.float64)
        lo = np.asarray(table["completeness_lo"], dtype=np.float64)
        hi = np.asarray(table["completeness_hi"], dtype=np.float64)
        ok = np.isfinite(p) & (np.asarray(table["n_true"]) > 0)
        ax.errorbar(x[ok], p[ok], yerr=[p[ok] - lo[ok], hi[ok] - p[ok]], fmt="o-", ms=4, capsize=2,
                    color=f"C{k}", label=f"{name} (N={int(np.sum(table['n_true']))})")
        centres.append(x[ok])
    xs = np.concatenate(centres) if centres else np.zeros(0)
    if xscale is None:
        xscale = "log" if xs.size and xs.min() > 0 and xs.max() > 20 * xs.min() else "linear"
    ax.set_xscale(xscale)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("completeness")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return fig


__all__ += ["completeness_figure", "precision_recall_figure"]
