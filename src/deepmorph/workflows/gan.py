"""GANs of galaxy stamps: train a DCGAN, train its f-AnoGAN encoder, and measure the GAN's quality.

Quality is measured, not eyeballed:

- physical statistics (:func:`image_statistics`: flux, half-light radius, concentration,
  ellipticity, asymmetry, all from moments and curves of growth, fast) of generated and real
  training stamps, compared with two-sample Kolmogorov-Smirnov tests (:func:`compare_statistics`);
- the Frechet distance (:func:`frechet_distance`) between generated and real stamps in the feature
  space of a trained classifier (a ``deepmorph train classify`` run, or any feature extractor),
  next to the same distance between two independent subsets of real training stamps: the scale
  of "indistinguishable".

The GAN sees images through the run's transform: ``asinh(counts / s) / data_scale`` clipped to
``[-1, 1]`` (``s`` the fitted sky sigma, :class:`~deepmorph.data.Normalization`); generated
stamps are mapped back to counts by the inverse (:func:`from_gan`) before they are measured.

A GAN run directory (``train_gan``)::

    RUN/run.json, config.yaml, model.pt (generator + discriminator), history.csv ...
    RUN/samples/epoch_NNN.png      samples from fixed latents after every epoch
    RUN/quality.json               KS statistics and p-values, Frechet distances
    RUN/quality_stats.ecsv         per statistic: KS D, p, medians of real and generated
    RUN/samples.png, statistics.png  real vs generated grid; histograms of the statistics

An encoder run (``train_encoder``) holds ``run.json`` (task ``gan-encoder``, the GAN run it
belongs to) and the encoder's ``model.pt``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.workflows.runs import load_run_weights, read_run, save_figure, save_table, train_task, write_json

#: Statistics of :func:`image_statistics`, in order.
STATISTICS = ("flux", "r50_pix", "concentration", "ellipticity", "asymmetry")


def default_config(**overrides):
    """The DCGAN's run config: Adam 2e-4, batch 64, 10 epochs, flips, no early stopping."""
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": {"name": "dcgan", "kwargs": {"latent_dim": 64, "g_width": 64, "d_width": 64}},
        "optimizer": {"name": "adam", "lr": 2e-4}, "batch_size": 64, "epochs": 10, "augmentation": "flips",
        "early_stopping": {"enabled": False, "monitor": "val_loss"},
    })
    return base.with_overrides(overrides) if overrides else base


def encoder_config(**overrides):
    """The izi encoder's run config: Adam 1e-3, batch 64, 10 epochs, early stopping on val_loss."""
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": {"name": "dcgan_encoder", "kwargs": {}}, "optimizer": {"name": "adam", "lr": 1e-3},
        "batch_size": 64, "epochs": 10, "augmentation": "flips",
        "early_stopping": {"enabled": True, "monitor": "val_loss", "patience": 4},
    })
    return base.with_overrides(overrides) if overrides else base


# -- data checks and the transform ------------------------------------------------------------------------

def check_dataset(path: str | Path, stamp_size: int | None = None) -> dict:
    """Size, channels and stamp side of a dataset file, with one-line errors naming it.

    Raises
    ------
    DeepmorphIOError
        Missing or unreadable file.
    DeepmorphValueError
        A stamp side a DCGAN cannot make, or not ``stamp_size`` when given.
    """
    from deepmorph.data import open_dataset
    from deepmorph.models.gan import stages

    path = Path(path)
    with open_dataset(path) as ds:
        n, shape = len(ds), tuple(ds.images.shape)
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise DeepmorphValueError(f"{path}: stamps must be square (N, C, S, S), got {shape}")
    if stamp_size is not None and shape[-1] != int(stamp_size):
        raise DeepmorphValueError(f"{path}: stamps are {shape[-1]}x{shape[-1]} px, the model wants "
                                  f"{stamp_size}x{stamp_size}")
    try:
        stages(shape[-1])
    except DeepmorphValueError as exc:
        raise DeepmorphValueError(f"{path}: {exc}") from None
    return {"n": n, "channels": shape[1], "stamp_size": shape[-1]}


