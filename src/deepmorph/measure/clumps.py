"""Clumps in galaxy stamps: a classical detector, the extraction of a network's detections, and the metrics.

Star-forming clumps are unresolved knots of light on top of a smooth galaxy. The classical way to find
them (e.g. Guo et al. 2015, ApJ 800, 39, who subtract a 10-pixel boxcar smoothing from CANDELS images;
Shibuya et al. 2016, ApJ 821, 72) removes a smooth model of the galaxy -- a median filter one to a few PSF
FWHMs wide, which follows the galaxy but not features the size of the PSF -- and looks for point
sources in the residual "contrast" image with the SExtractor algorithm (Bertin & Arnouts 1996, A&AS
117, 393; sep, Barbary 2016, JOSS 1, 58).

Everything works on stacks of stamps and on tables with the simulator's conventions: a detection or a
true clump has the ``id`` of its galaxy and a position ``x_pix, y_pix`` in pixels from the stamp centre
``((W - 1) / 2, (H - 1) / 2)``, ``x`` along columns and ``y`` along rows, so that it lies at the 0-based
pixel ``(c + x_pix, c + y_pix)``.

* :func:`clump_snr` -- the S/N of each true clump for optimal (PSF-weighted) photometry;
* :func:`merge_close_clumps` -- true clumps closer than the resolution counted as one;
* :func:`smooth_galaxy_model`, :func:`classical_clumps` -- the classical detector;
* :func:`extract_from_maps` -- detections from a network's per-pixel clump probability maps;
* :func:`match_detections`, :func:`detection_curves`, :func:`completeness_at_purity`,
  :func:`binned_completeness`, :func:`binned_purity` -- the metrics both detectors share.

A detection table has the columns ``id``, ``x_pix``, ``y_pix``, ``flux`` and ``flux_err`` (counts, an
aperture sum on the galaxy-subtracted image) and ``score`` (higher = more certain: the detection S/N of
the classical detector, the peak probability of a network), which the precision-recall curves sweep.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

from deepmorph.errors import DeepmorphValueError
from deepmorph.measure.morphology import _positive

#: PSF FWHM in pixels used by default: CANDELS F160W, 0.18 arcsec at 0.06 arcsec per pixel.
DEFAULT_FWHM_PIX = 3.0
#: Score threshold of each detector's usual operating point (marked on precision-recall figures):
#: a 5-sigma detection for the classical detector, probability 0.5 for a network's maps.
DEFAULT_SCORE_THRESHOLDS = {"classical": 5.0, "probability map": 0.5}
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_MAD_TO_SIGMA = 1.482602218505602
_SMOOTHING = ("median", "gaussian")


# -- input checks ----------------------------------------------------------------------------------
def _stack(images, name: str = "images") -> np.ndarray:
    """``(N, H, W)`` native-endian float32 C-contiguous copy of a stack (sep needs this); no NaN allowed."""
    arr = np.array(images, dtype=np.float32, order="C", copy=True)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise DeepmorphValueError(f"{name} must be (N, 1, H, W), (N, H, W) or (H, W), got shape {np.shape(images)}")
    if not np.isfinite(arr).all():
        raise DeepmorphValueError(f"{name} hold NaN or infinite pixels")
    return np.ascontiguousarray(arr)


def _galaxy_ids(ids, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    out = np.asarray(ids)
    if out.shape != (n,):
        raise DeepmorphValueError(f"ids must be one per stamp ({n}), got shape {out.shape}")
    if out.dtype.kind not in "iu":
        raise DeepmorphValueError(f"ids must be integers, got dtype {out.dtype}")
    if np.unique(out).size != n:
        raise DeepmorphValueError("ids must be unique (one galaxy per stamp)")
    return out.astype(np.int64)


def _columns(table, names: tuple[str, ...], what: str) -> list[np.ndarray]:
    """Columns of an astropy Table or a dict of arrays, as 1-D numpy arrays of one length."""
    try:
        cols = [np.asarray(table[name]) for name in names]
    except (KeyError, TypeError, ValueError):
        have = list(getattr(table, "colnames", None) or (table.keys() if hasattr(table, "keys") else []))
        raise DeepmorphValueError(f"{what} needs columns {', '.join(names)}; it has {have}") from None
    n = len(cols[0]) if cols[0].ndim == 1 else -1
    if any(c.ndim != 1 or len(c) != n for c in cols):
        raise DeepmorphValueError(f"{what} columns {', '.join(names)} must be 1-D and of one length")
    return cols


def _rows_of(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Stamp index of each id in ``wanted``."""
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], wanted)
    pos = np.minimum(pos, len(ids) - 1)
    rows = order[pos]
    missing = ids[rows] != wanted
    if missing.any():
        raise DeepmorphValueError(f"{what} has galaxy ids with no stamp, e.g. {wanted[missing][0]}")
    return rows


def _odd(x: float) -> int:
    n = max(1, int(math.ceil(x)))
    return n if n % 2 else n + 1


