"""The local stack: background process management, Airflow's environment, and a real up/status/down cycle."""

from __future__ import annotations

import json
import sys
import time

import pytest

from maas_tasks import postgres, stack
from maas_tasks.config import ConfigError, load_settings
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
        assert status["serving-sync"]["running"] and not status[stack.AIRFLOW_API_NAME]["running"]
        assert "serving      node local: no model to serve yet" in lines
        pids = (status["postgres"]["pid"], status["model-server"]["pid"], status["serving-sync"]["pid"])

        stack.stack_up(settings, echo=lines.append)  # again: nothing restarts
        again = stack.stack_status(settings)
        assert (again["postgres"]["pid"], again["model-server"]["pid"], again["serving-sync"]["pid"]) == pids
        assert settings.serving_config.is_file()
        assert (settings.home / "store").is_dir()
        state = settings.home / "run" / "stack.json"
        assert state.stat().st_mode & 0o777 == 0o600
        assert json.loads(state.read_text())["MAAS_GRPC_PORT"] == str(settings.grpc_port)
    finally:
        stack.stack_down(settings, echo=lines.append)
    assert not (settings.home / "run" / "stack.json").exists()  # down forgets the settings
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


def test_the_settings_a_stack_started_with_are_recorded_and_used_by_a_plain_shell(settings, tmp_path):
    path = stack.write_stack_state(settings)
    assert path.stat().st_mode & 0o777 == 0o600
    plain = load_settings({"MAAS_HOME": str(settings.home)})  # a shell with none of the MAAS_* ports
    assert (plain.pg_port, plain.grpc_port, plain.rest_port) == (
        settings.pg_port, settings.grpc_port, settings.rest_port)
    # Nothing runs: a variable that disagrees is simply the value the next `stack up` starts with.
    other = load_settings({"MAAS_HOME": str(settings.home), "MAAS_GRPC_PORT": str(find_free_port())})
    assert stack.settings_disagreements(other) == []


def test_a_variable_that_disagrees_with_the_running_stack_is_refused_with_its_fix(settings):
    stack.write_stack_state(settings)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    stack._start_process(settings, stack.SERVER_NAME, sleeper, {})  # stands in for the model server
    try:
        other_port = find_free_port()
        other = load_settings({"MAAS_HOME": str(settings.home), "MAAS_GRPC_PORT": str(other_port)})
        [note] = stack.settings_disagreements(other)
        assert f"MAAS_GRPC_PORT={other_port}, but the stack running from {settings.home} was started with " \
               f"MAAS_GRPC_PORT={settings.grpc_port}" == note
        with pytest.raises(ConfigError, match="Unset the variable .* or stop the stack"):
            stack.check_stack_settings(other)
        assert stack.recorded_settings(other).grpc_port == settings.grpc_port
        # A setting of a component that does not run (Airflow's port here) may change.
        moved = load_settings({"MAAS_HOME": str(settings.home), "MAAS_AIRFLOW_PORT": str(find_free_port())})
        assert stack.settings_disagreements(moved) == []
    finally:
        stack._stop_process(settings, stack.SERVER_NAME)


def test_run_and_log_files_are_private(settings):
    stack._start_process(settings, "echo", [sys.executable, "-c", "print('hi')"], {})
    time.sleep(0.5)
    for folder in (settings.home / "run", settings.home / "logs"):
        assert folder.stat().st_mode & 0o777 == 0o700
    assert (settings.home / "logs" / "echo.log").stat().st_mode & 0o777 == 0o600
    assert (settings.home / "run" / "echo.pid").stat().st_mode & 0o777 == 0o600
    loose = settings.home / "logs" / "airflow.log"  # as `airflow standalone` left it, password and all
    loose.write_text("Password for user 'admin': x")
    loose.chmod(0o644)
    stack.make_private_dirs(settings)
    assert loose.stat().st_mode & 0o777 == 0o600


def test_airflow_passwords_are_generated_private_and_a_readable_file_is_replaced(settings, tmp_path):
    env = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer"}
    path = stack.ensure_airflow_passwords(env)
    first = json.loads(path.read_text())
    assert set(first) == {"admin", "viewer"} and path.stat().st_mode & 0o777 == 0o600
    assert json.loads(stack.ensure_airflow_passwords(env).read_text()) == first  # kept while private
    path.chmod(0o644)  # as Airflow writes it, after printing it to its log
    replaced = json.loads(stack.ensure_airflow_passwords(env).read_text())
    assert replaced["admin"] != first["admin"] and path.stat().st_mode & 0o777 == 0o600


