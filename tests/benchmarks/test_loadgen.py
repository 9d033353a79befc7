"""Tests of the load generator: HTTP response framing, answer checks, and whole cells against a tiny local
HTTP server and a fake in-process model, including servers that fail in each way the benchmark counts."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.loadgen import check_http_answer, http_request, request_batches, run_cells, run_thread_cell, take_response


def _response(body: bytes, status: int = 200, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_take_response_waits_for_the_whole_body_and_leaves_the_next_response():
    first, second = _response(b'{"a": 1}'), _response(b"{}", 503, "Connection: close\r\n")
    buffer = bytearray(first[:-3])
    assert take_response(buffer) is None
    buffer += first[-3:] + second[:5]
    assert take_response(buffer) == (200, b'{"a": 1}', True)
    assert take_response(buffer) is None
    buffer += second[5:]
    assert take_response(buffer) == (503, b"{}", False)
    assert buffer == bytearray()


def test_take_response_rejects_what_it_cannot_frame():
    with pytest.raises(ValueError, match="without Content-Length"):
        take_response(bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"))
    with pytest.raises(ValueError, match="not an HTTP response"):
        take_response(bytearray(b"SSH-2.0-OpenSSH\r\n\r\n"))


def test_http_request_is_a_complete_post():
    request = http_request("127.0.0.1", 8501, "/v1/models/m:predict", ["a", "b"])
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: 127.0.0.1:8501\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and json.loads(body) == {"instances": ["a", "b"]}


def test_check_http_answer():
    good = json.dumps({"predictions": [{"scores": [0.1, 0.9], "label": "positive"}] * 3}).encode()
    assert check_http_answer(200, good, 3) is None and check_http_answer(200, good, 3, decode=True) is None
    assert check_http_answer(200, good, 2) == "wrong answer"
    assert check_http_answer(500, good, 3) == "HTTP 500"
    scoreless = json.dumps({"predictions": [{"label": "positive"}] * 3}).encode()
    assert check_http_answer(200, scoreless, 3) == "wrong answer"
    # Three "scores" keys but not three rows: only decoding notices.
    assert check_http_answer(200, b'{"predictions": [{"scores": 1, "x": {"scores": 2, "scores": 3}}]}', 3, decode=True) == "wrong answer"


def test_request_batches_cycle_the_texts():
    assert request_batches(["a", "b", "c"], 2, pool_texts=6) == [["a", "b"], ["c", "a"], ["b", "c"]]
    assert len(request_batches(["a"], 32, pool_texts=2048)) == 64
    assert request_batches(["a"], 100, pool_texts=10) == [["a"] * 100]
    with pytest.raises(ValueError):
        request_batches([], 1)


class _PredictHandler(BaseHTTPRequestHandler):
    """Answers ``{"instances": [...]}`` with one row of scores each; /flaky answers 500 to every third
    request, /short one row too few to every third, /drop closes every third connection without answering."""

    protocol_version = "HTTP/1.1"
    calls = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        instances = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["instances"]
        with self.lock:
            type(self).calls += 1
            third = type(self).calls % 3 == 0
        status, rows = 200, len(instances)
        if third and self.path == "/drop":
            self.close_connection = True
            return
        if third and self.path == "/flaky":
            status = 500
        if third and self.path == "/short":
            rows -= 1
        body = json.dumps({"predictions": [{"scores": [0.5, 0.5]}] * rows}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def predict_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PredictHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _spec(*cells: tuple[int, int]) -> dict:
    return {"seconds": 0.3, "warmup_seconds": 0.1, "cells": [{"clients": c, "batch_size": b} for c, b in cells]}


def test_http_cells_count_only_checked_answers(predict_server):
    run = {"kind": "http", "host": "127.0.0.1", "port": predict_server, "path": "/predict"}
    single, batched = run_cells(run, ["good", "bad", "fine"], _spec((1, 1), (4, 3)))
    for cell, (clients, size) in ((single, (1, 1)), (batched, (4, 3))):
        assert (cell["clients"], cell["batch_size"]) == (clients, size)
        assert cell["requests"] > 5 and cell["errors"] == 0 and cell["error_kinds"] == {}
        assert cell["texts_per_s"] == pytest.approx(size * cell["requests_per_s"])
        assert cell["requests_per_s"] == pytest.approx(cell["requests"] / 0.3)
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]


@pytest.mark.parametrize(
    ("path", "kind"), [("/flaky", "HTTP 500"), ("/short", "wrong answer"), ("/drop", "ConnectionResetError")]
)
def test_http_failures_are_errors_not_successes(predict_server, path, kind):
    run = {"kind": "http", "host": "127.0.0.1", "port": predict_server, "path": path}
    (cell,) = run_cells(run, ["a", "b"], _spec((2, 2)))
    assert cell["error_kinds"].get(kind, 0) > 0 and cell["errors"] == sum(cell["error_kinds"].values())
    # Two of every three requests succeed, and the clients carry on after each failure.
    assert cell["requests"] > cell["errors"]


def test_a_server_that_is_gone_is_all_errors():
    run = {"kind": "http", "host": "127.0.0.1", "port": 1, "path": "/predict"}
    (cell,) = run_cells(run, ["a"], _spec((2, 1)))
    assert cell["requests"] == 0 and cell["p50_ms"] is None
    assert set(cell["error_kinds"]) == {"connect: ConnectionRefusedError"} and cell["errors"] >= 2


def test_thread_cells_check_every_answer():
    calls = {"n": 0}

    def predict(texts: list[str]) -> int:
        calls["n"] += 1
        time.sleep(0.001)
        if calls["n"] % 5 == 0:
            raise RuntimeError("model failed")
        return len(texts) - 1 if calls["n"] % 7 == 0 else len(texts)

    cell = run_thread_cell(predict, [["a", "b"]] * 4, 2, 3, warmup_seconds=0.05, seconds=0.2)
    assert cell["clients"] == 3 and cell["requests"] > 10
    assert cell["error_kinds"]["RuntimeError"] > 0 and cell["error_kinds"]["wrong answer"] > 0
    assert cell["p50_ms"] >= 1.0
