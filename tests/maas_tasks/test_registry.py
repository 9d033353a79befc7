"""Tests of the model registry against a real PostgreSQL database: migrations, snapshots, race-free
version allocation, the status lifecycle, and the append-only event log."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from maas_tasks.registry import (
    IllegalTransition,
    Migration,
    Registry,
    RegistryError,
    RegistryUnavailable,
    VersionNotFound,
    load_migrations,
    migrate,
)
from tests.fixtures.postgres import find_free_port

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


def _run_in_threads(count: int, work) -> list:
    """Run ``work(index)`` on ``count`` threads released together; re-raise the first failure."""
    barrier = threading.Barrier(count)

    def start(index: int):
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(start, range(count)))


def _applied_migrations(dsn: str) -> list[tuple[int, str]]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        rows = cur.fetchall()
    conn.close()
    return rows


def test_migrations_are_numbered_files_in_order():
    migrations = load_migrations()
    assert migrations[0].name == "0001_initial.sql"
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})


def test_migrate_is_idempotent(pg_dsn):
    expected = [(m.version, m.name) for m in load_migrations()]
    conn = psycopg2.connect(pg_dsn)
    try:
        assert migrate(conn) == [v for v, _ in expected]
        assert migrate(conn) == []
    finally:
        conn.close()
    Registry.connect(pg_dsn).close()
    assert _applied_migrations(pg_dsn) == expected


def test_concurrent_migrations_apply_each_file_once(pg_dsn):
    def start_registry(_: int) -> list[int]:
        conn = psycopg2.connect(pg_dsn)
        try:
            return migrate(conn)
        finally:
            conn.close()

    results = _run_in_threads(4, start_registry)
    versions = [m.version for m in load_migrations()]
    assert sorted(results, key=len) == [[], [], [], versions]
    assert [v for v, _ in _applied_migrations(pg_dsn)] == versions


def test_migrate_refuses_an_edited_migration(pg_dsn):
    Registry.connect(pg_dsn).close()
    first, *rest = load_migrations()
    edited = Migration(first.version, first.name, first.sql + "\n-- edited\n")
    conn = psycopg2.connect(pg_dsn)
    try:
        with pytest.raises(RegistryError, match="changed after it was applied"):
            migrate(conn, [edited, *rest])
        with pytest.raises(RegistryError, match="does not know"):
            migrate(conn, [])
    finally:
        conn.close()


def test_record_snapshot_is_idempotent_on_content(registry):
    first = registry.record_snapshot(
        "file:///store/snapshots/a.csv", SHA_A, 120, "sample", {"labels": 2}, columns=["text", "label"]
    )
    again = registry.record_snapshot("file:///elsewhere/a.csv", SHA_A, 120, "sample", {})
    other = registry.record_snapshot("file:///store/snapshots/b.csv", SHA_B, 7, "upload")
    assert again == first != other
    snapshot = registry.get_snapshot(first)
    assert (snapshot.uri, snapshot.rows, snapshot.source) == ("file:///store/snapshots/a.csv", 120, "sample")
    assert snapshot.columns == ["text", "label"] and snapshot.metadata == {"labels": 2}
    assert len(registry.list_events(kind="snapshot_recorded")) == 2


def test_snapshots_of_a_source_are_its_batches_with_a_watermark(registry):
    source = "postgresql://db/reviews"
    assert registry.get_watermark(source) is None
    first = registry.record_snapshot("file:///s/a", SHA_A, 10, "reviews", source_uri=source,
                                     schema={"text": "string"}, watermark=("updated_at", "2026-01-01"))
    registry.record_snapshot("file:///s/other", SHA_B, 3, "other.csv", source_uri="file:///other.csv")
    second = registry.record_snapshot("file:///s/b", SHA_C, 4, "reviews", source_uri=source,
                                      watermark=("updated_at", "2026-02-01"))
    assert registry.get_watermark(source) == ("updated_at", "2026-02-01")
    assert [s.id for s in registry.list_snapshots(source)] == [first, second]
    assert [s.id for s in registry.list_snapshots(source, last=1)] == [second]
    assert len(registry.list_snapshots()) == 3
    got = registry.get_snapshot(first)
    assert (got.source_uri, got.schema, got.watermark) == (source, {"text": "string"}, "2026-01-01")
    # Recording the same content again neither adds a batch nor moves the watermark back.
    assert registry.record_snapshot("file:///s/a", SHA_A, 10, "reviews", source_uri=source,
                                    watermark=("updated_at", "2026-01-01")) == first
    assert registry.get_watermark(source) == ("updated_at", "2026-02-01")
    assert registry.find_snapshot(SHA_B).source == "other.csv" and registry.find_snapshot("f" * 64) is None
    with pytest.raises(RegistryError, match="needs the source_uri"):
        registry.record_snapshot("file:///s/c", "c" * 64, 1, "x", watermark=("id", "3"))


def test_snapshot_reports_are_recorded_and_replaced(registry):
    snapshot_id = registry.record_snapshot("file:///s/a", SHA_A, 10, "a.csv")
    registry.set_snapshot_reports(snapshot_id, validation={"success": True}, docs_uri="file:///d/index.html",
                                  quarantine_uri="file:///q.parquet", quarantined_rows=2)
    registry.set_snapshot_reports(snapshot_id, quarantined_rows=3, drift={"flagged": False}, drift_uri="file:///drift.json")
    got = registry.get_snapshot(snapshot_id)
    assert (got.validation, got.docs_uri, got.quarantine_uri, got.quarantined_rows) == (
        {"success": True}, "file:///d/index.html", "file:///q.parquet", 3)
    assert (got.drift, got.drift_uri) == ({"flagged": False}, "file:///drift.json")
    with pytest.raises(RegistryError, match="unknown snapshot report"):
        registry.set_snapshot_reports(snapshot_id, colour="red")
    with pytest.raises(RegistryError, match="no data snapshot with id 999"):
        registry.set_snapshot_reports(999, quarantined_rows=1)


def test_a_failed_run_marks_the_snapshots_it_recorded(registry):
    mine = registry.record_snapshot("file:///s/a", SHA_A, 10, "a.csv", {"dag_run_id": "run-7"})
    other = registry.record_snapshot("file:///s/b", SHA_B, 10, "b.csv", {"dag_run_id": "run-8"})
    assert registry.mark_run_failed("run-7", tasks=["build_features"], reason="too few rows") == [mine]
    assert registry.get_snapshot(mine).metadata["failed_run"] == {
        "dag_run_id": "run-7", "tasks": ["build_features"], "reason": "too few rows"}
    assert "failed_run" not in registry.get_snapshot(other).metadata
    (event,) = registry.list_events(kind="run_failed")
    assert event.detail["snapshots"] == [mine] and event.detail["dag_run_id"] == "run-7"


def test_record_snapshot_rejects_bad_hash(registry):
    with pytest.raises(RegistryError, match="64 lowercase hex"):
        registry.record_snapshot("file:///x.csv", "ABC", 1, "sample")


def test_register_version_records_everything(registry):
    snapshot_id = registry.record_snapshot("file:///a.csv", SHA_A, 10, "sample")
    version = registry.register_version(
        "sentiment", status="candidate", metrics={"accuracy": 0.91}, snapshot_id=snapshot_id, dag_run_id="run-1"
    )
    assert version == 1
    assert registry.register_version("other-model", metrics={}) == 1
    got = registry.get_version("sentiment", 1)
    assert (got.status, got.metrics, got.snapshot_id, got.dag_run_id) == ("candidate", {"accuracy": 0.91}, 1, "run-1")
    assert got.artifact_uri is None

    registry.set_artifact("sentiment", 1, "s3://models/sentiment/1")
    updated = registry.get_version("sentiment", 1)
    assert updated.artifact_uri == "s3://models/sentiment/1"
    assert updated.updated_at >= got.updated_at
    assert [e.kind for e in registry.list_events(model_name="sentiment")] == ["registered", "artifact_set"]
    with pytest.raises(VersionNotFound):
        registry.set_artifact("sentiment", 99, "s3://nowhere")


def test_register_version_must_start_as_candidate_or_rejected(registry):
    with pytest.raises(IllegalTransition, match="mark_serving"):
        registry.register_version("sentiment", status="serving")
    assert registry.register_version("sentiment", status="rejected") == 1


def test_concurrent_allocations_never_collide_or_skip(pg_dsn):
    Registry.connect(pg_dsn).close()

    def allocate(_: int) -> list[int]:
        with Registry(pg_dsn) as reg:
            return [reg.register_version("sentiment", metrics={}) for _ in range(25)]

    allocated = [v for chunk in _run_in_threads(8, allocate) for v in chunk]
    assert sorted(allocated) == list(range(1, 201))
    with Registry(pg_dsn) as reg:
        assert [v.version for v in reg.list_versions("sentiment")] == list(range(1, 201))


def test_rolled_back_registration_leaves_no_gap(registry):
    assert registry.register_version("sentiment") == 1
    with pytest.raises(RegistryError, match="snapshot id 424242 does not exist"):
        registry.register_version("sentiment", snapshot_id=424242)
    assert registry.register_version("sentiment") == 2
    assert [v.version for v in registry.list_versions("sentiment")] == [1, 2]
    assert len(registry.list_events(kind="registered")) == 2


def test_mark_serving_retires_the_previous_version(registry):
    for _ in range(3):
        registry.register_version("sentiment")
    assert registry.serving_version("sentiment") is None
    assert registry.mark_serving("sentiment", 1) is None
    assert registry.mark_serving("sentiment", 2) == 1
    assert registry.serving_version("sentiment") == 2
    assert {v.version: v.status for v in registry.list_versions("sentiment")} == {
        1: "retired", 2: "serving", 3: "candidate"
    }
    last_two = registry.list_events(model_name="sentiment", limit=2)
    assert [(e.kind, e.version) for e in last_two] == [("retired", 1), ("serving", 2)]
    assert last_two[1].detail == {"from": "candidate", "replaces": 1, "generation": 3}

    events_before = len(registry.list_events())
    assert registry.mark_serving("sentiment", 2) is None
    assert len(registry.list_events()) == events_before

    # Rolling back to a retired version is allowed.
    assert registry.set_status("sentiment", 1, "serving") is None
    assert registry.serving_version("sentiment") == 1
    assert registry.get_version("sentiment", 2).status == "retired"


def test_illegal_transitions_are_refused_and_change_nothing(registry):
    registry.register_version("sentiment")
    registry.register_version("sentiment")
    registry.set_status("sentiment", 1, "rejected", {"reason": "accuracy below threshold"})
    rejected = registry.list_events(kind="rejected")
    assert [(e.version, e.detail) for e in rejected] == [(1, {"from": "candidate", "reason": "accuracy below threshold"})]
    with pytest.raises(IllegalTransition, match="v1 is rejected; it cannot become serving"):
        registry.mark_serving("sentiment", 1)
    with pytest.raises(IllegalTransition, match="cannot become retired"):
        registry.set_status("sentiment", 2, "retired")
    with pytest.raises(IllegalTransition, match="unknown status"):
        registry.set_status("sentiment", 2, "deployed")
    with pytest.raises(VersionNotFound):
        registry.mark_serving("sentiment", 3)
    assert [v.status for v in registry.list_versions("sentiment")] == ["rejected", "candidate"]
    assert registry.serving_version("sentiment") is None


def test_database_allows_one_serving_version_per_model(registry, pg_dsn):
    registry.register_version("sentiment")
    registry.register_version("sentiment")
    registry.mark_serving("sentiment", 1)
    conn = psycopg2.connect(pg_dsn)
    try:
        with pytest.raises(psycopg2.errors.UniqueViolation), conn.cursor() as cur:
            cur.execute("UPDATE model_versions SET status = 'serving' WHERE version = 2")
    finally:
        conn.close()


def test_concurrent_promotions_leave_exactly_one_serving(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        for _ in range(4):
            reg.register_version("sentiment")

    def promote(index: int) -> None:
        with Registry(pg_dsn) as reg:
            for _ in range(5):
                reg.mark_serving("sentiment", index + 1)

    _run_in_threads(4, promote)
    with Registry(pg_dsn) as reg:
        statuses = [v.status for v in reg.list_versions("sentiment")]
        assert statuses.count("serving") == 1 and statuses.count("retired") == 3
        serving_events = reg.list_events(kind="serving")
        assert serving_events[-1].version == reg.serving_version("sentiment")


def test_event_log_is_append_only(registry, pg_dsn):
    event_id = registry.record_event("deployed", "sentiment", 1, {"target": "tf-serving"})
    assert [(e.id, e.kind, e.detail) for e in registry.list_events(kind="deployed")] == [
        (event_id, "deployed", {"target": "tf-serving"})
    ]
    conn = psycopg2.connect(pg_dsn)
    try:
        for statement in (
            "UPDATE model_events SET kind = 'tampered'",
            "DELETE FROM model_events",
            "TRUNCATE model_events",
        ):
            with pytest.raises(psycopg2.Error, match="append-only"):
                with conn, conn.cursor() as cur:
                    cur.execute(statement)
    finally:
        conn.close()
    assert len(registry.list_events()) == 1


def test_list_events_filters_and_keeps_the_latest(registry):
    for n in range(5):
        registry.record_event("note", "sentiment", n)
    registry.record_event("note", "other")
    assert [e.version for e in registry.list_events(model_name="sentiment", limit=2)] == [3, 4]
    assert [e.version for e in registry.list_events(model_name="sentiment", version=2)] == [2]
    assert len(registry.list_events(kind="note")) == 6


def test_unreachable_registry_names_the_target_and_the_fix_but_not_the_password():
    port = find_free_port()
    with pytest.raises(RegistryUnavailable) as caught:
        Registry(f"host=127.0.0.1 port={port} dbname=maas user=maas password=hunter2secret", connect_timeout=2)
    message = str(caught.value)
    assert f"host 127.0.0.1 port {port} database maas" in message
    assert "maas stack up" in message and "MAAS_REGISTRY_DSN" in message
    assert "hunter2secret" not in message


def test_wrong_password_is_reported_without_the_password(pg_cluster):
    dsn = f"postgresql://maas:wr0ng-pass@127.0.0.1:{pg_cluster.port}/postgres"
    with pytest.raises(RegistryUnavailable) as caught:
        Registry(dsn)
    assert "password authentication failed" in str(caught.value)
    assert "wr0ng-pass" not in str(caught.value)


def _exported(registry, model="sentiment") -> int:
    version = registry.register_version(model)
    registry.set_artifact(model, version, f"file:///store/models/{model}/{version}")
    return version


def test_the_desired_state_moves_through_canary_and_commit(registry):
    v1, v2 = _exported(registry), _exported(registry)
    assert registry.serving_target("sentiment") is None
    registry.mark_serving("sentiment", v1)
    start = registry.serving_target("sentiment")
    assert (start.stable, start.canary, start.previous) == (v1, None, None)
    canary = registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=60)
    assert (canary.stable, canary.canary, canary.generation) == (v1, v2, start.generation + 1)
    assert canary.canary_until is not None
    assert registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=60).canary == v2  # a retry
    committed = registry.commit_canary("sentiment", v2, expected_stable=v1, grace_seconds=300)
    assert (committed.stable, committed.canary, committed.previous) == (v2, None, v1)
    assert committed.previous_until > committed.updated_at
    assert {v.version: v.status for v in registry.list_versions("sentiment")} == {v1: "retired", v2: "serving"}
    assert [e.kind for e in registry.list_events(model_name="sentiment")][-4:] == ["canary", "canary", "retired", "serving"]


def test_compare_and_set_refuses_a_stale_champion_and_a_busy_slot(registry):
    from maas_tasks.registry import CanaryBusy, ChampionChanged

    v1, v2, v3 = _exported(registry), _exported(registry), _exported(registry)
    registry.mark_serving("sentiment", v1)
    with pytest.raises(ChampionChanged, match=f"stable is v{v1}, not vNone") as stale:
        registry.begin_canary("sentiment", v2, expected_stable=None, lease_seconds=60)
    assert stale.value.target.stable == v1
    registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=60)
    with pytest.raises(CanaryBusy, match=f"v{v2} holds the canary slot"):
        registry.begin_canary("sentiment", v3, expected_stable=v1, lease_seconds=60)
    registry.mark_serving("sentiment", v3)  # someone else moved stable meanwhile
    with pytest.raises(ChampionChanged):
        registry.commit_canary("sentiment", v2, expected_stable=v1, grace_seconds=0)
    assert registry.get_version("sentiment", v2).status == "candidate"
    rejected = registry.register_version("sentiment", status="rejected")
    with pytest.raises(IllegalTransition, match="only a version that passed the gate"):
        registry.begin_canary("sentiment", rejected, expected_stable=v3, lease_seconds=60)
    unexported = registry.register_version("sentiment")
    with pytest.raises(IllegalTransition, match="has no exported artifact"):
        registry.begin_canary("sentiment", unexported, expected_stable=v3, lease_seconds=60)


def test_an_expired_canary_is_freed_or_taken_over(registry):
    import time

    v1, v2, v3 = _exported(registry), _exported(registry), _exported(registry)
    registry.mark_serving("sentiment", v1)
    registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=0.2)
    time.sleep(0.4)
    assert registry.begin_canary("sentiment", v3, expected_stable=v1, lease_seconds=60).canary == v3
    assert registry.list_events(model_name="sentiment", version=v2)[-1].detail["taken_over_by"] == v3
    registry.abort_canary("sentiment", v3, "golden mismatch")
    registry.begin_canary("sentiment", v2, expected_stable=v1, lease_seconds=0.2)
    assert registry.expire_canaries() == []
    time.sleep(0.4)
    assert registry.expire_canaries() == [("sentiment", v2)]
    assert registry.serving_target("sentiment").canary is None
    assert registry.abort_canary("sentiment", v2, "too late") is False


def test_revert_stable_and_superseded(registry):
    v1, v2, v3 = _exported(registry), _exported(registry), _exported(registry)
    registry.mark_serving("sentiment", v1)
    registry.mark_serving("sentiment", v2)
    assert registry.revert_stable("sentiment", v2, to=v1, reason="node n1 failed to load it") is True
    assert registry.serving_target("sentiment").stable == v1
    assert registry.get_version("sentiment", v2).status == "retired"
    assert registry.list_events(model_name="sentiment", version=v1)[-1].detail["reverted_from"] == v2
    assert registry.revert_stable("sentiment", v2, to=v1, reason="again") is False
    first = _exported(registry, "fresh")
    registry.mark_serving("fresh", first)
    assert registry.revert_stable("fresh", first, to=None, reason="its first promotion failed on the nodes")
    assert registry.serving_target("fresh").stable is None and registry.get_version("fresh", first).status == "retired"
    registry.mark_superseded("sentiment", v3, {"gated_against": None})
    assert registry.get_version("sentiment", v3).status == "superseded"
    registry.mark_serving("sentiment", v3)  # rolled to on purpose
    assert registry.serving_version("sentiment") == v3


def test_the_stable_version_is_retired_only_by_replacing_it(registry):
    v1 = _exported(registry)
    registry.mark_serving("sentiment", v1)
    with pytest.raises(IllegalTransition, match="is the stable version"):
        registry.set_status("sentiment", v1, "retired")


def test_nodes_report_what_they_observed(registry):
    registry.report_node("n1", grpc_target="h:8500", rest_url="http://h:8501", report={"models": {}})
    registry.report_node("n1", grpc_target="h:8500", rest_url=None, report={"models": {"m": {"generation": 2}}})
    [node] = registry.serving_nodes(seen_within=60)
    assert (node.node_id, node.rest_url, node.report) == ("n1", None, {"models": {"m": {"generation": 2}}})
    with registry._transaction() as cur:
        cur.execute("UPDATE serving_nodes SET last_seen = now() - interval '1 hour'")
    assert registry.serving_nodes(seen_within=60) == [] and len(registry.serving_nodes()) == 1
    assert registry.forget_node("n1") is True and registry.serving_nodes() == []
    assert registry.forget_node("n1") is False


def test_pinning_is_recorded(registry):
    v1 = _exported(registry)
    registry.set_pinned("sentiment", v1, True)
    assert registry.get_version("sentiment", v1).pinned is True
    assert registry.list_events(model_name="sentiment", version=v1)[-1].kind == "pinned"


def test_a_desired_state_change_notifies_the_agents(registry, pg_dsn):
    import select

    from maas_tasks.registry import SERVING_CHANNEL

    listener = psycopg2.connect(pg_dsn)
    listener.autocommit = True
    listener.cursor().execute(f"LISTEN {SERVING_CHANNEL}")
    try:
        registry.mark_serving("sentiment", _exported(registry))
        assert select.select([listener], [], [], 5)[0]
        listener.poll()
        assert [n.payload for n in listener.notifies] == ["sentiment"]
    finally:
        listener.close()


def test_the_serving_state_migration_keeps_what_served_before(pg_dsn):
    conn = psycopg2.connect(pg_dsn)
    try:
        migrate(conn, [m for m in load_migrations() if m.version < 3])
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO model_counters VALUES ('old', 2)")
            cur.execute("INSERT INTO model_versions (model_name, version, status) VALUES ('old', 1, 'retired'),"
                        " ('old', 2, 'serving')")
        assert 3 in migrate(conn)
    finally:
        conn.close()
    with Registry.connect(pg_dsn) as registry:
        target = registry.serving_target("old")
        assert (target.stable, target.canary, target.previous) == (2, None, None)
