"""Morphometry: a CNN that measures a galaxy's Sersic parameters, with uncertainties.

Trained on single-Sersic galaxies (``deepmorph simulate --bulge-to-total 1 1``: the whole galaxy is
the Sersic "bulge"), the network predicts the magnitude, the half-light radius, the Sersic index,
the axis ratio and the position angle, each with a 1-sigma error (a heteroscedastic Gaussian,
:class:`~deepmorph.tasks.RegressTask`). It is scored on the held-out test split with the numbers
astronomers quote: bias, scatter (normalised median absolute deviation), outlier fraction, and
the calibration of the errors (the fraction of truths within 1 and 2 sigma). The errors are
recalibrated after training on the validation split (one factor per parameter, so that the
1-sigma interval holds 68.3% of the validation truths; Kuleshov et al. 2018), as a Gaussian
likelihood trained for a few epochs leaves them too wide or too narrow. Test galaxies are also
scored in magnitude bins and, when the dataset has companions (``--neighbors``), separately for
isolated galaxies, galaxies whose companions are all fainter, and galaxies with a brighter one
(the lecture's three panels).

A run directory::

    RUN/run.json, config.yaml, model.pt ...   the training run (target coding and error scale in run.json)
    RUN/test_metrics.json                     per parameter: bias, NMAD scatter, outliers, coverage;
                                              the same per environment
    RUN/test_metrics_by_mag.ecsv              the same per magnitude bin and environment
    RUN/test_predictions.ecsv                 truth, value, error and environment per test galaxy
    RUN/test_predictions.png, test_metrics.png  measured vs true; scatter and bias vs magnitude
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import (
    fitted_normalization,
    load_network,
    read_image_file,
    read_run,
    save_table,
    train_task,
    training_augmentation,
    write_json,
)

#: Parameter -> (catalogue column, encoding, "relative" (errors as fractions) or "absolute").
PARAMETERS = {
    "mag": ("mag", "linear", "absolute"),
    "hlr": ("bulge_hlr_arcsec", "log10", "relative"),
    "n": ("bulge_n", "log10", "relative"),
    "q": ("bulge_q", "linear", "absolute"),
    "pa": ("pa_deg", "angle180", "absolute"),
}
#: Outlier thresholds per parameter (absolute units, or fractions for relative ones).
OUTLIER = {"mag": 0.25, "hlr": 0.25, "n": 0.3, "q": 0.1, "pa": 15.0}


#: The fast morphometry CNN: 4 strided stages of one convolution (16-128 channels), the flattened 4x4 map
#: through 256 units (``benchmarks/configs/morph_stride_s.yaml``): ~0.03 ms per galaxy on 2 CPU threads.
FAST_MODEL = {"widths": [16, 32, 64, 128], "blocks_per_stage": 1, "dropout": 0.0, "head": "flatten", "hidden": 256,
              "image_size": 64, "downsample": "stride"}


def default_config(**overrides):
    """The run config morphometry starts from: the lecture's CNN with flips, Adam, cosine schedule."""
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": {"name": "cnn", "kwargs": {"widths": [32, 64, 128, 128], "blocks_per_stage": 2, "dropout": 0.0}},
        "augmentation": "flips", "epochs": 30, "batch_size": 64, "schedule": {"kind": "cosine"},
        "early_stopping": {"monitor": "val_loss", "patience": 8},
    })
    return base.with_overrides(overrides) if overrides else base


def coder_for(parameters=tuple(PARAMETERS)):
    """An unfitted :class:`~deepmorph.tasks.regress.TargetCoder` for these parameters."""
    from deepmorph.tasks.regress import TargetCoder

    unknown = [p for p in parameters if p not in PARAMETERS]
    if unknown:
        raise DeepmorphValueError(f"unknown morphometry parameter(s) {unknown}; choose from {', '.join(PARAMETERS)}")
    return TargetCoder(tuple(PARAMETERS[p][0] for p in parameters), tuple(PARAMETERS[p][1] for p in parameters))


