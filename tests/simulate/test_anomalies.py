"""The anomaly benchmark: masks where the anomaly is, reproducible items, every kind changes the image."""

from __future__ import annotations

import numpy as np
import pytest

from deepmorph.data import StampDataset
from deepmorph.errors import DeepmorphValueError
from deepmorph.simulate.anomalies import KINDS, AnomalySimulator, read_benchmark, write_benchmark


@pytest.fixture(scope="module")
def sim():
    return AnomalySimulator(stamp_size=32, n_normal=8, n_per_kind=8)


@pytest.fixture(scope="module")
def batch(sim):
    return sim.simulate(np.arange(sim.n), seed=3)


def test_layout_and_kinds(sim, batch):
    assert sim.n == 8 * len(KINDS)
    assert list(batch["kind"][:8]) == ["normal"] * 8
    assert list(dict.fromkeys(batch["kind"])) == list(KINDS)
    assert np.array_equal(batch["catalog"]["anomaly"], (batch["kind"] != "normal").astype(int))


def test_normal_items_are_untouched(batch):
    normal = batch["kind"] == "normal"
    assert np.array_equal(batch["images"][normal], batch["galaxy"][normal])
    assert batch["anomaly_mask"][normal].sum() == 0


@pytest.mark.parametrize("kind", KINDS[1:])
def test_each_kind_changes_the_image_where_its_mask_is(sim, batch, kind):
    sel = np.flatnonzero(batch["kind"] == kind)
    sigma = sim.sky_sigma
    for i in sel:
        diff = np.abs(batch["images"][i, 0] - batch["galaxy"][i, 0])
        mask = batch["anomaly_mask"][i, 0].astype(bool)
        assert mask.any(), f"{kind} item {i}: empty mask"
        assert diff.max() > 3 * sigma, f"{kind} item {i} does not change the image"
        peak = np.unravel_index(np.argmax(diff), diff.shape)
        assert mask[peak], f"{kind} item {i}: the largest change lies outside the mask"
        # most of the injected light lies inside the mask
        assert diff[mask].sum() > 0.7 * diff.sum()


def test_masks_are_located_where_injected(sim, batch):
    s = sim.stamp_size
    yy, xx = np.mgrid[0:s, 0:s] - 0.5 * (s - 1)
    for i in np.flatnonzero(batch["kind"] == "companion"):
        m = batch["anomaly_mask"][i, 0].astype(bool)
        # the companion sits 0.15-0.35 stamp widths from the galaxy: its mask's centre is off-centre
        assert np.hypot(xx[m].mean(), yy[m].mean()) > 2.5
    for i in np.flatnonzero(batch["kind"] == "bad_column"):
        m = batch["anomaly_mask"][i, 0].astype(bool)
        assert len(np.unique(np.nonzero(m)[1])) == 1  # one column
    for i in np.flatnonzero(batch["kind"] == "satellite_trail"):
        m = batch["anomaly_mask"][i, 0].astype(bool)
        assert m.sum() >= s // 2  # a line across the stamp


def test_reproducible_from_seed_and_index(sim, batch):
    again = sim.simulate([40, 3, 17], seed=3)
    for key in ("images", "anomaly_mask", "galaxy"):
        assert np.array_equal(again[key], batch[key][[40, 3, 17]])
    other = sim.simulate([40, 3, 17], seed=4)
    assert not np.array_equal(other["images"], again["images"])
    # explicit kinds: the same galaxy, a different anomaly
    forced = sim.simulate([3, 3], seed=3, kinds=["cosmic_ray", "bad_column"])
    assert np.array_equal(forced["galaxy"][0], forced["galaxy"][1])
    assert not np.array_equal(forced["images"][0], forced["images"][1])
    with pytest.raises(DeepmorphValueError, match="unknown anomaly kind"):
        sim.simulate([1], seed=0, kinds=["dragon"])


def test_benchmark_file_roundtrip(tmp_path):
    path = write_benchmark(tmp_path / "bench.h5", n_normal=4, n_per_kind=2, seed=1, kinds=["companion", "cosmic_ray"],
                           progress=False)
    b = read_benchmark(path)
    assert list(b["kind"]) == ["normal"] * 4 + ["companion"] * 2 + ["cosmic_ray"] * 2
    assert b["images"].shape == (8, 1, 32, 32) and b["anomaly_mask"].shape == (8, 1, 32, 32)
    direct = AnomalySimulator(stamp_size=32, n_normal=4, n_per_kind=2, kinds=["companion", "cosmic_ray"]).simulate(
        np.arange(8), seed=1)
    assert np.array_equal(b["images"], direct["images"])
    assert np.array_equal(b["anomaly_mask"], direct["anomaly_mask"])
    ds = StampDataset(path, target=None)
    assert len(ds) == 8 and ds[5]["image"].shape == (1, 32, 32)
    assert not (tmp_path / "bench.h5.building").exists()