def test_every_airflow_listener_is_on_loopback_on_a_setting_and_tasks_name_a_loopback_host(settings):
    from dataclasses import replace

    base = {"PATH": "/usr/bin", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://u:p@127.0.0.1/airflow"}
    celery = replace(settings, airflow_executor="celery", redis_port=find_free_port())
    env = stack.airflow_environment(celery, base)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == str(settings.airflow_worker_log_port)
    assert env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] == str(settings.airflow_triggerer_log_port)
    assert env["AIRFLOW__CELERY__BROKER_URL"].endswith(f"@127.0.0.1:{celery.redis_port}/0")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + base["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert (settings.home / "redis" / "password").stat().st_mode & 0o777 == 0o600
    module, _, name = env["AIRFLOW__CORE__HOSTNAME_CALLABLE"].rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name)() == "127.0.0.1"

    processes = stack._airflow_processes(celery, "celery")
    listeners = {name: (argv, port, setting) for name, argv, port, setting in processes if port is not None}
    assert set(listeners) == {"airflow-log-server", "airflow-trigger-log-server", stack.AIRFLOW_API_NAME}
    for name in ("airflow-log-server", "airflow-trigger-log-server"):
        argv, port, setting = listeners[name]
        assert "--host=127.0.0.1" in argv and f"--port={port}" in argv and setting.startswith("MAAS_AIRFLOW_")
    # Airflow's own log servers would listen on every interface: each component skips them.
    for name, argv, port, _ in processes:
        if name in ("airflow-scheduler", "airflow-triggerer", stack.CELERY_WORKER_NAME):
            assert "--skip-serve-logs" in argv