def check_finite(images: np.ndarray, where: str | Path) -> np.ndarray:
    """``images`` unchanged, or a one-line error naming ``where`` and the first bad item."""
    bad = ~np.isfinite(np.asarray(images).reshape(len(images), -1)).all(axis=1)
    if bad.any():
        raise DeepmorphValueError(f"{where}: {int(bad.sum())} image(s) have NaN/inf pixels (first: item "
                                  f"{int(np.flatnonzero(bad)[0])})")
    return images


def to_gan(images, meta: dict) -> torch.Tensor:
    """Counts ``(N, C, S, S)`` -> the GAN's range (the run's normalisation, / data_scale, clipped)."""
    from deepmorph.data import Normalization

    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    x = Normalization.from_dict(meta["normalization"])(x)
    return (x / float(meta["data_scale"])).clamp(-1.0, 1.0)


def from_gan(x, meta: dict) -> np.ndarray:
    """The inverse of :func:`to_gan` for an ``asinh`` normalisation: the GAN's range -> counts."""
    norm = meta["normalization"]
    if norm.get("kind") != "asinh":
        raise DeepmorphValueError(f"GAN images map back to counts with an asinh normalisation, not {norm.get('kind')}")
    y = np.asarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float64) * float(meta["data_scale"])
    scale = np.asarray(norm["scale"], dtype=np.float64)[None, :, None, None]
    return (np.sinh(y) * scale).astype(np.float32)


def fit_data_scale(normalised: np.ndarray, quantile: float = 0.995) -> float:
    """The divisor that puts normalised images into ``[-1, 1]``: 1.05 x the ``quantile`` of the per-image peaks."""
    peaks = np.abs(np.asarray(normalised)).reshape(len(normalised), -1).max(axis=1)
    return float(1.05 * np.quantile(peaks, quantile)) or 1.0


# -- training ---------------------------------------------------------------------------------------------

