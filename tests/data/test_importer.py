"""Import of real cutouts (FITS, PNG) and a label catalogue into the HDF5 dataset format."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from skimage import io
from skimage.transform import resize

from deepmorph.data import StampDataset, import_images, open_dataset, read_image, summarize
from deepmorph.data.store import FORMAT
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError

SIZE = 32


def write_fits(path, *planes, dtype=">f4"):
    """One FITS file; the first plane in the primary HDU, further ones in image extensions."""
    hdus = [fits.PrimaryHDU(np.asarray(planes[0]).astype(dtype))]
    hdus += [fits.ImageHDU(np.asarray(p).astype(dtype)) for p in planes[1:]]
    fits.HDUList(hdus).writeto(path)


@pytest.fixture
def sample(tmp_path):
    """A folder of cutouts of every kind, and a CSV catalogue that misses some and names a missing one."""
    rng = np.random.default_rng(0)
    d = tmp_path / "cutouts"
    (d / "sub").mkdir(parents=True)
    data = {
        "a": rng.normal(100, 10, (SIZE, SIZE)).astype(">f4"),  # big-endian, the stamp size
        "b": rng.normal(0, 1, (40, 48)),  # float64 in an extension after an empty primary
        "c": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
        "d": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "partial": rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32),
    }
    data["partial"][3, 4:7] = np.nan
    assert data["a"].dtype.byteorder == ">"
    fits.PrimaryHDU(data["a"]).writeto(d / "a.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data["b"].astype(">f8"))]).writeto(d / "sub" / "b.fits")
    io.imsave(d / "c.png", data["c"], check_contrast=False)
    io.imsave(d / "d.png", data["d"], check_contrast=False)
    write_fits(d / "partial.fits", data["partial"])
    write_fits(d / "nan.fits", np.full((SIZE, SIZE), np.nan))
    write_fits(d / "e.fits", np.ones((SIZE, SIZE)))
    (d / "broken.fits").write_bytes(b"this is not a FITS file" * 10)
    cat = Table(
        {
            "file": ["a.fits", "sub/b.fits", "c.png", "d", "nan.fits", "broken.fits", "missing.fits", "partial.fits"],
            "label": ["spiral", "elliptical", "spiral", "elliptical", "spiral", "spiral", "elliptical", "spiral"],
            "r_eff": [1.5, 2.0, 0.5, 0.7, 1.0, 1.0, 1.0, 3.0],
        }
    )
    cat.write(tmp_path / "labels.csv")
    return d, tmp_path / "labels.csv", data


def test_import_round_trip_and_skips(sample, tmp_path):
    folder, catalog, data = sample
    out = tmp_path / "real.h5"
    report = import_images(folder, catalog, out, size=SIZE)
    assert report.n_written == 5 and report.channels == 1 and report.size == SIZE
    assert report.label_names == ["elliptical", "spiral"]
    reasons = dict(report.skipped)
    assert set(reasons) == {"nan.fits", "broken.fits", "missing.fits", "e.fits"}
    assert "no finite pixels" in reasons["nan.fits"]
    assert reasons["broken.fits"].startswith("unreadable")
    assert reasons["missing.fits"] == "no image file for this catalogue row"
    assert reasons["e.fits"] == "not in the catalogue"
    assert report.n_filled == 1 and "skipped 4" in str(report)
    assert out.exists() and not (tmp_path / "real.h5.partial").exists()

    with open_dataset(out) as ds:
        assert len(ds) == 5 and ds.attrs["format"] == FORMAT and ds.attrs["n_done"] == 5
        assert ds.attrs["label_names"] == ["elliptical", "spiral"]
        images = ds.images[...]
        assert images.dtype == np.float32 and images.dtype.isnative and images.shape == (5, 1, SIZE, SIZE)
        cat = ds.catalog
    assert list(cat["file"].astype(str)) == ["a.fits", "sub/b.fits", "c.png", "d", "partial.fits"]
    np.testing.assert_array_equal(cat["id"], np.arange(5))
    np.testing.assert_array_equal(cat["label"], [1, 0, 1, 0, 1])
    assert list(cat["label_name"].astype(str)) == ["spiral", "elliptical", "spiral", "elliptical", "spiral"]
    np.testing.assert_array_equal(cat["r_eff"], [1.5, 2.0, 0.5, 0.7, 3.0])
    np.testing.assert_array_equal(cat["resample"], [1.0, 40 / SIZE, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(cat["n_filled"], [0, 0, 0, 0, 3])
    # pixel values: exact where no resampling was needed, skimage's anti-aliased resize otherwise
    np.testing.assert_array_equal(images[0, 0], data["a"].astype(np.float32))
    want_b = resize(data["b"][:, 4:44], (SIZE, SIZE), order=1, mode="reflect", anti_aliasing=True,
                    preserve_range=True)
    np.testing.assert_allclose(images[1, 0], want_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(images[2, 0], data["c"].astype(np.float32))
    np.testing.assert_allclose(images[3, 0], data["d"] @ np.array([0.2125, 0.7154, 0.0721]), rtol=1e-6)
    filled = np.where(np.isnan(data["partial"]), 0, data["partial"])
    np.testing.assert_array_equal(images[4, 0], filled)
    # the file trains like a simulated one
    ds = StampDataset(out)
    assert ds.label_names == ["elliptical", "spiral"] and ds.n_classes == 2
    assert int(ds[1]["target"]) == 0 and ds[1]["image"].shape == (1, SIZE, SIZE)
    assert "5 stamps" in summarize(out)


def test_import_channels(sample, tmp_path):
    folder, _, data = sample
    rng = np.random.default_rng(1)
    cube = rng.normal(size=(3, SIZE, SIZE))
    write_fits(folder / "cube.fits", cube)
    write_fits(folder / "bands.fits", *cube)
    Table({"file": ["d.png", "c.png", "cube.fits", "bands.fits"], "label": [0, 1, 1, 0]}).write(tmp_path / "rgb.ecsv")
    report = import_images(folder, tmp_path / "rgb.ecsv", tmp_path / "rgb.h5", size=SIZE, channels="rgb")
    assert report.n_written == 3 and report.channels == 3 and report.label_names == ["0", "1"]
    assert dict(report.skipped)["c.png"] == "unreadable: grayscale image, but channels='rgb'"
    with h5py.File(tmp_path / "rgb.h5") as f:
        images = f["images"][...]
    assert images.shape == (3, 3, SIZE, SIZE)
    np.testing.assert_array_equal(images[0], np.moveaxis(data["d"], -1, 0).astype(np.float32))
    np.testing.assert_allclose(images[1], cube, rtol=1e-6)
    np.testing.assert_allclose(images[2], cube, rtol=1e-6)
    # fits-ext: one channel per HDU; a file of another number of channels is skipped
    Table({"file": ["bands.fits", "a.fits", "c.png"]}).write(tmp_path / "ext.csv")
    report = import_images(folder, tmp_path / "ext.csv", tmp_path / "ext.h5", size=SIZE, channels="fits-ext")
    assert report.n_written == 1 and report.channels == 3
    reasons = dict(report.skipped)
    assert reasons["a.fits"] == "1 channels, the first image had 3"
    assert reasons["c.png"] == "unreadable: not a FITS file, but channels='fits-ext'"
    with open_dataset(tmp_path / "ext.h5") as ds:
        assert (ds.catalog["label"] == -1).all() and ds.attrs["label_names"] == []
    with pytest.raises(DeepmorphValueError, match="non-finite or missing target"):
        StampDataset(tmp_path / "ext.h5")  # unlabelled data cannot train a classifier


def test_import_errors(sample, tmp_path):
    folder, catalog, _ = sample
    out = tmp_path / "x.h5"
    import_images(folder, catalog, out, size=SIZE)
    with pytest.raises(DeepmorphIOError, match="exists"):
        import_images(folder, catalog, out, size=SIZE)
    report = import_images(folder, catalog, out, size=16, overwrite=True)
    assert report.n_written == 5 and report.size == 16
    with pytest.raises(DeepmorphValueError, match=r"labels\.csv: no column 'filename'.*file, label, r_eff"):
        import_images(folder, catalog, tmp_path / "y.h5", name_column="filename")
    with pytest.raises(DeepmorphValueError, match=r"labels\.csv: no label column 'morph'; it has file, label"):
        import_images(folder, catalog, tmp_path / "y.h5", label_column="morph", require_labels=True)
    assert not (tmp_path / "y.h5").exists()
    with pytest.raises(DeepmorphIOError, match="no image files"):
        import_images(tmp_path / "nothing-*.fits", catalog, tmp_path / "y.h5")
    with pytest.raises(DeepmorphIOError, match="no such catalogue"):
        import_images(folder, tmp_path / "nope.csv", tmp_path / "y.h5")
    with pytest.raises(DeepmorphValueError, match="channels"):
        import_images(folder, catalog, tmp_path / "y.h5", channels="cmyk")
    with pytest.raises(DeepmorphValueError, match="size"):
        import_images(folder, catalog, tmp_path / "y.h5", size=4)
    Table({"file": ["nan.fits", "broken.fits"]}).write(tmp_path / "bad.csv")
    with pytest.raises(DeepmorphValueError, match="no image imported.*nan.fits: no finite pixels"):
        import_images(folder, tmp_path / "bad.csv", tmp_path / "y.h5")
    assert not (tmp_path / "y.h5").exists()
    with pytest.raises(DeepmorphValueError, match="not among label_names"):
        import_images(folder, catalog, tmp_path / "y.h5", label_names=["spiral"])


def test_import_cutouts_of_the_real_ntt_frame(ntt_image_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1992 header has non-standard cards
        frame = fits.getdata(ntt_image_file)
    cat = np.loadtxt(ntt_image_file.with_name("image.cat"), comments="#")
    x, y, flux, flags = cat[:, 1] - 1, cat[:, 2] - 1, cat[:, 15], cat[:, -1]
    keep = (flags == 0) & (x > 24) & (x < 231) & (y > 24) & (y < 231)
    assert keep.sum() >= 4
    folder = tmp_path / "ntt"
    folder.mkdir()
    names, cutouts = [], []
    for k, (xc, yc) in enumerate(zip(x[keep][:4], y[keep][:4], strict=True)):
        half = 20 if k < 3 else 12  # three 40 x 40 cutouts and one 24 x 24 (upsampled)
        r, c = int(round(yc)), int(round(xc))
        cut = frame[r - half:r + half, c - half:c + half].astype(">f4")  # big-endian, as FITS stores it
        assert cut.dtype.byteorder == ">"
        names.append(f"obj{k}.fits")
        cutouts.append(cut)
        fits.PrimaryHDU(cut).writeto(folder / names[-1])
    table = Table({"file": names, "label": [0, 1, 0, 1], "flux_auto": flux[keep][:4]})
    table["flux_auto"].unit = "count"
    table.write(tmp_path / "ntt.ecsv")
    report = import_images(str(folder / "obj*.fits"), tmp_path / "ntt.ecsv", tmp_path / "ntt.h5", size=40)
    assert report.n_written == 4 and report.skipped == []
    with open_dataset(tmp_path / "ntt.h5") as ds:
        images = ds.images[...]
        table_out = ds.catalog
    assert images.dtype.isnative
    for k in range(3):
        np.testing.assert_array_equal(images[k, 0], cutouts[k].astype(np.float32))  # same values, native order
    np.testing.assert_allclose(table_out["resample"], [1, 1, 1, 24 / 40])
    up = images[3, 0]
    assert up.min() >= cutouts[3].min() - 1e-3 and up.max() <= cutouts[3].max() + 1e-3  # linear, no overshoot
    assert np.mean(up) == pytest.approx(np.mean(cutouts[3]), rel=0.02)  # surface brightness kept
    assert str(table_out["flux_auto"].unit) == "ct"
    np.testing.assert_array_equal(table_out["flux_auto"], flux[keep][:4])
    assert read_image(folder / "obj0.fits").dtype == np.float64
