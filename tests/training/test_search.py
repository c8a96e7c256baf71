"""Hyper-parameter search: the space file, coarse to fine, pruning through Lightning, exact trial
counts with several workers on one storage, and retries of failed trials and of dead workers' trials.

Most tests use :class:`Bowl`, an objective without training (a bowl in the learning rate and the
dropout), so that they test the search itself in seconds.
"""

from __future__ import annotations

import math
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from astropy.table import Table
from optuna.trial import TrialState

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.training import History, RunConfig, fit
from deepmorph.training.search import (
    HEARTBEAT_ATTR,
    PruningCallback,
    SearchSpace,
    Stage,
    StageRun,
    importance_figure,
    open_storage,
    prepare_study,
    run_worker,
    search,
)
from tests.training.toys import ScriptedTask, regression_loader

SPACE = {
    "optimizer.lr": {"low": 1.0e-5, "high": 1.0e-1, "log": True},
    "model.kwargs.dropout": {"low": 0.0, "high": 0.5},
    "model.kwargs.widths": {"choices": [[8, 16], [32, 64, 128]]},  # RunConfig()'s CNN is [32, 64, 128]
}


class Bowl:
    """A toy objective: (log10(lr) + 3)^2 + 10 (dropout - 0.1)^2, + 1 for the narrow CNN.

    It writes its process id in the trial's directory; with ``barrier`` it waits (up to 60 s) until
    that many processes have written one (so that several workers provably share the study);
    ``fail_once=(trial, flag)`` raises once in that trial; ``sleep`` seconds pass in each trial.
    """

    def __init__(self, barrier: int = 0, fail_once: tuple[str, str] | None = None, sleep: float = 0.0):
        self.barrier, self.fail_once, self.sleep = barrier, fail_once, sleep

    def __call__(self, config, run_dir, callbacks=()):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "pid").write_text(str(os.getpid()))
        start = time.monotonic()
        while self.barrier and time.monotonic() - start < 60:
            if len({p.read_text() for p in run_dir.parent.glob("*/pid")}) >= self.barrier:
                break
            time.sleep(0.05)
        if self.fail_once and run_dir.name == self.fail_once[0] and not Path(self.fail_once[1]).exists():
            Path(self.fail_once[1]).touch()
            raise RuntimeError("a transient failure")
        time.sleep(self.sleep)
        kwargs = config.model.kwargs
        return ((math.log10(config.optimizer.lr) + 3) ** 2 + 10 * (kwargs["dropout"] - 0.1) ** 2
                + (kwargs["widths"] == [8, 16]))


