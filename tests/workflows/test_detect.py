"""Galaxy detection in fields: tiling without duplicates, the catalogue's numbers, training, CLI errors."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from deepmorph.cli import main
from deepmorph.errors import DeepmorphValueError
from deepmorph.workflows import detect as wd
from tests.cli_errors import error_line

TINY = {"fpn_channels": 16, "mask_channels": 16, "mask_layers": 1, "box_head_size": 32,
        "rpn_pre_nms_top_n": [200, 200], "rpn_post_nms_top_n": [100, 100], "box_batch_size_per_image": 64,
        "detections_per_img": 50}
CLASSES = ["spheroid", "disk", "edge-on", "clumpy", "star"]


class BlobFinder(torch.nn.Module):
    """A stand-in for a trained Mask R-CNN: each connected region above ``level`` (normalised units)
    of at least 5 pixels is one detection (score 0.9, label 2), in torchvision's output format."""

    def __init__(self, level: float = 2.0):
        super().__init__()
        self.level = level
        self.calls = 0

    def forward(self, images):
        out = []
        for image in images:
            self.calls += 1
            above = image[0].numpy() > self.level
            lab, n = ndimage.label(above)
            boxes, masks = [], []
            for k, sl in enumerate(ndimage.find_objects(lab), start=1):
                m = lab == k
                if m.sum() >= 5:
                    boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])  # pixel j spans [j, j + 1]
                    masks.append(m)
            h, w = above.shape
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.full((len(boxes),), 2, dtype=torch.int64),
                        "scores": torch.full((len(boxes),), 0.9),
                        "masks": torch.as_tensor(np.array(masks, dtype=np.float32).reshape(-1, 1, h, w))})
        return out


def _fake(model=None) -> wd.Detector:
    meta = {"in_channels": 1, "image_size": 64, "classes": CLASSES, "zeropoint_mag": 25.0}
    return wd.Detector(model or BlobFinder(), meta)


def _blobs(shape, positions, amplitude=50.0, sigma=1.5) -> np.ndarray:
    yy, xx = np.indices(shape)
    image = np.zeros(shape, dtype=np.float32)
    for x, y in positions:
        image += amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return image


# -- tiling -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [64, 100, 150, 333])
def test_tiles_own_the_image_once_with_context(length):
    tile, overlap = 64, 16
    starts = wd.tile_starts(length, tile, overlap)
    owned = wd._owned(starts, tile)
    assert starts[0] == 0 and starts[-1] == max(0, length - tile)
    for p in range(length):
        owners = [i for i, (a, b) in enumerate(owned) if a <= p < b]
        assert len(owners) == 1, p
        i = owners[0]
        # the owning tile sees at least overlap/2 pixels of context on each inner side
        if i > 0:
            assert p - starts[i] >= overlap / 2 - 0.5
        if i < len(starts) - 1:
            assert starts[i] + tile - 1 - p >= overlap / 2 - 0.5


def test_no_duplicates_at_tile_borders():
    # tile 64, overlap 16 on 150 px: tiles at 0, 48, 86; ownership changes at 55.5 and 98.5. Blobs on
    # those lines, in the overlaps and cut by a tile's edge (84, 112)
    grid = [12.0, 40.0, 55.5, 70.0, 84.0, 98.5, 112.0, 140.0]
    truth = [(x, y) for x in grid for y in grid[::-1]]
    image = _blobs((150, 150), truth)
    finder = BlobFinder()
    table, segmap = wd.detect_image(_fake(finder), image, sky_sigma=1.0, tile=64, overlap=16, batch=4)
    assert finder.calls == 9  # 3 x 3 tiles, each object seen by up to 4 of them
    assert len(table) == len(truth) == segmap.max()
    d = np.hypot(np.asarray(table["x"])[:, None] - np.array(truth)[:, 0], np.asarray(table["y"])[:, None]
                 - np.array(truth)[:, 1])
    assert (d.min(axis=0) < 0.05).all()  # every blob found, at its centroid
    assert sorted(d.argmin(axis=0).tolist()) == list(range(len(truth)))  # each exactly once
    # whole objects, though most sit where tiles overlap: each segment is the blob's full region above
    # the level, as one look at the untiled image finds it
    regions, _ = ndimage.label(np.arcsinh(image) > 2.0)
    for row in table:
        region = regions[int(round(row["y"])), int(round(row["x"]))]
        np.testing.assert_array_equal(segmap == row["id"], regions == region)


