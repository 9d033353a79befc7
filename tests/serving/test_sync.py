"""The node agent: one pass makes a model server serve the registry's desired state, repairs the serving
volume from the store, verifies canaries with their golden requests, prunes, and reports."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from maas_tasks.storage import FileStore, upload_tree
from serving.client import ServingClientError, get_model_status_grpc, predict_grpc
from serving.model_config import get_model_entry, read_model_config, single_model_config, write_model_config
from serving.sync import Node, canary_model_name, ensure_installed, reconcile_node, wanted_versions
from tests.fixtures.invariants import assert_registry_invariants

pytestmark = pytest.mark.integration

def served_version(node: Node, model: str = "sentiment") -> int:
    return predict_grpc(["good"], model=model, target=node.grpc_target)[0]["version"]


def test_a_pass_installs_and_serves_the_stable_version_and_reports(node, published, registry):
    v1 = published(1)
    registry.mark_serving("sentiment", v1)
    report = reconcile_node(node, registry, published.store)
    entry = report["models"]["sentiment"]
    assert report["error"] is None and entry["error"] is None
    assert entry["stable"] == {"version": v1, "state": "AVAILABLE", "error": ""} and entry["installed"] == [v1]
    assert served_version(node) == v1
    config = read_model_config(node.config_path)
    assert list(get_model_entry(config, "sentiment").model_version_policy.specific.versions) == [v1]
    [seen] = registry.serving_nodes()
    assert (seen.node_id, seen.grpc_target, seen.report["models"]["sentiment"]["generation"]) == (
        "n1", node.grpc_target, registry.serving_target("sentiment").generation
    )
    assert reconcile_node(node, registry, published.store)["models"]["sentiment"].get("repairs") is None
    assert_registry_invariants(registry)


def test_models_it_does_not_manage_are_left_in_the_config(node, published, registry, install_model):
    install_model(node.serving_dir / "other", 1)
    write_model_config(node.config_path, single_model_config("other", node.serving_dir / "other"))
    registry.mark_serving("sentiment", published(1))
    reconcile_node(node, registry, published.store)
    assert {e.name for e in read_model_config(node.config_path).model_config_list.config} == {"other", "sentiment"}
    assert served_version(node, "other") == 1


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["changed-file", "same-size-and-mtime"])
def test_a_corrupt_installed_copy_is_installed_again(node, published, registry, keep_mtime):
    v1 = published(1)
    registry.mark_serving("sentiment", v1)
    reconcile_node(node, registry, published.store)
    variables = next((node.serving_dir / "sentiment" / str(v1) / "variables").glob("variables.data-*"))
    stat = variables.stat()
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF
    variables.write_bytes(bytes(data))
    if keep_mtime:  # bit rot: only a full (sha256) check can see it
        os.utime(variables, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert "repairs" not in reconcile_node(node, registry, published.store)["models"]["sentiment"]
    report = reconcile_node(node, registry, published.store, deep=keep_mtime)
    assert report["models"]["sentiment"]["repairs"] == [f"v{v1} repaired: variables/{variables.name} differs in size or sha256"]
    assert variables.read_bytes() == (published.store.root / f"models/sentiment/{v1}/variables/{variables.name}").read_bytes()
    assert not [p for p in (node.serving_dir / "sentiment").iterdir() if p.name.startswith((".incoming", ".corrupt"))]


def test_a_canary_loads_beside_stable_and_never_takes_unversioned_requests(node, published, registry):
    v1, v2 = published(1), published(2)
    registry.mark_serving("sentiment", v1)
    registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=60)
    report = reconcile_node(node, registry, published.store)
    canary = report["models"]["sentiment"]["canary"]
    assert canary == {"version": v2, "state": "AVAILABLE", "error": "", "golden": "ok"}
    assert served_version(node) == v1  # the newest version, yet not answering requests that name none
    assert predict_grpc(["good"], model=canary_model_name("sentiment"), target=node.grpc_target)[0]["version"] == v2


def test_a_canary_answering_unlike_its_export_fails_its_golden_requests(node, published, registry, tmp_path):
    v1, v2 = published(1), published(2)
    golden = published.store.root / f"models/sentiment/{v2}/assets.extra/maas_golden.json"
    # Publish v2 with the golden answers of v1's model (the manifest stays consistent): a wrong model.
    export = tmp_path / "export" / "sentiment" / str(v2)
    shutil.copy(tmp_path / "export" / "sentiment" / str(v1) / "assets.extra" / "maas_golden.json", export / "assets.extra")
    upload_tree(published.store, export, f"models/sentiment/{v2}")
    assert golden.read_bytes() == (export / "assets.extra" / "maas_golden.json").read_bytes()
    registry.mark_serving("sentiment", v1)
    registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=60)
    canary = reconcile_node(node, registry, published.store)["models"]["sentiment"]["canary"]
    assert canary["state"] == "AVAILABLE" and canary["golden"].startswith("mismatch: golden request 0 ('good')")


def test_an_unreachable_server_is_reported(tmp_path, published, registry):
    from tests.fixtures.postgres import find_free_port

    registry.mark_serving("sentiment", published(1))
    down = Node("n2", tmp_path / "serving2", tmp_path / "serving2" / "models.config", f"127.0.0.1:{find_free_port()}")
    report = reconcile_node(down, registry, published.store, timeout=2)
    assert report["error"].startswith(f"cannot reach the model server at {down.grpc_target}")
    assert report["models"]["sentiment"]["error"] == f"cannot reach the model server at {down.grpc_target}"
    # The volume and the config file are ready for when the server comes up.
    assert (down.serving_dir / "sentiment" / "1" / "saved_model.pb").is_file()
    assert get_model_entry(read_model_config(down.config_path), "sentiment") is not None


def test_an_abandoned_canary_is_freed_when_its_lease_runs_out(node, published, registry):
    v1, v2 = published(1), published(2)
    registry.mark_serving("sentiment", v1)
    registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=0.5)
    reconcile_node(node, registry, published.store)
    import time

    time.sleep(1)
    report = reconcile_node(node, registry, published.store)
    assert registry.serving_target("sentiment").canary is None and "canary" not in report["models"]["sentiment"]
    assert [e.kind for e in registry.list_events(model_name="sentiment", version=v2)][-1] == "canary_expired"
    # The canary model is gone from the server: as in TF Serving, its versions are reported in END.
    rows = get_model_status_grpc(canary_model_name("sentiment"), target=node.grpc_target)
    assert {row["state"] for row in rows} == {"END"}
    with pytest.raises(ServingClientError, match="NOT_FOUND"):
        predict_grpc(["good"], model=canary_model_name("sentiment"), target=node.grpc_target)
    assert_registry_invariants(registry)


def test_pruning_keeps_stable_previous_pinned_and_loaded_versions(node, published, registry):
    versions = [published(1), published(2), published(1), published(2), published(1)]
    registry.set_pinned("sentiment", versions[0], True)
    for version in versions:
        registry.mark_serving("sentiment", version, grace_seconds=3600)
        report = reconcile_node(node, registry, published.store)
    # v5 stable, v4 previous (in its grace, loaded for requests naming it), v1 pinned: v2 and v3 are gone.
    on_disk = sorted(int(p.name) for p in (node.serving_dir / "sentiment").iterdir() if p.name.isdigit())
    assert on_disk == [versions[0], versions[3], versions[4]]
    assert report["models"]["sentiment"]["previous"]["state"] == "AVAILABLE"
    assert predict_grpc(["good"], model="sentiment", target=node.grpc_target, version=versions[3])[0]["version"] == versions[3]


def test_the_previous_stable_stays_loaded_during_its_grace_only_when_older():
    now = datetime.now(timezone.utc)
    later = now + timedelta(minutes=5)
    target = SimpleNamespace(model_name="m", stable=5, canary=None, previous=4, previous_until=later)
    assert wanted_versions(target, now) == {"m": [4, 5]}
    assert wanted_versions(SimpleNamespace(**{**vars(target), "previous_until": now - timedelta(1)}), now) == {"m": [5]}
    # After a rollback the previous stable is newer: it would take the requests naming no version.
    assert wanted_versions(SimpleNamespace(**{**vars(target), "stable": 3}), now) == {"m": [3]}
    assert wanted_versions(SimpleNamespace(**{**vars(target), "canary": 6}), now) == {"m": [4, 5], "m__canary": [6]}


def test_ensure_installed_needs_the_version_in_the_store(tmp_path):
    from maas_tasks.storage import StoreError

    with pytest.raises(StoreError):
        ensure_installed(FileStore(tmp_path / "store"), "models/m/1", tmp_path / "serving" / "m", 1)
    assert not (tmp_path / "serving" / "m" / "1").exists()


def test_a_version_the_store_cannot_give_leaves_the_node_serving_what_it_serves(node, published, registry):
    v1, v2 = published(1), published(2)
    registry.mark_serving("sentiment", v1)
    reconcile_node(node, registry, published.store)
    shutil.rmtree(published.store.root / f"models/sentiment/{v2}")  # lost from the store (or unreachable)
    registry.mark_serving("sentiment", v2)
    report = reconcile_node(node, registry, published.store)
    entry = report["models"]["sentiment"]
    assert entry["install_errors"][str(v2)]["permanent"] is True and "has no MANIFEST.json" in entry["error"]
    assert served_version(node) == v1  # never pointed at a version it cannot find
    assert list(get_model_entry(read_model_config(node.config_path), "sentiment").model_version_policy.specific.versions) == [v1]
