"""Numbers the benchmark reports beyond :func:`maas_tasks.evaluate.compute_metrics`: a fuller picture of
calibration (users read a score as a probability) and latency percentiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maas_tasks.evaluate import expected_calibration_error


def calibration_summary(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``log_loss``, ``ece`` (10 bins), ``mean_confidence`` (mean max probability), ``accuracy`` and
    ``saturated`` (share of rows whose max probability rounds to 1.0000)."""
    from sklearn.metrics import log_loss

    scores = np.asarray(scores, dtype=np.float64)
    confidence = scores.max(axis=1)
    return {
        "log_loss": float(log_loss(labels, scores / scores.sum(axis=1, keepdims=True), labels=list(range(scores.shape[1])))),
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