def test_merge_keeps_blends_and_drops_duplicates():
    m = np.ones((6, 6), dtype=bool)

    def f(score, box, y0, x0, mask):
        return wd._Found(score=score, label=1, class_prob=1.0, box=np.array(box, float), y0=y0, x0=x0, mask=mask)

    same_a = f(0.9, [10, 10, 16, 16], 10, 10, m)
    same_b = f(0.8, [11, 10, 17, 16], 10, 11, m)  # the same object seen by another tile, shifted by a pixel
    left = np.zeros((6, 6), dtype=bool)
    left[:, :3] = True
    blend_a = f(0.7, [40, 40, 46, 46], 40, 40, left)
    blend_b = f(0.6, [40, 40, 46, 46], 40, 40, ~left)  # same box, disjoint masks: a blend
    kept = wd.merge_duplicates([same_b, blend_b, same_a, blend_a])
    assert [k.score for k in kept] == [0.9, 0.7, 0.6]


def test_test_time_augmentation_turns_each_view_back():
    # BlobFinder finds the same blobs in any orientation: after turning each view's boxes and masks back,
    # the eight views agree and the fused catalogue is the plain one (off-centre blobs, a non-square field
    # tiled into square tiles, so a wrong inverse turn would move them)
    truth = [(9.0, 14.0), (30.0, 50.0), (52.0, 21.0), (70.0, 44.0), (80.0, 8.0)]
    image = _blobs((60, 90), truth)
    finder = BlobFinder()
    plain, plain_map = wd.detect_image(_fake(finder), image, sky_sigma=1.0, tile=60, overlap=16)
    calls = finder.calls
    fused, fused_map = wd.detect_image(_fake(finder), image, sky_sigma=1.0, tile=60, overlap=16, tta=True)
    assert finder.calls - calls == 8 * calls and fused.meta["tta"]
    assert len(fused) == len(plain) == len(truth)
    for col in ("x", "y", "x0", "y0", "x1", "y1", "score", "flux"):
        np.testing.assert_allclose(np.asarray(fused[col]), np.asarray(plain[col]), atol=1e-4, err_msg=col)
    np.testing.assert_array_equal(fused_map, plain_map)


def test_fusion_averages_the_views_that_agree():
    def view(boxes, scores, probs):
        masks = np.zeros((len(boxes), 1, 32, 32), dtype=np.float32)
        for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
            m[0, int(y0):int(y1), int(x0):int(x1)] = 1.0
        return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
                "labels": np.array(probs, np.float32).reshape(-1, 2).argmax(1) + 1,
                "class_probs": np.array(probs, np.float32).reshape(-1, 2), "masks": masks}

    # object A in all four views (boxes 1 px apart), B in one view only, C and D a blend: two boxes of one
    # view that overlap by IoU 0.6 must stay two objects
    a = [[4, 4, 12, 12], [5, 4, 13, 12], [4, 5, 12, 13], [4, 4, 12, 12]]
    dets = [view([a[0], [20, 20, 26, 26], [0, 20, 10, 30], [2, 20, 12, 30]], [0.9, 0.4, 0.8, 0.7],
                 [[0.8, 0.2], [0.5, 0.5], [0.1, 0.9], [0.6, 0.4]]),
            view([a[1], [0, 20, 10, 30]], [0.7, 0.6], [[0.6, 0.4], [0.3, 0.7]]),
            view([a[2]], [0.8], [[1.0, 0.0]]),
            view([a[3]], [0.6], [[0.9, 0.1]])]
    out = wd._fuse(dets, iou=0.55)
    assert len(out["scores"]) == 4
    np.testing.assert_allclose(out["scores"], [(0.9 + 0.7 + 0.8 + 0.6) / 4, (0.8 + 0.6) / 4, 0.7 / 4, 0.4 / 4],
                               rtol=1e-6)
    w = np.array([0.9, 0.7, 0.8, 0.6]) / 3.0
    np.testing.assert_allclose(out["boxes"][0], (w[:, None] * np.array(a, float)).sum(0), rtol=1e-6)
    np.testing.assert_allclose(out["class_probs"][0], (w[:, None] * [[0.8, 0.2], [0.6, 0.4], [1, 0], [0.9, 0.1]])
                               .sum(0), rtol=1e-6)
    assert out["labels"].tolist() == [1, 2, 1, 1]
    assert out["masks"].shape == (4, 1, 32, 32) and out["masks"][0, 0, 4, 4] == pytest.approx(w[[0, 3]].sum())


