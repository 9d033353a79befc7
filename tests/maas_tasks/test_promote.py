"""Promotion bookkeeping: only gated, exported versions are promoted, and a failed promotion is on record."""

from __future__ import annotations

import pytest

from maas_tasks.config import load_settings
from maas_tasks.promote import PromotionError, promote_registered_version
from maas_tasks.registry import Registry
from maas_tasks.storage import FileStore
from tests.fixtures.postgres import find_free_port


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


@pytest.fixture
def settings(tmp_path):
    # Nothing listens on this gRPC port: any promotion that gets as far as the server fails.
    return load_settings({"MAAS_HOME": str(tmp_path), "MAAS_GRPC_PORT": str(find_free_port())})


def test_a_rejected_version_is_never_promoted(registry, settings, tmp_path):
    version = registry.register_version("m", status="rejected", metrics={"accuracy": 0.4})
    with pytest.raises(PromotionError, match="is rejected; only a candidate that passed the gate"):
        promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", version)
    assert registry.get_version("m", version).status == "rejected"


def test_a_version_without_an_export_is_not_promoted(registry, settings, tmp_path):
    version = registry.register_version("m", status="candidate")
    with pytest.raises(PromotionError, match="has no exported artifact"):
        promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", version)


def test_a_failed_promotion_is_logged_and_leaves_the_serving_version(registry, settings, tmp_path):
    v1 = registry.register_version("m", status="candidate", artifact_uri="file:///models/m/1", dag_run_id="r1")
    registry.mark_serving("m", v1)
    v2 = registry.register_version("m", status="candidate", artifact_uri="file:///models/m/2", dag_run_id="r2")
    # The store holds no published v2, so the copy step fails before the server is even asked.
    with pytest.raises(PromotionError, match=f"promoting m v{v2} failed: .*; v{v1} keeps serving"):
        promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", v2, timeout=2)
    assert registry.serving_version("m") == v1
    assert registry.get_version("m", v2).status == "candidate"
    events = [e for e in registry.list_events(model_name="m") if e.kind == "promotion_failed"]
    assert len(events) == 1 and events[0].version == v2
    assert events[0].detail["serving"] == v1 and events[0].detail["dag_run_id"] == "r2"
