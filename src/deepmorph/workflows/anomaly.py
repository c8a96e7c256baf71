"""GAN-based anomaly detection: AnoGAN's latent search, f-AnoGAN's encoder, residual maps, the benchmark.

A GAN trained on normal galaxies only generates normal galaxies, so an image it cannot reproduce is
anomalous. For an image ``x`` (in the GAN's range, :func:`deepmorph.workflows.gan.to_gan`) and a
latent ``z`` the anomaly score is AnoGAN's (Schlegl et al. 2017)::

    A(x) = (1 - lambda) R(x) + lambda D(x),   R = sum_pixels |x - G(z)|,
                                              D = sum_features |f(x) - f(G(z))|

with ``f`` the discriminator's last feature stage (:meth:`~deepmorph.models.gan.DCGANDiscriminator.features`).
Two ways to find ``z``:

- ``anogan``: ``z*`` by gradient descent (Adam) on ``A`` itself, from a random start, ``steps`` steps
  of learning rate ``lr`` (:func:`latent_search`) -- the lecture's method, slow;
- ``izi``: ``z = E(x)``, one pass of f-AnoGAN's trained encoder (Schlegl et al. 2019) -- fast.
  The latent search started from ``E(x)`` with zero steps gives the same score by construction.

A third, model-agnostic score is the reconstruction residual of any autoencoder or VAE
(:func:`reconstruction_scorer`: ``sum |x - x'|`` with ``x'`` from ``decode(encode(x))`` or ``forward(x)``).

The residual map ``|x - G(z)|`` localises the anomaly (:func:`residual_maps_png`, FITS via
:func:`rank_images`). Thresholds are chosen on normal galaxies: the image threshold is the
``1 - fpr`` quantile of their scores (:func:`choose_threshold`: a target false-positive rate), the
pixel threshold of residual maps the ``1 - pixel_fpr`` quantile of their residual pixels.
:func:`evaluate_anomalies` scores a benchmark (:mod:`deepmorph.simulate.anomalies`) with every
method on the same images and gives :func:`anomaly_table`: ROC AUC per anomaly kind and family,
true-positive rate at the threshold, IoU of the thresholded residual map with the injected
anomaly's mask, and seconds per image. The benchmark's normal galaxies are split in two (even and
odd items): the even ones set the thresholds, the odd ones measure the false-positive rate reached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.runs import save_figure, save_table, write_json

METHODS = ("anogan", "izi")
#: Reductions of the residual map to one number: AnoGAN's sum, the largest pixel, and the largest
#: standardised matched-filter maximum (:class:`ResidualCalibration`).
REDUCTIONS = ("sum", "max", "scan")
#: The matched filters of the ``scan`` reduction: a pixel, Gaussian blobs (sigma in pixels) and
#: 7-pixel lines at four angles (degrees), for cosmic rays, clumps/companions, and trails/columns.
SCAN_FILTERS = (("point", None), ("blob1", 1.0), ("blob2", 2.0), ("line0", 0.0), ("line45", 45.0),
                ("line90", 90.0), ("line135", 135.0))


def _line_kernel(angle_deg: float, length: int = 7) -> np.ndarray:
    """A normalised ``length``-pixel line through the centre at ``angle_deg`` from +x."""
    k = np.zeros((length, length), np.float32)
    c = length // 2
    for t in np.linspace(-c, c, 4 * length):
        k[int(round(c + t * np.sin(np.radians(angle_deg)))), int(round(c + t * np.cos(np.radians(angle_deg))))] = 1.0
    return k / k.sum()


def filter_maps(z: np.ndarray) -> dict[str, np.ndarray]:
    """``|filtered z| / noise gain`` for each of :data:`SCAN_FILTERS`: unit-variance maps for white ``z``."""
    from scipy import ndimage

    out = {}
    for name, arg in SCAN_FILTERS:
        if arg is None:
            out[name] = np.abs(z)
        elif name.startswith("blob"):
            delta = np.zeros((8 * int(np.ceil(arg)) + 9,) * 2, np.float32)
            delta[len(delta) // 2, len(delta) // 2] = 1.0
            gain = float(np.sqrt((ndimage.gaussian_filter(delta, arg) ** 2).sum()))
            out[name] = np.abs(ndimage.gaussian_filter(z, (0, arg, arg), mode="nearest")) / gain
        else:
            k = _line_kernel(arg)
            out[name] = np.abs(ndimage.convolve(z, k[None], mode="nearest")) / float(np.sqrt((k ** 2).sum()))
    return out


class ResidualCalibration:
    """How residuals of normal galaxies behave, for the ``scan`` reduction of any reconstruction method.

    Fitted on normal galaxies (signed residuals ``x - x'`` and reconstructions ``x'``):

    1. the residual's robust scale (1.4826 MAD) in quantile bins of the reconstructed level
       (interpolated between the bins' median levels): noise plus the model's own error, which is
       larger in bright galaxy cores than in the sky, so ``z = (x - x') / scale(x')`` is comparable
       everywhere;
    2. for each matched filter (:data:`SCAN_FILTERS`), the median and MAD of the images' largest
       filtered ``|z|``.

    An image's ``scan`` statistic is the largest standardised filter maximum,
    ``max_f (max filtered |z|_f - median_f) / MAD_f``: a multiple-filter scan calibrated on normal
    galaxies. :meth:`scan` also returns the pixel-wise largest filtered ``|z|``; anomalies are
    localised on the unfiltered :meth:`significance` map, which keeps their shape.

    Parameters
    ----------
    edges : array
        Median reconstructed level of each bin (increasing; the input's units).
    scales : array
        Residual scale at those levels.
    peaks : dict
        Filter name -> (median, MAD) of normal images' largest filtered ``|z|``.
    """

    def __init__(self, edges, scales, peaks: dict):
        self.edges = np.asarray(edges, np.float64)
        self.scales = np.asarray(scales, np.float64)
        self.peaks = {k: (float(v[0]), float(v[1])) for k, v in peaks.items()}

    @classmethod
    def fit(cls, residual, level, bins: int = 20) -> ResidualCalibration:
        """Fit on normal galaxies' signed residual maps and reconstructions ``(N, S, S)``."""
        r, lev = np.asarray(residual, np.float64), np.asarray(level, np.float64)
        if r.shape != lev.shape or r.ndim != 3 or len(r) < 2:
            raise DeepmorphValueError(f"calibration needs >= 2 residual maps and reconstructions of one shape (N, S, "
                                      f"S), got {r.shape} and {lev.shape}")
        # quantile bins, finer in the bright tail (few pixels, fast-changing scale)
        q = np.r_[np.linspace(0.0, 0.9, int(bins) + 1)[1:-1], 1.0 - 0.1 * 0.5 ** np.arange(7)]
        edges = np.unique(np.quantile(lev, q))
        idx = np.digitize(lev, edges)
        keep = [k for k in range(len(edges) + 1) if (idx == k).sum() >= 10]
        centres = np.array([np.median(lev[idx == k]) for k in keep])
        scales = np.array([1.4826 * np.median(np.abs(r[idx == k])) for k in keep])
        good = scales > 0
        if not good.any():
            raise DeepmorphValueError("calibration: the normal galaxies' residuals are all zero")
        self = cls(centres[good], scales[good], {})
        maps = filter_maps(self.z(r, lev))
        for name, m in maps.items():
            peak = m.reshape(len(m), -1).max(1)
            med = float(np.median(peak))
            self.peaks[name] = (med, float(1.4826 * np.median(np.abs(peak - med))) or 1.0)
        return self

    def z(self, residual, level) -> np.ndarray:
        """Residuals in units of the normal galaxies' scale at their reconstructed level."""
        r = np.asarray(residual, np.float32)
        return (r / np.interp(np.asarray(level, np.float64), self.edges, self.scales)).astype(np.float32)

    def significance(self, residual, level, sign: str = "positive") -> np.ndarray:
        """Per-pixel significance map for localising anomalies: :meth:`z` clipped at 0 (``positive``:
        every injected kind adds light, and the light a reconstruction puts where the image has none
        is the model's error, not an anomaly) or ``|z|`` (``both``: also cold defects)."""
        if sign not in ("positive", "both"):
            raise DeepmorphValueError(f"significance sign must be 'positive' or 'both', got {sign!r}")
        z = self.z(residual, level)
        return np.clip(z, 0.0, None) if sign == "positive" else np.abs(z)

    def scan(self, residual, level) -> tuple[np.ndarray, np.ndarray]:
        """``(score (N,), significance map (N, S, S))`` of signed residuals and reconstructions."""
        maps = filter_maps(self.z(residual, level))
        stats = [(m.reshape(len(m), -1).max(1) - self.peaks[k][0]) / self.peaks[k][1] for k, m in maps.items()]
        return np.max(stats, axis=0), np.max(list(maps.values()), axis=0)

    def to_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "scales": self.scales.tolist(),
                "peaks": {k: list(v) for k, v in self.peaks.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> ResidualCalibration:
        return cls(d["edges"], d["scales"], d["peaks"])


def calibrate_scan(results: dict, calibration, lam: float = 0.0, sign: str = "positive") -> dict:
    """Each method's result re-scored with the ``scan`` statistic, calibrated on the images ``calibration``.

    Parameters
    ----------
    results : dict
        Method -> scoring result with ``signed_residual`` and ``level`` maps (:func:`score_images`,
        :func:`reconstruction_scorer`); others are passed through unchanged.
    calibration : boolean array (N,)
        Normal images to calibrate on.
    lam : float
        Weight of the discriminator-feature distance, itself standardised (median, MAD) on the
        calibration images, where a result has one: ``(1 - lam) scan + lam D``.
    sign : {"positive", "both"}
        Which residuals the localisation map keeps (:meth:`ResidualCalibration.significance`).

    Returns
    -------
    dict
        Method -> result with ``score`` the scan statistic, ``residual_map`` the per-pixel
        significance map (unfiltered, so that it keeps the anomaly's shape; the filters only
        score) and ``calibration`` the fitted :class:`ResidualCalibration`.
    """
    cal = np.asarray(calibration, bool)
    out = {}
    for name, r in results.items():
        if "signed_residual" not in r or "level" not in r:
            out[name] = r
            continue
        fit = ResidualCalibration.fit(r["signed_residual"][cal], r["level"][cal])
        score, _ = fit.scan(r["signed_residual"], r["level"])
        maps = fit.significance(r["signed_residual"], r["level"], sign)
        if lam and r.get("feature") is not None:
            d = np.asarray(r["feature"], np.float64)
            med = np.median(d[cal])
            score = (1.0 - lam) * score + lam * (d - med) / (1.4826 * np.median(np.abs(d[cal] - med)) or 1.0)
        out[name] = {**r, "score": score, "residual_map": maps, "calibration": fit}
    return out


# -- scores ------------------------------------------------------------------------------------------------

def anomaly_score(generator, discriminator, x: torch.Tensor, z: torch.Tensor, lam: float = 0.1,
                  x_features: torch.Tensor | None = None, power: float = 1.0,
                  reduce: str = "sum", observe=None) -> dict[str, torch.Tensor]:
    """AnoGAN's score of images ``x`` ``(B, C, S, S)`` at latents ``z`` ``(B, L)``.

    ``power`` p generalises the residual to ``R = sum |x - G(z)|^p`` (AnoGAN: p = 1; p = 2 weighs a
    few strongly deviating pixels, e.g. a cosmic ray, more than the noise spread over the whole stamp);
    ``reduce="max"`` takes the largest pixel residual instead of the sum (a compact-anomaly
    statistic; the latent search still minimises the sum); ``reduce="scan"`` computes the sum here:
    the scan statistic needs a calibration on normal galaxies (:func:`calibrate_scan`).
    ``observe`` (a GAN's noise model, e.g. ``lambda rec: gan.observe(rec, noise)`` with fixed
    ``noise``) is applied to the reconstruction before the discriminator compares it with ``x``: a
    GAN that adds the noise itself reconstructs noise-free galaxies, so R is then the anomaly plus
    the noise alone.

    Returns
    -------
    dict
        ``score`` ``(1 - lam) R + lam D``, ``residual`` R, ``feature`` D (each ``(B,)``) and
        ``reconstruction`` ``G(z)``.
    """
    if not 0.0 <= lam <= 1.0:
        raise DeepmorphValueError(f"lambda must be in [0, 1], got {lam}")
    rec = generator(z)
    if not power > 0:
        raise DeepmorphValueError(f"residual power must be positive, got {power}")
    if reduce not in REDUCTIONS:
        raise DeepmorphValueError(f"residual reduction must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    pixels = ((x - rec).abs() ** power).flatten(1)
    r = pixels.amax(1) if reduce == "max" else pixels.sum(1)
    fx = discriminator.features(x) if x_features is None else x_features
    d = (fx - discriminator.features(rec if observe is None else observe(rec))).abs().sum(1)
    return {"score": (1.0 - lam) * r + lam * d, "residual": r, "feature": d, "reconstruction": rec}


def _observer(gan, x: torch.Tensor, seed: int):
    """The GAN's noise model with one fixed noise draw for the images ``x`` (None if it adds no noise)."""
    if not getattr(gan, "adds_noise", False):
        return None
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed) + 7)).to(x)
    return lambda rec: gan.observe(rec, noise)


def latent_search(gan, x: torch.Tensor, steps: int = 100, lr: float = 0.05, lam: float = 0.1,
                  z0: torch.Tensor | None = None, seed: int = 0, power: float = 1.0) -> torch.Tensor:
    """``z*``: ``steps`` Adam steps on the latents minimising :func:`anomaly_score` (each image its own ``z``).

    ``z0`` is the start (default standard normal drawn with ``seed``); the networks stay frozen.
    """
    if int(steps) != steps or steps < 0:
        raise DeepmorphValueError(f"latent search steps must be a non-negative integer, got {steps}")
    if not lr > 0:
        raise DeepmorphValueError(f"latent search learning rate must be positive, got {lr}")
    g, d = gan.generator, gan.discriminator
    if z0 is None:
        z0 = torch.randn(len(x), gan.latent_dim, generator=torch.Generator().manual_seed(int(seed))).to(x)
    z = z0.detach().clone().requires_grad_(True)
    if steps == 0:
        return z.detach()
    params = [p for p in (*g.parameters(), *d.parameters())]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    observe = _observer(gan, x, seed)
    try:
        with torch.no_grad():
            fx = d.features(x)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss = anomaly_score(g, d, x, z, lam, x_features=fx, power=power, observe=observe)["score"].sum()
            loss.backward()
            opt.step()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return z.detach()


def score_images(gan, x: torch.Tensor, method: str = "izi", encoder=None, lam: float = 0.1, steps: int = 100,
                 lr: float = 0.05, batch_size: int = 256, seed: int = 0, init: str = "random",
                 power: float = 1.0, reduce: str = "sum") -> dict:
    """Anomaly scores and residual maps of images ``x`` (the GAN's range) by ``method``.

    Parameters
    ----------
    method : {"anogan", "izi"}
        Latent search, or the encoder (``encoder`` needed).
    init : {"random", "encoder"}
        Start of the latent search (``encoder``: from ``E(x)``, needs ``encoder``).
    power, reduce
        Power of the pixel residual and its reduction (:func:`anomaly_score`).

    Returns
    -------
    dict
        numpy arrays ``score``, ``residual``, ``feature`` ``(N,)``, ``residual_map`` ``(N, S, S)``
        (first channel), ``signed_residual`` ``x - G(z*)`` and ``level`` ``G(z*)`` ``(N, S, S)`` (for
        :func:`calibrate_scan`), ``z`` ``(N, L)``, ``reconstruction`` ``(N, C, S, S)``, and
        ``seconds_per_image`` (wall time of the scoring alone).
    """
    if method not in METHODS:
        raise DeepmorphValueError(f"anomaly method must be one of {', '.join(METHODS)}, got {method!r}")
    if (method == "izi" or init == "encoder") and encoder is None:
        raise DeepmorphValueError(f"the {method} method{' with init=encoder' if method == 'anogan' else ''} "
                                  "needs a trained encoder (deepmorph train anomaly-encoder)")
    x = torch.as_tensor(x, dtype=torch.float32)
    gan.eval()
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    out = {k: [] for k in ("score", "residual", "feature", "residual_map", "z", "reconstruction", "signed_residual",
                           "level")}
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        with torch.no_grad():
            z0 = encoder(xb) if encoder is not None and (method == "izi" or init == "encoder") else None
        if method == "anogan":
            z = latent_search(gan, xb, steps, lr, lam, z0=z0, seed=seed * 100003 + i, power=power)
        else:
            z = z0
        with torch.no_grad():
            s = anomaly_score(gan.generator, gan.discriminator, xb, z, lam, power=power, reduce=reduce,
                              observe=_observer(gan, xb, seed * 100003 + i))
        out["score"].append(s["score"].numpy())
        out["residual"].append(s["residual"].numpy())
        out["feature"].append(s["feature"].numpy())
        signed = (xb - s["reconstruction"])[:, 0].numpy()
        out["signed_residual"].append(signed)
        out["level"].append(s["reconstruction"][:, 0].numpy())
        out["residual_map"].append(np.abs(signed))
        out["z"].append(z.numpy())
        out["reconstruction"].append(s["reconstruction"].numpy())
    seconds = time.perf_counter() - start
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["seconds_per_image"] = seconds / max(len(x), 1)
    return result


def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """An autoencoder's or a VAE's reconstruction of ``x``: ``decode(mean of encode(x))`` when the
    model has ``encode`` and ``decode``, else ``forward(x)`` (its first element, or the
    ``"reconstruction"`` entry of a dict)."""
    if hasattr(model, "encode") and hasattr(model, "decode"):
        enc = model.encode(x)
        mu = enc[0] if isinstance(enc, (tuple, list)) else (enc["mu"] if isinstance(enc, dict) else enc)
        out = model.decode(mu)
    else:
        out = model(x)
    if isinstance(out, dict):
        out = out.get("reconstruction", out.get("recon"))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise DeepmorphValueError(f"the model's reconstruction must have the input's shape {tuple(x.shape)}")
    return out


def robust_refit(model, x: torch.Tensor, z0: torch.Tensor, scale: torch.Tensor, steps: int = 30,
                 lr: float = 0.05, prior: bool = True) -> torch.Tensor:
    """Latents of an autoencoder/VAE refitted to images ``x`` with a robust (Cauchy) loss.

    The encoder's latent ``z0`` is a compromise between the galaxy and whatever else is in the
    stamp, so a companion or a clump is partly reconstructed and its residual shrinks. ``steps``
    Adam steps from ``z0`` minimise ``sum log(1 + ((x - decode(z)) / scale)^2) + |z|^2 / 2`` (the
    second term, the VAE's prior, only with ``prior``): pixels many ``scale`` away from the
    reconstruction stop pulling on it, so the refitted reconstruction follows the normal galaxy
    and the anomaly stays in the residual. A pose-normalised VAE's decoded image is turned back to
    the input's orientation inside the loss.

    Parameters
    ----------
    model : autoencoder or VAE with ``encode`` and ``decode``
    x : Tensor (B, C, S, S)
        Images in the model's input units.
    z0 : Tensor (B, L)
        Starting latents (the encoder's means).
    scale : Tensor broadcastable to ``x``
        Residual scale per pixel (the input's units): noise plus the model's own error.
    steps, lr : int, float
        Adam steps and learning rate.
    prior : bool
        Add the standard-normal prior's ``|z|^2 / 2``.

    Returns
    -------
    Tensor (B, L)
        The refitted latents (detached).
    """
    angle = model.pose(x).detach() if getattr(model, "align", False) else None
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(int(steps)):
            loss = torch.log1p(((x - _decoded(model, z, angle)) / scale) ** 2).sum()
            if prior:
                loss = loss + 0.5 * (z ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return z.detach()


def _decoded(model, z: torch.Tensor, angle: torch.Tensor | None) -> torch.Tensor:
    out = model.decode(z)
    if angle is not None:  # a pose-normalised VAE decodes the aligned galaxy: turn it back
        from deepmorph.models.vae import rotate_images

        out = rotate_images(out, -angle)
    return out


def reconstruction_scorer(model, transform: Callable | None = None, batch_size: int = 256,
                          reduce: str = "sum", refine_steps: int = 0, refine_scale: float = 1.0,
                          refine_lr: float = 0.05) -> Callable:
    """A scoring function ``counts (N, C, S, S) -> {"score", "residual_map", "seconds_per_image"}``
    from any autoencoder/VAE: the score is ``sum |x - x'|`` with ``x = transform(counts)`` (the model's
    own input normalisation; default identity) and ``x'`` its reconstruction (:func:`reconstruct`; a
    pose-normalised VAE's, rotated back to the input's orientation). ``reduce`` as in
    :func:`anomaly_score`; the results also hold ``signed_residual`` and ``level`` for
    :func:`calibrate_scan`.

    ``refine_steps > 0`` (models with ``encode`` and ``decode``) refits each latent with a robust
    loss (:func:`robust_refit`, ``refine_steps`` Adam steps of rate ``refine_lr``) whose scale is
    ``refine_scale`` times the residual scale at each reconstructed level, fitted (median absolute
    deviation, robust to the anomalies' few pixels) on the encoder's residuals of the scored images
    themselves, so the scorer needs no other data."""
    if reduce not in REDUCTIONS:
        raise DeepmorphValueError(f"residual reduction must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise DeepmorphValueError(f"refine_steps must be a non-negative integer, got {refine_steps!r}")
    if not refine_scale > 0:
        raise DeepmorphValueError(f"refine_scale must be positive, got {refine_scale!r}")
    refine = refine_steps > 0 and hasattr(model, "encode") and hasattr(model, "decode")

    @torch.no_grad()
    def score(images: np.ndarray) -> dict:
        model.eval()
        start = time.perf_counter()
        inputs, recs = [], []
        for i in range(0, len(images), batch_size):
            xb = torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32))
            xb = transform(xb) if transform is not None else xb
            rec = reconstruct(model, xb)
            if getattr(model, "align", False):  # a pose-normalised VAE reconstructs the aligned galaxy: turn it back
                from deepmorph.models.vae import rotate_images

                rec = rotate_images(rec, -model.pose(xb))
            inputs.append(xb)
            recs.append(rec)
        if refine and inputs:
            x_all, rec_all = torch.cat(inputs), torch.cat(recs)
            fit = ResidualCalibration.fit((x_all - rec_all)[:, 0].numpy(), rec_all[:, 0].numpy())
            for k, (xb, rec) in enumerate(zip(inputs, recs, strict=True)):
                sigma = np.interp(rec.numpy().astype(np.float64), fit.edges, fit.scales)
                enc = model.encode(xb)
                mu, logvar = enc if isinstance(enc, (tuple, list)) else (enc, None)
                z = robust_refit(model, xb, mu, refine_scale * torch.as_tensor(sigma, dtype=xb.dtype),
                                 refine_steps, refine_lr, prior=logvar is not None)
                recs[k] = _decoded(model, z, model.pose(xb) if getattr(model, "align", False) else None)
        scores, maps, signed, levels = [], [], [], []
        for xb, rec in zip(inputs, recs, strict=True):
            res = xb - rec
            signed.append(res[:, 0].numpy())
            levels.append(rec[:, 0].numpy())
            res = res.abs()
            scores.append((res.flatten(1).amax(1) if reduce == "max" else res.flatten(1).sum(1)).numpy())
            maps.append(res[:, 0].numpy())
        seconds = time.perf_counter() - start
        return {"score": np.concatenate(scores), "residual_map": np.concatenate(maps),
                "signed_residual": np.concatenate(signed), "level": np.concatenate(levels),
                "seconds_per_image": seconds / max(len(images), 1)}

    return score


def autoencoder_scorer(run: str | Path, batch_size: int = 256, reduce: str = "sum", refine_steps: int = 0,
                       refine_scale: float = 1.0) -> Callable:
    """:func:`reconstruction_scorer` of a trained autoencoder or VAE run (``deepmorph train ae|vae``),
    with the run's own input normalisation: pass it to :func:`evaluate_anomalies` as ``extra``.
    ``refine_steps``, ``refine_scale``: the robust latent refit (:func:`robust_refit`)."""
    from deepmorph.data import Normalization
    from deepmorph.workflows.latent import load_autoencoder

    model, meta = load_autoencoder(run)
    return reconstruction_scorer(model, Normalization.from_dict(meta["normalization"]), batch_size, reduce,
                                 refine_steps, refine_scale)


# -- thresholds and metrics -----------------------------------------------------------------------------

def choose_threshold(normal_scores, fpr: float = 0.05) -> float:
    """The score above which a fraction ``fpr`` of normal galaxies lies (the ``1 - fpr`` quantile).

    Flagging ``score > threshold`` then keeps the false-positive rate on normal galaxies at ``fpr``
    (on the galaxies it was chosen on; check it on others).
    """
    s = np.asarray(normal_scores, dtype=float)
    s = s[np.isfinite(s)]
    if not 0.0 < fpr < 1.0:
        raise DeepmorphValueError(f"target false-positive rate must be in (0, 1), got {fpr}")
    if s.size == 0:
        raise DeepmorphValueError("no finite normal scores to choose a threshold on")
    return float(np.quantile(s, 1.0 - fpr, method="higher"))


def roc_auc(normal_scores, anomaly_scores) -> float:
    """ROC AUC of separating anomalies (positives) from normal galaxies by score (sklearn)."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(normal_scores, float), np.asarray(anomaly_scores, float)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    return float(roc_auc_score(y, np.r_[a, b]))


def auc_by_kind(scores, kinds, groups: dict | None = None) -> dict[str, float]:
    """ROC AUC of each anomaly kind (and family in ``groups``) against the ``normal`` items."""
    from deepmorph.simulate.anomalies import GROUPS

    scores, kinds = np.asarray(scores, float), np.asarray(kinds).astype(str)
    normal = scores[kinds == "normal"]
    out = {}
    for kind in [k for k in dict.fromkeys(kinds) if k != "normal"]:
        out[kind] = roc_auc(normal, scores[kinds == kind])
    for name, members in (groups if groups is not None else GROUPS).items():
        sel = np.isin(kinds, members)
        if sel.any():
            out[name] = roc_auc(normal, scores[sel])
    out["all"] = roc_auc(normal, scores[kinds != "normal"])
    return out


def pixel_threshold(normal_maps, pixel_fpr: float = 0.003) -> float:
    """The residual above which a fraction ``pixel_fpr`` of the pixels of normal galaxies lies."""
    if not 0.0 < pixel_fpr < 1.0:
        raise DeepmorphValueError(f"pixel false-positive rate must be in (0, 1), got {pixel_fpr}")
    return float(np.quantile(np.asarray(normal_maps, dtype=float).ravel(), 1.0 - pixel_fpr))


def mask_iou(predicted, truth) -> np.ndarray:
    """Intersection over union of boolean maps ``(N, S, S)``, per image (NaN where both are empty)."""
    p = np.asarray(predicted, bool).reshape(len(predicted), -1)
    t = np.asarray(truth, bool).reshape(len(truth), -1)
    inter, union = (p & t).sum(1), (p | t).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed residual maps (``sigma`` pixels; 0 returns them unchanged)."""
    if not sigma:
        return np.asarray(maps)
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(maps, dtype=np.float32), sigma=(0, sigma, sigma))


