"""Prior distributions of galaxy parameters and the morphology-label rule.

The defaults are the lecture's recipe for HST training sets: uniform
``18 < mag < 24``, ``0 < B/T < 1``, bulge ``1 <= n <= 6``, disk ``n = 1``,
``0.2 < log10(bulge hlr / pix) < 1.3``, ``0.2 < log10(disk hlr / pix) < 1.5``, ellipticities
``1 - q`` in ``[0.05, 0.95]``, ``0 <= PA < 180`` deg, on 64 x 64 stamps. Bulge and disk share
the centre and the position angle.

Every parameter of item ``i`` is drawn from its own counter-based stream (see
:mod:`deepmorph.simulate.rng`), so item ``i`` is the same whatever else is simulated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from deepmorph._records import record_from_dict
from deepmorph.errors import DeepmorphValueError
from deepmorph.simulate import rng
from deepmorph.simulate.profiles import SERSIC_N_MAX, SERSIC_N_MIN

#: Morphology classes, in label order.
LABEL_NAMES = ("spheroid", "disk", "edge-on", "clumpy")

# Stream numbers: one per drawn quantity (the noise uses 300 and up, see noise.py).
_S = {
    "mag": 1, "bt": 2, "n": 3, "rb": 4, "rd": 5, "eb": 6, "ed": 7, "pa": 8, "dx": 9, "dy": 10,
    "clumpy": 20, "nclumps": 21, "cflux": 22, "cr1": 23, "cr2": 24, "cphi": 25,
    "class": 30, "nbr": 40, "nnbr": 41, "nmag": 42, "nn": 43, "nr": 44, "ne": 45, "npa": 46, "nd": 47, "nphi": 48,
}


@dataclasses.dataclass(frozen=True)
class Priors:
    """Ranges of the uniform priors (all configurable).

    Parameters
    ----------
    mag : tuple of float
        Total (bulge + disk) AB magnitude range.
    bulge_to_total : tuple of float
        Bulge-to-total flux ratio range.
    bulge_n : tuple of float
        Bulge Sersic index range (within [0.3, 6.2]).
    log10_bulge_hlr_pix, log10_disk_hlr_pix : tuple of float
        log10 of the major-axis half-light radii, pixels.
    bulge_ellipticity, disk_ellipticity : tuple of float
        ``1 - q`` ranges.
    pa_deg : tuple of float
        Position angle range, degrees CCW from +x.
    max_offset_pix : float
        Centre offsets are uniform in ``[-max, max]`` pixels on each axis.
    clumpy_fraction : float
        With clumps on, the fraction of galaxies that get clumps.
    n_clumps : tuple of int
        Inclusive range of the number of clumps in a clumpy galaxy.
    clump_flux_fraction : tuple of float
        Flux of each clump relative to the galaxy (bulge + disk), log-uniform.
    clump_max_radius_disk_hlr : float
        Clumps lie within this many disk half-light radii, following the disk light.
    neighbor_fraction : float
        With neighbours on, the fraction of stamps that get companions.
    max_neighbors : int
        Companions per stamp: 1 to ``max_neighbors``.
    neighbor_dmag : tuple of float
        Companion magnitude minus the galaxy's (negative: brighter neighbour).
    neighbor_distance_stamp : tuple of float
        Companion distance from the centre, as a fraction of the stamp size.
    neighbor_n, log10_neighbor_hlr_pix : tuple of float
        Companion Sersic index and log10 half-light radius (pixels) ranges.
    balanced_classes : bool
        Draw the morphology class first, uniformly, then the structural parameters from that
        class's ranges (:data:`CLASS_PRIORS`), which keep clear of the label rule's thresholds:
        a class-balanced training set whose labels are unambiguous. The ranges replace the
        matching fields above; the clumpy class needs clumps switched on.
    """

    mag: tuple[float, float] = (18.0, 24.0)
    bulge_to_total: tuple[float, float] = (0.0, 1.0)
    bulge_n: tuple[float, float] = (1.0, 6.0)
    log10_bulge_hlr_pix: tuple[float, float] = (0.2, 1.3)
    log10_disk_hlr_pix: tuple[float, float] = (0.2, 1.5)
    bulge_ellipticity: tuple[float, float] = (0.05, 0.95)
    disk_ellipticity: tuple[float, float] = (0.05, 0.95)
    pa_deg: tuple[float, float] = (0.0, 180.0)
    max_offset_pix: float = 0.5
    clumpy_fraction: float = 0.5
    n_clumps: tuple[int, int] = (1, 6)
    clump_flux_fraction: tuple[float, float] = (0.02, 0.15)
    clump_max_radius_disk_hlr: float = 1.5
    neighbor_fraction: float = 0.5
    max_neighbors: int = 2
    neighbor_dmag: tuple[float, float] = (-1.0, 3.0)
    neighbor_distance_stamp: tuple[float, float] = (0.22, 0.42)
    neighbor_n: tuple[float, float] = (0.5, 4.0)
    log10_neighbor_hlr_pix: tuple[float, float] = (0.2, 1.0)
    balanced_classes: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                if len(v) != 2 or not all(math.isfinite(x) for x in v) or v[0] > v[1]:
                    raise DeepmorphValueError(f"prior {f.name} must be a (low, high) range, got {v}")
        lo, hi = self.bulge_n
        if lo < SERSIC_N_MIN or hi > SERSIC_N_MAX:
            raise DeepmorphValueError(
                f"prior bulge_n must lie within [{SERSIC_N_MIN}, {SERSIC_N_MAX}], got {self.bulge_n}"
            )
        lo, hi = self.neighbor_n
        if lo < SERSIC_N_MIN or hi > SERSIC_N_MAX:
            raise DeepmorphValueError(f"prior neighbor_n must lie within [0.3, 6.2], got {self.neighbor_n}")
        for name in ("bulge_ellipticity", "disk_ellipticity"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi >= 1:
                raise DeepmorphValueError(f"prior {name} must lie within [0, 1), got {(lo, hi)}")
        if not (0 <= self.bulge_to_total[0] and self.bulge_to_total[1] <= 1):
            raise DeepmorphValueError(f"prior bulge_to_total must lie within [0, 1], got {self.bulge_to_total}")
        if self.n_clumps[0] < 1:
            raise DeepmorphValueError(f"prior n_clumps must start at >= 1, got {self.n_clumps}")
        for name in ("clumpy_fraction", "neighbor_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise DeepmorphValueError(f"prior {name} must lie within [0, 1], got {getattr(self, name)}")
        if not (0 < self.clump_flux_fraction[0] and self.clump_flux_fraction[1] < 1):
            raise DeepmorphValueError(f"prior clump_flux_fraction must lie within (0, 1), got "
                                      f"{self.clump_flux_fraction}")
        for name in ("max_offset_pix", "clump_max_radius_disk_hlr", "max_neighbors"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise DeepmorphValueError(f"prior {name} must be >= 0, got {v}")
        if self.neighbor_distance_stamp[0] < 0:
            raise DeepmorphValueError(f"prior neighbor_distance_stamp must be >= 0, got {self.neighbor_distance_stamp}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Priors:
        return record_from_dict(cls, d, "prior")


#: Per-class ranges used with ``balanced_classes`` (they respect :func:`morphology_label`'s
#: thresholds with a margin: B/T 0.6, disk q 0.35, clump flux fraction 0.1).
CLASS_PRIORS = {
    "spheroid": {"bulge_to_total": (0.8, 1.0), "bulge_n": (3.0, 6.0)},
    "disk": {"bulge_to_total": (0.0, 0.3), "disk_ellipticity": (0.05, 0.55)},
    "edge-on": {"bulge_to_total": (0.0, 0.2), "disk_ellipticity": (0.75, 0.92)},
    "clumpy": {"bulge_to_total": (0.0, 0.3), "disk_ellipticity": (0.05, 0.6), "n_clumps": (3, 6),
               "clump_flux_fraction": (0.05, 0.15)},
}


def _u(seed, idx, name, lo, hi, slots=0):
    return rng.uniform(seed, idx, _S[name], slots, lo, hi)


def draw_galaxies(
    seed: int,
    index: torch.Tensor,
    priors: Priors,
    zeropoint_mag: float,
    stamp_size: int,
    clumps: bool = False,
    neighbors: bool = False,
) -> dict[str, torch.Tensor]:
    """Draw the parameters of items ``index`` (float64 tensors, pixels and counts).

    Returns
    -------
    dict
        Per galaxy ``(B,)``: ``mag, flux, bulge_to_total, bulge_n, bulge_hlr_pix, bulge_q,
        disk_hlr_pix, disk_q, pa_deg, x_offset_pix, y_offset_pix``; clumps ``(B, M)``:
        ``clump_flux, clump_x_pix, clump_y_pix`` (flux 0 = no clump); neighbours ``(B, K)``:
        ``nbr_flux, nbr_mag, nbr_n, nbr_hlr_pix, nbr_q, nbr_pa_deg, nbr_x_pix, nbr_y_pix``.
    """
    p = priors
    i = index
    out: dict[str, torch.Tensor] = {}
    klass = None
    if p.balanced_classes:
        n_classes = len(LABEL_NAMES) if clumps else len(LABEL_NAMES) - 1
        klass = torch.floor(_u(seed, i, "class", 0, n_classes)).long().clamp(max=n_classes - 1)
        out["class"] = klass

    def rng_range(name: str, stream: str, slots=0) -> torch.Tensor:
        """Uniform draw on the prior's range, or on each item's class range when balanced."""
        lo, hi = getattr(p, name)
        if klass is None:
            return _u(seed, i, stream, lo, hi, slots)
        los = torch.tensor([CLASS_PRIORS[c].get(name, (lo, hi))[0] for c in LABEL_NAMES], dtype=torch.float64,
                           device=i.device)[klass]
        his = torch.tensor([CLASS_PRIORS[c].get(name, (lo, hi))[1] for c in LABEL_NAMES], dtype=torch.float64,
                           device=i.device)[klass]
        u = _u(seed, i, stream, 0.0, 1.0, slots)
        if u.dim() == 2:
            los, his = los[:, None], his[:, None]
        return los + (his - los) * u

    out["mag"] = _u(seed, i, "mag", *p.mag)
    out["flux"] = 10.0 ** (-0.4 * (out["mag"] - zeropoint_mag))
    out["bulge_to_total"] = rng_range("bulge_to_total", "bt")
    out["bulge_n"] = rng_range("bulge_n", "n")
    out["bulge_hlr_pix"] = 10.0 ** _u(seed, i, "rb", *p.log10_bulge_hlr_pix)
    out["disk_hlr_pix"] = 10.0 ** _u(seed, i, "rd", *p.log10_disk_hlr_pix)
    out["bulge_q"] = 1.0 - _u(seed, i, "eb", *p.bulge_ellipticity)
    out["disk_q"] = 1.0 - rng_range("disk_ellipticity", "ed")
    out["pa_deg"] = _u(seed, i, "pa", *p.pa_deg)
    m = p.max_offset_pix
    out["x_offset_pix"] = _u(seed, i, "dx", -m, m)
    out["y_offset_pix"] = _u(seed, i, "dy", -m, m)

    if clumps:
        mmax = max(p.n_clumps[1], CLASS_PRIORS["clumpy"]["n_clumps"][1] if klass is not None else 0)
        slots = torch.arange(mmax, device=i.device)
        if klass is None:
            clumpy = _u(seed, i, "clumpy", 0, 1) < p.clumpy_fraction
            count = torch.floor(_u(seed, i, "nclumps", p.n_clumps[0], p.n_clumps[1] + 1)).clamp(max=mmax)
            lo, hi = (math.log10(v) for v in p.clump_flux_fraction)
        else:
            clumpy = klass == LABEL_NAMES.index("clumpy")
            c_lo, c_hi = CLASS_PRIORS["clumpy"]["n_clumps"]
            count = torch.floor(_u(seed, i, "nclumps", c_lo, c_hi + 1)).clamp(max=c_hi)
            lo, hi = (math.log10(v) for v in CLASS_PRIORS["clumpy"]["clump_flux_fraction"])
        count = torch.where(clumpy, count, torch.zeros_like(count))
        present = slots[None, :] < count[:, None]
        frac = 10.0 ** _u(seed, i, "cflux", lo, hi, slots)
        flux = torch.where(present, frac * out["flux"][:, None], torch.zeros_like(frac))
        # Radius from the exponential disk's light (Gamma(2) in scale lengths), truncated.
        rs = out["disk_hlr_pix"][:, None] / 1.6783469900166608
        r = -rs * torch.log(_u(seed, i, "cr1", 0, 1, slots) * _u(seed, i, "cr2", 0, 1, slots))
        r = torch.minimum(r, p.clump_max_radius_disk_hlr * out["disk_hlr_pix"][:, None])
        phi = _u(seed, i, "cphi", 0, 2 * math.pi, slots)
        # Disk frame (major axis along u) -> pixel frame, with the disk's axis ratio.
        u, v = r * torch.cos(phi), r * torch.sin(phi) * out["disk_q"][:, None]
        th = torch.deg2rad(out["pa_deg"])[:, None]
        cx = u * torch.cos(th) - v * torch.sin(th) + out["x_offset_pix"][:, None]
        cy = u * torch.sin(th) + v * torch.cos(th) + out["y_offset_pix"][:, None]
        half = 0.5 * stamp_size - 1.0
        out["clump_flux"] = flux
        out["clump_x_pix"] = cx.clamp(-half, half)
        out["clump_y_pix"] = cy.clamp(-half, half)

    if neighbors:
        kmax = p.max_neighbors
        slots = torch.arange(kmax, device=i.device)
        has = _u(seed, i, "nbr", 0, 1) < p.neighbor_fraction
        count = torch.floor(_u(seed, i, "nnbr", 1, kmax + 1)).clamp(max=kmax)
        count = torch.where(has, count, torch.zeros_like(count))
        present = slots[None, :] < count[:, None]
        nmag = out["mag"][:, None] + _u(seed, i, "nmag", *p.neighbor_dmag, slots)
        nflux = 10.0 ** (-0.4 * (nmag - zeropoint_mag))
        out["nbr_mag"] = torch.where(present, nmag, torch.full_like(nmag, math.nan))
        out["nbr_flux"] = torch.where(present, nflux, torch.zeros_like(nflux))
        out["nbr_n"] = _u(seed, i, "nn", *p.neighbor_n, slots)
        out["nbr_hlr_pix"] = 10.0 ** _u(seed, i, "nr", *p.log10_neighbor_hlr_pix, slots)
        out["nbr_q"] = 1.0 - _u(seed, i, "ne", 0.05, 0.8, slots)
        out["nbr_pa_deg"] = _u(seed, i, "npa", 0.0, 180.0, slots)
        d = stamp_size * _u(seed, i, "nd", *p.neighbor_distance_stamp, slots)
        phi = _u(seed, i, "nphi", 0, 2 * math.pi, slots)
        out["nbr_x_pix"] = d * torch.cos(phi)
        out["nbr_y_pix"] = d * torch.sin(phi)
    return out


def morphology_label(
    bulge_to_total: np.ndarray, disk_q: np.ndarray, clump_flux_fraction: np.ndarray | None = None
) -> np.ndarray:
    """Morphology class from the truth (indices into :data:`LABEL_NAMES`).

    The rule, in order:

    1. ``clumpy`` -- clumps carry at least 10% of the galaxy's flux (only with clumps on);
    2. ``spheroid`` -- ``B/T >= 0.6``;
    3. ``edge-on`` -- a disk-dominated galaxy (``B/T < 0.6``) with disk axis ratio ``q < 0.35``
       (inclination above ~70 deg for a thick disk);
    4. ``disk`` -- every other disk-dominated galaxy.
    """
    bt = np.asarray(bulge_to_total)
    q = np.asarray(disk_q)
    label = np.where(bt >= 0.6, 0, np.where(q < 0.35, 2, 1))
    if clump_flux_fraction is not None:
        label = np.where(np.asarray(clump_flux_fraction) >= 0.1, 3, label)
    return label.astype(np.int64)
