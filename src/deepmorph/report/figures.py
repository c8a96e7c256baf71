"""Figures for reports: pure functions from arrays and tables to matplotlib Figures.

Every function returns a new :class:`matplotlib.figure.Figure` drawn by the Agg backend and
built without pyplot: no window ever opens, pyplot's figure list and the session's backend
are left alone, and nothing needs closing. Save it with ``fig.savefig`` or hand it to
:meth:`deepmorph.report.Report.add_figure`.

Conventions: images are shown with ``origin="lower"``, so the array's ``[y, x]`` axes point
up and right and position angles (degrees counter-clockwise from +x) look counter-clockwise.
Pixel ``(0, 0)`` is centred on the axes' coordinate ``(0, 0)``. Images use an arcsinh
stretch (:func:`asinh_stretch`), the same for every panel of a galaxy's column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Rows of :func:`stamp_gallery`, in order: (batch key, row label).
GALLERY_ROWS = (
    ("images", "noisy image"),
    ("noiseless", "noise-free"),
    ("bulge", "bulge"),
    ("disk", "disk"),
    ("clump_mask", "clump mask"),
    ("neighbor_mask", "neighbour mask"),
)


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free Figure with an Agg canvas; ``figsize`` in inches."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def asinh_stretch(image: np.ndarray, softening: float, peak: float) -> np.ndarray:
    """Map counts to display values with ``arcsinh(x / softening) / arcsinh(peak / softening)``.

    Parameters
    ----------
    image : numpy.ndarray
        Pixel values, counts.
    softening : float
        Counts where the stretch turns from linear to logarithmic (> 0); the sky noise
        sigma is a good choice.
    peak : float
        Counts shown as 1 (white).

    Returns
    -------
    numpy.ndarray
        Display values, 0 at zero counts and 1 at ``peak`` (negative below zero).
    """
    softening = max(float(softening), 1e-30)
    top = np.arcsinh(max(float(peak), softening) / softening)
    return np.arcsinh(np.asarray(image, dtype=np.float64) / softening) / top


def _column_stretch(batch: Mapping, j: int) -> tuple[float, float]:
    """(softening, white) for galaxy ``j``: the noise sigma (or 1% of the peak) and the 99.9th percentile
    of the noise-free image (at least 5 sigma)."""
    ref = np.asarray(batch.get("noiseless", batch["images"])[j, 0], dtype=np.float64)
    peak = float(np.percentile(ref, 99.9))
    sigma = 0.0
    if "noiseless" in batch:
        sigma = float(np.std(np.asarray(batch["images"][j, 0], np.float64) - ref))
    softening = sigma if sigma > 1e-3 * peak else 0.01 * peak
    # White at least 5 sigma above the sky, so that noise-dominated stamps are not all white.
    return max(softening, 1e-12), max(peak, 5.0 * sigma, 1e-12)


def _showcase(catalog: Mapping, n: int) -> list[int]:
    """Up to ``n`` rows: the first of each label, then the next rows in order."""
    total = len(np.asarray(catalog["id"]))
    chosen: list[int] = []
    if "label" in catalog:
        labels = np.asarray(catalog["label"])
        for value in np.unique(labels):
            chosen.append(int(np.nonzero(labels == value)[0][0]))
    chosen = sorted(chosen)[:n]
    for i in range(total):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def stamp_gallery(
    batch: Mapping,
    n: int = 6,
    title: str | None = None,
    label_names: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
) -> Figure:
    """A grid of stamps: one column per galaxy, one row per kind of image in ``batch``.

    Rows, when present in ``batch`` (see :data:`GALLERY_ROWS`): noisy image, noise-free
    image, bulge, disk, clump mask (clump centres from ``clump_table`` marked with red
    crosses) and neighbour mask (companion centres from ``neighbor_table`` marked with cyan
    circles). Image rows share one arcsinh stretch per column (softening = the noise sigma
    of that stamp, white = 99.9th percentile of its noise-free image or 5 sigma, whichever
    is larger), so bulge and disk can be compared with the total; masks are shown black
    (0) and white (1).

    Parameters
    ----------
    batch : dict
        Output of :meth:`deepmorph.simulate.Simulator.simulate` (or a dataset slice):
        ``(B, 1, S, S)`` arrays plus ``catalog`` and optional ``clump_table`` /
        ``neighbor_table``.
    n : int
        Number of galaxies (columns), at most ``B``.
    title : str, optional
        Figure title.
    label_names : sequence of str, optional
        Class names for the catalogue's ``label`` column (shown in column titles).
    indices : sequence of int, optional
        Rows of the batch to show; default: the first galaxy of each label, then the
        first others.

    Returns
    -------
    matplotlib.figure.Figure
        ``n_rows x n`` axes.
    """
    catalog = batch.get("catalog", {})
    size = len(batch["images"])
    if indices is None:
        indices = _showcase(catalog, n) if "id" in catalog else list(range(min(n, size)))
    indices = [int(i) for i in indices][:n]
    rows = [(key, name) for key, name in GALLERY_ROWS if key in batch]
    stamp = batch["images"].shape[-1]
    centre = 0.5 * (stamp - 1)
    fig = new_figure((1.6 * len(indices) + 0.6, 1.6 * len(rows) + (0.8 if title else 0.4)))
    axes = fig.subplots(len(rows), len(indices), squeeze=False)
    for col, j in enumerate(indices):
        softening, peak = _column_stretch(batch, j)
        ident = int(catalog["id"][j]) if "id" in catalog else j
        for row, (key, name) in enumerate(rows):
            ax = axes[row, col]
            img = np.asarray(batch[key][j, 0])
            if key.endswith("_mask"):
                ax.imshow(img, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                table = batch.get("clump_table" if key == "clump_mask" else "neighbor_table")
                if table is not None and len(table["id"]):
                    sel = np.asarray(table["id"]) == ident
                    xs = centre + np.asarray(table["x_pix"])[sel]
                    ys = centre + np.asarray(table["y_pix"])[sel]
                    if key == "clump_mask":
                        ax.plot(xs, ys, "+", color="red", ms=7, mew=1.2)
                    else:
                        ax.plot(xs, ys, "o", mfc="none", mec="cyan", ms=9, mew=1.2)
            else:
                ax.imshow(asinh_stretch(img, softening, peak), origin="lower", cmap="magma", vmin=-0.05, vmax=1.0,
                          interpolation="nearest")
            ax.set_xlim(-0.5, stamp - 0.5)
            ax.set_ylim(-0.5, stamp - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
        if "mag" in catalog:
            head = f"id {ident}  mag {float(catalog['mag'][j]):.1f}\nB/T {float(catalog['bulge_to_total'][j]):.2f}"
            if "label" in catalog and label_names is not None:
                head += f"  {label_names[int(catalog['label'][j])]}"
            axes[0, col].set_title(head, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def parameter_distributions(catalog: Mapping, label_names: Sequence[str], title: str | None = None) -> Figure:
    """Histograms of the true parameters of a simulated sample, and the label counts.

    Seven panels: total AB magnitude; bulge-to-total flux ratio; bulge Sersic index;
    log10 of the major-axis half-light radii (bulge and disk, arcsec); axis ratios q = b/a
    (bulge and disk); position angle (degrees CCW from +x); number of galaxies per
    morphology label.

    Parameters
    ----------
    catalog : dict
        Catalogue columns (numpy arrays) as :meth:`~deepmorph.simulate.Simulator.simulate`
        returns them: ``mag, bulge_to_total, bulge_n, bulge_hlr_arcsec, disk_hlr_arcsec,
        bulge_q, disk_q, pa_deg, label``.
    label_names : sequence of str
        Class name of each label value.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        7 axes.
    """
    c = {k: np.asarray(v) for k, v in catalog.items()}
    fig = new_figure((12, 5.6))
    grid = fig.subplots(2, 4)
    axes = list(grid.ravel())
    fig.delaxes(axes.pop())
    bins = 20
    panels = [
        ("mag", "total magnitude [AB mag]"),
        ("bulge_to_total", "bulge-to-total B/T"),
        ("bulge_n", "bulge Sersic index n"),
    ]
    for ax, (key, label) in zip(axes[:3], panels, strict=True):
        ax.hist(c[key], bins=bins, color="tab:blue", alpha=0.8)
        ax.set_xlabel(label)
    ax = axes[3]
    for key, name, color in (("bulge_hlr_arcsec", "bulge", "tab:red"), ("disk_hlr_arcsec", "disk", "tab:blue")):
        ax.hist(np.log10(c[key]), bins=bins, histtype="step", lw=1.5, color=color, label=name)
    ax.set_xlabel("log10 half-light radius (major axis) [arcsec]")
    ax.legend(fontsize=8)
    ax = axes[4]
    for key, name, color in (("bulge_q", "bulge", "tab:red"), ("disk_q", "disk", "tab:blue")):
        ax.hist(c[key], bins=bins, range=(0, 1), histtype="step", lw=1.5, color=color, label=name)
    ax.set_xlabel("axis ratio q = b/a")
    ax.legend(fontsize=8)
    ax = axes[5]
    ax.hist(c["pa_deg"], bins=18, range=(0, 180), color="tab:blue", alpha=0.8)
    ax.set_xlabel("position angle [deg CCW from +x]")
    ax = axes[6]
    counts = np.bincount(c["label"].astype(np.int64), minlength=len(label_names))[: len(label_names)]
    bars = ax.bar(np.arange(len(label_names)), counts, color="tab:green")
    ax.set_xticks(np.arange(len(label_names)), list(label_names), fontsize=8)
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("morphology label")
    for ax in axes:
        ax.set_ylabel("galaxies", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title or f"{len(c['mag'])} simulated galaxies", fontsize=10)
    fig.tight_layout()
    return fig


def speed_bar(rates: Mapping[str, float], unit: str = "stamps/s", title: str | None = None) -> Figure:
    """Horizontal bar chart of a speed per setting, each bar labelled with its value.

    Parameters
    ----------
    rates : dict
        Name -> rate (e.g. stamps per second).
    unit : str
        Unit of the rates (x-axis label).
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        1 axes.
    """
    names = list(rates)
    values = np.array([float(rates[k]) for k in names])
    fig = new_figure((6.5, 0.5 * len(names) + 1.2))
    ax = fig.subplots()
    bars = ax.barh(np.arange(len(names)), values, color="tab:blue")
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel(unit)
    ax.set_xlim(0, 1.2 * max(values.max(initial=0.0), 1e-12))
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def residual_figure(
    ours: np.ndarray,
    reference: np.ndarray,
    labels: tuple[str, str] = ("deepmorph", "GalSim"),
    title: str | None = None,
) -> Figure:
    """Two renderings of the same stamp and their difference.

    Left and middle: the two images with one shared arcsinh stretch (softening 1% of the
    reference's peak). Right: ``ours - reference`` in units of the reference's peak pixel,
    on a symmetric linear scale. The panel titles give the relative L2 error
    ``||ours - ref|| / ||ref||`` and the largest difference.

    Parameters
    ----------
    ours, reference : numpy.ndarray
        ``(S, S)`` images, counts.
    labels : tuple of str
        Names of the two renderings.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        5 axes: three images and two colour bars.
    """
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    peak = float(ref.max()) if ref.max() > 0 else 1.0
    diff = (ours - ref) / peak
    rel = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-300))
    fig = new_figure((11, 3.6))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 3)
    im = None
    for ax, img, name in zip(axes[:2], (ours, ref), labels, strict=True):
        im = ax.imshow(asinh_stretch(img, 0.01 * peak, peak), origin="lower", cmap="magma", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label="asinh(counts / 1% peak), normalised")
    lim = max(float(np.abs(diff).max()), 1e-12)
    dm = axes[2].imshow(diff, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[2].set_title(f"({labels[0]} - {labels[1]}) / peak\nrel. L2 {rel:.2e}, max |diff| {lim:.1e} of peak",
                      fontsize=9)
    fig.colorbar(dm, ax=axes[2], fraction=0.046, pad=0.04, label="fraction of peak pixel")
    for ax in axes:
        ax.set_xlabel("x [pix]", fontsize=8)
        ax.set_ylabel("y [pix]", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


__all__ = ["GALLERY_ROWS", "asinh_stretch", "new_figure", "parameter_distributions", "residual_figure", "speed_bar",
           "stamp_gallery"]


def size_curve_figure(table, title: str | None = None) -> Figure:
    """Test accuracy vs training-set size, one line per method (the lecture's "how large does my
    dataset need to be"). ``table`` has columns ``method``, ``train_size``, ``accuracy``."""
    fig = new_figure((5.5, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(str(m) for m in table["method"]))
    names = {"cnn": "CNN", "forest": "statmorph + random forest"}
    for method in methods:
        sel = np.array([str(m) == method for m in table["method"]])
        order = np.argsort(np.asarray(table["train_size"])[sel])
        sizes = np.asarray(table["train_size"])[sel][order]
        acc = np.asarray(table["accuracy"])[sel][order]
        ax.plot(sizes, 100 * acc, "o-", label=names.get(method, method))
    ax.set_xscale("log")
    ax.set_xlabel("training-set size [galaxies]")
    ax.set_ylabel("test accuracy [%]")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def conv_matrix_figure(kernel, matrix, input_shape: tuple[int, int], title: str | None = None) -> Figure:
    """A kernel, its convolution matrix ``C`` and ``C^T`` (the transposed convolution), side by side."""
    kernel = np.asarray(kernel, dtype=float)
    matrix = np.asarray(matrix, dtype=float)
    fig = new_figure((11.0, 3.6))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 4, 1.4])
    vmax = np.abs(kernel).max() or 1.0
    panels = ((kernel, f"kernel {kernel.shape[0]}x{kernel.shape[1]}"),
              (matrix, f"C: {matrix.shape[0]}x{matrix.shape[1]} (conv = C @ flatten(x), x {input_shape[0]}x"
                       f"{input_shape[1]})"),
              (matrix.T, f"C^T: {matrix.shape[1]}x{matrix.shape[0]} (transposed conv)"))
    for k, (data, label) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def decomposition_figure(rows, mag_limit: float | None = None, title: str | None = None) -> Figure:
    """Bulge/disk decomposition against the truth: predicted vs true B/T for each method, and the
    bulge flux error against the disk flux error (points along ``y = -x`` are light given to the
    wrong component: the bulge/disk degeneracy).

    ``rows`` has ``bulge_to_total``, ``flux``, ``bulge_flux``, ``disk_flux``, ``mag`` and, per
    method ``m`` in (``unet``, ``imfit``), ``m_bulge_to_total``, ``m_bulge_flux``, ``m_disk_flux``
    (NaN where a method did not run). Only galaxies brighter than ``mag_limit`` are shown.
    """
    sel = np.ones(len(rows), bool) if mag_limit is None else np.asarray(rows["mag"]) < mag_limit
    names = {"unet": "U-Net", "imfit": "imfit 2-component fit"}
    methods = [m for m in names if f"{m}_bulge_to_total" in rows.colnames
               and np.isfinite(np.asarray(rows[f"{m}_bulge_to_total"])[sel]).any()]
    fig = new_figure((4.0 * (len(methods) + 1), 3.9))
    true_bt = np.asarray(rows["bulge_to_total"])[sel]
    flux = np.asarray(rows["flux"])[sel]
    colors = {"unet": "C0", "imfit": "C3"}
    for k, m in enumerate(methods):
        ax = fig.add_subplot(1, len(methods) + 1, k + 1)
        pred = np.asarray(rows[f"{m}_bulge_to_total"])[sel]
        ok = np.isfinite(pred)
        err = pred[ok] - true_bt[ok]
        ax.scatter(true_bt[ok], pred[ok], s=4, alpha=0.5, color=colors[m])
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("true B/T")
        ax.set_ylabel("measured B/T")
        rmse = np.sqrt(np.mean(err**2)) if err.size else np.nan
        ax.set_title(f"{names[m]}: RMS {rmse:.3f} (N={ok.sum()})", fontsize=9)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, len(methods) + 1, len(methods) + 1)
    for m in methods:
        db = (np.asarray(rows[f"{m}_bulge_flux"])[sel] - np.asarray(rows["bulge_flux"])[sel]) / flux
        dd = (np.asarray(rows[f"{m}_disk_flux"])[sel] - np.asarray(rows["disk_flux"])[sel]) / flux
        ok = np.isfinite(db) & np.isfinite(dd)
        ax.scatter(db[ok], dd[ok], s=4, alpha=0.5, color=colors[m], label=names[m])
    lim = 0.4
    ax.plot([-lim, lim], [lim, -lim], "k:", lw=0.8, label="bulge <-> disk swap")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("bulge flux error / total flux")
    ax.set_ylabel("disk flux error / total flux")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def clump_gallery(stamps: np.ndarray, prob: np.ndarray, detections=None, softening: float = 1.0,
                  title: str | None = None) -> Figure:
    """Galaxy stamps (asinh stretch, top row) over their clump probability maps (bottom row).

    ``stamps`` and ``prob`` are ``(N, H, W)``; ``detections`` has ``id`` (the stamp's index) and
    ``x_pix``, ``y_pix`` (from the stamp centre), circled on both rows.
    """
    stamps, prob = np.asarray(stamps, dtype=float), np.asarray(prob, dtype=float)
    n = len(stamps)
    fig = new_figure((1.6 * n + 0.4, 3.6))
    for i in range(n):
        c = 0.5 * (stamps.shape[-1] - 1)
        sel = (np.asarray(detections["id"]) == i) if detections is not None and len(detections) else None
        for row, (data, cmap) in enumerate(((asinh_stretch(stamps[i], softening, float(stamps[i].max())), "gray"),
                                            (prob[i], "magma"))):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(data, origin="lower", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if sel is not None and sel.any():
                ax.scatter(c + np.asarray(detections["x_pix"])[sel], c + np.asarray(detections["y_pix"])[sel],
                           s=40, facecolors="none", edgecolors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
