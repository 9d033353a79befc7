"""TF Serving's gRPC API (``PredictionService``, ``ModelService``) over a :class:`~serving.server.ModelManager`.

The servicers subclass the generated ``tensorflow_serving.apis`` base classes. Predict,
GetModelStatus and HandleReloadConfigRequest are served; Classify, Regress, MultiInference and
GetModelMetadata answer UNIMPLEMENTED with a clear message.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.server import ModelManager, ServingError

_MAX_MESSAGE_BYTES = 2**31 - 1
_WORKERS = 8


def _version_choice(model_spec) -> tuple[int | None, str | None]:
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        return model_spec.version.value, None
    if choice == "version_label":
        return None, model_spec.version_label
    return None, None


def predict(manager: ModelManager, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Answer a ``PredictRequest``; the response's model_spec names the version that answered.

    Raises:
        ServingError: the model/version/signature is unknown or the inputs do not fit the signature.
    """
    spec = request.model_spec
    version, label = _version_choice(spec)
    servable = manager.get_servable(spec.name, version, label)
    signature = servable.signature(spec.signature_name)
    inputs = {}
    for name, proto in request.inputs.items():
        try:
            inputs[name] = tf.make_ndarray(proto)
        except (TypeError, ValueError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r} is not a valid TensorProto: {exc}") from None
    outputs = signature.run(inputs, list(request.output_filter))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = spec.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature.name
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict for now."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def Predict(self, request, context):  # noqa: N802 - the RPC's name
        try:
            return predict(self._manager, request)
        except ServingError as exc:
            context.abort(exc.code, exc.message)

    def Classify(self, request, context):  # noqa: N802
        _abort_unimplemented("Classify", context)

    def Regress(self, request, context):  # noqa: N802
        _abort_unimplemented("Regress", context)

    def MultiInference(self, request, context):  # noqa: N802
        _abort_unimplemented("MultiInference", context)

    def GetModelMetadata(self, request, context):  # noqa: N802
        _abort_unimplemented("GetModelMetadata", context)


def _abort_unimplemented(method: str, context: grpc.ServicerContext) -> None:
    # Explicit, so the client gets a clear message and the server logs no traceback.
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"PredictionService/{method} is not implemented by this model server")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def GetModelStatus(self, request, context):  # noqa: N802
        try:
            if not request.HasField("model_spec"):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            version, label = _version_choice(request.model_spec)
            return self._manager.get_model_status(request.model_spec.name, version, label)
        except ServingError as exc:
            context.abort(exc.code, exc.message)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        try:
            self._manager.reload_config(request.config)
        except ServingError as exc:
            context.abort(exc.code, exc.message)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_message = ""
        return response


def create_grpc_server(manager: ModelManager, host: str, port: int) -> tuple[grpc.Server, int]:
    """Create (not start) the gRPC server on ``host:port``; returns it and the bound port.

    Raises:
        OSError: the address cannot be bound (e.g. another server holds the port).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="model-server-grpc"),
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            # Without this a second server silently shares the port instead of failing to bind.
            ("grpc.so_reuseport", 0),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        bound, reason = 0, str(exc)
    else:
        reason = "grpc returned port 0"
    if not bound:
        server.stop(None)
        raise OSError(f"cannot listen for gRPC on {address} ({reason}): is another server using it? choose another --port")
    return server, bound
