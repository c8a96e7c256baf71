"""GalSim renderings of deepmorph's galaxies: the reference the tests, benchmarks and tour compare to.

GalSim is imported only when these functions run (it is a test and benchmark dependency).
The translation of conventions: GalSim's ``half_light_radius`` of a sheared profile is the
circularised radius, so the catalogue's major-axis radii are multiplied by ``sqrt(q)``;
``beta`` is our position angle (CCW from +x); ``drawImage(nx, ny, offset=...)`` centres the
profile at the stamp centre ``((S-1)/2, (S-1)/2)`` plus the catalogued offset, as deepmorph does.
"""

from __future__ import annotations

import math

import numpy as np

from deepmorph.errors import DeepmorphValueError


def galsim_psf(psf):
    """A GalSim PSF from a deepmorph PSF dict (``Simulator.psf_dict()``), or ``psf`` itself if it is one."""
    import galsim

    if psf is None or isinstance(psf, galsim.GSObject):
        return psf
    kind = psf.get("type")
    if kind == "moffat":
        return galsim.Moffat(beta=psf["beta"], fwhm=psf["fwhm_arcsec"])
    if kind == "gaussian":
        return galsim.Gaussian(fwhm=psf["fwhm_arcsec"])
    if kind == "none":
        return None
    raise DeepmorphValueError(f"no GalSim counterpart for PSF type {kind!r}")


def galsim_stamp(row: dict, stamp_size: int, pixel_scale: float, psf=None, method: str = "auto") -> np.ndarray:
    """GalSim's rendering of the bulge + disk of one catalogue row.

    Parameters
    ----------
    row : dict
        One catalogue row (``bulge_flux, disk_flux, bulge_n, bulge_hlr_arcsec, bulge_q,
        disk_hlr_arcsec, disk_q, pa_deg, x_offset_pix, y_offset_pix``).
    stamp_size : int
        Stamp side, pixels.
    pixel_scale : float
        Arcsec per pixel.
    psf : dict, galsim.GSObject or None
        PSF as ``Simulator.psf_dict()`` gives it, a GalSim object, or None (pixel only).
    method : str
        GalSim's ``drawImage`` method (``"real_space"`` avoids GalSim's huge FFTs for cuspy
        profiles without a PSF).

    Returns
    -------
    numpy.ndarray
        ``(S, S)`` float64 image, counts.
    """
    import galsim

    beta = float(row["pa_deg"]) * galsim.degrees
    parts = []
    if row["bulge_flux"] > 0:
        q = float(row["bulge_q"])
        bulge = galsim.Sersic(float(row["bulge_n"]), half_light_radius=float(row["bulge_hlr_arcsec"]) * math.sqrt(q),
                              flux=float(row["bulge_flux"]))
        parts.append(bulge.shear(q=q, beta=beta))
    if row["disk_flux"] > 0:
        q = float(row["disk_q"])
        disk = galsim.Exponential(half_light_radius=float(row["disk_hlr_arcsec"]) * math.sqrt(q),
                                  flux=float(row["disk_flux"]))
        parts.append(disk.shear(q=q, beta=beta))
    gal = galsim.Add(parts) if len(parts) > 1 else parts[0]
    psf_obj = galsim_psf(psf)
    if psf_obj is not None:
        gal = galsim.Convolve(gal, psf_obj)
    offset = (float(row["x_offset_pix"]), float(row["y_offset_pix"]))
    image = gal.drawImage(nx=stamp_size, ny=stamp_size, scale=pixel_scale, offset=offset, method=method)
    return image.array.astype(np.float64)


def catalog_rows(catalog: dict, n: int | None = None):
    """Rows of a column dict (``Simulator.simulate(...)["catalog"]``) as dicts of floats."""
    count = len(next(iter(catalog.values()))) if n is None else n
    for i in range(count):
        yield {k: float(v[i]) for k, v in catalog.items()}


def relative_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    """``||ours - ref|| / ||ref||``, the accuracy measure of the simulator's tests."""
    return float(np.linalg.norm(np.asarray(ours, float) - ref) / np.linalg.norm(ref))
