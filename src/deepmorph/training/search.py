"""Hyper-parameter search with Optuna: over any field of a run config, coarse to fine, in parallel.

A search space is one YAML file whose keys are dotted :class:`~deepmorph.training.RunConfig`
paths (those of ``--set``) and whose values are ranges or choices::

    # space.yaml
    optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # a float, sampled uniformly in log
    model.kwargs.widths: {choices: [[8, 16], [16, 32], [16, 32, 64]]}
    model.kwargs.kernel_size: {choices: [3, 5]}
    model.kwargs.blocks_per_stage: {low: 1, high: 3, step: 1}  # an int: the config field is one
    model.kwargs.dropout: {low: 0.0, high: 0.5}
    model.kwargs.noise_sigma: {low: 0.0, high: 0.1}
    batch_size: {choices: [16, 32, 64]}
    schedule.kind: {choices: [none, cosine, exponential]}
    augmentation: {choices: [null, flips, rotate]}             # null: no augmentation
    coarse: {trials: 20, epochs: 3}                # the broad search: many short runs
    fine: {trials: 10, epochs: 10, shrink: 0.5}    # then a narrow, longer one around the best

A range is an int or a float as the config field is (``{low: 1, high: 4}`` is an int for
``blocks_per_stage`` and a float for ``dropout``); ``log`` samples it uniformly in log, ``step``
on a grid. The ``fine`` stage (optional) searches ranges ``shrink`` times as wide, centred on the
best coarse trial (clipped to the coarse range), and the choices seen in the best quarter of the
coarse trials; its first trial is the best coarse one, trained for the longer epochs. The
coarse stage's first trial is the default config (the base config) when its values lie in the
space, so the search starts from the baseline.

Each stage is one Optuna study (``NAME.coarse``, ``NAME.fine``) in one storage, sampled by TPE
(seeded; the constant-liar strategy for parallel workers) and pruned through Lightning
(:class:`PruningCallback`: the median or successive-halving rule on the validation metric,
epoch by epoch). The study is created with exactly N queued trials ("tickets"); workers pop
them until none is left, so several workers, processes or machines, finish exactly N trials
without duplicating or losing any. Storages:

- ``journal:PATH``: Optuna's journal file (:class:`optuna.storages.journal.JournalFileBackend`);
  its lock works across processes and, on a shared disk, machines. The default is
  ``OUT/study.journal``. Never SQLite across processes.
- ``postgresql://USER:PASSWORD@HOST:PORT/DB``, ``mysql+pymysql://...``: an RDB storage with
  Optuna's heartbeat.

A trial that raises is retried (up to ``max_retry`` times) with the same parameters, under a
new trial number; a trial that raises a :class:`~deepmorph.errors.DeepmorphError` (an invalid
combination, e.g. more stages than the stamp allows) fails once and for all. A worker that dies
(killed, out of memory, a machine lost) stops beating: its trial goes stale after ``grace``
seconds without a heartbeat, another worker marks it failed and queues the retry. RDB storages
keep Optuna's own heartbeat; on journal storage the heartbeat is a trial attribute rewritten every
``heartbeat`` seconds (wall clocks of several machines must agree to within the grace period). A
search stopped by its ``timeout`` or killed resumes when the same command is rerun: the queued
trials remain, stale ones are retried.

Each trial is a run directory ``OUT/trials/STAGE-NNNN`` (config, history, model). :func:`search`
writes ``OUT/trials.ecsv`` (every trial: stage, number, state, value, parameters, epochs,
seconds), ``OUT/best_config.yaml`` (a run config for ``deepmorph train ... --config``),
``OUT/optimization_history.png`` and ``OUT/param_importances.png`` (fANOVA, once two trials
have completed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import subprocess
import threading
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml

from deepmorph.errors import DeepmorphError, DeepmorphIOError, DeepmorphValueError
from deepmorph.training.config import RunConfig

logger = logging.getLogger(__name__)

#: Sections of a space file that are not config fields.
STAGE_KEYS = ("coarse", "fine")
#: The pruning rules of ``--pruner``.
PRUNERS = ("median", "halving", "none")
#: A config field that is unset, or a value outside the space.
MISSING = object()
#: Trial attribute of the journal-storage heartbeat (seconds since the epoch).
HEARTBEAT_ATTR = "deepmorph:heartbeat"

#: An objective: ``objective(config, run_dir, callbacks) -> value``; it trains with ``callbacks``
#: (the pruning callback) passed to :func:`deepmorph.training.fit` and returns the trial's score.
Objective = Callable[[RunConfig, Path, list], float]


# -- the search space ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One searched config field: a ``float`` or ``int`` range, or ``choices``."""

    key: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @property
    def labels(self) -> tuple:
        """The choices as Optuna stores them: scalars as they are, lists and mappings as JSON text."""
        return tuple(c if c is None or isinstance(c, bool | int | float | str) else json.dumps(c)
                     for c in self.choices)

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.labels)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial):
        """Draw this parameter for an Optuna trial (its Optuna value)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.labels)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value(self, stored):
        """The config value of an Optuna parameter value."""
        if self.kind == "categorical":
            return _plain(self.choices[self.labels.index(stored)])
        return int(stored) if self.kind == "int" else float(stored)

    def label(self, value):
        """The Optuna parameter value of a config value, or :data:`MISSING` when it is not in the space."""
        if self.kind == "categorical":
            labels = self.labels
            for choice, label in zip(self.choices, labels, strict=True):
                if _plain(choice) == _plain(value):
                    return label
            return MISSING
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            return MISSING
        if self.step is not None and abs((value - self.low) / self.step - round((value - self.low) / self.step)) > 1e-9:
            return MISSING
        return int(value) if self.kind == "int" else float(value)

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"choices": [_plain(c) for c in self.choices]}
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Stage:
    """One stage of the search: ``trials`` trials of ``epochs`` epochs (None: the config's)."""

    name: str
    trials: int
    epochs: int | None = None
    shrink: float = 0.5


@dataclass(frozen=True)
class SearchSpace:
    """Searched config fields and the coarse and (optional) fine stages; see the module docstring."""

    params: tuple[Param, ...]
    coarse: Stage = Stage("coarse", 20)
    fine: Stage | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, base: RunConfig | None = None) -> SearchSpace:
        """Read and check a space file (errors name the file and the key)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise DeepmorphIOError(f"{path}: cannot read the search space ({error.strerror or error})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DeepmorphValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        return cls.from_dict(data, base, where=str(path))

    @classmethod
    def from_dict(cls, data: Mapping | None, base: RunConfig | None = None, where: str = "search space"
                  ) -> SearchSpace:
        """Build from a mapping as in a space file; every range is checked against ``base``'s fields."""
        base = base or RunConfig()
        if not isinstance(data, Mapping) or not data:
            raise DeepmorphValueError(f"{where}: expected a mapping of config fields to ranges, got {data!r}")
        params = []
        for key, spec in data.items():
            if key in STAGE_KEYS:
                continue
            try:
                params.append(_parse_param(str(key), spec, base, data))
            except DeepmorphValueError as error:
                raise DeepmorphValueError(f"{where}: {key}: {error}") from None
        if not params:
            raise DeepmorphValueError(f"{where}: no config field to search")
        coarse = _parse_stage("coarse", data.get("coarse"), where, default_trials=20)
        fine = _parse_stage("fine", data["fine"], where, default_trials=10) if data.get("fine") is not None else None
        if "epochs" in [p.key for p in params] and (coarse.epochs or (fine and fine.epochs)):
            raise DeepmorphValueError(f"{where}: epochs is searched and set by a stage; choose one")
        return cls(tuple(params), coarse, fine)

    def to_dict(self) -> dict:
        """The mapping :meth:`from_dict` reads."""
        out = {p.key: p.to_dict() for p in self.params}
        for stage in (self.coarse, self.fine):
            if stage is not None:
                out[stage.name] = {"trials": stage.trials, "epochs": stage.epochs} | (
                    {"shrink": stage.shrink} if stage.name == "fine" else {})
        return out

    def suggest(self, trial) -> dict:
        """Config overrides ``{dotted key: value}`` drawn for an Optuna trial."""
        return {p.key: p.value(p.suggest(trial)) for p in self.params}

    def labels_of(self, config: RunConfig) -> dict | None:
        """The Optuna parameters that give ``config``'s values, or None if one lies outside the space."""
        out = {}
        for p in self.params:
            label = p.label(config_value(config, p.key))
            if label is MISSING:
                return None
            out[p.key] = label
        return out

    def narrow(self, best: Mapping, top: Sequence[Mapping], shrink: float) -> SearchSpace:
        """The fine stage's space: ranges ``shrink`` times as wide around ``best`` (Optuna parameters),
        and the choices seen in the ``top`` trials' parameters (best first)."""
        params = []
        for p in self.params:
            if p.kind == "categorical":
                seen = {_key(t[p.key]) for t in top if p.key in t} | {_key(best[p.key])}
                params.append(dataclasses.replace(p, choices=tuple(
                    c for c, label in zip(p.choices, p.labels, strict=True) if _key(label) in seen)))
                continue
            to = (lambda v: math.log10(v)) if p.log else (lambda v: v)
            back = (lambda v: 10.0 ** v) if p.log else (lambda v: v)
            centre, width = to(best[p.key]), shrink * (to(p.high) - to(p.low))
            low, high = max(p.low, back(centre - width / 2)), min(p.high, back(centre + width / 2))
            if p.step is not None or p.kind == "int":  # stay on the coarse grid, keeping the best on it
                step = p.step or 1
                low = p.low + step * math.ceil((low - p.low) / step - 1e-9)
                high = p.low + step * math.floor((high - p.low) / step + 1e-9)
            if p.kind == "int":
                low, high = int(round(low)), int(round(high))
            low, high = min(low, best[p.key]), max(high, best[p.key])
            params.append(dataclasses.replace(p, low=low, high=high))
        return dataclasses.replace(self, params=tuple(params))


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_value(config: RunConfig, key: str):
    """The value of the dotted field ``key`` in ``config``; a model argument the config does not set
    has its default (that of the model's signature); :data:`MISSING` where there is none."""
    from deepmorph.models.registry import _REGISTRY

    node = config.to_dict()
    parts = key.split(".")
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            if parts[:2] == ["model", "kwargs"] and len(parts) == 3 and config.model.name in _REGISTRY:
                param = inspect.signature(_REGISTRY[config.model.name]).parameters.get(parts[2])
                return MISSING if param is None or param.default is inspect.Parameter.empty else _plain(param.default)
            return MISSING
        node = node[part]
    return node


