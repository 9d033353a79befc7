"""Prometheus metrics of the model server (``--monitoring_config_file``), with ``prometheus-client``.

TF Serving exports its metrics at the path a ``MonitoringConfig``'s ``prometheus_config`` names, on
the REST port. So does the embedded server: request counts and latency histograms per model,
version, API (Predict, Classify, ...) and entrypoint (GRPC or REST) with the status code, the sizes
of the batches the scheduler ran, and each version's load state, read from the model manager at
scrape time. The names follow TF Serving's ``:tensorflow:serving:*`` family; latency is in
microseconds as there. Each server has its own registry, so several servers in one process (tests)
do not mix their counts.
"""

from __future__ import annotations

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
        self._requests = Counter(
            ":tensorflow:serving:request_count",
            "Requests answered, by model, version, API, entrypoint and status",
            ["model_name", "model_version", "API", "entrypoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Request latency in microseconds, by model, version, API and entrypoint",
            ["model_name", "model_version", "API", "entrypoint"],
            buckets=_LATENCY_BUCKETS_US,
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
        version_label = "" if version is None else str(version)
        self._requests.labels(model, version_label, api, entrypoint, status).inc()
        self._latency.labels(model, version_label, api, entrypoint).observe(seconds * 1e6)

    def observe_batch(self, signature, rows: int) -> None:
        """Record a batch the scheduler ran (``signature``: a :class:`serving.servable.Signature`)."""
        self._batches.labels(signature.model, str(signature.version), signature.name).observe(rows)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
