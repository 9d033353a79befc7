"""TF Serving's REST API bodies: JSON in, tensors and ``tf.Example``s out, and back, as
``tensorflow_model_server`` converts them (``json_tensor.cc``, ``http_rest_api_handler.cc``).

Predict takes row ("instances") or columnar ("inputs") bodies with ``{"b64": ...}`` binary strings,
and feeds the tensors as sent (their shape is the JSON's, whatever the signature declares); Classify
and Regress take ``{"examples": [...], "context": {...}}`` in TF Serving's JSON example format.
Status and metadata are the protos' JSON. Errors carry TF Serving's messages; the HTTP server
around these functions is :mod:`serving.rest`. Nothing here evaluates or unpickles input: bodies
go through :func:`json.loads` only, and a body's size is checked before it is read.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2, input_pb2, regression_pb2

from serving import inference
from serving.servable import DEFAULT_SIGNATURE, Servable, ServingError, Signature

if TYPE_CHECKING:
    from serving.server import ModelManager

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_float32_to_float = np.frompyfunc(lambda v: float(str(np.float32(v))), 1, 1)


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _debug_json(value: Any, limit: int = 200) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    return "Array" if isinstance(value, list) else "Object"


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _decode_string(value: Any) -> bytes:
    if isinstance(value, str):
        # surrogatepass: JSON may escape a lone surrogate ("\ud800"), which strict UTF-8 cannot encode.
        return value.encode("utf-8", "surrogatepass")
    if _is_b64(value):
        if not isinstance(value["b64"], str):
            raise _invalid(f"JSON Value: {_debug_json(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"Unable to base64 decode: {_debug_json(value)}") from None
    raise _invalid(f"JSON Value: {_debug_json(value)} Type: {_json_type(value)} is not of expected type: string")


def _to_array(value: Any, dtype: tf.DType, where: str) -> np.ndarray:
    """Turn a JSON tensor value (nested lists, or a scalar) into an array of ``dtype``, shaped as sent."""
    if dtype == tf.string:

        def convert(item: Any) -> Any:
            return [convert(x) for x in item] if isinstance(item, list) else _decode_string(item)

        converted = convert(value)
        try:
            array = np.array(converted, dtype=object)
        except ValueError as exc:
            raise _invalid(f"{where}: lists of unequal length cannot form a tensor ({exc})") from None
        if array.size and not all(isinstance(x, bytes) for x in array.flat):
            raise _invalid(f"{where}: lists of unequal length cannot form a tensor")
        return array
    _check_numbers(value, dtype)
    try:
        with np.errstate(over="ignore"):  # a float beyond float32 becomes inf, as TF Serving's GetFloat makes it
            return np.asarray(value, dtype=dtype.as_numpy_dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid(f"{where}: the values cannot form a {dtype.name} tensor ({exc})") from None


def _check_numbers(value: Any, dtype: tf.DType) -> None:
    # JSON strings, objects and nulls are not numbers: name the first offender as TF Serving does.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif dtype == tf.bool:
            if not isinstance(item, bool):
                raise _invalid(f"JSON Value: {_debug_json(item)} Type: {_json_type(item)} is not of expected type: bool")
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise _invalid(
                f"JSON Value: {_debug_json(item)} Type: {_json_type(item)} is not of expected type: {dtype.name}"
            )
        elif dtype.is_integer and isinstance(item, float) and not item.is_integer():
            raise _invalid(f"JSON Value: {_debug_json(item)} Type: Number is not of expected type: {dtype.name}")


def _is_element_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _rows_to_inputs(instances: list, signature: Signature) -> dict[str, np.ndarray]:
    """TF Serving's row format: each element is one row of every input; rows must agree in shape."""
    names = signature.input_names
    objects = _is_element_object(instances[0])
    if not objects and len(names) > 1:
        raise _invalid(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    if not objects and signature.input_dtype(names[0]) == tf.string and all(isinstance(x, str) for x in instances):
        # The common case (a list of texts) in one step.
        return {names[0]: np.array([x.encode("utf-8", "surrogatepass") for x in instances], dtype=object)}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def add(name: str, value: Any) -> None:
        if name not in rows:
            raise _invalid(f"JSON object: does not have named input: {name}")
        array = _to_array(value, signature.input_dtype(name), f"input {name!r}")
        if rows[name]:
            first = rows[name][0]
            if first.size != array.size:
                raise _invalid(f"Expecting tensor size: {first.size} but got: {array.size}")
            if first.shape != array.shape:
                raise _invalid(f"Expecting shape {_shape_text(first.shape)} but got: {_shape_text(array.shape)}")
        rows[name].append(array)

    for index, element in enumerate(instances):
        if objects:
            if not _is_element_object(element):
                raise _invalid(f"Expecting object but got list at item {index} of input list")
            for key, value in element.items():
                try:
                    add(key, value)
                except ServingError as exc:
                    raise _invalid(
                        f"Failed to process element: {index} key: {key} of 'instances' list. Error: {exc}"
                    ) from None
            if set(element) != set(names):
                raise _invalid(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {_debug_json(element)} "
                    f"keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_element_object(element):
                raise _invalid(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(names[0], element)
            except ServingError as exc:
                raise _invalid(f"Failed to process element: {index} of 'instances' list. Error: {exc}") from None
    return {name: np.stack(arrays) for name, arrays in rows.items()}


def _columns_to_inputs(inputs: Any, signature: Signature) -> dict[str, np.ndarray]:
    names = signature.input_names
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(names) != 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        inputs = {names[0]: inputs}
    # Named inputs the signature does not take are ignored, as TF Serving does.
    for name in names:
        if name not in inputs and name not in signature.defaults:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
    return {
        name: _to_array(inputs[name], signature.input_dtype(name), f"'inputs' value for input {name!r}")
        for name in names
        if name in inputs
    }


def _json_value(name: str, array: np.ndarray) -> Any:
    if array.dtype == object:
        return _encode_strings(array.tolist(), name.endswith("_bytes"))
    if array.dtype == np.float32:
        return _float32_to_float(array).tolist() if array.ndim else float(str(array))
    return array.tolist()


def _encode_string(item: bytes, as_bytes: bool) -> Any:
    if not as_bytes:
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not text: sent as base64, as TF Serving does for bytes
    return {"b64": base64.b64encode(item).decode("ascii")}


def _encode_strings(value: Any, as_bytes: bool) -> Any:
    if isinstance(value, list):
        return [_encode_strings(item, as_bytes) for item in value]
    return _encode_string(value, as_bytes)


def _predictions(outputs: dict[str, np.ndarray]) -> list:
    batch_size = -1
    for name, value in sorted(outputs.items()):
        if value.ndim == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch_size >= 0 and value.shape[0] != batch_size:
            raise _invalid(f"Tensor name: {name} has inconsistent batch size: {value.shape[0]} expecting: {batch_size}")
        batch_size = value.shape[0]
    columns = {name: _json_value(name, value) for name, value in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: column[i] for name, column in columns.items()} for i in range(batch_size)]


# Python's json messages, as rapidjson (TF Serving's parser) words them.
_PARSE_ERRORS = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Extra data": "The document root must not be followed by other values.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid control character at": "Invalid encoding in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
}


def _innermost_open(text: str, pos: int) -> str:
    stack, in_string, escaped = [], False, False
    for char in text[:pos]:
        if in_string:
            escaped = (char == "\\") and not escaped
            if char == '"' and not escaped:
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def parse_json_object(body: bytes) -> dict:
    """Parse a request body that must be a JSON object.

    Raises:
        ServingError: INVALID_ARGUMENT "JSON Parse error: ..." with rapidjson's wording and the offset.
    """
    if not body.strip():
        raise _invalid("JSON Parse error: The document is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = _PARSE_ERRORS.get(exc.msg)
        if exc.msg == "Expecting ',' delimiter":
            reason = (
                "Missing a comma or ']' after an array element."
                if _innermost_open(text, exc.pos) == "["
                else "Missing a comma or '}' after an object member."
            )
        raise _invalid(f"JSON Parse error: {reason or exc.msg} at offset: {exc.pos}") from None
    except RecursionError:
        raise _invalid("JSON Parse error: the document nests too deeply") from None
    if not isinstance(request, dict):
        raise _invalid(f"JSON Value: {_debug_json(request)} Is not object")
    return request


def _signature_name(request: dict) -> str:
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise _invalid(f"JSON Value: {_debug_json(name)} not formatted correctly. 'signature_name' key must be a string value.")
    return name


@dataclass
class PredictCall:
    """A REST predict body turned into a signature run: what to feed and fetch, and the body's format."""

    signature: Signature
    values: dict[str, np.ndarray]
    aliases: list[str]
    row_format: bool


def predict_json(servable: Servable, request: dict) -> dict:
    """Answer a parsed REST predict body with ``servable``; returns the response object.

    Raises:
        ServingError: unknown signature, a malformed body, or inputs the graph rejects.
    """
    call = prepare_predict(servable, request)
    return predict_response(call, call.signature.execute(call.values, call.aliases))


def predict_response(call: PredictCall, outputs: dict[str, np.ndarray]) -> dict:
    """The JSON response for a predict call's outputs, in the format of its request.

    Raises:
        ServingError: INVALID_ARGUMENT when row format is asked for outputs without a common batch size.
    """
    if call.row_format:
        return {"predictions": _predictions(outputs)}
    columns = {key: _json_value(key, value) for key, value in outputs.items()}
    return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}


def prepare_predict(servable: Servable, request: dict) -> PredictCall:
    """Check and convert a parsed REST predict body: the signature run it asks for.

    Raises:
        ServingError: unknown signature or a malformed body.
    """
    signature_name = _signature_name(request) or DEFAULT_SIGNATURE
    if signature_name not in servable.signatures:
        raise _invalid(f'Serving signature name: "{signature_name}" not found in signature def')
    signature = servable.signatures[signature_name]
    inference.check_predict_method(signature)
    if "instances" in request and "inputs" in request:
        raise _invalid(
            f"JSON Value: {_debug_json(request)} Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
        )
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list):
            raise _invalid(f"JSON Value: {_debug_json(request)} Expecting 'instances' to be an list/array")
        if not instances:
            raise _invalid(f"JSON Value: {_debug_json(request)} No values in 'instances' array")
        values, aliases = signature.prepare(_rows_to_inputs(instances, signature))
        return PredictCall(signature, values, aliases, row_format=True)
    if "inputs" in request:
        values, aliases = signature.prepare(_columns_to_inputs(request["inputs"], signature))
        return PredictCall(signature, values, aliases, row_format=False)
    raise _invalid("Missing 'inputs' or 'instances' key")


