"""gRPC ``PredictionService.Predict``: TF Serving's cases from tensorflow_model_server_test.py and predict_impl_test.cc.

TF Serving runs the signature's graph on the tensors as sent (no reshaping to the declared shape), answers
in the typed fields of ``TensorProto`` (``float_val``, ``string_val``, ...), and names the model, signature
and version that answered.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    dims,
    expect_rpc_error,
    make_predict_request,
    make_tensor,
)
from tests.serving.conformance.models import (
    ASSORTED,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_TF2,
    HALF_PLUS_TWO_VERSION,
    SENTIMENT,
)
from tests.serving.conftest import CLASSES, WEIGHTS

pytestmark = pytest.mark.integration

FLOAT, STRING, INT64 = types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_INT64


def _predict(stubs, request):
    return stubs.prediction.Predict(request, timeout=RPC_TIMEOUT_SECONDS)


def _x(values: list[float], shape: list[int] | None) -> dict:
    return {"x": make_tensor(values, FLOAT, shape)}


@pytest.mark.parametrize("output_filter", [["y"], []], ids=["filtered", "all-outputs"])
@pytest.mark.parametrize("model", [HALF_PLUS_TWO, HALF_PLUS_TWO_TF2])
def test_predict_computes_half_plus_two(stubs, model, output_filter):
    request = make_predict_request(model, _x([2.0], [1]), signature="serving_default", output_filter=output_filter)
    response = _predict(stubs, request)
    assert set(response.outputs) == {"y"}
    y = response.outputs["y"]
    assert y.dtype == FLOAT and list(y.float_val) == [3.0] and dims(y) == [1]
    assert response.model_spec.name == model
    assert response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == HALF_PLUS_TWO_VERSION


def test_empty_signature_name_means_serving_default(stubs):
    response = _predict(stubs, make_predict_request(HALF_PLUS_TWO, _x([2.0], [1])))
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs["y"].float_val) == [3.0]


def test_specific_version_answers(stubs):
    request = make_predict_request(HALF_PLUS_TWO, _x([2.0], [1]), version=HALF_PLUS_TWO_VERSION)
    assert _predict(stubs, request).model_spec.version.value == HALF_PLUS_TWO_VERSION


@pytest.mark.parametrize(
    ("shape", "values", "expected"),
    [
        ([1, 1], [2.0], [3.0]),
        ([2, 2], [1.0, 2.0, 3.0, 4.0], [2.5, 3.0, 3.5, 4.0]),
        ([3], [2.0, 3.0, 4.0], [3.0, 3.5, 4.0]),
    ],
)
def test_tensor_is_fed_with_the_shape_it_was_sent_in(stubs, shape, values, expected):
    # x is declared [-1, 1]; TF Serving does not reshape or reject other shapes, the graph decides.
    y = _predict(stubs, make_predict_request(HALF_PLUS_TWO, _x(values, shape))).outputs["y"]
    assert dims(y) == shape and list(y.float_val) == expected


def test_scalar_input_gives_scalar_output(stubs):
    y = _predict(stubs, make_predict_request(HALF_PLUS_TWO, _x([2.0], None))).outputs["y"]
    assert dims(y) == [] and list(y.float_val) == [3.0]


def test_input_in_tensor_content_is_accepted_and_output_uses_typed_fields(stubs):
    packed = tf.make_tensor_proto(np.array([[1.0], [2.0]], dtype=np.float32))
    assert packed.tensor_content and not packed.float_val
    y = _predict(stubs, make_predict_request(HALF_PLUS_TWO, {"x": packed})).outputs["y"]
    assert y.tensor_content == b""
    assert list(y.float_val) == [2.5, 3.0] and dims(y) == [2, 1]


@pytest.mark.parametrize("model", [HALF_PLUS_TWO, HALF_PLUS_TWO_TF2])
@pytest.mark.parametrize(("signature", "output"), [("regress_x2_to_y3", "outputs"), ("classify_x2_to_y3", "scores")])
def test_predict_runs_regress_and_classify_signatures(stubs, model, signature, output):
    request = make_predict_request(model, {"inputs": make_tensor([2.0], FLOAT, [1])}, signature=signature)
    response = _predict(stubs, request)
    assert list(response.outputs[output].float_val) == [4.0]
    assert response.model_spec.signature_name == signature


def test_string_model_answers_in_typed_fields(stubs):
    texts = [b"good", b"bad"]
    response = _predict(stubs, make_predict_request(SENTIMENT, {"text": make_tensor(texts, STRING, [2])}))
    scores, classes, label = (response.outputs[name] for name in ("scores", "classes", "label"))
    assert scores.dtype == FLOAT and dims(scores) == [2, len(CLASSES)] and not scores.tensor_content
    assert classes.dtype == STRING and dims(classes) == [2, len(CLASSES)] and not classes.tensor_content
    assert list(classes.string_val) == [c.encode() for c in CLASSES] * 2
    assert list(label.string_val) == [b"positive", b"negative"] and dims(label) == [2]
    # One word each: the logits are that word's row of the dense kernel (row 0 is out-of-vocabulary).
    logits = np.array([WEIGHTS[1][1], WEIGHTS[1][2]], dtype=np.float32)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(scores.float_val).reshape(2, 2), expected, rtol=1e-5)


def test_bytes_and_int64_outputs_use_typed_fields(stubs):
    payloads = [b"\x00\xff", b"abc"]
    request = make_predict_request(ASSORTED, {"payload_bytes": make_tensor(payloads, STRING, [2])})
    outputs = _predict(stubs, request).outputs
    assert list(outputs["payload_bytes"].string_val) == payloads
    length = outputs["length"]
    assert length.dtype == INT64 and list(length.int64_val) == [2, 3] and not length.tensor_content


def test_signature_with_two_inputs_and_outputs(stubs):
    inputs = {"a": make_tensor([1.0, 0.5], FLOAT, [2]), "b": make_tensor([1.0, 2.0, 0.0, 1.0], FLOAT, [2, 2])}
    outputs = _predict(stubs, make_predict_request(ASSORTED, inputs, signature="sum_pair")).outputs
    assert list(outputs["total"].float_val) == [4.0, 1.5] and dims(outputs["total"]) == [2]
    assert list(outputs["doubled"].float_val) == [2.0, 4.0, 0.0, 2.0] and dims(outputs["doubled"]) == [2, 2]


def test_output_filter_picks_outputs(stubs):
    inputs = {"a": make_tensor([1.0], FLOAT, [1]), "b": make_tensor([1.0, 2.0], FLOAT, [1, 2])}
    request = make_predict_request(ASSORTED, inputs, signature="sum_pair", output_filter=["doubled"])
    assert set(_predict(stubs, request).outputs) == {"doubled"}


def test_request_without_model_spec_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"):
        _predict(stubs, predict_pb2.PredictRequest())


def test_empty_model_name_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified"):
        _predict(stubs, make_predict_request("", _x([2.0], [1])))


def test_unknown_model_is_not_found(stubs):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(missing_model)"):
        _predict(stubs, make_predict_request("missing_model", _x([2.0], [1])))


def test_unknown_version_is_not_found(stubs):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({HALF_PLUS_TWO}, 124)"):
        _predict(stubs, make_predict_request(HALF_PLUS_TWO, _x([2.0], [1]), version=124))


def test_unknown_signature_is_a_failed_precondition(stubs):
    with expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'):
        _predict(stubs, make_predict_request(HALF_PLUS_TWO, _x([2.0], [1]), signature="nope"))


def test_request_without_inputs_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "input size does not match signature"):
        _predict(stubs, make_predict_request(HALF_PLUS_TWO, {}))


def test_extra_input_is_invalid(stubs):
    inputs = {**_x([2.0], [1]), "z": make_tensor([1.0], FLOAT, [1])}
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "input size does not match signature: 2!=1"):
        _predict(stubs, make_predict_request(HALF_PLUS_TWO, inputs))


def test_input_name_not_in_signature_is_invalid(stubs):
    inputs = {"key": make_tensor([b"any_key"], STRING, [1])}
    # As many inputs as the signature has, but not its names: TensorFlow's GetInputValues rejects it.
    with expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, "Signature input alias: x(feed name: x:0) not found in request"
    ):
        _predict(stubs, make_predict_request(HALF_PLUS_TWO, inputs))


def test_input_of_the_wrong_type_is_invalid(stubs):
    inputs = {"x": make_tensor([b"any_key"], STRING, [1])}
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT):
        _predict(stubs, make_predict_request(HALF_PLUS_TWO, inputs, output_filter=["y"]))


def test_output_filter_not_in_signature_is_invalid(stubs):
    request = make_predict_request(HALF_PLUS_TWO, _x([2.0], [1]), output_filter=["output_filter"])
    with expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found in signature: output_filter"
    ):
        _predict(stubs, request)


def test_duplicate_output_filter_is_invalid(stubs):
    request = make_predict_request(HALF_PLUS_TWO, _x([2.0], [1]), output_filter=["y", "y"])
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias: y"):
        _predict(stubs, request)


def test_predict_over_the_unix_socket(server):
    if not server.grpc_socket:
        pytest.skip("no gRPC Unix socket configured (MAAS_CONFORMANCE_GRPC_SOCKET)")
    with grpc.insecure_channel(f"unix:{server.grpc_socket}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(make_predict_request(HALF_PLUS_TWO, _x([2.0], [1])), timeout=RPC_TIMEOUT_SECONDS)
    assert list(response.outputs["y"].float_val) == [3.0]
