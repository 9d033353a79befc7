"""Tests of the metrics (against hand-computed values), the model evaluation and the gate."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from maas_tasks.evaluate import binary_auc, compute_metrics, decide_gate, evaluate_model, log_loss


def _binary_scores(p_positive: list[float]) -> np.ndarray:
    p = np.asarray(p_positive)
    return np.stack([1 - p, p], axis=1)


def test_binary_metrics_by_hand():
    # Predicted: pos neg neg neg pos -> TP 2, FN 1, TN 2, FP 0.
    y_true = ["pos", "pos", "neg", "neg", "pos"]
    metrics = compute_metrics(y_true, _binary_scores([0.9, 0.4, 0.4, 0.1, 0.6]), ["neg", "pos"])
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["precision"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.8)
    # Positive/negative pairs: 5 ordered correctly, one tie (0.4 vs 0.4) counting one half, of 6.
    assert metrics["roc_auc"] == pytest.approx(5.5 / 6)
    assert metrics["confusion_matrix"] == [[2, 0], [1, 2]]
    assert metrics["n_eval"] == 5
    assert metrics["average"] == "binary"


def test_binary_positive_class_is_the_second():
    scores = _binary_scores([0.9, 0.2, 0.8])
    as_names = compute_metrics(["1", "0", "0"], scores, ["0", "1"])
    as_indices = compute_metrics(np.array([1, 0, 0]), scores, ["0", "1"])
    assert as_names == as_indices
    assert as_names["precision"] == pytest.approx(0.5) and as_names["recall"] == pytest.approx(1.0)


def test_auc_ties_and_extremes():
    assert binary_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert binary_auc(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == pytest.approx(1.0)
    assert binary_auc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.9])) == pytest.approx(0.0)
    assert binary_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_multiclass_macro_metrics_by_hand():
    classes = ["a", "b", "c"]
    y_true = ["a", "b", "c", "a", "c"]
    scores = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.2, 0.2, 0.6], [0.1, 0.2, 0.7]]
    )
    metrics = compute_metrics(y_true, scores, classes)
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert metrics["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert metrics["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert metrics["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.5) / 3)
    # One-vs-rest AUCs: a 4.5/6 (one tie at 0.2), b 3/4, c 4.5/6 (one tie at 0.3).
    assert metrics["roc_auc"] == pytest.approx(0.75)
    assert metrics["average"] == "macro"


def test_metrics_input_errors():
    with pytest.raises(ValueError, match="not among the model's classes"):
        compute_metrics(["x"], _binary_scores([0.5]), ["neg", "pos"])
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        compute_metrics(["neg", "pos"], np.ones((2, 3)), ["neg", "pos"])
    with pytest.raises(ValueError, match="0 rows"):
        compute_metrics([], np.zeros((0, 2)), ["neg", "pos"])


def test_gate_passes_and_fails_with_reasons():
    metrics = {"accuracy": 0.81, "n_eval": 100}
    passed = decide_gate(metrics, min_accuracy=0.8)
    assert passed["passed"] is True and "0.8100 >= minimum 0.8000" in passed["reason"]
    failed = decide_gate(metrics, min_accuracy=0.9)
    assert failed["passed"] is False
    assert "accuracy 0.8100 is below the minimum 0.9000 (on 100 eval rows)" in failed["reason"]
    assert failed["checks"] == {"min_accuracy": False}
    with pytest.raises(ValueError, match="between 0 and 1"):
        decide_gate(metrics, min_accuracy=80)


@pytest.mark.slow
def test_evaluate_model_on_the_eval_split(trained_run):
    store, features = trained_run["store"], trained_run["features"]
    result = evaluate_model(store, trained_run["trained"]["prefix"], features["key"])
    assert result["n_eval"] == features["eval_rows"]
    assert result["classes"] == ["negative", "positive"]
    assert result["accuracy"] > 0.7
    assert result["accuracy"] == pytest.approx(trained_run["trained"]["history"]["val_accuracy"][-1], abs=1e-6)
    assert 0.5 < result["roc_auc"] <= 1
    assert sum(map(sum, result["confusion_matrix"])) == features["eval_rows"]


def test_evaluate_and_register_gates_and_is_idempotent_per_run(trained_run, pg_dsn, caplog):
    from maas_tasks.evaluate import evaluate_and_register
    from maas_tasks.registry import Registry

    store, model_key, features_key = trained_run["store"], trained_run["trained"]["key"], trained_run["features"]["key"]
    with Registry.connect(pg_dsn) as registry:
        with caplog.at_level(logging.INFO, logger="maas_tasks.evaluate"):
            first = evaluate_and_register(
                store, registry, model_key, features_key, model_name="m", min_accuracy=0.5, snapshot_id=None,
                dag_run_id="r1",
            )
        # The task log: the metrics, the confusion matrix and the gate decision, as text.
        lines = [r.getMessage() for r in caplog.records if r.name == "maas_tasks.evaluate"]
        assert lines[0].startswith(f"held-out metrics on {trained_run['features']['eval_rows']} rows: accuracy ")
        assert "log loss" in lines[0] and "ECE" in lines[0]
        assert lines[1].startswith("confusion matrix") and lines[2].split()[-2:] == ["negative", "positive"]
        assert lines[5].startswith("gate passed: accuracy") and lines[6] == "registered m v1 as candidate"
        retried = evaluate_and_register(
            store, registry, model_key, features_key, model_name="m", min_accuracy=0.5, snapshot_id=None, dag_run_id="r1"
        )
        rejected = evaluate_and_register(
            store, registry, model_key, features_key, model_name="m", min_accuracy=1.0, snapshot_id=None,
            dag_run_id="r2",
        )
        assert first == retried  # a retried task does not allocate another version
        assert (first["version"], first["gate"]["passed"]) == (1, True)
        assert rejected["version"] == 2
        statuses = [(v.version, v.status, v.dag_run_id) for v in registry.list_versions("m")]
        expected_second = "rejected" if rejected["metrics"]["accuracy"] < 1.0 else "candidate"
        assert statuses == [(1, "candidate", "r1"), (2, expected_second, "r2")]
        assert registry.get_version("m", 1).metrics["gate"]["passed"] is True


def test_log_loss_is_the_mean_negative_log_probability_of_the_truth():
    scores = np.array([[0.8, 0.2], [0.4, 0.6], [1.0, 0.0]])
    assert log_loss(scores, [0, 1, 0]) == pytest.approx(-(np.log(0.8) + np.log(0.6) + np.log(1.0)) / 3)
    # A saturated wrong answer costs a lot, but stays finite.
    assert log_loss(scores, [0, 1, 1]) == pytest.approx((-np.log(0.8) - np.log(0.6) - np.log(1e-15)) / 3)
    with pytest.raises(ValueError, match="n x K scores"):
        log_loss(scores, [0, 1])


def test_compute_metrics_reports_calibration():
    metrics = compute_metrics(["a", "b", "a", "b"], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], ["a", "b"])
    assert metrics["log_loss"] == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.6) + np.log(0.3)) / 4)
    assert 0 <= metrics["ece"] <= 1



def test_metrics_and_confusion_matrix_read_as_text():
    from maas_tasks.evaluate import format_confusion_matrix, format_metrics

    metrics = {"accuracy": 0.9, "f1": 0.90703, "roc_auc": None, "log_loss": 0.27, "n_eval": 80}
    assert format_metrics(metrics) == "accuracy 0.9000, F1 0.9070, ROC AUC n/a, log loss 0.2700"
    lines = format_confusion_matrix([[33, 2], [6, 39]], ["negative", "positive"])
    assert lines[0].split() == ["true", "\\", "predicted", "negative", "positive"]
    assert lines[1].split() == ["negative", "33", "2"] and lines[2].split() == ["positive", "6", "39"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
