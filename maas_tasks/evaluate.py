"""Evaluation stage: metrics of a trained model on the held-out split, and the gate that decides promotion.

Metrics come from scikit-learn: accuracy, precision, recall, F1, ROC AUC, PR AUC (average precision), log
loss, Cohen's kappa, the confusion matrix and the expected calibration error (from ``calibration_curve``
over the top score). For two classes the positive class is ``classes[1]`` (with the sorted class names of
the feature stage: ``"1"`` of 0/1, ``"positive"`` of negative/positive); for more, macro averages and
one-vs-rest macro AUCs. The same metrics are computed per text-length slice, and on the first words of
each text (short inputs are where scores are most often overconfident).

The gate is a list of independent checks, each with its numbers and verdict: absolute minimums (accuracy,
ROC AUC) and champion/challenger (the serving version scored on the same rows; the new model may not be
worse beyond a tolerance by a paired bootstrap confidence interval, and no length slice may regress beyond
its own tolerance).
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

from maas_tasks.model import build_classifier, first_words, load_artifact
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

# Metric keys and the names people read in logs and on the command line.
METRIC_LABELS = (
    ("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"),
    ("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC"), ("log_loss", "log loss"), ("cohen_kappa", "kappa"),
    ("ece", "ECE"),
)
# Text-length slices, by words: (name, first, last); the last slice is open-ended.
LENGTH_SLICES = (("1-20 words", 1, 20), ("21-100 words", 21, 100), ("101-300 words", 101, 300), ("over 300 words", 301, None))
SHORT_PROBE_WORDS = 12
CALIBRATION_BINS = 10
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 13
# Champion/challenger defaults: how much worse (accuracy) a challenger may be, overall (judged by a 90 %
# paired bootstrap interval) and per length slice (beyond that slice's own noise band).
DEFAULT_CHAMPION_TOLERANCE = 0.01
DEFAULT_SLICE_TOLERANCE = 0.02
MIN_SLICE_ROWS = 30
# A slice column with many values (an id, a free-text field) reports only its most frequent ones.
MAX_COLUMN_SLICE_VALUES = 20


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


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, *, bins: int = CALIBRATION_BINS) -> float:
    """ECE (Guo et al. 2017): the row-weighted gap between confidence (top score) and accuracy per bin.

    The per-bin means are scikit-learn's ``calibration_curve`` (uniform bins) of "the top class is right"
    against the top score; the weights are the rows per bin, binned the same way.
    """
    from sklearn.calibration import calibration_curve

    scores = np.asarray(scores, dtype=np.float64)
    confidence = np.clip(scores.max(axis=1), 0.0, 1.0)
    correct = (scores.argmax(axis=1) == np.asarray(labels)).astype(int)
    if correct.min() == correct.max():  # calibration_curve needs both outcomes; then the gap is direct
        return float(abs(confidence.mean() - correct.mean()))
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(accuracy - mean_confidence)) / len(confidence))


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores clipped away from 0 and rows summing to 1 again (float32 softmax rows are off by ~1e-7)."""
    clipped = np.clip(np.asarray(scores, dtype=np.float64), 1e-15, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def compute_metrics(y_true: Sequence[Any], scores: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Classification metrics of ``scores`` (n x K probabilities, columns in ``classes`` order).

    Args:
        y_true: true labels, as class names or as integer indices into ``classes``.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc`` and ``pr_auc`` (None when undefined,
        e.g. one class only), ``log_loss``, ``cohen_kappa``, ``ece``, ``n_eval``, ``confusion_matrix`` (rows
        true, columns predicted, ``classes`` order), ``classes`` and ``average`` (``binary`` or ``macro``).

    Raises:
        ValueError: shapes disagree, there are no rows, or a label is not one of ``classes``.
    """
    from sklearn import metrics as skm

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
    labels = list(range(k))
    binary = k == 2
    average = "binary" if binary else "macro"
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        truth, predicted, labels=labels, pos_label=1, average=average, zero_division=0
    )
    present = np.unique(truth)
    roc_auc = pr_auc = None
    if len(present) > 1:
        if binary:
            roc_auc = float(skm.roc_auc_score(truth, scores[:, 1]))
            pr_auc = float(skm.average_precision_score(truth, scores[:, 1]))
        else:
            one_hot = np.eye(k)[truth][:, present]
            roc_auc = float(skm.roc_auc_score(one_hot, scores[:, present], average="macro"))
            pr_auc = float(skm.average_precision_score(one_hot, scores[:, present], average="macro"))
    return {
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "log_loss": float(skm.log_loss(truth, _probabilities(scores), labels=labels)),
        "cohen_kappa": float(skm.cohen_kappa_score(truth, predicted, labels=labels)) if len(set(predicted) | set(truth)) > 1 else 1.0,
        "ece": expected_calibration_error(scores, truth),
        "n_eval": int(len(truth)),
        "confusion_matrix": skm.confusion_matrix(truth, predicted, labels=labels).tolist(),
        "classes": classes,
        "average": average,
    }


def word_counts(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([len(str(text).split()) for text in texts], dtype=np.int64)


def length_slices(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Row masks of the :data:`LENGTH_SLICES` (texts of no words fall in the first)."""
    words = np.maximum(word_counts(texts), 1)
    return {
        name: (words >= first) & (words <= last if last is not None else True)
        for name, first, last in LENGTH_SLICES
    }


def _subset_metrics(truth: np.ndarray, scores: np.ndarray, k: int, masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per named row mask: ``n``, ``accuracy``, ``log_loss`` and ``ece`` (empty masks are left out)."""
    from sklearn.metrics import log_loss as sk_log_loss

    out = {}
    for name, mask in masks.items():
        if not mask.any():
            continue
        part, labels = scores[mask], truth[mask]
        out[name] = {
            "n": int(mask.sum()),
            "accuracy": float(np.mean(part.argmax(axis=1) == labels)),
            "log_loss": float(sk_log_loss(labels, _probabilities(part), labels=list(range(k)))),
            "ece": expected_calibration_error(part, labels),
        }
    return out


def slice_metrics(y_true: Sequence[Any], scores: np.ndarray, classes: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    """Per length slice: ``n``, ``accuracy``, ``log_loss`` and ``ece`` (empty slices are left out)."""
    return _subset_metrics(_class_indices(y_true, classes), scores, len(classes), length_slices(texts))


def column_slice_metrics(
    y_true: Sequence[Any], scores: np.ndarray, classes: Sequence[str], frame: pd.DataFrame
) -> dict[str, Any]:
    """Per value of each ``slice:<column>`` of ``frame`` (see :func:`maas_tasks.clean.clean_frame`), named
    ``<column>=<value>``: the same numbers as :func:`slice_metrics`, for the
    :data:`MAX_COLUMN_SLICE_VALUES` most frequent values of each column."""
    from maas_tasks.clean import SLICE_PREFIX

    masks = {}
    for column in (c for c in frame.columns if str(c).startswith(SLICE_PREFIX)):
        values = frame[column].astype(str).to_numpy()
        for value in frame[column].astype(str).value_counts().index[:MAX_COLUMN_SLICE_VALUES]:
            masks[f"{column[len(SLICE_PREFIX):]}={value}"] = values == value
    return _subset_metrics(_class_indices(y_true, classes), scores, len(classes), masks)


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
    """The trained model at ``model_key`` (a ``trained/<hash>`` prefix), built and ready to call on strings."""
    return build_classifier(load_artifact(store, model_key))


def predict_scores(model: Any, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (n x K) of a model for raw ``texts``, a batch at a time."""
    tf = import_tensorflow()

    parts = [
        np.asarray(model(tf.constant(list(texts[start:start + batch_size]), dtype=tf.string)))
        for start in range(0, len(texts), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.n_classes), dtype=np.float32)


def _eval_split(store: Store, features_key: str) -> tuple[pd.DataFrame, list[str]]:
    features_key = features_key.rstrip("/")
    classes = [str(c) for c in json.loads(store.get_bytes(f"{features_key}/vectorizer.json"))["classes"]]
    eval_df = pd.read_parquet(io.BytesIO(store.get_bytes(f"{features_key}/eval.parquet")))
    return eval_df, classes


def describe_scores(y_true: Sequence[Any], scores: np.ndarray, classes: Sequence[str], texts: Sequence[str],
                    short_scores: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`compute_metrics` plus ``slices`` (per length) and ``short_probe`` (the first words of each text)."""
    metrics = compute_metrics(y_true, scores, classes)
    metrics["slices"] = slice_metrics(y_true, scores, classes, texts)
    if short_scores is not None:
        truth = _class_indices(y_true, classes)
        metrics["short_probe"] = {
            "words": SHORT_PROBE_WORDS,
            "accuracy": float(np.mean(short_scores.argmax(axis=1) == truth)),
            "ece": expected_calibration_error(short_scores, truth),
        }
    return metrics


def evaluate_model(store: Store, model_key: str, features_key: str) -> dict[str, Any]:
    """Score the model on the eval split of ``features_key``.

    Returns:
        :func:`describe_scores`'s dict plus ``column_slices`` (per value of each slice column, when the
        data has one), ``model_key``, ``features_key`` and ``scores`` (n x K, numpy; not recorded anywhere,
        for the champion comparison and the report's plots), ``truth`` (the rows' class indices) and ``texts``.
    """
    eval_df, classes = _eval_split(store, features_key)
    model = load_model(store, model_key)
    texts = eval_df["text"].tolist()
    scores = predict_scores(model, texts)
    labels = eval_df["label"].tolist()
    metrics = describe_scores(
        labels, scores, classes, texts, short_scores=predict_scores(model, first_words(texts, SHORT_PROBE_WORDS))
    )
    column_slices = column_slice_metrics(labels, scores, classes, eval_df)
    if column_slices:
        metrics["column_slices"] = column_slices
    return {
        **metrics, "model_key": model_key, "features_key": features_key.rstrip("/"), "scores": scores,
        "truth": _class_indices(labels, classes), "texts": texts,
    }


def score_exported_version(store: Store, prefix: str, texts: Sequence[str], *, batch_size: int = 256) -> tuple[list[str], np.ndarray]:
    """Class names and scores of an exported SavedModel (``models/<name>/<version>``) on ``texts``, in process."""
    from maas_tasks.storage import download_tree

    tf = import_tensorflow()

    with tempfile.TemporaryDirectory() as tmp:
        download_tree(store, prefix, Path(tmp))
        serve = tf.saved_model.load(tmp).signatures["serving_default"]
        classes: list[str] = []
        parts = []
        for start in range(0, max(len(texts), 1), batch_size):
            out = serve(text=tf.constant(list(texts[start:start + batch_size]) or [""], dtype=tf.string))
            classes = [c.decode("utf-8") for c in out["classes"].numpy()[0]]
            parts.append(out["scores"].numpy())
    scores = np.concatenate(parts)[: len(texts)]
    return classes, scores


def paired_bootstrap(new_correct: np.ndarray, old_correct: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """The accuracy difference (new - old) on the same rows and its bootstrap interval (rows resampled together).

    Returns:
        ``difference``, ``low`` and ``high`` (the 5th and 95th percentiles: a 90 % interval, each end a
        one-sided 95 % bound) and ``resamples``.
    """
    diff = np.asarray(new_correct, dtype=np.float64) - np.asarray(old_correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        means[i] = diff[rng.integers(0, len(diff), len(diff))].mean()
    low, high = np.percentile(means, [5, 95])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high), "resamples": resamples}


def _check(name: str, passed: bool, detail: str, **numbers: Any) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, **numbers}


def absolute_checks(metrics: dict[str, Any], *, min_accuracy: float, min_roc_auc: float | None) -> list[dict[str, Any]]:
    """The thresholds every model must meet on its own."""
    checks = []
    accuracy, n_eval = metrics["accuracy"], metrics["n_eval"]
    checks.append(_check(
        "min_accuracy", accuracy >= min_accuracy,
        f"accuracy {accuracy:.4f} {'>=' if accuracy >= min_accuracy else 'is below the'} minimum {min_accuracy:.4f} "
        f"on {n_eval} eval rows", value=accuracy, threshold=min_accuracy,
    ))
    if min_roc_auc is not None:
        auc = metrics.get("roc_auc")
        ok = auc is not None and auc >= min_roc_auc
        shown = "undefined (one class only)" if auc is None else f"{auc:.4f}"
        checks.append(_check(
            "min_roc_auc", ok, f"ROC AUC {shown} {'>=' if ok else 'is below the'} minimum {min_roc_auc:.4f}",
            value=auc, threshold=min_roc_auc,
        ))
    return checks


def champion_checks(
    truth: np.ndarray, new_scores: np.ndarray, champion_scores: np.ndarray, texts: Sequence[str], champion: int,
    *, tolerance: float = DEFAULT_CHAMPION_TOLERANCE, slice_tolerance: float = DEFAULT_SLICE_TOLERANCE,
) -> list[dict[str, Any]]:
    """Champion/challenger on the same rows: overall by a paired bootstrap interval, then per length slice.

    The challenger fails overall when the whole 90 % interval of its accuracy difference lies below
    ``-tolerance``: it is then worse beyond the tolerance with 95 % confidence.

    A slice fails only when its accuracy drops by more than ``slice_tolerance`` plus its own noise band
    (1.96 standard errors of the paired per-row difference), so small slices are not judged on noise.
    Slices under :data:`MIN_SLICE_ROWS` rows are reported and not judged.
    """
    new_correct = new_scores.argmax(axis=1) == truth
    old_correct = champion_scores.argmax(axis=1) == truth
    boot = paired_bootstrap(new_correct, old_correct)
    # Worse beyond the tolerance means the whole interval lies below it: on a small eval set a few
    # differing rows are noise, on a large one a real drop of more than the tolerance is always caught.
    ok = boot["high"] >= -tolerance
    checks = [_check(
        "champion", ok,
        f"accuracy vs champion v{champion}: {new_correct.mean():.4f} vs {old_correct.mean():.4f} on the same "
        f"{len(truth)} rows, difference {boot['difference']:+.4f} (90 % interval {boot['low']:+.4f} to "
        f"{boot['high']:+.4f}, {boot['resamples']} paired bootstrap resamples) {'within' if ok else 'worse than'} "
        f"the tolerance "
        f"-{tolerance:.4f}", champion=champion, tolerance=tolerance, **boot,
    )]
    for name, mask in length_slices(texts).items():
        n = int(mask.sum())
        if n == 0:
            continue
        diff = new_correct[mask].astype(float) - old_correct[mask].astype(float)
        if n < MIN_SLICE_ROWS:
            checks.append(_check(f"slice {name}", True, f"slice {name}: {n} rows, too few to judge", n=n))
            continue
        band = slice_tolerance + 1.96 * float(diff.std(ddof=1)) / np.sqrt(n) if n > 1 else slice_tolerance
        ok = diff.mean() >= -band
        checks.append(_check(
            f"slice {name}", ok,
            f"slice {name}: accuracy {new_correct[mask].mean():.4f} vs champion {old_correct[mask].mean():.4f} on {n} "
            f"rows, difference {diff.mean():+.4f} {'within' if ok else 'worse than'} its tolerance -{band:.4f}",
            n=n, difference=float(diff.mean()), tolerance=band,
        ))
    return checks


def decide_gate(checks: list[dict[str, Any]], *, force: bool = False, forced_by: str | None = None) -> dict[str, Any]:
    """The gate decision from its checks: passed when every check passed, or when forced by an operator.

    Returns:
        ``passed``, ``forced`` (and ``forced_by``), ``reason`` (the failed checks' details, or else every
        check's), ``checks`` (the list, each with ``name``, ``passed``, ``detail`` and its numbers).
    """
    failed = [c["detail"] for c in checks if not c["passed"]]
    reasons = failed if failed else [c["detail"] for c in checks]
    forced = bool(force and failed)
    reason = "; ".join(reasons)
    if forced:
        reason = f"FORCED by {forced_by or 'an operator'} (force_promote) past failed checks: {reason}"
    return {
        "passed": not failed or forced, "forced": forced, "forced_by": forced_by if forced else None,
        "reason": reason, "checks": checks,
    }


def _score_champion(store: Store, model_name: str, champion: int, texts: list[str],
                    classes: list[str]) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The champion's scores on ``texts``; or, when it cannot be compared, the champion check saying why.

    A champion that cannot be read or run fails the check (``force_promote`` overrides); one with other
    classes (the label set changed) is not comparable, and the thresholds alone decide.
    """
    from maas_tasks.export import version_prefix

    try:
        champion_classes, scores = score_exported_version(store, version_prefix(model_name, champion), texts)
    except Exception as exc:  # noqa: BLE001 - any failure to read or run the champion is reported as such
        return None, _check(
            "champion", False, f"champion v{champion} could not be scored ({type(exc).__name__}: {exc}); use "
            "force_promote to promote anyway",
        )
    if champion_classes != classes:
        return None, _check(
            "champion", True, f"champion v{champion} has classes {champion_classes}, the new model {classes}: not "
            "comparable, judged on the thresholds only",
        )
    return scores, None


def evaluate_and_register(
    store: Store,
    registry: Any,
    model_key: str,
    features_key: str,
    *,
    model_name: str,
    min_accuracy: float,
    min_roc_auc: float | None = None,
    champion_tolerance: float = DEFAULT_CHAMPION_TOLERANCE,
    slice_tolerance: float = DEFAULT_SLICE_TOLERANCE,
    force_promote: bool = False,
    snapshot_id: int | None,
    dag_run_id: str | None,
) -> dict[str, Any]:
    """Evaluate a trained model, gate it against the thresholds and the champion, and register it.

    The champion (the model's stable version) is scored on this run's eval rows, so both are judged on the
    same data even when the data changed. A champion whose classes differ is not comparable (reported, not
    judged); one that cannot be scored fails the gate (force_promote overrides). A model that fails the
    gate is registered as ``rejected`` (so the attempt, its metrics and reasons are on record) and is never
    exported; one that passes is a ``candidate``.

    Returns:
        ``model_name``, ``version``, ``gate`` (:func:`decide_gate`'s dict) and the headline metrics.
    """
    if not 0 <= min_accuracy <= 1 or (min_roc_auc is not None and not 0 <= min_roc_auc <= 1):
        raise ValueError(f"min_accuracy={min_accuracy} and min_roc_auc={min_roc_auc} must be between 0 and 1")
    if dag_run_id is not None:
        # A retried task finds the version its first attempt registered (one version per run).
        for existing in registry.list_versions(model_name):
            if existing.dag_run_id == dag_run_id:
                log.info(
                    "an earlier attempt of this run registered %s v%d (%s): %s", model_name, existing.version,
                    existing.status, format_metrics(existing.metrics),
                )
                if existing.report_uri is None:  # it died between registering and writing the report
                    evaluation = evaluate_model(store, model_key, features_key)
                    write_version_report(
                        store, registry, existing.model_name, existing.version, existing.metrics, evaluation,
                        dag_run_id=dag_run_id,
                    )
                return _registration(existing.model_name, existing.version, existing.metrics)
    evaluation = evaluate_model(store, model_key, features_key)
    scores, truth, texts = evaluation["scores"], evaluation["truth"], evaluation["texts"]
    metrics = {
        k: v for k, v in evaluation.items() if k not in ("model_key", "features_key", "scores", "truth", "texts")
    }
    classes = metrics["classes"]
    checks = absolute_checks(metrics, min_accuracy=min_accuracy, min_roc_auc=min_roc_auc)
    # The stable version this one is gated against: promotion replaces only that one (else: superseded).
    target = registry.serving_target(model_name)
    champion = target.stable if target is not None else None
    if champion is None:
        checks.append(_check("champion", True, "no champion: this is the first version to serve"))
    else:
        champion_scores, not_compared = _score_champion(store, model_name, champion, texts, classes)
        if not_compared is not None:
            checks.append(not_compared)
        else:
            checks += champion_checks(
                truth, scores, champion_scores, texts, champion,
                tolerance=champion_tolerance, slice_tolerance=slice_tolerance,
            )
    gate = decide_gate(checks, force=force_promote, forced_by=dag_run_id)
    gate["champion"] = champion
    log.info("held-out metrics on %d rows: %s", metrics["n_eval"], format_metrics(metrics))
    log.info("confusion matrix (rows: true class, columns: predicted class):")
    for line in format_confusion_matrix(metrics["confusion_matrix"], metrics["classes"]):
        log.info("  %s", line)
    for name, part in {**metrics["slices"], **metrics.get("column_slices", {})}.items():
        log.info("  slice %-15s %5d rows: accuracy %.4f, ECE %.4f", name, part["n"], part["accuracy"], part["ece"])
    probe = metrics["short_probe"]
    log.info("first %d words of each text: accuracy %.4f, ECE %.4f", probe["words"], probe["accuracy"], probe["ece"])
    for check in checks:
        log.info("check %-22s %s: %s", check["name"], "pass" if check["passed"] else "FAIL", check["detail"])
    log.info("gate %s: %s", "passed" if gate["passed"] else "REJECTED", gate["reason"])
    thresholds = {
        "min_accuracy": min_accuracy, "min_roc_auc": min_roc_auc, "champion_tolerance": champion_tolerance,
        "slice_tolerance": slice_tolerance, "force_promote": force_promote,
    }
    recorded = {**metrics, "gate": gate, "thresholds": thresholds, "min_accuracy": min_accuracy}
    version = registry.register_version(
        model_name,
        status="candidate" if gate["passed"] else "rejected",
        metrics=recorded,
        snapshot_id=snapshot_id,
        dag_run_id=dag_run_id,
    )
    log.info(
        "registered %s v%d as %s%s", model_name, version, "candidate" if gate["passed"] else "rejected",
        "" if gate["passed"] else ": it will not be exported, and the serving version stays",
    )
    write_version_report(store, registry, model_name, version, recorded, evaluation, dag_run_id=dag_run_id)
    return _registration(model_name, version, {**metrics, "gate": gate})


def report_prefix(model_name: str, version: int) -> str:
    """Where the evaluation report of a version lives in the store (``reports/<name>/<version>``)."""
    return f"reports/{model_name}/{version}"


def write_version_report(
    store: Store, registry: Any, model_name: str, version: int, recorded: dict[str, Any],
    evaluation: dict[str, Any], *, dag_run_id: str | None,
) -> str:
    """Render the HTML evaluation report of a registered version, store it and link it from the registry.

    ``recorded`` is what the registry holds for the version (metrics, gate, thresholds); ``evaluation``
    is :func:`evaluate_model`'s result (its scores draw the plots). Returns the report's URI.
    """
    from maas_tasks.report import render_report, write_report

    thresholds = recorded.get("thresholds") or {}
    facts = {
        "DAG run": dag_run_id, "trained model": evaluation["model_key"], "features": evaluation["features_key"],
        "champion": f"v{recorded['gate'].get('champion')}" if recorded["gate"].get("champion") else "none",
        **{f"threshold {k}": v for k, v in thresholds.items()},
    }
    files = render_report(
        model_name=model_name, version=version, metrics=recorded, gate=recorded["gate"],
        truth=evaluation["truth"], scores=evaluation["scores"], facts=facts,
    )
    uri = write_report(store, report_prefix(model_name, version), files)
    registry.set_report(model_name, version, uri)
    log.info("evaluation report: %s", uri)
    return uri


def _registration(model_name: str, version: int, metrics: dict[str, Any]) -> dict[str, Any]:
    headline = {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "n_eval") if k in metrics}
    return {"model_name": model_name, "version": version, "gate": metrics["gate"], "metrics": headline}
