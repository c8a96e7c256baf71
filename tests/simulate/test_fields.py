"""Fields of galaxies and stars: reproducibility, truth consistency, physics, the HDF5 store, errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from deepmorph.cli import main
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate.fields import (
    FIELD_CLASSES,
    STAR_LABEL,
    FieldSimulator,
    blended_flags,
    blended_pairs,
    composite_hlr,
    open_fields,
    write_fields,
)


@pytest.fixture(scope="module")
def sim():
    return FieldSimulator("candels-f160w", size=96)


@pytest.fixture(scope="module")
def fields(sim):
    return [sim.simulate_field(i, seed=3) for i in range(4)]


def test_same_seed_same_field_whatever_the_order(sim, fields):
    again = sim.simulate_field(2, seed=3)
    assert np.array_equal(again["image"], fields[2]["image"])
    assert np.array_equal(again["segmap"], fields[2]["segmap"])
    for key, value in fields[2]["objects"].items():
        np.testing.assert_array_equal(again["objects"][key], value)
    other = sim.simulate_field(2, seed=4)
    assert not np.array_equal(other["image"], fields[2]["image"])


def test_objects_are_the_four_classes_and_stars(fields, sim):
    labels = np.concatenate([f["objects"]["label"] for f in fields])
    counts = [len(f["objects"]["x"]) for f in fields]
    # Poisson mean 12 per 10^4 px: ~11 per 96 x 96 field.
    assert 3 <= np.mean(counts) <= 25
    assert set(labels) <= set(range(len(FIELD_CLASSES)))
    assert FIELD_CLASSES[STAR_LABEL] == "star" and len(set(labels)) >= 4
    stars = np.concatenate([f["objects"]["label"] == STAR_LABEL for f in fields])
    assert np.all(np.isnan(np.concatenate([f["objects"]["pa_deg"] for f in fields])[stars]))
    assert np.all(np.concatenate([f["objects"]["hlr_arcsec"] for f in fields])[stars] == 0)


def test_segmap_ids_boxes_and_npix_agree_with_the_table(fields):
    for f in fields:
        o, seg = f["objects"], f["segmap"]
        n = len(o["x"])
        assert seg.dtype == np.int32 and seg.min() >= 0 and seg.max() <= n
        assert set(np.unique(seg)) - {0} == set(o["id"][o["npix"] > 0] + 1)
        np.testing.assert_array_equal(o["npix"], np.bincount(seg.ravel(), minlength=n + 1)[1:])
        for k in range(n):
            if o["npix"][k] == 0:
                assert np.isnan(o["x0"][k])
                continue
            ys, xs = np.nonzero(seg == k + 1)
            assert (o["x0"][k], o["x1"][k]) == (xs.min() - 0.5, xs.max() + 0.5)
            assert (o["y0"][k], o["y1"][k]) == (ys.min() - 0.5, ys.max() + 0.5)


def test_boxes_contain_their_centres(fields):
    checked = 0
    for f in fields:
        o = f["objects"]
        # An unblended object dominates its own centre, so its box holds it.
        keep = (o["npix"] > 0) & ~o["blended"]
        assert np.all((o["x0"][keep] <= o["x"][keep]) & (o["x"][keep] <= o["x1"][keep]))
        assert np.all((o["y0"][keep] <= o["y"][keep]) & (o["y"][keep] <= o["y1"][keep]))
        checked += keep.sum()
    assert checked >= 10


def test_image_flux_is_the_sum_of_true_fluxes_plus_noise(fields, sim):
    for f in fields:
        model, image, o = f["noiseless"].astype(float), f["image"].astype(float), f["objects"]
        # Only light falling off the field's edges is missing from the model.
        assert model.sum() <= 1.001 * o["flux"].sum()
        sigma_total = np.sqrt(model.size * sim.sky_sigma**2 + np.clip(model, 0, None).sum() / sim.gain)
        assert abs(image.sum() - model.sum()) < 5 * sigma_total
        sky = (f["segmap"] == 0) & (model < 0.05 * sim.sky_sigma)
        resid = (image - model)[sky]
        assert np.std(resid) == pytest.approx(sim.sky_sigma, rel=0.08)


def test_each_object_renders_its_true_flux(sim):
    p = sim.draw_objects(1, seed=3)
    stamps = sim._stamp_sizes(p)
    for s in np.unique(stamps):
        pick = np.flatnonzero(stamps == s)
        models, _, _ = sim._render_objects(p, stamps, pick)
        # Each object's own stamp holds its total flux (galaxy + clumps, or the star) to < 1%.
        np.testing.assert_allclose(models.double().sum(dim=(1, 2)).numpy(), p["flux"][pick], rtol=0.01)


def test_star_masks_have_the_psf_size(fields, sim):
    psf = sim._base.renderer.psf_image(64).double().numpy()
    n_star = 0
    for f in fields:
        o = f["objects"]
        for k in np.flatnonzero((o["label"] == STAR_LABEL) & ~o["blended"] & (o["npix"] > 0)):
            expected = int((o["flux"][k] * psf > sim.mask_threshold_sigma * sim.sky_sigma).sum())
            assert abs(o["npix"][k] - expected) <= 0.2 * expected + 3
            n_star += 1
    assert n_star >= 1


def test_blended_flags_and_pairs_on_a_constructed_pair():
    x, y, r = [10.0, 13.0, 50.0, 60.0], [10.0, 10.0, 50.0, 50.0], [2.0, 1.0, 1.0, 5.0]
    # 3 < 2 * 2; 10 = 2 * 5 is not closer than 2 r.
    assert blended_flags(x, y, r).tolist() == [True, True, False, False]
    assert blended_pairs(x, y, r).tolist() == [[0, 1]]


def test_forced_pairs_make_blends():
    sim = FieldSimulator(size=64, density=10, star_fraction=0.0, pair_fraction=1.0)
    objs = [sim.simulate_field(i, seed=0)["objects"] for i in range(3)]
    blended = np.concatenate([o["blended"] for o in objs])
    n = np.array([len(o["x"]) for o in objs])
    # Every galaxy after the first sits 1-2 blend radii from another one.
    assert blended.sum() >= (n - 1).clip(0).sum()


def test_composite_hlr_matches_single_components():
    # Pure disk or pure bulge: the component's own radius; mixtures lie in between.
    np.testing.assert_allclose(composite_hlr([0.0], [4.0], [2.0], [1.0], [5.0]), [5.0], rtol=1e-6)
    np.testing.assert_allclose(composite_hlr([1.0], [4.0], [2.0], [0.0], [5.0]), [2.0], rtol=1e-6)
    mid = composite_hlr([1.0], [1.0], [2.0], [1.0], [2.0])
    np.testing.assert_allclose(mid, [2.0], rtol=1e-6)


def test_file_round_trip_and_torchvision_targets(tmp_path, sim):
    small = FieldSimulator(size=48, density=20)
    path = write_fields(tmp_path / "f.h5", small, 3, seed=5, progress=False)
    with open_fields(path) as ds:
        assert len(ds) == 3
        assert ds.attrs["survey"] == "candels-f160w" and ds.attrs["classes"] == list(FIELD_CLASSES)
        assert ds.attrs["sky_sigma"] == pytest.approx(small.sky_sigma)
        truth = small.simulate_field(1, seed=5)
        image, target = ds[1]
        assert image.dtype == torch.float32 and image.shape == (1, 48, 48)
        assert np.array_equal(image[0].numpy(), truth["image"])
        table = ds.objects(1)
        assert str(table["flux"].unit) == "ct" and str(table["hlr_arcsec"].unit) == "arcsec"
        np.testing.assert_array_equal(table["mag"], truth["objects"]["mag"])
        keep = truth["objects"]["npix"] > 0
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (keep.sum(), 4)
        assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.uint8
        np.testing.assert_array_equal(target["labels"].numpy(), truth["objects"]["label"][keep] + 1)
        masks = target["masks"].numpy()
        np.testing.assert_array_equal(masks.sum(axis=(1, 2)), truth["objects"]["npix"][keep])
        for box, mask in zip(target["boxes"].numpy(), masks, strict=True):
            ys, xs = np.nonzero(mask)  # torchvision: pixel j spans [j, j + 1]
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert len(ds.catalog) == sum(len(ds.objects(i)) for i in range(3))


def test_interrupted_write_resumes_to_the_same_file(tmp_path, monkeypatch):
    small = FieldSimulator(size=32, density=20)
    whole = write_fields(tmp_path / "whole.h5", small, 3, seed=1, progress=False)
    original = FieldSimulator.simulate_field

    def crash(self, index, seed):
        if index == 2:
            raise KeyboardInterrupt
        return original(self, index, seed)

    monkeypatch.setattr(FieldSimulator, "simulate_field", crash)
    with pytest.raises(KeyboardInterrupt):
        write_fields(tmp_path / "resumed.h5", small, 3, seed=1, progress=False)
    assert (tmp_path / "resumed.h5.partial").exists() and not (tmp_path / "resumed.h5").exists()
    monkeypatch.setattr(FieldSimulator, "simulate_field", original)
    resumed = write_fields(tmp_path / "resumed.h5", small, 3, seed=1, progress=False)
    with h5py.File(whole) as a, h5py.File(resumed) as b:
        assert np.array_equal(a["images"][...], b["images"][...])
        assert np.array_equal(a["offsets"][...], b["offsets"][...])
        for col in a["objects"]:
            np.testing.assert_array_equal(a["objects"][col][...], b["objects"][col][...])


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DeepmorphValueError, match="field size"):
        FieldSimulator(size=16)
    with pytest.raises(DeepmorphValueError, match="density"):
        FieldSimulator(density=-1)
    with pytest.raises(DeepmorphValueError, match="unknown survey"):
        FieldSimulator("nosuch")
    with pytest.raises(DeepmorphValueError, match="seed"):
        FieldSimulator(size=32).simulate_field(0, seed=-1)
    with pytest.raises(DeepmorphIOError, match="missing.h5: no such file"):
        open_fields(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((1, 4, 4))
    with pytest.raises(DeepmorphIOError, match="other.h5: not a deepmorph field file"):
        open_fields(other)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(DeepmorphIOError, match="junk.h5: not an HDF5 file"):
        open_fields(junk)


def test_cli_simulate_fields(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["simulate-fields", "--out", str(out), "--n", "2", "--size", "32", "--no-progress"]) == 0
    assert "2 fields of 32x32 px" in capsys.readouterr().out
    with open_fields(out) as ds:
        assert len(ds) == 2 and ds.attrs["size"] == 32
    assert main(["simulate-fields", "--out", str(out), "--n", "2", "--size", "32", "--no-progress"]) == 2
    assert "file exists" in capsys.readouterr().err
    assert main(["simulate-fields", "--out", str(tmp_path / "x.h5"), "--n", "2", "--size", "8"]) == 2
    assert "field size must be an integer in [32, 1024]" in capsys.readouterr().err
