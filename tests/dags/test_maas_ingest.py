"""The ingest DAG: it parses cheaply and is wired as designed; through ``dag.test()`` a new file in the
watched directory is announced with its snapshot, the same data is not, drift mode announces only drift;
and, end to end, a file dropped into the watched directory is served as the next version."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.dags.in_process import (
    DAGS,
    airflow_db,  # noqa: F401 - the fixture
    asset_events,
    load_dag,
    parse_in_fresh_interpreter,
    run_dag,
    schedule_asset_runs,
    set_paused,
)

DAG_FILE = DAGS / "maas_ingest.py"
EXPECTED_EDGES = {
    ("look_at_source", "ingest_data"), ("look_at_source", "announce_snapshot"), ("ingest_data", "validate_data"),
    ("validate_data", "clean_data"), ("validate_data", "check_drift"), ("validate_data", "announce_snapshot"),
    ("clean_data", "check_drift"), ("check_drift", "announce_snapshot"),
}
SKIPPED_AFTER_LOOK = {"ingest_data", "validate_data", "clean_data", "check_drift", "announce_snapshot"}


def test_parsing_imports_nothing_heavy_and_touches_no_database_or_connection(tmp_path):
    assert parse_in_fresh_interpreter(DAG_FILE, tmp_path) == {"errors": {}, "dags": ["maas_ingest"], "heavy": []}


def test_wiring_schedule_asset_and_docs(monkeypatch):
    from maas_timetables import NextSlotCronTimetable

    monkeypatch.setenv("MAAS_MODEL_NAME", "reviews")
    dag = load_dag("maas_ingest")
    assert isinstance(dag.timetable, NextSlotCronTimetable) and dag.timetable.summary == "*/5 * * * *"
    assert dag.catchup is False and dag.max_active_runs == 1 and dag.dagrun_timeout is not None
    assert {"maas", "ingest"} <= set(dag.tags) and len(dag.description) < 120
    assert {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids} == EXPECTED_EDGES
    assert all(task.retries >= 1 for task in dag.tasks)
    [outlet] = dag.get_task("announce_snapshot").outlets
    assert (outlet.name, outlet.uri) == ("maas_snapshots_reviews", "maas://snapshots/reviews")
    assert "MAAS_INGEST_SCHEDULE" in dag.doc_md and "MAAS_RETRAIN_ON" in dag.doc_md
    monkeypatch.setenv("MAAS_INGEST_SCHEDULE", "0 * * * *")
    assert load_dag("maas_ingest").timetable.summary == "0 * * * *"
    monkeypatch.setenv("MAAS_INGEST_SCHEDULE", "none")
    assert type(load_dag("maas_ingest").timetable).__name__ == "NullTimetable"  # triggered runs only


def test_the_training_dag_runs_on_its_cron_or_the_asset(monkeypatch):
    from maas_timetables import NextSlotCronTimetable

    monkeypatch.setenv("MAAS_MODEL_NAME", "reviews")
    monkeypatch.setenv("MAAS_TRAINING_SCHEDULE", "0 2 * * *")
    dag = load_dag("maas_training")
    assert isinstance(dag.timetable.timetable, NextSlotCronTimetable) and dag.timetable.timetable.summary == "0 2 * * *"
    assert dag.timetable.asset_condition.name == "maas_snapshots_reviews"
    # The plugin timetable survives the serialization the scheduler and the API server read the DAG from.
    from airflow.serialization.serialized_objects import DagSerialization

    read_back = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).timetable
    assert read_back.summary == "Asset or 0 2 * * *" and read_back.description.endswith("never caught up")
    monkeypatch.setenv("MAAS_TRAINING_SCHEDULE", "none")
    assert load_dag("maas_training").timetable.asset_condition.name == "maas_snapshots_reviews"  # the Asset alone


@pytest.fixture
def maas(monkeypatch, tmp_path, pg_dsn, airflow_db):  # noqa: F811 - the fixture
    """The MAAS_* environment of one test: its own store, registry, model name (so its own Asset) and watched
    directory."""
    from maas_tasks.storage import FileStore

    model = f"m{uuid.uuid4().hex[:8]}"
    env = {
        "MAAS_HOME": str(tmp_path / "maas"), "MAAS_STORE_URL": f"file://{tmp_path / 'store'}",
        "MAAS_REGISTRY_DSN": pg_dsn, "MAAS_MODEL_NAME": model, "MAAS_INGEST_SOURCE": str(tmp_path / "incoming"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return SimpleNamespace(model=model, asset=f"maas_snapshots_{model}", incoming=tmp_path / "incoming",
                           dsn=pg_dsn, store=FileStore(tmp_path / "store"), tmp=tmp_path)


def drop(maas, name: str, frame) -> Path:
    """Write a data file into the watched directory as a writer that renames its finished file does."""
    maas.incoming.mkdir(exist_ok=True)
    partial = maas.incoming / f".{name}.partial"
    frame.to_csv(partial, index=False)
    return partial.rename(maas.incoming / name)


def look(conf: dict | None = None) -> dict[str, str]:
    return run_dag(load_dag("maas_ingest"), {"settle_seconds": 0, **(conf or {})})


def registry(maas):
    from maas_tasks.registry import Registry

    return Registry.connect(maas.dsn)


def test_a_new_file_is_announced_with_its_snapshot_and_the_same_data_is_not(maas):
    from maas_tasks.sample_data import generate_reviews

    states = look()  # nothing in the watched directory yet
    assert states["look_at_source"] == "success" and {states[t] for t in SKIPPED_AFTER_LOOK} == {"skipped"}

    drop(maas, "a.csv", generate_reviews(60, seed=1))
    states = look()
    assert set(states.values()) == {"success"}, states
    with registry(maas) as reg:
        [snapshot] = reg.list_snapshots()
    [event] = asset_events(maas.asset)
    assert {k: event[k] for k in ("snapshot_id", "sha256", "source_uri", "drift_flagged", "retrain_on")} == {
        "snapshot_id": snapshot.id, "sha256": snapshot.sha256, "source_uri": str(maas.incoming.resolve()),
        "drift_flagged": False, "retrain_on": "new_data",
    }
    assert event["params"]["text_col"] == "text" and event["model_name"] == maas.model

    states = look()  # unchanged: nothing is read
    assert {states[t] for t in SKIPPED_AFTER_LOOK} == {"skipped"}
    os.utime(maas.incoming / "a.csv")  # touched, same rows: read, already ingested, not announced again
    states = look()
    assert states["ingest_data"] == "success" and states["announce_snapshot"] == "skipped"
    assert len(asset_events(maas.asset)) == 1
    with registry(maas) as reg:
        assert len(reg.list_snapshots()) == 1


def serve_reference(maas, frame) -> None:
    """Make the data in ``frame`` what the serving version of ``maas.model`` was trained on, without training:
    a published snapshot recorded with its columns, and an exported version whose vocabulary is its words."""
    import io
    import re

    from maas_tasks.ingest import hash_rows

    data = frame.astype("string")
    sha = hash_rows(data)
    buffer = io.BytesIO()
    data.to_parquet(buffer, index=False)
    maas.store.put_bytes(f"snapshots/{sha}/data.parquet", buffer.getvalue())
    maas.store.put_bytes(f"snapshots/{sha}/source.json", b"{}")
    words = sorted({w for text in data["text"] for w in re.findall(r"[a-z']+", text.lower())})
    maas.store.put_bytes("trained/0123456789abcdef/vocabulary.txt", "\n".join(words).encode())
    maas.store.put_bytes(f"models/{maas.model}/1.json", json.dumps({"model_key": "trained/0123456789abcdef"}).encode())
    with registry(maas) as reg:
        snapshot_id = reg.record_snapshot(
            maas.store.uri(f"snapshots/{sha}/data.parquet"), sha, len(data), "reference.csv", columns=list(data.columns),
            metadata={"text_col": "text", "label_col": "label", "id_col": None, "group_col": None, "label_map": None},
        )
        version = reg.register_version(maas.model, snapshot_id=snapshot_id, dag_run_id="reference")
        reg.set_artifact(maas.model, version, maas.store.uri(f"models/{maas.model}/1"))
        reg.mark_serving(maas.model, version)


def test_with_retrain_on_drift_only_a_snapshot_whose_drift_is_flagged_is_announced(maas, monkeypatch):

    from maas_tasks.sample_data import generate_reviews

    monkeypatch.setenv("MAAS_RETRAIN_ON", "drift")
    reviews = generate_reviews(240, seed=3)
    serve_reference(maas, reviews.iloc[:120])
    drop(maas, "a.csv", reviews.iloc[120:])  # more of the same: no drift
    states = look()
    assert states["check_drift"] == "success" and states["announce_snapshot"] == "skipped"
    assert asset_events(maas.asset) == []

    praise = generate_reviews(400, seed=4)
    drop(maas, "b.csv", praise[praise["label"] == "positive"])  # the labels move: drift
    states = look()
    assert states["announce_snapshot"] == "success", states
    [event] = asset_events(maas.asset)
    assert event["drift_flagged"] is True and event["retrain_on"] == "drift"
    assert any("label" in reason for reason in event["drift_reasons"])


@pytest.fixture
def model_server(maas, monkeypatch):
    """The embedded model server for ``maas``'s environment, on free ports; stopped at the end."""
    from maas_tasks import stack
    from maas_tasks.config import load_settings
    from tests.fixtures.postgres import find_free_port

    monkeypatch.setenv("MAAS_GRPC_PORT", str(find_free_port()))
    monkeypatch.setenv("MAAS_REST_PORT", str(find_free_port()))
    settings = load_settings()
    stack.start_model_server(settings)
    try:
        yield settings
    finally:
        stack.stop_model_server(settings)


