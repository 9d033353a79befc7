"""Config reloads (``HandleReloadConfigRequest``) and the file-system poll: TF Serving's cases from
server_core_test.cc, model_service_impl.cc and tensorflow_model_server_test.py.

A reload replaces the whole model list: it returns once every model new to the server is available,
unloads the models it no longer lists (their versions stay in the status, in state END), and is refused
without effect when the config is invalid. Between reloads the server polls each model's base path
(``--file_system_poll_wait_seconds``) and follows its version directories. Every test here restores the
start-up config and uses model names of its own.
"""

from __future__ import annotations

import posixpath
import shutil

import grpc
import pytest
from tensorflow.core.framework import types_pb2

from tests.serving.conformance.api import (
    RPC_TIMEOUT_SECONDS,
    expect_rpc_error,
    get_version_states,
    make_predict_request,
    make_tensor,
    wait_until,
)
from tests.serving.conformance.models import (
    BROKEN,
    HALF_PLUS_N,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_VERSION,
    POLLED,
    ModelServerConfig,
    make_model_entry,
)

pytestmark = pytest.mark.integration

UNLOAD_TIMEOUT_SECONDS = 30.0
POLL_TIMEOUT_SECONDS = 30.0


def _config_with(base, *entries) -> ModelServerConfig:
    config = ModelServerConfig()
    config.CopyFrom(base)
    config.model_config_list.config.extend(entries)
    return config


def _entry(server, name: str, directory: str, platform: str = "tensorflow"):
    entry = make_model_entry(name, posixpath.join(server.base_path_prefix, directory))
    entry.model_platform = platform
    return entry


def _predict(stubs, model: str, version: int | None = None):
    request = make_predict_request(model, {"x": make_tensor([2.0], types_pb2.DT_FLOAT, [1])}, version=version)
    return stubs.prediction.Predict(request, timeout=RPC_TIMEOUT_SECONDS)


def _states(stubs, model: str) -> dict[int, str]:
    return {version: state for version, (state, _, _) in get_version_states(stubs, model).items()}


def test_reloading_the_running_config_changes_nothing(server, stubs, reload_config):
    response = reload_config(server.config)
    assert response.status.error_code == 0 and response.status.error_message == ""
    assert _states(stubs, HALF_PLUS_TWO) == {HALF_PLUS_TWO_VERSION: "AVAILABLE"}


def test_added_model_serves_when_the_reload_returns(server, stubs, reload_config):
    response = reload_config(_config_with(server.config, _entry(server, "reload_added", HALF_PLUS_TWO)))
    assert response.status.error_code == 0
    answer = _predict(stubs, "reload_added")
    assert answer.model_spec.version.value == HALF_PLUS_TWO_VERSION and list(answer.outputs["y"].float_val) == [3.0]
    assert _states(stubs, "reload_added") == {HALF_PLUS_TWO_VERSION: "AVAILABLE"}


def test_model_left_out_of_a_reload_is_unloaded_to_end(server, stubs, reload_config):
    reload_config(_config_with(server.config, _entry(server, "reload_removed", HALF_PLUS_TWO)))
    reload_config(server.config)
    # Unloading finishes after the reload returns.
    wait_until(
        lambda: _states(stubs, "reload_removed") == {HALF_PLUS_TWO_VERSION: "END"},
        UNLOAD_TIMEOUT_SECONDS,
        "reload_removed's version is in state END",
    )
    ((_, error_code, _),) = get_version_states(stubs, "reload_removed").values()
    assert error_code == 0
    with expect_rpc_error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(reload_removed)"):
        _predict(stubs, "reload_removed")


def test_unloaded_model_can_be_loaded_again(server, stubs, reload_config):
    with_model = _config_with(server.config, _entry(server, "reload_again", HALF_PLUS_TWO))
    reload_config(with_model)
    reload_config(server.config)
    wait_until(
        lambda: _states(stubs, "reload_again") == {HALF_PLUS_TWO_VERSION: "END"},
        UNLOAD_TIMEOUT_SECONDS,
        "reload_again's version is in state END",
    )
    reload_config(with_model)
    assert _predict(stubs, "reload_again").model_spec.version.value == HALF_PLUS_TWO_VERSION


