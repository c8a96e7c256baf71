"""Models built by name (after timm's ``create_model``).

>>> from deepmorph.models import create_model, list_models
>>> model = create_model("cnn", in_channels=1, num_outputs=4)
>>> "cnn" in list_models()
True

Every registered model is a plain :class:`torch.nn.Module` with the same interface:

- ``in_channels`` and ``num_outputs`` attributes;
- ``blocks``: an :class:`~torch.nn.ModuleList` of feature stages, from the input down
  (fine-tuning freezes the first ``K`` of them, :func:`deepmorph.training.freeze`);
- ``head``: the module that turns features into outputs (replaced by ``new_head`` fine-tuning);
- ``forward_features(x)``, ``forward_head(features)`` and ``forward(x)``, the composition of the two.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from deepmorph.errors import DeepmorphValueError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Class or function decorator: make ``create_model(name, **kwargs)`` build it.

    Raises
    ------
    DeepmorphValueError
        If ``name`` is already registered.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise DeepmorphValueError(f"model name {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = builder
        return builder

    return decorator


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with keyword arguments ``kwargs``.

    Raises
    ------
    DeepmorphValueError
        If no model is registered as ``name`` (the message lists the known names), or if the model
        does not accept one of ``kwargs``.
    """
    if name not in _REGISTRY:
        raise DeepmorphValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    builder = _REGISTRY[name]
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as error:  # an unknown or missing keyword: say which model
        raise DeepmorphValueError(f"model {name!r}: {error}") from error
    return builder(**kwargs)


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)
