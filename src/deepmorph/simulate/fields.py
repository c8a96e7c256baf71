"""Fields of many galaxies and stars with per-object truth: boxes, instance masks, classes, fluxes.

A field is a ``size x size`` image of a survey preset (pixel scale, PSF, zero point, noise) holding
a Poisson number of objects placed uniformly, some of them forced into close pairs so that blends
are common. Galaxies are the bulge + disk (+ clumps) galaxies of :class:`~deepmorph.simulate.Simulator`,
drawn class-balanced over the four morphology classes (:data:`~deepmorph.simulate.LABEL_NAMES`);
stars are point sources (the PSF). Each object is rendered alone on its own postage stamp by the
simulator's :class:`~deepmorph.simulate.Renderer` (large enough to hold its light down to the
renderer's folding level) and pasted into the field; the sum gets the preset's noise.

Truth (``simulate_field(i, seed)["objects"]``, one entry per object ``k``):

* ``segmap`` -- ``k + 1`` where object ``k``'s noise-free model is the largest of all objects at that
  pixel *and* above ``mask_threshold_sigma`` times the sky noise per pixel; 0 elsewhere. This is the
  instance mask of the detection task: the pixels where an object dominates above a surface-brightness
  threshold.
* ``x0, y0, x1, y1`` -- the box of the object's segmap pixels in the project's convention (pixel
  centres at integers, so pixel ``j`` spans ``[j - 0.5, j + 0.5]``); ``x1 - x0`` is the width in
  pixels. Objects with no segmap pixel (``npix == 0``: too faint, or buried under a brighter
  neighbour) stay in the table, with NaN boxes, and are not targets of :class:`FieldDataset`.
* ``blended`` -- another object's centre lies closer than ``2 max(r_j, r_k)``, with
  ``r = blend_radius_pix = max(hlr_pix, PSF FWHM / 2)`` (stars have ``hlr_pix = 0``).

Coordinates are 0-based pixel centres, arrays ``[..., y, x]``. Item ``i`` is a pure function of
``(seed, i)`` (counter-based random numbers, see :mod:`deepmorph.simulate.rng`).

>>> sim = FieldSimulator("candels-f160w", size=128)          # doctest: +SKIP
>>> field = sim.simulate_field(0, seed=0)                      # doctest: +SKIP
>>> field["image"].shape, field["segmap"].max() <= len(field["objects"]["x"])   # doctest: +SKIP
((128, 128), True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from deepmorph import __version__
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import rng
from deepmorph.simulate.priors import LABEL_NAMES, Priors, draw_galaxies, morphology_label
from deepmorph.simulate.profiles import sersic_b
from deepmorph.simulate.render import _GOOD_SIZES, PointSources, Renderer, Sersic
from deepmorph.simulate.simulator import Simulator
from deepmorph.simulate.surveys import Survey

#: Classes of field objects, in label order: the four morphology classes, then stars.
FIELD_CLASSES = (*LABEL_NAMES, "star")
STAR_LABEL = len(LABEL_NAMES)

FORMAT = "deepmorph.fields"

#: Columns of the per-object truth and their units.
OBJECT_UNITS = {
    "id": "", "x": "pix", "y": "pix", "x0": "pix", "y0": "pix", "x1": "pix", "y1": "pix", "label": "",
    "flux": "count", "mag": "mag", "hlr_arcsec": "arcsec", "hlr_pix": "pix", "sersic_n": "", "q": "",
    "pa_deg": "deg", "bulge_to_total": "", "clump_flux_fraction": "", "npix": "", "blended": "",
    "blend_radius_pix": "pix", "snr": "",
}

#: Default galaxy priors of fields: class-balanced, sizes of 1-13 pixels (0.06-0.8" on CANDELS).
FIELD_PRIORS = Priors(log10_bulge_hlr_pix=(0.0, 0.9), log10_disk_hlr_pix=(0.2, 1.1), balanced_classes=True,
                      max_offset_pix=0.0)

# Stream numbers of the field-level draws (the galaxies' own use priors.py's, the noise 300+).
_FIELD_SEED, _COUNT, _X, _Y, _STAR, _STAR_MAG, _PAIR, _PARTNER, _PAIR_D, _PAIR_PHI = range(600, 610)
# Folding level of the per-object stamps (see Renderer.fold_level): light below 1e-4 of the
# surface brightness at the half-light radius may fall off the stamp.
_STAMP_LEVEL = 1e-4


class FieldSimulator:
    """Simulate fields of galaxies and stars with instance masks and a truth table.

    Parameters
    ----------
    survey : str or Survey
        Survey preset (pixel scale, PSF, zero point, depth -> sky noise).
    size : int
        Field side, pixels, in [32, 1024] (128 to 512 are the intended sizes).
    density : float
        Mean number of objects (galaxies + stars) per 10^4 pixels (not per arcmin^2: a field of a
        given size then looks equally crowded in every survey). The default, 12, gives ~20 objects
        in a 128 x 128 field and ~80 in 256 x 256. The number per field is Poisson.
    star_fraction : float
        Probability that an object is a star.
    pair_fraction : float
        Probability that a galaxy (after the first) is placed at ``U(1, 2) max(r_j, r_k)`` from an
        earlier galaxy ``j`` (``r`` = blend radius, see the module notes): forced close pairs.
    priors : Priors, optional
        Galaxy priors (default :data:`FIELD_PRIORS`); ``max_offset_pix`` is ignored.
    mag_range : tuple of float, optional
        AB magnitude range (uniform) of galaxies (bulge + disk) and stars; default from the preset's
        5-sigma point-source depth ``D``: ``(D - 8, D + 0.5)``.
    mask_threshold_sigma : float
        Instance masks keep pixels where the object's noise-free model exceeds this many sky sigmas.
    noise : str, optional
        ``"none"`` for noise-free fields; default: the preset's sky + Poisson noise.
    device : str
        ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        survey: str | Survey = "candels-f160w",
        size: int = 128,
        density: float = 12.0,
        star_fraction: float = 0.15,
        pair_fraction: float = 0.2,
        priors: Priors | None = None,
        device: str | torch.device = "cpu",
        mag_range: tuple[float, float] | None = None,
        mask_threshold_sigma: float = 1.0,
        noise: str | None = None,
    ):
        if isinstance(size, bool) or int(size) != size or not 32 <= size <= 1024:
            raise DeepmorphValueError(f"field size must be an integer in [32, 1024] pixels, got {size!r}")
        self.size = int(size)
        for name, value, lo, hi in (("star fraction", star_fraction, 0, 1), ("pair fraction", pair_fraction, 0, 1)):
            if not (isinstance(value, (int, float)) and lo <= value <= hi):
                raise DeepmorphValueError(f"{name} must lie in [{lo}, {hi}], got {value!r}")
        if not (isinstance(density, (int, float)) and math.isfinite(density) and density > 0):
            raise DeepmorphValueError(f"density must be a positive number of objects per 10^4 pixels, got {density!r}")
        if not (isinstance(mask_threshold_sigma, (int, float)) and mask_threshold_sigma > 0):
            raise DeepmorphValueError(f"mask threshold must be a positive number of sky sigmas, "
                                      f"got {mask_threshold_sigma!r}")
        self.density = float(density)
        self.star_fraction = float(star_fraction)
        self.pair_fraction = float(pair_fraction)
        self.mask_threshold_sigma = float(mask_threshold_sigma)
        # The stamp simulator holds the preset's PSF, pixel scale, zero point and noise: one set-up.
        self._base = Simulator(survey, stamp_size=64, priors=priors or FIELD_PRIORS, device=device,
                               noise=noise, clumps=True)
        self.survey = self._base.survey
        self.device = self._base.device
        depth = self.survey.depth_5sigma_mag
        mag_range = tuple(mag_range) if mag_range is not None else (depth - 8.0, depth + 0.5)
        if len(mag_range) != 2 or not all(math.isfinite(m) for m in mag_range) or mag_range[0] >= mag_range[1]:
            raise DeepmorphValueError(f"magnitude range must be (bright, faint) AB magnitudes, got {mag_range!r}")
        self.mag_range = (float(mag_range[0]), float(mag_range[1]))
        self.priors = dataclasses.replace(self._base.priors, mag=self.mag_range, max_offset_pix=0.0)
        self._renderers: dict[int, Renderer] = {}

    # -- the preset ------------------------------------------------------------------------------
    @property
    def pixel_scale(self) -> float:
        return self._base.pixel_scale

    @property
    def zeropoint(self) -> float:
        return self._base.zeropoint

    @property
    def noise(self):
        return self._base.noise

    @property
    def sky_sigma(self) -> float:
        """Sky noise per pixel, counts (the preset's depth; also the mask threshold's unit)."""
        return float(self._base.default_sky_sigma)

    @property
    def gain(self) -> float:
        return float(self.survey.gain_e_per_count)

    @property
    def psf_fwhm_pix(self) -> float:
        return float(self._base.psf_fwhm_pix)

    @property
    def mean_objects(self) -> float:
        """Mean number of objects per field."""
        return self.density * self.size**2 / 1e4

    def attributes(self, seed: int) -> dict:
        """Everything needed to reproduce the fields, as HDF5-attribute-friendly values."""
        b = self._base
        return {
            "format": FORMAT,
            "survey": self.survey.name,
            "survey_preset": json.dumps(self.survey.to_dict()),
            "pixel_scale_arcsec": self.pixel_scale,
            "zeropoint_mag": self.zeropoint,
            "sky_sigma": self.sky_sigma,
            "gain_e_per_count": self.gain,
            "psf": json.dumps(b.psf_dict()),
            "psf_fwhm_pix": self.psf_fwhm_pix,
            "noise": json.dumps(self.noise.to_dict() if self.noise is not None else {"type": "none"}),
            "priors": json.dumps(self.priors.to_dict()),
            "size": self.size,
            "density_per_1e4_pix": self.density,
            "star_fraction": self.star_fraction,
            "pair_fraction": self.pair_fraction,
            "mag_range": json.dumps(list(self.mag_range)),
            "mask_threshold_sigma": self.mask_threshold_sigma,
            "seed": int(seed),
            "classes": json.dumps(list(FIELD_CLASSES)),
            "image_unit": self.survey.image_unit,
            "version": __version__,
        }

    def _renderer(self, stamp: int) -> Renderer:
        if stamp not in self._renderers:
            self._renderers[stamp] = Renderer(stamp, self.pixel_scale, self._base.psf, self.device)
        return self._renderers[stamp]

    # -- drawing ---------------------------------------------------------------------------------
    def draw_objects(self, index: int, seed: int) -> dict:
        """The parameters of field ``index``'s objects (numpy arrays, pixels and counts), before rendering."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DeepmorphValueError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise DeepmorphValueError(f"field index must be a non-negative integer, got {index!r}")
        from scipy.stats import poisson

        dev = self.device
        item = torch.tensor([int(index)], dtype=torch.int64, device=dev)
        fseed = int(rng.random_bits(int(seed), item, _FIELD_SEED)[0])
        n = int(poisson.ppf(float(rng.uniform(int(seed), item, _COUNT)[0]), self.mean_objects))
        k = torch.arange(max(n, 1), device=dev)
        g = draw_galaxies(fseed, k, self.priors, self.zeropoint, 4 * self.size, clumps=True)
        g = {name: v.cpu().numpy()[:n] for name, v in g.items()}
        u = {s: rng.uniform(fseed, k, s).cpu().numpy()[:n] for s in (_X, _Y, _STAR, _STAR_MAG, _PAIR, _PARTNER,
                                                                      _PAIR_D, _PAIR_PHI)}
        star = u[_STAR] < self.star_fraction
        lo, hi = self.mag_range
        star_mag = lo + (hi - lo) * u[_STAR_MAG]
        bt = g["bulge_to_total"]
        gal_flux = g["flux"]
        clump_flux = g["clump_flux"]
        total = np.where(star, 10.0 ** (-0.4 * (star_mag - self.zeropoint)), gal_flux + clump_flux.sum(axis=1))
        hlr_pix = np.where(star, 0.0, composite_hlr(gal_flux * bt, g["bulge_n"], g["bulge_hlr_pix"],
                                                    gal_flux * (1 - bt), g["disk_hlr_pix"]))
        radius = np.maximum(hlr_pix, 0.5 * self.psf_fwhm_pix)
        x = u[_X] * (self.size - 1)
        y = u[_Y] * (self.size - 1)
        # Forced pairs: galaxy k joins an earlier galaxy j at 1-2 blend radii (sequential: j is final).
        for i in range(1, n):
            if star[i] or u[_PAIR][i] >= self.pair_fraction:
                continue
            earlier = np.flatnonzero(~star[:i])
            if not earlier.size:
                continue
            j = earlier[min(int(u[_PARTNER][i] * earlier.size), earlier.size - 1)]
            d = (1.0 + u[_PAIR_D][i]) * max(radius[i], radius[j])
            phi = 2 * math.pi * u[_PAIR_PHI][i]
            x[i] = np.clip(x[j] + d * math.cos(phi), 0, self.size - 1)
            y[i] = np.clip(y[j] + d * math.sin(phi), 0, self.size - 1)
        cff = clump_flux.sum(axis=1) / gal_flux
        label = morphology_label(bt, g["disk_q"], cff)
        bulge_dominated = bt >= 0.5
        return {
            "n": n, "x": x, "y": y, "star": star, "flux": total, "label": np.where(star, STAR_LABEL, label),
            "hlr_pix": hlr_pix, "blend_radius_pix": radius,
            "sersic_n": np.where(star, np.nan, np.where(bulge_dominated, g["bulge_n"], 1.0)),
            "q": np.where(star, np.nan, np.where(bulge_dominated, g["bulge_q"], g["disk_q"])),
            "pa_deg": np.where(star, np.nan, g["pa_deg"]),
            "bulge_to_total": np.where(star, np.nan, bt), "clump_flux_fraction": np.where(star, np.nan, cff),
            "galaxy": {name: v for name, v in g.items()},
        }

    # -- rendering -------------------------------------------------------------------------------
    def _stamp_sizes(self, p: dict) -> np.ndarray:
        """Per object: the FFT-friendly stamp side that holds its light (pixels)."""
        g = p["galaxy"]
        bt = g["bulge_to_total"]
        reach = np.zeros(p["n"])
        for share, n, hlr in ((bt, g["bulge_n"], g["bulge_hlr_pix"]), (1 - bt, np.ones(p["n"]), g["disk_hlr_pix"])):
            level = np.minimum(_STAMP_LEVEL / np.clip(share, 1e-12, 1.0), 0.5)
            r = (1.0 + np.log(1.0 / level) / sersic_b(n)) ** n * hlr
            reach = np.maximum(reach, np.where(share > 0, r, 0.0))
        clump_r = np.hypot(g["clump_x_pix"], g["clump_y_pix"]).max(axis=1, initial=0.0)
        reach = np.where(p["star"], 0.0, np.maximum(reach, clump_r))
        psf_reach = self._base.renderer.psf_reach
        need = 2 * (reach + psf_reach) + 2
        sizes = np.array([s for s in _GOOD_SIZES if s >= 32] + [2048])
        return sizes[np.minimum(np.searchsorted(sizes, np.minimum(need, 2 * self.size)), len(sizes) - 1)]

    def _render_objects(self, p: dict, stamps: np.ndarray, pick: np.ndarray) -> tuple[torch.Tensor, np.ndarray,
                                                                                     np.ndarray]:
        """Render objects ``pick`` (all of one stamp size) alone; returns stamps and their corners."""
        s = int(stamps[pick[0]])
        dev = self.device
        g = p["galaxy"]
        x, y = p["x"][pick], p["y"][pick]
        ax = np.round(x).astype(np.int64) - s // 2  # field pixel of stamp pixel 0
        ay = np.round(y).astype(np.int64) - s // 2
        c = 0.5 * (s - 1)
        dx, dy = x - ax - c, y - ay - c  # object centre, pixels from the stamp centre
        star = p["star"][pick]

        def t(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float64), device=dev)

        gal = np.where(star, 0.0, g["flux"][pick])
        bt = g["bulge_to_total"][pick]
        scene = {
            "bulge": Sersic(t(gal * bt), t(g["bulge_hlr_pix"][pick]), t(g["bulge_q"][pick]), t(g["pa_deg"][pick]),
                            t(dx), t(dy), t(g["bulge_n"][pick])),
            "disk": Sersic(t(gal * (1 - bt)), t(g["disk_hlr_pix"][pick]), t(g["disk_q"][pick]),
                           t(g["pa_deg"][pick]), t(dx), t(dy)),
        }
        # Clumps and stars are point sources: a star is one more slot, at the centre.
        cflux = np.where(star[:, None], 0.0, g["clump_flux"][pick])
        scene["points"] = PointSources(
            t(np.c_[cflux, np.where(star, p["flux"][pick], 0.0)]),
            t(np.c_[g["clump_x_pix"][pick] + dx[:, None], dx]),
            t(np.c_[g["clump_y_pix"][pick] + dy[:, None], dy]),
        )
        models = self._renderer(s).render(scene, {"model": ("bulge", "disk", "points")})["model"]
        return models, ax, ay

    def simulate_field(self, index: int, seed: int) -> dict:
        """Simulate field ``index`` of the dataset with ``seed``.

        Returns
        -------
        dict
            ``image`` ``(size, size)`` float32 (counts, noise included); ``noiseless`` likewise without
            noise; ``segmap`` ``(size, size)`` int32 (0 background, ``k + 1`` object ``k``);
            ``objects``: dict of 1-D numpy arrays, one entry per object (see :data:`OBJECT_UNITS`):
            ``id, x, y, x0, y0, x1, y1, label, flux, mag, hlr_arcsec, hlr_pix, sersic_n, q, pa_deg,
            bulge_to_total, clump_flux_fraction, npix, blended, blend_radius_pix, snr``. Boxes are
            NaN where ``npix == 0``. ``sersic_n`` and ``q`` are those of the dominant component
            (bulge when B/T >= 0.5); ``hlr`` is the half-light radius of the bulge + disk light
            (major axis, :func:`composite_hlr`); ``snr`` is the matched-filter S/N of the object alone.
        """
        p = self.draw_objects(index, seed)
        n, size, dev = p["n"], self.size, self.device
        model = torch.zeros(size, size, dtype=torch.float32, device=dev)
        best = torch.zeros(size, size, dtype=torch.float32, device=dev)
        owner = torch.zeros(size, size, dtype=torch.int32, device=dev)
        snr = np.zeros(n)
        sky2 = self.sky_sigma**2
        gain = self.gain if self.noise is not None and getattr(self.noise, "gain_e_per_count", None) else None
        if n:
            stamps = self._stamp_sizes(p)
            for s in np.unique(stamps):
                pick = np.flatnonzero(stamps == s)
                for start in range(0, len(pick), 16):  # bounded memory for big stamps
                    part = pick[start:start + 16]
                    models, ax, ay = self._render_objects(p, stamps, part)
                    var = sky2 + (models.clamp_min(0) / gain if gain else 0.0)
                    snr[part] = torch.sqrt((models.clamp_min(0) ** 2 / var).sum(dim=(1, 2))).cpu().numpy()
                    for m, k, xa, ya in zip(models, part, ax, ay, strict=True):
                        x0, y0 = max(int(xa), 0), max(int(ya), 0)
                        x1, y1 = min(int(xa) + m.shape[1], size), min(int(ya) + m.shape[0], size)
                        if x1 <= x0 or y1 <= y0:
                            continue
                        cut = m[y0 - ya:y1 - ya, x0 - xa:x1 - xa]
                        model[y0:y1, x0:x1] += cut
                        win = cut > best[y0:y1, x0:x1]
                        best[y0:y1, x0:x1] = torch.where(win, cut, best[y0:y1, x0:x1])
                        owner[y0:y1, x0:x1] = torch.where(win, torch.full_like(owner[y0:y1, x0:x1], int(k) + 1),
                                                          owner[y0:y1, x0:x1])
        threshold = self.mask_threshold_sigma * self.sky_sigma
        segmap = torch.where(best > threshold, owner, torch.zeros_like(owner)).cpu().numpy().astype(np.int32)
        if self.noise is not None:
            item = torch.tensor([int(index)], dtype=torch.int64, device=dev)
            image = self.noise.apply(model[None], int(seed), item)[0]
        else:
            image = model
        objects = self._truth(p, segmap, snr)
        return {"image": image.float().cpu().numpy(), "noiseless": model.cpu().numpy(), "segmap": segmap,
                "objects": objects}

    def _truth(self, p: dict, segmap: np.ndarray, snr: np.ndarray) -> dict:
        n = p["n"]
        boxes = segmap_boxes(segmap, n)
        npix = np.bincount(segmap.ravel(), minlength=n + 1)[1:n + 1].astype(np.int64)
        flux = p["flux"]
        with np.errstate(divide="ignore"):
            mag = self.zeropoint - 2.5 * np.log10(flux)
        return {
            "id": np.arange(n, dtype=np.int64),
            "x": p["x"].astype(np.float64), "y": p["y"].astype(np.float64),
            "x0": boxes[:, 0], "y0": boxes[:, 1], "x1": boxes[:, 2], "y1": boxes[:, 3],
            "label": p["label"].astype(np.int64),
            "flux": flux.astype(np.float64), "mag": mag,
            "hlr_arcsec": p["hlr_pix"] * self.pixel_scale, "hlr_pix": p["hlr_pix"].astype(np.float64),
            "sersic_n": p["sersic_n"], "q": p["q"], "pa_deg": p["pa_deg"],
            "bulge_to_total": p["bulge_to_total"], "clump_flux_fraction": p["clump_flux_fraction"],
            "npix": npix,
            "blended": blended_flags(p["x"], p["y"], p["blend_radius_pix"]),
            "blend_radius_pix": p["blend_radius_pix"].astype(np.float64),
            "snr": snr,
        }


# -- truth helpers ---------------------------------------------------------------------------------

def composite_hlr(bulge_flux, bulge_n, bulge_hlr, disk_flux, disk_hlr, iterations: int = 60) -> np.ndarray:
    """Half-light radius of bulge + disk (same units as the inputs), along the major axis.

    Solves ``f_b P(2 n_b, b_b (R / a_b)^(1 / n_b)) + f_d P(2, b_1 R / a_d) = (f_b + f_d) / 2`` for
    ``R`` by bisection (``P`` the regularised lower incomplete gamma function: the light within the
    ellipse of semi-major axis ``R`` of a Sersic profile of major-axis half-light radius ``a``). Exact
    when the two components share the axis ratio; otherwise a flux-weighted compromise.
    """
    from scipy.special import gammainc

    fb, fd = np.asarray(bulge_flux, float), np.asarray(disk_flux, float)
    nb, ab, ad = np.asarray(bulge_n, float), np.asarray(bulge_hlr, float), np.asarray(disk_hlr, float)
    bb, b1 = sersic_b(nb), sersic_b(np.ones_like(nb))
    half = 0.5 * (fb + fd)
    lo, hi = np.minimum(ab, ad) * 0.0, np.maximum(ab, ad) * 1.0 + 1e-12
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        enclosed = fb * gammainc(2 * nb, bb * (mid / ab) ** (1 / nb)) + fd * gammainc(2.0, b1 * mid / ad)
        below = enclosed < half
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def segmap_boxes(segmap: np.ndarray, n: int) -> np.ndarray:
    """``(n, 4)`` boxes ``x0, y0, x1, y1`` of ids ``1..n`` of ``segmap`` (pixel edges; NaN if absent)."""
    from scipy import ndimage

    out = np.full((n, 4), np.nan)
    for k, sl in enumerate(ndimage.find_objects(np.asarray(segmap), max_label=n)):
        if sl is not None:
            out[k] = (sl[1].start - 0.5, sl[0].start - 0.5, sl[1].stop - 0.5, sl[0].stop - 0.5)
    return out


def blended_flags(x, y, radius) -> np.ndarray:
    """True for objects with another centre closer than ``2 max(r_j, r_k)`` (pixels)."""
    x, y, r = (np.asarray(v, float) for v in (x, y, radius))
    if len(x) < 2:
        return np.zeros(len(x), dtype=bool)
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    close = d < 2 * np.maximum(r[:, None], r[None, :])
    np.fill_diagonal(close, False)
    return close.any(axis=1)


def blended_pairs(x, y, radius) -> np.ndarray:
    """``(P, 2)`` index pairs ``j < k`` whose centres are closer than ``2 max(r_j, r_k)`` (pixels)."""
    x, y, r = (np.asarray(v, float) for v in (x, y, radius))
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    close = np.triu(d < 2 * np.maximum(r[:, None], r[None, :]), k=1)
    return np.argwhere(close)


# -- the HDF5 store --------------------------------------------------------------------------------

def write_fields(path: str | Path, sim: FieldSimulator, n_fields: int, seed: int = 0, progress: bool = True,
                 overwrite: bool = False) -> Path:
    """Simulate fields ``0 .. n_fields-1`` with ``seed`` into one HDF5 file.

    Layout: ``/images`` ``(N, S, S)`` float32 counts and ``/segmaps`` ``(N, S, S)`` int32, one chunk
    per field; ``/objects/<column>`` one row per object (columns of :data:`OBJECT_UNITS` plus
    ``field``), attribute ``unit``; ``/offsets`` ``(N + 1,)``: field ``i``'s rows are
    ``offsets[i]:offsets[i+1]``; root attributes :meth:`FieldSimulator.attributes` plus ``n`` and
    ``n_done``. Written to ``<path>.partial`` and renamed when complete; rerunning the same write
    resumes after ``n_done`` fields (the result is identical to a single run).
    """
    import h5py
    from tqdm.auto import tqdm

    from deepmorph.data.store import _plain, check_output, partial_path

    if isinstance(n_fields, bool) or not isinstance(n_fields, (int, np.integer)) or n_fields <= 0:
        raise DeepmorphValueError(f"number of fields must be a positive integer, got {n_fields!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DeepmorphValueError(f"seed must be a non-negative integer, got {seed!r}")
    n = int(n_fields)
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    attrs = {**sim.attributes(seed), "n": n}
    f = None
    if partial.exists():
        try:
            f = h5py.File(partial, "r+")
            stored = {k: _plain(v) for k, v in f.attrs.items()}
            if not (all(stored.get(k) == _plain(v) for k, v in attrs.items()) and "n_done" in stored):
                f.close()
                f = None
        except OSError:  # killed mid-write and unreadable: start again
            f = None
        if f is None:
            partial.unlink()
    if f is None:
        try:
            f = h5py.File(partial, "w")
        except OSError as exc:
            raise DeepmorphIOError(f"{partial}: cannot create the file ({exc})") from None
        f.attrs.update(attrs)
        f.attrs["n_done"] = 0
        s = sim.size
        f.create_dataset("images", shape=(n, s, s), dtype=np.float32, chunks=(1, s, s)).attrs["unit"] = "count"
        f.create_dataset("segmaps", shape=(n, s, s), dtype=np.int32, chunks=(1, s, s), compression="gzip",
                         compression_opts=4, shuffle=True)
        f.create_dataset("offsets", data=np.zeros(n + 1, dtype=np.int64))
        group = f.create_group("objects", track_order=True)
        for col in ("field", *OBJECT_UNITS):
            dtype = bool if col == "blended" else np.int64 if col in ("field", "id", "label", "npix") else np.float64
            ds = group.create_dataset(col, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
            ds.attrs["unit"] = OBJECT_UNITS.get(col, "")
    try:
        done = int(f.attrs["n_done"])
        rows = int(f["offsets"][done])
        for ds in f["objects"].values():  # drop rows of a field that did not finish
            ds.resize((rows,))
        with tqdm(total=n, initial=done, unit="field", desc=path.name, disable=not progress) as bar:
            for i in range(done, n):
                field = sim.simulate_field(i, seed)
                f["images"][i] = field["image"]
                f["segmaps"][i] = field["segmap"]
                obj = {"field": np.full(len(field["objects"]["id"]), i, dtype=np.int64), **field["objects"]}
                for col, ds in f["objects"].items():
                    ds.resize((rows + len(obj["id"]),))
                    ds[rows:] = obj[col]
                rows += len(obj["id"])
                f["offsets"][i + 1] = rows
                f.attrs["n_done"] = i + 1  # only after the whole field is in the file
                f.flush()
                bar.update(1)
    finally:
        f.close()
    os.replace(partial, path)
    return path


class FieldDataset(torch.utils.data.Dataset):
    """A field file (:func:`write_fields`) as a PyTorch dataset in torchvision's detection format.

    ``ds[i]`` is ``(image, target)``: ``image`` a float32 tensor ``(1, H, W)`` (counts, no
    normalisation), ``target`` a dict with ``boxes`` float32 ``(N, 4)`` (``x0, y0, x1, y1`` in
    torchvision's convention, where pixel ``j`` spans ``[j, j + 1]``: the catalogue's box + 0.5),
    ``labels`` int64 ``(N,)`` (the class index + 1; 0 is torchvision's background), ``masks`` uint8
    ``(N, H, W)``, ``ids`` int64 (row of :meth:`objects`) and ``image_id``. Objects without mask
    pixels (``npix == 0``) are not targets.

    The HDF5 file is opened lazily in each process, so the dataset works with DataLoader workers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        f = _open_fields(self.path)
        try:
            self._n = int(f.attrs["n"])
            self.attrs = _field_attrs(f)
        finally:
            f.close()
        self._file = None

    def _h5(self):
        if self._file is None:
            self._file = _open_fields(self.path)
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __len__(self) -> int:
        return self._n

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index a field dataset with an int, not {type(i).__name__}")
        j = int(i) + (self._n if i < 0 else 0)
        if not 0 <= j < self._n:
            raise IndexError(f"field {i} out of range for {self.path} ({self._n} fields)")
        return j

    def image(self, i: int) -> np.ndarray:
        """Field ``i``'s image, ``(H, W)`` float32 counts (an error naming the file for any other
        shape, or for NaN or infinite pixels)."""
        image = np.asarray(self._h5()["images"][self._index(i)])
        if image.ndim != 2:
            raise DeepmorphValueError(f"{self.path}: field {i} is not a 2-D image (shape {image.shape})")
        if not np.isfinite(image).all():
            raise DeepmorphValueError(f"{self.path}: field {i} has NaN or infinite pixels")
        return image

    def segmap(self, i: int) -> np.ndarray:
        """Field ``i``'s truth segmentation map, ``(H, W)`` int32 (``k + 1`` = row ``k`` of :meth:`objects`)."""
        return self._h5()["segmaps"][self._index(i)]

    def _rows(self, i: int) -> dict:
        f = self._h5()
        j = self._index(i)
        offsets = f["offsets"][j:j + 2]
        a, b = (int(v) for v in offsets) if len(offsets) == 2 else (0, -1)
        n_rows = min((len(ds) for ds in f["objects"].values()), default=0)
        if not 0 <= a <= b <= n_rows:
            raise DeepmorphIOError(f"{self.path}: corrupt object table (field {i}'s rows {a}-{b} of {n_rows})")
        return {col: ds[a:b] for col, ds in f["objects"].items()}

    def objects(self, i: int):
        """Field ``i``'s truth as an astropy Table with units (row ``k`` is segmap id ``k + 1``)."""
        return _object_table(self._rows(i), self.attrs)

    @property
    def catalog(self):
        """Every field's truth in one astropy Table (column ``field``)."""
        f = self._h5()
        return _object_table({col: ds[...] for col, ds in f["objects"].items()}, self.attrs)

    def __getitem__(self, i):
        j = self._index(i)
        image = self.image(j)
        segmap = self.segmap(j)
        rows = self._rows(j)
        keep = np.flatnonzero(rows["npix"] > 0)
        ids = rows["id"][keep]
        boxes = np.stack([rows[c][keep] for c in ("x0", "y0", "x1", "y1")], axis=1) + 0.5
        masks = (segmap[None] == (ids[:, None, None] + 1)).astype(np.uint8)
        target = {
            "boxes": torch.as_tensor(boxes.reshape(-1, 4), dtype=torch.float32),
            "labels": torch.as_tensor(rows["label"][keep] + 1, dtype=torch.int64),
            "masks": torch.as_tensor(masks.reshape(-1, *segmap.shape)),
            "ids": torch.as_tensor(ids, dtype=torch.int64),
            "image_id": j,
        }
        return torch.as_tensor(image)[None], target

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FieldDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        a = self.attrs
        return f"FieldDataset({str(self.path)!r}, n={self._n}, size={a['size']}, survey={a['survey']})"


def open_fields(path: str | Path) -> FieldDataset:
    """Open a field file for lazy reading (see :class:`FieldDataset`)."""
    return FieldDataset(path)


def is_field_file(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file written by :func:`write_fields` (False for anything unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def summarize_fields(path: str | Path) -> str:
    """A human-readable summary of a field file (what ``deepmorph info`` prints for one)."""
    from deepmorph.data.store import _describe_noise, _describe_psf

    with open_fields(path) as ds:
        a, f = ds.attrs, ds._h5()
        labels = np.asarray(f["objects"]["label"])
        mag = np.asarray(f["objects"]["mag"], float)
        size, scale = int(a["size"]), float(a["pixel_scale_arcsec"])
        counts = np.bincount(labels[labels >= 0], minlength=len(a["classes"]))
        lines = [
            f"file:        {ds.path}",
            f"survey:      {a['survey']}, image unit {a.get('image_unit', '?')}, zero point {a['zeropoint_mag']:g}",
            f"N:           {len(ds)} fields, seed {a['seed']}",
            f"field:       {size} x {size} px at {scale:g} arcsec/px ({size * scale:.3g} arcsec)",
            f"PSF:         {_describe_psf(a['psf'])}",
            f"noise:       {_describe_noise(a['noise'])}",
            f"density:     {a['density_per_1e4_pix']:g} objects per 10^4 px, {a['star_fraction']:.0%} stars, "
            f"{a['pair_fraction']:.0%} in close pairs",
            f"objects:     {len(labels)} ({', '.join(f'{c} {n}' for c, n in zip(a['classes'], counts, strict=True))})",
            f"magnitudes:  {np.nanmin(mag):.2f} / {np.nanmedian(mag):.2f} / {np.nanmax(mag):.2f} (min / median / max)"
            if len(mag) else "magnitudes:  none",
            f"version:     deepmorph {a.get('version', '?')}",
        ]
    return "\n".join(lines)


def _open_fields(path: Path):
    from deepmorph.data.store import _open_h5

    f = _open_h5(path)
    try:
        if f.attrs.get("format") != FORMAT or not all(k in f for k in ("images", "segmaps", "objects", "offsets")):
            raise DeepmorphIOError(f"{path}: not a deepmorph field file (write one with `deepmorph simulate-fields`)")
        n, done = int(f.attrs["n"]), int(f.attrs["n_done"])
        if done < n:
            raise DeepmorphIOError(f"{path}: incomplete field file ({done} of {n} fields written); rerun the same "
                                   "`deepmorph simulate-fields` command to finish it")
    except (KeyError, OSError, ValueError) as exc:
        f.close()
        if isinstance(exc, DeepmorphIOError):
            raise
        raise DeepmorphIOError(f"{path}: corrupt field file ({exc})") from None
    except BaseException:
        f.close()
        raise
    return f


def _field_attrs(f) -> dict:
    from deepmorph.data.store import _plain

    a = {k: _plain(v) for k, v in f.attrs.items()}
    for key in ("psf", "noise", "priors", "survey_preset", "classes", "mag_range"):
        if isinstance(a.get(key), str):
            a[key] = json.loads(a[key])
    a["pixel_scale"] = a["pixel_scale_arcsec"]
    a["zeropoint"] = a["zeropoint_mag"]
    return a


def _object_table(columns: dict, attrs: dict):
    from astropy.table import Column, Table

    table = Table([Column(v, name=k, unit=OBJECT_UNITS.get(k) or None) for k, v in columns.items()])
    table.meta.update({"survey": attrs["survey"], "pixscale": attrs["pixel_scale"], "zeropt": attrs["zeropoint"],
                       "skysigma": attrs["sky_sigma"], "classes": ",".join(attrs["classes"])})
    return table


def objects_table(objects: dict, sim: FieldSimulator):
    """``simulate_field(...)["objects"]`` as an astropy Table with units (the file's per-field table)."""
    return _object_table(objects, {"survey": sim.survey.name, "pixel_scale": sim.pixel_scale,
                                   "zeropoint": sim.zeropoint, "sky_sigma": sim.sky_sigma,
                                   "classes": list(FIELD_CLASSES)})


__all__ = ["FIELD_CLASSES", "FIELD_PRIORS", "OBJECT_UNITS", "STAR_LABEL", "FieldDataset", "FieldSimulator",
           "blended_flags", "blended_pairs", "composite_hlr", "objects_table", "open_fields", "segmap_boxes",
           "write_fields"]
