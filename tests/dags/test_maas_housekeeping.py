"""The housekeeping DAG: it parses cheaply and is wired as designed, and through ``dag.test()`` a dry run lists
and deletes nothing while a real run deletes what is beyond the versions kept and records it."""

from __future__ import annotations

import os
import time

import psycopg2
import pytest

from tests.dags.in_process import DAGS, airflow_db, load_dag, parse_in_fresh_interpreter, run_dag  # noqa: F401
from tests.maas_tasks.test_housekeeping import MODEL, make_snapshot, make_version

DAG_FILE = DAGS / "maas_housekeeping.py"


def test_parsing_imports_nothing_heavy_and_touches_no_database_or_connection(tmp_path):
    assert parse_in_fresh_interpreter(DAG_FILE, tmp_path) == {"errors": {}, "dags": ["maas_housekeeping"], "heavy": []}


def test_wiring_schedule_and_params(monkeypatch):
    from airflow.sdk.definitions.param import ParamsDict
    from maas_timetables import NextSlotCronTimetable

    monkeypatch.setenv("MAAS_KEEP_VERSIONS", "7")
    dag = load_dag("maas_housekeeping")
    assert isinstance(dag.timetable, NextSlotCronTimetable) and dag.timetable.summary == "0 3 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1 and {"maas", "housekeeping"} <= set(dag.tags)
    assert dag.task_ids == ["clean_store"] and dag.get_task("clean_store").retries >= 1
    assert len(dag.description) < 120 and "Dry run" in dag.doc_md and "MAAS_KEEP_VERSIONS" in dag.doc_md
    params = dag.params
    assert params["dry_run"] is False and params["keep_versions"] is None and params["min_age_hours"] == 24
    assert "MAAS_KEEP_VERSIONS (7)" in params.get_param("keep_versions").schema["values_display"]["None"]
    # Whole numbers are dropdowns (the trigger form does not check integer-ness), each limit stated.
    for name in ("keep_versions", "min_age_hours"):
        schema = params.get_param(name).schema
        choices = [c for c in schema["enum"] if c is not None]
        assert str(min(choices)) in params.get_param(name).description
        assert str(max(choices)) in params.get_param(name).description
    ParamsDict(params).validate()
    checked = ParamsDict(params)
    with pytest.raises(Exception, match="min_age_hours"):
        checked["min_age_hours"] = 1  # younger than a training run's timeout
        checked.validate()
    monkeypatch.setenv("MAAS_HOUSEKEEPING_SCHEDULE", "none")
    assert type(load_dag("maas_housekeeping").timetable).__name__ == "NullTimetable"


def age_everything(store, dsn: str, days: int = 3) -> None:
    """Make what the fixture wrote and registered ``days`` old, as if housekeeping ran days later."""
    then = time.time() - days * 86400
    for path in store.root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("UPDATE model_versions SET created_at = created_at - make_interval(days => %s)", (days,))
        cur.execute("UPDATE data_snapshots SET created_at = created_at - make_interval(days => %s)", (days,))
    conn.close()


def test_a_dry_run_deletes_nothing_and_a_run_deletes_beyond_the_versions_kept(monkeypatch, tmp_path, pg_dsn, airflow_db):  # noqa: F811
    from maas_tasks.registry import Registry
    from maas_tasks.storage import FileStore

    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "maas"))
    monkeypatch.setenv("MAAS_STORE_URL", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("MAAS_REGISTRY_DSN", pg_dsn)
    monkeypatch.setenv("MAAS_KEEP_VERSIONS", "1")
    store = FileStore(tmp_path / "store")
    with Registry.connect(pg_dsn) as registry:
        versions = [make_version(store, registry, make_snapshot(store, registry, f"h{n}"), f"h{n}") for n in (1, 2, 3)]
        for version in versions:
            registry.mark_serving(MODEL, version)  # v3 stable, v2 previous, v1 retired
    age_everything(store, pg_dsn)
    before = set(store.list_keys())

    assert run_dag(load_dag("maas_housekeeping"), {"dry_run": True}) == {"clean_store": "success"}
    assert set(store.list_keys()) == before

    assert run_dag(load_dag("maas_housekeeping")) == {"clean_store": "success"}
    after = set(store.list_keys())
    assert not any(k.startswith((f"models/{MODEL}/1", f"reports/{MODEL}/1/")) for k in after)
    assert {f"models/{MODEL}/2/MANIFEST.json", f"models/{MODEL}/3/MANIFEST.json"} <= after
    with Registry.connect(pg_dsn) as registry:
        [pruned] = registry.list_events(kind="pruned")
        assert pruned.version == versions[0] and pruned.detail["dag_run_id"].startswith("manual__")
        assert registry.get_version(MODEL, versions[0]).artifact_uri is None
