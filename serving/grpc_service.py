"""TF Serving's gRPC API (``PredictionService``, ``ModelService``) over a :class:`~serving.server.ModelManager`.

The servicers subclass the generated ``tensorflow_serving.apis`` base classes and answer every RPC
of both services: Predict, Classify, Regress, MultiInference and GetModelMetadata (through
:mod:`serving.inference`), GetModelStatus and HandleReloadConfigRequest. Each answered RPC is
counted in the server's metrics. The server listens on TCP, on a Unix socket
(``--grpc_socket_path``), or both, with ``--grpc_channel_arguments`` passed to gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving import inference
from serving.server import ModelManager, ServingError

if TYPE_CHECKING:
    from serving.metrics import ServerMetrics
    from serving.server import FrontEndOptions

_MAX_MESSAGE_BYTES = 2**31 - 1


def _model_and_version(request: Any, response: Any) -> tuple[str, int | None]:
    spec = getattr(request, "model_spec", None)
    if spec is None and getattr(request, "tasks", None):
        spec = request.tasks[0].model_spec
    name = spec.name if spec is not None else ""
    version = None
    if response is not None:
        answered = getattr(response, "model_spec", None)
        if answered is None and getattr(response, "results", None):
            answered = response.results[0].model_spec
        if answered is not None and answered.HasField("version"):
            version = answered.version.value
    return name, version


class _Servicer:
    def __init__(self, manager: ModelManager, metrics: ServerMetrics | None) -> None:
        self._manager = manager
        self._metrics = metrics

    def _answer(self, api: str, handler: Callable[[Any], Any], request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        response, status = None, "OK"
        try:
            response = handler(request)
            return response
        except ServingError as exc:
            status = exc.code.name
            context.abort(exc.code, exc.message)
        finally:
            if self._metrics is not None:
                name, version = _model_and_version(request, response)
                self._metrics.observe_request(name, version, api, "GRPC", status, time.perf_counter() - started)


class PredictionService(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``."""

    def Predict(self, request, context):  # noqa: N802 - the RPC's name
        return self._answer("Predict", lambda r: inference.predict(self._manager, r), request, context)

    def Classify(self, request, context):  # noqa: N802
        return self._answer("Classify", lambda r: inference.classify(self._manager, r), request, context)

    def Regress(self, request, context):  # noqa: N802
        return self._answer("Regress", lambda r: inference.regress(self._manager, r), request, context)

    def MultiInference(self, request, context):  # noqa: N802
        return self._answer("MultiInference", lambda r: inference.multi_inference(self._manager, r), request, context)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._answer("GetModelMetadata", lambda r: inference.get_model_metadata(self._manager, r), request, context)


class ModelService(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus and HandleReloadConfigRequest."""

    def GetModelStatus(self, request, context):  # noqa: N802
        def status(request):
            if not request.HasField("model_spec"):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            version, label = inference.version_choice(request.model_spec)
            return self._manager.get_model_status(request.model_spec.name, version, label)

        return self._answer("GetModelStatus", status, request, context)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        def reload(request):
            if request.config.WhichOneof("config") != "model_config_list":
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                    "Only ModelConfigList is currently supported",
                )
            self._manager.reload_config(request.config)
            response = model_management_pb2.ReloadConfigResponse()
            response.status.error_message = ""
            return response

        return self._answer("HandleReloadConfigRequest", reload, request, context)


def create_grpc_server(
    manager: ModelManager,
    host: str,
    port: int | None,
    options: FrontEndOptions | None = None,
    metrics: ServerMetrics | None = None,
) -> tuple[grpc.Server, int | None]:
    """Create (not start) the gRPC server on ``host:port`` (None: no TCP port) and the options' Unix
    socket; returns it and the bound TCP port.

    Raises:
        OSError: an address cannot be bound (e.g. another server holds the port).
    """
    from serving.server import FrontEndOptions

    options = options or FrontEndOptions()
    server_options = {
        "grpc.max_receive_message_length": _MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": _MAX_MESSAGE_BYTES,
        # Without this a second server silently shares the port instead of failing to bind.
        "grpc.so_reuseport": 0,
    }
    server_options.update(dict(options.grpc_channel_arguments))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="model-server-grpc"),
        options=list(server_options.items()),
        # Beyond this many RPCs in progress or queued, gRPC answers RESOURCE_EXHAUSTED at once instead
        # of queueing without bound.
        maximum_concurrent_rpcs=options.rest_max_pending,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager, metrics), server)
    addresses = []
    if port is not None:
        addresses.append((f"{host}:{port}", "choose another --port"))
    if options.grpc_socket_path:
        addresses.append((f"unix:{options.grpc_socket_path}", "remove the stale socket or choose another --grpc_socket_path"))
    bound_port = None
    for address, fix in addresses:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        else:
            reason = "grpc returned port 0"
        if not bound:
            server.stop(None)
            raise OSError(f"cannot listen for gRPC on {address} ({reason}): is another server using it? {fix}")
        if not address.startswith("unix:"):
            bound_port = bound
    return server, bound_port
