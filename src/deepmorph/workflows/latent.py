"""Autoencoders and VAEs of galaxy stamps, and what their latent space knows about galaxies.

:func:`train_autoencoder` trains a convolutional autoencoder or (beta-)VAE
(:class:`~deepmorph.models.ConvVAE`, :class:`~deepmorph.tasks.autoencode.AutoencodeTask`) on a
dataset's training split, with the normalisation fitted on it, and by default scores its latent
space on the held-out test split. The latent-space tools take a run and images:

- :func:`encode` / :func:`decode`: images (counts) -> posterior means; codes -> images;
  :func:`pose_angles`: the orientation a pose-normalised run (``align=True``) removes;
- :func:`latent_maps`: the 2-D latent (or the plane of its first two principal components)
  coloured by each catalogue parameter: the morphological distribution at a glance;
- :func:`decoded_grid`: decoded images over that plane; :func:`interpolate`: decoded images along
  the straight line between two galaxies' codes;
- :func:`latent_correlations`: which latent directions carry which parameter: per parameter the
  best |Spearman rho| with one latent dimension, a linear probe (R^2 and Spearman rho of its
  held-out predictions: the best latent *direction*), a k-nearest-neighbour probe (R^2: any
  function of the code) and the mutual information with the most informative dimension;
- :func:`compare_populations`: two datasets encoded into the same latent space, shown in one
  plane, with two-sample distances (energy distance, RBF-kernel MMD with a permutation p-value,
  and the AUC of a classifier told to separate them);
- :func:`evaluate_latent`: all of the above for one run, written into the run directory.

The catalogue parameters (:data:`PARAMETERS`) of a bulge + disk galaxy: ``mag`` (total AB
magnitude), ``hlr`` (the whole galaxy's half-light radius, arcsec, :func:`composite_hlr`),
``q`` (the light-weighted axis ratio ``B/T q_bulge + (1 - B/T) q_disk``), ``bt`` (B/T), ``n``
(the bulge's Sersic index, for bulge-dominated galaxies, B/T >= 0.5, only) and ``pa`` (degrees,
for elongated galaxies, q < 0.8, only: a round galaxy has none). Probes use ``log10 hlr`` and
``(cos 2 PA, sin 2 PA)``, and also the shape components ``e1, e2 = (1 - q) / (1 + q) (cos 2PA, sin 2PA)``
(:data:`SHAPE`): a code that holds a galaxy's shape holds this 2-vector, of which ``q`` is a
non-linear function (its length), so ``q`` itself shows in the k-nearest-neighbour probe rather than
in a linear one.

Pose normalisation (``train_autoencoder(..., align=True)``, ``deepmorph train vae --align``): the
network rotates each stamp so that its major axis (adaptive second moments,
:func:`deepmorph.models.vae.pose_angle`) lies along +x before encoding, and reconstructs the aligned
stamp. The latent space then describes a galaxy's shape, not its orientation: ``q`` becomes a
(nearly) linear function of the code, while ``pa`` and ``e1, e2`` are no longer in it (their rows in
the correlation table say so); the removed angle is :func:`pose_angles` (degrees, the catalogue's
convention), written as the ``pose_pa_deg`` column of ``latent_maps.ecsv``. ``encode`` and every
latent tool apply the alignment themselves (it is part of the network, recorded in ``config.yaml``
and ``run.json``).

A run directory::

    RUN/run.json, config.yaml, model.pt ...   the training run (task "vae" or "ae")
    RUN/latent_correlations.ecsv              the correlation / probe table of the test split
    RUN/latent_maps.png, latent_maps.ecsv     the latent plane coloured by each parameter
    RUN/decoded_grid.png                      decoded images over that plane
    RUN/interpolation.png                     decoded paths between pairs of test galaxies
    RUN/reconstructions.png                   test galaxies and their reconstructions
    RUN/latent_metrics.json                   the table as JSON, the plane, the reconstruction error
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from deepmorph.data.store import dataset_exists
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import (
    fitted_normalization,
    load_network,
    read_run,
    save_figure,
    save_table,
    train_task,
    training_augmentation,
    write_json,
)

KINDS = ("vae", "ae")

#: Parameter -> (label, unit) of the catalogue parameters the latent tools know.
PARAMETERS = {
    "mag": ("magnitude", "mag"),
    "hlr": ("half-light radius", "arcsec"),
    "q": ("axis ratio q", ""),
    "bt": ("B/T", ""),
    "n": ("bulge Sersic n (B/T >= 0.5)", ""),
    "pa": ("position angle (q < 0.8)", "deg"),
}
#: Shape components probed besides :data:`PARAMETERS` (not mapped): ``e = (1 - q) / (1 + q)`` times
#: ``cos 2PA`` and ``sin 2PA``. An image's shape is a 2-vector; ``q`` is its length, which no linear
#: function of a code that holds the vector can give.
SHAPE = ("e1", "e2")


# -- training ----------------------------------------------------------------------------------------

def default_config(kind: str = "vae", **overrides):
    """The run config autoencoders start from: 4 stride-2 stages, a 16-D code, Adam, cosine decay, flips."""
    from deepmorph.training import RunConfig

    _check_kind(kind)
    base = RunConfig().with_overrides({
        "model": {"name": kind, "kwargs": {"latent_dim": 16, "widths": [32, 64, 128, 256]}},
        "augmentation": "flips", "epochs": 30, "batch_size": 64, "optimizer": {"lr": 1e-3},
        "schedule": {"kind": "cosine"}, "early_stopping": {"monitor": "val_loss", "patience": 8},
    })
    return base.with_overrides(overrides) if overrides else base


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DeepmorphValueError(f"autoencoder kind must be one of {', '.join(KINDS)}, got {kind!r}")


def train_autoencoder(data: str | Path, out: str | Path, config=None, kind: str = "vae", split: Split | None = None,
                      likelihood: str = "gaussian", beta: float = 1.0, kl_warmup: float = 5.0,
                      scale: float | None = None, resume: bool = True, in_memory: bool = True,
                      evaluate: bool = True, align: bool | None = None) -> dict:
    """Train a convolutional VAE (``kind="vae"``) or autoencoder (``"ae"``) on a dataset's images.

    Parameters
    ----------
    data : path
        A dataset file (simulated, or real cutouts imported with ``deepmorph import``).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`; ``model.name`` must be ``kind``; ``model.kwargs.image_size``
        is set to the data's stamp size.
    split : Split, optional
        Train/val/test split (default 80/10/10, seed 0); the normalisation is fitted on train.
    likelihood : {"gaussian", "laplace"}
        Per-pixel likelihood of the normalised image.
    beta : float
        Weight of the KL term (VAE only).
    kl_warmup : float
        Epochs of linear KL warm-up (VAE only; 0: none).
    scale : float, optional
        Fixed likelihood scale, normalised units (default learned).
    evaluate : bool
        Score the latent space on the test split (:func:`evaluate_latent`, files into ``out``).
    align : bool, optional
        Pose normalisation: rotate every stamp so that its major axis lies along +x before
        encoding (the model's ``align``; default: the config's ``model.kwargs.align``, else False).
        The code then holds shape but not orientation (:func:`pose_angles` gives the angle).

    Returns
    -------
    dict
        ``train_size``, ``epochs_run``, ``train_seconds``, ``likelihood_scale``; with ``evaluate``,
        :func:`evaluate_latent`'s results.
    """
    from deepmorph.data import StampDataset, open_dataset
    from deepmorph.tasks.autoencode import AutoencodeTask
    from deepmorph.training import build_model

    _check_kind(kind)
    data, out = Path(data), Path(out)
    config = config or default_config(kind)
    if config.model.name != kind:
        raise DeepmorphValueError(f"train {kind}: the config's model is {config.model.name!r}, not {kind!r}")
    split = split or Split()
    with open_dataset(data) as ds:
        n, channels, stamp = len(ds), int(ds.images.shape[1]), int(ds.images.shape[-1])
        attrs = ds.attrs
        if int(ds.images.shape[-2]) != stamp:
            raise DeepmorphValueError(f"{data}: stamps must be square, got {tuple(ds.images.shape[-2:])}")
    config = config.with_overrides({"model.kwargs.image_size": stamp})
    if align is not None:
        config = config.with_overrides({"model.kwargs.align": bool(align)})
    align = bool(config.model.kwargs.get("align", False))
    parts = split.indices(n)
    norm, config = fitted_normalization(config, data, parts["train"])
    sets = {k: StampDataset(data, idx, target=None, normalization=norm, in_memory=in_memory)
            for k, idx in parts.items() if k != "test"}
    model = build_model(config, in_channels=channels, num_outputs=channels)
    variational = kind == "vae"
    task = AutoencodeTask(model, config, likelihood=likelihood, beta=beta if variational else 0.0,
                          kl_warmup=kl_warmup if variational else 0.0, scale=scale,
                          augmentation=training_augmentation(config))
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": kind, "method": kind, "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "normalization": norm.to_dict(),
        "in_channels": channels, "stamp_size": stamp, "latent_dim": int(model.latent_dim),
        "likelihood": likelihood, "beta": float(beta) if variational else 0.0,
        "kl_warmup": float(kl_warmup) if variational else 0.0, "scale": scale, "align": align,
        "survey": str(attrs.get("survey", "")),
        "pixel_scale_arcsec": float(attrs.get("pixel_scale_arcsec", float("nan"))),
        "zeropoint_mag": float(attrs.get("zeropoint_mag", float("nan"))),
    }
    write_json(out / "run.json", meta)
    history, seconds = train_task(task, sets, config, out, resume)
    scale_fit = torch.exp(task.current_log_scale().detach()).tolist()
    write_json(out / "run.json", {**meta, "likelihood_scale": scale_fit})
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds,
              "likelihood_scale": scale_fit}
    if evaluate:
        result.update(evaluate_latent(out, data, parts["test"]))
    return result


# -- loading, encoding, decoding -------------------------------------------------------------------

def read_latent_run(run: str | Path) -> dict:
    """The ``run.json`` of an autoencoder or VAE run (a one-line error naming the directory otherwise)."""
    run = Path(run)
    task = "vae"
    try:
        found = json.loads((run / "run.json").read_text()).get("task")
        task = found if found in KINDS else task
    except (OSError, ValueError, AttributeError):
        pass  # read_run says what is wrong
    return read_run(run, task, what="VAE or autoencoder")


def load_autoencoder(run: str | Path):
    """The trained network of an autoencoder/VAE run (eval mode, CPU) and its ``run.json``."""
    meta = read_latent_run(run)
    model = load_network(run, int(meta["in_channels"]), int(meta["in_channels"]))
    return model, meta


def _normalization(meta: dict):
    from deepmorph.data import Normalization

    return Normalization.from_dict(meta["normalization"])


def _check_shape(meta: dict, shape, where) -> None:
    want = (int(meta["in_channels"]), int(meta["stamp_size"]), int(meta["stamp_size"]))
    if tuple(int(s) for s in shape) != want:
        raise DeepmorphValueError(f"{where}: stamps of shape {tuple(shape)}, but the model was trained on "
                                  f"(channels, height, width) = {want}")


def _dataset(meta: dict, data, items=None):
    """A :class:`StampDataset` of ``data`` (a path or a dataset) with the run's normalisation."""
    from deepmorph.data import StampDataset

    if isinstance(data, StampDataset):
        ds = StampDataset(data.path, data.indices if items is None else data.indices[np.asarray(items)],
                          target=None, normalization=_normalization(meta), image=data.image_array)
    else:
        ds = StampDataset(Path(data), items, target=None, normalization=_normalization(meta))
    _check_shape(meta, ds.image_shape, ds.path)
    return ds


@torch.no_grad()
def _encode_model(model, meta: dict, images, items=None, batch_size: int = 256,
                  with_logvar: bool = False):
    """Posterior means (N, K) (and log-variances, or None) of images: an array/tensor of counts, a path, a dataset."""
    mus, logvars = [], []
    for x in _normalized_batches(meta, images, items, batch_size):
        mu, logvar = model.encode(x)
        mus.append(mu.numpy())
        logvars.append(None if logvar is None else logvar.numpy())
    k = int(meta["latent_dim"])
    mu = np.concatenate(mus) if mus else np.zeros((0, k), np.float32)
    if not with_logvar:
        return mu
    lv = None if (not logvars or logvars[0] is None) else np.concatenate(logvars)
    return mu, lv


def encode(run: str | Path, images, items=None, batch_size: int = 256, with_logvar: bool = False):
    """Latent codes of images: the posterior means of a VAE, the codes of an autoencoder.

    Parameters
    ----------
    run : path
        An autoencoder or VAE run.
    images : array (N, C, H, W) or (C, H, W), tensor, path or StampDataset
        Stamps in counts (the run's normalisation is applied here), or a dataset file / dataset.
    items : array of int, optional
        Items of a dataset to encode (default all).
    with_logvar : bool
        Also return the posterior log-variances (None for an autoencoder).

    Returns
    -------
    ndarray (N, latent_dim) float32
        The means (and the log-variances, with ``with_logvar``).
    """
    model, meta = load_autoencoder(run)
    return _encode_model(model, meta, images, items, batch_size, with_logvar)


@torch.no_grad()
def pose_angles(run: str | Path, images, items=None, batch_size: int = 256) -> np.ndarray:
    """Major-axis position angles of images, degrees in [0, 180) counter-clockwise from +x (the
    catalogue's ``pa_deg`` convention): the orientation that a pose-normalised run (``align=True``)
    removes before encoding (:func:`deepmorph.models.vae.pose_angle`, measured on the normalised
    images). ``images`` as for :func:`encode`; any autoencoder/VAE run gives its normalisation."""
    model, meta = load_autoencoder(run)
    return _pose_model(model, meta, images, items, batch_size)


@torch.no_grad()
def _pose_model(model, meta: dict, images, items=None, batch_size: int = 256) -> np.ndarray:
    from deepmorph.models.vae import pose_angle

    angles = [np.degrees(pose_angle(x).numpy()) for x in _normalized_batches(meta, images, items, batch_size)]
    return (np.concatenate(angles) if angles else np.zeros(0)) % 180.0


def _normalized_batches(meta: dict, images, items=None, batch_size: int = 256):
    """Batches (B, C, H, W) of normalised images: an array/tensor of counts, a path or a dataset."""
    if isinstance(images, str | Path) or hasattr(images, "batch"):
        ds = _dataset(meta, images, items)
        for start in range(0, len(ds), batch_size):
            yield ds.batch(np.arange(start, min(len(ds), start + batch_size)))["image"]
        return
    arr = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise DeepmorphValueError(f"encode: images must be (N, C, H, W) or (C, H, W), got shape {arr.shape}")
    _check_shape(meta, arr.shape[1:], "encode")
    if not np.isfinite(arr).all():
        raise DeepmorphValueError("encode: the images have NaN or inf pixels")
    norm = _normalization(meta)
    for start in range(0, len(arr), batch_size):
        yield norm(torch.from_numpy(arr[start:start + batch_size]))


@torch.no_grad()
def decode(run: str | Path, z) -> np.ndarray:
    """Decoded images ``(N, C, H, W)`` of codes ``(N, latent_dim)``, in the run's normalised units."""
    model, meta = load_autoencoder(run)
    return _decode_model(model, z)


@torch.no_grad()
def _frame(model, x: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, C, H, W) as the network reconstructs them (pose-normalised with ``align``)."""
    return model.pose_normalize(x) if getattr(model, "align", False) else x


@torch.no_grad()
def _decode_model(model, z) -> np.ndarray:
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    return model.decode(z.reshape(-1, model.latent_dim)).numpy()


# -- catalogue parameters --------------------------------------------------------------------------

def composite_hlr(bt, hlr_bulge, n_bulge, hlr_disk, n_disk=1.0, iterations: int = 60) -> np.ndarray:
    """Half-light radius of a bulge + disk galaxy: the radius enclosing half of the total light.

    Each component is taken circular with its major-axis half-light radius (so the result is a
    major-axis-like radius, exact for B/T = 0 or 1): ``r`` solves
    ``B/T P(2 n_b, b(n_b) (r / r_b)^(1/n_b)) + (1 - B/T) P(2 n_d, b(n_d) (r / r_d)^(1/n_d)) = 1/2``,
    ``P`` the regularised lower incomplete gamma function and ``P(2n, b(n)) = 1/2``. Found by
    bisection in ``log r`` between the two components' radii (where it must lie).

    Parameters
    ----------
    bt, hlr_bulge, n_bulge, hlr_disk, n_disk : array_like
        B/T, the half-light radii (any one unit; the result has it) and Sersic indices.

    Returns
    -------
    ndarray
        The galaxy's half-light radius, in the unit of the inputs.
    """
    from scipy.special import gammainc, gammaincinv

    bt, rb, nb, rd, nd = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                               for v in (bt, hlr_bulge, n_bulge, hlr_disk, n_disk)))
    bt = np.clip(bt, 0.0, 1.0)
    bb, bd = gammaincinv(2.0 * nb, 0.5), gammaincinv(2.0 * nd, 0.5)

    def enclosed(r):
        return bt * gammainc(2.0 * nb, bb * (r / rb) ** (1.0 / nb)) + \
            (1.0 - bt) * gammainc(2.0 * nd, bd * (r / rd) ** (1.0 / nd))

    lo, hi = np.log(np.minimum(rb, rd)), np.log(np.maximum(rb, rd))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        inside = enclosed(np.exp(mid)) < 0.5
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    return np.exp(0.5 * (lo + hi))


def catalog_parameters(catalog, names=(*PARAMETERS, *SHAPE)) -> dict[str, np.ndarray]:
    """The :data:`PARAMETERS` (and :data:`SHAPE`) a catalogue (astropy Table) holds the columns for,
    as float arrays.

    A parameter whose columns are missing is left out; values undefined for a galaxy (``n`` of a
    disk-dominated galaxy, ``pa`` of a round one) are NaN. A single-Sersic catalogue (no disk
    columns) gives the bulge's radius and axis ratio.
    """
    cols = set(catalog.colnames)

    def col(name):
        return np.asarray(catalog[name], dtype=np.float64)

    bt = col("bulge_to_total") if "bulge_to_total" in cols else None
    disk = bt is not None and {"disk_hlr_arcsec", "disk_q"} <= cols
    out: dict[str, np.ndarray] = {}
    if "mag" in cols:
        out["mag"] = col("mag")
    if "bulge_hlr_arcsec" in cols:
        if disk and "bulge_n" in cols:
            out["hlr"] = composite_hlr(bt, col("bulge_hlr_arcsec"), col("bulge_n"), col("disk_hlr_arcsec"))
        else:
            out["hlr"] = col("bulge_hlr_arcsec")
    if "bulge_q" in cols:
        out["q"] = bt * col("bulge_q") + (1.0 - bt) * col("disk_q") if disk else col("bulge_q")
    if bt is not None:
        out["bt"] = bt
    if "bulge_n" in cols:
        n = col("bulge_n")
        out["n"] = np.where(bt >= 0.5, n, np.nan) if bt is not None else n
    if "pa_deg" in cols:
        pa = col("pa_deg") % 180.0
        out["pa"] = np.where(out["q"] < 0.8, pa, np.nan) if "q" in out else pa
        if "q" in out:
            e = (1.0 - out["q"]) / (1.0 + out["q"])
            out["e1"], out["e2"] = e * np.cos(np.radians(2.0 * pa)), e * np.sin(np.radians(2.0 * pa))
    return {k: v for k, v in out.items() if k in names}


def probe_targets(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the probes predict: ``log10 hlr`` for ``hlr``, ``cos 2PA`` and ``sin 2PA`` for ``pa``,
    the others as they are."""
    out = {}
    for name, v in params.items():
        if name == "hlr":
            out["log10_hlr"] = np.log10(np.where(v > 0, v, np.nan))
        elif name == "pa":
            out["cos_2pa"] = np.cos(np.radians(2.0 * v))
            out["sin_2pa"] = np.sin(np.radians(2.0 * v))
        else:
            out[name] = v
    return out


def _required_parameters(data, params: dict, where: str = "latent maps") -> None:
    if not params:
        raise DeepmorphValueError(
            f"{data}: the catalogue has none of the columns {where} needs (mag, bulge_hlr_arcsec, bulge_q, "
            "bulge_to_total, bulge_n, pa_deg)")


# -- the latent plane ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LatentPlane:
    """A plane of the latent space: ``z = origin + u * axes[0] + v * axes[1]``.

    For a 2-D latent it is the latent itself; for a larger one, the plane of the first two
    principal components of a set of codes (``scales``: the standard deviations along them,
    ``explained``: their fractions of the total variance).
    """

    origin: np.ndarray
    axes: np.ndarray
    scales: np.ndarray
    explained: np.ndarray
    kind: str

    def project(self, z) -> np.ndarray:
        """Plane coordinates (N, 2) of codes (N, K)."""
        return (np.asarray(z, dtype=np.float64) - self.origin) @ self.axes.T

    def lift(self, uv) -> np.ndarray:
        """Codes (N, K) of plane coordinates (N, 2)."""
        return self.origin + np.asarray(uv, dtype=np.float64) @ self.axes

    def to_dict(self) -> dict:
        return {"kind": self.kind, "origin": self.origin.tolist(), "axes": self.axes.tolist(),
                "scales": self.scales.tolist(), "explained": self.explained.tolist()}


def latent_plane(z, latent_dim: int | None = None) -> LatentPlane:
    """The :class:`LatentPlane` of codes ``z`` (N, K): the latent itself for K = 2, else PCA."""
    z = np.asarray(z, dtype=np.float64)
    k = int(latent_dim or z.shape[1])
    if k == 2:
        var = z.var(axis=0) if len(z) > 1 else np.ones(2)
        explained = var / var.sum() if var.sum() > 0 else np.full(2, 0.5)
        return LatentPlane(np.zeros(2), np.eye(2), np.ones(2), explained, "latent")
    if len(z) < 3:
        raise DeepmorphValueError(f"the latent plane of a {k}-D latent needs at least 3 codes, got {len(z)}")
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(z)
    return LatentPlane(pca.mean_, pca.components_, np.sqrt(pca.explained_variance_), pca.explained_variance_ratio_,
                       "pca")


# -- correlations and probes -----------------------------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=0)


def _spearman_columns(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of ``y`` (N,) with each column of ``z`` (N, K); NaN where one is constant."""
    rz, ry = _ranks(z), _ranks(y)
    rz = rz - rz.mean(axis=0)
    ry = ry - ry.mean()
    den = np.sqrt((rz**2).sum(axis=0) * (ry**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rz * ry[:, None]).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)


def latent_correlations(z, params: dict[str, np.ndarray], probe_fraction: float = 0.5, seed: int = 0,
                        neighbors: int = 20, mi_max: int = 3000):
    """Which latent directions carry which parameter: rank correlations, probes, mutual information.

    Parameters
    ----------
    z : array (N, K)
        Latent codes (posterior means).
    params : dict of str to array (N,)
        Parameters per galaxy (:func:`catalog_parameters`); NaNs are left out per parameter. They
        are probed as :func:`probe_targets` codes them (log10 hlr, cos/sin 2PA).
    probe_fraction : float
        Fraction of the galaxies the probes are fitted on; they are scored on the rest.
    seed : int
        Seed of that split (and of the mutual-information estimate).
    neighbors : int
        Neighbours of the k-nearest-neighbour probe (on standardised codes).
    mi_max : int
        Mutual information is estimated on at most this many galaxies.

    Returns
    -------
    astropy.table.Table
        One row per probed quantity: ``parameter``, ``probe`` (its kind), ``n`` (galaxies with a value), ``best_dim``
        and ``best_abs_spearman`` (the latent dimension with the largest |rho|, on all), ``spearman``
        (its signed rho), ``probe_spearman`` and ``linear_r2`` (a linear regression on the codes,
        fitted on the probe part, scored on the held-out part: rho of its predictions with the
        truth, and R^2), ``knn_r2`` (the same for k-nearest neighbours) and ``mutual_info``
        (nats, the largest over dimensions, Kraskov's estimate), ``n_fit``, ``n_test``. With ``q``,
        ``e1`` and ``e2`` given, a last row ``q_via_e1e2`` reads ``q`` through the shape
        directions: linear probes of e1 and e2 on the codes, then ``q = (1 - |e|) / (1 + |e|)``
        (its ``linear_r2`` and ``probe_spearman`` are those of that estimate of ``q``).
    """
    from astropy.table import Table
    from scipy.stats import spearmanr
    from sklearn.feature_selection import mutual_info_regression
    from sklearn.linear_model import LinearRegression
    from sklearn.neighbors import KNeighborsRegressor

    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise DeepmorphValueError(f"latent_correlations: codes must be (N, K), got shape {z.shape}")
    if not 0 < probe_fraction < 1:
        raise DeepmorphValueError(f"probe_fraction must be in (0, 1), got {probe_fraction}")
    rng = np.random.default_rng(seed)
    fit_part = rng.random(len(z)) < probe_fraction
    sd = z.std(axis=0)
    zs = (z - z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    rows = []
    for name, y in probe_targets(params).items():
        y = np.asarray(y, dtype=np.float64)
        if y.shape != (len(z),):
            raise DeepmorphValueError(f"latent_correlations: {name} has shape {y.shape}, codes {z.shape}")
        ok = np.isfinite(y) & np.isfinite(z).all(axis=1)
        fit, test = ok & fit_part, ok & ~fit_part
        row = {"parameter": name, "probe": "linear", "n": int(ok.sum()), "best_dim": -1, "best_abs_spearman": np.nan,
               "spearman": np.nan, "probe_spearman": np.nan, "linear_r2": np.nan, "knn_r2": np.nan,
               "mutual_info": np.nan, "n_fit": int(fit.sum()), "n_test": int(test.sum())}
        if ok.sum() >= 10 and np.ptp(y[ok]) > 0:
            rho = _spearman_columns(z[ok], y[ok])
            if np.isfinite(rho).any():
                best = int(np.nanargmax(np.abs(rho)))
                row.update(best_dim=best, best_abs_spearman=float(abs(rho[best])), spearman=float(rho[best]))
            if fit.sum() >= max(10, z.shape[1] + 2) and test.sum() >= 10 and np.ptp(y[test]) > 0:
                lin = LinearRegression().fit(z[fit], y[fit])
                pred = lin.predict(z[test])
                row["linear_r2"] = float(lin.score(z[test], y[test]))
                row["probe_spearman"] = float(spearmanr(pred, y[test]).statistic)
                k = min(neighbors, int(fit.sum()))
                knn = KNeighborsRegressor(n_neighbors=k).fit(zs[fit], y[fit])
                row["knn_r2"] = float(knn.score(zs[test], y[test]))
            idx = np.flatnonzero(ok)
            if len(idx) > mi_max:
                idx = np.sort(np.random.default_rng(seed).choice(idx, mi_max, replace=False))
            row["mutual_info"] = float(np.max(mutual_info_regression(z[idx], y[idx], random_state=seed)))
        rows.append(row)
    if {"q", "e1", "e2"} <= set(params):
        rows.append(_q_via_shape(z, params, fit_part))
    table = Table(rows=rows, names=list(rows[0]) if rows else None) if rows else Table()
    for name in ("best_abs_spearman", "spearman", "probe_spearman", "linear_r2", "knn_r2", "mutual_info"):
        if name in table.colnames:
            table[name].format = ".3f"
    if "mutual_info" in table.colnames:
        table["mutual_info"].unit = "nat"
    table.meta.update({"probe_fraction": probe_fraction, "seed": seed, "neighbors": neighbors,
                       "note": "probes fitted on n_fit galaxies, scored on the n_test others; log10_hlr, "
                               "cos_2pa and sin_2pa are probed for hlr and pa"})
    return table


def _q_via_shape(z: np.ndarray, params: dict, fit_part: np.ndarray) -> dict:
    """The axis ratio read through the shape directions: linear probes of e1 and e2, then
    ``q = (1 - |e|) / (1 + |e|)`` (the row ``q_via_e1e2`` of :func:`latent_correlations`)."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import LinearRegression

    q, e = params["q"], np.stack([params["e1"], params["e2"]], axis=1)
    ok = np.isfinite(q) & np.isfinite(e).all(axis=1) & np.isfinite(z).all(axis=1)
    fit, test = ok & fit_part, ok & ~fit_part
    row = {"parameter": "q_via_e1e2", "probe": "linear e1, e2 -> q", "n": int(ok.sum()), "best_dim": -1,
           "best_abs_spearman": np.nan, "spearman": np.nan, "probe_spearman": np.nan, "linear_r2": np.nan,
           "knn_r2": np.nan, "mutual_info": np.nan, "n_fit": int(fit.sum()), "n_test": int(test.sum())}
    if fit.sum() >= max(10, z.shape[1] + 2) and test.sum() >= 10 and np.ptp(q[test]) > 0:
        e_hat = LinearRegression().fit(z[fit], e[fit]).predict(z[test])
        norm = np.clip(np.hypot(e_hat[:, 0], e_hat[:, 1]), 0.0, 1.0)
        q_hat = (1.0 - norm) / (1.0 + norm)
        truth = q[test]
        row["linear_r2"] = float(1.0 - np.sum((truth - q_hat) ** 2) / np.sum((truth - truth.mean()) ** 2))
        row["probe_spearman"] = float(spearmanr(q_hat, truth).statistic)
    return row


# -- figures ---------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _cmap(name: str) -> str:
    return {"pa": "twilight", "mag": "viridis_r"}.get(name, "viridis")


def maps_figure(uv: np.ndarray, params: dict[str, np.ndarray], plane: LatentPlane, title: str = ""):
    """One panel per parameter: the codes in the latent plane, coloured by the parameter."""
    names = [n for n in PARAMETERS if n in params]
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    fig = _figure(3.6 * cols, 3.3 * rows)
    axes_label = ("z1", "z2") if plane.kind == "latent" else (
        f"PC1 ({100 * plane.explained[0]:.0f}%)", f"PC2 ({100 * plane.explained[1]:.0f}%)")
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        v = params[name]
        ok = np.isfinite(v)
        ax.scatter(uv[~ok, 0], uv[~ok, 1], s=2, color="0.85", rasterized=True)
        c = np.log10(v[ok]) if name == "hlr" else v[ok]
        sc = ax.scatter(uv[ok, 0], uv[ok, 1], c=c, s=2, cmap=_cmap(name), rasterized=True)
        label, unit = PARAMETERS[name]
        label = f"log10 {label}" if name == "hlr" else label
        fig.colorbar(sc, ax=ax, label=f"{label}" + (f" [{unit}]" if unit else ""))
        ax.set_xlabel(axes_label[0])
        ax.set_ylabel(axes_label[1])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _image_limits(images: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(images, [1.0, 99.8])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def grid_figure(images: np.ndarray, uv: np.ndarray, plane: LatentPlane, title: str = ""):
    """Decoded images (n, n, C, H, W) at plane coordinates uv (n, n, 2), channel 0 shown."""
    n_rows, n_cols = images.shape[:2]
    fig = _figure(1.1 * n_cols + 0.6, 1.1 * n_rows + 0.6)
    vmin, vmax = _image_limits(images[:, :, 0])
    for i in range(n_rows):
        for j in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            ax.imshow(images[n_rows - 1 - i, j, 0], origin="lower", cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == n_rows - 1:
                ax.set_xlabel(f"{uv[0, j, 0]:.1f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{uv[n_rows - 1 - i, 0, 1]:.1f}", fontsize=7)
    which = "z1, z2" if plane.kind == "latent" else "PC1, PC2"
    fig.suptitle(title or f"decoded over the latent plane ({which})", fontsize=9)
    fig.tight_layout()
    return fig


def strip_figure(rows: list[np.ndarray], labels: list[str], title: str = ""):
    """Rows of images (each (M, C, H, W)), channel 0, one shared grey scale."""
    n_cols = max(len(r) for r in rows)
    fig = _figure(1.1 * n_cols + 0.8, 1.15 * len(rows) + 0.5)
    vmin, vmax = _image_limits(np.concatenate([r[:, 0] for r in rows]))
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        for j, img in enumerate(row):
            ax = fig.add_subplot(len(rows), n_cols, i * n_cols + j + 1)
            ax.imshow(img[0], origin="lower", cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# -- latent-space tools ----------------------------------------------------------------------------

def _default_items(meta: dict, data) -> tuple[Path, np.ndarray | None]:
    """The data to use (the run's own by default) and, for the run's own data, its test split."""
    own = Path(meta["data"])
    if data is None:
        data = own
    data = Path(data)
    if data.resolve() == own.resolve() and dataset_exists(data):
        return data, Split(int(meta["split_seed"]), tuple(meta["fractions"])).indices(_length(data))["test"]
    return data, None


def _length(path: Path) -> int:
    from deepmorph.data import open_dataset

    with open_dataset(path) as ds:
        return len(ds)


def _subsample(n: int, max_items: int | None, seed: int) -> np.ndarray:
    if max_items is None or n <= max_items:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, int(max_items), replace=False))


def _encode_with_catalog(model, meta, data: Path, items, max_items: int | None, seed: int):
    """Codes and the catalogue rows of (a subsample of) a dataset's items."""
    ds = _dataset(meta, data, items)
    keep = _subsample(len(ds), max_items, seed)
    if len(keep) < len(ds):
        ds = _dataset(meta, data, ds.indices[keep])
    return _encode_model(model, meta, ds), ds.catalog, ds


def latent_maps(run: str | Path, data=None, out: str | Path | None = None, items=None,
                max_items: int | None = 20000, seed: int = 0) -> dict:
    """The latent plane (2-D latent, or its first two principal components) coloured by each parameter.

    Parameters
    ----------
    run : path
        An autoencoder or VAE run.
    data : path, optional
        A dataset with a catalogue (default: the run's own data, its test split).
    out : path, optional
        Folder for ``latent_maps.png``, ``latent_maps.ecsv`` (plane coordinates and parameters per
        galaxy) and ``latent_correlations.ecsv`` (:func:`latent_correlations`); none written without it.
    items : array of int, optional
        Items of ``data`` (default: the test split of the run's data, all items of other data).
    max_items : int, optional
        Use a random subset of at most this many items.

    Returns
    -------
    dict
        ``plane`` (:class:`LatentPlane`), ``uv`` (N, 2), ``z`` (N, K), ``parameters`` (dict),
        ``correlations`` (table), ``ids`` (catalogue ids), ``figure`` (the matplotlib Figure),
        ``pose_pa_deg`` (:func:`pose_angles` of the galaxies for a pose-normalised run, else None).
    """
    from astropy.table import Table

    model, meta = load_autoencoder(run)
    data, default = _default_items(meta, data)
    z, catalog, ds = _encode_with_catalog(model, meta, data, default if items is None else items, max_items, seed)
    params = catalog_parameters(catalog)
    _required_parameters(data, params)
    plane = latent_plane(z, int(meta["latent_dim"]))
    uv = plane.project(z)
    corr = latent_correlations(z, params, seed=seed)
    pose = _pose_model(model, meta, ds) if getattr(model, "align", False) else None
    fig = maps_figure(uv, params, plane, title=f"{Path(run).name}: {data.name}")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        ids = np.asarray(catalog["id"]) if "id" in catalog.colnames else np.arange(len(z))
        columns = {"id": ids, "u": uv[:, 0], "v": uv[:, 1], **params}
        if pose is not None:
            columns["pose_pa_deg"] = pose
        table = Table(columns)
        table.meta["plane"] = plane.to_dict()
        save_table(table, out / "latent_maps.ecsv")
        save_table(corr, out / "latent_correlations.ecsv")
        save_figure(fig, out / "latent_maps.png")
    ids = np.asarray(catalog["id"]) if "id" in catalog.colnames else None
    return {"plane": plane, "uv": uv, "z": z, "parameters": params, "correlations": corr, "ids": ids, "figure": fig,
            "pose_pa_deg": pose}


def decoded_grid(run: str | Path, data=None, n: int = 8, span: float = 2.0, out: str | Path | None = None,
                 items=None, max_items: int | None = 5000, seed: int = 0) -> dict:
    """Decoded images over the latent plane.

    For a 2-D latent the grid spans ``[-span, span]`` on each axis (prior standard deviations);
    for a larger one it spans ``span`` standard deviations of the codes of ``data`` (default: the
    test split of the run's own data) along their first two principal components, around their
    mean (when no data can be read: the first two latent dimensions, the others 0).

    Returns
    -------
    dict
        ``images`` (n, n, C, H, W) decoded (normalised units; row i has the i-th value of the second
        coordinate), ``uv`` (n, n, 2) plane coordinates, ``z`` (n, n, K) codes, ``plane``, ``figure``;
        ``decoded_grid.png`` written into ``out`` when given.
    """
    if n < 2:
        raise DeepmorphValueError(f"decoded grid: n must be >= 2, got {n}")
    model, meta = load_autoencoder(run)
    k = int(meta["latent_dim"])
    path, default = _default_items(meta, data)
    if k == 2 or (data is None and not dataset_exists(path)):
        eye = np.zeros((2, k))
        eye[0, 0] = 1.0
        if k > 1:
            eye[1, 1] = 1.0
        plane = LatentPlane(np.zeros(k), eye, np.ones(2), np.full(2, np.nan), "latent")
    else:
        z, _, _ = _encode_with_catalog(model, meta, path, default if items is None else items, max_items, seed)
        plane = latent_plane(z, k)
    ticks = np.linspace(-span, span, n)
    uu, vv = np.meshgrid(ticks * plane.scales[0], ticks * plane.scales[1])
    uv = np.stack([uu, vv], axis=-1)  # (n, n, 2): row index follows v
    codes = plane.lift(uv.reshape(-1, 2))
    images = _decode_model(model, codes).reshape(n, n, *(-1, int(meta["stamp_size"]), int(meta["stamp_size"])))
    fig = grid_figure(images, uv, plane)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_figure(fig, Path(out) / "decoded_grid.png")
    return {"images": images, "uv": uv, "z": codes.reshape(n, n, k), "plane": plane, "figure": fig}


@torch.no_grad()
def interpolate(run: str | Path, image_a, image_b, steps: int = 8) -> np.ndarray:
    """Decoded images along the straight line between two galaxies' codes.

    Parameters
    ----------
    image_a, image_b : array (C, H, W)
        The two stamps, in counts.
    steps : int
        Points on the line, both ends included (>= 2).

    Returns
    -------
    ndarray (steps, C, H, W)
        Decoded images (normalised units), from ``image_a``'s code to ``image_b``'s.
    """
    if steps < 2:
        raise DeepmorphValueError(f"interpolate: steps must be >= 2, got {steps}")
    model, meta = load_autoencoder(run)
    return _interpolate_model(model, meta, image_a, image_b, steps)


def _interpolate_model(model, meta, image_a, image_b, steps: int) -> np.ndarray:
    za = _encode_model(model, meta, np.asarray(image_a, dtype=np.float32))
    zb = _encode_model(model, meta, np.asarray(image_b, dtype=np.float32))
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return _decode_model(model, (1.0 - t) * za + t * zb)


def interpolation_figure(run: str | Path, data, pairs, steps: int = 8, out: str | Path | None = None):
    """Decoded paths between pairs of dataset items: each row is item a, the path, item b (normalised).

    Parameters
    ----------
    data : path
        A dataset file.
    pairs : sequence of (int, int)
        Item indices (of the file) of each pair.

    Returns
    -------
    dict
        ``paths`` (P, steps, C, H, W), ``figure``; ``interpolation.png`` written into ``out`` when given.
    """
    from deepmorph.data import StampDataset

    if steps < 2:
        raise DeepmorphValueError(f"interpolate: steps must be >= 2, got {steps}")
    model, meta = load_autoencoder(run)
    pairs = [(int(a), int(b)) for a, b in pairs]
    if not pairs:
        raise DeepmorphValueError("interpolate: give at least one pair of items")
    data = Path(data)
    n = _length(data)
    bad = [p for p in pairs if not (0 <= p[0] < n and 0 <= p[1] < n)]
    if bad:
        raise DeepmorphValueError(f"{data}: items {bad} out of range [0, {n - 1}]")
    raw = StampDataset(data, sorted({i for p in pairs for i in p}), target=None)
    _check_shape(meta, raw.image_shape, data)
    stamps = {int(i): raw.batch([k])["image"][0].numpy() for k, i in enumerate(raw.indices)}
    norm = _normalization(meta)
    rows, labels, paths = [], [], []
    for a, b in pairs:
        path = _interpolate_model(model, meta, stamps[a], stamps[b], steps)
        paths.append(path)
        ends = [_frame(model, norm(torch.from_numpy(stamps[i]))[None]).numpy() for i in (a, b)]
        rows.append(np.concatenate([ends[0], path, ends[1]]))
        labels.append(f"{a} -> {b}")
    fig = strip_figure(rows, labels, title="input, decoded path between the codes, input")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_figure(fig, Path(out) / "interpolation.png")
    return {"paths": np.stack(paths), "figure": fig}


# -- two populations -------------------------------------------------------------------------------

def energy_distance(x, y) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` of two samples (N, K), (M, K) (V-statistics)."""
    from scipy.spatial.distance import cdist

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(2.0 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


def mmd_rbf(x, y, bandwidth: float | None = None, permutations: int = 200, seed: int = 0) -> dict:
    """Squared maximum mean discrepancy of two samples with an RBF kernel, and its permutation p-value.

    Parameters
    ----------
    x, y : array (N, K), (M, K)
    bandwidth : float, optional
        Kernel ``exp(-|a - b|^2 / (2 h^2))`` width ``h``; default the median pairwise distance of
        the pooled sample (the median heuristic).
    permutations : int
        Relabellings of the pooled sample for the p-value (0: none).

    Returns
    -------
    dict
        ``mmd2`` (the biased V-statistic, ``mean k(x,x') + mean k(y,y') - 2 mean k(x,y)``),
        ``bandwidth``, ``p_value`` (``(1 + #{perm >= observed}) / (1 + permutations)``, NaN without
        permutations).
    """
    from scipy.spatial.distance import cdist, pdist

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    pooled = np.concatenate([x, y])
    if bandwidth is None:
        d = pdist(pooled[_subsample(len(pooled), 2000, seed)])
        bandwidth = float(np.median(d)) if d.size and np.median(d) > 0 else 1.0
    kernel = np.exp(-cdist(pooled, pooled, "sqeuclidean") / (2.0 * bandwidth**2))
    n, m = len(x), len(y)

    def stat(signs: np.ndarray) -> np.ndarray:  # signs (N + M, P): +1/n for x, -1/m for y
        return np.einsum("ip,ip->p", signs, kernel @ signs)

    base = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    observed = float(stat(base[:, None])[0])
    p_value = float("nan")
    if permutations > 0:
        rng = np.random.default_rng(seed)
        perms = np.stack([base[rng.permutation(n + m)] for _ in range(int(permutations))], axis=1)
        null = stat(perms)
        p_value = float((1 + np.sum(null >= observed)) / (1 + permutations))
    return {"mmd2": observed, "bandwidth": float(bandwidth), "p_value": p_value}


def classifier_auc(x, y, seed: int = 0, folds: int = 5) -> float:
    """Classifier two-sample test: the cross-validated ROC AUC of gradient-boosted trees told to
    tell ``x`` from ``y`` (0.5: indistinguishable, 1: fully separated)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    features = np.concatenate([x, y]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(x)), np.ones(len(y))])
    folds = int(min(folds, len(x), len(y)))
    if folds < 2:
        return float("nan")
    clf = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
    proba = cross_val_predict(clf, features, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, proba))


