"""Survey-to-survey transfer of the morphology classifier: how many target labels does it need?

The lecture's transfer-learning experiment (Dominguez Sanchez et al. 2019, MNRAS 484, 93: a CNN
trained on SDSS, fine-tuned with a few hundred DES labels, beats one trained from scratch on ten
times more), done on simulations where the truth is known. One galaxy population (bright,
class-balanced spheroids, face-on and edge-on disks, :func:`population_priors`) is observed by two
survey presets, each with its own pixel scale, PSF, zero point and depth; the half-light radii are
the same in arcsec, so they differ in pixels. A CNN trained on the *source* survey is applied to
the *target* survey without labels (only its normalisation is refitted to the target's sky noise),
then fine-tuned with ``L`` labelled target galaxies under each freezing strategy, and the same
``L`` galaxies train the same network from scratch. Every model is scored on one held-out target
test split.

Output folder::

    OUT/data/source-<survey>.h5, target-<survey>.h5   the two simulated sets (unless given)
    OUT/source/                            the source CNN (trained on the source set)
    OUT/no-finetune/                       the source CNN scored on the target test split
    OUT/finetune-<strategy>-<L>/           one fine-tuned run per freezing strategy and label count
    OUT/scratch-<L>/                       one run trained from scratch on the same L galaxies
    OUT/transfer.ecsv, transfer.json       the table (one row per method and label count) and the record
    OUT/transfer.png                       target accuracy vs number of target labels

Every sub-run writes ``result.json`` when it is complete and is skipped when the experiment is run
again (an interrupted one resumes from its last checkpoint); ``OUT/settings.json`` guards against
reusing a folder with other settings.

Runs on target labels train for a fixed budget (:func:`label_budget`) without early stopping:
their validation split (capped at :data:`VAL_SIZE` galaxies) only draws the learning curves, so
no model is selected with more labels than it is said to use.

The defaults (8000 galaxies per survey, 48 px stamps, 29 training runs) take about 6 minutes on
one CPU core. On a machine shared with other jobs, ``OMP_NUM_THREADS=1`` can be many times faster
than letting torch start a thread per core.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.adapt import LabelSplit, check_strategies
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import save_figure, save_table, write_json

#: Label counts of the issue (0: the source model as it is).
LABELS = (0, 50, 100, 200, 500, 1000, 5000)
#: The freezing strategies: the head only, the first two of the CNN's three blocks, nothing.
STRATEGIES = ("head", "blocks:2", "none")
#: The accuracy the published SDSS -> DES transfer reaches with a few hundred DES labels.
TARGET_ACCURACY = 0.95
#: Train / validation / test fractions of the target set (a large test split: +-0.5% at 95%).
TARGET_FRACTIONS = (0.7, 0.05, 0.25)
#: Validation galaxies of a run on target labels (learning curves only: no selection).
VAL_SIZE = 128
#: The galaxy population both surveys observe: magnitudes (AB) of an SDSS-main-sample-like set,
#: major-axis half-light radii (arcsec) and the bulges' ellipticity (E0-E5 spheroids).
MAG = (14.0, 17.7)
BULGE_HLR_ARCSEC = (0.6, 2.5)
DISK_HLR_ARCSEC = (1.1, 4.0)
BULGE_ELLIPTICITY = (0.0, 0.5)


def population_priors(pixel_scale_arcsec: float):
    """The class-balanced galaxy population (spheroid, disk, edge-on) in a survey's pixels.

    Parameters
    ----------
    pixel_scale_arcsec : float
        The survey's pixel scale, arcsec/pixel: the radii :data:`BULGE_HLR_ARCSEC` and
        :data:`DISK_HLR_ARCSEC` are converted to pixels with it.

    Returns
    -------
    Priors
        ``balanced_classes`` priors (the classes keep clear of the label rule's thresholds, so every
        label is unambiguous), magnitudes :data:`MAG`.
    """
    from deepmorph.simulate import Priors

    def log_pix(arcsec: tuple[float, float]) -> tuple[float, float]:
        return tuple(math.log10(r / pixel_scale_arcsec) for r in arcsec)

    return Priors(balanced_classes=True, mag=MAG, log10_bulge_hlr_pix=log_pix(BULGE_HLR_ARCSEC),
                  log10_disk_hlr_pix=log_pix(DISK_HLR_ARCSEC), bulge_ellipticity=BULGE_ELLIPTICITY)


def transfer_config(**overrides):
    """The source run's config: a three-block CNN (16, 32, 64 channels) without dropout, flips, Adam
    2e-3 with cosine decay over 15 epochs, batch 64; the best epoch on the source's validation loss.

    Why these choices, measured on sdss-r -> des-r (6400 source training galaxies):

    - no dropout: with dropout 0.1 after each block, a frozen block drops units while the head
      trains but not when it predicts, so a head fine-tuned on DES scores ~74% in eval mode and
      ~93% with the blocks' dropout on; dropout before batch normalisation also makes eval-mode
      accuracy jump by several per cent between epochs. Without it, fine-tuning every layer reaches
      98% with 100 DES labels, against ~94% with dropout.
    - all 15 epochs (patience 15): at 2e-3 the validation accuracy still jumps between epochs,
      so early stopping after a few stops before the cosine decay has settled the weights.
    """
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": {"name": "cnn", "kwargs": {"widths": [16, 32, 64], "dropout": 0.0}},
        "augmentation": "flips", "optimizer.lr": 2e-3, "schedule": {"kind": "cosine"}, "batch_size": 64,
        "epochs": 15, "early_stopping.patience": 15,
    })
    return base.with_overrides(overrides) if overrides else base


def label_budget(labels: int, steps: int, min_epochs: int, max_batch: int = 64,
                 max_epochs: int = 100) -> tuple[int, int]:
    """Batch size and epochs of a run on ``labels`` galaxies: at least ``steps`` optimiser steps.

    The batch is a quarter of the labels (8 to ``max_batch``), so even 50 labels make a few steps
    per epoch; the epochs are ``steps`` / steps per epoch, within ``[min_epochs, max_epochs]``.
    """
    batch = int(min(max_batch, max(8, labels // 4)))
    per_epoch = labels // batch if labels > batch else 1  # the loader drops the last partial batch
    return batch, int(min(max_epochs, max(min_epochs, math.ceil(steps / per_epoch))))


def parse_labels(labels) -> tuple[int, ...]:
    """Label counts as sorted unique integers >= 0 (a clear error otherwise)."""
    try:
        counts = sorted({int(v) for v in labels})
    except (TypeError, ValueError):
        raise DeepmorphValueError(f"label counts must be integers, got {labels!r}") from None
    if not counts or counts[0] < 0:
        raise DeepmorphValueError(f"label counts must be integers >= 0, got {list(labels)!r}")
    return tuple(counts)


# -- data ---------------------------------------------------------------------------------------------

def _simulated(path: Path, survey: str, n: int, stamp_size: int, seed: int, progress: bool) -> Path:
    """``path`` simulated for ``survey``, or the existing file when it is that one."""
    from deepmorph.data import open_dataset, write_dataset
    from deepmorph.simulate import Simulator, get_survey

    preset = get_survey(survey)
    if path.is_file():
        with open_dataset(path) as ds:
            found = (len(ds), int(ds.attrs.get("seed", -1)), int(ds.images.shape[-1]))
        if found != (n, seed, stamp_size):
            raise DeepmorphIOError(f"{path}: holds {found[0]} stamps of {found[2]} px with seed {found[1]}, not "
                                   f"{n} of {stamp_size} px with seed {seed}; remove it or choose another folder")
        return path
    simulator = Simulator(preset, stamp_size, priors=population_priors(preset.pixel_scale_arcsec))
    return write_dataset(path, simulator, n, seed, progress=progress)


#: Run-config fields that do not change a result (a rerun may change them).
_NOT_RESULTS = ("progress_bar", "num_workers", "accelerator", "devices")


def _check_settings(out: Path, settings: dict) -> None:
    """Record the settings that fix every sub-run's result; refuse a folder made with others."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise DeepmorphValueError(f"{out}: holds a transfer experiment with other {', '.join(changed)}; "
                                      "choose another output folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


