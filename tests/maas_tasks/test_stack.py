"""The local stack: background process management, Airflow's environment, and a real up/status/down cycle."""

from __future__ import annotations

import sys
import time

import pytest

from maas_tasks import stack
from maas_tasks.config import load_settings
from tests.fixtures.postgres import find_free_port


@pytest.fixture
def settings(tmp_path):
    return load_settings({
        "MAAS_HOME": str(tmp_path / "home"),
        "MAAS_PG_PORT": str(find_free_port()),
        "MAAS_GRPC_PORT": str(find_free_port()),
        "MAAS_REST_PORT": str(find_free_port()),
    })


def test_start_is_idempotent_and_stop_reaches_the_process_group(settings):
    # The child of the started shell must die too: stop signals the whole process group.
    argv = ["/bin/sh", "-c", f"{sys.executable} -c 'import time; time.sleep(600)' & wait"]
    first = stack._start_process(settings, "sleeper", argv, {})
    second = stack._start_process(settings, "sleeper", argv, {})
    assert first.running and second.pid == first.pid
    assert stack.process_status(settings, "sleeper").running
    assert stack._stop_process(settings, "sleeper") is True
    assert not stack.pid_alive(first.pid)
    assert not stack.process_status(settings, "sleeper").running
    assert stack._stop_process(settings, "sleeper") is False  # stopping twice is fine


def test_a_process_that_never_listens_is_stopped_and_its_log_quoted(settings):
    argv = [sys.executable, "-c", "import sys, time; print('cannot bind: boom', flush=True); time.sleep(600)"]
    status = stack._start_process(settings, "mute", argv, {})
    with pytest.raises(stack.StackError, match="(?s)did not listen.*cannot bind: boom"):
        stack._wait_for_ports(settings, status, "127.0.0.1", [find_free_port()], timeout=2)
    assert not stack.process_status(settings, "mute").running


def test_a_process_that_exits_during_start_up_is_reported(settings):
    status = stack._start_process(settings, "crash", [sys.executable, "-c", "raise SystemExit('bad flag')"], {})
    time.sleep(0.5)
    with pytest.raises(stack.StackError, match="(?s)exited during start-up.*bad flag"):
        stack._wait_for_ports(settings, status, "127.0.0.1", [find_free_port()], timeout=10)


def test_airflow_environment_defaults_and_overrides(settings):
    base = {"PATH": "/usr/bin", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://u:p@db/airflow",
            "AIRFLOW__CORE__PARALLELISM": "7"}
    env = stack.airflow_environment(settings, base)
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == base["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CORE__PARALLELISM"] == "7"
    assert env["AIRFLOW_HOME"] == str(settings.home / "airflow")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"].endswith("/dags")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__API__PORT"] == str(settings.airflow_port)
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://127.0.0.1:{settings.airflow_port}/execution/"
    assert env["PATH"].split(":")[0] == str(__import__("pathlib").Path(sys.executable).parent)


@pytest.mark.slow
@pytest.mark.integration
def test_stack_up_is_idempotent_status_reports_and_down_stops_everything(settings):
    lines: list[str] = []
    pids = (None, None, None)
    try:
        stack.stack_up(settings, echo=lines.append)
        status = stack.stack_status(settings)
        assert status["postgres"]["running"] and status["model-server"]["running"]
        assert status["serving-sync"]["running"] and not status["airflow"]["running"]
        assert "serving      node local: no model to serve yet" in lines
        pids = (status["postgres"]["pid"], status["model-server"]["pid"], status["serving-sync"]["pid"])

        stack.stack_up(settings, echo=lines.append)  # again: nothing restarts
        again = stack.stack_status(settings)
        assert (again["postgres"]["pid"], again["model-server"]["pid"], again["serving-sync"]["pid"]) == pids
        assert settings.serving_config.is_file()
        assert (settings.home / "store").is_dir()
    finally:
        stack.stack_down(settings, echo=lines.append)
    status = stack.stack_status(settings)
    assert not any(component["running"] for component in status.values())
    assert None not in pids and not any(stack.pid_alive(pid) for pid in pids)
    down_again: list[str] = []
    stack.stack_down(settings, echo=down_again.append)
    assert all("was not running" in line for line in down_again)


def test_a_stale_pid_file_naming_another_process_is_not_adopted(settings):
    # After a reboot the recorded pid can belong to an unrelated program: never adopt or signal it.
    import os

    pid_file = settings.home / "run" / "model-server.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{os.getpid()} 1")  # our own live pid, but with another start time
    status = stack.process_status(settings, "model-server")
    assert not status.running and status.pid is None
    assert stack._stop_process(settings, "model-server") is False
    assert stack.pid_alive(os.getpid())
