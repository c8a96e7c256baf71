"""Survey presets: pixel scale, PSF, photometric zero point and depth.

Numbers are typical values from the surveys' papers, good enough to make simulations look
like each survey; they are not calibrations of any particular field.

Image units follow each survey's zero point: ``flux [counts] = 10^(-0.4 (mag - zeropoint))``.
Depth is the 5-sigma limiting AB magnitude of a point source; the simulator turns it into
a sky noise level per pixel with the PSF's noise-equivalent area
(``sigma_sky = F_5sigma / (5 sqrt(NEA))``, ``NEA = 1 / sum(psf_pixel^2)``), i.e. the depth a
PSF-fitting detection reaches. ``gain_e_per_count`` (electrons per image count) sets the
Poisson noise of the sources.
"""

from __future__ import annotations

import dataclasses
import math

from deepmorph.errors import DeepmorphValueError


@dataclasses.dataclass(frozen=True)
class Survey:
    """A survey preset.

    Parameters
    ----------
    name : str
        Preset name, e.g. ``"candels-f160w"``.
    band : str
        Filter.
    pixel_scale_arcsec : float
        Pixel scale, arcsec/pixel.
    psf : dict
        Default PSF as a JSON-able dict (see :func:`deepmorph.simulate.psf.parse_psf`).
    zeropoint_mag : float
        AB magnitude of one image count.
    depth_5sigma_mag : float
        5-sigma point-source limiting AB magnitude.
    gain_e_per_count : float
        Electrons per image count (exposure time x gain for count-rate images).
    image_unit : str
        What one image count is.
    reference : str
        Where the numbers come from.
    """

    name: str
    band: str
    pixel_scale_arcsec: float
    psf: dict
    zeropoint_mag: float
    depth_5sigma_mag: float
    gain_e_per_count: float
    image_unit: str
    reference: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_photometry(self, zeropoint_mag: float | None = None, gain_e_per_count: float | None = None) -> Survey:
        """This preset with another zero point and/or gain, e.g. to simulate one real frame's counts.

        Parameters
        ----------
        zeropoint_mag : float, optional
            AB magnitude of one image count (ADU of the frame); ``image_unit`` then reads
            ``count (zero point Z)``. The depth, in magnitudes, is kept.
        gain_e_per_count : float, optional
            Electrons per image count (sets the sources' Poisson noise), > 0.
        """
        changes = {}
        if zeropoint_mag is not None:
            if not math.isfinite(zeropoint_mag):
                raise DeepmorphValueError(f"zero point must be a finite AB magnitude, got {zeropoint_mag}")
            changes.update(zeropoint_mag=float(zeropoint_mag), image_unit=f"count (zero point {zeropoint_mag:g})")
        if gain_e_per_count is not None:
            if not (math.isfinite(gain_e_per_count) and gain_e_per_count > 0):
                raise DeepmorphValueError(f"gain must be a positive number of electrons per count, "
                                          f"got {gain_e_per_count}")
            changes["gain_e_per_count"] = float(gain_e_per_count)
        return dataclasses.replace(self, **changes)


SURVEYS: dict[str, Survey] = {
    s.name: s
    for s in (
        Survey(
            name="candels-f160w",
            band="HST WFC3/IR F160W (H)",
            pixel_scale_arcsec=0.06,
            psf={"type": "moffat", "fwhm_arcsec": 0.18, "beta": 3.5},
            zeropoint_mag=25.95,
            depth_5sigma_mag=27.0,
            gain_e_per_count=3000.0,
            image_unit="e-/s",
            reference="Grogin et al. 2011, Koekemoer et al. 2011 (CANDELS/Wide H depth, 0.06\"/px drizzle, "
            "F160W AB zero point 25.95 in e-/s); ~3000 s effective exposure",
        ),
        Survey(
            name="sdss-r",
            band="SDSS r",
            pixel_scale_arcsec=0.396,
            psf={"type": "moffat", "fwhm_arcsec": 1.4, "beta": 3.5},
            zeropoint_mag=22.5,
            depth_5sigma_mag=22.7,
            gain_e_per_count=950.0,
            image_unit="nanomaggy",
            reference="York et al. 2000; Stoughton et al. 2002 (0.396\"/px, median r seeing ~1.4\", "
            "r ~ 22.7 5-sigma point sources in 54 s; images calibrated in nanomaggies, zero point 22.5)",
        ),
        Survey(
            name="des-r",
            band="DECam r",
            pixel_scale_arcsec=0.263,
            psf={"type": "moffat", "fwhm_arcsec": 1.0, "beta": 3.5},
            zeropoint_mag=30.0,
            depth_5sigma_mag=24.7,
            gain_e_per_count=4.0,
            image_unit="coadd count (zero point 30)",
            reference="Abbott et al. 2018, 2021 (DES DR1/DR2: 0.263\"/px, median r FWHM ~1.0\", "
            "coadd zero point 30, r ~ 24.7 at S/N = 5)",
        ),
        Survey(
            name="hsc-i",
            band="HSC i",
            pixel_scale_arcsec=0.168,
            psf={"type": "moffat", "fwhm_arcsec": 0.6, "beta": 3.5},
            zeropoint_mag=27.0,
            depth_5sigma_mag=26.2,
            gain_e_per_count=3.0,
            image_unit="coadd count (zero point 27)",
            reference="Aihara et al. 2018 (HSC-SSP Wide: 0.168\"/px, median i seeing ~0.6\", "
            "coadd zero point 27, i ~ 26.2 5-sigma point sources)",
        ),
    )
}


def get_survey(name: str) -> Survey:
    """The preset called ``name`` (case-insensitive); a clear error lists the known ones."""
    key = str(name).strip().lower()
    if key not in SURVEYS:
        raise DeepmorphValueError(f"unknown survey {name!r}; known surveys: {', '.join(SURVEYS)}")
    return SURVEYS[key]
