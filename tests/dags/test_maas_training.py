"""DAG integrity: the training DAG imports cleanly and cheaply, and is wired as designed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "maas_training.py"

EXPECTED_EDGES = {
    ("ingest_data", "validate_data"),
    ("validate_data", "clean_data"),
    ("clean_data", "build_features"),
    ("build_features", "train_model"),
    ("train_model", "evaluate_model"),
    ("build_features", "evaluate_model"),
    ("validate_data", "evaluate_model"),
    ("evaluate_model", "gate_model"),
    ("evaluate_model", "export_model"),
    ("train_model", "export_model"),
    ("gate_model", "export_model"),
    ("export_model", "promote_model"),
}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags["maas_training"]


def test_parsing_imports_nothing_heavy_and_touches_no_database_or_connection(tmp_path):
    # A fresh interpreter with an unreachable metadata DB and every lookup booby-trapped.
    script = textwrap.dedent(
        f"""
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
        bag = DagBag(dag_folder={str(DAG_FILE)!r})
        heavy = sorted(m for m in ("tensorflow", "keras", "great_expectations", "pandas", "pyarrow",
                                   "minio", "maas_tasks.train", "serving.server") if m in sys.modules)
        print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}},
                          "dags": sorted(bag.dag_ids), "heavy": heavy}}))
        """
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://nobody:none@127.0.0.1:9/none",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": {}, "dags": ["maas_training"], "heavy": []}


def test_schedule_tags_and_docs(dag):
    assert dag.dag_id == DAG_FILE.stem
    assert dag.schedule == "@weekly"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert {"maas", "training"} <= set(dag.tags)
    assert "ingest" in dag.doc_md and "promote" in dag.doc_md


def test_task_ids_and_edges(dag):
    assert set(dag.task_ids) == {a for edge in EXPECTED_EDGES for a in edge}
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == EXPECTED_EDGES


def test_every_task_retries(dag):
    # Bad data fails validate_data at once (AirflowFailException); retries are for passing faults.
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id


def test_params_are_typed_documented_and_defaulted(dag):
    params = dag.params
    expected = {"data_path", "text_col", "label_col", "group_col", "model_name", "epochs", "batch_size",
                "max_tokens", "eval_fraction", "min_accuracy"}
    assert expected <= set(params.keys())
    for name in expected:
        param = params.get_param(name)
        assert "type" in param.schema and param.schema.get("title"), name
        assert param.description, name
    values = params.dump()
    assert values["model_name"] == "" and values["text_col"] == "text"  # empty: MAAS_MODEL_NAME
    assert 0 < values["min_accuracy"] < 1


def test_bad_param_values_are_rejected(dag):
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match="epochs|minimum"):
        params["epochs"] = 0
        params.validate()


def test_bad_input_fails_a_task_at_once_and_other_errors_are_retried():
    import importlib.util

    from airflow.sdk.exceptions import AirflowFailException

    spec = importlib.util.spec_from_file_location("maas_training_under_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(AirflowFailException, match="column 'text' is missing"):
        with module._fail_fast_on_bad_input():
            raise ValueError("column 'text' is missing")
    with pytest.raises(ConnectionError):  # a passing fault keeps Airflow's retries
        with module._fail_fast_on_bad_input():
            raise ConnectionError("registry unreachable")