def anomaly_table(results: dict, kinds, masks=None, fpr: float = 0.05, pixel_fpr: float = 0.003,
                  smooth: float = 0.0, calibration=None):
    """All methods in one table: ROC AUC per kind and family, TPR at the threshold, IoU, time.

    Parameters
    ----------
    results : dict
        Method name -> ``{"score": (N,), "residual_map": (N, S, S) optional, "seconds_per_image"}``,
        every method on the same ``N`` images.
    kinds : array of str
        Each image's kind (``normal`` or an anomaly kind).
    masks : array ``(N, [1,] S, S)``, optional
        Truth masks of the anomalies (for the IoU).
    fpr, pixel_fpr : float
        Target false-positive rates of the image threshold and of the residual-map pixel threshold
        (0.003: ~3 false pixels per 32 x 32 stamp; 0.01 would give ~10, as many as a cosmic ray's
        whole footprint).
    smooth : float
        Gaussian smoothing (pixels) of residual maps before the pixel threshold.
    calibration : boolean array ``(N,)``, optional
        The normal images that set the thresholds (default: every other normal image); the rest
        of the normal images measure the false-positive rate reached.

    Returns
    -------
    astropy.table.Table
        One row per method: ``auc_<kind>``, ``auc_<family>``, ``auc_all`` (anomalies against the
        held-out normal images), ``threshold``,
        ``fpr_test`` (reached on the held-out normal images), ``tpr_<kind>`` at the threshold,
        ``pixel_threshold``, ``iou_<kind>`` (mean over images of the kind) and ``iou_all``,
        ``seconds_per_image``.
    """
    from astropy.table import Table

    kinds = np.asarray(kinds).astype(str)
    normal = kinds == "normal"
    calibration = np.asarray(_calibration_split(kinds) if calibration is None else calibration, bool)
    held = normal & ~calibration
    anomalous = [k for k in dict.fromkeys(kinds) if k != "normal"]
    if masks is not None:
        masks = np.asarray(masks)
        masks = masks[:, 0] if masks.ndim == 4 else masks
    rows = []
    for method, r in results.items():
        score = np.asarray(r["score"], float)
        row = {"method": method}
        # AUCs against the held-out normal images only: the calibration ones set thresholds (and the scan)
        row.update({f"auc_{k}": v for k, v in auc_by_kind(score[~calibration], kinds[~calibration]).items()})
        thr = choose_threshold(score[calibration], fpr)
        row["threshold"] = thr
        row["fpr_test"] = float(np.mean(score[held] > thr)) if held.any() else float("nan")
        for k in anomalous:
            row[f"tpr_{k}"] = float(np.mean(score[kinds == k] > thr))
        if masks is not None and r.get("residual_map") is not None:
            maps = smooth_maps(r["residual_map"], smooth)
            pthr = pixel_threshold(maps[calibration], pixel_fpr)
            iou = mask_iou(maps > pthr, masks > 0)
            row["pixel_threshold"] = pthr
            for k in anomalous:
                row[f"iou_{k}"] = float(np.nanmean(iou[kinds == k]))
            row["iou_all"] = float(np.nanmean(iou[~normal]))
        row["seconds_per_image"] = float(r.get("seconds_per_image", float("nan")))
        rows.append(row)
    names = list(dict.fromkeys(k for row in rows for k in row))
    return Table(rows=[[row.get(n, np.nan) for n in names] for row in rows], names=names)


