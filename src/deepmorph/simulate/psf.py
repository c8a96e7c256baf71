"""Point-spread functions, evaluated in Fourier space on the renderer's grid.

Three kinds, all normalised to unit flux and centred on the origin:

* :class:`GaussianPSF` -- ``exp(-r^2 / 2 sigma^2)``, ``FWHM = 2 sqrt(2 ln 2) sigma``.
* :class:`MoffatPSF` -- ``(1 + (r/r_d)^2)^-beta``, untruncated as GalSim's default, with
  ``FWHM = 2 r_d sqrt(2^(1/beta) - 1)`` (Moffat 1969). Its transform is
  ``2^(2-beta) / Gamma(beta-1) (k r_d)^(beta-1) K_(beta-1)(k r_d)``.
* :class:`ImagePSF` -- a sampled PSF image (e.g. real HST PSFs read from FITS) at any pixel
  scale. As GalSim's ``InterpolatedImage`` does, the samples are read as flux per pixel
  and interpolated with the Keys cubic kernel (``x_interpolant='cubic'``); its transform is
  the exact discrete Fourier sum of the samples times the kernel's transform
  ``s^3 (3 s - 2 c)``, ``s = sinc(u)``, ``c = cos(pi u)`` (Bernstein & Gruen 2014). This
  resamples the image to any target pixel scale without interpolating in real space.

Every PSF is described by a JSON-able dict (:meth:`to_dict`) that datasets store in
their ``psf`` attribute; :func:`parse_psf` reads the command-line spelling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import scipy.special

from deepmorph.errors import DeepmorphError, DeepmorphIOError, DeepmorphValueError

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclasses.dataclass(frozen=True)
class GaussianPSF:
    """Circular Gaussian PSF.

    Parameters
    ----------
    fwhm_arcsec : float
        Full width at half maximum, arcsec.
    """

    fwhm_arcsec: float

    def __post_init__(self):
        _check_positive("fwhm_arcsec", self.fwhm_arcsec)

    def kvalue(self, kx: np.ndarray, ky: np.ndarray, pixel_scale: float) -> np.ndarray:
        """Transform at wavenumbers ``kx, ky`` in radians per target pixel of ``pixel_scale`` arcsec."""
        sigma = self.fwhm_arcsec / FWHM_PER_SIGMA / pixel_scale
        return np.exp(-0.5 * sigma**2 * (kx**2 + ky**2))

    def to_dict(self) -> dict:
        return {"type": "gaussian", "fwhm_arcsec": self.fwhm_arcsec}


@dataclasses.dataclass(frozen=True)
class MoffatPSF:
    """Circular, untruncated Moffat PSF.

    Parameters
    ----------
    fwhm_arcsec : float
        Full width at half maximum, arcsec.
    beta : float
        Moffat index (> 1.1; ~2.5-4.5 for ground-based seeing, 3.5 is a common choice).
    """

    fwhm_arcsec: float
    beta: float = 3.5

    def __post_init__(self):
        _check_positive("fwhm_arcsec", self.fwhm_arcsec)
        if not self.beta > 1.1:
            raise DeepmorphValueError(f"Moffat beta must be > 1.1, got {self.beta}")

    @property
    def scale_radius_arcsec(self) -> float:
        """Moffat ``r_d`` in arcsec."""
        return self.fwhm_arcsec / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def kvalue(self, kx: np.ndarray, ky: np.ndarray, pixel_scale: float) -> np.ndarray:
        """Transform at wavenumbers in radians per target pixel of ``pixel_scale`` arcsec."""
        nu = self.beta - 1.0
        x = np.sqrt(kx**2 + ky**2) * (self.scale_radius_arcsec / pixel_scale)
        norm = 2.0 ** (1.0 - nu) / scipy.special.gamma(nu)
        with np.errstate(invalid="ignore", over="ignore"):
            out = norm * x**nu * scipy.special.kv(nu, x)
        out = np.where(x < 1e-8, 1.0, out)
        return np.nan_to_num(out, nan=0.0, posinf=0.0)

    def to_dict(self) -> dict:
        return {"type": "moffat", "fwhm_arcsec": self.fwhm_arcsec, "beta": self.beta}


def _cubic_uval(u: np.ndarray) -> np.ndarray:
    """Fourier transform of the Keys cubic interpolant (a = -1/2), u in cycles per sample."""
    s = np.sinc(u)
    return s**3 * (3.0 * s - 2.0 * np.cos(np.pi * u))


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePSF:
    """A sampled PSF image.

    Parameters
    ----------
    image : numpy.ndarray
        2-D PSF image, ``[y, x]``, any positive total; normalised to unit flux here.
    pixel_scale_arcsec : float
        Sampling of ``image``, arcsec per pixel (need not equal the survey's).
    source : str
        Where the image came from (a file name and HDU), recorded with datasets.
    """

    image: np.ndarray
    pixel_scale_arcsec: float
    source: str = ""

    def __post_init__(self):
        img = np.asarray(self.image)
        if img.ndim != 2:
            raise DeepmorphValueError(f"PSF image {self.source!r} must be 2-D, got shape {img.shape}")
        img = img.astype(np.float64)  # native byte order, whatever FITS gave
        if not np.all(np.isfinite(img)):
            raise DeepmorphValueError(f"PSF image {self.source!r} has NaN or infinite pixels")
        total = img.sum()
        if not total > 0:
            raise DeepmorphValueError(f"PSF image {self.source!r} has a non-positive total flux")
        _check_positive("pixel_scale_arcsec", self.pixel_scale_arcsec)
        object.__setattr__(self, "image", img / total)

    @property
    def fwhm_arcsec(self) -> float:
        """Approximate FWHM from the second moments (Gaussian equivalent), arcsec."""
        img = self.image
        yy, xx = np.indices(img.shape, dtype=float)
        w = np.clip(img, 0, None)
        w = w / w.sum()
        cx, cy = (w * xx).sum(), (w * yy).sum()
        var = 0.5 * (w * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum()
        return float(FWHM_PER_SIGMA * math.sqrt(var) * self.pixel_scale_arcsec)

    def _factors(self, kx: np.ndarray, ky: np.ndarray, pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
        ratio = self.pixel_scale_arcsec / pixel_scale  # PSF pixel in target pixels
        h, w = self.image.shape
        x = (np.arange(w) - 0.5 * (w - 1)) * ratio
        y = (np.arange(h) - 0.5 * (h - 1)) * ratio
        ex = np.exp(-1j * np.outer(kx, x)) * _cubic_uval(kx * ratio / (2 * np.pi))[:, None]
        ey = np.exp(-1j * np.outer(ky, y)) * _cubic_uval(ky * ratio / (2 * np.pi))[:, None]
        return ex, ey

    def kvalue(self, kx: np.ndarray, ky: np.ndarray, pixel_scale: float) -> np.ndarray:
        """Exact transform of the cubic-interpolated samples (complex) on the grid ``ky x kx``.

        ``kx`` and ``ky`` are 1-D vectors (radians per target pixel); returns ``(len(ky), len(kx))``.
        """
        ex, ey = self._factors(np.ravel(kx), np.ravel(ky), pixel_scale)
        return ey @ self.image @ ex.T

    def kvalue_points(self, kx: np.ndarray, ky: np.ndarray, pixel_scale: float) -> np.ndarray:
        """Transform at the points ``(kx[i], ky[i])`` (1-D arrays of equal length)."""
        ex, ey = self._factors(kx, ky, pixel_scale)
        return ((ey @ self.image) * ex).sum(axis=1)

    def to_dict(self) -> dict:
        return {
            "type": "image",
            "pixel_scale_arcsec": self.pixel_scale_arcsec,
            "source": self.source,
            "fwhm_arcsec": round(self.fwhm_arcsec, 5),
        }


PSF = GaussianPSF | MoffatPSF | ImagePSF


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise DeepmorphValueError(f"{name} must be a positive number, got {value!r}")


def _header_scale(header) -> float | None:
    for key in ("PIXSCALE", "PIXSCAL1", "SCALE"):
        if key in header:
            return abs(float(header[key]))
    for key in ("CDELT1", "CD1_1"):
        if key in header:
            return abs(float(header[key])) * 3600.0
    return None


def read_psf_fits(path: str | Path, hdu: int | None = None, pixel_scale_arcsec: float | None = None) -> ImagePSF:
    """Read a PSF image from a FITS file.

    Parameters
    ----------
    path : str or Path
        FITS file.
    hdu : int, optional
        HDU number; default the first HDU holding a 2-D image.
    pixel_scale_arcsec : float, optional
        Sampling of the PSF image, arcsec/pixel; default from the header (``PIXSCALE``,
        ``CDELT1`` or ``CD1_1``).
    """
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    path = Path(path)
    if not path.is_file():
        raise DeepmorphIOError(f"{path}: PSF file not found")
    try:
        with warnings.catch_warnings():  # e.g. "File may have been truncated": the error below says it
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False) as hdus:
                if hdu is None:
                    hdu = next((i for i, h in enumerate(hdus) if h.data is not None and h.data.ndim == 2), None)
                    if hdu is None:
                        raise DeepmorphValueError(f"{path}: no 2-D image in any HDU")
                if hdu >= len(hdus):
                    raise DeepmorphValueError(f"{path}: HDU {hdu} does not exist (the file has {len(hdus)})")
                data = hdus[hdu].data
                header = hdus[hdu].header
                if data is None or data.ndim != 2:
                    raise DeepmorphValueError(f"{path}: HDU {hdu} holds no 2-D image")
                data = np.asarray(data, dtype=np.float64)  # big-endian FITS -> native
    except DeepmorphError:
        raise
    except (OSError, TypeError, ValueError) as exc:  # ValueError: a truncated file's data
        raise DeepmorphIOError(f"{path}: not a readable FITS file ({exc})") from None
    scale = pixel_scale_arcsec if pixel_scale_arcsec is not None else _header_scale(header)
    if scale is None:
        raise DeepmorphValueError(
            f"{path}: the header gives no pixel scale; pass it as {path}@ARCSEC_PER_PIXEL"
        )
    return ImagePSF(data, float(scale), source=f"{path}[{hdu}]")


_FILE_SPEC = re.compile(r"^(?P<path>.+?)(?::(?P<hdu>\d+))?(?:@(?P<scale>[0-9.eE+-]+))?$")


def parse_psf(spec: str | dict | PSF) -> PSF:
    """Build a PSF from its command-line spelling or its JSON dict.

    Spellings: ``gaussian:FWHM``, ``moffat:FWHM,BETA`` (FWHM in arcsec) or
    ``FILE.fits[:HDU][@ARCSEC_PER_PIXEL]`` for a PSF image. Dicts are those of the PSFs'
    ``to_dict`` (``type`` gaussian, moffat or convolved), as dataset files record them.
    """
    if hasattr(spec, "kvalue"):  # already a PSF (Gaussian, Moffat, image, or a pairs file's convolved one)
        return spec
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind == "gaussian":
            return GaussianPSF(float(spec["fwhm_arcsec"]))
        if kind == "moffat":
            return MoffatPSF(float(spec["fwhm_arcsec"]), float(spec.get("beta", 3.5)))
        if kind == "convolved":  # the degraded PSF of an image-recovery pairs file
            from deepmorph.simulate.pairs import ConvolvedPSF

            return ConvolvedPSF(parse_psf(spec["base"]), float(spec["blur_sigma_arcsec"]))
        raise DeepmorphValueError(f"cannot rebuild a PSF from {json.dumps(spec)}")
    text = str(spec).strip()
    low = text.lower()
    try:
        if low.startswith("gaussian:"):
            return GaussianPSF(float(text.split(":", 1)[1]))
        if low.startswith("moffat:"):
            parts = [float(v) for v in text.split(":", 1)[1].split(",")]
            return MoffatPSF(*parts)
    except DeepmorphValueError:
        raise
    except (ValueError, TypeError):
        raise DeepmorphValueError(
            f"bad PSF {text!r}: use gaussian:FWHM, moffat:FWHM,BETA or FILE.fits[:HDU][@SCALE]"
        ) from None
    m = _FILE_SPEC.match(text)
    if m and m.group("path").lower().endswith((".fits", ".fit", ".fits.gz", ".fz")):
        hdu = int(m.group("hdu")) if m.group("hdu") else None
        scale = float(m.group("scale")) if m.group("scale") else None
        return read_psf_fits(m.group("path"), hdu, scale)
    raise DeepmorphValueError(
        f"bad PSF {text!r}: use gaussian:FWHM, moffat:FWHM,BETA or FILE.fits[:HDU][@SCALE]"
    )