# -- the catalogue -----------------------------------------------------------------------------------

def test_catalogue_columns_units_and_photometry():
    rng = np.random.default_rng(1)
    truth = [(30.0, 30.0), (70.0, 40.0)]
    sigma, gain = 2.0, 4.0
    image = _blobs((100, 110), truth, amplitude=200.0) + rng.normal(0, sigma, (100, 110)).astype(np.float32)
    table, segmap = wd.detect_image(_fake(BlobFinder(level=3.0)), image, sky_sigma=sigma, tile=64, overlap=16,
                                    gain=gain, zeropoint=26.0)
    assert table.colnames == ["id", "x", "y", "x0", "y0", "x1", "y1", "label", "class_name", "score", "class_prob",
                              "npix", "flux", "flux_err", "mag", "mag_err", "flag"]
    assert table["x"].unit == "pix" and table["flux"].unit == "count" and table["mag"].unit == "mag"
    assert len(table) == 2 and set(table["class_name"]) == {"disk"} and set(table["label"]) == {1}
    assert segmap.dtype == np.int32 and segmap.shape == image.shape
    for row in table:
        seg = segmap == row["id"]
        assert row["npix"] == seg.sum()
        assert row["flux"] == pytest.approx(image[seg].sum(), rel=1e-5)
        assert row["flux_err"] == pytest.approx(math.sqrt(seg.sum() * sigma**2 + row["flux"] / gain), rel=1e-6)
        assert row["mag"] == pytest.approx(26.0 - 2.5 * math.log10(row["flux"]))
        assert row["mag_err"] == pytest.approx(1.0857362 * row["flux_err"] / row["flux"], rel=1e-6)
        ys, xs = np.nonzero(seg)
        assert row["x0"] == xs.min() - 0.5 and row["x1"] == xs.max() + 0.5  # pixel edges
        assert row["flag"] == ""
    assert table.meta["sky_sigma"] == sigma and table.meta["zeropoint_mag"] == 26.0


def test_morphology_on_each_segment():
    rng = np.random.default_rng(2)
    image = _blobs((96, 96), [(30.0, 40.0), (66.0, 60.0)], amplitude=300.0, sigma=3.0)
    image += rng.normal(0, 1.0, image.shape).astype(np.float32)
    table, _ = wd.detect_image(_fake(BlobFinder(level=3.0)), image, sky_sigma=1.0, tile=96, overlap=16,
                               morphology=True)
    assert len(table) == 2 and not table["morph_failed"].any() and set(table["morph_error"]) == {""}
    # a round Gaussian: Gini well inside (0, 1), concentration above a flat disk's, little asymmetry
    assert ((table["gini"] > 0.2) & (table["gini"] < 0.8)).all()
    assert (table["concentration"] > 1.5).all() and (np.abs(table["asymmetry"]) < 0.2).all()
    assert table["r20_pix"].unit == "pix"