def test_a_port_taken_by_another_program_names_the_setting_to_move(settings):
    import socket

    base = {**__import__("os").environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://u:p@127.0.0.1/a"}
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = str(other.getsockname()[1])
        taken = load_settings({"MAAS_HOME": str(settings.home), "MAAS_AIRFLOW_WORKER_LOG_PORT": port})
        with pytest.raises(stack.StackError, match="already in use by another program .* MAAS_AIRFLOW_WORKER_LOG_PORT"):
            stack.start_airflow(taken, base_env=base)
    assert not any(stack.process_status(settings, name).running for name in stack.AIRFLOW_PROCESS_NAMES)


@pytest.mark.integration
def test_redis_listens_on_loopback_wants_its_password_and_keeps_it_off_the_command_line(settings):
    import socket

    redis_settings = load_settings({"MAAS_HOME": str(settings.home), "MAAS_REDIS_PORT": str(find_free_port())})
    status = stack.start_redis(redis_settings)
    try:
        password = (settings.home / "redis" / "password").read_text()
        cmdline = open(f"/proc/{status.pid}/cmdline", "rb").read().decode()
        assert password not in cmdline
        assert (settings.home / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
        with socket.create_connection(("127.0.0.1", redis_settings.redis_port), timeout=5) as conn:
            conn.sendall(b"PING\r\n")
            assert conn.recv(100).startswith(b"-NOAUTH")
            conn.sendall(f"AUTH {password}\r\nPING\r\nCONFIG GET bind\r\n".encode())
            time.sleep(0.3)
            reply = conn.recv(1000)
        assert b"+OK" in reply and b"+PONG" in reply and b"127.0.0.1" in reply
    finally:
        stack._stop_process(redis_settings, stack.REDIS_NAME)


@pytest.mark.slow
@pytest.mark.integration
def test_the_training_dag_runs_on_a_celery_worker_with_store_and_registry_from_connections(
    pg_cluster, s3_endpoint, tmp_path, monkeypatch
):
    """`stack up --airflow --executor celery` as compose runs it: Redis, the CeleryExecutor and a worker; the store
    (moto's S3) and the registry (its own role) come only from Airflow Connections, whose secrets no task log or
    XCom shows; every listener of the stack is on 127.0.0.1."""
    import os
    import uuid

    import psutil
    import psycopg2

    from maas_tasks import postgres
    from maas_tasks.registry import Registry
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.storage import open_store
    from tests.fixtures.browser import AirflowStack, _wait_for_dag

    suffix = uuid.uuid4().hex[:8]
    store_secret, registry_password = f"celery-s3-{uuid.uuid4().hex}", f"celery-pg-{uuid.uuid4().hex}"
    postgres.ensure_database(pg_cluster, f"airflow_{suffix}")
    admin = psycopg2.connect(pg_cluster.dsn())
    admin.autocommit = True  # CREATE DATABASE runs outside a transaction
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE registry_{suffix} LOGIN PASSWORD %s", (registry_password,))
        cur.execute(f"CREATE DATABASE maas_{suffix} OWNER registry_{suffix}")
    admin.close()
    bucket = f"maas-celery-{suffix}"
    ports = ("MAAS_GRPC_PORT", "MAAS_REST_PORT", "MAAS_AIRFLOW_PORT", "MAAS_AIRFLOW_WORKER_LOG_PORT",
             "MAAS_AIRFLOW_TRIGGERER_LOG_PORT", "MAAS_REDIS_PORT")
    env = {
        **os.environ,
        "MAAS_HOME": str(tmp_path / "maas"),
        **{name: str(find_free_port()) for name in ports},
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg_cluster.sqlalchemy_url(f"airflow_{suffix}"),
        "AIRFLOW_CONN_MAAS_STORE": json.dumps({
            "conn_type": "aws", "login": "celery-access", "password": store_secret,
            "extra": {"endpoint_url": s3_endpoint, "bucket": bucket, "prefix": "team", "region_name": "us-east-1"}}),
        "AIRFLOW_CONN_MAAS_REGISTRY": json.dumps({
            "conn_type": "postgres", "host": "127.0.0.1", "port": pg_cluster.port, "login": f"registry_{suffix}",
            "password": registry_password, "schema": f"maas_{suffix}"}),
    }
    settings = load_settings(env)
    from maas_hooks import task_settings

    for name in ("AIRFLOW_CONN_MAAS_STORE", "AIRFLOW_CONN_MAAS_REGISTRY"):
        monkeypatch.setenv(name, env[name])  # for task_settings here, as in the tasks
    store = open_store(settings=task_settings(env))  # what the tasks will use: the connection's bucket
    store.ensure_bucket()
    data = tmp_path / "reviews.csv"
    generate_reviews(300, seed=11).to_csv(data, index=False)
    stack.migrate_airflow_db(settings, base_env=env)
    try:
        stack.start_model_server(settings, base_env=env)
        stack.start_airflow(settings, base_env=env, executor="celery")
        password = stack.airflow_password(settings, base_env=env, wait=0)
        airflow = AirflowStack(f"http://127.0.0.1:{settings.airflow_port}", "admin", password, env, settings)
        _wait_for_dag(airflow, "maas_training")

        # Every listener of the stack's processes (and their children) is on loopback.
        pids = set()
        for name in (stack.SERVER_NAME, *stack.AIRFLOW_PROCESS_NAMES):
            pid = stack.process_status(settings, name).pid
            if pid is not None:
                pids |= {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert {c.laddr.port for c in listening} >= {int(env[name]) for name in ports}
        assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening

        airflow.set_paused("maas_training", False)
        run_id = airflow.api("POST", "/api/v2/dags/maas_training/dagRuns", {
            "logical_date": None, "conf": {"data_path": str(data), "epochs": 2}})["dag_run_id"]
        run = airflow.wait_for_run("maas_training", run_id, timeout=420)
        worker_log = (settings.home / "logs" / f"{stack.CELERY_WORKER_NAME}.log").read_text()
        assert run["state"] == "success", worker_log[-3000:]
    finally:
        stack.stop_airflow(settings)
        stack.stop_model_server(settings)

    # Each task ran as a Celery task: the scheduler recorded its Celery id, the worker received it, and its
    # result is in the stack's PostgreSQL (the result backend).
    with psycopg2.connect(pg_cluster.dsn(f"airflow_{suffix}")) as conn, conn.cursor() as cur:
        cur.execute("SELECT task_id, external_executor_id FROM task_instance WHERE run_id = %s", (run_id,))
        celery_ids = dict(cur.fetchall())
        cur.execute("SELECT task_id, status FROM celery_taskmeta WHERE task_id = ANY(%s)", (list(celery_ids.values()),))
        results = dict(cur.fetchall())
        cur.execute("SELECT value::text FROM xcom WHERE run_id = %s", (run_id,))
        xcoms = " ".join(value for (value,) in cur.fetchall())
    assert {"train_model", "export_model", "promote_model"} <= set(celery_ids)
    assert all(celery_ids.values()) and set(results.values()) == {"SUCCESS"} and len(results) == len(celery_ids)
    assert all(f"execute_workload[{celery_id}]" in worker_log for celery_id in celery_ids.values())

    # The run used the connections: its model is in the connection's bucket and version 1 in its registry.
    assert store.list_keys("models/sentiment/1/")
    with Registry.connect(task_settings(env).registry_dsn) as registry:
        assert registry.get_version("sentiment", 1).status == "serving"
    task_logs = [path.read_text() for path in (tmp_path / "airflow" / "logs").rglob("*.log")]
    assert task_logs and xcoms
    for secret in (store_secret, registry_password):
        assert not any(secret in text for text in task_logs) and secret not in xcoms


@pytest.mark.slow
@pytest.mark.integration
def test_stack_up_with_the_gateway_runs_two_replicas_behind_nginx(tmp_path, monkeypatch):
    import json
    import urllib.error
    import urllib.request

    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry
    from serving.gateway import first_api_key

    settings = load_settings({
        "MAAS_HOME": str(tmp_path / "home"),
        **{name: str(find_free_port()) for name in (
            "MAAS_PG_PORT", "MAAS_GRPC_PORT", "MAAS_REST_PORT", "MAAS_REPLICA_GRPC_PORT", "MAAS_REPLICA_REST_PORT",
            "MAAS_GATEWAY_GRPC_PORT", "MAAS_GATEWAY_REST_PORT")},
    })
    # Airflow's schema is not what this is about (the test above covers it), and migrating it takes long.
    monkeypatch.setattr(stack, "migrate_airflow_db", lambda *args, **kwargs: None)
    names = (stack.SERVER_NAME, stack.SYNC_NAME, stack.REPLICA_NAME, stack.REPLICA_SYNC_NAME, stack.GATEWAY_NAME)
    lines: list[str] = []
    pids: dict[str, int] = {}
    try:
        stack.stack_up(settings, with_gateway=True, echo=lines.append)
        status = stack.stack_status(settings)
        assert all(status[name]["running"] for name in names), status
        pids = {name: status[name]["pid"] for name in names}
        keys = settings.gateway_keys_file
        assert keys.stat().st_mode & 0o777 == 0o600
        key = first_api_key(keys)
        output = "\n".join(lines)
        assert str(keys) in output and key not in output  # the path is printed, never the key
        assert not any(key in path.read_text(errors="replace") for path in (settings.home / "logs").glob("*.log"))
        assert "serving      node local-2: no model to serve yet" in lines

        # Through nginx: refused without the key; with it, a replica answers (no model is served yet).
        url = f"{settings.gateway_rest_url}/v1/models/{settings.model_name}"
        for headers, code in (({}, 401), ({"X-API-Key": key}, 404)):
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            assert answer.value.code == code
            assert ("API key" in json.loads(answer.value.read())["error"]) == (code == 401)
        # Both replicas' agents report to the registry, so promotions wait for both.
        with Registry.connect(registry_dsn(settings)) as registry:
            assert {"local", "local-2"} <= {node.node_id for node in registry.serving_nodes()}

        stack.stack_up(settings, with_gateway=True, echo=lines.append)  # again: nothing restarts
        again = stack.stack_status(settings)
        assert {name: again[name]["pid"] for name in names} == pids
    finally:
        stack.stack_down(settings, echo=lines.append)
    assert not any(component["running"] for component in stack.stack_status(settings).values())
    assert pids and not any(stack.pid_alive(pid) for pid in pids.values())
    # Stopped on purpose, the nodes leave the registry: a later promotion does not wait for them.
    cluster = postgres.local_cluster(settings)
    postgres.start_cluster(cluster)
    try:
        with Registry.connect(registry_dsn(settings)) as registry:
            assert registry.serving_nodes() == []
    finally:
        postgres.stop_cluster(cluster)
