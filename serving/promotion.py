"""Promote an exported model version from the object store to the model server, atomically.

TF Serving (>= 2.7) cannot read ``s3://`` base paths, so versions are copied onto a local serving
volume first. And TF Serving loads any numeric directory it sees under a model's base path, even a
half-copied one, so a version is never copied in place: it is downloaded into a temporary,
non-numeric directory next to its final place (TF Serving ignores non-numeric names), verified
against the store's manifest, and only then renamed to ``<serving_dir>/<model>/<version>`` — a
rename on one file system is atomic, so the server sees either nothing or the whole version.

Then the model config file is pointed at exactly that version, the server is asked to reload, and
promotion waits until the server reports the version AVAILABLE; if it does not, the previous config
is restored and reloaded. Marking the version as serving in the registry is the caller's job.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from maas_tasks.storage import MANIFEST_NAME, Store, download_tree, read_manifest, sha256_file
from serving.client import ServingClientError, get_model_status_grpc, reload_config_grpc
from serving.model_config import (
    ModelServerConfig,
    get_model_entry,
    parse_model_config,
    set_model_entry,
    write_model_config,
    write_text_atomic,
)

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.2


class PromotionError(RuntimeError):
    """A version could not be installed or did not become AVAILABLE; the message says which and why."""


def _manifest_difference(directory: Path, files: dict[str, dict]) -> str | None:
    """Describe how ``directory`` differs from the manifest ``files``, or None when it matches."""
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    expected = set(files) - {MANIFEST_NAME}
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        return f"files differ (extra: {extra[:5]}, missing: {missing[:5]})"
    for rel in sorted(expected):
        path = directory / rel
        if path.stat().st_size != files[rel]["size"] or sha256_file(path) != files[rel]["sha256"]:
            return f"{rel} differs in size or sha256"
    return None


def install_version(store: Store, store_prefix: str, serving_dir: Path, model_name: str, version: int) -> Path:
    """Copy the version published at ``store_prefix`` to ``serving_dir/model_name/version``, atomically.

    Idempotent: an existing version directory that matches the manifest is reused.

    Returns:
        The version directory.

    Raises:
        PromotionError: the version directory exists with different content.
        StoreError / ObjectNotFound: the tree is not published or a file fails verification
            (nothing is left in the serving directory then).
    """
    version = int(version)
    if version < 0:
        raise PromotionError(f"version {version} of {model_name} is negative; TF Serving versions are numbers >= 0")
    model_dir = Path(serving_dir).resolve() / model_name
    target = model_dir / str(version)
    files = read_manifest(store, store_prefix)
    if target.exists():
        difference = _manifest_difference(target, files)
        if difference is None:
            log.info("%s already holds %s; reusing it", target, store.uri(store_prefix))
            return target
        raise PromotionError(
            f"{target} already exists but does not match {store.uri(store_prefix)}: {difference}. "
            f"A served version must never change: publish the model as a new version, or remove {target} "
            "if it is not being served"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    incoming = model_dir / f".incoming-{version}-{uuid.uuid4().hex}"
    try:
        download_tree(store, store_prefix, incoming)
        incoming.rename(target)
    except OSError as exc:
        if target.exists() and _manifest_difference(target, files) is None:
            return target  # a concurrent install of the same version won the race
        raise PromotionError(f"cannot move {incoming} to {target}: {exc}") from None
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    log.info("Installed %s as %s", store.uri(store_prefix), target)
    return target


def _wait_available(model_name: str, version: int, grpc_target: str, deadline: float) -> None:
    last = "the server reported no status for it yet"
    while True:
        try:
            statuses = get_model_status_grpc(
                model_name, target=grpc_target, version=version, timeout=max(0.5, min(5.0, deadline - time.monotonic()))
            )
        except ServingClientError as exc:
            if exc.code != "NOT_FOUND":
                raise
            statuses = []
        for status in statuses:
            if status["state"] == "AVAILABLE":
                return
            if status["state"] == "END" and status["error_code"] != "OK":
                raise PromotionError(
                    f"version {version} of model {model_name} failed to load: "
                    f"{status['error_code']}: {status['error_message']}"
                )
            last = f"its state is {status['state']}"
        if time.monotonic() >= deadline:
            raise PromotionError(f"version {version} of model {model_name} did not become AVAILABLE in time: {last}")
        time.sleep(_POLL_SECONDS)


def promote_version(
    store: Store,
    store_prefix: str,
    *,
    model_name: str,
    version: int,
    serving_dir: Path,
    config_path: Path,
    grpc_target: str,
    timeout: float = 60.0,
) -> dict:
    """Install a version and make the model server serve exactly it.

    Steps: :func:`install_version`; set this model's entry in ``config_path`` to
    ``specific { versions: <version> }`` with base_path ``serving_dir/<model>`` (other models kept),
    written atomically; ``HandleReloadConfigRequest`` with the whole config; wait (up to ``timeout``
    seconds) until ``GetModelStatus`` reports the version AVAILABLE.

    Returns:
        ``{"model", "version", "path", "previous_version"}``; previous_version is the highest version
        the config served before (None if the model was not in it).

    Raises:
        PromotionError: the version failed to load or did not become AVAILABLE in time (the previous
            config file was restored and reloaded), or the version directory conflicts.
        ServingClientError: the server rejected the reload (the previous config was restored).
        ModelConfigError: the existing config file is malformed (nothing changed).
        maas_tasks.storage.StoreError: the stored version is missing or corrupt (nothing changed).
    """
    version = int(version)
    config_path = Path(config_path)
    deadline = time.monotonic() + timeout
    config_path.parent.mkdir(parents=True, exist_ok=True)
    with _config_lock(config_path):
        old_text = config_path.read_text(encoding="utf-8") if config_path.exists() else None
        old_config = parse_model_config(old_text, str(config_path)) if old_text is not None else ModelServerConfig()
        existed = (Path(serving_dir).resolve() / model_name / str(version)).exists()
        path = install_version(store, store_prefix, serving_dir, model_name, version)
        old_entry = get_model_entry(old_config, model_name)
        previous = max(old_entry.model_version_policy.specific.versions, default=None) if old_entry else None
        new_config = set_model_entry(old_config, model_name, path.parent, [version])
        write_model_config(config_path, new_config)
        try:
            reload_config_grpc(grpc_target, new_config, timeout=max(1.0, deadline - time.monotonic()))
            _wait_available(model_name, version, grpc_target, deadline)
        except (PromotionError, ServingClientError) as exc:
            _restore(config_path, old_text, old_config, grpc_target, timeout)
            if not existed:
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(exc, PromotionError):
                raise PromotionError(f"{exc}; restored the previous model config {config_path}") from None
            raise PromotionError(
                f"the model server at {grpc_target} rejected the config serving version {version} of {model_name}: "
                f"{exc.code}: {exc.message}; restored the previous model config {config_path}"
            ) from None
        log.info("Model %s now serves version %d from %s (previously %s)", model_name, version, path, previous)
        return {"model": model_name, "version": version, "path": str(path), "previous_version": previous}


@contextmanager
def _config_lock(config_path: Path) -> Iterator[None]:
    """Serialise promotions that share a config file: each reads, edits and rewrites the whole file,
    so two at once would lose one's entry. The lock is advisory (flock) and held until reload is done."""
    with open(config_path.with_name(config_path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _restore(config_path: Path, old_text: str | None, old_config, grpc_target: str, timeout: float) -> None:
    if old_text is None:
        config_path.unlink(missing_ok=True)
    else:
        write_text_atomic(config_path, old_text)
    try:
        reload_config_grpc(grpc_target, old_config, timeout=timeout)
    except ServingClientError as exc:
        log.error("Restored %s but the server did not accept it back: %s", config_path, exc)