def test_reload_can_move_a_model_to_another_base_path(server, stubs, reload_config):
    reload_config(_config_with(server.config, _entry(server, "reload_moved", HALF_PLUS_TWO)))
    reload_config(_config_with(server.config, _entry(server, "reload_moved", HALF_PLUS_N)))
    # The new base path's versions replace the old ones once the source has seen them.
    wait_until(
        lambda: _states(stubs, "reload_moved") == {3: "AVAILABLE", HALF_PLUS_TWO_VERSION: "END"},
        POLL_TIMEOUT_SECONDS,
        "reload_moved serves version 3 of half_plus_n and version 123 has ended",
    )
    assert _predict(stubs, "reload_moved").model_spec.version.value == 3


def test_reload_with_a_model_that_fails_to_load_fails(server, stubs, reload_config):
    with expect_rpc_error(grpc.StatusCode.UNKNOWN, "1 model(s) did not become available"):
        reload_config(_config_with(server.config, _entry(server, BROKEN, BROKEN)))
    ((state, error_code, message),) = get_version_states(stubs, BROKEN).values()
    assert state == "END" and error_code != 0 and message


def _duplicate(server) -> ModelServerConfig:
    return _config_with(server.config, _entry(server, HALF_PLUS_TWO, HALF_PLUS_TWO))


def _relative(server) -> ModelServerConfig:
    return _config_with(server.config, make_model_entry("relative_path", HALF_PLUS_TWO))


def _platform_changed(server) -> ModelServerConfig:
    config = _config_with(server.config)
    config.model_config_list.config[0].model_platform = "other_platform"
    return config


def _unknown_platform(server) -> ModelServerConfig:
    return _config_with(server.config, _entry(server, "unknown_platform", HALF_PLUS_TWO, platform="other_platform"))


@pytest.mark.parametrize(
    ("make_config", "message"),
    [
        (lambda server: ModelServerConfig(), "Only ModelConfigList is currently supported"),
        (_duplicate, f"Illegal to list model {HALF_PLUS_TWO} multiple times in config list"),
        (_relative, "Expected model relative_path to have an absolute path or URI; got base_path()=half_plus_two"),
        (_platform_changed, f"Illegal to change a model's platform. For model {HALF_PLUS_TWO} platform was tensorflow"),
        (_unknown_platform, "Model unknown_platform requests unsupported platform other_platform"),
    ],
    ids=["not-a-model-list", "duplicate-name", "relative-path", "platform-changed", "unknown-platform"],
)  # fmt: skip
def test_invalid_reload_is_refused_and_the_models_keep_serving(server, stubs, reload_config, make_config, message):
    with expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, message):
        reload_config(make_config(server))
    assert _predict(stubs, HALF_PLUS_TWO).model_spec.version.value == HALF_PLUS_TWO_VERSION


@pytest.fixture
def polled_dir(server):
    """``polled``'s base path in the suite's view; versions other than 1 are removed afterwards."""
    base = server.models_dir / POLLED
    yield base
    for entry in base.iterdir():
        if entry.name != "1":
            shutil.rmtree(entry)


def _publish_version(base, version: int, source) -> None:
    # Copy under a name the server ignores, then rename: it never sees a half-written version.
    staging = base / f".staging-{version}"
    shutil.copytree(source, staging)
    staging.rename(base / str(version))


def _polled_states_are(stubs, expected: dict[int, str]):
    # Only the versions this test touches: a server tested before may remember older ones in END.
    return lambda: {version: _states(stubs, POLLED).get(version) for version in expected} == expected


def test_new_version_directory_is_served_and_a_removed_one_ends(server, stubs, polled_dir):
    assert _states(stubs, POLLED)[1] == "AVAILABLE"
    _publish_version(polled_dir, 2, server.models_dir / HALF_PLUS_N / "2")
    wait_until(
        _polled_states_are(stubs, {2: "AVAILABLE", 1: "END"}),
        POLL_TIMEOUT_SECONDS,
        "the poll serves the new version 2 and unloads version 1",
    )
    answer = _predict(stubs, POLLED)
    assert answer.model_spec.version.value == 2 and list(answer.outputs["y"].float_val) == [3.0]

    shutil.rmtree(polled_dir / "2")
    wait_until(
        _polled_states_are(stubs, {1: "AVAILABLE", 2: "END"}),
        POLL_TIMEOUT_SECONDS,
        "the poll unloads the removed version 2 and serves version 1 again",
    )
    assert _predict(stubs, POLLED).model_spec.version.value == 1
