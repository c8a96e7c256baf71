"""Import real cutouts (FITS, PNG, JPEG) and a label catalogue into a deepmorph HDF5 dataset.

The output has the layout :mod:`deepmorph.data.store` writes (``images`` ``(N, C, S, S)``
float32, one ``catalog/<column>`` dataset per column with a ``unit`` attribute, the root
attributes :func:`deepmorph.data.open_dataset` needs), so a real sample is read, split, trained
on and predicted exactly like a simulated one.

Matching: each catalogue row names its image in ``name_column``, as the file name
(``ngc1300.fits``), a path relative to the image folder, or the name without its extension
(``ngc1300``). Images without a row, rows without an image, unreadable images, images with no
finite pixel and images of the wrong number of channels are skipped and listed, with the
reason, in :attr:`ImportReport.skipped`.

Pixels: FITS data (BSCALE/BZERO applied by astropy, big-endian on disk) become native float32
in their own units; PNG/JPEG values stay in their own units (0-255 for 8-bit). Each image is cut
to its central square and, if that square is not ``size`` pixels, resized with
:func:`skimage.transform.resize` (linear interpolation, anti-aliased, values preserved, i.e.
surface brightness kept: the column ``resample`` = input pixels per output pixel tells by how
much the pixel scale changed). Non-finite pixels of partly bad images are replaced by
``fill_value`` and counted in the column ``n_filled``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
from astropy.table import Table

from deepmorph import __version__
from deepmorph.data.store import FORMAT, check_output, partial_path
from deepmorph.errors import DeepmorphIOError, DeepmorphValueError

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CHANNELS = ("gray", "rgb", "fits-ext")
_CATALOG_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fts": "fits"}
#: Luminance weights of RGB -> gray (ITU-R BT.709, as skimage.color.rgb2gray).
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])


@dataclasses.dataclass
class ImportReport:
    """What :func:`import_images` wrote and what it skipped.

    Attributes
    ----------
    out : Path
        The dataset file.
    n_written : int
        Images written.
    skipped : list of (str, str)
        ``(name, reason)`` of every image or catalogue row left out.
    label_names : list of str
        Class names in label order (empty without a label column).
    channels : int
        Channels per image.
    size : int
        Stamp side, pixels.
    n_filled : int
        Images in which some non-finite pixels were replaced by the fill value.
    """

    out: Path
    n_written: int
    skipped: list[tuple[str, str]]
    label_names: list[str]
    channels: int
    size: int
    n_filled: int = 0

    def __str__(self) -> str:
        lines = [f"wrote {self.n_written} images ({self.channels} x {self.size} x {self.size}) to {self.out}"]
        if self.label_names:
            lines.append(f"labels: {', '.join(self.label_names)}")
        if self.n_filled:
            lines.append(f"{self.n_filled} images had non-finite pixels replaced")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# -- finding and reading images ------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in FITS_SUFFIXES + RASTER_SUFFIXES:
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _stem(path: Path) -> str:
    suf = _suffix(path)
    return path.name[: -len(suf)] if suf and path.name.lower().endswith(suf) else path.stem


def find_images(images: str | Path) -> tuple[list[Path], Path]:
    """Image files of a folder (FITS, PNG, JPEG, TIFF, recursively) or a glob pattern, sorted.

    Returns
    -------
    files : list of Path
        The files.
    root : Path
        The folder names are taken relative to (the folder itself, or the pattern's fixed part).

    Raises
    ------
    DeepmorphIOError
        Nothing matches.
    """
    path = Path(images)
    if path.is_dir():
        root = path
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and _suffix(p) in FITS_SUFFIXES + RASTER_SUFFIXES]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(images), recursive=True)) if Path(p).is_file()]
        fixed = [part for part in path.parts if not glob.has_magic(part)]
        root = Path(*path.parts[: len(fixed)]) if fixed and len(fixed) < len(path.parts) else path.parent
    if not files:
        raise DeepmorphIOError(f"{images}: no image files found (FITS, PNG, JPEG or TIFF)")
    return files, root


def _read_fits(path: Path, channels: str) -> np.ndarray:
    """``(C, H, W)`` float64 from a FITS file; ValueError with a reason when unusable."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    with warnings.catch_warnings():  # non-standard header cards of old instruments are common and harmless
        warnings.simplefilter("ignore", AstropyWarning)
        with fits.open(path, memmap=False) as hdul:
            planes = [np.squeeze(np.asarray(h.data)) for h in hdul if h.is_image and h.data is not None]
    planes = [p for p in planes if p.ndim in (2, 3) and p.size]
    if not planes:
        raise ValueError("no image data in any HDU")
    if channels == "gray":
        first = planes[0]
        if first.ndim == 3:
            raise ValueError(f"first image HDU is a cube of {first.shape[0]} planes; use channels='fits-ext' or 'rgb'")
        return first[None].astype(np.float64)
    if channels == "rgb":
        cube = planes[0] if planes[0].ndim == 3 else None
        if cube is None:
            if len(planes) < 3 or any(p.ndim != 2 or p.shape != planes[0].shape for p in planes[:3]):
                raise ValueError("rgb needs a 3-plane cube or three image HDUs of one shape")
            cube = np.stack(planes[:3])
        if cube.shape[0] != 3:
            raise ValueError(f"rgb needs 3 planes, the cube has {cube.shape[0]}")
        return cube.astype(np.float64)
    # fits-ext: one channel per image HDU (or the planes of a cube)
    if planes[0].ndim == 3:
        return planes[0].astype(np.float64)
    shape = planes[0].shape
    if any(p.ndim != 2 or p.shape != shape for p in planes):
        raise ValueError(f"image HDUs differ in shape ({', '.join(str(p.shape) for p in planes)})")
    return np.stack(planes).astype(np.float64)


def _read_raster(path: Path, channels: str) -> np.ndarray:
    """``(C, H, W)`` float64 from PNG/JPEG/TIFF (values as stored); ValueError when unusable."""
    from skimage import io

    a = np.asarray(io.imread(str(path)))
    if a.ndim == 3 and a.shape[-1] in (2, 4):  # drop alpha
        a = a[..., :-1]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    a = a.astype(np.float64)
    if a.ndim == 2:
        if channels == "rgb":
            raise ValueError("grayscale image, but channels='rgb'")
        return a[None]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"unsupported image shape {a.shape}")
    if channels == "gray":
        return (a @ _GRAY_WEIGHTS)[None]
    return np.moveaxis(a, -1, 0)


