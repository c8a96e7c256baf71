"""Morphology classification without deep learning: a random forest on statmorph features.

The forest (Breiman 2001, Machine Learning 45, 5) is scikit-learn's
:class:`~sklearn.ensemble.RandomForestClassifier`, wrapped so that it remembers which feature
columns it was trained on, fills missing features (failed statmorph measurements are NaN) with the
training medians, and sees each measurement's ``failed`` flag (and statmorph's flags) as features
of their own: a failure is information, not a row to drop.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError

#: statmorph features the forest uses by default (rotation invariant: the orientation is left out).
FEATURE_COLUMNS = (
    "concentration", "asymmetry", "smoothness", "gini", "m20", "multimode", "intensity", "deviation",
    "sersic_n", "sersic_rhalf_pix", "ellipticity_asymmetry", "elongation_asymmetry", "r20_pix", "r80_pix",
    "rpetro_circ_pix", "sn_per_pixel",
)
#: Flag columns appended as numeric features (0/1 for ``failed``).
FLAG_COLUMNS = ("failed", "flag", "sersic_flag")
_FORMAT = "deepmorph.forest"
_FORMAT_VERSION = 1


def _matrix(features, columns: Sequence[str]) -> np.ndarray:
    """``(N, F)`` float64 matrix of ``columns`` from an astropy Table (or any mapping of columns)."""
    names = getattr(features, "colnames", None) or list(features.keys())
    missing = [c for c in columns if c not in names]
    if missing:
        raise DeepmorphValueError(f"feature table lacks the columns {', '.join(missing)}")
    cols = []
    for c in columns:
        values = np.asarray(features[c])
        if values.dtype.kind not in "biuf":
            raise DeepmorphValueError(f"feature column {c!r} is not numeric (dtype {values.dtype})")
        if hasattr(features[c], "mask"):  # masked astropy columns: masked -> NaN
            values = np.where(np.ma.getmaskarray(features[c]), np.nan, values.astype(np.float64))
        cols.append(values.astype(np.float64))
    return np.column_stack(cols) if cols else np.empty((0, 0))


class ForestClassifier:
    """A random forest on morphology features, with imputation and the feature list it needs.

    Use :func:`train_forest` to make one.

    Parameters
    ----------
    columns : sequence of str
        Table columns used as features, in order (flags included).
    classes : sequence of int
        Labels ``0 .. K-1`` whose probabilities :meth:`predict_proba` returns (a class absent from
        the training set gets probability 0).
    label_names : sequence of str, optional
        Names of the classes.
    seed : int
        Random state of the forest.
    n_estimators : int
        Number of trees.
    n_jobs : int
        Threads (joblib) used to fit and predict.
    **forest_kwargs
        Other :class:`sklearn.ensemble.RandomForestClassifier` arguments.
    """

    def __init__(self, columns: Sequence[str], classes: Sequence[int], label_names: Sequence[str] | None = None,
                 seed: int = 0, n_estimators: int = 300, n_jobs: int = 2, **forest_kwargs):
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.impute import SimpleImputer

        self.columns = tuple(columns)
        self.classes = np.asarray(classes, dtype=np.int64)
        self.label_names = tuple(label_names) if label_names is not None else tuple(str(c) for c in self.classes)
        if len(self.label_names) != len(self.classes):
            raise DeepmorphValueError(f"{len(self.label_names)} label names for {len(self.classes)} classes")
        self.seed = int(seed)
        self.imputer = SimpleImputer(strategy="median", keep_empty_features=True)
        self.forest = RandomForestClassifier(n_estimators=int(n_estimators), random_state=self.seed,
                                             n_jobs=int(n_jobs), **forest_kwargs)
        self.fitted = False

    # -- fitting and prediction ----------------------------------------------------------------------
    def fit(self, features, labels) -> ForestClassifier:
        """Fit the imputer (medians of ``features``) and the forest.

        Parameters
        ----------
        features : astropy.table.Table
            One row per galaxy, with :attr:`columns`.
        labels : array_like of int
            Class of each row, within :attr:`classes`.
        """
        x = _matrix(features, self.columns)
        y = np.asarray(labels)
        if y.ndim != 1 or len(y) != len(x):
            raise DeepmorphValueError(f"{len(y)} labels for {len(x)} feature rows")
        if len(y) == 0:
            raise DeepmorphValueError("no training rows")
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
            raise DeepmorphValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
        unknown = np.setdiff1d(np.unique(y), self.classes)
        if unknown.size:
            raise DeepmorphValueError(f"labels {unknown.tolist()} are not among the classes {self.classes.tolist()}")
        x = np.where(np.isinf(x), np.nan, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # all-NaN columns are kept (filled with 0), on purpose
            x = self.imputer.fit_transform(x)
        self.forest.fit(x, y)
        self.fitted = True
        return self

    def _x(self, features) -> np.ndarray:
        if not self.fitted:
            raise DeepmorphValueError("the forest is not trained yet (call fit or train_forest)")
        x = _matrix(features, self.columns)
        return self.imputer.transform(np.where(np.isinf(x), np.nan, x))

    def predict_proba(self, features) -> np.ndarray:
        """Class probabilities ``(N, K)``, columns in the order of :attr:`classes`."""
        p = self.forest.predict_proba(self._x(features))
        out = np.zeros((len(p), len(self.classes)))
        out[:, np.searchsorted(self.classes, self.forest.classes_)] = p
        return out

    def predict(self, features) -> np.ndarray:
        """Most probable class of each row (int64 labels)."""
        return self.classes[np.argmax(self.predict_proba(features), axis=1)]

    @property
    def feature_importances(self) -> dict[str, float]:
        """Mean decrease in impurity of each feature column (Breiman 2001), summing to 1."""
        if not self.fitted:
            raise DeepmorphValueError("the forest is not trained yet")
        return {c: float(v) for c, v in zip(self.columns, self.forest.feature_importances_, strict=True)}

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Pickle the classifier to ``path`` (written to a temporary file, then renamed).

        Only load files you trust: unpickling runs code.
        """
        import sklearn

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "sklearn": sklearn.__version__, "model": self}
        try:
            with open(tmp, "wb") as fh:
                pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise DeepmorphIOError(f"{path}: cannot write the forest ({exc.strerror or exc})") from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ForestClassifier:
        """Read a classifier written by :meth:`save` (a trusted file: unpickling runs code)."""
        import sklearn

        path = Path(path)
        if not path.is_file():
            raise DeepmorphIOError(f"{path}: no such file")
        try:
            with open(path, "rb") as fh:
                payload = pickle.load(fh)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as exc:
            raise DeepmorphIOError(f"{path}: not a saved forest ({type(exc).__name__}: {exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise DeepmorphIOError(f"{path}: not a saved deepmorph forest")
        if not isinstance(payload.get("model"), cls):
            raise DeepmorphIOError(f"{path}: not a saved deepmorph forest")
        if payload.get("sklearn") != sklearn.__version__:
            warnings.warn(f"{path}: saved with scikit-learn {payload.get('sklearn')}, loaded with "
                          f"{sklearn.__version__}; predictions may differ", stacklevel=2)
        return payload["model"]

    def __repr__(self) -> str:
        state = "trained" if self.fitted else "untrained"
        return (f"ForestClassifier({state}, {self.forest.n_estimators} trees, {len(self.columns)} features, "
                f"classes={list(self.label_names)})")


def train_forest(
    features,
    labels,
    seed: int = 0,
    n_estimators: int = 300,
    n_jobs: int = 2,
    columns: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    **forest_kwargs,
) -> ForestClassifier:
    """Train a random forest (Breiman 2001) on statmorph features.

    Parameters
    ----------
    features : astropy.table.Table
        Output of :func:`~deepmorph.measure.morphology_features` (or any table with ``columns``).
    labels : array_like of int
        Class of each row (``0 .. K-1``).
    seed : int
        Random state: the same seed and data give the same forest, whatever ``n_jobs``.
    n_estimators : int
        Number of trees.
    n_jobs : int
        Threads for fitting and prediction.
    columns : sequence of str, optional
        Feature columns; default :data:`FEATURE_COLUMNS` + :data:`FLAG_COLUMNS` (those of the flag
        columns present in ``features``).
    label_names : sequence of str, optional
        Class names; their number fixes ``K`` (default ``max(labels) + 1``).
    **forest_kwargs
        Passed to :class:`sklearn.ensemble.RandomForestClassifier` (e.g. ``min_samples_leaf``,
        ``class_weight``).

    Returns
    -------
    ForestClassifier
        Trained; ``predict``, ``predict_proba``, ``save``, ``feature_importances``.

    Notes
    -----
    Missing features (NaN: failed measurements) are replaced by the training set's medians
    (scikit-learn ``SimpleImputer``); the ``failed`` flag is a feature, so the forest can still
    tell failures apart. This is the classical non-parametric route (CAS: Conselice 2003;
    Gini-M20: Lotz et al. 2004; MID: Freeman et al. 2013; measured by statmorph,
    Rodriguez-Gomez et al. 2019) to which CNN classifiers are compared.
    """
    y = np.asarray(labels)
    if y.size and y.dtype.kind in "iuf" and np.nanmin(y) < 0:
        raise DeepmorphValueError("labels must be non-negative class indices")
    if columns is None:
        names = getattr(features, "colnames", None) or list(features.keys())
        columns = FEATURE_COLUMNS + tuple(c for c in FLAG_COLUMNS if c in names)
    if label_names is not None:
        k = len(label_names)
    else:
        if not y.size:
            raise DeepmorphValueError("no training rows")
        k = int(np.max(y)) + 1
    model = ForestClassifier(columns, range(k), label_names, seed=seed, n_estimators=n_estimators, n_jobs=n_jobs,
                             **forest_kwargs)
    return model.fit(features, labels)


__all__ = ["FEATURE_COLUMNS", "FLAG_COLUMNS", "ForestClassifier", "train_forest"]
