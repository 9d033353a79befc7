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


class Responses:
    """Reads HTTP/1.1 responses off a socket one after another (pipelined ones may share a packet)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {self.buffer!r}")
        self.buffer += chunk

    def next(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head.split(b" ")[1]), body


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    return Responses(sock).next()


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
    time.sleep(1.0)  # the slow one still holds the only thread (and a pending slot) until it ends
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


def test_answers_to_pipelined_requests_keep_their_order(served):
    server = served(rest_max_body_bytes=1024)
    status_path = b"GET /v1/models/sentiment HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        # Two requests in one packet, then a third whose declared body is over the limit.
        sock.sendall(_request() + status_path + b"POST " + PREDICT + b" HTTP/1.1\r\nContent-Length: 999999\r\n\r\n")
        responses = Responses(sock)
        first, second, third = (responses.next() for _ in range(3))
    assert first[0] == 200 and "predictions" in json.loads(first[1])
    assert second[0] == 200 and "model_version_status" in json.loads(second[1])
    assert third[0] == 413
    _assert_still_serving(server)


def test_a_pipelined_request_that_stalls_still_times_out(served):
    server = served(rest_idle_seconds=0.5, rest_timeout_seconds=0.5)
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(_request() + b"GET /v1/mo")  # the second request never finishes
        responses = Responses(sock)
        assert responses.next()[0] == 200
        assert responses.next()[0] == 408
        assert sock.recv(100) == b""


def test_a_header_trickling_forever_gets_431(served):
    server = served()
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models/sentiment HTTP/1.1\r\nX-Long: ")
        try:
            for _ in range(100):
                sock.sendall(b"x" * 4096)
        except OSError:
            pass  # the server may close first
        assert _read_response(sock)[0] == 431
    _assert_still_serving(server)


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"GET //[/v1/models/x HTTP/1.1\r\nHost: t\r\n\r\n", 404, "Not found"),
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", 404, "Not found"),
        (b"GET /v1/models/sentiment/versions/" + b"9" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 400, "Failed to convert version"),
    ],
)
def test_odd_targets_get_tf_servings_errors(served, raw, status, message):
    server = served()
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(raw)
        got, body = _read_response(sock)
    assert got == status and message in json.loads(body)["error"]
    _assert_still_serving(server)


def test_an_h2c_upgrade_offer_is_answered_over_http_1_1(served):
    server = served()
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/models/sentiment HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        )
        status, body = _read_response(sock)
    assert status == 200 and "model_version_status" in json.loads(body)


def test_head_gets_headers_without_a_body(served):
    server = served()
    with socket.create_connection((server.host, server.rest_port), timeout=10) as sock:
        sock.sendall(b"HEAD /v1/models/sentiment HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /v1/models/sentiment HTTP/1.1\r\nHost: t\r\n\r\n")
        head = b""
        while head.count(b"\r\n\r\n") < 2:
            head += sock.recv(65536)
    first, _, rest_bytes = head.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and rest_bytes.startswith(b"HTTP/1.1 200")


def test_a_tiny_grpc_request_declaring_a_huge_tensor_is_refused(served):
    import grpc
    from tensorflow.core.framework import tensor_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    server = served()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "sentiment"
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"])
    tensor.tensor_shape.dim.add().size = 2**42
    request.inputs["text"].CopyFrom(tensor)
    with grpc.insecure_channel(server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensor parsing error" in info.value.details()
    _assert_still_serving(server)
