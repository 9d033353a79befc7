"""TF Serving's inference APIs on request and response protos: Predict, Classify, Regress,
MultiInference and GetModelMetadata.

Both front ends (gRPC in :mod:`serving.grpc_service`, REST in :mod:`serving.rest`) call these, so
the two answer alike, with TF Serving's checks, result shapes and error messages (from
``predict_util.cc``, ``classifier.cc``, ``regressor.cc``, ``multi_inference.cc`` and
``get_model_metadata_impl.cc``). Classify and Regress take ``tf.Example`` inputs: the examples are
serialized (a context example's bytes are prepended, so its features merge into each) and fed to the
signature's single ``inputs`` tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    input_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from serving.servable import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    PREDICT_METHOD,
    REGRESS_METHOD,
    Servable,
    ServingError,
    Signature,
    invalid_argument,
    tensor_from_proto,
    tensor_to_proto,
)

if TYPE_CHECKING:
    from serving.server import ModelManager

CLASSIFY_INPUTS = "inputs"
CLASSIFY_CLASSES = "classes"
CLASSIFY_SCORES = "scores"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
SIGNATURE_DEF_FIELD = "signature_def"

# TF Serving's --enable_signature_method_name_check (off by default: TF2 exports may not set it).
method_name_check = False


def version_choice(model_spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    """The version number or label a ModelSpec asks for (neither: the latest)."""
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        return model_spec.version.value, None
    if choice == "version_label":
        return None, model_spec.version_label
    return None, None


def servable_for(manager: ModelManager, model_spec: model_pb2.ModelSpec) -> Servable:
    """The loaded version a request's ModelSpec names.

    Raises:
        ServingError: INVALID_ARGUMENT "Missing ModelSpec" for a request without one; NOT_FOUND /
            INVALID_ARGUMENT from :meth:`ModelManager.get_servable`.
    """
    if model_spec is None:
        raise invalid_argument("Missing ModelSpec")
    version, label = version_choice(model_spec)
    return manager.get_servable(model_spec.name, version, label)


def _spec(request) -> model_pb2.ModelSpec | None:
    return request.model_spec if request.HasField("model_spec") else None


def _fill_model_spec(target: model_pb2.ModelSpec, name: str, version: int, signature: str) -> None:
    target.name = name
    target.version.value = version
    target.signature_name = signature


# --- Predict -----------------------------------------------------------------------------------


def predict(manager: ModelManager, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Answer a PredictRequest; the response's model_spec names the version that answered."""
    return predict_with(servable_for(manager, _spec(request)), request)


