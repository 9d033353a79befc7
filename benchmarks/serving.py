"""The served model under load, side by side: called in process, behind a Flask app, and behind the model
server over REST and gRPC, with 1, 8 and 64 clients sending single texts or batches; and the targets the
model server is held to against those baselines. Also the server's memory on large batches.

Every figure comes from one run on one machine, so the rows compare like with like:

- ``session`` and ``function``: the exported SavedModel called from N threads in one process, with no
  server (:mod:`benchmarks.inprocess`); the faster of the two in a cell is that cell's upper bound.
- ``flask``: :mod:`benchmarks.flask_app`, what a user would write instead of running a model server.
- ``rest`` and ``grpc``: ``python -m serving.server``, started as :data:`SERVER_MODULE` with TF Serving's
  flags, batching on when the server accepts ``--enable_batching`` (:func:`model_server_flags`).

Each server runs in its own process, one at a time, and the clients run in another
(:mod:`benchmarks.loadgen`), so neither shares the other's GIL; on a 2-core machine they still share the
CPU, which is why the load generator is built to be cheap.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from maas_tasks.config import project_root
from maas_tasks.storage import Store, download_tree

HOST = "127.0.0.1"
SERVER_MODULE = "serving.server"
CLIENTS = (1, 8, 64)
BATCH_SIZE = 32
LOAD_SECONDS = 2.5
WARMUP_SECONDS = 0.5
START_TIMEOUT = 120.0

# The rows of the load table, in the order they are run and printed.
ROWS = ("session", "function", "flask", "rest", "grpc")
ROW_LABELS = {
    "session": "in process, tf.compat.v1 Session",
    "function": "in process, tf.saved_model.load",
    "flask": "Flask app (Werkzeug, threaded)",
    "rest": "model server, REST",
    "grpc": "model server, gRPC",
}
IN_PROCESS_ROWS = ("session", "function")

# The batching the local stack and compose serve with (TF Serving's text-format BatchingParameters).
BATCHING_PARAMETERS_FILE = Path(__file__).resolve().parent.parent / "serving" / "config" / "batching_parameters.config"

# The targets (on a 2-core machine).
REST_SINGLE_P50_MS = 2.0
REST_SINGLE_VS_IN_PROCESS_BATCHED = 0.5
GRPC_BATCHED_VS_IN_PROCESS = 0.8
MANY_CLIENTS = 64


class BenchmarkError(RuntimeError):
    """A server or the load generator failed, or a server answered a benchmark request wrongly."""


class _ServerExited(BenchmarkError):
    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def model_server_flags(
    model_name: str, base_path: Path, grpc_port: int, rest_port: int, batching_file: Path | None
) -> list[str]:
    """The model server's command-line flags: TF Serving's, with server-side batching when ``batching_file``
    (text-format ``BatchingParameters``) is given."""
    flags = [
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--model_name={model_name}",
        f"--model_base_path={base_path}",
        "--file_system_poll_wait_seconds=0",
    ]
    if batching_file is not None:
        flags += ["--enable_batching", f"--batching_parameters_file={batching_file}"]
    return flags


# --- processes ----------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _start_process(command: list[str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=project_root())


def _wait_ready(process: subprocess.Popen, ready: Callable[[], bool], *, what: str, log_path: Path,
                timeout: float = START_TIMEOUT) -> float:
    """Seconds from now until ``ready()``; raises _ServerExited if the process ends first."""
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise _ServerExited(
                f"{what} exited with status {process.returncode} while starting:\n{_log_tail(log_path)}",
                log_path.read_text(errors="replace"),
            )
        try:
            if ready():
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > timeout:
            raise BenchmarkError(f"{what} was not ready within {timeout:.0f} s:\n{_log_tail(log_path)}")
        time.sleep(0.25)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate ``process`` and wait for it (kill it after 30 s)."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _model_available(port: int, model_name: str) -> bool:
    return b"AVAILABLE" in _http(port, "GET", f"/v1/models/{model_name}")[1]


def _flask_answers(port: int) -> bool:
    return _http(port, "POST", "/predict", json.dumps({"instances": ["ready?"]}).encode())[0] == 200


def _run_loadgen(spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    spec_path, out_path = workdir / f"load-{name}.json", workdir / f"load-{name}-result.json"
    spec_path.write_text(json.dumps(spec))
    cells = len(spec["cells"]) * len(spec["runs"])
    timeout = START_TIMEOUT + cells * (spec["seconds"] + spec["warmup_seconds"] + 60)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", str(spec_path), "--out", str(out_path)],
        cwd=project_root(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, check=False,
    )
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.decode(errors="replace").splitlines()[-15:])
        raise BenchmarkError(f"the load generator failed on {name} (status {completed.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


# --- the load comparison ------------------------------------------------------------------------------------


def measure_serving(
    store: Store,
    export_prefix: str,
    texts: Sequence[str],
    *,
    model_name: str = "sentiment",
    clients: Sequence[int] = CLIENTS,
    batch_size: int = BATCH_SIZE,
    seconds: float = LOAD_SECONDS,
    warmup_seconds: float = WARMUP_SECONDS,
) -> dict[str, Any]:
    """Put the version exported at ``export_prefix`` under load in every :data:`ROWS` way, on ``texts``.

    Every row runs the same cells: each of ``clients`` closed-loop clients, with single texts and with
    batches of ``batch_size``, ``warmup_seconds`` uncounted and then ``seconds`` counted.

    Returns:
        ``rows`` ({row: one :func:`benchmarks.loadgen.run_spec` result per cell}), ``targets``
        (:func:`check_targets`), ``batching`` (whether the model server ran with ``--enable_batching``),
        ``server_flags`` (its command line after ``-m serving.server``), ``batching_parameters``,
        ``ready_seconds`` ({flask, model_server}: start until serving), ``settings`` and ``seconds`` (the
        whole comparison's wall time).

    Raises:
        BenchmarkError: a server did not start or the load generator failed (failed requests do not
            raise: they are counted in each cell's ``errors``).
        ValueError: ``texts`` is empty, or a count is below 1.
    """
    if not texts:
        raise ValueError("no texts to send: the eval split is empty")
    if min(*clients, batch_size) < 1 or seconds <= 0 or warmup_seconds < 0:
        raise ValueError(f"clients={list(clients)} and batch_size={batch_size} must be at least 1, seconds positive")
    started = time.perf_counter()
    spec = {
        "texts": list(texts),
        "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "cells": [{"clients": c, "batch_size": b} for b in dict.fromkeys((1, batch_size)) for c in clients],
    }
    with tempfile.TemporaryDirectory(prefix="maas-bench-load-") as tmp:
        workdir = Path(tmp)
        base = workdir / "models" / model_name
        version_dir = base / export_prefix.rstrip("/").rsplit("/", 1)[-1]
        download_tree(store, export_prefix, version_dir)
        rows = _load_in_process(spec, version_dir, workdir)
        flask_rows, flask_ready = _load_flask(spec, version_dir, workdir)
        server_rows, server_ready, flags = _load_model_server(spec, model_name, base, workdir)
    rows.update(flask_rows)
    rows.update(server_rows)
    batching = "--enable_batching" in flags
    return {
        "rows": rows,
        "targets": check_targets(rows, batch_size=batch_size),
        "batching": batching,
        "server_flags": flags,
        "batching_parameters": BATCHING_PARAMETERS_FILE.read_text() if batching else None,
        "ready_seconds": {"flask": flask_ready, "model_server": server_ready},
        "settings": {
            "clients": list(clients), "batch_size": batch_size, "seconds": seconds, "warmup_seconds": warmup_seconds,
        },
        "seconds": time.perf_counter() - started,
    }


def _load_in_process(spec: dict[str, Any], version_dir: Path, workdir: Path) -> dict[str, Any]:
    runs = [{"name": n, "kind": "inprocess", "loader": n, "model_dir": str(version_dir)} for n in IN_PROCESS_ROWS]
    return _run_loadgen({**spec, "runs": runs}, workdir, "in-process")["rows"]


def _load_flask(spec: dict[str, Any], version_dir: Path, workdir: Path) -> tuple[dict[str, Any], float]:
    (port,) = _free_ports(1)
    log = workdir / "flask.log"
    command = [sys.executable, "-m", "benchmarks.flask_app", f"--model_dir={version_dir}", f"--port={port}"]
    process = _start_process(command, log)
    try:
        ready = _wait_ready(process, lambda: _flask_answers(port), what="the Flask app", log_path=log)
        run = {"name": "flask", "kind": "http", "host": HOST, "port": port, "path": "/predict"}
        return _run_loadgen({**spec, "runs": [run]}, workdir, "flask")["rows"], ready
    finally:
        stop_process(process)


def _load_model_server(
    spec: dict[str, Any], model_name: str, base: Path, workdir: Path
) -> tuple[dict[str, Any], float, list[str]]:
    grpc_port, rest_port = _free_ports(2)
    batching_file = BATCHING_PARAMETERS_FILE
    process, flags, ready = _start_model_server(model_name, base, grpc_port, rest_port, batching_file, workdir)
    try:
        runs = [
            {"name": "rest", "kind": "http", "host": HOST, "port": rest_port, "path": f"/v1/models/{model_name}:predict"},
            {"name": "grpc", "kind": "grpc", "target": f"{HOST}:{grpc_port}", "model_name": model_name},
        ]
        return _run_loadgen({**spec, "runs": runs}, workdir, "model-server")["rows"], ready, flags
    finally:
        stop_process(process)


def _start_model_server(
    model_name: str, base: Path, grpc_port: int, rest_port: int, batching_file: Path, workdir: Path
) -> tuple[subprocess.Popen, list[str], float]:
    """Start the model server with batching on; returns the process, its flags and its seconds to ready."""
    log = workdir / "model-server.log"
    flags = model_server_flags(model_name, base, grpc_port, rest_port, batching_file)
    process = _start_process([sys.executable, "-m", SERVER_MODULE, *flags], log)
    try:
        ready = _wait_ready(process, lambda: _model_available(rest_port, model_name), what="the model server", log_path=log)
    except BaseException:
        stop_process(process)
        raise
    return process, flags, ready


# --- targets ------------------------------------------------------------------------------------------------


def find_cell(rows: dict[str, list[dict[str, Any]]], row: str, batch_size: int, clients: int) -> dict[str, Any] | None:
    """The result of ``row`` for ``clients`` clients sending ``batch_size`` texts a request, if measured."""
    for cell in rows.get(row, []):
        if cell["batch_size"] == batch_size and cell["clients"] == clients:
            return cell
    return None


def best_in_process(
    rows: dict[str, list[dict[str, Any]]], batch_size: int, clients: int | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The in-process row and cell with the most texts/s at ``batch_size`` (at ``clients``, or at any count)."""
    cells = [
        (row, cell) for row in IN_PROCESS_ROWS for cell in rows.get(row, [])
        if cell["batch_size"] == batch_size and (clients is None or cell["clients"] == clients)
    ]
    return max(cells, key=lambda rc: rc[1]["texts_per_s"], default=None)


def _target(target: str, passed: bool | None, measured: str) -> dict[str, Any]:
    return {"target": target, "passed": passed, "measured": measured}


def check_targets(rows: dict[str, list[dict[str, Any]]], *, batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """Judge the load results against the model server's targets.

    The in-process reference of a target is the faster of the two in-process rows (the upper bound).
    A target whose cells were not measured has ``passed`` None.

    Returns:
        One dict per target: ``target`` (what is required), ``passed`` (True, False or None) and
        ``measured`` (the figures behind the verdict).
    """
    targets = []
    rest = find_cell(rows, "rest", 1, 1)
    if rest is None or rest["p50_ms"] is None:
        targets.append(_target(f"REST p50 < {REST_SINGLE_P50_MS:g} ms, single texts, 1 client", None, "not measured"))
    else:
        targets.append(_target(
            f"REST p50 < {REST_SINGLE_P50_MS:g} ms, single texts, 1 client",
            rest["p50_ms"] < REST_SINGLE_P50_MS, f"p50 {rest['p50_ms']:.2f} ms",
        ))

    name = (f"REST texts/s, single texts, {MANY_CLIENTS} clients >= {REST_SINGLE_VS_IN_PROCESS_BATCHED:.0%} "
            f"of the best in-process batch-{batch_size} texts/s")
    rest, best = find_cell(rows, "rest", 1, MANY_CLIENTS), best_in_process(rows, batch_size)
    if rest is None or best is None:
        targets.append(_target(name, None, "not measured"))
    else:
        ratio = rest["texts_per_s"] / best[1]["texts_per_s"]
        targets.append(_target(
            name, ratio >= REST_SINGLE_VS_IN_PROCESS_BATCHED,
            f"{rest['texts_per_s']:.0f} vs {best[1]['texts_per_s']:.0f} texts/s ({best[0]}, {best[1]['clients']} "
            f"clients): {ratio:.0%}",
        ))

    name = f"gRPC texts/s, batches of {batch_size} >= {GRPC_BATCHED_VS_IN_PROCESS:.0%} of in-process at the same clients"
    ratios = []
    for cell in rows.get("grpc", []):
        best = best_in_process(rows, batch_size, cell["clients"]) if cell["batch_size"] == batch_size else None
        if best is not None:
            ratios.append((cell["clients"], cell["texts_per_s"] / best[1]["texts_per_s"]))
    targets.append(_target(
        name,
        all(r >= GRPC_BATCHED_VS_IN_PROCESS for _, r in ratios) if ratios else None,
        ", ".join(f"{c} clients {r:.0%}" for c, r in ratios) or "not measured",
    ))

    pairs = [(cell, find_cell(rows, "flask", cell["batch_size"], cell["clients"])) for cell in rows.get("rest", [])]
    pairs = [(rest, flask) for rest, flask in pairs if flask is not None]
    behind = [f"{r['batch_size']} x {r['clients']}" for r, f in pairs if r["texts_per_s"] <= f["texts_per_s"]]
    targets.append(_target(
        "model server REST ahead of Flask in texts/s in every cell",
        not behind if pairs else None,
        (f"behind in {len(behind)} of {len(pairs)} cells (texts x clients: {', '.join(behind)})" if behind
         else f"ahead in all {len(pairs)} cells") if pairs else "not measured",
    ))

    failed = {row: sum(c["errors"] for c in cells) for row, cells in rows.items()}
    targets.append(_target(
        "no failed requests",
        not any(failed.values()),
        ", ".join(f"{row} {n}" for row, n in failed.items() if n) or "none failed",
    ))
    return targets


# --- memory -------------------------------------------------------------------------------------------------


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
) -> dict[str, Any]:
    """Peak memory of a model server process answering REST requests of ``batch_size`` of the longest ``texts``.

    The server (``python -m serving.server``, without batching: a batch this size would exceed its
    ``max_batch_size``) runs in its own process, so its figures hold only what serving needs: its RSS
    once the version is loaded and warm, and its peak (VmHWM) after ``requests`` batches.

    Returns:
        ``batch_size``, ``words_per_text`` (mean over the batch), ``loaded`` and ``after_batches``
        (:func:`_memory_mb` dicts), ``batch_peak_increase_mb`` and ``batch_seconds`` (mean per request).

    Raises:
        BenchmarkError: the server did not come up or answered wrongly.
    """
    if not texts:
        raise ValueError("no texts to send: the eval split is empty")
    longest = sorted(texts, key=len, reverse=True)[:batch_size]
    batch = [longest[i % len(longest)] for i in range(batch_size)]
    body = json.dumps({"instances": batch}).encode()
    path = f"/v1/models/{model_name}:predict"
    with tempfile.TemporaryDirectory(prefix="maas-bench-memory-") as tmp:
        base = Path(tmp) / model_name
        download_tree(store, export_prefix, base / export_prefix.rstrip("/").rsplit("/", 1)[-1])
        grpc_port, rest_port = _free_ports(2)
        log = Path(tmp) / "model-server.log"
        flags = model_server_flags(model_name, base, grpc_port, rest_port, None)
        command = [sys.executable, "-m", SERVER_MODULE, *flags]
        process = _start_process(command, log)
        try:
            _wait_ready(process, lambda: _model_available(rest_port, model_name), what="the model server", log_path=log)
            loaded = _memory_mb(process.pid)
            latencies = []
            for _ in range(requests):
                started = time.perf_counter()
                status, payload = _http(rest_port, "POST", path, body)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise BenchmarkError(f"REST predict at {HOST}:{rest_port}{path} answered {status}: {payload[:300]!r}")
            after = _memory_mb(process.pid)
        finally:
            stop_process(process)
    return {
        "batch_size": batch_size,
        "words_per_text": sum(len(t.split()) for t in batch) / len(batch),
        "loaded": loaded,
        "after_batches": after,
        "batch_peak_increase_mb": after["peak_rss_mb"] - loaded["rss_mb"],
        "batch_seconds": sum(latencies) / len(latencies),
    }