def train_gan(data: str | Path, out: str | Path, config=None, loss: str = "bce", d_steps: int = 1,
              label_smoothing: float = 0.0, spectral_norm: bool | None = None, latent_dim: int | None = None,
              gp_weight: float = 10.0, feature_matching: float = 0.0, split=None, resume: bool = True,
              evaluate: bool = True, n_eval: int = 2000, classifier=None, noise: str | float = "sky") -> dict:
    """Train a DCGAN on the stamps of ``data`` (e.g. normal galaxies) into the run ``out``.

    Parameters
    ----------
    data : path
        A dataset file (simulated or imported), square stamps of a DCGAN size (32, 48, 64, ...).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`; ``model.kwargs`` are :class:`~deepmorph.models.gan.GAN`'s.
    loss, d_steps, label_smoothing, gp_weight, feature_matching
        :class:`~deepmorph.tasks.adversarial.AdversarialTask`'s options.
    spectral_norm, latent_dim : optional
        Override ``model.kwargs``. The discriminator's normalisation defaults to none with spectral
        norm, layer norm with ``wgan-gp``, batch norm otherwise.
    split : Split, optional
        Train/val/test split (default 80/10/10, seed 0); the GAN trains on train.
    evaluate : bool
        Measure the quality afterwards (:func:`gan_quality` with ``n_eval`` stamps).
    classifier : path or callable, optional
        Feature extractor of the Frechet distance (a classify run, or ``counts -> (N, F)``).
    noise : {"sky", "none"} or float
        Who makes the noise. ``"sky"``: the generator draws noise-free galaxies and the GAN adds the
        survey's noise itself (``GAN.observe``), with the sky sigma and gain of the dataset's noise
        model when it records them (simulations), else the sky sigma fitted on the training stamps
        and no Poisson term; a float is the sky sigma in counts. ``"none"``: the generator draws
        the noise too (a plain DCGAN).

    Returns
    -------
    dict
        ``train_size``, ``epochs_run``, ``train_seconds``, and :func:`gan_quality`'s results.
    """
    from deepmorph.data import StampDataset
    from deepmorph.models import create_model
    from deepmorph.tasks.adversarial import AdversarialTask
    from deepmorph.workflows.classify import Split
    from deepmorph.workflows.runs import fitted_normalization, training_augmentation

    data, out = Path(data), Path(out)
    config = config or default_config()
    split = split or Split()
    info = check_dataset(data)
    kwargs = dict(config.model.kwargs)
    if latent_dim is not None:
        kwargs["latent_dim"] = int(latent_dim)
    if spectral_norm is not None:
        kwargs["spectral_norm"] = bool(spectral_norm)
    kwargs.setdefault("d_norm", "none" if kwargs.get("spectral_norm") else ("layer" if loss == "wgan-gp" else "batch"))
    kwargs.update(in_channels=info["channels"], image_size=info["stamp_size"])
    config = config.with_overrides({"model": {"name": "dcgan", "kwargs": kwargs}})
    parts = split.indices(info["n"])
    norm, config = fitted_normalization(config, data, parts["train"])
    sets = {k: StampDataset(data, idx, target=None, normalization=norm, in_memory=True) for k, idx in parts.items()}
    for s in sets.values():
        _check_items(s, data)
    sample = sets["train"].batch(np.arange(min(len(sets["train"]), 4096)))["image"].numpy()
    scale = fit_data_scale(sample)
    kwargs.update(noise_model(data, norm, noise), data_scale=scale)
    config = config.with_overrides({"model": {"name": "dcgan", "kwargs": kwargs}})
    torch.manual_seed(int(config.seed))  # the initial weights: reproducible from the config's seed
    model = create_model("dcgan", **kwargs)
    task = AdversarialTask(model, config, loss=loss, d_steps=d_steps, label_smoothing=label_smoothing,
                           gp_weight=gp_weight, feature_matching=feature_matching, data_scale=scale,
                           betas=(0.0, 0.9) if loss == "wgan-gp" else (0.5, 0.999), sample_dir=out / "samples",
                           augmentation=training_augmentation(config))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "gan", "method": "dcgan", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "normalization": norm.to_dict(),
        "data_scale": scale, "in_channels": info["channels"], "stamp_size": info["stamp_size"],
        "latent_dim": int(kwargs.get("latent_dim", 64)), "model_kwargs": kwargs, "loss": loss,
        "d_steps": int(d_steps), "label_smoothing": float(label_smoothing), "gp_weight": float(gp_weight),
        "spectral_norm": bool(kwargs.get("spectral_norm", False)), "feature_matching": float(feature_matching),
    })
    history, seconds = train_task(task, sets, config, out, resume)
    result = {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds,
              "d_loss": history.history.get("d_loss", [float("nan")])[-1],
              "g_loss": history.history.get("g_loss", [float("nan")])[-1]}
    if evaluate:
        result.update(gan_quality(out, n=n_eval, classifier=classifier))
    return result


def noise_model(data: str | Path, norm, noise: str | float = "sky") -> dict:
    """``noise_sigma`` and ``poisson_scale`` of a GAN that adds the noise itself (see :func:`train_gan`)."""
    if isinstance(noise, str) and noise == "none":
        return {"noise_sigma": 0.0, "poisson_scale": 0.0}
    if norm.kind != "asinh":
        raise DeepmorphValueError(f"a GAN adds the noise itself only with an asinh normalisation, not {norm.kind}")
    s = float(np.asarray(norm.scale, dtype=np.float64).ravel()[0])
    if isinstance(noise, str):
        if noise != "sky":
            raise DeepmorphValueError(f"GAN noise must be 'sky', 'none' or a sky sigma in counts, got {noise!r}")
        from deepmorph.data import open_dataset

        with open_dataset(data) as ds:
            recorded = ds.attrs.get("noise") or {}
        sigma = float(recorded.get("sky_sigma") or s)
        gain = recorded.get("gain_e_per_count")
        return {"noise_sigma": sigma / s, "poisson_scale": 1.0 / (float(gain) * s) if gain else 0.0}
    sigma = float(noise)
    if not sigma > 0:
        raise DeepmorphValueError(f"GAN sky sigma must be positive, got {noise}")
    return {"noise_sigma": sigma / s, "poisson_scale": 0.0}


