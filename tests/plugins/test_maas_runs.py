"""Where the logs of an in-process run go: each task's records into the file the Airflow UI reads, the rest
into the run log, and nothing onto the console unless asked; the outcome of each attempt is reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import structlog

from maas_runs import _error_from_log, route_run_logs


def fake_ti(task_id: str, try_number: int = 1) -> SimpleNamespace:
    return SimpleNamespace(dag_id="maas_training", run_id="manual__test", task_id=task_id, map_index=-1,
                           try_number=try_number, state="success")


def listener():
    from airflow.sdk.listener import get_listener_manager

    return get_listener_manager().hook


def test_a_task_attempt_logs_to_its_own_file_and_the_run_log_gets_everything(tmp_path, capsys):
    from airflow.configuration import conf

    outcomes = []
    run_log = tmp_path / "run.log"
    stage_log = logging.getLogger("maas_tasks.train")
    with route_run_logs(run_log, on_task_finished=outcomes.append):
        stage_log.warning("before any task")
        listener().on_task_instance_running(previous_state=None, task_instance=fake_ti("train_model"))
        stage_log.warning("epoch 1/1: loss 0.5")
        structlog.get_logger(logger_name="task").warning("a structlog event", detail=3)
        try:
            raise ValueError("bad input")
        except ValueError:
            stage_log.exception("it failed")
        listener().on_task_instance_failed(previous_state=None, task_instance=fake_ti("train_model"), error="boom")
        stage_log.warning("after the task")
    task_file = Path(conf.get("logging", "base_log_folder")) / (
        "dag_id=maas_training/run_id=manual__test/task_id=train_model/attempt=1.log"
    )
    events = [json.loads(line) for line in task_file.read_text().splitlines()]
    assert [e["event"] for e in events] == ["epoch 1/1: loss 0.5", "a structlog event", "it failed"]
    assert events[0]["logger"] == "maas_tasks.train" and events[1]["detail"] == 3
    assert events[2]["error_detail"][0]["exc_value"] == "bad input"  # as Airflow's supervisor stores it
    assert _error_from_log(task_file) == "bad input"

    text = run_log.read_text()
    assert all(m in text for m in ("before any task", "epoch 1/1", "a structlog event", "after the task"))
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.out + captured.err
    [outcome] = outcomes
    assert (outcome.task_id, outcome.try_number, outcome.state, outcome.error) == ("train_model", 1, "failed", "boom")
    assert outcome.log_path == task_file


def test_logging_is_restored_afterwards(tmp_path):
    root_handlers = list(logging.getLogger().handlers)
    processors = list(structlog.get_config()["processors"])
    with route_run_logs(tmp_path / "run.log"):
        pass
    assert set(logging.getLogger().handlers) == set(root_handlers)
    assert structlog.get_config()["processors"] == processors


def test_no_error_in_a_log_without_one(tmp_path):
    path = tmp_path / "attempt=1.log"
    path.write_text('{"event": "fine", "level": "info"}\nnot json\n')
    assert _error_from_log(path) is None
    assert _error_from_log(tmp_path / "missing.log") is None
