"""Simulated datasets in one HDF5 file: write (resumable, atomic), read lazily, summarise, export.

Layout of a dataset file (N items of S x S pixels)::

    /images          (N, 1, S, S) float32, counts   chunks of up to 64 stamps, no compression
    /noiseless, /bulge, /disk    as images, only with ``components``
    /clump_mask      (N, 1, S, S) uint8, only with clumps;  /neighbor_mask likewise with neighbours
    /catalog/<col>   (N,) one dataset per catalogue column, attribute ``unit``
    /clump_table/<col>, /neighbor_table/<col>   ragged per-object tables (rows of item ``id``)
    /psf_image       the PSF image, only for image PSFs
    root attributes  everything in ``Simulator.attributes(seed)`` plus ``n`` (items requested),
                     ``n_done`` (items written) and ``format``

A write goes to ``<path>.partial`` and is renamed to ``path`` once complete, so a file at
``path`` is always whole. ``n_done`` is updated and flushed after every batch; rerunning the
same write resumes from it. Item ``i`` depends only on ``(seed, i)``, so a resumed file is
byte-identical to one written in a single run.

A large dataset may be written as K shards, on as many machines (``write_dataset(...,
shards=K, shard_index=i)``): shard ``i`` holds the contiguous items ``i*N//K .. (i+1)*N//K - 1``
of the N-item dataset, in ``<stem>-0000i-of-0000K.h5`` (:func:`shard_path`), with the extra root
attributes ``item_start``, ``n_total``, ``shard_index`` and ``shards`` (its ``n`` is its own item
count, and catalogue ``id`` the item's number in the whole dataset). :func:`open_dataset` takes
a directory, a glob pattern, a list of files, or the unsharded name (``sims.h5`` for
``sims-*-of-*.h5``) and reads the shards as one dataset, identical to the unsharded file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
from astropy.table import Column, Table
from tqdm.auto import tqdm

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError

FORMAT = "deepmorph.simulation"
#: Per-stamp arrays, in the order they are listed.
STAMP_ARRAYS = ("images", "noiseless", "bulge", "disk", "clump_mask", "neighbor_mask")
#: Ragged per-object tables.
TABLES = ("clump_table", "neighbor_table")
#: Root attributes that hold JSON text.
JSON_ATTRS = ("psf", "noise", "priors", "survey_preset", "label_names")
# Units of the ragged tables' columns (the catalogue's come from CATALOG_UNITS).
TABLE_UNITS = {
    "x_pix": "pix", "y_pix": "pix", "flux": "count", "mag": "mag", "hlr_arcsec": "arcsec", "pa_deg": "deg",
}
#: Root attributes that differ between the shards of one dataset (all others must agree).
SHARD_ATTRS = ("n", "n_done", "item_start", "n_total", "shard_index", "shards")
_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})$")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: 64 stamps of 64 x 64 float32
_TABLE_CHUNK_ROWS = 4096
_READ_CACHE_BYTES = 32 << 20


def partial_path(path: str | Path) -> Path:
    """Where :func:`write_dataset` writes until the dataset is complete: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` as a Path, its parent folders created; :class:`DeepmorphIOError` if it exists and
    ``overwrite`` is false, or if its folder cannot be made."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DeepmorphIOError(f"{path}: file exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepmorphIOError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None
    return path


# -- writing -------------------------------------------------------------------------------------
def write_dataset(
    path: str | Path,
    simulator,
    n: int,
    seed: int,
    batch_size: int = 512,
    overwrite: bool = False,
    progress: bool = True,
    shards: int = 1,
    shard_index: int = 0,
) -> Path:
    """Simulate items ``0 .. n-1`` with ``seed`` and store them in one HDF5 file (or one shard of them).

    Parameters
    ----------
    path : str or Path
        Output file (parent folders are created).
    simulator : deepmorph.simulate.Simulator
        What to simulate.
    n : int
        Number of stamps, > 0.
    seed : int
        Dataset seed; item ``i`` is a function of ``(seed, i)`` only.
    batch_size : int
        Stamps simulated and written at a time (memory: ~``batch_size * S^2 * 8`` bytes per array).
    overwrite : bool
        Replace an existing ``path``; otherwise an existing file is an error.
    progress : bool
        Show a tqdm progress bar.
    shards, shard_index : int
        Write only shard ``shard_index`` (from 0) of ``shards``: items ``shard_index * n // shards``
        to ``(shard_index + 1) * n // shards - 1``, to :func:`shard_path` ``(path, shard_index,
        shards)``. The shards, written anywhere in any order, open as one dataset equal to the
        unsharded one (:func:`open_dataset`).

    Returns
    -------
    Path
        The file written (``path``, or the shard's path), complete.

    Raises
    ------
    DeepmorphIOError
        The output exists and ``overwrite`` is false.
    DeepmorphValueError
        ``n`` or ``batch_size`` is not a positive integer, ``seed`` is negative, or ``shards`` is
        not in ``1 .. n`` or ``shard_index`` not in ``0 .. shards - 1``.

    Notes
    -----
    The file is written as ``<path>.partial`` and renamed when complete. If that partial file
    exists with the same attributes (simulator settings, seed, ``n``), the write resumes after its
    ``n_done`` items; a partial file of other settings, or one left unreadable by a hard kill, is
    started again.
    """
    from deepmorph.simulate.simulator import CATALOG_UNITS  # here: keeps `deepmorph info` free of torch

    n = _positive_int("n", n)
    batch_size = _positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DeepmorphValueError(f"seed must be a non-negative integer, got {seed!r}")
    first, count = shard_range(n, shards, shard_index)
    if shards > 1:
        path = shard_path(path, shard_index, shards)
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    attrs = {"format": FORMAT, **simulator.attributes(seed), "n": count}
    if shards > 1:
        attrs.update(item_start=first, n_total=n, shard_index=int(shard_index), shards=int(shards))
    with _open_partial(partial, attrs, simulator.psf_image()) as f:
        done = int(f.attrs["n_done"])
        with tqdm(total=count, initial=done, unit="stamp", desc=path.name, disable=not progress) as bar:
            for start in range(done, count, batch_size):
                stop = min(start + batch_size, count)
                batch = simulator.simulate(np.arange(first + start, first + stop), seed)
                if "images" not in f:
                    _create_layout(f, batch, count, simulator.components, CATALOG_UNITS)
                _write_batch(f, batch, start, stop)
                f.attrs["n_done"] = stop  # only after the whole batch is in the file
                f.flush()
                bar.update(stop - start)
    os.replace(partial, path)
    return path


def shard_range(n: int, shards: int, shard_index: int) -> tuple[int, int]:
    """First item and item count of shard ``shard_index`` of ``shards`` of an ``n``-item dataset.

    Shard ``i`` holds items ``i * n // shards .. (i + 1) * n // shards - 1``: contiguous, in order,
    sizes differing by at most one, none empty.
    """
    n = _positive_int("n", n)
    shards = _positive_int("shards", shards)
    if shards > n:
        raise DeepmorphValueError(f"shards must be at most n ({n}), got {shards}")
    if isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)) \
            or not 0 <= shard_index < shards:
        raise DeepmorphValueError(f"shard index must be in 0 .. {shards - 1}, got {shard_index!r}")
    first = int(shard_index) * n // shards
    return first, (int(shard_index) + 1) * n // shards - first


def shard_path(path: str | Path, shard_index: int, shards: int) -> Path:
    """Where shard ``shard_index`` of ``shards`` of the dataset ``path`` goes.

    ``sims.h5`` -> ``sims-00001-of-00004.h5``; a directory (an existing one, or a path without a
    suffix) -> ``DIR/sims-00001-of-00004.h5``.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "sims.h5"
    return path.with_name(f"{path.stem}-{int(shard_index):05d}-of-{int(shards):05d}{path.suffix}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DeepmorphValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _plain(value):
    """HDF5 attribute value -> plain Python (numpy scalars and arrays, bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _open_partial(partial: Path, attrs: dict, psf_image: np.ndarray | None) -> h5py.File:
    """Reopen a matching unfinished file to resume it, or start a new one."""
    if partial.exists():
        try:
            f = h5py.File(partial, "r+")
        except OSError:  # killed mid-write and unreadable: start again
            f = None
        if f is not None:
            stored = {k: _plain(v) for k, v in f.attrs.items()}
            if all(stored.get(k) == _plain(v) for k, v in attrs.items()) and "n_done" in stored:
                _truncate_tables(f, int(stored["n_done"]))
                return f
            f.close()
        partial.unlink()
    try:
        f = h5py.File(partial, "w")
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise DeepmorphIOError(f"{partial}: cannot create the file ({reason})") from None
    f.attrs.update(attrs)
    f.attrs["n_done"] = 0
    if psf_image is not None:
        f.create_dataset("psf_image", data=psf_image)
    return f


def _truncate_tables(f: h5py.File, n_done: int) -> None:
    """Drop table rows of items >= n_done (written by a batch that did not finish)."""
    for name in TABLES:
        if name in f:
            group = f[name]
            keep = int(np.searchsorted(group["id"][...], n_done))  # rows are appended in item order
            for column in group.values():
                column.resize((keep,))


def _create_layout(f: h5py.File, batch: dict, n: int, components: bool, catalog_units: dict) -> None:
    for name in STAMP_ARRAYS:
        if name not in batch or (name in ("noiseless", "bulge", "disk") and not components):
            continue
        item_shape = batch[name].shape[1:]
        rows = max(1, min(n, 64, _CHUNK_BYTES // (batch[name][0].nbytes or 1)))
        ds = f.create_dataset(name, shape=(n, *item_shape), dtype=batch[name].dtype, chunks=(rows, *item_shape))
        ds.attrs["unit"] = "" if name.endswith("_mask") else "count"
    group = f.create_group("catalog", track_order=True)  # columns keep the simulator's order
    for col, values in batch["catalog"].items():
        group.create_dataset(col, shape=(n,), dtype=values.dtype).attrs["unit"] = catalog_units.get(col, "")
    for name in TABLES:
        if name in batch:
            group = f.create_group(name, track_order=True)
            for col, values in batch[name].items():
                ds = group.create_dataset(col, shape=(0,), maxshape=(None,), dtype=values.dtype,
                                          chunks=(_TABLE_CHUNK_ROWS,))
                ds.attrs["unit"] = TABLE_UNITS.get(col, "")


def _write_batch(f: h5py.File, batch: dict, start: int, stop: int) -> None:
    for name in STAMP_ARRAYS:
        if name in f:
            f[name][start:stop] = batch[name]
    for col, values in batch["catalog"].items():
        f["catalog"][col][start:stop] = values
    for name in TABLES:
        if name in f:
            for col, values in batch[name].items():
                ds = f[name][col]
                old = ds.shape[0]
                ds.resize((old + len(values),))
                ds[old:] = values


# -- reading -------------------------------------------------------------------------------------
class SimDataset:
    """A dataset file opened for lazy reading (arrays stay on disk until indexed).

    Parameters
    ----------
    path : str or Path
        A file written by :func:`write_dataset` (shards open through :func:`open_dataset`).

    Attributes
    ----------
    path : Path
        The file, or what named the shards (directory, pattern).
    shards : tuple of Path
        The shard files read as this dataset, in item order; empty for a single file.

    Examples
    --------
    >>> with open_dataset("sims.h5") as ds:          # doctest: +SKIP
    ...     item = ds[0]                              # images (1, S, S), catalog row, ...
    ...     first = ds.images[:256]                   # h5py slicing reads only those stamps
    """

    def __init__(self, path: str | Path, _file: h5py.File | None = None, _shards: Sequence[Path] = ()):
        self.path = Path(path)
        self.shards: tuple[Path, ...] = tuple(_shards)
        self._file = _open_h5(self.path) if _file is None else _file
        try:
            self._check()
        except BaseException:
            self._file.close()
            raise
        f = self._file
        self._n = int(f.attrs["n"])
        # Dataset handles looked up once: a name lookup costs about as much as reading a small stamp.
        self._arrays = {name: f[name] for name in STAMP_ARRAYS if name in f}
        self._columns = dict(f["catalog"].items())

    def _open_file(self) -> h5py.File:
        """The HDF5 file; a clear error once the dataset is closed."""
        if not self._file:
            raise DeepmorphIOError(f"{self.path}: dataset is closed")
        return self._file

    def _check(self) -> None:
        f = self._file
        if "images" not in f or "catalog" not in f or "n" not in f.attrs or "n_done" not in f.attrs:
            raise DeepmorphIOError(
                f"{self.path}: not a deepmorph dataset (no images, catalog or n/n_done attributes)"
            )
        n, done = int(f.attrs["n"]), int(f.attrs["n_done"])
        if done < n:
            raise DeepmorphIOError(
                f"{self.path}: incomplete dataset ({done} of {n} items written); "
                "rerun the same `deepmorph simulate` command to finish it"
            )

    def __len__(self) -> int:
        return self._n

    @property
    def array_names(self) -> tuple[str, ...]:
        """The per-stamp arrays this file holds (``images`` first)."""
        return tuple(self._arrays)

    @property
    def images(self) -> h5py.Dataset:
        """The ``(N, 1, S, S)`` float32 images (counts), as an h5py dataset: slice it to read."""
        return self.array("images")

    def array(self, name: str) -> h5py.Dataset:
        """Any per-stamp array by name (see :attr:`array_names`), as an h5py dataset."""
        if name not in self.array_names:
            raise DeepmorphValueError(f"{self.path}: no array {name!r}; it holds {', '.join(self.array_names)}")
        self._open_file()
        return self._arrays[name]

    def __getitem__(self, key: int | slice) -> dict:
        """Item ``key`` (or a slice of items): every per-stamp array and a ``catalog`` dict of its row."""
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"item {key} out of range for a dataset of {len(self)}")
            key = i
        elif not isinstance(key, slice):
            raise TypeError(f"index with an int or a slice, not {type(key).__name__}")
        self._open_file()
        item = {name: ds[key] for name, ds in self._arrays.items()}
        item["catalog"] = {col: ds[key] for col, ds in self._columns.items()}
        return item

    @cached_property
    def attrs(self) -> dict:
        """Root attributes as Python values, JSON text decoded (psf, noise, priors, ...)."""
        out = {k: _plain(v) for k, v in self._open_file().attrs.items()}
        for key in JSON_ATTRS:
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    @cached_property
    def catalog(self) -> Table:
        """The catalogue of true parameters, one row per item, with units."""
        return self._table("catalog")

    @cached_property
    def clump_table(self) -> Table | None:
        """One row per clump (``id`` is the item), or None without clumps."""
        return self._table("clump_table") if "clump_table" in self._open_file() else None

    @cached_property
    def neighbor_table(self) -> Table | None:
        """One row per neighbour (``id`` is the item), or None without neighbours."""
        return self._table("neighbor_table") if "neighbor_table" in self._open_file() else None

    @property
    def psf_image(self) -> np.ndarray | None:
        """The PSF image the data were made with (image PSFs only)."""
        return self._open_file()["psf_image"][...] if "psf_image" in self._open_file() else None

    def _table(self, group: str) -> Table:
        columns = [
            Column(ds[...], name=name, unit=_plain(ds.attrs.get("unit", "")) or None)
            for name, ds in self._open_file()[group].items()
        ]
        a = self.attrs
        meta = {  # keys of <= 8 characters so that FITS headers take them as they are
            "survey": a["survey"], "seed": a["seed"], "pixscale": a["pixel_scale_arcsec"],
            "zeropt": a["zeropoint_mag"], "labels": ",".join(a["label_names"]),
        }
        return Table(columns, meta=meta)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SimDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self._file:
            return f"SimDataset({str(self.path)!r}, closed)"
        shards = f", shards={len(self.shards)}" if self.shards else ""
        return f"SimDataset({str(self.path)!r}, n={len(self)}, arrays={list(self.array_names)}{shards})"


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise DeepmorphIOError(f"{path}: no such file")
    if path.is_dir():
        raise DeepmorphIOError(f"{path}: is a directory, not a dataset file")
    try:
        return h5py.File(path, "r", rdcc_nbytes=_READ_CACHE_BYTES)
    except OSError as exc:
        text = str(exc)
        problem = "truncated HDF5 file (an unfinished copy?)" if "truncated" in text else "not an HDF5 file"
        raise DeepmorphIOError(f"{path}: {problem} ({text.splitlines()[0] if text else type(exc).__name__})") from None


def open_dataset(path: str | Path | Sequence[str | Path]) -> SimDataset:
    """Open a dataset file, or the shards of one, for lazy reading (see :class:`SimDataset`).

    Parameters
    ----------
    path : path, glob pattern or sequence of paths
        A dataset file; or its shards (:func:`write_dataset` with ``shards``) as a directory of
        ``.h5`` files, a glob pattern (``"sims-*-of-00004.h5"``), a list of files, or the name the
        unsharded file would have (``sims.h5`` when only ``sims-*-of-*.h5`` exist). Shards are read
        as one dataset, in item order, through an in-memory HDF5 file of virtual datasets: every
        array, catalogue column and table is the concatenation of the shards'.

    Raises
    ------
    DeepmorphIOError
        A file is missing, not HDF5, truncated, not a deepmorph dataset, or unfinished; a pattern or
        directory matches no file; shards are missing (a gap in the items) or overlap.
    DeepmorphValueError
        Shards of different datasets (survey, seed, simulator settings or size differ).
    """
    files = _dataset_files(path)
    if files is None:
        return SimDataset(path)
    return _open_shards(path, files)


def dataset_exists(path: str | Path | Sequence[str | Path]) -> bool:
    """Whether ``path`` names a dataset :func:`open_dataset` can try: a file, or shards.

    Shards are named as :func:`open_dataset` takes them (a directory of ``.h5`` files, a glob
    pattern that matches files, a non-empty list, or the unsharded name when only its shards exist).
    Whether the files are complete, consistent datasets is left to :func:`open_dataset`.
    """
    try:
        files = _dataset_files(path)
    except DeepmorphIOError:
        return False
    return Path(path).is_file() if files is None else True


def _dataset_files(path) -> list[Path] | None:
    """The shard files that ``path`` names, or None for a single dataset file."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise DeepmorphIOError("no dataset files given (an empty list)")
        return [Path(p) for p in path]
    path = Path(path)
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if not p.endswith(".partial"))
        if not files:
            raise DeepmorphIOError(f"{path}: no dataset files match this pattern")
        return files
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".h5", ".hdf5") and p.is_file())
        if not files:
            raise DeepmorphIOError(f"{path}: directory holds no dataset files (.h5)")
        return files
    if not path.exists() and path.suffix:
        siblings = sorted(p for p in path.parent.glob(f"{glob.escape(path.stem)}-*-of-*{path.suffix}")
                          if _SHARD_NAME.search(p.stem))
        if siblings:
            return siblings
    return None


def _open_shards(source, files: list[Path]) -> SimDataset:
    """The shards ``files`` as one :class:`SimDataset` over an in-memory file of virtual datasets."""
    name = str(source) if not isinstance(source, (list, tuple)) else f"{files[0].parent}/[{len(files)} shards]"
    parts = []
    try:
        for path in files:
            parts.append(SimDataset(path))
        parts.sort(key=lambda part: int(part._file.attrs.get("item_start", 0)))
        attrs, n = _check_shards(name, parts)
        # The virtual file (metadata only) is written to a temporary file and reopened read-only:
        # HDF5 opens the shards as the virtual file is opened (a writable one would lock them
        # against every other reader, an in-memory one would read them whole). Unlinked once open.
        handle, tmp = tempfile.mkstemp(suffix=".h5", prefix="deepmorph-shards-")
        os.close(handle)
        try:
            with h5py.File(tmp, "w") as f:
                _virtual_layout(f, parts, n)
                f.attrs.update(attrs)
                f.attrs.update(n=n, n_done=n)
            f = h5py.File(tmp, "r", rdcc_nbytes=_READ_CACHE_BYTES)
        finally:
            os.unlink(tmp)
    finally:
        for part in parts:
            part.close()
    return SimDataset(name, _file=f, _shards=[part.path for part in parts])


def _check_shards(name: str, parts: list[SimDataset]) -> tuple[dict, int]:
    """The attributes the shards share and their total item count; one-line errors where they do not fit."""
    first = parts[0]
    common = {k: v for k, v in first._file.attrs.items() if k not in SHARD_ATTRS}
    n_total = int(first._file.attrs.get("n_total", len(first)))
    for part in parts[1:]:
        a = part._file.attrs
        keys = set(common) | {k for k in a if k not in SHARD_ATTRS}
        differ = sorted(k for k in keys if k not in common or k not in a or _plain(a[k]) != _plain(common[k]))
        if differ:
            raise DeepmorphValueError(
                f"{name}: {part.path.name} is a shard of another dataset than {first.path.name} "
                f"({', '.join(differ)} differ)"
            )
        if int(a.get("n_total", len(part))) != n_total:
            raise DeepmorphValueError(
                f"{name}: {part.path.name} is a shard of a {int(a.get('n_total', len(part)))}-item dataset, "
                f"{first.path.name} of a {n_total}-item one"
            )
        if part.array_names != first.array_names:
            raise DeepmorphValueError(f"{name}: {part.path.name} and {first.path.name} hold different arrays")
    expected, previous = 0, None
    for part in parts:
        start = int(part._file.attrs.get("item_start", 0))
        if start > expected:
            raise DeepmorphIOError(
                f"{name}: items {expected}..{start - 1} of {n_total} are in no shard (one missing before "
                f"{part.path.name}?)"
            )
        if start < expected:
            raise DeepmorphIOError(
                f"{name}: {previous.path.name} and {part.path.name} overlap (items {start}..{expected - 1})"
            )
        expected, previous = start + len(part), part
    if expected < n_total:
        raise DeepmorphIOError(
            f"{name}: items {expected}..{n_total - 1} of {n_total} are in no shard (one missing after "
            f"{previous.path.name}?)"
        )
    return common, n_total


def _virtual_layout(f: h5py.File, parts: list[SimDataset], n: int) -> None:
    """Virtual datasets in ``f`` concatenating the shards' arrays, catalogue and tables along axis 0."""

    def concatenate(where: str, lengths: list[int]) -> h5py.Dataset:
        sources = [part._file[where] for part in parts]
        layout = h5py.VirtualLayout(shape=(sum(lengths), *sources[0].shape[1:]), dtype=sources[0].dtype)
        start = 0
        for part, source, length in zip(parts, sources, lengths, strict=True):
            if length:
                layout[start:start + length] = h5py.VirtualSource(str(part.path.resolve()), where, shape=source.shape)
            start += length
        ds = f.create_virtual_dataset(where, layout)
        ds.attrs.update(dict(sources[0].attrs))
        return ds

    lengths = [len(part) for part in parts]
    first = parts[0]._file
    for name in STAMP_ARRAYS:
        if name in first:
            concatenate(name, lengths)
    for group in ("catalog", *TABLES):
        if group not in first:
            continue
        f.create_group(group, track_order=True)
        for column in first[group]:
            where = f"{group}/{column}"
            concatenate(where, lengths if group == "catalog" else [part._file[where].shape[0] for part in parts])
    if "psf_image" in first:
        f.create_dataset("psf_image", data=first["psf_image"][...])


# -- catalogue export and summary ----------------------------------------------------------------
_CATALOG_FORMATS = {".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits"}


def catalog_format(out: str | Path) -> str:
    """astropy's format for a catalogue written to ``out`` (ECSV or FITS, by extension); a one-line
    error for another extension."""
    fmt = _CATALOG_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise DeepmorphValueError(f"{out}: catalogue format from the extension must be .ecsv or .fits")
    return fmt


def export_catalog(path: str | Path, out: str | Path) -> Path:
    """Write the catalogue of dataset ``path`` to ``out`` (ECSV or FITS, by extension), with units.

    The table is written under a temporary name and renamed, so ``out`` is never half-written.
    """
    out = Path(out)
    fmt = catalog_format(out)
    with open_dataset(path) as ds:
        table = ds.catalog
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        table.write(tmp, format=fmt, overwrite=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_SUMMARY_COLUMNS = ("mag", "bulge_to_total", "bulge_n", "bulge_hlr_arcsec", "disk_hlr_arcsec", "disk_q",
                    "n_clumps", "n_neighbors")


def _describe_psf(psf: dict) -> str:
    kind = psf.get("type")
    if kind == "moffat":
        return f"Moffat, FWHM {psf['fwhm_arcsec']} arcsec, beta {psf['beta']}"
    if kind == "gaussian":
        return f"Gaussian, FWHM {psf['fwhm_arcsec']} arcsec"
    if kind == "image":
        return f"image {psf['source']} at {psf['pixel_scale_arcsec']} arcsec/px (FWHM ~{psf['fwhm_arcsec']} arcsec)"
    if kind == "convolved":
        return (f"{_describe_psf(psf['base'])} convolved with a Gaussian of sigma {psf['blur_sigma_arcsec']:.4g} "
                f"arcsec (FWHM {psf['fwhm_arcsec']:.4g} arcsec)")
    return "none"


def _describe_noise(noise: dict) -> str:
    kind = noise.get("type")
    gain = noise.get("gain_e_per_count")
    poisson = f", Poisson at gain {gain:g} e-/count" if gain else ""
    if kind == "gaussian":
        return f"Gaussian sky {noise['sky_sigma']:.4g} counts/px{poisson}"
    if kind == "background":
        return f"real background {noise['source']} (MAD sigma {noise['sky_sigma']:.4g} counts){poisson}"
    return "none"


def summarize(path: str | Path) -> str:
    """A human-readable summary of a dataset file, or of its shards (what ``deepmorph info`` prints)."""
    with open_dataset(path) as ds:
        a = ds.attrs
        s = a["stamp_size"]
        scale = a["pixel_scale_arcsec"]
        lines = [
            f"file:        {ds.path}" + (f" ({len(ds.shards)} shards)" if ds.shards else ""),
            f"survey:      {a['survey']} ({a['survey_preset'].get('band', '')}), image unit {a['image_unit']}",
            f"N:           {len(ds)} stamps, seed {a['seed']}",
            f"stamp:       {s} x {s} px at {scale:g} arcsec/px ({s * scale:.3g} arcsec)",
            f"PSF:         {_describe_psf(a['psf'])}",
            f"noise:       {_describe_noise(a['noise'])}",
            f"options:     clumps={a['clumps']} neighbors={a['neighbors']} components={a['components']}",
            f"version:     deepmorph {a.get('version', '?')}",
            "arrays:",
        ]
        for name in ds.array_names:
            lines.append(f"  {name:<14} {ds.array(name).shape} {ds.array(name).dtype}")
        for name, table in (("clump_table", ds.clump_table), ("neighbor_table", ds.neighbor_table)):
            if table is not None:
                lines.append(f"  {name:<14} {len(table)} rows: {', '.join(table.colnames)}")
        cat = ds.catalog
        labels = np.asarray(cat["label"]) if "label" in cat.colnames else np.zeros(0, dtype=np.int64)
        unlabelled = int((labels < 0).sum())
        counts = np.bincount(labels[labels >= 0], minlength=len(a["label_names"]))
        text = ", ".join(f"{nm} {c}" for nm, c in zip(a["label_names"], counts, strict=False)) or "none"
        lines.append("labels:      " + text + (f" ({unlabelled} unlabelled)" if unlabelled else ""))
        lines.append("catalogue (min / median / max):")
        for col in _SUMMARY_COLUMNS:
            if col in cat.colnames:
                v = np.asarray(cat[col], dtype=float)
                unit = f" {cat[col].unit}" if cat[col].unit else ""
                lines.append(f"  {col:<18} {v.min():.4g} / {np.median(v):.4g} / {v.max():.4g}{unit}")
    return "\n".join(lines)


__all__ = [
    "FORMAT", "SimDataset", "check_output", "export_catalog", "open_dataset", "partial_path", "shard_path",
    "shard_range", "summarize", "write_dataset",
]