class TwoOverlapping(torch.nn.Module):
    """Two overlapping square masks; the second scores higher."""

    def forward(self, images):
        h, w = images[0].shape[-2:]
        masks = torch.zeros(2, 1, h, w)
        masks[0, 0, 10:20, 10:20] = 1
        masks[1, 0, 15:25, 15:25] = 1
        return [{"boxes": torch.tensor([[10.0, 10, 20, 20], [15.0, 15, 25, 25]]), "labels": torch.tensor([1, 5]),
                 "scores": torch.tensor([0.6, 0.95]), "masks": masks} for _ in images]


def test_segmap_gives_each_pixel_to_the_best_mask():
    table, segmap = wd.detect_image(_fake(TwoOverlapping()), np.ones((40, 40), np.float32), sky_sigma=1.0, tile=40,
                                    overlap=8)
    assert list(table["score"]) == pytest.approx([0.95, 0.6])
    assert list(table["class_name"]) == ["star", "spheroid"]
    assert (segmap[15:20, 15:20] == 1).all()  # the overlap goes to the higher score (id 1)
    assert table["npix"].tolist() == [100, 75]


def test_small_image_and_nan_pixels():
    image = _blobs((40, 36), [(18.0, 20.0)])
    table, segmap = wd.detect_image(_fake(), image, sky_sigma=1.0, tile=64, overlap=16)
    assert len(table) == 1 and segmap.shape == (40, 36)  # padded to a tile, returned at its own size
    assert (table["x"][0], table["y"][0]) == pytest.approx((18.0, 20.0)) and table["flag"][0] == ""
    image[15, 12] = np.nan  # a bad pixel in the second object's mask
    table, segmap = wd.detect_image(_fake(TwoOverlapping()), image, sky_sigma=1.0, tile=64, overlap=16)
    assert list(table["flag"]) == ["", "nan_pixels"]
    assert table["npix"][1] == 75 and table["flux"][1] == pytest.approx(np.nansum(image[segmap == 2]))
    with pytest.raises(DeepmorphValueError, match="no finite pixel"):
        wd.detect_image(_fake(), np.full((40, 40), np.nan), sky_sigma=1.0)
    with pytest.raises(DeepmorphValueError, match="too small"):
        wd.detect_image(_fake(), np.zeros((8, 40)), sky_sigma=1.0)
    with pytest.raises(DeepmorphValueError, match="3 band"):
        wd.detect_image(_fake(), np.zeros((3, 40, 40)), sky_sigma=1.0)


