"""The rollback DAG: it parses cheaply and is wired as designed, and through ``dag.test()`` on a real registry
and model server it restores the previous stable version (or the one named), is safe to run again, and
refuses with a clear message what it cannot serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.fixtures.postgres import find_free_port

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "maas_rollback.py"
MODEL = "sentiment"


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags["maas_rollback"]


def test_parsing_imports_nothing_heavy_and_touches_no_database(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        import sqlalchemy.engine
        def forbidden(*a, **k):
            raise AssertionError("parse-time side effect")
        sqlalchemy.engine.Engine.connect = forbidden
        import psycopg2
        psycopg2.connect = forbidden
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(DAG_FILE)!r})
        heavy = sorted(m for m in ("tensorflow", "pandas", "numpy", "serving.rollout", "maas_tasks.registry",
                                   "maas_tasks.promote") if m in sys.modules)
        print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": bag.dag_ids,
                          "heavy": heavy}}))
        """
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://nobody:none@127.0.0.1:9/none"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["dags"] == ["maas_rollback"]
    assert not {"tensorflow", "serving.rollout", "maas_tasks.registry", "maas_tasks.promote"} & set(result["heavy"])


def test_wiring_schedule_and_params(dag):
    assert dag.dag_id == DAG_FILE.stem
    assert dag.schedule is None  # triggered only
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.is_paused_upon_creation is False  # a triggered rollback runs without an unpause
    assert {"maas", "serving"} <= set(dag.tags)
    assert dag.description and len(dag.description) < 120
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == {("resolve_rollback_version", "rollback_version")}
    assert all(t.retries >= 1 for t in dag.tasks)
    assert "**Trigger**" in dag.doc_md and "Roll back to this" in dag.doc_md
    model, version = dag.params.get_param("model_name"), dag.params.get_param("version")
    assert model.value is None and "null" in model.schema["type"] and "MAAS_MODEL_NAME" in model.description
    assert version.value is None and version.schema["type"] == ["null", "integer"] and version.schema["minimum"] == 1
    assert "stable version before the current one" in version.description


def test_the_defaults_and_a_named_version_validate(dag):
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dag.params)
    params.validate()
    params["model_name"], params["version"] = "reviews-2", 3
    params.validate()


@pytest.mark.parametrize(
    "name, value", [("version", 0), ("version", 1.5), ("version", "two"), ("model_name", "bad name!"), ("model_name", "")]
)
def test_bad_params_are_refused(dag, name, value):
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match=f"Invalid input for param {name}"):
        params[name] = value
        params.validate()


def test_a_superseded_rollback_fails_and_says_who_serves(dag, monkeypatch, pg_dsn):
    from airflow.sdk.exceptions import AirflowFailException

    import maas_tasks.promote

    monkeypatch.setenv("MAAS_REGISTRY_DSN", pg_dsn)
    monkeypatch.setattr(
        maas_tasks.promote, "rollback_version",
        lambda *a, **k: {"model_name": MODEL, "version": 1, "outcome": "superseded", "previous_version": 2,
                         "stable": 3, "nodes": []},
    )
    task = dag.get_task("rollback_version")
    with pytest.raises(AirflowFailException, match="v3 became stable while this run was moving it; v3 keeps serving"):
        task.python_callable({"model_name": MODEL, "version": 1, "stable": 2})


RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from airflow.dag_processing.dagbag import DagBag
    from maas_runs import route_run_logs, run_in_process

    results = []
    for conf in json.loads(sys.argv[2]):
        dag = DagBag(dag_folder=sys.argv[1]).dags["maas_rollback"]  # dag.test() keeps a run's conf in dag.params
        outcomes = []
        with route_run_logs(Path(sys.argv[3]), on_task_finished=outcomes.append):
            run = run_in_process(dag, conf)
        results.append({"state": run.state, "tasks": run.task_states,
                        "errors": {o.task_id: o.error for o in outcomes if o.error}})
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def served(pg_cluster, tmp_path_factory):
    """A registry with sentiment v1 (retired) and v2 (stable) on a running model server, v3 rejected, and
    Airflow's metadata database: what a rollback needs, made without a training run."""
    from maas_tasks import postgres, stack
    from maas_tasks.config import load_settings
    from maas_tasks.promote import local_reconciler
    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store
    from serving.model_config import ModelServerConfig, write_model_config
    from serving.server import ModelServer
    from tests.fixtures.model_versions import export_saved_models, publish_version, record_snapshot

    root = tmp_path_factory.mktemp("rollback")
    suffix = uuid.uuid4().hex[:8]
    for db in (f"airflow_{suffix}", f"maas_{suffix}"):
        postgres.ensure_database(pg_cluster, db)
    grpc_port, rest_port = find_free_port(), find_free_port()
    env = {
        **os.environ,
        "MAAS_HOME": str(root / "maas"),
        "MAAS_REGISTRY_DSN": pg_cluster.dsn(f"maas_{suffix}"),
        "MAAS_GRPC_PORT": str(grpc_port),
        "MAAS_REST_PORT": str(rest_port),
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg_cluster.sqlalchemy_url(f"airflow_{suffix}"),
    }
    settings = load_settings(env)
    stack.migrate_airflow_db(settings, base_env=env)
    write_model_config(settings.serving_config, ModelServerConfig())
    server = ModelServer(ModelServerConfig(), grpc_port=grpc_port, rest_port=rest_port, poll_wait_seconds=0.0)
    server.start()
    try:
        store = open_store(settings=settings)
        models = export_saved_models(root / "exported")
        with Registry.connect(settings.registry_dsn) as registry:
            snapshot = record_snapshot(registry, store, rows=400, source="reviews.csv")
            for n, accuracy in ((1, 0.85), (2, 0.87)):
                version = publish_version(registry, store, MODEL, accuracy=accuracy, snapshot_id=snapshot,
                                          dag_run_id=f"manual__{n}", saved_model=models[n], seed=n)
                registry.mark_serving(MODEL, version)  # straight to stable: the rollbacks go through the protocol
            local_reconciler(settings, store, registry)()
            rejected = publish_version(registry, store, MODEL, accuracy=0.5, snapshot_id=snapshot,
                                       dag_run_id="manual__3", saved_model=models[1], seed=3)
            assert registry.get_version(MODEL, rejected).status == "rejected"
        yield {"env": env, "settings": settings, "root": root, "server": server}
    finally:
        server.stop(grace=0.5)


def run_dag(served, *confs: dict) -> list[dict]:
    """Run maas_rollback once per conf through ``dag.test()``, in a process with the stack's environment."""
    from maas_tasks.stack import airflow_environment

    env = airflow_environment(served["settings"], served["env"])
    env["PYTHONPATH"] = os.pathsep.join([str(DAG_FILE.parents[1] / "plugins"), str(DAG_FILE.parents[1])])
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(DAG_FILE), json.dumps(list(confs)), str(served["root"] / "runs.log")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def served_version(served) -> int:
    from serving.client import predict_grpc

    return predict_grpc(["good"], model=MODEL, target=served["settings"].grpc_target)[0]["version"]


@pytest.mark.slow
@pytest.mark.integration
def test_rollback_restores_the_previous_version_is_safe_to_repeat_and_refuses_what_cannot_serve(served):
    from maas_tasks.registry import Registry
    from tests.fixtures.invariants import assert_registry_invariants

    assert served_version(served) == 2
    back, again, rejected, missing, other = run_dag(
        served,
        {},  # the defaults: MAAS_MODEL_NAME, the previous stable version
        {"model_name": MODEL, "version": 1},  # what a retry or a second click does: nothing more
        {"version": 3},
        {"version": 99},
        {"model_name": "nothing-served"},
    )
    assert back["state"] == "success", back
    assert again["state"] == "success", again
    for failed, task, message in (
        (rejected, "resolve_rollback_version", "sentiment v3 is rejected and was never exported; only a version that "
                                               "passed the gate and was exported can serve"),
        (missing, "resolve_rollback_version", "sentiment version 99 is not in the registry"),
        (other, "resolve_rollback_version", "nothing-served has no stable version yet: there is nothing to roll back"),
    ):
        assert failed["state"] == "failed" and failed["tasks"] == {task: "failed", "rollback_version": "upstream_failed"}
        assert message in failed["errors"][task], failed
    with Registry.connect(served["settings"].registry_dsn) as registry:
        events = [e for e in registry.list_events(model_name=MODEL) if e.kind == "serving"]
        # v1 and v2 made stable directly, then the rollback to v1; the repeated rollback moved nothing.
        assert [(e.version, e.detail.get("purpose")) for e in events] == [(1, None), (2, None), (1, "rollback")]
        target = registry.serving_target(MODEL)
        assert (target.stable, target.previous) == (1, 2)
        assert [v.status for v in registry.list_versions(MODEL)] == ["serving", "retired", "rejected"]
        assert_registry_invariants(registry)
    assert served_version(served) == 1
