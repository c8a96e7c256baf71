"""Image normalisation, recorded with a model so that prediction applies the same one.

``asinh`` (the astronomer's stretch: linear in the noise, logarithmic in bright cores, softened
at the sky noise), per-image standardisation, or dataset standardisation; see
:class:`Normalization`. Sky noise is measured robustly on each stamp's outer ring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import h5py
import numpy as np
import torch

from deepmorph._records import record_from_dict
from deepmorph.errors import DeepmorphValueError

NORMALIZATIONS = ("asinh", "standardize", "dataset", "none")


def robust_sigma(x: np.ndarray, n_iter: int = 3, clip: float = 3.0) -> float:
    """Sky noise of an image, robustly: the MAD of the pixels, 3-sigma clipped about the median.

    Parameters
    ----------
    x : numpy.ndarray
        Pixel values (any shape), e.g. counts.
    n_iter : int
        Clipping iterations.
    clip : float
        Clipping threshold in sigma.

    Returns
    -------
    float
        ``1.4826 * MAD`` of the clipped pixels (the units of ``x``); 0 for a constant image.
    """
    v = np.asarray(x, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    sigma = 0.0
    for _ in range(n_iter):
        med = np.median(v)
        sigma = 1.4826 * float(np.median(np.abs(v - med)))
        if sigma == 0.0:
            return 0.0
        keep = np.abs(v - med) <= clip * sigma
        if keep.all():
            break
        v = v[keep]
    return sigma


def sky_sigma(image: np.ndarray, border: int | None = None) -> float:
    """Sky noise of a stamp: :func:`robust_sigma` of its outer ring of pixels.

    A galaxy stamp is centred on the galaxy, so the ring along its edges is the part most free of
    its light.

    Parameters
    ----------
    image : numpy.ndarray
        ``(..., H, W)`` pixel values, e.g. counts.
    border : int, optional
        Width of the ring, pixels (default ``max(2, min(H, W) // 16)``).

    Returns
    -------
    float
        The sky sigma, in the units of ``image``.
    """
    a = np.asarray(image)
    h, w = a.shape[-2:]
    b = border if border is not None else max(2, min(h, w) // 16)
    if 2 * b >= min(h, w):
        return robust_sigma(a)
    ring = np.ones((h, w), dtype=bool)
    ring[b:h - b, b:w - b] = False
    return robust_sigma(a[..., ring])


def _channel_tuple(value, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    vals = (value,) if isinstance(value, (int, float, np.integer, np.floating)) else tuple(value)
    try:
        vals = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise DeepmorphValueError(
            f"normalization {name} must be a number or a list of numbers, got {value!r}"
        ) from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise DeepmorphValueError(f"normalization {name} must be finite numbers, got {value!r}")
    return vals


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How pixel values are scaled before a network sees them; recorded with a model run.

    Parameters
    ----------
    kind : {"asinh", "standardize", "dataset", "none"}
        ``asinh``: ``asinh(x / scale)`` (Lupton's stretch: linear below ``scale``, logarithmic above);
        ``standardize``: per image and channel, ``(x - mean) / (std + eps)``;
        ``dataset``: one global ``(x - mean) / std`` per channel, fitted on training images;
        ``none``: the values as they are.
    scale : float, sequence of float, or "auto"
        Softening of ``asinh``, in the images' units (counts), one value or one per channel.
        ``"auto"`` is fitted: the median over images of each image's robust sky sigma
        (:func:`sky_sigma`: the clipped MAD of the stamp's outer ring of pixels).
    mean, std : float or sequence of float, optional
        Per-channel (or one global) mean and standard deviation of the ``dataset`` kind, in the
        images' units; fitted by :meth:`fit`.
    eps : float
        Added to per-image standard deviations (``standardize``), in the images' units.

    Examples
    --------
    >>> norm = Normalization("asinh", scale=0.05)
    >>> Normalization.from_dict(norm.to_dict()) == norm
    True
    """

    kind: str = "asinh"
    scale: float | tuple[float, ...] | str | None = "auto"
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    eps: float = 1e-6

    def __post_init__(self):
        if self.kind not in NORMALIZATIONS:
            raise DeepmorphValueError(
                f"normalization kind must be one of {', '.join(NORMALIZATIONS)}, got {self.kind!r}"
            )
        scale = self.scale
        if isinstance(scale, str):
            if scale != "auto":
                raise DeepmorphValueError(f"normalization scale must be a positive number or 'auto', got {scale!r}")
        elif scale is not None:
            scale = _channel_tuple(scale, "scale")
            if any(s <= 0 for s in scale):
                raise DeepmorphValueError(f"normalization scale must be positive (counts), got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", _channel_tuple(self.mean, "mean"))
        std = _channel_tuple(self.std, "std")
        if std is not None and any(s <= 0 for s in std):
            raise DeepmorphValueError(f"normalization std must be positive, got {self.std!r}")
        object.__setattr__(self, "std", std)
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise DeepmorphValueError(f"normalization eps must be a non-negative number, got {self.eps!r}")

    @property
    def fitted(self) -> bool:
        """Whether every parameter is known (``asinh`` with a numeric scale, ``dataset`` with mean and std)."""
        if self.kind == "asinh":
            return isinstance(self.scale, tuple)
        if self.kind == "dataset":
            return self.mean is not None and self.std is not None
        return True

    def fit(self, images, max_images: int = 1024) -> Normalization:
        """A copy with the data-dependent parameters estimated from (training) images.

        Parameters
        ----------
        images : array, tensor, h5py.Dataset, or iterable
            Un-normalised images: an array ``(N, C, H, W)`` or ``(C, H, W)``, an h5py dataset of
            them, or an iterable of arrays, tensors, or dicts with an ``"image"`` entry (dataset
            items or loader batches), e.g. a :class:`StampDataset` built without normalisation.
        max_images : int
            At most this many images are used (evenly spread blocks of an array or h5py dataset;
            the first ones of an iterable).

        Returns
        -------
        Normalization
            Fitted copy; ``self`` unchanged when nothing is to be fitted.

        Raises
        ------
        DeepmorphValueError
            No finite pixel to fit on.
        """
        if self.fitted:
            return self
        if getattr(images, "normalization", None) is not None:
            raise DeepmorphValueError(
                "normalization: fit on un-normalised images (this dataset already has a normalization set)"
            )
        x = _sample_images(images, max_images)  # (N, C, H, W) float64
        if x.size == 0 or not np.isfinite(x).any():
            raise DeepmorphValueError("normalization: no finite pixels to fit on")
        if self.kind == "asinh":
            scale = []
            for c in range(x.shape[1]):
                sig = np.array([sky_sigma(img) for img in x[:, c]])
                s = float(np.nanmedian(sig)) if np.isfinite(sig).any() else 0.0
                if not s > 0:  # noise-free images: fall back to a small fraction of the typical peak
                    peak = float(np.nanmedian(np.nanmax(np.abs(x[:, c]), axis=(-2, -1))))
                    s = 1e-3 * peak if peak > 0 else 1.0
                scale.append(s)
            return dataclasses.replace(self, scale=tuple(scale))
        # dataset: per-channel mean and std over all finite pixels
        mean, std = [], []
        for c in range(x.shape[1]):
            v = x[:, c][np.isfinite(x[:, c])]
            mean.append(float(v.mean()))
            std.append(float(v.std()) if v.std() > 0 else 1.0)
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``, a tensor ``(B, C, H, W)`` or ``(C, H, W)`` (numpy arrays are converted).

        Raises
        ------
        DeepmorphValueError
            The normalisation needs :meth:`fit` first, or its per-channel parameters do not match
            the number of channels.
        """
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.float()
        if self.kind == "none":
            return x
        if x.ndim not in (3, 4):
            raise DeepmorphValueError(
                f"normalization expects (C, H, W) or (B, C, H, W) images, got shape {tuple(x.shape)}"
            )
        if self.kind == "standardize":
            dims = (-2, -1)
            mean = x.mean(dim=dims, keepdim=True)
            std = x.std(dim=dims, keepdim=True, unbiased=False)
            return (x - mean) / (std + self.eps)
        if not self.fitted:
            raise DeepmorphValueError(f"normalization {self.kind!r} must be fitted first: call .fit(training images)")
        channels = x.shape[-3]
        if self.kind == "asinh":
            return torch.asinh(x / self._per_channel(self.scale, channels, x))
        return (x - self._per_channel(self.mean, channels, x)) / self._per_channel(self.std, channels, x)

    @staticmethod
    def _per_channel(values: tuple[float, ...], channels: int, like: torch.Tensor) -> torch.Tensor:
        if len(values) not in (1, channels):
            raise DeepmorphValueError(
                f"normalization has {len(values)} per-channel values but the images have {channels} channel(s)"
            )
        return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]

    def to_dict(self) -> dict:
        """JSON-friendly parameters (lists for per-channel values); :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        return record_from_dict(cls, d, "normalization parameter")


def _blocks(n: int, max_images: int, block: int = 64) -> list[slice]:
    """Evenly spread contiguous blocks covering at most ``max_images`` of ``range(n)``."""
    if n <= max_images:
        return [slice(0, n)]
    n_blocks = max(1, max_images // block)
    size = max_images // n_blocks
    starts = np.linspace(0, n - size, n_blocks).astype(int)
    return [slice(int(s), int(s) + size) for s in np.unique(starts)]


def _as_nchw(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise DeepmorphValueError(f"normalization: images must be (N, C, H, W), (C, H, W) or (H, W), got {a.shape}")
    return a


def _sample_images(images, max_images: int) -> np.ndarray:
    if isinstance(images, (np.ndarray, torch.Tensor, h5py.Dataset)):
        if images.ndim <= 3:
            return _as_nchw(images[...] if isinstance(images, h5py.Dataset) else images)
        return np.concatenate([_as_nchw(images[s]) for s in _blocks(len(images), max_images)])
    parts, count = [], 0
    for item in images if isinstance(images, Iterable) else iter(images):
        arr = _as_nchw(item["image"] if isinstance(item, dict) else item)
        parts.append(arr)
        count += len(arr)
        if count >= max_images:
            break
    if not parts:
        raise DeepmorphValueError("normalization: no images to fit on")
    return np.concatenate(parts)[:max_images]
