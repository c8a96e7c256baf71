"""Sim-to-sim domain adaptation of the morphometry CNN: idealised -> harder simulations, few labels.

The lecture's domain-adaptation experiment, done where the truth is known. A morphometry CNN is
trained on idealised simulations (the *source*: isolated single-Sersic galaxies, Gaussian sky,
the survey's analytic PSF) and applied to harder ones (the *target*: the same kind of galaxies on
real sky cutouts scaled to the survey's depth, through a real HST PSF, with neighbours and
clumps). Its scatter grows. A few labelled target galaxies (a fraction of the target set: 0.1%,
1%, 10%) then fine-tune it with each freezing strategy (the head only, the last blocks, every
layer), and the same labels train the same network from scratch. Every model is scored on one
held-out target test split, so the table says how much of the gap between the un-adapted model
and the source-domain level (the source model on the source test split) each choice closes.

Output folder::

    OUT/source.h5, OUT/target.h5          the two simulated sets (unless given)
    OUT/source/                           the source morphometry run (unless given)
    OUT/score-source/, score-unadapted/   the source model scored on each domain's test split
    OUT/finetune-<strategy>-<labels>/     one fine-tuned run per freezing strategy and label count
    OUT/scratch-<labels>/                 one run trained from scratch on the same labels
    OUT/adapt.ecsv, adapt.json            the table (one row per model) and the experiment's record
    OUT/adapt.png, adapt_examples.png     scatter vs labelled fraction; source and target stamps

A sub-run that has finished (its ``test_metrics.json`` exists) is skipped when the experiment is
run again; an interrupted one resumes from its last checkpoint.

Few-label runs train for a fixed budget of optimiser steps (:func:`label_budget`) without early
stopping: their validation split (capped at :data:`VAL_SIZE` galaxies) draws the learning curves
and rescales the predicted errors (which only the coverage reflects), but selects no model, so the
scatter and bias come from the labelled fraction alone.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import read_run, save_figure, save_table, shared_data_file, write_json

#: Parameters whose scatter, bias and outlier fraction the table reports.
TABLE_PARAMETERS = ("mag", "hlr", "n", "q", "pa")
#: Relative parameters also scored by the scatter of log10(measured / true) (:func:`dex_scatter`).
DEX_PARAMETERS = ("hlr", "n")
#: Fewest labelled target galaxies a fraction may give.
MIN_LABELS = 5
#: Validation galaxies of a few-label run (learning curves only: no early stopping, no selection).
VAL_SIZE = 128
#: The real HST PSF used for the target (one of the 100 COSMOS ACS F814W PSFs, 0.03"/px).
HST_PSF = ("hst_acs_psf/real_galaxy_PSF_images.fits", 0, 0.03)
#: Without ../shared/data: a PSF of another width and shape than the preset's (Moffat 0.18", beta 3.5).
FALLBACK_PSF = "moffat:0.25,2.5"
#: Fine-tuning starts from trained weights: a lower learning rate than training from scratch.
FINETUNE_LR = 5e-4


def adapt_config(**overrides):
    """The source run's config: a fast CNN with a flatten head, flips, Adam 2e-3, cosine, batch 128."""
    from deepmorph.workflows.morphometry import default_config

    base = default_config(**{
        "model": {"name": "cnn", "kwargs": {"widths": [8, 16, 32, 64], "blocks_per_stage": 1, "dropout": 0.0,
                                            "head": "flatten", "hidden": 128, "image_size": 64}},
        "augmentation": "flips", "optimizer.lr": 2e-3, "schedule": {"kind": "cosine"}, "batch_size": 128,
        "epochs": 12,
    })
    return base.with_overrides(overrides) if overrides else base


def source_priors():
    """Single-Sersic galaxies of magnitude 18-23 (both domains draw from these priors)."""
    from deepmorph.simulate import Priors

    return Priors(mag=(18.0, 23.0), bulge_to_total=(1.0, 1.0))


