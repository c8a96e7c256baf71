"""The run configuration: every option of a training run, in one YAML file saved with the run.

A run config is a tree of frozen dataclasses. Build it from YAML, from a dict, or in Python;
every value is checked and converted when the object is made (YAML's ``1e-3``, a string for
PyYAML, becomes a float), and an unknown key is an error that lists the known ones::

    # cls.yaml: a small CNN on 64 x 64 stamps
    model: {name: cnn, kwargs: {widths: [32, 64, 128], dropout: 0.25, noise_sigma: 0.01}}
    optimizer: {name: adam, lr: 1.0e-3}
    schedule: {kind: exponential, decay_rate: 0.05}    # lr0 * exp(-0.05 t), t in epochs
    early_stopping: {monitor: val_loss, patience: 10}
    batch_size: 128
    epochs: 40
    augmentation: keras                                # a preset of deepmorph.data.augment
    seed: 1

>>> config = RunConfig.from_yaml("cls.yaml")                                  # doctest: +SKIP
>>> config = config.with_overrides({"optimizer.lr": 3e-4, "epochs": 60})     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.training._io import write_text_atomic
from deepmorph.training.finetune import parse_freeze_mode
from deepmorph.training.schedules import OPTIMIZERS, SCHEDULES

#: Lightning accelerators a run may ask for.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: Lightning strategies a run may ask for: one process, or data-parallel (DDP) processes.
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
              "ddp_spawn_find_unused_parameters_true", "ddp_fork_find_unused_parameters_true")
#: Numerical precisions (Lightning's names): float32, bfloat16 and float16 mixed precision.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class _Section:
    """Base of the config dataclasses: converts and checks every field after ``__init__``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _convert(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Semantic checks of the converted values (override)."""

    @classmethod
    def from_dict(cls, data: Mapping | None):
        """Build from a (nested) mapping; unknown keys raise :class:`DeepmorphValueError`."""
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise DeepmorphValueError(f"{cls.__name__}: expected a mapping, got {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            raise DeepmorphValueError(
                f"{cls.__name__}: unknown key(s) {', '.join(map(str, unknown))}; known keys: {', '.join(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain nested dict (lists, not tuples): what :meth:`from_dict` and YAML take."""
        return _plain(dataclasses.asdict(self))


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (dataclass sections from mappings, ints to floats, ...), or an error."""
    if isinstance(hint, type) and issubclass(hint, _Section):
        return value if isinstance(value, hint) else hint.from_dict(value)
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in hint.__args__:
            return None
        for arg in hint.__args__:
            if arg is not type(None):
                try:
                    return _convert(value, arg, where)
                except DeepmorphValueError:
                    pass
        raise DeepmorphValueError(f"{where}: expected {hint}, got {value!r}")
    if typing.get_origin(hint) is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise DeepmorphValueError(f"{where}: expected a mapping, got {value!r}")
        return _plain(copy.deepcopy(dict(value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise DeepmorphValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise DeepmorphValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # also YAML's "1e-3", which PyYAML reads as a string
        except (TypeError, ValueError):
            raise DeepmorphValueError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise DeepmorphValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so configs compare equal after a YAML round trip."""
    if isinstance(value, Mapping):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _choice(where: str, value: str, choices) -> None:
    if value not in choices:
        raise DeepmorphValueError(f"{where}: {value!r} is not one of {', '.join(choices)}")


def _positive(where: str, value: float, zero_ok: bool = False) -> None:
    if not (value >= 0 if zero_ok else value > 0):
        raise DeepmorphValueError(f"{where}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which model: a name of :func:`deepmorph.models.list_models` and its keyword arguments."""

    name: str = "cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """Optimiser (:func:`deepmorph.training.make_optimizer`): adam, adamw or sgd; ``lr`` is ``lr0``."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False

    def _check(self) -> None:
        _choice("optimizer.name", self.name, OPTIMIZERS)
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.weight_decay", self.weight_decay, zero_ok=True)
        _positive("optimizer.momentum", self.momentum, zero_ok=True)


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """Per-epoch learning-rate schedule (:func:`deepmorph.training.make_scheduler` has the formulas)."""

    kind: str = "none"
    step_size: int = 10
    gamma: float = 0.5
    decay_rate: float = 0.05
    t_max: int | None = None
    eta_min: float = 0.0
    factor: float = 0.1
    patience: int = 5
    min_lr: float = 0.0

    def _check(self) -> None:
        _choice("schedule.kind", self.kind, SCHEDULES)
        _positive("schedule.step_size", self.step_size)
        _positive("schedule.gamma", self.gamma)
        _positive("schedule.decay_rate", self.decay_rate, zero_ok=True)
        if self.t_max is not None:
            _positive("schedule.t_max", self.t_max)


@dataclass(frozen=True)
class EarlyStoppingConfig(_Section):
    """Early stopping (:class:`deepmorph.training.EarlyStopping`); ``monitor``, ``mode`` pick best.ckpt too."""

    enabled: bool = True
    monitor: str = "val_loss"
    mode: str = "min"
    patience: int = 10
    min_delta: float = 0.0
    restore_best_weights: bool = True

    def _check(self) -> None:
        _choice("early_stopping.mode", self.mode, ("min", "max"))
        _positive("early_stopping.patience", self.patience, zero_ok=True)
        _positive("early_stopping.min_delta", self.min_delta, zero_ok=True)


@dataclass(frozen=True)
class FinetuneConfig(_Section):
    """Start from another run's weights (:func:`deepmorph.training.load_weights`) and freeze layers.

    ``freeze`` is ``none``, ``head`` (train only the head) or ``blocks:K`` (freeze the first K blocks).
    """

    weights: str | None = None
    freeze: str = "none"
    new_head: bool = False
    strict: bool = False

    def _check(self) -> None:
        parse_freeze_mode(self.freeze)


@dataclass(frozen=True)
class RunConfig(_Section):
    """Everything a training run needs besides the data and the task.

    Parameters
    ----------
    model, optimizer, schedule, early_stopping, finetune : sections
        See :class:`ModelConfig`, :class:`OptimizerConfig`, :class:`ScheduleConfig`,
        :class:`EarlyStoppingConfig`, :class:`FinetuneConfig`.
    batch_size : int
        Images per training step.
    epochs : int
        Maximum number of epochs.
    augmentation : str, optional
        Name of an augmentation preset (``deepmorph.data.augment.PRESETS``), None for none.
    normalization : dict
        The image normalisation (``Normalization.to_dict()``), saved so that prediction uses it.
    seed : int
        Seed of model initialisation, shuffling, dropout and augmentation.
    num_workers : int
        DataLoader worker processes (per training process).
    accelerator : str
        ``"auto"``, ``"cpu"``, ``"gpu"`` (or ``"cuda"``, ``"mps"``): Lightning's accelerator.
    devices : int or "auto"
        Devices (GPUs, or CPU processes) per node; ``"auto"``: every GPU there is, or one CPU
        process. More than one trains with data-parallel processes (DDP): each process reads its
        own share of every epoch (Lightning adds a ``DistributedSampler``), so ``batch_size`` is
        per process and the effective batch is ``batch_size * devices * num_nodes``.
    num_nodes : int
        Machines of a multi-node run (each started by the cluster's launcher, e.g. ``srun`` or
        ``torchrun``, running the same command).
    strategy : str
        One of :data:`STRATEGIES`. ``"auto"``: no DDP for one device, else ``"ddp"``, where every
        process runs the whole command (Lightning starts the others by rerunning it, or the
        cluster's launcher starts them all); ``"ddp_spawn"`` / ``"ddp_fork"``: the command runs
        once and ``fit`` starts the training processes (one machine). The
        ``*_find_unused_parameters_true`` variants serve models with parameters that a step leaves
        unused (e.g. a frozen branch).
    precision : str
        One of :data:`PRECISIONS`: ``"32-true"`` (float32), ``"bf16-mixed"`` (bfloat16 autocast,
        float32 weights; GPUs since Ampere and CPUs), ``"16-mixed"`` (float16 autocast with loss
        scaling; GPUs only).
    channels_last : bool
        Convolution weights and input images in the channels-last (NHWC) memory layout: faster
        convolutions on GPUs with tensor cores, mostly with ``bf16-mixed``/``16-mixed``.
    sync_batchnorm : bool
        Batch-norm statistics over the whole effective batch instead of each process's share
        (``torch.nn.SyncBatchNorm``; GPUs only).
    deterministic : bool or "warn"
        Deterministic algorithms (``torch.use_deterministic_algorithms``): True raises on an
        operation that has none (on CUDA e.g. ``AdaptiveAvgPool2d``'s backward, ``median`` with
        indices), ``"warn"`` (default) only warns there, False allows the faster non-deterministic
        GPU kernels. CPU runs are reproducible bit for bit with True or ``"warn"``.
    gradient_clip : float, optional
        Clip the gradient norm to this value.
    progress_bar : bool
        Show a progress bar and the model summary.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    batch_size: int = 64
    epochs: int = 30
    augmentation: str | None = None
    normalization: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    channels_last: bool = False
    sync_batchnorm: bool = False
    deterministic: bool | str = "warn"
    gradient_clip: float | None = None
    progress_bar: bool = True

    def _check(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("epochs", self.epochs)
        _positive("num_workers", self.num_workers, zero_ok=True)
        _choice("accelerator", self.accelerator, ACCELERATORS)
        if self.devices != "auto" and not (isinstance(self.devices, int) and self.devices > 0):
            raise DeepmorphValueError(f"devices: must be a positive integer or 'auto', got {self.devices!r}")
        _positive("num_nodes", self.num_nodes)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("precision", self.precision, PRECISIONS)
        if self.accelerator == "cpu" and self.precision == "16-mixed":
            raise DeepmorphValueError("precision: '16-mixed' needs a GPU; use 'bf16-mixed' on CPUs")
        if self.accelerator == "cpu" and self.sync_batchnorm and self.processes != 1:
            raise DeepmorphValueError("sync_batchnorm: needs GPUs (torch's SyncBatchNorm has no CPU version)")
        if self.deterministic not in (True, False, "warn"):
            raise DeepmorphValueError(f"deterministic: must be true, false or 'warn', got {self.deterministic!r}")
        if self.gradient_clip is not None:
            _positive("gradient_clip", self.gradient_clip)

    @property
    def processes(self) -> int | None:
        """Training processes (``devices * num_nodes``), None where ``devices`` is ``"auto"``."""
        return None if self.devices == "auto" else self.devices * self.num_nodes

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Read a run config from a YAML file (an empty file gives the defaults)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise DeepmorphIOError(f"{path}: cannot read the run config ({error.strerror or error})") from error
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DeepmorphValueError(f"{path}: not valid YAML ({error})") from error
        try:
            return cls.from_dict(data)
        except DeepmorphValueError as error:
            raise DeepmorphValueError(f"{path}: {error}") from error

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; written atomically to ``path`` when given."""
        text = "# deepmorph run config\n" + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            write_text_atomic(path, text)
        return text

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with some values replaced.

        Keys are dotted paths (``{"optimizer.lr": 1e-4}``, as from command-line flags) or nested
        mappings (``{"optimizer": {"lr": 1e-4}}``); mappings merge into the existing ones, so
        ``{"model.kwargs.dropout": 0.5}`` keeps the other model arguments.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            *parents, leaf = str(key).split(".")
            node = data
            for part in parents:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise DeepmorphValueError(f"override {key!r}: {part!r} is not a section")
                node = child
            _merge(node, leaf, value)
        return RunConfig.from_dict(data)


def _merge(node: dict, key: str, value: Any) -> None:
    if isinstance(value, Mapping) and isinstance(node.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge(node[key], sub_key, sub_value)
    else:
        node[key] = _plain(value)
