"""Tests of the serving part of the benchmark report: the load table and the targets' verdicts."""

from __future__ import annotations

from benchmarks.report import format_load_table, format_report, format_targets
from tests.benchmarks.test_serving import make_cell


def test_load_table_puts_the_rows_of_a_cell_together():
    rows = {
        "session": [make_cell(1, 1, 2000.0, p50_ms=0.5), make_cell(8, 1, 4000.0)],
        "function": [make_cell(1, 1, 1000.0), make_cell(8, 1, 5000.0)],
        "rest": [make_cell(1, 1, 500.0, p50_ms=1.25), make_cell(8, 1, 2500.0, errors=2)],
    }
    lines = format_load_table({"rows": rows}).splitlines()
    assert [line.split("  ")[0] for line in lines[2:9]] == [
        "in process, tf.compat.v1 Session", "in process, tf.saved_model.load", "model server, REST", "",
        "in process, tf.compat.v1 Session", "in process, tf.saved_model.load", "model server, REST",
    ]
    # texts/req, clients, requests, errors, req/s, texts/s, vs best (the faster in-process row of the same
    # cell), p50, p99, and the client's CPU for remote rows only.
    assert lines[2].split()[-9:] == ["1", "1", "100", "0", "2000", "2000", "100%", "0.50", "1.00"]
    assert lines[4].split()[-10:] == ["1", "1", "100", "0", "500", "500", "25%", "1.25", "2.50", "30%"]
    assert lines[6].split()[-3:] == ["80%", "1.00", "2.00"] and lines[7].split()[-3:] == ["100%", "1.00", "2.00"]
    assert lines[8].split()[-9:-5] == ["8", "100", "2", "2500"]
    assert lines[9:] == ["failed requests:", "  model server, REST, 1 texts x 8 clients: HTTP 500 x 2"]


def test_targets_read_as_verdicts():
    text = format_targets([
        {"target": "REST p50 < 2 ms", "passed": True, "measured": "p50 0.80 ms"},
        {"target": "gRPC >= 80%", "passed": False, "measured": "1 clients 70%"},
        {"target": "64 clients", "passed": None, "measured": "not measured"},
    ])
    assert text.splitlines() == [
        "  PASS  REST p50 < 2 ms: p50 0.80 ms",
        "  FAIL  gRPC >= 80%: 1 clients 70%",
        "  n/a   64 clients: not measured",
    ]


def _stages(seconds: dict[str, float]) -> list[dict]:
    return [{"stage": name, "seconds": s, "start_mb": 900.0, "peak_mb": 1000.0 + s, "delta_mb": 100.0 + s}
            for name, s in seconds.items()]


def make_result() -> dict:
    """A whole benchmark result, made up: two sizes, the second synthetic, train superlinear between them."""
    from benchmarks.scaling import scaling_summary

    runs = [
        {"rows": 2000, "synthetic": False, "stages": _stages({"ingest": 1.0, "train": 10.0, "serve": 12.0}),
         "vocab_size": 4000, "train": {"best_epoch": 2}},
        {"rows": 8000, "synthetic": True, "stages": _stages({"ingest": 4.0, "train": 80.0, "serve": 12.0}),
         "vocab_size": 5000, "train": {"best_epoch": 3}},
    ]
    part = {"seconds": 2.0, "docs_per_s": 500.0, "start_mb": 1000.0, "peak_mb": 1300.0, "delta_mb": 300.0}
    metrics = {"accuracy": 0.9, "f1": 0.9, "roc_auc": 0.95, "log_loss": 0.25, "ece": 0.01, "mean_confidence": 0.9,
               "saturated": 0.0}
    rows = {"session": [make_cell(1, 1, 2000.0)], "rest": [make_cell(1, 1, 1000.0)]}
    return {
        "quick": True, "data": "reviews.csv", "data_rows": 2000, "seconds": 300.0,
        "machine": {"cpus": 2, "memory_gib": 23.5, "python": "3.11.7"}, "code": {"commit": "ab" * 20, "dirty": True},
        "scaling": {"main_size": 2000, "import_seconds": 9.5, "max_tokens": 5000, "notes": ["8k: the file has 2,000 rows"], "runs": runs,
                    "summary": scaling_summary(runs)},
        "pipeline": {"stages": runs[0]["stages"], "rows": {"train": 1600, "eval": 400}, "metrics": metrics,
                     "train": {"device": "/CPU:0", "temperature": 0.9, "best_epoch": 2}, "vocab_size": 5000,
                     "data": {"quarantined": 0, "splits": {"train": 1400, "validation": 200, "test": 400}}},
        "featurisation": {
            "texts": 1600, "settings": {"ngram_range": [1, 3], "min_df": 2, "max_features": 5000},
            "project": {"fit": {**part, "lookup_seconds": 0.5}, "transform": part, "vocab_size": 5000, "nonzeros": 90000},
            "sklearn": {"fit": {**part, "seconds": 4.0, "docs_per_s": 400.0}, "transform": part, "vocab_size": 4900,
                        "nonzeros": 80000},
            "ratios": {"fit": 1.25, "transform": 1.0, "fit_transform": 1.5}, "no_slower": True,
        },
        "quality": {
            "project": {"accuracy": 0.9, "f1": 0.9, "roc_auc": 0.95, "log_loss": 0.25},
            "sklearn": {"accuracy": 0.88, "f1": 0.87, "roc_auc": 0.94, "log_loss": 0.3, "c": 30.0, "c_selection": {"30": 0.3}},
            "rows": {"train": 1600, "validation": 200, "eval": 400}, "accuracy_difference": 0.02,
        },
        "serving": {
            "load": {"rows": rows, "targets": [{"target": "no failed requests", "passed": True, "measured": "none failed"}],
                     "batching": False, "ready_seconds": {"flask": 3.0, "model_server": 5.0},
                     "settings": {"seconds": 1.0, "warmup_seconds": 0.3}, "seconds": 60.0},
            "memory": {"batch_size": 256, "words_per_text": 700.0, "loaded": {"rss_mb": 1200.0},
                       "after_batches": {"peak_rss_mb": 1300.0}, "batch_peak_increase_mb": 100.0, "batch_seconds": 0.1},
        },
    }


