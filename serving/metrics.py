"""Prometheus metrics of the model server (``--monitoring_config_file``), with ``prometheus-client``.

TF Serving exports its metrics at the path a ``MonitoringConfig``'s ``prometheus_config`` names, on
the REST port. So does the embedded server, with TF Serving's own families, so dashboards built for
one work on the other: ``:tensorflow:serving:request_count{model_name,status}`` and
``:tensorflow:serving:request_latency{model_name,API,entrypoint}`` (microseconds). MaaS adds what
those leave out: ``maas_serving_requests_total`` and ``maas_serving_request_duration_seconds`` per
model, version, API (Predict, Classify, ...), entrypoint (GRPC or REST) and status, the sizes of the
batches the scheduler ran, and each version's load state, read from the model manager at scrape
time. Each server has its own registry, so several servers in one process (tests) do not mix counts.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.config_protos import MonitoringConfig, read_text_proto

DEFAULT_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(30))  # 10 µs .. ~250 s, as TF Serving's exponential buckets
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def read_monitoring_config(path: Path | None) -> str | None:
    """The metrics path a ``--monitoring_config_file`` enables, or None when metrics are off.

    Raises:
        ConfigFileError: the file cannot be read or parsed.
    """
    if path is None:
        return None
    config = read_text_proto(path, MonitoringConfig, "monitoring_config_file")
    if not config.prometheus_config.enable:
        return None
    path_text = config.prometheus_config.path or DEFAULT_PATH
    return path_text if path_text.startswith("/") else "/" + path_text


class _StateCollector(Collector):
    def __init__(self, read_states: Callable[[], list[tuple[str, int, str]]]) -> None:
        self._read_states = read_states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            ":tensorflow:serving:model_version_state",
            "1 for the state each tracked model version is in (START, LOADING, AVAILABLE, UNLOADING, END)",
            labels=["model_name", "model_version", "state"],
        )
        for name, version, state in self._read_states():
            family.add_metric([name, str(version), state], 1.0)
        yield family


class ServerMetrics:
    """The server's metrics; ``read_states`` returns (model, version, state name) of every version."""

    def __init__(self, read_states: Callable[[], list[tuple[str, int, str]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # prometheus-client names every counter *_total; TF Serving's counter has no suffix, so it is
        # kept here and written out by exposition().
        self._tf_counts: Tally[tuple[str, str]] = Tally()
        self._tf_lock = threading.Lock()
        self._children: dict[tuple, tuple] = {}
        self._tf_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"],
            buckets=_LATENCY_BUCKETS_US,
            registry=self.registry,
        )
        self._requests = Counter(
            "maas_serving_requests",
            "Requests answered, by model, version, API, entrypoint and status",
            ["model_name", "model_version", "API", "entrypoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "maas_serving_request_duration_seconds",
            "Request latency in seconds, by model, version, API and entrypoint",
            ["model_name", "model_version", "API", "entrypoint"],
            buckets=tuple(b / 1e6 for b in _LATENCY_BUCKETS_US),
            registry=self.registry,
        )
        self._batches = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Rows in each batch the batch scheduler ran",
            ["model_name", "model_version", "signature_name"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(read_states))

    def observe_request(
        self, model: str, version: int | None, api: str, entrypoint: str, status: str, seconds: float
    ) -> None:
        """Count one answered request and its latency (``version`` None: none was resolved)."""
        key = (model, version, api, entrypoint, status)
        children = self._children.get(key)
        if children is None:
            # labels() costs a lock and a lookup each time: resolved once per label set.
            version_label = "" if version is None else str(version)
            children = (
                self._requests.labels(model, version_label, api, entrypoint, status),
                self._latency.labels(model, version_label, api, entrypoint),
                self._tf_latency.labels(model, api, entrypoint) if api in _TF_SERVING_COUNTED else None,
            )
            self._children[key] = children
        requests, latency, tf_latency = children
        requests.inc()
        latency.observe(seconds)
        if tf_latency is not None:
            with self._tf_lock:
                self._tf_counts[(model, status)] += 1
            tf_latency.observe(seconds * 1e6)

    def observe_batch(self, signature, rows: int) -> None:
        """Record a batch the scheduler ran (``signature``: a :class:`serving.servable.Signature`)."""
        self._batches.labels(signature.model, str(signature.version), signature.name).observe(rows)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        with self._tf_lock:
            counts = sorted(self._tf_counts.items())
        lines = [
            "# HELP :tensorflow:serving:request_count The total number of requests.",
            "# TYPE :tensorflow:serving:request_count counter",
        ]
        lines += [
            f':tensorflow:serving:request_count{{model_name="{_escape(m)}",status="{_escape(st)}"}} {n}'
            for (m, st), n in counts
        ]
        return ("\n".join(lines) + "\n").encode("utf-8") + generate_latest(self.registry)


# The APIs TF Serving counts in request_count (inference calls, not status or reload calls).
_TF_SERVING_COUNTED = frozenset({"Predict", "Classify", "Regress", "MultiInference"})


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
