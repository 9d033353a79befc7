"""A smoke test of ``python -m benchmarks`` on generated data, and its message when the data is missing."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.pipeline import STAGES
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
            "--single-requests", "5", "--batch-requests", "2", "--request-batch-size", "8"]
    assert main(args) == 0

    result = json.loads(out.read_text())
    pipeline, serving = result["pipeline"], result["serving"]
    assert [s["stage"] for s in pipeline["stages"]] == list(STAGES)
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 0 for s in pipeline["stages"])
    assert pipeline["rows"]["train"] + pipeline["rows"]["eval"] == 300
    metrics = pipeline["metrics"]
    assert metrics["accuracy"] > 0.6 and 0 < metrics["log_loss"] < 1 and 0 <= metrics["ece"] <= 1
    for api in ("rest", "grpc"):
        assert serving[api]["single"]["requests"] == 5 and serving[api]["batch"]["requests"] == 2
        assert serving[api]["batch"]["texts_per_s"] == pytest.approx(8 * serving[api]["batch"]["requests_per_s"])
        assert 0 < serving[api]["single"]["p50_ms"] <= serving[api]["single"]["p99_ms"]
    memory = serving["memory"]
    assert memory["batch_size"] == 256 and memory["loaded"]["rss_mb"] > 100  # TensorFlow alone is more
    assert memory["after_batches"]["peak_rss_mb"] >= memory["loaded"]["rss_mb"] and memory["batch_seconds"] > 0
    report = capsys.readouterr().out
    assert "grpc batch" in report and "ece (10 bins)" in report and f"result written to {out}" in report
    assert "raw file to trained model (ingest to train): " in report
    assert "serving memory (own process, REST batches of 256 of the longest reviews" in report
