"""The rollout protocol on a real registry and model server: canary, verify, commit; superseded instead of
replacing a newer version; any failure gives the desired state back; no request fails across swaps."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from maas_tasks.storage import upload_tree
from serving.client import predict_grpc, predict_rest
from serving.rollout import PermanentRolloutError, RolloutError, move_stable
from serving.sync import Node, reconcile_node
from tests.fixtures.invariants import assert_registry_invariants

pytestmark = pytest.mark.integration


@pytest.fixture
def rollout(node, published, registry):
    """``rollout(version, expected_stable, **kw)``: move_stable with this node reconciled directly."""

    def run(version, expected_stable, **kwargs):
        kwargs.setdefault("timeout", 30)
        return move_stable(
            registry, "sentiment", version, expected_stable=expected_stable,
            reconcile_local=lambda: reconcile_node(node, registry, published.store, timeout=kwargs["timeout"]),
            **kwargs,
        )

    return run


def served_version(node: Node) -> int:
    return predict_grpc(["good"], model="sentiment", target=node.grpc_target)[0]["version"]


def test_promotions_make_each_version_stable_on_the_node(rollout, node, published, registry):
    v1, v2 = published(1), published(2)
    assert rollout(v1, None) == {"outcome": "stable", "stable": v1, "previous": None, "nodes": ["n1"]}
    assert served_version(node) == v1
    result = rollout(v2, v1, grace_seconds=3600)
    assert result["outcome"] == "stable" and served_version(node) == v2
    # The previous version stays loaded for requests that name it.
    assert predict_grpc(["good"], model="sentiment", target=node.grpc_target, version=v1)[0]["version"] == v1
    assert [v.status for v in registry.list_versions("sentiment")] == ["retired", "serving"]
    assert rollout(v2, v1)["outcome"] == "already stable"  # a retried promotion changes nothing
    kinds = [e.kind for e in registry.list_events(model_name="sentiment", version=v2)]
    assert kinds[-2:] == ["canary", "serving"]
    assert_registry_invariants(registry)


def test_a_version_gated_against_an_older_champion_is_superseded(rollout, node, published, registry):
    v1, v2, v3 = published(1), published(2), published(1)
    rollout(v1, None)
    rollout(v2, v1)
    # v3 was gated while v1 served; v2 is newer and stays.
    assert rollout(v3, v1) == {"outcome": "superseded", "stable": v2, "previous": None, "nodes": [], "by": v2}
    assert registry.get_version("sentiment", v3).status == "superseded" and served_version(node) == v2
    assert registry.serving_target("sentiment").canary is None
    assert_registry_invariants(registry)


def test_two_promotions_racing_end_with_one_stable_and_one_superseded(rollout, node, published, registry, pg_dsn):
    from maas_tasks.registry import Registry

    v1, v2, v3 = published(1), published(2), published(1)
    rollout(v1, None)
    results = {}

    def promote(version: int) -> None:  # each run has its own registry connection, as separate tasks do
        with Registry.connect(pg_dsn) as own:
            results[version] = move_stable(
                own, "sentiment", version, expected_stable=v1, timeout=60,
                reconcile_local=lambda: reconcile_node(node, own, published.store),
            )

    threads = [threading.Thread(target=promote, args=(v,)) for v in (v2, v3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    outcomes = sorted(r["outcome"] for r in results.values())
    assert outcomes == ["stable", "superseded"]
    winner = next(v for v, r in results.items() if r["outcome"] == "stable")
    assert registry.serving_target("sentiment").stable == winner == served_version(node)
    assert_registry_invariants(registry)


def test_a_golden_mismatch_gives_the_canary_slot_back(rollout, node, published, registry, tmp_path):
    v1, v2 = published(1), published(2)
    rollout(v1, None)
    # Publish v2 with v1's golden answers: the served v2 answers unlike what its export recorded.
    export = tmp_path / "export" / "sentiment" / str(v2)
    shutil.copy(tmp_path / "export" / "sentiment" / str(v1) / "assets.extra" / "maas_golden.json", export / "assets.extra")
    upload_tree(published.store, export, f"models/sentiment/{v2}")
    with pytest.raises(PermanentRolloutError, match="golden requests: mismatch"):
        rollout(v2, v1)
    target = registry.serving_target("sentiment")
    assert (target.stable, target.canary) == (v1, None) and served_version(node) == v1
    event = registry.list_events(model_name="sentiment", version=v2)[-1]
    assert event.kind == "canary_aborted" and "mismatch" in event.detail["reason"]
    assert registry.get_version("sentiment", v2).status == "candidate"
    assert_registry_invariants(registry)


def test_a_version_that_fails_to_load_never_serves(rollout, node, published, registry, tmp_path):
    v1 = published(1)
    rollout(v1, None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"published intact, but not a SavedModel")
    v2 = registry.register_version("sentiment", status="candidate")
    upload_tree(published.store, broken, f"models/sentiment/{v2}")
    registry.set_artifact("sentiment", v2, published.store.uri(f"models/sentiment/{v2}"))
    with pytest.raises(PermanentRolloutError, match=f"sentiment v{v2} on node n1: "):
        rollout(v2, v1)
    assert registry.serving_target("sentiment").stable == v1 and served_version(node) == v1
    assert_registry_invariants(registry)


def test_a_node_down_fails_the_promotion_fast_and_it_can_be_promoted_when_back(
    node, published, registry, tmp_path, start_server
):
    from serving.model_config import read_model_config

    v1, v2 = published(1), published(2)
    move_stable(registry, "sentiment", v1, expected_stable=None,
                reconcile_local=lambda: reconcile_node(node, registry, published.store), timeout=30)
    from tests.fixtures.postgres import find_free_port

    down = Node(node.node_id, node.serving_dir, node.config_path, f"127.0.0.1:{find_free_port()}")
    started = time.monotonic()
    with pytest.raises(RolloutError, match="node n1: cannot reach the model server"):
        move_stable(registry, "sentiment", v2, expected_stable=v1,
                    reconcile_local=lambda: reconcile_node(down, registry, published.store, timeout=2), timeout=30)
    assert time.monotonic() - started < 20  # not the whole timeout
    assert (registry.serving_target("sentiment").stable, registry.get_version("sentiment", v2).status) == (v1, "candidate")
    # The node comes back (a new server on the same volume and config) and converges on v1; v2 can go later.
    back = start_server(read_model_config(node.config_path))
    node_back = Node(node.node_id, node.serving_dir, node.config_path, back.grpc_target)
    assert reconcile_node(node_back, registry, published.store)["models"]["sentiment"]["stable"]["version"] == v1
    result = move_stable(registry, "sentiment", v2, expected_stable=v1,
                         reconcile_local=lambda: reconcile_node(node_back, registry, published.store), timeout=30)
    assert result["outcome"] == "stable" and served_version(node_back) == v2
    assert_registry_invariants(registry)


def test_no_request_fails_across_two_promotions_and_a_rollback(rollout, node, published, registry):
    v1, v2, v3 = published(1), published(2), published(1)
    rollout(v1, None)
    stop, failures, answered = threading.Event(), [], {"rest": set(), "grpc": set()}

    def client(kind: str) -> None:
        while not stop.is_set():
            try:
                if kind == "rest":
                    row = predict_rest(["good"], model="sentiment", rest_url=node.rest_url)[0]
                else:
                    row = predict_grpc(["good"], model="sentiment", target=node.grpc_target)[0]
                answered[kind].add(row["version"])
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                failures.append(f"{kind}: {exc}")

    clients = [threading.Thread(target=client, args=(kind,)) for kind in ("rest", "grpc", "rest", "grpc")]
    for thread in clients:
        thread.start()
    try:
        rollout(v2, v1, grace_seconds=0)
        rollout(v3, v2, grace_seconds=0)
        rollout(v2, v3, grace_seconds=0, purpose="rollback")  # back to an older version number
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert failures == []
    assert answered["rest"] >= {v1, v2} and answered["grpc"] >= {v1, v2}
    assert served_version(node) == v2
    assert_registry_invariants(registry)


def test_golden_requests_ship_inside_the_version(published, registry):
    version = published(2)
    golden = json.loads((published.store.root / f"models/sentiment/{version}/assets.extra/maas_golden.json").read_text())
    assert golden["inputs"][:2] == ["good", "bad film"] and len(golden["scores"]) == len(golden["inputs"])
    assert golden["label"][0] == "positive" and 0 < golden["tolerance"] < 0.01
