"""Prometheus metrics on the REST port (``--monitoring_config_file`` with ``prometheus_config { enable: true }``):
TF Serving's testPrometheusEndpoint, and the request counter behind it.

TF Serving counts every Predict, Classify and Regress call (gRPC) and every REST call in
``/tensorflow/serving/request_count``, labelled by model name and status code, and writes metric names in
Prometheus form (``/`` becomes ``:``).
"""

from __future__ import annotations

import re

import grpc
import pytest
from tensorflow.core.framework import types_pb2

from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    expect_rpc_error,
    get_json,
    make_predict_request,
    make_tensor,
    post_json,
)
from tests.serving.conformance.models import HALF_PLUS_N_LATEST_TWO, PROMETHEUS_PATH

pytestmark = pytest.mark.integration

REQUEST_COUNT = ":tensorflow:serving:request_count"
_SAMPLE = re.compile(r"^(?P<name>[^\s{]+)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _scrape(server) -> str:
    reply = get_json(server.rest_url + PROMETHEUS_PATH)
    assert reply.status == 200, reply.text
    assert reply.headers.get_content_type() == "text/plain"
    return reply.text


def _sum_samples(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        sample = _SAMPLE.match(line)
        if line.startswith("#") or not sample or sample["name"] != metric:
            continue
        found = dict(_LABEL.findall(sample["labels"] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(sample["value"])
    return total


def test_metrics_page_is_prometheus_text(server):
    text = _scrape(server)
    assert "# TYPE" in text
    assert f"# TYPE {REQUEST_COUNT} counter" in text


def test_requests_are_counted_by_model_and_status(server, stubs, models_url):
    def count(status: str) -> float:
        return _sum_samples(_scrape(server), REQUEST_COUNT, model_name=HALF_PLUS_N_LATEST_TWO, status=status)

    ok_before, not_found_before = count("OK"), count("NOT_FOUND")
    x = {"x": make_tensor([2.0], types_pb2.DT_FLOAT, [1])}
    for _ in range(2):
        stubs.prediction.Predict(make_predict_request(HALF_PLUS_N_LATEST_TWO, x), timeout=RPC_TIMEOUT_SECONDS)
    assert post_json(f"{models_url}/{HALF_PLUS_N_LATEST_TWO}:predict", {"instances": [2.0]}).status == 200
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND):
        stubs.prediction.Predict(
            make_predict_request(HALF_PLUS_N_LATEST_TWO, x, version=1), timeout=RPC_TIMEOUT_SECONDS
        )
    assert count("OK") - ok_before == 3
    assert count("NOT_FOUND") - not_found_before == 1
