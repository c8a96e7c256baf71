"""What every workflow's run directory shares: ``run.json``, the trained network, the data's PSF.

A run directory holds ``run.json`` (the task, the method, the data file, the split, what
prediction needs) next to :func:`deepmorph.training.fit`'s files (``config.yaml``, ``model.pt``,
checkpoints, history). Files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (temporary name, then rename)."""
    from deepmorph.training._io import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def save_table(table, path: str | Path) -> None:
    """Write an astropy table (ECSV or FITS, by suffix) atomically."""
    from deepmorph.training._io import write_atomic

    path = Path(path)
    fmt = "fits" if path.suffix.lower() in (".fits", ".fit") else "ascii.ecsv"
    write_atomic(path, lambda tmp: table.write(tmp, format=fmt, overwrite=True))


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically."""
    from deepmorph.training._io import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def read_run(run: str | Path, task: str, methods: tuple[str, ...] | None = None, what: str | None = None) -> dict:
    """The ``run.json`` of a ``task`` run (clear errors, calling it a ``what`` run, when the
    directory is not one)."""
    run = Path(run)
    info = run / "run.json"
    what = what or task
    if not info.is_file():
        raise DeepmorphIOError(f"{run}: not a {what} run (no run.json)")
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError) as exc:
        raise DeepmorphIOError(f"{info}: unreadable run description ({exc})") from None
    if meta.get("task") != task or (methods is not None and meta.get("method") not in methods):
        found = f"{meta.get('task', 'unknown')} ({meta.get('method', 'unknown')})"
        raise DeepmorphIOError(f"{run}: run.json describes a {found} run, not a {what} run")
    return meta


def load_network(run: str | Path, in_channels: int, num_outputs: int) -> torch.nn.Module:
    """The trained network of a run (its best weights, ``model.pt``), in eval mode on the CPU."""
    from deepmorph.training import RunConfig, build_model

    run = Path(run)
    config = RunConfig.from_yaml(run / "config.yaml").with_overrides({"finetune": {"weights": None}})
    model = build_model(config, in_channels=in_channels, num_outputs=num_outputs)
    return load_run_weights(model, run).eval()


def load_run_weights(model: torch.nn.Module, run: str | Path) -> torch.nn.Module:
    """``model`` with a run's trained weights (its ``model.pt``), with one-line errors when the
    file is missing, unreadable or made for another network."""
    weights = Path(run) / "model.pt"
    if not weights.is_file():
        raise DeepmorphIOError(f"{run}: no model.pt (did training finish?)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or not a torch file (pickle, zip or EOF errors)
        raise DeepmorphIOError(f"{weights}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DeepmorphIOError(f"{weights}: the weights do not fit the run's network ({exc})") from None
    return model


def fitted_normalization(config, data: str | Path, train_items):
    """The run's normalisation, fitted on the training images where it needs fitting (default
    ``asinh``), and the config recording it (so prediction applies the same one)."""
    from deepmorph.data import Normalization, StampDataset

    norm = Normalization.from_dict(config.normalization) if config.normalization else Normalization("asinh")
    if not norm.fitted:
        norm = norm.fit(StampDataset(data, train_items, target=None), max_images=1024)
    return norm, config.with_overrides({"normalization": norm.to_dict()})


def training_augmentation(config):
    """The config's augmentation for a task, or None when it does nothing."""
    from deepmorph.data import get_augmentation

    augmentation = get_augmentation(config.augmentation)
    return None if augmentation.is_identity else augmentation


def train_task(task, sets: dict, config, out: str | Path, resume: bool = True, val_batch_size: int = 256):
    """Train ``task`` on ``sets["train"]``, validating on ``sets["val"]``, into the run ``out``.

    Returns
    -------
    history, seconds
        :func:`deepmorph.training.fit`'s history and the wall time of the training.
    """
    import time

    from deepmorph.data import make_loader
    from deepmorph.training import fit

    train = make_loader(sets["train"], config.batch_size, shuffle=True, num_workers=config.num_workers,
                        seed=config.seed, drop_last=len(sets["train"]) > config.batch_size)
    val = make_loader(sets["val"], val_batch_size, num_workers=config.num_workers, seed=config.seed)
    start = time.perf_counter()
    history = fit(task, train, val, config, out, resume=resume)
    return history, time.perf_counter() - start


