"""Morphology classification, with deep learning (a CNN) and without (statmorph + a random forest).

Both methods train on the same split of one dataset file (:func:`deepmorph.data.split_indices`)
and are scored on the same held-out test set, so their numbers compare directly. A run
directory holds everything prediction needs::

    RUN/run.json            method, data file, split, label names, normalisation
    RUN/config.yaml ...     (CNN) the training run: checkpoints, history, learning curves, model.pt
    RUN/forest.pkl          (forest) the trained random forest
    RUN/test_metrics.json   accuracy, per-class precision/recall, confusion matrix, calibration
    RUN/confusion.png       the confusion matrix
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.workflows.runs import (
    fitted_normalization,
    load_network,
    read_run,
    train_task,
    training_augmentation,
    write_json,
)

METHODS = ("cnn", "forest")


@dataclass(frozen=True)
class Split:
    """Which items of the dataset each stage uses (``train_size`` keeps a nested subset of train)."""

    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    train_size: int | None = None

    def indices(self, n: int) -> dict[str, np.ndarray]:
        from deepmorph.data import split_indices

        parts = split_indices(n, self.seed, self.fractions)
        if self.train_size is not None:
            if not 0 < self.train_size <= len(parts["train"]):
                raise DeepmorphValueError(
                    f"train size must be in [1, {len(parts['train'])}] for this dataset, got {self.train_size}")
            # Nested subsets: a smaller training set is a prefix of a larger one.
            order = np.random.default_rng(self.seed).permutation(len(parts["train"]))
            parts["train"] = np.sort(parts["train"][order[: self.train_size]])
        return parts


def _dataset_info(path: Path) -> tuple[int, list[str], int]:
    from deepmorph.data import open_dataset

    with open_dataset(path) as ds:
        names = list(ds.attrs.get("label_names") or [])
        channels = int(ds.images.shape[1])
        n = len(ds)
        if "label" not in ds.catalog.colnames:
            raise DeepmorphValueError(f"{path}: the catalogue has no 'label' column to classify")
    if not names:
        raise DeepmorphValueError(f"{path}: no label names recorded; import it with a label column")
    return n, names, channels


def _save_evaluation(out: Path, y_true, proba, label_names, title: str) -> dict:
    from deepmorph.measure import classification_metrics
    from deepmorph.measure.plots import confusion_figure

    pred = np.argmax(proba, axis=1)
    metrics = classification_metrics(y_true, pred, label_names, proba=proba)
    write_json(out / "test_metrics.json", metrics)
    fig = confusion_figure(np.asarray(metrics["confusion_matrix"]), label_names, title=title)
    fig.savefig(out / "confusion.png", dpi=100)
    return metrics


# -- the CNN -----------------------------------------------------------------------------------------

def train_cnn(data: str | Path, out: str | Path, config=None, split: Split = Split(), resume: bool = True,
              in_memory: bool = True) -> dict:
    """Train a CNN classifier on ``data`` and score it on the held-out test split.

    Parameters
    ----------
    data : path
        Dataset file with a ``label`` column (simulated or imported).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Model, optimiser, schedule, augmentation, epochs... (default :class:`RunConfig`).
    split : Split
        Train/val/test split and an optional training-set size.
    in_memory : bool
        Hold the images in memory (fast shuffled access; 16 KiB per 64x64 stamp).

    Returns
    -------
    dict
        Test metrics (``accuracy``, per class, ``confusion_matrix``, ``ece``) plus ``train_size``,
        ``epochs_run``, ``best_epoch`` and ``train_seconds``.
    """
    from deepmorph.data import StampDataset
    from deepmorph.tasks import ClassifyTask
    from deepmorph.training import RunConfig, build_model

    data, out = Path(data), Path(out)
    config = config or RunConfig()
    n, label_names, channels = _dataset_info(data)
    parts = split.indices(n)
    norm, config = fitted_normalization(config, data, parts["train"])
    sets = {k: StampDataset(data, idx, target="label", normalization=norm, in_memory=in_memory)
            for k, idx in parts.items()}
    model = build_model(config, in_channels=channels, num_outputs=len(label_names))
    task = ClassifyTask(model, config, len(label_names), label_names, augmentation=training_augmentation(config))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "classify", "method": "cnn", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "label_names": label_names,
        "normalization": norm.to_dict(), "in_channels": channels,
        "stamp_size": int(sets["train"][0]["image"].shape[-1]),
    })
    history, seconds = train_task(task, sets, config, out, resume)
    proba = predict_probabilities(model, sets["test"])
    metrics = _save_evaluation(out, sets["test"].catalog["label"], proba, label_names, f"CNN, {out.name}")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return {**metrics, "train_size": len(parts["train"]), "epochs_run": len(history.epoch),
            "best_epoch": summary.get("best_epoch"), "train_seconds": seconds}


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, dataset, batch_size: int = 256) -> np.ndarray:
    """Class probabilities ``(N, K)`` of a model on a dataset's (normalised) images, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.batch(np.arange(start, min(len(dataset), start + batch_size)), device=device)
        out.append(torch.softmax(model(batch["image"]), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


# -- the random forest --------------------------------------------------------------------------------

def train_forest_run(data: str | Path, out: str | Path, split: Split = Split(), seed: int = 0,
                     n_jobs: int = 2, n_estimators: int = 300, progress: bool = True) -> dict:
    """statmorph features (cached in the dataset file) + a random forest, scored on the test split.

    Returns the test metrics plus ``train_size``, ``feature_seconds`` (statmorph on the whole
    file, 0 when cached) and ``train_seconds``; failed measurements are counted in ``n_failed``.
    """
    from deepmorph.measure import dataset_features, train_forest

    data, out = Path(data), Path(out)
    n, label_names, _ = _dataset_info(data)
    parts = split.indices(n)
    start = time.perf_counter()
    features = dataset_features(data, n_jobs=n_jobs, progress=progress)
    feature_seconds = time.perf_counter() - start
    from deepmorph.data import open_dataset

    with open_dataset(data) as ds:
        labels = np.asarray(ds.catalog["label"])
    start = time.perf_counter()
    forest = train_forest(features[parts["train"]], labels[parts["train"]], seed=seed, n_jobs=n_jobs,
                          n_estimators=n_estimators, label_names=label_names)
    train_seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    forest.save(out / "forest.pkl")
    write_json(out / "run.json", {
        "task": "classify", "method": "forest", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "label_names": label_names,
        "seed": seed, "n_estimators": n_estimators,
    })
    proba = forest.predict_proba(features[parts["test"]])
    metrics = _save_evaluation(out, labels[parts["test"]], proba, label_names, f"random forest, {out.name}")
    failed = np.asarray(features["failed"], dtype=bool)
    return {**metrics, "train_size": len(parts["train"]), "feature_seconds": feature_seconds,
            "train_seconds": train_seconds, "n_failed": int(failed.sum())}


# -- using a run ------------------------------------------------------------------------------------

def load_run(run: str | Path) -> dict:
    """The ``run.json`` of a classification run (clear errors when it is not one)."""
    return read_run(run, "classify", METHODS, what="classification")


def load_cnn(run: str | Path) -> torch.nn.Module:
    """The trained CNN of a run (best weights), in eval mode on the CPU."""
    meta = load_run(run)
    return load_network(run, meta["in_channels"], len(meta["label_names"]))


def evaluate(run: str | Path, data: str | Path, out_json: str | Path | None = None) -> dict:
    """Score a run on every item of another labelled dataset (e.g. a separate test file)."""
    from deepmorph.data import Normalization, StampDataset, open_dataset

    run, data = Path(run), Path(data)
    meta = load_run(run)
    _, names, _ = _dataset_info(data)
    if names != meta["label_names"]:
        raise DeepmorphValueError(f"{data}: classes {names} differ from the model's {meta['label_names']}")
    if meta["method"] == "cnn":
        ds = StampDataset(data, target="label", normalization=Normalization.from_dict(meta["normalization"]))
        proba = predict_probabilities(load_cnn(run), ds)
        labels = np.asarray(ds.catalog["label"])
    else:
        from deepmorph.measure import dataset_features
        from deepmorph.measure.forest import ForestClassifier

        proba = ForestClassifier.load(run / "forest.pkl").predict_proba(dataset_features(data))
        with open_dataset(data) as d:
            labels = np.asarray(d.catalog["label"])
    from deepmorph.measure import classification_metrics

    metrics = classification_metrics(labels, proba.argmax(axis=1), names, proba=proba)
    if out_json is not None:
        write_json(Path(out_json), metrics)
    return metrics


def predict(run: str | Path, images: str | Path) -> Table:  # noqa: F821 (astropy Table)
    """Class and probabilities for each stamp of a dataset file (an imported or simulated ``.h5``)."""
    from astropy.table import Table

    from deepmorph.data import Normalization, StampDataset, open_dataset

    run, images = Path(run), Path(images)
    meta = load_run(run)
    names = meta["label_names"]
    with open_dataset(images) as d:
        ids = np.asarray(d.catalog["id"]) if "id" in d.catalog.colnames else np.arange(len(d))
    if meta["method"] == "cnn":
        ds = StampDataset(images, target=None, normalization=Normalization.from_dict(meta["normalization"]))
        proba = predict_probabilities(load_cnn(run), ds)
    else:
        from deepmorph.measure import dataset_features
        from deepmorph.measure.forest import ForestClassifier

        proba = ForestClassifier.load(run / "forest.pkl").predict_proba(dataset_features(images))
    table = Table({"id": ids, "label": proba.argmax(axis=1)})
    table["label_name"] = [names[i] for i in table["label"]]
    for k, name in enumerate(names):
        table[f"p_{name}"] = proba[:, k]
    table.meta.update({"model": str(run), "method": meta["method"]})
    return table


# -- the lecture's "how large does my dataset need to be" ---------------------------------------------

def classify_vs_size(data: str | Path, out: str | Path, sizes, config=None, methods=METHODS,
                     split_seed: int = 0, n_jobs: int = 2, progress: bool = True,
                     fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Table:  # noqa: F821
    """Test accuracy of each method vs training-set size, on one fixed test set.

    Training sets are nested subsets of one training split; validation and test sets stay
    fixed. Writes ``out/size_curve.ecsv`` and ``out/size_curve.png``.
    """
    from astropy.table import Table

    out = Path(out)
    rows = []
    for method in methods:
        if method not in METHODS:
            raise DeepmorphValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        for size in sizes:
            split = Split(seed=split_seed, fractions=tuple(fractions), train_size=int(size))
            run_dir = out / f"{method}-{int(size)}"
            if method == "cnn":
                result = train_cnn(data, run_dir, config, split)
            else:
                result = train_forest_run(data, run_dir, split, n_jobs=n_jobs, progress=progress)
            rows.append({"method": method, "train_size": int(size), "accuracy": result["accuracy"],
                         "train_seconds": result["train_seconds"]})
    table = Table(rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    table.write(out / "size_curve.ecsv", overwrite=True)
    from deepmorph.report.figures import size_curve_figure

    size_curve_figure(table).savefig(out / "size_curve.png", dpi=100)
    return table
