"""The serving benchmark's load generator: N closed-loop clients keep N requests in flight for a fixed time
against a REST endpoint, a gRPC endpoint or a model loaded in this process, and every answer is checked.

On a 2-core machine the client competes with the server for CPU, and a Python client inside the server's
process would also share its GIL. So ``python -m benchmarks.loadgen SPEC --out FILE`` runs in a process of
its own, and its clients are made cheap: REST requests are pre-built HTTP/1.1 bytes written on raw asyncio
connections (one kept-alive connection per client, on uvloop when it is installed); gRPC requests are
pre-serialized ``PredictRequest`` bytes sent over one ``grpc.aio`` channel; answers are checked by counting
``"scores"`` keys or reading the response's batch dimension, not by decoding them (the first answer on each
connection is decoded in full). In-process runs call the model from N threads, with inputs built beforehand.

A cell (N clients, texts per request): every client sends back to back; answers that complete in the first
``warmup_seconds`` are not counted, those that complete in the next ``seconds`` are, and at the end each
client finishes the request it has in flight, uncounted. A failed request (an error status, a wrong answer,
a reset connection, no answer in time) counts as an error wherever it happens, never as a success; the
client then carries on, on a new connection if the old one broke.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from benchmarks.metrics import load_summary

# Texts behind each request pool: every cell and every server sees the same reviews.
POOL_TEXTS = 2048
# How long the clients may take to finish their last requests before those count as timed out.
DRAIN_SECONDS = 30.0
# Pause after a failure, so a server that fails fast does not turn the client into a busy loop.
BACKOFF_SECONDS = 0.01
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
_SCORES_KEY = b'"scores"'


class _Tally:
    """One cell's bookkeeping: the timed window, the latencies counted in it, and every failure."""

    def __init__(self, warmup_seconds: float, seconds: float) -> None:
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.measure_from = self.started + warmup_seconds
        self.stop_at = self.measure_from + seconds
        self.seconds = seconds
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, started: float, finished: float) -> None:
        if self.measure_from <= finished <= self.stop_at:
            self.latencies.append(finished - started)

    def fail(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def summary(self, clients: int, texts_per_request: int) -> dict[str, Any]:
        # What this process spent, in percent of one core over the cell: the client's share of the
        # machine for remote runs, the model's and the client's for in-process ones.
        cpu = (time.process_time() - self.cpu_started) / (time.perf_counter() - self.started)
        return {
            "clients": clients,
            "batch_size": texts_per_request,
            "client_cpu_percent": 100 * cpu,
            **load_summary(
                self.latencies, window_seconds=self.seconds, texts_per_request=texts_per_request, errors=self.errors
            ),
        }


def request_batches(texts: Sequence[str], batch_size: int, pool_texts: int = POOL_TEXTS) -> list[list[str]]:
    """The first ``pool_texts`` of ``texts`` (repeated when there are fewer) cut into requests of ``batch_size``.

    Raises:
        ValueError: ``texts`` is empty or ``batch_size`` is below 1.
    """
    if not texts or batch_size < 1:
        raise ValueError(f"need texts and a batch size of at least 1 (got {len(texts)} texts, batch_size={batch_size})")
    pool = cycle(texts)
    return [list(islice(pool, batch_size)) for _ in range(max(1, pool_texts // batch_size))]


# --- REST -------------------------------------------------------------------------------------------------


def http_request(host: str, port: int, path: str, texts: Sequence[str]) -> bytes:
    """The whole HTTP/1.1 request (head and JSON body ``{"instances": texts}``) of one predict call."""
    body = json.dumps({"instances": list(texts)}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def take_response(buffer: bytearray) -> tuple[int, bytes, bool] | None:
    """Remove one complete HTTP/1.1 response from the front of ``buffer``.

    Returns:
        (status, body, keep_alive), or None while the response is still incomplete.

    Raises:
        ValueError: the bytes are not an HTTP response, or it has no Content-Length (the servers measured
            always send one; chunked bodies are not read).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.") or len(lines[0]) < 12 or not lines[0][9:12].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    length, keep_alive = None, lines[0].startswith(b"HTTP/1.1")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    if length is None:
        raise ValueError(f"HTTP response without Content-Length: {lines[0]!r}")
    total = end + 4 + length
    if len(buffer) < total:
        return None
    body = bytes(buffer[end + 4 : total])
    del buffer[:total]
    return int(lines[0][9:12]), body, keep_alive


def check_http_answer(status: int, body: bytes, texts: int, *, decode: bool = False) -> str | None:
    """Why a REST predict answer for ``texts`` texts is wrong, or None when it is right.

    The answer must be status 200 with ``texts`` rows of scores. ``decode`` parses the JSON and checks every
    row; without it the ``"scores"`` keys are counted, which costs the client almost nothing.
    """
    if status != 200:
        return f"HTTP {status}"
    if not decode:
        return None if body.count(_SCORES_KEY) == texts else "wrong answer"
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return "wrong answer"
    rows_ok = isinstance(predictions, list) and len(predictions) == texts and all(
        isinstance(row, dict) and isinstance(row.get("scores"), list) and len(row["scores"]) >= 2 for row in predictions
    )
    return None if rows_ok else "wrong answer"


class _HttpConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: send a pre-built request, wait for its whole response."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None
        self._transport: asyncio.Transport | None = None
        self.broken: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return
        try:
            response = take_response(self._buffer)
        except ValueError as exc:
            self._break(exc)
            return
        if response is not None:
            self._waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(exc or ConnectionResetError("the server closed the connection"))

    def send(self, request: bytes) -> asyncio.Future:
        if self.broken is not None:
            raise self.broken
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()


async def _connect(host: str, port: int) -> _HttpConnection:
    _, connection = await asyncio.get_running_loop().create_connection(_HttpConnection, host, port)
    return connection


async def _http_client(
    connection: _HttpConnection | None,
    host: str,
    port: int,
    requests: list[bytes],
    first: int,
    texts: int,
    tally: _Tally,
) -> None:
    sent, decode = first, False
    while True:
        if connection is None:
            if time.perf_counter() >= tally.stop_at:
                return
            try:
                connection, decode = await _connect(host, port), True
            except OSError as exc:
                tally.fail(f"connect: {type(exc).__name__}")
                await asyncio.sleep(BACKOFF_SECONDS)
                continue
        started = time.perf_counter()
        if started >= tally.stop_at:
            connection.close()
            return
        try:
            status, body, keep_alive = await connection.send(requests[sent % len(requests)])
        except (OSError, ValueError) as exc:
            tally.fail(type(exc).__name__)
            connection.close()
            connection = None
            await asyncio.sleep(BACKOFF_SECONDS)
            continue
        finished = time.perf_counter()
        sent += 1
        failure = check_http_answer(status, body, texts, decode=decode)
        decode = False
        if failure:
            tally.fail(failure)
            await asyncio.sleep(BACKOFF_SECONDS)
        else:
            tally.record(started, finished)
        if not keep_alive:
            connection.close()
            connection = None


async def _open_connection(
    host: str, port: int, request: bytes, texts: int
) -> tuple[_HttpConnection | None, str | None]:
    """A new connection that has answered ``request`` correctly, or (None, why not)."""
    try:
        connection = await _connect(host, port)
    except OSError as exc:
        return None, f"connect: {type(exc).__name__}"
    try:
        status, body, keep_alive = await asyncio.wait_for(connection.send(request), DRAIN_SECONDS)
    except (OSError, ValueError, TimeoutError) as exc:
        connection.close()
        return None, type(exc).__name__
    failure = check_http_answer(status, body, texts, decode=True)
    if failure or not keep_alive:
        connection.close()
        return None, failure
    return connection, None


async def _run_http_cell(
    host: str, port: int, requests: list[bytes], texts: int, clients: int, warmup_seconds: float, seconds: float
) -> dict[str, Any]:
    # Open the connections one at a time before the clock starts, each answering one request first: a
    # server that accepts slowly behind a short listen backlog (http.server's is 5) would otherwise drop
    # SYNs, and each dropped SYN costs the client a one-second retransmit.
    step = max(1, len(requests) // clients)
    connections: list[_HttpConnection | None] = []
    failed: Counter[str] = Counter()
    for i in range(clients):
        connection, failure = await _open_connection(host, port, requests[i * step % len(requests)], texts)
        connections.append(connection)
        if failure:
            failed[failure] += 1
    tally = _Tally(warmup_seconds, seconds)
    tally.errors.update(failed)
    tasks = [
        asyncio.ensure_future(_http_client(c, host, port, requests, i * step, texts, tally))
        for i, c in enumerate(connections)
    ]
    await _drain(tasks, tally)
    return tally.summary(clients, texts)


async def _drain(tasks: list[asyncio.Future], tally: _Tally) -> None:
    remaining = tally.stop_at - time.perf_counter() + DRAIN_SECONDS
    _, pending = await asyncio.wait(tasks, timeout=max(remaining, 0.1))
    for task in pending:
        tally.fail("timeout")
        task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# --- gRPC -------------------------------------------------------------------------------------------------


def grpc_request(model_name: str, texts: Sequence[str]) -> bytes:
    """A serialized ``PredictRequest`` of ``texts`` for the ``serving_default`` signature's ``text`` input."""
    from maas_tasks.tf_runtime import import_tensorflow

    import_tensorflow()  # the TF Serving protos import TensorFlow; quietly, once
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = "serving_default"
    tensor = request.inputs["text"]
    tensor.dtype = types_pb2.DT_STRING
    tensor.tensor_shape.dim.add(size=len(texts))
    tensor.string_val.extend(t.encode() for t in texts)
    return request.SerializeToString()


def check_grpc_answer(reply: bytes, texts: int) -> str | None:
    """Why a serialized ``PredictResponse`` is not ``texts`` rows of scores, or None when it is."""
    from tensorflow_serving.apis import predict_pb2

    try:
        outputs = predict_pb2.PredictResponse.FromString(reply).outputs
    except Exception:  # protobuf's DecodeError, whichever backend raises it
        return "wrong answer"
    if "scores" not in outputs:
        return "wrong answer"
    dims = outputs["scores"].tensor_shape.dim
    return None if dims and dims[0].size == texts else "wrong answer"


async def _grpc_client(predict: Any, requests: list[bytes], first: int, texts: int, tally: _Tally) -> None:
    import grpc

    sent = first
    while True:
        started = time.perf_counter()
        if started >= tally.stop_at:
            return
        try:
            reply = await predict(requests[sent % len(requests)], timeout=DRAIN_SECONDS)
        except grpc.aio.AioRpcError as exc:
            tally.fail(f"gRPC {exc.code().name}")
            await asyncio.sleep(BACKOFF_SECONDS)
            continue
        finished = time.perf_counter()
        sent += 1
        failure = check_grpc_answer(reply, texts)
        if failure:
            tally.fail(failure)
            await asyncio.sleep(BACKOFF_SECONDS)
        else:
            tally.record(started, finished)


async def _run_grpc_cell(
    target: str, requests: list[bytes], texts: int, clients: int, warmup_seconds: float, seconds: float
) -> dict[str, Any]:
    import grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=DRAIN_SECONDS)
        # No serializers: the requests go out as the bytes built beforehand, the replies come back as bytes.
        predict = channel.unary_unary(PREDICT_METHOD)
        tally = _Tally(warmup_seconds, seconds)
        step = max(1, len(requests) // clients)
        tasks = [asyncio.ensure_future(_grpc_client(predict, requests, i * step, texts, tally)) for i in range(clients)]
        await _drain(tasks, tally)
    return tally.summary(clients, texts)


# --- in process -------------------------------------------------------------------------------------------


def run_thread_cell(
    predict: Callable[[Any], int], inputs: list[Any], texts: int, clients: int, warmup_seconds: float, seconds: float
) -> dict[str, Any]:
    """One cell of ``clients`` threads calling ``predict`` (returns the rows of scores) on the pre-built ``inputs``."""
    tally = _Tally(warmup_seconds, seconds)
    step = max(1, len(inputs) // clients)

    def client(first: int) -> None:
        sent = first
        while True:
            started = time.perf_counter()
            if started >= tally.stop_at:
                return
            try:
                rows = predict(inputs[sent % len(inputs)])
            except Exception as exc:  # a failed call is an error of the cell, not the end of the run
                tally.fail(type(exc).__name__)
                time.sleep(BACKOFF_SECONDS)
                continue
            finished = time.perf_counter()
            sent += 1
            if rows != texts:
                tally.fail("wrong answer")
            else:
                tally.record(started, finished)

    threads = [threading.Thread(target=client, args=(i * step,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(tally.stop_at - time.perf_counter() + DRAIN_SECONDS, 0.1))
        if thread.is_alive():
            tally.fail("timeout")
    return tally.summary(clients, texts)


# --- a spec's runs ----------------------------------------------------------------------------------------


def run_cells(run: dict[str, Any], texts: Sequence[str], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of ``spec["cells"]`` against one target, described by ``run`` (see :func:`run_spec`)."""
    warmup, seconds = spec["warmup_seconds"], spec["seconds"]
    kind = run["kind"]
    results = []
    if kind == "http":
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            for cell in spec["cells"]:
                size = cell["batch_size"]
                requests = [http_request(run["host"], run["port"], run["path"], b) for b in request_batches(texts, size)]
                results.append(runner.run(
                    _run_http_cell(run["host"], run["port"], requests, size, cell["clients"], warmup, seconds)
                ))
    elif kind == "grpc":
        with asyncio.Runner() as runner:
            for cell in spec["cells"]:
                size = cell["batch_size"]
                requests = [grpc_request(run["model_name"], b) for b in request_batches(texts, size)]
                results.append(runner.run(_run_grpc_cell(run["target"], requests, size, cell["clients"], warmup, seconds)))
    elif kind == "inprocess":
        from benchmarks.inprocess import MODEL_LOADERS

        model = MODEL_LOADERS[run["loader"]](Path(run["model_dir"]))
        for cell in spec["cells"]:
            size = cell["batch_size"]
            inputs = [model.prepare(b) for b in request_batches(texts, size)]
            model.predict(inputs[0])  # the first run of a shape builds its kernels: not part of any cell
            results.append(run_thread_cell(model.predict, inputs, size, cell["clients"], warmup, seconds))
    else:
        raise ValueError(f"unknown run kind {kind!r}: expected http, grpc or inprocess")
    return results


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run every run of ``spec`` one after another.

    ``spec`` holds ``texts``, ``seconds``, ``warmup_seconds``, ``cells`` (``clients``, ``batch_size``) and
    ``runs``, each with a ``name`` and a ``kind``: ``http`` (``host``, ``port``, ``path``), ``grpc``
    (``target``, ``model_name``) or ``inprocess`` (``loader``: session or function, ``model_dir``).

    Returns:
        ``rows`` ({run name: one result per cell: ``clients``, ``batch_size``, ``client_cpu_percent`` and
        :func:`~benchmarks.metrics.load_summary`'s figures}) and ``seconds`` ({run name: wall time}).
    """
    rows, took = {}, {}
    for run in spec["runs"]:
        started = time.perf_counter()
        rows[run["name"]] = run_cells(run, spec["texts"], spec)
        took[run["name"]] = time.perf_counter() - started
    return {"rows": rows, "seconds": took}


def main(argv: list[str] | None = None) -> int:
    """Run a JSON spec's cells and write the results as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="JSON file: see benchmarks.loadgen.run_spec")
    parser.add_argument("--out", type=Path, required=True, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    result = run_spec(json.loads(args.spec.read_text()))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