# -- the runs -------------------------------------------------------------------------------------------

def _done(run: Path) -> dict | None:
    path = run / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _record(run: Path, metrics: dict, **extra) -> dict:
    result = {"accuracy": float(metrics["accuracy"]), "n_test": int(metrics["n"]), **extra}
    write_json(run / "result.json", result)
    return result


def _score_on_target(source_run: Path, target: Path, split: Split, run: Path) -> dict:
    """The source CNN on the target test split, its normalisation refitted on the target's
    (unlabelled) training images: the target's sky noise sets a new asinh softening."""
    import dataclasses

    from deepmorph.data import Normalization, StampDataset
    from deepmorph.workflows.classify import _save_evaluation, load_cnn, load_run, predict_probabilities

    meta = load_run(source_run)
    parts = split.indices(_length(target))
    norm = Normalization.from_dict(meta["normalization"])
    if norm.kind in ("asinh", "dataset"):
        norm = dataclasses.replace(norm, scale="auto", mean=None, std=None)
        norm = norm.fit(StampDataset(target, parts["train"], target=None), max_images=1024)
    test = StampDataset(target, parts["test"], target="label", normalization=norm)
    proba = predict_probabilities(load_cnn(source_run), test)
    run.mkdir(parents=True, exist_ok=True)
    metrics = _save_evaluation(run, np.asarray(test.catalog["label"]), proba, meta["label_names"],
                               "source CNN on the target survey")
    return _record(run, metrics, normalization=norm.to_dict())


