"""GalSim renderings of the same galaxies, the reference our renderer is tested against."""

from __future__ import annotations

import pytest

galsim = pytest.importorskip("galsim")

from deepmorph.simulate.reference import catalog_rows as rows  # noqa: E402
from deepmorph.simulate.reference import galsim_stamp, relative_l2  # noqa: E402

__all__ = ["galsim", "galsim_stamp", "relative_l2", "rows"]