# -- S/N of the true clumps -----------------------------------------------------------------------
def clump_snr(truth, noiseless, sky_sigma: float, gain: float | None, psf_nea_pix: float, ids=None) -> np.ndarray:
    """Signal-to-noise ratio of each true clump for optimal (PSF-weighted) photometry.

    A PSF fit of a point source of flux ``F`` on a background of variance ``v`` per pixel has
    ``S/N = F / sqrt(NEA * v)``, with ``NEA = (sum P)^2 / sum P^2`` the PSF's noise-equivalent area
    (King 1983, PASP 95, 163). Here ``v = sky_sigma^2 + local / gain``, where ``local`` is the noise-free
    surface brightness (galaxy and clumps) at the clump's pixel: the variance a PSF fit on top of the
    galaxy sees.

    Parameters
    ----------
    truth : astropy.table.Table or dict
        True clumps with columns ``id`` (galaxy id), ``x_pix``, ``y_pix`` (pixels from the stamp
        centre) and ``flux`` (counts), e.g. the simulator's ``clump_table``.
    noiseless : array_like
        ``(N, 1, H, W)`` or ``(N, H, W)`` noise-free stamps, counts per pixel.
    sky_sigma : float
        Sky noise per pixel (1-sigma), counts; > 0.
    gain : float or None
        Electrons per count for the source Poisson noise; ``None``: sky noise only.
    psf_nea_pix : float
        Noise-equivalent area of the PSF, pixels (``Simulator.psf_nea_pix``).
    ids : array_like of int, optional
        Galaxy id of each stamp, in stamp order (the catalogue's ``id``); default ``0 .. N-1``.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` S/N of each row of ``truth``.
    """
    tid, x, y, flux = _columns(truth, ("id", "x_pix", "y_pix", "flux"), "truth")
    model = _stack(noiseless, "noiseless")
    sky_sigma = _positive(sky_sigma, "sky_sigma")
    nea = _positive(psf_nea_pix, "psf_nea_pix")
    gain = None if gain is None else _positive(gain, "gain")
    n, h, w = model.shape
    rows = _rows_of(_galaxy_ids(ids, n), tid.astype(np.int64), "truth")
    col = np.clip(np.rint(0.5 * (w - 1) + x).astype(np.int64), 0, w - 1)
    row = np.clip(np.rint(0.5 * (h - 1) + y).astype(np.int64), 0, h - 1)
    var = np.full(len(tid), sky_sigma**2)
    if gain is not None:
        var = var + np.maximum(model[rows, row, col].astype(np.float64), 0.0) / gain
    return flux.astype(np.float64) / np.sqrt(nea * var)


