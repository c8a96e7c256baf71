"""On-the-fly, batched data augmentation on the CPU or a GPU, with labels transformed alike.

One random affine transform per image (flip, rotation, zoom, shift), applied with
:func:`torch.nn.functional.affine_grid` and :func:`torch.nn.functional.grid_sample` to a whole
batch on the batch's device, plus optional Gaussian noise. Masks get the same transform with
nearest-neighbour sampling, and position angles are updated to match.

Conventions (those of deepmorph): images are ``[..., y, x]`` with ``x`` the column and ``y`` the
row index, displayed with ``origin="lower"`` (y up); angles are degrees counter-clockwise from
+x. A rotation by ``+t`` turns the image content ``t`` degrees counter-clockwise about the
stamp's geometric centre ``((W-1)/2, (H-1)/2)``, so a galaxy's position angle becomes
``PA + t``; a horizontal flip (``x -> -x``) or a vertical flip (``y -> -y``) maps ``PA`` to
``180 - PA``; angles are returned modulo 180.

Each image's transform, as a map of content positions ``p`` (pixels from the centre), is
``p -> zoom * R(t) * F * p + shift``: flip ``F`` first, then rotation, zoom, and shift.

Examples
--------
>>> import torch
>>> aug = PRESETS["keras"]
>>> g = torch.Generator().manual_seed(0)
>>> images = torch.rand(8, 1, 32, 32)
>>> out, _, pa = aug(images, pa_deg=torch.full((8,), 30.0), generator=g)
>>> out.shape
torch.Size([8, 1, 32, 32])
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from deepmorph._records import record_from_dict
from deepmorph.errors import DeepmorphValueError

PADDING_MODES = ("noise", "zeros", "border", "reflection")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _pair(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DeepmorphValueError(f"augmentation {name} must be a (low, high) pair, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise DeepmorphValueError(f"augmentation {name} must be a finite (low, high) range, got {value!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random geometric transforms and noise for training images, applied per batch.

    Parameters
    ----------
    rotation_deg : float or (float, float)
        Rotation angle range, degrees counter-clockwise: a number ``r`` means uniform in
        ``[-r, r]`` (Keras's ``rotation_range``), a pair ``(lo, hi)`` uniform in it.
    shift_frac : float
        Shifts uniform in ``[-shift_frac, shift_frac]`` of the image width (x) and height (y),
        independently (Keras's ``width_shift_range`` = ``height_shift_range``), in [0, 1).
    hflip, vflip : bool
        Mirror ``x -> -x`` (horizontal) / ``y -> -y`` (vertical) with probability 1/2 each.
    zoom : (float, float)
        Magnification range, uniform: ``z > 1`` makes the galaxy larger. Isotropic (the same in
        x and y, so axis ratios are kept; Keras draws x and y zooms independently).
    noise_sigma : float
        Standard deviation of Gaussian noise added to every pixel, in the images' units
        (counts, or normalised units if applied after normalisation); 0 for none.
    padding_mode : {"noise", "zeros", "border", "reflection"}
        What fills pixels that come from outside the stamp (masks always get zeros).
        ``"noise"``: Gaussian noise with the median and robust sigma (MAD) of the image's outer
        ring of pixels, per image and channel (sky-like; zeros for noise-free images);
        ``"border"`` is Keras's ``fill_mode="nearest"``. Avoid ``"reflection"`` with zoom < 1 or
        rotations: the corners then mirror the galaxy itself.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Image resampling (masks are always nearest). Note that interpolation smooths pixel
        noise (bilinear at half-pixel offsets halves its variance).
    conserve_flux : bool
        Divide by ``zoom**2`` so the total flux is kept under zoom (otherwise surface
        brightness is kept, as in Keras).

    Examples
    --------
    >>> Augmentation(rotation_deg=45).rotation_deg
    (-45.0, 45.0)
    """

    rotation_deg: float | tuple[float, float] = 0.0
    shift_frac: float = 0.0
    hflip: bool = False
    vflip: bool = False
    zoom: tuple[float, float] = (1.0, 1.0)
    noise_sigma: float = 0.0
    padding_mode: str = "noise"
    interpolation: str = "bilinear"
    conserve_flux: bool = False

    def __post_init__(self):
        rot = self.rotation_deg
        if isinstance(rot, (int, float, np.integer, np.floating)):
            if not (math.isfinite(rot) and rot >= 0):
                raise DeepmorphValueError(f"augmentation rotation_deg must be >= 0 or a (low, high) range, got {rot!r}")
            rot = (-float(rot), float(rot))
        object.__setattr__(self, "rotation_deg", _pair(rot, "rotation_deg"))
        zoom = _pair(self.zoom, "zoom")
        if zoom[0] <= 0:
            raise DeepmorphValueError(f"augmentation zoom must be positive, got {self.zoom!r}")
        object.__setattr__(self, "zoom", zoom)
        for name in ("shift_frac", "noise_sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                math.isfinite(v) and v >= 0
            ):
                raise DeepmorphValueError(f"augmentation {name} must be a non-negative number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.shift_frac >= 1:
            raise DeepmorphValueError(
                f"augmentation shift_frac must be < 1 (a fraction of the size), got {self.shift_frac}"
            )
        if self.padding_mode not in PADDING_MODES:
            raise DeepmorphValueError(f"augmentation padding_mode must be one of {', '.join(PADDING_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise DeepmorphValueError(f"augmentation interpolation must be one of {', '.join(INTERPOLATIONS)}")
        for name in ("hflip", "vflip", "conserve_flux"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    # -- properties ----------------------------------------------------------------------------
    @property
    def resamples(self) -> bool:
        """Whether the transform needs interpolation (rotation, shift or zoom); flips alone are exact."""
        return self.rotation_deg != (0.0, 0.0) or self.shift_frac > 0 or self.zoom != (1.0, 1.0)

    @property
    def is_identity(self) -> bool:
        """Whether every image is returned unchanged."""
        return not (self.resamples or self.hflip or self.vflip or self.noise_sigma > 0)

    # -- randomness ----------------------------------------------------------------------------
    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the random parameters of ``batch_size`` transforms.

        Parameters
        ----------
        batch_size : int
            Number of images.
        generator : torch.Generator, optional
            Source of randomness (its device is where the draws happen); None uses torch's global
            generator.

        Returns
        -------
        dict of str to torch.Tensor
            ``(B,)`` tensors: ``angle_deg`` (CCW), ``shift_x`` and ``shift_y`` (fractions of W and
            H), ``zoom`` (magnification), ``hflip`` and ``vflip`` (bool).
        """
        dev = generator.device if generator is not None else torch.device("cpu")

        def uniform(lo, hi):
            u = torch.rand(batch_size, generator=generator, device=dev, dtype=torch.float64)
            return lo + (hi - lo) * u

        s = self.shift_frac
        return {
            "angle_deg": uniform(*self.rotation_deg),
            "shift_x": uniform(-s, s),
            "shift_y": uniform(-s, s),
            "zoom": uniform(*self.zoom),
            "hflip": (torch.rand(batch_size, generator=generator, device=dev) < 0.5) & self.hflip,
            "vflip": (torch.rand(batch_size, generator=generator, device=dev) < 0.5) & self.vflip,
        }

    # -- transforms ----------------------------------------------------------------------------
    def __call__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None = None,
        pa_deg=None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | np.ndarray | None]:
        """Augment a batch: draw one transform per image (:meth:`sample`) and :meth:`apply` it.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, C, H, W)`` float images (counts or normalised), on any device.
        masks : torch.Tensor, optional
            ``(B, K, H, W)`` masks (any dtype), transformed with the same affine map (nearest).
        pa_deg : tensor or array, optional
            Position angles, degrees CCW from +x, ``(B,)`` or ``(B, M)`` (several objects per image).
        generator : torch.Generator, optional
            Source of randomness (CPU or the images' device).

        Returns
        -------
        images, masks, pa_deg
            The transformed batch (masks and pa_deg None when not given; angles modulo 180).
        """
        if self.is_identity:
            return images, masks, pa_deg
        params = self.sample(images.shape[0], generator)
        out, masks, pa_deg = self.apply(images, params, masks, pa_deg, generator)
        if self.noise_sigma > 0:
            out = out + self.noise_sigma * _randn_like(out, generator)
        return out, masks, pa_deg

    def apply(
        self,
        images: torch.Tensor,
        params: dict,
        masks: torch.Tensor | None = None,
        pa_deg=None,
        generator: torch.Generator | None = None,
    ):
        """Apply given transform parameters (from :meth:`sample`) to images, masks and angles.

        No additive noise (``noise_sigma``) here; ``generator`` only draws the ``"noise"`` padding.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise DeepmorphValueError("augmentation expects a float tensor of images (B, C, H, W)")
        b, _, h, w = images.shape
        if masks is not None and (masks.ndim != 4 or masks.shape[0] != b or masks.shape[-2:] != (h, w)):
            raise DeepmorphValueError(
                f"augmentation: masks must be (B, K, H, W) matching the images {tuple(images.shape)}, "
                f"got {tuple(masks.shape)}"
            )
        dev = images.device
        p = {k: v.to(dev) for k, v in params.items()}
        if self.resamples:
            theta = _theta(p, h, w).to(images.dtype)
            grid = _grid(theta, h, w)
            padding = "zeros" if self.padding_mode == "noise" else self.padding_mode
            out = F.grid_sample(images, grid, mode=self.interpolation, padding_mode=padding, align_corners=False)
            if self.padding_mode == "noise":
                out = out + _noise_fill(images, grid, generator)
            if self.conserve_flux:
                out = out / (p["zoom"].to(out.dtype) ** 2)[:, None, None, None]
            if masks is not None:
                m = F.grid_sample(masks.to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False)
                masks = m.to(masks.dtype)
        else:  # flips only: exact
            out = _flip(images, p["hflip"], p["vflip"])
            masks = _flip(masks, p["hflip"], p["vflip"]) if masks is not None else None
        if pa_deg is not None:
            pa_deg = transform_pa(pa_deg, p["angle_deg"], p["hflip"], p["vflip"])
        return out, masks, pa_deg

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-friendly parameters; :meth:`from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Augmentation:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        return record_from_dict(cls, d, "augmentation parameter")


def _theta(p: dict, h: int, w: int) -> torch.Tensor:
    """``(B, 2, 3)`` affine_grid matrices: output -> input normalised coordinates (float64)."""
    t = torch.deg2rad(p["angle_deg"].double())
    c, s = torch.cos(t), torch.sin(t)
    fx = torch.where(p["hflip"], -1.0, 1.0).double()
    fy = torch.where(p["vflip"], -1.0, 1.0).double()
    # M = F R(-t): the inverse of the content map's rotation, then the (self-inverse) flip.
    m = torch.stack([torch.stack([fx * c, fx * s], -1), torch.stack([-fy * s, fy * c], -1)], -2)
    d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64, device=t.device)
    z = p["zoom"].double()[:, None, None]
    a = m * d[None, None, :] / d[None, :, None] / z  # D^-1 M D / z
    shift_pix = torch.stack([p["shift_x"].double() * w, p["shift_y"].double() * h], -1)
    bvec = -(m @ shift_pix[:, :, None])[..., 0] / d / z[:, 0]  # -D^-1 M s / z
    return torch.cat([a, bvec[:, :, None]], dim=-1)


def _grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``affine_grid(theta, (B, 1, h, w), align_corners=False)``, computed by broadcasting (faster on CPUs)."""
    dev, dt = theta.device, theta.dtype
    xs = (2 * torch.arange(w, device=dev, dtype=dt) + 1) / w - 1
    ys = (2 * torch.arange(h, device=dev, dtype=dt) + 1) / h - 1
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1): t[:, i, j] is (B, 1, 1)
    gx = t[:, 0, 0] * xs[None, None, :] + (t[:, 0, 1] * ys[None, :, None] + t[:, 0, 2])  # (B, h, w)
    gy = t[:, 1, 0] * xs[None, None, :] + (t[:, 1, 1] * ys[None, :, None] + t[:, 1, 2])
    return torch.stack([gx, gy], dim=-1)


def _noise_fill(images: torch.Tensor, grid: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sky-like noise where the output samples outside the input, weighted by how much it does.

    The sky level is the median of the stamp's outer ring of pixels, its sigma the RMS of the ring
    pixels below that median about it (the half of the distribution a galaxy's light does not reach).
    """
    b, c, h, w = images.shape
    k = max(1, min(h, w) // 32)
    ring = torch.cat([images[..., :k, :].flatten(2), images[..., -k:, :].flatten(2),
                      images[..., k:-k, :k].flatten(2), images[..., k:-k, -k:].flatten(2)], dim=-1)
    med = ring.median(dim=-1).values
    below = (ring - med[..., None]).clamp(max=0.0)
    n_below = (below < 0).sum(dim=-1).clamp(min=1)
    sigma = torch.sqrt((below**2).sum(dim=-1) / n_below)
    ones = torch.ones((b, 1, h, w), dtype=images.dtype, device=images.device)
    inside = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noise = torch.randn_like(images) if generator is None else _randn_like(images, generator)
    noise = torch.addcmul(med[..., None, None], sigma[..., None, None], noise)
    return noise.mul_(1.0 - inside)


def _flip(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (x.ndim - 1)
    x = torch.where(hflip.view(shape), x.flip(-1), x)
    return torch.where(vflip.view(shape), x.flip(-2), x)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` on its device, reproducible from ``generator``."""
    if generator is not None and generator.device != x.device:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def transform_pa(pa_deg, angle_deg, hflip, vflip):
    """Position angles after a flip then a rotation, modulo 180 degrees.

    Parameters
    ----------
    pa_deg : tensor or array
        ``(B,)`` or ``(B, M)`` angles, degrees CCW from +x.
    angle_deg : tensor
        ``(B,)`` rotation angles, degrees CCW.
    hflip, vflip : tensor
        ``(B,)`` bool: mirrored ``x -> -x`` / ``y -> -y`` (each maps PA to 180 - PA).

    Returns
    -------
    tensor or numpy.ndarray
        As ``pa_deg`` (numpy in, numpy out), in ``[0, 180)`` degrees.
    """
    as_numpy = not isinstance(pa_deg, torch.Tensor)
    pa = torch.as_tensor(np.asarray(pa_deg) if as_numpy else pa_deg)
    dev = pa.device
    dtype = pa.dtype if pa.is_floating_point() else torch.float64
    pa = pa.to(dtype)
    shape = (-1,) + (1,) * (pa.ndim - 1)
    mirrored = (hflip.to(dev) ^ vflip.to(dev)).view(shape)
    pa = torch.where(mirrored, 180.0 - pa, pa) + angle_deg.to(device=dev, dtype=dtype).view(shape)
    pa = torch.remainder(pa, 180.0)
    return pa.cpu().numpy() if as_numpy else pa


#: The lecture's Keras ``ImageDataGenerator(rotation_range=45, width_shift_range=0.05,
#: height_shift_range=0.05, horizontal_flip=True, vertical_flip=True, zoom_range=[0.75, 1.3])``.
KERAS_PRESET = Augmentation(rotation_deg=45.0, shift_frac=0.05, hflip=True, vflip=True, zoom=(0.75, 1.3))

#: Named augmentations (``--augment NAME`` on the command line).
PRESETS = {
    "none": Augmentation(),
    "keras": KERAS_PRESET,
    "flips": Augmentation(hflip=True, vflip=True),
    "rotate": Augmentation(rotation_deg=(-180.0, 180.0), hflip=True),
}


def get_augmentation(spec) -> Augmentation:
    """An :class:`Augmentation` from a preset name, a dict (:meth:`Augmentation.to_dict`), None or itself."""
    if spec is None:
        return PRESETS["none"]
    if isinstance(spec, Augmentation):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise DeepmorphValueError(f"unknown augmentation {spec!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[spec]
    if isinstance(spec, dict):
        return Augmentation.from_dict(spec)
    raise DeepmorphValueError(f"augmentation must be a preset name, a dict or an Augmentation, got {spec!r}")


__all__ = ["Augmentation", "KERAS_PRESET", "PRESETS", "get_augmentation", "transform_pa"]
