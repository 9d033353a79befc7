"""TF Serving's REST API (``/v1/models/...``) over a :class:`~serving.server.ModelManager`.

Same URLs, JSON bodies and errors as ``tensorflow_model_server --rest_api_port``: model status
(``GET /v1/models/{name}[/versions/{v}|/labels/{l}]``) and predict
(``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict``) with row ("instances") or columnar
("inputs") bodies and ``{"b64": ...}`` binary strings. Errors are ``{"error": "<message>"}`` with
the HTTP status TF Serving maps from the gRPC code. A standard-library threaded HTTP server is
enough here: requests are small and TensorFlow releases the GIL while it runs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from serving.server import DEFAULT_SIGNATURE, ModelManager, ServingError, Signature

log = logging.getLogger(__name__)

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
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
        return value.encode("utf-8")
    if _is_b64(value):
        if not isinstance(value["b64"], str):
            raise _invalid(f"JSON Value: {_debug_json(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"Unable to base64 decode: {_debug_json(value)}") from None
    raise _invalid(f"JSON Value: {_debug_json(value)} Type: {_json_type(value)} is not of expected type: string")


def _to_array(value: Any, spec: tf.TensorSpec, where: str) -> np.ndarray:
    """Turn a JSON tensor value (nested lists) into an array of ``spec``'s dtype."""
    if spec.dtype == tf.string:

        def convert(item: Any) -> Any:
            return [convert(x) for x in item] if isinstance(item, list) else _decode_string(item)

        converted = convert(value)
        try:
            array = np.array(converted, dtype=object)
        except ValueError as exc:
            raise _invalid(f"{where}: lists of unequal length cannot form a tensor ({exc})") from None
        if array.dtype != object or (array.size and not all(isinstance(x, bytes) for x in array.flat)):
            raise _invalid(f"{where}: lists of unequal length cannot form a tensor")
        return array
    try:
        return np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
    except (TypeError, ValueError) as exc:
        raise _invalid(
            f"JSON Value: {_debug_json(value)} Type: {_json_type(value)} is not of expected type: {spec.dtype.name} ({where}: {exc})"
        ) from None


def _rows_to_inputs(instances: list, signature: Signature) -> dict[str, np.ndarray]:
    names = sorted(signature.inputs)
    columns: dict[str, list] = {name: [] for name in names}
    for index, item in enumerate(instances):
        if isinstance(item, dict) and not _is_b64(item):
            if set(item) != set(names):
                raise _invalid(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {_debug_json(item)} "
                    f"keys must be equal to: {','.join(names)}"
                )
            for name in names:
                columns[name].append(item[name])
        elif len(names) == 1:
            columns[names[0]].append(item)
        else:
            raise _invalid(
                "instances is a plain list, but expecting list of objects as multiple input tensors "
                "required as per tensorinfo_map"
            )
    return {
        name: _to_array(values, signature.inputs[name], f"'instances' values for input {name!r}")
        for name, values in columns.items()
    }


def _columns_to_inputs(inputs: Any, signature: Signature) -> dict[str, np.ndarray]:
    names = sorted(signature.inputs)
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(names) != 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        inputs = {names[0]: inputs}
    for name in names:
        if name not in inputs:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
    extra = sorted(set(inputs) - set(names))
    if extra:
        raise _invalid(f"Unknown named input(s): {', '.join(extra)} in 'inputs' object; the signature takes: {', '.join(names)}")
    return {name: _to_array(inputs[name], signature.inputs[name], f"'inputs' value for input {name!r}") for name in names}


def _json_value(name: str, array: np.ndarray) -> Any:
    if array.dtype == object:
        def encode(item: bytes) -> Any:
            if not name.endswith("_bytes"):
                try:
                    return item.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(item).decode("ascii")}

        return np.frompyfunc(encode, 1, 1)(array).tolist() if array.ndim else encode(array.item())
    if array.dtype == np.float32:
        return _float32_to_float(array).tolist() if array.ndim else float(str(array))
    return array.tolist()


def _predictions(outputs: dict[str, np.ndarray]) -> list:
    batch_sizes = {name: (value.shape[0] if value.ndim else None) for name, value in outputs.items()}
    sizes = set(batch_sizes.values())
    if len(sizes) != 1 or None in sizes:
        raise _invalid(
            f"Output tensors have different or no 0-th (batch) dimensions {batch_sizes}: "
            "send the request in columnar format ('inputs') instead"
        )
    columns = {name: _json_value(name, value) for name, value in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: column[i] for name, column in columns.items()} for i in range(sizes.pop())]


