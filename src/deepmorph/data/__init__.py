"""Datasets on disk: one HDF5 file per simulated dataset, read lazily (see :mod:`deepmorph.data.store`)."""

from deepmorph.data.store import (
    SimDataset,
    check_output,
    export_catalog,
    open_dataset,
    partial_path,
    summarize,
    write_dataset,
)

__all__ = [
    "SimDataset", "check_output", "export_catalog", "open_dataset", "partial_path", "summarize", "write_dataset",
]