def label_budget(labels: int, steps: int = 150, min_epochs: int = 1, max_epochs: int = 100) -> tuple[int, int]:
    """Batch size and epochs of a run on ``labels`` galaxies: about ``steps`` optimiser steps.

    The batch is a quarter of the labels (8 to 128), so even 20 labels make a few steps per
    epoch; epochs are ``steps`` / steps per epoch, within ``[min_epochs, max_epochs]``.
    """
    batch = int(min(128, max(8, labels // 4)))
    per_epoch = labels // batch if labels > batch else 1  # the loader drops the last partial batch
    return batch, int(np.clip(math.ceil(steps / per_epoch), min_epochs, max_epochs))


@dataclasses.dataclass(frozen=True)
class LabelSplit(Split):
    """A :class:`Split` whose validation part is capped at ``val_size`` galaxies (its first ones)."""

    val_size: int | None = None

    def indices(self, n: int) -> dict[str, np.ndarray]:
        parts = super().indices(n)
        if self.val_size is not None:
            parts["val"] = parts["val"][: self.val_size]
        return parts


# -- the two domains ---------------------------------------------------------------------------------

def target_background(sky_sigma: float, path: str | Path | None = None, gain_e_per_count: float | None = None):
    """Real background cutouts scaled so their robust sky sigma is ``sky_sigma`` (counts).

    The image is ``path``, else the NTT/EMMI frame of ``../shared/data``, else the Hubble Deep
    Field shipped with scikit-image (grey: the mean of its RGB channels). Its median is removed
    and it is multiplied by ``sky_sigma / sigma_raw``, ``sigma_raw`` its MAD standard deviation.

    Returns
    -------
    noise, info
        The :class:`~deepmorph.simulate.BackgroundNoise` and a dict: ``background`` (what was
        used), ``background_sky_sigma_raw`` (its units), ``background_scale`` (the factor).
    """
    from astropy.io.fits.verify import VerifyWarning

    from deepmorph.simulate import BackgroundNoise, read_background

    if path is None:
        path = shared_data_file("ntt_emmi_field/image.fits")
    if path is not None:
        with warnings.catch_warnings():  # the NTT header's non-standard ESO-LOG cards
            warnings.simplefilter("ignore", VerifyWarning)
            raw = read_background(path)
    else:
        from skimage import data as skdata

        grey = skdata.hubble_deep_field().astype(np.float32).mean(axis=2)
        raw = BackgroundNoise(grey, source="skimage.data.hubble_deep_field() (grey, no ../shared/data)")
    sigma = raw.sky_sigma
    if not sigma > 0:
        raise DeepmorphValueError(f"{raw.source}: no measurable sky noise (robust sigma 0); use another background")
    factor = float(sky_sigma) / sigma
    noise = BackgroundNoise(raw.image, source=raw.source, gain_e_per_count=gain_e_per_count, scale=factor)
    return noise, {"background": raw.source, "background_sky_sigma_raw": sigma, "background_scale": factor}


def target_psf(spec: str | None = None) -> tuple[str, str]:
    """The target's PSF spec and where it came from: ``spec``, a real HST PSF, else a Moffat fallback."""
    if spec:
        return spec, "given"
    path = shared_data_file(HST_PSF[0])
    if path is not None:
        return f"{path}:{HST_PSF[1]}@{HST_PSF[2]}", f"real HST ACS PSF (HDU {HST_PSF[1]}, {HST_PSF[2]}\"/px)"
    return FALLBACK_PSF, "fallback Moffat (no ../shared/data)"


def domain_simulators(stamp_size: int = 64, background: str | Path | None = None, psf: str | None = None,
                      survey: str = "candels-f160w"):
    """The source and target :class:`~deepmorph.simulate.Simulator` and a record of the target's make-up."""
    from deepmorph.simulate import Simulator

    priors = source_priors()
    source = Simulator(survey, stamp_size, priors=priors)
    noise, info = target_background(source.default_sky_sigma, background, source.survey.gain_e_per_count)
    spec, origin = target_psf(psf)
    target = Simulator(survey, stamp_size, priors=priors, psf=spec, noise=noise, clumps=True, neighbors=True)
    info.update({"survey": survey, "sky_sigma": source.default_sky_sigma, "psf": spec, "psf_origin": origin,
                 "psf_fwhm_arcsec": target.psf_fwhm_pix * target.pixel_scale,
                 "source_psf_fwhm_arcsec": source.psf_fwhm_pix * source.pixel_scale,
                 "neighbors": True, "clumps": True})
    return source, target, info


def _simulated(path: Path, simulator, n: int, seed: int, progress: bool) -> Path:
    """``path`` simulated with ``(simulator, n, seed)``, or the existing file when it is that one."""
    from deepmorph.data import open_dataset, write_dataset

    if path.is_file():
        with open_dataset(path) as ds:
            found = (len(ds), int(ds.attrs.get("seed", -1)))
        if found != (n, seed):
            raise DeepmorphIOError(f"{path}: exists with {found[0]} stamps of seed {found[1]}, not {n} of seed {seed}; "
                                   "remove it or choose another output folder")
        return path
    return write_dataset(path, simulator, n, seed, progress=progress)


def simulate_domains(out: str | Path, n_source: int, n_target: int, seed: int = 0, stamp_size: int = 64,
                     background: str | Path | None = None, psf: str | None = None,
                     progress: bool = True) -> dict:
    """Simulate ``OUT/source.h5`` (seed ``seed``) and ``OUT/target.h5`` (seed ``seed + 1``).

    A size of 0 skips that set. Returns the paths (``source``, ``target``) and the
    target's make-up (``info``: background and its scale factor, PSF, ...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source, target, info = domain_simulators(stamp_size, background, psf)
    paths = {"info": info}
    if n_source:
        paths["source"] = _simulated(out / "source.h5", source, int(n_source), seed, progress)
    if n_target:
        paths["target"] = _simulated(out / "target.h5", target, int(n_target), seed + 1, progress)
    return paths


def excess_light(path: str | Path, n: int = 500) -> dict:
    """Light in a stamp beyond its galaxy's own, on the first ``n`` stamps of a dataset.

    Per stamp, ``(sum of the pixels - the galaxy's catalogued flux) / that flux``: about zero
    (a little below, for light falling off the stamp) for isolated galaxies on pure noise;
    positive where neighbours, clumps or real sources in the background add light.

    Returns
    -------
    dict
        ``mean`` of that excess and ``fraction_over_10pc``, the fraction of stamps where it exceeds 0.1.
    """
    from deepmorph.data import open_dataset

    with open_dataset(path) as ds:
        k = min(n, len(ds))
        total = np.asarray(ds.images[:k], dtype=np.float64).sum(axis=(1, 2, 3))
        flux = np.asarray(ds.catalog["flux"][:k], dtype=np.float64)
    excess = total / flux - 1.0
    return {"mean": float(np.mean(excess)), "fraction_over_10pc": float(np.mean(excess > 0.1))}


# -- scoring -----------------------------------------------------------------------------------------

def _finished(run: Path) -> dict | None:
    import json

    path = run / "test_metrics.json"
    return json.loads(path.read_text()) if path.is_file() and (run / "model.pt").is_file() else None


def _score(run: Path, data: Path, items, where: Path) -> dict:
    """The morphometry run ``run`` scored on ``items`` of ``data``, written in ``where`` (a copy of the
    run's description and weights, so the source run's own test files stay as they are)."""
    from deepmorph.workflows.morphometry import evaluate_morphometry

    done = _finished(where)
    if done is not None:
        return done
    where.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "config.yaml", "model.pt"):
        shutil.copy2(run / name, where / name)
    return evaluate_morphometry(where, data, items)


def dex_scatter(run: Path, name: str) -> float:
    """NMAD of ``log10(measured / true)`` of a relative parameter (hlr, n) on a run's test predictions, dex.

    Unlike the NMAD of the fractional errors, it does not shrink when every value is underestimated
    by the same factor (a model predicting half of every radius has a fractional scatter half as large).
    """
    from astropy.table import Table

    from deepmorph.workflows.morphometry import nmad

    path = run / "test_predictions.ecsv"
    if not path.is_file():
        return float("nan")
    rows = Table.read(path)
    if name not in rows.colnames:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        return nmad(np.log10(np.asarray(rows[name], float) / np.asarray(rows[f"true_{name}"], float)))


def _row(method: str, strategy: str, fraction: float, labels: int, run: Path | None, metrics: dict | None,
         **extra) -> dict:
    row = {"method": method, "strategy": strategy, "fraction": float(fraction), "labels": int(labels)}
    for name in TABLE_PARAMETERS:
        m = (metrics or {}).get(name) or {}
        for key in ("scatter", "bias", "outlier_fraction"):
            row[f"{name}_{key}"] = float(m.get(key, np.nan))
    for name in DEX_PARAMETERS:
        row[f"{name}_dex_scatter"] = dex_scatter(run, name) if run is not None else float("nan")
    row["n_test"] = int((metrics or {}).get("n_test", 0))
    row.update(extra)
    return row


def _gap_closed(rows: list[dict]) -> None:
    """Add ``<p>_gap_closed``: (un-adapted - row) / (un-adapted - source-domain) scatter, per parameter
    (and per dex scatter, ``<p>_dex_gap_closed``)."""
    ref = {r["method"]: r for r in rows if r["method"] in ("source-domain", "unadapted")}
    stems = list(TABLE_PARAMETERS) + [f"{name}_dex" for name in DEX_PARAMETERS]
    for row in rows:
        for stem in stems:
            lo = ref.get("source-domain", {}).get(f"{stem}_scatter", np.nan)
            hi = ref.get("unadapted", {}).get(f"{stem}_scatter", np.nan)
            gap = hi - lo
            row[f"{stem}_gap_closed"] = float((hi - row[f"{stem}_scatter"]) / gap) if gap > 0 else float("nan")


# -- the experiment ----------------------------------------------------------------------------------

def check_strategies(strategies, n_blocks: int | None = None) -> tuple[str, ...]:
    """The freezing strategies, checked (``head``, ``blocks:K`` with K below the model's blocks, ``none``)."""
    from deepmorph.training.finetune import parse_freeze_mode

    strategies = tuple(str(s).strip() for s in strategies)
    if not strategies:
        raise DeepmorphValueError("no freezing strategy given; choose from head, blocks:K, none")
    for s in strategies:
        kind, k = parse_freeze_mode(s)
        if kind == "blocks" and n_blocks is not None and not 0 < k < n_blocks:
            raise DeepmorphValueError(f"freeze {s!r}: K must be in [1, {n_blocks - 1}] for this {n_blocks}-block CNN")
    return strategies


def label_counts(fractions, n_target: int, train_size: int | None = None) -> list[int]:
    """Labelled target galaxies of each fraction of the ``n_target`` galaxies (checked)."""
    counts = []
    for f in fractions:
        f = float(f)
        if not (math.isfinite(f) and 0 < f < 1):
            raise DeepmorphValueError(f"labelled fraction must be in (0, 1), got {f:g}")
        labels = int(round(f * n_target))
        if labels < MIN_LABELS:
            raise DeepmorphValueError(f"labelled fraction {f:g} of {n_target} target galaxies gives {labels} labels; "
                                      f"at least {MIN_LABELS} are needed (a larger fraction or target set)")
        if train_size is not None and labels > train_size:
            raise DeepmorphValueError(f"labelled fraction {f:g} gives {labels} labels, more than the target's "
                                      f"{train_size} training galaxies")
        counts.append(labels)
    return counts


def _n_blocks(config) -> int | None:
    widths = config.model.kwargs.get("widths") if config.model.name == "cnn" else None
    return len(widths) if widths else None


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def adapt_experiment(out: str | Path, source_run: str | Path | None = None, source_data: str | Path | None = None,
                     target_data: str | Path | None = None, fractions=(0.001, 0.01, 0.1),
                     strategies=("head", "blocks:2", "none"), n_source: int = 8000, n_target: int = 8000,
                     config=None, finetune_lr: float = FINETUNE_LR, steps: int = 150, seed: int = 0,
                     stamp_size: int = 64, background: str | Path | None = None, psf: str | None = None,
                     progress: bool = True):
    """Train on idealised simulations, score on harder ones, fine-tune with few labels; tabulate.

    Parameters
    ----------
    out : path
        Output folder (layout in the module docstring); rerunning resumes.
    source_run : path, optional
        A trained morphometry run to adapt (default: train one on the source set, into ``OUT/source``).
    source_data, target_data : path, optional
        Single-Sersic datasets (``.h5``) of each domain; default: simulated into ``OUT``
        (:func:`simulate_domains`). The source set is not needed when ``source_run`` is given (its
        own data then give the source-domain row).
    fractions : sequence of float
        Labelled fractions of the target set (each must give at least :data:`MIN_LABELS` galaxies).
    strategies : sequence of str
        Freezing strategies of the fine-tuning: ``head``, ``blocks:K``, ``none``.
    n_source, n_target : int
        Sizes of the simulated sets.
    config : RunConfig, optional
        The source run's config (default :func:`adapt_config`); training from scratch starts from it.
    finetune_lr : float
        Initial learning rate of the fine-tuning (cosine decay); from scratch uses the config's.
    steps : int
        Optimiser steps of each few-label run (:func:`label_budget`).
    seed : int
        Seed of the source set and of every split; the target set uses ``seed + 1``.
    stamp_size : int
        Stamp side of the simulated sets, pixels.
    background : path, optional
        FITS sky image for the target (default: the NTT frame, else the Hubble Deep Field).
    psf : str, optional
        The target's PSF spec (default: a real HST PSF, else a Moffat of another width).

    Returns
    -------
    astropy.table.Table
        One row per model (``method`` source-domain, unadapted, finetune or scratch; ``strategy``;
        ``fraction``; ``labels``), with each parameter's ``_scatter``, ``_bias``,
        ``_outlier_fraction`` and ``_gap_closed``; also written to ``OUT/adapt.ecsv``.
    """
    from astropy.table import Table

    from deepmorph.data import open_dataset
    from deepmorph.training import RunConfig
    from deepmorph.workflows.finetune import finetune
    from deepmorph.workflows.morphometry import train_morphometry

    start = time.perf_counter()
    out = Path(out)
    if (background is not None or psf is not None) and target_data is not None:
        raise DeepmorphValueError("background and PSF only apply when the experiment simulates the target set")
    for given in (source_run, source_data, target_data, background):
        if given is not None and not Path(given).exists():
            raise DeepmorphIOError(f"{given}: no such file or directory")
    config = config or adapt_config(**{"model.kwargs.image_size": int(stamp_size)})
    # Sub-runs keep the experiment's run options, whatever config a given source run has.
    keep = {k: getattr(config, k) for k in ("progress_bar", "num_workers", "accelerator")}
    if source_run is not None:
        source_run = Path(source_run)
        read_run(source_run, "morphometry")
        config = RunConfig.from_yaml(source_run / "config.yaml").with_overrides({"finetune": {"weights": None},
                                                                                  **keep})
    strategies = check_strategies(strategies, _n_blocks(config))
    for name, n in (("source", n_source), ("target", n_target)):
        if isinstance(n, bool) or int(n) != n or n < 10:
            raise DeepmorphValueError(f"the number of {name} galaxies must be an integer >= 10, got {n}")
    if target_data is None:
        label_counts(fractions, int(n_target))  # fail before simulating
    record = {"seed": seed, "fractions": [float(f) for f in fractions], "strategies": list(strategies)}

    if target_data is None or (source_data is None and source_run is None):
        _say(progress, f"simulating into {out} ...")
        made = simulate_domains(out, 0 if (source_data or source_run) else n_source,
                                n_target if target_data is None else 0, seed, stamp_size, background, psf, progress)
        record["target_make_up"] = made["info"]
        source_data = source_data or made.get("source")
        target_data = target_data or made.get("target")
    target_data = Path(target_data)
    with open_dataset(target_data) as ds:
        n_target, target_stamp = len(ds), int(ds.images.shape[-1])
    target_split = Split(seed=seed)
    parts = target_split.indices(n_target)
    counts = label_counts(fractions, n_target, len(parts["train"]))

    if source_run is None:
        source_run = out / "source"
        if _finished(source_run) is None:
            _say(progress, f"training the source model on {source_data} ...")
            train_morphometry(source_data, source_run, config, Split(seed=seed))
    meta = read_run(source_run, "morphometry")
    if int(meta["stamp_size"]) != target_stamp:
        raise DeepmorphValueError(f"{source_run}: a model of {meta['stamp_size']} px stamps cannot measure "
                                  f"{target_data}'s")
    source_data = Path(source_data) if source_data is not None else Path(meta["data"])
    record.update({"source_run": str(source_run), "source_data": str(source_data), "target_data": str(target_data),
                   "n_target": n_target})

    rows = []
    if source_data.is_file():
        with open_dataset(source_data) as ds:
            items = Split(int(meta["split_seed"]), tuple(meta["fractions"])).indices(len(ds))["test"]
        score = _score(source_run, source_data, items, out / "score-source")
        rows.append(_row("source-domain", "-", 0.0, 0, out / "score-source", score, epochs=0))
    else:
        rows.append(_row("source-domain", "-", 0.0, 0, None, None, epochs=0))
        record["note"] = f"{source_data} is missing: no source-domain row"
    score = _score(source_run, target_data, parts["test"], out / "score-unadapted")
    rows.append(_row("unadapted", "-", 0.0, 0, out / "score-unadapted", score, epochs=0))
    _say(progress, _describe(rows[-1]))

    fresh_norm = {"kind": "asinh", "scale": "auto", "mean": None, "std": None}
    budgets, labelled = {}, {}
    for fraction, labels in zip(fractions, counts, strict=True):
        batch, epochs = label_budget(labels, steps)
        budget = {"epochs": epochs, "batch_size": batch, "early_stopping.enabled": False,
                  "schedule": {"kind": "cosine", "t_max": None}, **keep}
        budgets[labels] = {"batch_size": batch, "epochs": epochs}
        split = LabelSplit(seed=seed, train_size=labels, val_size=VAL_SIZE)
        labelled[str(labels)] = split.indices(n_target)["train"].tolist()  # file indices, shared by every run
        for strategy in strategies:
            run = out / f"finetune-{strategy.replace(':', '')}-{labels}"
            result = _finished(run)
            if result is None:
                result = finetune("morphometry", source_run, target_data, run, strategy, split,
                                  {**budget, "optimizer.lr": finetune_lr})
            rows.append(_row("finetune", strategy, fraction, labels, run, result, epochs=epochs))
            _say(progress, _describe(rows[-1]))
        run = out / f"scratch-{labels}"
        result = _finished(run)
        if result is None:
            scratch = config.with_overrides({**budget, "normalization": fresh_norm})
            result = train_morphometry(target_data, run, scratch, split, parameters=tuple(meta["parameters"]))
        rows.append(_row("scratch", "-", fraction, labels, run, result, epochs=epochs))
        _say(progress, _describe(rows[-1]))

    _gap_closed(rows)
    table = Table(rows=rows)
    table.meta.update({"scatter": "NMAD of the errors: mag in magnitudes, hlr and n as fractions, q absolute, pa deg",
                       "gap_closed": "(unadapted - row) / (unadapted - source-domain) scatter"})
    out.mkdir(parents=True, exist_ok=True)
    save_table(table, out / "adapt.ecsv")
    record.update({"budgets": budgets, "finetune_lr": finetune_lr, "scratch_lr": config.optimizer.lr,
                   "val_size": VAL_SIZE, "steps": steps, "source_model": config.to_dict()["model"],
                   "excess_light": {k: excess_light(p) for k, p in (("source", source_data), ("target", target_data))
                                    if Path(p).is_file()},
                   "rows": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
                            for r in rows], "labelled_items": labelled,
                   "seconds_this_call": time.perf_counter() - start})
    write_json(out / "adapt.json", record)
    save_figure(adapt_figure(table), out / "adapt.png")
    if source_data.is_file():
        save_figure(example_figure(source_data, target_data, _sky(record, meta)), out / "adapt_examples.png")
    return table


def _sky(record: dict, meta: dict) -> float:
    """The survey's sky sigma (counts): from the target's make-up, else the source run's survey."""
    if "target_make_up" in record:
        return float(record["target_make_up"]["sky_sigma"])
    from deepmorph.data import Normalization

    scale = Normalization.from_dict(meta["normalization"]).scale
    return float(scale[0]) if isinstance(scale, tuple) else 1.0


def _describe(row: dict) -> str:
    what = row["method"] + (f" {row['strategy']}" if row["strategy"] != "-" else "")
    labels = f", {row['labels']} labels" if row["labels"] else ""
    return (f"  {what}{labels}: scatter mag {row['mag_scatter']:.3f}, hlr {row['hlr_scatter']:.3f}, "
            f"n {row['n_scatter']:.3f}, q {row['q_scatter']:.3f}")


# -- figures -----------------------------------------------------------------------------------------

def strategy_name(strategy: str) -> str:
    """What a freezing strategy trains, in words: ``head`` -> "head only", ``blocks:2`` -> "all but 2 blocks"."""
    from deepmorph.training.finetune import parse_freeze_mode

    kind, k = parse_freeze_mode(strategy)
    return {"head": "head only", "none": "all layers"}.get(kind, f"all but the first {k} blocks")


def adapt_figure(table, parameters=("mag", "hlr_dex", "n_dex")):
    """Scatter of each parameter vs labelled fraction: one line per strategy and from scratch, the
    un-adapted and the source-domain levels as horizontal lines.

    ``parameters`` name the table's ``<name>_scatter`` columns: by default the magnitude's (mag) and
    the dex scatters of the half-light radius and the Sersic index (bias-free, :func:`dex_scatter`).
    """
    from deepmorph.report.figures import new_figure

    fig = new_figure((4.2 * len(parameters), 3.8))
    methods = [str(m) for m in table["method"]]
    strategy = [str(s) for s in table["strategy"]]
    units = {"mag": "mag scatter (NMAD) [mag]", "hlr": "hlr scatter (NMAD) [fraction]",
             "n": "n scatter (NMAD) [fraction]", "q": "q scatter (NMAD)", "pa": "pa scatter (NMAD) [deg]",
             "hlr_dex": "hlr scatter (NMAD of log10 ratio) [dex]", "n_dex": "n scatter (NMAD of log10 ratio) [dex]"}
    lines = [(f"fine-tune: {strategy_name(s)}", [m == "finetune" and t == s for m, t in zip(methods, strategy,
                                                                                              strict=True)])
             for s in dict.fromkeys(t for m, t in zip(methods, strategy, strict=True) if m == "finetune")]
    lines.append(("from scratch", [m == "scratch" for m in methods]))
    fractions = sorted({float(f) for f, m in zip(table["fraction"], methods, strict=True) if m == "finetune"})
    labels = {float(f): int(n) for f, n in zip(table["fraction"], table["labels"], strict=True)}
    for k, name in enumerate(parameters):
        ax = fig.add_subplot(1, len(parameters), k + 1)
        for text, sel in lines:
            sel = np.asarray(sel)
            order = np.argsort(np.asarray(table["fraction"])[sel])
            ax.plot(np.asarray(table["fraction"])[sel][order], np.asarray(table[f"{name}_scatter"])[sel][order],
                    "o-", label=text)
        for method, style, text in (("unadapted", "--", "un-adapted"), ("source-domain", ":", "source domain")):
            level = [float(v) for v, m in zip(table[f"{name}_scatter"], methods, strict=True) if m == method]
            if level and np.isfinite(level[0]):
                ax.axhline(level[0], color="k", ls=style, label=text)
        ax.set_xscale("log")
        if fractions:
            ax.set_xticks(fractions)
            ax.set_xticklabels([f"{100 * f:g}%\n({labels[f]})" for f in fractions])
            ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("labelled fraction of the target set (labels)")
        ax.set_ylabel(units.get(name, f"{name} scatter"))
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(frameon=False, fontsize=7, loc="upper right")
    fig.suptitle("Morphometry, idealised -> harder simulations: target test scatter")
    fig.tight_layout()
    return fig


def example_figure(source_data: str | Path, target_data: str | Path, sky_sigma: float, n: int = 6):
    """The first ``n`` stamps of each set, source above target, one arcsinh stretch for all."""
    from deepmorph.data import open_dataset
    from deepmorph.report.figures import asinh_stretch, new_figure

    stamps = []
    for path in (source_data, target_data):
        with open_dataset(path) as ds:
            stamps.append(np.asarray(ds.images[: min(n, len(ds)), 0], dtype=np.float64))
    n = min(len(s) for s in stamps)
    peak = float(np.percentile(np.concatenate([s[:n].ravel() for s in stamps]), 99.5))
    fig = new_figure((1.6 * n, 3.6))
    for r, (images, text) in enumerate(zip(stamps, ("source (idealised)", "target (harder)"), strict=True)):
        for c in range(n):
            ax = fig.add_subplot(2, n, r * n + c + 1)
            ax.imshow(asinh_stretch(images[c], sky_sigma, peak), origin="lower", cmap="gray", vmin=-0.05, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(text, fontsize=8)
    fig.tight_layout()
    return fig
