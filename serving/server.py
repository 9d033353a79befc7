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
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2

from maas_tasks.config import DEFAULT_GRPC_PORT, DEFAULT_MODEL_NAME, DEFAULT_REST_PORT
from serving.batching import BatchingOptions, BatchScheduler
from serving.model_config import (
    TENSORFLOW_PLATFORM,
    ModelConfig,
    ModelConfigError,
    ModelServerConfig,
    read_model_config,
    single_model_config,
)
from serving.servable import (  # noqa: F401 - re-exported: the server's public types
    DEFAULT_SIGNATURE,
    WARMUP_FILE,
    LoadOptions,
    Servable,
    ServingError,
    Signature,
    load_servable,
    replay_warmup,
    status_code_from_number,
)

log = logging.getLogger(__name__)

VersionStatus = get_model_status_pb2.ModelVersionStatus
AVAILABLE = VersionStatus.AVAILABLE
LOADING = VersionStatus.LOADING
END = VersionStatus.END

_VERSION_DIR = re.compile(r"\d+")
_FILE_SCHEME = "file://"
_SWITCH_INTERVAL_SECONDS = 0.0005


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
    # Dropped from the config by a reload: its versions stay listed, in END, as in TF Serving.
    removed: bool = False


def local_base_path(base_path: str) -> str:
    """The directory a base path names: a plain absolute path or a ``file://`` URI."""
    return base_path[len(_FILE_SCHEME) :] if base_path.startswith(_FILE_SCHEME) else base_path


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
        base_path = local_base_path(entry.base_path)
        if "://" in base_path:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Model {entry.name} has base_path {entry.base_path}, which this server cannot read: "
                "copy the versions to a local directory (serving.sync does) and point base_path there",
            )
        if not os.path.isabs(base_path):
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

    def __init__(self, load_options: LoadOptions | None = None, batcher: BatchScheduler | None = None) -> None:
        self._load_options = load_options or LoadOptions()
        self._batcher = batcher
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
        self._check_platforms(config)  # before the other checks, as TF Serving orders them
        _validate_config(config)
        if config.WhichOneof("config") is None:
            log.info("Taking no action for empty config.")
            return
        entries = {entry.name: entry for entry in config.model_config_list.config}
        with self._reconcile_lock:
            with self._lock:
                new_models = [name for name in entries if name not in self._models]
                for name, model in self._models.items():
                    if name not in entries and not model.removed:
                        log.info("Unloading all versions of model %s: it is no longer in the config", name)
                        model.removed = True
                        model.labels = {}
                        for version, state in model.versions.items():
                            if state.state != END or state.servable is not None:
                                model.versions[version] = _Version(state.path, END)
                            else:
                                state.may_retry = True  # no longer aspired: a failed load is tried again if re-added
                for name, entry in entries.items():
                    model = self._models.setdefault(name, _Model(ModelConfig()))
                    if model.removed:
                        new_models.append(name)
                        model.removed = False
                    model.config.CopyFrom(entry)
                self._config.CopyFrom(config)
            for name in entries:
                log.info("(Re-)adding model: %s", name)
                self._reconcile_model(name)
            self._apply_labels(entries)
        self._check_available(new_models)

    def _check_platforms(self, config: ModelServerConfig) -> None:
        with self._lock:
            for entry in config.model_config_list.config:
                model = self._models.get(entry.name)
                if model is None or model.removed:
                    continue
                old, new = model.config.model_platform or TENSORFLOW_PLATFORM, entry.model_platform or TENSORFLOW_PLATFORM
                if old != new:
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Illegal to change a model's platform. For model {entry.name} platform was {old} and new "
                        f"platform requested is {new}",
                    )

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

    def version_states(self) -> list[tuple[str, int, str]]:
        """(model, version, state name) of every tracked version, for the metrics."""
        with self._lock:
            return [
                (name, version, VersionStatus.State.Name(entry.state))
                for name, model in self._models.items()
                for version, entry in model.versions.items()
            ]

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
        base = Path(local_base_path(entry.base_path))
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
            if model is None or model.removed:
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
            servable = load_servable(name, version, path, self._load_options)
            if self._batcher is not None:
                for signature in servable.signatures.values():
                    signature.batcher = self._batcher
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