def read_image_file(path: str | Path) -> np.ndarray:
    """A FITS (or PNG/JPEG) image as ``(C, H, W)``, with a one-line error naming the file."""
    from deepmorph.data.importer import read_image

    try:
        return read_image(path)
    except (ValueError, OSError) as exc:  # astropy raises OSError on a corrupt FITS file
        raise DeepmorphIOError(f"{path}: cannot read the image ({exc})") from None



def read_stamps(images) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Stamps ``(N, C, H, W)`` float32 from one dataset file (``.h5``) or FITS/PNG cutouts of one size.

    Returns
    -------
    stamps, ids, paths
        The stamps; the dataset's ``id`` column (else the item numbers) or the cutouts' file stems;
        the input paths (for error messages).

    Raises
    ------
    DeepmorphValueError
        No images, or cutouts of different sizes.
    """
    from deepmorph.data import open_dataset

    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    if not paths:
        raise DeepmorphValueError("no images given")
    if len(paths) == 1 and paths[0].suffix.lower() in (".h5", ".hdf5"):
        with open_dataset(paths[0]) as ds:
            stamps = np.asarray(ds.images[...], dtype=np.float32)
            ids = np.asarray(ds.catalog["id"]) if "id" in ds.catalog.colnames else np.arange(len(ds))
        return stamps, ids, paths
    arrays = [read_image_file(p) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DeepmorphValueError(f"cutouts of different sizes ({sorted(shapes)}); give stamps of one size")
    return np.stack(arrays).astype(np.float32), np.array([p.stem for p in paths]), paths

def require_arrays(path: str | Path, names: tuple[str, ...], why: str) -> None:
    """Raise a one-line error unless the dataset file holds every per-stamp array in ``names``."""
    from deepmorph.data import open_dataset

    with open_dataset(path) as ds:
        missing = [n for n in names if n not in ds.array_names]
    if missing:
        raise DeepmorphValueError(f"{path}: no {', '.join(missing)} array(s), needed {why}")


def dataset_psf(path: str | Path, size: int = 25) -> np.ndarray:
    """The pixel-convolved PSF of a simulated dataset, drawn centred on a ``size`` x ``size`` stamp.

    Rebuilt from the file's attributes (the PSF description, and the stored image of an image PSF),
    so it is the PSF the simulator convolved the stamps with. Sums to ~1.
    """
    from deepmorph.data import open_dataset
    from deepmorph.simulate.psf import ImagePSF, parse_psf
    from deepmorph.simulate.render import Renderer

    with open_dataset(path) as ds:
        attrs = ds.attrs
        stored = ds.psf_image
    spec = attrs.get("psf") or {}
    if spec.get("type") in (None, "none"):
        raise DeepmorphValueError(f"{path}: the dataset records no PSF")
    if stored is not None:
        psf = ImagePSF(stored, float(spec["pixel_scale_arcsec"]), str(spec.get("source", "")))
    else:
        psf = parse_psf(spec)
    renderer = Renderer(size, float(attrs["pixel_scale_arcsec"]), psf, "cpu")
    return renderer.psf_image(size).numpy()


def shared_data_file(relative: str) -> Path | None:
    """A file of the project's real data (``$DEEPMORPH_SHARED_DATA``, else ``../shared/data``), or None."""
    roots = [Path(os.environ["DEEPMORPH_SHARED_DATA"])] if os.environ.get("DEEPMORPH_SHARED_DATA") else []
    roots += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3].parent / "shared" / "data"]
    return next((root / relative for root in roots if (root / relative).is_file()), None)