def _length(path: Path) -> int:
    from deepmorph.workflows.classify import _dataset_info

    return _dataset_info(path)[0]


def _row(method: str, freeze: str, labels: int, result: dict) -> dict:
    return {"method": method, "freeze": freeze, "labels": int(labels), "accuracy": float(result["accuracy"]),
            "n_test": int(result["n_test"]), "epochs": int(result.get("epochs", 0)),
            "train_seconds": float(result.get("train_seconds", 0.0))}


def _curve(method: str, freeze: str) -> str:
    """A curve's name: ``no-finetune``, ``finetune:<freeze>`` or ``scratch``."""
    return f"finetune:{freeze}" if method == "finetune" else method


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def labels_needed(table, target_accuracy: float = TARGET_ACCURACY) -> dict:
    """Fewest target labels with which each curve (``no-finetune``, ``finetune:<freeze>``, ``scratch``)
    reaches ``target_accuracy``; None when no label count does."""
    need: dict = {}
    for method, freeze, labels, accuracy in zip(table["method"], table["freeze"], table["labels"],
                                                table["accuracy"], strict=True):
        curve = _curve(str(method), str(freeze))
        need.setdefault(curve, None)
        if float(accuracy) >= target_accuracy:
            labels = 0 if curve == "no-finetune" else int(labels)
            need[curve] = labels if need[curve] is None else min(need[curve], labels)
    return need


def _runs_on_labels(out: Path, n: int, source_run: Path, target: Path, strategies, config, finetune_lr: float,
                    steps: int, finetune_epochs: int, seed: int, progress: bool) -> list[dict]:
    """Fine-tune the source CNN with each strategy, and train it from scratch, on the same ``n``
    labelled target galaxies (the first ``n`` of the training split); one table row per run."""
    from deepmorph.workflows.classify import train_cnn
    from deepmorph.workflows.finetune import finetune

    split = LabelSplit(seed=seed, fractions=TARGET_FRACTIONS, train_size=n, val_size=VAL_SIZE)
    keep = {k: getattr(config, k) for k in ("progress_bar", "num_workers", "accelerator", "seed")}
    fixed = {"early_stopping.enabled": False, "schedule": {"kind": "cosine", "t_max": None}, **keep}
    rows = []
    for strategy in strategies:
        run = out / f"finetune-{strategy.replace(':', '')}-{n}"
        result = _done(run)
        if result is None:
            batch, epochs = label_budget(n, steps, finetune_epochs)
            _say(progress, f"fine-tuning ({strategy} frozen) on {n} labels, {epochs} epochs ...")
            r = finetune("classify", source_run, target, run, strategy, split,
                         {**fixed, "epochs": epochs, "batch_size": batch, "optimizer.lr": finetune_lr})
            result = _record(run, r, epochs=r["epochs_run"], train_seconds=r["train_seconds"], batch_size=batch)
        rows.append(_row("finetune", strategy, n, result))
        _say(progress, f"  fine-tuned ({strategy} frozen), {n} labels: accuracy {100 * result['accuracy']:.1f}%")
    run = out / f"scratch-{n}"
    result = _done(run)
    if result is None:
        # From scratch: the source's recipe, for at least as many epochs as the source had.
        batch, epochs = label_budget(n, steps, config.epochs)
        _say(progress, f"training from scratch on {n} labels, {epochs} epochs ...")
        scratch = config.with_overrides({**fixed, "epochs": epochs, "batch_size": batch, "normalization": {
            "kind": "asinh", "scale": "auto", "mean": None, "std": None}})
        r = train_cnn(target, run, scratch, split)
        result = _record(run, r, epochs=r["epochs_run"], train_seconds=r["train_seconds"], batch_size=batch)
    rows.append(_row("scratch", "-", n, result))
    _say(progress, f"  from scratch, {n} labels: accuracy {100 * result['accuracy']:.1f}%")
    return rows


