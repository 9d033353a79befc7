"""Model status and metadata over gRPC and REST: TF Serving's cases from get_model_status_impl_test.cc,
get_model_metadata_impl.cc, http_rest_api_handler_test.cc and tensorflow_model_server_test.py.

Status lists every version the server manages, newest first, with its state and load status; metadata is
the ``SignatureDefMap`` of the version that would answer, and its REST form is the proto's JSON with TF
Serving's field names.
"""

from __future__ import annotations

import grpc
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    assert_rest_error,
    expect_rpc_error,
    get_json,
    get_version_states,
)
from tests.serving.conformance.models import (
    HALF_PLUS_N,
    HALF_PLUS_N_ALL,
    HALF_PLUS_N_LATEST_TWO,
    HALF_PLUS_N_SPECIFIC,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_TF2,
    HALF_PLUS_TWO_VERSION,
    SENTIMENT,
)

pytestmark = pytest.mark.integration

PREDICT, CLASSIFY, REGRESS = "tensorflow/serving/predict", "tensorflow/serving/classify", "tensorflow/serving/regress"
AVAILABLE_STATUS = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
_EXAMPLES = ("tf_example:0", "DT_STRING", None)  # serialized tf.Example protos, of unknown rank


def _floats(tensor: str) -> tuple[str, str, list[int]]:
    return tensor, "DT_FLOAT", [-1, 1]


# half_plus_two's signatures as TF Serving's saved_model_half_plus_two_2_versions_metadata.json lists them:
# name -> (method, {input: (tensor, dtype, dims or None for unknown rank)}, {output: ...}).
HALF_PLUS_TWO_SIGNATURES = {
    "serving_default": (PREDICT, {"x": _floats("x:0")}, {"y": _floats("y:0")}),
    "regress_x_to_y": (REGRESS, {"inputs": _EXAMPLES}, {"outputs": _floats("y:0")}),
    "regress_x_to_y2": (REGRESS, {"inputs": _EXAMPLES}, {"outputs": _floats("y2:0")}),
    "regress_x2_to_y3": (REGRESS, {"inputs": _floats("x2:0")}, {"outputs": _floats("y3:0")}),
    "classify_x_to_y": (CLASSIFY, {"inputs": _EXAMPLES}, {"scores": _floats("y:0")}),
    "classify_x2_to_y3": (CLASSIFY, {"inputs": _floats("x2:0")}, {"scores": _floats("y3:0")}),
}


def _status(stubs, model: str, version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    return stubs.model.GetModelStatus(request, timeout=RPC_TIMEOUT_SECONDS)


def _metadata(stubs, model: str, fields=("signature_def",), version: int | None = None):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    return stubs.prediction.GetModelMetadata(request, timeout=RPC_TIMEOUT_SECONDS)


def _signature_defs(response) -> dict:
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    return dict(signatures.signature_def)


def _tensor_json(name: str, dtype: str, shape: list[int] | None) -> dict:
    if shape is None:
        return {"dtype": dtype, "tensor_shape": {"dim": [], "unknown_rank": True}, "name": name}
    dim = [{"size": str(size), "name": ""} for size in shape]
    return {"dtype": dtype, "tensor_shape": {"dim": dim, "unknown_rank": False}, "name": name}


def _status_json(*versions: int) -> dict:
    return {"model_version_status": [{"version": str(v), **AVAILABLE_STATUS} for v in versions]}


def test_every_configured_model_is_available(server, stubs):
    # A version in END without an error was unloaded on purpose (e.g. by the file-system poll tests).
    problems = {}
    for model in server.config.model_config_list.config:
        states = get_version_states(stubs, model.name)
        failed = {version: found for version, found in states.items() if found[1] != 0}
        if failed or "AVAILABLE" not in {state for state, _, _ in states.values()}:
            problems[model.name] = states
    assert not problems, f"models not served (version: state, error code, message): {problems}"


def test_status_of_a_model(stubs):
    (status,) = _status(stubs, HALF_PLUS_TWO).model_version_status
    assert status.version == HALF_PLUS_TWO_VERSION
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0 and status.status.error_message == ""


def test_status_lists_versions_newest_first(stubs):
    versions = [status.version for status in _status(stubs, HALF_PLUS_N_ALL).model_version_status]
    assert versions == [3, 2, 1]


@pytest.mark.parametrize(
    ("model", "versions"),
    [
        (HALF_PLUS_N, {3}),
        (HALF_PLUS_N_ALL, {1, 2, 3}),
        (HALF_PLUS_N_SPECIFIC, {1, 2}),
        (HALF_PLUS_N_LATEST_TWO, {2, 3}),
    ],
)
def test_status_shows_the_versions_the_policy_serves(stubs, model, versions):
    # Versions a policy does not aspire are never loaded, so the server does not report them at all.
    states = get_version_states(stubs, model)
    assert set(states) == versions and {state for state, _, _ in states.values()} == {"AVAILABLE"}


def test_status_of_one_version(stubs):
    (status,) = _status(stubs, HALF_PLUS_N_ALL, version=2).model_version_status
    assert status.version == 2 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_status_without_model_spec_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"):
        stubs.model.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(), timeout=RPC_TIMEOUT_SECONDS)