def predict_json(manager: ModelManager, name: str, version: int | None, label: str | None, body: bytes) -> dict:
    """Answer a REST predict request body; returns the response object.

    Raises:
        ServingError: malformed JSON, unknown model/version/signature, or inputs that do not fit.
    """
    if not body.strip():
        raise _invalid("JSON Parse error: The document is empty")
    try:
        request = json.loads(body)
    except json.JSONDecodeError as exc:
        raise _invalid(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except UnicodeDecodeError as exc:
        raise _invalid(f"JSON Parse error: the body is not UTF-8 ({exc})") from None
    if not isinstance(request, dict):
        raise _invalid(f"JSON Value: {_debug_json(request)} Is not object")
    signature_name = request.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise _invalid(
            f"JSON Value: {_debug_json(signature_name)} not formatted correctly. 'signature_name' key must be a string value."
        )
    servable = manager.get_servable(name, version, label)
    signature_name = signature_name or DEFAULT_SIGNATURE
    if signature_name not in servable.signatures:
        raise _invalid(f'Serving signature name: "{signature_name}" not found in signature def')
    signature = servable.signatures[signature_name]
    if "instances" in request and "inputs" in request:
        raise _invalid("Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list):
            raise _invalid("Expecting 'instances' to be an list/array")
        if not instances:
            raise _invalid("No values in 'instances' array")
        outputs = signature.run(_rows_to_inputs(instances, signature))
        return {"predictions": _predictions(outputs)}
    if "inputs" in request:
        outputs = signature.run(_columns_to_inputs(request["inputs"], signature))
        columns = {key: _json_value(key, value) for key, value in outputs.items()}
        return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}
    raise _invalid("Missing 'inputs' or 'instances' key")


def status_json(manager: ModelManager, name: str, version: int | None, label: str | None) -> dict:
    """The JSON form of ``GetModelStatusResponse`` for a model, version or label."""
    response = manager.get_model_status(name, version, label)
    return json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MaaSModelServer"
    # Headers and body go out in separate writes; with Nagle on, delayed ACKs stall the body ~40 ms.
    disable_nagle_algorithm = True
    server: _RestServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        body = self.rfile.read(length) if length > 0 else b""
        try:
            if length < 0:
                raise _invalid(f"Content-Length {self.headers.get('Content-Length')!r} is not a byte count")
            status, payload = 200, self._dispatch(path, body)
        except ServingError as exc:
            status, payload = HTTP_STATUS.get(exc.code, 500), {"error": exc.message}
            log.debug("REST %s %s failed: %s", self.command, path, exc)
        except Exception as exc:  # a bug must still answer in TF Serving's error shape
            log.exception("REST %s %s failed", self.command, path)
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
        if length < 0:
            self.close_connection = True  # the body was not read: the next request would start mid-body
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, path: str, body: bytes) -> dict:
        manager = self.server.manager
        if not path.lower().startswith("/v1/"):
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Not found: {path}; the API lives under /v1/models/")
        match = None
        if self.command == "POST":
            match = _PREDICT_PATH.fullmatch(path)
        elif self.command == "GET":
            match = _STATUS_PATH.fullmatch(path)
        if match is None:
            raise _invalid(f"Malformed request: {self.command} {path}")
        name, version, label, verb = match.groups()
        name = unquote(name) if name else ""
        label = unquote(label) if label else None
        version = int(version) if version else None
        if version is not None and label is not None:
            raise _invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        if self.command == "POST":
            if verb.lower() != "predict":
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not implemented by this model server")
            return predict_json(manager, name, version, label, body)
        if not name:
            raise _invalid("Missing model name in request.")
        if verb:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "model metadata is not implemented by this model server")
        return status_json(manager, name, version, label)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("REST %s: " + format, self.address_string(), *args)


class _RestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], manager: ModelManager) -> None:
        self.manager = manager
        super().__init__(address, _Handler)


def create_rest_server(manager: ModelManager, host: str, port: int) -> ThreadingHTTPServer:
    """Create the REST server bound to ``host:port`` (0: any free port); call ``serve_forever`` to run it.

    Raises:
        OSError: the address cannot be bound.
    """
    try:
        return _RestServer((host, port), manager)
    except OSError as exc:
        raise OSError(
            f"cannot listen for REST on {host}:{port} ({exc.strerror or exc}): is another server using it? "
            "choose another --rest_api_port"
        ) from None
