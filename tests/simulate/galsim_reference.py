"""GalSim renderings of the same galaxies, the reference our renderer is tested against."""

from __future__ import annotations

import numpy as np

galsim = __import__("pytest").importorskip("galsim")


def galsim_stamp(row: dict, stamp: int, scale: float, psf=None, method: str = "auto") -> np.ndarray:
    """Draw bulge + disk of catalogue ``row`` (our conventions) with GalSim.

    GalSim's ``half_light_radius`` of a sheared profile is the circularised radius, so the
    major-axis radius of our catalogue is multiplied by ``sqrt(q)``.
    """
    beta = row["pa_deg"] * galsim.degrees
    parts = []
    if row["bulge_flux"] > 0:
        parts.append(
            galsim.Sersic(row["bulge_n"], half_light_radius=row["bulge_hlr_arcsec"] * np.sqrt(row["bulge_q"]),
                          flux=row["bulge_flux"]).shear(q=row["bulge_q"], beta=beta)
        )
    if row["disk_flux"] > 0:
        parts.append(
            galsim.Exponential(half_light_radius=row["disk_hlr_arcsec"] * np.sqrt(row["disk_q"]),
                               flux=row["disk_flux"]).shear(q=row["disk_q"], beta=beta)
        )
    gal = galsim.Add(parts) if len(parts) > 1 else parts[0]
    if psf is not None:
        gal = galsim.Convolve(gal, psf)
    offset = (row["x_offset_pix"], row["y_offset_pix"])
    return gal.drawImage(nx=stamp, ny=stamp, scale=scale, offset=offset, method=method).array


def rows(catalog: dict, n: int):
    for i in range(n):
        yield {k: float(v[i]) for k, v in catalog.items()}


def relative_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
