"""Prediction latency and throughput of the model server, over REST and gRPC on loopback.

The exported version is served by :class:`serving.server.ModelServer` on free loopback ports. One
client sends the requests one after another over a kept-alive connection (HTTP/1.1 for REST, one
channel for gRPC), so the figures are the server's per-request cost plus loopback, not client set-up.
Request bodies are built before timing starts; every response is checked before it counts.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from benchmarks.metrics import latency_summary
from maas_tasks.storage import Store, download_tree

HOST = "127.0.0.1"
WARMUP_REQUESTS = 5


class BenchmarkError(RuntimeError):
    """The model server answered a benchmark request wrongly."""


def _batches(texts: Sequence[str], size: int, count: int) -> list[list[str]]:
    pool = cycle(texts)
    return [list(islice(pool, size)) for _ in range(count)]


def _time_requests(send: Callable[[Any], None], requests: list[Any]) -> list[float]:
    for request in requests[:WARMUP_REQUESTS]:
        send(request)
    latencies = []
    for request in requests:
        started = time.perf_counter()
        send(request)
        latencies.append(time.perf_counter() - started)
    return latencies


def _rest_sender(port: int, model_name: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    path = f"/v1/models/{model_name}:predict"

    def send(body: bytes) -> None:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise BenchmarkError(f"REST predict at {HOST}:{port}{path} answered {response.status}: {payload[:300]!r}")

    return send, connection.close


def _grpc_sender(target: str) -> tuple[Callable[[Any], None], Callable[[], None]]:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def send(request: Any) -> None:
        response = stub.Predict(request, timeout=60)
        if "scores" not in response.outputs:
            raise BenchmarkError(f"gRPC Predict at {target} answered without scores: {sorted(response.outputs)}")

    return send, channel.close


def _grpc_request(model_name: str, texts: list[str]) -> Any:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = "serving_default"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto([t.encode() for t in texts], dtype=tf.string))
    return request


def measure_serving(
    store: Store,
    export_prefix: str,
    texts: Sequence[str],
    *,
    model_name: str = "sentiment",
    single_requests: int = 300,
    batch_requests: int = 50,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Serve the exported version at ``export_prefix`` and time predictions of ``texts``.

    Sends ``single_requests`` one-text requests and ``batch_requests`` requests of ``batch_size`` texts,
    over REST and over gRPC (after a few untimed warm-up requests each).

    Returns:
        ``load_seconds`` (start-up until the model is available) and, per ``rest``/``grpc`` and
        ``single``/``batch``, :func:`~benchmarks.metrics.latency_summary`'s dict.

    Raises:
        BenchmarkError: a response was an error or lacked the scores.
        ValueError: ``texts`` is empty or a count is below 1.
    """
    from serving.model_config import single_model_config
    from serving.server import ModelServer

    if not texts:
        raise ValueError("no texts to send: the eval split is empty")
    if min(single_requests, batch_requests, batch_size) < 1:
        raise ValueError(
            f"single_requests={single_requests}, batch_requests={batch_requests} and batch_size={batch_size} "
            "must all be at least 1"
        )
    workloads = {
        "single": (_batches(texts, 1, single_requests), 1),
        "batch": (_batches(texts, batch_size, batch_requests), batch_size),
    }
    with tempfile.TemporaryDirectory(prefix="maas-bench-serving-") as tmp:
        base = Path(tmp) / model_name
        version = export_prefix.rstrip("/").rsplit("/", 1)[-1]
        download_tree(store, export_prefix, base / version)
        server = ModelServer(
            single_model_config(model_name, base), host=HOST, grpc_port=0, rest_port=0, poll_wait_seconds=0
        )
        started = time.perf_counter()
        server.start()
        result: dict[str, Any] = {"load_seconds": time.perf_counter() - started}
        try:
            send, close = _rest_sender(server.rest_port, model_name)
            try:
                result["rest"] = {
                    name: latency_summary(
                        _time_requests(send, [json.dumps({"instances": b}).encode() for b in batches]),
                        texts_per_request=per,
                    )
                    for name, (batches, per) in workloads.items()
                }
            finally:
                close()
            send, close = _grpc_sender(server.grpc_target)
            try:
                result["grpc"] = {
                    name: latency_summary(
                        _time_requests(send, [_grpc_request(model_name, b) for b in batches]),
                        texts_per_request=per,
                    )
                    for name, (batches, per) in workloads.items()
                }
            finally:
                close()
        finally:
            server.stop()
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _memory_mb(pid: int) -> dict[str, float]:
    """``rss_mb`` (now) and ``peak_rss_mb`` (VmHWM: the most the process has held) of a Linux process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


def measure_serving_memory(
    store: Store,
    export_prefix: str,
    texts: Sequence[str],
    *,
    model_name: str = "sentiment",
    batch_size: int = 256,
    requests: int = 5,
    start_timeout: float = 120.0,
) -> dict[str, Any]:
    """Peak memory of a model server process answering REST requests of ``batch_size`` of the longest ``texts``.

    The server (``python -m serving.server``) runs in its own process, so its figures hold only what serving
    needs: its RSS once the version is loaded and warm, and its peak (VmHWM) after ``requests`` batches.

    Returns:
        ``batch_size``, ``words_per_text`` (mean over the batch), ``loaded`` and ``after_batches``
        (:func:`_memory_mb` dicts), ``batch_peak_increase_mb`` and ``batch_seconds`` (mean per request).

    Raises:
        BenchmarkError: the server did not come up in ``start_timeout`` seconds or answered wrongly.
    """
    import subprocess
    import sys

    if not texts:
        raise ValueError("no texts to send: the eval split is empty")
    longest = sorted(texts, key=len, reverse=True)[:batch_size]
    batch = [longest[i % len(longest)] for i in range(batch_size)]
    body = json.dumps({"instances": batch}).encode()
    with tempfile.TemporaryDirectory(prefix="maas-bench-memory-") as tmp:
        version = export_prefix.rstrip("/").rsplit("/", 1)[-1]
        download_tree(store, export_prefix, Path(tmp) / model_name / version)
        grpc_port = _free_port()
        rest_port = _free_port()
        while rest_port == grpc_port:
            rest_port = _free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.server", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
             f"--model_name={model_name}", f"--model_base_path={Path(tmp) / model_name}",
             "--file_system_poll_wait_seconds=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if process.poll() is not None:
                    raise BenchmarkError(f"the model server exited with status {process.returncode} while starting")
                connection = http.client.HTTPConnection(HOST, rest_port, timeout=5)
                try:
                    connection.request("GET", f"/v1/models/{model_name}")
                    if b"AVAILABLE" in connection.getresponse().read():
                        break
                except OSError:
                    pass
                finally:
                    connection.close()
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"the model server did not serve {model_name} within {start_timeout:.0f} s")
                time.sleep(0.5)
            loaded = _memory_mb(process.pid)
            send, close = _rest_sender(rest_port, model_name)
            try:
                latencies = _time_requests(send, [body] * requests)
            finally:
                close()
            after = _memory_mb(process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return {
        "batch_size": batch_size,
        "words_per_text": sum(len(t.split()) for t in batch) / len(batch),
        "loaded": loaded,
        "after_batches": after,
        "batch_peak_increase_mb": after["peak_rss_mb"] - loaded["rss_mb"],
        "batch_seconds": sum(latencies) / len(latencies),
    }
