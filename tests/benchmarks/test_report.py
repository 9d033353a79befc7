"""Tests of the serving part of the benchmark report: the load table and the targets' verdicts."""

from __future__ import annotations

from benchmarks.report import format_load_table, format_targets
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
