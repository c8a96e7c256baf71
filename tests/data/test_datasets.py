"""Splits, normalisation, file and on-the-fly datasets, seeded loaders."""

from __future__ import annotations

import json
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch

from deepmorph.data import (
    Normalization,
    SimulatedDataset,
    StampDataset,
    make_loader,
    robust_sigma,
    split_indices,
    write_dataset,
)
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import LABEL_NAMES, Simulator

N, SEED, SIZE = 40, 3, 32


@pytest.fixture(scope="module")
def sim() -> Simulator:
    return Simulator("candels-f160w", stamp_size=SIZE, psf="gaussian:0.18", clumps=True)


@pytest.fixture(scope="module")
def h5file(sim, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "sims.h5", sim, N, SEED, batch_size=16, progress=False)


@pytest.fixture
def bad_copy(h5file, tmp_path):
    """A copy of the dataset with NaN pixels in item 3 and a NaN bulge_n in item 5."""
    path = tmp_path / "bad.h5"
    shutil.copy(h5file, path)
    with h5py.File(path, "r+") as f:
        img = f["images"][3]
        img[0, 10, 12] = np.nan
        img[0, 0, 0] = np.inf
        f["images"][3] = img
        f["catalog/bulge_n"][5] = np.nan
    return path


# -- splits --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 10, 101, 1000])
def test_split_deterministic_disjoint_covering(n):
    a = split_indices(n, seed=5)
    b = split_indices(n, seed=5)
    assert set(a) == {"train", "val", "test"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == np.int64
    joined = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(joined) == n and len(np.unique(joined)) == n and joined.min() == 0 and joined.max() == n - 1
    assert len(a["train"]) == round(0.8 * n)
    assert len(a["val"]) == min(round(0.1 * n), n - len(a["train"]))


def test_split_seed_and_fractions():
    a, b = split_indices(1000, 0), split_indices(1000, 1)
    assert not np.array_equal(a["test"], b["test"])
    c = split_indices(1000, 0, fractions=(0.5, 0.25, 0.25))
    assert [len(c[k]) for k in ("train", "val", "test")] == [500, 250, 250]
    for bad in [(0.5, 0.5), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2), (np.nan, 0.5, 0.5)]:
        with pytest.raises(DeepmorphValueError, match="fractions"):
            split_indices(100, 0, fractions=bad)
    with pytest.raises(DeepmorphValueError, match="n must"):
        split_indices(0, 0)
    with pytest.raises(DeepmorphValueError, match="seed"):
        split_indices(10, -1)


# -- file datasets -------------------------------------------------------------------------------
def test_stamp_items_equal_stored_arrays(h5file):
    idx = np.array([5, 3, 17, 39])
    ds = StampDataset(h5file, indices=idx, masks=["clump_mask"])
    assert len(ds) == 4 and ds.label_names == list(LABEL_NAMES) and ds.n_classes == 4
    with h5py.File(h5file) as f:
        images, masks, labels = f["images"][...], f["clump_mask"][...], f["catalog/label"][...]
    for i, j in enumerate(idx):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, SIZE, SIZE)
        np.testing.assert_array_equal(item["image"].numpy(), images[j])
        assert item["target"].dtype == torch.int64 and item["target"].shape == ()
        assert int(item["target"]) == labels[j]
        assert item["index"] == j
        assert item["clump_mask"].dtype == torch.float32
        np.testing.assert_array_equal(item["clump_mask"].numpy(), masks[j].astype(np.float32))
    np.testing.assert_array_equal(ds.catalog["id"], idx)
    assert ds[-1]["index"] == 39
    with pytest.raises(IndexError):
        ds[4]
    # the whole-batch path gives what a loader collates, in the requested order
    batch = ds.batch([2, 0, 2])
    np.testing.assert_array_equal(batch["image"].numpy(), images[[17, 5, 17]])
    np.testing.assert_array_equal(batch["target"].numpy(), labels[[17, 5, 17]])
    np.testing.assert_array_equal(batch["index"].numpy(), [17, 5, 17])
    mem = StampDataset(h5file, indices=idx, masks=["clump_mask"], in_memory=True)
    for i in range(len(idx)):
        for key in ("image", "target", "clump_mask"):
            assert torch.equal(mem[i][key], ds[i][key])


def test_stamp_regression_target_and_pickle(h5file):
    cols = ["bulge_n", "disk_q", "pa_deg"]
    ds = StampDataset(h5file, indices=[1, 2], target=cols)
    with h5py.File(h5file) as f:
        want = np.stack([f["catalog"][c][[1, 2]] for c in cols], axis=-1).astype(np.float32)
    assert ds[0]["target"].dtype == torch.float32 and ds[0]["target"].shape == (3,)
    np.testing.assert_array_equal(torch.stack([ds[0]["target"], ds[1]["target"]]).numpy(), want)
    ds[0]  # the handle is open now; the pickle must not carry it
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._ds is None
    assert torch.equal(clone[1]["image"], ds[1]["image"])
    assert "target" not in StampDataset(h5file, target=None)[0]