# --- Classify / Regress: TF Serving's JSON example format --------------------------------------


def _feature_kind_error(name: str, kind: str) -> ServingError:
    label = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}.get(kind, "UNKNOWN")
    return _invalid(f"Unexpected element type in feature: {name} expecting type: {label}")


def _add_feature_value(value: Any, name: str, feature) -> None:
    kind = feature.WhichOneof("kind")
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_b64(value)):
        raise _invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
    if isinstance(value, bool):
        target, item = "int64_list", int(value)
    elif isinstance(value, (str, dict)):
        target, item = "bytes_list", _decode_string(value)
    elif isinstance(value, float):
        target, item = "float_list", value
    else:
        if value >= 2**63:
            raise _invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
        if value < -(2**63):
            raise _invalid(f"Feature: {name} has an integer that does not fit int64: {value}")
        target, item = "int64_list", value
    if kind not in (None, target):
        raise _feature_kind_error(name, kind)
    getattr(feature, target).value.append(item)


def example_from_json(value: Any, example) -> None:
    """Fill a ``tf.train.Example`` from a JSON example object (TF Serving's format).

    Raises:
        ServingError: INVALID_ARGUMENT for a value that is not a number, string, bool or b64 object
            (or a flat list of them), or a feature mixing kinds.
    """
    if not isinstance(value, dict):
        raise _invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)


