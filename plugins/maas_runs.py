"""How ``maas run`` runs a DAG: in its own process, or through the scheduler when one serves the DAG.

- In process (``dag.test()``), when no scheduler runs the DAG (none is alive, or the DAG is paused, so a
  scheduler leaves its runs alone). ``dag.test()`` executes each task inside the calling process and
  sends every log line to the console, and nothing to the web UI, which then showed "Log file not found
  on worker". :func:`run_in_process` routes the logs instead: each task's records are also written to
  the file the UI's log reader looks for (``[logging] base_log_folder`` joined with
  ``log_filename_template`` for that try), as the JSON lines Airflow's supervisor writes, through the
  same processors (secrets masked the same way); everything goes as text to one run log, and to the
  console only when asked for. A task-instance listener tells which task is running; standard
  ``logging`` records arrive through a root handler and Airflow's structlog events through a
  processor placed before its console renderer.
- Through the scheduler, when a live scheduler serves the unpaused DAG: two orchestrators on one run
  would both execute its tasks, so :func:`run_on_scheduler` triggers the run as ``airflow dags trigger``
  does and follows it in the metadata database; the scheduler's task processes write the logs.

Either way the caller hears when each task attempt ends (:class:`TaskOutcome`) to show progress, and
gets a :class:`RunResult`. This module lives in ``plugins/`` because it is Airflow integration; nothing
registers it in other Airflow processes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import structlog
from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class TaskOutcome:
    """How a task attempt ended, for a progress display."""

    task_id: str
    try_number: int
    state: str
    seconds: float
    error: str | None
    log_path: Path


@dataclass(frozen=True)
class RunResult:
    """A finished DAG run: its id and state, and each task's final state."""

    run_id: str
    state: str
    task_states: dict[str, str]
    via_scheduler: bool


def task_log_path(ti: Any, try_number: int) -> Path:
    """Where Airflow's log reader looks for this task attempt's log on this machine."""
    from airflow.configuration import conf
    from airflow.utils.helpers import log_filename_template_renderer

    return Path(conf.get("logging", "base_log_folder")) / log_filename_template_renderer()(ti=ti, try_number=try_number)


class _TaskLogWriter:
    """The listener: opens the running task's log file, writes events to it, and reports how the task ended."""

    def __init__(self, on_task_finished: Callable[[TaskOutcome], None] | None) -> None:
        self._on_task_finished = on_task_finished
        self._file: BinaryIO | None = None
        self._logger: Any = None
        self._path: Path | None = None
        self._started = 0.0

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        from airflow.sdk.log import init_log_file, logging_processors
        from airflow.utils.helpers import log_filename_template_renderer

        self._close()
        relative = log_filename_template_renderer()(ti=task_instance, try_number=task_instance.try_number)
        self._path = init_log_file(relative)
        self._file = self._path.open("ab")
        self._logger = structlog.wrap_logger(
            structlog.BytesLogger(self._file), processors=logging_processors(json_output=True), logger_name="task"
        )
        self._started = time.monotonic()

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        self._finish(task_instance, "success", None)

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        state = getattr(task_instance, "state", None)
        self._finish(task_instance, "up_for_retry" if str(state).endswith("up_for_retry") else "failed", error)

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        self._finish(task_instance, "skipped", None)

    def write(self, level: str, event: str, logger: str, **fields: Any) -> None:
        """Append one event to the running task's log (nothing happens between tasks)."""
        if self._logger is None:
            return
        exc_info = fields.pop("exc_info", None)
        if exc_info:
            # As Airflow's supervisor stores it, so the UI shows the traceback the same way.
            exc_info = sys.exc_info() if exc_info is True else exc_info
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            if exc_info[0] is not None:
                fields["error_detail"] = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)(exc_info)
        method = level if level in _LEVELS else "info"
        getattr(self._logger.bind(logger=logger), method)(event, **fields)
        self._file.flush()

    def _finish(self, task_instance: Any, state: str, error: Any) -> None:
        path, seconds = self._path, time.monotonic() - self._started
        self._close()
        if self._on_task_finished is not None and path is not None:
            message = None if error is None else (str(error).strip() or type(error).__name__)
            self._on_task_finished(
                TaskOutcome(task_instance.task_id, task_instance.try_number, state, seconds, message, path)
            )

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._logger = self._path = None


class _TaskFileHandler(logging.Handler):
    """Forwards standard ``logging`` records (MaaS's stages, libraries) to the running task's log."""

    def __init__(self, writer: _TaskLogWriter) -> None:
        super().__init__(logging.DEBUG)
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"exc_info": record.exc_info} if record.exc_info else {}
            self._writer.write(record.levelname.lower(), record.getMessage(), record.name, **fields)
        except Exception:  # noqa: BLE001 - a log sink must never break the task it records
            self.handleError(record)