# -- runs and files --------------------------------------------------------------------------------------

def load_scorer(model: str | Path):
    """``(gan, encoder or None, gan run.json, encoder run.json or None)`` from a GAN run or an encoder run."""
    from deepmorph.workflows.gan import load_encoder, load_gan

    model = Path(model)
    if not (model / "run.json").is_file():
        raise DeepmorphIOError(f"{model}: not a GAN or GAN-encoder run (no run.json)")
    import json

    try:
        task = json.loads((model / "run.json").read_text()).get("task")
    except ValueError as exc:
        raise DeepmorphIOError(f"{model / 'run.json'}: unreadable run description ({exc})") from None
    if task == "gan-encoder":
        encoder, gan, meta, emeta = load_encoder(model)
        return gan, encoder, meta, emeta
    if task == "gan":
        gan, meta = load_gan(model)
        return gan, None, meta, None
    raise DeepmorphIOError(f"{model}: run.json describes a {task} run, not a GAN or GAN-encoder run")


def _calibration_split(kinds) -> np.ndarray:
    """Every other normal image: the ones that calibrate (thresholds, the scan statistic)."""
    kinds = np.asarray(kinds).astype(str)
    calibration = np.zeros(len(kinds), bool)
    calibration[np.flatnonzero(kinds == "normal")[::2]] = True
    return calibration


