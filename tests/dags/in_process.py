"""Running the MaaS DAGs with ``dag.test()`` inside the test process, and reading what Airflow recorded.

Airflow's metadata database is SQLite under the session's AIRFLOW_HOME (``tests/conftest.py``), created
on first use; ``dag.test()`` syncs the project's ``dags/`` folder into it, as the DAG processor would. Tasks run in
this process, so a test sets the ``MAAS_*`` environment with ``monkeypatch`` and may patch a stage. An
Asset-triggered run is created by the scheduler's own code (:func:`schedule_asset_runs`) and then executed
by ``dag.test()``'s loop (:func:`run_dag` with ``run_id``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def airflow_db() -> Iterator[None]:
    """Airflow's metadata schema (created on first use), with the project's DAG folder as the bundle
    ``dag.test()`` syncs, for one test module: the settings are restored after it."""
    from airflow import settings
    from airflow.utils import db

    patch = pytest.MonkeyPatch()
    patch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
    # Tests change what a DAG is (its Asset is named after MAAS_MODEL_NAME) seconds apart: store every change.
    patch.setenv("AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL", "0")
    patch.setattr(settings, "DAGS_FOLDER", str(DAGS))
    db.initdb()
    try:
        yield
    finally:
        patch.undo()


def load_dag(dag_id: str) -> Any:
    """The DAG parsed afresh from its file (``dag.test()`` keeps a run's conf in the DAG's params)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def run_dag(dag: Any, conf: dict[str, Any] | None = None, *, run_id: str | None = None) -> dict[str, str]:
    """Run ``dag`` once with ``dag.test()``; with ``run_id``, execute that existing run (e.g. one the scheduler
    created) instead of a new manual one. Returns the final state of each task."""
    import airflow.models.dagrun as dagrun

    create = dagrun.get_or_create_dagrun

    def existing_run(*, dag: Any, session: Any, **_: Any) -> Any:
        from airflow.utils.state import DagRunState
        from sqlalchemy import select

        run = session.scalar(select(dagrun.DagRun).where(dagrun.DagRun.dag_id == dag.dag_id,
                                                          dagrun.DagRun.run_id == run_id))
        run.state, run.dag = DagRunState.RUNNING, dag
        session.commit()
        return run

    if run_id is not None:
        dagrun.get_or_create_dagrun = existing_run
    try:
        run = dag.test(run_conf=conf)
    finally:
        dagrun.get_or_create_dagrun = create
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}


def set_paused(dag_id: str, paused: bool) -> None:
    """Pause or unpause a DAG the metadata database knows (a paused DAG's Asset events queue no run)."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        session.scalar(select(DagModel).where(DagModel.dag_id == dag_id)).is_paused = paused


def asset_events(name: str) -> list[dict[str, Any]]:
    """The extras of the events of the Asset ``name``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = (select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                 .where(AssetModel.name == name).order_by(AssetEvent.id))
        return [dict(event.extra or {}) for event in session.scalars(query)]


def schedule_asset_runs() -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Create the Asset-triggered runs that are due, with the scheduler's own code (what its loop does when
    an Asset event queued a run). Returns each new run's DAG id, run id and the extras of its events."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType
    from sqlalchemy import select

    with create_session() as session:
        before = set(session.scalars(select(DagRun.run_id).where(DagRun.run_type == DagRunType.ASSET_TRIGGERED)))
        query, triggered = DagModel.dags_needing_dagruns(session)
        due = [d for d in query.all() if d.dag_id in triggered]
        SchedulerJobRunner(job=Job())._create_dag_runs_asset_triggered(dag_models=due, session=session)
        session.commit()
        runs = session.scalars(select(DagRun).where(DagRun.run_type == DagRunType.ASSET_TRIGGERED)).all()
        return [(r.dag_id, r.run_id, [dict(e.extra or {}) for e in r.consumed_asset_events])
                for r in runs if r.run_id not in before]


PARSE_CHECK = """
import json, sys
import sqlalchemy.engine
def forbidden(*a, **k):
    raise AssertionError("parse-time side effect")
sqlalchemy.engine.Engine.connect = forbidden
from airflow.sdk import Variable
from airflow.sdk.bases.hook import BaseHook
from airflow.sdk.definitions.connection import Connection
Variable.get = forbidden
BaseHook.get_connection = forbidden
Connection.get = forbidden
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("tensorflow", "keras", "great_expectations", "pandas", "pyarrow", "minio", "maas_tasks.registry",
                           "maas_tasks.train", "maas_tasks.sources", "maas_tasks.housekeeping", "serving.server")
               if m in sys.modules)
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids),
                  "heavy": heavy}))
"""


def parse_in_fresh_interpreter(dag_file: Path, tmp_path: Path) -> dict[str, Any]:
    """Parse ``dag_file`` in a new interpreter whose metadata database is unreachable and whose Variable and
    Connection lookups fail: what it imported, and its import errors."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://nobody:none@127.0.0.1:9/none"}
    out = subprocess.run([sys.executable, "-c", PARSE_CHECK, str(dag_file)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
