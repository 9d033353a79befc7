"""PostgreSQL restarting under a training run: at each of the run's registry writes (recording the snapshot,
registering the version, linking its report, recording its export) the server restarts while the task holds
its connection. The task fails with one clear error, its retry succeeds, and the registry ends as if nothing
happened: one snapshot, one version, every change in the event log once.

The stages are the functions the DAG tasks call, each attempt with its own registry connection as a task's
has (``plugins/maas_hooks.task_registry``); the cluster is the test module's own, since it is restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from maas_tasks.postgres import PgCluster, destroy_cluster, ensure_database, init_cluster, start_cluster, stop_cluster
from maas_tasks.registry import Registry, RegistryUnavailable
from tests.fixtures.invariants import assert_registry_invariants
from tests.fixtures.postgres import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUN = "manual__restarts"
MODEL = "restarts"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """A cluster of this module's own: the session's is shared by every other test and must not restart."""
    cluster = PgCluster(root=tmp_path_factory.mktemp("pg-restarts"), port=find_free_port(), durable=False)
    try:
        init_cluster(cluster)
        start_cluster(cluster)
        ensure_database(cluster, "maas")
        yield cluster
    finally:
        destroy_cluster(cluster)


def run_task(
    cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, step: Callable[[Registry], Any], faults: list[str]
) -> Any:
    """Run ``step`` as Airflow runs a task and its retries: one attempt per name in ``faults``, in which
    PostgreSQL restarts just before that Registry method runs (its connection was opened before), then
    the attempt that succeeds."""
    for method in faults:
        original = getattr(Registry, method)

        def restart_then_call(self: Registry, *args: Any, _original: Any = original, _method: str = method,
                              **kwargs: Any) -> Any:
            monkeypatch.setattr(Registry, _method, _original)  # once
            stop_cluster(cluster)
            start_cluster(cluster)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Registry, method, restart_then_call)
        with pytest.raises(RegistryUnavailable) as failure, Registry.connect(cluster.dsn("maas")) as registry:
            step(registry)
        assert getattr(Registry, method) is original, f"PostgreSQL did not restart: the step never called {method}"
        assert str(failure.value).startswith(
            f"lost the connection to the model registry at host 127.0.0.1 port {cluster.port} database maas: "
        ), failure.value
        assert "PostgreSQL stopped or restarted" in str(failure.value)
    with Registry.connect(cluster.dsn("maas")) as registry:
        return step(registry)


def test_a_run_whose_postgresql_restarts_at_every_registry_write_ends_consistent(
    cluster, monkeypatch, file_store, tmp_path
):
    from maas_tasks.clean import clean_snapshots, training_batches
    from maas_tasks.evaluate import evaluate_and_register
    from maas_tasks.export import export_registered_version
    from maas_tasks.features import build_features
    from maas_tasks.ingest import ingest_data
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.train import train_model
    from maas_tasks.validate import validate_staged_snapshot

    store = file_store
    source = tmp_path / "reviews.csv"
    generate_reviews(200, seed=17).to_csv(source, index=False)
    columns = {"text_col": "text", "label_col": "label", "group_col": "movie_id"}

    staged = run_task(cluster, monkeypatch, lambda r: ingest_data(store, r, str(source), run_id=RUN), [])
    snapshot = run_task(cluster, monkeypatch, lambda r: validate_staged_snapshot(
        store, r, staged, **columns, dag_run_id=RUN), ["record_snapshot"])
    cleaned = run_task(cluster, monkeypatch, lambda r: clean_snapshots(
        store, training_batches(store, r, snapshot), **columns), [])
    features = build_features(store, cleaned["key"], max_tokens=2000)
    trained = train_model(store, features["key"], epochs=1, batch_size=64, device="cpu")
    # Two attempts fail: before the version is registered, and after it is but before its report is linked.
    evaluation = run_task(cluster, monkeypatch, lambda r: evaluate_and_register(
        store, r, trained["key"], features["key"], model_name=MODEL, min_accuracy=0.5,
        snapshot_id=snapshot["snapshot_id"], dag_run_id=RUN), ["register_version", "set_report"])
    exported = run_task(cluster, monkeypatch, lambda r: export_registered_version(
        store, r, trained["key"], evaluation), ["set_artifact"])

    with Registry.connect(cluster.dsn("maas")) as registry:
        assert [s.id for s in registry.list_snapshots()] == [snapshot["snapshot_id"]]
        (version,) = registry.list_versions(MODEL)
        assert (version.version, version.status, version.dag_run_id) == (evaluation["version"], "candidate", RUN)
        assert version.snapshot_id == snapshot["snapshot_id"]
        assert version.artifact_uri == exported["uri"] and store.exists(f"{exported['prefix']}/MANIFEST.json")
        assert version.report_uri is not None and store.exists(version.report_uri.removeprefix(store.uri("k")[:-1]))
        kinds = [e.kind for e in registry.list_events(model_name=MODEL, version=version.version)]
        assert kinds == ["registered", "report_written", "artifact_set"]
        assert_registry_invariants(registry)