def train_morphometry(data: str | Path, out: str | Path, config=None, split: Split | None = None,
                      parameters=tuple(PARAMETERS), resume: bool = True, in_memory: bool = True,
                      evaluate: bool = True, coder=None) -> dict:
    """Train the morphometry CNN on ``data`` and score it on the held-out test split.

    Parameters
    ----------
    data : path
        A simulated dataset of single-Sersic galaxies (its catalogue holds the truth).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`.
    split : Split, optional
        Train/val/test split (default 80/10/10, seed 0).
    parameters : sequence of str
        Which of :data:`PARAMETERS` to measure.
    coder : TargetCoder, optional
        A fitted target coding to keep (fine-tuning with the source's head: its outputs keep
        their meaning); default: fitted on the training targets.

    Returns
    -------
    dict
        :func:`evaluate_morphometry`'s metrics (when ``evaluate``) plus ``train_size``,
        ``epochs_run``, ``train_seconds``.
    """
    from deepmorph.data import StampDataset, open_dataset
    from deepmorph.tasks.regress import RegressTask
    from deepmorph.training import build_model

    data, out = Path(data), Path(out)
    config = config or default_config()
    split = split or Split()
    fitted, coder = coder, coder_for(tuple(parameters))
    if fitted is not None and tuple(fitted.columns) != tuple(coder.columns):
        raise DeepmorphValueError(f"train_morphometry: the given coder measures {fitted.columns}, not {coder.columns}")
    with open_dataset(data) as ds:
        n, channels = len(ds), int(ds.images.shape[1])
        catalog = ds.catalog
        attrs = ds.attrs
        scale = float(attrs.get("pixel_scale_arcsec", float("nan")))
        stamp = int(ds.images.shape[-1])
        bt = np.asarray(catalog["bulge_to_total"]) if "bulge_to_total" in catalog.colnames else None
    if bt is not None and np.any(bt < 0.999):
        raise DeepmorphValueError(f"{data}: morphometry trains on single-Sersic galaxies; simulate them with "
                                  "--bulge-to-total 1 1 (this file has disks)")
    parts = split.indices(n)
    norm, config = fitted_normalization(config, data, parts["train"])
    sets = {k: StampDataset(data, idx, target=list(coder.columns), normalization=norm, in_memory=in_memory)
            for k, idx in parts.items()}
    coder = fitted if fitted is not None else coder.fit(sets["train"].targets.numpy())
    model = build_model(config, in_channels=channels, num_outputs=2 * coder.size)
    task = RegressTask(model, config, coder, augmentation=training_augmentation(config))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "morphometry", "method": "cnn", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "normalization": norm.to_dict(),
        "in_channels": channels, "parameters": list(parameters), "coder": coder.to_dict(),
        "pixel_scale_arcsec": scale, "stamp_size": stamp,
        "zeropoint_mag": float(attrs.get("zeropoint_mag", float("nan"))),
        "psf_fwhm_arcsec": float(attrs.get("psf_fwhm_pix", float("nan"))) * scale,
    })
    history, seconds = train_task(task, sets, config, out, resume)
    calibrate_errors(out, data, parts["val"])
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds}
    if evaluate:
        result.update(evaluate_morphometry(out, data, parts["test"]))
    return result


def load_morphometer(run: str | Path, fast: bool = True):
    """The trained CNN of a morphometry run (eval mode, CPU), its target coder and ``run.json``.

    With ``fast`` the network comes with its batch norms folded and channels-last weights
    (:func:`deepmorph.models.inference.for_inference`): the same outputs, 2-3x faster on a CPU.
    """
    from deepmorph.models.inference import for_inference
    from deepmorph.tasks.regress import TargetCoder

    meta = read_run(run, "morphometry")
    coder = TargetCoder.from_dict(meta["coder"])
    model = load_network(run, meta["in_channels"], 2 * coder.size)
    return (for_inference(model) if fast else model), coder, meta


def _predict_items(run: Path, data: Path, items):
    """Decoded predictions on dataset items: ``(dataset, decoded, truth, meta, seconds per galaxy)``."""
    from deepmorph.data import Normalization, StampDataset
    from deepmorph.tasks.regress import predict_standardised

    model, coder, meta = load_morphometer(run)
    ds = StampDataset(data, items, target=list(coder.columns),
                      normalization=Normalization.from_dict(meta["normalization"]), in_memory=True)
    start = time.perf_counter()
    mean, sigma = predict_standardised(model, ds, coder)
    seconds = (time.perf_counter() - start) / max(len(ds), 1)
    return ds, coder.decode(mean, sigma), ds.targets.numpy().astype(np.float64), meta, seconds


