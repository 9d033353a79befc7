"""The server under test: the embedded model server started as a subprocess, or one named by settings.

By default the session builds the test models in a temporary directory and starts
``python -m serving.server`` on free loopback ports with tensorflow_model_server's flags. Setting all of
``MAAS_CONFORMANCE_GRPC`` (``host:port``), ``MAAS_CONFORMANCE_REST`` (``http://host:port``) and
``MAAS_CONFORMANCE_MODELS`` (the directory ``python -m tests.serving.conformance.models`` wrote, which the
server was started from) runs the suite against that server instead; ``MAAS_CONFORMANCE_GRPC_SOCKET`` adds
the server's gRPC Unix socket, if it has one the tests can reach.

Every test ends by checking that the server still answers, so a request that breaks the server fails the
test that sent it. Tests that change the server's config restore the config the server started with.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from tests.serving.conformance import models
from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    STATE_NAMES,
    ServerUnderTest,
    Stubs,
    make_predict_request,
    make_tensor,
    post_json,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_SECONDS = 120.0
REMOTE_READY_TIMEOUT_SECONDS = 30.0
_SETTLED_STATES = {"AVAILABLE", "END"}
_SETTINGS = ("MAAS_CONFORMANCE_GRPC", "MAAS_CONFORMANCE_REST", "MAAS_CONFORMANCE_MODELS")


def _find_free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read_states(stub: model_service_pb2_grpc.ModelServiceStub, model: str) -> set[str] | None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    try:
        response = stub.GetModelStatus(request, timeout=2.0)
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND):
            return None
        raise
    return {STATE_NAMES[status.state] for status in response.model_version_status}


def _wait_for_models(
    target: str, config, timeout: float, describe_failure: Callable[[str], str], exited: Callable[[], bool]
) -> None:
    """Wait until every configured model has settled: loaded (AVAILABLE) or failed to load (END).

    A model that failed is not fatal here: its own tests fail, and ``test_every_configured_model_is_available``
    reports why, while the other models' tests still run.
    """
    names = [model.name for model in config.model_config_list.config]
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        while True:
            if exited():
                raise RuntimeError(describe_failure("the model server exited during start-up"))
            states = {name: _read_states(stub, name) for name in names}
            if all(found and found <= _SETTLED_STATES for found in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    describe_failure(f"models not loaded after {timeout:.0f} s; version states: {states}")
                )
            time.sleep(0.2)


def _start_embedded_server(work_dir: Path) -> Iterator[ServerUnderTest]:
    models_dir = work_dir / "models"
    config = models.write_conformance_files(models_dir)
    grpc_port, rest_port = _find_free_port(), _find_free_port()
    grpc_socket = work_dir / "grpc.sock"
    log_path = work_dir / "server.log"
    command = [
        sys.executable, "-m", "serving.server",
        "--port", str(grpc_port),
        "--rest_api_port", str(rest_port),
        "--model_config_file", str(models_dir / models.MODEL_CONFIG_FILE),
        "--file_system_poll_wait_seconds", "1",
        "--monitoring_config_file", str(models_dir / models.MONITORING_CONFIG_FILE),
        "--grpc_socket_path", str(grpc_socket),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )

    def describe_failure(problem: str) -> str:
        return (
            f"{problem}\ncommand: {' '.join(command)}\n--- server log ({log_path}) ---\n{log_path.read_text()[-8000:]}"
        )

    target = f"127.0.0.1:{grpc_port}"
    try:
        _wait_for_models(target, config, STARTUP_TIMEOUT_SECONDS, describe_failure, lambda: process.poll() is not None)
        yield ServerUnderTest(
            grpc_target=target,
            rest_url=f"http://127.0.0.1:{rest_port}",
            models_dir=models_dir,
            base_path_prefix=models_dir.as_posix(),
            config=config,
            grpc_socket=str(grpc_socket),
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _connect_to_configured_server() -> ServerUnderTest:
    missing = [name for name in _SETTINGS if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"set all of {', '.join(_SETTINGS)} to test another server; missing: {', '.join(missing)}")
    models_dir = Path(os.environ["MAAS_CONFORMANCE_MODELS"])
    config = models.read_model_config(models_dir / models.MODEL_CONFIG_FILE)
    server = ServerUnderTest(
        grpc_target=os.environ["MAAS_CONFORMANCE_GRPC"],
        rest_url=os.environ["MAAS_CONFORMANCE_REST"].rstrip("/"),
        models_dir=models_dir,
        base_path_prefix=models.find_base_path_prefix(config),
        config=config,
        grpc_socket=os.environ.get("MAAS_CONFORMANCE_GRPC_SOCKET") or None,
    )

    def describe_failure(problem: str) -> str:
        return f"{problem} (server at {server.grpc_target}, models in {models_dir})"

    _wait_for_models(server.grpc_target, config, REMOTE_READY_TIMEOUT_SECONDS, describe_failure, lambda: False)
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerUnderTest]:
    """The model server under test, with every configured test model settled."""
    if any(os.environ.get(name) for name in _SETTINGS):
        yield _connect_to_configured_server()
    else:
        yield from _start_embedded_server(tmp_path_factory.mktemp("conformance"))


@pytest.fixture(scope="session")
def stubs(server) -> Iterator[Stubs]:
    """gRPC stubs of the server under test."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield Stubs(
            prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)
        )


@pytest.fixture(scope="session")
def models_url(server) -> str:
    """``http://host:port/v1/models`` of the server under test."""
    return f"{server.rest_url}/v1/models"


@pytest.fixture(autouse=True)
def still_serving(server, stubs, models_url) -> Iterator[None]:
    """After each test, the server must still answer a good request over both protocols."""
    yield
    request = make_predict_request(models.SENTIMENT, {"text": make_tensor([b"good"], types_pb2.DT_STRING, [1])})
    response = stubs.prediction.Predict(request, timeout=RPC_TIMEOUT_SECONDS)
    assert response.outputs["label"].string_val == [b"positive"], "the server no longer serves over gRPC"
    reply = post_json(f"{models_url}/{models.SENTIMENT}:predict", {"instances": ["good"]})
    assert reply.status == 200 and reply.json["predictions"][0]["label"] == "positive", (
        f"the server no longer serves over REST: {reply.status} {reply.text}"
    )


@pytest.fixture
def reload_config(server, stubs) -> Iterator[Callable]:
    """``reload(config)`` sends HandleReloadConfigRequest; the server's start-up config is restored afterwards."""
    sent = []

    def reload(config) -> model_management_pb2.ReloadConfigResponse:
        sent.append(config)
        return stubs.model.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=RPC_TIMEOUT_SECONDS
        )

    yield reload
    if sent:
        stubs.model.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=server.config), timeout=RPC_TIMEOUT_SECONDS
        )
