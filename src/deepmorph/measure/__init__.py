"""Tools without deep learning: statmorph morphology, a random forest, classification metrics.

Everything here takes arrays and tables (and dataset files) and never loads a network checkpoint.

* :func:`segment`, :func:`morphology_features`, :func:`dataset_features` -- sep segmentation and
  statmorph CAS / Gini-M20 / MID / Sersic features, in parallel, cached in the dataset file;
* :func:`train_forest`, :class:`ForestClassifier` -- a random forest on those features;
* :func:`classification_metrics`, :func:`calibration` -- accuracy, per-class scores, confusion
  matrix, calibration error;
* :func:`confusion_figure`, :func:`reliability_figure` -- their figures.
"""

from deepmorph.measure.forest import FEATURE_COLUMNS, FLAG_COLUMNS, ForestClassifier, train_forest
from deepmorph.measure.metrics import calibration, classification_metrics
from deepmorph.measure.morphology import (
    CACHE_GROUP,
    FEATURE_NAMES,
    FEATURES,
    Segmentation,
    dataset_features,
    morphology_features,
    segment,
)
from deepmorph.measure.plots import confusion_figure, reliability_figure

__all__ = [
    "CACHE_GROUP", "FEATURES", "FEATURE_COLUMNS", "FEATURE_NAMES", "FLAG_COLUMNS", "ForestClassifier", "Segmentation",
    "calibration", "classification_metrics", "confusion_figure", "dataset_features", "morphology_features",
    "reliability_figure", "segment", "train_forest",
]
