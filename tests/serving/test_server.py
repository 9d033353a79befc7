"""The embedded model server over real loopback sockets: TF Serving's REST and gRPC shapes and errors,
version policies, labels, reloads, file-system polling and load failures."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from serving.client import (
    ServerUnreachable,
    ServingClientError,
    get_model_status_grpc,
    get_model_status_rest,
    predict_grpc,
    predict_rest,
    reload_config_grpc,
)
from serving.model_config import parse_model_config, set_model_entry, single_model_config
from serving.server import ModelServer, ServingError

pytestmark = pytest.mark.integration


def _config(base: Path, policy: str = "all {}", labels: dict[str, int] | None = None, name: str = "sentiment"):
    label_text = "".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items())
    return parse_model_config(
        f'model_config_list {{ config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
        f"model_version_policy {{ {policy} }} {label_text} }} }}"
    )


def _http(url: str, body: str | bytes | dict | None = None) -> tuple[int, dict]:
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, install_model):
    """One server for the read-only tests: versions 1 and 2 served (policy all), label stable -> 1."""
    base = tmp_path_factory.mktemp("served") / "sentiment"
    install_model(base, 1)
    install_model(base, 2)
    with ModelServer(_config(base, labels={"stable": 1}), grpc_port=0, rest_port=0, poll_wait_seconds=0) as running:
        yield running


def test_rest_status_reports_every_version(server):
    status, body = _http(f"{server.rest_url}/v1/models/sentiment")
    assert status == 200
    assert body == {
        "model_version_status": [
            {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in ("2", "1")
        ]
    }
    assert _http(f"{server.rest_url}/v1/models/sentiment/versions/1")[1]["model_version_status"][0]["version"] == "1"
    assert _http(f"{server.rest_url}/v1/models/sentiment/labels/stable")[1]["model_version_status"][0]["version"] == "1"
    assert _http(f"{server.rest_url}/v1/models/sentiment/versions/7") == (
        404,
        {"error": "Could not find version 7 of model sentiment"},
    )


def test_rest_predict_instances_rows(server):
    status, body = _http(
        f"{server.rest_url}/v1/models/sentiment:predict", {"instances": [{"text": "good good"}, {"text": "awful"}]}
    )
    assert status == 200
    first, second = body["predictions"]
    assert first["label"] == "positive" and second["label"] == "negative"
    assert first["classes"] == ["negative", "positive"]
    assert first["scores"][1] > 0.95 and sum(first["scores"]) == pytest.approx(1.0, abs=1e-5)


def test_rest_predict_picks_version_and_label(server):
    url = f"{server.rest_url}/v1/models/sentiment"
    latest = _http(f"{url}:predict", {"instances": ["good"]})[1]["predictions"][0]["scores"]
    v1 = _http(f"{url}/versions/1:predict", {"instances": ["good"]})[1]["predictions"][0]["scores"]
    stable = _http(f"{url}/labels/stable:predict", {"instances": ["good"]})[1]["predictions"][0]["scores"]
    v2 = _http(f"{url}/versions/2:predict", {"instances": ["good"]})[1]["predictions"][0]["scores"]
    assert latest == v2 and stable == v1 and v1 != v2


def test_rest_predict_inputs_columns_and_b64(server):
    encoded = base64.b64encode(b"great").decode()
    status, body = _http(
        f"{server.rest_url}/v1/models/sentiment:predict",
        {"signature_name": "serving_default", "inputs": {"text": ["great", {"b64": encoded}]}},
    )
    assert status == 200
    outputs = body["outputs"]
    assert outputs["label"] == ["positive", "positive"]
    assert outputs["scores"][0] == outputs["scores"][1] and len(outputs["classes"]) == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/models/foo:predict", {"instances": ["x"]}, 404, "Servable not found for request: Latest(foo)"),
        ("/v1/models/sentiment/versions/9:predict", {"instances": ["x"]}, 404, "Specific(sentiment, 9)"),
        ("/v1/models/sentiment:predict", "{not json", 400, "JSON Parse error"),
        ("/v1/models/sentiment:predict", "[1]", 400, "Is not object"),
        ("/v1/models/sentiment:predict", {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances' key"),
        ("/v1/models/sentiment:predict", {"inputs": {"txt": ["x"]}}, 400, "Missing named input: text"),
        ("/v1/models/sentiment:predict", {"instances": [{"txt": "x"}]}, 400, "does not have named input: txt"),
        ("/v1/models/sentiment:predict", {"instances": [3]}, 400, "is not of expected type: string"),
        ("/v1/models/sentiment:predict", {"instances": ["a", {"text": "b"}]}, 400, "Expecting value/list but got object at item 1"),
        ("/v1/models/sentiment:predict", {"instances": []}, 400, "No values in 'instances' array"),
        ("/v1/models/sentiment:predict", {"instances": ["x"], "inputs": ["x"]}, 400, "only one of 'inputs' or 'instances'"),
        ("/v1/models/sentiment:predict", {"instances": ["x"], "signature_name": "nope"}, 400, '"nope" not found'),
        ("/v1/models/sentiment/labels/beta:predict", {"instances": ["x"]}, 400, "Unrecognized servable version label: beta"),
        ("/v1/models/sentiment:classify", {"examples": []}, 400, "'examples' value is an empty array"),
        ("/v1/models/sentiment:classify", {"examples": [{"text": "good"}]}, 400, "Expected one or two output Tensors, found 3"),
        ("/v1/models/sentiment/versions/99999999999999999999", None, 400, "Failed to convert version"),
        ("/v1/models/sentiment:predict", "{oops", 400, "JSON Parse error: Missing a name for object member."),
        ("/v1/models/sentiment:predict", "nope", 400, "JSON Parse error: Invalid value."),
        ("/v1/nothing", None, 400, "Malformed request: GET /v1/nothing"),
    ],
)
def test_rest_errors_match_tf_serving(server, path, body, status, message):
    got_status, got = _http(server.rest_url + path, body)
    assert got_status == status
    assert message in got["error"]


def _predict_request(texts, **spec):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "sentiment")
    if "version" in spec:
        request.model_spec.version.value = spec.pop("version")
    if "label" in spec:
        request.model_spec.version_label = spec.pop("label")
    request.model_spec.signature_name = spec.pop("signature_name", "")
    request.output_filter.extend(spec.pop("output_filter", []))
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    return request


def test_grpc_predict_reports_the_version_that_answered(server):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        latest = stub.Predict(_predict_request(["good", "bad"]), timeout=10)
        pinned = stub.Predict(_predict_request(["good"], label="stable", output_filter=["label"]), timeout=10)
    assert latest.model_spec.name == "sentiment" and latest.model_spec.version.value == 2
    assert latest.model_spec.signature_name == "serving_default"
    assert [x.decode() for x in tf.make_ndarray(latest.outputs["label"])] == ["positive", "negative"]
    assert pinned.model_spec.version.value == 1 and set(pinned.outputs) == {"label"}


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        ({"name": "foo"}, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(foo)"),
        ({"version": 5}, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(sentiment, 5)"),
        ({"signature_name": "nope"}, grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        ({"output_filter": ["probs"]}, grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found in signature: probs"),
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
    ],
)
def test_grpc_predict_errors(server, spec, code, message):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(_predict_request(["good"], **spec), timeout=10)
    assert info.value.code() == code and message in info.value.details()


def test_grpc_model_metadata_lists_the_signatures(server):
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "sentiment"
    request.model_spec.version_label = "stable"
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.GetModelMetadata(request, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(), timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert response.model_spec.version.value == 1
    assert set(signatures.signature_def["serving_default"].outputs) == {"scores", "classes", "label"}
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one metadata_field" in info.value.details()


def test_clients_agree_and_report_versions(server):
    by_grpc = predict_grpc(["good", "awful"], model="sentiment", target=server.grpc_target)
    by_rest = predict_rest(["good", "awful"], model="sentiment", rest_url=server.rest_url)
    assert [r["version"] for r in by_grpc] == [2, 2] and [r["version"] for r in by_rest] == [2, 2]
    assert [r["label"] for r in by_grpc] == ["positive", "negative"]
    for g, r in zip(by_grpc, by_rest):
        assert g["scores"] == pytest.approx(r["scores"], abs=1e-6)
        assert g["score"] == max(g["scores"])
    pinned = predict_grpc(["good"], model="sentiment", target=server.grpc_target, version=1)
    assert pinned[0]["version"] == 1 and pinned[0]["scores"] != by_grpc[0]["scores"]
    assert get_model_status_grpc("sentiment", target=server.grpc_target, version=1) == [
        {"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}
    ]


def test_client_errors_carry_code_and_message(server):
    with pytest.raises(ServingClientError) as info:
        predict_rest(["x"], model="foo", rest_url=server.rest_url)
    assert info.value.code == "NOT_FOUND" and info.value.message == "Servable not found for request: Latest(foo)"
    with pytest.raises(ServingClientError) as info:
        get_model_status_grpc("foo", target=server.grpc_target)
    assert info.value.code == "NOT_FOUND" and "Could not find any versions of model foo" in info.value.message


def test_client_says_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerUnreachable, match="cannot reach the model server"):
        get_model_status_rest("sentiment", rest_url=f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{port}"):
        predict_grpc(["x"], model="sentiment", target=f"127.0.0.1:{port}", timeout=2)


def test_reload_switches_versions_without_downtime(tmp_path, install_model, start_server):
    base = tmp_path / "sentiment"
    install_model(base, 1)
    install_model(base, 2)
    server = start_server(_config(base, "specific { versions: 1 }"))
    before = predict_grpc(["good"], model="sentiment", target=server.grpc_target)[0]
    assert before["version"] == 1

    failures: list[Exception] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                predict_grpc(["good"], model="sentiment", target=server.grpc_target, timeout=5)
            except Exception as exc:  # noqa: BLE001 - any failure during the switch is the bug
                failures.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        reload_config_grpc(server.grpc_target, set_model_entry(server.manager.config, "sentiment", base, [2]), timeout=30)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    after = predict_grpc(["good"], model="sentiment", target=server.grpc_target)[0]
    assert after["version"] == 2 and after["scores"] != before["scores"]
    states = {s["version"]: s["state"] for s in get_model_status_grpc("sentiment", target=server.grpc_target)}
    assert states == {2: "AVAILABLE", 1: "END"}


def test_reload_adds_and_removes_models(tmp_path, install_model, start_server):
    install_model(tmp_path / "sentiment", 1)
    install_model(tmp_path / "other", 3, source=2)
    server = start_server(_config(tmp_path / "sentiment"))
    both = _config(tmp_path / "sentiment")
    both.model_config_list.config.append(_config(tmp_path / "other", name="other").model_config_list.config[0])
    reload_config_grpc(server.grpc_target, both)
    assert predict_grpc(["good"], model="other", target=server.grpc_target)[0]["version"] == 3
    reload_config_grpc(server.grpc_target, _config(tmp_path / "other", name="other"))
    with pytest.raises(ServingClientError) as info:
        predict_grpc(["good"], model="sentiment", target=server.grpc_target)
    assert info.value.code == "NOT_FOUND"


def test_reload_rejects_bad_configs(tmp_path, install_model, start_server):
    install_model(tmp_path / "sentiment", 1)
    server = start_server(_config(tmp_path / "sentiment"))
    with pytest.raises(ServingClientError) as info:
        reload_config_grpc(server.grpc_target, _config(Path("relative/dir")))
    assert info.value.code == "INVALID_ARGUMENT" and "absolute path" in info.value.message
    with pytest.raises(ServingClientError) as info:
        reload_config_grpc(server.grpc_target, _config(tmp_path / "sentiment", labels={"stable": 4}))
    assert info.value.code == "FAILED_PRECONDITION" and "version 4" in info.value.message
    assert predict_grpc(["good"], model="sentiment", target=server.grpc_target)[0]["version"] == 1


def test_polling_picks_up_a_new_version_under_latest_policy(tmp_path, install_model, start_server):
    base = tmp_path / "sentiment"
    install_model(base, 1)
    server = start_server(single_model_config("sentiment", base), poll_wait_seconds=0.2)
    staged = install_model(tmp_path / "staging", 2)
    staged.rename(base / "2")
    deadline = time.monotonic() + 15
    states = {}
    while time.monotonic() < deadline:
        states = {s["version"]: s["state"] for s in get_model_status_rest("sentiment", rest_url=server.rest_url)}
        if states == {2: "AVAILABLE", 1: "END"}:
            break
        time.sleep(0.1)
    assert states == {2: "AVAILABLE", 1: "END"}
    assert predict_rest(["good"], model="sentiment", rest_url=server.rest_url)[0]["version"] == 2


def test_broken_version_ends_in_end_with_its_error(tmp_path, install_model, start_server):
    base = tmp_path / "sentiment"
    install_model(base, 1)
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    server = start_server(_config(base))
    status = get_model_status_grpc("sentiment", target=server.grpc_target, version=2)[0]
    assert status["state"] == "END" and status["error_code"] != "OK" and status["error_message"]
    assert predict_grpc(["good"], model="sentiment", target=server.grpc_target)[0]["version"] == 1


def test_start_serves_the_other_models_when_a_model_has_no_loadable_version(tmp_path, install_model):
    broken = tmp_path / "sentiment" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"corrupted on disk")
    install_model(tmp_path / "other", 1)
    config = single_model_config("sentiment", broken.parent)
    config.model_config_list.config.add().CopyFrom(single_model_config("other", tmp_path / "other").model_config_list.config[0])
    server = ModelServer(config, grpc_port=0, rest_port=0, poll_wait_seconds=0)
    server.start()  # the node stays up, so its agent can repair it from the store
    try:
        status = get_model_status_grpc("sentiment", target=server.grpc_target, version=1)[0]
        assert status["state"] == "END" and status["error_code"] != "OK"
        assert predict_grpc(["good"], model="other", target=server.grpc_target)[0]["version"] == 1
        # Reloading a config whose new model cannot load is still refused, as TF Serving does.
        with pytest.raises(ServingError) as info:
            server.manager.reload_config(single_model_config("sentiment2", broken.parent))
        assert info.value.code == grpc.StatusCode.UNKNOWN and "did not become available" in info.value.message
    finally:
        server.stop(grace=0.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_command_line_server_serves_and_stops_on_sigterm(tmp_path, install_model):
    install_model(tmp_path / "sentiment", 1)
    grpc_port, rest_port = _free_port(), _free_port()
    command = [
        sys.executable, "-m", "serving.server",
        "--port", str(grpc_port), "--rest_api_port", str(rest_port),
        "--model_name", "sentiment", "--model_base_path", str(tmp_path / "sentiment"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if "Exporting HTTP/REST API" in line:
                break
        assert f"Running gRPC ModelServer at 127.0.0.1:{grpc_port}" in "".join(lines)
        assert predict_rest(["good"], model="sentiment", rest_url=f"http://127.0.0.1:{rest_port}")[0]["version"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
