"""The training core, on PyTorch Lightning: one ``fit`` for every task.

- :func:`fit` trains a task and writes the run (history, curves, checkpoints, TensorBoard), resuming
  an interrupted run exactly;
- :class:`RunConfig`: every option, one YAML file saved with the run;
- :class:`History` and :class:`HistoryCallback`: per-epoch metrics with Keras' names, learning curves;
- :class:`EarlyStopping`: patience, ``min_delta``, best weights restored;
- :func:`make_optimizer`, :func:`make_scheduler`: Adam/AdamW/SGD, step, exponential, inverse-time,
  cosine and on-plateau learning-rate decay;
- :func:`build_model`, :func:`load_weights`, :func:`freeze`: fine-tuning with frozen layers.
"""

from deepmorph.training.callbacks import EarlyStopping, RandomStateCallback
from deepmorph.training.config import (
    EarlyStoppingConfig,
    FinetuneConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
)
from deepmorph.training.finetune import build_model, freeze, load_weights, parse_freeze_mode, read_state_dict
from deepmorph.training.fit import fit
from deepmorph.training.history import History, HistoryCallback
from deepmorph.training.schedules import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "EarlyStopping", "EarlyStoppingConfig", "FinetuneConfig", "History",
    "HistoryCallback", "ModelConfig", "OptimizerConfig", "RandomStateCallback", "RunConfig", "ScheduleConfig",
    "build_model", "fit", "freeze", "load_weights", "make_optimizer", "make_scheduler", "parse_freeze_mode",
    "read_state_dict",
]