def _check_items(dataset, data: Path) -> None:
    """NaN/inf pixels in the items of an in-memory dataset -> one-line error naming the file."""
    memory = getattr(dataset, "_memory", None)
    if memory is not None:
        check_finite(memory[dataset.image_array], data)


def load_gan(run: str | Path) -> tuple[torch.nn.Module, dict]:
    """The trained :class:`~deepmorph.models.gan.GAN` of a run (eval mode, CPU) and its ``run.json``."""
    from deepmorph.models import create_model

    run = Path(run)
    meta = read_run(run, "gan", ("dcgan",), what="GAN")
    model = create_model("dcgan", **meta["model_kwargs"])
    return load_run_weights(model, run).eval(), meta


def train_encoder(run: str | Path, data: str | Path | None, out: str | Path, config=None, kappa: float = 1.0,
                  split=None, resume: bool = True) -> dict:
    """Train f-AnoGAN's izi_f encoder of a GAN run on normal stamps (default: the GAN's own data and split).

    Returns
    -------
    dict
        ``train_size``, ``epochs_run``, ``train_seconds``, ``val_loss`` (the last epoch's).
    """
    from deepmorph.data import Normalization, StampDataset
    from deepmorph.models.gan import DCGANEncoder
    from deepmorph.tasks.adversarial import EncoderTask
    from deepmorph.workflows.classify import Split
    from deepmorph.workflows.runs import training_augmentation

    gan, meta = load_gan(run)
    data = Path(data) if data is not None else Path(meta["data"])
    out = Path(out)
    info = check_dataset(data, meta["stamp_size"])
    if info["channels"] != meta["in_channels"]:
        raise DeepmorphValueError(f"{data}: {info['channels']} channel(s), the GAN has {meta['in_channels']}")
    split = split or Split(meta["split_seed"], tuple(meta["fractions"]))
    config = config or encoder_config()
    ekw = {"latent_dim": meta["latent_dim"], "in_channels": meta["in_channels"], "image_size": meta["stamp_size"],
           "width": int(meta["model_kwargs"].get("d_width", 64))}
    config = config.with_overrides({"model": {"name": "dcgan_encoder", "kwargs": ekw},
                                    "normalization": meta["normalization"]})
    norm = Normalization.from_dict(meta["normalization"])
    parts = split.indices(info["n"])
    sets = {k: StampDataset(data, idx, target=None, normalization=norm, in_memory=True) for k, idx in parts.items()}
    for s in sets.values():
        _check_items(s, data)
    torch.manual_seed(int(config.seed))
    encoder = DCGANEncoder(**ekw)
    task = EncoderTask(encoder, gan.generator, gan.discriminator, config, kappa=kappa,
                       data_scale=float(meta["data_scale"]), augmentation=training_augmentation(config),
                       observe=gan.observe if gan.adds_noise else None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "gan-encoder", "method": "izi", "gan_run": str(Path(run).resolve()), "data": str(data.resolve()),
        "split_seed": split.seed, "fractions": list(split.fractions), "train_size": len(parts["train"]),
        "kappa": float(kappa), "encoder_kwargs": ekw,
    })
    history, seconds = train_task(task, sets, config, out, resume)
    return {"train_size": len(parts["train"]), "epochs_run": len(history.epoch), "train_seconds": seconds,
            "val_loss": history.history.get("val_loss", [float("nan")])[-1]}


