"""The local stack behind ``maas stack up|down|status``: PostgreSQL, the object store, the model server, Airflow.

Everything runs on this machine under ``MAAS_HOME`` (default ``.maas/``): a private PostgreSQL cluster
holding Airflow's metadata and the model registry, the ``file://`` store (or the S3 bucket named by
``MAAS_STORE_URL``), the embedded TF-Serving-compatible model server and its agent (``serving-sync``,
which keeps it converged on the registry's desired serving state), and optionally ``airflow standalone``. Starting is idempotent (what runs is left running) and stopping is clean
(SIGTERM to each background process group, then the cluster's fast shutdown).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from maas_tasks import postgres
from maas_tasks.config import Settings, project_root, settings_environment
from maas_tasks.postgres import pid_alive

SERVER_NAME = "model-server"
SYNC_NAME = "serving-sync"
AIRFLOW_NAME = "airflow"
_START_TIMEOUT = 120.0
_SERVING_CONFIG_DIR = Path(__file__).resolve().parent.parent / "serving" / "config"  # TF Serving flag files


class StackError(RuntimeError):
    """A stack component could not be started or stopped; the message says which and where its log is."""


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    running: bool
    pid: int | None
    log: Path


def _run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def _log_dir(settings: Settings) -> Path:
    return settings.home / "logs"


def _pid_file(settings: Settings, name: str) -> Path:
    return _run_dir(settings) / f"{name}.pid"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if unknown: with the pid, it
    tells a live process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def process_status(settings: Settings, name: str) -> ProcessStatus:
    """Whether the background process ``name`` started by the stack is running.

    The pid file holds the pid and its start time: after a reboot the pid may belong to another
    program, which must be neither adopted nor signalled.
    """
    pid_file = _pid_file(settings, name)
    pid = None
    if pid_file.is_file():
        try:
            raw_pid, _, started = pid_file.read_text().strip().partition(" ")
            pid = int(raw_pid)
        except ValueError:
            pid = None
        if pid is not None and started and process_start_time(pid) not in (started, None):
            pid = None
    running = pid is not None and pid_alive(pid)
    return ProcessStatus(name, running, pid if running else None, _log_dir(settings) / f"{name}.log")


def _start_process(settings: Settings, name: str, argv: list[str], env: dict[str, str]) -> ProcessStatus:
    status = process_status(settings, name)
    if status.running:
        return status
    _run_dir(settings).mkdir(parents=True, exist_ok=True)
    _log_dir(settings).mkdir(parents=True, exist_ok=True)
    with open(status.log, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop reaches its children too
            cwd=project_root(),
        )
    _pid_file(settings, name).write_text(f"{proc.pid} {process_start_time(proc.pid) or ''}".strip())
    return ProcessStatus(name, True, proc.pid, status.log)


def _stop_process(settings: Settings, name: str, timeout: float = 30.0) -> bool:
    status = process_status(settings, name)
    pid_file = _pid_file(settings, name)
    if not status.running:
        pid_file.unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(status.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(status.pid):
            time.sleep(0.2)
        if not pid_alive(status.pid):
            break
    pid_file.unlink(missing_ok=True)
    return True


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_for_ports(settings: Settings, status: ProcessStatus, host: str, ports: list[int], timeout: float) -> None:
    """Wait until the process listens; on failure stop it, so a retry starts afresh rather than adopting it."""
    try:
        _await_ports(status, host, ports, timeout)
    except StackError:
        _stop_process(settings, status.name)
        raise


def _await_ports(status: ProcessStatus, host: str, ports: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_port_open(host, p) for p in ports):
            return
        if status.pid is not None and not pid_alive(status.pid):
            raise StackError(
                f"{status.name} exited during start-up; last lines of {status.log}:\n{_log_tail(status.log)}"
            )
        time.sleep(0.5)
    raise StackError(
        f"{status.name} did not listen on {host}:{ports} within {timeout:.0f}s; "
        f"see {status.log}:\n{_log_tail(status.log)}"
    )


def airflow_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Airflow (CLI, ``dag.test()``, standalone) runs with on the local stack.

    Values the caller already set (e.g. ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` of a deployment) win.
    """
    env = dict(os.environ if base is None else base)
    root = project_root()
    api = f"http://127.0.0.1:{settings.airflow_port}"
    defaults = {
        "AIRFLOW_HOME": str(settings.home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # One training task saturates a core; more parallel workers than cores only thrash.
        "AIRFLOW__CORE__PARALLELISM": str(max(2, os.cpu_count() or 2)),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(max(2, os.cpu_count() or 2)),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        # TensorFlow's C++ INFO and WARNING lines say nothing about a run; its errors still show.
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MAAS_HOME": str(settings.home),
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    # `airflow standalone` starts its components as `airflow ...` found on PATH: make it this venv's.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    if "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = postgres.local_cluster(settings).sqlalchemy_url("airflow")
    return env


def _venv_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def migrate_airflow_db(settings: Settings, base_env: dict[str, str] | None = None) -> None:
    """Create or upgrade Airflow's metadata schema (``airflow db migrate``; idempotent)."""
    env = airflow_environment(settings, base_env)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    log = _log_dir(settings) / "airflow-db-migrate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        result = subprocess.run([_venv_bin("airflow"), "db", "migrate"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise StackError(f"airflow db migrate failed (exit {result.returncode}); see {log}:\n{_log_tail(log)}")


def ensure_serving_config(settings: Settings) -> None:
    """Write an empty model config if there is none: TF Serving refuses to start without the file."""
    from serving.model_config import read_model_config, write_model_config

    settings.serving_dir.mkdir(parents=True, exist_ok=True)
    if not settings.serving_config.exists():
        from tensorflow_serving.config import model_server_config_pb2

        config = model_server_config_pb2.ModelServerConfig()
        config.model_config_list.SetInParent()
        write_model_config(settings.serving_config, config)
    else:
        read_model_config(settings.serving_config)  # fail now, clearly, on a malformed file


def start_model_server(settings: Settings, base_env: dict[str, str] | None = None) -> ProcessStatus:
    """Start the embedded model server in the background (idempotent) and wait until it listens."""
    ensure_serving_config(settings)
    argv = [
        sys.executable,
        "-m",
        "serving.server",
        f"--host={settings.serving_host}",
        f"--port={settings.grpc_port}",
        f"--rest_api_port={settings.rest_port}",
        f"--model_config_file={settings.serving_config}",
        f"--monitoring_config_file={_SERVING_CONFIG_DIR / 'monitoring.config'}",
    ]
    if settings.serving_batching != "off":
        argv += ["--enable_batching=true", f"--batching_parameters_file={settings.serving_batching}"]
    status = process_status(settings, SERVER_NAME)
    if not status.running:
        for port in (settings.grpc_port, settings.rest_port):
            if _port_open(settings.serving_host, port):
                raise StackError(
                    f"port {settings.serving_host}:{port} is already in use by another program; "
                    "stop it or move the model server with MAAS_GRPC_PORT / MAAS_REST_PORT"
                )
    status = _start_process(settings, SERVER_NAME, argv, dict(os.environ if base_env is None else base_env))
    _wait_for_ports(settings, status, settings.serving_host, [settings.grpc_port, settings.rest_port], _START_TIMEOUT)
    return status


def stop_model_server(settings: Settings) -> bool:
    """Stop the embedded model server; False when it was not running."""
    return _stop_process(settings, SERVER_NAME)


def start_airflow(settings: Settings, base_env: dict[str, str] | None = None) -> ProcessStatus:
    """Start ``airflow standalone`` in the background (idempotent) and wait for its API server."""
    env = airflow_environment(settings, base_env)
    status = _start_process(settings, AIRFLOW_NAME, [_venv_bin("airflow"), "standalone"], env)
    _wait_for_ports(settings, status, "127.0.0.1", [settings.airflow_port], 300.0)
    return status


def stop_airflow(settings: Settings) -> bool:
    """Stop ``airflow standalone``; False when it was not running."""
    return _stop_process(settings, AIRFLOW_NAME)


def airflow_password(settings: Settings, base_env: dict[str, str] | None = None, wait: float = 30.0) -> str | None:
    """The local Airflow UI's admin password, which the simple auth manager generates on first start."""
    env = airflow_environment(settings, base_env)
    password_file = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + wait
    while not password_file.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        return json.loads(password_file.read_text()).get("admin")
    except (OSError, ValueError):
        return None


def airflow_login(settings: Settings) -> str:
    """How to log in to the local Airflow UI."""
    password = airflow_password(settings)
    where = f"http://127.0.0.1:{settings.airflow_port}"
    if password is None:
        home = airflow_environment(settings)["AIRFLOW_HOME"]
        return f"open {where} and log in as admin; the password is in {home}/simple_auth_manager_passwords.json.generated"
    return f"open {where} and log in as admin / {password}"


def start_sync_agent(settings: Settings, base_env: dict[str, str] | None = None) -> ProcessStatus:
    """Start the model server's agent (``python -m serving.sync --loop``) in the background (idempotent)."""
    argv = [sys.executable, "-m", "serving.sync", "--loop"]
    env = {**(os.environ if base_env is None else base_env), **settings_environment(settings)}
    status = _start_process(settings, SYNC_NAME, argv, env)
    time.sleep(0.5)
    if status.pid is not None and not pid_alive(status.pid):
        raise StackError(f"{SYNC_NAME} exited at once; last lines of {status.log}:\n{_log_tail(status.log)}")
    return status


def sync_local_node(settings: Settings) -> str:
    """Reconcile the local model server with the registry once, verifying every installed version fully.

    Returns a one-line summary; a failure is summarised, not raised (the agent retries on its own).
    """
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store
    from maas_tasks.tf_runtime import import_tensorflow

    import_tensorflow()  # serving.sync reads TF Serving's protos, which import TensorFlow
    from serving.sync import local_node, reconcile_node

    node = local_node(settings)
    if node is None:
        return "no local node (MAAS_NODE_ID is empty)"
    try:
        with Registry.connect(registry_dsn(settings)) as registry:
            report = reconcile_node(node, registry, open_store(settings=settings), deep=True)
    except Exception as exc:  # noqa: BLE001 - summarised for the user; the agent keeps trying
        return f"node {node.node_id} not reconciled yet: {exc}"
    return describe_node_report(node.node_id, report)


def describe_node_report(node_id: str, report: dict) -> str:
    """One line on what a node serves and what it repaired or could not do."""
    if report.get("error"):
        return f"node {node_id}: {report['error']}"
    parts = []
    for name, entry in sorted(report.get("models", {}).items()):
        stable = entry.get("stable") or {}
        part = f"{name} v{stable['version']} {stable.get('state', '?')}" if stable else f"{name}: nothing stable"
        if entry.get("repairs"):
            part += f" ({'; '.join(entry['repairs'])})"
        if entry.get("error"):
            part += f" [problem: {entry['error']}]"
        parts.append(part)
    return f"node {node_id}: " + ("; ".join(parts) if parts else "no model to serve yet")


def stack_up(settings: Settings, *, with_airflow: bool = False, echo=print) -> None:
    """Start the local stack; components already running are left as they are.

    The model server is reconciled with the registry before its agent starts, so a version that is
    missing or corrupt on the serving volume is re-installed from the store.
    """
    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store

    cluster = postgres.local_cluster(settings)
    postgres.init_cluster(cluster)
    postgres.start_cluster(cluster)
    for db in ("airflow", "maas"):
        postgres.ensure_database(cluster, db)
    Registry.connect(cluster.dsn("maas")).close()  # applies the registry's migrations
    echo(f"postgres     running on 127.0.0.1:{settings.pg_port} (state in {cluster.root})")

    store = open_store(settings=settings)
    if hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    else:
        store.root.mkdir(parents=True, exist_ok=True)
    echo(f"store        {store.url}")

    migrate_airflow_db(settings)
    echo("airflow db   migrated")

    server = start_model_server(settings)
    echo(
        f"model server pid {server.pid}: gRPC {settings.grpc_target}, REST {settings.rest_url} "
        f"(config {settings.serving_config}, log {server.log})"
    )
    echo(f"serving      {sync_local_node(settings)}")
    if settings.node_id:
        agent = start_sync_agent(settings)
        echo(f"{SYNC_NAME} pid {agent.pid}: keeps node {settings.node_id} converged (log {agent.log})")
    if with_airflow:
        airflow = start_airflow(settings)
        echo(f"airflow      pid {airflow.pid}, log {airflow.log}")
        echo(f"airflow UI   {airflow_login(settings)}")


def stack_down(settings: Settings, echo=print) -> None:
    """Stop everything ``stack_up`` started; what is not running is skipped."""
    for name in (AIRFLOW_NAME, SYNC_NAME, SERVER_NAME):
        echo(f"{name:<12} {'stopped' if _stop_process(settings, name) else 'was not running'}")
    stopped = postgres.stop_cluster(postgres.local_cluster(settings))
    echo(f"{'postgres':<12} {'stopped' if stopped else 'was not running'}")


def stack_status(settings: Settings) -> dict[str, dict]:
    """What runs now, component by component."""
    pg = postgres.read_status(postgres.local_cluster(settings))
    status: dict[str, dict] = {"postgres": {"running": pg.running, "pid": pg.pid, "port": settings.pg_port}}
    for name in (SERVER_NAME, SYNC_NAME, AIRFLOW_NAME):
        proc = process_status(settings, name)
        status[name] = {"running": proc.running, "pid": proc.pid, "log": str(proc.log)}
    status[SERVER_NAME].update(grpc=settings.grpc_target, rest=settings.rest_url)
    status[AIRFLOW_NAME].update(url=f"http://127.0.0.1:{settings.airflow_port}")
    return status
