"""Datasets: HDF5 files (simulated or imported real cutouts), PyTorch datasets and loaders, augmentation.

- :mod:`deepmorph.data.store`: one chunked HDF5 file per simulated dataset, read lazily;
- :mod:`deepmorph.data.normalization`: image normalisation recorded with the run;
- :mod:`deepmorph.data.datasets`: splits, :class:`StampDataset` (a file),
  :class:`SimulatedDataset` (fresh galaxies every epoch), :func:`make_loader`;
- :mod:`deepmorph.data.augment`: batched on-the-fly augmentation on the CPU or a GPU;
- :mod:`deepmorph.data.importer`: real FITS/PNG/JPEG cutouts + a label catalogue -> a dataset file.

The torch-based names are imported on first use, so that ``deepmorph info`` and other file-only
commands start without importing torch.
"""

from importlib import import_module

from deepmorph.data.importer import ImportReport, import_images, read_catalog, read_image
from deepmorph.data.store import (
    SimDataset,
    check_output,
    dataset_exists,
    export_catalog,
    open_dataset,
    partial_path,
    summarize,
    write_dataset,
)

_LAZY = {
    "Augmentation": "augment", "KERAS_PRESET": "augment", "PRESETS": "augment", "get_augmentation": "augment",
    "transform_pa": "augment",
    "NORMALIZATIONS": "normalization", "Normalization": "normalization", "robust_sigma": "normalization",
    "sky_sigma": "normalization", "SimulatedDataset": "datasets", "StampDataset": "datasets",
    "make_loader": "datasets", "seed_worker": "datasets", "split_indices": "datasets",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"deepmorph.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepmorph.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Augmentation", "ImportReport", "KERAS_PRESET", "NORMALIZATIONS", "Normalization", "PRESETS", "SimDataset",
    "SimulatedDataset", "StampDataset", "check_output", "dataset_exists", "export_catalog", "get_augmentation",
    "import_images", "make_loader", "open_dataset", "partial_path", "read_catalog", "read_image", "robust_sigma",
    "seed_worker", "sky_sigma", "split_indices", "summarize", "transform_pa", "write_dataset",
]
