"""Regression with uncertainties: a heteroscedastic Gaussian per target (the network predicts a
mean and a log-variance for each), for structural parameters measured by a CNN.

Targets go through a :class:`TargetCoder`: each catalogue column is mapped to the space the network
predicts in (magnitudes as they are, radii and Sersic indices as log10, position angles as
``(cos 2PA, sin 2PA)`` so that 0 and 180 degrees meet), then standardised with the training set's
mean and standard deviation. :meth:`TargetCoder.decode` maps predictions back, with 1-sigma errors
propagated to first order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from deepmorph.errors import DeepmorphValueError
from deepmorph.tasks.base import Task
from deepmorph.training.config import RunConfig

#: How each kind of target is encoded.
ENCODINGS = ("linear", "log10", "angle180")


@dataclasses.dataclass(frozen=True)
class TargetCoder:
    """Catalogue columns <-> standardised network targets.

    Parameters
    ----------
    columns : sequence of str
        Catalogue columns, in the order a dataset's ``target`` vector holds them.
    encodings : sequence of str
        Per column: ``linear`` (as is), ``log10`` (positive quantities: radii, Sersic index) or
        ``angle180`` (degrees with period 180: two network outputs, cos and sin of twice the angle).
    mean, std : sequence of float, optional
        Standardisation of the encoded targets (fitted by :meth:`fit`).
    sigma_scale : sequence of float, optional
        Per column, a factor applied to the decoded errors: the recalibration fitted on held-out
        data (:meth:`recalibrated`) so that the 1-sigma interval covers 68.3% of truths.
    """

    columns: tuple[str, ...]
    encodings: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    sigma_scale: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "columns", tuple(str(c) for c in self.columns))
        object.__setattr__(self, "encodings", tuple(str(e) for e in self.encodings))
        if not self.columns or len(self.columns) != len(self.encodings):
            raise DeepmorphValueError(f"TargetCoder: {len(self.columns)} columns but {len(self.encodings)} encodings")
        bad = [e for e in self.encodings if e not in ENCODINGS]
        if bad:
            raise DeepmorphValueError(f"TargetCoder: unknown encoding(s) {bad}; choose from {', '.join(ENCODINGS)}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != self.size:
                    raise DeepmorphValueError(f"TargetCoder: {name} has {len(value)} values for {self.size} outputs")
                object.__setattr__(self, name, value)
        if self.sigma_scale is not None:
            scale = tuple(float(v) for v in self.sigma_scale)
            if len(scale) != len(self.columns) or not all(math.isfinite(v) and v > 0 for v in scale):
                raise DeepmorphValueError(f"TargetCoder: sigma_scale must be {len(self.columns)} positive numbers, "
                                          f"got {self.sigma_scale}")
            object.__setattr__(self, "sigma_scale", scale)

    @property
    def size(self) -> int:
        """Number of encoded targets (an ``angle180`` column takes two)."""
        return sum(2 if e == "angle180" else 1 for e in self.encodings)

    def _encode_raw(self, values: torch.Tensor) -> torch.Tensor:
        parts = []
        for k, enc in enumerate(self.encodings):
            v = values[:, k].double()
            if enc == "linear":
                parts.append(v[:, None])
            elif enc == "log10":
                if (v <= 0).any():
                    raise DeepmorphValueError(f"target {self.columns[k]!r} must be positive for a log10 encoding")
                parts.append(torch.log10(v)[:, None])
            else:
                rad = torch.deg2rad(2.0 * v)
                parts.append(torch.stack([torch.cos(rad), torch.sin(rad)], dim=1))
        return torch.cat(parts, dim=1)

    def fit(self, values) -> TargetCoder:
        """A copy standardised on ``values`` ``(N, len(columns))`` (training-set catalogue values)."""
        encoded = self._encode_raw(torch.as_tensor(np.asarray(values, dtype=np.float64)))
        std = encoded.std(dim=0).clamp_min(1e-6)
        return dataclasses.replace(self, mean=tuple(encoded.mean(dim=0).tolist()), std=tuple(std.tolist()))

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Standardised targets ``(B, size)`` of catalogue values ``(B, len(columns))``."""
        if self.mean is None:
            raise DeepmorphValueError("TargetCoder: call fit() on the training targets first")
        encoded = self._encode_raw(values)
        mean = torch.tensor(self.mean, dtype=encoded.dtype, device=encoded.device)
        std = torch.tensor(self.std, dtype=encoded.dtype, device=encoded.device)
        return ((encoded - mean) / std).to(values.dtype if values.is_floating_point() else torch.float32)

    def decode(self, mean: np.ndarray, sigma: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Catalogue values and 1-sigma errors from standardised predictions ``(N, size)``.

        Returns
        -------
        dict
            column -> (value, error) arrays; ``log10`` errors are propagated as
            ``ln(10) * value * sigma``, ``angle180`` ones as ``sigma_r / (2 r)`` in radians of the
            doubled angle, converted to degrees of the angle (``r`` the predicted vector's length);
            each error then multiplied by the column's ``sigma_scale`` when recalibrated.
        """
        m = np.asarray(mean, dtype=np.float64) * np.asarray(self.std) + np.asarray(self.mean)
        s = np.asarray(sigma, dtype=np.float64) * np.asarray(self.std)
        out, j = {}, 0
        for col, enc in zip(self.columns, self.encodings, strict=True):
            if enc == "linear":
                out[col] = (m[:, j], s[:, j])
                j += 1
            elif enc == "log10":
                value = 10.0 ** m[:, j]
                out[col] = (value, math.log(10.0) * value * s[:, j])
                j += 1
            else:
                c, sn = m[:, j], m[:, j + 1]
                r = np.hypot(c, sn)
                angle = (0.5 * np.degrees(np.arctan2(sn, c))) % 180.0
                err = np.degrees(0.5 * np.sqrt(0.5 * (s[:, j] ** 2 + s[:, j + 1] ** 2)) / np.maximum(r, 1e-6))
                out[col] = (angle, err)
                j += 2
        if self.sigma_scale is not None:
            out = {col: (v, e * f) for (col, (v, e)), f in zip(out.items(), self.sigma_scale, strict=True)}
        return out

    def recalibrated(self, z: np.ndarray, level: float = 0.6827) -> TargetCoder:
        """A copy whose errors are rescaled so that a fraction ``level`` of ``|z| <= 1``.

        Parameters
        ----------
        z : ndarray (N, len(columns))
            Errors of held-out predictions in units of their (current) 1-sigma errors, per column
            (NaNs ignored). Post-hoc recalibration (Kuleshov et al. 2018): one factor per column,
            the ``level`` quantile of ``|z|``, multiplying any earlier factor.
        """
        z = np.abs(np.asarray(z, dtype=np.float64))
        if z.ndim != 2 or z.shape[1] != len(self.columns):
            raise DeepmorphValueError(f"recalibrated: z must be (N, {len(self.columns)}), got shape {z.shape}")
        factors = np.array([np.nanquantile(col, level) if np.isfinite(col).any() else 1.0 for col in z.T])
        factors = np.where(np.isfinite(factors) & (factors > 0), factors, 1.0)
        old = np.asarray(self.sigma_scale) if self.sigma_scale is not None else np.ones(len(self.columns))
        return dataclasses.replace(self, sigma_scale=tuple((old * factors).tolist()))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> TargetCoder:
        return cls(**{k: d[k] for k in ("columns", "encodings", "mean", "std", "sigma_scale") if k in d})


class RegressTask(Task):
    """Heteroscedastic Gaussian regression: the model outputs a mean and a log-variance per target.

    The loss is the Gaussian negative log-likelihood ``0.5 * (log s^2 + (y - mu)^2 / s^2)`` of the
    standardised targets, so the network learns how sure it is of each galaxy; ``rmse`` (of the
    standardised means) is logged too.

    Parameters
    ----------
    model : nn.Module
        Maps (B, C, H, W) images to (B, 2 * coder.size) outputs: means, then log-variances.
    config : RunConfig
        The run's options.
    coder : TargetCoder
        Fitted target coding; batches carry the raw catalogue values as ``target``.
    augmentation : callable, optional
        Batched training augmentation; it must not change the targets (flips and rotations move
        position angles: use ``pa`` targets only with the augmentation's angle update, which this
        task applies to ``angle180`` columns).
    """

    def __init__(self, model: nn.Module, config: RunConfig, coder: TargetCoder, augmentation: Callable | None = None):
        if coder.mean is None:
            raise DeepmorphValueError("RegressTask: the target coder must be fitted")
        super().__init__(model, config, augmentation, hparams={"coder": coder.to_dict()})
        self.coder = coder
        self._angles = [k for k, e in enumerate(coder.encodings) if e == "angle180"]

    def augment(self, batch: dict) -> dict:
        if self.augmentation is None:
            return batch
        target = batch["target"].clone()
        if self._angles:
            images, _, pa = self.augmentation(batch["image"], pa_deg=target[:, self._angles])
            target[:, self._angles] = torch.as_tensor(pa, dtype=target.dtype, device=target.device)
        else:
            images, _, _ = self.augmentation(batch["image"])
        return {**batch, "image": images, "target": target}

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, log-variances) of raw model outputs, the log-variance kept within [-10, 10]."""
        k = self.coder.size
        return out[:, :k], out[:, k:].clamp(-10.0, 10.0)

    def shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        mu, log_var = self.split(self.model(batch["image"]))
        y = self.coder.encode(batch["target"])
        loss = 0.5 * (log_var + (y - mu) ** 2 * torch.exp(-log_var)).mean()
        self.log_epoch("loss", loss, stage, len(y))
        self.log_epoch("rmse", ((y - mu.detach()) ** 2).mean().sqrt(), stage, len(y))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised means and 1-sigma errors, each (B, coder.size)."""
        mu, log_var = self.split(self.model(batch["image"]))
        return mu, torch.exp(0.5 * log_var)


def predict_standardised(model: nn.Module, dataset, coder: TargetCoder,
                         batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Standardised means and sigmas ``(N, coder.size)`` of a model on a dataset, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    means, sigmas = [], []
    k = coder.size
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = dataset.batch(np.arange(start, min(len(dataset), start + batch_size)), device=device)
            out = model(batch["image"])
            means.append(out[:, :k].cpu().numpy())
            sigmas.append(torch.exp(0.5 * out[:, k:].clamp(-10.0, 10.0)).cpu().numpy())
    return np.concatenate(means), np.concatenate(sigmas)
