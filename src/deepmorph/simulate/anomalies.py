"""The anomaly-detection benchmark: normal galaxies, and the same galaxies with an anomaly injected.

Normal stamps are isolated bulge + disk galaxies from :class:`~deepmorph.simulate.Simulator` (no
clumps, no neighbours). An anomalous stamp is the normal stamp of the same item with one anomaly
added, of one of these kinds (:data:`KINDS`):

- ``companion``: a close, bright companion galaxy (a merger in projection): a Sersic profile
  0.15-0.35 stamp widths from the galaxy, -0.5 to 1.5 mag fainter than it, PSF-convolved;
- ``stream``: a tidal stream / asymmetric feature: an arc of light around the galaxy, 60-200 deg
  long, fading along its length, 10-40% of the galaxy's flux, PSF-convolved;
- ``clumps``: 2-5 strong unresolved clumps, each 8-25% of the galaxy's flux, within one disk
  half-light radius, PSF-convolved;
- ``cosmic_ray``: 1-3 sharp tracks 1-5 pixels long, 10-100 sky sigmas per pixel, not convolved;
- ``satellite_trail``: a straight line across the stamp, Gaussian profile of 0.5-1.2 pixel sigma,
  3-15 sky sigmas at its peak, not convolved;
- ``bad_column``: a hot column (or part of one, 50-100% of the stamp), 5-30 sky sigmas, not convolved.

Light from the sky (companions, streams, clumps) gets its own Poisson noise; detector artefacts
are added as they are. Each stamp comes with a per-pixel truth mask, ``anomaly_mask``: 1 where the
anomaly's noise-free light exceeds ``mask_nsigma`` sky sigmas (0 everywhere for normal stamps).
Every random number is counter-based (:mod:`deepmorph.simulate.rng`, streams 500 and up), so item
``i`` is a function of ``(seed, i, kind)`` only, whatever the batch.

:class:`AnomalySimulator` lays a benchmark out as ``n_normal`` normal items followed by
``n_per_kind`` items of each kind in turn; :func:`write_benchmark` stores one as a deepmorph dataset
file (readable by :class:`~deepmorph.data.StampDataset`) with an extra ``/anomaly_mask`` array
and the catalogue columns ``anomaly`` (0/1), ``anomaly_kind`` (index into :data:`KINDS`),
``anomaly_flux_fraction`` and ``mask_pixels``; :func:`read_benchmark` reads it back.

>>> sim = AnomalySimulator(stamp_size=32, n_normal=10, n_per_kind=10)
>>> batch = sim.simulate(range(70), seed=0)
>>> batch["anomaly_mask"].shape, sorted(set(batch["kind"]))[:2]
((70, 1, 32, 32), ['bad_column', 'clumps'])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from deepmorph._records import record_from_dict
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import rng
from deepmorph.simulate.priors import Priors
from deepmorph.simulate.render import PointSources, Sersic

#: Anomaly kinds, in label order (0 = normal).
KINDS = ("normal", "companion", "stream", "clumps", "cosmic_ray", "satellite_trail", "bad_column")
#: The issue's families of anomalies.
GROUPS = {"mergers": ("companion",), "asymmetries": ("stream",), "clumps": ("clumps",),
          "artefacts": ("cosmic_ray", "satellite_trail", "bad_column")}
#: Kinds that are light on the sky (PSF-convolved, with Poisson noise); the others are detector artefacts.
SKY_KINDS = ("companion", "stream", "clumps")

_S = {"c_dmag": 500, "c_dist": 501, "c_phi": 502, "c_hlr": 503, "c_n": 504, "c_q": 505, "c_pa": 506,
      "s_frac": 510, "s_rad": 511, "s_phi0": 512, "s_len": 513, "s_width": 514, "s_jit": 515, "s_dir": 516,
      "k_n": 520, "k_frac": 521, "k_r": 522, "k_phi": 523,
      "r_n": 530, "r_x": 531, "r_y": 532, "r_len": 533, "r_phi": 534, "r_amp": 535,
      "t_x": 540, "t_y": 541, "t_phi": 542, "t_sig": 543, "t_amp": 544,
      "b_x": 550, "b_amp": 551, "b_len": 552, "b_start": 553,
      "noise": 560}
_STREAM_POINTS = 32
_MAX_CLUMPS = 5
_MAX_RAYS = 3


@dataclasses.dataclass(frozen=True)
class AnomalyParams:
    """Ranges of the injected anomalies (uniform unless said otherwise).

    Parameters
    ----------
    companion_dmag : (float, float)
        Companion magnitude minus the galaxy's.
    companion_distance_stamp : (float, float)
        Companion distance from the galaxy, in stamp widths.
    companion_log10_hlr_pix, companion_n : (float, float)
        Companion log10 half-light radius (pixels) and Sersic index.
    stream_flux_fraction : (float, float)
        Stream flux / galaxy flux.
    stream_radius_stamp : (float, float)
        Radius of the stream's arc, in stamp widths.
    stream_arc_deg : (float, float)
        Length of the arc, degrees.
    stream_width_pix : (float, float)
        Half-width of the stream (uniform scatter of its light across the arc), pixels, before the PSF.
    clumps : (int, int)
        Number of strong clumps (inclusive).
    clump_flux_fraction : (float, float)
        Flux of each clump / galaxy flux.
    cosmic_rays : (int, int)
        Number of cosmic-ray tracks (inclusive).
    cosmic_ray_length_pix : (float, float)
        Track length, pixels.
    cosmic_ray_sigma : (float, float)
        Counts per pixel along a track, in sky sigmas.
    trail_width_pix : (float, float)
        Gaussian sigma of a satellite trail's profile, pixels.
    trail_sigma : (float, float)
        Peak of a trail, in sky sigmas.
    column_sigma : (float, float)
        Excess of a hot column, in sky sigmas.
    column_length : (float, float)
        Fraction of the column that is hot.
    mask_nsigma : float
        The truth mask is where the anomaly's noise-free light exceeds this many sky sigmas.
    """

    companion_dmag: tuple[float, float] = (-0.5, 1.5)
    companion_distance_stamp: tuple[float, float] = (0.15, 0.35)
    companion_log10_hlr_pix: tuple[float, float] = (0.1, 0.6)
    companion_n: tuple[float, float] = (0.5, 4.0)
    stream_flux_fraction: tuple[float, float] = (0.1, 0.4)
    stream_radius_stamp: tuple[float, float] = (0.15, 0.35)
    stream_arc_deg: tuple[float, float] = (60.0, 200.0)
    stream_width_pix: tuple[float, float] = (0.3, 1.5)
    clumps: tuple[int, int] = (2, 5)
    clump_flux_fraction: tuple[float, float] = (0.08, 0.25)
    cosmic_rays: tuple[int, int] = (1, 3)
    cosmic_ray_length_pix: tuple[float, float] = (1.0, 5.0)
    cosmic_ray_sigma: tuple[float, float] = (10.0, 100.0)
    trail_width_pix: tuple[float, float] = (0.5, 1.2)
    trail_sigma: tuple[float, float] = (3.0, 15.0)
    column_sigma: tuple[float, float] = (5.0, 30.0)
    column_length: tuple[float, float] = (0.5, 1.0)
    mask_nsigma: float = 2.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple) and (len(v) != 2 or not all(math.isfinite(x) for x in v) or v[0] > v[1]):
                raise DeepmorphValueError(f"anomaly parameter {f.name} must be a (low, high) range, got {v}")
        if not (1 <= self.clumps[0] and self.clumps[1] <= _MAX_CLUMPS):
            raise DeepmorphValueError(f"anomaly clumps must lie within [1, {_MAX_CLUMPS}], got {self.clumps}")
        if not (1 <= self.cosmic_rays[0] and self.cosmic_rays[1] <= _MAX_RAYS):
            raise DeepmorphValueError(f"anomaly cosmic_rays must lie within [1, {_MAX_RAYS}], got {self.cosmic_rays}")
        if not self.mask_nsigma > 0:
            raise DeepmorphValueError(f"mask_nsigma must be positive, got {self.mask_nsigma}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AnomalyParams:
        return record_from_dict(cls, d, "anomaly parameter")


def normal_priors(stamp_size: int) -> Priors:
    """Priors of the benchmark's normal galaxies: bright enough to see structure (mag 19-23), and
    sizes that fit the stamp (bulge up to S/8, disk up to S/4.5 pixels)."""
    s = float(stamp_size)
    return Priors(mag=(19.0, 23.0), log10_bulge_hlr_pix=(0.1, math.log10(s / 8.0)),
                  log10_disk_hlr_pix=(0.2, math.log10(s / 4.5)), bulge_ellipticity=(0.05, 0.7),
                  disk_ellipticity=(0.05, 0.8))


def kind_ids(kinds) -> np.ndarray:
    """Kind names (or ids) -> ids into :data:`KINDS`."""
    out = []
    for k in np.atleast_1d(np.asarray(kinds)):
        if isinstance(k, (int, np.integer)):
            if not 0 <= int(k) < len(KINDS):
                raise DeepmorphValueError(f"anomaly kind id {k} out of range 0..{len(KINDS) - 1}")
            out.append(int(k))
        elif str(k) in KINDS:
            out.append(KINDS.index(str(k)))
        else:
            raise DeepmorphValueError(f"unknown anomaly kind {k!r}; choose from {', '.join(KINDS)}")
    return np.asarray(out, dtype=np.int64)


class AnomalySimulator:
    """Normal galaxies and injected anomalies (see the module docstring).

    Parameters
    ----------
    survey : str
        Survey preset of the :class:`~deepmorph.simulate.Simulator`.
    stamp_size : int
        Stamp side, pixels.
    priors : Priors, optional
        The normal galaxies' priors (default :func:`normal_priors`); clumps and neighbours stay off.
    params : AnomalyParams, optional
        The anomalies' ranges.
    n_normal, n_per_kind : int
        The layout: items ``0 .. n_normal-1`` are normal, then ``n_per_kind`` items of each of ``kinds``.
    kinds : sequence of str
        The anomaly kinds of the layout (default all but ``normal``).
    device : str
        Where to simulate.
    **simulator_kwargs
        Passed on to :class:`~deepmorph.simulate.Simulator` (``psf``, ``noise``, ``pixel_scale_arcsec``).
    """

    def __init__(self, survey: str = "candels-f160w", stamp_size: int = 32, priors: Priors | None = None,
                 params: AnomalyParams | None = None, n_normal: int = 0, n_per_kind: int = 0, kinds=KINDS[1:],
                 device: str = "cpu", **simulator_kwargs):
        from deepmorph.simulate.simulator import Simulator

        self.sim = Simulator(survey, stamp_size, priors=priors or normal_priors(stamp_size), device=device,
                             **simulator_kwargs)
        if self.sim.noise is None or not getattr(self.sim.noise, "sky_sigma", 0) > 0:
            raise DeepmorphValueError("the anomaly benchmark needs sky noise (artefacts are set in sky sigmas)")
        self.params = params or AnomalyParams()
        self.kinds = tuple(KINDS[k] for k in kind_ids(list(kinds))) if len(kinds) else ()
        if "normal" in self.kinds:
            raise DeepmorphValueError("kinds lists the anomaly kinds; normal items come from n_normal")
        if n_per_kind and not self.kinds:
            raise DeepmorphValueError(f"{n_per_kind} anomalies per kind, but no kind (choose from "
                                      f"{', '.join(KINDS[1:])})")
        if int(n_normal) < 0 or int(n_per_kind) < 0:
            raise DeepmorphValueError(f"n_normal and n_per_kind must be >= 0, got {n_normal}, {n_per_kind}")
        self.n_normal, self.n_per_kind = int(n_normal), int(n_per_kind)
        self.stamp_size = self.sim.stamp_size
        self.components = False
        self.sky_sigma = float(self.sim.noise.sky_sigma)

    @property
    def n(self) -> int:
        """Items in the layout."""
        return self.n_normal + self.n_per_kind * len(self.kinds)

    def kind_of(self, indices) -> np.ndarray:
        """Kind ids of layout items (beyond the layout: normal)."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        out = np.zeros(len(idx), dtype=np.int64)
        if self.n_per_kind and self.kinds:
            k = (idx - self.n_normal) // self.n_per_kind
            inside = (idx >= self.n_normal) & (k < len(self.kinds))
            ids = kind_ids(list(self.kinds))
            out[inside] = ids[k[inside]]
        return out

    # -- dataset-writer interface (deepmorph.data.write_dataset) ---------------------------------------
    def attributes(self, seed: int) -> dict:
        attrs = self.sim.attributes(seed)
        attrs.update({
            "anomaly_kinds": json.dumps(list(KINDS)),
            "anomaly_params": json.dumps(self.params.to_dict()),
            "anomaly_layout": json.dumps({"n_normal": self.n_normal, "n_per_kind": self.n_per_kind,
                                          "kinds": list(self.kinds)}),
        })
        return attrs

    def psf_image(self):
        return self.sim.psf_image()

    # -- simulation ----------------------------------------------------------------------------------
    def simulate(self, indices, seed: int, kinds=None) -> dict:
        """Items ``indices`` with ``seed``: the layout's kinds, or ``kinds`` (names or ids, one per item).

        Returns
        -------
        dict
            ``images``, ``noiseless`` ``(B, 1, S, S)`` float32 counts (galaxy plus anomaly),
            ``galaxy`` (the normal stamp, noisy), ``anomaly_mask`` ``(B, 1, S, S)`` uint8, ``kind``
            (names) and ``catalog`` (the simulator's columns plus ``anomaly``, ``anomaly_kind``,
            ``anomaly_flux_fraction``, ``mask_pixels``).
        """
        idx_np = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        kid = self.kind_of(idx_np) if kinds is None else kind_ids(kinds)
        if len(kid) == 1 and len(idx_np) > 1:
            kid = np.repeat(kid, len(idx_np))
        if len(kid) != len(idx_np):
            raise DeepmorphValueError(f"one kind per item: got {len(kid)} kinds for {len(idx_np)} items")
        base = self.sim.simulate(idx_np, seed, as_numpy=False)
        cat = base["catalog"]
        s = self.stamp_size
        dev = self.sim.device
        sky = torch.zeros(len(idx_np), s, s, dtype=torch.float32, device=dev)  # light on the sky
        art = torch.zeros_like(sky)  # detector artefacts
        idx = torch.as_tensor(idx_np, device=dev)
        g = {k: torch.as_tensor(np.asarray(cat[k], dtype=np.float64), device=dev)
             for k in ("flux", "mag", "bulge_to_total", "bulge_hlr_arcsec", "disk_hlr_arcsec", "disk_q", "pa_deg",
                       "x_offset_pix", "y_offset_pix")}
        scale = self.sim.pixel_scale
        g["hlr_pix"] = (g["bulge_to_total"] * g["bulge_hlr_arcsec"] + (1 - g["bulge_to_total"]) * g["disk_hlr_arcsec"]
                        ) / scale
        g["disk_hlr_pix"] = g["disk_hlr_arcsec"] / scale
        for k in np.unique(kid):
            name = KINDS[int(k)]
            if name == "normal":
                continue
            sel = torch.as_tensor(np.flatnonzero(kid == k), device=dev)
            sub = {key: v[sel] for key, v in g.items()}
            maker = getattr(self, f"_{name}")
            light = maker(int(seed), idx[sel], sub)
            (sky if name in SKY_KINDS else art)[sel] = light.float()
        galaxy = base["images"][:, 0]
        noise_sd = torch.sqrt(sky.clamp_min(0) / self.sim.survey.gain_e_per_count) \
            if self.sim.survey.gain_e_per_count else torch.zeros_like(sky)
        z = rng.normal(int(seed), idx, _S["noise"], s * s).reshape(-1, s, s).to(sky)
        anomaly = sky + art
        images = galaxy + anomaly + noise_sd * z * (sky > 0)
        mask = (anomaly > self.params.mask_nsigma * self.sky_sigma).to(torch.uint8)
        flux = g["flux"].float()
        catalog = dict(cat)
        catalog["anomaly"] = (kid > 0).astype(np.int64)
        catalog["anomaly_kind"] = kid.astype(np.int64)
        catalog["anomaly_flux_fraction"] = (anomaly.sum(dim=(1, 2)) / flux).cpu().numpy().astype(np.float64)
        catalog["mask_pixels"] = mask.sum(dim=(1, 2)).cpu().numpy().astype(np.int64)
        return {
            "images": images[:, None].cpu().numpy().astype(np.float32),
            "noiseless": (base["noiseless"][:, 0] + anomaly)[:, None].cpu().numpy().astype(np.float32),
            "galaxy": galaxy[:, None].cpu().numpy().astype(np.float32),
            "anomaly_mask": mask[:, None].cpu().numpy(),
            "kind": np.array([KINDS[k] for k in kid]),
            "catalog": catalog,
        }

    def _u(self, seed, idx, name, lo, hi, slots=0):
        return rng.uniform(seed, idx, _S[name], slots, lo, hi)

    def _clamp_pos(self, x: torch.Tensor) -> torch.Tensor:
        half = 0.5 * self.stamp_size - 1.5
        return x.clamp(-half, half)

    def _render(self, comp) -> torch.Tensor:
        return self.sim.renderer.render({"a": comp}, {"a": ("a",)})["a"]

    def _companion(self, seed, idx, g) -> torch.Tensor:
        p = self.params
        mag = g["mag"] + self._u(seed, idx, "c_dmag", *p.companion_dmag)
        flux = 10.0 ** (-0.4 * (mag - self.sim.zeropoint))
        d = self.stamp_size * self._u(seed, idx, "c_dist", *p.companion_distance_stamp)
        phi = self._u(seed, idx, "c_phi", 0.0, 2 * math.pi)
        x = self._clamp_pos(g["x_offset_pix"] + d * torch.cos(phi))
        y = self._clamp_pos(g["y_offset_pix"] + d * torch.sin(phi))
        hlr = 10.0 ** self._u(seed, idx, "c_hlr", *p.companion_log10_hlr_pix)
        q = 1.0 - self._u(seed, idx, "c_q", 0.05, 0.7)
        pa = self._u(seed, idx, "c_pa", 0.0, 180.0)
        n = self._u(seed, idx, "c_n", *p.companion_n)
        return self._render(Sersic(flux, hlr, q, pa, x, y, n))

    def _stream(self, seed, idx, g) -> torch.Tensor:
        p = self.params
        m = torch.arange(_STREAM_POINTS, device=idx.device)
        t = (m.double() + 0.5) / _STREAM_POINTS  # (M,) position along the arc
        frac = self._u(seed, idx, "s_frac", *p.stream_flux_fraction)
        radius = self.stamp_size * self._u(seed, idx, "s_rad", *p.stream_radius_stamp)
        phi0 = self._u(seed, idx, "s_phi0", 0.0, 2 * math.pi)
        arc = torch.deg2rad(self._u(seed, idx, "s_len", *p.stream_arc_deg))
        sign = torch.where(self._u(seed, idx, "s_dir", 0, 1) < 0.5, -1.0, 1.0).double()
        width = self._u(seed, idx, "s_width", *p.stream_width_pix)
        jitter = self._u(seed, idx, "s_jit", -1.0, 1.0, m) * width[:, None]
        # A tail: the radius grows along the arc (a spiral segment) and the light fades.
        r = radius[:, None] * (1.0 + 0.35 * t[None, :]) + jitter
        ang = phi0[:, None] + sign[:, None] * arc[:, None] * t[None, :]
        weight = (1.0 - 0.7 * t)[None, :].expand(len(idx), -1)
        weight = weight / weight.sum(dim=1, keepdim=True)
        flux = frac[:, None] * g["flux"][:, None] * weight
        x = self._clamp_pos(g["x_offset_pix"][:, None] + r * torch.cos(ang))
        y = self._clamp_pos(g["y_offset_pix"][:, None] + r * torch.sin(ang))
        return self._render(PointSources(flux, x, y))

    def _clumps(self, seed, idx, g) -> torch.Tensor:
        p = self.params
        slots = torch.arange(_MAX_CLUMPS, device=idx.device)
        count = torch.floor(self._u(seed, idx, "k_n", p.clumps[0], p.clumps[1] + 1)).clamp(max=p.clumps[1])
        present = slots[None, :] < count[:, None]
        frac = self._u(seed, idx, "k_frac", *p.clump_flux_fraction, slots)
        flux = torch.where(present, frac * g["flux"][:, None], torch.zeros_like(frac))
        r = torch.sqrt(self._u(seed, idx, "k_r", 0.0, 1.0, slots)) * g["disk_hlr_pix"][:, None].clamp(min=1.5)
        phi = self._u(seed, idx, "k_phi", 0.0, 2 * math.pi, slots)
        x = self._clamp_pos(g["x_offset_pix"][:, None] + r * torch.cos(phi))
        y = self._clamp_pos(g["y_offset_pix"][:, None] + r * torch.sin(phi))
        return self._render(PointSources(flux, x, y))

    def _grid(self, dev):
        c = 0.5 * (self.stamp_size - 1)
        coords = torch.arange(self.stamp_size, device=dev, dtype=torch.float64) - c
        return coords[None, None, :], coords[None, :, None]  # x (1, 1, S), y (1, S, 1)

    def _cosmic_ray(self, seed, idx, g) -> torch.Tensor:
        p = self.params
        s = self.stamp_size
        out = torch.zeros(len(idx), s, s, dtype=torch.float64, device=idx.device)
        slots = torch.arange(_MAX_RAYS, device=idx.device)
        count = torch.floor(self._u(seed, idx, "r_n", p.cosmic_rays[0], p.cosmic_rays[1] + 1)).clamp(
            max=p.cosmic_rays[1])
        half = 0.4 * s
        x0 = self._u(seed, idx, "r_x", -half, half, slots)
        y0 = self._u(seed, idx, "r_y", -half, half, slots)
        length = self._u(seed, idx, "r_len", *p.cosmic_ray_length_pix, slots)
        phi = self._u(seed, idx, "r_phi", 0.0, math.pi, slots)
        amp = self._u(seed, idx, "r_amp", *p.cosmic_ray_sigma, slots) * self.sky_sigma
        c = 0.5 * (s - 1)
        rows = torch.arange(len(idx), device=idx.device)
        for j in range(_MAX_RAYS):
            on = slots[j] < count
            steps = int(math.ceil(p.cosmic_ray_length_pix[1])) * 2 + 1
            for k in range(steps):  # walk the track in half-pixel steps, lighting the pixels it crosses
                f = k / max(steps - 1, 1)
                px = torch.round(x0[:, j] + f * length[:, j] * torch.cos(phi[:, j]) + c).long().clamp(0, s - 1)
                py = torch.round(y0[:, j] + f * length[:, j] * torch.sin(phi[:, j]) + c).long().clamp(0, s - 1)
                value = torch.where(on, amp[:, j], torch.zeros_like(amp[:, j]))
                out[rows, py, px] = torch.maximum(out[rows, py, px], value)
        return out

    def _satellite_trail(self, seed, idx, g) -> torch.Tensor:
        p = self.params
        gx, gy = self._grid(idx.device)
        r0 = 0.3 * self.stamp_size
        x0 = self._u(seed, idx, "t_x", -r0, r0)[:, None, None]
        y0 = self._u(seed, idx, "t_y", -r0, r0)[:, None, None]
        phi = self._u(seed, idx, "t_phi", 0.0, math.pi)[:, None, None]
        sigma = self._u(seed, idx, "t_sig", *p.trail_width_pix)[:, None, None]
        amp = self._u(seed, idx, "t_amp", *p.trail_sigma)[:, None, None] * self.sky_sigma
        dist = (gx - x0) * torch.sin(phi) - (gy - y0) * torch.cos(phi)  # distance to the line
        return amp * torch.exp(-0.5 * (dist / sigma) ** 2)

    def _bad_column(self, seed, idx, g) -> torch.Tensor:
        p = self.params
        s = self.stamp_size
        col = torch.floor(self._u(seed, idx, "b_x", 1, s - 1)).long()
        amp = self._u(seed, idx, "b_amp", *p.column_sigma) * self.sky_sigma
        length = torch.ceil(self._u(seed, idx, "b_len", *p.column_length) * s).long()
        start = torch.floor(self._u(seed, idx, "b_start", 0, 1) * (s - length + 1).double()).long()
        rows = torch.arange(s, device=idx.device)[None, :]
        on_rows = (rows >= start[:, None]) & (rows < (start + length)[:, None])  # (B, S)
        cols = torch.arange(s, device=idx.device)[None, :] == col[:, None]  # (B, S)
        return amp[:, None, None] * (on_rows[:, :, None] & cols[:, None, :]).double()


