"""Numbers the benchmark reports beyond :func:`maas_tasks.evaluate.compute_metrics`: a fuller picture of
calibration (users read a score as a probability), and throughput and latency percentiles under load."""

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


def load_summary(
    seconds: Sequence[float], *, window_seconds: float, texts_per_request: int, errors: dict[str, int] | None = None
) -> dict[str, Any]:
    """Throughput and latency percentiles of the requests that completed inside one timed window of a load run.

    Throughput is over the window's wall time, not the sum of the latencies, since with several clients
    requests overlap. Every failed request counts in ``errors``, wherever it happened, and in nothing else.

    Returns:
        ``requests`` (successful, in the window), ``errors`` and ``error_kinds`` ({kind: count}),
        ``window_seconds``, ``requests_per_s``, ``texts_per_s``, ``p50_ms``, ``p99_ms`` and ``mean_ms``
        (the latencies are None when no request succeeded).
    """
    if window_seconds <= 0:
        raise ValueError(f"window_seconds={window_seconds} must be positive")
    values = np.asarray(seconds, dtype=np.float64) * 1000
    kinds = {kind: int(n) for kind, n in sorted((errors or {}).items()) if n}
    p50, p99, mean = (float(v) for v in (*np.percentile(values, [50, 99]), values.mean())) if values.size else (None,) * 3
    return {
        "requests": int(values.size),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "window_seconds": float(window_seconds),
        "requests_per_s": values.size / window_seconds,
        "texts_per_s": values.size * texts_per_request / window_seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": mean,
    }
