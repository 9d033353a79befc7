"""Housekeeping against a real registry and a file store laid out as the stages lay it out: what is kept
(newest K, serving target, pinned, referenced, watermarked batches, newest of a source, young), what goes,
that a dry run deletes nothing, that a rerun is a no-op, and the races it must survive."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from maas_tasks import housekeeping
from maas_tasks.housekeeping import apply_plan, plan_housekeeping, run_housekeeping
from maas_tasks.registry import Registry
from maas_tasks.storage import FileStore

MODEL = "m"
SOURCE = "/data/reviews"
LATER = datetime.now(timezone.utc) + timedelta(days=3)  # "now" for the plan: everything written is old


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "store")


def _hex(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def make_snapshot(store, registry, tag: str, *, source_uri: str = SOURCE, watermark=None) -> int:
    """A published snapshot with its validation, quarantine and drift reports, recorded as validation does."""
    sha = _hex(tag)
    store.put_bytes(f"snapshots/{sha}/data.parquet", b"rows")
    store.put_bytes(f"snapshots/{sha}/source.json", b"{}")
    store.put_bytes(f"validation/{sha}/result.json", b"{}")
    store.put_bytes(f"validation/{sha}/docs/index.html", b"<html>")
    store.put_bytes(f"quarantine/{sha}/rows.parquet", b"rows")
    drift = f"drift/{sha[:16]}"
    store.put_bytes(f"{drift}/report.json", b"{}")
    store.put_bytes(f"{drift}/report.html", b"<html>")
    snapshot_id = registry.record_snapshot(
        store.uri(f"snapshots/{sha}/data.parquet"), sha, 10, tag, source_uri=source_uri, watermark=watermark,
    )
    registry.set_snapshot_reports(
        snapshot_id, validation_uri=store.uri(f"validation/{sha}/result.json"),
        quarantine_uri=store.uri(f"quarantine/{sha}/rows.parquet"), drift_uri=store.uri(f"{drift}/report.json"),
    )
    return snapshot_id


def make_version(store, registry, snapshot_id: int, tag: str, *, exported: bool = True, features: str | None = None) -> int:
    """A version as a training run leaves it: features, trained model, report and (when it passed) its export."""
    features = features or f"features/{_hex('f' + tag)[:16]}"
    trained = f"trained/{_hex('t' + tag)[:16]}"
    for name in ("train.parquet", "eval.parquet", "vectorizer.json"):
        store.put_bytes(f"{features}/{name}", b"x")
    store.put_bytes(f"{trained}/model.json", b"{}")
    store.put_bytes(f"{trained}/history.json", json.dumps({"features_key": features}).encode())
    version = registry.register_version(
        MODEL, status="candidate" if exported else "rejected", snapshot_id=snapshot_id, dag_run_id=f"run-{tag}"
    )
    page = f"<tr><td>trained model</td><td>{trained}</td></tr><tr><td>features</td><td>{features}</td></tr>"
    store.put_bytes(f"reports/{MODEL}/{version}/confusion.png", b"png")
    store.put_bytes(f"reports/{MODEL}/{version}/index.html", page.encode())
    registry.set_report(MODEL, version, store.uri(f"reports/{MODEL}/{version}/index.html"))
    if exported:
        store.put_bytes(f"models/{MODEL}/{version}/saved_model.pb", b"pb")
        store.put_bytes(f"models/{MODEL}/{version}/MANIFEST.json", b"{}")
        store.put_bytes(f"models/{MODEL}/{version}.json", json.dumps({"model_key": trained}).encode())
        registry.set_artifact(MODEL, version, store.uri(f"models/{MODEL}/{version}"))
    return version


@pytest.fixture
def layout(store, registry):
    """Eight versions of one model, K=3 to keep:

    v1 s1 pinned (retired) | v2 s2 rejected | v3 s3 retired | v4 s3 previous (shares v3's features) |
    v5 s4 retired | v6 s5 rejected | v7 s5 stable | v8 s6 canary; plus a watermarked source of two batches,
    the report of data that failed validation, a snapshot published but never recorded, a cleaned table, a
    staged copy and a temporary file left by killed runs, and a look record of maas_ingest.
    """
    s = {n: make_snapshot(store, registry, f"s{n}") for n in range(1, 7)}
    v = {}
    v[1] = make_version(store, registry, s[1], "1")
    v[2] = make_version(store, registry, s[2], "2", exported=False)
    v[3] = make_version(store, registry, s[3], "3")
    v[4] = make_version(store, registry, s[3], "4", features=f"features/{_hex('f3')[:16]}")
    v[5] = make_version(store, registry, s[4], "5")
    v[6] = make_version(store, registry, s[5], "6", exported=False)
    v[7] = make_version(store, registry, s[5], "7")
    v[8] = make_version(store, registry, s[6], "8")
    for n in (1, 3, 4, 7):
        registry.mark_serving(MODEL, v[n])
    registry.begin_canary(MODEL, v[8], expected_stable=v[7], lease_seconds=600)
    registry.set_pinned(MODEL, v[1], True)
    w1 = make_snapshot(store, registry, "w1", source_uri="postgresql://db/reviews", watermark=("id", "10"))
    w2 = make_snapshot(store, registry, "w2", source_uri="postgresql://db/reviews", watermark=("id", "20"))
    store.put_bytes(f"validation/{_hex('bad')}/result.json", b"{}")
    store.put_bytes(f"snapshots/{_hex('orphan')}/data.parquet", b"rows")
    store.put_bytes("cleaned/0123456789abcdef/data.parquet", b"rows")
    store.put_bytes(f"staging/{_hex('s9')}/feedfacefeedface/data.parquet", b"rows")
    store.put_bytes("ingest/looks/0123456789abcdef.json", b"{}")
    temporary = store.root / "features" / ".vectorizer.json.tmp-dead"
    temporary.write_bytes(b"half")
    old = (LATER - timedelta(days=2)).timestamp()
    os.utime(temporary, (old, old))
    return {"s": s, "v": v, "w": (w1, w2), "temporary": temporary}


def version_prefixes(n: int) -> set[str]:
    """A version's group is named by its export's prefix; it holds its report too."""
    return {f"models/{MODEL}/{n}"}


def snapshot_prefixes(tag: str) -> set[str]:
    sha = _hex(tag)
    return {f"snapshots/{sha}", f"validation/{sha}", f"quarantine/{sha}", f"drift/{sha[:16]}"}


def lineage(tag: str) -> set[str]:
    return {f"features/{_hex('f' + tag)[:16]}", f"trained/{_hex('t' + tag)[:16]}"}


def deleted_prefixes(plan) -> set[str]:
    return {g.prefix for g in plan.groups}


def test_the_plan_keeps_the_newest_k_what_serves_is_pinned_or_referenced_and_deletes_the_rest(store, registry, layout):
    v, s = layout["v"], layout["s"]
    plan = plan_housekeeping(store, registry, keep_versions=3, now=LATER)

    assert plan.kept_versions == {MODEL: [v[1], v[4], v[6], v[7], v[8]]}
    assert plan.protected == {MODEL: {v[1]: "pinned", v[4]: "the previous version"}}
    assert set(plan.kept_snapshots) == {s[1], s[3], s[5], s[6], *layout["w"]}
    expected = (
        version_prefixes(v[2]) | version_prefixes(v[3]) | version_prefixes(v[5])
        | snapshot_prefixes("s2") | snapshot_prefixes("s4")
        | {f"trained/{_hex('t2')[:16]}", f"features/{_hex('f2')[:16]}", f"trained/{_hex('t3')[:16]}"}
        | lineage("5")
        | {f"validation/{_hex('bad')}", f"snapshots/{_hex('orphan')}", "cleaned/0123456789abcdef",
           f"staging/{_hex('s9')}/feedfacefeedface"}
    )
    assert deleted_prefixes(plan) == expected
    # v3's features are v4's too, so they stay; a version's export loses its metadata first, then its manifest.
    assert f"features/{_hex('f3')[:16]}" not in deleted_prefixes(plan)
    [v3] = [g for g in plan.groups if g.prefix == f"models/{MODEL}/{v[3]}"]
    assert v3.keys[:2] == [f"models/{MODEL}/{v[3]}.json", f"models/{MODEL}/{v[3]}/MANIFEST.json"]
    [snapshot] = [g for g in plan.groups if g.prefix == f"snapshots/{_hex('s4')}"]
    assert snapshot.keys[0].endswith("/source.json") and snapshot.snapshot_id == s[4]
    assert plan.temporary == [layout["temporary"]]
    assert plan.notes == []


def test_a_dry_run_deletes_nothing_and_a_real_run_deletes_the_plan_then_a_rerun_is_a_no_op(store, registry, layout, monkeypatch):
    v, s = layout["v"], layout["s"]
    before = set(store.list_keys())
    monkeypatch.setattr(housekeeping, "datetime", _Clock)
    summary = run_housekeeping(store, registry, keep_versions=3, dry_run=True, run_id="hk-1")
    assert summary["dry_run"] and summary["deleted_keys"] == 0 and summary["groups"] == 20
    assert set(store.list_keys()) == before and layout["temporary"].exists()
    assert registry.list_events(kind="pruned") == [] and registry.list_events(kind="housekeeping") == []

    summary = run_housekeeping(store, registry, keep_versions=3, dry_run=False, run_id="hk-2")
    after = set(store.list_keys())
    gone = before - after
    assert summary["deleted_keys"] == len(gone) and summary["skipped"] == []
    assert not layout["temporary"].exists()
    assert not any(k.startswith((f"models/{MODEL}/{v[3]}/", f"reports/{MODEL}/{v[3]}/")) for k in after)
    assert f"models/{MODEL}/{v[3]}.json" not in after
    for kept in (v[1], v[4], v[7], v[8]):
        assert {f"models/{MODEL}/{kept}/MANIFEST.json", f"models/{MODEL}/{kept}.json",
                f"reports/{MODEL}/{kept}/index.html"} <= after
    assert f"reports/{MODEL}/{v[6]}/index.html" in after
    assert "ingest/looks/0123456789abcdef.json" in after
    # The registry forgets where pruned versions were (nothing can serve them now) and records every deletion.
    for pruned in (v[2], v[3], v[5]):
        record = registry.get_version(MODEL, pruned)
        assert record.artifact_uri is None and record.report_uri is None
    assert [e.version for e in registry.list_events(kind="pruned")] == [v[2], v[3], v[5]]
    assert sorted(e.detail["snapshot_id"] for e in registry.list_events(kind="snapshot_deleted")) == [s[2], s[4]]
    [event] = registry.list_events(kind="housekeeping")
    assert event.detail["dag_run_id"] == "hk-2" and event.detail["keys"] == len(gone)
    assert event.detail["versions"] == [f"{MODEL} v{n}" for n in (v[2], v[3], v[5])]

    events = len(registry.list_events())
    summary = run_housekeeping(store, registry, keep_versions=3, dry_run=False, run_id="hk-3")
    assert summary["groups"] == 0 and summary["deleted_keys"] == 0
    assert set(store.list_keys()) == after and len(registry.list_events()) == events


class _Clock(datetime):
    """housekeeping's clock, three days ahead: what the fixture wrote is old."""

    @classmethod
    def now(cls, tz=None):
        return LATER


def test_nothing_written_or_registered_within_the_minimum_age_goes(store, registry, layout):
    plan = plan_housekeeping(store, registry, keep_versions=1, min_age=timedelta(hours=24))
    assert plan.groups == [] and plan.temporary == []
    assert plan.kept_versions[MODEL] == sorted(layout["v"].values())


def test_a_kept_version_whose_lineage_is_unknown_stops_the_sweep_of_features_and_trained_models(store, registry, layout):
    v = layout["v"]
    store.delete(f"reports/{MODEL}/{v[6]}/index.html")  # v6 was rejected: its report was the only record
    plan = plan_housekeeping(store, registry, keep_versions=3, now=LATER)
    assert not any(g.prefix.startswith(("features/", "trained/")) for g in plan.groups)
    assert plan.notes and f"{MODEL} v{v[6]}" in plan.notes[0]
    assert version_prefixes(v[5]) <= deleted_prefixes(plan)


def test_a_version_that_became_protected_after_the_plan_keeps_its_files(store, registry, layout):
    v = layout["v"]
    plan = plan_housekeeping(store, registry, keep_versions=3, now=LATER)
    registry.set_pinned(MODEL, v[5], True)  # e.g. an operator pins it while housekeeping runs
    result = apply_plan(store, registry, plan, run_id="hk")
    assert {"prefix": f"models/{MODEL}/{v[5]}", "why": f"{MODEL} v{v[5]} is pinned now"} in result["skipped"]
    assert store.exists(f"models/{MODEL}/{v[5]}/MANIFEST.json")
    assert registry.get_version(MODEL, v[5]).artifact_uri is not None
    assert not store.exists(f"models/{MODEL}/{v[3]}/MANIFEST.json")


def test_a_snapshot_a_new_version_trains_on_after_the_plan_keeps_its_files(store, registry, layout):
    s = layout["s"]
    plan = plan_housekeeping(store, registry, keep_versions=3, now=LATER)
    make_version(store, registry, s[4], "9")  # a run on data already ingested, registered meanwhile
    result = apply_plan(store, registry, plan, run_id="hk")
    assert store.exists(f"snapshots/{_hex('s4')}/data.parquet")
    assert {r["prefix"] for r in result["skipped"]} == snapshot_prefixes("s4")
    assert not store.exists(f"snapshots/{_hex('s2')}/data.parquet")


def test_the_registry_refuses_to_prune_what_may_serve(registry, store, layout):
    v = layout["v"]
    assert registry.prune_version(MODEL, v[7]) == "the stable version"
    assert registry.prune_version(MODEL, v[8]) == "the canary version"
    assert registry.prune_version(MODEL, v[4]) == "the previous version"
    assert registry.prune_version(MODEL, v[1]) == "pinned"
    assert registry.prune_version(MODEL, v[3]) is None
    assert registry.prune_version(MODEL, v[3]) is None  # idempotent: one event
    assert len(registry.list_events(kind="pruned")) == 1
    with pytest.raises(Exception, match="no exported artifact"):
        registry.begin_canary(MODEL, v[3], expected_stable=v[7], lease_seconds=60)


def test_keep_versions_must_keep_one(store, registry):
    with pytest.raises(ValueError, match="at least"):
        plan_housekeeping(store, registry, keep_versions=0)


def test_rows_of_a_deleted_snapshot_are_staged_and_published_again(store, registry, tmp_path):
    from maas_tasks.ingest import ingest_data, publish_snapshot
    from maas_tasks.storage import delete_prefix

    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood film,positive\nbad film,negative\n")
    first = ingest_data(store, registry, data, run_id="r1")
    published = publish_snapshot(store, first)
    snapshot_id = registry.record_snapshot(published["uri"], published["sha256"], 2, published["source"])
    delete_prefix(store, f"snapshots/{first['sha256']}")  # what housekeeping does with it

    again = ingest_data(store, registry, data, run_id="r2")
    assert again["new"] is True and again["sha256"] == first["sha256"]
    republished = publish_snapshot(store, again)
    assert registry.record_snapshot(republished["uri"], again["sha256"], 2, again["source"]) == snapshot_id
    assert ingest_data(store, registry, data, run_id="r3")["new"] is False


def test_the_layout_matches_the_stages():
    from maas_tasks import evaluate, export, ingest, report, train, validate

    assert housekeeping.HISTORY_FILE == train.HISTORY_FILE
    assert housekeeping.REPORT_PAGE == report.REPORT_FILE
    assert evaluate.report_prefix("m", 3) == f"{housekeeping.REPORTS}/m/3"
    assert export.version_prefix("m", 3) == f"{housekeeping.MODELS}/m/3"
    assert ingest.snapshot_key("ab") == f"{housekeeping.SNAPSHOTS}/ab/{ingest.SNAPSHOT_FILE}"
    assert ingest.SOURCE_FILE in housekeeping.COMMIT_FILES and "MANIFEST.json" in housekeeping.COMMIT_FILES
    assert validate.QUARANTINE_FILE == "rows.parquet"