def load_encoder(run: str | Path):
    """An encoder run's encoder (eval, CPU), its GAN (:func:`load_gan`), the GAN's and the encoder's ``run.json``."""
    from deepmorph.models.gan import DCGANEncoder

    run = Path(run)
    emeta = read_run(run, "gan-encoder", ("izi",), what="GAN encoder")
    gan, meta = load_gan(emeta["gan_run"])
    encoder = load_run_weights(DCGANEncoder(**emeta["encoder_kwargs"]), run)
    return encoder.eval(), gan, meta, emeta


@torch.no_grad()
def generate(gan, n: int, seed: int = 0, batch_size: int = 512, observed: bool = True) -> torch.Tensor:
    """``n`` generated stamps (the GAN's range) from latents drawn with ``seed``; ``observed``: with
    the noise the GAN adds itself (``GAN.observe``, drawn with the same seed), as a survey sees them."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(int(n), gan.latent_dim, generator=gen)
    images = torch.cat([gan.generator(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])
    observe = getattr(gan, "observe", None)
    return observe(images, generator=gen) if observed and observe is not None else images


# -- physical statistics and two-sample tests ---------------------------------------------------------------

def image_statistics(images, sky_sigma: float | None = None, detect_nsigma: float = 2.0) -> dict[str, np.ndarray]:
    """Physical statistics of stamps ``(N, [C,] S, S)`` (first channel), in counts and pixels.

    - ``flux``: sum of the stamp;
    - ``r50_pix``: radius of the circle around the light-weighted centre holding half the light
      (curve of growth out to ``S/2``); ``concentration``: ``5 log10(r80 / r20)`` (Bershady et al. 2000);
    - ``ellipticity``: ``1 - b/a`` from the second moments of the pixels above ``detect_nsigma`` sky sigmas;
    - ``asymmetry``: ``sum |I - I_180| / (2 sum |I|)`` over those pixels and their rotated twins
      (rotation about the stamp centre; Conselice 2000, without the background term).

    Parameters
    ----------
    sky_sigma : float, optional
        The sky noise; default: the median over the stamps of their edge-ring sigma.
    """
    from deepmorph.data import sky_sigma as ring_sigma

    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] == 0:
        raise DeepmorphValueError(f"image_statistics expects (N, S, S) stamps, got shape {np.shape(images)}")
    n, h, w = x.shape
    if sky_sigma is None:
        sky_sigma = float(np.median([ring_sigma(img) for img in x[: min(n, 500)]]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    det = x > detect_nsigma * sky_sigma
    wgt = np.where(det, x, 0.0)
    tot = wgt.sum(axis=(1, 2))
    safe = np.where(tot > 0, tot, 1.0)
    cx = np.where(tot > 0, (wgt * xx).sum(axis=(1, 2)) / safe, 0.5 * (w - 1))
    cy = np.where(tot > 0, (wgt * yy).sum(axis=(1, 2)) / safe, 0.5 * (h - 1))
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    ixx = (wgt * dx * dx).sum(axis=(1, 2)) / safe
    iyy = (wgt * dy * dy).sum(axis=(1, 2)) / safe
    ixy = (wgt * dx * dy).sum(axis=(1, 2)) / safe
    tr, diff = ixx + iyy, np.sqrt((ixx - iyy) ** 2 + 4 * ixy**2)
    lmax, lmin = 0.5 * (tr + diff), np.clip(0.5 * (tr - diff), 0.0, None)
    ell = np.where(lmax > 0, 1.0 - np.sqrt(lmin / np.where(lmax > 0, lmax, 1.0)), np.nan)
    # curve of growth
    r = np.sqrt(dx**2 + dy**2).reshape(n, -1)
    v = x.reshape(n, -1)
    order = np.argsort(r, axis=1)
    rs, vs = np.take_along_axis(r, order, 1), np.take_along_axis(v, order, 1)
    inside = rs <= 0.5 * min(h, w)
    cum = np.cumsum(np.where(inside, vs, 0.0), axis=1)
    total = cum[:, -1]

    def radius(frac):
        target = frac * total
        k = np.argmax(cum >= target[:, None], axis=1)
        out = rs[np.arange(n), k]
        return np.where(total > 0, out, np.nan)

    r20, r50, r80 = radius(0.2), radius(0.5), radius(0.8)
    conc = 5.0 * np.log10(np.maximum(r80, 0.5) / np.maximum(r20, 0.5))
    rot = x[:, ::-1, ::-1]
    region = det | det[:, ::-1, ::-1]
    num = np.where(region, np.abs(x - rot), 0.0).sum(axis=(1, 2))
    den = 2.0 * np.where(region, np.abs(x), 0.0).sum(axis=(1, 2))
    asym = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return {"flux": x.sum(axis=(1, 2)), "r50_pix": r50, "concentration": conc, "ellipticity": ell,
            "asymmetry": asym}


def ks_test(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and p-value (NaNs dropped; scipy's exact/asymptotic p)."""
    from scipy.stats import ks_2samp

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def compare_statistics(real: dict, generated: dict, names=STATISTICS):
    """Per statistic: KS D and p-value, and the medians of the real and the generated stamps (a Table)."""
    from astropy.table import Table

    rows = []
    for name in names:
        d, p = ks_test(real[name], generated[name])
        rows.append((name, d, p, float(np.nanmedian(real[name])), float(np.nanmedian(generated[name])),
                     int(np.isfinite(real[name]).sum()), int(np.isfinite(generated[name]).sum())))
    return Table(rows=rows, names=("statistic", "ks_d", "ks_p", "median_real", "median_generated", "n_real",
                                   "n_generated"))


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, F)`` (FID's formula).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise DeepmorphValueError(f"frechet_distance needs two (N, F) feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(sa))
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean))


