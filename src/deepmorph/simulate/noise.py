"""Noise: Gaussian sky plus source Poisson noise, or real background cutouts.

Both are counter-based (see :mod:`deepmorph.simulate.rng`): the noise of item ``i`` depends
on ``(seed, i)`` only. Source shot noise is added in its Gaussian limit,
``variance = max(model, 0) / gain`` (counts^2, gain in electrons per count), which is
exact to well below a percent for the tens of electrons and more that a galaxy pixel holds.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphError, DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import rng

_NOISE_STREAM = 300
_BACKGROUND_STREAM = 310


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Gaussian sky noise of ``sky_sigma`` counts per pixel, plus Poisson source noise.

    Parameters
    ----------
    sky_sigma : float
        Sky (and read) noise, counts per pixel (1-sigma).
    gain_e_per_count : float or None
        Electrons per count for source Poisson noise; ``None`` turns it off.
    """

    sky_sigma: float
    gain_e_per_count: float | None = None

    def __post_init__(self):
        if not (np.isfinite(self.sky_sigma) and self.sky_sigma >= 0):
            raise DeepmorphValueError(f"sky noise must be a non-negative number, got {self.sky_sigma}")
        if self.gain_e_per_count is not None and not self.gain_e_per_count > 0:
            raise DeepmorphValueError(f"gain must be positive, got {self.gain_e_per_count}")

    def to_dict(self) -> dict:
        return {"type": "gaussian", "sky_sigma": self.sky_sigma, "gain_e_per_count": self.gain_e_per_count}

    def apply(self, model: torch.Tensor, seed: int, index: torch.Tensor) -> torch.Tensor:
        """Noisy images from noise-free ``model`` ``(B, H, W)`` (counts)."""
        return model + self.sigma_map(model) * _standard_normal(seed, index, model.shape[1:], model.device)

    def sigma_map(self, model: torch.Tensor) -> torch.Tensor:
        """Per-pixel 1-sigma noise for ``model`` (counts)."""
        var = torch.full_like(model, self.sky_sigma**2)
        if self.gain_e_per_count:
            var = var + model.clamp_min(0) / self.gain_e_per_count
        return torch.sqrt(var)


@dataclasses.dataclass(frozen=True, eq=False)
class BackgroundNoise:
    """Real background: a random cutout of a sky image is added to each stamp.

    Parameters
    ----------
    image : numpy.ndarray
        2-D background image in the same counts as the simulation (its median is removed).
    source : str
        File it came from.
    gain_e_per_count : float or None
        Electrons per count for source Poisson noise on top of the real background.
    scale : float
        Multiplies the background (e.g. to match zero points).
    """

    image: np.ndarray
    source: str = ""
    gain_e_per_count: float | None = None
    scale: float = 1.0

    def __post_init__(self):
        img = np.asarray(self.image, dtype=np.float32)
        if img.ndim != 2:
            raise DeepmorphValueError(f"{self.source}: background must be a 2-D image, got shape {img.shape}")
        if not np.all(np.isfinite(img)):
            raise DeepmorphValueError(f"{self.source}: background image has NaN or infinite pixels")
        object.__setattr__(self, "image", (img - np.median(img)) * self.scale)

    @property
    def sky_sigma(self) -> float:
        """Robust (MAD) standard deviation of the background, counts."""
        img = self.image
        return float(1.4826 * np.median(np.abs(img - np.median(img))))

    def to_dict(self) -> dict:
        return {
            "type": "background",
            "source": self.source,
            "sky_sigma": self.sky_sigma,
            "gain_e_per_count": self.gain_e_per_count,
            "scale": self.scale,
        }

    def check_stamps(self, h: int, w: int) -> None:
        """A one-line error if the background is smaller than ``h x w`` stamps."""
        bh, bw = self.image.shape
        if bh < h or bw < w:
            raise DeepmorphValueError(f"{self.source}: background {bw}x{bh} is smaller than the {w}x{h} stamps")

    def apply(self, model: torch.Tensor, seed: int, index: torch.Tensor) -> torch.Tensor:
        b, h, w = model.shape
        self.check_stamps(h, w)
        bg = torch.as_tensor(self.image, device=model.device)
        bh, bw = bg.shape
        y0 = torch.floor(rng.uniform(seed, index, _BACKGROUND_STREAM, 0, 0, bh - h + 1)).long()
        x0 = torch.floor(rng.uniform(seed, index, _BACKGROUND_STREAM, 1, 0, bw - w + 1)).long()
        yy = (y0[:, None] + torch.arange(h, device=model.device)[None, :])[:, :, None]
        xx = (x0[:, None] + torch.arange(w, device=model.device)[None, :])[:, None, :]
        out = model + bg[yy, xx]
        if self.gain_e_per_count:
            sigma = torch.sqrt(model.clamp_min(0) / self.gain_e_per_count)
            out = out + sigma * _standard_normal(seed, index, (h, w), model.device)
        return out


Noise = GaussianNoise | BackgroundNoise | None


def _standard_normal(seed: int, index: torch.Tensor, shape, device) -> torch.Tensor:
    h, w = shape
    z = rng.normal(seed, index, _NOISE_STREAM, h * w)
    return z.reshape(-1, h, w)


def read_background(path: str | Path, hdu: int | None = None, **kwargs) -> BackgroundNoise:
    """Read a background image from FITS (big-endian data converted to native float32)."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    path = Path(path)
    if not path.is_file():
        raise DeepmorphIOError(f"{path}: background file not found")
    try:
        with warnings.catch_warnings():  # e.g. "File may have been truncated": the error below says it
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False) as hdus:
                if hdu is None:
                    hdu = next((k for k, h in enumerate(hdus) if h.data is not None and h.data.ndim == 2), None)
                if hdu is None or hdu >= len(hdus) or hdus[hdu].data is None:
                    raise DeepmorphValueError(f"{path}: no 2-D image to use as background")
                data = np.asarray(hdus[hdu].data, dtype=np.float32)
    except DeepmorphError:
        raise
    except (OSError, TypeError, ValueError) as exc:  # ValueError: a truncated file's data
        raise DeepmorphIOError(f"{path}: not a readable FITS file ({exc})") from None
    return BackgroundNoise(data, source=str(path), **kwargs)
