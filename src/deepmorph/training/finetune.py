"""Fine-tuning ("domain adaptation"): start from a trained run's weights and freeze some layers.

The lecture's three choices, depending on how close the new data are to the old:

- ``freeze(model, "head")``: recycle the features, train only the head (the fully connected part);
- ``freeze(model, "blocks:K")``: freeze the first ``K`` blocks, fine-tune the deeper ones;
- ``freeze(model, "none")``: fine-tune every layer, starting from the loaded weights.

Frozen layers keep their weights *and* their batch-normalisation statistics: their BatchNorm
layers stay in evaluation mode (running mean and variance used, not updated) even when the model
is put in training mode, through a forward pre-hook. Keras' ``trainable = False`` does the same.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.models import create_model

if TYPE_CHECKING:
    from deepmorph.training.config import RunConfig

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Layers that behave differently in training: frozen ones run in eval mode (batch norms keep
#: their statistics, dropout is off, so a new head learns on the features it will see).
_MODE_LAYERS = _BATCHNORMS + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: Where :func:`load_weights` looks in a run directory, in order.
RUN_WEIGHTS = ("model.pt", "checkpoints/best.ckpt", "checkpoints/last.ckpt")


def parse_freeze_mode(mode: str) -> tuple[str, int]:
    """``"none"`` -> ("none", 0), ``"head"`` -> ("head", 0), ``"blocks:K"`` -> ("blocks", K)."""
    if mode in ("none", "head"):
        return mode, 0
    match = re.fullmatch(r"blocks:(\d+)", str(mode))
    if not match:
        raise DeepmorphValueError(f"freeze mode must be 'none', 'head' or 'blocks:K' (K an integer), got {mode!r}")
    return "blocks", int(match.group(1))


def _keep_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of batch-norm and dropout layers: frozen ones run in eval mode whatever
    ``train()`` said."""
    if module.frozen_stats:
        module.train(False)


def freeze(model: nn.Module, mode: str = "none") -> list[str]:
    """Freeze part of ``model`` for fine-tuning; returns the names of the trainable parameters.

    Parameters
    ----------
    model : nn.Module
        A model with the registry's interface (``blocks`` and ``head``, :mod:`deepmorph.models`).
    mode : {"none", "head", "blocks:K"}
        ``none``: everything trains. ``head``: only ``model.head`` trains. ``blocks:K``: the first
        ``K`` entries of ``model.blocks`` are frozen. A new call replaces the previous freezing.

    Raises
    ------
    DeepmorphValueError
        For an unknown mode, a model without ``blocks``/``head``, or ``K > len(model.blocks)``.
    """
    kind, k = parse_freeze_mode(mode)
    for module in model.modules():  # undo a previous call
        if isinstance(module, _MODE_LAYERS) and getattr(module, "frozen_stats", False):
            module.frozen_stats = False
    model.requires_grad_(True)
    if kind == "head":
        if not isinstance(getattr(model, "head", None), nn.Module):
            raise DeepmorphValueError(f"freeze 'head': {type(model).__name__} has no 'head' module")
        frozen = [module for name, module in model.named_children() if name != "head"]
    elif kind == "blocks":
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or k > len(blocks):
            n = len(blocks) if isinstance(blocks, nn.ModuleList) else 0
            raise DeepmorphValueError(f"freeze 'blocks:{k}': {type(model).__name__} has {n} blocks")
        frozen = list(blocks[:k])
    else:
        frozen = []
    for part in frozen:
        part.requires_grad_(False)
        for module in part.modules():
            if isinstance(module, _MODE_LAYERS):
                if not hasattr(module, "frozen_stats"):
                    module.register_forward_pre_hook(_keep_eval)
                # eval mode is set by the hook at each forward (setting it now would only make
                # Lightning warn about modules in eval mode at the start of training)
                module.frozen_stats = True
    return [name for name, p in model.named_parameters() if p.requires_grad]


class LoadedWeights(NamedTuple):
    """What :func:`load_weights` did: the file read and the keys it could not match."""

    path: Path
    missing_keys: list[str]
    unexpected_keys: list[str]


def find_weights(source: str | Path) -> Path:
    """The weights file of a run directory (``model.pt``, else the best, else the last checkpoint) or a file."""
    source = Path(source)
    if source.is_dir():
        for relative in RUN_WEIGHTS:
            if (source / relative).is_file():
                return source / relative
        raise DeepmorphIOError(f"{source}: no weights found (looked for {', '.join(RUN_WEIGHTS)})")
    if not source.is_file():
        raise DeepmorphIOError(f"{source}: no such weights file or run directory")
    return source


def read_state_dict(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model's state dict from a run directory, a Lightning checkpoint or a ``torch.save``'d state dict.

    Lightning checkpoints hold the task's state dict; the model's entries (prefix ``model.``) are
    returned without the prefix. Files are read with ``weights_only=True`` (no code executed).
    """
    path = find_weights(source)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, or a pickle of more than tensors
        raise DeepmorphIOError(f"{path}: cannot read weights ({error})") from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = {key[len("model."):]: value for key, value in data["state_dict"].items() if key.startswith("model.")}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise DeepmorphIOError(f"{path}: not a state dict or a Lightning checkpoint")
    return path, data


def load_weights(
    model: nn.Module, source: str | Path, strict: bool = False, new_head: bool = False
) -> LoadedWeights:
    """Load weights from a run (or a checkpoint/state-dict file) into ``model``.

    Parameters
    ----------
    model : nn.Module
        The model to fill in place.
    source : path
        A run directory (:data:`RUN_WEIGHTS` are tried in order), a ``.ckpt`` or a state-dict file.
    strict : bool
        Raise if a parameter of ``model`` is not in the file or the file has unknown ones.
    new_head : bool
        Skip the file's ``head.*`` weights and keep ``model``'s freshly initialised head: for a
        new number of classes or outputs.

    Raises
    ------
    DeepmorphValueError
        If a weight's shape differs (the message suggests ``new_head`` for head weights), or with
        ``strict`` if keys do not match.
    """
    path, state = read_state_dict(source)
    if new_head:
        state = {key: value for key, value in state.items() if not key.startswith("head.")}
    own = model.state_dict()
    mismatched = [key for key in state if key in own and own[key].shape != state[key].shape]
    if mismatched:
        in_head = any(k.startswith("head.") for k in mismatched)
        hint = "; pass new_head=True for a new number of outputs" if in_head else ""
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:5])
        raise DeepmorphValueError(f"{path}: weights of another shape than the model's: {details}{hint}")
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not (new_head and key.startswith("head."))]
    if strict and (missing or result.unexpected_keys):
        raise DeepmorphValueError(
            f"{path}: weights do not match the model: missing {_few(missing)}; "
            f"unexpected {_few(result.unexpected_keys)}"
        )
    return LoadedWeights(path, missing, list(result.unexpected_keys))


def _few(keys: Sequence[str]) -> str:
    return (", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")) or "none"


def build_model(config: RunConfig, **kwargs) -> nn.Module:
    """The model a run config describes, initialised from ``config.seed``, with its fine-tuning applied.

    ``kwargs`` (e.g. ``num_outputs``, ``in_channels`` from the data) update ``config.model.kwargs``.
    The initialisation uses its own random stream, so the global one is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = create_model(config.model.name, **{**config.model.kwargs, **kwargs})
    options = config.finetune
    if options.weights is not None:
        load_weights(model, options.weights, strict=options.strict, new_head=options.new_head)
    freeze(model, options.freeze)
    return model
