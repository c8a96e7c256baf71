"""Pairs of (degraded, original) stamps of the same galaxies, for image recovery (Schawinski et al. 2017).

Item ``i`` is one bulge + disk galaxy (parameters drawn from ``(seed, i)``, as the
:class:`~deepmorph.simulate.Simulator` draws them) rendered twice by the same renderer:

- the **original**: through the survey's PSF ``P`` with Gaussian sky noise ``sigma_o`` (the survey's
  depth, times ``original_noise_factor``: < 1 for deeper originals) and the sources' Poisson noise;
- the **degraded**: through a wider PSF ``P_d = P * G``, ``G`` a circular Gaussian of sigma ``s``
  chosen so that ``FWHM(P_d) = psf_factor * FWHM(P)`` (for a Gaussian ``P`` of sigma ``s_o``:
  ``s = s_o sqrt(psf_factor^2 - 1)``; for a Moffat ``P`` solved numerically on the radial profile),
  with sky noise ``noise_factor * sigma_o`` and the same Poisson noise.

``G`` is the kernel that maps the original's PSF to the degraded one (the "PSF-ratio kernel"), so
``degraded = original * G + noise`` holds pixel by pixel for the noise-free images: it is what a
non-blind deconvolution of the degraded image back to the original's resolution needs
(:func:`gaussian_kernel` draws it). The two noise fields are independent (the original's uses
the seed ``seed + 2**32``), so no network can learn one from the other.

:func:`write_pairs` stores a pair set as a deepmorph dataset file (``deepmorph info`` reads it;
:class:`~deepmorph.data.StampDataset` reads its ``images``, the degraded stamps) with extra
arrays; :func:`read_pairs` reads it back::

    /images               (N, 1, S, S) float32 counts: the degraded stamps (the input)
    /original             (N, 1, S, S) the original stamps, noisy (the target)
    /original_noiseless   (N, 1, S, S) the original stamps without noise (the reference of measurements)
    /rl_kernel            (K, K) the PSF-ratio kernel G on the pixel grid (sums to 1)
    /psf_original, /psf_degraded   (P, P) pixel-convolved PSF images (sum to ~1)
    /catalog/...          the simulator's true parameters (mag, flux, B/T, radii, axis ratios, PA)
    root attributes       the degraded simulator's (``psf``, ``noise`` describe ``/images``) plus
                          ``pair_format``, ``psf_factor``, ``noise_factor``, ``original_noise_factor``,
                          ``psf_original``, ``sky_sigma_original``, ``sky_sigma_degraded``,
                          ``kernel_sigma_pix``, ``kernel_sigma_arcsec``

>>> sim = PairSimulator(stamp_size=32, psf_factor=2.0, noise_factor=2.0)
>>> batch = sim.simulate(range(4), seed=0)
>>> batch["images"].shape, batch["original"].shape
((4, 1, 32, 32), (4, 1, 32, 32))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import scipy.optimize
import scipy.special
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate.noise import GaussianNoise
from deepmorph.simulate.priors import Priors
from deepmorph.simulate.psf import FWHM_PER_SIGMA, GaussianPSF, MoffatPSF

#: Marks a pairs file (root attribute ``pair_format``).
PAIR_FORMAT = "deepmorph.pairs"
#: The original's noise is drawn with ``seed + ORIGINAL_NOISE_SEED_OFFSET`` (independent of the degraded's).
ORIGINAL_NOISE_SEED_OFFSET = 1 << 32
#: Side of the stored PSF images, pixels (at most the stamp side).
PSF_IMAGE_SIZE = 31
_PAIR_ARRAYS = ("original", "original_noiseless")


# -- PSFs ------------------------------------------------------------------------------------------------

def _transform(psf, k: np.ndarray) -> np.ndarray:
    """Radial transform of an analytic PSF at wavenumbers ``k`` (radians per arcsec)."""
    return np.real(psf.kvalue(k, np.zeros_like(k), 1.0))


def radial_profile(psf, r_arcsec, blur_sigma_arcsec: float = 0.0) -> np.ndarray:
    """Surface brightness of ``psf`` (convolved with a Gaussian of ``blur_sigma_arcsec``) at radii ``r_arcsec``.

    The inverse Hankel transform ``I(r) = (1 / 2 pi) int T(k) exp(-s^2 k^2 / 2) J0(k r) k dk`` of the
    PSF's transform ``T``, by the trapezoid rule out to where the integrand is below 1e-12 of its
    start (per arcsec^2, unit flux).
    """
    fwhm = float(psf.fwhm_arcsec)
    kmax = 2.0 / fwhm
    while abs(_transform(psf, np.array([kmax]))[0]) * math.exp(-0.5 * (blur_sigma_arcsec * kmax) ** 2) > 1e-12:
        kmax *= 1.5
    k = np.linspace(0.0, kmax, 8001)
    t = _transform(psf, k) * np.exp(-0.5 * (blur_sigma_arcsec * k) ** 2) * k
    r = np.atleast_1d(np.asarray(r_arcsec, dtype=np.float64))
    return np.trapezoid(t[None, :] * scipy.special.j0(np.outer(r, k)), k, axis=1) / (2.0 * math.pi)


def convolved_fwhm_arcsec(psf, blur_sigma_arcsec: float) -> float:
    """FWHM (arcsec) of ``psf`` convolved with a circular Gaussian of sigma ``blur_sigma_arcsec``."""
    if isinstance(psf, GaussianPSF):
        return math.hypot(psf.fwhm_arcsec, FWHM_PER_SIGMA * blur_sigma_arcsec)
    peak = radial_profile(psf, 0.0, blur_sigma_arcsec)[0]
    hi = psf.fwhm_arcsec + 2.0 * FWHM_PER_SIGMA * blur_sigma_arcsec

    def excess(r: float) -> float:
        return radial_profile(psf, r, blur_sigma_arcsec)[0] - 0.5 * peak

    return 2.0 * scipy.optimize.brentq(excess, 0.0, hi, xtol=1e-7 * psf.fwhm_arcsec)


def blur_sigma_arcsec(psf, psf_factor: float) -> float:
    """Sigma (arcsec) of the Gaussian ``G`` with ``FWHM(psf * G) = psf_factor * FWHM(psf)``.

    Raises
    ------
    DeepmorphValueError
        For ``psf_factor < 1`` or a PSF that is not Gaussian or Moffat.
    """
    if not (isinstance(psf_factor, (int, float)) and math.isfinite(psf_factor) and psf_factor >= 1.0):
        raise DeepmorphValueError(f"psf_factor (degraded FWHM / original FWHM) must be >= 1, got {psf_factor!r}")
    if not isinstance(psf, (GaussianPSF, MoffatPSF)):
        raise DeepmorphValueError(
            "image pairs need an analytic original PSF (gaussian:FWHM or moffat:FWHM,BETA), got "
            f"{json.dumps(psf.to_dict()) if psf is not None else 'none'}")
    if psf_factor == 1.0:
        return 0.0
    if isinstance(psf, GaussianPSF):
        return psf.fwhm_arcsec / FWHM_PER_SIGMA * math.sqrt(psf_factor**2 - 1.0)
    target = psf_factor * psf.fwhm_arcsec
    hi = target / FWHM_PER_SIGMA  # a Gaussian alone of that sigma already has the target FWHM
    return scipy.optimize.brentq(lambda s: convolved_fwhm_arcsec(psf, s) - target, 0.0, hi,
                                 xtol=1e-7 * psf.fwhm_arcsec)


@dataclasses.dataclass(frozen=True)
class ConvolvedPSF:
    """An analytic PSF convolved with a circular Gaussian: the degraded PSF of a Moffat original.

    Parameters
    ----------
    base : GaussianPSF or MoffatPSF
        The original PSF.
    blur_sigma_arcsec : float
        Sigma of the Gaussian, arcsec (>= 0).
    """

    base: GaussianPSF | MoffatPSF
    blur_sigma_arcsec: float
    fwhm_arcsec: float = dataclasses.field(init=False)

    def __post_init__(self):
        if not (math.isfinite(self.blur_sigma_arcsec) and self.blur_sigma_arcsec >= 0):
            raise DeepmorphValueError(f"blur sigma must be a non-negative number of arcsec, got "
                                      f"{self.blur_sigma_arcsec}")
        object.__setattr__(self, "fwhm_arcsec", convolved_fwhm_arcsec(self.base, self.blur_sigma_arcsec))

    def kvalue(self, kx: np.ndarray, ky: np.ndarray, pixel_scale: float) -> np.ndarray:
        """Transform at wavenumbers in radians per target pixel of ``pixel_scale`` arcsec."""
        s = self.blur_sigma_arcsec / pixel_scale
        return self.base.kvalue(kx, ky, pixel_scale) * np.exp(-0.5 * s**2 * (kx**2 + ky**2))

    def to_dict(self) -> dict:
        return {"type": "convolved", "base": self.base.to_dict(), "blur_sigma_arcsec": self.blur_sigma_arcsec,
                "fwhm_arcsec": round(self.fwhm_arcsec, 6)}


def degraded_psf(psf, psf_factor: float):
    """The degraded PSF ``psf * G`` (a :class:`GaussianPSF` for a Gaussian ``psf``) and ``G``'s sigma (arcsec)."""
    sigma = blur_sigma_arcsec(psf, psf_factor)
    if isinstance(psf, GaussianPSF):
        return GaussianPSF(psf.fwhm_arcsec * psf_factor), sigma
    return ConvolvedPSF(psf, sigma), sigma


