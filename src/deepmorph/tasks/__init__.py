"""Tasks: a model + an objective + its metrics, as thin LightningModules trained by :func:`deepmorph.training.fit`.

- :class:`Task`: the base (optimiser and schedule from the run config, augmentation, Keras-named logs);
- :class:`ClassifyTask`: morphology classification (cross-entropy, accuracy);
- :class:`SegmentTask`: per-pixel detection maps (binary cross-entropy, pixel F1), e.g. clumps;
- :class:`DecomposeTask`: component images, e.g. bulge and disk (scaled MSE + B/T error);
- :class:`RegressTask`: parameters with uncertainties (heteroscedastic Gaussian), coded by a :class:`TargetCoder`.
"""

from deepmorph.tasks.base import Task
from deepmorph.tasks.classify import ClassifyTask
from deepmorph.tasks.decompose import Decomposer, DecomposeTask, bulge_to_total, peak_scale
from deepmorph.tasks.regress import RegressTask, TargetCoder
from deepmorph.tasks.segment import SegmentTask

__all__ = [
    "ClassifyTask", "DecomposeTask", "Decomposer", "RegressTask", "SegmentTask", "TargetCoder", "Task",
    "bulge_to_total", "peak_scale",
]