def _write(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


# -- the space file -----------------------------------------------------------------------------------

def test_space_file_types_follow_the_config_fields(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "# a space file\n"
        "optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "model.kwargs.dropout: {low: 0, high: 1}            # a float: the CNN's dropout is one\n"
        "model.kwargs.blocks_per_stage: {low: 1, high: 3}   # an int\n"
        "model.kwargs.widths: {choices: [[8, 16], [32, 64, 128]]}\n"
        "batch_size: {choices: [32, 64]}\n"
        "augmentation: {choices: [null, flips]}\n"
        "schedule.kind: {choices: [none, cosine]}\n"
        "coarse: {trials: 12, epochs: 2}\n"
        "fine: {trials: 4, epochs: 6, shrink: 0.25}\n")
    space = SearchSpace.from_yaml(path)
    kinds = {p.key: p.kind for p in space.params}
    assert kinds == {"optimizer.lr": "float", "model.kwargs.dropout": "float", "model.kwargs.blocks_per_stage": "int",
                     "model.kwargs.widths": "categorical", "batch_size": "categorical",
                     "augmentation": "categorical", "schedule.kind": "categorical"}
    assert (space.coarse.trials, space.coarse.epochs) == (12, 2)
    assert (space.fine.trials, space.fine.epochs, space.fine.shrink) == (4, 6, 0.25)
    assert SearchSpace.from_dict(space.to_dict()) == space
    # Every drawn set of values makes a valid run config, lists and None included.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(8):
        values = space.suggest(study.ask())
        config = RunConfig().with_overrides(values)
        assert config.model.kwargs["widths"] in ([8, 16], [32, 64, 128])
        assert config.augmentation in (None, "flips") and 1e-4 <= config.optimizer.lr <= 1e-2
        assert isinstance(config.model.kwargs["blocks_per_stage"], int)
    # The default config lies in this space: the search can start from it.
    labels = space.labels_of(RunConfig())
    assert labels["model.kwargs.widths"] == "[32, 64, 128]" and labels["model.kwargs.dropout"] == 0.25
    assert space.labels_of(RunConfig(batch_size=16)) is None


@pytest.mark.parametrize("spec, message", [
    ({"optimizer.lrr": {"low": 1e-4, "high": 1e-2}}, "optimizer.lrr: not a config field"),
    ({"model.kwargs.dropuot": {"low": 0.0, "high": 0.5}}, "model 'cnn' has no argument 'dropuot'"),
    ({"optimizer.lr": {"low": 1e-2, "high": 1e-4}}, "need low < high"),
    ({"optimizer.lr": {"low": 0.0, "high": 1e-2, "log": True}}, "a log range needs low > 0"),
    ({"optimizer.lr": {"low": -1.0, "high": 1e-2}}, "-1.0 is not a valid value"),
    ({"batch_size": {"choices": []}}, "choices must be a non-empty list"),
    ({"batch_size": {"low": 8.5, "high": 64}}, "an integer field needs integer"),
    ({"model.kwargs.widths": {"low": 1, "high": 2}}, "use choices"),
    ({"optimizer": {"low": 1, "high": 2}}, "optimizer: is a section"),
    ({"schedule.kind": {"choices": ["cosine", "spline"]}}, "'spline' is not a valid value"),
    ({"optimizer.lr": {"low": 1e-4, "high": 1e-2}, "coarse": {"trials": 0}}, "coarse: trials must be"),
    ({"optimizer.lr": {"low": 1e-4, "high": 1e-2}, "fine": {"shrink": 2}}, "fine: shrink must be in"),
])
def test_bad_space_files_give_one_line_naming_the_file_and_key(tmp_path, spec, message):
    path = _write(tmp_path / "space.yaml", spec)
    with pytest.raises(DeepmorphValueError) as error:
        SearchSpace.from_yaml(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text
    with pytest.raises(DeepmorphIOError, match="cannot read the search space"):
        SearchSpace.from_yaml(tmp_path / "missing.yaml")


def test_the_fine_space_is_centred_on_the_best_trial():
    space = SearchSpace.from_dict({**SPACE, "model.kwargs.blocks_per_stage": {"low": 1, "high": 5},
                                   "batch_size": {"choices": [16, 32, 64]}})
    best = {"optimizer.lr": 1e-3, "model.kwargs.dropout": 0.45, "model.kwargs.widths": "[8, 16]",
            "model.kwargs.blocks_per_stage": 2, "batch_size": 64}
    second = {**best, "batch_size": 16}
    fine = {p.key: p for p in space.narrow(best, [best, second], shrink=0.5).params}
    lr = fine["optimizer.lr"]
    assert lr.log and math.log10(lr.low) == pytest.approx(-4) and math.log10(lr.high) == pytest.approx(-2)
    assert (fine["model.kwargs.dropout"].low, fine["model.kwargs.dropout"].high) == pytest.approx((0.325, 0.5))
    assert (fine["model.kwargs.blocks_per_stage"].low, fine["model.kwargs.blocks_per_stage"].high) == (1, 3)
    assert fine["model.kwargs.widths"].choices == ([8, 16],)
    assert fine["batch_size"].choices == (16, 64)  # the top trials' choices, in the file's order


# -- a whole search -----------------------------------------------------------------------------------

def test_coarse_then_fine_search_writes_trials_best_config_and_figures(tmp_path):
    space = SearchSpace.from_dict({**SPACE, "coarse": {"trials": 8, "epochs": 2},
                                   "fine": {"trials": 4, "epochs": 5, "shrink": 0.5}})
    result = search(Bowl(), space, RunConfig(), tmp_path / "a", seed=3, progress=False)
    table = Table.read(tmp_path / "a" / "trials.ecsv")
    coarse, fine = table[table["stage"] == "coarse"], table[table["stage"] == "fine"]
    assert list(coarse["number"]) == list(range(8)) and list(fine["number"]) == list(range(4))
    assert set(table["state"]) == {"complete"} and set(coarse["epochs"]) == {0}  # Bowl reports no epochs
    # The coarse search starts from the default config, the fine one from the best coarse trial.
    assert coarse["optimizer.lr"][0] == 1e-3 and coarse["model.kwargs.dropout"][0] == 0.25
    assert coarse["model.kwargs.widths"][0] == "[32, 64, 128]"
    best_coarse = coarse[np.argmin(coarse["value"])]
    for key in SPACE:
        assert fine[key][0] == best_coarse[key]
    # The fine trials stay within the narrowed range: 2 of the 4 decades of lr, around the best.
    assert np.all(np.abs(np.log10(fine["optimizer.lr"]) - np.log10(best_coarse["optimizer.lr"])) <= 1 + 1e-9)
    # The best config is the best fine trial's, with the fine stage's epochs, and better than the default.
    best = fine[np.argmin(fine["value"])]
    assert result.best_stage == "fine" and result.best_number == best["number"]
    assert best["value"] <= best_coarse["value"] <= coarse["value"][0]
    config = RunConfig.from_yaml(tmp_path / "a" / "best_config.yaml")
    assert config.optimizer.lr == best["optimizer.lr"]
    assert config.model.kwargs["dropout"] == best["model.kwargs.dropout"]
    assert str(config.model.kwargs["widths"]).replace(" ", "") == best["model.kwargs.widths"].replace(" ", "")
    assert config.epochs == 5 and result.default_config.epochs == 5
    for name in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "a" / name).stat().st_size > 1000
    # Same seed, same search.
    search(Bowl(), space, RunConfig(), tmp_path / "b", seed=3, progress=False)
    again = Table.read(tmp_path / "b" / "trials.ecsv")
    for key in [*SPACE, "value"]:
        assert list(again[key]) == list(table[key])


def test_a_search_stopped_by_its_timeout_continues_when_rerun(tmp_path):
    space = SearchSpace.from_dict({**SPACE, "coarse": {"trials": 6}})
    first = search(Bowl(sleep=0.3), space, RunConfig(), tmp_path, timeout=0.5, progress=False)
    table = Table.read(tmp_path / "trials.ecsv")
    done = list(table["state"]).count("complete")
    assert not first.complete and 1 <= done < 6 and list(table["state"]).count("waiting") == 6 - done
    again = search(Bowl(), space, RunConfig(), tmp_path, progress=False)
    table = Table.read(tmp_path / "trials.ecsv")
    assert again.complete and list(table["number"]) == list(range(6)) and set(table["state"]) == {"complete"}


def test_no_importance_figure_without_two_trials_that_differ():
    space = SearchSpace.from_dict(SPACE)
    study = optuna.create_study()
    params = {"optimizer.lr": 1e-3, "model.kwargs.dropout": 0.1, "model.kwargs.widths": "[8, 16]"}
    distributions = {p.key: p.distribution() for p in space.params}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=1.0))
    assert importance_figure(study, space) is None
    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=2.0))
    assert importance_figure(study, space) is None  # nothing varied
    study.add_trial(optuna.trial.create_trial(params={**params, "optimizer.lr": 1e-2}, distributions=distributions,
                                              value=3.0))
    assert importance_figure(study, space) is not None


