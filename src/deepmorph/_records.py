"""Frozen parameter dataclasses to and from JSON-friendly dicts (priors, normalisation, augmentation)."""

from __future__ import annotations

import dataclasses

from deepmorph.errors import DeepmorphValueError


def record_from_dict(cls, d: dict, what: str):
    """Build the dataclass ``cls`` from ``d`` (JSON lists become tuples); unknown keys are an error.

    ``what`` names the parameters in the message, e.g. ``"prior"`` -> "unknown prior(s): ...".
    """
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise DeepmorphValueError(f"unknown {what}(s): {', '.join(sorted(unknown))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
