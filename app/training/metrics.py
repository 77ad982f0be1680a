"""Evaluation metrics: accuracy, macro-F1, MCC (classification); Pearson, Spearman, MSE (regression)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

ArrayLike = Sequence[int] | Sequence[float] | NDArray[np.generic]


def primary_metric(task_type: str) -> str:
    """The metric that selects the best epoch and is reported first."""
    if task_type == "classification":
        return "accuracy"
    if task_type == "regression":
        return "pearson"
    raise ValueError(f"unknown task type {task_type!r}")


def compute_metrics(task_type: str, y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Metrics of predictions against the truth: class ids for classification, values for regression."""
    truth = np.asarray(y_true)
    predicted = np.asarray(y_pred)
    if truth.shape != predicted.shape or truth.ndim != 1:
        raise ValueError(
            f"y_true and y_pred must be 1-D and equal in length, got {truth.shape} and {predicted.shape}"
        )
    if truth.size == 0:
        raise ValueError("cannot compute metrics of zero examples")
    if task_type == "classification":
        return _classification(truth, predicted)
    if task_type == "regression":
        return _regression(truth.astype(np.float64), predicted.astype(np.float64))
    raise ValueError(f"unknown task type {task_type!r}")


def _classification(truth: NDArray[np.generic], predicted: NDArray[np.generic]) -> dict[str, float]:
    # scipy and sklearn are imported where they are used: they cost ~1.4 s, and the service imports this
    # module at every start (the jobs API) but scores only when it trains.
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        # zero_division=0: a class never predicted scores 0 instead of raising a warning.
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "mcc": _mcc(truth, predicted),
    }


def _mcc(truth: NDArray[np.generic], predicted: NDArray[np.generic]) -> float:
    from sklearn.metrics import matthews_corrcoef

    # One class in all of truth and predictions: MCC is undefined and sklearn warns; report 0 as it does.
    if np.union1d(truth, predicted).size < 2:
        return 0.0
    return float(matthews_corrcoef(truth, predicted))


def _regression(truth: NDArray[np.float64], predicted: NDArray[np.float64]) -> dict[str, float]:
    from scipy import stats

    return {
        "pearson": _correlation(stats.pearsonr, truth, predicted),
        "spearman": _correlation(stats.spearmanr, truth, predicted),
        "mse": float(np.mean((truth - predicted) ** 2)),
    }


def _correlation(
    method: Callable[[NDArray[np.float64], NDArray[np.float64]], Any],
    truth: NDArray[np.float64],
    predicted: NDArray[np.float64],
) -> float:
    # Undefined for a constant input (or one example): report 0, as MCC does, instead of NaN,
    # so that "best epoch" comparisons and JSON reports keep working.
    if truth.size < 2 or np.ptp(truth) == 0 or np.ptp(predicted) == 0:
        return 0.0
    value = float(method(truth, predicted)[0])
    return value if math.isfinite(value) else 0.0