def transfer_experiment(out: str | Path, source: str = "sdss-r", target: str = "des-r", labels=LABELS,
                        n_source: int = 8000, n_target: int = 8000, strategies=STRATEGIES, stamp_size: int = 48,
                        config=None, finetune_lr: float | None = None, steps: int = 200, finetune_epochs: int = 3,
                        seed: int = 0, source_data: str | Path | None = None, target_data: str | Path | None = None,
                        target_accuracy: float = TARGET_ACCURACY, progress: bool = True):
    """Train on one survey, then measure target-survey accuracy vs number of target labels.

    Parameters
    ----------
    out : path
        Output folder (layout in the module docstring); rerunning resumes.
    source, target : str
        Survey presets (:func:`deepmorph.simulate.get_survey`), e.g. ``sdss-r`` and ``des-r``.
    labels : sequence of int
        Numbers of labelled target galaxies (0: the source CNN without fine-tuning). Each is a
        nested subset of the target's training split, the same for every method.
    n_source, n_target : int
        Sizes of the simulated sets (the target is split :data:`TARGET_FRACTIONS`).
    strategies : sequence of str
        Freezing strategies of the fine-tuning: ``head``, ``blocks:K``, ``none``.
    stamp_size : int
        Stamp side of the simulated sets, pixels (both surveys).
    config : RunConfig, optional
        The source run's config (default :func:`transfer_config`); training from scratch uses it
        too, for at least its ``epochs``.
    finetune_lr : float, optional
        Initial learning rate of the fine-tuning (cosine decay); default: the config's, as from
        scratch, so that the two differ only in where they start. The shift between surveys is
        large: on sdss-r -> des-r with 200 labels, 5e-4 and 2e-4 leave the fine-tuned CNN ~1.5%
        below 2e-3.
    steps : int
        Least optimiser steps of each run on target labels (:func:`label_budget`).
    finetune_epochs : int
        Least epochs of a fine-tuning run.
    seed : int
        Seed of the source set and of the splits; the target set uses ``seed + 1``.
    source_data, target_data : path, optional
        Labelled datasets (``.h5``) to use instead of simulating (the survey names then only label
        the outputs).
    target_accuracy : float
        The accuracy whose label cost the summary reports (:func:`labels_needed`).
    progress : bool
        Print a line per sub-run (and the simulation's progress bars).

    Returns
    -------
    astropy.table.Table
        One row per method and label count: ``method`` (no-finetune, finetune, scratch), ``freeze``,
        ``labels``, ``accuracy``, ``n_test``, ``epochs``, ``train_seconds``; also written to
        ``OUT/transfer.ecsv``.

    Raises
    ------
    DeepmorphValueError
        An unknown survey or strategy, negative label counts, or more labels than the target's
        training split holds.
    """
    from astropy.table import Table

    from deepmorph.data import split_indices
    from deepmorph.simulate import get_survey
    from deepmorph.workflows.classify import train_cnn

    start = time.perf_counter()
    out = Path(out)
    surveys = {"source": get_survey(source).name, "target": get_survey(target).name}
    counts = parse_labels(labels)
    config = config or transfer_config()
    finetune_lr = float(finetune_lr) if finetune_lr is not None else config.optimizer.lr
    widths = config.model.kwargs.get("widths") if config.model.name == "cnn" else None
    strategies = check_strategies(strategies, len(widths) if widths else None)
    for given in (source_data, target_data):
        if given is not None and not Path(given).is_file():
            raise DeepmorphIOError(f"{given}: no such file")
    n_target = _length(Path(target_data)) if target_data is not None else int(n_target)
    train_size = len(split_indices(n_target, seed, TARGET_FRACTIONS)["train"])
    if counts[-1] > train_size:
        raise DeepmorphValueError(f"{counts[-1]} target labels asked for, but the target's training split holds "
                                  f"{train_size} galaxies (of {n_target}); use fewer labels or a larger target set")
    _check_settings(out, {
        "surveys": surveys, "n_source": n_source if source_data is None else str(source_data),
        "n_target": n_target if target_data is None else str(target_data), "stamp_size": stamp_size, "seed": seed,
        "config": {k: v for k, v in config.to_dict().items() if k not in _NOT_RESULTS},
        "finetune_lr": finetune_lr, "steps": steps, "finetune_epochs": finetune_epochs,
    })

    data = {}
    for role, given, n, data_seed in (("source", source_data, n_source, seed), ("target", target_data, n_target,
                                                                                seed + 1)):
        if given is None:
            given = out / "data" / f"{role}-{surveys[role]}.h5"
            if not given.is_file():
                _say(progress, f"simulating {n} {surveys[role]} galaxies ({role}) ...")
            _simulated(given, surveys[role], int(n), stamp_size, data_seed, progress)
        data[role] = Path(given)

    source_run = out / "source"
    source_result = _done(source_run)
    if source_result is None:
        _say(progress, f"training the source CNN on {data['source']} ...")
        r = train_cnn(data["source"], source_run, config, Split(seed=seed))
        source_result = _record(source_run, {"accuracy": r["accuracy"], "n": r["n"]}, epochs=r["epochs_run"],
                                train_seconds=r["train_seconds"], train_size=r["train_size"])
    _say(progress, f"  source CNN on its own survey ({surveys['source']}): accuracy "
                   f"{100 * source_result['accuracy']:.1f}% on {source_result['n_test']} test galaxies")

    target_split = Split(seed=seed, fractions=TARGET_FRACTIONS)
    plain = _done(out / "no-finetune") or _score_on_target(source_run, data["target"], target_split,
                                                           out / "no-finetune")
    rows = [_row("no-finetune", "-", n, plain) for n in counts]
    _say(progress, f"  no fine-tuning on {surveys['target']}: accuracy {100 * plain['accuracy']:.1f}%")

    for n in (c for c in counts if c > 0):
        rows += _runs_on_labels(out, n, source_run, data["target"], strategies, config, finetune_lr, steps,
                                finetune_epochs, seed, progress)

    table = Table(rows=rows)
    table.meta.update({"source": surveys["source"], "target": surveys["target"],
                       "source_accuracy": source_result["accuracy"],
                       "accuracy": "fraction of the target test split classified right"})
    save_table(table, out / "transfer.ecsv")
    need = labels_needed(table, target_accuracy)
    write_json(out / "transfer.json", {
        "source": surveys["source"], "target": surveys["target"], "source_data": str(data["source"]),
        "target_data": str(data["target"]), "source_accuracy": source_result["accuracy"],
        "source_test_size": source_result["n_test"], "target_accuracy": target_accuracy,
        "labels_needed": need, "labels": list(counts), "strategies": list(strategies), "finetune_lr": finetune_lr,
        "scratch_lr": config.optimizer.lr, "steps": steps, "val_size": VAL_SIZE,
        "target_fractions": list(TARGET_FRACTIONS), "rows": [dict(r) for r in rows],
        "seconds": time.perf_counter() - start,
    })
    save_figure(transfer_figure(table, target_accuracy), out / "transfer.png")
    return table


