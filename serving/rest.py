"""TF Serving's REST API (``/v1/models/...``) over a :class:`~serving.server.ModelManager`, on an
asyncio HTTP/1.1 server with bounded work and timeouts.

Same URLs, JSON bodies, status codes and errors as ``tensorflow_model_server --rest_api_port``:
``GET /v1/models/{name}[/versions/{v}|/labels/{l}][/metadata]`` and
``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:(predict|classify|regress)``; the bodies are
converted by :mod:`serving.rest_json`. The metrics path of ``--monitoring_config_file`` serves the
Prometheus exposition.

Why not a thread per connection: a thousand open connections would be a thousand threads, and a
client that opens a connection and sends nothing would hold one forever. Here connections are
asyncio protocols on one event loop (the listen backlog sized for bursts), and at most
``rest_threads`` requests are worked on at once in a thread pool (TensorFlow releases the GIL while
a session runs; with batching on, the waiting requests of the pool form the batches). Beyond
``rest_max_pending`` queued requests the server answers 503 (UNAVAILABLE) instead of dropping
connections. A request must arrive within ``rest_timeout_seconds`` (else 408), an idle kept-alive
connection is closed after ``rest_idle_seconds``, and a body over ``rest_max_body_bytes`` (declared
or sent) gets 413 before it is read: memory follows the bytes received, never a declared length.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes, urlsplit

import grpc
import httptools

from serving import rest_json
from serving.rest_json import HTTP_STATUS
from serving.servable import ServingError, invalid_argument

if TYPE_CHECKING:
    from serving.metrics import ServerMetrics
    from serving.server import FrontEndOptions, ModelManager

log = logging.getLogger(__name__)

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_MAX_HEAD_BYTES = 64 * 1024
_INT64_MAX = 2**63 - 1
_DISCARD_BYTES = 1024 * 1024  # after a 413, read (and drop) this much so the client sees the answer, not a reset
_API_BY_VERB = {"predict": "Predict", "classify": "Classify", "regress": "Regress"}


@dataclass
class Reply:
    """A response to write, and what the metrics need to know about the request."""

    status: int
    body: bytes
    content_type: str = "application/json"
    model: str = ""
    version: int | None = None
    api: str = ""
    code: str = "OK"


def _error_reply(error: ServingError, **fields) -> Reply:
    payload = json.dumps({"error": error.message}).encode("utf-8")
    return Reply(HTTP_STATUS.get(error.code, 500), payload, code=error.code.name, **fields)


def _decode_part(text: str, what: str) -> str:
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_argument(f"Failed to decode {what}:{text}") from None


def handle_request(manager: ModelManager, method: str, target: str, body: bytes) -> Reply:
    """Answer one REST request (any thread); never raises."""
    path = urlsplit(target).path
    reply = Reply(200, b"")
    try:
        if method == "POST":
            match = _PREDICT_PATH.fullmatch(path)
        elif method == "GET":
            match = _STATUS_PATH.fullmatch(path)
        else:
            match = None
        if match is None:
            raise invalid_argument(f"Malformed request: {method} {path}")
        raw_name, raw_version, raw_label, verb = match.groups()
        reply.model = _decode_part(raw_name, "model name") if raw_name else ""
        label = _decode_part(raw_label, "model version label") if raw_label else None
        version = None
        if raw_version:
            version = int(raw_version)
            if version > _INT64_MAX:
                raise invalid_argument(f"Failed to convert version: {raw_version} to numeric.")
        if version is not None and label is not None:
            raise invalid_argument(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        if method == "POST":
            reply.api = _API_BY_VERB[verb.lower()]
            request = rest_json.parse_json_object(body)
            servable = manager.get_servable(reply.model, version, label)
            reply.version = servable.version
            if reply.api == "Predict":
                payload = rest_json.predict_json(servable, request)
            elif reply.api == "Classify":
                payload = rest_json.classify_json(servable, request, reply.model)
            else:
                payload = rest_json.regress_json(servable, request, reply.model)
        else:
            reply.api = "GetModelMetadata" if verb else "GetModelStatus"
            if not reply.model:
                raise invalid_argument("Missing model name in request.")
            if verb:
                payload = rest_json.metadata_json(manager, reply.model, version, label)
            else:
                payload = rest_json.status_json(manager, reply.model, version, label)
        reply.body = json.dumps(payload).encode("utf-8")
        return reply
    except ServingError as exc:
        log.debug("REST %s %s failed: %s", method, path, exc)
        return _error_reply(exc, model=reply.model, version=reply.version, api=reply.api)
    except Exception as exc:  # noqa: BLE001 - a bug must still answer in TF Serving's error shape
        log.exception("REST %s %s failed", method, path)
        return _error_reply(
            ServingError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"),
            model=reply.model,
            version=reply.version,
            api=reply.api,
        )


@dataclass
class _Request:
    method: str = ""
    url: bytearray = field(default_factory=bytearray)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True
    started: float = 0.0


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 client connection: parses requests, answers them in order."""

    def __init__(self, server: RestServer) -> None:
        self._server = server
        self._options = server.options
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current: _Request | None = None
        self._head_bytes = 0
        self._ready: deque[_Request] = deque()
        self._busy = False
        self._closing = False
        self._discarding = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)
        self._arm(self._options.rest_idle_seconds, self._close_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._closing = True
        self._cancel_timer()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarding -= len(data)
            if self._discarding <= 0:
                self._close()
            return
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except (httptools.HttpParserError, _Rejected) as exc:
            # A callback that refused the request raised _Rejected (httptools may wrap it): already answered.
            if not self._closing:
                self._reject(400, f"Malformed HTTP request: {exc}")

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self._current = _Request(started=time.monotonic())
        self._head_bytes = 0
        self._arm(self._options.rest_timeout_seconds, self._close_slow)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        self._current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        request = self._current
        request.method = self._parser.get_method().decode("ascii", "replace")
        declared = request.headers.get("content-length")
        limit = self._options.rest_max_body_bytes
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                self._reject(400, f"Content-Length {declared!r} is not a byte count")
                raise _Rejected
            if length > limit:
                self._reject(413, self._too_large_message(length))
                raise _Rejected
        if request.headers.get("expect", "").lower() == "100-continue":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self._current
        if len(request.body) + len(body) > self._options.rest_max_body_bytes:
            self._reject(413, self._too_large_message(len(request.body) + len(body)))
            raise _Rejected
        request.body += body

    def on_message_complete(self) -> None:
        request, self._current = self._current, None
        request.keep_alive = self._parser.should_keep_alive()
        self._cancel_timer()
        self._ready.append(request)
        self._transport.pause_reading()  # one request at a time per connection; pipelined ones wait
        if not self._busy:
            self._next()

    # --- answering ---

    def _next(self) -> None:
        if self._closing:
            return
        if not self._ready:
            self._busy = False
            self._transport.resume_reading()
            self._arm(self._options.rest_idle_seconds, self._close_idle)
            return
        self._busy = True
        request = self._ready.popleft()
        self._loop.create_task(self._answer(request))

    async def _answer(self, request: _Request) -> None:
        reply = await self._server.answer(request)
        if self._closing:
            return
        self._write(reply, request.keep_alive)
        if not request.keep_alive:
            self._close()
            return
        self._next()

    def _write(self, reply: Reply, keep_alive: bool) -> None:
        reason = HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else "Unknown"
        head = [f"HTTP/1.1 {reply.status} {reason}", f"Content-Type: {reply.content_type}", f"Content-Length: {len(reply.body)}"]
        if self._options.rest_cors:
            head += [
                "Access-Control-Allow-Origin: *",
                "Access-Control-Allow-Methods: POST, GET",
                "Access-Control-Allow-Headers: Content-Type",
            ]
        if not keep_alive:
            head.append("Connection: close")
        self._transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)

    def _reject(self, status: int, message: str) -> None:
        """Answer an unreadable request and end the connection without reading its body."""
        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 408: grpc.StatusCode.DEADLINE_EXCEEDED}.get(
            status, grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        self._server.count_rejected(code.name)
        self._write(Reply(status, json.dumps({"error": message}).encode("utf-8"), code=code.name), keep_alive=False)
        self._closing = True
        self._cancel_timer()
        # Closing with unread input makes the kernel send a reset, which can destroy the answer before
        # the client reads it: stop writing, drain a little of what is still coming, then close.
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._discarding = _DISCARD_BYTES
        self._transport.resume_reading()
        self._arm(2.0, self._close)

    def _too_large_message(self, size: int) -> str:
        return (
            f"Request body of {size} bytes is larger than the limit of {self._options.rest_max_body_bytes} bytes "
            "(--rest_api_max_body_bytes): send smaller batches"
        )

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > _MAX_HEAD_BYTES:
            self._reject(431, f"Request line and headers exceed {_MAX_HEAD_BYTES} bytes")
            raise _Rejected

    # --- timers ---

    def _arm(self, seconds: float, callback) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_idle(self) -> None:
        if not self._busy and self._current is None:
            self._close()

    def _close_slow(self) -> None:
        if self._current is not None and not self._closing:
            self._reject(408, f"Request not received within {self._options.rest_timeout_seconds:g} s (--rest_api_timeout_in_ms)")

    def _close(self) -> None:
        self._closing = True
        self._discarding = 0
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()


class _Rejected(Exception):
    """Stops the parser after a request was refused."""


class RestServer:
    """The REST front end: an event loop thread for the sockets, a thread pool for the work."""

    def __init__(
        self,
        manager: ModelManager,
        host: str,
        port: int,
        options: FrontEndOptions,
        metrics: ServerMetrics | None = None,
        metrics_path: str | None = None,
    ) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.options = options
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.loop = asyncio.new_event_loop()
        self.connections: set[_Connection] = set()
        self._pool = ThreadPoolExecutor(max_workers=options.rest_threads, thread_name_prefix="model-server-rest")
        self._pending = 0
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and start serving in a background thread.

        Raises:
            OSError: the address cannot be bound.
        """
        try:
            self._server = self.loop.run_until_complete(
                self.loop.create_server(
                    lambda: _Connection(self), self.host, self.port, backlog=self.options.rest_backlog, reuse_address=True
                )
            )
        except OSError as exc:
            self.loop.close()
            self._pool.shutdown(wait=False)
            raise OSError(
                f"cannot listen for REST on {self.host}:{self.port} ({exc.strerror or exc}): is another server "
                "using it? choose another --rest_api_port"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self.loop.run_forever, name="model-server-rest-loop", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, give in-flight requests up to ``grace`` seconds, then close every connection."""
        if self._thread is None:
            return

        async def shut_down() -> None:
            self._server.close()
            deadline = time.monotonic() + grace
            while self._pending and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for connection in list(self.connections):
                connection._close()
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(shut_down(), self.loop).result(timeout=grace + 5)
        except Exception:  # noqa: BLE001 - stopping must go on even if the loop is wedged
            log.warning("REST server did not shut down cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not self.loop.is_running():
            self.loop.close()

    async def answer(self, request: _Request) -> Reply:
        """Work out the reply to a complete request (in the pool), with load shedding and a timeout."""
        target = request.url.decode("latin-1")
        if self.metrics_path and request.method == "GET" and urlsplit(target).path == self.metrics_path:
            from serving.metrics import CONTENT_TYPE

            body = await self.loop.run_in_executor(self._pool, self.metrics.exposition)
            return Reply(200, body, content_type=CONTENT_TYPE)
        if request.method == "OPTIONS" and self.options.rest_cors:
            return Reply(200, b"")
        if self._pending >= self.options.rest_max_pending:
            reply = _error_reply(
                ServingError(grpc.StatusCode.UNAVAILABLE, "The server has too many requests queued; retry later")
            )
            self._record(reply, request)
            return reply
        self._pending += 1
        try:
            future = self.loop.run_in_executor(self._pool, handle_request, self.manager, request.method, target, bytes(request.body))
            remaining = self.options.rest_timeout_seconds - (time.monotonic() - request.started)
            try:
                reply = await asyncio.wait_for(asyncio.shield(future), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                reply = _error_reply(
                    ServingError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"Request did not finish within {self.options.rest_timeout_seconds:g} s (--rest_api_timeout_in_ms)",
                    )
                )
        finally:
            self._pending -= 1
        self._record(reply, request)
        return reply

    def _record(self, reply: Reply, request: _Request) -> None:
        if self.metrics is not None and reply.api:
            self.metrics.observe_request(
                reply.model, reply.version, reply.api, "REST", reply.code, time.monotonic() - request.started
            )

    def count_rejected(self, code: str) -> None:
        """Count a request refused before it was read (too large, too slow, malformed)."""
        if self.metrics is not None:
            self.metrics.observe_request("", None, "Unread", "REST", code, 0.0)