def evaluate_anomalies(model: str | Path, benchmark: str | Path, out: str | Path | None = None,
                       methods=METHODS, lam: float = 0.1, steps: int = 100, lr: float = 0.05, fpr: float = 0.05,
                       pixel_fpr: float = 0.003, smooth: float = 0.0, extra: dict | None = None, seed: int = 0,
                       batch_size: int = 256, max_per_kind: int | None = None, figures: bool = True,
                       return_results: bool = False, power: float = 1.0, reduce: str = "sum"):
    """Score a benchmark file with every method and tabulate (:func:`anomaly_table`).

    Parameters
    ----------
    model : path
        An encoder run (both methods) or a GAN run (``anogan`` only).
    benchmark : path
        A file of :func:`deepmorph.simulate.anomalies.write_benchmark`.
    out : path, optional
        Folder for ``anomaly_table.ecsv``, ``scores.ecsv`` (every image, every method),
        ``residuals_<method>.png`` (examples per kind) and ``anomaly_table.json``.
    extra : dict, optional
        More methods: name -> ``counts (N, C, S, S) -> {"score", "residual_map"?, "seconds_per_image"?}``
        (e.g. :func:`reconstruction_scorer` of a VAE).
    max_per_kind : int, optional
        Score at most this many images of each kind (the first ones).
    return_results : bool
        Also return each method's scores and residual maps, the kinds and the masks (to tabulate
        again with other thresholds without scoring again).

    Returns
    -------
    astropy.table.Table
        The table (also in ``out``), with ``meta`` holding the parameters; with ``return_results``
        ``(table, results, kinds, masks)``.
    """
    from astropy.table import Table

    from deepmorph.simulate.anomalies import read_benchmark
    from deepmorph.workflows.gan import check_dataset, check_finite, to_gan

    gan, encoder, meta, _ = load_scorer(model)
    check_dataset(benchmark, meta["stamp_size"])
    bench = read_benchmark(benchmark)
    kinds = bench["kind"]
    if (kinds == "normal").all() or not (kinds == "normal").any():
        raise DeepmorphValueError(f"{benchmark}: an anomaly benchmark needs normal and anomalous items, this file has "
                                  f"{'only normal' if (kinds == 'normal').all() else 'no normal'} ones (see "
                                  "simulate-anomalies)")
    if max_per_kind is not None and max_per_kind < 1:
        raise DeepmorphValueError(f"max_per_kind must be at least 1, got {max_per_kind}")
    keep = np.arange(len(kinds))
    if max_per_kind is not None:
        keep = np.concatenate([np.flatnonzero(kinds == k)[:max_per_kind] for k in dict.fromkeys(kinds)])
        keep.sort()
    images = check_finite(bench["images"][keep], benchmark)
    kinds, masks = kinds[keep], bench["anomaly_mask"][keep]
    x = to_gan(images, meta)
    results = {}
    for method in methods:
        if method == "izi" and encoder is None:
            raise DeepmorphValueError(f"{model}: the izi method needs an encoder run (deepmorph train anomaly-encoder)")
        results[method] = score_images(gan, x, method, encoder, lam, steps, lr, batch_size, seed, power=power,
                                       reduce=reduce)
    for name, fn in (extra or {}).items():
        results[name] = fn(images)
    calibration = _calibration_split(kinds)
    if reduce == "scan":
        results = calibrate_scan(results, calibration, lam)
    table = anomaly_table(results, kinds, masks, fpr, pixel_fpr, smooth, calibration)
    table.meta.update({"benchmark": str(benchmark), "model": str(model), "lambda": lam, "steps": steps, "lr": lr,
                       "fpr": fpr, "pixel_fpr": pixel_fpr, "smooth_pix": smooth, "n_images": int(len(kinds)),
                       "power": power, "reduce": reduce})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_table(table, out / "anomaly_table.ecsv")
        scores = Table({"item": keep, "kind": kinds})
        if "id" in bench["catalog"].colnames:
            scores["id"] = np.asarray(bench["catalog"]["id"])[keep]
        for name, r in results.items():
            scores[f"score_{name}"] = np.asarray(r["score"], float)
        save_table(scores, out / "scores.ecsv")
        write_json(out / "anomaly_table.json", {"rows": [dict(zip(table.colnames, [v.item() if hasattr(v, "item")
                                                                                  else v for v in row], strict=True))
                                                          for row in table], "meta": dict(table.meta)})
        if figures:
            import matplotlib.pyplot as plt

            for name, r in results.items():
                if r.get("residual_map") is None:
                    continue
                fig = residual_figure(x[:, 0].numpy(), r, kinds, masks, name)
                save_figure(fig, out / f"residuals_{name}.png")
                plt.close(fig)
    return (table, results, kinds, masks) if return_results else table