def input_from_json(request: dict, method: str) -> input_pb2.Input:
    """The ``Input`` of a classify/regress body: ``examples`` and an optional ``context``.

    Raises:
        ServingError: INVALID_ARGUMENT when ``examples`` is missing, not a list or empty.
    """
    model_input = input_pb2.Input()
    context = request.get("context")
    if "context" in request:
        example_from_json(context, model_input.example_list_with_context.context)
    if "examples" not in request:
        raise _invalid(f"JSON Value: {_debug_json(request)} When method is {method}, key 'examples' is expected and was not found")
    examples = request["examples"]
    if not isinstance(examples, list):
        raise _invalid(f"JSON Value: {_debug_json(request)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise _invalid(f"JSON Value: {_debug_json(request)} 'examples' value is an empty array")
    target = model_input.example_list_with_context if "context" in request else model_input.example_list
    for value in examples:
        example_from_json(value, target.examples.add())
    return model_input


def _json_float(value: float) -> float:
    return float(str(np.float32(value)))


def _examples_request(proto_class: type, request: dict, model_name: str, method: str):
    """The ClassificationRequest/RegressionRequest a REST classify/regress body describes."""
    proto = proto_class()
    proto.model_spec.name = model_name
    proto.model_spec.signature_name = _signature_name(request)
    proto.input.CopyFrom(input_from_json(request, method))
    return proto


def classify_json(servable: Servable, request: dict, model_name: str) -> dict:
    """Answer a parsed REST classify body: ``{"results": [[[label, score], ...], ...]}``."""
    proto = _examples_request(classification_pb2.ClassificationRequest, request, model_name, "classify")
    response = inference.classify_with(servable, proto)
    if not response.result.classifications:
        raise _invalid("Cannot convert empty ClassificationResults to JSON")
    return {
        "results": [
            [[c.label, _json_float(c.score)] for c in classifications.classes]
            for classifications in response.result.classifications
        ]
    }


def regress_json(servable: Servable, request: dict, model_name: str) -> dict:
    """Answer a parsed REST regress body: ``{"results": [value, ...]}``."""
    proto = _examples_request(regression_pb2.RegressionRequest, request, model_name, "regress")
    response = inference.regress_with(servable, proto)
    if not response.result.regressions:
        raise _invalid("Cannot convert empty RegressionResults to JSON")
    return {"results": [_json_float(r.value) for r in response.result.regressions]}


def _proto_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def metadata_json(manager: ModelManager, name: str, version: int | None, label: str | None) -> dict:
    """``GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata``: the model spec and its SignatureDefs."""
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.metadata_field.append(inference.SIGNATURE_DEF_FIELD)
    response = inference.get_model_metadata(manager, request)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[inference.SIGNATURE_DEF_FIELD].Unpack(signature_map)
    return {"model_spec": _proto_dict(response.model_spec), "metadata": {"signature_def": _proto_dict(signature_map)}}


def status_json(manager: ModelManager, name: str, version: int | None, label: str | None) -> dict:
    """The JSON form of ``GetModelStatusResponse`` for a model, version or label."""
    return _proto_dict(manager.get_model_status(name, version, label))
