"""Evaluation stage: metrics of a trained model on the held-out split, and the gate that decides promotion.

Metrics are computed in numpy (scikit-learn is not a dependency): accuracy, precision, recall, F1 and
ROC AUC (rank-based, ties averaged). For two classes the positive class is ``classes[1]`` (with the
sorted class names of the feature stage: ``"1"`` of 0/1, ``"positive"`` of negative/positive); for
more, macro averages and one-vs-rest macro AUC. The gate is a set of independent checks, so a new
rule (e.g. "beat the current champion") is one more check in :func:`decide_gate`.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow
from maas_tasks.train import model_file_key

log = logging.getLogger(__name__)

# Metric keys and the names people read in logs and on the command line.
METRIC_LABELS = (
    ("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"),
    ("roc_auc", "ROC AUC"), ("log_loss", "log loss"), ("ece", "ECE"),
)


def _class_indices(y_true: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    values = np.asarray(y_true)
    if values.dtype.kind in "iu":
        indices = values.astype(np.int64)
        bad = indices[(indices < 0) | (indices >= len(classes))]
        if bad.size:
            raise ValueError(f"label indices {sorted(set(bad.tolist()))[:5]} are outside 0..{len(classes) - 1}")
        return indices
    lookup = {str(name): i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - lookup.keys())
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the model's classes {list(classes)}")
    return np.asarray([lookup[str(v)] for v in values], dtype=np.int64)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the Mann-Whitney rank statistic; None when one side has no examples."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


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


def compute_metrics(y_true: Sequence[Any], scores: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Classification metrics of ``scores`` (n x K probabilities, columns in ``classes`` order).

    Args:
        y_true: true labels, as class names or as integer indices into ``classes``.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc`` (None when undefined, e.g. one
        class only), ``log_loss`` and ``ece`` (calibration: users read scores as probabilities), ``n_eval``, ``confusion_matrix`` (rows true, columns predicted, ``classes``
        order), ``classes`` and ``average`` (``binary`` or ``macro``).

    Raises:
        ValueError: shapes disagree, there are no rows, or a label is not one of ``classes``.
    """
    classes = [str(c) for c in classes]
    scores = np.asarray(scores, dtype=np.float64)
    k = len(classes)
    if k < 2:
        raise ValueError(f"need at least 2 classes to compute metrics, got {classes}")
    if scores.ndim != 2 or scores.shape[1] != k or scores.shape[0] != len(y_true):
        raise ValueError(f"scores have shape {scores.shape}; expected ({len(y_true)}, {k}) for classes {classes}")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on 0 rows: the eval split is empty")
    truth = _class_indices(y_true, classes)
    predicted = scores.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    precision = np.array([_ratio(true_pos[i], confusion[:, i].sum()) for i in range(k)])
    recall = np.array([_ratio(true_pos[i], confusion[i, :].sum()) for i in range(k)])
    f1 = np.array([_ratio(2 * p * r, p + r) for p, r in zip(precision, recall)])
    aucs = [binary_auc(truth == i, scores[:, i]) for i in range(k)]
    if k == 2:
        average, pick = "binary", (lambda per_class: float(per_class[1]))
        roc_auc = aucs[1]
    else:
        average, pick = "macro", (lambda per_class: float(np.mean(per_class)))
        defined = [a for a in aucs if a is not None]
        roc_auc = float(np.mean(defined)) if defined else None
    return {
        "accuracy": float(true_pos.sum() / len(truth)),
        "precision": pick(precision),
        "recall": pick(recall),
        "f1": pick(f1),
        "roc_auc": roc_auc,
        "log_loss": log_loss(scores, truth),
        "ece": expected_calibration_error(scores, truth),
        "n_eval": int(len(truth)),
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
        "average": average,
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """The headline metrics on one line, e.g. ``accuracy 0.9000, precision 0.9512, ..., ECE 0.0802``."""
    shown = []
    for key, label in METRIC_LABELS:
        if key in metrics:
            value = metrics[key]
            shown.append(f"{label} {value:.4f}" if isinstance(value, (int, float)) else f"{label} n/a")
    return ", ".join(shown)


def format_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> list[str]:
    """A confusion matrix as aligned text lines: a header of predicted classes, then one row per true class."""
    names = [str(c) for c in classes]
    width = max(len("true \\ predicted"), *(len(n) for n in names))
    cell = max(6, *(len(n) for n in names), *(len(str(v)) for row in matrix for v in row))
    lines = ["true \\ predicted".ljust(width) + "".join(f"  {n:>{cell}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(width) + "".join(f"  {v:>{cell}}" for v in row))
    return lines


def load_model(store: Store, model_key: str) -> Any:
    """Load a trained ``.keras`` model from the store (``model_key``: the file or its prefix)."""
    import_tensorflow()
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        store.get_file(model_file_key(model_key), path)
        return keras.models.load_model(path)


def predict_scores(model: Any, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (n x K) of an end-to-end model for raw ``texts``."""
    tf = import_tensorflow()

    # Keras 3 refuses numpy string arrays in predict(); a tf.data pipeline of strings is accepted.
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), dtype=tf.string)).batch(batch_size)
    return np.asarray(model.predict(dataset, verbose=0))


def evaluate_model(store: Store, model_key: str, features_key: str) -> dict[str, Any]:
    """Score the model on the eval split of ``features_key``.

    Returns:
        :func:`compute_metrics`'s dict plus ``model_key`` and ``features_key``.
    """
    features_key = features_key.rstrip("/")
    classes = json.loads(store.get_bytes(f"{features_key}/vectorizer.json"))["classes"]
    eval_df = pd.read_parquet(io.BytesIO(store.get_bytes(f"{features_key}/eval.parquet")))
    model = load_model(store, model_key)
    scores = predict_scores(model, eval_df["text"].tolist())
    metrics = compute_metrics(eval_df["label"].tolist(), scores, classes)
    return {**metrics, "model_key": model_key, "features_key": features_key}


def _check_min_accuracy(metrics: dict[str, Any], min_accuracy: float) -> tuple[bool, str]:
    accuracy, n_eval = metrics["accuracy"], metrics["n_eval"]
    if accuracy >= min_accuracy:
        return True, f"accuracy {accuracy:.4f} >= minimum {min_accuracy:.4f} on {n_eval} eval rows"
    return False, (
        f"accuracy {accuracy:.4f} is below the minimum {min_accuracy:.4f} (on {n_eval} eval rows); "
        "improve the data or training, or lower min_accuracy"
    )


def decide_gate(metrics: dict[str, Any], *, min_accuracy: float) -> dict[str, Any]:
    """Decide whether a model may be promoted: every check must pass.

    Returns:
        ``passed``, ``reason`` (the failed checks' explanations, or else every check's) and
        ``checks`` (name -> passed).
    """
    if not 0 <= min_accuracy <= 1:
        raise ValueError(f"min_accuracy={min_accuracy} must be between 0 and 1 (e.g. 0.8)")
    # Each check is (passed, explanation); a new rule is one more entry here.
    checks = {"min_accuracy": _check_min_accuracy(metrics, min_accuracy)}
    failed = [message for ok, message in checks.values() if not ok]
    passed = not failed
    reasons = failed if failed else [message for _, message in checks.values()]
    return {"passed": passed, "reason": "; ".join(reasons), "checks": {name: ok for name, (ok, _) in checks.items()}}


def evaluate_and_register(
    store: Store,
    registry: Any,
    model_key: str,
    features_key: str,
    *,
    model_name: str,
    min_accuracy: float,
    snapshot_id: int | None,
    dag_run_id: str | None,
) -> dict[str, Any]:
    """Evaluate a trained model, decide the gate, and register it as the model's next version.

    A model that fails the gate is registered as ``rejected`` (so the attempt and its metrics are
    on record) and is never exported; one that passes is a ``candidate``.

    Returns:
        ``model_name``, ``version``, ``gate`` (:func:`decide_gate`'s dict) and the headline metrics.
    """
    if dag_run_id is not None:
        # A retried task finds the version its first attempt registered (one version per run).
        for existing in registry.list_versions(model_name):
            if existing.dag_run_id == dag_run_id:
                log.info(
                    "an earlier attempt of this run registered %s v%d (%s): %s", model_name, existing.version,
                    existing.status, format_metrics(existing.metrics),
                )
                return _registration(existing.model_name, existing.version, existing.metrics)
    metrics = evaluate_model(store, model_key, features_key)
    gate = decide_gate(metrics, min_accuracy=min_accuracy)
    # The stable version this one is gated against: promotion replaces only that one (else: superseded).
    target = registry.serving_target(model_name)
    gate["champion"] = target.stable if target is not None else None
    log.info("held-out metrics on %d rows: %s", metrics["n_eval"], format_metrics(metrics))
    log.info("confusion matrix (rows: true class, columns: predicted class):")
    for line in format_confusion_matrix(metrics["confusion_matrix"], metrics["classes"]):
        log.info("  %s", line)
    log.info("gate %s: %s", "passed" if gate["passed"] else "REJECTED", gate["reason"])
    recorded = {k: v for k, v in metrics.items() if k not in ("model_key", "features_key")}
    version = registry.register_version(
        model_name,
        status="candidate" if gate["passed"] else "rejected",
        metrics={**recorded, "gate": gate, "min_accuracy": min_accuracy},
        snapshot_id=snapshot_id,
        dag_run_id=dag_run_id,
    )
    log.info(
        "registered %s v%d as %s%s", model_name, version, "candidate" if gate["passed"] else "rejected",
        "" if gate["passed"] else ": it will not be exported, and the serving version stays",
    )
    return _registration(model_name, version, {**metrics, "gate": gate})


def _registration(model_name: str, version: int, metrics: dict[str, Any]) -> dict[str, Any]:
    headline = {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "n_eval") if k in metrics}
    return {"model_name": model_name, "version": version, "gate": metrics["gate"], "metrics": headline}
