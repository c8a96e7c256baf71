"""Morphometry: a CNN that measures a galaxy's Sersic parameters, with uncertainties.

Trained on single-Sersic galaxies (``deepmorph simulate --bulge-to-total 1 1``: the whole galaxy is
the Sersic "bulge"), the network predicts the magnitude, the half-light radius, the Sersic index,
the axis ratio and the position angle, each with a 1-sigma error (a heteroscedastic Gaussian,
:class:`~deepmorph.tasks.RegressTask`). It is scored on the held-out test split with the numbers
astronomers quote: bias, scatter (normalised median absolute deviation), outlier fraction, and
the calibration of the errors (the fraction of truths within 1 and 2 sigma).

A run directory::

    RUN/run.json, config.yaml, model.pt ...   the training run (the target coding in run.json)
    RUN/test_metrics.json                     per parameter: bias, NMAD scatter, outliers, coverage
    RUN/test_predictions.ecsv                 truth, value and error per test galaxy
"""

from __future__ import annotations

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
                      evaluate: bool = True) -> dict:
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
    coder = coder_for(tuple(parameters))
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
    coder = coder.fit(sets["train"].targets.numpy())
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
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds}
    if evaluate:
        result.update(evaluate_morphometry(out, data, parts["test"]))
    return result


def load_morphometer(run: str | Path):
    """The trained CNN of a morphometry run (eval mode, CPU), its target coder and ``run.json``."""
    from deepmorph.tasks.regress import TargetCoder

    meta = read_run(run, "morphometry")
    coder = TargetCoder.from_dict(meta["coder"])
    return load_network(run, meta["in_channels"], 2 * coder.size), coder, meta


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


def evaluate_morphometry(run: str | Path, data: str | Path, items=None) -> dict:
    """Bias, NMAD scatter, outlier fraction and error calibration of a run on dataset items.

    Returns
    -------
    dict
        Per parameter: ``bias`` (median error), ``scatter`` (NMAD of the errors; fractions for
        hlr and n), ``outlier_fraction`` (|error| above :data:`OUTLIER`), ``coverage_1sigma`` and
        ``coverage_2sigma`` (fractions of truths within the predicted 1 and 2 sigma); plus ``n``
        and ``seconds_per_galaxy``.
    """
    from astropy.table import Table

    from deepmorph.data import Normalization, StampDataset
    from deepmorph.tasks.regress import predict_standardised

    run, data = Path(run), Path(data)
    model, coder, meta = load_morphometer(run)
    ds = StampDataset(data, items, target=list(coder.columns),
                      normalization=Normalization.from_dict(meta["normalization"]), in_memory=True)
    start = time.perf_counter()
    mean, sigma = predict_standardised(model, ds, coder)
    seconds = (time.perf_counter() - start) / max(len(ds), 1)
    decoded = coder.decode(mean, sigma)
    truth = ds.targets.numpy().astype(np.float64)
    rows = Table({"id": np.asarray(ds.catalog["id"])})
    metrics = {"n_test": int(len(ds)), "seconds_per_galaxy": seconds}
    for k, name in enumerate(meta["parameters"]):
        col = PARAMETERS[name][0]
        value, err = decoded[col]
        t = truth[:, k]
        e = parameter_errors(name, t, value)
        # The error in the same units as e: fractions for relative parameters.
        scale = err / t if PARAMETERS[name][2] == "relative" else err
        z = np.abs(e) / np.maximum(scale, 1e-12)
        metrics[name] = {"bias": float(np.median(e)), "scatter": nmad(e),
                         "outlier_fraction": float(np.mean(np.abs(e) > OUTLIER[name])),
                         "coverage_1sigma": float(np.mean(z <= 1.0)), "coverage_2sigma": float(np.mean(z <= 2.0))}
        rows[f"true_{name}"], rows[name], rows[f"{name}_err"] = t, value, err
    save_table(rows, run / "test_predictions.ecsv")
    write_json(run / "test_metrics.json", metrics)
    return metrics


@torch.no_grad()
def measure(run: str | Path, images: np.ndarray, batch_size: int = 256) -> dict:
    """Parameters and errors of stamps ``(N, C, H, W)`` (counts, the training survey's pixel scale)."""
    from deepmorph.data import Normalization

    model, coder, meta = load_morphometer(run)
    norm = Normalization.from_dict(meta["normalization"])
    means, sigmas = [], []
    k = coder.size
    for start in range(0, len(images), batch_size):
        out = model(norm(torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))))
        means.append(out[:, :k].numpy())
        sigmas.append(torch.exp(0.5 * out[:, k:].clamp(-10.0, 10.0)).numpy())
    decoded = coder.decode(np.concatenate(means), np.concatenate(sigmas))
    return {name: decoded[PARAMETERS[name][0]] for name in meta["parameters"]}


# -- real cutouts ----------------------------------------------------------------------------------

#: Flags of :func:`predict_cutouts` (empty when the cutout was measured).
FLAGS = ("unreadable", "empty", "nan_pixels", "no_pixel_scale", "smaller_than_field")


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


def predict_cutouts(run: str | Path, paths, pixel_scale: float | None = None, zeropoint: float | None = None):
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

    Returns
    -------
    astropy.table.Table
        One row per cutout, in order: ``file``, each parameter and its ``_err`` (NaN when
        flagged), and ``flag`` (one of :data:`FLAGS`, empty when measured). Never raises for a
        bad cutout: it gets its flag.
    """
    from astropy.table import Table

    _, _, meta = load_morphometer(run)
    size, scale_model = int(meta["stamp_size"]), float(meta["pixel_scale_arcsec"])
    paths = [Path(p) for p in paths]
    stamps, flags = [], []
    for path in paths:
        image, flag = _load_cutout(path, pixel_scale)
        stamp = None
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
    table.meta.update({"model": str(run), "pixel_scale_arcsec": scale_model,
                       "zeropoint_mag": zeropoint if zeropoint is not None else meta["zeropoint_mag"],
                       "hlr_unit": "arcsec", "pa_unit": "deg, counter-clockwise from +x"})
    return table