def test_report_has_every_section_with_ratios_beside_the_figures():
    report = format_report(make_result())
    sections = report.split("\n\n")
    assert sections[0].startswith("MaaS benchmark (quick): reviews.csv (2,000 rows), 300 s in all; 2 cores")
    assert "commit abababababab (dirty)" in sections[0]
    scaling = sections[1].splitlines()
    assert scaling[1].split() == ["stage", "2k", "8k", "synthetic"]
    train = next(line for line in scaling if line.startswith("train"))
    assert train.split() == ["train", "10.00", "s", "5.000/1k", "80.00", "s", "10.000/1k", "x8.00", "^"]
    serve = next(line for line in scaling if line.startswith("serve"))
    assert serve.split()[-2:] == ["x1.00", "v"]
    # train: 10 s at 2k, 80 s at 8k, so the line through them is -13.3 s + 11.667 s per 1k
    assert ("not near-linear: train 2k to 8k superlinear (time per review x2.00; -13.3 s + 11.667 s per 1k); "
            "serve 2k to 8k sublinear (time per review x0.25; 12.0 s + 0.000 s per 1k)") in sections[1]
    assert "2k 4,000 n-grams, 8k 5,000 n-grams (the cap) (max_tokens 5,000); train's L-BFGS epochs kept: 2k 2, 8k 3" in sections[1]
    assert "importing TensorFlow, Keras and Great Expectations, 9.5 s" in sections[1]
    assert "note: 8k: the file has 2,000 rows" in sections[1]
    memory = sections[2].splitlines()
    assert memory[0].startswith("peak memory per stage, MiB") and memory[4].split() == ["train", "1,010", "(+110)", "1,080", "(+180)"]
    featurisation = sections[3].splitlines()
    assert "TfidfVectorizer(ngram_range=(1, 3), min_df=2, max_features=5,000)" in featurisation[0]
    assert featurisation[3].split() == ["fit", "2.00", "500", "1,300", "(+300)", "4.00", "400", "1,300", "(+300)", "1.25"]
    assert featurisation[5].split()[-1] == "1.50"
    assert featurisation[-1] == "goal: no slower than scikit-learn (ratio >= 1 for fit and for transform): PASS"
    quality = sections[4].splitlines()
    assert "C=30 chosen on the 200 validation rows" in quality[0]
    assert quality[3].split() == ["accuracy", "0.9000", "0.8800", "+0.0200"]
    assert quality[6].split() == ["log_loss", "0.2500", "0.3000", "-0.0500"]
    assert "the 2k run's model (1600 train / 400 eval rows" in report
    assert "serving under load" in report and "model server, REST" in report and "PASS  no failed requests" in report
    assert "serving memory (own process, REST batches of 256" in report


def test_quality_says_when_c_was_not_chosen():
    result = make_result()
    result["quality"]["sklearn"].update(c_selection={})
    result["featurisation"].update(no_slower=False)
    report = format_report(result)
    assert "(C=30, training's default: too few validation rows to choose)" in report
    assert "no slower than scikit-learn (ratio >= 1 for fit and for transform): FAIL" in report
