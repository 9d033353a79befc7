"""The embedded model server: TF Serving's model management behind its REST and gRPC APIs.

TF Serving's binary and Docker image are not available everywhere MaaS runs, so this module
mirrors the parts of ``tensorflow_model_server`` that MaaS relies on, with the same flags, config
file, version directories, API shapes and error messages, so the promotion code and the clients
work unchanged against either server:

- Each model's versions are the numeric subdirectories of its ``base_path``; the
  ``model_version_policy`` (``latest``, default 1; ``all``; ``specific``) picks which are served,
  and ``version_labels`` name versions. The file system is polled every
  ``--file_system_poll_wait_seconds``.
- Versions are loaded with ``tf.saved_model.load``; one that fails ends in state END with the
  error in its status and is not retried while it stays aspired (as TF Serving does).
- Switching versions is availability-preserving: new versions load before old ones unload, and an
  old version stays up while no aspired version is available (e.g. the new one failed to load).
- ``HandleReloadConfigRequest`` applies a new ``ModelServerConfig`` in memory (nothing is
  rewritten on disk) and fails only when a model new to the server has no available version.
- Unlike ``tensorflow_model_server``, the server starts even when a configured version fails to load:
  that version ends in END with its error and the other models serve, so the node's agent
  (:mod:`serving.sync`) can repair it from the object store.

Differences: labels are checked after the versions load (TF Serving checks them before, which
makes labelling a version in the same reload fail), and the REST status of ``/labels/{label}``
reports the labelled version (TF Serving ignores the label there).

The API surfaces live in :mod:`serving.rest` and :mod:`serving.grpc_service`; both call
:class:`ModelManager`. Run ``python -m serving.server --help``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2

from maas_tasks.config import DEFAULT_GRPC_PORT, DEFAULT_MODEL_NAME, DEFAULT_REST_PORT
from serving.model_config import (
    TENSORFLOW_PLATFORM,
    ModelConfig,
    ModelConfigError,
    ModelServerConfig,
    read_model_config,
    single_model_config,
)

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
VersionStatus = get_model_status_pb2.ModelVersionStatus
AVAILABLE = VersionStatus.AVAILABLE
LOADING = VersionStatus.LOADING
END = VersionStatus.END

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_VERSION_DIR = re.compile(r"\d+")


class ServingError(Exception):
    """A request failed with a TF Serving status: a gRPC code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The gRPC code for a TensorFlow/absl error number (both use the same numbering)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


