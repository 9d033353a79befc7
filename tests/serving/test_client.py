"""The Python client's timeouts and retries: transient failures (503/UNAVAILABLE, 429) are tried
again with backoff, a request's own error is not, and a silent server times out."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.client import ServerUnreachable, ServingClientError, predict_rest


class ScriptedServer:
    """Answers predict requests with the scripted statuses in turn, then 200 with one prediction."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.calls = 0
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                script.calls += 1
                status = script.statuses.pop(0) if script.statuses else 200
                if status == 200:
                    body = {"predictions": [{"scores": [0.2, 0.8], "classes": ["neg", "pos"], "label": "pos"}]}
                else:
                    body = {"error": f"scripted {status}"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(statuses):
        servers.append(ScriptedServer(statuses))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_transient_errors_are_retried(scripted):
    server = scripted([503, 429])
    rows = predict_rest(["x"], model="m", rest_url=server.url, version=1, retries=3)
    assert rows[0]["label"] == "pos" and server.calls == 3


def test_retries_give_up_with_the_last_error(scripted):
    server = scripted([503] * 5)
    with pytest.raises(ServingClientError) as info:
        predict_rest(["x"], model="m", rest_url=server.url, version=1, retries=2)
    assert info.value.code == "UNAVAILABLE" and server.calls == 3


def test_a_bad_request_is_not_retried(scripted):
    server = scripted([400])
    with pytest.raises(ServingClientError, match="scripted 400") as info:
        predict_rest(["x"], model="m", rest_url=server.url, version=1, retries=3)
    assert info.value.code == "INVALID_ARGUMENT" and server.calls == 1


def test_a_silent_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnreachable, match="timeout 0.3s"):
            predict_rest(["x"], model="m", rest_url=f"http://127.0.0.1:{listener.getsockname()[1]}", version=1,
                         timeout=0.3, retries=1)
        assert time.monotonic() - started < 5
    finally:
        listener.close()