def test_stamp_errors_name_the_file(h5file, tmp_path):
    with pytest.raises(DeepmorphValueError, match=r"sims\.h5.*sersic_index.*not in the catalogue"):
        StampDataset(h5file, target=["bulge_n", "sersic_index"])
    with pytest.raises(DeepmorphValueError, match=r"sims\.h5: no array 'neighbor_mask'"):
        StampDataset(h5file, masks=["neighbor_mask"])
    with pytest.raises(DeepmorphValueError, match="indices must lie in"):
        StampDataset(h5file, indices=[0, N])
    with pytest.raises(DeepmorphIOError, match="no such file"):
        StampDataset(tmp_path / "missing.h5")


def test_nan_pixels_raise_or_are_skipped(bad_copy):
    ds = StampDataset(bad_copy)
    ds[2]
    with pytest.raises(DeepmorphValueError, match=r"bad\.h5: item 3 has 2 NaN/inf pixel"):
        ds[3]
    with pytest.raises(DeepmorphValueError, match="item 3"):
        ds.batch([0, 3])
    with pytest.warns(UserWarning, match="skipped 1 of 40"):
        clean = StampDataset(bad_copy, skip_bad=True)
    assert len(clean) == N - 1 and clean.skipped.tolist() == [3] and 3 not in clean.indices
    assert all(torch.isfinite(clean[i]["image"]).all() for i in range(len(clean)))
    # a NaN regression target: an error at construction, or skipped
    with pytest.raises(DeepmorphValueError, match=r"non-finite or missing target \(bulge_n\).*\[5\]"):
        StampDataset(bad_copy, target=["bulge_n"])
    with pytest.warns(UserWarning, match="skipped 2 of 40"):
        reg = StampDataset(bad_copy, target=["bulge_n"], skip_bad=True)
    assert reg.skipped.tolist() == [3, 5]
    assert torch.isfinite(torch.stack([reg[i]["target"] for i in range(len(reg))])).all()


def test_loader_with_two_workers_is_reproducible(h5file):
    ds = StampDataset(h5file, masks=["clump_mask"])

    def batches(seed):
        loader = make_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=seed)
        return [b for _ in range(2) for b in loader]  # two epochs

    a, b, c = batches(11), batches(11), batches(12)
    assert len(a) == 10
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
        assert torch.equal(x["clump_mask"], y["clump_mask"])
    assert not torch.equal(a[0]["index"], a[5]["index"])  # reshuffled each epoch
    assert not all(torch.equal(x["index"], z["index"]) for x, z in zip(a, c, strict=True))
    assert sorted(torch.cat([x["index"] for x in a[:5]]).tolist()) == list(range(N))
    # what the loader collates is what the items are
    assert torch.equal(a[0]["image"][1], ds[int(a[0]["index"][1])]["image"])
    with pytest.raises(DeepmorphValueError, match="batch_size"):
        make_loader(ds, batch_size=0)


# -- normalisation -------------------------------------------------------------------------------
def test_asinh_auto_scale_is_the_sky_noise(h5file, sim):
    ds = StampDataset(h5file)
    norm = Normalization("asinh").fit(ds)
    assert norm.fitted and not Normalization("asinh").fitted
    assert norm.scale[0] == pytest.approx(sim.noise.sky_sigma, rel=0.1)
    x = ds[0]["image"]
    torch.testing.assert_close(norm(x), torch.asinh(x / norm.scale[0]))
    # fitting on the array or the h5py dataset gives the same scale
    with h5py.File(h5file) as f:
        assert Normalization("asinh").fit(f["images"]).scale == pytest.approx(norm.scale)
        assert Normalization("asinh").fit(f["images"][...]).scale == pytest.approx(norm.scale)
    rng = np.random.default_rng(0)
    assert robust_sigma(rng.normal(0, 2.0, 100_000)) == pytest.approx(2.0, rel=0.02)


