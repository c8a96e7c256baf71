"""The HDF5 store: what is written is what the simulator made, resumes are exact, errors are clear."""

from __future__ import annotations

import json

import astropy.units as u
import h5py
import numpy as np
import pytest
from astropy.table import Table

from deepmorph.data import export_catalog, open_dataset, partial_path, summarize, write_dataset
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import CATALOG_UNITS, LABEL_NAMES, ImagePSF, Simulator

N, SEED, SIZE = 40, 7, 32
ARRAYS = ("images", "noiseless", "bulge", "disk", "clump_mask", "neighbor_mask")


@pytest.fixture(scope="module")
def sim() -> Simulator:
    # A Gaussian PSF keeps set-up fast; everything else is on so that every array and table is written.
    return Simulator("candels-f160w", stamp_size=SIZE, psf="gaussian:0.18", clumps=True, neighbors=True,
                     components=True)


@pytest.fixture(scope="module")
def direct(sim) -> dict:
    """simulate() called batch by batch as write_dataset(batch_size=16) calls it, joined."""
    parts = [sim.simulate(range(start, min(start + 16, N)), SEED) for start in range(0, N, 16)]
    out = {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}
    for group in ("catalog", "clump_table", "neighbor_table"):
        out[group] = {col: np.concatenate([p[group][col] for p in parts]) for col in parts[0][group]}
    return out


