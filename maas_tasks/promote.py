"""Promote: put an exported, gated model version in front of users, or roll a model back to another version.

Both go through the serving rollout protocol (:mod:`serving.rollout`): the version becomes the canary only
if the stable version is still the one expected (for a promotion, the champion it was gated against, so
a version never replaces a newer one by accident: it ends *superseded*), every serving node loads it
beside the stable one and replays its golden requests, and only then does it become stable. This module
adds the registry's side: what may be promoted or rolled to, and reconciling the node this process can
reach (the local stack's model server) instead of waiting for its agent's next pass.
"""

from __future__ import annotations

from typing import Any

from maas_tasks.config import Settings
from maas_tasks.errors import PermanentError
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

PROMOTION_TIMEOUT_SECONDS = 300.0


class PromotionError(PermanentError):
    """The version cannot be promoted or rolled to; the message says why and what still serves."""


def gated_champion(record: Any, target: Any) -> int | None:
    """The stable version a candidate was gated against (recorded at evaluation); the current stable
    version for versions registered before the gate recorded it."""
    gate = (record.metrics or {}).get("gate") or {}
    if "champion" in gate:
        return gate["champion"]
    return target.stable if target is not None else None


def local_reconciler(settings: Settings, store: Store, registry: Any):
    """A function reconciling the serving node this process manages (``MAAS_NODE_ID``), or None."""
    import_tensorflow()  # the serving side reads TF Serving's protos, which import TensorFlow
    from serving.sync import local_node, reconcile_node

    node = local_node(settings)
    if node is None:
        return None
    return lambda: reconcile_node(node, registry, store)


def promote_registered_version(
    settings: Settings,
    store: Store,
    registry: Any,
    model_name: str,
    version: int,
    *,
    timeout: float = PROMOTION_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Make ``model_name`` version ``version`` the stable version, if its champion still serves.

    Idempotent: a retry after the version became stable only waits for the nodes to converge; a retry
    after it was superseded reports that again.

    Returns:
        ``model_name``, ``version``, ``outcome`` (``stable``, ``already stable`` or ``superseded``),
        ``previous_version`` (the champion it replaced) and ``nodes``.

    Raises:
        PromotionError: the version is not promotable (rejected, not exported).
        serving.rollout.PermanentRolloutError: it fails to load or answers unlike the exported model.
        serving.rollout.RolloutError: a node could not be reached in time; nothing changed for users.
    """
    from serving.rollout import move_stable

    record = registry.get_version(model_name, version)
    target = registry.serving_target(model_name)
    if record.status == "superseded":
        stable = target.stable if target else None
        return {"model_name": model_name, "version": version, "outcome": "superseded", "previous_version": None,
                "stable": stable, "nodes": []}
    if record.status not in ("candidate", "serving"):
        raise PromotionError(
            f"{model_name} v{version} is {record.status}; only a candidate that passed the gate can be promoted"
        )
    if not record.artifact_uri:
        raise PromotionError(f"{model_name} v{version} has no exported artifact; run export_model first")
    champion = gated_champion(record, target)
    result = move_stable(
        registry, model_name, version, expected_stable=champion,
        reconcile_local=local_reconciler(settings, store, registry), timeout=timeout, purpose="promotion",
    )
    return {"model_name": model_name, "version": version, "outcome": result["outcome"],
            "previous_version": result["previous"], "stable": result["stable"], "nodes": result["nodes"]}


def rollback_version(
    settings: Settings,
    store: Store,
    registry: Any,
    model_name: str,
    to_version: int | None = None,
    *,
    timeout: float = PROMOTION_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Make an earlier (or any servable) version stable again, through the same protocol as a promotion.

    Args:
        to_version: the version to serve; default the stable version before the current one (see
            :func:`resolve_rollback_version`).

    Raises:
        PromotionError: nothing to roll back to, or the version cannot be served (rejected, not exported).
        VersionNotFound: ``to_version`` is not in the registry.
        serving.rollout.RolloutError: as for a promotion; the current stable version keeps serving.
    """
    from serving.rollout import move_stable

    plan = resolve_rollback_version(registry, model_name, to_version)
    to_version = plan["version"]
    result = move_stable(
        registry, model_name, to_version, expected_stable=plan["stable"],
        reconcile_local=local_reconciler(settings, store, registry), timeout=timeout, purpose="rollback",
    )
    return {"model_name": model_name, "version": to_version, "outcome": result["outcome"],
            "previous_version": plan["stable"], "stable": result["stable"], "nodes": result["nodes"]}


def resolve_rollback_version(registry: Any, model_name: str, to_version: int | None = None) -> dict[str, Any]:
    """The version a rollback of ``model_name`` would serve, checked, without changing anything.

    A caller that may run twice (a retried task) resolves the version once and then rolls to it by number:
    "the previous stable version" names another version once the rollback has happened.

    Args:
        to_version: the version to serve; default the stable version before the current one (the
            desired state's ``previous``, else the newest retired version).

    Returns:
        ``model_name``, ``version`` (the one to serve) and ``stable`` (the one serving now).

    Raises:
        PromotionError: nothing to roll back to, or the version cannot be served (rejected, not exported).
        VersionNotFound: ``to_version`` is not in the registry.
    """
    target = registry.serving_target(model_name)
    if target is None or target.stable is None:
        raise PromotionError(f"{model_name} has no stable version yet: there is nothing to roll back from")
    if to_version is None:
        to_version = target.previous
        if to_version is None:
            retired = [v.version for v in registry.list_versions(model_name, status="retired")]
            if not retired:
                raise PromotionError(
                    f"{model_name} has no earlier version to roll back to; name the version to serve "
                    "(maas rollback --to VERSION, or the version param of maas_rollback)"
                )
            to_version = max(retired)
    record = registry.get_version(model_name, to_version)
    if record.status not in ("retired", "superseded", "candidate", "serving") or not record.artifact_uri:
        raise PromotionError(
            f"{model_name} v{to_version} is {record.status}{'' if record.artifact_uri else ' and was never exported'}; "
            "only a version that passed the gate and was exported can serve"
        )
    return {"model_name": model_name, "version": to_version, "stable": target.stable}
