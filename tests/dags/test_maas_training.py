"""DAG integrity: the training DAG imports cleanly and cheaply, and is wired as designed."""

from __future__ import annotations

from pathlib import Path

import pytest

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "maas_training.py"

EXPECTED_EDGES = {
    ("ingest_data", "validate_data"),
    ("validate_data", "clean_data"),
    ("clean_data", "build_features"),
    ("clean_data", "check_drift"),
    ("validate_data", "check_drift"),
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
    from tests.dags.in_process import parse_in_fresh_interpreter

    result = parse_in_fresh_interpreter(DAG_FILE, tmp_path)
    assert result == {"errors": {}, "dags": ["maas_training"], "heavy": []}


def test_schedule_tags_and_docs(dag):
    from maas_timetables import NextSlotCronTimetable

    assert dag.dag_id == DAG_FILE.stem
    # Weekly (MAAS_TRAINING_SCHEDULE) or when maas_ingest announces a snapshot (tests/dags/test_maas_ingest.py).
    assert isinstance(dag.timetable.timetable, NextSlotCronTimetable) and dag.timetable.timetable.summary == "0 0 * * 0"
    assert dag.timetable.asset_condition.name == "maas_snapshots_sentiment"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert {"maas", "training"} <= set(dag.tags)
    assert dag.description and len(dag.description) < 120  # the DAG list shows it as a one-line summary
    assert "ingest" in dag.doc_md and "promote" in dag.doc_md
    # The doc names the UI's controls as they are labelled and says what unpausing does.
    assert "**Trigger**" in dag.doc_md and "Trigger DAG" not in dag.doc_md
    assert "Unpause maas_training on trigger" in dag.doc_md and "never starts a missed run" in dag.doc_md


def test_task_ids_and_edges(dag):
    assert set(dag.task_ids) == {a for edge in EXPECTED_EDGES for a in edge}
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == EXPECTED_EDGES


def test_every_task_retries(dag):
    # Bad data fails validate_data at once (AirflowFailException); retries are for passing faults.
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id


SECTIONS = {"Data", "Training", "Gate and promotion"}
OPTIONAL = {"data_path", "group_col", "slice_cols", "model_name", "min_roc_auc", "id_col", "label_map", "table_query",
            "watermark_col"}


def test_params_are_sectioned_titled_and_documented(dag):
    params = dag.params
    expected = {"data_path", "text_col", "label_col", "group_col", "id_col", "label_map", "max_quarantine_fraction",
                "table_query", "watermark_col", "batch_window", "model_name", "epochs", "batch_size",
                "max_tokens", "eval_fraction", "min_accuracy", "min_roc_auc", "champion_tolerance", "force_promote"}
    assert expected <= set(params.keys())
    for name in params.keys():
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name
        assert param.schema.get("section") in SECTIONS, name
    assert {params.get_param(n).schema["section"] for n in params.keys()} == SECTIONS


def test_optional_params_are_nullable_with_a_none_default(dag):
    # The form treats "" as missing and marks every non-nullable field as required.
    for name in OPTIONAL:
        param = dag.params.get_param(name)
        assert param.value is None and "null" in param.schema["type"], name
    for name in set(dag.params.keys()) - OPTIONAL:
        param = dag.params.get_param(name)
        assert param.value is not None and "null" not in param.schema["type"], name


def test_every_limit_is_one_the_trigger_form_enforces_and_is_stated(dag):
    # The form applies minimum/maximum (clamping), enum (a dropdown) and maxLength, but not
    # exclusiveMinimum/exclusiveMaximum or integer-ness: whole numbers must be dropdowns.
    for name in dag.params.keys():
        param = dag.params.get_param(name)
        schema = param.schema
        assert not {"exclusiveMinimum", "exclusiveMaximum", "multipleOf"} & set(schema), name
        if "integer" in schema["type"]:
            assert schema.get("enum"), f"{name}: a whole number must be a dropdown"
        choices = [v for v in schema.get("enum", []) if v is not None]
        limits = [min(choices), max(choices)] if choices else []
        limits += [schema[bound] for bound in ("minimum", "maximum") if bound in schema]
        for limit in limits:
            assert str(limit) in param.description or f"{limit:,}" in param.description, (name, limit)
    assert "/" in dag.params.get_param("data_path").description  # an example path
    sample = dag.params.get_param("data_path").schema["examples"][0]
    assert Path(sample).is_file() and sample.endswith("maas_tasks/data/sample_reviews.csv")
    assert "maas_tasks/data/sample_reviews.csv" in dag.params.get_param("data_path").description


def test_defaults_validate(dag):
    from airflow.sdk.definitions.param import ParamsDict

    ParamsDict(dag.params).validate()


@pytest.mark.parametrize(
    "name, value",
    [("epochs", 0), ("epochs", 1.5), ("epochs", 51), ("eval_fraction", 1), ("eval_fraction", 0.01),
     ("min_accuracy", 2), ("model_name", "bad name!"), ("model_name", ""), ("batch_size", 100),
     ("max_tokens", 12345), ("text_col", ""), ("model_name", "models.config"), ("max_quarantine_fraction", 0.9),
     ("batch_window", -1), ("batch_window", 101)],
)
def test_bad_param_values_are_rejected(dag, name, value):
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match=name):
        params[name] = value
        params.validate()


def test_a_stuck_run_times_out(dag):
    assert dag.dagrun_timeout is not None and dag.dagrun_timeout.total_seconds() <= 24 * 3600
