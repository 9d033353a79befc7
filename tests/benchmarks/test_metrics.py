"""Tests of the benchmark's calibration and latency figures."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.metrics import calibration_summary, expected_calibration_error, latency_summary


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
