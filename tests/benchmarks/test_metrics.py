"""Tests of the benchmark's calibration and latency figures."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.metrics import calibration_summary, expected_calibration_error, latency_summary, log_loss


def test_log_loss_is_the_mean_negative_log_probability_of_the_truth():
    scores = np.array([[0.8, 0.2], [0.4, 0.6], [1.0, 0.0]])
    assert log_loss(scores, [0, 1, 0]) == pytest.approx(-(np.log(0.8) + np.log(0.6) + np.log(1.0)) / 3)
    # A saturated wrong answer costs a lot, but stays finite.
    assert log_loss(scores, [0, 1, 1]) == pytest.approx((-np.log(0.8) - np.log(0.6) - np.log(1e-15)) / 3)
    with pytest.raises(ValueError, match="n x K scores"):
        log_loss(scores, [0, 1])


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_saturated():
    # 10 rows at confidence 0.7, 7 of them right: perfectly calibrated.
    calibrated = np.tile([0.7, 0.3], (10, 1))
    labels = [0] * 7 + [1] * 3
    assert expected_calibration_error(calibrated, labels) == pytest.approx(0.0)
    saturated = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(saturated, labels) == pytest.approx(0.3)
    summary = calibration_summary(saturated, labels)
    assert summary["saturated"] == 1.0 and summary["mean_confidence"] == 1.0 and summary["accuracy"] == 0.7
    assert calibration_summary(calibrated, labels)["saturated"] == 0.0


def test_latency_summary():
    summary = latency_summary([0.001 * i for i in range(1, 101)], texts_per_request=4)
    assert summary["requests"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["max_ms"] == pytest.approx(100.0)
    assert summary["requests_per_s"] == pytest.approx(100 / 5.05)
    assert summary["texts_per_s"] == pytest.approx(4 * 100 / 5.05)
    with pytest.raises(ValueError, match="at least one request"):
        latency_summary([])
