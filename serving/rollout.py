"""Move a model's stable version through the two-phase protocol: canary, verify on every node, commit.

Promotion (a new version gated against the serving champion) and ``maas rollback`` (back to an earlier
version) both come here. The registry's desired state changes only by compare-and-set, and the nodes'
agents (:mod:`serving.sync`) make their servers converge on it and report:

1. **canary**: the version takes the canary slot, if stable is still the version the caller expects
   (for a promotion, the champion it was gated against; otherwise the promotion is *superseded*:
   recorded, not an error). Each node loads it beside stable, under ``<name>__canary``, where requests
   that name no version never reach it, and replays its golden requests.
2. **verify**: wait until every live node reports the canary AVAILABLE with matching golden answers.
3. **commit**: stable := the version, the old stable becomes ``previous`` (kept loaded for a grace
   period for requests that name it), and every node swaps: its server loads the new stable before it
   unloads the old one, so no request fails.

Any failure (a load error, a golden mismatch, a node that cannot be reached, a timeout) gives the canary
slot back, or after a commit moves stable back, and records why in the event log. Failures that cannot
improve by retrying raise :class:`PermanentRolloutError`, the others :class:`RolloutError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from maas_tasks.errors import PermanentError
from maas_tasks.registry import CanaryBusy, ChampionChanged

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 300.0
DEFAULT_GRACE_SECONDS = 300.0
# A node whose agent has not reported for this long is taken as gone (it converges when it is back).
NODE_TTL_SECONDS = 180.0
_POLL_SECONDS = 0.5


class RolloutError(RuntimeError):
    """The version did not reach every node in time (a node down or slow); retrying may succeed."""


class PermanentRolloutError(RolloutError, PermanentError):
    """The version cannot be served (it fails to load, or answers unlike the exported model)."""


def move_stable(
    registry: Any,
    model_name: str,
    version: int,
    *,
    expected_stable: int | None,
    reconcile_local: Callable[[], Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    node_ttl: float = NODE_TTL_SECONDS,
    purpose: str = "promotion",
) -> dict[str, Any]:
    """Make ``version`` the stable version of ``model_name`` on every node, if stable is ``expected_stable``.

    Args:
        reconcile_local: reconciles the node this process can reach, if any (the local stack's embedded
            server); other nodes' agents react to the registry's notification.
        timeout: seconds each phase may take; the canary slot's lease is twice that.
        grace_seconds: how long the old stable stays loaded after the swap.
        purpose: recorded with the events (``promotion``, ``rollback``).

    Returns:
        ``outcome`` (``"stable"``, ``"already stable"`` or ``"superseded"``), ``stable``, ``previous``,
        ``nodes`` (the node ids that confirmed) and, when superseded, ``by`` (the stable version found).

    Raises:
        PermanentRolloutError: the version failed to load or failed its golden requests on a node.
        RolloutError: a node could not be reached or did not converge in time; nothing changed for users.
    """
    target = registry.serving_target(model_name)
    if target is not None and target.stable == version:
        nodes = _converge(registry, model_name, version, "stable", reconcile_local, timeout, node_ttl)
        return {"outcome": "already stable", "stable": version, "previous": target.previous, "nodes": nodes}
    deadline = time.monotonic() + timeout
    while True:
        try:
            target = registry.begin_canary(
                model_name, version, expected_stable=expected_stable, lease_seconds=2 * timeout, detail={"purpose": purpose}
            )
            break
        except ChampionChanged as exc:
            return _superseded(registry, model_name, version, expected_stable, exc.target.stable, purpose)
        except CanaryBusy as exc:
            if time.monotonic() >= deadline:
                raise RolloutError(
                    f"{model_name} v{version}: v{exc.target.canary} held the canary slot for the whole {timeout:.0f}s; "
                    "its promotion is still running or stalled (the slot frees itself when its lease ends)"
                ) from None
            time.sleep(_POLL_SECONDS)
    log.info("%s v%d is the canary (generation %d); waiting for every node to verify it", model_name, version,
             target.generation)
    try:
        _converge(registry, model_name, version, "canary", reconcile_local, timeout, node_ttl)
    except RolloutError as exc:
        registry.abort_canary(model_name, version, str(exc), {"purpose": purpose})
        _best_effort(reconcile_local)
        raise
    try:
        committed = registry.commit_canary(
            model_name, version, expected_stable=expected_stable, grace_seconds=grace_seconds, detail={"purpose": purpose}
        )
    except ChampionChanged as exc:
        registry.abort_canary(model_name, version, f"stable became v{exc.target.stable} meanwhile")
        _best_effort(reconcile_local)
        return _superseded(registry, model_name, version, expected_stable, exc.target.stable, purpose)
    except CanaryBusy as exc:
        raise RolloutError(f"{model_name} v{version} lost the canary slot before it could commit: {exc}") from None
    log.info("%s v%d is stable (generation %d); waiting for every node to swap", model_name, version,
             committed.generation)
    try:
        nodes = _converge(registry, model_name, version, "stable", reconcile_local, timeout, node_ttl)
    except RolloutError as exc:
        registry.revert_stable(model_name, version, to=expected_stable, reason=str(exc))
        _best_effort(reconcile_local)
        raise
    return {"outcome": "stable", "stable": version, "previous": expected_stable, "nodes": nodes}


def _superseded(registry: Any, model_name: str, version: int, expected: int | None, found: int | None, purpose: str) -> dict:
    record = registry.get_version(model_name, version)
    if record.status == "candidate":
        registry.mark_superseded(model_name, version, {"gated_against": expected, "stable": found, "purpose": purpose})
    log.info("%s v%d is superseded: it was gated against v%s, but v%s is stable now", model_name, version, expected, found)
    return {"outcome": "superseded", "stable": found, "previous": None, "nodes": [], "by": found}


def _best_effort(reconcile_local: Callable[[], Any] | None) -> None:
    if reconcile_local is None:
        return
    try:
        reconcile_local()
    except Exception as exc:  # noqa: BLE001 - the state is already rolled back; the agent finishes the job
        log.warning("could not reconcile the local node after a failed rollout: %s", exc)


def _converge(
    registry: Any,
    model_name: str,
    version: int,
    role: str,
    reconcile_local: Callable[[], Any] | None,
    timeout: float,
    node_ttl: float,
) -> list[str]:
    """Wait until every live node reports ``version`` in ``role`` AVAILABLE (a canary also golden-clean).

    Returns the ids of the nodes that confirmed.

    Raises:
        PermanentRolloutError: a node reports the version failed to load, or a golden mismatch.
        RolloutError: no live node, a node reports it cannot reach its server, or the timeout.
    """
    generation = registry.serving_target(model_name).generation
    deadline = time.monotonic() + timeout
    if reconcile_local is not None:
        reconcile_local()
    while True:
        nodes = registry.serving_nodes(seen_within=node_ttl)
        if not nodes:
            raise RolloutError(
                f"no serving node reported in the last {node_ttl:.0f}s; start the model server and its agent "
                "(`maas stack up`, or the serving-sync sidecar) and try again"
            )
        waiting = []
        for node in nodes:
            verdict = _node_verdict(node.report, model_name, version, role, generation)
            if verdict == "ok":
                continue
            kind, _, why = verdict.partition(": ")
            if kind == "failed":
                raise PermanentRolloutError(f"{model_name} v{version} on node {node.node_id}: {why}")
            if kind == "unreachable":
                raise RolloutError(f"node {node.node_id}: {why}")
            waiting.append(f"{node.node_id} ({verdict})")
        if not waiting:
            return [node.node_id for node in nodes]
        if time.monotonic() >= deadline:
            raise RolloutError(
                f"{model_name} v{version} did not become {role} on every node within {timeout:.0f}s: "
                + ", ".join(waiting)
            )
        time.sleep(_POLL_SECONDS)


def _node_verdict(report: dict[str, Any], model_name: str, version: int, role: str, generation: int) -> str:
    """``ok``, ``failed: why``, ``unreachable: why`` or what the node is still waiting for."""
    entry = (report.get("models") or {}).get(model_name, {})
    if entry.get("generation", 0) < generation:
        return "has not applied the change yet"
    install = (entry.get("install_errors") or {}).get(str(version))
    if install:
        return f"{'failed' if install['permanent'] else 'unreachable'}: v{version} cannot be installed: {install['error']}"
    if report.get("error"):
        return f"unreachable: {report['error']}"
    seen = entry.get(role) or {}
    if seen.get("version") != version:
        return f"reports {role} v{seen.get('version')}"
    if seen.get("state") == "AVAILABLE":
        golden = seen.get("golden", "ok" if role == "stable" else None)
        if golden in ("ok", "none"):
            return "ok"
        if golden and golden.startswith("mismatch"):
            return f"failed: golden requests: {golden}"
        return "verifying"
    if seen.get("error"):
        return f"failed: {seen['error']}"
    return f"{role} v{version} is {seen.get('state', 'not loaded')}"