def _z_scores(name: str, truth, value, err) -> np.ndarray:
    """|error| / sigma, the error taken as :func:`parameter_errors` does (fractions for hlr, n)."""
    e = parameter_errors(name, truth, value)
    scale = err / truth if PARAMETERS[name][2] == "relative" else err
    return np.abs(e) / np.maximum(scale, 1e-12)


def calibrate_errors(run: str | Path, data: str | Path, items) -> list[float]:
    """Rescale a run's errors so 68.3% of the truths of ``items`` (the validation split) fall
    within 1 sigma; the factors go into ``run.json`` (applied by every prediction afterwards).

    Returns
    -------
    list of float
        The factor of each parameter (1 = the trained errors were calibrated already).
    """
    from deepmorph.tasks.regress import TargetCoder

    run = Path(run)
    _, decoded, truth, meta, _ = _predict_items(run, Path(data), items)
    coder = TargetCoder.from_dict(meta["coder"])
    z = np.stack([_z_scores(name, truth[:, k], *decoded[PARAMETERS[name][0]])
                  for k, name in enumerate(meta["parameters"])], axis=1)
    coder = coder.recalibrated(z)
    write_json(run / "run.json", {**meta, "coder": coder.to_dict()})
    return list(coder.sigma_scale)


#: Environments of a test galaxy (datasets simulated with ``--neighbors``).
ENVIRONMENTS = ("isolated", "faint neighbours", "bright neighbours")


def environments(data: str | Path, ids=None) -> np.ndarray:
    """The environment of the galaxies ``ids`` (catalogue ``id``; default all, in file order):
    ``isolated`` (no companion in the stamp), ``faint neighbours`` (all companions fainter than
    the galaxy) or ``bright neighbours`` (one at least as bright)."""
    from deepmorph.data import open_dataset

    with open_dataset(data) as ds:
        catalog, table = ds.catalog, ds.neighbor_table
    all_ids = np.asarray(catalog["id"])
    row = {int(i): k for k, i in enumerate(all_ids)}
    idx = np.arange(len(all_ids)) if ids is None else np.array([row[int(i)] for i in ids], dtype=int)
    env = np.full(len(all_ids), ENVIRONMENTS[0], dtype=object)
    if table is not None and len(table):
        mags = np.asarray(catalog["mag"], dtype=float)
        brightest = np.full(len(all_ids), np.inf)
        for gid, mag in zip(np.asarray(table["id"]), np.asarray(table["mag"], dtype=float), strict=True):
            k = row[int(gid)]
            brightest[k] = min(brightest[k], mag)
        has = np.isfinite(brightest)
        env[has] = np.where(brightest[has] <= mags[has], ENVIRONMENTS[2], ENVIRONMENTS[1])
    return env[idx].astype(str)


def _metrics(name: str, truth, value, err) -> dict:
    e = parameter_errors(name, truth, value)
    z = _z_scores(name, truth, value, err)
    if not len(e):
        return {"n": 0}
    return {"n": int(len(e)), "bias": float(np.median(e)), "scatter": nmad(e),
            "outlier_fraction": float(np.mean(np.abs(e) > OUTLIER[name])),
            "coverage_1sigma": float(np.mean(z <= 1.0)), "coverage_2sigma": float(np.mean(z <= 2.0))}


