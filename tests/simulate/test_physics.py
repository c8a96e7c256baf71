"""Analytic identities the renderer must satisfy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from deepmorph.simulate import GaussianPSF, PointSources, Renderer, Sersic, sersic_b
from deepmorph.simulate.profiles import exponential_ft, sersic_table


def _one(**kw):
    return {k: torch.tensor([v], dtype=torch.float64) for k, v in kw.items()}


def _sersic(flux=1000.0, hlr=6.0, q=1.0, pa=0.0, x=0.0, y=0.0, n=None):
    p = _one(flux=flux, hlr=hlr, q=q, pa=pa, x=x, y=y)
    return Sersic(p["flux"], p["hlr"], p["q"], p["pa"], p["x"], p["y"], None if n is None else torch.tensor([n]))


def _render(comp, stamp=96, psf=None, scale=1.0):
    r = Renderer(stamp, scale, psf)
    return r.render({"g": comp}, {"img": ("g",)})["img"][0].double().numpy()


def test_sersic_b_known_values():
    assert sersic_b(1.0) == pytest.approx(1.678346990, abs=1e-8)
    assert sersic_b(4.0) == pytest.approx(7.669249443, abs=1e-8)


def test_tabulated_transform_matches_closed_forms():
    table = sersic_table("cpu")
    k = torch.logspace(-3, 3, 400)
    n = torch.tensor([1.0, 0.5])
    f = table.evaluate(table.rows(n), n, (k**2)[None].repeat(2, 1)).double()
    exp = exponential_ft((k.double() / 1.6783469900166608) ** 2)
    gauss = torch.exp(-(k.double() ** 2) / (4 * math.log(2)))  # hlr = 1 Gaussian
    assert float((f[0] - exp).abs().max()) < 1e-5
    assert float((f[1] - gauss).abs().max()) < 1e-5


@pytest.mark.parametrize("n", [None, 0.5, 1.5])
def test_pixel_sum_equals_flux(n):
    img = _render(_sersic(flux=1234.5, hlr=3.0, q=0.6, pa=30.0, n=n), stamp=96, psf=GaussianPSF(2.0))
    assert img.sum() == pytest.approx(1234.5, rel=1e-4)


@pytest.mark.parametrize("n,q", [(1.0, 1.0), (2.5, 1.0), (4.0, 0.5), (None, 0.4)])
def test_half_light_radius_along_major_axis_encloses_half_the_flux(n, q):
    """No PSF: the ellipse with semi-axes (hlr, q hlr) holds half the total flux."""
    hlr, pa = 12.0, 25.0
    stamp = 255
    img = _render(_sersic(flux=1.0, hlr=hlr, q=q, pa=pa, n=n), stamp=stamp)
    # Integrate on a 5x5 sub-pixel grid of each pixel's area (the image is pixel-integrated
    # already, so spread each pixel's value uniformly over its area).
    sub = 5
    off = (np.arange(sub) + 0.5) / sub - 0.5
    c = 0.5 * (stamp - 1)
    yy, xx = np.indices(img.shape, dtype=float)
    th = math.radians(pa)
    inside = np.zeros_like(img)
    for dy in off:
        for dx in off:
            u = (xx + dx - c) * math.cos(th) + (yy + dy - c) * math.sin(th)
            v = -(xx + dx - c) * math.sin(th) + (yy + dy - c) * math.cos(th)
            inside += ((u / hlr) ** 2 + (v / (q * hlr)) ** 2 <= 1.0) / sub**2
    assert (img * inside).sum() == pytest.approx(0.5, abs=2e-3)


def test_light_beyond_the_stamp_is_lost_not_folded_back():
    """A compact de Vaucouleurs galaxy: the stamp holds the analytic share of its light."""
    hlr, stamp, n = 2.0, 64, 4.0
    img = _render(_sersic(flux=1.0, hlr=hlr, n=n), stamp=stamp)

    def enclosed(r):
        return scipy.special.gammainc(2 * n, sersic_b(n) * (r / hlr) ** (1 / n))

    # The square stamp lies between its inscribed and circumscribed circles.
    assert enclosed(stamp / 2) - 1e-3 <= img.sum() <= enclosed(stamp / math.sqrt(2)) + 1e-3


def test_sersic_half_is_a_gaussian():
    """Sersic n = 0.5 with half-light radius r is a Gaussian of sigma = r / sqrt(2 ln 2)."""
    hlr = 3.0
    sersic = _render(_sersic(flux=100.0, hlr=hlr, n=0.5, x=0.3, y=-0.2), stamp=48)
    fwhm = 2 * hlr  # FWHM = 2 sqrt(2 ln 2) sigma = 2 r for a Gaussian
    z = torch.zeros(1, 1, dtype=torch.float64)
    point = PointSources(torch.full((1, 1), 100.0, dtype=torch.float64), z + 0.3, z - 0.2)
    gauss = _render(point, stamp=48, psf=GaussianPSF(fwhm))
    assert np.abs(sersic - gauss).max() / gauss.max() < 1e-4


def _moments(img):
    yy, xx = np.indices(img.shape, dtype=float)
    w = img / img.sum()
    cx, cy = (w * xx).sum(), (w * yy).sum()
    return (w * (xx - cx) ** 2).sum(), (w * (yy - cy) ** 2).sum(), (w * (xx - cx) * (yy - cy)).sum()


@pytest.mark.parametrize("pa", [0.0, 30.0, 90.0, 135.0])
def test_position_angle_is_counter_clockwise_from_x(pa):
    """The second-moment orientation, 0.5 atan2(2 Ixy, Ixx - Iyy), is the PA ([y, x] arrays)."""
    ixx, iyy, ixy = _moments(_render(_sersic(hlr=6.0, q=0.3, pa=pa, n=1.0), stamp=96))
    measured = math.degrees(0.5 * math.atan2(2 * ixy, ixx - iyy))
    difference = (measured - pa + 90.0) % 180.0 - 90.0  # PA is defined modulo 180 deg
    assert abs(difference) < 0.2


def test_offset_moves_the_centroid_by_that_many_pixels():
    img = _render(_sersic(hlr=3.0, q=0.7, pa=10.0, x=1.25, y=-0.75, n=2.0), stamp=64, psf=GaussianPSF(2.5))
    yy, xx = np.indices(img.shape)
    c = 31.5
    assert (img * xx).sum() / img.sum() - c == pytest.approx(1.25, abs=0.02)
    assert (img * yy).sum() / img.sum() - c == pytest.approx(-0.75, abs=0.02)