def compare_populations(run: str | Path, data_a, data_b, out: str | Path | None = None,
                        labels: tuple[str, str] | None = None, items_a=None, items_b=None,
                        max_items: int = 2000, permutations: int = 200, seed: int = 0) -> dict:
    """Encode two datasets into one latent space, show both in one plane, and measure how far apart they are.

    Parameters
    ----------
    run : path
        An autoencoder or VAE run.
    data_a, data_b : path
        The two datasets (e.g. the training simulations and another survey preset, clumpy
        galaxies or imported real cutouts), with the run's stamp size and channels.
    labels : (str, str), optional
        Names in the figure (default the file names).
    items_a, items_b : array of int, optional
        Items of each (default: for the run's own data its test split, else all).
    max_items : int
        Random subsets of at most this many galaxies of each are compared.
    permutations : int
        Permutations of the MMD test.

    Returns
    -------
    dict
        ``n_a``, ``n_b``, ``energy_distance`` and ``energy_distance_null`` (between two random halves
        of A: the size of the distance from sampling alone), ``mmd2``, ``mmd_p_value``,
        ``mmd_bandwidth``, ``classifier_auc``, ``plane`` (its dict); ``compare.png`` and
        ``compare.json`` written into ``out`` when given.
    """
    model, meta = load_autoencoder(run)
    zs = []
    for data, items, offset in ((data_a, items_a, 0), (data_b, items_b, 1)):
        path, default = _default_items(meta, data)
        z, _, _ = _encode_with_catalog(model, meta, path, default if items is None else items, max_items,
                                       seed + offset)
        if len(z) < 4:
            raise DeepmorphValueError(f"{path}: need at least 4 galaxies to compare, got {len(z)}")
        zs.append(z.astype(np.float64))
    za, zb = zs
    labels = labels or (Path(data_a).name, Path(data_b).name)
    half = np.random.default_rng(seed).permutation(len(za))
    mmd = mmd_rbf(za, zb, permutations=permutations, seed=seed)
    result = {
        "n_a": len(za), "n_b": len(zb), "labels": list(labels),
        "energy_distance": energy_distance(za, zb),
        "energy_distance_null": energy_distance(za[half[: len(za) // 2]], za[half[len(za) // 2:]]),
        "mmd2": mmd["mmd2"], "mmd_p_value": mmd["p_value"], "mmd_bandwidth": mmd["bandwidth"],
        "classifier_auc": classifier_auc(za, zb, seed=seed),
    }
    plane = latent_plane(np.concatenate([za, zb]), int(meta["latent_dim"]))
    result["plane"] = plane.to_dict()
    fig = _figure(5.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for z, label, color in ((za, labels[0], "C0"), (zb, labels[1], "C3")):
        uv = plane.project(z)
        ax.scatter(uv[:, 0], uv[:, 1], s=3, alpha=0.4, color=color, label=f"{label} ({len(z)})", rasterized=True)
    if plane.kind == "pca":
        ax.set_xlabel(f"PC1 ({100 * plane.explained[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * plane.explained[1]:.0f}%)")
    else:
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
    ax.legend(fontsize=8, markerscale=3)
    ax.set_title(f"energy distance {result['energy_distance']:.3g} (null {result['energy_distance_null']:.2g}), "
                 f"MMD$^2$ {result['mmd2']:.3g}, AUC {result['classifier_auc']:.2f}", fontsize=8)
    fig.tight_layout()
    result["figure"] = fig
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_figure(fig, out / "compare.png")
        write_json(out / "compare.json", {k: v for k, v in result.items() if k != "figure"})
    return result


# -- evaluation ------------------------------------------------------------------------------------

def evaluate_latent(run: str | Path, data=None, items=None, out: str | Path | None = None,
                    max_items: int | None = 20000, pairs: int = 4, steps: int = 8, seed: int = 0) -> dict:
    """Score a run's latent space and draw its figures (default: the test split of its own data).

    Writes into ``out`` (default the run directory) the files listed in the module docstring.

    Returns
    -------
    dict
        ``correlations`` (a list of the table's rows, as dicts), ``n_eval``, ``recon_mse`` (mean
        squared reconstruction error per pixel, normalised units, against the pose-normalised image
        for an ``align`` run), ``plane``, ``seconds``; for an ``align`` run with catalogue position
        angles, ``pose_pa_error_deg`` (``n``, ``median``, ``p90``: |removed angle - catalogue PA| of
        the elongated galaxies, q < 0.8, degrees).
    """
    start = time.perf_counter()
    run = Path(run)
    out = Path(out) if out is not None else run
    model, meta = load_autoencoder(run)
    data, default = _default_items(meta, data)
    items = default if items is None else np.asarray(items)
    maps = latent_maps(run, data, out, items=items, max_items=max_items, seed=seed)
    decoded_grid(run, data, out=out, items=items, seed=seed)
    ds = _dataset(meta, data, items)
    rng = np.random.default_rng(seed)
    chosen = ds.indices[np.sort(rng.choice(len(ds), min(len(ds), 2 * pairs), replace=False))]
    if len(chosen) >= 2:
        interpolation_figure(run, data, list(zip(chosen[0::2], chosen[1::2], strict=False)), steps, out)
    with torch.no_grad():
        raw = ds.batch(np.arange(min(len(ds), 512)))["image"]
        recon, sample = model(raw), _frame(model, raw)  # the reconstruction and the image it reconstructs
        mse = float(((recon - sample) ** 2).mean())
        show = slice(0, min(8, len(sample)))
        fig = strip_figure([sample[show].numpy(), recon[show].numpy()], ["input", "reconstruction"],
                           title=f"test galaxies (normalised) and their reconstructions; MSE {mse:.3g}")
    save_figure(fig, out / "reconstructions.png")
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(r.colnames, r, strict=True)}
            for r in maps["correlations"]]
    rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    result = {"n_eval": int(len(maps["z"])), "correlations": rows, "recon_mse": mse,
              "plane": maps["plane"].to_dict(), "seconds": time.perf_counter() - start}
    if maps["pose_pa_deg"] is not None and "pa" in maps["parameters"]:
        diff = (maps["pose_pa_deg"] - maps["parameters"]["pa"] + 90.0) % 180.0 - 90.0
        diff = np.abs(diff[np.isfinite(diff)])
        result["pose_pa_error_deg"] = {"n": int(diff.size), "median": float(np.median(diff)) if diff.size else None,
                                       "p90": float(np.percentile(diff, 90)) if diff.size else None}
    write_json(out / "latent_metrics.json", {**result, "data": str(data), "run": str(run)})
    return result


def require_run_dir(run: str | Path) -> Path:
    """``run`` as a Path, with a one-line error unless it holds a finished autoencoder/VAE run."""
    run = Path(run)
    read_latent_run(run)
    if not (run / "model.pt").is_file():
        raise DeepmorphIOError(f"{run}: no model.pt (did training finish?)")
    return run