# -- a real (tiny) run: training, resume, CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    from deepmorph.simulate.fields import FieldSimulator, write_fields

    path = tmp_path_factory.mktemp("fields") / "fields.h5"
    write_fields(path, FieldSimulator("candels-f160w", size=64, density=20.0), 6, seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def trained(fields, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "run"
    config = wd.default_config(**{"model.kwargs": TINY, "epochs": 2, "batch_size": 2, "progress_bar": False,
                                  "accelerator": "cpu"})
    result = wd.train_detector(fields, out, config, wd.Split(0, (0.5, 0.17, 0.33)), map_every=2, evaluate=False)
    return out, config, result


def test_training_writes_a_run_with_losses_and_ap(trained):
    out, _, result = trained
    assert result["train_size"] == 3 and result["epochs_run"] == 2
    for name in ("run.json", "config.yaml", "model.pt", "history.csv", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    history = Table.read(out / "history.csv")
    for name in ("loss", "val_loss", "loss_mask", "val_loss_mask", "loss_objectness", "val_ap50", "val_mask_ap50"):
        assert name in history.colnames, name
    assert np.isfinite(history["val_loss"]).all()
    ap = np.asarray(history["val_ap50"], float)
    assert np.isnan(ap[0]) and 0 <= ap[1] <= 1  # AP every 2nd epoch: NaN, not a stale value, in between
    meta = json.loads((out / "run.json").read_text())
    assert meta["classes"] == CLASSES and meta["image_size"] == 64 and meta["sky_sigma"] > 0


def test_training_resumes(trained, fields):
    out, config, _ = trained
    result = wd.train_detector(fields, out, config.with_overrides({"epochs": 3}), wd.Split(0, (0.5, 0.17, 0.33)),
                               map_every=2, evaluate=False)
    history = Table.read(out / "history.csv")
    assert result["epochs_run"] == 3 and len(history) == 3
    assert np.isfinite(history["val_ap50"][2])  # the last epoch always has its AP


def _write(path, data):
    fits.PrimaryHDU(data).writeto(path, overwrite=True)
    return path


def test_detect_galaxies_command(trained, fields, tmp_path):
    from deepmorph.simulate.fields import open_fields

    out, _, _ = trained
    with open_fields(fields) as ds:
        image, sky = ds.image(0), ds.attrs["sky_sigma"]
    big = np.tile(image, (2, 3)) + np.float32(sky)  # a sky level to subtract
    native = _write(tmp_path / "native.fits", big.astype("<f4"))
    swapped = _write(tmp_path / "big-endian.fits", big.astype(">f4"))
    argv = ["detect", "galaxies", "--model", str(out), "--score", "0.05", "--tile", "64", "--overlap", "16"]
    assert main([*argv, "--images", str(native), "--out", str(tmp_path / "a.ecsv"),
                 "--segmap", str(tmp_path / "a.fits")]) == 0
    assert main([*argv, "--images", str(swapped), "--out", str(tmp_path / "b.ecsv")]) == 0
    a, b = Table.read(tmp_path / "a.ecsv"), Table.read(tmp_path / "b.ecsv")
    assert len(a) > 0 and len(a) == len(b)  # the untrained network still proposes boxes at score 0.05
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["score"], b["score"])
    segmap = fits.getdata(tmp_path / "a.fits", 1)
    assert segmap.shape == big.shape and int(segmap.max()) == len(a)
    assert main([*argv, "--images", str(native), "--out", str(tmp_path / "low.ecsv"), "--segmap",
                 str(tmp_path / "low.fits"), "--mask-threshold", "0.2"]) == 0
    low = fits.getdata(tmp_path / "low.fits", 1)
    assert Table.read(tmp_path / "low.ecsv").meta["mask_threshold"] == 0.2
    assert (low > 0).sum() > (segmap > 0).sum() and np.all(low[segmap > 0] > 0)  # wider outlines


@pytest.mark.parametrize("data, message", [
    (np.zeros((8, 8), np.float32), "too small"),
    (np.full((64, 64), np.nan, np.float32), "no finite pixel"),
    (np.zeros((3, 64, 64), np.float32), "3 band"),
])
def test_detect_galaxies_bad_images(trained, tmp_path, capsys, data, message):
    out, _, _ = trained
    path = _write(tmp_path / "bad.fits", data)
    code = main(["detect", "galaxies", "--model", str(out), "--images", str(path), "--out", str(tmp_path / "c.ecsv")])
    assert code == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "c.ecsv").exists()


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["--tile", "100000"], "tile (100000 px) larger than the image (64 x 64 px) and the training fields (64 px)"),
    (["--gain", "-3"], "argument --gain: expected a finite number > 0, got '-3'"),
    (["--zeropoint", "inf"], "argument --zeropoint: expected a finite number, got 'inf'"),
    (["--mask-threshold", "1.5"], "mask threshold in (0, 1)"),
])
def test_detect_galaxies_bad_options(trained, tmp_path, capsys, extra, message):
    out, _, _ = trained
    path = _write(tmp_path / "img.fits", np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    assert main(["detect", "galaxies", "--model", str(out), "--images", str(path), "--out", str(tmp_path / "c.ecsv"),
                 *extra]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "c.ecsv").exists()


def test_corrupt_weights_are_named(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    path = _write(tmp_path / "img.fits", np.zeros((64, 64), np.float32))
    argv = ["detect", "galaxies", "--model", str(run), "--images", str(path), "--out", str(tmp_path / "c.ecsv")]
    (run / "model.pt").write_text("garbage")
    assert main(argv) == 2
    assert f"{run / 'model.pt'}: cannot read the weights" in error_line(capsys)
    torch.save({"backbone.weight": torch.zeros(3)}, run / "model.pt")
    assert main(argv) == 2
    assert f"{run / 'model.pt'}: the weights do not fit the run's network" in error_line(capsys)


def test_detect_galaxies_needs_a_detection_run(tmp_path, capsys):
    path = _write(tmp_path / "img.fits", np.zeros((64, 64), np.float32))
    assert main(["detect", "galaxies", "--model", str(tmp_path), "--images", str(path), "--out",
                 str(tmp_path / "c.ecsv")]) == 2
    assert "not a detection run" in error_line(capsys)


def test_info_summarises_a_field_file(fields, capsys):
    assert main(["info", str(fields)]) == 0
    text = capsys.readouterr().out
    assert "N:           6 fields, seed 0" in text and "64 x 64 px at 0.06 arcsec/px" in text
    with h5py.File(fields) as f:
        n = len(f["objects"]["label"])
    assert f"objects:     {n} (spheroid " in text


def test_corrupt_field_files_are_named(fields, tmp_path, capsys):
    nan = tmp_path / "nan.h5"
    nan.write_bytes(fields.read_bytes())
    with h5py.File(nan, "r+") as f:
        f["images"][1, 3, 3] = np.nan
    assert main(["evaluate", "detect-baseline", "--data", str(nan), "--out", str(tmp_path / "sep")]) == 2
    assert f"{nan}: field 1 has NaN or infinite pixels" in error_line(capsys)
    offsets = tmp_path / "offsets.h5"
    offsets.write_bytes(fields.read_bytes())
    with h5py.File(offsets, "r+") as f:
        f["offsets"][2] = 10**6
    assert main(["evaluate", "detect-baseline", "--data", str(offsets), "--out", str(tmp_path / "sep")]) == 2
    assert f"{offsets}: corrupt object table" in error_line(capsys)


def test_evaluate_against_sep(trained, fields, tmp_path, capsys):
    out, _, _ = trained
    assert main(["evaluate", "detect", "--model", str(out), "--data", str(fields), "--out", str(tmp_path)]) == 0
    assert "maskrcnn" in capsys.readouterr().out
    r = json.loads((tmp_path / "test_metrics.json").read_text())
    assert r["n_fields"] == 2  # the run's test split of its own training file
    assert r["mask_threshold"] == wd.run_mask_threshold(json.loads((out / "run.json").read_text()))
    argv = ["evaluate", "detect", "--model", str(out), "--data", str(fields), "--out", str(tmp_path / "b")]
    assert main([*argv, "--mask-threshold", "0.3"]) == 0
    assert json.loads((tmp_path / "b" / "test_metrics.json").read_text())["mask_threshold"] == 0.3
    assert main([*argv, "--mask-threshold", "1.5"]) == 2
    assert "mask threshold in (0, 1)" in error_line(capsys)
    for name in ("maskrcnn", "sep"):
        m = r[name]
        assert 0 <= m["completeness"] <= 1 and m["n_truth"] > 0 and m["seconds_per_field"] > 0
    assert r["sep"]["completeness"] > 0.5  # sep finds most objects of these fields
    assert r["maskrcnn"]["bright_mag"] == r["sep"]["bright_mag"] == r["bright_mag"]  # AP on the same galaxies
    table = Table.read(tmp_path / "detection_table.ecsv")
    assert list(table["method"]) == ["Mask R-CNN", "sep"]
    for name in ("completeness.png", "overlay.png", "completeness.ecsv"):
        assert (tmp_path / name).is_file(), name


def test_real_ntt_frame(trained, tmp_path, ntt_image_file):
    out, _, _ = trained
    r = wd.detect_real(out, "ntt", tmp_path, score_threshold=0.05)
    assert r["reference"] == "SExtractor" and r["n_reference"] == 65  # image.cat's detections
    assert 0 <= r["n_matched"] <= min(r["n_detected"], 65)
    assert np.isnan(r["median_offset_pix"]) or r["median_offset_pix"] <= 2.0
    assert sum(r["class_counts"].values()) == r["n_detected"]
    for name in ("ntt_catalog.ecsv", "ntt_segmap.fits", "ntt.json", "ntt_overlay.png"):
        assert (tmp_path / name).is_file(), name


class Oracle(torch.nn.Module):
    """Detects the true objects of each field in turn: probability ``inner`` on an object's true
    pixels and ``ring`` on the two pixels around them, so thresholds below ``ring`` give outlines
    too wide and thresholds from ``ring`` to ``inner`` the true ones."""

    def __init__(self, segmaps, inner=0.8, ring=0.52):
        super().__init__()
        self.segmaps, self.inner, self.ring, self.calls = list(segmaps), inner, ring, 0

    def forward(self, images):
        out = []
        for image in images:
            seg = self.segmaps[self.calls % len(self.segmaps)]
            self.calls += 1
            h, w = image.shape[-2:]
            boxes, masks = [], []
            for k, sl in enumerate(ndimage.find_objects(seg), start=1):
                if sl is None:
                    continue
                true = np.zeros((h, w), bool)
                true[:seg.shape[0], :seg.shape[1]] = seg == k
                wide = ndimage.binary_dilation(true, iterations=2)
                masks.append(np.where(true, self.inner, np.where(wide, self.ring, 0.0)))
                boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.full((len(boxes),), 2, dtype=torch.int64),
                        "scores": torch.full((len(boxes),), 0.9),
                        "masks": torch.as_tensor(np.array(masks, dtype=np.float32).reshape(-1, 1, h, w))})
        return out