def nmad(x) -> float:
    """Normalised median absolute deviation, ``1.4826 * median(|x - median(x)|)`` (NaN-safe)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def parameter_errors(name: str, truth, value) -> np.ndarray:
    """Errors of one parameter: differences (mag, q), fractions (hlr, n), wrapped degrees (pa)."""
    truth, value = np.asarray(truth, dtype=float), np.asarray(value, dtype=float)
    kind = PARAMETERS[name][2]
    if name == "pa":
        return (value - truth + 90.0) % 180.0 - 90.0
    return value / truth - 1.0 if kind == "relative" else value - truth


#: Magnitude bin edges of the per-magnitude metrics, AB mag.
MAG_BINS = (18.0, 19.0, 20.0, 21.0, 22.0, 23.0)


def evaluate_morphometry(run: str | Path, data: str | Path, items=None, figures: bool = True) -> dict:
    """Bias, NMAD scatter, outlier fraction and error calibration of a run on dataset items.

    Returns
    -------
    dict
        Per parameter: ``bias`` (median error), ``scatter`` (NMAD of the errors; fractions for
        hlr and n), ``outlier_fraction`` (|error| above :data:`OUTLIER`), ``coverage_1sigma`` and
        ``coverage_2sigma`` (fractions of truths within the predicted 1 and 2 sigma), ``n``; plus
        ``n_test``, ``seconds_per_galaxy`` and ``environments``: the same per
        :data:`ENVIRONMENTS` present. Writes the files listed in the module docstring.
    """
    from astropy.table import Table

    run, data = Path(run), Path(data)
    ds, decoded, truth, meta, seconds = _predict_items(run, data, items)
    ids = np.asarray(ds.catalog["id"])
    env = environments(data, ids)
    rows = Table({"id": ids, "environment": env})
    metrics = {"n_test": int(len(ds)), "seconds_per_galaxy": seconds, "environments": {}}
    true_mag = np.asarray(ds.catalog["mag"], dtype=float)
    rows["true_mag_total"] = true_mag
    by_mag = []
    for k, name in enumerate(meta["parameters"]):
        value, err = decoded[PARAMETERS[name][0]]
        t = truth[:, k]
        metrics[name] = _metrics(name, t, value, err)
        for where in ENVIRONMENTS:
            sel = env == where
            if sel.any():
                metrics["environments"].setdefault(where, {})[name] = _metrics(name, t[sel], value[sel], err[sel])
            for lo, hi in zip(MAG_BINS[:-1], MAG_BINS[1:], strict=True):
                inbin = sel & (true_mag >= lo) & (true_mag < hi)
                if inbin.sum() >= 5:
                    by_mag.append({"parameter": name, "environment": where, "mag_lo": lo, "mag_hi": hi,
                                   **_metrics(name, t[inbin], value[inbin], err[inbin])})
        rows[f"true_{name}"], rows[name], rows[f"{name}_err"] = t, value, err
    save_table(rows, run / "test_predictions.ecsv")
    if by_mag:
        table = Table(rows=[tuple(r.values()) for r in by_mag], names=list(by_mag[0]))
        save_table(table, run / "test_metrics_by_mag.ecsv")
    write_json(run / "test_metrics.json", metrics)
    if figures:
        import matplotlib.pyplot as plt

        from deepmorph.workflows.runs import save_figure

        figs = [(prediction_figure(rows, meta["parameters"]), "test_predictions.png")]
        if by_mag:
            figs.append((magnitude_figure(by_mag, meta["parameters"]), "test_metrics.png"))
        for fig, name in figs:
            save_figure(fig, run / name)
            plt.close(fig)
    return metrics


#: Axis labels of the parameters in figures.
LABELS = {"mag": "magnitude (AB)", "hlr": "half-light radius (arcsec)", "n": "Sersic n", "q": "axis ratio q",
          "pa": "position angle (deg)"}


def prediction_figure(rows, parameters):
    """Measured vs true value of each parameter (rows), one column per environment present."""
    import matplotlib.pyplot as plt

    envs = [e for e in ENVIRONMENTS if np.any(np.asarray(rows["environment"]) == e)]
    fig, axes = plt.subplots(len(parameters), len(envs), figsize=(3.2 * len(envs), 2.9 * len(parameters)),
                             squeeze=False)
    for i, name in enumerate(parameters):
        t, v = np.asarray(rows[f"true_{name}"], float), np.asarray(rows[name], float)
        lo, hi = np.nanpercentile(np.concatenate([t, v]), [0.5, 99.5])
        for j, where in enumerate(envs):
            ax = axes[i, j]
            sel = np.asarray(rows["environment"]) == where
            ax.scatter(t[sel], v[sel], s=2, alpha=0.4, color="C0", rasterized=True)
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            if name in ("hlr", "n"):
                ax.set_xscale("log")
                ax.set_yscale("log")
            e = parameter_errors(name, t[sel], v[sel])
            ax.text(0.04, 0.94, f"NMAD {nmad(e):.3g}\nN {int(sel.sum())}", transform=ax.transAxes, va="top",
                    fontsize=8)
            if i == 0:
                ax.set_title(where)
            ax.set_xlabel(f"true {LABELS[name]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"measured {LABELS[name]}", fontsize=8)
    fig.tight_layout()
    return fig


def magnitude_figure(by_mag: list[dict], parameters):
    """Scatter (NMAD) and bias of each parameter vs magnitude, one line per environment."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(parameters), figsize=(3.0 * len(parameters), 5.2), squeeze=False)
    for j, name in enumerate(parameters):
        for c, where in enumerate(ENVIRONMENTS):
            pts = [r for r in by_mag if r["parameter"] == name and r["environment"] == where]
            if not pts:
                continue
            x = [0.5 * (r["mag_lo"] + r["mag_hi"]) for r in pts]
            axes[0, j].plot(x, [r["scatter"] for r in pts], "o-", color=f"C{c}", label=where, ms=3)
            axes[1, j].plot(x, [r["bias"] for r in pts], "o-", color=f"C{c}", ms=3)
        unit = " (fraction)" if PARAMETERS[name][2] == "relative" else ""
        axes[0, j].set_title(name + unit, fontsize=9)
        axes[1, j].axhline(0, color="k", lw=0.6)
        axes[1, j].set_xlabel("true magnitude (AB)")
    axes[0, 0].set_ylabel("scatter (NMAD)")
    axes[1, 0].set_ylabel("bias (median)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


@torch.no_grad()
def measure(run: str | Path, images: np.ndarray, batch_size: int = 256) -> dict:
    """Parameters and errors of stamps ``(N, C, H, W)`` (counts, the training survey's pixel scale)."""
    from deepmorph.data import Normalization

    model, coder, meta = load_morphometer(run)
    norm = Normalization.from_dict(meta["normalization"])
    means, sigmas = [], []
    k = coder.size
    for start in range(0, len(images), batch_size):
        x = norm(torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32)))
        out = model(x.contiguous(memory_format=torch.channels_last))
        means.append(out[:, :k].numpy())
        sigmas.append(torch.exp(0.5 * out[:, k:].clamp(-10.0, 10.0)).numpy())
    decoded = coder.decode(np.concatenate(means), np.concatenate(sigmas))
    return {name: decoded[PARAMETERS[name][0]] for name in meta["parameters"]}


