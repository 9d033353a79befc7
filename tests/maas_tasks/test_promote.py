"""Promotion and rollback bookkeeping: what may be promoted or rolled to, against which champion, and what a
failed promotion leaves (the desired state as it was, and why on record)."""

from __future__ import annotations

import pytest

from maas_tasks.config import load_settings
from maas_tasks.promote import PromotionError, gated_champion, promote_registered_version, rollback_version
from maas_tasks.registry import Registry
from maas_tasks.storage import FileStore
from serving.rollout import PermanentRolloutError, RolloutError
from tests.fixtures.invariants import assert_registry_invariants
from tests.fixtures.postgres import find_free_port


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


@pytest.fixture
def saved_model_dir(tmp_path):
    """Any directory passes for a version here: no server ever loads it."""
    path = tmp_path / "export"
    path.mkdir()
    (path / "saved_model.pb").write_bytes(b"not loaded in these tests")
    return path


@pytest.fixture
def settings(tmp_path):
    # Nothing listens on this gRPC port: a promotion that gets as far as the model server fails there.
    return load_settings({"MAAS_HOME": str(tmp_path), "MAAS_GRPC_PORT": str(find_free_port())})


def exported(registry, model="m", metrics=None) -> int:
    version = registry.register_version(model, status="candidate", metrics=metrics or {})
    registry.set_artifact(model, version, f"file:///store/models/{model}/{version}")
    return version


def test_a_rejected_version_is_never_promoted(registry, settings, tmp_path):
    version = registry.register_version("m", status="rejected", metrics={"accuracy": 0.4})
    with pytest.raises(PromotionError, match="is rejected; only a candidate that passed the gate"):
        promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", version)
    assert registry.get_version("m", version).status == "rejected"


def test_a_version_without_an_export_is_not_promoted(registry, settings, tmp_path):
    version = registry.register_version("m", status="candidate")
    with pytest.raises(PromotionError, match="has no exported artifact"):
        promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", version)


def test_the_champion_is_the_stable_version_at_the_gate(registry):
    v1 = exported(registry)
    registry.mark_serving("m", v1)
    gated = registry.get_version("m", exported(registry, metrics={"gate": {"passed": True, "champion": None}}))
    assert gated_champion(gated, registry.serving_target("m")) is None  # gated when nothing served
    legacy = registry.get_version("m", exported(registry, metrics={"gate": {"passed": True}}))
    assert gated_champion(legacy, registry.serving_target("m")) == v1


def test_a_promotion_gated_against_an_older_champion_is_superseded_not_failed(registry, settings, tmp_path):
    v1, v2 = exported(registry), exported(registry)
    registry.mark_serving("m", v1)
    v3 = exported(registry, metrics={"gate": {"passed": True, "champion": v1}})
    registry.mark_serving("m", v2)
    result = promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", v3)
    assert (result["outcome"], result["stable"]) == ("superseded", v2)
    assert registry.get_version("m", v3).status == "superseded"
    # A retry of the task says the same, and changes nothing.
    assert promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", v3)["outcome"] == "superseded"
    assert_registry_invariants(registry)


def test_a_version_missing_from_the_store_fails_at_once(registry, settings, tmp_path):
    v1 = exported(registry)
    registry.mark_serving("m", v1)
    v2 = exported(registry, metrics={"gate": {"passed": True, "champion": v1}})
    with pytest.raises(PermanentRolloutError, match=f"v{v2} cannot be installed: .* has no MANIFEST.json"):
        promote_registered_version(settings, FileStore(tmp_path / "s"), registry, "m", v2, timeout=5)
    assert registry.serving_target("m").canary is None


def test_a_promotion_whose_node_is_down_leaves_the_desired_state_and_says_why(
    registry, settings, tmp_path, saved_model_dir
):
    from maas_tasks.storage import upload_tree

    store = FileStore(tmp_path / "s")
    v1 = exported(registry)
    registry.mark_serving("m", v1)
    v2 = exported(registry, metrics={"gate": {"passed": True, "champion": v1}})
    for version in (v1, v2):
        upload_tree(store, saved_model_dir, f"models/m/{version}")
    with pytest.raises(RolloutError, match="cannot reach the model server"):
        promote_registered_version(settings, store, registry, "m", v2, timeout=5)
    target = registry.serving_target("m")
    assert (target.stable, target.canary, registry.get_version("m", v2).status) == (v1, None, "candidate")
    aborted = registry.list_events(model_name="m", version=v2)[-1]
    assert aborted.kind == "canary_aborted" and aborted.detail["purpose"] == "promotion"
    assert "cannot" in aborted.detail["reason"]
    assert_registry_invariants(registry)


def test_rollback_goes_to_the_previous_stable_version_by_default(registry, settings, tmp_path):
    with pytest.raises(PromotionError, match="has no stable version yet"):
        rollback_version(settings, FileStore(tmp_path / "s"), registry, "m")
    v1, v2 = exported(registry), exported(registry)
    registry.mark_serving("m", v1)
    with pytest.raises(PromotionError, match="no earlier version to roll back to"):
        rollback_version(settings, FileStore(tmp_path / "s"), registry, "m")
    registry.mark_serving("m", v2)
    rejected = registry.register_version("m", status="rejected")
    with pytest.raises(PromotionError, match=f"m v{rejected} is rejected"):
        rollback_version(settings, FileStore(tmp_path / "s"), registry, "m", rejected)
    # The protocol starts with v1 as canary; with no model server up it stops there, and v2 stays.
    with pytest.raises(RolloutError):
        rollback_version(settings, FileStore(tmp_path / "s"), registry, "m", timeout=5)
    assert registry.list_events(model_name="m", version=v1)[-2].kind == "canary"
    assert registry.serving_target("m").stable == v2