class _MaskingFormatter(logging.Formatter):
    """Masks the secrets Airflow knows (connection passwords, ...) in a formatted record, as Airflow's own
    log processors do for structlog events."""

    def format(self, record: logging.LogRecord) -> str:
        from airflow.sdk._shared.secrets_masker import redact

        return redact(super().format(record))


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__
    )


@contextmanager
def route_run_logs(
    run_log: Path,
    *,
    to_console: bool = False,
    on_task_finished: Callable[[TaskOutcome], None] | None = None,
) -> Iterator[None]:
    """Route this process's logs while a DAG runs in it (see the module docstring).

    Args:
        run_log: the text file that gets every log line of the run (appended to; its folder is created).
        to_console: also print every log line to the console, as Airflow does by default.
        on_task_finished: called after each task attempt that ran, with its :class:`TaskOutcome`.
    """
    from airflow.sdk.listener import get_listener_manager

    run_log.parent.mkdir(parents=True, exist_ok=True)
    text: TextIO = run_log.open("a", encoding="utf-8", buffering=1)
    writer = _TaskLogWriter(on_task_finished)
    file_renderer = structlog.dev.ConsoleRenderer(colors=False)
    routing = True

    def copy_event(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        # structlog caches a logger's processors on first use: one made during the run keeps this one after.
        if not routing:
            return event_dict
        fields = {k: v for k, v in event_dict.items() if k not in ("event", "level", "logger", "timestamp")}
        writer.write(
            str(event_dict.get("level", method)), str(event_dict.get("event", "")),
            str(event_dict.get("logger", "task")), **fields,
        )
        text.write(file_renderer(logger, method, dict(event_dict)) + "\n")
        if not to_console:
            raise structlog.DropEvent
        return event_dict

    root = logging.getLogger()
    console_handlers = [] if to_console else [h for h in root.handlers if _is_console(h)]
    file_handler = logging.StreamHandler(text)
    file_handler.setFormatter(_MaskingFormatter("%(asctime)s [%(levelname)-8s] %(message)s [%(name)s]"))
    task_handler = _TaskFileHandler(writer)
    manager = get_listener_manager()
    processors = list(structlog.get_config()["processors"])
    manager.add_listener(writer)
    for handler in console_handlers:
        root.removeHandler(handler)
    root.addHandler(file_handler)
    root.addHandler(task_handler)
    # Before the console renderer (the last processor), after those that name the level and the logger.
    structlog.configure(processors=[*processors[:-1], copy_event, processors[-1]])
    try:
        yield
    finally:
        routing = False
        structlog.configure(processors=processors)
        root.removeHandler(task_handler)
        root.removeHandler(file_handler)
        for handler in console_handlers:
            root.addHandler(handler)
        manager.pm.unregister(writer)
        writer._close()
        text.close()


def run_in_process(dag: Any, conf: dict[str, Any], claims: Path | None = None) -> RunResult:
    """Run ``dag`` once with ``dag.test()``; call it inside :func:`route_run_logs` to place its logs.

    Args:
        claims: a folder where the run is claimed by this process (``<pid>.json``) while it runs, so that
            :func:`fail_orphaned_runs` can tell a run whose process died from one still running. If
            this process fails, the run is marked failed before the error propagates.
    """
    from airflow.models.dagrun import DagRun
    from airflow.sdk import timezone
    from airflow.utils.types import DagRunType

    # dag.test() names the run after its logical date: fix it, to know the run before it exists.
    now = timezone.utcnow()
    run_id = DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=now, run_after=now)
    claim = _claim_run(claims, dag.dag_id, run_id) if claims is not None else None
    try:
        dag_run = dag.test(run_conf=conf, logical_date=now, run_after=now)
    except BaseException:
        _fail_run(dag.dag_id, run_id)
        raise
    finally:
        if claim is not None:
            claim.unlink(missing_ok=True)
    states = {ti.task_id: _state_name(ti.state) for ti in dag_run.get_task_instances()}
    return RunResult(dag_run.run_id, _state_name(dag_run.state), states, via_scheduler=False)