def feature_extractor(classifier) -> Callable[[np.ndarray], np.ndarray]:
    """``counts (N, C, S, S) -> features (N, F)``: a callable as it is, or a classify run's CNN
    (its normalisation, then its pooled last feature map)."""
    if callable(classifier):
        return classifier
    from deepmorph.data import Normalization
    from deepmorph.workflows.classify import load_cnn, load_run

    meta = load_run(classifier)
    if meta.get("method") != "cnn":
        raise DeepmorphValueError(f"{classifier}: a {meta.get('method')} classify run has no CNN features")
    model = load_cnn(classifier)
    norm = Normalization.from_dict(meta["normalization"])

    @torch.no_grad()
    def extract(images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = norm(torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32)))
            f = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
            out.append((f.mean(dim=(-2, -1)) if f.ndim == 4 else f).numpy())
        return np.concatenate(out)

    return extract


def gan_quality(run: str | Path, data: str | Path | None = None, n: int = 2000, classifier=None, seed: int = 0,
                figures: bool = True) -> dict:
    """How well a GAN run's samples match its real training stamps.

    ``n`` real training stamps and ``n`` generated ones are measured (:func:`image_statistics`, the
    sky sigma of the real ones for both) and compared with KS tests; with a ``classifier``, the
    Frechet distance between ``n/2`` generated and ``n/2`` real stamps is given next to the one
    between the two disjoint halves of the real stamps (``fd_real_real``).

    Returns
    -------
    dict
        ``ks``: {statistic: {"d", "p"}}, ``n_real``, ``n_generated``, and with a classifier
        ``fd_generated_real`` and ``fd_real_real``. Writes the files listed in the module docstring.
    """
    from deepmorph.data import open_dataset, sky_sigma
    from deepmorph.workflows.classify import Split

    run = Path(run)
    gan, meta = load_gan(run)
    data = Path(data) if data is not None else Path(meta["data"])
    info = check_dataset(data, meta["stamp_size"])
    parts = Split(meta["split_seed"], tuple(meta["fractions"])).indices(info["n"])
    rng = np.random.default_rng(seed)
    train = parts["train"]
    pick = np.sort(rng.choice(train, size=min(int(n), len(train)), replace=False))
    with open_dataset(data) as ds:
        real = check_finite(np.asarray(ds.images[...][pick], dtype=np.float32), data)
    # Real stamps pass through the GAN's clipping too, so both sides see the same range.
    real = from_gan(to_gan(real, meta), meta)
    fake = from_gan(generate(gan, len(real), seed=seed + 1), meta)
    sigma = float(np.median([sky_sigma(img[0]) for img in real[:500]]))
    s_real, s_fake = image_statistics(real, sigma), image_statistics(fake, sigma)
    table = compare_statistics(s_real, s_fake)
    result = {"n_real": len(real), "n_generated": len(fake),
              "ks": {str(row["statistic"]): {"d": float(row["ks_d"]), "p": float(row["ks_p"])} for row in table}}
    if classifier is not None:
        extract = feature_extractor(classifier)
        half = len(real) // 2
        f_real = extract(real)
        f_fake = extract(fake[:half])
        result["fd_generated_real"] = frechet_distance(f_fake, f_real[:half])
        result["fd_real_real"] = frechet_distance(f_real[half:2 * half], f_real[:half])
        result["fd_n"] = half
    save_table(table, run / "quality_stats.ecsv")
    write_json(run / "quality.json", result)
    if figures:
        import matplotlib.pyplot as plt

        for fig, name in ((samples_figure(real[:32], fake[:32], sigma), "samples.png"),
                          (statistics_figure(s_real, s_fake, table), "statistics.png")):
            save_figure(fig, run / name)
            plt.close(fig)
    return result


