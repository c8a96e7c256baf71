"""Batched Fourier-space rendering of galaxy stamps (CPU or CUDA), GalSim's method.

For each stamp the Fourier transform of the scene -- Sersic bulges, exponential disks,
point-like clumps -- is evaluated analytically (or from the tabulated Sersic transform)
on the wavenumber grid of an ``N x N`` periodic box, multiplied by the PSF and by the
pixel response ``sinc(k_x / 2 pi) sinc(k_y / 2 pi)``, and brought back with one inverse
real FFT. Sampling at pixel centres is exact: the discrete transform of the sampled,
pixel-integrated image is the sum of the continuous transform over the aliases
``k + 2 pi j``, which are added explicitly wherever the PSF (or, without a PSF, the
galaxy) still has power above ``alias_threshold``. The box is padded past the stamp
(``N >= extent + S/2``) so that light beyond the stamp's edges does not fold back in.
Items are grouped by the box size they need, so an item renders identically whatever
batch it arrives in.

Conventions (see the README): arrays are ``[..., y, x]``; pixel centres are at integer
coordinates; a stamp's centre is ``((S-1)/2, (S-1)/2)``; positions are offsets in pixels
from that centre; position angles are degrees counter-clockwise from +x; ``hlr`` is the
half-light radius along the major axis (GalSim's ``half_light_radius`` of a sheared
profile is the circularised one, ``hlr * sqrt(q)``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.simulate.profiles import (
    EXP_HLR_FACTOR,
    SERSIC_N_MAX,
    SERSIC_N_MIN,
    exponential_ft,
    sersic_b,
    sersic_table,
)
from deepmorph.simulate.psf import PSF

_GOOD_SIZES = (32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024)


@dataclasses.dataclass(frozen=True)
class Sersic:
    """A batch of Sersic profiles, one or ``K`` per stamp (tensors ``(B,)`` or ``(B, K)``).

    Parameters
    ----------
    flux : torch.Tensor
        Total flux, image counts.
    hlr_pix : torch.Tensor
        Half-light radius along the major axis, pixels.
    q : torch.Tensor
        Axis ratio b/a in (0, 1].
    pa_deg : torch.Tensor
        Position angle of the major axis, degrees counter-clockwise from +x.
    x_pix, y_pix : torch.Tensor
        Centre, pixels from the stamp centre.
    n : torch.Tensor or None
        Sersic index in [0.3, 6.2]; ``None`` means an exponential disk (n = 1, analytic).
    """

    flux: torch.Tensor
    hlr_pix: torch.Tensor
    q: torch.Tensor
    pa_deg: torch.Tensor
    x_pix: torch.Tensor
    y_pix: torch.Tensor
    n: torch.Tensor | None = None

    def fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def as_2d(self) -> Sersic:
        return Sersic(**{k: v if v.dim() == 2 else v[:, None] for k, v in self.fields().items()})

    def take(self, idx: torch.Tensor) -> Sersic:
        return Sersic(**{k: v[idx] for k, v in self.fields().items()})

    def extent_pix(self, fold_level: float, total_flux: torch.Tensor) -> torch.Tensor:
        """Per stamp, the farthest reach (pixels from the stamp centre) of significant light.

        A profile reaches to the radius where its surface brightness falls to
        ``fold_level`` times its value at the half-light radius, the level being relaxed
        for a component that carries a small share of the stamp's ``total_flux``:
        ``R / r_e = (1 + ln(1 / level) / b_n)^n``.
        """
        c = self.as_2d()
        n = c.n.double() if c.n is not None else torch.ones_like(c.hlr_pix, dtype=torch.float64)
        b = torch.as_tensor(sersic_b(n.cpu().numpy()), device=n.device)
        share = (c.flux.abs().double() / total_flux.double().clamp_min(1e-30)[:, None]).clamp(1e-12, 1.0)
        level = (fold_level / share).clamp(max=0.5)
        radius = (1.0 + torch.log(1.0 / level) / b) ** n
        reach = radius * c.hlr_pix.double() + torch.sqrt(c.x_pix.double() ** 2 + c.y_pix.double() ** 2)
        return torch.where(c.flux != 0, reach, torch.zeros_like(reach)).amax(dim=1)

    def total_flux(self) -> torch.Tensor:
        return self.as_2d().flux.abs().sum(dim=1)

    def surface_brightness(self, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """Surface brightness (counts/pixel^2) at offsets ``dx, dy`` (pixels) from each centre.

        ``dx, dy`` are ``(B, K, P)`` offsets from the ``K`` profiles' centres; the unconvolved,
        untruncated profile is returned, ``(B, K, P)``.
        """
        c = self.as_2d()
        n = c.n.double() if c.n is not None else torch.ones_like(c.hlr_pix, dtype=torch.float64)
        b = torch.as_tensor(sersic_b(n.cpu().numpy()), device=n.device)
        a = c.hlr_pix.double()
        q = c.q.double()
        log_norm = (torch.log(c.flux.double().abs().clamp_min(1e-300)) + 2 * n * torch.log(b)
                    - math.log(2 * math.pi) - torch.log(n) - torch.lgamma(2 * n) - 2 * torch.log(a) - torch.log(q))
        th = torch.deg2rad(c.pa_deg.double())
        cs, sn = torch.cos(th)[..., None].float(), torch.sin(th)[..., None].float()
        dx, dy = dx.float(), dy.float()
        u = (dx * cs + dy * sn) / a[..., None].float()
        v = (dy * cs - dx * sn) / (a * q)[..., None].float()
        # log I = log I0 - b (r / a)^(1/n), with (r/a)^(1/n) = exp(ln(r^2 / a^2) / 2n).
        lr = torch.log(u * u + v * v).mul_((0.5 / n)[..., None].float())
        out = torch.exp(log_norm[..., None].float() - b[..., None].float() * torch.exp(lr))
        return torch.where(c.flux[..., None] != 0, out, torch.zeros_like(out))


@dataclasses.dataclass(frozen=True)
class PointSources:
    """Unresolved sources (clumps, stars), ``M`` per stamp; ``flux`` 0 marks an empty slot.

    Parameters
    ----------
    flux, x_pix, y_pix : torch.Tensor
        ``(B, M)`` fluxes (counts) and positions (pixels from the stamp centre).
    """

    flux: torch.Tensor
    x_pix: torch.Tensor
    y_pix: torch.Tensor

    def take(self, idx: torch.Tensor) -> PointSources:
        return PointSources(self.flux[idx], self.x_pix[idx], self.y_pix[idx])

    def total_flux(self) -> torch.Tensor:
        return self.flux.abs().sum(dim=1)

    def extent_pix(self, psf_reach: float) -> torch.Tensor:
        reach = psf_reach + torch.sqrt(self.x_pix**2 + self.y_pix**2)
        return torch.where(self.flux != 0, reach, torch.zeros_like(reach)).amax(dim=1)


Component = Sersic | PointSources


def _good_sizes(need: np.ndarray, stamp: int) -> np.ndarray:
    """Smallest FFT-friendly box sizes >= ``max(need, stamp)`` (vectorised over items)."""
    need = np.maximum(np.ceil(need), stamp)
    sizes = np.array([s for s in _GOOD_SIZES if s >= stamp] + [2 ** int(math.ceil(math.log2(max(stamp, 2))))])
    sizes = np.unique(sizes)
    pick = np.searchsorted(sizes, need, side="left")
    beyond = pick >= len(sizes)
    out = sizes[np.minimum(pick, len(sizes) - 1)].astype(np.int64)
    if beyond.any():
        out[beyond] = (2 ** np.ceil(np.log2(need[beyond]))).astype(np.int64)
    return out


class Renderer:
    """Render batches of scenes into ``S x S`` stamps.

    Parameters
    ----------
    stamp_size : int
        Stamp side ``S``, pixels (even or odd).
    pixel_scale_arcsec : float
        Pixel scale, arcsec/pixel (used to put the PSF on the pixel grid).
    psf : PSF or None
        Point-spread function; ``None`` renders the galaxy convolved with the pixel only.
    device : str or torch.device
        Where to compute (``"cpu"``, ``"cuda"``).
    fold_level : float
        The periodic box reaches past each profile's light down to this surface
        brightness, relative to the surface brightness at the half-light radius (4.5 hlr
        for an exponential, 11 hlr for n = 6 at the default); fainter light may fold back.
    fold_rings : int
        The faint wings that still fold back (those of n ~ 4-6 profiles carry a percent of
        the flux past 20 hlr) are subtracted in real space: the unconvolved profile of the
        box's periodic copies out to this many rings, evaluated on a coarse grid over the
        stamp and interpolated in log space (the wings are smooth there).
    alias_threshold : float
        Aliased Fourier power below this fraction of the flux is neglected (GalSim's
        ``maxk_threshold`` is 1e-3).
    max_alias : int
        Upper bound on the number of aliases per side (only reached without a PSF).
    chunk : int or None
        Items rendered per call (the last call of each FFT box size padded with copies), so that
        every item meets the same array shapes whatever batch it came in: MKL's FFT and the
        threaded element-wise kernels round the last bit differently for other batch counts,
        and an item would depend on its neighbours in the batch. ``None`` renders each box size
        in one call, exact to float32 rounding only; on a GPU ``chunk`` is ignored (always
        ``None``).
    """

    def __init__(
        self,
        stamp_size: int,
        pixel_scale_arcsec: float,
        psf: PSF | None,
        device: str | torch.device = "cpu",
        fold_level: float = 3e-3,
        fold_rings: int = 3,
        alias_threshold: float = 1e-4,
        max_alias: int = 6,
        chunk: int | None = 8,
    ):
        if int(stamp_size) != stamp_size or stamp_size < 8:
            raise DeepmorphValueError(f"stamp size must be an integer >= 8 pixels, got {stamp_size}")
        if not pixel_scale_arcsec > 0:
            raise DeepmorphValueError(f"pixel scale must be positive, got {pixel_scale_arcsec}")
        self.stamp_size = int(stamp_size)
        self.pixel_scale = float(pixel_scale_arcsec)
        self.psf = psf
        self.device = torch.device(device)
        self.fold_level = float(fold_level)
        self.fold_rings = int(fold_rings)
        self.alias_threshold = float(alias_threshold)
        self.max_alias = int(max_alias)
        self.chunk = None if chunk is None or self.device.type == "cuda" else int(chunk)
        self._grid_cache: dict = {}
        self.table = sersic_table(str(self.device))
        self.psf_kmax = max(math.pi, self._psf_kmax()) if psf is not None else None
        self.psf_reach = self._psf_reach()

    # -- PSF-dependent set-up ------------------------------------------------------------
    def _transfer_np(self, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
        """PSF x pixel transform on the separable grid ``ky[:, None], kx[None, :]``."""
        pix = np.sinc(ky / (2 * np.pi))[:, None] * np.sinc(kx / (2 * np.pi))[None, :]
        if self.psf is None:
            return pix
        if hasattr(self.psf, "image"):
            return self.psf.kvalue(kx, ky, self.pixel_scale) * pix
        return self.psf.kvalue(kx[None, :], ky[:, None], self.pixel_scale) * pix

    def _psf_kmax(self) -> float:
        """Wavenumber (rad/pixel) past which the PSF x pixel transform stays below threshold."""
        k = np.linspace(0, 2 * np.pi * (self.max_alias + 1), 2000)
        axis = np.abs(self._transfer_np(k, np.zeros(1)))[0]
        d = k / np.sqrt(2)
        pix = np.sinc(d / (2 * np.pi)) ** 2
        if hasattr(self.psf, "kvalue_points"):
            diag = np.abs(self.psf.kvalue_points(d, d, self.pixel_scale) * pix)
        else:
            diag = np.abs(self.psf.kvalue(d, d, self.pixel_scale) * pix)
        above = k[np.maximum(axis, diag) > self.alias_threshold]
        return float(above.max()) if above.size else 0.0

    def _psf_reach(self) -> float:
        """Radius (pixels) outside which the PSF carries a negligible share of light."""
        if self.psf is None:
            return 1.0
        fwhm = getattr(self.psf, "fwhm_arcsec", 1.0) / self.pixel_scale
        return 4.0 * fwhm + 2.0

    def psf_image(self, size: int | None = None) -> torch.Tensor:
        """The PSF convolved with the pixel, drawn centred on a ``size`` stamp (sums to ~1)."""
        size = size or self.stamp_size
        zero = torch.zeros(1, 1, dtype=torch.float64, device=self.device)
        pts = PointSources(torch.ones(1, 1, dtype=torch.float64, device=self.device), zero, zero)
        r = Renderer(size, self.pixel_scale, self.psf, self.device, self.fold_level, self.fold_rings,
                     self.alias_threshold)
        return r.render({"psf": pts}, {"psf": ("psf",)})["psf"][0]

    # -- grids ---------------------------------------------------------------------------------
    def _grid(self, n: int, kmax: float) -> dict:
        """Wavenumbers of an ``n``-box, extended by the aliases ``k + 2 pi j`` with ``|k| <= kmax``.

        The grid is separable: ``kx`` (rfft half-plane plus aliases) and ``ky`` (full
        range plus aliases), each with the index of the base frequency it folds onto.
        """
        key = (n, round(kmax, 6))
        if key in self._grid_cache:
            return self._grid_cache[key]
        jmax = int(math.ceil(kmax / (2 * np.pi))) + 1

        def extend(base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            values, targets = [base], [np.arange(len(base))]
            for j in range(-jmax, jmax + 1):
                if j == 0:
                    continue
                shifted = base + 2 * np.pi * j
                keep = np.abs(shifted) <= kmax
                values.append(shifted[keep])
                targets.append(np.nonzero(keep)[0])
            return np.concatenate(values), np.concatenate(targets)

        kx, tx = extend(2 * np.pi * np.fft.rfftfreq(n))
        ky, ty = extend(2 * np.pi * np.fft.fftfreq(n))
        transfer = self._transfer_np(kx, ky)
        dev = self.device
        g = {
            "n": n,
            "kx": torch.as_tensor(kx, dtype=torch.float32, device=dev),
            "ky": torch.as_tensor(ky, dtype=torch.float32, device=dev),
            "tx": torch.as_tensor(tx, dtype=torch.long, device=dev),
            "ty": torch.as_tensor(ty, dtype=torch.long, device=dev),
            "transfer": torch.as_tensor(
                transfer, dtype=torch.complex64 if np.iscomplexobj(transfer) else torch.float32, device=dev
            ),
        }
        g["kxx"] = (g["kx"] ** 2)[None, :].expand(len(ky), -1)
        g["kyy"] = (g["ky"] ** 2)[:, None].expand(-1, len(kx))
        g["kxy"] = g["ky"][:, None] * g["kx"][None, :]
        self._grid_cache[key] = g
        return g

    @staticmethod
    def _fold(ft: torch.Tensor, g: dict) -> torch.Tensor:
        """Sum the aliases onto the base ``(N, N/2+1)`` frequencies."""
        n = g["n"]
        nxh = n // 2 + 1
        if ft.shape[2] > nxh:
            ft = torch.zeros(*ft.shape[:2], nxh, dtype=ft.dtype, device=ft.device).index_add_(2, g["tx"], ft)
        if ft.shape[1] > n:
            ft = torch.zeros(ft.shape[0], n, nxh, dtype=ft.dtype, device=ft.device).index_add_(1, g["ty"], ft)
        return ft

    # -- the transforms ----------------------------------------------------------------------------
    def _sersic_terms(self, comp: Sersic, g: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Real, centred transforms ``(B, Ny, Nx)`` of each of the ``K`` profiles, with positions."""
        c = comp.as_2d()
        terms = []
        for j in range(c.flux.shape[1]):
            flux = c.flux[:, j].float()
            a = c.hlr_pix[:, j].float()
            b = a * c.q[:, j].float()
            th = torch.deg2rad(c.pa_deg[:, j].float())
            cs, sn = torch.cos(th), torch.sin(th)
            # |A^T k|^2 with A = R(th) diag(a, b): a quadratic form in (kx, ky).
            cxx = (a * cs) ** 2 + (b * sn) ** 2
            cyy = (a * sn) ** 2 + (b * cs) ** 2
            cxy = 2 * cs * sn * (a**2 - b**2)
            ksq = cxx[:, None, None] * g["kxx"] + cyy[:, None, None] * g["kyy"]
            ksq = ksq.add_(cxy[:, None, None] * g["kxy"])
            if c.n is None:
                shape = exponential_ft(ksq.mul_(1.0 / EXP_HLR_FACTOR**2))
            else:
                n = c.n[:, j].float()
                shape = self.table.evaluate(self.table.rows(n), n, ksq)
            terms.append((shape.mul_(flux[:, None, None]), c.x_pix[:, j], c.y_pix[:, j]))
        return terms

    @staticmethod
    def _point_terms(comp: PointSources) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [
            (comp.flux[:, j].float()[:, None, None], comp.x_pix[:, j], comp.y_pix[:, j])
            for j in range(comp.flux.shape[1])
        ]

    def _phase(self, x: torch.Tensor, y: torch.Tensor, g: dict) -> torch.Tensor:
        """``exp(-i k.p)`` for positions ``p`` measured from pixel (0, 0) of the box."""
        c = 0.5 * (self.stamp_size - 1)
        px = (x.double() + c).float()
        py = (y.double() + c).float()
        ex = torch.polar(torch.ones_like(px)[:, None].expand(-1, len(g["kx"])), -px[:, None] * g["kx"][None, :])
        ey = torch.polar(torch.ones_like(py)[:, None].expand(-1, len(g["ky"])), -py[:, None] * g["ky"][None, :])
        return ey[:, :, None] * ex[:, None, :]

    # -- per-item box and alias choice -------------------------------------------------------------
    def _galaxy_alias(self, scene: dict[str, Component]) -> torch.Tensor:
        """Without a PSF: aliases needed by each item's most compact Sersic profile."""
        batch = _batch_size(scene)
        need = torch.zeros(batch, dtype=torch.float64, device=self.device)
        for comp in scene.values():
            if isinstance(comp, PointSources):
                if bool((comp.flux != 0).any()):
                    need = torch.full_like(need, float(self.max_alias))
                continue
            c = comp.as_2d()
            minor = (c.hlr_pix * c.q).double().clamp_min(1e-3)
            if c.n is None:
                # (1 + x^2)^-1.5 < threshold  ->  x = threshold^(-1/3)
                kmax = self.alias_threshold ** (-1 / 3) * EXP_HLR_FACTOR / minor
            else:
                # Power law of the cusp: F ~ C k^-(2+1/n), with C ~ 1 at k r_e ~ 1.
                kmax = self.alias_threshold ** (-1.0 / (2.0 + 1.0 / c.n.double())) / minor
            kmax = torch.where(c.flux != 0, kmax, torch.zeros_like(kmax)).amax(dim=1)
            alias = torch.ceil((kmax / math.pi - 1) / 2).clamp(0, self.max_alias)
            need = torch.maximum(need, alias)
        return need.long()

    def box_sizes(self, scene: dict[str, Component]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per item: FFT box size ``N`` (int64) and the largest wavenumber kept (rad/pixel)."""
        batch = _batch_size(scene)
        reach = torch.zeros(batch, dtype=torch.float64, device=self.device)
        total = sum(comp.total_flux().double() for comp in scene.values())
        for comp in scene.values():
            if isinstance(comp, Sersic):
                r = comp.extent_pix(self.fold_level, total).double()
            else:
                r = comp.extent_pix(self.psf_reach).double()
            reach = torch.maximum(reach, r)
        psf_pad = self.psf_reach if self.psf is not None else 0.0
        need = (reach + psf_pad + 0.5 * self.stamp_size).cpu().numpy()
        sizes = torch.as_tensor(_good_sizes(need, self.stamp_size), device=self.device)
        if self.psf is None:
            kmax = math.pi * (2 * self._galaxy_alias(scene).double() + 1)
        else:
            kmax = torch.full((batch,), self.psf_kmax, dtype=torch.float64, device=self.device)
        return sizes, kmax

    # -- public entry point ------------------------------------------------------------------------
    def render(
        self, scene: dict[str, Component], outputs: dict[str, tuple[str, ...]]
    ) -> dict[str, torch.Tensor]:
        """Render named sums of scene components.

        Parameters
        ----------
        scene : dict
            Component name -> :class:`Sersic` or :class:`PointSources` batch (same ``B``).
        outputs : dict
            Output name -> names of the components summed into it, e.g.
            ``{"image": ("bulge", "disk"), "bulge": ("bulge",)}``.

        Returns
        -------
        dict
            Output name -> ``(B, S, S)`` float32 tensors, counts per pixel.
        """
        batch = _batch_size(scene)
        for name, comp in scene.items():
            if isinstance(comp, Sersic) and comp.n is not None:
                if bool(((comp.n < SERSIC_N_MIN) | (comp.n > SERSIC_N_MAX)).any()):
                    raise DeepmorphValueError(
                        f"{name}: Sersic index must lie in [{SERSIC_N_MIN}, {SERSIC_N_MAX}], "
                        f"got values in [{float(comp.n.min()):.3g}, {float(comp.n.max()):.3g}]"
                    )
        s = self.stamp_size
        result = {name: torch.zeros(batch, s, s, device=self.device) for name in outputs}
        sizes, kmax = self.box_sizes(scene)
        keys = torch.unique(torch.stack([sizes.double(), kmax.double()], dim=1), dim=0).tolist()
        for size, k in keys:
            size = int(size)
            group = torch.nonzero((sizes == size) & (kmax == k)).squeeze(1)
            step = self.chunk or len(group)
            for start in range(0, len(group), step):
                idx = group[start : start + step]
                padded = torch.cat([idx, idx[:1].expand(step - len(idx))])
                sub = {name: comp.take(padded) for name, comp in scene.items()}
                images = self._render_group(sub, outputs, size, k)
                for name, img in images.items():
                    result[name][idx] = img[: len(idx)]
        return result

    def _render_group(self, scene, outputs, size, kmax) -> dict[str, torch.Tensor]:
        s = self.stamp_size
        g = self._grid(size, kmax)
        terms = {
            name: self._sersic_terms(comp, g) if isinstance(comp, Sersic) else self._point_terms(comp)
            for name, comp in scene.items()
        }
        phases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def phase(x, y):
            # Profiles sharing a centre (bulge and disk) share one phase factor.
            for px, py, ph in phases:
                if px is x and py is y or (torch.equal(px, x) and torch.equal(py, y)):
                    return ph
            ph = self._phase(x, y, g)
            phases.append((x, y, ph))
            return ph

        images = {}
        for out, parts in outputs.items():
            grouped: list[list] = []
            for p in parts:
                for amp, x, y in terms[p]:
                    for grp in grouped:
                        if grp[1] is x and grp[2] is y or (torch.equal(grp[1], x) and torch.equal(grp[2], y)):
                            grp[0] = grp[0] + amp
                            break
                    else:
                        grouped.append([amp, x, y])
            total = None
            for amp, x, y in grouped:
                term = amp * phase(x, y)
                total = term if total is None else total.add_(term)
            total = self._fold(total * g["transfer"], g)
            image = torch.fft.irfft2(total, s=(size, size))[:, :s, :s]
            for p in parts:
                if isinstance(scene[p], Sersic):
                    image = image - self._wrapped_wings(scene[p], size)
            images[out] = image
        return images

    def _wrapped_wings(self, comp: Sersic, size: int, grid: int = 7) -> torch.Tensor:
        """Light of the periodic copies of ``comp`` (box ``size``) that lands on the stamp."""
        s = self.stamp_size
        c = 0.5 * (s - 1)
        dev = self.device
        rings = self.fold_rings
        m = torch.arange(-rings, rings + 1, device=dev, dtype=torch.float64)
        my, mx = torch.meshgrid(m, m, indexing="ij")
        keep = (mx != 0) | (my != 0)
        shift_x, shift_y = (mx[keep] * size), (my[keep] * size)  # (C,)
        coarse = torch.linspace(-c, c, grid, device=dev, dtype=torch.float64)  # pixels from the centre
        gy, gx = torch.meshgrid(coarse, coarse, indexing="ij")
        px = (gx.reshape(1, -1) + shift_x[:, None]).reshape(-1)  # (C * G^2,)
        py = (gy.reshape(1, -1) + shift_y[:, None]).reshape(-1)
        cc = comp.as_2d()
        dx = px[None, None, :] - cc.x_pix.double()[..., None]
        dy = py[None, None, :] - cc.y_pix.double()[..., None]
        sb = comp.surface_brightness(dx, dy)  # (B, K, C * G^2)
        wings = sb.sum(dim=1).reshape(-1, len(shift_x), grid, grid).sum(dim=1)  # (B, G, G)
        log_w = torch.log(wings.double().clamp_min(1e-300))
        fine = torch.nn.functional.interpolate(log_w[:, None], size=(s, s), mode="bilinear", align_corners=True)
        return torch.exp(fine[:, 0]).float()


def _batch_size(scene: dict[str, Component]) -> int:
    sizes = {comp.flux.shape[0] for comp in scene.values()}
    if len(sizes) != 1:
        raise DeepmorphValueError(f"scene components disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()