def residual_figure(images: np.ndarray, result: dict, kinds, masks, title: str = "", per_kind: int = 2):
    """For ``per_kind`` images of each kind: the image, ``G(z*)``, the residual map and the truth mask."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kinds = np.asarray(kinds).astype(str)
    masks = np.asarray(masks)
    masks = masks[:, 0] if masks.ndim == 4 else masks
    picks = [i for k in dict.fromkeys(kinds) for i in np.flatnonzero(kinds == k)[:per_kind]]
    rec = result.get("reconstruction")
    cols = 4 if rec is not None else 3
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.6 * cols, 1.6 * len(picks)), squeeze=False)
    vmax = float(np.nanpercentile(result["residual_map"], 99.5)) or 1.0
    for row, i in enumerate(picks):
        panels = [(images[i], "gray", -0.3, 1.0, "x")]
        if rec is not None:
            panels.append((rec[i, 0], "gray", -0.3, 1.0, "G(z*)"))
        panels += [(result["residual_map"][i], "magma", 0, vmax, "|x - G(z*)|"), (masks[i], "gray", 0, 1, "mask")]
        for c, (img, cmap, lo, hi, name) in enumerate(panels):
            ax = axes[row, c]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
        axes[row, 0].set_ylabel(f"{kinds[i]}\n{result['score'][i]:.3g}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _read_inputs(images=None, data: str | Path | None = None, stamp_size: int | None = None):
    """Stamps ``(N, C, S, S)`` in counts and their names, from FITS/PNG files or a dataset file."""
    from deepmorph.workflows.gan import check_dataset, check_finite
    from deepmorph.workflows.runs import read_image_file

    if (images is None) == (data is None):
        raise DeepmorphValueError("give either images (FITS files) or a dataset file")
    if data is not None:
        from deepmorph.data import open_dataset

        check_dataset(data, stamp_size)
        with open_dataset(data) as ds:
            stamps = np.asarray(ds.images[...], dtype=np.float32)
            ids = np.asarray(ds.catalog["id"]) if "id" in ds.catalog.colnames else np.arange(len(ds))
        return check_finite(stamps, data), [f"{Path(data).name}[{i}]" for i in range(len(stamps))], ids
    stamps = []
    for path in images:
        img = read_image_file(path).astype(np.float32)
        if stamp_size is not None and tuple(img.shape[-2:]) != (stamp_size, stamp_size):
            raise DeepmorphValueError(f"{path}: a {img.shape[-1]}x{img.shape[-2]} image; the model scores "
                                      f"{stamp_size}x{stamp_size} stamps")
        check_finite(img[None], path)
        stamps.append(img)
    if len({s.shape for s in stamps}) > 1:
        raise DeepmorphValueError("the images differ in shape or channels")
    return np.stack(stamps), [Path(p).name for p in images], np.arange(len(stamps))


def reference_threshold(gan, encoder, meta: dict, method: str, fpr: float, reference: str | Path | None = None,
                        n_reference: int = 200, **score_kwargs) -> tuple[float, int, str]:
    """The score threshold for a target false-positive rate on normal galaxies: ``reference`` (a
    dataset of normal galaxies), default the GAN's held-out test split. Returns (threshold, n, source)."""
    from deepmorph.workflows.gan import to_gan

    stamps, path = _reference_stamps(meta, reference, n_reference)
    r = score_images(gan, to_gan(stamps, meta), method, encoder, **score_kwargs)
    return choose_threshold(r["score"], fpr), len(stamps), path


