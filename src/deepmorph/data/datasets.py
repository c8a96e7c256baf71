"""PyTorch datasets over HDF5 files and over the simulator, splits, normalisation, loaders.

Every dataset here yields the same item, a dict::

    {"image": float32 (C, H, W), "target": int64 () for "label" or float32 (K,) for columns,
     "index": int, "<mask name>": float32 (1, H, W) for each requested mask}

so that a model trains on a file (:class:`StampDataset`) or on galaxies simulated on the fly
(:class:`SimulatedDataset`) without a change. The default collate function of
:class:`torch.utils.data.DataLoader` turns a list of items into the same dict of batched tensors.

Examples
--------
>>> from deepmorph.data import Normalization, StampDataset, make_loader, open_dataset, split_indices
>>> splits = split_indices(len(open_dataset("sims.h5")), seed=0)          # doctest: +SKIP
>>> train = StampDataset("sims.h5", splits["train"])                          # doctest: +SKIP
>>> train.normalization = Normalization("asinh").fit(train)                   # doctest: +SKIP
>>> loader = make_loader(train, batch_size=256, shuffle=True, num_workers=4, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from astropy.table import Table

from deepmorph.data.normalization import NORMALIZATIONS, Normalization, robust_sigma, sky_sigma
from deepmorph.data.store import open_dataset
from deepmorph.errors import DeepmorphValueError

SPLITS = ("train", "val", "test")


# -- splits --------------------------------------------------------------------------------------
def split_indices(n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Deterministic random train/val/test split of ``range(n)``.

    Parameters
    ----------
    n : int
        Number of items, > 0.
    seed : int
        Seed of the permutation, >= 0; the same ``(n, seed, fractions)`` always gives the same split.
    fractions : sequence of 3 float
        Fractions of train, val and test, each >= 0, summing to 1. The train and val sizes are
        rounded to the nearest integer; test takes the rest.

    Returns
    -------
    dict of str to numpy.ndarray
        ``train``, ``val``, ``test``: sorted int64 indices (sorted reads are faster in HDF5),
        disjoint, together covering ``0 .. n-1``.

    Raises
    ------
    DeepmorphValueError
        ``n`` is not a positive integer, ``seed`` is negative, or the fractions are not 3
        non-negative numbers summing to 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise DeepmorphValueError(f"split: n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DeepmorphValueError(f"split: seed must be a non-negative integer, got {seed!r}")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DeepmorphValueError(
            f"split: fractions must be 3 non-negative numbers (train, val, test) summing to 1, got {tuple(fractions)}"
        )
    perm = np.random.default_rng(int(seed)).permutation(int(n))
    n_train = int(round(fr[0] * n))
    n_val = min(int(round(fr[1] * n)), n - n_train)
    parts = (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:])
    return {name: np.sort(p).astype(np.int64) for name, p in zip(SPLITS, parts, strict=True)}


# -- targets -------------------------------------------------------------------------------------
def _target_columns(target) -> tuple[str, ...] | None:
    if target is None:
        return None
    if isinstance(target, str):
        return (target,)
    cols = tuple(target)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise DeepmorphValueError(f"target must be 'label', a list of catalogue column names, or None; got {target!r}")
    return cols


def _is_label(target) -> bool:
    return isinstance(target, str) and target == "label"


def _target_tensor(target, catalog_rows: dict, columns: tuple[str, ...] | None) -> torch.Tensor | None:
    """The target of a batch (``catalog_rows``: column -> 1-D array) as a tensor."""
    if columns is None:
        return None
    if _is_label(target):
        return torch.as_tensor(np.asarray(catalog_rows["label"], dtype=np.int64))
    return torch.as_tensor(np.stack([np.asarray(catalog_rows[c], dtype=np.float32) for c in columns], axis=-1))


# -- reading rows of HDF5 arrays -----------------------------------------------------------------
def _iter_rows(arr: h5py.Dataset, wanted: np.ndarray, block: int = 1024):
    """Yield ``(rows, data)`` for sorted unique file rows ``wanted``, one file block at a time.

    Dense blocks are read as one contiguous slice, sparse ones with an h5py point selection.
    """
    if len(wanted) == 0:
        return
    ids = wanted // block
    for sel in np.split(wanted, np.flatnonzero(np.diff(ids)) + 1):
        if len(sel) > block // 8:
            data = arr[int(sel[0]):int(sel[-1]) + 1][sel - sel[0]]
        else:
            data = arr[sel]
        yield sel, data


def _read_rows(arr: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (any order, repeats allowed) of an h5py dataset, read in file order."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    out = np.empty((len(uniq), *arr.shape[1:]), dtype=arr.dtype)
    pos = 0
    for sel, data in _iter_rows(arr, uniq):
        out[pos:pos + len(sel)] = data
        pos += len(sel)
    return out[inverse.reshape(-1)]


def _unbatch(batch: dict) -> list[dict]:
    """A collated batch back into items (what ``__getitems__`` returns to the DataLoader)."""
    n = len(batch["image"])
    items = [{k: v[j] for k, v in batch.items()} for j in range(n)]
    for item in items:
        item["index"] = int(item["index"])
    return items


# -- datasets over files -------------------------------------------------------------------------
class StampDataset(torch.utils.data.Dataset):
    """Items of an HDF5 dataset file (simulated or imported), read lazily one at a time.

    The file is opened on first access in each process (each DataLoader worker opens its own
    handle); the dataset pickles as its path, so any number of workers can read it. Reading
    items in random order costs one HDF5 chunk (up to 64 stamps) per item where the chunk cache
    misses; for large shuffled training sets use ``in_memory=True`` or :meth:`batch` with sorted
    indices.

    Parameters
    ----------
    path : str, Path or list of paths
        A file written by :func:`deepmorph.data.write_dataset` or :func:`deepmorph.data.import_images`,
        or the shards of one (a directory, a glob pattern, a list of files: see
        :func:`deepmorph.data.open_dataset`).
    indices : array of int, optional
        Items of the file this dataset holds, in this order (e.g. one entry of :func:`split_indices`);
        default all.
    target : "label", str, list of str, or None
        ``"label"``: the class (int64 scalar); a column name or list of names: those catalogue
        columns as a float32 vector ``(K,)`` (regression); None: items have no ``target``.
    masks : sequence of str
        Per-stamp mask arrays to return with the image (e.g. ``"clump_mask"``), each as float32
        ``(1, H, W)`` under its own name.
    normalization : Normalization, optional
        Applied to each image (must be fitted); None returns the stored values (counts).
    image : str
        Which per-stamp array is the input (``"images"``; ``"noiseless"`` for clean inputs).
    skip_bad : bool
        Scan the selected items at construction and drop those with NaN/inf pixels or non-finite
        targets (their file indices are in :attr:`skipped`, and a warning says how many); otherwise such an item raises
        :class:`DeepmorphValueError` when read, and a non-finite target raises here.
    in_memory : bool
        Read the selected images and masks into memory at construction (``4 * C * H * W`` bytes
        per item and array): random access without HDF5 chunk reads, and a fast :meth:`batch`.

    Attributes
    ----------
    indices : numpy.ndarray
        File indices of the items.
    label_names : list of str
        Class names, in label order.
    n_classes : int
        ``len(label_names)``.
    catalog : astropy.table.Table
        Catalogue rows of the items, in item order.
    skipped : numpy.ndarray
        File indices dropped by ``skip_bad``.

    Raises
    ------
    DeepmorphIOError
        The file is missing or not a complete deepmorph dataset.
    DeepmorphValueError
        A target column or mask is not in the file, an index is out of range, labels are missing
        (negative) for a ``label`` target.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        indices=None,
        target: str | Sequence[str] | None = "label",
        masks: Sequence[str] = (),
        normalization: Normalization | None = None,
        image: str = "images",
        skip_bad: bool = False,
        in_memory: bool = False,
    ):
        self.path = Path(path) if isinstance(path, (str, os.PathLike)) else tuple(Path(p) for p in path)
        self.target = target
        self.masks = tuple(masks)
        self.normalization = normalization
        self.image_array = image
        self._columns = _target_columns(target)
        with open_dataset(self.path) as ds:
            n = len(ds)
            arrays = ds.array_names
            for name in (image, *self.masks):
                if name not in arrays:
                    raise DeepmorphValueError(f"{self.path}: no array {name!r}; it holds {', '.join(arrays)}")
            catalog = ds.catalog
            self.label_names = [str(x) for x in ds.attrs.get("label_names", [])]
            self.image_shape = tuple(ds.array(image).shape[1:])
        if indices is None:
            idx = np.arange(n, dtype=np.int64)
        else:
            idx = np.asarray(indices)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise DeepmorphValueError(f"{self.path}: indices must be a 1-D array of integers")
            idx = idx.astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DeepmorphValueError(
                    f"{self.path}: indices must lie in [0, {n - 1}], got {idx.min()} .. {idx.max()}"
                )
        missing = [c for c in (self._columns or ()) if c not in catalog.colnames]
        if missing:
            raise DeepmorphValueError(
                f"{self.path}: target column(s) {', '.join(missing)} not in the catalogue; it has "
                f"{', '.join(catalog.colnames)}"
            )
        self._catalog_all = catalog
        self._targets = None
        if self._columns is not None:
            rows = {c: np.asarray(catalog[c])[idx] for c in self._columns}
            self._targets = _target_tensor(target, rows, self._columns)
        self.skipped = np.zeros(0, dtype=np.int64)
        bad = self._bad_targets(idx)
        if skip_bad:
            bad |= self._bad_pixels(idx)
            if bad.any():
                self.skipped = idx[bad]
                warnings.warn(
                    f"{self.path}: skipped {int(bad.sum())} of {len(idx)} items with NaN/inf pixels or targets",
                    stacklevel=2,
                )
                idx = idx[~bad]
                if self._targets is not None:
                    self._targets = self._targets[torch.from_numpy(~bad)]
        elif bad.any():
            first = idx[bad][:5].tolist()
            raise DeepmorphValueError(
                f"{self.path}: {int(bad.sum())} item(s) have a non-finite or missing target "
                f"({', '.join(self._columns)}), e.g. items {first}; pass skip_bad=True to drop them"
            )
        self.indices = idx
        self._ds = None
        self._pid = None
        self._memory = None
        if in_memory:
            self._load_memory()

    def _bad_targets(self, idx: np.ndarray) -> np.ndarray:
        if self._targets is None:
            return np.zeros(len(idx), dtype=bool)
        t = self._targets.numpy()
        if _is_label(self.target):
            return t < 0
        return ~np.isfinite(t).all(axis=-1)

    def _bad_pixels(self, idx: np.ndarray) -> np.ndarray:
        """True for items with a NaN or inf pixel (reads the file block by block, only where selected)."""
        bad_rows = []
        with open_dataset(self.path) as ds:
            for sel, data in _iter_rows(ds.array(self.image_array), np.unique(idx)):
                finite = np.isfinite(data.reshape(len(data), -1)).all(axis=1)
                bad_rows.append(sel[~finite])
        return np.isin(idx, np.concatenate(bad_rows)) if bad_rows else np.zeros(len(idx), dtype=bool)

    def _load_memory(self) -> None:
        """Read the selected images and masks into memory once (``in_memory=True``)."""
        with open_dataset(self.path) as ds:
            self._memory = {name: _read_rows(ds.array(name), self.indices) for name in (self.image_array, *self.masks)}

    # -- lazy file handle --------------------------------------------------------------------
    def _file(self):
        if self._ds is None or self._pid != os.getpid():  # a forked worker opens its own handle
            self._ds = open_dataset(self.path)
            self._pid = os.getpid()
        return self._ds

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ds"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._ds is not None and self._pid == os.getpid():
            self._ds.close()
        self._ds = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- items -------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)

    @property
    def targets(self) -> torch.Tensor | None:
        """The items' targets, in item order (``(N,)`` int64 labels or ``(N, K)`` float32), or None."""
        return self._targets

    @property
    def catalog(self) -> Table:
        """Catalogue rows of this dataset's items, in item order (astropy Table with units)."""
        return self._catalog_all[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _rows(self, name: str, items: np.ndarray) -> np.ndarray:
        """Array ``name`` of dataset items ``items`` (from memory, or read from the file)."""
        if self._memory is not None:
            return self._memory[name][items]
        arr = self._file().array(name)
        if len(items) == 1:
            return arr[int(self.indices[items[0]])][None]
        return _read_rows(arr, self.indices[items])

    def _check_finite(self, images: np.ndarray, items: np.ndarray) -> None:
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            k = int(np.flatnonzero(~finite)[0])
            n_bad = int((~np.isfinite(images[k])).sum())
            raise DeepmorphValueError(
                f"{self.path}: item {int(self.indices[items[k]])} has {n_bad} NaN/inf pixel(s) in "
                f"{self.image_array!r}; pass skip_bad=True to drop such items"
            )

    def __getitem__(self, i: int) -> dict:
        """Item ``i`` (not the file index: that is ``item["index"]``)."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index a StampDataset with an int, not {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for a dataset of {n}")
        i = int(i) % n
        items = np.array([i])
        img = self._rows(self.image_array, items)
        self._check_finite(img, items)
        image = torch.from_numpy(np.ascontiguousarray(img[0], dtype=np.float32))
        if self.normalization is not None:
            image = self.normalization(image)
        item = {"image": image}
        if self._targets is not None:
            item["target"] = self._targets[i]
        item["index"] = int(self.indices[i])
        for name in self.masks:
            item[name] = torch.from_numpy(np.ascontiguousarray(self._rows(name, items)[0], dtype=np.float32))
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Items ``indices`` in one sorted read (the DataLoader's batched fetch)."""
        return _unbatch(self.batch(indices))

    def batch(self, indices, device: str | torch.device | None = None) -> dict:
        """Items ``indices`` read at once (one sorted read, or from memory) as a collated batch.

        Parameters
        ----------
        indices : array of int
            Dataset items (``0 .. len-1``, not file indices).
        device : str or torch.device, optional
            Where the tensors go (default CPU); normalisation runs there.

        Returns
        -------
        dict
            ``image`` ``(B, C, H, W)`` float32, ``target``, ``index`` ``(B,)`` int64 file indices,
            masks ``(B, 1, H, W)`` float32: what a DataLoader over this dataset collates.
        """
        items = np.asarray(indices, dtype=np.int64).reshape(-1)
        if items.size and (items.min() < -len(self) or items.max() >= len(self)):
            raise IndexError(f"items must lie in [0, {len(self) - 1}]")
        items = items % max(len(self), 1)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        img = self._rows(self.image_array, items)
        self._check_finite(img, items)
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(dev)
        if self.normalization is not None:
            image = self.normalization(image)
        batch = {"image": image}
        if self._targets is not None:
            batch["target"] = self._targets[torch.from_numpy(items)].to(dev)
        batch["index"] = torch.from_numpy(self.indices[items]).to(dev)
        for name in self.masks:
            batch[name] = torch.from_numpy(np.ascontiguousarray(self._rows(name, items), dtype=np.float32)).to(dev)
        return batch

    def __repr__(self) -> str:
        return f"StampDataset({str(self.path)!r}, n={len(self)}, target={self.target!r}, masks={list(self.masks)})"


# -- datasets simulated on the fly ---------------------------------------------------------------
class SimulatedDataset(torch.utils.data.Dataset):
    """Galaxies simulated on the fly: fresh ones every epoch, reproducible from ``(seed, epoch, i)``.

    Item ``i`` of epoch ``e`` is the simulator's item ``offset + e * length + i`` with ``seed``, so
    no galaxy is seen twice across epochs and a run is reproducible whatever the batch size,
    device or number of workers. Keep ``offset`` ranges of training and validation data apart
    (e.g. a different ``seed`` for validation).

    Parameters
    ----------
    simulator : deepmorph.simulate.Simulator
        What to simulate (its device is where :meth:`batch` simulates).
    length : int
        Items per epoch, > 0.
    seed : int
        Simulation seed, >= 0.
    target, masks, normalization, image
        As for :class:`StampDataset`; masks are ``"clump_mask"`` / ``"neighbor_mask"`` (the
        simulator must make them).
    offset : int
        Simulator index of item 0 of epoch 0, >= 0.
    epoch : int
        Current epoch (see :meth:`set_epoch`).

    Notes
    -----
    With DataLoader workers, :meth:`set_epoch` must be called before the loader is iterated and
    without ``persistent_workers`` (workers are forked with the dataset's current epoch). For GPU
    training, :meth:`batch` simulates a whole batch on the simulator's device in one call and
    avoids workers altogether. In data-parallel training (DDP) this is a map-style dataset like
    any other: Lightning's ``DistributedSampler`` gives each process its own items, so the
    processes simulate different galaxies, and together those of the single-process run.
    """

    def __init__(
        self,
        simulator,
        length: int,
        seed: int,
        target: str | Sequence[str] | None = "label",
        masks: Sequence[str] = (),
        normalization: Normalization | None = None,
        image: str = "images",
        offset: int = 0,
        epoch: int = 0,
    ):
        from deepmorph.simulate import CATALOG_UNITS, LABEL_NAMES

        for name, v, lo in (("length", length, 1), ("seed", seed, 0), ("offset", offset, 0), ("epoch", epoch, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise DeepmorphValueError(f"simulated dataset: {name} must be an integer >= {lo}, got {v!r}")
        self.simulator = simulator
        self.length = int(length)
        self.seed = int(seed)
        self.offset = int(offset)
        self.epoch = int(epoch)
        self.target = target
        self.masks = tuple(masks)
        self.normalization = normalization
        self.image_array = image
        self._columns = _target_columns(target)
        missing = [c for c in (self._columns or ()) if c not in CATALOG_UNITS]
        if missing:
            raise DeepmorphValueError(
                f"simulated dataset: target column(s) {', '.join(missing)} not in the simulator's catalogue; "
                f"it has {', '.join(CATALOG_UNITS)}"
            )
        available = {"images", "noiseless"}
        available |= {"bulge", "disk"} if simulator.components else set()
        available |= {"clump_mask"} if simulator.clumps else set()
        available |= {"neighbor_mask"} if simulator.neighbors else set()
        for name in (image, *self.masks):
            if name not in available:
                raise DeepmorphValueError(
                    f"simulated dataset: the simulator makes no {name!r} (it makes {', '.join(sorted(available))})"
                )
        self.label_names = list(LABEL_NAMES)
        s = simulator.stamp_size
        self.image_shape = (1, s, s)

    @property
    def n_classes(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)

    def set_epoch(self, epoch: int) -> None:
        """Select the galaxies of ``epoch`` (>= 0)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise DeepmorphValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def simulator_indices(self, indices, epoch: int | None = None) -> np.ndarray:
        """Simulator item numbers of dataset items ``indices`` in ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"items must lie in [0, {self.length - 1}], got {idx.min()} .. {idx.max()}")
        return self.offset + e * self.length + idx

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        """Item ``i`` of the current epoch (simulated on the simulator's device, returned on the CPU)."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index a SimulatedDataset with an int, not {type(i).__name__}")
        if not -self.length <= i < self.length:
            raise IndexError(f"item {i} out of range for a dataset of {self.length}")
        b = self._simulate([int(i) % self.length], as_numpy=True, device=None)
        item = {k: v[0] for k, v in b.items()}
        item["index"] = int(item["index"])
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Items ``indices`` simulated in one call (the DataLoader's batched fetch; CPU simulators)."""
        return _unbatch(self._simulate(indices, as_numpy=True, device=None))

    def batch(self, indices, device: str | torch.device | None = None) -> dict:
        """Items ``indices`` of the current epoch simulated at once on the simulator's device.

        Parameters
        ----------
        indices : array of int
            Dataset items (``0 .. length-1``).
        device : str or torch.device, optional
            Where the returned tensors live (default: the simulator's device).

        Returns
        -------
        dict
            As a collated DataLoader batch: ``image`` ``(B, C, H, W)`` float32, ``target``,
            ``index`` (``(B,)`` int64 simulator item numbers, see :meth:`simulator_indices`),
            masks ``(B, 1, H, W)`` float32.
        """
        return self._simulate(indices, as_numpy=False, device=device)

    def _simulate(self, indices, as_numpy: bool, device) -> dict:
        sim_idx = self.simulator_indices(indices)
        out = self.simulator.simulate(sim_idx, self.seed, as_numpy=as_numpy)
        dev = torch.device(device) if device is not None else None

        def tensor(a, dtype):
            t = torch.as_tensor(a)
            return t.to(device=dev if dev is not None else t.device, dtype=dtype)

        image = tensor(out[self.image_array], torch.float32)
        if self.normalization is not None:
            image = self.normalization(image)
        batch = {"image": image}
        target = _target_tensor(self.target, out["catalog"], self._columns)
        if target is not None:
            batch["target"] = target.to(image.device)
        batch["index"] = torch.as_tensor(sim_idx, device=image.device)
        for name in self.masks:
            batch[name] = tensor(out[name], torch.float32)
        return batch

    def __repr__(self) -> str:
        return (f"SimulatedDataset(length={self.length}, seed={self.seed}, epoch={self.epoch}, "
                f"offset={self.offset}, target={self.target!r})")


# -- loaders -------------------------------------------------------------------------------------
def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    The torch seed of each worker is ``base_seed + worker_id``, and the base seed is drawn from
    the loader's seeded generator, so every worker's randomness is reproducible.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)  # noqa: NPY002 - libraries that draw from numpy's global state
    random.seed(s)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    **kwargs,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and worker randomness are fixed by ``seed``.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        E.g. a :class:`StampDataset` or :class:`SimulatedDataset`.
    batch_size : int
        Items per batch, > 0.
    shuffle : bool
        Reshuffle every epoch (the sequence of permutations follows from ``seed``).
    num_workers : int
        Worker processes (0: read in the main process).
    seed : int
        Seed of the loader's generator.
    drop_last : bool
        Drop an incomplete last batch.
    pin_memory : bool
        Page-locked host memory (faster copies to a GPU).
    **kwargs
        Passed to :class:`torch.utils.data.DataLoader` (e.g. ``persistent_workers``, ``prefetch_factor``).

    Returns
    -------
    torch.utils.data.DataLoader
        Two loaders made with the same arguments give the same batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise DeepmorphValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise DeepmorphValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), shuffle=shuffle, num_workers=int(num_workers),
        generator=generator, worker_init_fn=seed_worker, drop_last=drop_last, pin_memory=pin_memory, **kwargs,
    )


__all__ = [
    "NORMALIZATIONS", "Normalization", "SimulatedDataset", "StampDataset", "make_loader", "robust_sigma",
    "seed_worker", "sky_sigma", "split_indices",
]
