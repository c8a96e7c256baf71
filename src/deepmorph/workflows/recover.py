"""Recovering degraded galaxy images: a U-Net (L1 or pix2pix cGAN) against Richardson-Lucy deconvolution.

Schawinski et al. (2017, MNRAS 467, L110) degraded SDSS galaxy images to worse seeing and more
noise and recovered them with a conditional GAN: 37.2 dB PSNR, against 19.9 dB for blind
deconvolution. Here the pairs are simulated (:mod:`deepmorph.simulate.pairs`: the same galaxy
through the survey's PSF and through a ``psf_factor`` times wider one with ``noise_factor`` times
the sky noise), the networks are trained by :func:`train_recover` and every method is scored on
the same held-out pairs by :func:`evaluate_recovery`:

- **degraded**: the degraded stamp itself (what any method must beat);
- **Richardson-Lucy**: ``skimage.restoration.richardson_lucy`` with the *known* PSF-ratio kernel
  (the Gaussian ``G`` with ``P_degraded = P_original * G``: a non-blind deconvolution to the
  original's resolution, a fairer baseline than the paper's blind one). RL's multiplicative
  updates need positive data: each stamp is padded by reflection (no edge ringing), offset by
  ``offset_nsigma`` (1) degraded sky sigmas and clipped at 1e-3 sky sigma; the offset is removed
  afterwards (a flat background is a fixed point of RL). The number of iterations is the one with
  the best mean PSNR on validation pairs (RL's early stopping is its regularisation);
- **U-Net, L1** and **U-Net cGAN**: the same U-Net (residual, peak-normalised;
  :mod:`deepmorph.tasks.recover`) trained with the L1 loss alone and with pix2pix's
  ``adv + 100 L1`` against a PatchGAN.

**Metrics** (per stamp, then the mean or median over the test pairs):

- ``PSNR = 10 log10(max(original)^2 / MSE)`` in dB, the MSE over the whole stamp in counts, against
  the noisy original (what the paper compares with; its noise is a floor no method can beat) and,
  as ``psnr_clean_db``, against the noise-free original. The paper's images were 8-bit asinh-
  stretched colour images, where faint light weighs more: its dB are not on this scale;
- the half-light radius ``r50`` (circular curve of growth about the adaptive-moment centroid, out to
  half the stamp) and the ellipticity ``e = 1 - b/a`` (adaptive moments, Bernstein & Jarvis 2002,
  GalSim's HSM), measured with the same estimator on each recovered stamp and on the noise-free
  original (the reference: a perfect recovery scores 0): median ``|r50 / r50_ref - 1|`` and
  median ``|e - e_ref|``; the flux (pixel sum) error likewise. Failed measurements are NaN and
  counted (``n_failed``).

A recovery run directory::

    RUN/run.json, config.yaml, model.pt (the generator), history.csv ...
    RUN/evaluation/   evaluate_recovery of the run on its test split (train_recover(evaluate=True))

An evaluation folder: ``recovery.ecsv`` (one row per method), ``recovery_per_image.ecsv``,
``recovery.json`` (the table, RL's iteration search, the definitions) and ``recovery.png``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import (
    load_network,
    read_run,
    read_stamps,
    save_figure,
    save_table,
    train_task,
    training_augmentation,
    write_json,
)

#: The generator: a depth-3 U-Net whose output starts at zero (the residual starts as the identity).
DEFAULT_MODEL = {"name": "unet", "kwargs": {"depth": 3, "width": 32, "zero_init": True}}
#: Run methods by training loss, and their names in tables.
METHODS = {"l1": "unet-l1", "gan": "unet-cgan"}
LABELS = {"unet-l1": "U-Net, L1", "unet-cgan": "U-Net cGAN (pix2pix)", "degraded": "degraded input",
          "richardson-lucy": "Richardson-Lucy", "original": "original (noisy)"}
#: Richardson-Lucy iteration counts tried on the validation pairs.
RL_ITERATIONS = (1, 2, 3, 5, 8, 12, 20, 30, 50)


def default_config(**overrides):
    """The run config both recovery losses start from: the U-Net, Adam 1e-3, batch 32, 10 epochs, flips,
    early stopping on the validation L1 (``val_loss``), no dataset normalisation (the task scales each pair)."""
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": DEFAULT_MODEL, "optimizer": {"name": "adam", "lr": 1e-3}, "batch_size": 32, "epochs": 10,
        "augmentation": "flips", "normalization": {"kind": "none"},
        "early_stopping": {"monitor": "val_loss", "patience": 5},
    })
    return base.with_overrides(overrides) if overrides else base


# -- data ------------------------------------------------------------------------------------------------

def check_pairs(path: str | Path) -> dict:
    """Size, channels, stamp side and noise levels of a pairs file, with one-line errors naming it."""
    from deepmorph.data import open_dataset
    from deepmorph.simulate.pairs import is_pairs_file

    path = Path(path)
    if not is_pairs_file(path):
        with open_dataset(path):  # a missing or broken file: its own error
            pass
        raise DeepmorphIOError(f"{path}: not an image-recovery pairs file (make one with deepmorph simulate-pairs)")
    with open_dataset(path) as ds:
        shape, a = tuple(ds.images.shape), ds.attrs
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise DeepmorphValueError(f"{path}: stamps must be square (N, C, S, S), got {shape}")
    return {"n": shape[0], "channels": shape[1], "stamp_size": shape[-1],
            "sky_sigma_original": float(a["sky_sigma_original"]), "sky_sigma_degraded": float(a["sky_sigma_degraded"]),
            "psf_factor": float(a["psf_factor"]), "noise_factor": float(a["noise_factor"])}


def _check_finite(images: np.ndarray, where, items=None) -> None:
    bad = ~np.isfinite(np.asarray(images).reshape(len(images), -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        label = int(items[first]) if items is not None else first
        raise DeepmorphValueError(f"{where}: {int(bad.sum())} stamp(s) have NaN/inf pixels (first: item {label})")


class PairDataset(torch.utils.data.Dataset):
    """Items of a pairs file, in memory: ``{"image": degraded (C, S, S), "target": original, "index"}`` (counts)."""

    def __init__(self, path: str | Path, indices):
        from deepmorph.simulate.pairs import read_pairs

        self.path = Path(path)
        self.indices = np.asarray(indices, dtype=np.int64)
        data = read_pairs(self.path, self.indices, arrays=("images", "original"))
        for name in ("images", "original"):
            _check_finite(data[name], f"{self.path} ({name})", self.indices)
        self.degraded = torch.from_numpy(np.ascontiguousarray(data["images"]))
        self.original = torch.from_numpy(np.ascontiguousarray(data["original"]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.degraded[i], "target": self.original[i], "index": int(self.indices[i])}

    def __getitems__(self, items: list[int]) -> list[dict]:
        return [self[i] for i in items]


# -- training --------------------------------------------------------------------------------------------

def default_d_layers(stamp_size: int) -> int:
    """PatchGAN depth: the most stride-2 layers (<= 3) whose patches fit in the stamp (1 at 32 px, 2 at 64 px)."""
    from deepmorph.models.patchgan import receptive_field

    return max([n for n in (1, 2, 3) if receptive_field(n) <= stamp_size] or [1])


def train_recover(data: str | Path, out: str | Path, config=None, loss: str = "gan", lambda_l1: float = 100.0,
                  gan_loss: str = "bce", d_steps: int = 1, label_smoothing: float = 0.0, gp_weight: float = 10.0,
                  spectral_norm: bool = False, d_width: int = 64, d_layers: int | None = None,
                  d_norm: str | None = None, d_lr_scale: float = 1.0, split: Split | None = None,
                  resume: bool = True, evaluate: bool = True, max_test: int | None = None) -> dict:
    """Train the recovery U-Net on a pairs file, with the cGAN loss (``loss="gan"``) or L1 alone (``"l1"``).

    Parameters
    ----------
    data : path
        A pairs file (:func:`~deepmorph.simulate.pairs.write_pairs`).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`; ``model`` is the generator (a U-Net).
    loss : {"gan", "l1"}
        pix2pix's ``adv + lambda_l1 * L1`` against a PatchGAN, or L1 alone (the ablation).
    lambda_l1, gan_loss, d_steps, label_smoothing, gp_weight, d_lr_scale
        :class:`~deepmorph.tasks.recover.RecoverTask`'s options (``gan`` only, but ``lambda_l1``).
    spectral_norm, d_width, d_layers, d_norm
        The PatchGAN (:class:`~deepmorph.models.patchgan.PatchDiscriminator`): spectral norm, first
        width, stride-2 layers (default :func:`default_d_layers`), normalisation (default ``none``
        with spectral norm or ``wgan-gp``, else ``batch``).
    split : Split, optional
        Train/val/test split (default 80/10/10, seed 0).
    evaluate : bool
        Score the run against the degraded input and Richardson-Lucy on the test split
        (:func:`evaluate_recovery`, into ``out/evaluation``); ``max_test`` caps the test pairs.

    Returns
    -------
    dict
        ``train_size``, ``epochs_run``, ``train_seconds``, ``val_l1`` and ``val_psnr`` (the last
        epoch's), and with ``evaluate`` the ``table`` rows of :func:`evaluate_recovery`.
    """
    from deepmorph.models.patchgan import PatchDiscriminator
    from deepmorph.tasks.recover import RecoverTask
    from deepmorph.training import build_model

    if loss not in METHODS:
        raise DeepmorphValueError(f"recovery loss must be one of {', '.join(METHODS)}, got {loss!r}")
    data, out = Path(data), Path(out)
    info = check_pairs(data)
    config = (config or default_config()).with_overrides({"normalization": {"kind": "none"}})
    split = split or Split()
    parts = split.indices(info["n"])
    if not len(parts["train"]) or not len(parts["val"]):
        raise DeepmorphValueError(f"{data}: {info['n']} pairs leave no training or validation pairs with fractions "
                                  f"{tuple(split.fractions)}")
    c = info["channels"]
    model = build_model(config, in_channels=c, num_outputs=c)
    if not getattr(model, "dense_output", False):
        raise DeepmorphValueError(f"model {config.model.name!r} does not output images; use 'unet'")
    multiple = int(getattr(model, "multiple", 1))
    if info["stamp_size"] % multiple:
        raise DeepmorphValueError(f"{data}: stamps of {info['stamp_size']} px; the U-Net needs sides that are "
                                  f"multiples of {multiple}")
    d_kwargs = None
    discriminator = None
    if loss == "gan":
        d_kwargs = {"in_channels": 2 * c, "width": int(d_width),
                    "n_layers": int(d_layers or default_d_layers(info["stamp_size"])),
                    "norm": d_norm or ("none" if spectral_norm or gan_loss == "wgan-gp" else "batch"),
                    "spectral_norm": bool(spectral_norm)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.seed) + 1)
            discriminator = PatchDiscriminator(**d_kwargs)
    task = RecoverTask(model, config, discriminator, lambda_l1=lambda_l1, gan_loss=gan_loss, d_steps=d_steps,
                       label_smoothing=label_smoothing, gp_weight=gp_weight, d_lr_scale=d_lr_scale,
                       augmentation=training_augmentation(config))
    sets = {k: PairDataset(data, parts[k]) for k in ("train", "val")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "recover", "method": METHODS[loss], "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "in_channels": c,
        "stamp_size": info["stamp_size"], "multiple": multiple, "residual": True, "loss": loss,
        "lambda_l1": float(lambda_l1), "gan_loss": gan_loss if loss == "gan" else None, "discriminator": d_kwargs,
        **{k: info[k] for k in ("sky_sigma_original", "sky_sigma_degraded", "psf_factor", "noise_factor")},
    })
    history, seconds = train_task(task, sets, config, out, resume, val_batch_size=128)
    h = history.history
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds,
              "val_l1": h.get("val_l1", [float("nan")])[-1], "val_psnr": h.get("val_psnr", [float("nan")])[-1]}
    if evaluate:
        table = evaluate_recovery([out], data, out / "evaluation", max_test=max_test)
        result["table"] = [dict(zip(table.colnames, map(_plain, row), strict=True)) for row in table]
    return result


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def load_recoverer(run: str | Path):
    """The trained generator of a recovery run wrapped to take and return counts (eval, CPU), and its ``run.json``."""
    from deepmorph.tasks.recover import Recoverer

    meta = read_run(run, "recover", tuple(METHODS.values()), what="image-recovery")
    network = load_network(run, meta["in_channels"], meta["in_channels"])
    return Recoverer(network, meta.get("residual", True)).eval(), meta


def _as_stack(images, channels: int, multiple: int, where) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise DeepmorphValueError(f"{where}: expected (N, {channels}, H, W) stamps, got shape {np.shape(images)}")
    if x.shape[-1] % multiple or x.shape[-2] % multiple or min(x.shape[-2:]) < multiple:
        raise DeepmorphValueError(f"{where}: stamps of {x.shape[-2]}x{x.shape[-1]} px; the U-Net needs sides that "
                                  f"are multiples of {multiple}")
    _check_finite(x, where)
    return x


@torch.no_grad()
def recover(run, images, batch_size: int = 128, device: str | torch.device = "cpu") -> np.ndarray:
    """Recovered stamps ``(N, C, H, W)`` (counts) of degraded stamps ``(N, [C,] H, W)`` (counts).

    ``run`` is a recovery run directory or a loaded :class:`~deepmorph.tasks.recover.Recoverer`.
    """
    if isinstance(run, (str, Path)):
        model, meta = load_recoverer(run)
        channels, multiple = meta["in_channels"], meta["multiple"]
    else:
        model = run
        channels, multiple = int(model.generator.in_channels), int(getattr(model.generator, "multiple", 1))
    x = _as_stack(images, channels, multiple, "recover")
    model = model.to(device).eval()
    out = [model(torch.from_numpy(x[i:i + batch_size]).to(device)).float().cpu().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros_like(x)


# -- the classical baseline ------------------------------------------------------------------------------

def richardson_lucy_recover(images, kernel: np.ndarray, num_iter: int, sky_sigma: float,
                            offset_nsigma: float = 1.0) -> np.ndarray:
    """Richardson-Lucy deconvolution of stamps ``(N, [1,] H, W)`` (counts) by ``kernel``, ``num_iter`` iterations.

    The stamps are padded by reflection (by the kernel's size), offset by ``offset_nsigma *
    sky_sigma`` and clipped at ``1e-3 sky_sigma`` (RL needs positive data), deconvolved all at once
    (``skimage.restoration.richardson_lucy`` on the stack with a ``(1, K, K)`` kernel: a 2-D
    deconvolution of each stamp), then cropped and the offset removed. Returns ``(N, 1, H, W)``.
    """
    from skimage.restoration import richardson_lucy

    x = np.asarray(images, dtype=np.float64)
    x = x[:, 0] if x.ndim == 4 else x
    if x.ndim != 3:
        raise DeepmorphValueError(f"richardson_lucy_recover expects (N, H, W) stamps, got shape {np.shape(images)}")
    if int(num_iter) != num_iter or num_iter < 1:
        raise DeepmorphValueError(f"Richardson-Lucy needs a positive number of iterations, got {num_iter}")
    if not sky_sigma > 0:
        raise DeepmorphValueError(f"sky sigma must be positive, got {sky_sigma}")
    kernel = np.asarray(kernel, dtype=np.float64)
    kernel = kernel / kernel.sum()
    pad = kernel.shape[-1]
    offset = float(offset_nsigma) * float(sky_sigma)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect") + offset
    padded = np.clip(padded, 1e-3 * sky_sigma, None)
    u = richardson_lucy(padded, kernel[None], num_iter=int(num_iter), clip=False)
    return (u[:, pad:-pad, pad:-pad] - offset)[:, None].astype(np.float32)


def choose_rl_iterations(degraded, original, kernel: np.ndarray, sky_sigma: float,
                         grid=RL_ITERATIONS, offset_nsigma: float = 1.0) -> tuple[int, list[dict]]:
    """The iteration count of ``grid`` with the best mean PSNR of RL-deconvolved ``degraded`` against ``original``.

    Returns
    -------
    int, list of dict
        The best count and, per count, ``{"iterations", "psnr_db"}``.
    """
    rows = []
    for k in grid:
        rec = richardson_lucy_recover(degraded, kernel, k, sky_sigma, offset_nsigma)
        rows.append({"iterations": int(k), "psnr_db": float(np.mean(psnr_db(rec, original)))})
    best = max(rows, key=lambda r: r["psnr_db"] if math.isfinite(r["psnr_db"]) else -math.inf)
    return best["iterations"], rows


# -- metrics ---------------------------------------------------------------------------------------------

def psnr_db(recovered, original) -> np.ndarray:
    """PSNR of each stamp, dB: ``10 log10(max(original)^2 / mean((recovered - original)^2))`` (see the module)."""
    r = np.asarray(recovered, dtype=np.float64).reshape(len(recovered), -1)
    o = np.asarray(original, dtype=np.float64).reshape(len(original), -1)
    if r.shape != o.shape:
        raise DeepmorphValueError(f"psnr: recovered {np.shape(recovered)} and original {np.shape(original)} differ")
    mse = np.mean((r - o) ** 2, axis=1)
    peak = o.max(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(np.where(peak > 0, peak, np.nan) ** 2 / mse)


def measure_shapes(images) -> dict[str, np.ndarray]:
    """Half-light radius, ellipticity and flux of each stamp ``(N, [1,] H, W)`` (counts), one estimator for all.

    - ``ellipticity`` ``1 - b/a`` and the centre from adaptive (elliptical Gaussian-weighted) moments
      (``galsim.hsm.FindAdaptiveMom``; Bernstein & Jarvis 2002), robust to noise;
    - ``r50_pix``: radius of the circle about that centre holding half the light within ``S/2``;
    - ``flux``: the pixel sum.

    Returns
    -------
    dict
        ``r50_pix``, ``ellipticity``, ``flux``, ``sigma_pix`` (adaptive-moment size) and ``ok``
        (False where the moments failed: the other values are NaN there, the flux is kept).
    """
    import galsim

    x = np.asarray(images, dtype=np.float64)
    x = x[:, 0] if x.ndim == 4 else x
    n, h, w = x.shape
    out = {k: np.full(n, np.nan) for k in ("r50_pix", "ellipticity", "sigma_pix")}
    cx, cy = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        try:
            res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(x[i])), strict=False)
        except (galsim.GalSimError, RuntimeError, ValueError):
            continue
        if res.moments_status != 0 or not res.moments_sigma > 0:
            continue
        g = res.observed_shape.g
        out["ellipticity"][i] = 1.0 - (1.0 - g) / (1.0 + g)
        out["sigma_pix"][i] = res.moments_sigma
        cx[i], cy[i] = res.moments_centroid.x - 1.0, res.moments_centroid.y - 1.0  # GalSim's pixels start at 1
    ok = np.isfinite(cx)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for i in np.flatnonzero(ok):
        r = np.hypot(xx - cx[i], yy - cy[i]).ravel()
        order = np.argsort(r)
        rs, cum = r[order], np.cumsum(x[i].ravel()[order])
        inside = rs <= 0.5 * min(h, w)
        total = cum[inside][-1] if inside.any() else 0.0
        if total > 0:
            out["r50_pix"][i] = rs[np.argmax(cum >= 0.5 * total)]
    out["flux"] = x.sum(axis=(1, 2))
    out["ok"] = ok & np.isfinite(out["r50_pix"])
    return out


def _median_abs(x) -> float:
    x = np.abs(np.asarray(x, dtype=float))
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def recovery_scores(recovered, original, original_noiseless, reference: dict | None = None) -> tuple[dict, dict]:
    """Per-stamp and summary scores of recovered stamps against the originals (see the module docstring).

    Returns
    -------
    dict, dict
        Per stamp: ``psnr_db``, ``psnr_clean_db``, ``r50_pix``, ``ellipticity``, ``flux`` and their errors;
        summary: ``n``, ``psnr_db`` (mean), ``psnr_median_db``, ``psnr_clean_db``, ``hlr_rel_err``,
        ``hlr_bias``, ``e_abs_err``, ``flux_rel_err``, ``n_failed``.
    """
    ref = reference if reference is not None else measure_shapes(original_noiseless)
    shapes = measure_shapes(recovered)
    per = {"psnr_db": psnr_db(recovered, original), "psnr_clean_db": psnr_db(recovered, original_noiseless),
           "r50_pix": shapes["r50_pix"], "ellipticity": shapes["ellipticity"], "flux": shapes["flux"]}
    per["hlr_rel_err"] = per["r50_pix"] / ref["r50_pix"] - 1.0
    per["e_err"] = per["ellipticity"] - ref["ellipticity"]
    per["flux_rel_err"] = per["flux"] / ref["flux"] - 1.0
    psnr = per["psnr_db"][np.isfinite(per["psnr_db"])]
    summary = {"n": int(len(per["psnr_db"])),
               "psnr_db": float(np.mean(psnr)) if psnr.size else float("nan"),
               "psnr_median_db": float(np.median(psnr)) if psnr.size else float("nan"),
               "psnr_clean_db": float(np.nanmean(per["psnr_clean_db"])),
               "hlr_rel_err": _median_abs(per["hlr_rel_err"]),
               "hlr_bias": float(np.nanmedian(per["hlr_rel_err"])) if np.isfinite(per["hlr_rel_err"]).any()
               else float("nan"),
               "e_abs_err": _median_abs(per["e_err"]), "flux_rel_err": _median_abs(per["flux_rel_err"]),
               "n_failed": int((~shapes["ok"]).sum())}
    return per, summary


# -- evaluation ------------------------------------------------------------------------------------------

def _default_items(runs: list[Path], data: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Test and validation items: the first run's split when it was trained on ``data``, else an 80/10/10 split."""
    split = Split()
    if runs:
        meta = read_run(runs[0], "recover", tuple(METHODS.values()), what="image-recovery")
        if Path(meta["data"]).resolve() == data.resolve():
            split = Split(meta["split_seed"], tuple(meta["fractions"]))
    parts = split.indices(n)
    return parts["test"], parts["val"]


def evaluate_recovery(runs, data: str | Path, out: str | Path, items=None, val_items=None,
                      rl_iterations: int | None = None, max_test: int | None = None, n_val_rl: int = 64,
                      offset_nsigma: float = 1.0, n_figure: int = 6, seed: int = 0):
    """Score the degraded input, Richardson-Lucy and each recovery run on the same held-out pairs.

    Parameters
    ----------
    runs : sequence of paths
        Recovery runs (:func:`train_recover`), e.g. an L1 and a cGAN run; may be empty.
    data : path
        A pairs file.
    out : path
        Output folder (files in the module docstring).
    items, val_items : arrays of int, optional
        Test pairs and the validation pairs that choose RL's iterations (default: the first run's
        test and validation splits when it was trained on ``data``, else those of an 80/10/10 split).
    rl_iterations : int, optional
        Fix RL's iterations instead of choosing them on ``n_val_rl`` validation pairs.
    max_test : int, optional
        Score at most this many test pairs (a random subset drawn with ``seed``).
    offset_nsigma : float
        RL's offset, in degraded sky sigmas.
    n_figure : int
        Galaxies in the figure.

    Returns
    -------
    astropy.table.Table
        One row per method: ``method``, ``label``, ``n``, ``psnr_db``, ``psnr_median_db``,
        ``psnr_clean_db``, ``hlr_rel_err``, ``hlr_bias``, ``e_abs_err``, ``flux_rel_err``,
        ``n_failed``, ``ms_per_image``; the last row is the noisy original (the noise floor of the
        measurements; its PSNR against itself is undefined, NaN).
    """
    from astropy.table import Table

    from deepmorph.simulate.pairs import read_pairs

    data, out = Path(data), Path(out)
    runs = [Path(r) for r in (runs or [])]
    info = check_pairs(data)
    models = [load_recoverer(r) for r in runs]
    for (_, meta), run in zip(models, runs, strict=True):
        if meta["in_channels"] != info["channels"] or info["stamp_size"] % meta["multiple"]:
            raise DeepmorphValueError(f"{run}: its U-Net takes {meta['in_channels']} band(s) and sides that are "
                                      f"multiples of {meta['multiple']}; {data} has {info['channels']} and "
                                      f"{info['stamp_size']} px")
    test, val = _default_items(runs, data, info["n"])
    test = np.asarray(items if items is not None else test, dtype=np.int64)
    val = np.asarray(val_items if val_items is not None else val, dtype=np.int64)
    if max_test is not None and len(test) > max_test:
        test = np.sort(np.random.default_rng(seed).choice(test, size=int(max_test), replace=False))
    if not len(test):
        raise DeepmorphValueError(f"{data}: no test pairs to score")
    pairs = read_pairs(data, test)
    for name in ("images", "original", "original_noiseless"):
        _check_finite(pairs[name], f"{data} ({name})", test)
    degraded, original, clean = pairs["images"], pairs["original"], pairs["original_noiseless"]
    kernel, sky_d = pairs["rl_kernel"], float(pairs["attrs"]["sky_sigma_degraded"])
    search = []
    if rl_iterations is None:
        if not len(val):
            raise DeepmorphValueError(f"{data}: no validation pairs to choose Richardson-Lucy's iterations; pass "
                                      "rl_iterations")
        pick = val if len(val) <= n_val_rl else np.sort(np.random.default_rng(seed).choice(val, n_val_rl, False))
        v = read_pairs(data, pick, arrays=("images", "original"))
        rl_iterations, search = choose_rl_iterations(v["images"], v["original"], kernel, sky_d,
                                                     offset_nsigma=offset_nsigma)
    outputs, seconds = {"degraded": degraded}, {"degraded": 0.0}
    start = time.perf_counter()
    outputs["richardson-lucy"] = richardson_lucy_recover(degraded, kernel, rl_iterations, sky_d, offset_nsigma)
    seconds["richardson-lucy"] = time.perf_counter() - start
    names = []
    for (model, meta), run in zip(models, runs, strict=True):
        name = meta["method"] if meta["method"] not in outputs else f"{meta['method']} ({run.name})"
        recover(model, degraded[:2])  # warm-up: the first call's set-up is not the network's speed
        start = time.perf_counter()
        outputs[name] = recover(model, degraded)
        seconds[name] = time.perf_counter() - start
        names.append(name)
    reference = measure_shapes(clean)
    rows, per_image = [], {"id": np.asarray(pairs["catalog"]["id"]), "mag": np.asarray(pairs["catalog"]["mag"]),
                           "r50_ref_pix": reference["r50_pix"], "e_ref": reference["ellipticity"]}
    for name, rec in [*outputs.items(), ("original", original)]:
        per, summary = recovery_scores(rec, original, clean, reference)
        if name == "original":
            summary.update(psnr_db=float("nan"), psnr_median_db=float("nan"))
        base = name.split(" (")[0]
        rows.append({"method": name, "label": LABELS.get(base, base), **summary,
                     "ms_per_image": 1e3 * seconds.get(name, 0.0) / len(test)})
        key = name.replace(" ", "_")
        for col in ("psnr_db", "hlr_rel_err", "e_err", "flux_rel_err"):
            per_image[f"{key}_{col}"] = per[col]
    table = Table(rows=rows)
    for col, unit in (("psnr_db", "dB"), ("psnr_median_db", "dB"), ("psnr_clean_db", "dB"), ("ms_per_image", "ms")):
        table[col].unit = unit
    table.meta.update({"data": str(data), "n_test": int(len(test)), "rl_iterations": int(rl_iterations),
                       "rl_offset_nsigma": float(offset_nsigma), "psf_factor": info["psf_factor"],
                       "noise_factor": info["noise_factor"]})
    out.mkdir(parents=True, exist_ok=True)
    save_table(table, out / "recovery.ecsv")
    save_table(Table(per_image), out / "recovery_per_image.ecsv")
    write_json(out / "recovery.json", {
        "data": str(data), "runs": [str(r) for r in runs], "n_test": int(len(test)),
        "rl_iterations": int(rl_iterations), "rl_search": search, "rl_offset_nsigma": float(offset_nsigma),
        "psf_factor": info["psf_factor"], "noise_factor": info["noise_factor"],
        "table": [{k: _json_number(_plain(row[k])) for k in table.colnames} for row in table],
        "definitions": {
            "psnr_db": "mean over stamps of 10 log10(max(original)^2 / mean((recovered - original)^2)), noisy original",
            "psnr_clean_db": "the same against the noise-free original",
            "hlr_rel_err": "median |r50 / r50(noise-free original) - 1|, r50 the circular half-light radius",
            "e_abs_err": "median |e - e(noise-free original)|, e = 1 - b/a from adaptive moments",
            "flux_rel_err": "median |flux / flux(noise-free original) - 1|, flux the pixel sum"},
    })
    if n_figure > 0:
        import matplotlib.pyplot as plt

        show = {k: outputs[k] for k in ["degraded", "richardson-lucy", *names]}
        fig = recovery_figure(show, original, float(pairs["attrs"]["sky_sigma_original"]), n=n_figure, truth=clean)
        save_figure(fig, out / "recovery.png")
        plt.close(fig)
    return table


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def recovery_figure(outputs: dict, original: np.ndarray, sky_sigma: float, n: int = 6, residual_nsigma: float = 5.0,
                    truth: np.ndarray | None = None):
    """Rows of stamps: each method's output (the degraded input first), the original, then each method's
    residual against ``truth`` (default the original; the evaluation passes the noise-free original) in sky
    sigmas; one column per galaxy (the first ``n``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(int(n), len(original))
    methods = list(outputs)
    rows = [(LABELS.get(m.split(" (")[0], m), outputs[m], False) for m in methods] + [("original", original, False)]
    reference, name = (original, "original") if truth is None else (truth, "truth")
    rows += [(f"{LABELS.get(m.split(' (')[0], m)} - {name}", outputs[m] - reference, True)
             for m in methods if m != "degraded"]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.7 * n + 1.8, 1.7 * len(rows)), squeeze=False)
    for j in range(n):
        top = np.arcsinh(original[j, 0] / sky_sigma).max()
        for i, (label, stack, residual) in enumerate(rows):
            ax = axes[i, j]
            if residual:
                ax.imshow(stack[j, 0] / sky_sigma, cmap="RdBu_r", origin="lower", vmin=-residual_nsigma,
                          vmax=residual_nsigma)
            else:
                ax.imshow(np.arcsinh(stack[j, 0] / sky_sigma), cmap="gray", origin="lower", vmin=-1.0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    what = "the original" if truth is None else "the noise-free original (truth)"
    fig.suptitle(f"asinh(counts / sky sigma); residuals against {what} in sky sigmas (+-{residual_nsigma:g})",
                 fontsize=8)
    fig.tight_layout()
    return fig


# -- prediction on new images ----------------------------------------------------------------------------

def predict_recover(run: str | Path, images, out: str | Path, overwrite: bool = False,
                    device: str = "cpu") -> np.ndarray:
    """Recover degraded stamps from FITS cutouts (one size) or a dataset file into one FITS cube ``(N, H, W)``.

    The cutouts must be in the training data's counts, pixel scale and degraded PSF.
    """
    from astropy.io import fits

    from deepmorph.data import check_output

    out = check_output(out, overwrite)
    model, meta = load_recoverer(run)
    stamps, _, paths = read_stamps(images)
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)"
    stamps = _as_stack(stamps, meta["in_channels"], meta["multiple"], where)
    recovered = recover(model, stamps, device=device)
    hdu = fits.PrimaryHDU(recovered[:, 0].astype(np.float32))
    hdu.header["BUNIT"] = ("counts", "same units as the input stamps")
    hdu.header["RECOVER"] = (str(meta["method"]), "deepmorph image-recovery method")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        hdu.writeto(tmp, overwrite=True)
        tmp.replace(out)
    except OSError as exc:
        raise DeepmorphIOError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return recovered


__all__ = ["DEFAULT_MODEL", "LABELS", "METHODS", "PairDataset", "RL_ITERATIONS", "check_pairs",
           "choose_rl_iterations", "default_config", "default_d_layers", "evaluate_recovery", "load_recoverer",
           "measure_shapes", "predict_recover", "psnr_db", "recover", "recovery_figure", "recovery_scores",
           "richardson_lucy_recover", "train_recover"]
