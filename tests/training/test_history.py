"""The learning history: Keras' keys, one value per epoch, CSV/JSON round trip, learning curves."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.figure import Figure

from deepmorph.errors import DeepmorphIOError
from deepmorph.training import History, HistoryCallback


def _history() -> History:
    history = History()
    history.append(0, {"loss": 0.9, "val_loss": 1.0, "lr": 0.1})
    history.append(1, {"loss": 0.5, "val_loss": 0.6, "acc": 0.7, "val_acc": 0.65, "lr": 0.05})
    return history


def test_append_pads_new_metrics_with_nan_and_orders_keys():
    history = _history()
    assert history.keys() == ["loss", "val_loss", "acc", "val_acc", "lr"]
    assert history.epoch == [0, 1]
    assert math.isnan(history["acc"][0]) and history["acc"][1] == 0.7
    history.append(2, {"loss": 0.4})
    assert math.isnan(history["val_loss"][2]) and len(history) == 3


def test_append_replaces_epochs_run_again():
    history = _history()
    history.append(1, {"loss": 0.1})
    assert history.epoch == [0, 1] and history["loss"] == [0.9, 0.1]


def test_save_and_load(tmp_path):
    history = _history()
    csv_path, json_path = history.save(tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "epoch,loss,val_loss,acc,val_acc,lr"
    assert lines[1] == "0,0.9,1.0,nan,nan,0.1"
    assert json.loads(json_path.read_text())["history"]["acc"] == [None, 0.7]  # NaN as null
    loaded = History.load(tmp_path)
    assert loaded == history and loaded.epoch == [0, 1]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(DeepmorphIOError, match="cannot read a learning history"):
        History.load(tmp_path / "nowhere")


def test_plot_has_a_panel_per_metric(tmp_path):
    fig = _history().plot(title="run")
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["model loss", "model acc", "model learning rate"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["training", "validation"]
    path = _history().save_plot(tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_callback_state_round_trip():
    callback = HistoryCallback(_history())
    other = HistoryCallback()
    other.load_state_dict(callback.state_dict())
    assert other.history == callback.history