def served_version(settings, model: str) -> int:
    body = json.dumps({"instances": ["A wonderful film."]}).encode()
    request = urllib.request.Request(f"{settings.rest_url}/v1/models/{model}:predict", data=body)
    with urllib.request.urlopen(request, timeout=30) as response:
        json.load(response)
    with urllib.request.urlopen(f"{settings.rest_url}/v1/models/{model}", timeout=30) as response:
        states = json.load(response)["model_version_status"]
    return max(int(s["version"]) for s in states if s["state"] == "AVAILABLE")


def train_on_announcements(monkeypatch=None, fail_evaluation_once: bool = False) -> tuple[str, dict[str, str], int]:
    """What the scheduler does after an announcement: create the Asset-triggered maas_training run, then run it.

    With ``fail_evaluation_once``, the first attempt of evaluate_model fails after registering its version (a
    passing fault: the registry went away), and Airflow retries it at once. Returns the run id, the task states
    and how many times evaluate_model linked a report (two: the failed attempt, then its retry).
    """
    [(dag_id, run_id, _)] = schedule_asset_runs()
    assert dag_id == "maas_training" and run_id.startswith("asset_triggered__")
    dag = load_dag("maas_training")
    calls: list = []
    if fail_evaluation_once:
        from maas_tasks.registry import Registry

        set_report = Registry.set_report

        def flaky_set_report(self, *args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise ConnectionError("the registry went away")
            return set_report(self, *args, **kwargs)

        monkeypatch.setattr(Registry, "set_report", flaky_set_report)
        dag.get_task("evaluate_model").retry_delay = timedelta(0)
    return run_id, run_dag(dag, run_id=run_id), len(calls)


@pytest.mark.slow
@pytest.mark.integration
def test_a_file_dropped_into_the_watched_directory_is_served_as_the_next_version(maas, model_server, monkeypatch):
    from maas_tasks.sample_data import generate_reviews

    look()  # the DAG folder is synced into Airflow's database; then maas_training is unpaused, as an operator does
    set_paused("maas_training", False)

    drop(maas, "week1.csv", generate_reviews(240, seed=7))
    assert look()["announce_snapshot"] == "success"
    run_id, states, _ = train_on_announcements()
    assert set(states.values()) == {"success"}, states
    assert served_version(model_server, maas.model) == 1

    drop(maas, "week2.csv", generate_reviews(120, seed=8))
    assert look()["announce_snapshot"] == "success"
    second = asset_events(maas.asset)[-1]
    drop(maas, "week3.csv", generate_reviews(60, seed=9))  # lands before training starts: not announced yet
    run_id, states, report_links = train_on_announcements(monkeypatch, fail_evaluation_once=True)
    assert set(states.values()) == {"success"}, states
    assert report_links == 2  # evaluate_model failed once after registering v2, and its retry went on
    assert served_version(model_server, maas.model) == 2

    with registry(maas) as reg:
        versions = reg.list_versions(maas.model)
        assert [(v.version, v.status) for v in versions] == [(1, "retired"), (2, "serving")]
        # The Asset-triggered run trained on the snapshot announced (not on the source as it is by then: week3
        # is no snapshot yet), and its retried evaluation kept one version.
        assert versions[1].dag_run_id == run_id and versions[1].snapshot_id == second["snapshot_id"]
        assert [s.id for s in reg.list_snapshots()] == [asset_events(maas.asset)[0]["snapshot_id"], second["snapshot_id"]]
        assert len(reg.list_events(maas.model, kind="registered")) == 2
    assert look()["announce_snapshot"] == "success"  # week3's look announces the next snapshot
    assert look()["announce_snapshot"] == "skipped" and len(schedule_asset_runs()) == 1