# -- the figure -------------------------------------------------------------------------------------------

def transfer_figure(table, target_accuracy: float = TARGET_ACCURACY):
    """Target test accuracy vs number of target labels (log): a line per freezing strategy and from
    scratch; the source CNN without fine-tuning, on the target and on its own survey, as levels."""
    from deepmorph.report.figures import new_figure

    fig = new_figure((6.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    rows = [{k: row[k] for k in table.colnames} for row in table]
    curves = {}
    for row in rows:
        if row["method"] != "no-finetune":
            curves.setdefault(_curve(str(row["method"]), str(row["freeze"])), []).append(row)
    names = {"scratch": "from scratch"}
    for curve, points in curves.items():
        points.sort(key=lambda r: r["labels"])
        freeze = curve.partition(":")[2]
        text = names.get(curve, f"fine-tuned, {freeze} frozen" if freeze != "none" else "fine-tuned, nothing frozen")
        ax.plot([r["labels"] for r in points], [100 * r["accuracy"] for r in points], "o-", label=text)
    plain = [r["accuracy"] for r in rows if r["method"] == "no-finetune"]
    if plain:
        ax.axhline(100 * plain[0], color="k", ls="-.", lw=1, label="no fine-tuning")
    if "source_accuracy" in table.meta:
        ax.axhline(100 * float(table.meta["source_accuracy"]), color="gray", ls=":", lw=1,
                   label="source CNN on its own survey")
    ax.axhline(100 * target_accuracy, color="k", ls="--", lw=1, label=f"{100 * target_accuracy:g}%")
    ax.set_xscale("log")
    ax.set_xlabel("labelled target galaxies")
    ax.set_ylabel("target test accuracy [%]")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    meta = table.meta
    if "source" in meta and "target" in meta:
        ax.set_title(f"Transfer {meta['source']} -> {meta['target']}")
    fig.tight_layout()
    return fig
