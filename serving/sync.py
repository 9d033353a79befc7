"""The serving node agent: make one model server converge on the registry's desired state, and report.

The registry holds what must be served (:class:`maas_tasks.registry.ServingTarget` per model: ``stable``,
an optional ``canary``, the ``previous`` stable kept loaded for a grace period). A node is one model
server with its serving volume and model config file: the embedded server of the local stack, or one
``tensorflow/serving`` replica with this agent as its sidecar. One pass of :func:`reconcile_node`:

1. frees canary slots whose promotion died (their lease ran out);
2. installs every version the node must hold from the object store (temporary directory, manifest
   check, rename) and verifies what is installed against the manifest, re-installing a corrupt copy;
3. writes the model config: model ``<name>`` serves ``stable`` (and ``previous`` during its grace when it
   is older, so requests naming no version still reach ``stable``), model ``<name>__canary`` serves the
   canary beside it, then asks the server to reload and waits until those versions are AVAILABLE;
4. replays the canary's golden requests (inputs and the outputs the exported model gave in process,
   shipped in the version as ``assets.extra/maas_golden.json``) and compares the answers;
5. prunes versions nobody needs from the volume (never one the server still has loaded);
6. reports what it observed to the registry (``serving_nodes``), which promotion waits on.

Promotion calls it for the node it can reach, ``maas stack up`` calls it (so a node repairs itself from
the store), and ``python -m serving.sync --loop`` runs it on a timer and whenever the registry announces a
change (PostgreSQL NOTIFY). Passes on one node are serialised by a file lock beside its config file.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import select
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maas_tasks.config import RESERVED_MODEL_SUFFIX
from maas_tasks.storage import MANIFEST_NAME, CorruptArtifact, ObjectNotFound, Store, read_manifest, sha256_file
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

CANARY_SUFFIX = RESERVED_MODEL_SUFFIX
DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_LOAD_TIMEOUT_SECONDS = 120.0
_VERIFIED_PREFIX = ".maas-verified-"
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Node:
    """A model server this agent manages: its identity, serving volume, config file and addresses."""

    node_id: str
    serving_dir: Path
    config_path: Path
    grpc_target: str
    rest_url: str | None = None


def local_node(settings: Any) -> Node | None:
    """The node described by the ``MAAS_NODE_ID`` / ``MAAS_SERVING_*`` settings (None without a node id)."""
    if not settings.node_id:
        return None
    return Node(settings.node_id, settings.serving_dir, settings.serving_config, settings.grpc_target, settings.rest_url)


def canary_model_name(model_name: str) -> str:
    """The model name a canary is served under, beside the model's stable version."""
    return f"{model_name}{CANARY_SUFFIX}"


def wanted_versions(target: Any, now: datetime | None = None) -> dict[str, list[int]]:
    """The versions each servable name must hold for ``target``: ``{model: [...], model__canary: [...]}``.

    The previous stable stays loaded during its grace only when it is older than stable: TF Serving answers
    requests naming no version with the newest loaded version, which must be the stable one.
    """
    now = now or datetime.now(timezone.utc)
    main = [target.stable] if target.stable is not None else []
    if (
        target.previous is not None and target.stable is not None and target.previous < target.stable
        and target.previous_until is not None and target.previous_until > now
    ):
        main.append(target.previous)
    wanted = {}
    if main:
        wanted[target.model_name] = sorted(main)
    if target.canary is not None:
        wanted[canary_model_name(target.model_name)] = [target.canary]
    return wanted


# --- the serving volume ---------------------------------------------------------------------------------


