"""Small clients for a TF Serving-compatible model server (the real one or :mod:`serving.server`).

Used by the CLI, promotion and tests. Predictions come back as plain dicts
``{text, label, score, scores, classes, version}`` whatever the transport. Every failure raises
:class:`ServingClientError` carrying the server's gRPC code name and message, or
:class:`ServerUnreachable` when nothing answers at the address. The gRPC stubs (and TensorFlow,
which they import) are loaded only when a gRPC function is called, so REST callers stay light.

Every call sends an API key when it has one (``api_key``, by default ``MAAS_API_KEY``): the ``X-API-Key``
header over REST, the ``x-api-key`` metadata over gRPC, as the API gateway (:mod:`serving.gateway`)
expects; a model server reached directly ignores it.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from maas_tasks.config import api_key_setting
from maas_tasks.tf_runtime import import_tensorflow
from serving.model_config import ModelServerConfig

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 3
# Codes worth another try: the server is starting, restarting or shedding load (TF Serving's full
# batch queue answers UNAVAILABLE). Anything else is the request's fault or needs a human.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
_BACKOFF_SECONDS = 0.2

_CODE_BY_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",  # a gateway found no replica to answer: as gRPC maps it, worth another try
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ServingClientError(RuntimeError):
    """The model server answered with an error (or could not be asked).

    Attributes:
        code: the gRPC status code name, e.g. ``"NOT_FOUND"`` (for REST, derived from the HTTP status).
        message: the server's own message.
        address: the gRPC target or REST URL that was called.
    """

    def __init__(self, code: str, message: str, address: str) -> None:
        super().__init__(f"model server at {address} answered {code}: {message}")
        self.code = code
        self.message = message
        self.address = address


class ServerUnreachable(ServingClientError):
    """Nothing answered at the address (server down, wrong host/port, or timed out)."""

    def __init__(self, address: str, reason: str) -> None:
        RuntimeError.__init__(
            self,
            f"cannot reach the model server at {address}: {reason}. Is it running "
            "(`maas stack up` starts the local one; or TF Serving) and listening on that address?",
        )
        self.code = "UNAVAILABLE"
        self.message = reason
        self.address = address


def with_retries(call: Callable[[], T], retries: int = DEFAULT_RETRIES, backoff: float = _BACKOFF_SECONDS) -> T:
    """Run ``call``, trying again up to ``retries`` times on a transient failure (server unreachable,
    UNAVAILABLE, RESOURCE_EXHAUSTED) with exponential backoff and jitter; other errors raise at once.

    Raises:
        ServingClientError: the last attempt's error.
    """
    attempt = 0
    while True:
        try:
            return call()
        except ServingClientError as exc:
            if exc.code not in TRANSIENT_CODES or attempt >= retries:
                raise
        attempt += 1
        time.sleep(backoff * 2 ** (attempt - 1) * (0.5 + random.random()))


def _model_path(model: str, version: int | None = None, label: str | None = None) -> str:
    path = f"/v1/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{int(version)}"
    elif label is not None:
        path += f"/labels/{quote(label, safe='')}"
    return path


def _api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else api_key_setting()


def _grpc_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    key = _api_key(api_key)
    return (("x-api-key", key),) if key else None


def _http_json(method: str, url: str, body: dict | None, timeout: float, api_key: str | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    key = _api_key(api_key)
    if key:
        headers["X-API-Key"] = key
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip() or exc.reason
        raise ServingClientError(_CODE_BY_HTTP_STATUS.get(exc.code, "UNKNOWN"), str(message), url) from None
    except urllib.error.URLError as exc:
        raise ServerUnreachable(url, str(exc.reason)) from None
    except (TimeoutError, ConnectionError) as exc:
        raise ServerUnreachable(url, f"{type(exc).__name__}: {exc} (timeout {timeout}s)") from None


def _rows(texts: list[str], scores: list, classes: list, labels: list, version: int | None) -> list[dict]:
    rows = []
    for text, row_scores, row_classes, label in zip(texts, scores, classes, labels, strict=True):
        row_scores = [float(s) for s in row_scores]
        rows.append(
            {
                "text": text,
                "label": label,
                "score": row_scores[row_classes.index(label)],
                "scores": row_scores,
                "classes": list(row_classes),
                "version": version,
            }
        )
    return rows


def predict_rest(
    texts: list[str],
    *,
    model: str,
    rest_url: str,
    version: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    api_key: str | None = None,
) -> list[dict]:
    """Predict over REST (``POST /v1/models/{model}[/versions/{v}]:predict``, row format).

    TF Serving's REST predict response does not say which version answered. With ``version`` set,
    that version answered; otherwise the version reported is the newest AVAILABLE one according to
    ``GET /v1/models/{model}`` right after the prediction, which can be off if a switch happens
    in between. Use :func:`predict_grpc` when the exact version matters.

    Returns:
        One dict per text: text, label, score (probability of label), scores, classes, version.

    Raises:
        ServingClientError: the server rejected the request. ServerUnreachable: no server there.
    """
    texts = list(texts)
    url = rest_url.rstrip("/")
    answer = with_retries(
        lambda: _http_json("POST", f"{url}{_model_path(model, version)}:predict", {"instances": texts}, timeout, api_key),
        retries,
    )
    predictions = answer.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != len(texts):
        raise ServingClientError("INTERNAL", f"unexpected predict response: {json.dumps(answer)[:300]}", url)
    if version is None:
        statuses = get_model_status_rest(model, rest_url=rest_url, timeout=timeout, retries=retries, api_key=api_key)
        available = [s["version"] for s in statuses if s["state"] == "AVAILABLE"]
        version = max(available) if available else None
    return _rows(
        texts,
        [p["scores"] for p in predictions],
        [p["classes"] for p in predictions],
        [p["label"] for p in predictions],
        version,
    )


def _status_rows(statuses: list[dict]) -> list[dict]:
    return [
        {
            "version": int(s["version"]),
            "state": s["state"],
            "error_code": s.get("status", {}).get("error_code", "OK"),
            "error_message": s.get("status", {}).get("error_message", ""),
        }
        for s in statuses
    ]


def get_model_status_rest(
    model: str,
    *,
    rest_url: str,
    version: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    api_key: str | None = None,
) -> list[dict]:
    """Status of a model's versions over REST.

    Returns:
        ``[{version: int, state: "AVAILABLE"|"END"|..., error_code: "OK"|..., error_message: str}]``.

    Raises:
        ServingClientError: e.g. NOT_FOUND for an unknown model. ServerUnreachable: no server there.
    """
    url = rest_url.rstrip("/") + _model_path(model, version)
    answer = with_retries(lambda: _http_json("GET", url, None, timeout, api_key), retries)
    return _status_rows(answer.get("model_version_status", []))


def _grpc_call(target: str, what: str, call, timeout: float):
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:
        code = exc.code()
        details = exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            raise ServerUnreachable(target, details) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ServerUnreachable(target, f"{what} got no answer within {timeout}s ({details})") from None
        raise ServingClientError(code.name, details, target) from None


def predict_grpc(
    texts: list[str],
    *,
    model: str,
    target: str,
    version: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    api_key: str | None = None,
) -> list[dict]:
    """Predict over gRPC (``PredictionService/Predict``, signature ``serving_default``).

    The version reported is the one the server says answered (the response's model_spec).

    Returns:
        One dict per text: text, label, score (probability of label), scores, classes, version.

    Raises:
        ServingClientError: the server rejected the request. ServerUnreachable: no server there.
    """
    import grpc

    tf = import_tensorflow()
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    texts = list(texts)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs["text"].CopyFrom(tf.make_tensor_proto([t.encode("utf-8") for t in texts], dtype=tf.string, shape=[len(texts)]))
    metadata = _grpc_metadata(api_key)
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = with_retries(
            lambda: _grpc_call(
                target, "Predict", lambda: stub.Predict(request, timeout=timeout, metadata=metadata), timeout
            ),
            retries,
        )
    try:
        scores = tf.make_ndarray(response.outputs["scores"]).tolist()
        classes = [[c.decode("utf-8") for c in row] for row in tf.make_ndarray(response.outputs["classes"])]
        labels = [c.decode("utf-8") for c in tf.make_ndarray(response.outputs["label"])]
    except (KeyError, ValueError, TypeError) as exc:
        raise ServingClientError("INTERNAL", f"Predict response lacks the scores/classes/label outputs: {exc}", target) from None
    answered = response.model_spec.version.value if response.model_spec.HasField("version") else None
    return _rows(texts, scores, classes, labels, answered)


def get_model_status_grpc(
    model: str, *, target: str, version: int | None = None, timeout: float = DEFAULT_TIMEOUT,
    api_key: str | None = None,
) -> list[dict]:
    """Status of a model's versions over gRPC (``ModelService/GetModelStatus``).

    Returns:
        Same shape as :func:`get_model_status_rest`.
    """
    import grpc
    from google.protobuf import json_format

    import_tensorflow()  # the tensorflow_serving protos import TensorFlow
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = int(version)
    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        response = _grpc_call(
            target, "GetModelStatus",
            lambda: stub.GetModelStatus(request, timeout=timeout, metadata=_grpc_metadata(api_key)), timeout,
        )
    answer: dict[str, Any] = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _status_rows(answer.get("model_version_status", []))


def reload_config_grpc(target: str, config: ModelServerConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Send ``ModelService/HandleReloadConfigRequest`` with the whole ``config``.

    Raises:
        ServingClientError: the server rejected the config or a new model failed to load.
        ServerUnreachable: no server there.
    """
    import grpc

    import_tensorflow()  # the tensorflow_serving protos import TensorFlow
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(config)
    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        response = _grpc_call(
            target, "HandleReloadConfigRequest", lambda: stub.HandleReloadConfigRequest(request, timeout=timeout), timeout
        )
    if response.status.error_code:
        code = next((c.name for c in grpc.StatusCode if c.value[0] == response.status.error_code), "UNKNOWN")
        raise ServingClientError(code, response.status.error_message, target)