# -- files -----------------------------------------------------------------------------------------------

def write_benchmark(path: str | Path, n_normal: int, n_per_kind: int, seed: int = 0, kinds=KINDS[1:],
                    survey: str = "candels-f160w", stamp_size: int = 32, priors: Priors | None = None,
                    params: AnomalyParams | None = None, batch_size: int = 512, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Simulate a benchmark (``n_normal`` normal items, then ``n_per_kind`` of each kind) into one file.

    The file is a deepmorph dataset (``images``, ``noiseless``, the catalogue) plus ``/anomaly_mask``;
    it appears at ``path`` only when complete. ``n_per_kind = 0`` writes normal galaxies only (a
    GAN's training set with the benchmark's priors).
    """
    import h5py

    from deepmorph.data import check_output, write_dataset

    path = check_output(path, overwrite)
    sim = AnomalySimulator(survey, stamp_size, priors, params, n_normal, n_per_kind, kinds)
    n = sim.n
    if n < 1:
        raise DeepmorphValueError("the benchmark is empty: give n_normal or n_per_kind > 0")
    building = path.with_name(path.name + ".building")
    write_dataset(building, sim, n, seed, batch_size=batch_size, overwrite=True, progress=progress)
    try:
        with h5py.File(building, "r+") as f:
            s = sim.stamp_size
            ds = f.create_dataset("anomaly_mask", shape=(n, 1, s, s), dtype=np.uint8,
                                  chunks=(min(n, 256), 1, s, s))
            ds.attrs["unit"] = ""
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                ds[start:stop] = sim.simulate(np.arange(start, stop), seed)["anomaly_mask"]
        os.replace(building, path)
    finally:
        building.unlink(missing_ok=True)
    return path


def read_benchmark(path: str | Path, items=None) -> dict:
    """A benchmark file's ``images`` (counts), ``anomaly_mask``, ``kind`` names and ``catalog`` (items, default all).

    A plain dataset file without anomaly columns reads as all normal with empty masks.
    """
    from deepmorph.data import open_dataset

    path = Path(path)
    with open_dataset(path) as ds:
        n = len(ds)
        idx = np.arange(n) if items is None else np.asarray(items, dtype=np.int64)
        images = ds.images[...][idx] if items is not None else ds.images[...]
        catalog = ds.catalog[idx]
        f = ds._open_file()
        masks = f["anomaly_mask"][...][idx] if "anomaly_mask" in f else np.zeros(images.shape, dtype=np.uint8)
        names = json.loads(ds.attrs["anomaly_kinds"]) if "anomaly_kinds" in ds.attrs else list(KINDS)
    if images.ndim != 4:
        raise DeepmorphIOError(f"{path}: images must be (N, C, H, W), got {images.shape}")
    kid = np.asarray(catalog["anomaly_kind"]) if "anomaly_kind" in catalog.colnames else np.zeros(len(idx), int)
    return {"images": np.asarray(images, dtype=np.float32), "anomaly_mask": masks,
            "kind": np.array([names[int(k)] for k in kid]), "catalog": catalog}


__all__ = ["GROUPS", "KINDS", "SKY_KINDS", "AnomalyParams", "AnomalySimulator", "kind_ids", "normal_priors",
           "read_benchmark", "write_benchmark"]