class ScriptedObjective:
    """Trains :class:`ScriptedTask`, whose val_loss is 10 x lr at every epoch."""

    def __call__(self, config, run_dir, callbacks=()):
        task = ScriptedTask(config, [10 * config.optimizer.lr] * config.epochs)
        history = fit(task, regression_loader(), regression_loader(), config, run_dir, callbacks=callbacks)
        return min(history["val_loss"])


def test_pruning_stops_bad_trials_through_lightning(tmp_path):
    config = RunConfig(epochs=4, progress_bar=False, accelerator="cpu", early_stopping={"patience": 10})
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (1.0, 1.2):  # two finished trials, their val_loss at each epoch
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={e: value for e in range(4)}))
    bad, good = study.ask(), study.ask()
    callbacks = {}
    for name, trial, script in (("bad", bad, [5.0] * 4), ("good", good, [0.9, 0.8, 0.7, 0.6])):
        callbacks[name] = PruningCallback(trial, "val_loss")
        fit(ScriptedTask(config, script), regression_loader(), regression_loader(), config, tmp_path / name,
            callbacks=[callbacks[name]])
    assert callbacks["bad"].pruned and callbacks["bad"].epochs == 1 and len(History.load(tmp_path / "bad")) == 1
    assert bad.study.trials[bad.number].intermediate_values == {0: 5.0}
    assert not callbacks["good"].pruned and len(History.load(tmp_path / "good")) == 4

    # In a search: every trial worse than the median of the finished ones at epoch 0 is pruned there.
    space = SearchSpace.from_dict({"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True},
                                   "coarse": {"trials": 6, "epochs": 3}})
    search(ScriptedObjective(), space, RunConfig(accelerator="cpu"), tmp_path / "search", seed=0, progress=False)
    table = Table.read(tmp_path / "search" / "trials.ecsv")
    finished = []
    for row in table:
        value = 10 * row["optimizer.lr"]
        should_prune = len(finished) >= 2 and value > np.median(finished)
        assert row["state"] == ("pruned" if should_prune else "complete")
        assert row["epochs"] == (1 if should_prune else 3)
        assert len(History.load(tmp_path / "search" / row["run"])) == row["epochs"]
        if not should_prune:
            finished.append(value)
    assert "pruned" in set(table["state"])


