"""Hyper-parameter search for a task: the objective, and the best config against the default on the test split.

:func:`tune` runs :func:`deepmorph.training.search.search` with a task's objective: each trial
trains the trial's config on the training split (through :func:`deepmorph.training.fit`, with
the pruning callback) and is scored on the validation split by the config's
``early_stopping.monitor`` (``val_loss`` by default; ``--metric val_acc`` maximises the
validation accuracy). The held-out test split is used once, at the end: the default config and
the best one, trained for the same number of epochs, are scored on it; of the two, the one with
the better validation score is ``selected`` (the default can win: a config that was best after
a few epochs need not be after more). ::

    OUT/study.journal            the Optuna studies (default storage)
    OUT/trials/STAGE-NNNN/       one classification run per trial (run.json, config.yaml, model.pt, ...)
    OUT/trials.ecsv              every trial: stage, number, state, value, parameters, epochs, seconds
    OUT/best_config.yaml         the best trial's run config (deepmorph train classify --config ...)
    OUT/optimization_history.png, OUT/param_importances.png
    OUT/default/                 the default config, trained for the final stage's epochs
    OUT/summary.json             best vs default: validation and test scores, the gain, trial counts

Every trial directory is a complete classification run (``deepmorph evaluate classify --model
OUT/trials/fine-0003``), so the best trials also make an ensemble
(:func:`deepmorph.workflows.ensemble.ensemble_classify`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepmorph.data.store import dataset_exists
from deepmorph.errors import DeepmorphValueError
from deepmorph.workflows.classify import Split, _dataset_info
from deepmorph.workflows.runs import fitted_normalization, training_augmentation, write_json

#: Tasks :func:`tune` knows.
TASKS = ("classify",)
#: Per process: the datasets of (data file, split, normalisation), loaded once for all trials.
_SETS: dict = {}


def _classify_sets(data: Path, split: Split, normalization: dict, in_memory: bool) -> dict:
    """The train/val/test :class:`~deepmorph.data.StampDataset` of a split, cached per process."""
    from deepmorph.data import Normalization, StampDataset, open_dataset

    key = (str(data.resolve()), split, json.dumps(normalization, sort_keys=True), in_memory)
    if key not in _SETS:
        with open_dataset(data) as ds:
            n = len(ds)
        norm = Normalization.from_dict(normalization)
        _SETS.clear()  # one dataset at a time: a worker serves one search
        _SETS[key] = {k: StampDataset(data, idx, target="label", normalization=norm, in_memory=in_memory)
                      for k, idx in split.indices(n).items()}
    return _SETS[key]


@dataclass(frozen=True)
class ClassifyObjective:
    """Train a CNN classifier on the training split; its score is the best validation value of the
    config's ``early_stopping.monitor`` (the epoch whose weights early stopping keeps).

    Each trial directory is a classification run like :func:`deepmorph.workflows.classify.train_cnn`'s.
    Picklable (worker processes load the images once each).
    """

    data: Path
    split: Split = Split()
    in_memory: bool = True

    def __call__(self, config, run_dir: Path, callbacks=()) -> float:
        from deepmorph.data import make_loader
        from deepmorph.tasks import ClassifyTask
        from deepmorph.training import build_model, fit

        n, label_names, channels = _dataset_info(self.data)
        norm, config = fitted_normalization(config, self.data, self.split.indices(n)["train"])
        sets = _classify_sets(self.data, self.split, norm.to_dict(), self.in_memory)
        model = build_model(config, in_channels=channels, num_outputs=len(label_names))
        task = ClassifyTask(model, config, len(label_names), label_names,
                            augmentation=training_augmentation(config))
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "run.json", {
            "task": "classify", "method": "cnn", "data": str(self.data.resolve()), "split_seed": self.split.seed,
            "fractions": list(self.split.fractions), "train_size": len(sets["train"]), "label_names": label_names,
            "normalization": norm.to_dict(), "in_channels": channels,
            "stamp_size": int(sets["train"][0]["image"].shape[-1]),
        })
        train = make_loader(sets["train"], config.batch_size, shuffle=True, num_workers=config.num_workers,
                            seed=config.seed, drop_last=len(sets["train"]) > config.batch_size)
        val = make_loader(sets["val"], 256, num_workers=config.num_workers, seed=config.seed)
        history = fit(task, train, val, config, run_dir, callbacks=list(callbacks))
        values = [v for v in history.history.get(config.early_stopping.monitor, []) if math.isfinite(v)]
        if not values:
            return float("nan")
        return min(values) if config.early_stopping.mode == "min" else max(values)

    def evaluate(self, run_dir: Path) -> dict:
        """Test-split metrics of a trained run (accuracy, per class, log loss...), also written to
        ``run_dir/test_metrics.json``."""
        from deepmorph.measure import classification_metrics
        from deepmorph.workflows.classify import load_cnn, load_run, predict_probabilities

        meta = load_run(run_dir)
        sets = _classify_sets(self.data, self.split, meta["normalization"], self.in_memory)
        proba = predict_probabilities(load_cnn(run_dir), sets["test"])
        labels = np.asarray(sets["test"].catalog["label"])
        metrics = classification_metrics(labels, proba.argmax(axis=1), meta["label_names"], proba=proba)
        write_json(Path(run_dir) / "test_metrics.json", metrics)
        return metrics


def tune(task: str, data: str | Path, space, out: str | Path, *, base=None, split: Split | None = None,
         metric: str | None = None, compare: bool = True, **search_options) -> dict:
    """Search ``space`` for ``task`` on ``data``; compare the best config with the default on the test split.

    Parameters
    ----------
    task : {"classify"}
        The task.
    data : path
        Labelled dataset file.
    space : path or SearchSpace
        The search space (a YAML file, see :mod:`deepmorph.training.search`).
    out : path
        Output folder (layout in the module docstring); rerunning continues the search.
    base : RunConfig, optional
        The default config (every field not searched); default :class:`~deepmorph.training.RunConfig`.
    split : Split, optional
        Train/val/test split (default 80/10/10, seed 0); trials see train and val only.
    metric : str, optional
        The validation metric to optimise: ``val_loss`` (minimised) or ``val_acc`` (maximised);
        default the base config's ``early_stopping.monitor``.
    compare : bool
        Train the default config and score both on the test split.
    **search_options
        ``trials``, ``fine_trials``, ``workers``, ``storage``, ``study``, ``timeout``, ``seed``,
        ``pruner``, ``max_retry``, ``progress``... of :func:`deepmorph.training.search.search`.

    Returns
    -------
    dict
        What ``OUT/summary.json`` holds: ``best`` and ``default`` (``val`` score, ``test`` metrics,
        ``test_accuracy``), ``gain_test_accuracy`` (best minus default), ``selected`` (``"search"``,
        or ``"default"`` when the default, trained as long, scores better on the validation split),
        trial counts per stage and state, seconds.
    """
    from deepmorph.training import RunConfig
    from deepmorph.training.fit import restart_on_config_change
    from deepmorph.training.search import SearchSpace, _redact, quiet_lightning, search

    if task not in TASKS:
        raise DeepmorphValueError(f"tune: unknown task {task!r}; choose from {', '.join(TASKS)}")
    data, out, split = Path(data), Path(out), split or Split()
    if not dataset_exists(data):
        raise DeepmorphValueError(f"{data}: no such dataset file (or shards)")
    base = base or RunConfig()
    if metric is not None:
        if metric not in ("val_loss", "val_acc"):
            raise DeepmorphValueError(f"--metric must be val_loss or val_acc, got {metric!r}")
        base = base.with_overrides({"early_stopping": {"monitor": metric, "mode": "min" if metric == "val_loss"
                                                       else "max"}})
    if not isinstance(space, SearchSpace):
        space = SearchSpace.from_yaml(space, base)
    n, _, _ = _dataset_info(data)
    _, base = fitted_normalization(base, data, split.indices(n)["train"])  # fitted once, shared by every trial
    objective = ClassifyObjective(data, split)
    start = time.perf_counter()
    result = search(objective, space, base, out, **search_options)
    summary = {"task": task, "data": str(data.resolve()), "metric": base.early_stopping.monitor,
               "direction": "minimize" if base.early_stopping.mode == "min" else "maximize",
               "storage": _redact(search_options.get("storage") or f"journal:{out / 'study.journal'}"),
               "study": search_options.get("study", "deepmorph-tune"), **result.summary()}
    if compare and result.best_config is not None and result.complete:
        best_run = result.best_run
        with quiet_lightning(), restart_on_config_change():  # OUT/best and OUT/default are ours to retrain
            if not (best_run / "model.pt").is_file():  # the best trial ran on another machine: train it here
                best_run = out / "best"
                objective(result.best_config.with_overrides({"progress_bar": False}), best_run, [])
            default_val = objective(result.default_config.with_overrides({"progress_bar": False}), out / "default",
                                    [])
        best_test, default_test = objective.evaluate(best_run), objective.evaluate(out / "default")
        summary["best"].update(val=result.best_value, test=_short(best_test), test_accuracy=best_test["accuracy"],
                               run=str(best_run))
        summary["default"] = {"val": default_val, "test": _short(default_test),
                              "test_accuracy": default_test["accuracy"], "run": str(out / "default"),
                              "epochs": result.default_config.epochs}
        summary["gain_test_accuracy"] = best_test["accuracy"] - default_test["accuracy"]
        summary["n_test"] = best_test["n"]
        # Model selection on the validation split, the default included: short coarse trials can
        # favour configs that a longer training does not.
        sign = 1.0 if summary["direction"] == "minimize" else -1.0
        summary["selected"] = "search" if sign * result.best_value <= sign * default_val else "default"
    summary["seconds"] = time.perf_counter() - start
    write_json(out / "summary.json", summary)
    return summary


def _short(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")
            if k in metrics}
