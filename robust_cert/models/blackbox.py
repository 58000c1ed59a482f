"""Black-box classifiers: scikit-learn, XGBoost, LightGBM and pyfunc-style models that give
class probabilities and no input gradients, wrapped as a Classifier.

Every batch goes through numpy: the per-sample shape is flattened to the feature vector the
estimator was fitted on (a tabular row of ``n_features``), cast to the dtype it expects, put
in a DataFrame when it was fitted on named columns, and its probabilities are checked and
returned as log-probability logits. ``differentiable`` is False: metrics that need only
outputs run (accuracy, robust accuracy with the Square attack alone, noise, smoothing, rare
events, corruptions on image-shaped inputs, calibration, parity); a policy asking for a
white-box metric or attack on such a model is refused before anything runs
(:func:`robust_cert.api.certify`).

The core never imports MLflow: the MLflow plugin loads the flavor
(:mod:`robust_cert.mlflow_plugin.loaders`) and hands the estimator, or a pyfunc's
``predict``, to :func:`from_estimator` or :func:`from_predict`. pandas, xgboost and lightgbm
are imported only when the model at hand needs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import DTypeLike

from robust_cert.errors import DataError, ModelError
from robust_cert.models.base import Classifier

#: The formats of black-box Classifiers (``Classifier.format``); gradient metrics and attacks
#: on them are refused at validation (see :func:`robust_cert.api.refuse_white_box`).
FORMATS = ("sklearn", "xgboost", "lightgbm", "pyfunc")

#: Largest number of rows sent to the model in one call (bounds its memory use).
DEFAULT_MAX_BATCH = 4096

#: A row of probabilities may differ from a sum of 1 by at most this (float32 outputs of
#: boosters, a pyfunc's own normalisation), and an entry may be this far below 0.
PROBABILITY_TOLERANCE = 1e-4

#: The logarithm's floor: log-probabilities are clamped at log of the smallest normal float32
#: (−87.3), as :func:`robust_cert.models.base.with_log_probabilities` does.
_TINY = float(np.finfo(np.float32).tiny)

#: How a user logs a model whose pyfunc ``predict`` returns probabilities.
HOW_TO_LOG = ("log the model so that predict returns one probability per class, e.g. "
              "mlflow.sklearn.log_model(model, name=..., pyfunc_predict_fn=\"predict_proba\"), "
              "or a PythonModel whose predict returns predict_proba(...)")


def check_probabilities(out, rows: int, source: str, *, pyfunc: bool = False) -> np.ndarray:
    """``out`` as a float64 array (rows, classes) of probabilities, or ModelError.

    Guarantees on return: 2-D with ``rows`` rows and at least 2 columns, finite, every entry
    ≥ 0 (entries down to −:data:`PROBABILITY_TOLERANCE` are set to 0) and every row sum within
    :data:`PROBABILITY_TOLERANCE` of 1. One value per row, integer or boolean outputs are
    refused as labels; with ``pyfunc`` the message says how to log a probability model.
    """
    return np.maximum(_checked(out, rows, source, pyfunc), 0.0)


def _checked(out, rows: int, source: str, pyfunc: bool) -> np.ndarray:
    """:func:`check_probabilities` without the final clip at 0: ``out`` as float64 (no copy
    when it is float64 already), every entry ≥ −:data:`PROBABILITY_TOLERANCE`.

    The values are checked with two reductions over the batch (its minimum and its largest
    row-sum error), whose comparisons are false for NaN and fail for ±inf (an infinite entry
    makes the minimum −inf or its row's sum ±inf or NaN), so a valid batch costs no more; a
    failing one is then diagnosed (:func:`_refuse`) for its one-line message."""
    how = f"; {HOW_TO_LOG}" if pyfunc else ""
    if hasattr(out, "to_numpy"):  # a pandas DataFrame or Series
        out = out.to_numpy()
    arr = np.asarray(out)
    if arr.dtype == object or arr.dtype.kind in "USb":
        raise ModelError(f"{source}: the model returns {arr.dtype} values (labels?), not one "
                         f"probability per class{how}")
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        raise ModelError(f"{source}: the model returns one value per row (labels?), not one "
                         f"probability per class{how}")
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise ModelError(f"{source}: the model returns an array of shape {arr.shape} for "
                         f"{rows} rows; expected (rows, classes){how}")
    if arr.dtype.kind in "iu":
        raise ModelError(f"{source}: the model returns integers (labels?), not one "
                         f"probability per class{how}")
    arr = arr.astype(np.float64, copy=False)
    if arr.min() >= -PROBABILITY_TOLERANCE and \
            np.abs(arr.sum(1) - 1.0).max() <= PROBABILITY_TOLERANCE:
        return arr
    _refuse(arr, rows, source, how)
    raise AssertionError("unreachable: _refuse raises on a batch that failed the checks")


def _refuse(arr: np.ndarray, rows: int, source: str, how: str) -> None:
    """ModelError naming why ``arr`` (float64, (rows, classes)) is not probabilities: NaN or
    infinite rows, a negative entry, or a row sum off 1."""
    finite = np.isfinite(arr).all(1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ModelError(f"{source}: the model returns NaN or infinite probabilities "
                         f"({int((~finite).sum())} of {rows} rows, first row {bad} of the "
                         "batch)")
    if arr.min() < -PROBABILITY_TOLERANCE:
        raise ModelError(f"{source}: the model returns negative values (min {arr.min():.4g}), "
                         f"not probabilities{how}")
    sums = arr.sum(1)
    off = np.abs(sums - 1.0)
    if off.max() > PROBABILITY_TOLERANCE:
        i = int(off.argmax())
        raise ModelError(f"{source}: the model's output rows do not sum to 1 (row {i} of the "
                         f"batch sums to {sums[i]:.6g}; tolerance {PROBABILITY_TOLERANCE:g}), so "
                         f"they are not probabilities{how}")


class ProbaForward:
    """Callable ``Tensor -> Tensor``: a batch ``(N, *input_shape)`` flattened to ``(N, d)``
    rows, cast to ``dtype``, reshaped to ``(N, *feature_shape)`` when given (a pyfunc's
    tensor signature) or put in a DataFrame with ``columns`` (and per-column ``column_dtypes``)
    when given, passed to ``predict`` in calls of at most ``max_batch`` rows; the checked
    probabilities (:func:`check_probabilities`) are returned as float32 log-probabilities,
    clamped at log(float32 tiny), on the batch's device."""

    def __init__(self, predict: Callable, *, n_features: int, source: str,
                 dtype: DTypeLike = np.float64,
                 columns: Sequence[str] | None = None, column_dtypes: dict | None = None,
                 feature_shape: tuple[int, ...] | None = None, pyfunc: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.predict, self.n_features, self.source = predict, int(n_features), source
        self.dtype, self.columns = np.dtype(dtype), list(columns) if columns else None
        self.column_dtypes = column_dtypes or {}
        self.feature_shape, self.pyfunc, self.max_batch = feature_shape, pyfunc, max_batch
        self.num_classes = 0  # set once known, to shape the answer for an empty batch

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Checked probabilities (float64, (N, classes)) of feature rows ``(N, d)``."""
        return check_probabilities(self._ask(rows), rows.shape[0], self.source,
                                   pyfunc=self.pyfunc)

    def _ask(self, rows: np.ndarray):
        """The model's raw answer for feature rows ``(N, d)``, in the form it takes."""
        arr = rows.astype(self.dtype, copy=False)
        if self.feature_shape is not None:
            arr = arr.reshape(rows.shape[0], *self.feature_shape)
        if self.columns is not None:
            import pandas as pd

            arr = pd.DataFrame(arr, columns=self.columns, copy=False)
            if self.column_dtypes:
                arr = arr.astype(self.column_dtypes)
        return self.predict(arr)

    def _log_probabilities(self, rows: np.ndarray) -> np.ndarray:
        """``log(max(p, float32 tiny))`` in float64 of the checked probabilities ``p`` of
        ``rows`` (the clip at float32 tiny also does :func:`check_probabilities`' clip at 0)."""
        p = _checked(self._ask(rows), rows.shape[0], self.source, self.pyfunc)
        out = np.maximum(p, _TINY)
        return np.log(out, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # a CPU tensor is read in place (numpy), without torch operations: at the Square
        # attack's query batches their dispatch costs more than the reshape itself
        if x.requires_grad:
            x = x.detach()
        if x.device.type == "cpu":
            return torch.from_numpy(self.logits_numpy(x.numpy()))
        return torch.from_numpy(self.logits_numpy(x.to("cpu").numpy())).to(x.device)

    def logits_numpy(self, arr: np.ndarray) -> np.ndarray:
        """The float32 logits (N, classes) of a batch ``arr`` (N, …) as an array: what
        ``self(torch.from_numpy(arr))`` returns, without torch."""
        n = arr.shape[0]
        rows = arr.reshape(n, math.prod(arr.shape[1:]))
        if rows.shape[1] != self.n_features:
            raise ModelError(f"{self.source}: a sample has {rows.shape[1]} values; the model "
                             f"takes {self.n_features} features")
        if n == 0:  # the model is not asked about zero rows
            return np.zeros((0, self.num_classes), dtype=np.float32)
        if n <= self.max_batch:
            logits = self._log_probabilities(rows)
        else:
            logits = np.concatenate([self._log_probabilities(rows[s:s + self.max_batch])
                                     for s in range(0, n, self.max_batch)])
        return logits.astype(np.float32)

    def numpy_forward(self) -> Callable[[np.ndarray], np.ndarray]:
        """:meth:`logits_numpy` (see :func:`robust_cert.models.base.numpy_forward`)."""
        return self.logits_numpy


def from_predict(
    predict: Callable,
    *,
    n_features: int,
    fmt: str,
    sha256: str,
    name: str = "model",
    input_shape: tuple[int, ...] | None = None,
    columns: Sequence[str] | None = None,
    column_dtypes: dict | None = None,
    feature_shape: tuple[int, ...] | None = None,
    dtype: DTypeLike = np.float64,
    classes: Sequence | None = None,
    extra: dict | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Classifier:
    """A black-box Classifier of ``predict`` (rows → probabilities (rows, classes)).

    Args:
        predict: called with a numpy array ``(N, n_features)`` (or ``(N, *feature_shape)``, or
            a DataFrame with ``columns``); returns one probability per class for each row.
        n_features: the length of the feature vector the model was fitted on.
        fmt: one of :data:`FORMATS`, recorded as ``Classifier.format``.
        sha256: the identity to record (e.g. the MLflow artifacts' hash).
        input_shape: the evaluation data's per-sample shape; used as the Classifier's
            ``input_shape`` when it holds exactly ``n_features`` values (an 8×8 image for a
            model fitted on 64 pixels), else DataError naming the mismatch (the columns the
            data lacks, when ``columns`` are known). Default: ``(n_features,)``.
        columns: the model's input column names (a DataFrame is built with them).
        classes: the estimator's ``classes_``; they must be the integers 0 … K−1 (labels
            are compared with the argmax index), else ModelError.

    Guarantees: a probe on two zero rows returns valid probabilities
    (:func:`check_probabilities`) — a model returning labels is refused here, before anything
    runs — and their width is the number of classes (equal to ``len(classes)`` when given).
    The Classifier runs on CPU, ``differentiable`` is False, ``forward`` returns
    log-probabilities and ``extra["outputs"]`` says so.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    n_features = int(n_features)
    if n_features < 1:
        raise ModelError(f"{name}: the model takes {n_features} features")
    shape = _input_shape(name, n_features, input_shape, columns)
    forward = ProbaForward(predict, n_features=n_features, source=name, dtype=dtype,
                           columns=columns, column_dtypes=column_dtypes,
                           feature_shape=feature_shape, pyfunc=fmt == "pyfunc",
                           max_batch=max_batch)
    try:
        probe = forward.probabilities(np.zeros((2, n_features)))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{name}: the model failed on 2 rows of {n_features} features: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from exc
    num_classes = probe.shape[1]
    if classes is not None:
        cls = np.asarray(classes)
        if len(cls) != num_classes:
            raise ModelError(f"{name}: the model has {len(cls)} classes but returns "
                             f"{num_classes} probabilities per row")
        if cls.dtype.kind not in "iub" or not np.array_equal(cls, np.arange(num_classes)):
            shown = ", ".join(map(repr, cls.tolist()[:6])) + (", …" if len(cls) > 6 else "")
            raise ModelError(f"{name}: the model's classes are [{shown}]; robust_cert compares "
                             f"labels with the column index of predict_proba, so fit it on the "
                             f"labels 0..{num_classes - 1} (e.g. with a LabelEncoder)")
    forward.num_classes = num_classes
    return Classifier(
        forward=forward,
        input_shape=shape,
        num_classes=num_classes,
        sha256=sha256,
        format=fmt,
        differentiable=False,
        device=torch.device("cpu"),
        name=name,
        extra={"outputs": "probabilities (converted to log-probabilities)",
               "features": n_features, **(extra or {})},
    )


def _input_shape(name: str, n_features: int, input_shape, columns) -> tuple[int, ...]:
    if input_shape is None:
        return (n_features,)
    shape = tuple(int(d) for d in input_shape)
    width = math.prod(shape)
    if width == n_features:
        return shape
    if columns:
        cols = list(columns)
        if width < n_features:
            missing = cols[width:]
            listed = ", ".join(map(repr, missing[:5])) + (", …" if len(missing) > 5 else "")
            raise DataError(f"{name} takes {n_features} input columns but the data has "
                            f"{width} features per sample: no data for column(s) {listed}")
        raise DataError(f"{name} takes {n_features} input columns ({', '.join(cols[:5])}"
                        f"{', …' if n_features > 5 else ''}) but the data has {width} "
                        "features per sample")
    raise DataError(f"data samples have shape {shape} ({width} values) but {name} takes "
                    f"{n_features} features")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def estimator_sha256(estimator) -> str:
    """SHA-256 of ``estimator``'s pickle (protocol 4): the identity of an in-memory estimator
    certified through the Python API (a logged model's is its artifacts')."""
    try:
        blob = pickle.dumps(estimator, protocol=4)
    except Exception as exc:
        raise ModelError(f"cannot hash the estimator {type(estimator).__name__} (pickling "
                         f"failed: {_first_line(exc)}); pass sha256") from None
    return hashlib.sha256(blob).hexdigest()


def estimator_format(estimator) -> str | None:
    """``"xgboost"``, ``"lightgbm"`` or ``"sklearn"`` for an object :func:`from_estimator`
    takes (an estimator with ``predict_proba``, or a native XGBoost / LightGBM Booster), else
    None. Cheap: reads the class's module, imports nothing."""
    module = type(estimator).__module__.split(".")[0]
    if module == "xgboost" and (type(estimator).__name__ == "Booster"
                                or hasattr(estimator, "predict_proba")):
        return "xgboost"
    if module == "lightgbm" and (type(estimator).__name__ == "Booster"
                                 or hasattr(estimator, "predict_proba")):
        return "lightgbm"
    if module != "torch" and hasattr(estimator, "predict_proba") and \
            hasattr(estimator, "fit"):
        return "sklearn"
    return None


def from_estimator(
    estimator,
    *,
    fmt: str | None = None,
    sha256: str | None = None,
    name: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    n_features: int | None = None,
    columns: Sequence[str] | None = None,
    extra: dict | None = None,
) -> Classifier:
    """A black-box Classifier of a fitted scikit-learn estimator with ``predict_proba``, an
    XGBoost or LightGBM classifier (sklearn API), or a native ``xgboost.Booster`` /
    ``lightgbm.Booster`` with a probability objective.

    ``fmt``: the format to record (default :func:`estimator_format`; the MLflow plugin passes
    its flavor). ``sha256``: default :func:`estimator_sha256`. ``name``: default the class
    name. ``n_features`` and ``columns`` (e.g. from an MLflow signature) are used where the
    estimator does not state them (``n_features_in_``, ``feature_names_in_``, a booster's own
    count). Input dtype: float32 for XGBoost (its own precision), float64 otherwise; the
    evaluation data are float32, so both hold them exactly. Native boosters: a binary
    objective's single probability p becomes the two columns (1 − p, p); an objective that
    gives no probabilities (regression, ranking, ``multi:softmax`` labels, raw margins) is
    refused. Other guarantees are :func:`from_predict`'s.
    """
    fmt = fmt or estimator_format(estimator)
    kind = estimator_format(estimator)
    label = name or type(estimator).__name__
    if kind is None:
        what = type(estimator).__name__
        raise ModelError(f"{label}: {what} has no predict_proba; robust_cert certifies "
                         "classifiers that give class probabilities (e.g. SVC(probability="
                         "True), or a classifier rather than a regressor)")
    assert fmt is not None  # given, or the estimator's format: kind, not None
    classes = getattr(estimator, "classes_", None)
    dtype = np.float32 if kind == "xgboost" else np.float64
    native = type(estimator).__name__ == "Booster"
    if native and kind == "xgboost":
        predict, count = _xgboost_booster(estimator, label)
    elif native:
        predict, count = _lightgbm_booster(estimator, label)
    else:
        predict, count = estimator.predict_proba, getattr(estimator, "n_features_in_", None)
    names = getattr(estimator, "feature_names_in_", None)
    if names is not None:
        columns = [str(c) for c in names]
    count = count or n_features or (len(columns) if columns else None)
    if count is None:
        if input_shape is None:
            raise ModelError(f"{label}: the number of input features is unknown (no "
                             "n_features_in_ and no signature); give the data's input shape")
        count = math.prod(int(d) for d in input_shape)
    record = {"estimator": f"{type(estimator).__module__}.{type(estimator).__qualname__}",
              **(extra or {})}
    return from_predict(predict, n_features=count, fmt=fmt,
                        sha256=sha256 or estimator_sha256(estimator), name=label,
                        input_shape=input_shape, columns=columns, dtype=dtype,
                        classes=classes, extra=record)


#: Native-booster objectives that give probabilities: binary (one column) and multi-class.
_XGB_BINARY = ("binary:logistic",)
_XGB_MULTI = ("multi:softprob",)
_LGB_BINARY = ("binary", "cross_entropy", "xentropy")
_LGB_MULTI = ("multiclass", "softmax")


def _two_columns(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def _xgboost_booster(booster, label: str):
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective not in _XGB_BINARY + _XGB_MULTI:
        raise ModelError(f"{label}: the XGBoost booster's objective {objective!r} gives no class "
                         f"probabilities; use {' or '.join(_XGB_BINARY + _XGB_MULTI)}")
    return (lambda x: _two_columns(booster.inplace_predict(x))), booster.num_features()


def _lightgbm_booster(booster, label: str):
    objective = str((booster.params or {}).get("objective", ""))
    if objective not in _LGB_BINARY + _LGB_MULTI:
        raise ModelError(f"{label}: the LightGBM booster's objective {objective!r} gives no "
                         f"class probabilities; use {' or '.join(_LGB_BINARY + _LGB_MULTI)}")
    return (lambda x: _two_columns(booster.predict(x))), booster.num_feature()


def check_columns(model: Classifier, feature_names: Sequence[str] | None,
                  source: str) -> None:
    """Refuse data whose named feature columns (a table's, ``feature_names``) are not the
    columns a model fitted on named columns takes, in its order: DataError naming the
    columns the data lacks, or the order to put them in. A model without column names, or
    data without them (arrays), is not checked: values then go by position."""
    columns = getattr(model.forward, "columns", None)
    if not columns or not feature_names:
        return
    names = [str(n) for n in feature_names]
    if names == list(columns):
        return
    who = f"{model.name} v{model.version}" if model.version else model.name
    lacking = [c for c in columns if c not in names]
    if lacking:
        raise DataError(f"{source}: {who} takes column(s) {', '.join(map(repr, columns))}; "
                        f"the data has no column {', '.join(map(repr, lacking))} (its "
                        f"features: {', '.join(map(repr, names))})")
    raise DataError(f"{source}: {who} takes its columns in the order "
                    f"{', '.join(map(repr, columns))}; the data has them in the order "
                    f"{', '.join(map(repr, names))}: reorder the table's columns")
