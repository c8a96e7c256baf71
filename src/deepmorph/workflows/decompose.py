"""Bulge/disk decomposition with a two-output U-Net, compared with a 2-component imfit fit.

The U-Net (the lecture's "DeepLegato_2c", after DeepLeGATo, Tuccillo et al. 2018) predicts the
noise-free bulge and disk images of an observed galaxy; B/T is the ratio of their fluxes. The
classical baseline fits a PSF-convolved Sersic bulge + exponential disk with imfit
(:func:`deepmorph.measure.bulgedisk.fit_bulge_disk`) to the same stamps. Both are scored against
the simulator's truth: B/T, bulge and disk fluxes (relative to the galaxy's flux), and the
per-pixel residuals of each component image, overall and in bins of magnitude and B/T.

A run directory::

    RUN/run.json, config.yaml, model.pt ...   the training run
    RUN/test_metrics.json                     both methods on the test galaxies (mag < 22 and all)
    RUN/test_predictions.ecsv                 per test galaxy: truth, U-Net and imfit values
    RUN/bt_by_mag.ecsv, bt_by_bt.ecsv         RMS B/T error in bins, both methods
    RUN/decomposition.png                     B/T and flux-error degeneracy figure
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
    load_network,
    read_run,
    read_stamps,
    require_arrays,
    save_figure,
    save_table,
    train_task,
    training_augmentation,
    write_json,
)

COMPONENTS = ("bulge", "disk")
DEFAULT_MODEL = {"name": "unet", "kwargs": {"depth": 3, "width": 16, "zero_init": True}}
#: The issue's "bright" sample for the headline numbers.
MAG_LIMIT = 22.0


def default_config(**overrides):
    """The run config decomposition training starts from: a depth-3 U-Net, flips, Adam, cosine schedule.

    The images go in as counts: :class:`~deepmorph.tasks.DecomposeTask` scales each one by its
    own brightness, so the dataset normalisation is ``none``.
    """
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": DEFAULT_MODEL, "augmentation": "flips", "epochs": 20, "batch_size": 64,
        "normalization": {"kind": "none"}, "schedule": {"kind": "cosine"},
        "early_stopping": {"monitor": "val_loss", "patience": 8},
    })
    return base.with_overrides(overrides) if overrides else base


def train_decompose(data: str | Path, out: str | Path, config=None, split: Split | None = None,
                    flux_weight: float = 1.0, resume: bool = True, in_memory: bool = True, evaluate: bool = True,
                    baseline_max: int = 200, n_jobs: int = 2, progress: bool = True) -> dict:
    """Train the bulge/disk U-Net on ``data`` and score it and the imfit baseline on the test split.

    Parameters
    ----------
    data : path
        A simulated dataset with components (``deepmorph simulate --components``).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`.
    split : Split, optional
        Train/val/test split (default 80/10/10, seed 0).
    flux_weight : float
        Weight of the component-flux and B/T terms in the loss (:class:`~deepmorph.tasks.DecomposeTask`).
    evaluate : bool
        Score both methods on the test split (:func:`evaluate_decompose`).
    baseline_max : int
        The imfit fits run on at most this many test galaxies (the brightest-first subset is not
        used: the first ``baseline_max`` test galaxies with mag < 22, then fainter ones).
    n_jobs : int
        Processes for the imfit fits.

    Returns
    -------
    dict
        :func:`evaluate_decompose`'s metrics (when ``evaluate``) plus ``train_size``,
        ``epochs_run``, ``train_seconds``.
    """
    from deepmorph.data import StampDataset, open_dataset
    from deepmorph.tasks import DecomposeTask
    from deepmorph.training import build_model

    data, out = Path(data), Path(out)
    config = config or default_config()
    split = split or Split()
    require_arrays(data, COMPONENTS, "to train a decomposition (simulate with --components)")
    with open_dataset(data) as ds:
        n, channels = len(ds), int(ds.images.shape[1])
    parts = split.indices(n)
    config = config.with_overrides({"normalization": {"kind": "none"}})
    sets = {k: StampDataset(data, parts[k], target=None, masks=COMPONENTS, in_memory=in_memory)
            for k in ("train", "val")}
    model = build_model(config, in_channels=channels, num_outputs=len(COMPONENTS))
    if not getattr(model, "dense_output", False):
        raise DeepmorphValueError(f"model {config.model.name!r} does not output images; use 'unet'")
    task = DecomposeTask(model, config, COMPONENTS, flux_weight, augmentation=training_augmentation(config))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "decompose", "method": "unet", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "in_channels": channels,
        "components": list(COMPONENTS), "multiple": int(getattr(model, "multiple", 1)), "flux_weight": flux_weight,
    })
    history, seconds = train_task(task, sets, config, out, resume, val_batch_size=128)
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds}
    if evaluate:
        result.update(evaluate_decompose(out, data, parts["test"], baseline_max=baseline_max, n_jobs=n_jobs,
                                         progress=progress))
    return result


def load_decomposer(run: str | Path):
    """The trained network of a decomposition run, wrapped to take and return counts, and its ``run.json``."""
    from deepmorph.tasks import Decomposer

    meta = read_run(run, "decompose")
    return Decomposer(load_network(run, meta["in_channels"], len(meta["components"]))).eval(), meta


@torch.no_grad()
def decompose_images(decomposer: torch.nn.Module, images: np.ndarray, batch_size: int = 128,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Component images ``(N, K, H, W)`` (counts) of stamps ``(N, C, H, W)`` (counts), in batches."""
    decomposer = decomposer.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32)).to(device)
        out.append(decomposer(x).float().cpu().numpy())
    if not out:
        return np.zeros((0, 2) + tuple(np.shape(images)[-2:]), dtype=np.float32)
    return np.concatenate(out)


def component_table(components: np.ndarray, ids) -> Table:  # noqa: F821
    """Bulge and disk fluxes (pixel sums, counts) and B/T of predicted component images."""
    from astropy.table import Table

    flux = components.sum(axis=(-2, -1), dtype=np.float64)  # (N, 2)
    pos = np.clip(flux, 0, None)
    total = pos.sum(axis=1)
    bt = np.divide(pos[:, 0], total, out=np.full(len(total), np.nan), where=total > 0)
    return Table({"id": np.asarray(ids), "bulge_flux": flux[:, 0], "disk_flux": flux[:, 1],
                  "flux": flux.sum(axis=1), "bulge_to_total": bt})


def _rms(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x**2))) if x.size else float("nan")


def _scores(bt_err, bulge_err, disk_err, resid_bulge=None, resid_disk=None) -> dict:
    out = {"n": int(np.isfinite(bt_err).sum()), "bt_rmse": _rms(bt_err),
           "bt_bias": float(np.nanmean(bt_err)) if np.isfinite(bt_err).any() else float("nan"),
           "bt_outlier_fraction": float(np.mean(~(np.abs(bt_err) < 0.1))) if len(bt_err) else float("nan"),
           "bulge_flux_rmse": _rms(bulge_err), "disk_flux_rmse": _rms(disk_err)}
    if resid_bulge is not None:
        out["bulge_pixel_rmse_sky"] = _rms(resid_bulge)
        out["disk_pixel_rmse_sky"] = _rms(resid_disk)
    return out


def evaluate_decompose(run: str | Path, data: str | Path, items=None, baseline_max: int = 200, n_jobs: int = 2,
                       progress: bool = True) -> dict:
    """Score the U-Net and the 2-component imfit fit against the truth on the same galaxies.

    Flux errors are relative to each galaxy's true total flux (so a bulge wrongly given 10% of
    the light is an error of 0.1 whatever the galaxy's brightness); pixel residuals are the RMS
    over the stamp of (predicted - true component image) in units of the sky noise. The imfit
    component images are rendered from the fitted parameters with deepmorph's renderer and the
    dataset's PSF. Writes the tables and the figure into the run directory.

    Returns
    -------
    dict
        ``unet`` (on all test galaxies with mag < 22, and ``unet_all`` on all of them) and
        ``imfit`` with ``unet_on_imfit_sample`` (the same galaxies the fit ran on): ``bt_rmse``,
        ``bt_bias``, ``bt_outlier_fraction`` (|error| > 0.1), ``bulge_flux_rmse``,
        ``disk_flux_rmse``, pixel RMS; plus ``seconds_per_galaxy`` of both and their ``speedup``.
    """
    from astropy.table import Table

    from deepmorph.data import open_dataset
    from deepmorph.measure.bulgedisk import fit_bulge_disk

    run, data = Path(run), Path(data)
    decomposer, meta = load_decomposer(run)
    with open_dataset(data) as ds:
        items = np.arange(len(ds)) if items is None else np.sort(np.asarray(items))
        images = ds.images[items]
        truth = {k: ds.array(k)[items] for k in COMPONENTS}
        cat = ds.catalog[items]
        attrs = ds.attrs
    noise = attrs.get("noise") or {}
    sky = float(noise.get("sky_sigma") or 0.0)
    if not sky > 0:  # e.g. real background cutouts: measure it on the stamps
        from deepmorph.data.normalization import sky_sigma

        sky = float(np.median([sky_sigma(im) for im in images[:256]]))
        if not sky > 0:
            raise DeepmorphValueError(f"{data}: no sky noise recorded or measurable (noise-free images?)")
    gain = noise.get("gain_e_per_count")
    start = time.perf_counter()
    pred = decompose_images(decomposer, images)
    unet_seconds = (time.perf_counter() - start) / max(len(items), 1)
    flux = np.asarray(cat["flux"], dtype=float)
    true_bt = np.asarray(cat["bulge_to_total"], dtype=float)
    mag = np.asarray(cat["mag"], dtype=float)
    unet = component_table(pred[:, :2], cat["id"])
    rows = Table({"id": cat["id"], "mag": mag, "bulge_to_total": true_bt, "flux": flux,
                  "bulge_flux": np.asarray(cat["bulge_flux"], float), "disk_flux": np.asarray(cat["disk_flux"], float),
                  "unet_bulge_to_total": unet["bulge_to_total"], "unet_bulge_flux": unet["bulge_flux"],
                  "unet_disk_flux": unet["disk_flux"]})
    resid = {k: np.sqrt(((pred[:, i] - truth[k][:, 0]) ** 2).mean(axis=(-2, -1))) / sky
             for i, k in enumerate(COMPONENTS)}
    rows["unet_bulge_pixel_rmse_sky"], rows["unet_disk_pixel_rmse_sky"] = resid["bulge"], resid["disk"]

    def errors(prefix: str, sel) -> dict:
        r = rows[sel]
        f = np.asarray(r["flux"])
        return _scores(np.asarray(r[f"{prefix}_bulge_to_total"]) - np.asarray(r["bulge_to_total"]),
                       (np.asarray(r[f"{prefix}_bulge_flux"]) - np.asarray(r["bulge_flux"])) / f,
                       (np.asarray(r[f"{prefix}_disk_flux"]) - np.asarray(r["disk_flux"])) / f,
                       r[f"{prefix}_bulge_pixel_rmse_sky"], r[f"{prefix}_disk_pixel_rmse_sky"])

    bright = mag < MAG_LIMIT
    metrics = {"mag_limit": MAG_LIMIT, "n_test": int(len(items)), "n_bright": int(bright.sum()),
               "unet": errors("unet", bright), "unet_all": errors("unet", np.ones(len(rows), bool))}
    metrics["unet"]["seconds_per_galaxy"] = unet_seconds

    # The classical fit, on the bright test galaxies first (the headline sample), then fainter ones.
    order = np.concatenate([np.flatnonzero(bright), np.flatnonzero(~bright)])[:max(int(baseline_max), 0)]
    for col in ("imfit_bulge_to_total", "imfit_bulge_flux", "imfit_disk_flux", "imfit_bulge_pixel_rmse_sky",
                "imfit_disk_pixel_rmse_sky", "imfit_fit_seconds"):
        rows[col] = np.full(len(rows), np.nan)
    rows["imfit_fitted"] = np.zeros(len(rows), bool)
    if len(order):
        psf = dataset_psf(data, 25)
        fits = fit_bulge_disk(images[order], psf, sky, gain=gain, n_jobs=n_jobs, progress=progress)
        model_images = _render_fits(fits, psf_source=data, size=images.shape[-1])
        for col in ("bulge_to_total", "bulge_flux", "disk_flux", "fit_seconds"):
            rows[f"imfit_{col}"][order] = np.asarray(fits[col], dtype=float)
        rows["imfit_fitted"][order] = True
        for i, k in enumerate(COMPONENTS):
            err = np.sqrt(((model_images[:, i] - truth[k][order, 0]) ** 2).mean(axis=(-2, -1))) / sky
            rows[f"imfit_{k}_pixel_rmse_sky"][order] = np.where(np.asarray(fits["converged"], bool), err, np.nan)
        converged = np.zeros(len(rows), bool)
        converged[order] = np.asarray(fits["converged"], bool)
        # Both methods on the same galaxies: bright, fitted, and converged (failures counted apart).
        sample = rows["imfit_fitted"] & bright & converged
        metrics["imfit"] = errors("imfit", sample)
        metrics["imfit"]["n_attempted"] = int((rows["imfit_fitted"] & bright).sum())
        metrics["imfit"]["n_failed"] = int((~np.asarray(fits["converged"], bool)).sum())
        metrics["imfit"]["seconds_per_galaxy"] = float(np.nanmean(fits["fit_seconds"]))
        metrics["unet_on_imfit_sample"] = errors("unet", sample)
        metrics["speedup"] = metrics["imfit"]["seconds_per_galaxy"] / max(unet_seconds, 1e-12)
    save_table(rows, run / "test_predictions.ecsv")
    _binned_tables(rows, run)
    from deepmorph.report.figures import decomposition_figure

    save_figure(decomposition_figure(rows, MAG_LIMIT), run / "decomposition.png")
    write_json(run / "test_metrics.json", metrics)
    return metrics


def _render_fits(fits, psf_source: Path, size: int) -> np.ndarray:
    """Bulge and disk images ``(N, 2, S, S)`` of fitted parameters, rendered with the dataset's PSF."""
    from deepmorph.data import open_dataset
    from deepmorph.simulate.psf import ImagePSF, parse_psf
    from deepmorph.simulate.render import Renderer, Sersic

    with open_dataset(psf_source) as ds:
        attrs, stored = ds.attrs, ds.psf_image
    spec = attrs["psf"]
    psf = ImagePSF(stored, float(spec["pixel_scale_arcsec"])) if stored is not None else parse_psf(spec)
    renderer = Renderer(size, float(attrs["pixel_scale_arcsec"]), psf, "cpu")
    ok = np.asarray(fits["converged"], bool)
    out = np.full((len(fits), 2, size, size), np.nan, dtype=np.float32)
    if not ok.any():
        return out
    c = 0.5 * (size - 1)

    def col(name):
        return torch.as_tensor(np.asarray(fits[name], dtype=np.float64)[ok])

    x, y = col("x_pix") - c, col("y_pix") - c
    n = col("bulge_n").clamp(0.3, 6.2)  # the renderer's range
    pa, bulge_pa = col("pa_deg"), col("bulge_pa_deg")
    scene = {
        "bulge": Sersic(col("bulge_flux"), col("bulge_hlr_pix"), col("bulge_q"), bulge_pa, x, y, n),
        "disk": Sersic(col("disk_flux"), col("disk_hlr_pix"), col("disk_q"), pa, x, y),
    }
    rendered = renderer.render(scene, {"bulge": ("bulge",), "disk": ("disk",)})
    out[ok, 0] = rendered["bulge"].numpy()
    out[ok, 1] = rendered["disk"].numpy()
    return out


def _binned_tables(rows, run: Path) -> None:
    from astropy.table import Table

    for key, col, edges in (("mag", "mag", np.arange(18.0, 24.01, 1.0)),
                            ("bt", "bulge_to_total", np.linspace(0, 1, 6))):
        v = np.asarray(rows[col])
        out = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = (v >= lo) & (v < hi) if hi < edges[-1] else (v >= lo) & (v <= hi)
            rec = {"lo": lo, "hi": hi, "n": int(sel.sum())}
            for m in ("unet", "imfit"):
                err = np.asarray(rows[f"{m}_bulge_to_total"])[sel] - np.asarray(rows["bulge_to_total"])[sel]
                rec[f"{m}_n"] = int(np.isfinite(err).sum())
                rec[f"{m}_bt_rmse"] = _rms(err)
            out.append(rec)
        save_table(Table(rows=out), run / f"bt_by_{key}.ecsv")


# -- prediction on new images ----------------------------------------------------------------------

def predict_decompose(run: str | Path, images, out_dir: str | Path, device: str = "cpu",
                      overwrite: bool = False) -> Table:  # noqa: F821
    """Bulge and disk images (FITS) and a B/T catalogue for stamps in a dataset or FITS cutouts.

    Parameters
    ----------
    run : path
        A decomposition run (:func:`train_decompose`).
    images : path or list of paths
        One ``.h5`` dataset, or FITS cutouts whose sides are multiples of the U-Net's
        ``2 ** depth`` (in the training survey's units and pixel scale).
    out_dir : path
        Receives ``bulge.fits`` and ``disk.fits`` (one plane per stamp, counts) and ``bt.ecsv``.
    overwrite : bool
        Replace those files when they exist (otherwise that is an error, before any work).

    Returns
    -------
    astropy.table.Table
        ``id``, ``bulge_flux``, ``disk_flux``, ``flux`` (pixel sums of the predicted images,
        counts) and ``bulge_to_total``.
    """
    from astropy.io import fits

    from deepmorph.data import check_output

    decomposer, meta = load_decomposer(run)
    out_dir = Path(out_dir)
    for name in (*meta["components"], "bt"):
        check_output(out_dir / (f"{name}.fits" if name != "bt" else "bt.ecsv"), overwrite)
    stamps, ids, paths = read_stamps(images)
    m = meta["multiple"]
    if stamps.shape[1] != meta["in_channels"]:
        raise DeepmorphValueError(f"{paths[0]}: {stamps.shape[1]} band(s), the model takes {meta['in_channels']}")
    if stamps.shape[-1] % m or stamps.shape[-2] % m:
        raise DeepmorphValueError(f"{paths[0]}: stamps of {stamps.shape[-2]}x{stamps.shape[-1]} px; the U-Net needs "
                                  f"sides that are multiples of {m}")
    if not np.isfinite(stamps).all():
        bad = int(np.flatnonzero(~np.isfinite(stamps.reshape(len(stamps), -1)).all(axis=1))[0])
        raise DeepmorphValueError(f"{paths[min(bad, len(paths) - 1)]}: stamp {bad} has NaN/inf pixels")
    pred = decompose_images(decomposer, stamps, device=device)
    table = component_table(pred, ids)
    table.meta.update({"model": str(run)})
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(meta["components"]):
        tmp = out_dir / f"{name}.fits.partial"
        hdu = fits.PrimaryHDU(pred[:, i].astype(np.float32))
        hdu.header["COMPNT"] = (name, "predicted noise-free component image")
        hdu.header["BUNIT"] = ("counts", "same units as the input images")
        try:
            hdu.writeto(tmp, overwrite=True)
        except OSError as exc:
            raise DeepmorphIOError(f"{out_dir}: cannot write {name}.fits ({exc.strerror or exc})") from None
        tmp.replace(out_dir / f"{name}.fits")
    tmp = out_dir / "bt.ecsv.partial"
    table.write(tmp, format="ascii.ecsv", overwrite=True)
    tmp.replace(out_dir / "bt.ecsv")
    return table
