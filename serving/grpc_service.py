"""TF Serving's gRPC API (``PredictionService``, ``ModelService``) over a :class:`~serving.server.ModelManager`.

The servicers subclass the generated ``tensorflow_serving.apis`` base classes and answer every RPC
of both services: Predict, Classify, Regress, MultiInference and GetModelMetadata (through
:mod:`serving.inference`), GetModelStatus and HandleReloadConfigRequest. They run on ``grpc.aio``
in the event loop the REST server shares (:mod:`serving.loop`): a batched Predict waits for its batch
without holding a thread; everything that blocks (unbatched runs, Classify/Regress, reloads that load
models) runs in a bounded thread pool (``--grpc_max_threads``). Each answered RPC is counted in the
server's metrics. The server listens on TCP, on a Unix socket (``--grpc_socket_path``), or both, with
``--grpc_channel_arguments`` passed to gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
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
    from serving.loop import LoopThread
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
    def __init__(self, manager: ModelManager, metrics: ServerMetrics | None, pool: ThreadPoolExecutor) -> None:
        self._manager = manager
        self._metrics = metrics
        self._pool = pool

    async def _in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def _answer(
        self, api: str, handler: Callable[[Any], Awaitable[Any]], request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        started = time.perf_counter()
        response, status = None, "OK"
        try:
            response = await handler(request)
            return response
        except ServingError as exc:
            status = exc.code.name
            await context.abort(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug must still answer with a status, not a hang
            if isinstance(exc, grpc.aio.AbortError):
                raise
            status = grpc.StatusCode.INTERNAL.name
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if self._metrics is not None:
                name, version = _model_and_version(request, response)
                self._metrics.observe_request(name, version, api, "GRPC", status, time.perf_counter() - started)


class PredictionService(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``."""

    async def Predict(self, request, context):  # noqa: N802 - the RPC's name
        return await self._answer("Predict", self._predict, request, context)

    async def _predict(self, request):
        servable = inference.servable_for(self._manager, request.model_spec if request.HasField("model_spec") else None)
        signature, values, aliases = inference.prepare_predict(servable, request)
        future = signature.submit(values, aliases, loop=asyncio.get_running_loop())
        if future is None:
            outputs = await self._in_pool(signature.run_session, values, aliases)
        else:
            outputs = await future
        return inference.predict_response(request, servable, signature, outputs)

    async def Classify(self, request, context):  # noqa: N802
        return await self._answer("Classify", lambda r: self._in_pool(inference.classify, self._manager, r), request, context)

    async def Regress(self, request, context):  # noqa: N802
        return await self._answer("Regress", lambda r: self._in_pool(inference.regress, self._manager, r), request, context)

    async def MultiInference(self, request, context):  # noqa: N802
        return await self._answer(
            "MultiInference", lambda r: self._in_pool(inference.multi_inference, self._manager, r), request, context
        )

    async def GetModelMetadata(self, request, context):  # noqa: N802
        return await self._answer(
            "GetModelMetadata", lambda r: self._in_pool(inference.get_model_metadata, self._manager, r), request, context
        )


class ModelService(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus and HandleReloadConfigRequest."""

    async def GetModelStatus(self, request, context):  # noqa: N802
        def status(request):
            if not request.HasField("model_spec"):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            version, label = inference.version_choice(request.model_spec)
            return self._manager.get_model_status(request.model_spec.name, version, label)

        return await self._answer("GetModelStatus", lambda r: self._in_pool(status, r), request, context)

    async def HandleReloadConfigRequest(self, request, context):  # noqa: N802
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

        return await self._answer("HandleReloadConfigRequest", lambda r: self._in_pool(reload, r), request, context)


class GrpcServer:
    """The gRPC front end on the shared event loop; :attr:`port` is the bound TCP port (None: no TCP)."""

    def __init__(
        self,
        manager: ModelManager,
        host: str,
        port: int | None,
        options: FrontEndOptions,
        metrics: ServerMetrics | None,
        loop_thread: LoopThread,
    ) -> None:
        self._manager = manager
        self._host = host
        self.port = port
        self._options = options
        self._metrics = metrics
        self._loop_thread = loop_thread
        self._pool = ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="model-server-grpc")
        self._server: grpc.aio.Server | None = None

    def start(self) -> None:
        """Bind every address and start serving.

        Raises:
            OSError: an address cannot be bound (e.g. another server holds the port).
        """
        self.port = self._loop_thread.run(self._start())

    async def _start(self) -> int | None:
        server_options = {
            "grpc.max_receive_message_length": _MAX_MESSAGE_BYTES,
            "grpc.max_send_message_length": _MAX_MESSAGE_BYTES,
            # Without this a second server silently shares the port instead of failing to bind.
            "grpc.so_reuseport": 0,
        }
        server_options.update(dict(self._options.grpc_channel_arguments))
        server = grpc.aio.server(
            options=list(server_options.items()),
            # Beyond this many RPCs in progress, gRPC answers RESOURCE_EXHAUSTED at once instead of
            # queueing without bound.
            maximum_concurrent_rpcs=self._options.rest_max_pending,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self._manager, self._metrics, self._pool), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self._manager, self._metrics, self._pool), server
        )
        addresses = []
        if self.port is not None:
            addresses.append((f"{self._host}:{self.port}", "choose another --port"))
        if self._options.grpc_socket_path:
            addresses.append(
                (f"unix:{self._options.grpc_socket_path}", "remove the stale socket or choose another --grpc_socket_path")
            )
        bound_port = None
        for address, fix in addresses:
            try:
                bound = server.add_insecure_port(address)
            except RuntimeError as exc:
                bound, reason = 0, str(exc)
            else:
                reason = "grpc returned port 0"
            if not bound:
                await server.stop(None)
                raise OSError(f"cannot listen for gRPC on {address} ({reason}): is another server using it? {fix}")
            if not address.startswith("unix:"):
                bound_port = bound
        await server.start()
        self._server = server
        return bound_port

    def stop(self, grace: float = 2.0) -> None:
        """Stop taking RPCs, let those in flight finish for up to ``grace`` seconds."""
        if self._server is not None:
            server, self._server = self._server, None
            try:
                self._loop_thread.run(server.stop(grace), timeout=grace + 5)
            except Exception:  # noqa: BLE001 - stopping goes on
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