def _parse_stage(name: str, spec, where: str, default_trials: int) -> Stage:
    spec = {} if spec is None else spec
    allowed = ("trials", "epochs", "shrink") if name == "fine" else ("trials", "epochs")
    if not isinstance(spec, Mapping) or any(k not in allowed for k in spec):
        raise DeepmorphValueError(f"{where}: {name}: expected a mapping with keys {', '.join(allowed)}, got {spec!r}")
    trials, epochs, shrink = spec.get("trials", default_trials), spec.get("epochs"), spec.get("shrink", 0.5)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < (0 if name == "fine" else 1):
        raise DeepmorphValueError(f"{where}: {name}: trials must be an integer >= {0 if name == 'fine' else 1}, "
                                  f"got {trials!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise DeepmorphValueError(f"{where}: {name}: epochs must be a positive integer, got {epochs!r}")
    if isinstance(shrink, bool) or not isinstance(shrink, int | float) or not 0 < shrink <= 1:
        raise DeepmorphValueError(f"{where}: {name}: shrink must be in (0, 1], got {shrink!r}")
    return Stage(name, trials, epochs, float(shrink))


def _field_default(key: str, base: RunConfig, data: Mapping):
    """The default value of the config field ``key`` (its type decides int vs float), or an error
    when no such field exists. ``model.kwargs.X`` must be an argument of the model(s) searched."""
    from deepmorph.models.registry import _REGISTRY, list_models

    parts = key.split(".")
    if parts[:2] == ["model", "kwargs"] and len(parts) == 3:
        names = {base.model.name}
        if isinstance(data.get("model.name"), Mapping):
            names |= {c for c in data["model.name"].get("choices", ()) if isinstance(c, str)}
        default, found = None, False
        for name in sorted(names):
            if name not in _REGISTRY:
                raise DeepmorphValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
            signature = inspect.signature(_REGISTRY[name])
            if parts[2] not in signature.parameters:
                known = [p for p in signature.parameters if p not in ("in_channels", "num_outputs")]
                raise DeepmorphValueError(f"model {name!r} has no argument {parts[2]!r}; it takes {', '.join(known)}")
            param = signature.parameters[parts[2]]
            if param.default is not inspect.Parameter.empty:
                default = param.default
            found = True
        return default if found else None
    node: Any = base
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise DeepmorphValueError(f"not a config field (see deepmorph.training.RunConfig); {'.'.join(parts[:i])} "
                                      "has no sub-fields")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise DeepmorphValueError(f"not a config field; {'.'.join(parts[:i]) or 'the run config'} has "
                                      f"{', '.join(names)}")
        hint = typing.get_type_hints(type(node))[part]
        node = getattr(node, part)
    if isinstance(node, dict) or dataclasses.is_dataclass(node):
        raise DeepmorphValueError("is a section; search its fields (e.g. optimizer.lr, model.kwargs.dropout)")
    return 0.0 if hint is float else (0 if hint is int else node)


def _parse_param(key: str, spec, base: RunConfig, data: Mapping) -> Param:
    default = _field_default(key, base, data)
    if not isinstance(spec, Mapping):
        raise DeepmorphValueError(f"expected {{low: .., high: ..}} or {{choices: [...]}}, got {spec!r}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise DeepmorphValueError("choices take no other keys")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise DeepmorphValueError(f"choices must be a non-empty list, got {choices!r}")
        if len({_key(c) for c in choices}) != len(choices):
            raise DeepmorphValueError(f"repeated choices in {choices!r}")
        param = Param(key, "categorical", choices=tuple(_plain(c) for c in choices))
        tests = list(param.choices)
    else:
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or "low" not in spec or "high" not in spec:
            raise DeepmorphValueError(f"a range needs low and high (and optionally log, step), got {dict(spec)!r}")
        low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
        for name, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise DeepmorphValueError(f"{name} must be a number, got {v!r}")
        if not isinstance(log, bool):
            raise DeepmorphValueError(f"log must be true or false, got {log!r}")
        integral = all(isinstance(v, int) for v in (low, high, step) if v is not None)
        if isinstance(default, bool) or (default is not None and not isinstance(default, int | float)):
            raise DeepmorphValueError(f"a range for a field that is not a number (default {default!r}); use choices")
        kind = "int" if (isinstance(default, int) if default is not None else integral) else "float"
        if kind == "int" and not integral:
            raise DeepmorphValueError(f"an integer field needs integer low, high and step, got {dict(spec)!r}")
        if not low < high:
            raise DeepmorphValueError(f"need low < high, got low={low}, high={high}")
        if log and low <= 0:
            raise DeepmorphValueError(f"a log range needs low > 0, got {low}")
        if step is not None and (log or not 0 < step <= high - low):
            raise DeepmorphValueError(f"step must be in (0, high - low] and without log, got {step}")
        param = Param(key, kind, float(low) if kind == "float" else int(low),
                      float(high) if kind == "float" else int(high), log,
                      None if step is None else (float(step) if kind == "float" else int(step)))
        tests = [param.low, param.high]
    for value in tests:  # the config takes every end of the range and every choice
        try:
            base.with_overrides({key: value})
        except DeepmorphValueError as error:
            raise DeepmorphValueError(f"{value!r} is not a valid value ({error})") from None
    return param


# -- pruning through Lightning -----------------------------------------------------------------------

class PruningCallback(L.Callback):
    """Report the monitored metric to an Optuna trial after each epoch and stop a trial it prunes.

    Like :class:`~deepmorph.training.EarlyStopping`, it acts at the end of the training epoch,
    after validation. When the pruner says so, it stops training (the run directory keeps the
    epochs run) and sets :attr:`pruned`; the search then records the trial as pruned.

    Parameters
    ----------
    trial : optuna.Trial
        The running trial.
    monitor : str
        A logged metric, e.g. ``val_loss`` or ``val_acc``.
    """

    def __init__(self, trial, monitor: str = "val_loss"):
        self.trial, self.monitor = trial, monitor
        self.pruned = False
        self.epochs = 0
        self.values: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise DeepmorphValueError(f"the search monitors {self.monitor!r}, which is not logged; logged metrics: "
                                      f"{', '.join(sorted(trainer.callback_metrics)) or 'none'}")
        value = float(trainer.callback_metrics[self.monitor])
        self.values.append(value)
        self.epochs = trainer.current_epoch + 1
        self.trial.report(value, trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


# -- storage -----------------------------------------------------------------------------------------

def _redact(url: str) -> str:
    """The URL without its password."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail:
        credentials, _, host = tail.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{head}://{user}:***@{host}" if ":" in credentials else url
    return url


def open_storage(url: str, heartbeat: int = 10, grace: int = 60, max_retry: int = 2):
    """An Optuna storage from ``journal:PATH`` or an RDB URL (``postgresql://...``, ``mysql://...``).

    RDB storages get Optuna's heartbeat (every ``heartbeat`` seconds; a trial silent for
    ``grace`` seconds fails and is retried up to ``max_retry`` times).

    Raises
    ------
    DeepmorphValueError
        For SQLite and unknown schemes.
    DeepmorphIOError
        When the journal file cannot be written or the database cannot be reached.
    """
    import optuna

    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "journal":
        path = Path(url.split(":", 1)[1]).expanduser()
        if not url.split(":", 1)[1]:
            raise DeepmorphValueError("--storage journal:PATH needs a file path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except OSError as error:
            raise DeepmorphIOError(f"{path}: cannot open the journal storage ({error.strerror or error})") from None
        return optuna.storages.JournalStorage(backend)
    if scheme == "sqlite":
        raise DeepmorphValueError(f"{url}: SQLite is not safe with several processes; use journal:FILE, "
                                  "postgresql:// or mysql://")
    if scheme not in ("postgresql", "postgres", "mysql"):
        raise DeepmorphValueError(f"{_redact(url)}: unknown storage; use journal:FILE, postgresql://USER@HOST/DB or "
                                  "mysql+pymysql://USER@HOST/DB")
    from optuna.exceptions import ExperimentalWarning

    url = _with_driver(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True},
                heartbeat_interval=heartbeat, grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry))
        except ImportError as error:
            raise DeepmorphValueError(f"{_redact(url)}: the database driver is not installed ({error})") from None
        except Exception as error:  # sqlalchemy's OperationalError, ArgumentError...
            reason = " ".join(str(getattr(error, "orig", None) or error).split())[:300]
            raise DeepmorphIOError(f"{_redact(url)}: cannot open the study storage ({reason})") from None


def _with_driver(url: str) -> str:
    """``postgresql://`` and ``mysql://`` with an installed driver (SQLAlchemy's default may be missing)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    drivers = {"postgresql": ("psycopg", "psycopg2"), "postgres": ("psycopg", "psycopg2"),
               "mysql": ("MySQLdb", "pymysql", "mysql.connector")}
    names = {"MySQLdb": "mysqldb", "mysql.connector": "mysqlconnector"}
    if scheme.lower() not in drivers:
        return url  # a driver is named (postgresql+psycopg2://...) or another scheme
    found = next((d for d in drivers[scheme.lower()] if importlib.util.find_spec(d.split(".")[0])), None)
    base = "postgresql" if scheme.lower().startswith("postgres") else "mysql"
    return f"{base}+{names.get(found, found)}{sep}{rest}" if found else f"{base}{sep}{rest}"


class _Heartbeat:
    """Who is still working: Optuna's heartbeat on RDB storages, a trial attribute on journal storage."""

    def __init__(self, storage, interval: float, grace: float, max_retry: int):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage, self.interval, self.grace, self.max_retry = storage, interval, grace, max_retry
        self.native = is_heartbeat_enabled(storage)

    def beat(self, trial_id: int) -> None:
        if self.native:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    @contextlib.contextmanager
    def running(self, trial_id: int) -> Iterator[None]:
        """Beat every ``interval`` seconds, in a thread, while the trial runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval):
                with contextlib.suppress(Exception):  # a finished trial, a storage hiccup: the next beat retries
                    self.beat(trial_id)

        self.beat(trial_id)
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale(self, study) -> int:
        """Fail the running trials of dead workers and queue their retries; returns how many."""
        import optuna
        from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
        from optuna.trial import TrialState

        if self.native:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
                optuna.storages.fail_stale_trials(study)
                return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
        now, failed = time.time(), 0
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            last = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last <= self.grace:
                continue
            try:  # the journal refuses the second of two workers failing the same trial
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue
            logger.warning("trial %d of %s: no heartbeat for %.0f s, failed and queued again", trial.number,
                           study.study_name, now - last)
            self.retry(study, self.storage.get_trial(trial._trial_id))
            failed += 1
        return failed

    def retry(self, study, frozen) -> None:
        import optuna
        from optuna.exceptions import ExperimentalWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(self.max_retry)(study, frozen)


# -- one stage: a study with N tickets, and its workers --------------------------------------------

@dataclass(frozen=True)
class StageRun:
    """One stage of a search, as every worker process runs it (picklable; see :func:`search` for
    the meaning of the options). ``threads``: torch threads per worker; ``poll``: seconds between
    looks at the storage while waiting for other workers' trials."""

    stage: Stage
    study: str
    storage: str
    space: SearchSpace
    base: RunConfig
    objective: Any
    out: Path
    monitor: str = "val_loss"
    direction: str = "minimize"
    seed: int = 0
    pruner: str = "median"
    max_retry: int = 2
    heartbeat: int = 10
    grace: int = 60
    deadline: float | None = None
    threads: int | None = None
    poll: float = 1.0


def _pruner(name: str, trials: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 4)), n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _sampler(seed: int, worker: int, trials: int):
    import optuna
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed + worker, n_startup_trials=max(3, min(10, trials // 3)),
                                          constant_liar=True)


def _load_study(run: StageRun, storage, worker: int = 0):
    import optuna

    return optuna.load_study(study_name=run.study, storage=storage, sampler=_sampler(run.seed, worker,
                             run.stage.trials), pruner=_pruner(run.pruner, run.stage.trials))


def prepare_study(run: StageRun, first: Sequence[Mapping] = (), wait: float = 120.0):
    """Create the stage's study with ``run.stage.trials`` queued trials (the first ones with
    ``first``'s fixed parameters), or load it if another process did; returns the study."""
    import optuna

    storage = open_storage(run.storage, run.heartbeat, run.grace, run.max_retry)
    record = {"trials": run.stage.trials, "space": run.space.to_dict(), "direction": run.direction,
              "monitor": run.monitor}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=run.study, storage=storage, direction=run.direction)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    if not created:
        study = _load_study(run, storage)
        start = time.monotonic()
        while "deepmorph" not in study.user_attrs:  # its creator is still queueing the trials
            if time.monotonic() - start > wait:
                raise DeepmorphIOError(f"study {run.study}: exists without its queued trials (its creator died?); "
                                       "delete it or choose another --study") from None
            time.sleep(0.5)
        recorded = study.user_attrs["deepmorph"]
        if recorded["trials"] != run.stage.trials or recorded["monitor"] != run.monitor:
            raise DeepmorphValueError(
                f"study {run.study} was created for {recorded['trials']} trials on {recorded['monitor']}, not "
                f"{run.stage.trials} on {run.monitor}; rerun with the same settings or choose another --study")
        if _key(recorded["space"]) != _key(_plain(record["space"])):
            raise DeepmorphValueError(f"study {run.study} was created with another search space; rerun with the same "
                                      "space file or choose another --study")
        return study
    for k in range(run.stage.trials):
        study.enqueue_trial(dict(first[k]) if k < len(first) else {}, user_attrs={"stage": run.stage.name})
    study.set_user_attr("deepmorph", record)  # last: tells the other processes the queue is complete
    return _load_study(run, storage)


def _pop(study):
    """A queued trial, now ours (RUNNING), or None when the queue is empty."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)  # what Study.ask does with a queued trial
        except UpdateFinishedTrialError:
            continue
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:500]


def _run_trial(run: StageRun, study, trial, heartbeat: _Heartbeat) -> None:
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    name = f"{run.stage.name}-{trial.number:04d}"
    run_dir = run.out / "trials" / name
    start = time.perf_counter()
    trial.set_user_attr("run", f"trials/{name}")
    trial.set_user_attr("stage", run.stage.name)
    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    pruning = PruningCallback(trial, run.monitor)
    state, value, retry = TrialState.FAIL, None, False
    try:
        with heartbeat.running(trial._trial_id):
            overrides = run.space.suggest(trial)
            config = run.base.with_overrides({**overrides, "progress_bar": False}
                                             | ({"epochs": run.stage.epochs} if run.stage.epochs else {}))
            shutil.rmtree(run_dir, ignore_errors=True)  # a leftover of a trial that died before
            value = float(run.objective(config, run_dir, [pruning]))
        if pruning.pruned:
            state = TrialState.PRUNED
        elif math.isfinite(value):
            state = TrialState.COMPLETE
        else:
            trial.set_user_attr("error", f"the objective is {value}")
    except optuna.TrialPruned:  # an objective may prune by itself
        state = TrialState.PRUNED
    except DeepmorphError as error:  # an invalid combination: it would fail again
        trial.set_user_attr("error", _one_line(error))
        logger.warning("trial %s failed: %s", name, _one_line(error))
    except (Exception, KeyboardInterrupt) as error:
        trial.set_user_attr("error", _one_line(error))
        logger.warning("trial %s failed (to be retried): %s", name, _one_line(error))
        retry = True
        if isinstance(error, KeyboardInterrupt):
            _finish(study, trial, TrialState.FAIL, None, pruning, start, heartbeat, retry)
            raise
    try:
        _finish(study, trial, state, value, pruning, start, heartbeat, retry)
    except UpdateFinishedTrialError:  # failed as stale meanwhile (a long pause): its retry runs again
        logger.warning("trial %s was failed as stale by another worker; its retry stands", name)


def _finish(study, trial, state, value, pruning, start, heartbeat, retry) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("epochs", pruning.epochs)
    trial.set_user_attr("seconds", time.perf_counter() - start)
    frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    if retry:
        heartbeat.retry(study, frozen)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within this block, Lightning logs only warnings (not its per-fit banner of devices and tips)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_worker(run: StageRun, worker: int = 0, on_trial: Callable[[], None] | None = None) -> int:
    """Pop and run queued trials of the stage until none is queued or running (or the deadline);
    returns the number of trials this worker ran. While others' trials run, it waits, failing
    (and queueing again) those whose heartbeat stopped."""
    import optuna
    import torch
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(run.storage, run.heartbeat, run.grace, run.max_retry)
    study = _load_study(run, storage, worker)
    heartbeat = _Heartbeat(storage, run.heartbeat, run.grace, run.max_retry)
    threads = torch.get_num_threads()
    torch.set_num_threads(run.threads or threads)
    ran = 0
    try:
        while run.deadline is None or time.time() < run.deadline:
            heartbeat.fail_stale(study)
            trial = _pop(study)
            if trial is None:
                if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                    break
                time.sleep(run.poll)  # others' trials may fail and come back to the queue
                continue
            with quiet_lightning():
                _run_trial(run, study, trial, heartbeat)
            ran += 1
            if on_trial is not None:
                on_trial()
    finally:
        torch.set_num_threads(threads)
    return ran


#: A worker process: reads the parent's ``sys.path``, then the pickled stage, from stdin. A fresh
#: interpreter (not multiprocessing's spawn) does not re-run the parent's main script.
_WORKER_CODE = ("import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
                "from deepmorph.training.search import _worker_main; _worker_main()")


def _worker_main() -> None:
    import pickle
    import sys

    run, worker = pickle.load(sys.stdin.buffer)
    run_worker(run, worker)


def start_worker(run: StageRun, worker: int) -> subprocess.Popen:
    """Start :func:`run_worker` as worker number ``worker`` in a new Python process (the objective
    must be importable there: defined in a module, not in a script's ``__main__``)."""
    import pickle
    import sys

    process = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE)
    process.stdin.write(pickle.dumps([p for p in sys.path if p]) + pickle.dumps((run, worker)))
    process.stdin.close()
    return process


def run_stage(run: StageRun, workers: int = 1, first: Sequence[Mapping] = (), progress: bool = True):
    """Prepare the stage's study and run ``workers`` local workers on it: this process and
    ``workers - 1`` others (:func:`start_worker`), sharing the CPU cores. Returns the study once
    no trial is queued or running (or the deadline passed)."""
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    study = prepare_study(run, first)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    bar = tqdm(total=run.stage.trials, desc=f"{run.stage.name} search", unit="trial", disable=not progress,
               initial=len(study.get_trials(deepcopy=False, states=finished)))

    def update() -> None:
        bar.n = len(study.get_trials(deepcopy=False, states=finished))
        bar.refresh()

    if workers > 1:
        run = dataclasses.replace(run, threads=run.threads or max(1, len(os.sched_getaffinity(0)) // workers))
    processes = [start_worker(run, k) for k in range(1, workers)]
    try:
        run_worker(run, 0, on_trial=update)
        while any(p.poll() is None for p in processes):  # their last trials
            time.sleep(run.poll)
            update()
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
                p.wait()
        bar.close()
    bad = [p.returncode for p in processes if p.returncode]
    if bad:
        logger.warning("%d worker process(es) exited with status %s (a trial they left running is failed after "
                       "the grace period and run again)", len(bad), bad)
    return study


# -- the whole search --------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """What :func:`search` found: the studies, the best trial of the last stage and its config."""

    studies: dict
    best_stage: str
    best_number: int | None
    best_value: float | None
    best_params: dict
    best_config: RunConfig | None
    best_run: Path | None
    default_config: RunConfig
    table: Any
    complete: bool
    seconds: float

    def summary(self) -> dict:
        return {"best": {"stage": self.best_stage, "trial": self.best_number, "value": self.best_value,
                         "params": self.best_params, "run": None if self.best_run is None else str(self.best_run)},
                "complete": self.complete, "seconds": self.seconds,
                "trials": {name: _state_counts(s) for name, s in self.studies.items()}}


def _state_counts(study) -> dict:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def search(
    objective: Objective,
    space: SearchSpace,
    base: RunConfig,
    out: str | Path,
    *,
    trials: int | None = None,
    fine_trials: int | None = None,
    storage: str | None = None,
    study: str = "deepmorph-tune",
    workers: int = 1,
    timeout: float | None = None,
    seed: int = 0,
    pruner: str = "median",
    max_retry: int = 2,
    heartbeat: int = 10,
    grace: int = 60,
    progress: bool = True,
) -> SearchResult:
    """Run the coarse (and fine) search of ``space`` around ``base`` and write the results to ``out``.

    Parameters
    ----------
    objective : callable
        ``objective(config, run_dir, callbacks) -> value``: train ``config`` into ``run_dir`` with
        ``callbacks`` (the :class:`PruningCallback`) given to :func:`~deepmorph.training.fit` and
        return the score on the validation split (the best ``early_stopping.monitor`` value of
        ``base``, minimised or maximised as its ``mode`` says). Picklable for ``workers > 1``.
    space : SearchSpace
        The fields searched and the stages.
    base : RunConfig
        The default config: every field not searched, and the baseline.
    out : path
        Output folder (layout in the module docstring).
    trials, fine_trials : int, optional
        Trials of the coarse and fine stages (default: the space file's; 0 fine trials: one stage).
    storage : str, optional
        ``journal:PATH`` or an RDB URL (default ``journal:OUT/study.journal``).
    study : str
        Study name; workers and machines sharing a storage and a name share the search.
    workers : int
        Local worker processes.
    timeout : float, optional
        Seconds after which no new trial starts (a rerun continues the search).
    seed : int
        Seed of the samplers (worker k of a stage uses ``seed + k``; give each machine its own).
    pruner : {"median", "halving", "none"}
        Median rule, successive halving, or no pruning.
    max_retry : int
        Retries of a failed trial.
    heartbeat, grace : int
        Heartbeat period and the silence after which a running trial is failed, seconds.
    """
    out = Path(out)
    if workers < 1:
        raise DeepmorphValueError(f"workers must be >= 1, got {workers}")
    if pruner not in PRUNERS:
        raise DeepmorphValueError(f"pruner {pruner!r} is not one of {', '.join(PRUNERS)}")
    if timeout is not None and not timeout > 0:
        raise DeepmorphValueError(f"timeout must be > 0 seconds, got {timeout}")
    coarse = dataclasses.replace(space.coarse, trials=space.coarse.trials if trials is None else int(trials))
    fine = space.fine or Stage("fine", 0, base.epochs)
    fine = dataclasses.replace(fine, trials=fine.trials if fine_trials is None else int(fine_trials))
    if coarse.trials < 1 or fine.trials < 0:
        raise DeepmorphValueError(f"need >= 1 coarse and >= 0 fine trials, got {coarse.trials} and {fine.trials}")
    storage = storage or f"journal:{out / 'study.journal'}"
    open_storage(storage, heartbeat, grace, max_retry)  # a bad URL or an unreachable server: fail now
    out.mkdir(parents=True, exist_ok=True)
    monitor = base.early_stopping.monitor
    direction = "minimize" if base.early_stopping.mode == "min" else "maximize"
    start = time.perf_counter()
    deadline = None if timeout is None else time.time() + timeout
    common = dict(storage=storage, base=base, objective=objective, out=out, monitor=monitor, direction=direction,
                  pruner=pruner, max_retry=max_retry, heartbeat=heartbeat, grace=grace, deadline=deadline)

    default = space.labels_of(base)
    run = StageRun(stage=coarse, study=f"{study}.coarse", space=space, seed=seed, **common)
    studies = {"coarse": run_stage(run, workers, first=[default] if default else [], progress=progress)}
    last, last_space = "coarse", space
    done = not _unfinished(studies["coarse"])
    if done and fine.trials > 0 and _completed(studies["coarse"]):
        ranked = _ranked(studies["coarse"], direction)
        top = [t.params for t in ranked[: max(1, math.ceil(len(ranked) / 4))]]
        fine_space = dataclasses.replace(space.narrow(ranked[0].params, top, fine.shrink), fine=fine)
        run = StageRun(stage=fine, study=f"{study}.fine", space=fine_space, seed=seed + 1000, **common)
        studies["fine"] = run_stage(run, workers, first=[ranked[0].params], progress=progress)
        last, last_space = "fine", fine_space
        done = not _unfinished(studies["fine"])
    elif not done:
        logger.warning("the coarse stage is unfinished (timeout or dead workers); rerun to continue")

    table = trials_table(studies, space)
    _save_table(table, out / "trials.ecsv")
    history_figure(studies, direction, monitor).savefig(out / "optimization_history.png", dpi=100)
    importance = importance_figure(studies["coarse"], space)
    if importance is not None:
        importance.savefig(out / "param_importances.png", dpi=100)
    ranked = _ranked(studies[last], direction)
    best_config = best_run = None
    best = ranked[0] if ranked else None
    params = {}
    if best is not None:
        by_key = {p.key: p for p in last_space.params}
        params = {k: by_key[k].value(v) for k, v in best.params.items()}
        epochs = (fine if last == "fine" else coarse).epochs
        best_config = base.with_overrides({**params} | ({"epochs": epochs} if epochs else {}))
        best_config.to_yaml(out / "best_config.yaml")
        best_run = out / best.user_attrs.get("run", f"trials/{last}-{best.number:04d}")
    stage_epochs = (fine if last == "fine" else coarse).epochs
    default_config = base.with_overrides({"epochs": stage_epochs} if stage_epochs else {})
    return SearchResult(studies, last, None if best is None else best.number, None if best is None else best.value,
                        params, best_config, best_run, default_config, table, done, time.perf_counter() - start)


def _unfinished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))


def _completed(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _ranked(study, direction: str) -> list:
    """Completed trials, best first (ties: the earlier trial)."""
    sign = 1.0 if direction == "minimize" else -1.0
    return sorted(_completed(study), key=lambda t: (sign * t.value, t.number))


# -- results: the table and the figures -------------------------------------------------------------

def trials_table(studies: Mapping, space: SearchSpace):
    """Every trial of every stage: stage, number, state, value, epochs, seconds, retry_of, the
    parameters (config values; choices that are lists as JSON text), run directory and error."""
    from astropy.table import Table

    rows = []
    for stage, study in studies.items():
        for t in study.get_trials(deepcopy=False):
            row = {"stage": stage, "number": t.number, "state": t.state.name.lower(),
                   "value": np.nan if t.value is None else float(t.value),
                   "epochs": int(t.user_attrs.get("epochs", 0)),
                   "seconds": float(t.user_attrs.get("seconds", np.nan)),
                   "retry_of": int(t.system_attrs.get("failed_trial", -1))}
            for p in space.params:
                value = t.params.get(p.key)
                if p.kind == "categorical":
                    row[p.key] = "" if value is None else str(value)
                else:
                    row[p.key] = np.nan if value is None else float(value)
            row["run"] = str(t.user_attrs.get("run", ""))
            row["error"] = str(t.user_attrs.get("error", ""))
            rows.append(row)
    names = ["stage", "number", "state", "value", "epochs", "seconds", "retry_of", *[p.key for p in space.params],
             "run", "error"]
    table = Table(rows=rows, names=names) if rows else Table(names=names)
    table["seconds"].unit = "s"
    table.meta["comments"] = ["deepmorph hyper-parameter search: one row per trial (retry_of -1: a first try)"]
    return table


def _save_table(table, path: Path) -> None:
    from deepmorph.training._io import write_atomic

    write_atomic(path, lambda tmp: table.write(tmp, format="ascii.ecsv", overwrite=True))


def history_figure(studies: Mapping, direction: str, monitor: str):
    """Each finished trial's value in order of completion, coloured by stage, pruned trials at their
    last reported value (crosses), and the best so far per stage."""
    from optuna.trial import TrialState

    from deepmorph.report.figures import new_figure

    fig = new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    better = min if direction == "minimize" else max
    offset = 0
    for (stage, study), colour in zip(studies.items(), ("C0", "C1"), strict=False):
        trials = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        trials.sort(key=lambda t: t.datetime_complete or t.datetime_start)
        x = np.arange(offset, offset + len(trials))
        done = [(i, t.value) for i, t in zip(x, trials, strict=True) if t.state == TrialState.COMPLETE]
        pruned = [(i, t.intermediate_values[max(t.intermediate_values)]) for i, t in zip(x, trials, strict=True)
                  if t.state == TrialState.PRUNED and t.intermediate_values]
        if done:
            ax.plot(*zip(*done, strict=True), "o", color=colour, ms=4, label=f"{stage}: completed")
            best, line = None, []
            for i, v in done:
                best = v if best is None else better(best, v)
                line.append((i, best))
            ax.step(*zip(*line, strict=True), where="post", color=colour, lw=1.5, label=f"{stage}: best so far")
        if pruned:
            ax.plot(*zip(*pruned, strict=True), "x", color=colour, ms=5, alpha=0.6, label=f"{stage}: pruned")
        offset += len(trials)
    ax.set_xlabel("trial (order of completion)")
    ax.set_ylabel(monitor)
    ax.set_title("Optimisation history")
    if ax.has_data():
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def importance_figure(study, space: SearchSpace):
    """fANOVA importance of each parameter for the study's value (a horizontal bar chart), or None
    with fewer than two completed trials or nothing that varied."""
    import optuna

    from deepmorph.report.figures import new_figure

    completed = _completed(study)
    varied = [p.key for p in space.params if len({_key(t.params.get(p.key)) for t in completed}) > 1]
    if len(completed) < 2 or not varied:
        return None
    try:
        importances = optuna.importance.get_param_importances(
            study, params=varied, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as error:
        logger.warning("parameter importances not computed: %s", error)
        return None
    names = list(importances)[::-1]
    fig = new_figure((7.0, 1.8 + 0.35 * len(names)))
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("fANOVA importance (share of the variance of the value)")
    ax.set_title(f"Parameter importances ({len(completed)} completed trials)")
    fig.tight_layout()
    return fig


__all__ = ["PRUNERS", "Param", "PruningCallback", "SearchResult", "SearchSpace", "Stage", "StageRun", "config_value",
           "history_figure", "importance_figure", "open_storage", "prepare_study", "quiet_lightning", "run_stage",
           "run_worker", "search", "start_worker", "trials_table"]
