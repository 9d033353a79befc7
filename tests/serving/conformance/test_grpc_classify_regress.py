"""gRPC ``Classify``, ``Regress`` and ``MultiInference``: TF Serving's cases from tensorflow_model_server_test.py,
classifier_test.cc, regressor_test.cc and multi_inference_test.cc.

The inputs are ``tf.Example`` protos; TF Serving serializes them into the signature's ``inputs`` tensor (an
``ExampleListWithContext`` merges the context into every example). tensorflow_model_server does not check
signature method names by default (``--enable_signature_method_name_check`` is off), so TF2 signatures,
which all say ``tensorflow/serving/predict``, classify and regress too; a signature is judged by its
tensors instead.
"""

from __future__ import annotations

import grpc
import pytest
from tensorflow_serving.apis import classification_pb2, inference_pb2, regression_pb2

from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    expect_rpc_error,
    make_example,
    make_input,
)
from tests.serving.conformance.models import (
    ASSORTED,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_TF2,
    HALF_PLUS_TWO_VERSION,
    SENTIMENT,
)

pytestmark = pytest.mark.integration

CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"
BOTH_MODELS = pytest.mark.parametrize("model", [HALF_PLUS_TWO, HALF_PLUS_TWO_TF2])


def _classify(stubs, model: str, signature: str, model_input) -> classification_pb2.ClassificationResponse:
    request = classification_pb2.ClassificationRequest(input=model_input)
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    return stubs.prediction.Classify(request, timeout=RPC_TIMEOUT_SECONDS)


def _regress(stubs, model: str, signature: str, model_input) -> regression_pb2.RegressionResponse:
    request = regression_pb2.RegressionRequest(input=model_input)
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    return stubs.prediction.Regress(request, timeout=RPC_TIMEOUT_SECONDS)


def _multi_inference(stubs, tasks: list[tuple[str, str, str]], model_input) -> inference_pb2.MultiInferenceResponse:
    request = inference_pb2.MultiInferenceRequest(input=model_input)
    for model, signature, method in tasks:
        task = request.tasks.add(method_name=method)
        task.model_spec.name = model
        task.model_spec.signature_name = signature
    return stubs.prediction.MultiInference(request, timeout=RPC_TIMEOUT_SECONDS)


@BOTH_MODELS
def test_classify(stubs, model):
    response = _classify(stubs, model, "classify_x_to_y", make_input(make_example(x=2.0)))
    assert len(response.result.classifications) == 1
    (only,) = response.result.classifications[0].classes
    assert only.score == 3.0 and only.label == ""
    spec = response.model_spec
    assert (spec.name, spec.signature_name, spec.version.value) == (model, "classify_x_to_y", HALF_PLUS_TWO_VERSION)


@BOTH_MODELS
def test_regress(stubs, model):
    response = _regress(stubs, model, "regress_x_to_y", make_input(make_example(x=2.0)))
    assert [r.value for r in response.result.regressions] == [3.0]
    spec = response.model_spec
    assert (spec.name, spec.signature_name, spec.version.value) == (model, "regress_x_to_y", HALF_PLUS_TWO_VERSION)


@BOTH_MODELS
def test_regress_keeps_the_order_of_the_examples(stubs, model):
    examples = [make_example(x=value) for value in (1.0, 80.0, 20.0)]
    response = _regress(stubs, model, "regress_x_to_y2", make_input(*examples))
    assert [r.value for r in response.result.regressions] == [3.5, 43.0, 13.0]


def test_context_features_reach_every_example(stubs):
    examples = make_input(make_example(), make_example(), context=make_example(x=2.0))
    response = _regress(stubs, HALF_PLUS_TWO, "regress_x_to_y", examples)
    assert [r.value for r in response.result.regressions] == [3.0, 3.0]


def test_example_features_override_the_context(stubs):
    examples = make_input(make_example(x=4.0), make_example(), context=make_example(x=2.0))
    response = _regress(stubs, HALF_PLUS_TWO, "regress_x_to_y", examples)
    assert [r.value for r in response.result.regressions] == [4.0, 3.0]


def test_classify_returns_labels_and_scores(stubs):
    response = _classify(stubs, ASSORTED, "classify_labels", make_input(make_example(x=1.0), make_example(x=2.0)))
    results = [[(c.label, c.score) for c in item.classes] for item in response.result.classifications]
    assert results == [[("neg", 0.25), ("pos", 0.75)], [("neg", 0.5), ("pos", 0.5)]]


def test_classify_with_the_default_predict_signature_is_invalid(stubs):
    # An empty signature name means serving_default: a predict signature without an "inputs" tensor.
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "No classification inputs found in SignatureDef"):
        _classify(stubs, HALF_PLUS_TWO, "", make_input(make_example(x=2.0)))