def test_mask_threshold_calibrated_and_used(fields, tmp_path, monkeypatch):
    from deepmorph.simulate.fields import open_fields

    with open_fields(fields) as ds:
        segmaps = [ds.segmap(i) for i in range(len(ds))]
        image = ds.image(0)
    oracle = Oracle(segmaps)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "task": "detect", "method": "maskrcnn", "data": str(tmp_path / "train.h5"), "split_seed": 0,
        "fractions": [0.5, 0.17, 0.33],
        "classes": CLASSES, "in_channels": 1, "image_size": 64, "zeropoint_mag": 25.0}))
    monkeypatch.setattr(wd, "load_detector",
                        lambda r, device="cpu": wd.Detector(oracle, json.loads((run / "run.json").read_text())))
    r = wd.calibrate_masks(run, fields, items=None)  # every field of a file the run was not trained on
    ap = dict(zip(r["thresholds"], r["ap50_mask"], strict=True))
    assert r["n_fields"] == 6 and r["n_bright"] > 10
    assert ap[0.55] > 0.95 and ap[0.55] == ap[0.75]  # the true outlines from 0.55 on
    assert ap[0.5] < ap[0.55] - 0.05  # the widened ones below (measured 0.75 vs 1.00)
    assert r["mask_threshold"] == 0.6  # the best of the curve averaged over neighbours, nearest to 0.5
    meta = json.loads((run / "run.json").read_text())
    assert meta["mask_threshold"] == 0.6 and meta["mask_calibration"] == {
        "n_fields": 6, "n_bright": r["n_bright"], "data": str(fields), "items": "all"}
    for name in ("mask_calibration.ecsv", "mask_calibration.png"):
        assert (run / name).is_file(), name
    oracle.calls = 0
    table, segmap = wd.detect_image(run, image, sky_sigma=1.0)  # the run's threshold by default
    assert table.meta["mask_threshold"] == 0.6
    assert np.array_equal(segmap > 0, segmaps[0] > 0)
    oracle.calls = 0
    assert (wd.detect_image(run, image, sky_sigma=1.0, mask_threshold=0.5)[1] > 0).sum() > (segmaps[0] > 0).sum()
    assert wd.run_mask_threshold(meta, tta=True) == 0.6  # until TTA has its own
    assert wd.run_mask_threshold({**meta, "mask_threshold_tta": 0.45}, tta=True) == 0.45
    assert wd.run_mask_threshold({}, tta=False) == 0.5
    with pytest.raises(DeepmorphValueError, match="no validation split"):
        wd.calibrate_masks(run, fields)  # another file, with the default items="val"
    with pytest.raises(DeepmorphValueError, match=r"lie in \(0, 1\)"):
        wd.calibrate_masks(run, fields, items=None, thresholds=(0.5, 1.0))
    oracle.calls, oracle.ring = 0, 0.2
    flat = wd.calibrate_masks(run, fields, items=None, write=False)  # the same outlines at every threshold
    assert len(set(flat["ap50_mask"])) == 1 and flat["mask_threshold"] == 0.5 and not flat["stored"]
    meta["data"] = str(fields)
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(DeepmorphValueError, match="the run's training file"):  # its test fields are kept out
        wd.calibrate_masks(run, items=None)


