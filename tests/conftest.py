"""Shared fixtures: paths to the real data in ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores on CI: one torch thread per xdist worker avoids oversubscription.
torch.set_num_threads(1)


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data file {path} is not available (see ../shared/data/README.md)")
    return path


@pytest.fixture
def hst_psf_file() -> Path:
    return shared_file("hst_acs_psf/real_galaxy_PSF_images.fits")


@pytest.fixture
def ntt_image_file() -> Path:
    return shared_file("ntt_emmi_field/image.fits")
