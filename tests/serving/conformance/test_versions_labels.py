"""Version policies and version labels: TF Serving's cases from server_core_test.cc and
http_rest_api_handler_test.cc.

``half_plus_n`` has versions 1, 2 and 3 (version v answers ``0.5 * x + v``) and is served under four names:
the default policy (the latest version), ``all``, ``specific {1, 2}`` and ``latest {num_versions: 2}``.
A request without a version gets the newest version served. Labels can only name versions that are
available, so they are assigned by a reload once the models are up (a label in the start-up config would
stop tensorflow_model_server from starting); a reload that labels an unavailable version is refused and
changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import model_management_pb2

from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    assert_rest_error,
    expect_rpc_error,
    get_json,
    make_predict_request,
    make_tensor,
    post_json,
)
from tests.serving.conformance.models import (
    HALF_PLUS_N,
    HALF_PLUS_N_ALL,
    HALF_PLUS_N_LATEST_TWO,
    HALF_PLUS_N_SPECIFIC,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_VERSION,
)

pytestmark = pytest.mark.integration

LABELS = {HALF_PLUS_N_ALL: {"stable": 1, "canary": 2}, HALF_PLUS_TWO: {"prod": HALF_PLUS_TWO_VERSION}}


def _with_labels(config, labels: dict[str, dict[str, int]]):
    labelled = type(config)()
    labelled.CopyFrom(config)
    for model in labelled.model_config_list.config:
        model.version_labels.update(labels.get(model.name, {}))
    return labelled


def _reload(stubs, config) -> None:
    stubs.model.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=config), timeout=RPC_TIMEOUT_SECONDS
    )


@pytest.fixture(scope="module")
def labelled(server, stubs) -> Iterator[None]:
    """The start-up config plus ``LABELS``, for this module's tests; the start-up config is restored after."""
    _reload(stubs, _with_labels(server.config, LABELS))
    yield
    _reload(stubs, server.config)


def _predict(stubs, model: str, *, version: int | None = None, label: str | None = None):
    request = make_predict_request(
        model, {"x": make_tensor([2.0], types_pb2.DT_FLOAT, [1])}, version=version, label=label
    )
    return stubs.prediction.Predict(request, timeout=RPC_TIMEOUT_SECONDS)


def _answer(stubs, model: str, **choice) -> tuple[int, float]:
    response = _predict(stubs, model, **choice)
    return response.model_spec.version.value, response.outputs["y"].float_val[0]


@pytest.mark.parametrize(
    ("model", "version"),
    [(HALF_PLUS_N, 3), (HALF_PLUS_N_ALL, 3), (HALF_PLUS_N_SPECIFIC, 2), (HALF_PLUS_N_LATEST_TWO, 3)],
)
def test_request_without_version_gets_the_newest_served(stubs, model, version):
    assert _answer(stubs, model) == (version, 1.0 + version)


@pytest.mark.parametrize(
    ("model", "version"),
    [(HALF_PLUS_N_ALL, 1), (HALF_PLUS_N_ALL, 2), (HALF_PLUS_N_SPECIFIC, 1), (HALF_PLUS_N_LATEST_TWO, 2)],
)
def test_request_for_a_served_version(stubs, model, version):
    assert _answer(stubs, model, version=version) == (version, 1.0 + version)


@pytest.mark.parametrize(
    ("model", "version"), [(HALF_PLUS_N, 1), (HALF_PLUS_N, 2), (HALF_PLUS_N_SPECIFIC, 3), (HALF_PLUS_N_LATEST_TWO, 1)]
)
def test_version_the_policy_does_not_serve_is_not_found(stubs, model, version):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({model}, {version})"):
        _predict(stubs, model, version=version)


def test_rest_request_for_a_served_version(models_url):
    reply = post_json(f"{models_url}/{HALF_PLUS_N_ALL}/versions/1:predict", {"instances": [2.0]})
    assert reply.status == 200 and reply.json == {"predictions": [2.0]}


def test_label_picks_its_version(stubs, labelled):
    assert _answer(stubs, HALF_PLUS_N_ALL, label="stable") == (1, 2.0)
    assert _answer(stubs, HALF_PLUS_N_ALL, label="canary") == (2, 3.0)
    assert _answer(stubs, HALF_PLUS_N_ALL) == (3, 4.0)


def test_rest_label_predict(models_url, labelled):
    reply = post_json(f"{models_url}/{HALF_PLUS_N_ALL}/labels/canary:predict", {"instances": [2.0]})
    assert reply.status == 200 and reply.json == {"predictions": [3.0]}


def test_rest_label_classify_and_regress(models_url, labelled):
    url = f"{models_url}/{HALF_PLUS_TWO}/labels/prod"
    classify = post_json(f"{url}:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 10.0}]})
    assert classify.status == 200 and classify.json == {"results": [[["", 7.0]]]}
    regress = post_json(f"{url}:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]})
    assert regress.status == 200 and regress.json == {"results": [42.0]}


def test_rest_label_status_and_metadata(models_url, labelled):
    status = get_json(f"{models_url}/{HALF_PLUS_TWO}/labels/prod")
    assert status.status == 200
    assert status.json == {
        "model_version_status": [
            {
                "version": str(HALF_PLUS_TWO_VERSION),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    metadata = get_json(f"{models_url}/{HALF_PLUS_TWO}/labels/prod/metadata")
    assert metadata.status == 200 and metadata.json["model_spec"]["version"] == str(HALF_PLUS_TWO_VERSION)


def test_unknown_label_is_invalid(stubs, models_url, labelled):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: nope"):
        _predict(stubs, HALF_PLUS_N_ALL, label="nope")
    reply = post_json(f"{models_url}/{HALF_PLUS_N_ALL}/labels/nope:predict", {"instances": [2.0]})
    assert_rest_error(reply, 400, "Unrecognized servable version label: nope")


def test_labelling_an_unavailable_version_is_refused_and_changes_nothing(server, stubs, labelled):
    refused = _with_labels(server.config, {**LABELS, HALF_PLUS_N_SPECIFIC: {"next": 3}})
    with expect_rpc_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"Request to assign label to version 3 of model {HALF_PLUS_N_SPECIFIC}, which is not currently available",
    ):
        _reload(stubs, refused)
    assert _answer(stubs, HALF_PLUS_N_ALL, label="stable") == (1, 2.0)
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: next"):
        _predict(stubs, HALF_PLUS_N_SPECIFIC, label="next")