# -- parallel workers, retries ------------------------------------------------------------------------

def test_two_workers_on_one_journal_finish_exactly_n_trials_and_retry_a_failure(tmp_path):
    space = SearchSpace.from_dict({**SPACE, "coarse": {"trials": 10}})
    flag = tmp_path / "failed-once"
    result = search(Bowl(barrier=2, fail_once=("coarse-0003", str(flag))), space, RunConfig(), tmp_path / "run",
                    workers=2, seed=0, progress=False)
    table = Table.read(tmp_path / "run" / "trials.ecsv")
    # 10 trials finished, plus the failed one: numbers 0..10, none lost, none twice.
    assert sorted(table["number"]) == list(range(11))
    assert list(table["state"]).count("complete") == 10 and list(table["state"]).count("fail") == 1
    failed = table[table["state"] == "fail"][0]
    assert failed["number"] == 3 and "a transient failure" in failed["error"]
    retry = table[table["retry_of"] == 3]
    assert len(retry) == 1 and retry["state"][0] == "complete"
    for key in SPACE:
        assert retry[key][0] == failed[key]
    pids = {(tmp_path / "run" / row["run"] / "pid").read_text() for row in table}
    assert len(pids) == 2 and str(os.getpid()) in pids  # this process and another one did the work
    assert result.complete and result.summary()["trials"]["coarse"] == {"complete": 10, "fail": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server in a temporary folder (skipped without the server binaries)."""
    pytest.importorskip("psycopg2")
    bindirs = [Path(p).parent for p in (shutil.which("pg_ctl"),) if p]
    bindirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    bindir = next((b for b in bindirs if (b / "initdb").is_file() and (b / "pg_ctl").is_file()), None)
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    prefix = []
    root = Path(tempfile.mkdtemp(prefix="deepmorph-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the PostgreSQL server")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -h 127.0.0.1 -F", "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_a_silent_worker_s_trial_is_failed_and_retried(tmp_path, storage, request):
    url = f"journal:{tmp_path / 'study.journal'}" if storage == "journal" else request.getfixturevalue("postgres_url")
    space = SearchSpace.from_dict(SPACE)
    run = StageRun(Stage("coarse", 3), f"silent-{tmp_path.name}", url, space, RunConfig(), Bowl(), tmp_path,
                   pruner="none", heartbeat=1, grace=2, poll=0.2)
    study = prepare_study(run)
    # A worker takes the first trial, beats once and dies (killed, its machine lost): the trial stays RUNNING.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's "heartbeat is supposed to be used with optimize"
        dead = study.ask()
    space.suggest(dead)
    if storage == "journal":
        study._storage.set_trial_system_attr(dead._trial_id, HEARTBEAT_ATTR, time.time())
    else:
        study._storage.record_heartbeat(dead._trial_id)
    # Another worker runs the other two, waits for the silent one, fails it after the grace period
    # and runs it again.
    start = time.monotonic()
    assert run_worker(run) == 3
    assert time.monotonic() - start >= 2
    trials = optuna.load_study(study_name=run.study, storage=open_storage(url)).trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    assert trials[dead.number].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == dead.number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params


def test_two_workers_on_postgresql(tmp_path, postgres_url):
    space = SearchSpace.from_dict({**SPACE, "coarse": {"trials": 4}})
    search(Bowl(barrier=2), space, RunConfig(), tmp_path, storage=postgres_url, study="pg-two-workers", workers=2,
           progress=False)
    table = Table.read(tmp_path / "trials.ecsv")
    assert sorted(table["number"]) == list(range(4)) and set(table["state"]) == {"complete"}
    assert {(tmp_path / row["run"] / "pid").read_text() for row in table} > {str(os.getpid())}


def test_storage_errors(tmp_path):
    with pytest.raises(DeepmorphValueError, match="SQLite is not safe"):
        open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(DeepmorphValueError, match="unknown storage"):
        open_storage("redis://localhost:6379")
    with pytest.raises(DeepmorphIOError, match="cannot open the study storage") as error:
        open_storage(f"postgresql://me:secret@127.0.0.1:{_free_port()}/db")
    assert "secret" not in str(error.value) and "me:***@127.0.0.1" in str(error.value)
