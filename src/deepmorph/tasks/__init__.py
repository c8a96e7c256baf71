"""Tasks: a model + an objective + its metrics, as thin LightningModules trained by :func:`deepmorph.training.fit`.

- :class:`Task`: the base (optimiser and schedule from the run config, augmentation, Keras-named logs);
- :class:`ClassifyTask`: morphology classification (cross-entropy, accuracy).
"""

from deepmorph.tasks.base import Task
from deepmorph.tasks.classify import ClassifyTask

__all__ = ["ClassifyTask", "Task"]
