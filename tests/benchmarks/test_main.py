"""``python -m benchmarks``: its options (the quick run, the data setting), its messages when the data is
missing or a step fails, and a smoke test of a whole run on generated data."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import FULL, QUICK, main, main_size, parse_args
from benchmarks.pipeline import STAGES
from benchmarks.serving import ROWS
from maas_tasks.config import project_root
from maas_tasks.sample_data import generate_reviews


def test_quick_fills_every_unset_option_and_explicit_options_win(monkeypatch):
    monkeypatch.delenv("MAAS_BENCH_DATA", raising=False)
    full, quick = parse_args([]), parse_args(["--quick"])
    assert full.quick is False and quick.quick is True
    for name, value in FULL.items():
        assert getattr(full, name) == value
    for name, value in QUICK.items():
        assert getattr(quick, name) == value
    assert full.sizes == (5000, 10000, 25000, 100000) and full.epochs == 5
    assert quick.sizes == (1000, 2500) and quick.load_seconds < full.load_seconds
    mixed = parse_args(["--quick", "--epochs", "3", "--sizes", "300,100,300", "--clients", "2"])
    assert mixed.epochs == 3 and mixed.sizes == (100, 300) and mixed.clients == (2,) and mixed.load_seconds == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "0,5"])


def test_data_file_comes_from_the_option_the_setting_or_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MAAS_BENCH_DATA", raising=False)
    assert parse_args([]).data == (project_root() / ".." / "shared" / "data" / "imdb" / "imdb_train.csv.gz").resolve()
    monkeypatch.setenv("MAAS_BENCH_DATA", str(tmp_path / "set.csv"))
    assert parse_args([]).data == tmp_path / "set.csv"
    monkeypatch.setenv("MAAS_BENCH_DATA", "data/relative.csv")  # relative: to the project root
    assert parse_args([]).data == project_root() / "data" / "relative.csv"
    assert parse_args(["--data", str(tmp_path / "given.csv")]).data == tmp_path / "given.csv"


def test_main_run_is_the_largest_size_the_file_holds():
    assert main_size((5000, 10000, 25000, 100000), 25000) == 25000
    assert main_size((5000, 10000, 25000, 100000), 12000) == 10000
    assert main_size((2000, 5000), 300) == 2000  # none real: the smallest, synthetic


def test_missing_data_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAAS_BENCH_DATA", str(tmp_path / "absent.csv.gz"))
    assert main([]) == 2
    message = capsys.readouterr().err
    assert "absent.csv.gz does not exist" in message and "MAAS_BENCH_DATA" in message and "--data" in message


def test_an_unreadable_data_file_fails_in_one_paragraph_with_the_traceback_in_a_log(tmp_path, monkeypatch, capsys):
    import benchmarks.pipeline

    monkeypatch.delenv("MAAS_TRACEBACK", raising=False)
    monkeypatch.setattr(benchmarks.pipeline, "import_libraries", lambda: 0.0)  # the failure comes before they matter
    data = tmp_path / "reviews.csv.gz"
    data.write_bytes(b"not gzip at all")
    results = tmp_path / "results"
    assert main(["--data", str(data), "--results-dir", str(results), "--quick"]) == 1

    message = capsys.readouterr().err
    failure = [line for line in message.splitlines() if line.startswith("benchmark failed: ")]
    assert len(failure) == 1 and "is not gzip-compressed" in failure[0] and "Traceback" not in message
    [log] = results.glob("*.log")
    assert f"the full error is in {log}" in message
    assert "Traceback" in log.read_text() and "IngestError" in log.read_text()
    assert not list(results.glob("*.json"))  # no result for a run that did not finish

    monkeypatch.setenv("MAAS_TRACEBACK", "1")
    with pytest.raises(Exception, match="not gzip-compressed"):
        main(["--data", str(data), "--results-dir", str(results), "--quick"])


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_generated_reviews(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    generate_reviews(300, seed=2).to_csv(data, index=False)
    out, results = tmp_path / "result" / "bench.json", tmp_path / "results"
    args = ["--data", str(data), "--out", str(out), "--results-dir", str(results), "--quick", "--sizes", "300,450",
            "--epochs", "2", "--max-tokens", "2000", "--clients", "1,4", "--load-seconds", "0.3",
            "--warmup-seconds", "0.1", "--request-batch-size", "8"]
    assert main(args) == 0

    [written] = results.glob("*.json")
    result = json.loads(out.read_text())
    assert json.loads(written.read_text()) == result and result["results_file"] == str(written)
    assert result["quick"] is True and result["machine"]["cpus"] >= 1 and result["packages"]["tensorflow"]
    assert result["code"]["commit"]
    scaling = result["scaling"]
    assert [(r["rows"], r["synthetic"]) for r in scaling["runs"]] == [(300, False), (450, True)]
    assert scaling["main_size"] == 300 and "450" in scaling["notes"][0]
    assert list(scaling["summary"]["stages"]) == [*STAGES, "end to end"]
    pipeline, serving = result["pipeline"], result["serving"]
    assert [s["stage"] for s in pipeline["stages"]] == list(STAGES)
    assert all(s["seconds"] > 0 and s["peak_mb"] >= s["start_mb"] > 0 for s in pipeline["stages"])
    serve = next(s for s in pipeline["stages"] if s["stage"] == "serve")
    assert serve["delta_mb"] > 100  # the model server's process counts
    # Train holds the train and validation splits, eval the test split; every row is in one of them.
    assert pipeline["rows"]["train"] + pipeline["rows"]["eval"] == 300 == sum(pipeline["data"]["splits"].values())
    assert pipeline["data"]["quarantined"] == 0 and pipeline["data"]["docs_uri"].endswith(".html")
    metrics = pipeline["metrics"]
    assert metrics["accuracy"] > 0.6 and 0 < metrics["log_loss"] < 1 and 0 <= metrics["ece"] <= 1
    featurisation, quality = result["featurisation"], result["quality"]
    assert featurisation["texts"] == pipeline["rows"]["train"]
    assert featurisation["settings"]["max_features"] == featurisation["project"]["vocab_size"] == pipeline["vocab_size"]
    for side in ("project", "sklearn"):
        assert featurisation[side]["fit"]["docs_per_s"] > 0 and featurisation[side]["transform"]["docs_per_s"] > 0
    assert featurisation["ratios"]["fit"] == pytest.approx(
        featurisation["project"]["fit"]["docs_per_s"] / featurisation["sklearn"]["fit"]["docs_per_s"])
    assert quality["project"]["accuracy"] == metrics["accuracy"] and quality["sklearn"]["accuracy"] > 0.6
    assert quality["rows"]["eval"] == pipeline["rows"]["eval"] == quality["sklearn"]["n_eval"]
    load = serving["load"]
    assert list(load["rows"]) == list(ROWS) and load["batching"] is True
    for row, cells in load["rows"].items():
        assert [(c["batch_size"], c["clients"]) for c in cells] == [(1, 1), (1, 4), (8, 1), (8, 4)], row
        assert all(c["requests"] > 0 and c["errors"] == 0 for c in cells), (row, cells)
    memory = serving["memory"]
    assert memory["batch_size"] == 256 and memory["loaded"]["rss_mb"] > 100  # TensorFlow alone is more
    report = capsys.readouterr().out
    for heading in ("scaling, raw file to served version", "peak memory per stage, MiB", "featurisation on ",
                    "model quality on the same split", "serving under load", "serving targets (2-core machine):"):
        assert heading in report
    assert f"result written to {written} and {out}" in report
