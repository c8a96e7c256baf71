"""Fourier transforms of the galaxy light profiles (GalSim's parameterisation).

A Sersic profile of index ``n``, total flux ``F`` and half-light radius ``r_e`` is
``I(r) = I_0 exp(-b_n (r / r_e)^(1/n))``, with ``b_n`` fixed by requiring that ``r_e``
encloses half the flux: ``P(2n, b_n) = 1/2`` (regularised lower incomplete gamma;
Ciotti & Bertin 1999). As in GalSim, the profile is not truncated.

The renderer works in Fourier space. The exponential disk (n = 1) has the analytic
transform ``F / (1 + (k r_s)^2)^(3/2)`` with scale length ``r_s = r_e / 1.6783...``.
The Sersic transform has no closed form: it is tabulated once per process on a grid of
``n`` and ``ln k`` with the FFTLog fast Hankel transform (Hamilton 2000,
``scipy.fft.fht``), which agrees with the exponential and Gaussian closed forms to 1e-8
of the total flux. Between grid points the table is interpolated linearly in ``n`` and
``ln k``; beyond its end the asymptotic power law ``k^-(2 + 1/n)`` of the central cusp
takes over.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
import scipy.special
import torch

from deepmorph.errors import DeepmorphValueError

#: Range of Sersic indices the table covers (GalSim's own limits are 0.3 <= n <= 6.2).
SERSIC_N_MIN = 0.3
SERSIC_N_MAX = 6.2
_N_STEP = 0.01
# ln(k r_e) range of the table, and the FFTLog sampling that produces it.
_LNK_MIN = math.log(1e-4)
_LNK_MAX = math.log(1e5)
_FHT_POINTS = 8192
_LNR_MIN, _LNR_MAX = -20.0, 16.0

#: b_1, so that an exponential's scale length is ``hlr / EXP_HLR_FACTOR``.
EXP_HLR_FACTOR = 1.6783469900166608


def sersic_b(n: np.ndarray | float) -> np.ndarray:
    """Sersic ``b_n``: ``r_e`` encloses half the light (exact, not the 2n - 1/3 fit).

    Parameters
    ----------
    n : float or array
        Sersic index (dimensionless).
    """
    return scipy.special.gammaincinv(2.0 * np.asarray(n, dtype=float), 0.5)


def sersic_profile(r: np.ndarray, n: float, hlr: float = 1.0, flux: float = 1.0) -> np.ndarray:
    """Circular Sersic surface brightness at radius ``r`` (flux per unit area).

    Parameters
    ----------
    r : array
        Radii, in the same unit as ``hlr``.
    n : float
        Sersic index.
    hlr : float
        Half-light radius.
    flux : float
        Total flux (integrated to infinity).
    """
    b = sersic_b(n)
    i0 = flux * b ** (2 * n) / (2 * np.pi * n * scipy.special.gamma(2 * n) * hlr**2)
    return i0 * np.exp(-b * (np.asarray(r) / hlr) ** (1.0 / n))


def _hankel_unit_sersic(n: float) -> tuple[np.ndarray, np.ndarray]:
    """FFTLog transform of a unit-flux, unit-hlr Sersic: returns ``(ln k, F(k))``."""
    lnr = np.linspace(_LNR_MIN, _LNR_MAX, _FHT_POINTS)
    dln = lnr[1] - lnr[0]
    lnrc = 0.5 * (_LNR_MIN + _LNR_MAX)
    r = np.exp(lnr)
    # fht computes A(k) = int a(r) J0(kr) k dr; with a = 2 pi r I(r), F(k) = A(k) / k.
    a = 2.0 * np.pi * r * sersic_profile(r, n)
    offset = scipy.fft.fhtoffset(dln, mu=0.0)
    big_a = scipy.fft.fht(a, dln, mu=0.0, offset=offset)
    lnk = (offset - lnrc) + (lnr - lnrc)
    return lnk, big_a / np.exp(lnk)


@functools.lru_cache(maxsize=1)
def _sersic_table_numpy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_grid = np.round(np.arange(SERSIC_N_MIN, SERSIC_N_MAX + 0.5 * _N_STEP, _N_STEP), 6)
    rows = []
    lnk_out = None
    for n in n_grid:
        lnk, f = _hankel_unit_sersic(float(n))
        sel = (lnk >= _LNK_MIN) & (lnk <= _LNK_MAX)
        lnk_out = lnk[sel]
        rows.append(f[sel])
    return n_grid, lnk_out, np.asarray(rows)


class SersicTable:
    """The tabulated Sersic transform ``F(n, k r_e)`` on one device (unit flux, unit hlr).

    Use :func:`sersic_table` to get the cached instance for a device.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        n_grid, lnk, table = _sersic_table_numpy()
        self.device = torch.device(device)
        self.n0 = float(n_grid[0])
        self.dn = _N_STEP
        self.n_count = len(n_grid)
        self.lnk0 = float(lnk[0])
        self.dlnk = float(lnk[1] - lnk[0])
        self.lnk_count = len(lnk)
        self.table = torch.as_tensor(table, dtype=torch.float32, device=self.device)

    def rows(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interpolate the table at each index ``n`` (shape ``(B,)``).

        Returns the rows ``(B, L)`` and their forward differences ``(B, L)`` (last column
        zero), the two things :meth:`evaluate` gathers from.
        """
        if torch.any(n < SERSIC_N_MIN - 1e-6) or torch.any(n > SERSIC_N_MAX + 1e-6):
            raise DeepmorphValueError(
                f"Sersic index must lie in [{SERSIC_N_MIN}, {SERSIC_N_MAX}], "
                f"got values in [{float(n.min()):.3g}, {float(n.max()):.3g}]"
            )
        t = ((n.to(torch.float64) - self.n0) / self.dn).clamp(0, self.n_count - 1.000001)
        i = t.floor().long()
        w = (t - i).to(torch.float32)[:, None]
        rows = self.table[i] * (1 - w) + self.table[i + 1] * w
        diff = torch.zeros_like(rows)
        diff[:, :-1] = rows[:, 1:] - rows[:, :-1]
        return rows, diff

    def evaluate(
        self, rows: tuple[torch.Tensor, torch.Tensor], n: torch.Tensor, ksq: torch.Tensor
    ) -> torch.Tensor:
        """``F(k)`` for each row at squared wavenumbers ``ksq`` (units of 1/hlr^2).

        Parameters
        ----------
        rows : tuple of torch.Tensor
            What :meth:`rows` returned for these ``n``.
        n : torch.Tensor
            ``(B,)`` Sersic indices (for the power-law extrapolation).
        ksq : torch.Tensor
            ``(B, ...)`` squared dimensionless wavenumbers ``(k r_e)^2``.
        """
        values, diff = rows
        shape = ksq.shape
        flat = ksq.reshape(shape[0], -1)
        t = torch.log(flat.clamp_min(1e-30)).mul_(0.5 / self.dlnk).sub_(self.lnk0 / self.dlnk)
        last = self.lnk_count - 1
        tc = t.clamp(0, last)
        i = tc.floor()
        w = tc.sub_(i)
        i = i.long()
        out = torch.gather(diff, 1, i).mul_(w).add_(torch.gather(values, 1, i))
        beyond = t > last
        if bool(beyond.any()):
            # Power law of the cusp past the table's end: F ~ k^-(2 + 1/n).
            slope = (2.0 + 1.0 / n.to(out.dtype))[:, None]
            extra = torch.exp(-slope * (t - last).clamp_min(0) * self.dlnk)
            out = torch.where(beyond, out * extra, out)
        return out.reshape(shape)


@functools.lru_cache(maxsize=8)
def sersic_table(device: str = "cpu") -> SersicTable:
    """Cached :class:`SersicTable` on ``device`` (built on first use, ~1 s)."""
    return SersicTable(device)


def exponential_ft(ksq_scaled: torch.Tensor) -> torch.Tensor:
    """Unit-flux exponential transform at ``(k r_s)^2``: ``(1 + (k r_s)^2)^(-3/2)``."""
    t = 1.0 + ksq_scaled
    return torch.rsqrt(t) / t
