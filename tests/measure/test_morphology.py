"""statmorph features: sensible values on known galaxies, failures kept as NaN rows, parallel = serial, cache."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from deepmorph.errors import DeepmorphValueError
from deepmorph.measure import CACHE_GROUP, FEATURE_NAMES, dataset_features, morphology_features, segment
from deepmorph.measure import morphology as morphology_module

from .conftest import STAMP, one_galaxy


def _same(a, b) -> None:
    assert a.colnames == b.colnames
    for col in a.colnames:
        x, y = np.asarray(a[col]), np.asarray(b[col])
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=col)
        else:
            assert (x == y).all(), col


@pytest.fixture(scope="module")
def known():
    """A bright n=4 spheroid, a face-on n=1 disk and an edge-on disk (q=0.15), 48 x 48 px, S/N ~ 700 at peak."""
    spheroid, sim = one_galaxy(1.0, 4.0, 0.9, 3.0)
    disk, _ = one_galaxy(0.0, 1.0, 0.9, 4.0)
    edge_on, _ = one_galaxy(0.0, 1.0, 0.15, 5.0)
    psf = sim.renderer.psf_image(15).numpy()
    images = np.stack([spheroid, disk, edge_on])
    return images, psf, morphology_features(images, 0.05, psf=psf, n_jobs=1, progress=False)


def test_known_galaxies(known):
    _, _, f = known
    assert not f["failed"].any()
    sph, disk, edge = f[0], f[1], f[2]
    assert sph["concentration"] > disk["concentration"] + 0.2
    assert sph["sersic_n"] > 2.5 > disk["sersic_n"]  # statmorph fits the PSF-convolved Sersic model
    assert 0.6 < disk["sersic_n"] < 1.5 and 0.6 < edge["sersic_n"] < 1.5
    assert sph["gini"] > disk["gini"]
    assert edge["ellipticity_asymmetry"] > 0.6 > disk["ellipticity_asymmetry"]
    assert edge["orientation_deg"] == pytest.approx(30.0, abs=3.0)  # degrees CCW from +x, as simulated
    assert abs(edge["asymmetry"]) < 0.1 and abs(disk["asymmetry"]) < 0.1
    assert f["r80_pix"][0] > f["r20_pix"][0] > 0
    assert str(f["r20_pix"].unit) == "pix"


def test_segment_picks_the_central_galaxy_and_masks_neighbours(known):
    images, _, _ = known
    image = images[1].copy()
    image[2:8, 2:8] += 5.0  # a bright compact neighbour in the corner
    seg = segment(image.astype(">f4"), 0.05)  # big-endian input, as FITS gives
    assert seg.n_sources == 2
    assert seg.segmap[STAMP // 2, STAMP // 2] == 1 and seg.segmap.max() == 1
    assert seg.mask[4, 4] and not seg.segmap[4, 4] and not seg.mask[STAMP // 2, STAMP // 2]
    blank = segment(np.random.default_rng(0).normal(0, 1, (STAMP, STAMP)), 1.0)
    assert blank.n_sources == 0 and not blank.segmap.any()


def test_failures_are_nan_rows_not_dropped(known):
    images, _, _ = known
    rng = np.random.default_rng(3)
    noise = rng.normal(0.0, 0.05, (2, STAMP, STAMP)).astype(np.float32)
    nan_pixels = images[1].copy()
    nan_pixels[:5] = np.nan  # a few NaN rows: masked, still measured
    stack = np.stack([noise[0], images[0], noise[1], np.full((STAMP, STAMP), np.nan, np.float32), nan_pixels])
    f = morphology_features(stack[:, None], 0.05, n_jobs=1, progress=False)  # (N, 1, H, W) is fine too
    assert len(f) == 5
    assert f["failed"].tolist() == [True, False, True, True, False]
    for i in (0, 2, 3):
        assert all(np.isnan(f[name][i]) for name in FEATURE_NAMES)
        assert f["flag"][i] == 4 and f["sersic_flag"][i] == 4 and f["fail_reason"][i]
    assert "no source" in f["fail_reason"][0] and "finite" in f["fail_reason"][3]
    assert f["fail_reason"][1] == "" and np.isfinite(f["concentration"][1])
    assert np.isfinite(f["gini"][4])
    values = np.stack([np.asarray(f[name]) for name in FEATURE_NAMES])
    assert not np.any(values == -99.0)


def test_bad_input_raises():
    with pytest.raises(DeepmorphValueError, match="sky noise"):
        morphology_features(np.zeros((2, 16, 16)), -1.0, n_jobs=1, progress=False)
    with pytest.raises(DeepmorphValueError, match="one channel"):
        morphology_features(np.zeros((2, 3, 16, 16)), 1.0, n_jobs=1, progress=False)
    with pytest.raises(DeepmorphValueError, match="one per image"):
        morphology_features(np.zeros((2, 16, 16)), [1.0, 1.0, 1.0], n_jobs=1, progress=False)
    with pytest.raises(DeepmorphValueError, match="n_jobs"):
        morphology_features(np.zeros((2, 16, 16)), 1.0, n_jobs=0, progress=False)


def test_parallel_equals_serial(forest_sim):
    images = forest_sim.simulate(range(12), seed=4)["images"]
    sigma = forest_sim.noise.sky_sigma
    serial = morphology_features(images, sigma, n_jobs=1, progress=False)
    parallel = morphology_features(images, sigma, n_jobs=2, chunk_size=3, progress=False)  # spawned processes
    assert not serial["failed"].any()
    _same(serial, parallel)
    assert parallel.meta["statmorph_version"] and parallel.meta["sky_sigma"] == pytest.approx(sigma)


@pytest.fixture
def small_dataset(tmp_path, forest_sim):
    from deepmorph.data import write_dataset

    return write_dataset(tmp_path / "sims.h5", forest_sim, 6, seed=2, progress=False)


def test_dataset_cache_round_trip(small_dataset, forest_sim, monkeypatch):
    from deepmorph.data import open_dataset

    first = dataset_features(small_dataset, n_jobs=1, progress=False)
    assert len(first) == 6 and first["id"].tolist() == list(range(6))
    with h5py.File(small_dataset, "r") as f:
        group = f[CACHE_GROUP]
        assert group.attrs["sky_sigma"] == pytest.approx(forest_sim.noise.sky_sigma)
        assert group.attrs["statmorph_version"]
        assert set(FEATURE_NAMES) <= set(group)
        assert [k for k in f["features"] if k.startswith(".")] == []  # no temporary group left behind
    with open_dataset(small_dataset) as ds:  # the dataset itself is untouched
        assert len(ds) == 6 and ds.images.shape == (6, 1, STAMP, STAMP)

    def boom(*args, **kwargs):
        raise AssertionError("features recomputed despite a valid cache")

    monkeypatch.setattr(morphology_module, "_run", boom)
    second = dataset_features(small_dataset, n_jobs=1, progress=False)
    _same(first, second)
    with pytest.raises(AssertionError, match="recomputed"):
        dataset_features(small_dataset, n_jobs=1, progress=False, recompute=True)
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: the cache does not apply
        dataset_features(small_dataset, n_jobs=1, progress=False, threshold=3.0)
