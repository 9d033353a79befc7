"""Promote: put an exported, gated model version in front of users and record it in the registry.

The serving side (``serving.promotion``) copies the version onto the serving volume, verifies it,
renames it into place, rewrites the model server's config and waits until the version is AVAILABLE.
This module adds the registry's side: only a version that passed the gate and was exported may be
promoted, the registry marks it serving (retiring the previous one) only once the server answers
with it, and a failed promotion is logged as an event and leaves the previous version serving.
"""

from __future__ import annotations

from typing import Any

from maas_tasks.config import Settings
from maas_tasks.export import version_prefix
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

PROMOTION_TIMEOUT_SECONDS = 300.0


class PromotionError(RuntimeError):
    """The version cannot be promoted; the message says why and what still serves."""


def promote_registered_version(
    settings: Settings,
    store: Store,
    registry: Any,
    model_name: str,
    version: int,
    *,
    timeout: float = PROMOTION_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Serve ``model_name`` version ``version`` and mark it serving in the registry.

    Idempotent: promoting the version that already serves re-verifies it and changes nothing else.

    Raises:
        PromotionError: the version is not promotable (rejected, retired, not exported) or the
            server did not make it AVAILABLE; the previous version keeps serving.
    """
    import_tensorflow()  # serving.promotion reads TF Serving's config protos, which import TensorFlow
    from serving.promotion import promote_version

    record = registry.get_version(model_name, version)
    if record.status not in ("candidate", "serving"):
        raise PromotionError(
            f"{model_name} v{version} is {record.status}; only a candidate that passed the gate can be promoted"
        )
    if not record.artifact_uri:
        raise PromotionError(f"{model_name} v{version} has no exported artifact; run export_model first")
    previous = registry.serving_version(model_name)
    try:
        result = promote_version(
            store,
            version_prefix(model_name, version),
            model_name=model_name,
            version=version,
            serving_dir=settings.serving_dir,
            config_path=settings.serving_config,
            grpc_target=settings.grpc_target,
            timeout=timeout,
        )
    except Exception as exc:
        registry.record_event(
            "promotion_failed",
            model_name=model_name,
            version=version,
            detail={"message": str(exc), "serving": previous, "dag_run_id": record.dag_run_id},
        )
        raise PromotionError(
            f"promoting {model_name} v{version} failed: {exc}; "
            + (f"v{previous} keeps serving" if previous else "no version was serving")
        ) from exc
    if record.status != "serving":
        registry.mark_serving(model_name, version)
    return {
        "model_name": model_name,
        "version": version,
        "previous_version": previous,
        "serving_path": str(result["path"]),
    }