def gaussian_kernel(sigma_pix: float, size: int | None = None) -> np.ndarray:
    """A circular Gaussian of ``sigma_pix`` sampled at pixel centres on an odd ``size`` grid, summing to 1.

    Default size ``2 ceil(4 sigma) + 1``; ``sigma_pix = 0`` gives the identity kernel ``[[1]]``.
    Sampling the Gaussian (rather than integrating it over pixels) is what the discrete
    convolution of two pixelised images needs: the pixel response is already in both.
    """
    if not (math.isfinite(sigma_pix) and sigma_pix >= 0):
        raise DeepmorphValueError(f"kernel sigma must be a non-negative number of pixels, got {sigma_pix}")
    if sigma_pix == 0:
        return np.ones((1, 1), dtype=np.float64)
    size = int(size) if size is not None else 2 * int(math.ceil(4.0 * sigma_pix)) + 1
    if size < 1 or size % 2 == 0:
        raise DeepmorphValueError(f"kernel size must be odd and positive, got {size}")
    x = np.arange(size) - size // 2
    g = np.exp(-0.5 * (x / sigma_pix) ** 2)
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


# -- the simulator ---------------------------------------------------------------------------------------

def _install_psf(sim, psf):
    """``sim`` rendering through ``psf`` (the Simulator's ``psf`` argument takes the stored PSF kinds only)."""
    from deepmorph.simulate.render import Renderer

    sim.psf = psf
    sim.renderer = Renderer(sim.stamp_size, sim.pixel_scale, psf, sim.device)
    img = sim.renderer.psf_image(min(sim.stamp_size * 2, 256)).double()
    sim.psf_nea_pix = float(img.sum() ** 2 / (img**2).sum())
    sim.psf_fwhm_pix = psf.fwhm_arcsec / sim.pixel_scale
    return sim