def _reference_stamps(meta: dict, reference: str | Path | None, n_reference: int) -> tuple[np.ndarray, str]:
    """Normal galaxies (counts) to calibrate on: ``reference``'s first ones, or the GAN's test split."""
    from deepmorph.data import open_dataset
    from deepmorph.workflows.classify import Split
    from deepmorph.workflows.gan import check_dataset, check_finite

    if reference is not None:
        path = Path(reference)
        info = check_dataset(path, meta["stamp_size"])
        items = np.arange(min(info["n"], n_reference))
    else:
        path = Path(meta["data"])
        if not path.is_file():
            raise DeepmorphIOError(f"{path}: the GAN's training data are gone; give --reference normal galaxies")
        info = check_dataset(path, meta["stamp_size"])
        items = Split(meta["split_seed"], tuple(meta["fractions"])).indices(info["n"])["test"][:n_reference]
    with open_dataset(path) as ds:
        stamps = check_finite(np.asarray(ds.images[...][items], dtype=np.float32), path)
    return stamps, str(path)


def rank_images(model: str | Path, images=None, data: str | Path | None = None, method: str | None = None,
                lam: float = 0.1, steps: int = 100, lr: float = 0.05, fpr: float = 0.05,
                reference: str | Path | None = None, n_reference: int = 200, residuals: str | Path | None = None,
                batch_size: int = 256, seed: int = 0, power: float = 1.0, reduce: str = "sum"):
    """Rank images by anomaly score, most anomalous first (``deepmorph anomalies``).

    Parameters
    ----------
    model : path
        An encoder run (default method ``izi``) or a GAN run (``anogan``).
    images, data
        FITS/PNG stamps of the model's size, or a dataset file (one of the two).
    fpr : float
        Target false-positive rate of the ``anomalous`` flag, on ``reference`` normal galaxies
        (default: the GAN's held-out test split, ``n_reference`` of them). With ``reduce="scan"``
        the same galaxies calibrate the scan statistic (:class:`ResidualCalibration`).
    residuals : path, optional
        Write the residual maps ``|x - G(z*)|`` (in the GAN's units, input order) as a FITS cube.

    Returns
    -------
    astropy.table.Table
        ``rank``, ``name``, ``id``, ``score``, ``residual``, ``feature``, ``anomalous``, sorted by score;
        ``meta`` holds the method, lambda, steps, threshold and its reference.
    """
    from astropy.table import Table

    from deepmorph.workflows.gan import to_gan

    gan, encoder, meta, _ = load_scorer(model)
    method = method or ("izi" if encoder is not None else "anogan")
    if method == "izi" and encoder is None:
        raise DeepmorphValueError(f"{model}: a GAN run; the izi method needs an encoder run "
                                  "(deepmorph train anomaly-encoder)")
    stamps, names, ids = _read_inputs(images, data, meta["stamp_size"])
    if stamps.shape[1] != meta["in_channels"]:
        raise DeepmorphValueError(f"the images have {stamps.shape[1]} channel(s), the model {meta['in_channels']}")
    kw = {"lam": lam, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "power": power,
          "reduce": reduce}
    r = score_images(gan, to_gan(stamps, meta), method, encoder, **kw)
    if reduce == "scan":  # calibrated on the reference normal galaxies, which also set the threshold
        ref_stamps, source = _reference_stamps(meta, reference, n_reference)
        ref = score_images(gan, to_gan(ref_stamps, meta), method, encoder, **kw)
        keys = ("score", "feature", "signed_residual", "level", "residual_map")
        both = calibrate_scan({"x": {k: np.concatenate([ref[k], r[k]]) for k in keys}},
                              np.r_[np.ones(len(ref_stamps), bool), np.zeros(len(stamps), bool)], lam)["x"]
        n_ref = len(ref_stamps)
        thr = choose_threshold(both["score"][:n_ref], fpr)
        r = {**r, "score": both["score"][n_ref:], "residual_map": both["residual_map"][n_ref:]}
    else:
        thr, n_ref, source = reference_threshold(gan, encoder, meta, method, fpr, reference, n_reference, **kw)
    order = np.argsort(-r["score"], kind="stable")
    table = Table({"rank": np.arange(1, len(order) + 1), "name": np.asarray(names)[order], "id": np.asarray(ids)[order],
                   "score": r["score"][order], "residual": r["residual"][order], "feature": r["feature"][order],
                   "anomalous": r["score"][order] > thr})
    table.meta.update({"model": str(model), "method": method, "lambda": lam, "power": power, "reduce": reduce,
                       "steps": steps if method == "anogan" else 0, "threshold": thr, "fpr": fpr,
                       "reference": source, "n_reference": n_ref,
                       "seconds_per_image": r["seconds_per_image"], "residual_unit": "asinh(counts/s)/data_scale"})
    if residuals is not None:
        from astropy.io import fits

        from deepmorph.training._io import write_atomic

        hdu = fits.PrimaryHDU(r["residual_map"].astype(np.float32))
        hdu.header["METHOD"] = method
        hdu.header["COMMENT"] = "|x - G(z*)| per input image, in the GAN's units (asinh(counts/s)/data_scale)"
        write_atomic(Path(residuals), lambda tmp: hdu.writeto(tmp, overwrite=True, output_verify="silentfix"))
    return table


def residual_maps_png(result: dict, images: np.ndarray, path: str | Path, kinds=None, masks=None) -> Path:
    """Save :func:`residual_figure` of a scoring result as a PNG."""
    import matplotlib.pyplot as plt

    kinds = kinds if kinds is not None else np.array(["image"] * len(images))
    masks = masks if masks is not None else np.zeros_like(result["residual_map"])
    fig = residual_figure(np.asarray(images)[:, 0] if np.ndim(images) == 4 else images, result, kinds, masks)
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


__all__ = ["METHODS", "REDUCTIONS", "anomaly_score", "anomaly_table", "auc_by_kind",
           "autoencoder_scorer", "choose_threshold", "evaluate_anomalies", "latent_search", "load_scorer", "mask_iou",
           "pixel_threshold", "rank_images", "reconstruct", "reconstruction_scorer", "reference_threshold",
           "residual_figure", "residual_maps_png", "robust_refit", "roc_auc", "score_images", "smooth_maps",
           "ResidualCalibration", "SCAN_FILTERS", "calibrate_scan", "filter_maps"]