def test_status_of_unknown_model_is_not_found(stubs):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Could not find any versions of model missing_model"):
        _status(stubs, "missing_model")


@pytest.mark.parametrize(("model", "version"), [(HALF_PLUS_TWO, 999), (HALF_PLUS_N, 1)])
def test_status_of_unmanaged_version_is_not_found(stubs, model, version):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {model}"):
        _status(stubs, model, version=version)


def test_rest_status(models_url):
    reply = get_json(f"{models_url}/{HALF_PLUS_TWO}")
    assert reply.status == 200 and reply.headers.get_content_type() == "application/json"
    assert reply.json == _status_json(HALF_PLUS_TWO_VERSION)


def test_rest_status_of_every_version(models_url):
    assert get_json(f"{models_url}/{HALF_PLUS_N_ALL}").json == _status_json(3, 2, 1)


def test_rest_status_of_one_version(models_url):
    reply = get_json(f"{models_url}/{HALF_PLUS_TWO}/versions/{HALF_PLUS_TWO_VERSION}")
    assert reply.status == 200 and reply.json == _status_json(HALF_PLUS_TWO_VERSION)


def test_rest_status_of_unknown_model_is_not_found(models_url):
    assert_rest_error(
        get_json(f"{models_url}/missing_model"), 404, "Could not find any versions of model missing_model"
    )


def test_rest_status_of_unknown_version_is_not_found(models_url):
    reply = get_json(f"{models_url}/{HALF_PLUS_TWO}/versions/999")
    assert_rest_error(reply, 404, f"Could not find version 999 of model {HALF_PLUS_TWO}")


def test_metadata_of_a_tf1_model(stubs):
    response = _metadata(stubs, HALF_PLUS_TWO)
    assert response.model_spec.name == HALF_PLUS_TWO
    assert response.model_spec.version.value == HALF_PLUS_TWO_VERSION
    assert list(response.metadata) == ["signature_def"]
    signatures = _signature_defs(response)
    assert set(signatures) == set(HALF_PLUS_TWO_SIGNATURES)
    for name, (method, inputs, outputs) in HALF_PLUS_TWO_SIGNATURES.items():
        signature = signatures[name]
        assert signature.method_name == method, name
        for expected, found in ((inputs, signature.inputs), (outputs, signature.outputs)):
            assert set(found) == set(expected), name
            for key, (tensor, dtype, shape) in expected.items():
                info = found[key]
                assert info.name == tensor and info.dtype == types_pb2.DataType.Value(dtype), (name, key)
                if shape is None:
                    assert info.tensor_shape.unknown_rank, (name, key)
                else:
                    assert [d.size for d in info.tensor_shape.dim] == shape, (name, key)