# -- real cutouts ----------------------------------------------------------------------------------

#: Flags of :func:`predict_cutouts` (empty when the cutout was measured).
FLAGS = ("unreadable", "empty", "nan_pixels", "no_pixel_scale", "smaller_than_field", "psf_wider_than_model")

#: A cutout PSF up to this much wider than the model's is measured as is (no matching needed).
PSF_TOLERANCE = 0.10


def match_psf(image: np.ndarray, fwhm_in: float, fwhm_model: float, scale: float) -> tuple[np.ndarray | None, str]:
    """Degrade a cutout ``(C, H, W)`` whose PSF is sharper than the model's to the model's PSF.

    The kernel is a Gaussian of FWHM ``sqrt(fwhm_model**2 - fwhm_in**2)`` (exact for Gaussian
    PSFs, close for the cores of Moffat and HST PSFs), applied at the cutout's own pixel scale.

    Parameters
    ----------
    fwhm_in, fwhm_model : float
        FWHM of the cutout's PSF and of the model's training PSF, arcsec.
    scale : float
        Pixel scale of the cutout, arcsec/pixel.

    Returns
    -------
    image, flag
        The matched image and ``""``; the image unchanged when the PSFs agree within
        :data:`PSF_TOLERANCE`; ``None`` and ``"psf_wider_than_model"`` when the cutout's PSF is
        wider (a network cannot sharpen it).
    """
    from scipy import ndimage

    if fwhm_in > fwhm_model * (1.0 + PSF_TOLERANCE):
        return None, "psf_wider_than_model"
    if fwhm_in >= fwhm_model:
        return image, ""
    sigma_pix = math.sqrt(fwhm_model**2 - fwhm_in**2) / (2.0 * math.sqrt(2.0 * math.log(2.0))) / scale
    return np.stack([ndimage.gaussian_filter(plane, sigma_pix, mode="nearest") for plane in image]), ""


def prepare_cutout(image: np.ndarray, scale_in: float, scale_model: float, size: int) -> tuple[np.ndarray | None, str]:
    """A cutout ``(C, H, W)`` resampled to the model's pixel scale and cut to its ``size``, or a flag.

    Resampling is bilinear and conserves counts (each resampled pixel is divided by the area
    ratio); the galaxy is assumed to be at the cutout's centre, as cutouts are made.

    Returns
    -------
    stamp, flag
        ``(C, size, size)`` float32 and ``""``, or ``None`` and the reason (``smaller_than_field``).
    """
    from scipy import ndimage

    factor = float(scale_in) / float(scale_model)  # model pixels per input pixel
    if abs(factor - 1.0) > 1e-6:
        image = np.stack([ndimage.zoom(plane, factor, order=1) / factor**2 for plane in image])
    _, h, w = image.shape
    if h < size or w < size:
        return None, "smaller_than_field"
    y0, x0 = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[:, y0:y0 + size, x0:x0 + size], dtype=np.float32), ""