def samples_figure(real: np.ndarray, generated: np.ndarray, sky_sigma: float, ncol: int = 8):
    """Real (left) and generated (right) stamps, asinh-stretched at the sky noise."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from deepmorph.tasks.adversarial import image_grid

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, imgs, title in ((axes[0], real, "real"), (axes[1], generated, "generated")):
        grid = np.arcsinh(image_grid(imgs, ncol) / sky_sigma)
        ax.imshow(np.nan_to_num(grid, nan=0.0), cmap="gray", origin="lower", vmin=-2, vmax=np.nanpercentile(grid, 99.5))
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return fig


def statistics_figure(real: dict, generated: dict, table=None):
    """Histograms of each statistic, real vs generated, with the KS p-value."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STATISTICS), figsize=(3.2 * len(STATISTICS), 3.0))
    for k, (ax, name) in enumerate(zip(axes, STATISTICS, strict=True)):
        a, b = np.asarray(real[name], float), np.asarray(generated[name], float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if name == "flux":
            a, b = np.log10(np.clip(a, 1e-3, None)), np.log10(np.clip(b, 1e-3, None))
        both = np.concatenate([a, b])
        bins = np.linspace(*np.nanpercentile(both, [0.5, 99.5]), 31) if both.size else 10
        ax.hist(a, bins=bins, histtype="step", density=True, label="real", color="k")
        ax.hist(b, bins=bins, histtype="step", density=True, label="generated", color="C1")
        ax.set_xlabel("log10 flux (counts)" if name == "flux" else name)
        if table is not None:
            ax.set_title(f"KS p = {float(table['ks_p'][k]):.2g}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["STATISTICS", "check_dataset", "compare_statistics", "default_config", "encoder_config",
           "feature_extractor", "fit_data_scale", "frechet_distance", "from_gan", "gan_quality", "generate",
           "image_statistics", "ks_test", "load_encoder", "load_gan", "to_gan", "train_encoder", "train_gan"]
