"""Clump detection with a U-Net, compared with the classical method on the same galaxies.

The U-Net learns a per-pixel clump probability map from the simulator's clump table: its target is
a "heat map", 1 at each clump's centre and falling off like a Gaussian of the PSF's width
(:func:`clump_heatmaps`), so that two clumps a PSF FWHM apart stay two peaks in the map (a flat
disk per clump, like the simulator's ``clump_mask``, merges them). Detection
follows the lecture: probability map -> threshold -> source extraction with sep (SExtractor's
algorithm) on the map -> a clump catalogue with positions, the peak probability, and the clump's
flux measured on the image above a smooth model of the galaxy. The classical baseline subtracts
a median-filtered galaxy and runs sep on the residual with an S/N threshold. Both are scored
against the truth with :mod:`deepmorph.measure.clumps` (matching within 2 px).

A run directory::

    RUN/run.json, config.yaml, model.pt ...   the training run
    RUN/test_metrics.json                     completeness/purity of both methods on the test split
    RUN/curves_unet.ecsv, curves_classical.ecsv   purity and completeness vs threshold
    RUN/completeness_snr.ecsv, completeness_flux_ratio.ecsv   completeness in bins of the truth, both methods
    RUN/purity_flux_ratio.ecsv                 purity in bins of the measured clump-to-galaxy flux ratio
    RUN/precision_recall.png, completeness_snr.png, completeness_flux_ratio.png
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import (
    dataset_psf,
    fitted_normalization,
    load_network,
    read_image_file,
    read_run,
    require_arrays,
    save_figure,
    save_table,
    train_task,
    training_augmentation,
    write_json,
)

#: Default U-Net and training for clumps (depth 3 suits 32-128 px stamps).
DEFAULT_MODEL = {"name": "unet", "kwargs": {"depth": 3, "width": 16}}
#: S/N above which completeness is required (the issue's definition of a detectable clump).
SNR_MIN = 5.0
#: Matching radius between a detection and a true clump, pixels.
MATCH_RADIUS = 2.0
UNET_THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 3)
CLASSICAL_THRESHOLDS = np.array([2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0])


def default_config(**overrides):
    """The run config clump training starts from: a depth-3 U-Net, flips, Adam, cosine schedule."""
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": DEFAULT_MODEL, "augmentation": "flips", "epochs": 15, "batch_size": 64,
        "schedule": {"kind": "cosine"}, "early_stopping": {"monitor": "val_loss", "patience": 6},
    })
    return base.with_overrides(overrides) if overrides else base


def clump_heatmaps(table, ids, size: int, fwhm_pix: float) -> np.ndarray:
    """Training targets ``(N, 1, S, S)`` float32: ``max_k exp(-r_k^2 / 2 sigma^2)`` over each stamp's clumps.

    ``r_k`` is the distance of a pixel centre from clump ``k`` (the clump table's ``x_pix``,
    ``y_pix``, offsets from the stamp centre) and ``sigma`` the PSF's (``fwhm_pix / 2.355``); stamp
    ``i`` holds the clumps of galaxy ``ids[i]``.
    """
    ids = np.asarray(ids)
    out = np.zeros((len(ids), 1, size, size), dtype=np.float32)
    if table is None or len(ids) == 0:
        return out
    row_of = {int(g): i for i, g in enumerate(ids)}
    sigma = max(float(fwhm_pix), 1.0) / 2.3548
    c = 0.5 * (size - 1)
    coords = np.arange(size) - c
    reach = int(np.ceil(4 * sigma))
    for g, x, y in zip(np.asarray(table["id"]), np.asarray(table["x_pix"]), np.asarray(table["y_pix"]), strict=True):
        i = row_of.get(int(g))
        if i is None:
            continue
        cx, cy = int(round(c + x)), int(round(c + y))
        xs = slice(max(cx - reach, 0), min(cx + reach + 1, size))
        ys = slice(max(cy - reach, 0), min(cy + reach + 1, size))
        if xs.start >= xs.stop or ys.start >= ys.stop:
            continue
        gx = np.exp(-((coords[xs] - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((coords[ys] - y) ** 2) / (2 * sigma**2))
        np.maximum(out[i, 0, ys, xs], np.outer(gy, gx).astype(np.float32), out=out[i, 0, ys, xs])
    return out


def _heatmap_set(data: Path, items: np.ndarray, norm, fwhm_pix: float):
    """An in-memory :class:`~deepmorph.data.StampDataset` whose items carry a ``clump_heatmap``."""
    from deepmorph.data import StampDataset, open_dataset

    ds = StampDataset(data, items, target=None, normalization=norm, in_memory=True)
    with open_dataset(data) as f:
        ids = np.asarray(f.catalog["id"])[ds.indices]
        table = f.clump_table
    ds._memory["clump_heatmap"] = clump_heatmaps(table, ids, ds.image_shape[-1], fwhm_pix)
    ds.masks = ("clump_heatmap",)
    return ds


def _check_dense(config) -> None:
    from deepmorph.models import create_model

    model = create_model(config.model.name, **{**config.model.kwargs, "in_channels": 1, "num_outputs": 1})
    if not getattr(model, "dense_output", False):
        raise DeepmorphValueError(f"model {config.model.name!r} does not output images; use 'unet'")


def train_clumps(data: str | Path, out: str | Path, config=None, split: Split | None = None, pos_weight: float = 5.0,
                 resume: bool = True, evaluate: bool = True) -> dict:
    """Train a U-Net clump detector on ``data`` and score it and the classical method on the test split.

    Parameters
    ----------
    data : path
        A simulated dataset with clumps (``deepmorph simulate --clumps``): a ``clump_mask`` array
        and a clump table.
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`.
    split : Split
        Train/val/test split.
    pos_weight : float
        Weight of clump pixels in the loss (the images, with their heat maps, are held in memory).
    evaluate : bool
        Score both methods on the test split (:func:`evaluate_clumps`).

    Returns
    -------
    dict
        :func:`evaluate_clumps`'s metrics (when ``evaluate``) plus ``train_size``, ``epochs_run``,
        ``train_seconds``.
    """
    from deepmorph.data import open_dataset
    from deepmorph.tasks import SegmentTask
    from deepmorph.training import build_model

    data, out = Path(data), Path(out)
    config = config or default_config()
    split = split or Split()
    _check_dense(config)
    require_arrays(data, ("clump_mask",), "to train a clump detector (simulate with --clumps)")
    if evaluate:
        require_arrays(data, ("noiseless",), "for the clumps' S/N in the evaluation (simulate with --components)")
    with open_dataset(data) as ds:
        n, channels = len(ds), int(ds.images.shape[1])
        fwhm = float(ds.attrs.get("psf_fwhm_pix") or 3.0)
    parts = split.indices(n)
    norm, config = fitted_normalization(config, data, parts["train"])
    sets = {k: _heatmap_set(data, parts[k], norm, fwhm) for k in ("train", "val")}
    model = build_model(config, in_channels=channels, num_outputs=1)
    task = SegmentTask(model, config, "clump_heatmap", pos_weight, augmentation=training_augmentation(config))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "clumps", "method": "unet", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "normalization": norm.to_dict(),
        "in_channels": channels, "multiple": int(getattr(model, "multiple", 1)), "pos_weight": pos_weight,
        "target": "clump_heatmap", "heatmap_fwhm_pix": fwhm,
    })
    history, seconds = train_task(task, sets, config, out, resume, val_batch_size=128)
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds}
    if evaluate:
        result.update(evaluate_clumps(out, data, parts["test"]))
    return result


def load_detector(run: str | Path) -> tuple[torch.nn.Module, dict]:
    """The trained clump U-Net of a run (eval mode, CPU) and its ``run.json``."""
    meta = read_run(run, "clumps")
    return load_network(run, meta["in_channels"], 1), meta


@torch.no_grad()
def probability_maps(model: torch.nn.Module, images: np.ndarray, normalization, batch_size: int = 128,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Clump probability maps ``(N, H, W)`` of stamps ``(N, C, H, W)`` (counts) in batches."""
    from deepmorph.data import Normalization

    norm = normalization if isinstance(normalization, Normalization) else Normalization.from_dict(normalization)
    model = model.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = norm(torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32)).to(device))
        out.append(torch.sigmoid(model(x))[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(images.shape[-2:]), dtype=np.float32)


def _truth(ds, items: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """The true clumps of dataset items: their table rows, the galaxy ids, and the noiseless stamps."""
    ids = np.asarray(ds.catalog["id"])[items]
    table = ds.clump_table
    if table is None:
        raise DeepmorphValueError(f"{ds.path}: no clump table to score detections against")
    keep = np.isin(np.asarray(table["id"]), ids)
    truth = {c: np.asarray(table[c])[keep] for c in table.colnames}
    noiseless = ds.array("noiseless")[np.sort(items)] if "noiseless" in ds.array_names else None
    order = np.argsort(np.argsort(items))
    return truth, ids, (noiseless[order] if noiseless is not None else None)


def evaluate_clumps(run: str | Path, data: str | Path, items=None, threshold: float = 0.5) -> dict:
    """Completeness and purity of the U-Net and the classical method on dataset items, side by side.

    Writes the curves, binned completeness tables and figures into the run directory.

    Detections are extracted once, at the lowest threshold of each sweep, and each keeps its
    score (the U-Net's peak probability, the classical S/N); a curve's point at threshold ``t``
    counts the detections scoring at least ``t``. (``detect clumps --threshold t`` extracts at
    ``t`` itself, so its segments, and rarely its blends, can differ slightly.)

    Returns
    -------
    dict
        Per method (``unet``, ``classical``): ``completeness_at_purity_90`` (S/N >= 5 clumps, best
        threshold with purity >= 0.9), that ``threshold`` and the ``purity`` there,
        ``seconds_per_galaxy``; for the U-Net also ``completeness_at_threshold`` and
        ``purity_at_threshold`` at ``threshold``; ``n_galaxies``, ``n_true_clumps``, ``n_clumps``
        (after merging clumps closer than the PSF FWHM), ``n_clumps_snr5``.
    """
    from astropy.table import Table

    from deepmorph.data import open_dataset
    from deepmorph.measure import clumps as mc
    from deepmorph.measure.plots import completeness_figure, precision_recall_figure

    run, data = Path(run), Path(data)
    model, meta = load_detector(run)
    with open_dataset(data) as ds:
        items = np.arange(len(ds)) if items is None else np.asarray(items)
        attrs = ds.attrs
        images = ds.images[np.sort(items)][np.argsort(np.argsort(items))]
        truth, ids, noiseless = _truth(ds, items)
    if noiseless is None:
        raise DeepmorphValueError(f"{data}: no noiseless images to compute the clumps' S/N")
    noise = attrs.get("noise") or {}
    sky = float(noise.get("sky_sigma") or 0.0)
    if not sky > 0:
        from deepmorph.data.normalization import sky_sigma

        sky = float(np.median([sky_sigma(im) for im in images[:256]]))
    gain = noise.get("gain_e_per_count")
    fwhm = float(attrs.get("psf_fwhm_pix") or mc.DEFAULT_FWHM_PIX)
    # Clumps closer than the PSF's FWHM make one peak: they count as one clump (flux summed).
    n_true = len(truth["id"])
    truth = mc.merge_close_clumps(truth, fwhm)
    snr = mc.clump_snr(truth, noiseless, sky, gain, _nea(data), ids=ids)
    start = time.perf_counter()
    maps = probability_maps(model, images, meta["normalization"])
    det_unet = mc.extract_from_maps(maps, images, threshold=float(UNET_THRESHOLDS.min()), ids=ids, fwhm_pix=fwhm,
                                    sky_sigma=sky, gain=gain)
    unet_seconds = time.perf_counter() - start
    start = time.perf_counter()
    det_classical = mc.classical_clumps(images, sky, ids=ids, snr_threshold=float(CLASSICAL_THRESHOLDS.min()),
                                        fwhm_pix=fwhm, gain=gain)
    classical_seconds = time.perf_counter() - start
    curves = {
        "unet": mc.detection_curves(det_unet, truth, snr, UNET_THRESHOLDS, MATCH_RADIUS, SNR_MIN),
        "classical": mc.detection_curves(det_classical, truth, snr, CLASSICAL_THRESHOLDS, MATCH_RADIUS, SNR_MIN),
    }
    metrics = {"n_galaxies": int(len(items)), "n_true_clumps": int(n_true), "n_clumps": int(len(snr)),
               "n_clumps_snr5": int((snr >= SNR_MIN).sum()), "merge_radius_pix": fwhm,
               "match_radius_pix": MATCH_RADIUS, "snr_min": SNR_MIN}
    chosen = {}
    for name, table in curves.items():
        save_table(table, run / f"curves_{name}.ecsv")
        best = mc.completeness_at_purity(table, 0.9)
        metrics[name] = {"completeness_at_purity_90": best["completeness"], "threshold": best["threshold"],
                         "purity": best["purity"]}
        chosen[name] = best["threshold"] if np.isfinite(best["threshold"]) else float(table["threshold"][0])
    at = curves["unet"][int(np.argmin(np.abs(np.asarray(curves["unet"]["threshold"]) - threshold)))]
    metrics["unet"].update({"completeness_at_threshold": float(at["completeness"]),
                            "purity_at_threshold": float(at["purity"]), "default_threshold": threshold,
                            "seconds_per_galaxy": unet_seconds / max(len(items), 1)})
    metrics["classical"]["seconds_per_galaxy"] = classical_seconds / max(len(items), 1)
    dets = {"unet": det_unet, "classical": det_classical}
    for key, values, bins, label in (
        ("snr", snr, np.array([1, 2, 3, 5, 7, 10, 15, 25, 50, 100, 1000]), "clump S/N"),
        ("flux_ratio", np.asarray(truth["flux_fraction"]), np.geomspace(0.01, 0.2, 8), "clump-to-galaxy flux ratio"),
    ):
        tables = {n: mc.binned_completeness(dets[n], truth, values, bins, chosen[n], MATCH_RADIUS)
                  for n in dets}
        combined = Table()
        for n, t in tables.items():
            for col in t.colnames:
                combined[f"{n}_{col}" if col not in ("lo", "hi") else col] = t[col]
        save_table(combined, run / f"completeness_{key}.ecsv")
        save_figure(completeness_figure(tables, label, xscale="log"), run / f"completeness_{key}.png")
    # Purity in bins of the detection's measured flux over its galaxy's flux.
    with open_dataset(data) as ds:
        galaxy_flux = dict(zip(np.asarray(ds.catalog["id"]).tolist(), np.asarray(ds.catalog["flux"]).tolist(),
                               strict=True))
    purity = Table()
    for n, det in dets.items():
        ratio = np.asarray(det["flux"], dtype=float) / np.array([galaxy_flux[int(g)] for g in det["id"]])
        t = mc.binned_purity(det, truth, ratio, np.geomspace(0.01, 0.2, 8), chosen[n], MATCH_RADIUS)
        for col in t.colnames:
            purity[f"{n}_{col}" if col not in ("lo", "hi") else col] = t[col]
    save_table(purity, run / "purity_flux_ratio.ecsv")
    save_figure(precision_recall_figure(curves), run / "precision_recall.png")
    write_json(run / "test_metrics.json", metrics)
    return metrics


def _nea(data: Path) -> float:
    """Noise-equivalent area of the dataset's PSF, pixels (``(sum P)^2 / sum P^2``)."""
    psf = dataset_psf(data, 41).astype(np.float64)
    return float(psf.sum() ** 2 / (psf**2).sum())


# -- detection on new images -----------------------------------------------------------------------

def _with_image_coords(table, maps: np.ndarray):
    """Add 0-based pixel positions ``x_image``, ``y_image`` to a detection table (offsets + centre)."""
    table["x_image"] = np.asarray(table["x_pix"], dtype=float) + 0.5 * (maps.shape[-1] - 1)
    table["y_image"] = np.asarray(table["y_pix"], dtype=float) + 0.5 * (maps.shape[-2] - 1)
    return table


def psf_scale_noise(plane: np.ndarray, fwhm_pix: float) -> float:
    """The sky noise per pixel that white noise would need to fluctuate as much as this image's
    does at the PSF's scale (counts).

    The image is smoothed with a unit-sum Gaussian of the PSF's FWHM; for white noise of sigma
    ``s`` the smoothed image's robust sigma is ``s * sqrt(sum k^2)``. Equal to the pixel sigma
    for white noise, larger where neighbouring pixels are correlated.
    """
    from scipy import ndimage

    from deepmorph.data.normalization import robust_sigma

    sigma_k = max(float(fwhm_pix), 1.0) / 2.3548
    smooth = ndimage.gaussian_filter(np.asarray(plane, dtype=np.float32), sigma_k)
    return float(robust_sigma(smooth) * np.sqrt(4 * np.pi * sigma_k**2))


def clump_map(model: torch.nn.Module, image: np.ndarray, tile: int = 256, overlap: int = 48, multiple: int = 8,
              device: str | torch.device = "cpu", progress: bool = False, name: str = "image",
              fwhm_pix: float = 3.0) -> np.ndarray:
    """Clump probability map ``(H, W)`` of an image ``(C, H, W)`` of any size, tiled with overlap.

    The sky is subtracted first (SExtractor's background map from sep, in 64-px boxes, for
    images of at least 128 px; the median otherwise), then the image is normalised with its own
    sky noise (asinh stretch softened at the measured sky sigma), as every training stamp was
    with the survey's. The noise is measured at the PSF's scale (:func:`psf_scale_noise`), so
    that correlated noise (resampled or compressed images) is not mistaken for clumps.
    """
    from deepmorph.data.normalization import Normalization, sky_sigma
    from deepmorph.models import predict_tiled

    image = np.array(image, dtype=np.float32)  # a native-endian copy (FITS data arrive big-endian)
    if not np.isfinite(image).all():
        raise DeepmorphValueError(f"{name}: {int((~np.isfinite(image)).sum())} NaN/inf pixel(s); replace or "
                                  "mask them first")
    for c in range(image.shape[0]):
        image[c] -= _sky_level(image[c])
    sigma = max(sky_sigma(image), psf_scale_noise(image[0], fwhm_pix))
    if not sigma > 0:
        raise DeepmorphValueError(f"{name}: could not measure a sky noise (constant image?)")
    norm = Normalization("asinh", scale=float(sigma))
    return predict_tiled(lambda x: torch.sigmoid(model(norm(x))), image, tile=tile, overlap=overlap,
                         multiple=multiple, device=device, progress=progress)[0]


def _sky_level(plane: np.ndarray) -> np.ndarray | float:
    """The sky under an image: sep's background map (large images) or the median (stamps)."""
    if min(plane.shape) < 128:
        return float(np.median(plane))
    import sep

    return sep.Background(np.ascontiguousarray(plane, dtype=np.float32), bw=64, bh=64).back()


def detect_clumps(run: str | Path, images, threshold: float = 0.5, maps_out: str | Path | None = None,
                  tile: int = 256, overlap: int = 48, device: str = "cpu", progress: bool = True):
    """Clump catalogue of stamps in a dataset file, or of FITS images of any size.

    Parameters
    ----------
    run : path
        A clump run (:func:`train_clumps`).
    images : path or list of paths
        One ``.h5`` dataset (its run normalisation applies), or FITS images (each normalised
        with its own sky noise, as the training stamps were with theirs; images larger than
        ``tile`` are processed tile by tile).
    threshold : float
        Probability threshold of the detection.
    maps_out : path, optional
        FITS file for the probability maps: one image HDU per input (for a dataset file, one
        cube with a plane per stamp).

    Returns
    -------
    astropy.table.Table
        One row per clump: ``id`` (galaxy id or image name), ``x_pix``, ``y_pix`` (from the image
        centre), ``x_image``, ``y_image`` (0-based pixel), ``probability``, ``flux``, ``flux_err``
        (counts, above a smooth model of the galaxy).
    """
    from astropy.table import Table, vstack

    from deepmorph.measure import clumps as mc

    model, meta = load_detector(run)
    fwhm = float(meta.get("heatmap_fwhm_pix", 3.0))
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    if not paths:
        raise DeepmorphValueError("no images given")
    tables, maps, names = [], [], []
    if len(paths) == 1 and paths[0].suffix.lower() in (".h5", ".hdf5"):
        from deepmorph.data import open_dataset

        with open_dataset(paths[0]) as ds:
            stamps = ds.images[...]
            ids = np.asarray(ds.catalog["id"]) if "id" in ds.catalog.colnames else np.arange(len(ds))
        if stamps.shape[1] != meta["in_channels"]:
            raise DeepmorphValueError(f"{paths[0]}: {stamps.shape[1]} band(s), the model takes {meta['in_channels']}")
        m = meta["multiple"]
        if stamps.shape[-1] % m or stamps.shape[-2] % m:
            raise DeepmorphValueError(f"{paths[0]}: stamps of {stamps.shape[-2]}x{stamps.shape[-1]} px; the U-Net "
                                      f"needs multiples of {m}")
        prob = probability_maps(model, stamps, meta["normalization"], device=device)
        tables.append(_with_image_coords(mc.extract_from_maps(prob, stamps, threshold=threshold, ids=ids,
                                                              fwhm_pix=fwhm), prob))
        maps.append(prob)
        names.append(paths[0].name)
    else:
        model.to(device)
        for path in paths:
            image = read_image_file(path)  # (C, H, W)
            if image.shape[0] != meta["in_channels"]:
                raise DeepmorphValueError(f"{path}: {image.shape[0]} band(s), the model takes {meta['in_channels']}")
            prob = clump_map(model, image, tile=tile, overlap=overlap, multiple=meta["multiple"], device=device,
                             progress=progress, name=str(path), fwhm_pix=fwhm)
            t = mc.extract_from_maps(prob[None], image[None], threshold=threshold, ids=np.array([0]), fwhm_pix=fwhm)
            t = _with_image_coords(t, prob)
            t["id"] = np.array([path.stem] * len(t), dtype=f"U{max(len(path.stem), 1)}")
            tables.append(t)
            maps.append(prob)
            names.append(path.name)
    table = vstack(tables) if tables else Table()
    table.meta.update({"model": str(run), "threshold": threshold})
    if maps_out is not None:
        _write_maps(Path(maps_out), maps, names)
    return table


def _write_maps(path: Path, maps: list[np.ndarray], names: list[str]) -> None:
    from astropy.io import fits

    hdus = [fits.PrimaryHDU()]
    for m, name in zip(maps, names, strict=True):
        hdu = fits.ImageHDU(np.asarray(m, dtype=np.float32), name=Path(name).stem[:60].upper() or "MAP")
        hdu.header["BUNIT"] = ("", "clump probability")
        hdus.append(hdu)
    tmp = path.with_name(path.name + ".partial")
    try:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    except OSError as exc:
        raise DeepmorphIOError(f"{path}: cannot write the maps ({exc.strerror or exc})") from None
    tmp.replace(path)
