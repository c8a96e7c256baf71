"""Detection in fields: the sep (SExtractor) baseline and the scores of any detector against the truth.

Every detector's output is put in one form -- a catalogue (astropy Table) and a segmentation map
whose value ``id`` marks the pixels of row ``id - 1`` -- so that a deep detector and SExtractor are
scored by the same functions on the same fields:

* :func:`sep_catalog` -- SExtractor's detection, deblending and segmentation through ``sep``
  (Bertin & Arnouts 1996, A&AS 117, 393; Barbary 2016, JOSS 1, 58);
* :func:`prediction_catalog` -- a torchvision detector's output (``boxes, labels, scores, masks``)
  in the same form;
* :func:`match_catalogs` -- one-to-one matching by centre distance (Hungarian algorithm);
* :func:`detection_scores` -- completeness and purity vs magnitude, AP@0.5 (box and mask, COCO's
  definition through torchmetrics), classification accuracy, flux error, blended pairs split;
* :func:`detection_figure` -- completeness and purity vs magnitude of several methods.

Conventions: 0-based pixel centres, arrays ``[..., y, x]``; boxes ``x0, y0, x1, y1`` on pixel edges
(pixel ``j`` spans ``[j - 0.5, j + 0.5]``, so ``x1 - x0`` is the width in pixels); fluxes are
isophotal (the sum of the image over the object's segment, SExtractor's ``FLUX_ISO``) for every
method, so that flux errors compare detectors and deblenders rather than photometry schemes.

The truth is a table of :mod:`deepmorph.simulate.fields` (``x, y, mag, flux, label, npix,
blend_radius_pix, hlr_pix``) with its segmentation map. Truth objects with no segmap pixel
(``npix == 0``: below the mask threshold everywhere, or buried under a brighter neighbour) can be
matched (a detection of one is not a false one) but do not count in the completeness.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from astropy.table import Table

from deepmorph.errors import DeepmorphValueError

#: SExtractor's ``default.conv``: a 3x3 pyramidal detection filter (also sep's default).
SEXTRACTOR_CONV = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)
#: Magnitude bins of :func:`detection_scores` (AB mag, edges).
DEFAULT_MAG_BINS = tuple(np.round(np.arange(18.0, 28.01, 0.5), 2))
_STAR = 4  # FIELD_CLASSES.index("star"); kept literal so this module does not import torch


# -- catalogues --------------------------------------------------------------------------------------

def _image(image, what: str = "image") -> np.ndarray:
    data = np.asarray(image)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise DeepmorphValueError(f"{what} must be a 2-D array (or (1, H, W)), got shape {data.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)  # native byte order for sep
    if not np.all(np.isfinite(data)):
        raise DeepmorphValueError(f"{what} has NaN or infinite pixels")
    return data


def segment_photometry(image, segmap, n: int, sky_sigma: float, gain: float | None = None,
                       zeropoint: float | None = None) -> dict:
    """Isophotal photometry and boxes of segments ``1..n`` of ``segmap``.

    Returns
    -------
    dict
        Columns ``x0, y0, x1, y1`` (pixel edges, NaN for an empty segment), ``npix``, ``flux`` (counts,
        sum over the segment), ``flux_err`` (``sqrt(npix sky^2 + max(flux, 0) / gain)``), ``snr``
        (``flux / flux_err``), ``mag`` and ``mag_err`` (NaN for ``flux <= 0``; only with a zero point).
    """
    from deepmorph.simulate.fields import segmap_boxes

    seg = np.asarray(segmap).astype(np.int64)
    data = np.asarray(image, dtype=np.float64)
    npix = np.bincount(seg.ravel(), minlength=n + 1)[1:n + 1]
    flux = np.bincount(seg.ravel(), weights=data.ravel(), minlength=n + 1)[1:n + 1]
    var = npix * float(sky_sigma) ** 2 + (np.clip(flux, 0, None) / gain if gain else 0.0)
    err = np.sqrt(var)
    boxes = segmap_boxes(seg, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, flux / err, np.nan)
    out = {"x0": boxes[:, 0], "y0": boxes[:, 1], "x1": boxes[:, 2], "y1": boxes[:, 3],
           "npix": npix.astype(np.int64), "flux": flux, "flux_err": err, "snr": snr}
    if zeropoint is not None:
        positive = flux > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            out["mag"] = np.where(positive, zeropoint - 2.5 * np.log10(np.where(positive, flux, 1.0)), np.nan)
            out["mag_err"] = np.where(positive, 2.5 / math.log(10.0) * err / flux, np.nan)
    return out


def _table(columns: dict, units: dict) -> Table:
    table = Table(columns)
    for name, unit in units.items():
        if name in table.colnames:
            table[name].unit = unit
    return table


_UNITS = {"x": "pix", "y": "pix", "x0": "pix", "y0": "pix", "x1": "pix", "y1": "pix", "a": "pix", "b": "pix",
          "theta_deg": "deg", "flux": "count", "flux_err": "count", "mag": "mag", "mag_err": "mag"}


def sep_catalog(image, sky_sigma: float | None = None, threshold: float = 1.5, minarea: int = 5,
                deblend_nthresh: int = 32, deblend_cont: float = 0.005, zeropoint: float | None = None,
                gain: float | None = None, clean: bool = True, filter_kernel=SEXTRACTOR_CONV,
                background_box: int = 64) -> tuple[Table, np.ndarray]:
    """SExtractor's detection and deblending of a field, with its segmentation map, through sep.

    Parameters
    ----------
    image : array_like
        ``(H, W)`` (or ``(1, H, W)``) image, counts.
    sky_sigma : float, optional
        Sky noise per pixel (counts) of a background-subtracted image (simulated fields: the file's
        ``sky_sigma``). ``None``: sep estimates and subtracts a background mesh of ``background_box``
        pixels, and its global rms is used.
    threshold : float
        ``DETECT_THRESH``: detection threshold in units of ``sky_sigma`` (applied to the filtered image).
    minarea : int
        ``DETECT_MINAREA``, pixels.
    deblend_nthresh, deblend_cont : int, float
        ``DEBLEND_NTHRESH`` and ``DEBLEND_MINCONT`` (1.0 switches deblending off).
    zeropoint : float, optional
        AB magnitude of one count: adds ``mag`` and ``mag_err``.
    gain : float, optional
        Electrons per count: adds the sources' Poisson noise to ``flux_err``.
    clean : bool
        ``CLEAN``: remove spurious detections in the wings of bright ones.
    filter_kernel : array_like or None
        ``FILTER_NAME``; default SExtractor's ``default.conv``.

    Returns
    -------
    table : astropy.table.Table
        One row per detection: ``id`` (its value in the segmentation map), ``x, y`` (sep's isophotal
        barycentre), ``a, b, theta_deg``, ``x0, y0, x1, y1`` (box of the segment), ``npix``, ``flux``
        and ``flux_err`` (isophotal, see :func:`segment_photometry`), ``snr``, ``score`` (= ``snr``:
        sep has no confidence, and AP needs a ranking), ``mag``, ``mag_err``. ``meta['sky_sigma']``.
    segmap : numpy.ndarray
        ``(H, W)`` int32: 0 background, ``id`` the detection's pixels.
    """
    import sep

    data = _image(image)
    if sky_sigma is None:
        bkg = sep.Background(data, bw=background_box, bh=background_box, fw=3, fh=3)
        data = np.ascontiguousarray(data - bkg.back(), dtype=np.float32)
        sky_sigma = float(bkg.globalrms)
    if not (isinstance(sky_sigma, (int, float, np.floating)) and math.isfinite(sky_sigma) and sky_sigma > 0):
        raise DeepmorphValueError(f"sky sigma must be a positive number of counts, got {sky_sigma!r}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise DeepmorphValueError(f"detection threshold must be a positive number of sigmas, got {threshold}")
    if int(minarea) != minarea or minarea < 1:
        raise DeepmorphValueError(f"minimum detection area must be a positive number of pixels, got {minarea}")
    kernel = None if filter_kernel is None else np.asarray(filter_kernel, dtype=np.float32)
    if 4 * data.size > sep.get_extract_pixstack():
        sep.set_extract_pixstack(int(4 * data.size))
    try:
        objs, seg = sep.extract(data, float(threshold), err=float(sky_sigma), minarea=int(minarea),
                                filter_kernel=kernel, deblend_nthresh=int(deblend_nthresh),
                                deblend_cont=float(deblend_cont), clean=bool(clean), segmentation_map=True)
    except Exception as exc:  # sep raises plain Exceptions (e.g. "internal pixel buffer full")
        raise DeepmorphValueError(f"source extraction failed: {exc}") from None
    n = len(objs)
    phot = segment_photometry(data, seg, n, sky_sigma, gain, zeropoint)
    cols = {"id": np.arange(1, n + 1, dtype=np.int64),
            "x": np.asarray(objs["x"], float), "y": np.asarray(objs["y"], float),
            "a": np.asarray(objs["a"], float), "b": np.asarray(objs["b"], float),
            "theta_deg": np.degrees(np.asarray(objs["theta"], float)) % 180.0, **phot}
    cols["score"] = np.nan_to_num(phot["snr"], nan=0.0)
    table = _table(cols, _UNITS)
    table.meta.update({"method": "sep", "sky_sigma": float(sky_sigma), "threshold": float(threshold),
                       "minarea": int(minarea), "deblend_nthresh": int(deblend_nthresh),
                       "deblend_cont": float(deblend_cont)})
    return table, np.ascontiguousarray(seg, dtype=np.int32)


def prediction_catalog(prediction: dict, image, sky_sigma: float, zeropoint: float | None = None,
                       gain: float | None = None, mask_threshold: float = 0.5,
                       score_threshold: float = 0.0) -> tuple[Table, np.ndarray]:
    """A torchvision detector's output for one field as a catalogue and a segmentation map.

    Parameters
    ----------
    prediction : dict
        ``boxes`` ``(N, 4)`` in torchvision's convention (pixel ``j`` spans ``[j, j + 1]``),
        ``labels`` ``(N,)`` (class + 1, 0 being torchvision's background), ``scores`` ``(N,)``,
        ``masks`` ``(N, 1, H, W)`` or ``(N, H, W)`` probabilities (or booleans); tensors or arrays.
    image : array_like
        The field, counts (background-subtracted), for the isophotal fluxes.
    sky_sigma : float
        Sky noise per pixel, counts (for ``flux_err``).
    mask_threshold : float
        A pixel belongs to a detection where its mask probability is above this.
    score_threshold : float
        Detections scoring below this are dropped.

    Returns
    -------
    table, segmap
        As :func:`sep_catalog`: ``id, x, y`` (flux-weighted centroid of the segment, the box centre
        for an empty or non-positive one), ``x0, y0, x1, y1`` (the predicted box, shifted to pixel
        centres), ``label`` (class, 0-based), ``score``, ``npix``, ``flux``, ``flux_err``, ``snr``,
        ``mag``. Overlapping masks go to the highest-scoring detection, so segments never overlap.
    """
    data = _image(image)

    def arr(key):
        value = prediction[key]
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

    missing = [k for k in ("boxes", "labels", "scores", "masks") if k not in prediction]
    if missing:
        raise DeepmorphValueError(f"prediction has no {', '.join(missing)}")
    boxes, labels, scores, masks = arr("boxes").astype(float), arr("labels"), arr("scores").astype(float), arr("masks")
    if masks.ndim == 4:
        masks = masks[:, 0]
    keep = scores >= score_threshold
    boxes, labels, scores, masks = boxes[keep].reshape(-1, 4), labels[keep], scores[keep], masks[keep]
    if masks.shape[1:] != data.shape:
        raise DeepmorphValueError(f"masks are {masks.shape[1:]} pixels but the image is {data.shape}")
    order = np.argsort(-scores, kind="stable")
    boxes, labels, scores, masks = boxes[order], labels[order], scores[order], masks[order]
    n = len(scores)
    seg = np.zeros(data.shape, dtype=np.int32)
    for k in range(n - 1, -1, -1):  # lowest score first: higher scores overwrite
        seg[masks[k] > mask_threshold] = k + 1
    phot = segment_photometry(data, seg, n, sky_sigma, gain, zeropoint)
    flat = seg.ravel()
    yy, xx = np.indices(data.shape)
    w = np.clip(data.ravel().astype(np.float64), 0, None)
    wsum = np.bincount(flat, weights=w, minlength=n + 1)[1:n + 1]
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2]) - 0.5
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3]) - 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(wsum > 0, np.bincount(flat, weights=w * xx.ravel(), minlength=n + 1)[1:n + 1] / wsum, cx)
        y = np.where(wsum > 0, np.bincount(flat, weights=w * yy.ravel(), minlength=n + 1)[1:n + 1] / wsum, cy)
    cols = {"id": np.arange(1, n + 1, dtype=np.int64), "x": x, "y": y, "x0": boxes[:, 0] - 0.5,
            "y0": boxes[:, 1] - 0.5, "x1": boxes[:, 2] - 0.5, "y1": boxes[:, 3] - 0.5,
            "label": labels.astype(np.int64) - 1, "score": scores,
            **{k: v for k, v in phot.items() if k not in ("x0", "y0", "x1", "y1")}}
    table = _table(cols, _UNITS)
    table.meta.update({"sky_sigma": float(sky_sigma), "mask_threshold": float(mask_threshold)})
    return table, seg


# -- matching and scores ---------------------------------------------------------------------------

def match_catalogs(pred, truth, max_dist: float = 3.0, hlr_factor: float = 0.5):
    """One-to-one matches of detections to true objects by centre distance (Hungarian algorithm).

    A detection may match a true object whose centre lies within ``max(max_dist, hlr_factor *
    hlr_pix)`` pixels (``hlr_pix`` when the truth has it); among the allowed pairs the total distance
    is minimised.

    Returns
    -------
    pred_index, truth_index, distance : numpy.ndarray
        Matched rows (sorted by truth row) and their distances, pixels.
    """
    from scipy.optimize import linear_sum_assignment

    px, py = np.asarray(pred["x"], float), np.asarray(pred["y"], float)
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    if not len(px) or not len(tx):
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    radius = np.full(len(tx), float(max_dist))
    if "hlr_pix" in getattr(truth, "colnames", truth.keys() if hasattr(truth, "keys") else ()):
        radius = np.maximum(radius, hlr_factor * np.nan_to_num(np.asarray(truth["hlr_pix"], float)))
    d = np.hypot(px[:, None] - tx[None, :], py[:, None] - ty[None, :])
    allowed = d <= radius[None, :]
    cost = np.where(allowed, d, 1e6)
    rows, cols = linear_sum_assignment(cost)
    ok = allowed[rows, cols]
    rows, cols = rows[ok], cols[ok]
    order = np.argsort(cols)
    return rows[order], cols[order], d[rows[order], cols[order]]


def _binned(values, success, bins):
    values, success = np.asarray(values, float), np.asarray(success, bool)
    idx = np.digitize(values, bins) - 1
    inside = (idx >= 0) & (idx < len(bins) - 1)
    n = np.bincount(idx[inside], minlength=len(bins) - 1)
    k = np.bincount(idx[inside], weights=success[inside].astype(float), minlength=len(bins) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, k / n, np.nan), n


def completeness_limit(mags, detected, level: float = 0.5) -> float:
    """Magnitude at which the completeness falls to ``level``, from a logistic fit.

    ``P(detected | m) = 1 / (1 + exp((m - m50) / w))`` is fitted to the individual objects by
    maximum likelihood (robust with a few dozen objects, where binned curves are noisy); the result
    is ``m50 + w ln(1 / level - 1)``. NaN when every object, or none, is detected.
    """
    from scipy.optimize import minimize
    from scipy.special import expit

    m = np.asarray(mags, float)
    d = np.asarray(detected, bool)
    ok = np.isfinite(m)
    m, d = m[ok], d[ok]
    if d.all() or not d.any():
        return float("nan")

    def nll(p):
        prob = np.clip(expit(-(m - p[0]) / np.exp(p[1])), 1e-12, 1 - 1e-12)
        return -np.sum(np.where(d, np.log(prob), np.log1p(-prob)))

    start = [0.5 * (np.max(m[d]) + np.min(m[~d])), math.log(0.3)]
    fit = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
    m50, w = float(fit.x[0]), float(np.exp(fit.x[1]))
    return m50 + w * math.log(1.0 / level - 1.0)


def touching_segments(segmap, n: int) -> np.ndarray:
    """``(n,)`` bools: segments ``1..n`` that share an edge or a corner with another segment."""
    seg = np.asarray(segmap).astype(np.int64)
    out = np.zeros(n + 1, dtype=bool)
    h, w = seg.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = seg[:h - dy, max(0, -dx):w - max(0, dx)]
        b = seg[dy:, max(0, dx):w - max(0, -dx)]
        touch = (a != b) & (a > 0) & (b > 0)
        out[a[touch]] = True
        out[b[touch]] = True
    return out[1:]


def _robust(x) -> tuple[float, float, int]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan"), float("nan"), 0
    med = float(np.median(x))
    return med, float(1.4826 * np.median(np.abs(x - med))), int(x.size)


def _masks(segmap, ids) -> np.ndarray:
    seg = np.asarray(segmap)
    ids = np.asarray(ids, dtype=np.int64)
    return seg[None] == ids[:, None, None]


def _ap50(pred_tables, pred_segmaps, truth_tables, truth_segmaps, bright_mag: float) -> dict:
    """Class-agnostic COCO AP at IoU 0.5 (box and mask) for galaxies brighter than ``bright_mag``.

    Stars and fainter objects are COCO "crowd" regions: detecting them is neither rewarded nor
    penalised.
    """
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="faster_coco_eval", iou_thresholds=[0.5])
    n_bright = 0
    for pt, ps, tt, ts in zip(pred_tables, pred_segmaps, truth_tables, truth_segmaps, strict=True):
        visible = np.asarray(tt["npix"]) > 0
        tt = tt[visible]
        bright = (np.asarray(tt["label"]) != _STAR) & (np.asarray(tt["mag"], float) < bright_mag)
        n_bright += int(bright.sum())
        tboxes = np.stack([np.asarray(tt[c], float) for c in ("x0", "y0", "x1", "y1")], axis=1).reshape(-1, 4)
        pboxes = np.stack([np.asarray(pt[c], float) for c in ("x0", "y0", "x1", "y1")], axis=1).reshape(-1, 4)
        pm = _masks(ps, pt["id"])
        ok = np.all(np.isfinite(pboxes), axis=1) & pm.any(axis=(1, 2))
        metric.update(
            [{"boxes": torch.as_tensor(pboxes[ok], dtype=torch.float32),
              "scores": torch.as_tensor(np.asarray(pt["score"], float)[ok], dtype=torch.float32),
              "labels": torch.zeros(int(ok.sum()), dtype=torch.int64),
              "masks": torch.as_tensor(pm[ok])}],
            [{"boxes": torch.as_tensor(tboxes, dtype=torch.float32),
              "labels": torch.zeros(len(tt), dtype=torch.int64),
              "masks": torch.as_tensor(_masks(ts, np.asarray(tt["id"]) + 1)),
              "iscrowd": torch.as_tensor((~bright).astype(np.int64))}],
        )
    if n_bright == 0:
        return {"ap50_box": float("nan"), "ap50_mask": float("nan"), "n_bright": 0}
    r = metric.compute()
    return {"ap50_box": float(r["bbox_map_50"]), "ap50_mask": float(r["segm_map_50"]), "n_bright": n_bright}


def detection_scores(pred_tables, pred_segmaps, truth_tables, truth_segmaps, mag_bins=DEFAULT_MAG_BINS,
                     bright_mag: float | None = None, max_dist: float = 3.0, ap: bool = True) -> dict:
    """Score a detector on fields against the truth.

    Parameters
    ----------
    pred_tables, pred_segmaps : sequences
        Per field, a catalogue (``id, x, y, x0, y0, x1, y1, score, flux, mag``, optionally ``label``)
        and its segmentation map (value ``id`` = the row's pixels), e.g. from :func:`sep_catalog` or
        :func:`prediction_catalog`.
    truth_tables, truth_segmaps : sequences
        Per field, the truth of :mod:`deepmorph.simulate.fields` (row ``k`` = segmap value ``k + 1``).
    mag_bins : sequence of float
        Magnitude bin edges of the completeness and purity curves.
    bright_mag : float, optional
        AP@0.5, flux errors and the bright blend score use galaxies brighter than this. Default:
        this detector's detection limit minus 1 mag. The detection limit is the magnitude at which
        the completeness of isolated galaxies (whose truth mask touches no other) falls to 50%
        (:func:`completeness_limit`): a depth, not confused by blends. Pass sep's when comparing
        methods, so that all are scored on the same objects.
    max_dist : float
        Matching radius, pixels (see :func:`match_catalogs`).
    ap : bool
        Compute AP@0.5 (torchmetrics; the slow part).

    Returns
    -------
    dict
        JSON-able: ``n_fields, n_truth`` (objects with segmap pixels), ``n_pred, n_matched``,
        ``completeness``, ``purity``; ``mag_bins``, ``completeness_vs_mag`` and ``n_truth_vs_mag``
        (by true magnitude), ``purity_vs_mag`` and ``n_pred_vs_mag`` (by the detection's measured
        magnitude: unmatched detections have no true one); ``mag_limit`` (50% completeness of
        isolated galaxies), ``bright_mag``; ``ap50_box``, ``ap50_mask``, ``n_bright``; ``flux_rel_error_median``
        and ``flux_rel_error_nmad`` ((measured - true) / true for matched bright galaxies),
        ``n_flux``; with labels ``classification_accuracy`` (matched objects, stars included),
        ``galaxy_accuracy`` (matched galaxies), ``galaxy_accuracy_bright`` (those brighter than
        ``bright_mag``) and ``confusion`` (rows true, columns predicted);
        ``n_blend_pairs`` and ``blend_split_fraction`` (true pairs closer than 2 blend radii, both
        with segmap pixels, whose two members match two distinct detections), and the same for
        pairs of two bright galaxies (``_bright``).
    """
    from deepmorph.simulate.fields import blended_pairs

    pred_tables, truth_tables = list(pred_tables), list(truth_tables)
    pred_segmaps, truth_segmaps = list(pred_segmaps), list(truth_segmaps)
    if not (len(pred_tables) == len(pred_segmaps) == len(truth_tables) == len(truth_segmaps)):
        raise DeepmorphValueError("predictions and truth must list the same number of fields "
                                  f"({len(pred_tables)}, {len(pred_segmaps)}, {len(truth_tables)}, "
                                  f"{len(truth_segmaps)})")
    if not truth_tables:
        raise DeepmorphValueError("no fields to score")
    bins = np.asarray(mag_bins, float)
    t_mag, t_det, t_gal, t_vis, t_alone = [], [], [], [], []
    p_mag, p_ok = [], []
    flux_rel, flux_mag, lab_t, lab_p, lab_mag = [], [], [], [], []
    pairs_split, pairs_gal, pairs_faint = [], [], []
    has_labels = all("label" in t.colnames for t in pred_tables)
    for pt, tt, ts in zip(pred_tables, truth_tables, truth_segmaps, strict=True):
        pi, ti, _ = match_catalogs(pt, tt, max_dist=max_dist)
        matched_t = np.zeros(len(tt), bool)
        matched_t[ti] = True
        matched_p = np.zeros(len(pt), bool)
        matched_p[pi] = True
        mag = np.asarray(tt["mag"], float)
        label = np.asarray(tt["label"], int)
        vis = np.asarray(tt["npix"]) > 0
        t_mag.append(mag)
        t_det.append(matched_t)
        t_gal.append(label != _STAR)
        t_vis.append(vis)
        t_alone.append(~touching_segments(ts, len(tt)))
        p_mag.append(np.asarray(pt["mag"], float) if "mag" in pt.colnames else np.full(len(pt), np.nan))
        p_ok.append(matched_p)
        flux_rel.append((np.asarray(pt["flux"], float)[pi] - np.asarray(tt["flux"], float)[ti])
                        / np.asarray(tt["flux"], float)[ti])
        flux_mag.append(np.where(label[ti] != _STAR, mag[ti], np.inf))
        if has_labels:
            lab_t.append(label[ti])
            lab_p.append(np.asarray(pt["label"], int)[pi])
            lab_mag.append(mag[ti])
        pr = blended_pairs(tt["x"], tt["y"], tt["blend_radius_pix"]).reshape(-1, 2)
        pr = pr[vis[pr[:, 0]] & vis[pr[:, 1]]]
        pairs_split.append(matched_t[pr[:, 0]] & matched_t[pr[:, 1]])
        pairs_gal.append((label[pr] != _STAR).all(axis=1))
        pairs_faint.append(mag[pr].max(axis=1) if len(pr) else np.zeros(0))
    t_mag, t_det, t_gal, t_vis, t_alone = (np.concatenate(v) for v in (t_mag, t_det, t_gal, t_vis, t_alone))
    p_mag, p_ok = np.concatenate(p_mag), np.concatenate(p_ok)
    isolated = t_gal & t_vis & t_alone
    mag_limit = completeness_limit(t_mag[isolated], t_det[isolated])
    if bright_mag is None:
        bright_mag = mag_limit - 1.0
    comp, n_t = _binned(t_mag[t_vis], t_det[t_vis], bins)
    pur, n_p = _binned(p_mag, p_ok, bins)
    out = {
        "n_fields": len(truth_tables), "n_truth": int(t_vis.sum()), "n_pred": int(len(p_ok)),
        "n_matched": int(t_det.sum()),
        "completeness": float(t_det[t_vis].mean()) if t_vis.any() else float("nan"),
        "purity": float(p_ok.mean()) if len(p_ok) else float("nan"),
        "mag_bins": bins.tolist(), "completeness_vs_mag": comp.tolist(), "n_truth_vs_mag": n_t.tolist(),
        "purity_vs_mag": pur.tolist(), "n_pred_vs_mag": n_p.tolist(),
        "mag_limit": mag_limit, "bright_mag": float(bright_mag),
    }
    fr, fm = np.concatenate(flux_rel), np.concatenate(flux_mag)
    med, nmad, nf = _robust(fr[fm < bright_mag])
    out.update({"flux_rel_error_median": med, "flux_rel_error_nmad": nmad, "n_flux": nf})
    if has_labels:
        lt, lp, lm = np.concatenate(lab_t), np.concatenate(lab_p), np.concatenate(lab_mag)
        k = _STAR + 1
        cm = np.zeros((k, k), dtype=np.int64)
        valid = (lp >= 0) & (lp < k)
        np.add.at(cm, (lt[valid], lp[valid]), 1)
        gal = lt != _STAR
        out.update({
            "classification_accuracy": float((lt == lp).mean()) if len(lt) else float("nan"),
            "galaxy_accuracy": float((lt[gal] == lp[gal]).mean()) if gal.any() else float("nan"),
            "galaxy_accuracy_bright": (float((lt[gal & (lm < bright_mag)] == lp[gal & (lm < bright_mag)]).mean())
                                       if (gal & (lm < bright_mag)).any() else float("nan")),
            "confusion": cm.tolist(),
        })
    split = np.concatenate(pairs_split)
    bright_pair = np.concatenate(pairs_gal) & (np.concatenate(pairs_faint) < bright_mag)
    out.update({
        "n_blend_pairs": int(split.size),
        "blend_split_fraction": float(split.mean()) if split.size else float("nan"),
        "n_blend_pairs_bright": int(bright_pair.sum()),
        "blend_split_fraction_bright": float(split[bright_pair].mean()) if bright_pair.any() else float("nan"),
    })
    if ap:
        out.update(_ap50(pred_tables, pred_segmaps, truth_tables, truth_segmaps, bright_mag))
    return out


# -- figure and the baseline run ---------------------------------------------------------------------

def detection_figure(scores_by_method: dict, path: str | Path | None = None):
    """Completeness (by true magnitude) and purity (by measured magnitude) of several methods.

    Parameters
    ----------
    scores_by_method : dict
        Method name -> :func:`detection_scores` result (e.g. ``{"Mask R-CNN": ..., "sep": ...}``).
    path : str or Path, optional
        Where to save the PNG (atomically).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from deepmorph.measure.plots import _figure

    if not scores_by_method:
        raise DeepmorphValueError("detection_figure needs the scores of at least one method")
    fig = _figure((9.0, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for i, (name, s) in enumerate(scores_by_method.items()):
        bins = np.asarray(s["mag_bins"], float)
        centres = 0.5 * (bins[1:] + bins[:-1])
        color = f"C{i}"
        axes[0].plot(centres, s["completeness_vs_mag"], "o-", color=color, ms=3, label=name)
        axes[1].plot(centres, s["purity_vs_mag"], "o-", color=color, ms=3, label=name)
        if math.isfinite(s.get("mag_limit", float("nan"))):
            axes[0].axvline(s["mag_limit"], color=color, ls=":", lw=1)
    for ax, what in zip(axes, ("completeness (true mag)", "purity (measured mag)"), strict=True):
        ax.set_xlabel("AB magnitude")
        ax.set_title(what)
        ax.axhline(0.5, color="0.7", lw=0.8)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction")
    axes[0].legend(loc="lower left", fontsize=8)
    if path is not None:
        from deepmorph.training._io import write_atomic

        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


def run_sep(ds, indices, **kwargs) -> tuple[list, list, list, list]:
    """sep on fields ``indices`` of an open :class:`~deepmorph.simulate.fields.FieldDataset`.

    Returns the sep tables and segmaps and the truth tables and segmaps (lists, one per field);
    ``kwargs`` go to :func:`sep_catalog` (the file's sky sigma, zero point and gain are used).
    """
    a = ds.attrs
    kwargs = {"sky_sigma": a["sky_sigma"], "zeropoint": a["zeropoint"], "gain": a.get("gain_e_per_count"), **kwargs}
    pt, ps, tt, ts = [], [], [], []
    for i in indices:
        table, seg = sep_catalog(ds.image(i), **kwargs)
        pt.append(table)
        ps.append(seg)
        tt.append(ds.objects(i))
        ts.append(ds.segmap(i))
    return pt, ps, tt, ts


def evaluate_sep_baseline(data: str | Path, out: str | Path, threshold: float = 1.5, minarea: int = 5,
                          deblend_cont: float = 0.005, max_fields: int | None = None,
                          overwrite: bool = False) -> dict:
    """Run sep on every field of a field file and score it: ``scores.json``, ``catalogue.ecsv``,
    ``detection.png`` in ``out``. Returns the scores (plus ``n_fields``)."""
    from astropy.table import vstack

    from deepmorph.data.store import check_output
    from deepmorph.errors import DeepmorphIOError
    from deepmorph.simulate.fields import open_fields

    out = Path(out)
    scores_path = out / "scores.json"
    check_output(scores_path, overwrite)
    if max_fields is not None and (int(max_fields) != max_fields or max_fields < 1):
        raise DeepmorphValueError(f"--max-fields must be a positive integer, got {max_fields}")
    with open_fields(data) as ds:
        n = len(ds) if max_fields is None else min(len(ds), int(max_fields))
        pt, ps, tt, ts = run_sep(ds, range(n), threshold=threshold, minarea=minarea, deblend_cont=deblend_cont)
    scores = detection_scores(pt, ps, tt, ts)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepmorphIOError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    rows = []
    for i, (p, t) in enumerate(zip(pt, tt, strict=True)):
        p = p.copy()
        p["field"] = np.full(len(p), i, dtype=np.int64)
        pi, ti, _ = match_catalogs(p, t)
        truth_id = np.full(len(p), -1, dtype=np.int64)
        truth_id[pi] = np.asarray(t["id"])[ti]
        p["truth_id"] = truth_id
        p.meta.clear()
        rows.append(p)
    catalogue = vstack(rows) if rows else Table()
    catalogue.meta.update({"method": "sep", "threshold": threshold, "minarea": minarea, "deblend_cont": deblend_cont,
                           "data": str(data)})
    from deepmorph.training._io import write_atomic

    write_atomic(out / "catalogue.ecsv", lambda tmp: catalogue.write(tmp, format="ascii.ecsv"))
    detection_figure({"sep": scores}, out / "detection.png")
    tmp = scores_path.with_name(scores_path.name + ".tmp")
    tmp.write_text(json.dumps({"method": "sep", "data": str(data), **scores}, indent=1) + "\n")
    tmp.replace(scores_path)
    return scores


__all__ = ["DEFAULT_MAG_BINS", "SEXTRACTOR_CONV", "completeness_limit", "detection_figure", "detection_scores",
           "evaluate_sep_baseline", "match_catalogs", "prediction_catalog", "run_sep", "segment_photometry",
           "sep_catalog", "touching_segments"]
