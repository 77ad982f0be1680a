"""Evaluation metrics against hand-computed values, and the degenerate cases a small dev set hits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.training.metrics import compute_metrics, primary_metric


def test_classification_metrics_match_hand_computed_values() -> None:
    # confusion: class 0 -> [2 right, 1 wrong]; class 1 -> [1 right]; accuracy 3/4
    metrics = compute_metrics("classification", [0, 0, 0, 1], [0, 0, 1, 1])
    assert metrics["accuracy"] == pytest.approx(0.75)
    # F1(class 0) = 2*1*(2/3)/(1+2/3) = 0.8; F1(class 1) = 2*0.5*1/1.5 = 2/3
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # MCC = (TP*TN - FP*FN) / sqrt(...) = (1*2 - 1*0) / sqrt(2*1*3*2)
    assert metrics["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_classification_accepts_numpy_and_many_classes() -> None:
    truth = np.array([0, 1, 2, 2, 1, 0])
    metrics = compute_metrics("classification", truth, truth.copy())
    assert metrics == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}


def test_single_class_and_never_predicted_classes_do_not_warn() -> None:
    # pytest turns warnings into errors here: these must quietly give defined numbers.
    assert compute_metrics("classification", [1, 1], [1, 1]) == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 0.0}
    metrics = compute_metrics("classification", [0, 1, 2], [2, 2, 2])
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["mcc"] == 0.0


def test_regression_metrics() -> None:
    metrics = compute_metrics("regression", [1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 5.0])
    assert metrics["mse"] == pytest.approx((0.25 + 0 + 0.25 + 1) / 4)
    assert metrics["spearman"] == pytest.approx(1.0)
    assert metrics["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 2.0, 2.5, 5.0])[0, 1])


def test_constant_regression_predictions_score_zero_correlation() -> None:
    metrics = compute_metrics("regression", [1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert metrics["pearson"] == 0.0
    assert metrics["spearman"] == 0.0
    assert metrics["mse"] == pytest.approx(2 / 3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="equal in length"):
        compute_metrics("classification", [0, 1], [0])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics("regression", [], [])
    with pytest.raises(ValueError, match="unknown task type"):
        compute_metrics("ranking", [0], [0])


def test_primary_metric() -> None:
    assert primary_metric("classification") == "accuracy"
    assert primary_metric("regression") == "pearson"
    with pytest.raises(ValueError, match="unknown task type"):
        primary_metric("ranking")