@dataclass(frozen=True)
class FrontEndOptions:
    """How the REST and gRPC front ends take connections (TF Serving's flags, and MaaS's limits)."""

    rest_timeout_seconds: float = 30.0  # --rest_api_timeout_in_ms: reading a request, and answering it
    rest_threads: int = 64  # --rest_api_num_threads: requests worked on at once (the rest wait, queued)
    rest_max_body_bytes: int = 64 * 1024 * 1024  # larger bodies get 413 before they are read
    rest_idle_seconds: float = 60.0  # a kept-alive connection with no request is closed after this
    rest_max_pending: int = 4096  # requests queued beyond this get 503 (UNAVAILABLE), not a reset; gRPC alike
    rest_backlog: int = 4096  # the listen backlog: bursts of new connections wait instead of being refused
    rest_cors: bool = False  # --rest_api_enable_cors_support
    grpc_max_threads: int = 128  # --grpc_max_threads: an RPC blocked in a batch holds one
    grpc_socket_path: str = ""  # --grpc_socket_path: also listen on this Unix socket
    grpc_channel_arguments: tuple[tuple[str, Any], ...] = ()  # --grpc_channel_arguments


class ModelServer:
    """The model server: a :class:`ModelManager`, its file-system poller, and the gRPC and REST front ends.

    Args:
        config: the models to serve.
        host: address to listen on.
        grpc_port: gRPC port; 0 picks a free one (see :attr:`grpc_port` after :meth:`start`); None: no TCP gRPC.
        rest_port: REST port; 0 picks a free one; None disables REST.
        poll_wait_seconds: seconds between file-system polls; 0 or less polls only on (re)load.
        config_file: the ``--model_config_file`` the config came from, re-read every
            ``config_poll_seconds`` when that is above 0 (``--model_config_file_poll_wait_seconds``).
        batching: server-side batching options (``--enable_batching``); None: no batching.
        metrics_path: the REST path of the Prometheus metrics; None: no metrics endpoint.
        load_options: how versions are loaded (tags, session threads, warm-up).
        front_end: connection limits and timeouts of the front ends.
    """

    def __init__(
        self,
        config: ModelServerConfig,
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = DEFAULT_GRPC_PORT,
        rest_port: int | None = DEFAULT_REST_PORT,
        poll_wait_seconds: float = 1.0,
        config_file: Path | None = None,
        config_poll_seconds: float = 0.0,
        batching: BatchingOptions | None = None,
        metrics_path: str | None = None,
        load_options: LoadOptions | None = None,
        front_end: FrontEndOptions | None = None,
    ) -> None:
        from serving.metrics import ServerMetrics

        self._batcher = BatchScheduler(batching, self._observe_batch) if batching is not None else None
        self.manager = ModelManager(load_options, self._batcher)
        self.metrics = ServerMetrics(self.manager.version_states)
        self.metrics_path = metrics_path
        self.host = host
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self.front_end = front_end or FrontEndOptions()
        self._config = config
        self._config_file = Path(config_file) if config_file else None
        self._config_poll = config_poll_seconds
        self._poll_wait = poll_wait_seconds
        self._stop = threading.Event()
        self._grpc_server = None
        self._rest_server = None
        self._loop_thread = None
        self._threads: list[threading.Thread] = []

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC API (the bound port once started)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        """Base URL of the REST API (the bound port once started)."""
        return f"http://{self.host}:{self.rest_port}"

    def _observe_batch(self, signature: Signature, rows: int) -> None:
        self.metrics.observe_batch(signature, rows)

    def start(self) -> None:
        """Load the configured models, then start listening and polling.

        Raises:
            ServingError: the config is unusable (a model that fails to load is logged, not raised).
            OSError: a port cannot be bound.
        """
        from serving.grpc_service import GrpcServer
        from serving.loop import LoopThread
        from serving.rest import RestServer

        try:
            self.manager.reload_config(self._config)
        except ServingError as exc:
            if exc.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            # Unlike tensorflow_model_server, start anyway: a broken version on disk must not keep the
            # node from serving its other models, nor from being repaired (serving.sync re-installs it).
            log.error("Starting without every model available: %s", exc.message)
        self._loop_thread = LoopThread()
        try:
            if self.grpc_port is not None or self.front_end.grpc_socket_path:
                self._grpc_server = GrpcServer(
                    self.manager, self.host, self.grpc_port, self.front_end, self.metrics, self._loop_thread
                )
                self._grpc_server.start()
                self.grpc_port = self._grpc_server.port
            if self.grpc_port:
                log.info("Running gRPC ModelServer at %s:%d ...", self.host, self.grpc_port)
            if self.front_end.grpc_socket_path:
                log.info("Running gRPC ModelServer at UNIX socket %s ...", self.front_end.grpc_socket_path)
            if self.rest_port is not None:
                self._rest_server = RestServer(
                    self.manager,
                    self.host,
                    self.rest_port,
                    self.front_end,
                    self.metrics,
                    self.metrics_path,
                    batching=self._batcher is not None,
                    loop_thread=self._loop_thread,
                )
                self._rest_server.start()
                self.rest_port = self._rest_server.port
                log.info("Exporting HTTP/REST API at:%s:%d ...", self.host, self.rest_port)
                if self.metrics_path:
                    log.info("Prometheus metrics at %s%s", self.rest_url, self.metrics_path)
        except BaseException:
            self.stop()
            raise
        if self._poll_wait > 0:
            self._start_thread("poller", self._poll_forever)
        if self._config_file is not None and self._config_poll > 0:
            self._start_thread("config-poller", self._poll_config_forever)

    def stop(self, grace: float = 2.0) -> None:
        """Stop listening (letting in-flight requests finish for up to ``grace`` seconds) and unload."""
        self._stop.set()
        if self._rest_server is not None:
            self._rest_server.stop(grace)
            self._rest_server = None
        if self._grpc_server is not None:
            self._grpc_server.stop(grace)
            self._grpc_server = None
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None
        for thread in self._threads:
            thread.join(timeout=grace + 5)
        self._threads.clear()
        if self._batcher is not None:
            self._batcher.stop()
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

    def _poll_config_forever(self) -> None:
        applied = self.manager.config
        while not self._stop.wait(self._config_poll):
            try:
                config = read_model_config(self._config_file)
            except ModelConfigError as exc:
                log.error("Failed to read the model config file; keeping the config in force: %s", exc)
                continue
            if config == applied:
                continue
            try:
                self.manager.reload_config(config)
            except ServingError as exc:
                log.error("Reloading %s failed: %s", self._config_file, exc.message)
            applied = config


