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
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes, urlsplit

import grpc
import httptools

from serving import rest_json
from serving.loop import LoopThread
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
_SWEEP_SECONDS = 0.1
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
    head_only: bool = False  # the answer to a HEAD request: headers only


def _error_reply(error: ServingError, **fields) -> Reply:
    payload = json.dumps({"error": error.message}).encode("utf-8")
    return Reply(HTTP_STATUS.get(error.code, 500), payload, code=error.code.name, **fields)


def _decode_part(text: str, what: str) -> str:
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_argument(f"Failed to decode {what}:{text}") from None


@dataclass
class Route:
    """What a request's method and path ask for."""

    api: str
    model: str
    version: int | None
    label: str | None
    verb: str | None


def route_request(method: str, path: str) -> Route:
    """Parse a REST path as TF Serving does (its regular expressions, percent-decoding).

    Raises:
        ServingError: INVALID_ARGUMENT for a malformed path, a version that does not fit int64, or
            both a version and a label.
    """
    if not path.lower().startswith("/v1/"):
        # TF Serving's HTTP server dispatches only /v1/...: anything else is not found.
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Not found: {path}; the API lives under /v1/models/")
    if method == "POST":
        match = _PREDICT_PATH.fullmatch(path)
    elif method == "GET":
        match = _STATUS_PATH.fullmatch(path)
    else:
        match = None
    if match is None:
        raise invalid_argument(f"Malformed request: {method} {path}")
    raw_name, raw_version, raw_label, verb = match.groups()
    model = _decode_part(raw_name, "model name") if raw_name else ""
    label = _decode_part(raw_label, "model version label") if raw_label else None
    version = None
    if raw_version:
        version = int(raw_version) if len(raw_version) <= 19 else _INT64_MAX + 1
        if version > _INT64_MAX:
            raise invalid_argument(f"Failed to convert version: {raw_version} to numeric.")
    if version is not None and label is not None:
        raise invalid_argument(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
    if method == "POST":
        api = _API_BY_VERB[verb.lower()]
    else:
        api = "GetModelMetadata" if verb else "GetModelStatus"
    return Route(api, model, version, label, verb)


def _internal_error(method: str, path: str, exc: Exception, reply: Reply) -> Reply:
    log.exception("REST %s %s failed", method, path)
    return _error_reply(
        ServingError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"),
        model=reply.model,
        version=reply.version,
        api=reply.api,
    )


async def answer_predict(
    manager: ModelManager, route: Route, path: str, body: bytes, run_alone: Callable[..., Awaitable]
) -> Reply:
    """Answer a REST predict on the event loop: the body is converted here and the request waits for its
    batch without holding a thread (``run_alone(signature, values, aliases)`` runs an unbatched one)."""
    reply = Reply(200, b"", model=route.model, api=route.api)
    try:
        request = rest_json.parse_json_object(body)
        servable = manager.get_servable(route.model, route.version, route.label)
        reply.version = servable.version
        call = rest_json.prepare_predict(servable, request)
        future = call.signature.submit(call.values, call.aliases, loop=asyncio.get_running_loop())
        if future is None:
            outputs = await run_alone(call.signature, call.values, call.aliases)
        else:
            outputs = await future
        reply.body = json.dumps(rest_json.predict_response(call, outputs)).encode("utf-8")
        return reply
    except ServingError as exc:
        log.debug("REST POST %s failed: %s", path, exc)
        return _error_reply(exc, model=reply.model, version=reply.version, api=reply.api)
    except Exception as exc:  # noqa: BLE001 - a bug must still answer in TF Serving's error shape
        return _internal_error("POST", path, exc, reply)


def path_of(target: str) -> str:
    """The path of a request target (a target ``urlsplit`` cannot read is taken up to its query)."""
    try:
        return urlsplit(target).path
    except ValueError:
        return target.split("?", 1)[0]


def handle_request(manager: ModelManager, method: str, target: str, body: bytes) -> Reply:
    """Answer one REST request (any thread); never raises."""
    path = path_of(target)
    reply = Reply(200, b"")
    try:
        route = route_request(method, path)
        reply.model, reply.api = route.model, route.api
        version, label, verb = route.version, route.label, route.verb
        if method == "POST":
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
        return _internal_error(method, path, exc, reply)


@dataclass
class _Request:
    method: str = ""
    url: bytearray = field(default_factory=bytearray)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True
    started: float = 0.0
    reply: Reply | None = None  # set for a refusal queued behind an earlier request's answer
    head_done: bool = False
    head_received: int = 0


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
        self._refusing = False
        self._write_paused = False
        self._reading_paused = False
        # Deadlines (monotonic seconds), checked by the server's sweeper: one for the connection's reading
        # side (idle, or a request still arriving) and one for the request being answered.
        self._read_deadline: float | None = None
        self._on_read_deadline: Callable[[], None] = self._close
        self._answer_deadline: float | None = None
        self._inflight: _Request | None = None

    # --- asyncio callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)
        self._arm(self._options.rest_idle_seconds, self._close_idle)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests until it catches up.
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._busy and not self._closing:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._closing = True
        self._cancel_timer()
        self._answer_deadline = None

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarding -= len(data)
            if self._discarding <= 0:
                self._close()
            return
        if self._closing or self._refusing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A client offering an upgrade (curl --http2 sends Upgrade: h2c) keeps talking HTTP/1.1 when the
            # server does not switch: answer what was asked, then end the connection (its parser is done).
            self._refusing = True
            if self._ready:
                self._ready[-1].keep_alive = False
            elif not self._busy:
                self._reject(400, "Malformed HTTP request: an upgrade with a request body is not supported")
            return
        except (httptools.HttpParserError, _Rejected) as exc:
            # A callback that refused the request raised _Rejected (httptools may wrap it): already answered.
            if not self._refusing:
                self._reject(400, f"Malformed HTTP request: {exc}")
            return
        if self._current is not None and not self._current.head_done:
            # httptools buffers a header line until it ends: count what arrived, not only complete headers.
            self._current.head_received += len(data)
            if self._current.head_received > _MAX_HEAD_BYTES:
                self._reject(431, f"Request line and headers exceed {_MAX_HEAD_BYTES} bytes")

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
        request.head_done = True
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
        self._cancel_timer()  # the read deadline; the answer has its own
        self._ready.append(request)
        if not self._busy:
            self._next()
        elif not self._reading_paused:
            # One request at a time per connection: a pipelined one waits, and the socket is not read
            # meanwhile (pausing only then spares two epoll calls per request in the common case).
            self._transport.pause_reading()
            self._reading_paused = True

    # --- answering ---

    def _next(self) -> None:
        if self._closing:
            return
        if not self._ready:
            self._busy = False
            if self._write_paused:
                if not self._reading_paused:
                    self._transport.pause_reading()
                    self._reading_paused = True
                return  # resume_writing() carries on once the client has read what is buffered
            if self._reading_paused:
                self._transport.resume_reading()
                self._reading_paused = False
            if self._current is not None:
                # A pipelined request is partly here: its time to arrive runs from now (reading was paused).
                self._arm(self._options.rest_timeout_seconds, self._close_slow)
            else:
                self._arm(self._options.rest_idle_seconds, self._close_idle)
            return
        self._busy = True
        request = self._ready.popleft()
        if request.reply is not None:
            self._send_refusal(request.reply)
            return
        self._inflight = request
        self._answer_deadline = request.started + self._options.rest_timeout_seconds
        self._server.spawn(self._answer(request))

    async def _answer(self, request: _Request) -> None:
        try:
            reply = await self._server.answer(request)
        except Exception as exc:  # noqa: BLE001 - a bug must still answer, never leave the connection hanging
            log.exception("REST request failed")
            reply = _error_reply(ServingError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"))
        if self._closing or self._inflight is not request:
            return  # the connection went away, or the request was already answered with 504
        self._finish(request, reply)

    def _finish(self, request: _Request, reply: Reply) -> None:
        self._inflight = None
        self._answer_deadline = None
        self._write(reply, request.keep_alive)
        if not request.keep_alive:
            self._close()
            return
        self._next()

    def check_deadlines(self, now: float) -> None:
        """Called by the server's sweeper: act on a deadline that has passed."""
        if self._answer_deadline is not None and now >= self._answer_deadline and self._inflight is not None:
            request = self._inflight
            error = ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"Request did not finish within {self._options.rest_timeout_seconds:g} s (--rest_api_timeout_in_ms)",
            )
            self._server.count_rejected(error.code.name)
            self._finish(request, _error_reply(error))
        if self._read_deadline is not None and now >= self._read_deadline and not self._closing and not self._busy:
            self._read_deadline = None
            self._on_read_deadline()

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
        body = b"" if reply.head_only else reply.body
        self._transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    def _reject(self, status: int, message: str) -> None:
        """Answer an unreadable request and end the connection without reading its body."""
        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 408: grpc.StatusCode.DEADLINE_EXCEEDED}.get(
            status, grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        self._server.count_rejected(code.name)
        reply = Reply(status, json.dumps({"error": message}).encode("utf-8"), code=code.name)
        self._current = None
        self._refusing = True  # nothing more is parsed on this connection
        if self._busy:
            # An earlier request is still being answered: answers go out in order, so the refusal waits
            # its turn behind the requests before it; nothing after it is read.
            self._ready.append(_Request(reply=reply, keep_alive=False))
            self._cancel_timer()
            return
        self._send_refusal(reply)

    def _send_refusal(self, reply: Reply) -> None:
        self._write(reply, keep_alive=False)
        self._closing = True
        self._cancel_timer()
        # Closing with unread input makes the kernel send a reset, which can destroy the answer before
        # the client reads it: stop writing, drain a little of what is still coming, then close.
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._discarding = _DISCARD_BYTES
        if self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False
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

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        # A deadline, not a loop timer per request: the sweeper checks every connection a few times a second.
        self._read_deadline = time.monotonic() + seconds
        self._on_read_deadline = callback

    def _cancel_timer(self) -> None:
        self._read_deadline = None

    def _close_idle(self) -> None:
        if not self._busy and self._current is None:
            self._close()

    def _close_slow(self) -> None:
        if self._current is not None and not self._refusing:
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
        batching: bool = False,
        loop_thread: LoopThread | None = None,
    ) -> None:
        self.manager = manager
        self.batching = batching
        self._own_loop = loop_thread is None
        self._loop_thread = loop_thread or LoopThread("model-server-rest-loop")
        self.host = host
        self.port = port
        self.options = options
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.loop = self._loop_thread.loop
        self.connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(max_workers=options.rest_threads, thread_name_prefix="model-server-rest")
        self._pending = 0
        self._server: asyncio.base_events.Server | None = None
        self._started = False

    def start(self) -> None:
        """Bind and start serving in a background thread.

        Raises:
            OSError: the address cannot be bound.
        """
        async def listen() -> asyncio.base_events.Server:
            server = await self.loop.create_server(
                lambda: _Connection(self), self.host, self.port, backlog=self.options.rest_backlog, reuse_address=True
            )
            self._sweeper = self.loop.create_task(self._sweep())
            return server

        try:
            self._server = self._loop_thread.run(listen())
        except OSError as exc:
            self._pool.shutdown(wait=False)
            if self._own_loop:
                self._loop_thread.stop()
            raise OSError(
                f"cannot listen for REST on {self.host}:{self.port} ({exc.strerror or exc}): is another server "
                "using it? choose another --rest_api_port"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._started = True

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, give in-flight requests up to ``grace`` seconds, then close every connection."""
        if not self._started:
            return
        self._started = False

        async def shut_down() -> None:
            self._sweeper.cancel()
            self._server.close()
            deadline = time.monotonic() + grace
            while self._tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for connection in list(self.connections):
                connection._close()
            await asyncio.sleep(0)

        try:
            self._loop_thread.run(shut_down(), timeout=grace + 5)
        except Exception:  # noqa: BLE001 - stopping must go on even if the loop is wedged
            log.warning("REST server did not shut down cleanly", exc_info=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._own_loop:
            self._loop_thread.stop()

    def spawn(self, coroutine) -> None:
        """Run a connection's answer as a task the server can wait for, or cancel, when it stops."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        # The deadlines' resolution: fine enough for timeouts counted in seconds, cheap for 1,000 connections.
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = time.monotonic()
            for connection in list(self.connections):
                try:
                    connection.check_deadlines(now)
                except Exception:  # noqa: BLE001 - one broken connection must not stop the others' timeouts
                    log.exception("checking a REST connection's deadlines failed")
                    connection._close()

    async def answer(self, request: _Request) -> Reply:
        """Work out the reply to a complete request, with load shedding (the connection times it out)."""
        head_only = request.method == "HEAD"
        reply = await self._reply_to(request)
        reply.head_only = head_only
        return reply

    async def _reply_to(self, request: _Request) -> Reply:
        target = request.url.decode("latin-1")
        if request.method == "HEAD":
            request.method = "GET"  # the same answer without its body
        if self.metrics_path and request.method == "GET" and path_of(target) == self.metrics_path:
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
            reply = await self._work_for(request, target)
        finally:
            self._pending -= 1
        self._record(reply, request)
        return reply

    def _work_for(self, request: _Request, target: str) -> Awaitable[Reply]:
        body = bytes(request.body)
        path = path_of(target)
        if request.method == "POST" and self.batching:
            try:
                route = route_request(request.method, path)
            except ServingError:
                route = None
            if route is not None and route.api == "Predict":
                # Batched predicts wait for their batch on the loop: no thread each, no hand-offs.
                return answer_predict(self.manager, route, path, body, self._run_alone)
        return self.loop.run_in_executor(self._pool, handle_request, self.manager, request.method, target, body)

    async def _run_alone(self, signature, values, aliases):
        return await self.loop.run_in_executor(self._pool, signature.run_session, values, aliases)

    def _record(self, reply: Reply, request: _Request) -> None:
        if self.metrics is not None and reply.api:
            self.metrics.observe_request(
                reply.model, reply.version, reply.api, "REST", reply.code, time.monotonic() - request.started
            )

    def count_rejected(self, code: str) -> None:
        """Count a request refused before it was read (too large, too slow, malformed)."""
        if self.metrics is not None:
            self.metrics.observe_request("", None, "Unread", "REST", code, 0.0)