def predict_with(servable: Servable, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Answer a PredictRequest with ``servable``.

    Raises:
        ServingError: unknown signature (FAILED_PRECONDITION), bad inputs or output filter
            (INVALID_ARGUMENT), or the graph's own error.
    """
    signature, values, aliases = prepare_predict(servable, request)
    return predict_response(request, servable, signature, signature.execute(values, aliases))


def prepare_predict(
    servable: Servable, request: predict_pb2.PredictRequest
) -> tuple[Signature, dict[str, np.ndarray], list[str]]:
    """Check a PredictRequest against its signature: the signature, the values to feed, the outputs to fetch.

    Raises:
        ServingError: unknown signature (FAILED_PRECONDITION), bad inputs or output filter (INVALID_ARGUMENT).
    """
    signature = servable.signature(request.model_spec.signature_name)
    check_predict_method(signature)
    signature.check_inputs(set(request.inputs))
    inputs = {alias: tensor_from_proto(proto, alias) for alias, proto in request.inputs.items()}
    values, aliases = signature.prepare(inputs, list(request.output_filter))
    return signature, values, aliases


def predict_response(
    request: predict_pb2.PredictRequest, servable: Servable, signature: Signature, outputs: dict[str, np.ndarray]
) -> predict_pb2.PredictResponse:
    """The PredictResponse for a run's outputs (typed ``*_val`` fields, the version that answered)."""
    response = predict_pb2.PredictResponse()
    _fill_model_spec(response.model_spec, request.model_spec.name, servable.version, signature.name)
    for alias, value in outputs.items():
        response.outputs[alias].CopyFrom(tensor_to_proto(value))
    return response


def check_predict_method(signature: Signature) -> None:
    """Predict runs predict, classify and regress signatures (with the method-name check on).

    Raises:
        ServingError: INTERNAL for another method name, as TF Serving answers.
    """
    if method_name_check and signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
        raise ServingError(
            grpc.StatusCode.INTERNAL,
            "Expected prediction signature method_name to be one of "
            f"{{{PREDICT_METHOD}, {CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}",
        )


# --- tf.Example inputs -------------------------------------------------------------------------


def examples_tensor(model_input: input_pb2.Input) -> np.ndarray:
    """The serialized examples of an Input, as the string vector fed to a classify/regress signature.

    Raises:
        ServingError: INVALID_ARGUMENT when the input holds no example.
    """
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        serialized = [e.SerializeToString() for e in model_input.example_list.examples]
    elif kind == "example_list_with_context":
        # Proto parsing merges concatenated messages: the context's features join every example
        # (an example's own feature of the same name wins), as TF Serving builds its input tensor.
        context = model_input.example_list_with_context.context.SerializeToString()
        serialized = [context + e.SerializeToString() for e in model_input.example_list_with_context.examples]
    else:
        serialized = []
    if not serialized:
        raise invalid_argument("Input is empty.")
    return np.array(serialized, dtype=object)


def _signature_for(servable: Servable, name: str, method: str, kind: str) -> Signature:
    signature_name = name or DEFAULT_SIGNATURE
    signature = servable.signatures.get(signature_name)
    if signature is None:
        raise invalid_argument(f"No signature was found with the name: {signature_name}")
    if method_name_check and signature.method_name != method:
        raise invalid_argument(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
    return signature


# --- Classify ----------------------------------------------------------------------------------


def classify(
    manager: ModelManager, request: classification_pb2.ClassificationRequest
) -> classification_pb2.ClassificationResponse:
    """Answer a ClassificationRequest."""
    return classify_with(servable_for(manager, _spec(request)), request)


def classify_with(
    servable: Servable, request: classification_pb2.ClassificationRequest
) -> classification_pb2.ClassificationResponse:
    """Run a classify signature on the request's examples.

    Raises:
        ServingError: INVALID_ARGUMENT when the signature is not a classification signature, the
            input is empty, or the outputs have the wrong shape/type.
    """
    signature = _signature_for(servable, request.model_spec.signature_name, CLASSIFY_METHOD, "classification")
    outputs = _check_classify_signature(signature)
    examples = examples_tensor(request.input)
    response = classification_pb2.ClassificationResponse()
    _fill_model_spec(response.model_spec, request.model_spec.name, servable.version, signature.name)
    values = signature.run({CLASSIFY_INPUTS: examples}, outputs)
    fill_classification_result(response.result, values, len(examples))
    return response


def _check_classify_signature(signature: Signature) -> list[str]:
    definition = signature.definition
    if len(definition.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(definition.outputs) not in (1, 2):
        raise invalid_argument(f"Expected one or two output Tensors, found {len(definition.outputs)}")
    if CLASSIFY_INPUTS not in definition.inputs:
        raise invalid_argument(f"No classification inputs found in SignatureDef: {definition}")
    outputs = [name for name in (CLASSIFY_CLASSES, CLASSIFY_SCORES) if name in definition.outputs]
    if not outputs:
        raise invalid_argument(
            f'Expected classification signature outputs to contain at least one of "{CLASSIFY_CLASSES}" or '
            f'"{CLASSIFY_SCORES}". Signature was: {definition}'
        )
    return outputs


def _shape_text(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"


def fill_classification_result(
    result: classification_pb2.ClassificationResult, values: dict[str, np.ndarray], num_examples: int
) -> None:
    """TF Serving's PostProcessClassificationResult: one Classifications per example."""
    classes, scores = values.get(CLASSIFY_CLASSES), values.get(CLASSIFY_SCORES)
    if classes is not None:
        if classes.ndim != 2:
            raise invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {_shape_text(classes)}")
        if classes.dtype != object:
            raise invalid_argument(f"Expected classes Tensor of DT_STRING. Got: DT_{classes.dtype.name.upper()}")
        if classes.shape[0] != num_examples:
            raise invalid_argument(f"Expected classes output batch size of {num_examples}. Got: {classes.shape[0]}")
    if scores is not None:
        if scores.ndim != 2:
            raise invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {_shape_text(scores)}")
        if scores.dtype != np.float32:
            raise invalid_argument(f"Expected scores Tensor of DT_FLOAT. Got: DT_{scores.dtype.name.upper()}")
        if scores.shape[0] != num_examples:
            raise invalid_argument(f"Expected scores output batch size of {num_examples}. Got: {scores.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid_argument(
            f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    num_classes = (classes if classes is not None else scores).shape[1]
    for i in range(num_examples):
        classifications = result.classifications.add()
        for c in range(num_classes):
            entry = classifications.classes.add()
            if classes is not None:
                entry.label = classes[i, c].decode("utf-8", "replace") if isinstance(classes[i, c], bytes) else str(classes[i, c])
            if scores is not None:
                entry.score = float(scores[i, c])


# --- Regress -----------------------------------------------------------------------------------


def regress(manager: ModelManager, request: regression_pb2.RegressionRequest) -> regression_pb2.RegressionResponse:
    """Answer a RegressionRequest."""
    return regress_with(servable_for(manager, _spec(request)), request)


def regress_with(servable: Servable, request: regression_pb2.RegressionRequest) -> regression_pb2.RegressionResponse:
    """Run a regress signature on the request's examples.

    Raises:
        ServingError: INVALID_ARGUMENT when the signature is not a regression signature, the input
            is empty, or the output is not float [batch] or [batch, 1].
    """
    signature = _signature_for(servable, request.model_spec.signature_name, REGRESS_METHOD, "regression")
    _check_regress_signature(signature)
    examples = examples_tensor(request.input)
    response = regression_pb2.RegressionResponse()
    _fill_model_spec(response.model_spec, request.model_spec.name, servable.version, signature.name)
    values = signature.run({REGRESS_INPUTS: examples}, [REGRESS_OUTPUTS])
    fill_regression_result(response.result, values[REGRESS_OUTPUTS], len(examples))
    return response


def _check_regress_signature(signature: Signature) -> None:
    definition = signature.definition
    if len(definition.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(definition.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    if REGRESS_INPUTS not in definition.inputs:
        raise invalid_argument(f"No regression inputs found in SignatureDef: {definition}")
    if REGRESS_OUTPUTS not in definition.outputs:
        raise invalid_argument(f"No regression outputs found in SignatureDef: {definition}")


def fill_regression_result(result: regression_pb2.RegressionResult, output: np.ndarray, num_examples: int) -> None:
    """TF Serving's PostProcessRegressionResult: one Regression per example."""
    if not (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        raise invalid_argument(
            f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got {_shape_text(output)}"
        )
    if output.shape[0] != num_examples:
        raise invalid_argument(f"Input batch size did not match output batch size: {num_examples} vs. {output.shape[0]}")
    if output.dtype != np.float32:
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: DT_{output.dtype.name.upper()}")
    for value in output.reshape(-1).tolist():
        result.regressions.add().value = value


# --- MultiInference ----------------------------------------------------------------------------


def multi_inference(
    manager: ModelManager, request: inference_pb2.MultiInferenceRequest
) -> inference_pb2.MultiInferenceResponse:
    """Answer a MultiInferenceRequest: several classify/regress signatures of one model on one input."""
    if not request.tasks:
        raise invalid_argument("Found ModelSpec with an empty model name.")
    return multi_inference_with(servable_for(manager, request.tasks[0].model_spec), request)


def multi_inference_with(
    servable: Servable, request: inference_pb2.MultiInferenceRequest
) -> inference_pb2.MultiInferenceResponse:
    """Run each task's signature on the shared input, in one pass per task.

    Raises:
        ServingError: INVALID_ARGUMENT for tasks on different models, a repeated or unknown signature,
            or a method other than classify/regress.
    """
    model_name = ""
    seen: set[str] = set()
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid_argument("Found ModelSpec with an empty model name.")
        if model_name and task.model_spec.name != model_name:
            raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        model_name = task.model_spec.name
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name in seen:
            raise invalid_argument(f"Duplicate evaluation of signature: {signature_name}")
        seen.add(signature_name)
        if signature_name not in servable.signatures:
            raise invalid_argument(f"Requested signature not found in model graph: {signature_name}")
        if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}")
    examples = examples_tensor(request.input)
    response = inference_pb2.MultiInferenceResponse()
    for task in request.tasks:
        result = response.results.add()
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = servable.signatures[signature_name]
        _fill_model_spec(result.model_spec, model_name, servable.version, signature_name)
        if task.method_name == CLASSIFY_METHOD:
            outputs = _check_classify_signature(signature)
            values = signature.run({CLASSIFY_INPUTS: examples}, outputs)
            fill_classification_result(result.classification_result, values, len(examples))
        else:
            _check_regress_signature(signature)
            values = signature.run({REGRESS_INPUTS: examples}, [REGRESS_OUTPUTS])
            fill_regression_result(result.regression_result, values[REGRESS_OUTPUTS], len(examples))
    return response


# --- GetModelMetadata --------------------------------------------------------------------------


def get_model_metadata(
    manager: ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """The SignatureDefs of the version a request names (the only metadata field TF Serving has).

    Raises:
        ServingError: INVALID_ARGUMENT for a missing ModelSpec or an unsupported/absent field.
    """
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field_name in request.metadata_field:
        if field_name != SIGNATURE_DEF_FIELD:
            raise invalid_argument(f"Metadata field {field_name} is not supported")
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    servable = servable_for(manager, _spec(request))
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, definition in servable.meta_graph.signature_def.items():
        signature_map.signature_def[key].CopyFrom(definition)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response
