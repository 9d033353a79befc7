"""How the conformance tests talk to a model server: JSON over HTTP, and TF Serving's gRPC stubs.

Only the public protocols are used, so the same tests can judge the embedded server and a real
``tensorflow_model_server``. The helpers build requests the way TF Serving's own tests do (typed tensor
fields, ``tf.Example`` inputs), and check errors the way they do: a status code and a stable part of the
message.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import grpc
import pytest
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    input_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

RPC_TIMEOUT_SECONDS = 20.0
HTTP_TIMEOUT_SECONDS = 20.0
ModelVersionStatus = get_model_status_pb2.ModelVersionStatus
STATE_NAMES = {number: name for name, number in ModelVersionStatus.State.items()}


@dataclass(frozen=True)
class ServerUnderTest:
    """A running model server and the test models it serves.

    Attributes:
        grpc_target: ``host:port`` of the gRPC API.
        rest_url: ``http://host:port`` of the REST API.
        models_dir: where the suite reads and writes the test models.
        base_path_prefix: ``models_dir`` as the server sees it (the base paths in its config).
        config: the ``ModelServerConfig`` the server was started with.
        grpc_socket: the Unix socket of the gRPC API, when known.
    """

    grpc_target: str
    rest_url: str
    models_dir: Path
    base_path_prefix: str
    config: model_server_config_pb2.ModelServerConfig
    grpc_socket: str | None = None


@dataclass(frozen=True)
class Stubs:
    """The two gRPC services of a model server."""

    prediction: prediction_service_pb2_grpc.PredictionServiceStub
    model: model_service_pb2_grpc.ModelServiceStub


@dataclass(frozen=True)
class Reply:
    """An HTTP response: status, headers and body text."""

    status: int
    headers: Message
    text: str

    @property
    def json(self) -> Any:
        """The body parsed as JSON (``NaN`` and ``Infinity`` accepted, as TF Serving writes them)."""
        return json.loads(self.text)


def send_http(url: str, method: str, body: bytes | None = None) -> Reply:
    """Send one HTTP request; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return Reply(response.status, response.headers, response.read().decode())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read().decode())


def get_json(url: str) -> Reply:
    """GET ``url``."""
    return send_http(url, "GET")


def post_json(url: str, body: Any) -> Reply:
    """POST ``body`` to ``url``: a str or bytes is sent as is, anything else as JSON."""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return send_http(url, "POST", body)


def assert_rest_error(reply: Reply, status: int, message_part: str) -> None:
    """Check a REST error as TF Serving returns it: the HTTP status and ``{"error": "...message_part..."}``."""
    assert reply.status == status, reply.text
    assert reply.headers.get_content_type() == "application/json"
    body = reply.json
    assert isinstance(body, dict) and set(body) == {"error"}, reply.text
    assert message_part in body["error"], body["error"]


@contextmanager
def expect_rpc_error(code: grpc.StatusCode, message_part: str = "") -> Iterator[None]:
    """Expect the block's RPC to fail with ``code`` and a message containing ``message_part``."""
    with pytest.raises(grpc.RpcError) as caught:
        yield
    assert caught.value.code() == code, caught.value.details()
    assert message_part in caught.value.details(), caught.value.details()


_TYPED_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
}


def make_tensor(values: Iterable[Any], dtype: int, shape: Iterable[int] | None = None) -> tensor_pb2.TensorProto:
    """A TensorProto with its values in the typed field (``float_val``, ...), as TF Serving's tests build them.

    ``shape=None`` leaves the shape unset: a scalar when there is one value.
    """
    tensor = tensor_pb2.TensorProto(dtype=dtype)
    getattr(tensor, _TYPED_FIELDS[dtype]).extend(values)
    for size in shape or ():
        tensor.tensor_shape.dim.add().size = size
    return tensor


def dims(tensor: tensor_pb2.TensorProto) -> list[int]:
    """The shape of ``tensor`` as a list of sizes."""
    return [dim.size for dim in tensor.tensor_shape.dim]


def make_example(**features: float | list[float]) -> example_pb2.Example:
    """A ``tf.Example`` with float features (one value or a list each)."""
    example = example_pb2.Example()
    for name, value in features.items():
        example.features.feature[name].float_list.value.extend(value if isinstance(value, list) else [value])
    return example


def make_input(*examples: example_pb2.Example, context: example_pb2.Example | None = None) -> input_pb2.Input:
    """An ``Input`` of examples, with ``context`` shared by all of them when given."""
    if context is None:
        return input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples))
    return input_pb2.Input(
        example_list_with_context=input_pb2.ExampleListWithContext(examples=examples, context=context)
    )


def make_predict_request(
    model: str,
    inputs: dict[str, tensor_pb2.TensorProto],
    *,
    signature: str = "",
    version: int | None = None,
    label: str | None = None,
    output_filter: Iterable[str] = (),
) -> predict_pb2.PredictRequest:
    """A PredictRequest for ``model`` (latest version unless ``version`` or ``label`` is given)."""
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for name, tensor in inputs.items():
        request.inputs[name].CopyFrom(tensor)
    return request


def get_version_states(stubs: Stubs, model: str) -> dict[int, tuple[str, int, str]]:
    """Version -> (state name, status error code, status message) of ``model``; empty when it is unknown."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    try:
        response = stubs.model.GetModelStatus(request, timeout=RPC_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise
    return {
        status.version: (STATE_NAMES[status.state], status.status.error_code, status.status.error_message)
        for status in response.model_version_status
    }


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(interval)
