"""Tests of the benchmark's calibration and load figures."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.metrics import calibration_summary, expected_calibration_error, load_summary


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


def test_load_summary_is_throughput_over_the_window():
    # Four clients' requests overlapped: 40 answers of 10 ms in a 0.1 s window.
    summary = load_summary([0.01] * 40, window_seconds=0.1, texts_per_request=32, errors={"HTTP 500": 2, "timeout": 0})
    assert summary["requests"] == 40 and summary["errors"] == 2 and summary["error_kinds"] == {"HTTP 500": 2}
    assert summary["requests_per_s"] == pytest.approx(400) and summary["texts_per_s"] == pytest.approx(12800)
    assert summary["p50_ms"] == pytest.approx(10) and summary["p99_ms"] == pytest.approx(10)
    nothing = load_summary([], window_seconds=1.0, texts_per_request=1, errors={"connect: ConnectionRefusedError": 5})
    assert nothing["requests"] == 0 and nothing["p50_ms"] is None and nothing["texts_per_s"] == 0 and nothing["errors"] == 5
    with pytest.raises(ValueError, match="positive"):
        load_summary([0.01], window_seconds=0, texts_per_request=1)
