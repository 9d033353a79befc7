"""Tests of the serving benchmark's verdicts: the targets judged on made-up load results, and the model
server's command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import serving
from benchmarks.serving import best_in_process, check_targets, find_cell, model_server_flags

CLIENTS = (1, 8, 64)


def make_cell(clients: int, batch_size: int, texts_per_s: float, *, p50_ms: float = 1.0, errors: int = 0) -> dict:
    return {
        "clients": clients, "batch_size": batch_size, "requests": 100, "errors": errors,
        "error_kinds": {"HTTP 500": errors} if errors else {}, "window_seconds": 1.0,
        "requests_per_s": texts_per_s / batch_size, "texts_per_s": texts_per_s,
        "p50_ms": p50_ms, "p99_ms": 2 * p50_ms, "mean_ms": p50_ms, "client_cpu_percent": 30.0,
    }


def passing_rows() -> dict[str, list[dict]]:
    """Results that meet every target: batch-32 in process peaks at 10,000 texts/s (session, 8 clients)."""
    in_process = {1: 3000.0, 8: 4000.0, 64: 4000.0}, {1: 8000.0, 8: 10000.0, 64: 9000.0}
    rows: dict[str, list[dict]] = {}
    for row, scale in (("session", 1.0), ("function", 0.9), ("flask", 0.3), ("rest", 0.7), ("grpc", 0.9)):
        rows[row] = [make_cell(c, size, scale * by_clients[c]) for size, by_clients in zip((1, 32), in_process) for c in CLIENTS]
    for cell in rows["rest"]:
        if cell["batch_size"] == 1 and cell["clients"] == 64:
            cell["texts_per_s"] = 6000.0
    return rows


def verdicts(rows: dict) -> list[bool | None]:
    return [t["passed"] for t in check_targets(rows, batch_size=32)]


def test_results_that_meet_every_target_pass():
    targets = check_targets(passing_rows(), batch_size=32)
    assert [t["passed"] for t in targets] == [True] * 5
    assert targets[0]["measured"] == "p50 1.00 ms"
    assert targets[1]["measured"] == "6000 vs 10000 texts/s (session, 8 clients): 60%"
    assert targets[2]["measured"] == "1 clients 90%, 8 clients 90%, 64 clients 90%"
    assert targets[3]["measured"] == "ahead in all 6 cells" and targets[4]["measured"] == "none failed"


def test_each_target_fails_on_its_own():
    rows = passing_rows()
    find_cell(rows, "rest", 1, 1)["p50_ms"] = 2.5
    assert verdicts(rows) == [False, True, True, True, True]

    rows = passing_rows()
    find_cell(rows, "rest", 1, 64)["texts_per_s"] = 4999.0  # just under half of the best batch-32 10,000
    assert verdicts(rows) == [True, False, True, True, True]

    rows = passing_rows()
    find_cell(rows, "grpc", 32, 8)["texts_per_s"] = 7000.0  # 70 % of the session's 10,000 at 8 clients
    targets = check_targets(rows, batch_size=32)
    assert [t["passed"] for t in targets] == [True, True, False, True, True]
    assert "8 clients 70%" in targets[2]["measured"]

    rows = passing_rows()
    find_cell(rows, "flask", 32, 8)["texts_per_s"] = find_cell(rows, "rest", 32, 8)["texts_per_s"]  # a tie is not ahead
    targets = check_targets(rows, batch_size=32)
    assert [t["passed"] for t in targets] == [True, True, True, False, True]
    assert targets[3]["measured"] == "behind in 1 of 6 cells (texts x clients: 32 x 8)"

    rows = passing_rows()
    rows["grpc"][0] = make_cell(1, 1, 2700.0, errors=3)
    targets = check_targets(rows, batch_size=32)
    assert [t["passed"] for t in targets] == [True, True, True, True, False]
    assert targets[4]["measured"] == "grpc 3"


def test_the_upper_bound_is_the_faster_in_process_row_per_cell():
    rows = passing_rows()
    find_cell(rows, "function", 32, 64)["texts_per_s"] = 12000.0
    assert best_in_process(rows, 32)[0] == "function" and best_in_process(rows, 32)[1]["clients"] == 64
    assert best_in_process(rows, 32, 8)[0] == "session"
    assert best_in_process(rows, 16) is None
    target = check_targets(rows, batch_size=32)[1]
    assert target["passed"] is True  # exactly half is enough
    assert target["measured"] == "6000 vs 12000 texts/s (function, 64 clients): 50%"


def test_targets_whose_cells_were_not_measured_are_neither_passed_nor_failed():
    rows = {row: [c for c in cells if c["clients"] != 64] for row, cells in passing_rows().items()}
    targets = check_targets(rows, batch_size=32)
    assert [t["passed"] for t in targets] == [True, None, True, True, True]
    assert targets[1]["measured"] == "not measured" and targets[2]["measured"] == "1 clients 90%, 8 clients 90%"
    assert [t["passed"] for t in check_targets({}, batch_size=32)] == [None, None, None, None, True]


@pytest.mark.parametrize("batching", [True, False])
def test_model_server_flags(batching):
    flags = model_server_flags("sentiment", Path("/m/sentiment"), 8500, 8501, Path("/b.config") if batching else None)
    assert flags[:5] == [
        "--port=8500", "--rest_api_port=8501", "--model_name=sentiment", "--model_base_path=/m/sentiment",
        "--file_system_poll_wait_seconds=0",
    ]
    assert flags[5:] == (["--enable_batching", "--batching_parameters_file=/b.config"] if batching else [])


def test_a_server_that_fails_to_start_is_an_error_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "SERVER_MODULE", "tests.benchmarks.no_such_module")
    with pytest.raises(serving.BenchmarkError, match="(?s)the model server exited with status 1 while starting.*No module named"):
        serving._start_model_server("sentiment", tmp_path, *serving._free_ports(2), tmp_path / "b.config", tmp_path)