def test_metadata_of_a_tf2_model_includes_its_init_op_signature(stubs):
    signatures = _signature_defs(_metadata(stubs, HALF_PLUS_TWO_TF2))
    assert set(signatures) == set(HALF_PLUS_TWO_SIGNATURES) | {"__saved_model_init_op"}
    serving = signatures["serving_default"]
    # tf.saved_model.save names every signature's methods "predict", whatever they compute.
    assert {s.method_name for n, s in signatures.items() if n != "__saved_model_init_op"} == {PREDICT}
    assert serving.inputs["x"].name == "serving_default_x:0"
    assert [d.size for d in serving.inputs["x"].tensor_shape.dim] == [1]


def test_metadata_of_the_serving_contract(stubs):
    serving = _signature_defs(_metadata(stubs, SENTIMENT))["serving_default"]
    assert serving.method_name == PREDICT
    assert serving.inputs["text"].dtype == types_pb2.DT_STRING
    assert [d.size for d in serving.inputs["text"].tensor_shape.dim] == [-1]
    found = {key: (info.dtype, [d.size for d in info.tensor_shape.dim]) for key, info in serving.outputs.items()}
    assert found == {
        "scores": (types_pb2.DT_FLOAT, [-1, 2]),
        "classes": (types_pb2.DT_STRING, [-1, 2]),
        "label": (types_pb2.DT_STRING, [-1]),
    }


def test_metadata_of_a_specific_version(stubs):
    assert _metadata(stubs, HALF_PLUS_N_ALL, version=1).model_spec.version.value == 1
    assert _metadata(stubs, HALF_PLUS_N_ALL).model_spec.version.value == 3


def test_metadata_without_fields_is_invalid(stubs):
    with expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
    ):
        _metadata(stubs, HALF_PLUS_TWO, fields=())


def test_metadata_unsupported_field_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field graph_def is not supported"):
        _metadata(stubs, HALF_PLUS_TWO, fields=("graph_def",))


def test_metadata_without_model_spec_is_invalid(stubs):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"):
        stubs.prediction.GetModelMetadata(request, timeout=RPC_TIMEOUT_SECONDS)


def test_metadata_of_unknown_model_is_not_found(stubs):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(missing_model)"):
        _metadata(stubs, "missing_model")


def test_rest_metadata_is_the_proto_json(models_url):
    reply = get_json(f"{models_url}/{HALF_PLUS_TWO}/metadata")
    assert reply.status == 200 and reply.headers.get_content_type() == "application/json"
    signature_json = {
        name: {
            "inputs": {key: _tensor_json(*tensor) for key, tensor in inputs.items()},
            "outputs": {key: _tensor_json(*tensor) for key, tensor in outputs.items()},
            "method_name": method,
            "defaults": {},
        }
        for name, (method, inputs, outputs) in HALF_PLUS_TWO_SIGNATURES.items()
    }
    assert reply.json == {
        "model_spec": {"name": HALF_PLUS_TWO, "signature_name": "", "version": str(HALF_PLUS_TWO_VERSION)},
        "metadata": {"signature_def": {"signature_def": signature_json}},
    }


def test_rest_metadata_of_a_specific_version(models_url):
    reply = get_json(f"{models_url}/{HALF_PLUS_N_ALL}/versions/2/metadata")
    assert reply.status == 200 and reply.json["model_spec"]["version"] == "2"
    assert set(reply.json["metadata"]["signature_def"]["signature_def"]) >= {"serving_default"}


def test_rest_metadata_of_unknown_model_is_not_found(models_url):
    reply = get_json(f"{models_url}/missing_model/metadata")
    assert_rest_error(reply, 404, "Servable not found for request: Latest(missing_model)")


def test_rest_metadata_of_unknown_version_is_not_found(models_url):
    reply = get_json(f"{models_url}/{HALF_PLUS_TWO}/versions/999/metadata")
    assert_rest_error(reply, 404, f"Servable not found for request: Specific({HALF_PLUS_TWO}, 999)")
