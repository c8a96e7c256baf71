"""What every workflow's run directory shares: ``run.json``, the trained network, the data's PSF.

A run directory holds ``run.json`` (the task, the method, the data file, the split, what
prediction needs) next to :func:`deepmorph.training.fit`'s files (``config.yaml``, ``model.pt``,
checkpoints, history). Files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


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


def read_run(run: str | Path, task: str, methods: tuple[str, ...] | None = None) -> dict:
    """The ``run.json`` of a ``task`` run (clear errors when the directory is not one)."""
    run = Path(run)
    info = run / "run.json"
    if not info.is_file():
        raise DeepmorphIOError(f"{run}: not a {task} run (no run.json)")
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError) as exc:
        raise DeepmorphIOError(f"{info}: unreadable run description ({exc})") from None
    if meta.get("task") != task or (methods is not None and meta.get("method") not in methods):
        found = meta.get("task", "unknown")
        raise DeepmorphIOError(f"{run}: run.json describes a {found} run, not a {task} run")
    return meta


def load_network(run: str | Path, in_channels: int, num_outputs: int) -> torch.nn.Module:
    """The trained network of a run (its best weights, ``model.pt``), in eval mode on the CPU."""
    from deepmorph.training import RunConfig, build_model

    run = Path(run)
    config = RunConfig.from_yaml(run / "config.yaml").with_overrides({"finetune": {"weights": None}})
    model = build_model(config, in_channels=in_channels, num_outputs=num_outputs)
    weights = run / "model.pt"
    if not weights.is_file():
        raise DeepmorphIOError(f"{run}: no model.pt (did training finish?)")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


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
