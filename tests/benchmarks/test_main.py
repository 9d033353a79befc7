"""A smoke test of ``python -m benchmarks`` on generated data, and its message when the data is missing."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.pipeline import STAGES
from benchmarks.serving import ROWS
from maas_tasks.sample_data import generate_reviews


def test_missing_data_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAAS_BENCH_DATA", str(tmp_path / "absent.csv.gz"))
    assert main([]) == 2
    message = capsys.readouterr().err
    assert "absent.csv.gz does not exist" in message and "MAAS_BENCH_DATA" in message and "--data" in message


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_generated_reviews(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    generate_reviews(300, seed=2).to_csv(data, index=False)
    out = tmp_path / "result" / "bench.json"
    args = ["--data", str(data), "--out", str(out), "--epochs", "2", "--max-tokens", "2000",
            "--clients", "1,4", "--load-seconds", "0.3", "--warmup-seconds", "0.1", "--request-batch-size", "8"]
    assert main(args) == 0

    result = json.loads(out.read_text())
    pipeline, serving = result["pipeline"], result["serving"]
    assert [s["stage"] for s in pipeline["stages"]] == list(STAGES)
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 0 for s in pipeline["stages"])
    # Train holds the train and validation splits, eval the test split; every row is in one of them.
    assert pipeline["rows"]["train"] + pipeline["rows"]["eval"] == 300 == sum(pipeline["data"]["splits"].values())
    assert pipeline["data"]["quarantined"] == 0 and pipeline["data"]["docs_uri"].endswith(".html")
    metrics = pipeline["metrics"]
    assert metrics["accuracy"] > 0.6 and 0 < metrics["log_loss"] < 1 and 0 <= metrics["ece"] <= 1
    load = serving["load"]
    assert list(load["rows"]) == list(ROWS) and load["batching"] is True
    for row, cells in load["rows"].items():
        assert [(c["batch_size"], c["clients"]) for c in cells] == [(1, 1), (1, 4), (8, 1), (8, 4)], row
        assert all(c["requests"] > 0 and c["errors"] == 0 for c in cells), (row, cells)
        assert all(0 < c["p50_ms"] <= c["p99_ms"] for c in cells)
        assert cells[2]["texts_per_s"] == pytest.approx(8 * cells[2]["requests_per_s"])
    targets = {t["target"].split(",")[0]: t["passed"] for t in load["targets"]}
    assert targets["no failed requests"] is True
    assert targets["REST texts/s"] is None  # needs 64 clients
    memory = serving["memory"]
    assert memory["batch_size"] == 256 and memory["loaded"]["rss_mb"] > 100  # TensorFlow alone is more
    assert memory["after_batches"]["peak_rss_mb"] >= memory["loaded"]["rss_mb"] and memory["batch_seconds"] > 0
    report = capsys.readouterr().out
    assert "model server, gRPC" in report and "serving targets (2-core machine):" in report
    assert "ece (10 bins)" in report and f"result written to {out}" in report
    assert "raw file to trained model (ingest to train): " in report
    assert "data stages (ingest + validate + clean, the split included): " in report and "target < 10 s" in report
    assert "serving memory (own process, REST batches of 256 of the longest reviews" in report