@pytest.fixture(scope="module")
def written(sim, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "sims.h5"
    return write_dataset(path, sim, N, SEED, batch_size=16, progress=False)


def _assert_same_file_contents(a, b, table_ulp: int = 0) -> None:
    """Every stamp array of two dataset files is byte-identical, and so are the tables up to ``table_ulp``.

    Across batch sizes, float64 catalogue values can differ in the last bit (torch's vectorised ``pow``
    rounds its SIMD body and scalar tail differently); resuming with the same batches is exact.
    """
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for name in ARRAYS:
            assert fa[name][...].tobytes() == fb[name][...].tobytes(), name
        for group in ("catalog", "clump_table", "neighbor_table"):
            assert list(fa[group]) == list(fb[group])
            for col in fa[group]:
                x, y = fa[group][col][...], fb[group][col][...]
                if table_ulp and x.dtype.kind == "f":
                    np.testing.assert_array_max_ulp(x, y, maxulp=table_ulp)
                else:
                    assert x.tobytes() == y.tobytes(), f"{group}/{col}"


def test_round_trip_equals_direct_simulation(sim, direct, written):
    assert not partial_path(written).exists()
    with open_dataset(written) as ds:
        assert len(ds) == N
        assert ds.array_names == ARRAYS
        for name in ARRAYS:
            np.testing.assert_array_equal(ds.array(name)[...], direct[name], err_msg=name)
            assert ds.array(name).dtype == direct[name].dtype
        cat = ds.catalog
        assert cat.colnames == list(direct["catalog"])  # the simulator's column order
        for col, values in direct["catalog"].items():
            np.testing.assert_array_equal(cat[col], values, err_msg=col)
            assert (cat[col].unit or "") == (u.Unit(CATALOG_UNITS[col]) if CATALOG_UNITS[col] else "")
        for name, table in (("clump_table", ds.clump_table), ("neighbor_table", ds.neighbor_table)):
            assert len(table) > 0
            for col, values in direct[name].items():
                np.testing.assert_array_equal(table[col], values, err_msg=f"{name}/{col}")
        assert ds.neighbor_table["hlr_arcsec"].unit == u.arcsec
        assert ds.clump_table["x_pix"].unit == u.pix
        attrs = ds.attrs
        assert attrs["n"] == attrs["n_done"] == N
        assert attrs["psf"] == {"type": "gaussian", "fwhm_arcsec": 0.18}
        assert attrs["label_names"] == list(LABEL_NAMES)
        assert attrs["priors"] == json.loads(json.dumps(sim.priors.to_dict()))  # tuples come back as lists
        assert ds.psf_image is None


def test_item_i_equals_a_single_item_simulation(sim, written):
    with open_dataset(written) as ds:
        for i in (0, 17, N - 1):
            single = sim.simulate([i], SEED)
            item = ds[i]
            for name in ARRAYS:
                np.testing.assert_array_equal(item[name], single[name][0], err_msg=f"{name}[{i}]")
            for col, values in single["catalog"].items():  # within 1 ulp: see _assert_same_file_contents
                np.testing.assert_array_max_ulp(item["catalog"][col], values[0], maxulp=1)
            assert item["catalog"]["id"] == i
        np.testing.assert_array_equal(ds[-1]["images"], ds[N - 1]["images"])
        with pytest.raises(IndexError):
            ds[N]


def test_batch_size_does_not_change_the_data(sim, written, tmp_path):
    other = write_dataset(tmp_path / "b7.h5", sim, N, SEED, batch_size=7, progress=False)
    _assert_same_file_contents(written, other, table_ulp=1)


def test_reads_are_lazy_slices_of_chunked_arrays(written):
    with open_dataset(written) as ds:
        assert isinstance(ds.images, h5py.Dataset)  # not a numpy copy of the whole array
        assert ds.images.shape == (N, 1, SIZE, SIZE)
        assert ds.images.chunks[0] <= 64 and ds.images.compression is None
        batch = ds[8:11]
        assert batch["images"].shape == (3, 1, SIZE, SIZE)
        np.testing.assert_array_equal(batch["catalog"]["id"], [8, 9, 10])
    with pytest.raises(DeepmorphIOError, match="dataset is closed"):
        ds.images[0]


@pytest.mark.parametrize("suffix", [".ecsv", ".fits"])
def test_export_catalog_keeps_values_and_units(written, tmp_path, suffix):
    out = export_catalog(written, tmp_path / f"cat{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left
    table = Table.read(out)
    with open_dataset(written) as ds:
        cat = ds.catalog
    assert len(table) == N
    np.testing.assert_array_equal(table["mag"], cat["mag"])
    assert table["mag"].unit == u.mag
    assert table["bulge_hlr_arcsec"].unit == u.arcsec
    assert table["x_offset_pix"].unit == u.pix
    assert table["flux"].unit == u.count
    assert {k.lower(): v for k, v in table.meta.items()}["survey"] == "candels-f160w"


def test_export_catalog_rejects_unknown_extension(written, tmp_path):
    with pytest.raises(DeepmorphValueError, match="ecsv or .fits"):
        export_catalog(written, tmp_path / "cat.txt")


def test_resume_after_interruption_is_byte_identical(sim, written, tmp_path, monkeypatch):
    out = tmp_path / "resumed.h5"
    real = sim.simulate
    calls = []

    def fails_on_second_batch(indices, seed):
        if int(indices[0]) == 16:
            raise RuntimeError("simulated crash")
        return real(indices, seed)

    def records_batches(indices, seed):
        calls.append(int(indices[0]))
        return real(indices, seed)

    monkeypatch.setattr(sim, "simulate", fails_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(out, sim, N, SEED, batch_size=16, progress=False)
    partial = partial_path(out)
    assert not out.exists() and partial.exists()  # atomic: no final file from a failed run
    with pytest.raises(DeepmorphIOError, match="incomplete dataset \\(16 of 40"):
        open_dataset(partial)
    # A crash after the next batch's table rows were appended but before n_done moved on.
    with h5py.File(partial, "r+") as f:
        for col in f["clump_table"].values():
            col.resize((col.shape[0] + 3,))
        f["clump_table"]["id"][-3:] = 16

    monkeypatch.setattr(sim, "simulate", records_batches)
    write_dataset(out, sim, N, SEED, batch_size=16, progress=False)
    assert calls == [16, 32]  # resumed at n_done, did not redo the first batch
    assert not partial.exists()
    _assert_same_file_contents(written, out)


def test_partial_file_of_other_settings_is_started_again(sim, written, tmp_path, monkeypatch):
    out = tmp_path / "restarted.h5"
    real = sim.simulate

    def fail_after_first(indices, seed):
        if indices[0] > 0:
            raise RuntimeError("simulated crash")
        return real(indices, seed)

    monkeypatch.setattr(sim, "simulate", fail_after_first)
    with pytest.raises(RuntimeError):
        write_dataset(out, sim, N, SEED + 1, batch_size=16, progress=False)  # another seed
    monkeypatch.setattr(sim, "simulate", real)
    write_dataset(out, sim, N, SEED, batch_size=16, progress=False)
    _assert_same_file_contents(written, out)  # exact: same batches


def test_existing_output_needs_overwrite(sim, tmp_path):
    out = tmp_path / "kept.h5"
    out.write_text("precious")
    with pytest.raises(DeepmorphIOError, match="kept.h5: file exists; pass --overwrite"):
        write_dataset(out, sim, 4, SEED, progress=False)
    assert out.read_text() == "precious"
    write_dataset(out, sim, 4, SEED, overwrite=True, progress=False)
    with open_dataset(out) as ds:
        assert len(ds) == 4


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_n_must_be_positive(sim, tmp_path, n):
    with pytest.raises(DeepmorphValueError, match="n must be a positive integer"):
        write_dataset(tmp_path / "x.h5", sim, n, SEED, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_image_psf_is_stored(tmp_path):
    yy, xx = np.mgrid[-10:11, -10:11]
    psf = ImagePSF(np.exp(-(xx**2 + yy**2) / 8.0), pixel_scale_arcsec=0.03, source="test")
    sim = Simulator("candels-f160w", stamp_size=SIZE, psf=psf)
    path = write_dataset(tmp_path / "psf.h5", sim, 3, SEED, progress=False)
    with open_dataset(path) as ds:
        np.testing.assert_array_equal(ds.psf_image, sim.psf_image())
        assert ds.attrs["psf"]["type"] == "image"
        assert ds.array_names == ("images",)  # no components, clumps or neighbours asked for
        assert ds.clump_table is None and ds.neighbor_table is None


def _not_hdf5(path):
    path.write_text("not a dataset\n")


def _truncated(path, written):
    data = written.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_hdf5(path):
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (None, "no such file"),
        (_not_hdf5, "not an HDF5 file"),
        (_truncated, "truncated HDF5 file"),
        (_foreign_hdf5, "not a deepmorph dataset"),
    ],
)
def test_bad_files_give_one_line_errors(written, tmp_path, make, problem):
    path = tmp_path / "bad.h5"
    if make is _truncated:
        make(path, written)
    elif make is not None:
        make(path)
    with pytest.raises(DeepmorphIOError) as info:
        open_dataset(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_summary_names_survey_size_arrays_and_labels(written):
    text = summarize(written)
    assert "candels-f160w" in text
    assert f"{N} stamps, seed {SEED}" in text
    assert f"{SIZE} x {SIZE} px at 0.06 arcsec/px" in text
    assert f"images         ({N}, 1, {SIZE}, {SIZE}) float32" in text
    with open_dataset(written) as ds:
        counts = np.bincount(ds.catalog["label"], minlength=len(LABEL_NAMES))
    assert "labels:      " + ", ".join(f"{n} {c}" for n, c in zip(LABEL_NAMES, counts, strict=True)) in text
    assert "mag " in text and "bulge_n " in text