def read_image(path: str | Path, channels: str = "gray") -> np.ndarray:
    """Read one cutout as a native-endian ``(C, H, W)`` float64 array.

    Parameters
    ----------
    path : str or Path
        FITS (any HDU with image data), PNG, JPEG or TIFF file.
    channels : {"gray", "rgb", "fits-ext"}
        ``gray``: one channel (the first image HDU of a FITS file; the luminance of a colour
        raster); ``rgb``: three channels (a colour raster, a 3-plane FITS cube, or three FITS
        image HDUs); ``fits-ext``: one channel per FITS image HDU (or the planes of a cube).

    Raises
    ------
    ValueError
        The file cannot be read or does not fit ``channels`` (the message is the reason).
    """
    path = Path(path)
    if channels not in CHANNELS:
        raise DeepmorphValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
    if _suffix(path) in FITS_SUFFIXES:
        return _read_fits(path, channels)
    if channels == "fits-ext":
        raise ValueError("not a FITS file, but channels='fits-ext'")
    return _read_raster(path, channels)


def to_stamp(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Central square of a ``(C, H, W)`` image, resized to ``size`` x ``size`` float32.

    Returns
    -------
    stamp : numpy.ndarray
        ``(C, size, size)`` float32.
    resample : float
        Input pixels per output pixel (1 when no resize was needed).
    """
    from skimage.transform import resize

    _, h, w = image.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = image[:, y0:y0 + side, x0:x0 + side]
    if side == size:
        return square.astype(np.float32), 1.0
    out = np.stack([
        resize(plane, (size, size), order=1, mode="reflect", anti_aliasing=side > size, preserve_range=True)
        for plane in square
    ])
    return out.astype(np.float32), side / size


# -- the catalogue -------------------------------------------------------------------------------
def read_catalog(path: str | Path) -> Table:
    """A label catalogue (CSV, ECSV or FITS, by extension) as an astropy Table.

    Raises
    ------
    DeepmorphIOError
        Missing or unreadable file, or an unknown extension.
    """
    path = Path(path)
    if not path.is_file():
        raise DeepmorphIOError(f"{path}: no such catalogue file")
    fmt = _CATALOG_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DeepmorphIOError(f"{path}: catalogue must be .csv, .ecsv or .fits")
    try:
        return Table.read(path, format=fmt)
    except Exception as exc:  # noqa: BLE001 - astropy raises many kinds
        raise DeepmorphIOError(f"{path}: cannot read the catalogue ({type(exc).__name__}: {exc})") from None


def _column_array(col) -> tuple[np.ndarray, str]:
    """A catalogue column as an HDF5-friendly array (masked -> NaN / ""), and its unit."""
    unit = str(col.unit) if getattr(col, "unit", None) is not None else ""
    data = col
    mask = np.asarray(getattr(col, "mask", np.zeros(len(col), dtype=bool)))
    values = np.asarray(data)
    if values.dtype.kind in "US":
        mask = np.broadcast_to(mask, values.shape)
        encoded = [b"" if m else str(v).encode() for v, m in zip(values.astype(str), mask, strict=True)]
        width = max([1, *(len(e) for e in encoded)])
        return np.array(encoded, dtype=f"S{width}"), unit
    if values.dtype.kind == "b":
        return values.astype(bool), unit
    if values.dtype.kind in "iu" and not mask.any():
        return values.astype(np.int64), unit
    if values.dtype.kind in "iuf":
        v = values.astype(np.float64)
        v[np.broadcast_to(mask, v.shape)] = np.nan
        return v, unit
    raise ValueError(f"unsupported column type {values.dtype}")


def _labels(values: np.ndarray, label_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names from a label column (strings or integers)."""
    if values.dtype.kind == "S":
        names = [v.decode() for v in values]
        classes = list(label_names) if label_names is not None else sorted({n for n in names if n})
        lookup = {n: i for i, n in enumerate(classes)}
        unknown = sorted({n for n in names if n and n not in lookup})
        if unknown:
            raise DeepmorphValueError(f"label(s) {', '.join(unknown)} not among label_names {classes}")
        return np.array([lookup.get(n, -1) for n in names], dtype=np.int64), classes
    if values.dtype.kind == "f":
        if np.any(np.isfinite(values) & (values != np.round(values))):
            raise DeepmorphValueError("label column holds non-integer numbers; use a string or integer column")
        values = np.where(np.isfinite(values), values, -1).astype(np.int64)
    values = values.astype(np.int64)
    n = int(values.max()) + 1 if values.size and values.max() >= 0 else 0
    classes = list(label_names) if label_names is not None else [str(i) for i in range(n)]
    if n > len(classes):
        raise DeepmorphValueError(f"labels go up to {n - 1} but only {len(classes)} label_names are given")
    return values, classes


# -- import --------------------------------------------------------------------------------------
def import_images(
    images: str | Path,
    catalog: str | Path,
    out: str | Path,
    size: int = 64,
    channels: str = "gray",
    name_column: str = "file",
    overwrite: bool = False,
    label_column: str = "label",
    require_labels: bool = False,
    label_names: list[str] | None = None,
    fill_value: float | None = 0.0,
    pixel_scale_arcsec: float | None = None,
    image_unit: str = "",
) -> ImportReport:
    """Import real cutouts and their label catalogue into one deepmorph HDF5 dataset.

    Parameters
    ----------
    images : str or Path
        A folder (searched recursively for FITS, PNG, JPEG, TIFF) or a glob pattern.
    catalog : str or Path
        CSV, ECSV or FITS table with one row per image: ``name_column`` plus a label column
        and/or parameter columns (all columns are kept, with their units).
    out : str or Path
        The dataset file to write (written as ``<out>.partial`` and renamed when complete).
    size : int
        Stamp side of the output, pixels (>= 8).
    channels : {"gray", "rgb", "fits-ext"}
        See :func:`read_image`. All images must end with the same number of channels.
    name_column : str
        Catalogue column with the image file names.
    overwrite : bool
        Replace an existing ``out``.
    label_column : str
        Column of class labels (strings, mapped to 0..K-1 in sorted order or the order of
        ``label_names``; or integers). Without it, ``label`` is -1 (unlabelled).
    require_labels : bool
        Refuse a catalogue without ``label_column`` instead of importing unlabelled images.
    label_names : list of str, optional
        Class names in label order (default: the sorted distinct strings, or "0".."K-1").
    fill_value : float or None
        Replaces non-finite pixels of images that have some finite ones (None: skip such images).
    pixel_scale_arcsec : float, optional
        Pixel scale of the stamps, arcsec/pixel, recorded in the attributes (NaN if unknown).
    image_unit : str
        Unit of the pixel values, recorded in the attributes (e.g. ``"count"``).

    Returns
    -------
    ImportReport
        What was written and what was skipped, and why.

    Raises
    ------
    DeepmorphIOError
        ``out`` exists (without ``overwrite``), no image file found, catalogue unreadable.
    DeepmorphValueError
        Bad ``size``/``channels``, ``name_column`` missing from the catalogue, labels not in
        ``label_names``, or no image could be imported at all (the reasons are in the message).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 4096:
        raise DeepmorphValueError(f"size must be an integer in [8, 4096] pixels, got {size!r}")
    if channels not in CHANNELS:
        raise DeepmorphValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
    out = check_output(out, overwrite)
    files, root = find_images(images)
    table = read_catalog(catalog)
    if name_column not in table.colnames:
        raise DeepmorphValueError(
            f"{catalog}: no column {name_column!r} with the image file names; it has {', '.join(table.colnames)}"
        )
    if require_labels and label_column not in table.colnames:
        raise DeepmorphValueError(
            f"{catalog}: no label column {label_column!r}; it has {', '.join(table.colnames)}"
        )

    # match catalogue rows and files
    by_key: dict[str, Path] = {}
    ambiguous: set[str] = set()
    for f in files:
        keys = {f.name, _stem(f)}
        try:
            rel = f.relative_to(root)
            keys |= {rel.as_posix(), (rel.parent / _stem(f)).as_posix()}
        except ValueError:
            pass
        for k in keys:
            if k in by_key and by_key[k] != f:
                ambiguous.add(k)
            by_key.setdefault(k, f)
    skipped: list[tuple[str, str]] = []
    used: dict[Path, int] = {}
    rows: list[int] = []
    names = [str(v).strip() for v in np.asarray(table[name_column]).astype(str)]
    masked = np.asarray(getattr(table[name_column], "mask", np.zeros(len(table), dtype=bool)))
    for r, name in enumerate(names):
        if np.broadcast_to(masked, (len(table),))[r] or not name:
            skipped.append((f"catalogue row {r}", f"empty {name_column}"))
            continue
        key = name.replace("\\", "/")
        f = by_key.get(key) or by_key.get(Path(key).name)
        if f is None:
            skipped.append((name, "no image file for this catalogue row"))
        elif key in ambiguous:
            skipped.append((name, "several image files match this name"))
        elif f in used:
            skipped.append((name, f"duplicate catalogue row (row {used[f]} names the same file)"))
        else:
            used[f] = r
            rows.append(r)
    for f in files:
        if f not in used:
            skipped.append((_display(f, root), "not in the catalogue"))

    # read the images of matched rows, in catalogue order
    row_of_file = {r: f for f, r in used.items()}
    stamps, kept, resample, filled, shapes = [], [], [], [], []
    n_channels = None
    for r in rows:
        f = row_of_file[r]
        shown = _display(f, root)
        try:
            img = read_image(f, channels)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a reported skip
            skipped.append((shown, f"unreadable: {exc}" if str(exc) else f"unreadable ({type(exc).__name__})"))
            continue
        finite = np.isfinite(img)
        if not finite.any():
            skipped.append((shown, "no finite pixels (all NaN/inf)"))
            continue
        n_bad = int((~finite).sum())
        if n_bad:
            if fill_value is None:
                skipped.append((shown, f"{n_bad} non-finite pixels"))
                continue
            img = np.where(finite, img, fill_value)
        if n_channels is None:
            n_channels = img.shape[0]
        elif img.shape[0] != n_channels:
            skipped.append((shown, f"{img.shape[0]} channels, the first image had {n_channels}"))
            continue
        if min(img.shape[1:]) < 2:
            skipped.append((shown, f"image too small ({img.shape[1]} x {img.shape[2]})"))
            continue
        stamp, factor = to_stamp(img, int(size))
        stamps.append(stamp)
        kept.append(r)
        resample.append(factor)
        filled.append(n_bad)
        shapes.append(img.shape[1:])
    if not stamps:
        other = [f"{n}: {why}" for n, why in skipped if why != "not in the catalogue"]
        n_unlisted = len(skipped) - len(other)
        reasons = "; ".join(other[:5] + ([f"{n_unlisted} image file(s) not in the catalogue"] if n_unlisted else []))
        raise DeepmorphValueError(f"no image imported from {images} with {catalog} ({reasons})")

    # the catalogue of the kept rows
    sub = table[kept]
    columns: dict[str, tuple[np.ndarray, str]] = {"id": (np.arange(len(kept), dtype=np.int64), "")}
    for name in sub.colnames:
        try:
            values, unit = _column_array(sub[name])
        except ValueError as exc:
            skipped.append((f"column {name}", str(exc)))
            continue
        if values.ndim != 1:
            skipped.append((f"column {name}", "multidimensional column"))
            continue
        key = {"id": "source_id", "label": "label_original"}.get(name, name) if name != label_column else name
        columns[key] = (values, unit)
    if label_column in columns:
        raw, _ = columns.pop(label_column)
        labels, classes = _labels(raw, label_names)
        if raw.dtype.kind == "S":
            columns["label_name"] = (raw, "")
    else:
        labels, classes = np.full(len(kept), -1, dtype=np.int64), list(label_names or [])
    columns["label"] = (labels, "")
    columns["resample"] = (np.asarray(resample, dtype=np.float64), "")
    columns["orig_height"] = (np.array([s[0] for s in shapes], dtype=np.int64), "pix")
    columns["orig_width"] = (np.array([s[1] for s in shapes], dtype=np.int64), "pix")
    columns["n_filled"] = (np.asarray(filled, dtype=np.int64), "")

    attrs = {
        "format": FORMAT,
        "origin": "import",
        "survey": "imported",
        "survey_preset": json.dumps({"name": "imported", "band": ""}),
        "pixel_scale_arcsec": float(pixel_scale_arcsec) if pixel_scale_arcsec is not None else float("nan"),
        "zeropoint_mag": float("nan"),
        "stamp_size": int(size),
        "channels": channels,
        "psf": json.dumps({"type": "unknown"}),
        "noise": json.dumps({"type": "unknown"}),
        "clumps": False,
        "neighbors": False,
        "components": False,
        "seed": -1,
        "label_names": json.dumps(classes),
        "image_unit": image_unit,
        "source_images": str(images),
        "source_catalog": str(catalog),
        "version": __version__,
        "n": len(stamps),
        "n_done": len(stamps),
    }
    _write(out, np.stack(stamps), columns, attrs)
    return ImportReport(out=out, n_written=len(stamps), skipped=skipped, label_names=classes,
                        channels=int(n_channels), size=int(size), n_filled=sum(1 for n in filled if n))


def _display(f: Path, root: Path) -> str:
    try:
        return f.relative_to(root).as_posix()
    except ValueError:
        return str(f)


def _write(out: Path, images: np.ndarray, columns: dict, attrs: dict) -> None:
    """The dataset file, written under ``<out>.partial`` and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    partial.unlink(missing_ok=True)
    try:
        with h5py.File(partial, "w") as f:
            f.attrs.update(attrs)
            n = len(images)
            rows = max(1, min(n, 64, (1 << 20) // (images[0].nbytes or 1)))
            ds = f.create_dataset("images", data=images, chunks=(rows, *images.shape[1:]))
            ds.attrs["unit"] = attrs["image_unit"]
            group = f.create_group("catalog", track_order=True)
            for name, (values, unit) in columns.items():
                group.create_dataset(name, data=values).attrs["unit"] = unit
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DeepmorphIOError(f"{out}: cannot write the dataset ({exc})") from None


__all__ = ["CHANNELS", "ImportReport", "find_images", "import_images", "read_catalog", "read_image", "to_stamp"]