@dataclass
class Signature:
    """One signature of a loaded SavedModel: its function, input specs and output names."""

    name: str
    function: Any
    inputs: dict[str, tf.TensorSpec]
    outputs: list[str]

    def run(self, inputs: dict[str, Any], output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the signature on named input values and return the requested outputs as arrays.

        Raises:
            ServingError: INVALID_ARGUMENT for missing/extra inputs, wrong dtypes or shapes, or an
                unknown/duplicate output in ``output_filter``; the TF error's code if the run fails.
        """
        sent, expected = set(inputs), set(self.inputs)
        if sent != expected:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        wanted = self._check_output_filter(output_filter or [])
        tensors = {name: self._input_tensor(name, value) for name, value in inputs.items()}
        try:
            results = self.function(**tensors)
        except tf.errors.OpError as exc:
            raise ServingError(status_code_from_number(exc.error_code), exc.message) from None
        except (TypeError, ValueError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"signature {self.name!r} rejected the inputs: {exc}") from None
        return {name: results[name].numpy() for name in wanted}

    def _check_output_filter(self, output_filter: list[str]) -> list[str]:
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in self.outputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(self.outputs)}}}.",
                )
            if alias in seen:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return list(output_filter) or list(self.outputs)

    def _input_tensor(self, name: str, value: Any) -> tf.Tensor:
        spec = self.inputs[name]
        try:
            tensor = tf.convert_to_tensor(value, dtype=spec.dtype)
        except (TypeError, ValueError, tf.errors.OpError) as exc:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} cannot be converted to {spec.dtype.name}, as signature {self.name!r} expects: {exc}",
            ) from None
        if not spec.shape.is_compatible_with(tensor.shape):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} has shape {tensor.shape.as_list()}, "
                f"but signature {self.name!r} expects {spec.shape.as_list()} (None = any size)",
            )
        return tensor


@dataclass
class Servable:
    """A loaded model version."""

    name: str
    version: int
    path: Path
    signatures: dict[str, Signature]
    loaded: Any = field(repr=False)  # keeps the SavedModel's variables alive

    def signature(self, name: str) -> Signature:
        """The signature called ``name`` (empty means ``serving_default``).

        Raises:
            ServingError: FAILED_PRECONDITION when the SavedModel has no such signature.
        """
        try:
            return self.signatures[name or DEFAULT_SIGNATURE]
        except KeyError:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name or DEFAULT_SIGNATURE}" not found.'
            ) from None


WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


def load_servable(name: str, version: int, path: Path) -> Servable:
    """Load the SavedModel in ``path`` as version ``version`` of model ``name``, then replay its warm-up
    requests (``assets.extra/tf_serving_warmup_requests``), as TF Serving does before a version serves."""
    loaded = tf.saved_model.load(str(path))
    signatures = {}
    for key, function in loaded.signatures.items():
        _, input_specs = function.structured_input_signature
        signatures[key] = Signature(key, function, dict(input_specs), sorted(function.structured_outputs))
    servable = Servable(name, version, Path(path), signatures, loaded)
    replay_warmup(servable, Path(path) / WARMUP_FILE)
    return servable


def replay_warmup(servable: Servable, warmup: Path) -> int:
    """Run the Predict requests of a warm-up file through ``servable``; returns how many ran.

    Raises:
        ServingError: a record cannot be parsed or its request fails (the version then does not load, as
            in TF Serving). Records of other request kinds (classify, regress, ...) are skipped.
    """
    if not warmup.is_file():
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    replayed = 0
    try:
        for raw in tf.data.TFRecordDataset(str(warmup)).as_numpy_iterator():
            record = prediction_log_pb2.PredictionLog.FromString(raw)
            if record.WhichOneof("log_type") != "predict_log":
                continue
            request = record.predict_log.request
            signature = servable.signature(request.model_spec.signature_name or None)
            signature.function(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
            replayed += 1
    except ServingError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken warm-up file fails the load with its reason
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, f"Warm-up of {warmup} failed: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("Finished reading warmup data for model at %s. Number of warmup records read: %d.", warmup.parent.parent, replayed)
    return replayed


@dataclass
class _Version:
    path: Path
    state: int
    error_code: int = 0
    error_message: str = ""
    servable: Servable | None = None
    # A failed version is retried only after it stopped being aspired and came back, as in TF Serving.
    may_retry: bool = False


@dataclass
class _Model:
    config: ModelConfig
    versions: dict[int, _Version] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    warned: str = ""


def _validate_config(config: ModelServerConfig) -> None:
    kind = config.WhichOneof("config")
    if kind not in (None, "model_config_list"):
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported",
        )
    names: set[str] = set()
    for entry in config.model_config_list.config:
        if not entry.name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"a model config entry has no name: {entry}")
        if entry.name in names:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Illegal to list model {entry.name} multiple times in config list"
            )
        names.add(entry.name)
        if entry.model_platform not in ("", TENSORFLOW_PLATFORM):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Model {entry.name} requests unsupported platform {entry.model_platform}",
            )
        if "://" in entry.base_path:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Model {entry.name} has base_path {entry.base_path}, which this server cannot read: "
                "copy the versions to a local directory (serving.sync does) and point base_path there",
            )
        if not os.path.isabs(entry.base_path):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expected model {entry.name} to have an absolute path or URI; got base_path()={entry.base_path}",
            )


def _load_error(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, tf.errors.OpError):
        return exc.error_code, exc.message
    if isinstance(exc, (FileNotFoundError, OSError)):
        return grpc.StatusCode.NOT_FOUND.value[0], str(exc)
    return grpc.StatusCode.UNKNOWN.value[0], f"{type(exc).__name__}: {exc}"


class ModelManager:
    """Tracks the configured models and their versions; loads, unloads and hands out servables.

    Thread-safe: requests read under a short lock, while loading happens outside it, one
    reconciliation (poll or reload) at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reconcile_lock = threading.Lock()
        self._config = ModelServerConfig()
        self._models: dict[str, _Model] = {}

    @property
    def config(self) -> ModelServerConfig:
        """A copy of the config in force."""
        with self._lock:
            config = ModelServerConfig()
            config.CopyFrom(self._config)
            return config

    def reload_config(self, config: ModelServerConfig) -> None:
        """Apply ``config``: load new models and versions, unload removed ones.

        Returns once every configured model has been reconciled with the file system.

        Raises:
            ServingError: INVALID_ARGUMENT for an unusable config (nothing is changed);
                FAILED_PRECONDITION when a version label names a version that is not available;
                UNKNOWN when a model new to the server has no available version.
        """
        _validate_config(config)
        if config.WhichOneof("config") is None:
            log.info("Taking no action for empty config.")
            return
        entries = {entry.name: entry for entry in config.model_config_list.config}
        with self._reconcile_lock:
            with self._lock:
                new_models = [name for name in entries if name not in self._models]
                for name in [name for name in self._models if name not in entries]:
                    log.info("Unloading all versions of model %s: it is no longer in the config", name)
                    del self._models[name]
                for name, entry in entries.items():
                    model = self._models.setdefault(name, _Model(ModelConfig()))
                    model.config.CopyFrom(entry)
                self._config.CopyFrom(config)
            for name in entries:
                log.info("(Re-)adding model: %s", name)
                self._reconcile_model(name)
            self._apply_labels(entries)
        self._check_available(new_models)

    def poll_once(self) -> None:
        """Look at every model's base path once and load/unload versions to match."""
        with self._reconcile_lock:
            with self._lock:
                names = list(self._models)
            for name in names:
                self._reconcile_model(name)

    def get_servable(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable answering a request for ``name`` (latest available, or the given version/label).

        Raises:
            ServingError: INVALID_ARGUMENT for no name, both version and label, or an unknown label;
                NOT_FOUND when no such version is available.
        """
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        with self._lock:
            model = self._models.get(name)
            version = self._resolve_label(name, model, version, label)
            if version is not None:
                entry = model.versions.get(version) if model else None
                if entry is None or entry.servable is None:
                    raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})")
                return entry.servable
            available = [v for v, entry in model.versions.items() if entry.servable is not None] if model else []
            if not available:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
            return model.versions[max(available)].servable

    def get_model_status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """Status of every tracked version of ``name`` (newest first), or of one version.

        Raises:
            ServingError: NOT_FOUND when the model or version is not tracked; INVALID_ARGUMENT for
                an unknown label.
        """
        response = get_model_status_pb2.GetModelStatusResponse()
        with self._lock:
            model = self._models.get(name)
            version = self._resolve_label(name, model, version, label)
            versions = model.versions if model else {}
            if version is not None:
                if version not in versions:
                    raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
                chosen = [version]
            else:
                if not versions:
                    raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
                chosen = sorted(versions, reverse=True)
            for v in chosen:
                entry = versions[v]
                status = response.model_version_status.add()
                status.version = v
                status.state = entry.state
                status.status.error_code = entry.error_code
                status.status.error_message = entry.error_message
        return response

    def stop(self) -> None:
        """Drop every loaded version."""
        with self._reconcile_lock, self._lock:
            self._models.clear()

    @staticmethod
    def _resolve_label(name: str, model: _Model | None, version: int | None, label: str | None) -> int | None:
        if label is None:
            return version
        if version is not None:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Both model version ({version}) and model version label ({label}) cannot be supplied.",
            )
        if model is None or label not in model.labels:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
        return model.labels[label]

    def _aspired_versions(self, model: _Model) -> dict[int, Path]:
        entry = model.config
        base = Path(entry.base_path)
        try:
            found = {int(p.name): p for p in base.iterdir() if _VERSION_DIR.fullmatch(p.name) and p.is_dir()}
        except OSError as exc:
            self._warn_once(model, f"Could not find base path {base} for servable {entry.name} with error {exc}")
            return {}
        policy = entry.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        problem = ""
        if choice == "all":
            aspired = found
        elif choice == "specific":
            wanted = set(policy.specific.versions)
            aspired = {v: p for v, p in found.items() if v in wanted}
            if wanted - set(found):
                problem = (
                    f"Versions {sorted(wanted - set(found))} of servable {entry.name}, requested as 'specific' "
                    f"versions in its version policy, were not found in {base}"
                )
        else:
            keep = sorted(found, reverse=True)[: max(policy.latest.num_versions, 1)]
            aspired = {v: found[v] for v in keep}
        if not found:
            problem = (
                f"No versions of servable {entry.name} found under base path {base}. "
                "Did you forget to name your leaf directory as a number (eg. '/1/')?"
            )
        if problem:
            self._warn_once(model, problem)
        else:
            model.warned = ""
        return aspired

    @staticmethod
    def _warn_once(model: _Model, message: str) -> None:
        if model.warned != message:
            log.warning("%s", message)
            model.warned = message

    def _reconcile_model(self, name: str) -> None:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                return
            aspired = self._aspired_versions(model)
            for version, entry in model.versions.items():
                if version not in aspired and entry.error_code:
                    entry.may_retry = True
            to_load = []
            for version, path in aspired.items():
                entry = model.versions.get(version)
                if entry is None or (entry.state == END and (not entry.error_code or entry.may_retry)):
                    model.versions[version] = _Version(path, LOADING)
                    to_load.append((version, path))
        for version, path in sorted(to_load, reverse=True):
            self._load_version(model, version, path)
        with self._lock:
            self._unload_unaspired(model, set(aspired))

    def _load_version(self, model: _Model, version: int, path: Path) -> None:
        name = model.config.name
        log.info("Loading servable: {name: %s version: %d} from %s", name, version, path)
        try:
            servable = load_servable(name, version, path)
        except Exception as exc:  # any loader failure becomes the version's status, as in TF Serving
            code, message = _load_error(exc)
            log.error("Loading servable: {name: %s version: %d} failed: %s", name, version, message)
            with self._lock:
                model.versions[version] = _Version(path, END, code, message)
            return
        with self._lock:
            model.versions[version] = _Version(path, AVAILABLE, servable=servable)
        log.info("Successfully loaded servable version {name: %s version: %d}", name, version)

    @staticmethod
    def _unload_unaspired(model: _Model, aspired: set[int]) -> None:
        serving = sorted(v for v, e in model.versions.items() if v not in aspired and e.state == AVAILABLE)
        if not serving:
            return
        aspired_available = any(model.versions[v].state == AVAILABLE for v in aspired if v in model.versions)
        # Availability-preserving: keep the newest old version while no aspired version is up.
        to_unload = serving if (not aspired or aspired_available) else serving[:-1]
        for version in to_unload:
            log.info("Unloading servable version {name: %s version: %d}", model.config.name, version)
            model.versions[version] = _Version(model.versions[version].path, END)

    def _apply_labels(self, entries: dict[str, ModelConfig]) -> None:
        new_labels: dict[str, dict[str, int]] = {}
        with self._lock:
            for name, entry in entries.items():
                for label, version in entry.version_labels.items():
                    state = self._models[name].versions.get(version)
                    if state is None or state.state != AVAILABLE:
                        raise ServingError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"Request to assign label to version {version} of model {name}, "
                            "which is not currently available for inference",
                        )
                new_labels[name] = dict(entry.version_labels)
            for name, labels in new_labels.items():
                self._models[name].labels = labels

    def _check_available(self, names: list[str]) -> None:
        failed = []
        with self._lock:
            for name in names:
                model = self._models.get(name)
                if model is None or any(e.state == AVAILABLE for e in model.versions.values()):
                    continue
                errors = [
                    f"{{name: {name} version: {v}}} due to error: {e.error_message}"
                    for v, e in sorted(model.versions.items())
                    if e.error_code
                ]
                failed.append("{" + (", ".join(errors) if errors else f"{{name: {name}}} has no version to load") + "}")
        if failed:
            raise ServingError(
                grpc.StatusCode.UNKNOWN, f"{len(failed)} model(s) did not become available: {{{', '.join(failed)}, }}"
            )


class ModelServer:
    """The model server: a :class:`ModelManager`, its file-system poller, and the gRPC and REST front ends.

    Args:
        config: the models to serve.
        host: address to listen on.
        grpc_port: gRPC port; 0 picks a free one (see :attr:`grpc_port` after :meth:`start`).
        rest_port: REST port; 0 picks a free one; None disables REST.
        poll_wait_seconds: seconds between file-system polls; 0 or less polls only on (re)load.
    """

    def __init__(
        self,
        config: ModelServerConfig,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = DEFAULT_GRPC_PORT,
        rest_port: int | None = DEFAULT_REST_PORT,
        poll_wait_seconds: float = 1.0,
    ) -> None:
        self.manager = ModelManager()
        self.host = host
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self._config = config
        self._poll_wait = poll_wait_seconds
        self._stop = threading.Event()
        self._grpc_server: grpc.Server | None = None
        self._http_server = None
        self._threads: list[threading.Thread] = []

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC API (the bound port once started)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        """Base URL of the REST API (the bound port once started)."""
        return f"http://{self.host}:{self.rest_port}"

    def start(self) -> None:
        """Load the configured models, then start listening and polling.

        Raises:
            ServingError: the config is unusable (a model that fails to load is logged, not raised).
            OSError: a port cannot be bound.
        """
        from serving.grpc_service import create_grpc_server
        from serving.rest import create_rest_server

        try:
            self.manager.reload_config(self._config)
        except ServingError as exc:
            if exc.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            # Unlike tensorflow_model_server, start anyway: a broken version on disk must not keep the
            # node from serving its other models, nor from being repaired (serving.sync re-installs it).
            log.error("Starting without every model available: %s", exc.message)
        try:
            self._grpc_server, self.grpc_port = create_grpc_server(self.manager, self.host, self.grpc_port)
            self._grpc_server.start()
            log.info("Running gRPC ModelServer at %s:%d ...", self.host, self.grpc_port)
            if self.rest_port is not None:
                self._http_server = create_rest_server(self.manager, self.host, self.rest_port)
                self.rest_port = self._http_server.server_address[1]
                self._start_thread("rest", self._http_server.serve_forever)
                log.info("Exporting HTTP/REST API at:%s:%d ...", self.host, self.rest_port)
        except BaseException:
            self.stop()
            raise
        if self._poll_wait > 0:
            self._start_thread("poller", self._poll_forever)

    def stop(self, grace: float = 2.0) -> None:
        """Stop listening (letting in-flight requests finish for up to ``grace`` seconds) and unload."""
        self._stop.set()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait()
            self._grpc_server = None
        for thread in self._threads:
            thread.join(timeout=grace + 5)
        self._threads.clear()
        self.manager.stop()

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start_thread(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=f"model-server-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self._poll_wait):
            try:
                self.manager.poll_once()
            except Exception:  # keep polling: one bad pass must not stop version updates
                log.exception("FileSystemStoragePathSource encountered a filesystem access error")


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line, with TF Serving's flag names."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="MaaS model server: TF Serving's REST and gRPC APIs for SavedModels, with TF Serving's flags.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (default %(default)s)")
    parser.add_argument(
        "--rest_api_port", type=int, default=DEFAULT_REST_PORT, help="REST port; 0 disables REST (default %(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--model_config_file", help="text-format ModelServerConfig; overrides --model_name/--model_base_path")
    parser.add_argument("--model_name", default=DEFAULT_MODEL_NAME, help="model name (default %(default)s)")
    parser.add_argument("--model_base_path", help="directory holding the model's numeric version directories")
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="seconds between looks for new/removed versions; 0 looks only at start and reload (default %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ModelServerConfig:
    """The ``ModelServerConfig`` the command line asks for.

    Raises:
        ModelConfigError: neither a config file nor a base path was given, or the file is unusable.
    """
    if args.model_config_file:
        if args.model_base_path:
            log.warning("--model_config_file is set: ignoring --model_name and --model_base_path")
        return read_model_config(Path(args.model_config_file))
    if not args.model_base_path:
        raise ModelConfigError(
            "Both --model_base_path and --model_config_file are empty: give --model_base_path DIR "
            "(holding numeric version directories) or --model_config_file FILE"
        )
    return single_model_config(args.model_name, Path(args.model_base_path).expanduser().resolve())


def main(argv: list[str] | None = None) -> int:
    """Run the model server until SIGTERM or SIGINT; returns the process exit status."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ModelConfigError as exc:
        log.error("%s", exc)
        return 2
    server = ModelServer(
        config,
        host=args.host,
        grpc_port=args.port,
        rest_port=args.rest_api_port or None,
        poll_wait_seconds=args.file_system_poll_wait_seconds,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: stop.set())
    try:
        server.start()
    except (ServingError, OSError) as exc:
        log.error("model server failed to start: %s", exc)
        return 1
    while not stop.wait(1.0):
        pass
    log.info("Shutting down the model server")
    server.stop()
    return 0


if __name__ == "__main__":
    # Run main() from the importable module, so serving.rest and serving.grpc_service share its classes.
    from serving.server import main as _main

    sys.exit(_main())