def _positive_seconds_ms(value: str) -> float:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds, got {value}")
    return number / 1000.0


def parse_channel_arguments(text: str) -> tuple[tuple[str, Any], ...]:
    """``--grpc_channel_arguments``: ``key=value`` pairs, comma separated; integer values become ints.

    Raises:
        ValueError: a pair has no ``=`` or an empty key.
    """
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--grpc_channel_arguments: {item!r} is not key=value")
        value = value.strip()
        pairs.append((key.strip(), int(value) if re.fullmatch(r"-?\d+", value) else value))
    return tuple(pairs)


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line, with TF Serving's flag names (``--flag=value`` and ``--flag value`` both work)."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="MaaS model server: TF Serving's REST and gRPC APIs for SavedModels, with TF Serving's flags.",
    )
    add = parser.add_argument
    add("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port; 0 disables TCP gRPC (default %(default)s)")
    add("--grpc_socket_path", default="", help="also serve gRPC on this Unix socket path")
    add("--rest_api_port", type=int, default=DEFAULT_REST_PORT, help="REST port; 0 disables REST (default %(default)s)")
    add("--rest_api_num_threads", type=int, default=FrontEndOptions.rest_threads, help="REST requests worked on at once")
    add("--rest_api_timeout_in_ms", type=_positive_seconds_ms, default=30.0, dest="rest_timeout",
        help="timeout of a REST call: reading the request and answering it (default 30000)")
    add("--rest_api_enable_cors_support", type=_flag_bool, nargs="?", const=True, default=False, help="send CORS headers")
    add("--rest_api_max_body_bytes", type=int, default=FrontEndOptions.rest_max_body_bytes,
        help="MaaS: REST bodies larger than this get 413 before they are read (default %(default)s)")
    add("--host", default="127.0.0.1", help="MaaS: address to listen on (default %(default)s; 0.0.0.0 for all)")
    add("--model_config_file", help="text-format ModelServerConfig; overrides --model_name/--model_base_path")
    add("--model_config_file_poll_wait_seconds", type=float, default=0.0,
        help="seconds between re-reads of --model_config_file; 0 reads it only at start (default)")
    add("--model_name", default=DEFAULT_MODEL_NAME, help="model name (default %(default)s)")
    add("--model_base_path", help="directory (or file:// URI) holding the model's numeric version directories")
    add("--file_system_poll_wait_seconds", type=float, default=1.0,
        help="seconds between looks for new/removed versions; 0 looks only at start and reload (default %(default)s)")
    add("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False, help="batch concurrent requests")
    add("--batching_parameters_file", help="text-format BatchingParameters (implies nothing unless --enable_batching)")
    add("--monitoring_config_file", help="text-format MonitoringConfig; prometheus_config enables /monitoring/... metrics")
    add("--saved_model_tags", default="serve", help="comma-separated MetaGraphDef tags to load (default %(default)s)")
    add("--tensorflow_intra_op_parallelism", type=int, default=0, help="threads within an op; 0 picks")
    add("--tensorflow_inter_op_parallelism", type=int, default=0, help="ops run at once; 0 picks")
    add("--tensorflow_session_parallelism", type=int, default=0, help="sets both parallelism values when above 0")
    add("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=True, help="replay warm-up requests")
    add("--num_request_iterations_for_warmup", type=int, default=1, help="times each warm-up request runs")
    add("--enable_grappler", type=_flag_bool, nargs="?", const=True, default=False,
        help="MaaS: let TensorFlow's graph optimizer rewrite each loaded graph (more memory; off by default)")
    add("--grpc_channel_arguments", default="", help="comma-separated key=value gRPC server arguments")
    add("--grpc_max_threads", type=int, default=FrontEndOptions.grpc_max_threads, help="gRPC server threads")
    add("--enable_signature_method_name_check", type=_flag_bool, nargs="?", const=True, default=False,
        help="require classify/regress method names on the signatures those APIs run")
    # Accepted for compatibility; the embedded server has nothing they would change.
    for flag in ("num_load_threads", "num_unload_threads", "max_num_load_retries", "load_retry_interval_micros"):
        add(f"--{flag}", type=int, default=None, help=argparse.SUPPRESS)
    for flag in ("flush_filesystem_caches", "allow_version_labels_for_unavailable_models", "enable_grpc_healthcheck_service"):
        add(f"--{flag}", type=_flag_bool, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    add("--version", action="version", version="MaaS embedded model server (TF Serving API 2.x)")
    return parser


def _flag_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


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
    base = args.model_base_path
    if base.startswith(_FILE_SCHEME) or "://" in base:
        return single_model_config(args.model_name, base)
    return single_model_config(args.model_name, Path(base).expanduser().resolve())


def server_from_args(args: argparse.Namespace) -> ModelServer:
    """The :class:`ModelServer` the command line describes.

    Raises:
        ModelConfigError / ConfigFileError / ValueError: a flag or a file it names is unusable.
    """
    from serving.batching import read_batching_parameters
    from serving.metrics import read_monitoring_config

    config = config_from_args(args)
    batching = read_batching_parameters(Path(args.batching_parameters_file) if args.batching_parameters_file else None)
    if args.batching_parameters_file and not args.enable_batching:
        log.warning("--batching_parameters_file is set but --enable_batching is not: batching stays off")
    intra = args.tensorflow_session_parallelism or args.tensorflow_intra_op_parallelism
    inter = args.tensorflow_session_parallelism or args.tensorflow_inter_op_parallelism
    tags = tuple(t.strip() for t in args.saved_model_tags.split(",") if t.strip())
    if min(args.rest_api_num_threads, args.grpc_max_threads, args.rest_api_max_body_bytes) < 1:
        raise ValueError("--rest_api_num_threads, --grpc_max_threads and --rest_api_max_body_bytes must be at least 1")
    front_end = FrontEndOptions(
        rest_timeout_seconds=args.rest_timeout,
        rest_threads=args.rest_api_num_threads,
        rest_max_body_bytes=args.rest_api_max_body_bytes,
        rest_cors=args.rest_api_enable_cors_support,
        grpc_max_threads=args.grpc_max_threads,
        grpc_socket_path=args.grpc_socket_path,
        grpc_channel_arguments=parse_channel_arguments(args.grpc_channel_arguments),
    )
    if args.enable_signature_method_name_check:
        from serving import inference

        inference.method_name_check = True
    return ModelServer(
        config,
        host=args.host,
        grpc_port=args.port or None,
        rest_port=args.rest_api_port or None,
        poll_wait_seconds=args.file_system_poll_wait_seconds,
        config_file=Path(args.model_config_file) if args.model_config_file else None,
        config_poll_seconds=args.model_config_file_poll_wait_seconds,
        batching=batching if args.enable_batching else None,
        metrics_path=read_monitoring_config(Path(args.monitoring_config_file) if args.monitoring_config_file else None),
        load_options=LoadOptions(
            tags=tags or ("serve",),
            intra_op_threads=intra,
            inter_op_threads=inter,
            warmup=args.enable_model_warmup,
            warmup_iterations=args.num_request_iterations_for_warmup,
            grappler=args.enable_grappler,
        ),
        front_end=front_end,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the model server until SIGTERM or SIGINT; returns the process exit status."""
    from serving.config_protos import ConfigFileError

    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The event loop holds the GIL most of the time under load; with the default 5 ms switch interval a
    # batch thread coming back from a session run waits that long for it, and batches run late.
    sys.setswitchinterval(_SWITCH_INTERVAL_SECONDS)
    try:
        server = server_from_args(args)
    except (ModelConfigError, ConfigFileError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if server.grpc_port is None and not server.front_end.grpc_socket_path and server.rest_port is None:
        log.error("Nothing to serve on: --port, --grpc_socket_path and --rest_api_port are all off")
        return 2
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