def _files_signature(directory: Path) -> dict[str, list[int]]:
    return {
        p.relative_to(directory).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _manifest_difference(directory: Path, files: dict[str, dict]) -> str | None:
    """How ``directory`` differs from the manifest ``files`` (sizes and sha256), or None when it matches."""
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


def ensure_installed(store: Store, store_prefix: str, model_dir: Path, version: int, *, deep: bool = False) -> str:
    """Make ``model_dir/<version>`` an exact copy of the version published at ``store_prefix``.

    A version already installed is verified against the manifest: fully (sha256 of every file) when
    ``deep`` or when any file's size or modification time changed since the last full check, else by
    that signature alone. A copy that differs is moved aside and installed again; a new copy is
    downloaded into a temporary directory, verified, and renamed into place, so the server never sees a
    half-written version.

    Returns:
        ``"ok"``, ``"installed"`` or ``"repaired: <what differed>"``.

    Raises:
        maas_tasks.storage.StoreError: the version is not published (or is corrupt) in the store.
    """
    from maas_tasks.storage import download_tree

    target = model_dir / str(version)
    stamp = model_dir / f"{_VERIFIED_PREFIX}{version}.json"
    outcome = "installed"
    if target.is_dir():
        signature = _files_signature(target)
        try:
            trusted = not deep and json.loads(stamp.read_text()) == signature
        except (OSError, ValueError):
            trusted = False
        if trusted:
            return "ok"
        difference = _manifest_difference(target, read_manifest(store, store_prefix))
        if difference is None:
            stamp.write_text(json.dumps(signature))
            return "ok"
        log.info("%s does not match %s (%s): installing it again", target, store.uri(store_prefix), difference)
        # Moved, not deleted in place: a server that loaded it keeps its open files until it unloads.
        aside = model_dir / f".corrupt-{version}-{uuid.uuid4().hex}"
        target.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
        outcome = f"repaired: {difference}"
    model_dir.mkdir(parents=True, exist_ok=True)
    incoming = model_dir / f".incoming-{version}-{uuid.uuid4().hex}"
    try:
        download_tree(store, store_prefix, incoming)
        incoming.rename(target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    stamp.write_text(json.dumps(_files_signature(target)))
    log.info("Installed %s as %s", store.uri(store_prefix), target)
    return outcome


def prune_volume(model_dir: Path, keep: set[int]) -> list[int]:
    """Delete the version directories of ``model_dir`` not in ``keep`` (and leftovers of failed installs)."""
    removed = []
    if not model_dir.is_dir():
        return removed
    for path in sorted(model_dir.iterdir()):
        if path.is_dir() and path.name.isdigit() and int(path.name) not in keep:
            shutil.rmtree(path, ignore_errors=True)
            (model_dir / f"{_VERIFIED_PREFIX}{path.name}.json").unlink(missing_ok=True)
            removed.append(int(path.name))
        elif path.is_dir() and path.name.startswith((".incoming-", ".corrupt-")) and time.time() - path.stat().st_mtime > 3600:
            shutil.rmtree(path, ignore_errors=True)
    return removed


@contextmanager
def node_lock(node: Node) -> Iterator[None]:
    """Serialise passes on one node (and edits of its config file): the agent's timer, promotion and
    ``maas stack up`` may reconcile it at the same time."""
    node.config_path.parent.mkdir(parents=True, exist_ok=True)
    with open(node.config_path.with_name(node.config_path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the model server -----------------------------------------------------------------------------------


def _desired_config(
    current: Any, targets: list[Any], node: Node, now: datetime, missing: set[tuple[str, int]]
) -> tuple[Any, dict[str, list[int]]]:
    """The node's model config for ``targets``, and the versions to wait for per servable name.

    Entries of models MaaS does not manage are kept as they are. A servable that needs a version which is
    ``missing`` from the volume (it could not be installed) keeps its current entry: pointing the server at
    a version it cannot find would make it unload what it serves now.
    """
    from serving.model_config import ModelServerConfig, get_model_entry, set_model_entry

    managed = {t.model_name for t in targets} | {canary_model_name(t.model_name) for t in targets}
    config = ModelServerConfig()
    config.model_config_list.SetInParent()
    for entry in current.model_config_list.config:
        if entry.name not in managed:
            config.model_config_list.config.add().CopyFrom(entry)
    wanted: dict[str, list[int]] = {}
    for target in targets:
        for servable, versions in wanted_versions(target, now).items():
            if any((target.model_name, v) in missing for v in versions):
                kept = get_model_entry(current, servable)
                if kept is not None:
                    config.model_config_list.config.add().CopyFrom(kept)
                continue
            wanted[servable] = versions
            config = set_model_entry(config, servable, node.serving_dir / target.model_name, versions)
    return config, wanted


def _wait_loaded(node: Node, wanted: dict[str, list[int]], deadline: float) -> dict[str, dict[int, dict]]:
    """Poll the server until every wanted version is AVAILABLE or failed (END with an error), or time is up.

    Returns ``{servable: {version: {"state", "error"}}}``; a version the server does not know yet is
    ``{"state": "UNKNOWN"}``.
    """
    from serving.client import ServingClientError, get_model_status_grpc

    while True:
        observed: dict[str, dict[int, dict]] = {}
        settled = True
        for servable, versions in wanted.items():
            try:
                rows = {r["version"]: r for r in get_model_status_grpc(servable, target=node.grpc_target, timeout=5.0)}
            except ServingClientError as exc:
                if exc.code != "NOT_FOUND":
                    raise
                rows = {}
            observed[servable] = {}
            for version in versions:
                row = rows.get(version)
                state = row["state"] if row else "UNKNOWN"
                error = row["error_message"] if row and row["error_code"] != "OK" else ""
                observed[servable][version] = {"state": state, "error": error}
                settled &= state == "AVAILABLE" or (state == "END" and bool(error))
        if settled or time.monotonic() >= deadline:
            return observed
        time.sleep(_POLL_SECONDS)


def _reload(node: Node, config: Any, timeout: float) -> None:
    """Ask the server to apply ``config``. A refusal because a new model has no loadable version is left to
    the statuses to report per version; an unreachable server raises ``ServerUnreachable``."""
    from serving.client import ServerUnreachable, ServingClientError, reload_config_grpc

    try:
        reload_config_grpc(node.grpc_target, config, timeout=timeout)
    except ServerUnreachable:
        raise
    except ServingClientError as exc:
        log.warning("node %s: the server did not accept the whole config: %s", node.node_id, exc.message)


def _reload_without(node: Node, config: Any, dropped: set[tuple[str, int]], timeout: float) -> None:
    """Reload ``config`` minus ``dropped`` (servable, version) pairs; an entry left with none is removed."""
    from serving.model_config import ModelServerConfig

    smaller = ModelServerConfig()
    smaller.CopyFrom(config)
    entries = smaller.model_config_list.config
    for index in reversed(range(len(entries))):
        entry = entries[index]
        if entry.model_version_policy.WhichOneof("policy_choice") != "specific":
            continue
        kept = [v for v in entry.model_version_policy.specific.versions if (entry.name, v) not in dropped]
        if kept:
            entry.model_version_policy.specific.versions[:] = kept
        else:
            del entries[index]
    _reload(node, smaller, timeout)


def _loaded_versions(node: Node, servable: str) -> set[int]:
    """Versions the server has loaded or is loading under ``servable`` (never pruned from the volume)."""
    from serving.client import ServingClientError, get_model_status_grpc

    try:
        rows = get_model_status_grpc(servable, target=node.grpc_target, timeout=5.0)
    except ServingClientError:
        return set()
    return {r["version"] for r in rows if r["state"] in ("AVAILABLE", "LOADING", "START", "UNLOADING")}


def check_golden(node: Node, model_name: str, version: int, tolerance: float | None = None) -> str:
    """Replay a version's golden requests against its canary on ``node`` and compare the answers.

    Returns:
        ``"ok"``, ``"none"`` (the version ships no golden requests) or ``"mismatch: ..."``.
    """
    from maas_tasks.export import GOLDEN_FILE
    from serving.client import predict_grpc

    path = node.serving_dir / model_name / str(version) / GOLDEN_FILE
    if not path.is_file():
        return "none"
    golden = json.loads(path.read_text(encoding="utf-8"))
    tolerance = golden.get("tolerance", 1e-4) if tolerance is None else tolerance
    rows = predict_grpc(golden["inputs"], model=canary_model_name(model_name), target=node.grpc_target, version=version)
    for i, (row, label, scores) in enumerate(zip(rows, golden["label"], golden["scores"])):
        gap = max(abs(a - b) for a, b in zip(row["scores"], scores))
        if row["label"] != label or gap > tolerance:
            return (
                f"mismatch: golden request {i} ({golden['inputs'][i][:40]!r}) got {row['label']} with scores "
                f"{[round(s, 6) for s in row['scores']]}, the exported model gave {label} with {scores} "
                f"(tolerance {tolerance})"
            )
    return "ok"


# --- one pass -------------------------------------------------------------------------------------------


def reconcile_node(
    node: Node,
    registry: Any,
    store: Store,
    *,
    deep: bool = False,
    timeout: float = DEFAULT_LOAD_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Make ``node`` serve the desired state and report what it observed (see the module docstring).

    Args:
        deep: verify every installed version by sha256 even if its files look unchanged.
        timeout: seconds to wait for versions to load.

    Returns:
        The report written to the registry: ``{"reported_at", "error", "models": {name: {...}}}``; a
        model's entry has ``generation``, ``stable``/``canary``/``previous`` (``version``, ``state``,
        ``error``; the canary also ``golden``), ``installed``, ``install_errors`` (version -> ``error``,
        ``permanent``) and ``error`` (a summary).
    """
    with node_lock(node):
        registry.expire_canaries()
        report = _reconcile_locked(node, registry, store, deep=deep, timeout=timeout)
    registry.report_node(node.node_id, grpc_target=node.grpc_target, rest_url=node.rest_url, report=report)
    return report


def _reconcile_locked(node: Node, registry: Any, store: Store, *, deep: bool, timeout: float) -> dict[str, Any]:
    from maas_tasks.export import version_prefix
    from serving.client import ServerUnreachable, ServingClientError
    from serving.model_config import format_model_config, read_model_config, write_model_config

    now = datetime.now(timezone.utc)
    targets = [t for t in registry.serving_targets()]
    report: dict[str, Any] = {"reported_at": now.isoformat(timespec="seconds"), "error": None, "models": {}}
    missing: set[tuple[str, int]] = set()  # (model, version) that could not be installed
    fresh: set[tuple[str, int]] = set()  # (model, version) whose files this pass wrote
    for target in targets:
        entry = report["models"][target.model_name] = {
            "generation": target.generation, "error": None, "installed": [], "install_errors": {},
        }
        for version in sorted({v for v in (target.stable, target.canary, target.previous) if v is not None}):
            try:
                outcome = ensure_installed(
                    store, version_prefix(target.model_name, version), node.serving_dir / target.model_name, version,
                    deep=deep,
                )
            except Exception as exc:  # noqa: BLE001 - one version's failure is reported, the others proceed
                # Missing or corrupt in the store will not improve by retrying: it must be exported again.
                permanent = isinstance(exc, (ObjectNotFound, CorruptArtifact))
                missing.add((target.model_name, version))
                entry["install_errors"][str(version)] = {"error": str(exc), "permanent": permanent}
                entry["error"] = entry["error"] or f"cannot install v{version} from the store: {exc}"
                continue
            entry["installed"].append(version)
            if outcome != "ok":
                fresh.add((target.model_name, version))
                log.info("%s v%d on node %s: %s", target.model_name, version, node.node_id, outcome)
                entry.setdefault("repairs", []).append(f"v{version} {outcome}")

    current = read_model_config(node.config_path, missing_ok=True)
    config, wanted = _desired_config(current, targets, node, now, missing)
    if format_model_config(config) != format_model_config(current):
        write_model_config(node.config_path, config)
    try:
        _reload(node, config, timeout)
        deadline = time.monotonic() + timeout
        observed = _wait_loaded(node, wanted, deadline)
        failed_fresh = {
            (servable, version) for servable, versions in observed.items() for version, seen in versions.items()
            if seen["state"] == "END" and seen["error"] and (servable.removesuffix(CANARY_SUFFIX), version) in fresh
        }
        if failed_fresh:
            # A model server does not retry a failed version while it stays wanted (TF Serving neither): the
            # files were just repaired, so drop those versions from the config for a moment, then ask again.
            _reload_without(node, config, failed_fresh, timeout)
            _reload(node, config, timeout)
            observed = _wait_loaded(node, wanted, deadline)
    except ServerUnreachable as exc:
        report["error"] = str(exc)
        for entry in report["models"].values():
            entry["error"] = f"cannot reach the model server at {node.grpc_target}"
        return report

    for target in targets:
        entry = report["models"][target.model_name]
        main, canary = observed.get(target.model_name, {}), observed.get(canary_model_name(target.model_name), {})
        for role, version, seen in (
            ("stable", target.stable, main), ("previous", target.previous, main), ("canary", target.canary, canary),
        ):
            if version is None:
                continue
            entry[role] = {"version": version, **seen.get(version, {"state": "NOT_LOADED", "error": ""})}
        if target.canary is not None and entry["canary"]["state"] == "AVAILABLE":
            try:
                entry["canary"]["golden"] = check_golden(node, target.model_name, target.canary)
            except ServingClientError as exc:
                entry["canary"]["golden"] = f"mismatch: the canary did not answer its golden requests: {exc}"
        problems = [f"{role} v{entry[role]['version']}: {entry[role]['error']}"
                    for role in ("stable", "canary") if role in entry and entry[role]["error"]]
        if problems and entry["error"] is None:
            entry["error"] = "; ".join(problems)
        keep = {v for v in (target.stable, target.canary, target.previous) if v is not None}
        keep |= {v.version for v in registry.list_versions(target.model_name) if v.pinned}
        keep |= _loaded_versions(node, target.model_name) | _loaded_versions(node, canary_model_name(target.model_name))
        pruned = prune_volume(node.serving_dir / target.model_name, keep)
        if pruned:
            entry["pruned"] = pruned
    return report


# --- the agent ------------------------------------------------------------------------------------------


def run_agent(node: Node, settings: Any, *, interval: float = DEFAULT_INTERVAL_SECONDS, once: bool = False) -> int:
    """Reconcile ``node`` now, then on every registry change (NOTIFY) and every ``interval`` seconds.

    Failures (registry, store or server unreachable) are logged and retried on the next pass; the agent
    never stops on its own. With ``once``, one pass; the exit status is 0 when the node converged.
    """
    import psycopg2

    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import SERVING_CHANNEL, Registry
    from maas_tasks.storage import open_store

    listener = None
    while True:
        try:
            store = open_store(settings=settings)
            with Registry.connect(registry_dsn(settings)) as registry:
                report = reconcile_node(node, registry, store, deep=once)
            problems = [m for m, e in report["models"].items() if e.get("error")] + ([report["error"]] if report["error"] else [])
            log.info("node %s reconciled: %s", node.node_id, "converged" if not problems else f"problems: {problems}")
            if once:
                print(json.dumps(report, indent=2, default=str))
                return 0 if not problems else 1
        except Exception as exc:  # noqa: BLE001 - the agent keeps its node converging whatever one pass met
            log.error("node %s: reconciliation failed: %s", node.node_id, exc)
            if once:
                print(f"serving.sync: {exc}", file=sys.stderr)
                return 1
        try:
            if listener is None:
                listener = psycopg2.connect(registry_dsn(settings), connect_timeout=10)
                listener.autocommit = True
                listener.cursor().execute(f"LISTEN {SERVING_CHANNEL}")
            ready, _, _ = select.select([listener], [], [], interval)
            if ready:
                listener.poll()
                listener.notifies.clear()
        except (psycopg2.Error, OSError) as exc:
            log.warning("node %s: cannot listen for registry changes (%s); polling every %.0fs", node.node_id, exc, interval)
            if listener is not None:
                listener.close()
            listener = None
            time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.sync [--loop]``: reconcile this machine's node with the registry."""
    from maas_tasks.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m serving.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", action="store_true", help="keep the node converged (timer and registry changes)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_SECONDS, help="seconds between passes")
    parser.add_argument(
        "--check", action="store_true",
        help="exit 0 if this node's agent reported within three intervals, else 1 (a container healthcheck)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    node = local_node(settings)
    if node is None:
        print("serving.sync: MAAS_NODE_ID is empty: this machine manages no model server", file=sys.stderr)
        return 2
    if args.check:
        return check_reporting(node, settings, within=3 * args.interval)
    import_tensorflow()  # TF Serving's protos import TensorFlow: start it without its CUDA probe lines
    return run_agent(node, settings, interval=args.interval, once=not args.loop)


def check_reporting(node: Node, settings: Any, *, within: float) -> int:
    """0 when ``node`` reported to the registry within ``within`` seconds, 1 otherwise (printed)."""
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry, RegistryError

    try:
        with Registry(registry_dsn(settings)) as registry:
            alive = [n for n in registry.serving_nodes(seen_within=within) if n.node_id == node.node_id]
    except RegistryError as exc:
        print(f"serving.sync: {exc}", file=sys.stderr)
        return 1
    if not alive:
        print(f"serving.sync: node {node.node_id} has not reported for {within:.0f}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
