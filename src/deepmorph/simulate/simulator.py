"""The galaxy-stamp simulator: priors -> scene -> Fourier rendering -> noise -> catalogue.

>>> from deepmorph.simulate import Simulator
>>> sim = Simulator("candels-f160w", stamp_size=64)
>>> batch = sim.simulate(range(8), seed=0)
>>> batch["images"].shape
(8, 1, 64, 64)
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from deepmorph import __version__
from deepmorph.errors import DeepmorphValueError
from deepmorph.simulate.noise import BackgroundNoise, GaussianNoise, Noise
from deepmorph.simulate.priors import LABEL_NAMES, Priors, draw_galaxies, morphology_label
from deepmorph.simulate.psf import PSF, ImagePSF, parse_psf
from deepmorph.simulate.render import PointSources, Renderer, Sersic
from deepmorph.simulate.surveys import Survey, get_survey

#: Catalogue columns and their units (radii in arcsec, except where the name says _pix).
CATALOG_UNITS = {
    "id": "",
    "mag": "mag",
    "flux": "count",
    "bulge_to_total": "",
    "bulge_flux": "count",
    "disk_flux": "count",
    "bulge_n": "",
    "bulge_hlr_arcsec": "arcsec",
    "bulge_q": "",
    "disk_hlr_arcsec": "arcsec",
    "disk_q": "",
    "pa_deg": "deg",
    "x_offset_pix": "pix",
    "y_offset_pix": "pix",
    "n_clumps": "",
    "clump_flux_fraction": "",
    "n_neighbors": "",
    "label": "",
}


class Simulator:
    """Simulate postage stamps of bulge + disk galaxies for a survey.

    Parameters
    ----------
    survey : str or Survey
        Preset name (``candels-f160w``, ``sdss-r``, ``des-r``, ``hsc-i``) or a :class:`Survey`.
    stamp_size : int
        Stamp side, pixels.
    priors : Priors, optional
        Parameter priors (default: the lecture's HST recipe).
    psf : str, dict or PSF, optional
        Override the preset's PSF (``gaussian:FWHM``, ``moffat:FWHM,BETA``, ``FILE.fits[:HDU][@SCALE]``);
        ``"none"`` renders without a PSF.
    pixel_scale_arcsec : float, optional
        Override the preset's pixel scale.
    noise : GaussianNoise, BackgroundNoise or "none", optional
        Default: Gaussian sky at the preset's depth plus Poisson source noise.
    clumps : bool
        Add unresolved clumps (and a clump mask).
    neighbors : bool
        Add companion galaxies (and a neighbour mask).
    components : bool
        Also return the noise-free ``bulge`` and ``disk`` images.
    device : str
        ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        survey: str | Survey = "candels-f160w",
        stamp_size: int = 64,
        priors: Priors | None = None,
        psf: str | dict | PSF | None = None,
        pixel_scale_arcsec: float | None = None,
        noise: Noise | str | None = None,
        clumps: bool = False,
        neighbors: bool = False,
        components: bool = False,
        device: str | torch.device = "cpu",
    ):
        self.survey = survey if isinstance(survey, Survey) else get_survey(survey)
        if int(stamp_size) != stamp_size or not 8 <= stamp_size <= 1024:
            raise DeepmorphValueError(f"stamp size must be an integer in [8, 1024] pixels, got {stamp_size}")
        self.stamp_size = int(stamp_size)
        self.priors = priors or Priors()
        if isinstance(psf, str) and psf.strip().lower() == "none":
            self.psf = None
        else:
            self.psf = parse_psf(psf if psf is not None else self.survey.psf)
        scale = pixel_scale_arcsec if pixel_scale_arcsec is not None else self.survey.pixel_scale_arcsec
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise DeepmorphValueError(f"pixel scale must be a positive number of arcsec, got {scale!r}")
        self.pixel_scale = float(scale)
        self.clumps = bool(clumps)
        self.neighbors = bool(neighbors)
        self.components = bool(components)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeepmorphValueError("device cuda requested but no CUDA GPU is available")
        self.renderer = Renderer(self.stamp_size, self.pixel_scale, self.psf, self.device)
        psf_img = self.renderer.psf_image(min(self.stamp_size * 2, 256)).double()
        self.psf_nea_pix = float(psf_img.sum() ** 2 / (psf_img**2).sum())
        fwhm = getattr(self.psf, "fwhm_arcsec", self.pixel_scale) if self.psf is not None else self.pixel_scale
        self.psf_fwhm_pix = fwhm / self.pixel_scale
        if noise is None:
            noise = GaussianNoise(self.default_sky_sigma, self.survey.gain_e_per_count)
        elif isinstance(noise, str):
            if noise.strip().lower() != "none":
                raise DeepmorphValueError(f"noise must be a noise model or 'none', got {noise!r}")
            noise = None
        if isinstance(noise, BackgroundNoise):
            noise.check_stamps(stamp_size, stamp_size)  # now, not once the output file exists
        self.noise = noise

    @property
    def zeropoint(self) -> float:
        return self.survey.zeropoint_mag

    @property
    def default_sky_sigma(self) -> float:
        """Sky noise per pixel (counts) that puts 5-sigma point sources at the preset's depth."""
        f5 = 10.0 ** (-0.4 * (self.survey.depth_5sigma_mag - self.zeropoint))
        return f5 / (5.0 * math.sqrt(self.psf_nea_pix))

    # -- metadata ------------------------------------------------------------------------------
    def psf_dict(self) -> dict:
        return {"type": "none"} if self.psf is None else self.psf.to_dict()

    def attributes(self, seed: int) -> dict:
        """Everything needed to reproduce the data, as HDF5-attribute-friendly values."""
        return {
            "survey": self.survey.name,
            "survey_preset": json.dumps(self.survey.to_dict()),
            "pixel_scale_arcsec": self.pixel_scale,
            "zeropoint_mag": self.zeropoint,
            "stamp_size": self.stamp_size,
            "psf": json.dumps(self.psf_dict()),
            "psf_fwhm_pix": self.psf_fwhm_pix,
            "noise": json.dumps(self.noise.to_dict() if self.noise is not None else {"type": "none"}),
            "priors": json.dumps(self.priors.to_dict()),
            "clumps": self.clumps,
            "neighbors": self.neighbors,
            "components": self.components,
            "seed": int(seed),
            "label_names": json.dumps(list(LABEL_NAMES)),
            "image_unit": self.survey.image_unit,
            "version": __version__,
        }

    def psf_image(self) -> np.ndarray | None:
        """The PSF image to store with a dataset (image PSFs only), float32."""
        if isinstance(self.psf, ImagePSF):
            return self.psf.image.astype(np.float32)
        return None

    # -- simulation ----------------------------------------------------------------------------
    def simulate(self, indices, seed: int, as_numpy: bool = True) -> dict:
        """Simulate items ``indices`` of the dataset with ``seed``.

        ``as_numpy=False`` keeps the images as torch tensors on the simulator's device (for
        training on the fly without a round trip through host memory); catalogues stay numpy.

        Returns
        -------
        dict
            ``images`` and ``noiseless`` ``(B, 1, S, S)`` float32 (counts); with components
            ``bulge`` and ``disk``; with clumps ``clump_mask`` ``(B, 1, S, S)`` uint8; with
            neighbours ``neighbor_mask``; ``catalog``: dict of numpy columns (see
            :data:`CATALOG_UNITS`); ``clump_table`` and ``neighbor_table``: dicts of
            per-object columns. All arrays are numpy.
        """
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DeepmorphValueError(f"seed must be a non-negative integer, got {seed!r}")
        idx = torch.as_tensor(np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices),
                              dtype=torch.int64, device=self.device)
        if idx.numel() == 0:
            raise DeepmorphValueError("nothing to simulate: empty index list")
        p = draw_galaxies(int(seed), idx, self.priors, self.zeropoint, self.stamp_size, self.clumps, self.neighbors)
        x, y = p["x_offset_pix"], p["y_offset_pix"]
        bt = p["bulge_to_total"]
        scene = {
            "bulge": Sersic(p["flux"] * bt, p["bulge_hlr_pix"], p["bulge_q"], p["pa_deg"], x, y, p["bulge_n"]),
            "disk": Sersic(p["flux"] * (1 - bt), p["disk_hlr_pix"], p["disk_q"], p["pa_deg"], x, y),
        }
        galaxy = ["bulge", "disk"]
        if self.clumps:
            scene["clumps"] = PointSources(p["clump_flux"], p["clump_x_pix"], p["clump_y_pix"])
            galaxy.append("clumps")
        outputs = {"noiseless": tuple(galaxy) + (("neighbors",) if self.neighbors else ())}
        if self.neighbors:
            scene["neighbors"] = Sersic(
                p["nbr_flux"], p["nbr_hlr_pix"], p["nbr_q"], p["nbr_pa_deg"], p["nbr_x_pix"], p["nbr_y_pix"],
                p["nbr_n"],
            )
            outputs["galaxy"] = tuple(galaxy)
            outputs["neighbors"] = ("neighbors",)
        if self.components:
            outputs["bulge"] = ("bulge",)
            outputs["disk"] = ("disk",)
        rendered = self.renderer.render(scene, outputs)
        noiseless = rendered["noiseless"]
        images = noiseless if self.noise is None else self.noise.apply(noiseless, int(seed), idx)

        out = {"images": images.float(), "noiseless": noiseless.float()}
        if self.components:
            out["bulge"] = rendered["bulge"]
            out["disk"] = rendered["disk"]
        if self.clumps:
            out["clump_mask"] = self._clump_mask(p)
        if self.neighbors:
            out["neighbor_mask"] = self._neighbor_mask(rendered)
        out = {k: v[:, None].cpu().numpy() if as_numpy else v[:, None] for k, v in out.items()}
        out.update(self._tables(idx, p))
        return out

    def _clump_mask(self, p: dict) -> torch.Tensor:
        """1 within ``max(1, FWHM/2)`` pixels of a clump centre, else 0."""
        s = self.stamp_size
        c = 0.5 * (s - 1)
        coords = torch.arange(s, device=self.device, dtype=torch.float64) - c
        radius = max(1.0, 0.5 * self.psf_fwhm_pix)
        dx = coords[None, None, None, :] - p["clump_x_pix"][:, :, None, None]
        dy = coords[None, None, :, None] - p["clump_y_pix"][:, :, None, None]
        inside = (dx**2 + dy**2 <= radius**2) & (p["clump_flux"] > 0)[:, :, None, None]
        return inside.any(dim=1).to(torch.uint8)

    def _neighbor_mask(self, rendered: dict) -> torch.Tensor:
        """1 where a companion's noise-free light exceeds both the galaxy's and the sky noise."""
        floor = self.noise.sky_sigma if self.noise is not None else 0.0
        nbr, gal = rendered["neighbors"], rendered["galaxy"]
        return ((nbr > gal) & (nbr > max(floor, 1e-12))).to(torch.uint8)

    def _tables(self, idx: torch.Tensor, p: dict) -> dict:
        def np_(t):
            return t.detach().cpu().numpy()

        scale = self.pixel_scale
        n = len(idx)
        cat = {
            "id": np_(idx).astype(np.int64),
            "mag": np_(p["mag"]),
            "flux": np_(p["flux"]),
            "bulge_to_total": np_(p["bulge_to_total"]),
            "bulge_flux": np_(p["flux"] * p["bulge_to_total"]),
            "disk_flux": np_(p["flux"] * (1 - p["bulge_to_total"])),
            "bulge_n": np_(p["bulge_n"]),
            "bulge_hlr_arcsec": np_(p["bulge_hlr_pix"]) * scale,
            "bulge_q": np_(p["bulge_q"]),
            "disk_hlr_arcsec": np_(p["disk_hlr_pix"]) * scale,
            "disk_q": np_(p["disk_q"]),
            "pa_deg": np_(p["pa_deg"]),
            "x_offset_pix": np_(p["x_offset_pix"]),
            "y_offset_pix": np_(p["y_offset_pix"]),
        }
        tables = {}
        if self.clumps:
            cflux = np_(p["clump_flux"])
            present = cflux > 0
            cat["n_clumps"] = present.sum(axis=1).astype(np.int64)
            cat["clump_flux_fraction"] = cflux.sum(axis=1) / cat["flux"]
            gal, slot = np.nonzero(present)
            tables["clump_table"] = {
                "id": cat["id"][gal],
                "clump": slot.astype(np.int64),
                "x_pix": np_(p["clump_x_pix"])[gal, slot],
                "y_pix": np_(p["clump_y_pix"])[gal, slot],
                "flux": cflux[gal, slot],
                "flux_fraction": cflux[gal, slot] / cat["flux"][gal],
            }
        else:
            cat["n_clumps"] = np.zeros(n, dtype=np.int64)
            cat["clump_flux_fraction"] = np.zeros(n)
        if self.neighbors:
            nflux = np_(p["nbr_flux"])
            present = nflux > 0
            cat["n_neighbors"] = present.sum(axis=1).astype(np.int64)
            gal, slot = np.nonzero(present)
            tables["neighbor_table"] = {
                "id": cat["id"][gal],
                "neighbor": slot.astype(np.int64),
                "x_pix": np_(p["nbr_x_pix"])[gal, slot],
                "y_pix": np_(p["nbr_y_pix"])[gal, slot],
                "mag": np_(p["nbr_mag"])[gal, slot],
                "flux": nflux[gal, slot],
                "sersic_n": np_(p["nbr_n"])[gal, slot],
                "hlr_arcsec": np_(p["nbr_hlr_pix"])[gal, slot] * scale,
                "q": np_(p["nbr_q"])[gal, slot],
                "pa_deg": np_(p["nbr_pa_deg"])[gal, slot],
            }
        else:
            cat["n_neighbors"] = np.zeros(n, dtype=np.int64)
        cat["label"] = morphology_label(
            cat["bulge_to_total"], cat["disk_q"], cat["clump_flux_fraction"] if self.clumps else None
        )
        return {"catalog": cat, **tables}


def config_from_attributes(attrs: dict) -> dict:
    """Keyword arguments that rebuild the :class:`Simulator` of a stored dataset (not its PSF image)."""
    return {
        "survey": attrs["survey"],
        "stamp_size": int(attrs["stamp_size"]),
        "pixel_scale_arcsec": float(attrs["pixel_scale_arcsec"]),
        "priors": Priors.from_dict(json.loads(attrs["priors"])),
        "clumps": bool(attrs["clumps"]),
        "neighbors": bool(attrs["neighbors"]),
        "components": bool(attrs["components"]),
    }


__all__ = ["Simulator", "CATALOG_UNITS", "config_from_attributes"]