class PairSimulator:
    """Degraded and original stamps of the same galaxies (see the module docstring).

    Parameters
    ----------
    survey : str
        Survey preset (pixel scale, zero point, depth, gain, and the original's PSF).
    stamp_size : int
        Stamp side, pixels.
    priors : Priors, optional
        Galaxy priors (default :func:`~deepmorph.simulate.anomalies.normal_priors`: H = 19-23,
        sizes that fit the stamp); no clumps, no neighbours.
    psf : str, dict or PSF, optional
        The original's PSF, Gaussian or Moffat (default the survey's).
    psf_factor : float
        FWHM of the degraded PSF over the original's (>= 1).
    noise_factor : float
        Sky sigma of the degraded stamps over the original's (>= 0).
    original_noise_factor : float
        The original's sky sigma over the survey's (> 0; < 1 makes deeper originals).
    pixel_scale_arcsec : float, optional
        Override the survey's pixel scale.
    device : str
        Where to simulate.
    """

    def __init__(self, survey: str = "candels-f160w", stamp_size: int = 64, priors: Priors | None = None,
                 psf=None, psf_factor: float = 2.0, noise_factor: float = 2.0, original_noise_factor: float = 1.0,
                 pixel_scale_arcsec: float | None = None, device: str = "cpu"):
        from deepmorph.simulate.anomalies import normal_priors
        from deepmorph.simulate.simulator import Simulator

        for name, value, low in (("noise_factor", noise_factor, 0.0), ("original_noise_factor", original_noise_factor,
                                                                        None)):
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if low is not None
                                                                              else value > 0)
            if not ok:
                raise DeepmorphValueError(f"{name} must be a {'non-negative' if low is not None else 'positive'} "
                                          f"number, got {value!r}")
        priors = priors or normal_priors(stamp_size)
        common = {"stamp_size": stamp_size, "priors": priors, "pixel_scale_arcsec": pixel_scale_arcsec,
                  "device": device}
        self.original = Simulator(survey, psf=psf, noise="none", **common)
        base = self.original.psf
        psf_d, sigma = degraded_psf(base, float(psf_factor))
        survey_obj = self.original.survey
        gain = survey_obj.gain_e_per_count
        self.sky_sigma_original = float(self.original.default_sky_sigma * original_noise_factor)
        self.sky_sigma_degraded = float(self.sky_sigma_original * noise_factor)
        self.original_noise = GaussianNoise(self.sky_sigma_original, gain)
        noise_d = GaussianNoise(self.sky_sigma_degraded, gain)
        if isinstance(psf_d, GaussianPSF):
            self.degraded = Simulator(survey_obj, psf=psf_d, noise=noise_d, **common)
        else:
            self.degraded = _install_psf(Simulator(survey_obj, psf=base, noise=noise_d, **common), psf_d)
        self.psf_factor, self.noise_factor = float(psf_factor), float(noise_factor)
        self.original_noise_factor = float(original_noise_factor)
        self.stamp_size = self.original.stamp_size
        self.pixel_scale = self.original.pixel_scale
        self.kernel_sigma_arcsec = float(sigma)
        self.kernel_sigma_pix = float(sigma) / self.pixel_scale

    @property
    def kernel(self) -> np.ndarray:
        """The PSF-ratio kernel ``G`` on the pixel grid (:func:`gaussian_kernel`)."""
        return gaussian_kernel(self.kernel_sigma_pix)

    def psf_images(self, size: int = PSF_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-convolved PSF images of the original and the degraded stamps, ``(size, size)``."""
        size = min(int(size), self.stamp_size - (1 - self.stamp_size % 2))
        return (self.original.renderer.psf_image(size).cpu().numpy(),
                self.degraded.renderer.psf_image(size).cpu().numpy())

    # -- metadata ------------------------------------------------------------------------------------------
    def attributes(self, seed: int) -> dict:
        """The degraded simulator's attributes (they describe ``images``) and the pair's, HDF5-friendly."""
        attrs = self.degraded.attributes(seed)
        attrs.update({
            "pair_format": PAIR_FORMAT, "psf_factor": self.psf_factor, "noise_factor": self.noise_factor,
            "original_noise_factor": self.original_noise_factor,
            "psf_original": json.dumps(self.original.psf_dict()),
            "noise_original": json.dumps(self.original_noise.to_dict()),
            "sky_sigma_original": self.sky_sigma_original, "sky_sigma_degraded": self.sky_sigma_degraded,
            "kernel_sigma_pix": self.kernel_sigma_pix, "kernel_sigma_arcsec": self.kernel_sigma_arcsec,
        })
        return attrs

    # -- simulation ----------------------------------------------------------------------------------------
    def simulate_original(self, indices, seed: int) -> dict:
        """The original stamps of items ``indices``: ``original`` (noisy), ``original_noiseless`` (numpy)."""
        base = self.original.simulate(indices, seed, as_numpy=False)
        clean = base["noiseless"][:, 0]
        idx = torch.as_tensor(np.asarray(base["catalog"]["id"]), device=clean.device)
        noisy = self.original_noise.apply(clean, int(seed) + ORIGINAL_NOISE_SEED_OFFSET, idx)
        return {"original": noisy.float()[:, None].cpu().numpy(),
                "original_noiseless": clean.float()[:, None].cpu().numpy(), "catalog": base["catalog"]}

    def simulate(self, indices, seed: int) -> dict:
        """Items ``indices`` with ``seed``.

        Returns
        -------
        dict
            ``images`` (degraded, noisy), ``noiseless`` (degraded, noise-free), ``original``,
            ``original_noiseless``: ``(B, 1, S, S)`` float32 counts; ``catalog`` (the true parameters).
        """
        deg = self.degraded.simulate(indices, seed)
        orig = self.simulate_original(indices, seed)
        return {"images": deg["images"], "noiseless": deg["noiseless"], "original": orig["original"],
                "original_noiseless": orig["original_noiseless"], "catalog": deg["catalog"]}


# -- files -----------------------------------------------------------------------------------------------

class _DegradedStamps:
    """The dataset writer's view of a :class:`PairSimulator`: the degraded stamps and the pair attributes."""

    components = False

    def __init__(self, pairs: PairSimulator):
        self.pairs = pairs

    def attributes(self, seed: int) -> dict:
        return self.pairs.attributes(seed)

    def psf_image(self):
        return None

    def simulate(self, indices, seed: int) -> dict:
        return self.pairs.degraded.simulate(indices, seed)


def write_pairs(path: str | Path, n: int, seed: int = 0, survey: str = "candels-f160w", stamp_size: int = 64,
                psf=None, psf_factor: float = 2.0, noise_factor: float = 2.0, original_noise_factor: float = 1.0,
                priors: Priors | None = None, batch_size: int = 512, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Simulate ``n`` pairs (items ``0 .. n-1`` with ``seed``) into one file (layout in the module docstring).

    The degraded stamps are written first (resumable, as :func:`~deepmorph.data.write_dataset`), then
    the originals; the file appears at ``path`` only when complete.
    """
    import h5py

    from deepmorph.data import check_output, write_dataset

    path = check_output(path, overwrite)
    sim = PairSimulator(survey, stamp_size, priors, psf, psf_factor, noise_factor, original_noise_factor)
    building = path.with_name(path.name + ".building")
    write_dataset(building, _DegradedStamps(sim), n, seed, batch_size=batch_size, overwrite=True, progress=progress)
    try:
        with h5py.File(building, "r+") as f:
            s = sim.stamp_size
            for name in _PAIR_ARRAYS:
                ds = f.create_dataset(name, shape=(n, 1, s, s), dtype=np.float32, chunks=f["images"].chunks)
                ds.attrs["unit"] = "count"
            f.create_dataset("rl_kernel", data=sim.kernel)
            psf_o, psf_d = sim.psf_images()
            f.create_dataset("psf_original", data=psf_o.astype(np.float32))
            f.create_dataset("psf_degraded", data=psf_d.astype(np.float32))
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                batch = sim.simulate_original(np.arange(start, stop), seed)
                for name in _PAIR_ARRAYS:
                    f[name][start:stop] = batch[name]
        os.replace(building, path)
    finally:
        building.unlink(missing_ok=True)
    return path


def is_pairs_file(path: str | Path) -> bool:
    """Whether ``path`` is a complete pairs file (:func:`write_pairs`)."""
    from deepmorph.data import open_dataset

    try:
        with open_dataset(path) as ds:
            f = ds._open_file()
            return ds.attrs.get("pair_format") == PAIR_FORMAT and all(a in f for a in _PAIR_ARRAYS)
    except DeepmorphIOError:
        return False


def read_pairs(path: str | Path, items=None, arrays=("images", "original", "original_noiseless")) -> dict:
    """Items of a pairs file (default all): its ``arrays`` as float32 ``(N, 1, S, S)`` (``images`` are the
    degraded stamps), ``catalog`` (Table), ``attrs`` (JSON decoded), ``rl_kernel``, ``psf_original``
    and ``psf_degraded``.

    Raises
    ------
    DeepmorphIOError
        Not a complete pairs file.
    DeepmorphValueError
        An item out of range.
    """
    from deepmorph.data import open_dataset

    path = Path(path)
    with open_dataset(path) as ds:
        f = ds._open_file()
        if ds.attrs.get("pair_format") != PAIR_FORMAT or not all(a in f for a in _PAIR_ARRAYS):
            raise DeepmorphIOError(f"{path}: not an image-recovery pairs file (make one with deepmorph "
                                   "simulate-pairs)")
        n = len(ds)
        idx = np.arange(n) if items is None else np.asarray(items, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DeepmorphValueError(f"{path}: items must lie in [0, {n - 1}], got {idx.min()} .. {idx.max()}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = {}
        for name in arrays:
            data = f[name][...] if items is None else f[name][uniq]  # h5py wants increasing indices
            out[name] = np.asarray(data, dtype=np.float32)[inverse.reshape(-1)] if items is not None \
                else np.asarray(data, dtype=np.float32)
        out["catalog"] = ds.catalog[idx]
        attrs = dict(ds.attrs)
        for key in ("psf_original", "noise_original"):
            if isinstance(attrs.get(key), str):
                attrs[key] = json.loads(attrs[key])
        out["attrs"] = attrs
        for name in ("rl_kernel", "psf_original", "psf_degraded"):
            out[name] = np.asarray(f[name][...], dtype=np.float64)
    return out


__all__ = ["ORIGINAL_NOISE_SEED_OFFSET", "PAIR_FORMAT", "ConvolvedPSF", "PairSimulator", "blur_sigma_arcsec",
           "convolved_fwhm_arcsec", "degraded_psf", "gaussian_kernel", "is_pairs_file", "radial_profile",
           "read_pairs", "write_pairs"]
