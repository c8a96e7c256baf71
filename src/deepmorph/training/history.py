"""The learning history: every logged metric, once per epoch, as Keras' ``History``.

>>> history = fit(task, train_loader, val_loader, config, "runs/cls")   # doctest: +SKIP
>>> sorted(history.history)                                            # doctest: +SKIP
['acc', 'loss', 'lr', 'val_acc', 'val_loss']
>>> history.plot().savefig("curves.png")                               # doctest: +SKIP

Training metrics have bare names (``loss``, ``acc``), validation ones the ``val_`` prefix, and
``lr`` is the learning rate of the epoch. Epochs are numbered from 0, like Lightning's and
Keras'. A metric missing at an epoch is NaN (``null`` in the JSON file).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from matplotlib.figure import Figure

from deepmorph.errors import DeepmorphIOError
from deepmorph.report.figures import new_figure
from deepmorph.training._io import write_atomic, write_text_atomic

CSV_NAME = "history.csv"
JSON_NAME = "history.json"


class History:
    """Per-epoch lists of metrics.

    Parameters
    ----------
    history : mapping of str to sequence of float, optional
        Metric name -> one value per epoch.
    epoch : sequence of int, optional
        The epochs of the rows (default ``0, 1, ...``).

    Attributes
    ----------
    history : dict of str to list of float
        Keras' ``history.history``: metric name -> one value per recorded epoch.
    epoch : list of int
        The recorded epochs.
    """

    def __init__(self, history: Mapping[str, Sequence[float]] | None = None, epoch: Sequence[int] | None = None):
        history = history or {}
        self.history: dict[str, list[float]] = {key: [float(v) for v in values] for key, values in history.items()}
        n = len(next(iter(self.history.values()))) if self.history else 0
        self.epoch: list[int] = list(range(n)) if epoch is None else [int(e) for e in epoch]
        if any(len(values) != len(self.epoch) for values in self.history.values()):
            raise ValueError("History: every metric needs one value per epoch")

    def __len__(self) -> int:
        return len(self.epoch)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __eq__(self, other) -> bool:
        return isinstance(other, History) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"History({len(self)} epochs: {', '.join(self.keys())})"

    def keys(self) -> list[str]:
        """Metric names: ``loss``, ``val_loss``, then each metric and its ``val_`` twin, then ``lr``."""
        return _ordered(self.history)

    def append(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of ``epoch`` (rows from ``epoch`` on, if any, are replaced)."""
        while self.epoch and self.epoch[-1] >= epoch:  # an epoch run again after a resume
            self.epoch.pop()
            for values in self.history.values():
                values.pop()
        for key in metrics:
            self.history.setdefault(key, [math.nan] * len(self.epoch))
        self.epoch.append(int(epoch))
        for key, values in self.history.items():
            values.append(float(metrics.get(key, math.nan)))

    def to_dict(self) -> dict:
        """``{"epoch": [...], "history": {name: [...]}}`` with NaN as None (JSON's null)."""
        return {
            "epoch": list(self.epoch),
            "history": {key: [None if math.isnan(v) else v for v in self.history[key]] for key in self.keys()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> History:
        """Inverse of :meth:`to_dict`."""
        history = {key: [math.nan if v is None else v for v in values] for key, values in data["history"].items()}
        return cls(history, data["epoch"])

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text, one line per metric."""
        data = self.to_dict()
        metrics = ",\n".join(f"  {json.dumps(key)}: {json.dumps(values)}" for key, values in data["history"].items())
        return f'{{\n "epoch": {json.dumps(data["epoch"])},\n "history": {{\n{metrics}\n }}\n}}\n'

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``history.csv`` and ``history.json`` into ``directory``, atomically; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        keys = self.keys()
        writer.writerow(["epoch", *keys])
        for row, epoch in enumerate(self.epoch):
            writer.writerow([epoch, *(repr(self.history[key][row]) for key in keys)])
        csv_path = write_text_atomic(directory / CSV_NAME, text.getvalue())
        json_path = write_text_atomic(directory / JSON_NAME, self.to_json())
        return csv_path, json_path

    @classmethod
    def load(cls, directory: str | Path) -> History:
        """Read the ``history.json`` that :meth:`save` wrote into ``directory``."""
        path = Path(directory) / JSON_NAME
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as error:
            raise DeepmorphIOError(f"{path}: cannot read a learning history ({error})") from error

    def plot(self, title: str | None = None) -> Figure:
        """Learning curves: one panel per metric (loss first), training and validation vs epoch.

        The learning rate, when recorded, gets its own panel with a logarithmic axis.
        """
        names = list(dict.fromkeys(key[4:] if key.startswith("val_") else key for key in self.keys()))
        fig = new_figure((4.0 * max(1, len(names)), 3.2))
        axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
        for ax, name in zip(axes, names, strict=False):
            for key, label, style in ((name, "training", "-o"), ("val_" + name, "validation", "-s")):
                if key in self.history and name != "lr":
                    ax.plot(self.epoch, self.history[key], style, ms=3, label=label)
            if name == "lr":
                ax.plot(self.epoch, self.history["lr"], "-o", ms=3, color="k")
                if all(v > 0 for v in self.history["lr"]):
                    ax.set_yscale("log")
                ax.set_ylabel("learning rate")
            else:
                ax.set_ylabel(name)
                ax.legend(fontsize="small")
            ax.set_xlabel("epoch")
            ax.set_title(f"model {'learning rate' if name == 'lr' else name}")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig

    def save_plot(self, path: str | Path, title: str | None = None) -> Path:
        """Draw :meth:`plot` into a PNG file at ``path``, atomically."""
        fig = self.plot(title)
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _ordered(keys) -> list[str]:
    """``loss, val_loss``, then other metrics (sorted) each followed by its ``val_`` twin, then ``lr``."""
    keys = set(keys)
    bases = sorted({key[4:] if key.startswith("val_") else key for key in keys} - {"loss", "lr"})
    order = []
    for base in ["loss", *bases, "lr"]:
        order += [key for key in (base, "val_" + base) if key in keys]
    return order


class HistoryCallback(L.Callback):
    """Fill a :class:`History` with the epoch's metrics from ``trainer.callback_metrics``.

    It records at the end of each training epoch, after validation, when the epoch averages of
    the training metrics exist too (at the end of validation they do not yet). ``lr`` is the
    first parameter group's learning rate at the start of the epoch (exact, where the logged one
    is float32). Its state (the history so far) goes into
    checkpoints, so a resumed run continues the same history.

    Parameters
    ----------
    history : History, optional
        The history to append to (default: a new one), available as ``.history``.
    save_dir : path, optional
        When given, the history's CSV and JSON files are rewritten there after every epoch.
    """

    def __init__(self, history: History | None = None, save_dir: str | Path | None = None):
        self.history = History() if history is None else history
        self.save_dir = None if save_dir is None else Path(save_dir)
        self._lr: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # read now: Lightning steps per-epoch schedules after the last batch, before this epoch ends
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            key: float(value) for key, value in trainer.callback_metrics.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, int | float)
        }
        if self._lr is not None:
            metrics["lr"] = self._lr
        self.history.append(trainer.current_epoch, metrics)
        if self.save_dir is not None and trainer.is_global_zero:
            self.history.save(self.save_dir)

    def state_dict(self) -> dict:
        return self.history.to_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        loaded = History.from_dict(state_dict)
        self.history.history, self.history.epoch = loaded.history, loaded.epoch
