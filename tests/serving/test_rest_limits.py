"""The REST front end under load and abuse: every one of many concurrent clients is answered, bodies
over the limit get 413 before they are read, slow and idle connections are closed, overload is shed
with 503, and the server keeps serving after each of these."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter

import pytest

from serving import rest
from serving.model_config import single_model_config
from serving.server import FrontEndOptions

pytestmark = pytest.mark.integration

PREDICT = b"/v1/models/sentiment:predict"
BODY = json.dumps({"instances": ["good"]}).encode()


def _request(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (
        b"POST " + PREDICT + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, _, rest_bytes = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest_bytes) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        rest_bytes += chunk
    return int(head.split(b" ")[1]), rest_bytes[:length]


@pytest.fixture
def served(tmp_path, install_model, start_server):
    base = tmp_path / "sentiment"
    install_model(base, 1)

    def start(**front_end):
        return start_server(single_model_config("sentiment", base), front_end=FrontEndOptions(**front_end))

    return start


def _assert_still_serving(server) -> None:
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(_request())
        status, body = _read_response(sock)
    assert status == 200 and "predictions" in json.loads(body)


@pytest.mark.parametrize("clients", [64, 200])
def test_every_concurrent_client_gets_its_answers(served, clients):
    server = served()
    outcomes: list = []
    barrier = threading.Barrier(clients)

    def client() -> None:
        try:
            with socket.create_connection((server.host, server.rest_port), timeout=60) as sock:
                barrier.wait(30)
                for _ in range(3):
                    sock.sendall(_request())
                    outcomes.append(_read_response(sock)[0])
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none hidden
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert Counter(outcomes) == {200: 3 * clients}


def test_a_thousand_connections_at_once_are_all_answered(served):
    server = served()
    sockets = [socket.create_connection((server.host, server.rest_port), timeout=60) for _ in range(1000)]
    try:
        for sock in sockets:
            sock.sendall(_request())
        statuses = Counter(_read_response(sock)[0] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    assert statuses == {200: 1000}


@pytest.mark.parametrize("declared", [4 * 1024**3, 10**12])
def test_a_declared_length_over_the_limit_gets_413_before_the_body_is_read(served, declared):
    server = served(rest_max_body_bytes=1024 * 1024)
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(b"POST " + PREDICT + b" HTTP/1.1\r\nHost: t\r\nContent-Length: " + str(declared).encode() + b"\r\n\r\n{")
        status, body = _read_response(sock)
    assert status == 413 and "larger than the limit of 1048576 bytes" in json.loads(body)["error"]
    _assert_still_serving(server)


def test_a_chunked_body_that_grows_over_the_limit_gets_413(served):
    server = served(rest_max_body_bytes=1000)
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(b"POST " + PREDICT + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 600
        sock.sendall(b"258\r\n" + chunk + b"\r\n" + b"258\r\n" + chunk + b"\r\n")
        status, _ = _read_response(sock)
    assert status == 413
    _assert_still_serving(server)


def test_expect_100_continue_is_answered(served):
    server = served()
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(
            b"POST " + PREDICT + b" HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: "
            + str(len(BODY)).encode() + b"\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(BODY)
        assert _read_response(sock)[0] == 200


def test_idle_and_slow_connections_are_closed(served):
    server = served(rest_idle_seconds=0.5, rest_timeout_seconds=0.5)
    with socket.create_connection((server.host, server.rest_port), timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(100) == b""  # closed by the server, no request ever sent
        assert time.monotonic() - started < 5
    with socket.create_connection((server.host, server.rest_port), timeout=10) as slow:
        slow.sendall(b"POST " + PREDICT + b" HTTP/1.1\r\nHost: t\r\nContent-Le")  # then stalls
        status, body = _read_response(slow)
    assert status == 408 and "--rest_api_timeout_in_ms" in json.loads(body)["error"]
    _assert_still_serving(server)


def test_malformed_http_gets_400_and_the_server_keeps_serving(served):
    server = served()
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert _read_response(sock)[0] == 400
    _assert_still_serving(server)


def test_overload_is_shed_with_503_and_a_slow_request_times_out(served, monkeypatch):
    server = served(rest_threads=1, rest_max_pending=2, rest_timeout_seconds=1.0)
    answer = rest.handle_request

    def slow_handle(manager, method, target, body):
        time.sleep(1.5 if b"slow" in body else 0.3)
        return answer(manager, method, target, body)

    monkeypatch.setattr(rest, "handle_request", slow_handle)
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(_request(json.dumps({"instances": ["slow"]}).encode()))
        status, body = _read_response(sock)
    assert status == 504 and "did not finish within 1 s" in json.loads(body)["error"]
    time.sleep(0.6)  # the slow one still holds the only thread until it ends
    sockets = [socket.create_connection((server.host, server.rest_port), timeout=10) for _ in range(6)]
    for sock in sockets:
        sock.sendall(_request())
    replies = [_read_response(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    statuses = Counter(status for status, _ in replies)
    assert statuses[200] >= 2 and statuses[503] >= 1 and set(statuses) <= {200, 503}
    shed = next(json.loads(body) for status, body in replies if status == 503)
    assert "retry" in shed["error"]
    monkeypatch.setattr(rest, "handle_request", answer)
    _assert_still_serving(server)


def test_the_server_listens_on_loopback_unless_told(served):
    server = served()
    assert server.host == "127.0.0.1"
    assert server._rest_server._server.sockets[0].getsockname()[0] == "127.0.0.1"
