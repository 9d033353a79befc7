"""Tests of the metrics (against hand-computed values), the slices, the model evaluation and the gate."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from maas_tasks.evaluate import (
    absolute_checks,
    champion_checks,
    compute_metrics,
    decide_gate,
    evaluate_model,
    expected_calibration_error,
    length_slices,
    paired_bootstrap,
)


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


def test_binary_pr_auc_kappa_and_log_loss_by_hand():
    metrics = compute_metrics(["pos", "pos", "neg", "neg"], _binary_scores([0.9, 0.2, 0.4, 0.1]), ["neg", "pos"])
    # Ranked by score: pos 0.9, neg 0.4, pos 0.2, neg 0.1 -> precision at the two positives 1 and 2/3.
    assert metrics["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["roc_auc"] == pytest.approx(3 / 4)
    # Predicted pos, neg, neg, neg: observed agreement 3/4, chance agreement (1/4*2/4 + 3/4*2/4) = 1/2.
    assert metrics["cohen_kappa"] == pytest.approx((0.75 - 0.5) / 0.5)
    assert metrics["log_loss"] == pytest.approx(-(np.log(0.9) + np.log(0.2) + np.log(0.6) + np.log(0.9)) / 4)
    one_class = compute_metrics(["pos", "pos"], _binary_scores([0.9, 0.8]), ["neg", "pos"])
    assert one_class["roc_auc"] is None and one_class["pr_auc"] is None


def test_expected_calibration_error_by_hand():
    # Bin 0.9-1.0: confidences 0.95, 0.95, right once -> gap 0.45; bin 0.6-0.7: 0.65, right -> gap 0.35.
    scores = np.array([[0.95, 0.05], [0.05, 0.95], [0.65, 0.35]])
    assert expected_calibration_error(scores, np.array([0, 0, 0])) == pytest.approx((2 * 0.45 + 0.35) / 3)
    assert expected_calibration_error(np.array([[0.8, 0.2]] * 4), np.array([0, 0, 0, 0])) == pytest.approx(0.2)


def test_length_slices_cover_every_text_once():
    texts = ["", "one two", " ".join(["w"] * 50), " ".join(["w"] * 200), " ".join(["w"] * 301)]
    masks = length_slices(texts)
    assert list(masks) == ["1-20 words", "21-100 words", "101-300 words", "over 300 words"]
    assert np.sum([m.astype(int) for m in masks.values()], axis=0).tolist() == [1] * 5
    assert masks["1-20 words"].tolist() == [True, True, False, False, False]


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
    metrics = {"accuracy": 0.81, "n_eval": 100, "roc_auc": 0.9}
    passed = decide_gate(absolute_checks(metrics, min_accuracy=0.8, min_roc_auc=0.85))
    assert passed["passed"] is True and passed["forced"] is False
    assert "accuracy 0.8100 >= minimum 0.8000 on 100 eval rows" in passed["reason"]
    assert [c["name"] for c in passed["checks"]] == ["min_accuracy", "min_roc_auc"]
    failed = decide_gate(absolute_checks(metrics, min_accuracy=0.9, min_roc_auc=0.95))
    assert failed["passed"] is False
    assert "accuracy 0.8100 is below the minimum 0.9000 on 100 eval rows" in failed["reason"]
    assert "ROC AUC 0.9000 is below the minimum 0.9500" in failed["reason"]
    forced = decide_gate(absolute_checks(metrics, min_accuracy=0.9, min_roc_auc=None), force=True, forced_by="run-7")
    assert forced["passed"] is True and forced["forced"] is True and forced["forced_by"] == "run-7"
    assert forced["reason"].startswith("FORCED by run-7")
    assert decide_gate(absolute_checks(metrics, min_accuracy=0.5, min_roc_auc=None), force=True)["forced"] is False


def test_paired_bootstrap_interval_brackets_the_difference_and_is_reproducible():
    rng = np.random.default_rng(0)
    old = rng.random(2000) < 0.85
    new = old.copy()
    new[:100] = True  # the new model fixes some of the old one's mistakes
    boot = paired_bootstrap(new, old)
    assert boot["low"] <= boot["difference"] <= boot["high"] and boot["difference"] > 0
    assert paired_bootstrap(new, old) == boot
    assert paired_bootstrap(old, old)["low"] == 0.0 == paired_bootstrap(old, old)["high"]


def test_champion_checks_reject_a_worse_model_and_keep_an_equal_one():
    rng = np.random.default_rng(1)
    n = 1000
    truth = rng.integers(0, 2, n)
    texts = [" ".join(["w"] * int(k)) for k in rng.integers(1, 400, n)]
    good = np.eye(2)[truth] * 0.8 + 0.1
    wrong = rng.random(n) < 0.08
    champion = np.where(wrong[:, None], good[:, ::-1], good)  # right on 92 %
    worse = np.where((rng.random(n) < 0.15)[:, None], good[:, ::-1], good)  # right on 85 %
    same = champion_checks(truth, champion, champion, texts, champion=3)
    assert all(c["passed"] for c in same)
    assert same[0]["name"] == "champion" and "vs champion v3" in same[0]["detail"]
    rejected = champion_checks(truth, worse, champion, texts, champion=3)
    assert rejected[0]["passed"] is False and "worse than the tolerance" in rejected[0]["detail"]
    # A regression confined to one length slice fails that slice even when the total barely moves.
    short = np.asarray(length_slices(texts)["1-20 words"])
    slice_worse = np.where(short[:, None], good[:, ::-1], champion)
    checks = {c["name"]: c for c in champion_checks(truth, slice_worse, champion, texts, champion=3, tolerance=0.1)}
    assert checks["champion"]["passed"] is True and checks["slice 1-20 words"]["passed"] is False


@pytest.mark.slow
def test_evaluate_model_on_the_eval_split(trained_run):
    store, features = trained_run["store"], trained_run["features"]
    result = evaluate_model(store, trained_run["trained"]["prefix"], features["key"])
    assert result["n_eval"] == features["eval_rows"]
    assert result["classes"] == ["negative", "positive"]
    assert result["accuracy"] > 0.7
    assert result["scores"].shape == (features["eval_rows"], 2)
    assert sum(part["n"] for part in result["slices"].values()) == features["eval_rows"]
    assert result["short_probe"]["words"] == 12 and 0 <= result["short_probe"]["ece"] <= 1
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
        assert any(line.startswith("  slice 1-20 words") or line.startswith("  slice 21-100 words") for line in lines)
        assert any(line.startswith("first 12 words of each text: accuracy") for line in lines)
        assert any(line.startswith("check min_accuracy") and " pass: accuracy " in line for line in lines)
        assert "check champion               pass: no champion: this is the first version to serve" in lines
        assert lines[-3].startswith("gate passed: accuracy") and lines[-2] == "registered m v1 as candidate"
        report_uri = store.uri("reports/m/1/index.html")
        assert lines[-1] == f"evaluation report: {report_uri}"
        assert registry.get_version("m", 1).report_uri == report_uri
        page = store.get_bytes("reports/m/1/index.html").decode()
        assert "Evaluation report: m v1" in page and "no champion: this is the first version to serve" in page
        # An attempt that died after registering but before its report: the retry writes the report.
        store.delete("reports/m/1/index.html")
        with registry._transaction() as cur:
            cur.execute("UPDATE model_versions SET report_uri = NULL WHERE model_name = 'm'")
        retried = evaluate_and_register(
            store, registry, model_key, features_key, model_name="m", min_accuracy=0.5, snapshot_id=None, dag_run_id="r1"
        )
        assert registry.get_version("m", 1).report_uri == report_uri and store.exists("reports/m/1/index.html")
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


def test_column_slices_report_each_frequent_value():
    import pandas as pd

    from maas_tasks.evaluate import MAX_COLUMN_SLICE_VALUES, column_slice_metrics

    frame = pd.DataFrame({
        "text": ["t"] * 6 + ["u"] * (MAX_COLUMN_SLICE_VALUES + 5),
        "slice:genre": ["drama"] * 4 + ["comedy"] * 2 + [f"g{i}" for i in range(MAX_COLUMN_SLICE_VALUES + 5)],
    })
    truth = ["a", "b", "a", "b", "a", "a"] + ["a"] * (MAX_COLUMN_SLICE_VALUES + 5)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]]
                      + [[0.8, 0.2]] * (MAX_COLUMN_SLICE_VALUES + 5))
    out = column_slice_metrics(truth, scores, ["a", "b"], frame)
    assert out["genre=drama"]["n"] == 4 and out["genre=drama"]["accuracy"] == pytest.approx(0.75)
    assert out["genre=comedy"] == pytest.approx({"n": 2, "accuracy": 0.5, "log_loss": out["genre=comedy"]["log_loss"],
                                                 "ece": out["genre=comedy"]["ece"]})
    assert len(out) == MAX_COLUMN_SLICE_VALUES  # an id-like column reports only its most frequent values
    assert column_slice_metrics(truth, scores, ["a", "b"], frame[["text"]]) == {}


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


def test_a_champion_that_cannot_be_scored_fails_the_gate_and_one_of_other_classes_is_not_judged(
    trained_run, pg_dsn, monkeypatch
):
    from types import SimpleNamespace

    from maas_tasks import evaluate
    from maas_tasks.evaluate import evaluate_and_register
    from maas_tasks.registry import Registry

    store, model_key, features_key = trained_run["store"], trained_run["trained"]["key"], trained_run["features"]["key"]
    with Registry.connect(pg_dsn) as registry:
        # The registry says v7 is stable, but its files are not in the store (deleted, or a broken export).
        monkeypatch.setattr(registry, "serving_target", lambda name: SimpleNamespace(stable=7))
        missing = evaluate_and_register(store, registry, model_key, features_key, model_name="c1", min_accuracy=0.5,
                                        snapshot_id=None, dag_run_id="c1-r1")
        check = [c for c in missing["gate"]["checks"] if c["name"] == "champion"][0]
        assert missing["gate"]["passed"] is False and check["passed"] is False
        assert "champion v7 could not be scored" in check["detail"] and "force_promote" in check["detail"]
        assert registry.get_version("c1", missing["version"]).status == "rejected"
        forced = evaluate_and_register(store, registry, model_key, features_key, model_name="c1", min_accuracy=0.5,
                                       force_promote=True, snapshot_id=None, dag_run_id="c1-r2")
        assert forced["gate"]["passed"] and forced["gate"]["forced"] and forced["gate"]["forced_by"] == "c1-r2"
        # A champion with other classes (the label set changed) cannot be compared: the thresholds decide.
        monkeypatch.setattr(evaluate, "score_exported_version", lambda *a, **k: (["x", "y", "z"], None))
        other = evaluate_and_register(store, registry, model_key, features_key, model_name="c1", min_accuracy=0.5,
                                      snapshot_id=None, dag_run_id="c1-r3")
        check = [c for c in other["gate"]["checks"] if c["name"] == "champion"][0]
        assert other["gate"]["passed"] and "not comparable, judged on the thresholds only" in check["detail"]