def _load_cutout(path: Path, pixel_scale: float | None):
    """``((image, scale), "")`` for a usable cutout, or ``(None, flag)``."""
    from astropy.io import fits

    from deepmorph.errors import DeepmorphError
    from deepmorph.simulate.psf import _header_scale

    try:
        image = read_image_file(path)
    except DeepmorphError:
        return None, "unreadable"
    if image.size == 0 or not np.isfinite(image).any() or not np.nanmax(np.abs(image)) > 0:
        return None, "empty"
    if not np.isfinite(image).all():
        return None, "nan_pixels"
    scale = pixel_scale
    name = path.name.lower()
    if scale is None and (".fit" in name or ".fts" in name):
        scale = _header_scale(fits.getheader(path))
    if scale is None:
        return None, "no_pixel_scale"
    return (image, float(scale)), ""


def predict_cutouts(run: str | Path, paths, pixel_scale: float | None = None, zeropoint: float | None = None,
                    psf=None):
    """Sersic parameters of real cutouts (FITS), with errors and a flag per cutout.

    Parameters
    ----------
    run : path
        A morphometry run.
    paths : sequence of paths
        FITS cutouts, one galaxy at the centre of each, any size and pixel scale.
    pixel_scale : float, optional
        Arcsec per pixel of every cutout; default: each file's header (``PIXSCALE``, ``CDELT1``,
        ``CD1_1``...). A cutout with neither is flagged ``no_pixel_scale``.
    zeropoint : float, optional
        AB zero point of the cutouts' units: magnitudes are given in it (default: the training
        survey's, i.e. the cutouts are in its counts).
    psf : str or PSF, optional
        The cutouts' PSF (``gaussian:FWHM``, ``moffat:FWHM,BETA``, ``FILE.fits[:HDU][@SCALE]``).
        A PSF sharper than the model's is degraded to it (:func:`match_psf`); a wider one flags
        every cutout ``psf_wider_than_model``. Default: the cutouts have the model's PSF.

    Returns
    -------
    astropy.table.Table
        One row per cutout, in order: ``file``, each parameter and its ``_err`` (NaN when
        flagged), and ``flag`` (one of :data:`FLAGS`, empty when measured). Never raises for a
        bad cutout: it gets its flag.
    """
    from astropy.table import Table

    from deepmorph.simulate.psf import parse_psf

    _, _, meta = load_morphometer(run)
    size, scale_model = int(meta["stamp_size"]), float(meta["pixel_scale_arcsec"])
    fwhm_in = parse_psf(psf).fwhm_arcsec if psf is not None else None
    paths = [Path(p) for p in paths]
    stamps, flags = [], []
    for path in paths:
        image, flag = _load_cutout(path, pixel_scale)
        stamp = None
        if image is not None and fwhm_in is not None:
            matched, flag = match_psf(image[0], fwhm_in, float(meta["psf_fwhm_arcsec"]), image[1])
            image = (matched, image[1]) if matched is not None else None
        if image is not None:
            stamp, flag = prepare_cutout(image[0], image[1], scale_model, size)
        stamps.append(stamp)
        flags.append(flag)
    good = [i for i, s in enumerate(stamps) if s is not None]
    table = Table({"file": [p.name for p in paths]})
    values = measure(run, np.stack([stamps[i] for i in good])) if good else {}
    shift = (float(zeropoint) - float(meta["zeropoint_mag"])) if zeropoint is not None else 0.0
    for name in meta["parameters"]:
        col, err = np.full(len(paths), np.nan), np.full(len(paths), np.nan)
        if good:
            col[good], err[good] = values[name]
        table[name], table[f"{name}_err"] = col + (shift if name == "mag" else 0.0), err
    table["flag"] = flags
    table.meta.update({"model": str(run), "pixel_scale_arcsec": scale_model, "psf_fwhm_arcsec_in": fwhm_in,
                       "zeropoint_mag": zeropoint if zeropoint is not None else meta["zeropoint_mag"],
                       "hlr_unit": "arcsec", "pa_unit": "deg, counter-clockwise from +x"})
    return table
