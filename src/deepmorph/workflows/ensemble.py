"""Ensembles of classifiers: the average of several runs' class probabilities, scored on the test split.

The members are classification runs trained on the same data file and split (the best trials
of a search, :func:`top_trials`, or one config trained with several seeds, :func:`seed_runs`).
Each member predicts the held-out test galaxies with its own normalisation; the ensemble's
probabilities are their mean (weighted, if asked). Averaging probabilities never raises the log
loss above the members' mean (the log is concave); the accuracy usually rises too, most when
the members disagree. ::

    OUT/ensemble.ecsv      one row per member and one for the ensemble: accuracy, balanced accuracy,
                           log loss, ECE on the test split
    OUT/summary.json       the same, plus the gain over the best member and over the members' mean
    OUT/confusion.png      the ensemble's confusion matrix
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.runs import save_figure, save_table, write_json


def average_probabilities(probabilities: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """The (weighted) mean of members' class probabilities, ``(N, K)``.

    Raises
    ------
    DeepmorphValueError
        With no member, members of different shapes, or weights that are not positive and one per member.
    """
    if not len(probabilities):
        raise DeepmorphValueError("an ensemble needs at least one member")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities]) if len(
        {np.shape(p) for p in probabilities}) == 1 else None
    if stack is None or stack.ndim != 3:
        raise DeepmorphValueError(f"members' probabilities must share one (N, K) shape, got "
                                  f"{sorted({np.shape(p) for p in probabilities})}")
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stack),) or not np.all(w > 0):
        raise DeepmorphValueError(f"need one positive weight per member ({len(stack)}), got {weights!r}")
    return np.tensordot(w / w.sum(), stack, axes=1)


def _member_info(run: Path) -> dict:
    from deepmorph.workflows.classify import load_run

    meta = load_run(run)
    if meta["method"] != "cnn":
        raise DeepmorphValueError(f"{run}: a {meta['method']} run; ensembles average CNN runs")
    return meta


def ensemble_classify(runs: Sequence[str | Path], out: str | Path, data: str | Path | None = None,
                      weights: Sequence[float] | None = None) -> dict:
    """Average the test-split probabilities of classification runs and score them.

    Parameters
    ----------
    runs : sequence of path
        Classification CNN runs (``train classify`` runs or search trials) of one data file and split.
    out : path
        Output folder.
    data : path, optional
        The data file (default: the members' own, from their ``run.json``).
    weights : sequence of float, optional
        One positive weight per member (default equal).

    Returns
    -------
    dict
        ``members`` (run, accuracy, log loss... each), ``ensemble`` (the same), ``gain_vs_best``
        and ``gain_vs_mean`` (ensemble accuracy minus the best member's and the members' mean),
        ``log_loss_gain_vs_mean`` (members' mean log loss minus the ensemble's, >= 0).
    """
    from astropy.table import Table

    from deepmorph.data import Normalization, StampDataset, open_dataset
    from deepmorph.measure import classification_metrics, confusion_figure
    from deepmorph.workflows.classify import Split, load_cnn, predict_probabilities

    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise DeepmorphValueError(f"an ensemble needs at least two runs, got {len(runs)}")
    metas = [_member_info(r) for r in runs]
    first = metas[0]
    for run, meta in zip(runs[1:], metas[1:], strict=True):
        for key in ("data", "split_seed", "fractions", "label_names"):
            if meta[key] != first[key]:
                raise DeepmorphValueError(f"{run}: {key} {meta[key]!r} differs from {runs[0]}'s {first[key]!r}; "
                                          "members must share the data file and split")
    data = Path(data) if data is not None else Path(first["data"])
    if not data.is_file():
        raise DeepmorphIOError(f"{data}: the members' data file is not found (give --data)")
    with open_dataset(data) as ds:
        n = len(ds)
    test = Split(int(first["split_seed"]), tuple(first["fractions"])).indices(n)["test"]
    names = list(first["label_names"])
    probabilities, rows, labels = [], [], None
    for run, meta in zip(runs, metas, strict=True):
        ds = StampDataset(data, test, target="label", normalization=Normalization.from_dict(meta["normalization"]))
        proba = predict_probabilities(load_cnn(run), ds)
        labels = np.asarray(ds.catalog["label"]) if labels is None else labels
        probabilities.append(proba)
        rows.append({"member": str(run), **_scores(classification_metrics(labels, proba.argmax(1), names, proba))})
    mean = average_probabilities(probabilities, weights)
    metrics = classification_metrics(labels, mean.argmax(1), names, proba=mean)
    ensemble = {"member": "ensemble", **_scores(metrics)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(rows=[*rows, ensemble])
    table.meta["comments"] = [f"ensemble of {len(runs)} runs, scored on {len(labels)} test galaxies of {data}"]
    save_table(table, out / "ensemble.ecsv")
    fig = confusion_figure(np.asarray(metrics["confusion_matrix"]), names, title=f"ensemble of {len(runs)}")
    save_figure(fig, out / "confusion.png")
    accuracies = [r["accuracy"] for r in rows]
    summary = {
        "data": str(data), "n_test": int(len(labels)), "members": rows, "ensemble": ensemble,
        "weights": None if weights is None else [float(w) for w in weights],
        "gain_vs_best": ensemble["accuracy"] - max(accuracies),
        "gain_vs_mean": ensemble["accuracy"] - float(np.mean(accuracies)),
        "log_loss_gain_vs_mean": float(np.mean([r["log_loss"] for r in rows])) - ensemble["log_loss"],
    }
    write_json(out / "summary.json", summary)
    return summary


def _scores(metrics: dict) -> dict:
    return {k: float(metrics[k]) for k in ("accuracy", "balanced_accuracy", "log_loss", "ece")}


def top_trials(tune_dir: str | Path, k: int, minimum: int = 1) -> list[Path]:
    """The run directories of the ``k`` best completed trials of a search's last stage, best first
    (fewer if fewer completed; pruned trials stopped early and are left out).

    Raises
    ------
    DeepmorphValueError
        With fewer than ``minimum`` completed trials.
    """
    from astropy.table import Table

    tune_dir = Path(tune_dir)
    if k < 1:
        raise DeepmorphValueError(f"--top-k must be >= 1, got {k}")
    table_path, summary_path = tune_dir / "trials.ecsv", tune_dir / "summary.json"
    if not table_path.is_file() or not summary_path.is_file():
        raise DeepmorphIOError(f"{tune_dir}: not a finished search (no trials.ecsv or summary.json)")
    table = Table.read(table_path, format="ascii.ecsv")
    summary = json.loads(summary_path.read_text())
    stage = summary["best"]["stage"]
    done = [row for row in table if row["stage"] == stage and row["state"] == "complete"
            and (tune_dir / str(row["run"]) / "model.pt").is_file()]
    sign = 1.0 if summary["direction"] == "minimize" else -1.0
    done.sort(key=lambda row: (sign * float(row["value"]), int(row["number"])))
    if len(done) < minimum:
        raise DeepmorphValueError(f"{tune_dir}: {len(done)} completed trial(s) with a model in the {stage} stage, "
                                  f"fewer than {minimum}")
    return [tune_dir / str(row["run"]) for row in done[:k]]


def seed_runs(config, data: str | Path, out: str | Path, seeds: Sequence[int], split=None) -> list[Path]:
    """Train one config once per seed (model initialisation, shuffling, dropout, augmentation) into
    ``out/seed-S``; returns the run directories (rerunning resumes them)."""
    from deepmorph.training.search import quiet_lightning
    from deepmorph.workflows.classify import Split, train_cnn

    if not len(seeds) or len(set(seeds)) != len(seeds):
        raise DeepmorphValueError(f"need distinct seeds, got {list(seeds)}")
    runs = []
    for seed in seeds:
        run = Path(out) / f"seed-{seed}"
        with quiet_lightning():
            train_cnn(data, run, config.with_overrides({"seed": int(seed)}), split or Split())
        runs.append(run)
    return runs