def test_threshold_choice_ignores_a_lone_peak():
    t = wd.MASK_THRESHOLDS
    ap = [0.88, 0.80, 0.80, 0.80, 0.80, 0.80, 0.85, 0.85, 0.85, 0.80]
    assert wd.choose_threshold(t, ap) == 0.65  # the plateau, not the peak at 0.3
    assert wd.choose_threshold(t, [0.0] * 10) == 0.5  # nothing to choose between: 0.5
    assert wd.choose_threshold((0.4, 0.6), [0.7, 0.7]) == 0.4  # as near 0.5: the lower
    assert wd.choose_threshold(t, [math.nan] * 10) is None


def test_calibrate_masks_command(trained, fields, tmp_path, capsys):
    out, _, result = trained
    assert result["mask_threshold"] in wd.MASK_THRESHOLDS  # chosen after training
    assert main(["evaluate", "detect-masks", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    meta = json.loads((out / "run.json").read_text())
    assert f"mask threshold {wd.run_mask_threshold(meta):g}" in text and text.count("AP@0.5 box") == 10
    other = tmp_path / "other.h5"
    other.write_bytes(fields.read_bytes())
    assert main(["evaluate", "detect-masks", "--model", str(out), "--data", str(other)]) == 2
    assert "no validation split" in error_line(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--augmentation", "keras"], "none, flips or dihedral"),
    (["--set", "model.name=cnn"], "the detector is 'maskrcnn'"),
    (["--fractions", "0.9", "0.0", "0.1"], "no val field"),
    (["--fractions", "0.8", "0.2", "0.0"], "no test field"),
])
def test_train_detect_bad_options(fields, tmp_path, capsys, extra, message):
    code = main(["train", "detect", "--data", str(fields), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--fractions", "0.5", "0.17", "0.33", *extra])
    assert code == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow  # ~5 CPU minutes: tutorial 7's default training
def test_trained_detector_ranks_galaxies_better_than_sep(tmp_path):
    from deepmorph.simulate.fields import FieldSimulator, write_fields

    data = write_fields(tmp_path / "fields.h5", FieldSimulator("candels-f160w", size=128), 300, seed=0,
                        progress=False)
    config = wd.default_config(**{"epochs": 12, "progress_bar": False, "model.kwargs": {"roi_sampling_ratio": 1}})
    r = wd.train_detector(data, tmp_path / "run", config, wd.Split(0, (0.7, 0.1, 0.2)))
    m, s = r["maskrcnn"], r["sep"]
    assert r["n_fields"] == 60 and m["n_bright"] > 300
    assert m["ap50_box"] > s["ap50_box"] and m["ap50_mask"] > s["ap50_mask"] - 0.02  # measured 0.63/0.55, 0.60/0.56
    assert m["completeness"] > s["completeness"] - 0.08 and m["purity"] > 0.7  # 0.67/0.70, 0.83
