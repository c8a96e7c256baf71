"""Morphometry of a real field: detect with sep, cut a stamp per source, measure it with the CNN.

A morphometry CNN measures stamps that look like its training set. For one real CCD frame the
chain is:

1. :func:`detect_sources` -- SExtractor's algorithm through ``sep`` (Bertin & Arnouts 1996;
   Barbary 2016): a background mesh, SExtractor's 3x3 ``default.conv`` filter, a threshold in
   units of the background rms, deblending, cleaning, and Kron ("AUTO") fluxes.
2. :func:`frame_settings` -- what a training set must share with the frame: its pixel grid, its
   PSF (a pixel-integrated Gaussian fitted to its stars), its counts (a zero point, so simulated
   fluxes in ADU span the frame's sources), its noise (cutouts of the frame itself as the
   background, plus source Poisson noise at the gain ``sky / rms^2``) and its galaxies' sizes.
3. :func:`train_frame_model` -- simulate single-Sersic galaxies like that (the same data as
   :meth:`FrameSettings.simulate_argv`'s ``deepmorph simulate`` command) and train the CNN.
4. :func:`measure_field` -- one stamp per detection, resampled to the model's pixel scale,
   measured in batches; a catalogue with sep's AUTO magnitude next to the CNN's parameters.
5. :func:`compare_with_sextractor` -- match to a SExtractor catalogue and compare magnitudes.

:func:`frame_end_to_end` runs steps 2-5 on a frame SExtractor has catalogued.

Coordinates are 0-based pixel centres, ``x = X_IMAGE - 1`` for SExtractor's 1-based ones;
position angles are degrees counter-clockwise from +x. Magnitudes are ``zeropoint - 2.5
log10(flux [count])``. The CNN's magnitude is a total one (the Sersic profile to infinity); a Kron
aperture of 2.5 misses a few percent of a galaxy's light, so CNN magnitudes are expected to be
slightly brighter than AUTO ones (:func:`compare_with_sextractor` reports the median offset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import warnings
from pathlib import Path

import numpy as np

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.measure.detection import SEXTRACTOR_CONV
from deepmorph.workflows.runs import read_image_file, save_figure, save_table, write_json

#: Flags of :func:`measure_field` (comma-joined in the ``flag`` column; empty when clean).
FIELD_FLAGS = ("edge", "nan_pixels", "saturated")

#: Keys that select a celestial WCS, whose CDELT/CD are degrees per pixel.
_CELESTIAL = ("RA--", "DEC-", "GLON", "GLAT", "ELON", "ELAT")


# -- detection ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Detection:
    """Settings of :func:`detect_sources` (SExtractor's defaults; :func:`read_sextractor_config`
    reads them from a ``default.sex``).

    Parameters
    ----------
    threshold : float
        ``DETECT_THRESH``: detection threshold, in units of the background rms.
    minarea : int
        ``DETECT_MINAREA``: minimum number of pixels above the threshold.
    filter_kernel : tuple of tuple of float, optional
        ``FILTER_NAME``: detection filter (``None``: no filtering); default ``default.conv``.
    deblend_nthresh : int
        ``DEBLEND_NTHRESH``: number of deblending sub-thresholds.
    deblend_cont : float
        ``DEBLEND_MINCONT``: minimum contrast for deblending (1.0 switches deblending off).
    clean, clean_param : bool, float
        ``CLEAN``, ``CLEAN_PARAM``: remove spurious detections near bright ones.
    kron_factor, kron_min_radius : float
        ``PHOT_AUTOPARAMS``: the AUTO aperture is the Kron ellipse scaled by
        ``max(kron_factor * kron_radius, kron_min_radius)`` (in units of a and b).
    background_box, background_filter : int
        ``BACK_SIZE`` (pixels), ``BACK_FILTERSIZE`` (meshes) of the background map.
    saturation : float, optional
        ``SATUR_LEVEL``: counts (before background subtraction) at which the detector saturates.
    """

    threshold: float = 1.5
    minarea: int = 5
    filter_kernel: tuple | None = tuple(map(tuple, SEXTRACTOR_CONV.tolist()))
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    clean: bool = True
    clean_param: float = 1.0
    kron_factor: float = 2.5
    kron_min_radius: float = 3.5
    background_box: int = 64
    background_filter: int = 3
    saturation: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise DeepmorphValueError(f"detection threshold must be a positive number of sigmas, got {self.threshold}")
        if int(self.minarea) != self.minarea or self.minarea < 1:
            raise DeepmorphValueError(f"minimum detection area must be a positive number of pixels, got {self.minarea}")
        if not (self.kron_factor > 0 and self.kron_min_radius >= 0):
            raise DeepmorphValueError(f"Kron parameters must be > 0 and >= 0, got {self.kron_factor}, "
                                      f"{self.kron_min_radius}")


def read_sextractor_config(path: str | Path) -> Detection:
    """The detection and AUTO-photometry settings of a SExtractor configuration file.

    Reads ``DETECT_THRESH``, ``DETECT_MINAREA``, ``FILTER``/``FILTER_NAME`` (the file next to
    the configuration, or SExtractor's ``default.conv``), ``DEBLEND_NTHRESH``,
    ``DEBLEND_MINCONT``, ``CLEAN``, ``CLEAN_PARAM``, ``PHOT_AUTOPARAMS``, ``BACK_SIZE``,
    ``BACK_FILTERSIZE`` and ``SATUR_LEVEL``; the rest keeps :class:`Detection`'s defaults.
    """
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise DeepmorphIOError(f"{path}: cannot read the SExtractor configuration ({exc.strerror or exc})") from None
    keys = {}
    for line in lines:
        words = line.split("#", 1)[0].split(None, 1)
        if len(words) == 2:
            keys[words[0].upper()] = words[1].strip()

    def number(key, kind=float):
        try:
            return kind(keys[key].split(",")[0])
        except ValueError:
            raise DeepmorphValueError(f"{path}: {key} {keys[key]!r} is not a number") from None

    settings = {}
    for key, name, kind in (("DETECT_THRESH", "threshold", float), ("DETECT_MINAREA", "minarea", int),
                            ("DEBLEND_NTHRESH", "deblend_nthresh", int), ("DEBLEND_MINCONT", "deblend_cont", float),
                            ("CLEAN_PARAM", "clean_param", float), ("BACK_SIZE", "background_box", int),
                            ("BACK_FILTERSIZE", "background_filter", int), ("SATUR_LEVEL", "saturation", float)):
        if key in keys:
            settings[name] = number(key, kind)
    if "DETECT_THRESH" in keys and "," in keys["DETECT_THRESH"]:
        raise DeepmorphValueError(f"{path}: DETECT_THRESH in mag/arcsec^2 is not supported; give it in sigmas")
    if "CLEAN" in keys:
        settings["clean"] = keys["CLEAN"].upper().startswith("Y")
    if "PHOT_AUTOPARAMS" in keys:
        try:
            factor, min_radius = (float(v) for v in keys["PHOT_AUTOPARAMS"].split(","))
            settings.update(kron_factor=factor, kron_min_radius=min_radius)
        except ValueError:
            raise DeepmorphValueError(f"{path}: PHOT_AUTOPARAMS {keys['PHOT_AUTOPARAMS']!r} is not "
                                      "'<Kron_fact>,<min_radius>'") from None
    if keys.get("FILTER", "Y").upper().startswith("N"):
        settings["filter_kernel"] = None
    else:
        name = keys.get("FILTER_NAME", "default.conv")
        conv = path.parent / name
        if conv.is_file():
            rows = [[float(v) for v in ln.split()] for ln in conv.read_text().splitlines()[1:]
                    if ln.strip() and not ln.lstrip().startswith("#")]
            settings["filter_kernel"] = tuple(map(tuple, rows))
        elif Path(name).name != "default.conv":
            raise DeepmorphIOError(f"{path}: filter file {conv} not found")
    return Detection(**settings)


def _read_frame(path: str | Path) -> np.ndarray:
    """A single-band frame as a 2-D native float64 array; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DeepmorphIOError(f"{path}: frame not found")
    with _quiet_headers():
        image = read_image_file(path)
    if image.shape[0] != 1:
        raise DeepmorphValueError(f"{path}: expected a single-band 2-D frame, got {image.shape[0]} planes")
    frame = np.asarray(image[0], dtype=np.float64)
    if frame.size == 0 or not np.isfinite(frame).any():
        raise DeepmorphValueError(f"{path}: the frame has no finite pixels")
    if min(frame.shape) < 16:
        raise DeepmorphValueError(f"{path}: the frame is {frame.shape[1]}x{frame.shape[0]} pixels, too small to "
                                  "measure a background")
    return frame


@contextlib.contextmanager
def _quiet_headers():
    """Silence astropy's warnings about non-standard header cards (old frames are full of them)."""
    from astropy.utils.exceptions import AstropyUserWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        yield


@dataclasses.dataclass
class _Extraction:
    """What :func:`_extract` finds: the catalogue and the images the stamps are cut from."""

    sources: object  # astropy Table
    residual: np.ndarray  # background-subtracted frame, NaN pixels set to 0
    bad: np.ndarray  # NaN or infinite pixels of the frame
    sky_level: float
    sky_rms: float


def _extract(frame: np.ndarray, detection: Detection, gain: float | None = None) -> _Extraction:
    import sep
    from astropy.table import Table
    from scipy import ndimage

    bad = ~np.isfinite(frame)
    data = np.ascontiguousarray(np.where(bad, 0.0, frame), dtype=np.float32)
    box, fsize = int(detection.background_box), int(detection.background_filter)
    bkg = sep.Background(data, mask=bad if bad.any() else None, bw=box, bh=box, fw=fsize, fh=fsize)
    residual = np.ascontiguousarray(np.where(bad, 0.0, data - bkg.back()), dtype=np.float32)
    rms = bkg.rms()
    kernel = None if detection.filter_kernel is None else np.asarray(detection.filter_kernel, dtype=np.float32)
    if 4 * residual.size > sep.get_extract_pixstack():
        sep.set_extract_pixstack(int(4 * residual.size))
    try:
        objs, seg = sep.extract(residual, detection.threshold, err=bkg.globalrms, mask=bad if bad.any() else None,
                                minarea=int(detection.minarea), filter_kernel=kernel,
                                deblend_nthresh=int(detection.deblend_nthresh), deblend_cont=detection.deblend_cont,
                                clean=detection.clean, clean_param=detection.clean_param, segmentation_map=True)
    except Exception as exc:  # sep raises plain Exceptions (e.g. "internal pixel buffer full")
        raise DeepmorphValueError(f"source extraction failed: {exc}") from None
    x, y, a, b, theta = (np.asarray(objs[k], dtype=np.float64) for k in ("x", "y", "a", "b", "theta"))
    mask = bad if bad.any() else None
    if len(objs):
        kron, kflag = sep.kron_radius(residual, x, y, a, b, theta, 6.0, mask=mask)
        radius = np.maximum(detection.kron_factor * kron, detection.kron_min_radius)
        flux, fluxerr, fflag = sep.sum_ellipse(residual, x, y, a, b, theta, radius, err=rms, gain=gain, subpix=1,
                                               mask=mask)
        r50, _ = sep.flux_radius(residual, x, y, 6.0 * a, 0.5, normflux=np.where(flux > 0, flux, np.nan),
                                 mask=mask, subpix=5)
        ids = np.arange(1, len(objs) + 1)
        peak_raw = np.asarray(ndimage.maximum(np.where(bad, -np.inf, frame), labels=seg, index=ids), dtype=float)
    else:
        kron = flux = fluxerr = r50 = peak_raw = np.zeros(0)
        kflag = fflag = np.zeros(0, dtype=int)
    saturated = (peak_raw >= detection.saturation) if detection.saturation is not None else np.zeros(len(objs), bool)
    sources = Table({
        "id": np.arange(1, len(objs) + 1, dtype=np.int64),
        "x": x, "y": y, "a": a, "b": b, "theta_deg": np.degrees(theta) % 180.0,
        "kron_radius": np.asarray(kron, dtype=float),
        "flux_auto": np.asarray(flux, dtype=float), "flux_auto_err": np.asarray(fluxerr, dtype=float),
        "flux_radius": np.asarray(r50, dtype=float),
        "peak": np.asarray(objs["peak"], dtype=float), "npix": np.asarray(objs["npix"], dtype=np.int64),
        "sep_flag": (np.asarray(objs["flag"], dtype=np.int64) | np.asarray(kflag, dtype=np.int64)
                     | np.asarray(fflag, dtype=np.int64)),
        "saturated": saturated,
    })
    for name in ("x", "y", "a", "b", "flux_radius"):
        sources[name].unit = "pix"
    sources["theta_deg"].unit = "deg"
    for name in ("flux_auto", "flux_auto_err", "peak"):
        sources[name].unit = "count"
    sources.meta.update({
        "coordinates": "0-based pixel centres (SExtractor's X_IMAGE - 1)",
        "sky_level": float(bkg.globalback), "sky_rms": float(bkg.globalrms),
        "detection": {k: v for k, v in dataclasses.asdict(detection).items() if k != "filter_kernel"},
    })
    return _Extraction(sources, residual, bad, float(bkg.globalback), float(bkg.globalrms))


def detect_sources(image, threshold: float = 1.5, minarea: int = 5, detection: Detection | None = None,
                   gain: float | None = None):
    """Detect and measure the sources of a frame with sep, as SExtractor does.

    Parameters
    ----------
    image : numpy.ndarray
        2-D frame in counts (any byte order; NaN pixels are masked).
    threshold : float
        Detection threshold in units of the background rms (``DETECT_THRESH``).
    minarea : int
        Minimum area above the threshold, pixels (``DETECT_MINAREA``).
    detection : Detection, optional
        Every other setting (overrides ``threshold`` and ``minarea`` when given).
    gain : float, optional
        Electrons per count: adds the sources' Poisson noise to ``flux_auto_err``.

    Returns
    -------
    astropy.table.Table
        One row per source: ``id`` (1-based, sep's order), ``x``, ``y`` (0-based pixels), ``a``,
        ``b`` (rms extent along the axes, pixels), ``theta_deg`` (degrees CCW from +x),
        ``kron_radius`` (units of a and b; SExtractor's ``KRON_RADIUS`` is ``kron_factor`` times
        it), ``flux_auto`` and ``flux_auto_err`` (counts, Kron
        aperture), ``flux_radius`` (half-light radius of the AUTO flux, pixels), ``peak``
        (counts above the background), ``npix``, ``sep_flag`` (sep's extraction and aperture
        bits) and ``saturated``. ``meta`` holds ``sky_level`` and ``sky_rms`` (counts).
    """
    frame = np.asarray(image, dtype=np.float64)
    if frame.ndim != 2:
        raise DeepmorphValueError(f"detect_sources expects a 2-D frame, got shape {frame.shape}")
    if not np.isfinite(frame).any():
        raise DeepmorphValueError("the frame has no finite pixels")
    detection = detection or Detection(threshold=threshold, minarea=minarea)
    return _extract(frame, detection, gain).sources


# -- the frame's PSF, noise, fluxes and sizes -----------------------------------------------------

def _pixel_gaussian(shape, flux, x0, y0, sigma):
    """A circular Gaussian integrated over the pixels of a ``shape`` patch (exact, via erf)."""
    from scipy.special import erf

    h, w = shape
    s = sigma * math.sqrt(2.0)
    ex = np.arange(w + 1) - 0.5 - x0
    ey = np.arange(h + 1) - 0.5 - y0
    px, py = 0.5 * np.diff(erf(ex / s)), 0.5 * np.diff(erf(ey / s))
    return flux * py[:, None] * px[None, :]


def star_fwhm(residual: np.ndarray, sources, min_snr: float = 20.0, half: int = 6, min_stars: int = 3,
              tolerance: float = 0.15) -> tuple[float, int]:
    """The FWHM of a frame's PSF from its stars, pixels.

    A pixel-integrated circular Gaussian (plus a constant) is fitted to every bright
    (``flux_auto / flux_auto_err >= min_snr``), clean (``sep_flag == 0``), unsaturated and
    isolated source. The stars are the smallest sources that form a group: the first FWHM
    (in increasing order) that has at least ``min_stars`` fits within ``1 + tolerance`` of it;
    a lone sharper one is a cosmic ray or a hot pixel. The PSF FWHM is the group's median.

    Returns
    -------
    fwhm_pix, n_stars : float, int
    """
    from scipy.optimize import least_squares

    h, w = residual.shape
    x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    snr = np.asarray(sources["flux_auto"], float) / np.asarray(sources["flux_auto_err"], float)
    ok = (np.nan_to_num(snr) >= min_snr) & (np.asarray(sources["sep_flag"]) == 0) & ~np.asarray(sources["saturated"])
    fwhms = []
    for i in np.flatnonzero(ok):
        ix, iy = int(round(x[i])), int(round(y[i]))
        if ix < half or iy < half or ix >= w - half or iy >= h - half:
            continue
        others = np.hypot(x - x[i], y - y[i])
        if np.sum(others < 1.5 * half) > 1:  # a neighbour in the patch would widen the fit
            continue
        patch = residual[iy - half:iy + half + 1, ix - half:ix + half + 1].astype(np.float64)

        def resid(p, patch=patch):
            return (_pixel_gaussian(patch.shape, p[0], p[1], p[2], p[3]) + p[4] - patch).ravel()

        start = [max(patch.sum(), 1.0), x[i] - ix + half, y[i] - iy + half, 1.0, 0.0]
        fit = least_squares(resid, start, bounds=([0, 0, 0, 0.2, -np.inf], [np.inf, 2 * half, 2 * half, half, np.inf]))
        if fit.success:
            fwhms.append(2.0 * math.sqrt(2.0 * math.log(2.0)) * fit.x[3])
    fwhms = np.sort(np.asarray(fwhms))
    for f in fwhms:
        group = fwhms[(fwhms >= f) & (fwhms <= f * (1.0 + tolerance))]
        if len(group) >= min_stars:
            return float(np.median(group)), int(len(group))
    raise DeepmorphValueError(f"found {len(fwhms)} bright isolated sources but not {min_stars} stars of one size "
                              "to measure the PSF; pass its FWHM (psf_fwhm_pix)")


@dataclasses.dataclass(frozen=True)
class FrameSettings:
    """How to simulate galaxies that look like one real frame (see :func:`frame_settings`).

    Parameters
    ----------
    image : str
        The frame (its own cutouts are the simulations' background noise).
    pixel_scale_arcsec : float
        The frame's pixel scale, arcsec/pixel.
    zeropoint_mag : float
        AB magnitude of one count (ADU) of the frame.
    psf_fwhm_pix : float
        FWHM of the frame's PSF (a Gaussian), pixels.
    n_stars : int
        Stars the FWHM was measured on (0: given by the user).
    gain_e_per_count : float
        Electrons per count, for the sources' Poisson noise.
    sky_level, sky_rms : float
        The frame's background level and rms, counts.
    mag_range : tuple of float
        Magnitudes of the simulated galaxies (so their fluxes span the frame's sources).
    log10_hlr_pix_range : tuple of float
        log10 of the simulated half-light radii (major axis), pixels.
    sersic_n_range : tuple of float
        Sersic indices of the simulated galaxies.
    max_offset_pix : float
        Simulated centres are within this many pixels of the stamp centre (a stamp is cut at the
        nearest pixel to a detection, whose centroid has its own error).
    stamp_size : int
        Stamp side, pixels.
    survey : str
        The preset the frame's values replace (only its name survives in the dataset).
    """

    image: str
    pixel_scale_arcsec: float
    zeropoint_mag: float
    psf_fwhm_pix: float
    n_stars: int
    gain_e_per_count: float
    sky_level: float
    sky_rms: float
    mag_range: tuple[float, float]
    log10_hlr_pix_range: tuple[float, float]
    sersic_n_range: tuple[float, float] = (0.5, 6.0)
    max_offset_pix: float = 1.0
    stamp_size: int = 32
    survey: str = "sdss-r"

    @property
    def psf(self) -> str:
        """The PSF as ``deepmorph simulate --psf`` takes it (FWHM in arcsec)."""
        return f"gaussian:{round(self.psf_fwhm_pix * self.pixel_scale_arcsec, 6)!r}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def priors(self):
        """Single-Sersic priors (B/T = 1) in the frame's magnitudes and pixel sizes."""
        from deepmorph.simulate import Priors

        return Priors(mag=tuple(self.mag_range), bulge_to_total=(1.0, 1.0), bulge_n=tuple(self.sersic_n_range),
                      log10_bulge_hlr_pix=tuple(self.log10_hlr_pix_range), max_offset_pix=self.max_offset_pix)

    def simulator(self, device: str = "cpu"):
        """The :class:`~deepmorph.simulate.Simulator` of the frame's training set."""
        from deepmorph.simulate import Simulator, get_survey, read_background

        survey = get_survey(self.survey).with_photometry(self.zeropoint_mag, self.gain_e_per_count)
        noise = read_background(self.image, gain_e_per_count=survey.gain_e_per_count)
        return Simulator(survey, self.stamp_size, priors=self.priors(), psf=self.psf,
                         pixel_scale_arcsec=self.pixel_scale_arcsec, noise=noise, device=device)

    def simulate_argv(self, out: str | Path, n: int, seed: int = 0) -> list[str]:
        """The ``deepmorph simulate`` arguments that make the same dataset as :meth:`simulator`."""
        def f(v):
            return repr(float(v))

        return ["simulate", "--survey", self.survey, "--n", str(int(n)), "--out", str(out), "--seed", str(int(seed)),
                "--stamp-size", str(self.stamp_size), "--pixel-scale", f(self.pixel_scale_arcsec), "--psf", self.psf,
                "--background", str(self.image), "--zeropoint", f(self.zeropoint_mag),
                "--gain", f(self.gain_e_per_count), "--bulge-to-total", "1", "1",
                "--mag", *map(f, self.mag_range), "--bulge-n", *map(f, self.sersic_n_range),
                "--log10-bulge-hlr-pix", *map(f, self.log10_hlr_pix_range),
                "--max-offset-pix", f(self.max_offset_pix)]


def frame_settings(image_path: str | Path, zeropoint: float, pixel_scale: float = 1.0, *, stamp_size: int = 32,
                   psf_fwhm_pix: float | None = None, gain: float | None = None,
                   detection: Detection | None = None) -> FrameSettings:
    """Derive the simulation settings of a frame from the frame itself.

    Parameters
    ----------
    image_path : path
        The frame (FITS, counts with the sky still in, so that the gain can be estimated).
    zeropoint : float
        AB magnitude of one count of the frame (the simulated galaxies' zero point).
    pixel_scale : float
        Arcsec per pixel of the frame.
    stamp_size : int
        Stamp side of the training set, pixels: 32 holds ground-based galaxies of a few pixels.
    psf_fwhm_pix : float, optional
        The PSF FWHM, pixels; default :func:`star_fwhm`.
    gain : float, optional
        Electrons per count; default ``sky_level / sky_rms^2`` (sky-limited Poisson noise; wrong
        for frames with their sky or a bias level removed, which must pass it).
    detection : Detection, optional
        Detection settings (default SExtractor's).

    Returns
    -------
    FrameSettings
        Fluxes from half the faintest to three times the brightest unsaturated detection with
        S/N >= 3; half-light radii from a tenth of the PSF FWHM (point-like) to 1.5 times the
        largest PSF-deconvolved ``flux_radius`` (``sqrt(r50^2 - r50_star^2)``) of the sources
        with S/N >= 10, at least 3 pixels and at most a quarter of the stamp.
    """
    if not (isinstance(zeropoint, (int, float)) and math.isfinite(zeropoint)):
        raise DeepmorphValueError(f"zero point must be a finite AB magnitude, got {zeropoint!r}")
    if not (isinstance(pixel_scale, (int, float)) and math.isfinite(pixel_scale) and pixel_scale > 0):
        raise DeepmorphValueError(f"pixel scale must be a positive number of arcsec, got {pixel_scale!r}")
    image_path = Path(image_path)
    frame = _read_frame(image_path)
    ext = _extract(frame, _with_saturation(detection or Detection(), image_path))
    src = ext.sources
    if gain is None:
        if not ext.sky_level > 5.0 * ext.sky_rms:
            raise DeepmorphValueError(f"{image_path}: sky level {ext.sky_level:.4g} is not well above its rms "
                                      f"{ext.sky_rms:.4g} (sky subtracted?), so the gain cannot be estimated; pass it")
        gain = ext.sky_level / ext.sky_rms**2
    if not (math.isfinite(gain) and gain > 0):
        raise DeepmorphValueError(f"gain must be a positive number of electrons per count, got {gain}")
    n_stars = 0
    if psf_fwhm_pix is None:
        psf_fwhm_pix, n_stars = star_fwhm(ext.residual, src)
    flux, err = np.asarray(src["flux_auto"], float), np.asarray(src["flux_auto_err"], float)
    snr = np.nan_to_num(flux / err)
    good = (flux > 0) & (snr >= 3.0) & ~np.asarray(src["saturated"])
    if good.sum() < 3:
        raise DeepmorphValueError(f"{image_path}: fewer than 3 unsaturated sources with S/N >= 3")
    lo_flux, hi_flux = 0.5 * flux[good].min(), 3.0 * flux[good].max()
    mag_range = (math.floor(100 * (zeropoint - 2.5 * math.log10(hi_flux))) / 100,
                 math.ceil(100 * (zeropoint - 2.5 * math.log10(lo_flux))) / 100)
    # A Gaussian PSF's half-light radius is FWHM / 2; sizes add roughly in quadrature.
    r50 = np.asarray(src["flux_radius"], float)
    resolved = good & (snr >= 10.0) & np.isfinite(r50)
    intrinsic = np.sqrt(np.clip(r50[resolved] ** 2 - (0.5 * psf_fwhm_pix) ** 2, 0.0, None))
    hi = min(max(1.5 * float(intrinsic.max(initial=0.0)), 3.0), stamp_size / 4.0)
    lo = 0.1 * psf_fwhm_pix
    return FrameSettings(
        image=str(image_path), pixel_scale_arcsec=float(pixel_scale), zeropoint_mag=float(zeropoint),
        psf_fwhm_pix=round(float(psf_fwhm_pix), 3), n_stars=n_stars, gain_e_per_count=round(float(gain), 3),
        sky_level=round(ext.sky_level, 3), sky_rms=round(ext.sky_rms, 3), mag_range=mag_range,
        log10_hlr_pix_range=(math.floor(100 * math.log10(lo)) / 100, math.ceil(100 * math.log10(hi)) / 100),
        stamp_size=int(stamp_size),
    )


def frame_config(epochs: int = 15, stamp_size: int = 32, **overrides):
    """The run config of a frame model: a small CNN with a flatten head (it keeps where the light
    is, which sizes need), flips, Adam at 2e-3 with a cosine schedule, batches of 128."""
    from deepmorph.workflows.morphometry import default_config

    return default_config(**{
        "model": {"name": "cnn", "kwargs": {"widths": [8, 16, 32, 64], "blocks_per_stage": 1, "dropout": 0.0,
                                            "head": "flatten", "hidden": 128, "image_size": int(stamp_size)}},
        "augmentation": "flips", "optimizer": {"name": "adam", "lr": 2e-3}, "schedule": {"kind": "cosine"},
        "batch_size": 128, "epochs": int(epochs), **overrides,
    })


def train_frame_model(image_path: str | Path, out: str | Path, zeropoint: float, pixel_scale: float = 1.0,
                      n: int = 20000, epochs: int = 15, seed: int = 0, settings: FrameSettings | None = None,
                      config=None, evaluate: bool = True, progress: bool = False) -> dict:
    """Simulate a training set that looks like a frame and train a morphometry CNN on it.

    Parameters
    ----------
    image_path : path
        The frame.
    out : path
        Run directory: ``frame.json`` (the settings and the equivalent ``deepmorph simulate``
        command), ``simulations.h5`` (the training set) and the morphometry run's files.
    zeropoint, pixel_scale : float
        The frame's zero point (AB mag of one count) and pixel scale (arcsec/pixel).
    n : int
        Simulated galaxies (80% train, 10% validation, 10% test).
    epochs : int
        Training epochs.
    seed : int
        Dataset seed.
    settings : FrameSettings, optional
        Default :func:`frame_settings` of the frame; when given, its image, zero point and pixel
        scale are the ones used.
    config : RunConfig, optional
        Default :func:`frame_config`.

    Returns
    -------
    dict
        :func:`~deepmorph.workflows.morphometry.train_morphometry`'s result plus ``settings``.
    """
    from deepmorph.data import write_dataset
    from deepmorph.workflows.morphometry import train_morphometry

    out = Path(out)
    settings = settings or frame_settings(image_path, zeropoint, pixel_scale)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "simulations.h5"
    argv = settings.simulate_argv(data, n, seed)
    write_json(out / "frame.json", {**settings.to_dict(), "n": int(n), "seed": int(seed),
                                    "simulate_command": shlex.join(["deepmorph", *argv])})
    # Item i depends only on (seed, i): rewriting the file with the same settings gives the same data.
    write_dataset(data, settings.simulator(), n, seed, overwrite=True, progress=progress)
    config = config or frame_config(epochs, settings.stamp_size, progress_bar=progress)
    result = train_morphometry(data, out, config, evaluate=evaluate)
    return {**result, "settings": settings.to_dict()}


# -- measuring a field ----------------------------------------------------------------------------

def _frame_scale(path: Path) -> float:
    """Arcsec per pixel from a FITS header with ``PIXSCALE`` or a celestial WCS, or an error."""
    from astropy.io import fits

    from deepmorph.simulate.psf import _header_scale

    try:
        with _quiet_headers():
            header = fits.getheader(path)
    except OSError:
        header = {}
    ctype = str(header.get("CTYPE1", "")).upper()
    has_key = any(k in header for k in ("PIXSCALE", "PIXSCAL1", "SCALE"))
    if has_key or ctype.startswith(_CELESTIAL):
        scale = _header_scale(header)
        if scale is not None and math.isfinite(scale) and scale > 0:
            return float(scale)
    raise DeepmorphValueError(f"{path}: no pixel scale in the header (PIXSCALE or a celestial WCS); give the "
                              "pixel scale (--pixel-scale)")


def _stamp_side(size: int, factor: float) -> int:
    """Frame pixels to cut so that, resampled by ``factor``, a centred ``size`` crop stays centred."""
    if abs(factor - 1.0) <= 1e-6:
        return size
    m = max(int(math.ceil(size / factor)), 1)
    while round(m * factor) < size or (round(m * factor) - size) % 2:
        m += 1
    return m


def _cut(residual: np.ndarray, bad: np.ndarray, x: float, y: float, side: int, fill_sigma: float,
         rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """The ``side`` x ``side`` window whose geometric centre is nearest ``(x, y)``; pixels off the
    frame or NaN are filled with sky noise (and flagged)."""
    h, w = residual.shape
    x0, y0 = int(round(x - 0.5 * (side - 1))), int(round(y - 0.5 * (side - 1)))
    stamp = rng.normal(0.0, fill_sigma, (side, side)).astype(np.float32)
    ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    flags = []
    if ys.stop - ys.start < side or xs.stop - xs.start < side:
        flags.append("edge")
    if ys.stop > ys.start and xs.stop > xs.start:
        window_bad = bad[ys, xs]
        stamp[inner] = np.where(window_bad, stamp[inner], residual[ys, xs])
        if window_bad.any():
            flags.append("nan_pixels")
    return stamp, flags


def _magnitude(flux, err, zeropoint: float):
    flux, err = np.asarray(flux, float), np.asarray(err, float)
    positive = flux > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(positive, zeropoint - 2.5 * np.log10(np.where(positive, flux, 1.0)), np.nan)
        mag_err = np.where(positive, 2.5 / math.log(10.0) * err / flux, np.nan)
    return mag, mag_err


def measure_field(run: str | Path, image_path: str | Path, zeropoint: float | None = None,
                  pixel_scale: float | None = None, out: str | Path | None = None, overwrite: bool = False, *,
                  detection: Detection | None = None, threshold: float | None = None, seed: int = 0,
                  batch_size: int = 256):
    """Detect the sources of a real frame and measure each with a morphometry CNN.

    Parameters
    ----------
    run : path
        A morphometry run trained on simulations that look like the frame (:func:`train_frame_model`).
    image_path : path
        The frame (FITS, counts; the background is measured and subtracted here).
    zeropoint : float, optional
        AB magnitude of one count of the frame; default the model's.
    pixel_scale : float, optional
        Arcsec per pixel of the frame; default the header's ``PIXSCALE`` or celestial WCS.
    out : path, optional
        Write the catalogue here too (ECSV or FITS by suffix), atomically.
    detection : Detection, optional
        Detection settings (default SExtractor's); ``threshold`` overrides its threshold.
    seed : int
        Seed of the sky noise that fills stamp pixels off the frame or NaN.
    batch_size : int
        Stamps per network call.

    Returns
    -------
    astropy.table.Table
        One row per detection: :func:`detect_sources`'s columns, ``mag_auto`` and
        ``mag_auto_err`` (sep's Kron magnitude), the CNN's ``mag``, ``hlr`` (arcsec),
        ``hlr_pix`` (frame pixels), ``n``, ``q``, ``pa`` (deg) each with ``_err`` (1 sigma), and
        ``flag``: comma-joined :data:`FIELD_FLAGS` (``edge``: the stamp runs off the frame and
        is filled with sky noise there; ``nan_pixels``: likewise for masked pixels;
        ``saturated``: a pixel at the saturation level), empty when clean. Flagged sources are
        measured too; their values are less reliable.
    """
    from deepmorph.data import check_output
    from deepmorph.workflows.morphometry import load_morphometer, measure, prepare_cutout

    image_path = Path(image_path)
    if out is not None:
        check_output(out, overwrite)
    frame = _read_frame(image_path)
    _, _, meta = load_morphometer(run)
    size, scale_model = int(meta["stamp_size"]), float(meta["pixel_scale_arcsec"])
    zp_model = float(meta["zeropoint_mag"])
    zeropoint = zp_model if zeropoint is None else float(zeropoint)
    if not math.isfinite(zeropoint):
        raise DeepmorphValueError(f"zero point must be a finite AB magnitude, got {zeropoint}")
    if pixel_scale is None:
        pixel_scale = _frame_scale(image_path)
    if not (math.isfinite(pixel_scale) and pixel_scale > 0):
        raise DeepmorphValueError(f"pixel scale must be a positive number of arcsec, got {pixel_scale}")
    detection = detection or Detection()
    if threshold is not None:
        detection = dataclasses.replace(detection, threshold=float(threshold))
    ext = _extract(frame, _with_saturation(detection, image_path))
    table = ext.sources
    factor = float(pixel_scale) / scale_model
    side = _stamp_side(size, factor)
    rng = np.random.default_rng(seed)
    stamps, flags = [], []
    for row in table:
        stamp, flag = _cut(ext.residual, ext.bad, float(row["x"]), float(row["y"]), side, ext.sky_rms, rng)
        if row["saturated"]:
            flag.append("saturated")
        stamps.append(prepare_cutout(stamp[None], pixel_scale, scale_model, size)[0])
        flags.append(",".join(flag))
    table["mag_auto"], table["mag_auto_err"] = _magnitude(table["flux_auto"], table["flux_auto_err"], zeropoint)
    values = measure(run, np.stack(stamps), batch_size=batch_size) if stamps else {}
    for name in meta["parameters"]:
        value, err = values[name] if stamps else (np.zeros(0), np.zeros(0))
        table[name] = np.asarray(value, float) + (zeropoint - zp_model if name == "mag" else 0.0)
        table[f"{name}_err"] = np.asarray(err, float)
        if name == "hlr":
            table["hlr_pix"] = table["hlr"] / pixel_scale
    units = {"mag": "mag", "mag_auto": "mag", "hlr": "arcsec", "pa": "deg", "hlr_pix": "pix"}
    for name, unit in units.items():
        for col in (name, f"{name}_err"):
            if col in table.colnames:
                table[col].unit = unit
    table["flag"] = np.asarray(flags, dtype=str) if flags else np.zeros(0, dtype="<U1")
    table.meta.update({"image": str(image_path), "model": str(run), "zeropoint_mag": zeropoint,
                       "pixel_scale_arcsec": float(pixel_scale), "model_pixel_scale_arcsec": scale_model,
                       "stamp_size_frame_pix": side, "hlr_unit": "arcsec",
                       "pa_unit": "deg, counter-clockwise from +x"})
    if out is not None:
        save_table(table, out)
    return table


def _with_saturation(detection: Detection, path: Path) -> Detection:
    """``detection`` with the header's ``SATURATE`` (or ``SATLEVEL``) when it sets no saturation."""
    from astropy.io import fits

    if detection.saturation is not None:
        return detection
    try:
        with _quiet_headers():
            header = fits.getheader(path)
    except OSError:
        return detection
    for key in ("SATURATE", "SATLEVEL"):
        try:
            return dataclasses.replace(detection, saturation=float(header[key]))
        except (KeyError, TypeError, ValueError):
            continue
    return detection


# -- comparison with SExtractor -------------------------------------------------------------------

def read_sextractor_catalog(path: str | Path):
    """A SExtractor ``ASCII_HEAD`` catalogue as an astropy Table (one-line errors for bad files)."""
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise DeepmorphIOError(f"{path}: SExtractor catalogue not found")
    try:
        table = Table.read(path, format="ascii.sextractor")
    except Exception as exc:  # astropy's readers raise many kinds
        raise DeepmorphIOError(f"{path}: not a SExtractor ASCII_HEAD catalogue ({exc})") from None
    missing = [c for c in ("X_IMAGE", "Y_IMAGE", "FLUX_AUTO") if c not in table.colnames]
    if missing:
        raise DeepmorphValueError(f"{path}: no {', '.join(missing)} column(s)")
    return table


def match_sources(catalog, reference, radius: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest matches of a SExtractor ``reference`` (1-based ``X_IMAGE``) to a
    ``catalog`` (0-based ``x``, ``y``) within ``radius`` pixels.

    Returns
    -------
    ref_index, cat_index, distance : numpy.ndarray
        Matched rows (each catalogue row used once, by its closest reference source).
    """
    from scipy.spatial import cKDTree

    xr = np.asarray(reference["X_IMAGE"], float) - 1.0
    yr = np.asarray(reference["Y_IMAGE"], float) - 1.0
    if len(catalog) == 0 or len(reference) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    tree = cKDTree(np.c_[np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)])
    dist, idx = tree.query(np.c_[xr, yr], distance_upper_bound=radius)
    ref_index = np.flatnonzero(np.isfinite(dist))
    order = ref_index[np.argsort(dist[ref_index])]
    used, keep = set(), []
    for r in order:
        if idx[r] not in used:
            used.add(idx[r])
            keep.append(r)
    keep = np.sort(np.asarray(keep, dtype=int))
    return keep, idx[keep].astype(int), dist[keep]


def _mag_stats(dmag: np.ndarray) -> dict:
    dmag = dmag[np.isfinite(dmag)]
    if not dmag.size:
        return {"n": 0, "median_abs_dmag": float("nan"), "median_dmag": float("nan")}
    return {"n": int(dmag.size), "median_abs_dmag": float(np.median(np.abs(dmag))),
            "median_dmag": float(np.median(dmag))}


def compare_with_sextractor(catalog, sextractor_cat: str | Path, zeropoint: float | None = None,
                            radius: float = 2.0, figure: str | Path | None = None) -> dict:
    """Compare a :func:`measure_field` catalogue with SExtractor's catalogue of the same frame.

    Parameters
    ----------
    catalog : astropy.table.Table
        :func:`measure_field`'s catalogue.
    sextractor_cat : path
        SExtractor's ``ASCII_HEAD`` catalogue with ``X_IMAGE``, ``Y_IMAGE``, ``FLUX_AUTO`` (and
        ``FLAGS``).
    zeropoint : float, optional
        SExtractor magnitudes are ``zeropoint - 2.5 log10(FLUX_AUTO)``; default the catalogue's.
    radius : float
        Match radius, pixels.
    figure : path, optional
        Write a PNG (atomically): magnitude differences vs SExtractor magnitude, and the
        detections over the frame.

    Returns
    -------
    dict
        ``n_sextractor``, ``n_detected``, ``n_matched``, ``matched_fraction`` (of SExtractor's
        sources), ``median_offset_pix``; ``cnn`` (CNN ``mag`` minus SExtractor's AUTO magnitude)
        and ``sep`` (sep's ``mag_auto`` minus it), each with ``n``, ``median_abs_dmag`` and
        ``median_dmag`` (the signed offset), over all matched sources with positive
        ``FLUX_AUTO``; and ``cnn_clean``, ``sep_clean``: the same over sources flagged by neither
        (SExtractor ``FLAGS == 0``, empty ``flag``).
    """
    ref = read_sextractor_catalog(sextractor_cat)
    zeropoint = float(catalog.meta.get("zeropoint_mag", 0.0)) if zeropoint is None else float(zeropoint)
    ri, ci, dist = match_sources(catalog, ref, radius)
    ref_mag, _ = _magnitude(ref["FLUX_AUTO"], np.zeros(len(ref)), zeropoint)
    d_cnn = np.asarray(catalog["mag"], float)[ci] - ref_mag[ri]
    d_sep = np.asarray(catalog["mag_auto"], float)[ci] - ref_mag[ri]
    clean = np.asarray(catalog["flag"])[ci] == ""
    if "FLAGS" in ref.colnames:
        clean &= np.asarray(ref["FLAGS"])[ri] == 0
    result = {
        "n_sextractor": len(ref), "n_detected": len(catalog), "n_matched": int(len(ri)),
        "matched_fraction": float(len(ri) / len(ref)) if len(ref) else float("nan"),
        "median_offset_pix": float(np.median(dist)) if len(dist) else float("nan"),
        "zeropoint_mag": zeropoint, "radius_pix": float(radius),
        "cnn": _mag_stats(d_cnn), "sep": _mag_stats(d_sep),
        "cnn_clean": _mag_stats(d_cnn[clean]), "sep_clean": _mag_stats(d_sep[clean]),
    }
    if figure is not None:
        save_figure(_comparison_figure(catalog, ref, ri, ci, ref_mag, d_cnn, d_sep, clean), figure)
    return result


def frame_end_to_end(image: str | Path, sextractor_cat: str | Path, sextractor_config: str | Path,
                     out: str | Path, zeropoint: float, pixel_scale: float = 1.0, *, n: int = 12000,
                     epochs: int = 10, seed: int = 0, model: str | Path | None = None,
                     evaluate: bool = True) -> dict:
    """The whole chain on a frame SExtractor has catalogued: settings, training, measuring, comparing.

    Parameters
    ----------
    image, sextractor_cat, sextractor_config : path
        The frame (FITS), SExtractor's catalogue of it and the ``.sex`` file it was made with
        (its detection settings are reused, so both see the same sources).
    out : path
        Folder: the trained run (unless ``model``), ``catalog.ecsv``, ``comparison.json`` and
        ``comparison.png``.
    zeropoint, pixel_scale : float
        AB magnitude of one count of the frame, and its arcsec per pixel.
    n, epochs, seed : int
        Size, training epochs and seed of the simulated training set.
    model : path, optional
        A frame model already trained (then nothing is simulated or trained).
    evaluate : bool
        Score the new model on its simulated test split.

    Returns
    -------
    dict
        ``settings`` (:class:`FrameSettings`), ``training`` (:func:`train_frame_model`'s result,
        or None), ``catalog`` (:func:`measure_field`'s) and ``comparison``
        (:func:`compare_with_sextractor`'s).
    """
    out = Path(out)
    detection = read_sextractor_config(sextractor_config)
    settings = frame_settings(image, zeropoint, pixel_scale, detection=detection)
    training = None
    if model is None:
        training = train_frame_model(image, out, zeropoint, pixel_scale, n=n, epochs=epochs, seed=seed,
                                     settings=settings, evaluate=evaluate)
    out.mkdir(parents=True, exist_ok=True)
    catalog = measure_field(model or out, image, zeropoint, pixel_scale, out=out / "catalog.ecsv", overwrite=True,
                            detection=detection)
    comparison = compare_with_sextractor(catalog, sextractor_cat, zeropoint, figure=out / "comparison.png")
    write_json(out / "comparison.json", comparison)
    return {"settings": settings, "training": training, "catalog": catalog, "comparison": comparison}


def _comparison_figure(catalog, ref, ri, ci, ref_mag, d_cnn, d_sep, clean):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, im) = plt.subplots(1, 2, figsize=(11, 4.8))
    m = ref_mag[ri]
    ax.axhline(0.0, color="k", lw=0.7)
    ax.scatter(m[clean], d_cnn[clean], s=14, color="C0", label="CNN mag (clean)")
    ax.scatter(m[~clean], d_cnn[~clean], s=14, facecolor="none", edgecolor="C0", label="CNN mag (flagged)")
    ax.scatter(m, d_sep, s=8, marker="x", color="C1", label="sep mag_auto")
    ax.set_xlabel("SExtractor MAG_AUTO")
    ax.set_ylabel("mag - SExtractor MAG_AUTO")
    lim = np.nanpercentile(np.abs(d_cnn), 95) if np.isfinite(d_cnn).any() else 1.0
    ax.set_ylim(-max(1.2 * lim, 0.5), max(1.2 * lim, 0.5))
    ax.legend(fontsize=8)
    ax.set_title(f"{len(ri)} of {len(ref)} SExtractor sources matched")
    path = catalog.meta.get("image")
    if path and Path(path).is_file():
        frame = _read_frame(path)
        sky = np.nanmedian(frame)
        mad = 1.4826 * np.nanmedian(np.abs(frame - sky))
        im.imshow(np.arcsinh((frame - sky) / max(mad, 1e-12)), origin="lower", cmap="gray_r", vmin=-1, vmax=6)
    im.scatter(np.asarray(ref["X_IMAGE"]) - 1.0, np.asarray(ref["Y_IMAGE"]) - 1.0, s=60, facecolor="none",
               edgecolor="C3", lw=0.8, label="SExtractor")
    im.scatter(catalog["x"], catalog["y"], s=14, marker="+", color="C0", lw=0.8, label="sep (this pipeline)")
    im.legend(fontsize=8, loc="upper right")
    im.set_title("detections (0-based pixels)")
    fig.tight_layout()
    return fig