@BOTH_MODELS
def test_multi_inference(stubs, model):
    tasks = [(model, "regress_x_to_y", REGRESS), (model, "classify_x_to_y", CLASSIFY)]
    response = _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))
    assert len(response.results) == 2
    assert response.results[0].regression_result.regressions[0].value == 3.0
    assert response.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for result, (name, signature, _) in zip(response.results, tasks, strict=True):
        spec = result.model_spec
        assert (spec.name, spec.signature_name, spec.version.value) == (name, signature, HALF_PLUS_TWO_VERSION)


def test_classify_without_model_spec_is_invalid(stubs):
    request = classification_pb2.ClassificationRequest(input=make_input(make_example(x=2.0)))
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"):
        stubs.prediction.Classify(request, timeout=RPC_TIMEOUT_SECONDS)


def test_regress_without_model_spec_is_invalid(stubs):
    request = regression_pb2.RegressionRequest(input=make_input(make_example(x=2.0)))
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"):
        stubs.prediction.Regress(request, timeout=RPC_TIMEOUT_SECONDS)


def test_classify_unknown_model_is_not_found(stubs):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(missing_model)"):
        _classify(stubs, "missing_model", "classify_x_to_y", make_input(make_example(x=2.0)))


def test_regress_unknown_model_is_not_found(stubs):
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(missing_model)"):
        _regress(stubs, "missing_model", "regress_x_to_y", make_input(make_example(x=2.0)))


def test_classify_unknown_signature_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "No signature was found with the name: nope"):
        _classify(stubs, HALF_PLUS_TWO, "nope", make_input(make_example(x=2.0)))


def test_regress_unknown_signature_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "No signature was found with the name: nope"):
        _regress(stubs, HALF_PLUS_TWO, "nope", make_input(make_example(x=2.0)))


@BOTH_MODELS
def test_classify_with_a_regression_signature_is_invalid(stubs, model):
    with expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        'Expected classification signature outputs to contain at least one of "classes" or "scores"',
    ):
        _classify(stubs, model, "regress_x_to_y", make_input(make_example(x=2.0)))


@BOTH_MODELS
def test_regress_with_a_classification_signature_is_invalid(stubs, model):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "No regression outputs found in SignatureDef"):
        _regress(stubs, model, "classify_x_to_y", make_input(make_example(x=2.0)))


def test_regress_with_a_predict_signature_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "No regression inputs found in SignatureDef"):
        _regress(stubs, HALF_PLUS_TWO, "serving_default", make_input(make_example(x=2.0)))


def test_classify_with_three_outputs_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Expected one or two output Tensors, found 3"):
        _classify(stubs, SENTIMENT, "serving_default", make_input(make_example(x=2.0)))


def test_regress_without_examples_is_invalid(stubs):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Input is empty."):
        _regress(stubs, HALF_PLUS_TWO, "regress_x_to_y", make_input())


def test_example_without_the_parsed_feature_is_invalid(stubs):
    # x has no default in the graph's feature spec: parsing fails, as TensorFlow reports it.
    with expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, "Feature: x (data type: float) is required but could not be found"
    ):
        _regress(stubs, HALF_PLUS_TWO, "regress_x_to_y", make_input(make_example(x2=1.0)))


def test_multi_inference_tasks_must_share_the_model(stubs):
    tasks = [(HALF_PLUS_TWO, "regress_x_to_y", REGRESS), (HALF_PLUS_TWO_TF2, "classify_x_to_y", CLASSIFY)]
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "must access the same model name"):
        _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))


def test_multi_inference_task_without_model_name_is_invalid(stubs):
    tasks = [(HALF_PLUS_TWO, "regress_x_to_y", REGRESS), ("", "classify_x_to_y", CLASSIFY)]
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Found ModelSpec with an empty model name."):
        _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))


def test_multi_inference_signature_twice_is_invalid(stubs):
    tasks = [(HALF_PLUS_TWO, "regress_x_to_y", REGRESS), (HALF_PLUS_TWO, "regress_x_to_y", REGRESS)]
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Duplicate evaluation of signature: regress_x_to_y"):
        _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))


def test_multi_inference_unknown_signature_is_invalid(stubs):
    tasks = [(HALF_PLUS_TWO, "nope", REGRESS)]
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "Requested signature not found in model graph: nope"):
        _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))


def test_multi_inference_predict_task_is_unimplemented(stubs):
    tasks = [(HALF_PLUS_TWO, "serving_default", "tensorflow/serving/predict")]
    with expect_rpc_error(
        grpc.StatusCode.UNIMPLEMENTED, "Unsupported signature method_name: tensorflow/serving/predict"
    ):
        _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))


def test_multi_inference_unknown_model_is_not_found(stubs):
    tasks = [("missing_model", "regress_x_to_y", REGRESS)]
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(missing_model)"):
        _multi_inference(stubs, tasks, make_input(make_example(x=2.0)))