def test_normalization_kinds_and_round_trip(h5file):
    with h5py.File(h5file) as f:
        images = torch.from_numpy(f["images"][...])
    std = Normalization("standardize")(images)
    torch.testing.assert_close(std.mean(dim=(-2, -1)), torch.zeros(N, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(std.std(dim=(-2, -1), unbiased=False), torch.ones(N, 1), atol=1e-4, rtol=0)
    glob = Normalization("dataset").fit(images)
    assert glob.mean[0] == pytest.approx(float(images.double().mean()), rel=1e-6)
    assert glob.std[0] == pytest.approx(float(images.double().std(unbiased=False)), rel=1e-6)
    out = glob(images)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5) and float(out.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(Normalization("none")(images), images)
    for norm in (Normalization("asinh", scale=0.02), glob, Normalization("standardize"),
                 Normalization("asinh").fit(images)):
        text = json.dumps(norm.to_dict())
        again = Normalization.from_dict(json.loads(text))
        assert again == norm
        assert torch.equal(again(images[:4]), norm(images[:4]))
        assert torch.equal(norm(images[0]), norm(images[:1])[0])  # (C, H, W) and (B, C, H, W) alike
    with pytest.raises(DeepmorphValueError, match="fitted first"):
        Normalization("dataset")(images)
    with pytest.raises(DeepmorphValueError, match="kind"):
        Normalization("minmax")
    with pytest.raises(DeepmorphValueError, match="scale"):
        Normalization("asinh", scale=-1.0)
    with pytest.raises(DeepmorphValueError, match="unknown normalization"):
        Normalization.from_dict({"kind": "asinh", "softening": 1})
    with pytest.raises(DeepmorphValueError, match="3 per-channel values but the images have 1 channel"):
        Normalization("asinh", scale=(1.0, 2.0, 3.0))(images)
    with pytest.raises(DeepmorphValueError, match="un-normalised"):
        Normalization("asinh").fit(StampDataset(h5file, normalization=Normalization("asinh", scale=1.0)))


def test_dataset_applies_normalization(h5file):
    norm = Normalization("asinh", scale=0.05)
    raw, normed = StampDataset(h5file), StampDataset(h5file, normalization=norm)
    assert torch.equal(normed[7]["image"], torch.asinh(raw[7]["image"] / 0.05))
    assert torch.equal(normed.batch([7])["image"][0], normed[7]["image"])


# -- on-the-fly datasets -------------------------------------------------------------------------
def test_simulated_dataset_fresh_each_epoch_and_reproducible(sim):
    ds = SimulatedDataset(sim, length=6, seed=9, offset=100, masks=["clump_mask"])
    assert ds.label_names == list(LABEL_NAMES) and ds.n_classes == 4
    e0 = [ds[i] for i in range(6)]
    ds.set_epoch(1)
    e1 = [ds[i] for i in range(6)]
    assert [x["index"] for x in e0] == list(range(100, 106)) and [x["index"] for x in e1] == list(range(106, 112))
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(e0, e1, strict=True))
    ds.set_epoch(0)
    for a in e0:
        b = ds[a["index"] - 100]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "target", "clump_mask"))
    # item i of epoch e is simulator item offset + e * length + i
    ref = sim.simulate([100 + 1 * 6 + 4], 9)
    np.testing.assert_array_equal(e1[4]["image"].numpy(), ref["images"][0])
    np.testing.assert_array_equal(e1[4]["clump_mask"].numpy(), ref["clump_mask"][0])
    assert int(e1[4]["target"]) == ref["catalog"]["label"][0]
    # the batched path simulates the same galaxies
    ds.set_epoch(1)
    batch = ds.batch([4, 0, 5])
    ref = sim.simulate([110, 106, 111], 9)
    np.testing.assert_array_equal(batch["image"].numpy(), ref["images"])
    np.testing.assert_array_equal(batch["target"].numpy(), ref["catalog"]["label"])
    assert batch["index"].tolist() == [110, 106, 111]
    torch.testing.assert_close(batch["image"][0], e1[4]["image"], rtol=1e-5, atol=1e-6)


def test_simulated_dataset_targets_loader_and_errors(sim):
    ds = SimulatedDataset(sim, length=8, seed=2, target=["bulge_to_total", "disk_q"],
                          normalization=Normalization("asinh", scale=0.01))
    item = ds[3]
    ref = sim.simulate([3], 2)
    assert item["target"].dtype == torch.float32
    np.testing.assert_array_equal(item["target"].numpy(),
                                  np.array([ref["catalog"]["bulge_to_total"][0], ref["catalog"]["disk_q"][0]],
                                           dtype=np.float32))
    torch.testing.assert_close(item["image"], torch.asinh(torch.from_numpy(ref["images"][0]) / 0.01))
    ds.set_epoch(2)
    a = list(make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=0))
    b = list(make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=0))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat([x["index"] for x in a]).tolist()) == list(range(16, 24))
    # a batched fetch (one simulate call per batch in a worker) gives the galaxies of single items
    first = int(a[0]["index"][0])
    torch.testing.assert_close(a[0]["image"][0], ds[first - 16]["image"], rtol=0, atol=0)
    with pytest.raises(DeepmorphValueError, match="sersic_index"):
        SimulatedDataset(sim, 8, 0, target=["sersic_index"])
    with pytest.raises(DeepmorphValueError, match="neighbor_mask"):
        SimulatedDataset(sim, 8, 0, masks=["neighbor_mask"])
    with pytest.raises(DeepmorphValueError, match="length"):
        SimulatedDataset(sim, 0, 0)
    with pytest.raises(IndexError):
        ds[8]