def fail_orphaned_runs(claims: Path) -> list[str]:
    """Mark failed the runs that ``maas run`` processes claimed and left running when they died.

    A claim whose process is alive (same pid and start time) is left alone: that run is in progress.

    Returns:
        The ids of the runs marked failed.
    """
    import json

    from maas_tasks.postgres import pid_alive
    from maas_tasks.stack import process_start_time

    failed = []
    for path in sorted(claims.glob("*.json")) if claims.is_dir() else []:
        try:
            claim = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        pid = int(claim.get("pid", 0))
        if pid and pid_alive(pid) and process_start_time(pid) == claim.get("started"):
            continue
        if _fail_run(claim["dag_id"], claim["run_id"]):
            failed.append(claim["run_id"])
        path.unlink(missing_ok=True)
    return failed


def _claim_run(claims: Path, dag_id: str, run_id: str) -> Path:
    import json
    import os

    from maas_tasks.stack import process_start_time

    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{os.getpid()}.json"
    started = process_start_time(os.getpid())
    path.write_text(json.dumps({"pid": os.getpid(), "started": started, "dag_id": dag_id, "run_id": run_id}))
    return path


def _fail_run(dag_id: str, run_id: str) -> bool:
    """Mark a run and its unfinished task instances failed; False when it had already ended (or never began)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, State, TaskInstanceState

    with create_session() as session:
        dag_run = DagRun.find_duplicate(dag_id=dag_id, run_id=run_id, session=session)
        if dag_run is None or dag_run.state not in (DagRunState.RUNNING, DagRunState.QUEUED):
            return False
        for ti in dag_run.get_task_instances(session=session):
            if ti.state not in State.finished:
                ti.set_state(TaskInstanceState.FAILED, session=session)
        dag_run.set_state(DagRunState.FAILED)
        session.merge(dag_run)
    log.warning("marked run %s of %s failed: the maas run process running it is gone", run_id, dag_id)
    return True


def scheduler_serves(dag_id: str) -> bool:
    """Whether a live scheduler would run this DAG's runs: one is heartbeating and the DAG is unpaused."""
    from airflow.jobs.job import most_recent_job
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        job = most_recent_job("SchedulerJob", session=session)
        if job is None or not job.is_alive():
            return False
        model = session.get(DagModel, dag_id)
        return model is not None and not model.is_paused


def run_on_scheduler(
    dag_id: str,
    conf: dict[str, Any],
    *,
    on_task_finished: Callable[[TaskOutcome], None] | None = None,
    on_waiting: Callable[[str], None] | None = None,
    poll_seconds: float = 1.0,
    patience_seconds: float = 5.0,
) -> RunResult:
    """Trigger a run of ``dag_id`` for the scheduler to execute, and follow it until it ends.

    Args:
        on_waiting: called once with a sentence if the run is still queued after ``patience_seconds``
            (behind another run of the DAG: ``max_active_runs``).
    """
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType

    run_id = trigger_dag(
        dag_id, triggered_by=DagRunTriggeredByType.CLI, conf=conf, triggering_user_name="maas run"
    ).run_id
    reported: set[tuple[str, int, str]] = set()
    triggered = time.monotonic()
    said_waiting = False
    while True:
        with create_session() as session:
            dag_run = DagRun.find_duplicate(dag_id=dag_id, run_id=run_id, session=session)
            instances = dag_run.get_task_instances(session=session)
            for ti in instances:
                state = _state_name(ti.state)
                key = (ti.task_id, ti.try_number, state)
                if state not in _ENDED or ti.start_date is None or key in reported:
                    continue
                reported.add(key)
                seconds = (ti.end_date - ti.start_date).total_seconds() if ti.end_date else 0.0
                path = task_log_path(ti, ti.try_number)
                error = _error_from_log(path) if state in ("failed", "up_for_retry") else None
                if on_task_finished is not None:
                    on_task_finished(TaskOutcome(ti.task_id, ti.try_number, state, seconds, error, path))
            run_state = _state_name(dag_run.state)
            if run_state in ("success", "failed"):
                states = {ti.task_id: _state_name(ti.state) for ti in instances}
                return RunResult(run_id, run_state, states, via_scheduler=True)
            waited = time.monotonic() - triggered
            if run_state == "queued" and waited > patience_seconds and not said_waiting and on_waiting is not None:
                said_waiting = True
                on_waiting(f"run {run_id} is queued: the scheduler starts it when no other run of {dag_id} is active")
        time.sleep(poll_seconds)


_ENDED = frozenset({"success", "failed", "skipped", "up_for_retry", "upstream_failed"})


def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state) or "none")


def _error_from_log(path: Path) -> str | None:
    """The exception message a task attempt's JSON log ends with, if any."""
    import json

    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        for detail in reversed(event.get("error_detail") or []):
            if detail.get("exc_value"):
                return str(detail["exc_value"])
    return None