def merge_close_clumps(truth, radius_pix: float) -> dict:
    """True clumps of one galaxy closer than ``radius_pix`` to each other, merged into one.

    Two point sources closer than about the PSF's FWHM make one peak: no detector can tell them
    apart, so a catalogue to score detections against counts such a group once (friends of friends
    within ``radius_pix``, per galaxy), at its flux-weighted position with the summed flux.

    Parameters
    ----------
    truth : astropy.table.Table or dict
        True clumps with ``id``, ``x_pix``, ``y_pix``, ``flux`` and optionally ``flux_fraction``.
    radius_pix : float
        Linking length, pixels (the PSF FWHM is the natural choice); 0 merges nothing.

    Returns
    -------
    dict
        Columns ``id``, ``x_pix``, ``y_pix``, ``flux`` (and ``flux_fraction`` when given) of the
        merged clumps, plus ``n_merged``, the number of true clumps in each, in galaxy order.
    """
    tid, x, y, flux = _columns(truth, ("id", "x_pix", "y_pix", "flux"), "truth")
    frac = np.asarray(truth["flux_fraction"], dtype=np.float64) if "flux_fraction" in _names(truth) else None
    radius = float(radius_pix)
    if not (math.isfinite(radius) and radius >= 0):
        raise DeepmorphValueError(f"radius_pix must be a non-negative number, got {radius_pix!r}")
    parent = np.arange(len(tid))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = np.argsort(tid, kind="stable")
    bounds = np.flatnonzero(np.diff(tid[order])) + 1
    for group in np.split(order, bounds):
        if len(group) < 2:
            continue
        d = np.hypot(x[group, None] - x[None, group], y[group, None] - y[None, group])
        for a, b in zip(*np.nonzero(np.triu(d < radius, k=1)), strict=True):
            ra, rb = root(int(group[a])), root(int(group[b]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(tid))], dtype=np.int64)
    keys, inverse = np.unique(roots, return_inverse=True)
    f = flux.astype(np.float64)
    total = np.bincount(inverse, weights=f, minlength=len(keys))
    w = np.where(total > 0, total, 1.0)
    out = {
        "id": tid[keys],
        "x_pix": np.bincount(inverse, weights=f * x, minlength=len(keys)) / w,
        "y_pix": np.bincount(inverse, weights=f * y, minlength=len(keys)) / w,
        "flux": total,
    }
    if frac is not None:
        out["flux_fraction"] = np.bincount(inverse, weights=frac, minlength=len(keys))
    out["n_merged"] = np.bincount(inverse, minlength=len(keys)).astype(np.int64)
    order = np.argsort(out["id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def _names(table) -> list[str]:
    return list(table.colnames) if hasattr(table, "colnames") else list(table)


# -- the classical detector ------------------------------------------------------------------------
def smooth_galaxy_model(images, method: str = "median", size_pix: float | None = None,
                        fwhm_pix: float = DEFAULT_FWHM_PIX) -> np.ndarray:
    """A smooth model of each galaxy that leaves out features the size of the PSF (clumps).

    Parameters
    ----------
    images : array_like
        ``(N, 1, H, W)``, ``(N, H, W)`` or ``(H, W)`` stamps, counts.
    method : {"median", "gaussian"}
        ``"median"``: a median filter over a ``size_pix`` square box, which ignores clumps covering
        less than half of it; ``"gaussian"``: a Gaussian smoothing of FWHM ``size_pix`` (keeps part
        of the clumps' light, so their residuals are fainter).
    size_pix : float, optional
        Box side (rounded up to an odd number of pixels) or Gaussian FWHM, pixels; default three
        PSF FWHMs (9 pixels for CANDELS F160W, close to Guo et al. 2015's 10-pixel boxcar).
    fwhm_pix : float
        PSF FWHM, pixels (sets the default ``size_pix``).

    Returns
    -------
    numpy.ndarray
        float32 model of the shape of ``images``.
    """
    from scipy import ndimage

    shape = np.shape(images)
    data = _stack(images)
    size = 3.0 * _positive(fwhm_pix, "fwhm_pix") if size_pix is None else _positive(size_pix, "size_pix")
    if method == "median":
        model = _median_filter(data, _odd(size))
    elif method == "gaussian":
        model = ndimage.gaussian_filter(data, sigma=(0.0, size * _FWHM_TO_SIGMA, size * _FWHM_TO_SIGMA),
                                        mode="reflect")
    else:
        raise DeepmorphValueError(f"smoothing method must be one of {', '.join(_SMOOTHING)}, got {method!r}")
    return model.reshape(shape)


def _median_filter(data: np.ndarray, k: int) -> np.ndarray:
    """Median over ``k x k`` boxes of each ``(N, H, W)`` stamp, edges mirrored (scipy's "reflect").

    The same as ``scipy.ndimage.median_filter(data, size=(1, k, k))``, three times faster: one
    ``numpy.partition`` over a strided view of the boxes, a few stamps (or rows of a large image) at
    a time to bound the memory.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    n, h, w = data.shape
    p, mid = k // 2, (k * k) // 2
    budget = 1 << 23  # float32 box values at a time (32 MiB)
    rows = max(1, min(h, budget // (w * k * k)))
    chunk = max(1, budget // (h * w * k * k)) if rows == h else 1
    out = np.empty_like(data)
    for s in range(0, n, chunk):
        padded = np.pad(data[s:s + chunk], ((0, 0), (p, p), (p, p)), mode="symmetric")
        for r in range(0, h, rows):
            strip = padded[:, r:r + min(rows, h - r) + 2 * p]
            boxes = sliding_window_view(strip, (k, k), axis=(1, 2))
            out[s:s + chunk, r:r + rows] = np.partition(boxes.reshape(*boxes.shape[:3], k * k), mid, axis=-1)[..., mid]
    return out


def _gaussian_kernel(fwhm_pix: float) -> np.ndarray:
    """Unit-sum Gaussian PSF model of FWHM ``fwhm_pix``, out to 2 FWHM."""
    r = int(math.ceil(2.0 * fwhm_pix))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.exp(-0.5 * (xx**2 + yy**2) / (fwhm_pix * _FWHM_TO_SIGMA) ** 2)
    return k / k.sum()


def _variance(model: np.ndarray, sky_sigma, gain: float | None) -> np.ndarray:
    """Per-pixel variance (counts^2): sky (scalar or one per stamp) plus the galaxy's Poisson noise."""
    sky = np.asarray(sky_sigma, dtype=np.float32).reshape(-1, *([1] * (model.ndim - 1)))
    var = np.broadcast_to(sky**2, model.shape).astype(np.float32)
    if gain is not None:
        var += np.maximum(model, 0) / np.float32(gain)
    return var


def _matched_snr(residual: np.ndarray, var: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """PSF-fit S/N of a point source at every pixel: ``sum(K R / v) / sqrt(sum(K^2 / v))``.

    This is SExtractor's matched filter (sep's ``filter_type="matched"``) in units of sigma; for a
    point source whose PSF is the kernel it equals :func:`clump_snr`'s ``F / sqrt(NEA v)``.
    """
    from scipy import ndimage

    k = kernel[None].astype(np.float32)
    num = ndimage.convolve(residual / var, k, mode="constant", cval=0.0)
    den = ndimage.convolve(1.0 / var, k * k, mode="constant", cval=0.0)
    return np.ascontiguousarray(num / np.sqrt(den), dtype=np.float32)


def _extract(data: np.ndarray, thresh: float, i: int, **kwargs) -> np.ndarray:
    import sep

    # sep's default buffer (300,000 pixels above threshold) is too small for a large map with
    # many detections: room for every pixel of this image, several times (deblending copies them).
    if 4 * data.size > sep.get_extract_pixstack():
        sep.set_extract_pixstack(int(4 * data.size))
    try:
        try:
            return sep.extract(data, thresh, filter_kernel=None, **kwargs)
        except Exception as exc:  # a map with too many blended peaks: extract without deblending
            if "deblending overflow" not in str(exc):
                raise
            return sep.extract(data, thresh, filter_kernel=None,
                               **{**kwargs, "deblend_cont": 1.0, "deblend_nthresh": 1})
    except Exception as exc:  # sep raises plain Exceptions (e.g. too many pixels / objects)
        raise DeepmorphValueError(f"sep could not extract stamp {i}: {exc}") from None


def _detection_table(data: np.ndarray, gal_ids: np.ndarray, found: list[tuple], sky: np.ndarray,
                     gain: float | None, fwhm_pix: float, radius: float, extra: tuple[str, ...] = ()) -> Table:
    """Detections ``(stamp, x, y, score, *extra)`` (0-based pixels) -> the table, with aperture fluxes.

    The flux is summed within ``radius`` on the image minus a median model three PSF FWHMs wide (of
    the stamps with detections only): a box that wide follows the galaxy without absorbing much of
    a clump's light (the aperture is not corrected for the PSF wings outside it).
    """
    import sep

    _, h, w = data.shape
    names = ("stamp", "x", "y", "score", *extra)
    cols = {name: np.array([f[k] for f in found], dtype=np.float64) for k, name in enumerate(names)}
    stamp = cols.pop("stamp").astype(np.int64)
    order = np.argsort(stamp, kind="stable")
    stamp, cols = stamp[order], {name: v[order] for name, v in cols.items()}
    flux, flux_err = np.zeros(len(stamp)), np.zeros(len(stamp))
    stamps, start = np.unique(stamp, return_index=True)
    if len(stamps):
        model = _median_filter(data[stamps], _odd(3.0 * fwhm_pix))
        residual = np.ascontiguousarray(data[stamps] - model)
        sigma = np.sqrt(_variance(model, sky[stamps], gain))
        for j, (lo, hi) in enumerate(zip(start, [*start[1:], len(stamp)], strict=True)):
            f, e, _ = sep.sum_circle(residual[j], cols["x"][lo:hi], cols["y"][lo:hi], radius, err=sigma[j], subpix=5)
            flux[lo:hi], flux_err[lo:hi] = f, e
    table = Table()
    table["id"] = gal_ids[stamp]
    table["x_pix"] = cols.pop("x") - 0.5 * (w - 1)
    table["y_pix"] = cols.pop("y") - 0.5 * (h - 1)
    table["flux"], table["flux_err"] = flux, flux_err
    for name, values in cols.items():
        table[name] = values
    for name, unit in (("x_pix", "pix"), ("y_pix", "pix"), ("flux", "count"), ("flux_err", "count")):
        table[name].unit = unit
    return table


def classical_clumps(
    images,
    sky_sigma: float,
    ids=None,
    snr_threshold: float = 3.0,
    method: str = "median",
    size_pix: float | None = None,
    fwhm_pix: float = DEFAULT_FWHM_PIX,
    min_area: int = 3,
    gain: float | None = None,
    flux_radius_pix: float | None = None,
    exclude_center_pix: float | None = 1.0,
    max_radius_pix: float | None = None,
    deblend_cont: float = 0.001,
) -> Table:
    """Find clumps as point sources in the galaxy-subtracted image (the classical baseline).

    Each stamp's smooth model (:func:`smooth_galaxy_model`, a tight median box by default) is
    subtracted; the residual is filtered with a Gaussian PSF of FWHM ``fwhm_pix`` into a matched-filter
    S/N map, ``sum(K R / v) / sqrt(sum(K^2 / v))``, with ``v`` the sky variance plus, given ``gain``,
    the Poisson variance of the smooth galaxy (without it the photon noise of bright galaxy cores
    makes false clumps). sep (SExtractor) extracts and deblends the sources above ``snr_threshold``
    on that map; a detection's ``score`` is its peak S/N, the same quantity as :func:`clump_snr` for
    a clump on its own. Its position is sep's Gaussian-windowed centroid (``winpos``) on the residual.

    Parameters
    ----------
    images : array_like
        ``(N, 1, H, W)``, ``(N, H, W)`` or ``(H, W)`` background-subtracted stamps, counts.
    sky_sigma : float
        Sky noise per pixel (1-sigma), counts; > 0.
    ids : array_like of int, optional
        Galaxy id of each stamp; default ``0 .. N-1``.
    snr_threshold : float
        Detection threshold on the matched-filter S/N.
    method : {"median", "gaussian"}
        The smooth galaxy model, see :func:`smooth_galaxy_model`.
    size_pix : float, optional
        Its box side or FWHM, pixels; default 1.5 ``fwhm_pix`` (5 pixels for CANDELS F160W). A box
        this tight follows the steep centres of compact galaxies, whose residuals would otherwise
        swallow the clumps around them; it absorbs part of each clump's light, so ``flux`` is
        measured against a wider model (see Returns).
    fwhm_pix : float
        PSF FWHM, pixels.
    min_area : int
        Minimum number of pixels above threshold on the S/N map.
    gain : float, optional
        Electrons per count, to add the galaxy's Poisson noise to the variance.
    flux_radius_pix : float, optional
        Radius of the aperture for ``flux``; default ``fwhm_pix``.
    exclude_center_pix : float or None
        Drop detections within this many pixels of the stamp centre: the galaxy's nucleus or bulge,
        whose peak no smooth model follows, is no clump, as clump studies usually take a central
        peak for the bulge. The default, 1 pixel, covers the centring error of a stamp cut on a
        catalogue position; true clumps that close to the centre are lost. ``None`` keeps everything.
    max_radius_pix : float, optional
        Drop detections farther than this from the stamp centre (neighbours, stamp edges); default:
        keep all. The detector does not otherwise restrict detections to the galaxy's segment,
        because bright clumps in faint, extended disks lie outside any isophote of the smooth light.
    deblend_cont : float
        sep's deblending contrast (``DEBLEND_MINCONT``), which splits close clumps; lower than
        SExtractor's 0.005 because clumps are faint bumps on the residual of a bright core.

    Returns
    -------
    astropy.table.Table
        One row per detection: ``id``, ``x_pix``, ``y_pix`` (pixels from the stamp centre), ``flux``
        and ``flux_err`` (counts, summed within ``flux_radius_pix`` on the image minus a median model
        three FWHMs wide) and ``score`` (peak matched-filter S/N).
    """
    import sep

    data = _stack(images)
    n, h, w = data.shape
    sky_sigma = _positive(sky_sigma, "sky_sigma")
    fwhm_pix = _positive(fwhm_pix, "fwhm_pix")
    snr_threshold = _positive(snr_threshold, "snr_threshold")
    gain = None if gain is None else _positive(gain, "gain")
    radius = fwhm_pix if flux_radius_pix is None else _positive(flux_radius_pix, "flux_radius_pix")
    gal_ids = _galaxy_ids(ids, n)
    model = smooth_galaxy_model(data, method, 1.5 * fwhm_pix if size_pix is None else size_pix, fwhm_pix)
    residual = np.ascontiguousarray(data - model)
    snr = _matched_snr(residual, _variance(model, sky_sigma, gain), _gaussian_kernel(fwhm_pix))
    cy, cx = 0.5 * (h - 1), 0.5 * (w - 1)
    found = []
    for i in range(n):
        obj = _extract(snr[i], snr_threshold, i, minarea=int(min_area), deblend_cont=float(deblend_cont))
        if len(obj) == 0:
            continue
        x, y = obj["x"], obj["y"]
        xw, yw, flag = sep.winpos(residual[i], x, y, fwhm_pix * _FWHM_TO_SIGMA)
        # winpos can wander off a faint clump on a sloping residual; keep the S/N-map centroid then.
        good = (flag == 0) & (np.hypot(xw - x, yw - y) < 0.5 * fwhm_pix)
        x, y = np.where(good, xw, x), np.where(good, yw, y)
        r = np.hypot(x - cx, y - cy)
        keep = np.ones(len(x), dtype=bool)
        if exclude_center_pix is not None:
            keep &= r > float(exclude_center_pix)
        if max_radius_pix is not None:
            keep &= r <= float(max_radius_pix)
        found.extend((i, a, b, s) for a, b, s in zip(x[keep], y[keep], obj["peak"][keep], strict=True))
    table = _detection_table(data, gal_ids, found, np.full(n, sky_sigma), gain, fwhm_pix, radius)
    table.meta.update(detector="classical", snr_threshold=snr_threshold, method=method, fwhm_pix=fwhm_pix)
    return table


# -- a network's probability maps ------------------------------------------------------------------
def extract_from_maps(
    prob_maps,
    images,
    threshold: float = 0.5,
    ids=None,
    min_area: int = 1,
    flux_radius_pix: float | None = None,
    fwhm_pix: float = DEFAULT_FWHM_PIX,
    sky_sigma: float | None = None,
    gain: float | None = None,
) -> Table:
    """Detections from per-pixel clump probability maps (a segmentation network's output).

    sep extracts the connected regions of probability above ``threshold`` (no filtering, sep's
    default deblending, no cleaning); a detection's position is its probability-weighted centroid, its
    ``score`` (and ``probability``) the peak probability within it, and its ``flux`` the aperture sum
    of the galaxy-subtracted image, measured as for :func:`classical_clumps`.

    Parameters
    ----------
    prob_maps : array_like
        Clump probabilities in [0, 1], the shape of ``images``.
    images : array_like
        ``(N, 1, H, W)``, ``(N, H, W)`` or ``(H, W)`` stamps, counts.
    threshold : float
        Probability above which a pixel belongs to a detection, in (0, 1).
    ids : array_like of int, optional
        Galaxy id of each stamp; default ``0 .. N-1``.
    min_area : int
        Minimum number of pixels of a detection.
    flux_radius_pix : float, optional
        Aperture radius, pixels; default ``fwhm_pix``.
    fwhm_pix : float
        PSF FWHM, pixels (the galaxy model for the photometry is a median three FWHMs wide).
    sky_sigma : float, optional
        Sky noise per pixel, counts, for ``flux_err``; default: each stamp's robust (MAD) scatter
        about a median model.
    gain : float, optional
        Electrons per count, to add the galaxy's Poisson noise to ``flux_err``.

    Returns
    -------
    astropy.table.Table
        ``id``, ``x_pix``, ``y_pix`` (pixels from the stamp centre), ``flux``, ``flux_err`` (counts),
        ``score`` and ``probability`` (peak probability).
    """
    data = _stack(images)
    prob = _stack(prob_maps, "prob_maps")
    if prob.shape != data.shape:
        raise DeepmorphValueError(f"prob_maps {np.shape(prob_maps)} and images {np.shape(images)} differ in shape")
    lo, hi = float(prob.min()), float(prob.max())
    if lo < 0 or hi > 1:
        raise DeepmorphValueError(f"prob_maps must be probabilities in [0, 1], got {lo:.3g} to {hi:.3g}")
    threshold = float(threshold)
    if not 0 < threshold < 1:
        raise DeepmorphValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    n = len(data)
    fwhm_pix = _positive(fwhm_pix, "fwhm_pix")
    radius = fwhm_pix if flux_radius_pix is None else _positive(flux_radius_pix, "flux_radius_pix")
    gain = None if gain is None else _positive(gain, "gain")
    gal_ids = _galaxy_ids(ids, n)
    if sky_sigma is None:
        flat = (data - _median_filter(data, _odd(3.0 * fwhm_pix))).reshape(n, -1)
        sky = _MAD_TO_SIGMA * np.median(np.abs(flat - np.median(flat, axis=1, keepdims=True)), axis=1)
        sky = np.maximum(sky, np.finfo(np.float32).tiny)
    else:
        sky = np.full(n, _positive(sky_sigma, "sky_sigma"))
    found = []
    for i in range(n):
        obj = _extract(prob[i], threshold, i, minarea=int(min_area), clean=False)
        found.extend((i, a, b, p, p) for a, b, p in zip(obj["x"], obj["y"], obj["peak"], strict=True))
    table = _detection_table(data, gal_ids, found, sky, gain, fwhm_pix, radius, extra=("probability",))
    table.meta.update(detector="probability map", threshold=threshold)
    return table


# -- matching and metrics --------------------------------------------------------------------------
def match_detections(detections, truth, radius_pix: float = 2.0, priority: str = "distance"):
    """One-to-one matches of detections to true clumps of the same galaxy within ``radius_pix``.

    Candidate pairs (same ``id``, distance <= ``radius_pix``) are accepted greedily, each detection and
    each clump at most once: nearest pairs first (``priority="distance"``), or, as in the object-detection
    benchmarks (PASCAL VOC, COCO), detections in decreasing ``score``, each taking its nearest free clump
    (``priority="score"``). The latter makes the matches of a higher score threshold a subset of those
    of a lower one, so that completeness falls monotonically with the threshold.

    Parameters
    ----------
    detections : astropy.table.Table or dict
        Columns ``id``, ``x_pix``, ``y_pix`` (and ``score`` for ``priority="score"``).
    truth : astropy.table.Table or dict
        Columns ``id``, ``x_pix``, ``y_pix``.
    radius_pix : float
        Matching radius, pixels.
    priority : {"distance", "score"}
        Order in which candidate pairs are accepted.

    Returns
    -------
    det_index, truth_index : numpy.ndarray
        int64 row indices of the matched pairs, sorted by detection row.
    """
    radius_pix = _positive(radius_pix, "radius_pix")
    did, dx, dy = _columns(detections, ("id", "x_pix", "y_pix"), "detections")
    tid, tx, ty = _columns(truth, ("id", "x_pix", "y_pix"), "truth")
    if priority == "score":
        (score,) = _columns(detections, ("score",), "detections")
    elif priority != "distance":
        raise DeepmorphValueError(f"priority must be 'distance' or 'score', got {priority!r}")
    empty = np.zeros(0, dtype=np.int64)
    if len(did) == 0 or len(tid) == 0:
        return empty, empty.copy()
    # All (detection, clump) pairs of the same galaxy, via the truth rows sorted by id.
    order = np.argsort(tid, kind="stable")
    sorted_ids = tid[order]
    lo = np.searchsorted(sorted_ids, did, side="left")
    count = np.searchsorted(sorted_ids, did, side="right") - lo
    di = np.repeat(np.arange(len(did)), count)
    start = np.repeat(np.cumsum(count) - count, count)
    ti = order[np.repeat(lo, count) + np.arange(count.sum()) - start]
    dist = np.hypot(dx[di] - tx[ti], dy[di] - ty[ti])
    near = dist <= radius_pix
    di, ti, dist = di[near], ti[near], dist[near]
    keys = (ti, di, dist) if priority == "distance" else (ti, dist, di, -score[di].astype(np.float64))
    det_used = np.zeros(len(did), dtype=bool)
    truth_used = np.zeros(len(tid), dtype=bool)
    pairs = []
    for k in np.lexsort(keys):  # few candidate pairs: one per detection near a clump, typically
        d, t = di[k], ti[k]
        if not (det_used[d] or truth_used[t]):
            det_used[d] = truth_used[t] = True
            pairs.append((d, t))
    if not pairs:
        return empty, empty.copy()
    out = np.array(sorted(pairs), dtype=np.int64)
    return out[:, 0], out[:, 1]


def _scores(detections) -> np.ndarray:
    (score,) = _columns(detections, ("score",), "detections")
    return score.astype(np.float64)


def _truth_values(values, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise DeepmorphValueError(f"{name} must have one value per true clump ({n}), got shape {arr.shape}")
    return arr


def detection_curves(detections, truth, truth_snr, thresholds, radius_pix: float = 2.0,
                     snr_min: float = 5.0) -> Table:
    """Completeness and purity of the detections above each score threshold.

    Detections are matched to clumps by score (see :func:`match_detections`), so each row's matches
    are those the detections above its threshold make on their own.

    Parameters
    ----------
    detections : astropy.table.Table or dict
        ``id``, ``x_pix``, ``y_pix``, ``score``.
    truth : astropy.table.Table or dict
        True clumps: ``id``, ``x_pix``, ``y_pix``.
    truth_snr : array_like
        S/N of each true clump (:func:`clump_snr`).
    thresholds : array_like
        Score thresholds (a detection counts when ``score >= threshold``).
    radius_pix : float
        Matching radius, pixels.
    snr_min : float
        ``completeness`` counts the clumps with ``S/N >= snr_min``.

    Returns
    -------
    astropy.table.Table
        One row per threshold (ascending): ``threshold``, ``n_detections``, ``n_matched``,
        ``completeness`` (fraction of clumps with S/N >= ``snr_min`` found), ``purity`` (fraction of
        detections matched to any clump, whatever its S/N; NaN without detections) and
        ``completeness_all`` (fraction of all clumps found). ``meta`` holds ``n_true``,
        ``n_true_bright``, ``snr_min``, ``radius_pix`` and, for the tables of this module's detectors,
        ``detector`` and its ``default_threshold`` (:data:`DEFAULT_SCORE_THRESHOLDS`).
    """
    score = _scores(detections)
    (tid,) = _columns(truth, ("id",), "truth")
    snr = _truth_values(truth_snr, len(tid), "truth_snr")
    t = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    if t.size == 0 or not np.isfinite(t).all():
        raise DeepmorphValueError("thresholds must be a non-empty list of finite numbers")
    det, tru = match_detections(detections, truth, radius_pix, priority="score")
    bright = snr >= float(snr_min)
    above = score[None, :] >= t[:, None]  # (T, D)
    matched_score = score[det]
    found = matched_score[None, :] >= t[:, None]  # (T, M)
    n_det = above.sum(axis=1)
    n_match = found.sum(axis=1)
    n_bright = int(bright.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = np.where(n_det > 0, n_match / np.maximum(n_det, 1), np.nan)
        completeness = (found & bright[tru][None, :]).sum(axis=1) / n_bright if n_bright else np.full(t.size, np.nan)
        completeness_all = n_match / len(tid) if len(tid) else np.full(t.size, np.nan)
    table = Table({"threshold": t, "n_detections": n_det, "n_matched": n_match, "completeness": completeness,
                   "purity": purity, "completeness_all": completeness_all})
    table.meta.update(n_true=len(tid), n_true_bright=n_bright, snr_min=float(snr_min), radius_pix=float(radius_pix))
    detector = (getattr(detections, "meta", None) or {}).get("detector")
    if detector in DEFAULT_SCORE_THRESHOLDS:
        table.meta.update(detector=detector, default_threshold=DEFAULT_SCORE_THRESHOLDS[detector])
    return table


def completeness_at_purity(curves, purity: float = 0.9) -> dict:
    """Best completeness among the thresholds whose purity reaches ``purity``.

    Parameters
    ----------
    curves : astropy.table.Table
        Output of :func:`detection_curves`.
    purity : float
        Target purity, in (0, 1].

    Returns
    -------
    dict
        ``completeness`` (the highest with ``purity >= purity``), its ``threshold`` (the highest among
        ties) and the ``purity`` there; ``completeness`` 0 and NaN for the others when no threshold is
        pure enough.
    """
    comp, pur, thr = _columns(curves, ("completeness", "purity", "threshold"), "curves")
    comp, pur, thr = (np.asarray(c, dtype=np.float64) for c in (comp, pur, thr))
    ok = np.isfinite(pur) & (pur >= float(purity)) & np.isfinite(comp)
    if not ok.any():
        return {"completeness": 0.0, "threshold": math.nan, "purity": math.nan}
    best = comp[ok].max()
    k = np.nonzero(ok & (comp == best))[0]
    k = k[np.argmax(thr[k])]
    return {"completeness": float(best), "threshold": float(thr[k]), "purity": float(pur[k])}


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction ``k / n`` and its Wilson score interval (``z = 1``: 68%); NaN where ``n = 0``."""
    n_f = n.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n_f
        centre = (p + z * z / (2 * n_f)) / (1 + z * z / n_f)
        half = z / (1 + z * z / n_f) * np.sqrt(p * (1 - p) / n_f + z * z / (4 * n_f * n_f))
    return p, centre - half, centre + half


def _binned_fraction(values: np.ndarray, success: np.ndarray, bins, total: str, hits: str, frac: str) -> Table:
    edges = np.asarray(bins, dtype=np.float64).ravel()
    if edges.size < 2 or not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
        raise DeepmorphValueError("bins must be at least two increasing, finite edges")
    nb = edges.size - 1
    idx = np.searchsorted(edges, values, side="right") - 1
    idx[values == edges[-1]] = nb - 1  # the last bin includes its upper edge, as in numpy.histogram
    inside = (idx >= 0) & (idx < nb) & np.isfinite(values)
    idx, v, s = idx[inside], values[inside], success[inside]
    n = np.bincount(idx, minlength=nb)
    k = np.bincount(idx, weights=s.astype(np.float64), minlength=nb).astype(np.int64)
    sums = np.bincount(idx, weights=v, minlength=nb)
    centre = np.where(n > 0, sums / np.maximum(n, 1), 0.5 * (edges[:-1] + edges[1:]))
    p, lo, hi = _wilson(k, n)
    return Table({"lo": edges[:-1], "hi": edges[1:], "center": centre, total: n, hits: k, frac: p,
                  f"{frac}_lo": lo, f"{frac}_hi": hi})


def _matched_above(detections, truth, threshold: float, radius_pix: float):
    score = _scores(detections)
    det, tru = match_detections(detections, truth, radius_pix, priority="score")
    keep = score[det] >= float(threshold)
    return score, det[keep], tru[keep]


def binned_completeness(detections, truth, truth_values, bins, threshold: float, radius_pix: float = 2.0) -> Table:
    """Completeness of the detections with ``score >= threshold`` in bins of a truth quantity.

    Parameters
    ----------
    detections, truth : astropy.table.Table or dict
        As for :func:`detection_curves`.
    truth_values : array_like
        The quantity to bin, one per true clump (S/N, ``flux_fraction``, distance from the centre...).
    bins : array_like
        Bin edges, increasing; values outside are left out, the last edge is included.
    threshold : float
        Score threshold of the detections.
    radius_pix : float
        Matching radius, pixels.

    Returns
    -------
    astropy.table.Table
        One row per bin: ``lo``, ``hi``, ``center`` (mean value in the bin, the midpoint when empty),
        ``n_true``, ``n_found``, ``completeness`` and its 68% Wilson interval ``completeness_lo``,
        ``completeness_hi`` (NaN for an empty bin).
    """
    (tid,) = _columns(truth, ("id",), "truth")
    values = _truth_values(truth_values, len(tid), "truth_values")
    _, _, tru = _matched_above(detections, truth, threshold, radius_pix)
    found = np.zeros(len(tid), dtype=bool)
    found[tru] = True
    return _binned_fraction(values, found, bins, "n_true", "n_found", "completeness")


def binned_purity(detections, truth, detection_values, bins, threshold: float, radius_pix: float = 2.0) -> Table:
    """Purity of the detections with ``score >= threshold`` in bins of a detection quantity.

    Parameters
    ----------
    detections, truth : astropy.table.Table or dict
        As for :func:`detection_curves`.
    detection_values : array_like
        The quantity to bin, one per detection (e.g. ``flux`` over the galaxy's flux).
    bins : array_like
        Bin edges, increasing.
    threshold : float
        Score threshold of the detections.
    radius_pix : float
        Matching radius, pixels.

    Returns
    -------
    astropy.table.Table
        One row per bin: ``lo``, ``hi``, ``center``, ``n_detections``, ``n_matched``, ``purity`` and its
        68% Wilson interval ``purity_lo``, ``purity_hi``.
    """
    score, det, _ = _matched_above(detections, truth, threshold, radius_pix)
    values = np.asarray(detection_values, dtype=np.float64)
    if values.shape != score.shape:
        raise DeepmorphValueError(f"detection_values must have one value per detection ({len(score)}), "
                                  f"got shape {values.shape}")
    matched = np.zeros(len(score), dtype=bool)
    matched[det] = True
    above = score >= float(threshold)
    return _binned_fraction(values[above], matched[above], bins, "n_detections", "n_matched", "purity")


__all__ = [
    "DEFAULT_FWHM_PIX", "DEFAULT_SCORE_THRESHOLDS", "binned_completeness", "binned_purity", "classical_clumps",
    "clump_snr", "completeness_at_purity", "detection_curves", "extract_from_maps", "match_detections",
    "smooth_galaxy_model",
]
