"""Sharded datasets: K shards written apart read as one dataset, identical to the unsharded file."""

from __future__ import annotations

import numpy as np
import pytest

from deepmorph.cli import main
from deepmorph.data import StampDataset, open_dataset, write_dataset
from deepmorph.data.store import shard_path, shard_range
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.simulate import Simulator
from tests.cli_errors import error_line

N, SEED, SIZE = 40, 7, 32


@pytest.fixture(scope="module")
def sim() -> Simulator:
    # every array and both ragged tables, so that each is checked
    return Simulator("candels-f160w", stamp_size=SIZE, psf="gaussian:0.18", clumps=True, neighbors=True,
                     components=True)


@pytest.fixture(scope="module")
def written(sim, tmp_path_factory):
    """The unsharded file, and the same dataset as 3 shards written in another order and batch size."""
    folder = tmp_path_factory.mktemp("shards")
    whole = write_dataset(folder / "whole.h5", sim, N, SEED, batch_size=16, progress=False)
    shards = [write_dataset(folder / "sharded" / "sims.h5", sim, N, SEED, batch_size=5, progress=False,
                            shards=3, shard_index=i) for i in (2, 0, 1)]
    return whole, folder / "sharded", sorted(shards)


def _assert_same_dataset(a, b) -> None:
    assert len(a) == len(b) == N and a.array_names == b.array_names
    for name in a.array_names:  # pixels: bit for bit
        assert a.array(name)[...].tobytes() == b.array(name)[...].tobytes(), name
    for table_a, table_b in ((a.catalog, b.catalog), (a.clump_table, b.clump_table),
                             (a.neighbor_table, b.neighbor_table)):
        assert table_a.colnames == table_b.colnames and len(table_a) == len(table_b) > 0
        for col in table_a.colnames:
            x, y = np.asarray(table_a[col]), np.asarray(table_b[col])
            assert table_a[col].unit == table_b[col].unit, col
            if x.dtype.kind == "f":  # float64 parameters: a batch boundary may move the last bit (test_store)
                np.testing.assert_array_max_ulp(x, y, maxulp=1)
            else:
                np.testing.assert_array_equal(x, y, err_msg=col)
    assert a.attrs == b.attrs and a.catalog.meta == b.catalog.meta


def test_shard_ranges_are_contiguous_balanced_and_cover_every_item():
    for n, k in ((40, 3), (9, 4), (5, 5), (1000, 7)):
        ranges = [shard_range(n, k, i) for i in range(k)]
        starts = [first for first, _ in ranges]
        counts = [count for _, count in ranges]
        assert starts == [0, *np.cumsum(counts)[:-1].tolist()] and sum(counts) == n
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    assert shard_path("out/sims.h5", 1, 4).name == "sims-00001-of-00004.h5"
    with pytest.raises(DeepmorphValueError, match="shard index must be in 0 .. 3, got 4"):
        shard_range(40, 4, 4)
    with pytest.raises(DeepmorphValueError, match="shards must be at most n"):
        shard_range(3, 4, 0)


def test_shards_read_as_the_unsharded_dataset(written):
    whole, folder, shards = written
    assert [p.name for p in shards] == [f"sims-0000{i}-of-00003.h5" for i in range(3)]
    with open_dataset(shards[1]) as middle:  # a shard alone: its own items, numbered as in the whole
        assert len(middle) == 13 and middle.catalog["id"].tolist() == list(range(13, 26))
    for source in (folder, folder / "sims.h5", str(folder / "sims-*-of-00003.h5"), shards[::-1]):
        with open_dataset(whole) as a, open_dataset(source) as b:
            assert b.shards == tuple(shards)
            _assert_same_dataset(a, b)
            items = [0, 12, 13, 25, 26, 39]  # across the shard boundaries
            np.testing.assert_array_equal(b.images[items], a.images[items])
    # training data: the items of a split are the same from either
    split = np.array([1, 12, 13, 14, 30, 39])
    from_file = StampDataset(whole, split, target="label", masks=["clump_mask"]).batch(range(len(split)))
    from_shards = StampDataset(folder, split, target="label", masks=["clump_mask"]).batch(range(len(split)))
    for key in from_file:
        assert from_file[key].equal(from_shards[key]), key


def test_missing_foreign_and_overlapping_shards_are_one_line_errors(sim, written, tmp_path):
    whole, folder, shards = written
    with pytest.raises(DeepmorphIOError, match=r"items 13\.\.25 of 40 are in no shard .*sims-00002-of-00003"):
        open_dataset([shards[0], shards[2]])
    with pytest.raises(DeepmorphIOError, match=r"items 26\.\.39 of 40 are in no shard"):
        open_dataset(shards[:2])
    other_seed = write_dataset(tmp_path / "sims.h5", sim, N, SEED + 1, progress=False, shards=3, shard_index=1)
    with pytest.raises(DeepmorphValueError, match=r"sims-00001-of-00003.h5 is a shard of another dataset .*\(seed "):
        open_dataset([shards[0], other_seed, shards[2]])
    quarter = write_dataset(tmp_path / "q" / "sims.h5", sim, N, SEED, progress=False, shards=4, shard_index=1)
    with pytest.raises(DeepmorphIOError, match=r"sims-00000-of-00003.h5 and sims-00001-of-00004.h5 overlap "
                                               r"\(items 10\.\.12\)"):
        open_dataset([*shards, quarter])
    with pytest.raises(DeepmorphIOError, match="no dataset files match"):
        open_dataset(str(tmp_path / "nothing-*.h5"))


def test_simulate_command_writes_shards_that_info_reads_as_one(tmp_path, capsys):
    common = ["simulate", "--n", "10", "--seed", "3", "--stamp-size", "32", "--psf", "gaussian:0.18",
              "--no-progress", "--shards", "2"]
    for i in (1, 0):
        assert main([*common, "--shard-index", str(i), "--out", str(tmp_path / "sims.h5")]) == 0
    out = capsys.readouterr().out
    assert "sims-00001-of-00002.h5: stamps 5..9 of 10" in out
    assert main(["info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "(2 shards)" in text and "10 stamps, seed 3" in text
    with open_dataset(tmp_path) as ds:
        np.testing.assert_array_equal(ds.catalog["id"], np.arange(10))

    assert main([*common, "--shard-index", "2", "--out", str(tmp_path / "x.h5")]) == 2
    assert "shard index must be in 0 .. 1, got 2" in error_line(capsys)
    (tmp_path / "sims-00000-of-00002.h5").unlink()
    assert main(["info", str(tmp_path / "sims.h5")]) == 2
    assert "items 0..4 of 10 are in no shard" in error_line(capsys)


def test_commands_that_check_their_data_first_accept_shards(written, tmp_path, capsys):
    from deepmorph.data import dataset_exists

    whole, folder, shards = written
    for source in (whole, folder, folder / "sims.h5", str(folder / "sims-*-of-00003.h5"), shards):
        assert dataset_exists(source), source
    for missing in (folder / "other.h5", str(folder / "nothing-*.h5"), tmp_path, []):
        assert not dataset_exists(missing), missing
    # train vae refused shards before it opened them ("no such dataset file")
    args = ["train", "vae", "--data", str(folder / "sims.h5"), "--out", str(tmp_path / "vae"), "--epochs", "1",
            "--latent-dim", "2", "--batch-size", "16", "--quiet", "--no-evaluate"]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "vae" / "model.pt").is_file()
    capsys.readouterr()
    assert main([*args[:3], str(folder / "other.h5"), *args[4:]]) == 2
    assert "other.h5: no such dataset file (or shards)" in error_line(capsys)
