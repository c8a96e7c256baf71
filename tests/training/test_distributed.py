"""Data-parallel training (DDP) on two CPU processes (gloo) against one process, and mixed precision.

Two processes with half the batch each, unshuffled, compute the gradient of the same items as one
process with the whole batch: the runs must agree (weights, every metric, the epoch early stopping
chose), and only global rank 0 may write the run's files.
"""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks import ClassifyTask
from deepmorph.training import History, RunConfig, build_model, fit
from tests.training.toys import DictDataset, discs_and_bars

# No randomness inside a step (no dropout, noise, augmentation or shuffling) and no batch norm,
# whose statistics would be per process: the two runs are then the same computation.
CONFIG = RunConfig(
    model={"kwargs": {"widths": [4, 8], "dropout": 0.0, "noise_sigma": 0.0, "batchnorm": False}},
    optimizer={"name": "adam", "lr": 0.01}, batch_size=32, epochs=10, seed=3,
    early_stopping={"monitor": "val_acc", "mode": "max", "patience": 3}, progress_bar=False, accelerator="cpu",
)


class RankRecord(L.Callback):
    """Write what each process saw at the end (epoch, early stopping's decision) to ``rank<R>.json``."""

    def __init__(self, directory):
        self.directory = str(directory)

    def on_fit_end(self, trainer, pl_module):
        early = next(c for c in trainer.callbacks if type(c).__name__ == "EarlyStopping")
        record = {"epoch": trainer.current_epoch, "stopped_epoch": early.stopped_epoch, "pid": os.getpid(),
                  "world_size": trainer.world_size, "val_acc": float(trainer.callback_metrics["val_acc"])}
        path = os.path.join(self.directory, f"rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f)


def _run(out_dir, processes: int, record_dir=None, config=CONFIG, strategy: str = "ddp_fork"):
    train = DictDataset(*discs_and_bars(128, 16, seed=0))
    val = DictDataset(*discs_and_bars(64, 16, seed=1))
    per_process = config.batch_size // processes
    config = config.with_overrides({"batch_size": per_process, "devices": processes,
                                    "strategy": strategy if processes > 1 else "auto"})
    torch.manual_seed(config.seed)  # the same initial weights in both runs
    task = ClassifyTask(build_model(config, num_outputs=2), config, 2)
    callbacks = [RankRecord(record_dir)] if record_dir is not None else []
    history = fit(task, DataLoader(train, batch_size=per_process), DataLoader(val, batch_size=per_process),
                  config, out_dir, callbacks=callbacks)
    return history, task


def test_two_processes_train_as_one(tmp_path, monkeypatch):
    one, task_one = _run(tmp_path / "one", 1)

    saves = tmp_path / "saves.txt"  # every History.save, by process (forked workers inherit the patch)
    original = History.save

    def logged_save(self, directory):
        with open(saves, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {len(self)}\n")
        return original(self, directory)

    monkeypatch.setattr(History, "save", logged_save)
    records = tmp_path / "records"
    records.mkdir()
    two, task_two = _run(tmp_path / "two", 2, records)

    # The same epochs, metrics and weights (to float32 rounding of differently ordered sums).
    assert one.epoch == two.epoch and len(one) < CONFIG.epochs  # early stopping stopped both
    for key in ("loss", "val_loss", "acc", "val_acc", "lr"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    summary_one, summary_two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert summary_two == pytest.approx(summary_one) and summary_two["stopped_epoch"] is not None
    assert summary_two["best_score"] > 0.8  # it learned to tell discs from bars
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    # the calling process got the trained (best epoch's) weights back
    for name, value in task_two.model.state_dict().items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0)

    # Both ranks ran in their own process and stopped at the same epoch, with the same metric.
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks) and ranks[0]["pid"] != ranks[1]["pid"] != os.getpid()
    assert ranks[0]["epoch"] == ranks[1]["epoch"] and ranks[0]["stopped_epoch"] == ranks[1]["stopped_epoch"]
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"]

    # The history was written by one process only (rank 0): once per epoch and once at the end.
    lines = saves.read_text().split()
    pids, lengths = lines[0::2], [int(n) for n in lines[1::2]]
    assert set(pids) == {str(ranks[0]["pid"])}
    assert lengths == [*range(1, len(two) + 1), len(two)]
    assert History.load(tmp_path / "two") == two


def test_a_run_resumes_with_another_number_of_processes(tmp_path):
    config = CONFIG.with_overrides({"epochs": 2, "early_stopping.enabled": False})
    train = DictDataset(*discs_and_bars(128, 16, seed=0))
    val = DictDataset(*discs_and_bars(64, 16, seed=1))

    def run(config):
        torch.manual_seed(config.seed)
        task = ClassifyTask(build_model(config, num_outputs=2), config, 2)
        return fit(task, DataLoader(train, batch_size=32), DataLoader(val, batch_size=32), config, tmp_path / "run")

    first = run(config)
    # two more epochs on two processes (the batch size, per process, must stay: the effective batch doubles)
    resumed = run(config.with_overrides({"epochs": 4, "devices": 2, "strategy": "ddp_fork"}))
    assert resumed.epoch == [0, 1, 2, 3] and History.load(tmp_path / "run") == resumed
    assert all(resumed[key][:2] == first[key] for key in first.keys())  # the first two epochs kept
    assert resumed["loss"][3] < resumed["loss"][1]  # and training went on from there
    assert RunConfig.from_yaml(tmp_path / "run" / "config.yaml").devices == 2
    with pytest.raises(DeepmorphValueError, match="batch_size differ"):
        run(config.with_overrides({"epochs": 5, "batch_size": 16}))


@pytest.mark.slow  # ~15 s: each spawned process imports torch and Lightning afresh
def test_spawned_processes_train_as_one(tmp_path):
    config = CONFIG.with_overrides({"epochs": 2})
    one, _ = _run(tmp_path / "one", 1, config=config)
    two, task = _run(tmp_path / "two", 2, config=config, strategy="ddp_spawn")  # task and loaders pickled
    for key in ("loss", "val_loss", "val_acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    trained = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for name, value in task.model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    config = CONFIG.with_overrides({"epochs": 8, "early_stopping.enabled": False})
    fp32, _ = _run(tmp_path / "fp32", 1, config=config)
    bf16, task = _run(tmp_path / "bf16", 1, config=config.with_overrides({"precision": "bf16-mixed",
                                                                          "channels_last": True}))
    assert bf16["loss"] != fp32["loss"]  # bfloat16 arithmetic is in effect...
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=0.03)  # ...and learns as float32 does
    assert bf16["loss"][-1] < 0.6 * bf16["loss"][0] and bf16["val_acc"][-1] > 0.75
    weight = task.model.state_dict()
    assert all(v.dtype == torch.float32 for v in weight.values())  # mixed: the weights stay float32
    conv = next(v for v in weight.values() if v.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.stride(1) == 1


@pytest.mark.parametrize("overrides, message", [
    ({"devices": 0}, "devices: must be a positive integer or 'auto', got 0"),
    ({"devices": "two"}, "devices: must be a positive integer or 'auto'"),
    ({"num_nodes": 0}, "num_nodes: must be > 0"),
    ({"strategy": "fsdp"}, "strategy: 'fsdp' is not one of auto, ddp, ddp_spawn"),
    ({"precision": "16"}, "precision: '16' is not one of 32-true, bf16-mixed, 16-mixed"),
    ({"precision": "16-mixed"}, "'16-mixed' needs a GPU; use 'bf16-mixed' on CPUs"),
    ({"sync_batchnorm": True, "devices": 2}, "sync_batchnorm: needs GPUs"),
])
def test_bad_hardware_options_are_clear_errors(overrides, message):
    with pytest.raises(DeepmorphValueError, match=message):
        CONFIG.with_overrides(overrides)


def test_train_command_runs_ddp_and_refuses_bad_options(tmp_path, capsys):
    from deepmorph.cli import main
    from deepmorph.data import write_dataset
    from deepmorph.simulate import Priors, Simulator
    from tests.cli_errors import error_line

    data = write_dataset(tmp_path / "cls.h5", Simulator("sdss-r", 32, priors=Priors(balanced_classes=True)), 160,
                         seed=0, progress=False)
    argv = ["train", "classify", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2",
            "--batch-size", "16", "--accelerator", "cpu", "--quiet", "--set", "model.kwargs.widths=[4, 8]"]
    assert main([*argv, "--devices", "2", "--strategy", "ddp_fork"]) == 0
    config = RunConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert (config.devices, config.strategy, config.processes) == (2, "ddp_fork", 2)
    assert History.load(tmp_path / "run").epoch == [0, 1]
    # The command (one process) scored the test split with the weights the two workers trained.
    from deepmorph.data import Normalization, StampDataset
    from deepmorph.measure import classification_metrics
    from deepmorph.workflows.classify import Split, load_cnn, load_run, predict_probabilities

    meta = load_run(tmp_path / "run")
    norm = Normalization.from_dict(meta["normalization"])
    test = StampDataset(data, Split().indices(160)["test"], normalization=norm)
    proba = predict_probabilities(load_cnn(tmp_path / "run"), test)
    expected = classification_metrics(test.catalog["label"], proba.argmax(1), meta["label_names"], proba=proba)
    written = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    for key in ("accuracy", "log_loss", "ece"):  # log loss and ECE: every probability counts
        assert written[key] == pytest.approx(expected[key], rel=1e-6), key

    for flags, message in ((["--devices", "two"], "argument --devices: expected a positive integer or 'auto'"),
                           (["--precision", "16-mixed"], "'16-mixed' needs a GPU; use 'bf16-mixed' on CPUs"),
                           (["--strategy", "fsdp"], "strategy: 'fsdp' is not one of auto, ddp")):
        assert main([*argv, *flags]) == 2
        assert message in error_line(capsys)
