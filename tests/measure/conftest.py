"""Shared, module-cached simulations and features for the measure tests (statmorph is slow)."""

from __future__ import annotations

import numpy as np
import pytest

from deepmorph.simulate import Priors, Simulator
from deepmorph.simulate.noise import GaussianNoise

STAMP = 48
# Small, bright, class-balanced galaxies that stay inside 48 x 48 stamps.
FOREST_PRIORS = Priors(balanced_classes=True, mag=(18.0, 22.0), log10_bulge_hlr_pix=(0.2, 0.9),
                       log10_disk_hlr_pix=(0.3, 1.0))


def one_galaxy(bulge_to_total: float, n: float, q: float, hlr_pix: float, sky_sigma: float = 0.05,
               stamp: int = STAMP) -> tuple[np.ndarray, Simulator]:
    """A single centred mag-18 galaxy (bulge and disk share n's profile parameters), and its simulator."""
    lg = float(np.log10(hlr_pix))
    priors = Priors(mag=(18.0, 18.0), bulge_to_total=(bulge_to_total, bulge_to_total), bulge_n=(n, n),
                    log10_bulge_hlr_pix=(lg, lg), log10_disk_hlr_pix=(lg, lg), bulge_ellipticity=(1 - q, 1 - q),
                    disk_ellipticity=(1 - q, 1 - q), pa_deg=(30.0, 30.0), max_offset_pix=0.0)
    sim = Simulator("candels-f160w", stamp_size=stamp, psf="gaussian:0.18", priors=priors,
                    noise=GaussianNoise(sky_sigma))
    return sim.simulate([0], seed=0)["images"][0, 0], sim


@pytest.fixture(scope="session")
def forest_sim() -> Simulator:
    return Simulator("candels-f160w", stamp_size=STAMP, psf="gaussian:0.18", priors=FOREST_PRIORS)
