"""The local stack behind ``maas stack up|down|status``: PostgreSQL, the object store, the model server, Airflow.

Everything runs on this machine under ``MAAS_HOME`` (default ``.maas/``): a private PostgreSQL cluster
holding Airflow's metadata and the model registry, the ``file://`` store (or the S3 bucket named by
``MAAS_STORE_URL``), the embedded TF-Serving-compatible model server and its agent (``serving-sync``,
which keeps it converged on the registry's desired serving state), and optionally Airflow's components
(with the LocalExecutor, or the CeleryExecutor with Redis and a worker). Starting is idempotent (what runs
is left running) and stopping is clean (SIGTERM to each background process group, then the cluster's fast
shutdown).

Hygiene, because other users and other stacks share the machine: every listener binds 127.0.0.1 on a
port that is a MAAS_* setting; secrets (passwords, the state) and logs are readable by their owner only,
and no password is written to a log; the settings a stack started with are recorded under MAAS_HOME,
so a shell without the same variables still addresses this stack (see ``config.read_stack_state``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from maas_tasks import postgres
from maas_tasks.config import (
    STACK_STATE_FIELDS,
    ConfigError,
    Settings,
    load_settings,
    project_root,
    read_stack_state,
    settings_environment,
    stack_state_file,
)
from maas_tasks.postgres import pid_alive

SERVER_NAME = "model-server"
SYNC_NAME = "serving-sync"
# `maas stack up --gateway`: the second model server replica, its agent, and nginx in front of both.
REPLICA_NAME = "model-server-2"
REPLICA_SYNC_NAME = "serving-sync-2"
GATEWAY_NAME = "gateway"
LOOPBACK = "127.0.0.1"
AIRFLOW_EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
AIRFLOW_API_NAME = "airflow-api-server"
CELERY_WORKER_NAME = "airflow-celery-worker"
REDIS_NAME = "redis"
LEGACY_AIRFLOW_NAME = "airflow"  # `airflow standalone`, which older versions of the stack ran
# Stopped in this order (the reverse of the start order), so no component outlives what it needs.
AIRFLOW_PROCESS_NAMES = (
    LEGACY_AIRFLOW_NAME, CELERY_WORKER_NAME, "airflow-triggerer", "airflow-dag-processor", "airflow-scheduler",
    AIRFLOW_API_NAME, "airflow-trigger-log-server", "airflow-log-server", REDIS_NAME,
)
_START_TIMEOUT = 120.0
_SETTLE_SECONDS = 20.0  # an Airflow component with a bad setting exits within this after its start
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


def make_private_dirs(settings: Settings) -> None:
    """Create the stack's run and log folders readable only by their owner (pid files, the state file,
    logs that may quote settings), and tighten those an older version left open."""
    for folder in (_run_dir(settings), _log_dir(settings)):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        for path in folder.iterdir():
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable only by the owner (never briefly readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _start_process(settings: Settings, name: str, argv: list[str], env: dict[str, str]) -> ProcessStatus:
    status = process_status(settings, name)
    if status.running:
        return status
    make_private_dirs(settings)
    fd = os.open(status.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
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
            umask=0o077,  # what it writes (logs, Airflow's files) is its owner's alone
        )
    write_private(_pid_file(settings, name), f"{proc.pid} {process_start_time(proc.pid) or ''}".strip())
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
    """The environment Airflow (CLI, ``dag.test()``, the stack's Airflow components) runs with on the local stack.

    Values the caller already set (e.g. ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` of a deployment) win.
    Every port is a MAAS_* setting; the log servers' ports are the ones the stack binds to 127.0.0.1,
    and tasks name their host 127.0.0.1 (:func:`loopback_hostname`) so the API server fetches a running
    task's log from there.
    """
    env = dict(os.environ if base is None else base)
    root = project_root()
    api = f"http://127.0.0.1:{settings.airflow_port}"
    defaults = {
        "AIRFLOW_HOME": str(settings.home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": AIRFLOW_EXECUTORS[settings.airflow_executor],
        # One training task saturates a core; more parallel workers than cores only thrash.
        "AIRFLOW__CORE__PARALLELISM": str(max(2, os.cpu_count() or 2)),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(max(2, os.cpu_count() or 2)),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "maas_tasks.stack.loopback_hostname",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(settings.airflow_worker_log_port),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(settings.airflow_triggerer_log_port),
        "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o600",
        "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o700",
        # A Celery worker takes as many tasks at once as the scheduler may run: one per core.
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(max(1, os.cpu_count() or 1)),
        # Airflow's default, set to say it is meant: far longer than any run lasts (dagrun_timeout, 6 hours),
        # so the broker never hands a running task to a second worker.
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        # TensorFlow's C++ INFO and WARNING lines say nothing about a run; its errors still show.
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MAAS_HOME": str(settings.home),
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    # The simple auth manager keeps its passwords here; the stack writes it first (airflow_password).
    env.setdefault(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
        str(Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"),
    )
    # Airflow's processes start others as `airflow ...` found on PATH: make it this venv's.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    if "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = postgres.local_cluster(settings).sqlalchemy_url("airflow")
    if settings.airflow_executor == "celery":
        env.setdefault("AIRFLOW__CELERY__BROKER_URL", redis_url(settings))
        # Task results go to the stack's PostgreSQL (Airflow's database), as in Airflow's compose file.
        env.setdefault("AIRFLOW__CELERY__RESULT_BACKEND", "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    return env


def loopback_hostname() -> str:
    """The host name the local stack's Airflow processes give their tasks (``[core] hostname_callable``).

    The API server fetches a running task's log from ``http://<task's host>:<log server port>``; the
    stack's log servers listen on 127.0.0.1 only, which the machine's own name may not resolve to
    (Debian maps it to 127.0.1.1).
    """
    return LOOPBACK


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


def start_model_server(
    settings: Settings, base_env: dict[str, str] | None = None, *, name: str = SERVER_NAME,
    port_settings: str = "MAAS_GRPC_PORT / MAAS_REST_PORT",
) -> ProcessStatus:
    """Start the embedded model server in the background (idempotent) and wait until it listens.

    ``name`` tells the stack's model servers apart (the gateway's second replica is another one);
    ``port_settings`` names the settings that move its ports, for the error when they are taken.
    """
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
    status = process_status(settings, name)
    if not status.running:
        for port in (settings.grpc_port, settings.rest_port):
            if _port_open(settings.serving_host, port):
                raise StackError(
                    f"port {settings.serving_host}:{port} is already in use by another program; "
                    f"stop it or move the model server with {port_settings}"
                )
    status = _start_process(settings, name, argv, dict(os.environ if base_env is None else base_env))
    _wait_for_ports(settings, status, settings.serving_host, [settings.grpc_port, settings.rest_port], _START_TIMEOUT)
    return status


def stop_model_server(settings: Settings) -> bool:
    """Stop the embedded model server; False when it was not running."""
    return _stop_process(settings, SERVER_NAME)


def _airflow_processes(settings: Settings, executor: str) -> list[tuple[str, list[str], int | None, str | None]]:
    """The stack's Airflow processes in start order: (name, argv, port it listens on, the MAAS_* setting
    of that port).

    Airflow's own serve-logs servers listen on every interface and take no host setting, so the
    components run with ``--skip-serve-logs`` and the stack serves the same log folder with Airflow's
    log-server app on 127.0.0.1 instead (one for task logs, one for the triggerer's).
    """
    airflow = _venv_bin("airflow")

    def log_server(port: int) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "airflow.utils.serve_logs.log_server:get_app", "--factory",
                f"--host={LOOPBACK}", f"--port={port}", "--no-access-log", "--log-level=warning"]

    processes = [
        ("airflow-log-server", log_server(settings.airflow_worker_log_port), settings.airflow_worker_log_port,
         "MAAS_AIRFLOW_WORKER_LOG_PORT"),
        ("airflow-trigger-log-server", log_server(settings.airflow_triggerer_log_port),
         settings.airflow_triggerer_log_port, "MAAS_AIRFLOW_TRIGGERER_LOG_PORT"),
        ("airflow-api-server", [airflow, "api-server"], settings.airflow_port, "MAAS_AIRFLOW_PORT"),
        ("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], None, None),
        ("airflow-dag-processor", [airflow, "dag-processor"], None, None),
        ("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], None, None),
    ]
    if executor == "celery":
        # Its concurrency is [celery] worker_concurrency (airflow_environment: one task per core).
        processes.append((CELERY_WORKER_NAME, [airflow, "celery", "worker", "--skip-serve-logs"], None, None))
    return processes


def _check_port_free(host: str, port: int, setting: str, what: str) -> None:
    if _port_open(host, port):
        raise StackError(
            f"port {host}:{port} for {what} is already in use by another program (another stack?); "
            f"stop it, or give this stack another port with {setting}"
        )


def ensure_airflow_passwords(env: dict[str, str]) -> Path:
    """Give every simple-auth-manager user a generated password in its passwords file (0600), before any
    Airflow process starts: Airflow would otherwise generate them itself and print them into its log.

    A file that other users can read (as Airflow writes it) is replaced with new passwords.

    Returns:
        The passwords file.
    """
    path = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    users = [entry.split(":")[0].strip() for entry in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")]
    passwords: dict[str, str] = {}
    private = path.is_file() and not path.stat().st_mode & 0o077
    if private:
        try:
            passwords = json.loads(path.read_text() or "{}")
        except ValueError:
            passwords = {}
    missing = [user for user in users if user and user not in passwords]
    if missing or not private:
        passwords.update({user: secrets.token_urlsafe(12) for user in missing})
        write_private(path, json.dumps(passwords) + "\n")
    return path


def _redis_dir(settings: Settings) -> Path:
    return settings.home / "redis"


def _redis_password(settings: Settings) -> str:
    """The stack's Redis password, generated on first use and kept in MAAS_HOME/redis/password (0600)."""
    password_file = _redis_dir(settings) / "password"
    if not password_file.is_file():
        _redis_dir(settings).mkdir(parents=True, exist_ok=True)
        _redis_dir(settings).chmod(0o700)
        write_private(password_file, secrets.token_hex(24))
    return password_file.read_text().strip()


def redis_url(settings: Settings) -> str:
    """The Celery broker URL of the stack's Redis."""
    return f"redis://:{_redis_password(settings)}@{LOOPBACK}:{settings.redis_port}/0"


def start_redis(settings: Settings, base_env: dict[str, str] | None = None) -> ProcessStatus:
    """Start the OS's ``redis-server`` as the Celery broker (idempotent): on 127.0.0.1, protected mode and a
    password, its files under MAAS_HOME/redis, nothing persisted (queued tasks are the scheduler's to resend).

    The password goes in the config file (0600), never on the command line, which every user can read.
    """
    binary = shutil.which("redis-server") or next(
        (path for path in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(path).exists()), None
    )
    if binary is None:
        raise StackError(
            "the Celery executor needs redis-server: install Debian's redis-server package "
            "(apt-get install redis-server; `make os-packages` does it)"
        )
    status = process_status(settings, REDIS_NAME)
    if not status.running:
        _check_port_free(LOOPBACK, settings.redis_port, "MAAS_REDIS_PORT", "Redis")
        folder = _redis_dir(settings)
        config = [
            f"bind {LOOPBACK}",
            "protected-mode yes",
            f"port {settings.redis_port}",
            f"requirepass {_redis_password(settings)}",
            f"dir {json.dumps(str(folder))}",
            'save ""',
            "appendonly no",
            "daemonize no",
        ]
        write_private(folder / "redis.conf", "\n".join(config) + "\n")
    env = dict(os.environ if base_env is None else base_env)
    status = _start_process(settings, REDIS_NAME, [binary, str(_redis_dir(settings) / "redis.conf")], env)
    _wait_for_ports(settings, status, LOOPBACK, [settings.redis_port], 30.0)
    return status


def start_airflow(
    settings: Settings, base_env: dict[str, str] | None = None, executor: str | None = None
) -> ProcessStatus:
    """Start Airflow's components (API server and UI, scheduler, DAG processor, triggerer, their log
    servers; with the Celery executor Redis and a Celery worker too) in the background, idempotently,
    and wait for the API server. Returns the API server's status.

    Raises:
        StackError: a port is taken, or a component exited during start-up (its log's last lines quoted).
    """
    from dataclasses import replace

    settings = replace(settings, airflow_executor=executor or settings.airflow_executor)
    env = airflow_environment(settings, base_env)
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)  # airflow.cfg holds the secret keys; the task logs hold the data's examples
    ensure_airflow_passwords(env)
    processes = _airflow_processes(settings, settings.airflow_executor)
    for name, _, port, setting in processes:
        if port is not None and not process_status(settings, name).running:
            _check_port_free(LOOPBACK, port, setting, name)
    if settings.airflow_executor == "celery":
        start_redis(settings, env)
    # All start at once (each takes seconds to import Airflow); then each must listen, or at least
    # outlive the time in which a bad setting or a broken install makes it exit.
    fresh = {name for name, *_ in processes if not process_status(settings, name).running}
    started = {name: _start_process(settings, name, argv, env) for name, argv, *_ in processes}
    since = time.monotonic()
    for name, _, port, _ in processes:
        if port is not None:
            _wait_for_ports(settings, started[name], LOOPBACK, [port], 300.0)
    while True:
        for name in fresh:
            status = started[name]
            if status.pid is not None and not pid_alive(status.pid):
                stop_airflow(settings)
                raise StackError(
                    f"{name} exited during start-up; last lines of {status.log}:\n{_log_tail(status.log)}"
                )
        if not fresh or time.monotonic() - since >= _SETTLE_SECONDS:
            return started[AIRFLOW_API_NAME]
        time.sleep(0.5)


def stop_airflow(settings: Settings, echo=None) -> bool:
    """Stop every Airflow process of the stack (and its Redis), newest first; False when none was running."""
    stopped = False
    for name in AIRFLOW_PROCESS_NAMES:
        was_running = _stop_process(settings, name)
        stopped = stopped or was_running
        if echo is not None and (was_running or name not in (LEGACY_AIRFLOW_NAME, CELERY_WORKER_NAME, REDIS_NAME)):
            echo(f"{name:<12} {'stopped' if was_running else 'was not running'}")
    return stopped


def airflow_password(settings: Settings, base_env: dict[str, str] | None = None, wait: float = 30.0) -> str | None:
    """The local Airflow UI's admin password (the stack generates it before Airflow starts)."""
    password_file = Path(airflow_environment(settings, base_env)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    deadline = time.monotonic() + wait
    while not password_file.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        return json.loads(password_file.read_text()).get("admin")
    except (OSError, ValueError):
        return None


def airflow_login(settings: Settings, reveal: bool | None = None) -> str:
    """How to log in to the local Airflow UI: the password itself only on a terminal (``reveal=None``),
    where no log keeps it; otherwise the file (0600) that holds it."""
    where = f"http://{LOOPBACK}:{settings.airflow_port}"
    password_file = airflow_environment(settings)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    password = airflow_password(settings, wait=0)
    if reveal is None:
        reveal = sys.stdout.isatty()
    if password is None or not reveal:
        return f"open {where} and log in as admin; the password is in {password_file} (readable only by you)"
    return f"open {where} and log in as admin / {password}"


def start_sync_agent(
    settings: Settings, base_env: dict[str, str] | None = None, *, name: str = SYNC_NAME
) -> ProcessStatus:
    """Start the model server's agent (``python -m serving.sync --loop``) in the background (idempotent).

    It manages the node ``settings`` describe (MAAS_NODE_ID, the serving volume and ports).
    """
    argv = [sys.executable, "-m", "serving.sync", "--loop"]
    env = {**(os.environ if base_env is None else base_env), **settings_environment(settings)}
    status = _start_process(settings, name, argv, env)
    time.sleep(0.5)
    if status.pid is not None and not pid_alive(status.pid):
        raise StackError(f"{name} exited at once; last lines of {status.log}:\n{_log_tail(status.log)}")
    return status


# --- the API gateway and the second model server replica behind it (maas stack up --gateway) -------------


def replica_settings(settings: Settings) -> Settings:
    """The settings of the gateway's second replica: node ``<MAAS_NODE_ID>-2`` with its own serving
    volume and model config (``MAAS_HOME/serving-2/models``) and ports (``MAAS_REPLICA_*``)."""
    from dataclasses import replace

    serving_dir = settings.home / "serving-2" / "models"
    return replace(
        settings, node_id=f"{settings.node_id}-2", grpc_port=settings.replica_grpc_port,
        rest_port=settings.replica_rest_port, serving_dir=serving_dir, serving_config=serving_dir / "models.config",
    )


def start_replica(settings: Settings, base_env: dict[str, str] | None = None, echo=print) -> None:
    """Start the second model server replica and its own agent (idempotent), reconciled once first
    like the first replica, so it serves what the registry says before the gateway sends it traffic."""
    if not settings.node_id:
        raise StackError(
            "the gateway's second replica is kept in step by its own agent, named after MAAS_NODE_ID, "
            "which is empty: set MAAS_NODE_ID (default local)"
        )
    replica = replica_settings(settings)
    server = start_model_server(
        replica, base_env, name=REPLICA_NAME, port_settings="MAAS_REPLICA_GRPC_PORT / MAAS_REPLICA_REST_PORT"
    )
    echo(f"{REPLICA_NAME} pid {server.pid}: gRPC {replica.grpc_target}, REST {replica.rest_url} "
         f"(config {replica.serving_config}, log {server.log})")
    echo(f"serving      {sync_local_node(replica)}")
    agent = start_sync_agent(replica, base_env, name=REPLICA_SYNC_NAME)
    echo(f"{REPLICA_SYNC_NAME} pid {agent.pid}: keeps node {replica.node_id} converged (log {agent.log})")


def start_gateway(settings: Settings, base_env: dict[str, str] | None = None, echo=print) -> ProcessStatus:
    """Render the gateway's config for both replicas, check it (``nginx -t``) and run nginx (idempotent).

    The key file (MAAS_GATEWAY_KEYS_FILE) is created with one random key when absent; its path is
    printed, never the key. A running gateway whose config changed (an edited key file, other
    settings) is told to reload it (SIGHUP: nginx checks it and keeps serving on the old one if bad).
    """
    from serving import gateway

    layout = gateway.gateway_layout(settings.home)
    try:
        if gateway.ensure_keys_file(settings.gateway_keys_file):
            echo(f"api keys     created {settings.gateway_keys_file} (0600) with one new key: clients send it "
                 "as X-API-Key (or set MAAS_API_KEY for maas predict --gateway)")
        replica = replica_settings(settings)
        changed = gateway.write_config(
            settings, layout, [settings.grpc_target, replica.grpc_target],
            [f"{s.serving_host}:{s.rest_port}" for s in (settings, replica)],
        )
        gateway.check_config(layout)
    except gateway.GatewayError as exc:
        raise StackError(str(exc)) from None
    status = process_status(settings, GATEWAY_NAME)
    if status.running:
        if changed:
            os.kill(status.pid, signal.SIGHUP)
            echo(f"{GATEWAY_NAME:<12} reloaded its new config ({layout.conf_file})")
        return status
    for port, setting in ((settings.gateway_grpc_port, "MAAS_GATEWAY_GRPC_PORT"),
                          (settings.gateway_rest_port, "MAAS_GATEWAY_REST_PORT")):
        _check_port_free(settings.gateway_address, port, setting, "the API gateway")
    env = dict(os.environ if base_env is None else base_env)
    status = _start_process(settings, GATEWAY_NAME, gateway.nginx_argv(layout), env)
    _wait_for_ports(
        settings, status, settings.gateway_address, [settings.gateway_grpc_port, settings.gateway_rest_port], 30.0
    )
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


# Which processes use each recorded setting: a value may change only while none of them runs.
_SETTING_USERS = {
    "pg_port": ("postgres",),
    "serving_host": (SERVER_NAME,),
    "grpc_port": (SERVER_NAME,),
    "rest_port": (SERVER_NAME,),
    "airflow_port": (AIRFLOW_API_NAME, LEGACY_AIRFLOW_NAME),
    "airflow_worker_log_port": ("airflow-log-server",),
    "airflow_triggerer_log_port": ("airflow-trigger-log-server",),
    "redis_port": (REDIS_NAME,),
    "airflow_executor": ("airflow-scheduler", CELERY_WORKER_NAME, LEGACY_AIRFLOW_NAME),
    "gateway_host": (GATEWAY_NAME,),
    "gateway_grpc_port": (GATEWAY_NAME,),
    "gateway_rest_port": (GATEWAY_NAME,),
    "replica_grpc_port": (REPLICA_NAME,),
    "replica_rest_port": (REPLICA_NAME,),
}


def _running(settings: Settings, name: str) -> bool:
    if name == "postgres":
        return postgres.read_status(postgres.local_cluster(settings)).running
    return process_status(settings, name).running


def write_stack_state(settings: Settings) -> Path:
    """Record the settings the stack is started with (``MAAS_HOME/run/stack.json``, 0600), which
    :func:`maas_tasks.config.load_settings` uses for every variable a later shell leaves unset."""
    path = stack_state_file(settings.home)
    state = {f"MAAS_{field.upper()}": str(getattr(settings, field)) for field in STACK_STATE_FIELDS}
    write_private(path, json.dumps(state, indent=2) + "\n")
    return path


def settings_disagreements(settings: Settings) -> list[str]:
    """One sentence per setting whose value differs from the one this home's running stack was started
    with (``settings`` takes the recorded value of every variable left unset, so only an explicitly set
    variable can differ); [] when none does or nothing that uses it runs."""
    recorded = read_stack_state(settings.home)
    notes = []
    for field in STACK_STATE_FIELDS:
        name = f"MAAS_{field.upper()}"
        value = str(getattr(settings, field))
        if name not in recorded or recorded[name] == value:
            continue
        users = _SETTING_USERS.get(field) or ("postgres", *AIRFLOW_PROCESS_NAMES, SERVER_NAME, SYNC_NAME)
        if any(_running(settings, user) for user in users):
            notes.append(
                f"{name}={value}, but the stack running from {settings.home} was started with {name}={recorded[name]}"
            )
    return notes


def check_stack_settings(settings: Settings) -> None:
    """Refuse settings that would address another stack than the one running from this MAAS_HOME.

    Raises:
        ConfigError: an explicitly set MAAS_* variable disagrees with the running stack; says which and how to fix it.
    """
    notes = settings_disagreements(settings)
    if notes:
        raise ConfigError(
            "; ".join(notes) + ". Unset the variable (commands use the running stack's values), or stop the "
            "stack (maas stack down) and start it again with the new value"
        )


def recorded_settings(settings: Settings) -> Settings:
    """``settings`` with the values this home's stack was started with (for status and down)."""
    return load_settings({**settings_environment(settings), **read_stack_state(settings.home)})


def stack_up(
    settings: Settings, *, with_airflow: bool = False, executor: str | None = None, with_gateway: bool = False,
    echo=print,
) -> None:
    """Start the local stack; components already running are left as they are.

    The model server is reconciled with the registry before its agent starts, so a version that is
    missing or corrupt on the serving volume is re-installed from the store. ``executor`` (``local`` or
    ``celery``; default MAAS_AIRFLOW_EXECUTOR) is the one Airflow runs with. The settings it starts
    with are recorded (:func:`write_stack_state`) before anything starts. ``with_gateway`` also starts
    a second model server replica with its own agent, and the API gateway in front of both.

    Raises:
        ConfigError: an explicitly set MAAS_* variable disagrees with what already runs.
    """
    from dataclasses import replace

    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store

    settings = replace(settings, airflow_executor=executor or settings.airflow_executor)
    check_stack_settings(settings)
    make_private_dirs(settings)
    write_stack_state(settings)
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
    if with_gateway:
        start_replica(settings, echo=echo)
        proxy = start_gateway(settings, echo=echo)
        echo(f"{GATEWAY_NAME:<12} pid {proxy.pid}: gRPC {settings.gateway_grpc_target}, REST {settings.gateway_rest_url} "
             f"over {SERVER_NAME} and {REPLICA_NAME}; API keys in {settings.gateway_keys_file} "
             f"(log {settings.home / 'gateway' / 'logs'})")
    if with_airflow:
        airflow = start_airflow(settings)
        workers = "LocalExecutor"
        if settings.airflow_executor == "celery":
            workers = f"CeleryExecutor: a Celery worker, Redis on {LOOPBACK}:{settings.redis_port}"
        echo(f"airflow      API server pid {airflow.pid}, scheduler, DAG processor, triggerer ({workers}); "
             f"logs in {_log_dir(settings)}")
        echo(f"airflow UI   {airflow_login(settings)}")


def stack_down(settings: Settings, echo=print) -> None:
    """Stop everything ``stack_up`` started; what is not running is skipped."""
    stop_airflow(settings, echo=echo)
    for name in (GATEWAY_NAME, REPLICA_SYNC_NAME, REPLICA_NAME):  # named only when they ran (--gateway)
        if _stop_process(settings, name):
            echo(f"{name:<12} stopped")
    for name in (SYNC_NAME, SERVER_NAME):
        echo(f"{name:<12} {'stopped' if _stop_process(settings, name) else 'was not running'}")
    forget_stack_nodes(settings)
    stopped = postgres.stop_cluster(postgres.local_cluster(settings))
    echo(f"{'postgres':<12} {'stopped' if stopped else 'was not running'}")
    stack_state_file(settings.home).unlink(missing_ok=True)


def forget_stack_nodes(settings: Settings) -> list[str]:
    """Remove this stack's serving nodes (``MAAS_NODE_ID`` and the gateway's replica) from the registry once
    their agents are stopped, so a promotion made later (by a stack started again without ``--gateway``,
    say) does not wait for a replica that is gone. Best effort: a registry out of reach is left as it is,
    and those nodes age out after the rollout's node TTL. Returns the node ids removed."""
    from maas_tasks.registry import Registry

    if not settings.node_id:
        return []
    cluster = postgres.local_cluster(settings)
    if settings.registry_dsn is None and not postgres.read_status(cluster).running:
        return []
    removed = []
    try:
        with Registry.connect(postgres.registry_dsn(settings), connect_timeout=5) as registry:
            for node_id in (settings.node_id, replica_settings(settings).node_id):
                if registry.forget_node(node_id):
                    removed.append(node_id)
    except Exception:  # noqa: BLE001 - stopping must not fail on the registry; the nodes age out instead
        return removed
    return removed


def stack_status(settings: Settings) -> dict[str, dict]:
    """What runs now, component by component."""
    pg = postgres.read_status(postgres.local_cluster(settings))
    status: dict[str, dict] = {"postgres": {"running": pg.running, "pid": pg.pid, "port": settings.pg_port}}
    airflow = [name for name in reversed(AIRFLOW_PROCESS_NAMES) if name != LEGACY_AIRFLOW_NAME]
    if settings.airflow_executor != "celery":
        airflow = [name for name in airflow if name not in (REDIS_NAME, CELERY_WORKER_NAME)]
    if process_status(settings, LEGACY_AIRFLOW_NAME).running:
        airflow.append(LEGACY_AIRFLOW_NAME)
    for name in (SERVER_NAME, SYNC_NAME, REPLICA_NAME, REPLICA_SYNC_NAME, GATEWAY_NAME, *airflow):
        proc = process_status(settings, name)
        status[name] = {"running": proc.running, "pid": proc.pid, "log": str(proc.log)}
    status[SERVER_NAME].update(grpc=settings.grpc_target, rest=settings.rest_url)
    replica = replica_settings(settings) if settings.node_id else None
    if replica is not None:
        status[REPLICA_NAME].update(grpc=replica.grpc_target, rest=replica.rest_url, node=replica.node_id)
    status[GATEWAY_NAME].update(grpc=settings.gateway_grpc_target, rest=settings.gateway_rest_url,
                                keys=str(settings.gateway_keys_file))
    status[AIRFLOW_API_NAME].update(
        url=f"http://{LOOPBACK}:{settings.airflow_port}", executor=settings.airflow_executor
    )
    status["airflow-log-server"].update(port=settings.airflow_worker_log_port)
    status["airflow-trigger-log-server"].update(port=settings.airflow_triggerer_log_port)
    if REDIS_NAME in status:
        status[REDIS_NAME].update(port=settings.redis_port)
    return status
