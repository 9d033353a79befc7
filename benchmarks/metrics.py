"""Numbers the benchmark reports beyond :func:`maas_tasks.evaluate.compute_metrics`: calibration of the
scores (users read a score as a probability) and latency percentiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _true_class_probabilities(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
        raise ValueError(f"need n x K scores and n labels with n > 0, got {scores.shape} and {labels.shape}")
    return scores[np.arange(len(labels)), labels]


def log_loss(scores: np.ndarray, labels: np.ndarray, *, eps: float = 1e-15) -> float:
    """Mean negative log probability of the true class (``scores`` n x K, ``labels`` class indices).

    Probabilities are clipped at ``eps`` so one saturated wrong answer gives a large, finite loss.
    """
    return float(-np.log(np.clip(_true_class_probabilities(scores, labels), eps, 1.0)).mean())


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, *, bins: int = 10) -> float:
    """ECE: the row-weighted mean gap between confidence (max probability) and accuracy over equal-width
    confidence bins (Guo et al. 2017)."""
    _true_class_probabilities(scores, labels)  # shape check
    scores = np.asarray(scores, dtype=np.float64)
    confidence = scores.max(axis=1)
    correct = scores.argmax(axis=1) == np.asarray(labels)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap += members.sum() * abs(confidence[members].mean() - correct[members].mean())
    return float(gap / len(confidence))


def calibration_summary(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``log_loss``, ``ece`` (10 bins), ``mean_confidence`` (mean max probability), ``accuracy`` and
    ``saturated`` (share of rows whose max probability rounds to 1.0000)."""
    scores = np.asarray(scores, dtype=np.float64)
    confidence = scores.max(axis=1)
    return {
        "log_loss": log_loss(scores, labels),
        "ece": expected_calibration_error(scores, labels),
        "mean_confidence": float(confidence.mean()),
        "accuracy": float((scores.argmax(axis=1) == np.asarray(labels)).mean()),
        "saturated": float((confidence >= 0.99995).mean()),
    }


def latency_summary(seconds: Sequence[float], *, texts_per_request: int = 1) -> dict[str, Any]:
    """Percentiles (ms) and sequential throughput of request latencies measured one after another.

    Returns:
        ``requests``, ``p50_ms``, ``p95_ms``, ``p99_ms``, ``mean_ms``, ``max_ms``, ``requests_per_s``
        and ``texts_per_s`` (throughput of one client sending the requests back to back).
    """
    values = np.asarray(seconds, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latencies to summarise: send at least one request")
    total = float(values.sum())
    p50, p95, p99 = np.percentile(values, [50, 95, 99]) * 1000
    return {
        "requests": int(values.size),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(values.mean() * 1000),
        "max_ms": float(values.max() * 1000),
        "requests_per_s": values.size / total,
        "texts_per_s": values.size * texts_per_request / total,
    }
