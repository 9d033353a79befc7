"""The private PostgreSQL cluster that holds Airflow's metadata and the model registry.

``maas stack up`` runs a cluster of its own with the OS's PostgreSQL server binaries (Debian's
``postgresql`` package) instead of asking for a shared server: the layout lives under one directory
(``.maas/pg/`` under MAAS_HOME), listens on 127.0.0.1 only, and authenticates a ``maas`` superuser
with a password generated at init time and kept in a file readable only by its owner.

PostgreSQL refuses to run as root. When this process is root (containers, CI), every server
command runs as the ``postgres`` OS user through ``runuser`` and the server's files are owned by
that user. That user must be able to traverse every parent of the data directory; when it cannot
(a checkout under a 0700 home), the server's files move to a directory under the system temp dir
keyed by a hash of the cluster directory, and ``<root>/data`` becomes a symlink to it.

Deployments that use an external PostgreSQL set MAAS_REGISTRY_DSN instead (:func:`registry_dsn`).
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg2
from psycopg2 import errors as pg_errors
from psycopg2 import sql

from maas_tasks.config import Settings, load_settings

log = logging.getLogger(__name__)

SUPERUSER = "maas"
SERVICE_USER = "postgres"
LISTEN_HOST = "127.0.0.1"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
INSTALL_HINT = (
    "install the PostgreSQL server: sudo apt-get install postgresql "
    "(Debian/Ubuntu package 'postgresql', which provides /usr/lib/postgresql/<major>/bin)"
)
# Linux caps a unix socket path at 107 bytes; the server appends "/.s.PGSQL.<port>".
_MAX_SOCKET_PATH = 107
_REQUIRED_BINARIES = ("initdb", "pg_ctl")


class PostgresError(RuntimeError):
    """A cluster operation failed; the message says which cluster, what happened and what to do."""


class PostgresNotInstalled(PostgresError):
    """No PostgreSQL server binaries (initdb, pg_ctl) were found."""


@dataclass(frozen=True)
class PgCluster:
    """A private cluster rooted at ``root`` and served on ``127.0.0.1:port``.

    ``durable=False`` turns off fsync and synchronous commit: for throwaway test clusters only,
    where it makes initdb and every commit several times faster.
    """

    root: Path
    port: int
    durable: bool = True

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def data_dir(self) -> Path:
        """``<root>/data``; a symlink into the temp dir when the fallback is in use."""
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return _state_dir(self) / "postgres.log"

    @property
    def socket_dir(self) -> Path | None:
        """The unix socket directory, or None when its path would be too long for a socket."""
        return socket_dir_for(_state_dir(self), self.port)

    def read_password(self) -> str:
        """The generated superuser password.

        Raises:
            PostgresError: the password file is missing (the cluster was never initialised).
        """
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise PostgresError(
                f"no password file at {self.password_file}: the cluster at {self.root} is not initialised; "
                "run `maas stack up` (or init_cluster) first"
            ) from None

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq key/value DSN reaching ``dbname`` over TCP as the ``maas`` superuser."""
        return format_dsn(
            host=LISTEN_HOST, port=self.port, user=SUPERUSER, password=self.read_password(), dbname=dbname
        )

    def sqlalchemy_url(self, dbname: str) -> str:
        """``postgresql+psycopg2://maas:<pw>@127.0.0.1:<port>/<db>`` with every part URL-quoted (for Airflow)."""
        user = quote(SUPERUSER, safe="")
        password = quote(self.read_password(), safe="")
        return f"postgresql+psycopg2://{user}:{password}@{LISTEN_HOST}:{self.port}/{quote(dbname, safe='')}"


@dataclass(frozen=True)
class PgStatus:
    """What :func:`read_status` found: whether the cluster exists and whether its server runs."""

    initialized: bool
    running: bool
    pid: int | None
    port: int | None
    data_dir: Path


def socket_dir_for(state_dir: Path, port: int) -> Path | None:
    """``<state_dir>/run``, or None when the socket path in it would exceed the kernel's limit."""
    candidate = state_dir / "run"
    if len(os.fsencode(candidate / f".s.PGSQL.{port}")) > _MAX_SOCKET_PATH:
        return None
    return candidate


def format_dsn(**params: str | int) -> str:
    """Build a libpq key/value DSN, quoting each value so spaces, quotes and backslashes survive."""
    return " ".join(f"{key}={_quote_libpq(str(value))}" for key, value in params.items())


def _quote_libpq(value: str) -> str:
    if value and not any(ch in value for ch in " '\\\t\n\r"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_conf(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def find_pg_bin(search_path: str | None = None, versions_root: Path = DEBIAN_PG_ROOT) -> Path:
    """Locate the directory holding the server binaries (initdb and pg_ctl).

    Looks on ``search_path`` (default: PATH) first, following symlinks to the real install so
    pg_ctl finds its ``postgres`` beside it, then the highest ``<versions_root>/<major>/bin``.

    Raises:
        PostgresNotInstalled: neither place has both binaries; the message says what to install.
    """
    found = shutil.which("initdb", path=search_path if search_path is not None else os.environ.get("PATH"))
    if found:
        for candidate in (Path(found).resolve().parent, Path(found).parent):
            if _has_binaries(candidate):
                return candidate
    majors = []
    if versions_root.is_dir():
        for child in versions_root.iterdir():
            if child.name.isdigit() and _has_binaries(child / "bin"):
                majors.append((int(child.name), child / "bin"))
    if majors:
        return max(majors)[1]
    raise PostgresNotInstalled(
        f"PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor under {versions_root}/<major>/bin; "
        f"{INSTALL_HINT}"
    )


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _service_account() -> pwd.struct_passwd | None:
    """The OS account the server runs as when we are root; None means "the current user"."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresError(
            f"running as root, but PostgreSQL refuses to run as root and there is no '{SERVICE_USER}' OS user "
            f"to run it as; {INSTALL_HINT} (it creates that user), or run as a non-root user"
        ) from None


def can_traverse(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether a user (``uid`` in groups ``gids``) may traverse ``path`` and every parent of it.

    Mirrors the kernel's owner/group/other search-bit check; uid 0 may traverse anything.
    """
    if uid == 0:
        return True
    for directory in [path, *path.parents]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            continue
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def fallback_dir(root: Path, temp_dir: Path | None = None) -> Path:
    """The temp-dir home of a cluster whose own directory the service user cannot reach."""
    digest = hashlib.sha256(str(root.resolve()).encode("utf-8")).hexdigest()[:16]
    return Path(temp_dir or tempfile.gettempdir()) / f"maas-pg-{digest}"


def choose_state_dir(root: Path, account: pwd.struct_passwd | None, temp_dir: Path | None = None) -> Path:
    """Where the server's files (data, socket, log) go for a cluster rooted at ``root``.

    ``root`` itself unless the service ``account`` cannot traverse it, in which case the
    :func:`fallback_dir`. A cluster already set up with the fallback keeps it (``<root>/data``
    is then a symlink to it).
    """
    link = root / "data"
    if link.is_symlink():
        return Path(os.readlink(link)).parent
    if account is None:
        return root
    gids = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem)}
    if can_traverse(root, account.pw_uid, gids):
        return root
    return fallback_dir(root, temp_dir)


def _state_dir(cluster: PgCluster) -> Path:
    return choose_state_dir(cluster.root, _service_account())


def _chown(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


def _prepare_dirs(cluster: PgCluster) -> Path:
    """Create the cluster's directories with the owners and modes the server needs; return the data dir."""
    account = _service_account()
    cluster.root.mkdir(parents=True, exist_ok=True)
    state = _state_dir(cluster)
    if state != cluster.root:
        if state.is_symlink() or (state.exists() and account and state.stat().st_uid != account.pw_uid):
            raise PostgresError(
                f"{state} exists but is not a directory owned by {SERVICE_USER}; it cannot hold the cluster "
                f"data of {cluster.root}. Remove it, or move the checkout where {SERVICE_USER} can reach it"
            )
        if not state.exists():
            log.warning(
                "%s cannot traverse the parents of %s; keeping the PostgreSQL files in %s (linked from %s)",
                SERVICE_USER, cluster.root, state, cluster.data_dir,
            )
        state.mkdir(mode=0o700, exist_ok=True)
        _chown(state, account)
        os.chmod(state, 0o700)
    data = state / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    _chown(data, account)
    os.chmod(data, 0o700)
    if state != cluster.root and not cluster.data_dir.is_symlink():
        cluster.data_dir.symlink_to(data, target_is_directory=True)
    socket_dir = cluster.socket_dir
    if socket_dir is not None:
        socket_dir.mkdir(mode=0o755, exist_ok=True)
        _chown(socket_dir, account)
    log_file = state / "postgres.log"
    log_file.touch(mode=0o640, exist_ok=True)
    _chown(log_file, account)
    return data


def _run(cluster: PgCluster, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a server binary as the service user; the cwd is / so an unreadable cwd cannot break it."""
    command = [str(find_pg_bin() / args[0]), *args[1:]]
    if _service_account() is not None:
        runuser = shutil.which("runuser")
        if runuser is None:
            raise PostgresError("running as root needs `runuser` (util-linux) to start PostgreSQL as postgres")
        command = [runuser, "-u", SERVICE_USER, "--", *command]
    try:
        return subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PostgresError(
            f"`{' '.join(args[:1] + args[-1:])}` for the cluster at {cluster.root} did not finish within "
            f"{timeout:.0f}s; see {cluster.log_file}"
        ) from None


def _real_data_dir(cluster: PgCluster) -> Path:
    return _state_dir(cluster) / "data"


def init_cluster(cluster: PgCluster) -> bool:
    """Create the cluster (initdb) unless it exists. Idempotent.

    Returns:
        True if this call created it.

    Raises:
        PostgresNotInstalled: no server binaries.
        PostgresError: initdb failed (its output is quoted).
    """
    bin_dir = find_pg_bin()
    data = _prepare_dirs(cluster)
    if (data / "PG_VERSION").is_file():
        if not cluster.password_file.is_file():
            raise PostgresError(
                f"the cluster in {data} exists but its password file {cluster.password_file} is gone, so nothing "
                f"can log in; restore the file, or delete {cluster.root} (losing its data) and run `maas stack up`"
            )
        return False
    if any(data.iterdir()):
        raise PostgresError(
            f"{data} is neither empty nor a PostgreSQL data directory (no PG_VERSION); "
            "remove it (a previous initdb probably failed) and run `maas stack up` again"
        )
    password = secrets.token_urlsafe(24)
    _write_private(cluster.password_file, password + "\n")
    account = _service_account()
    # initdb runs as the service user, so it gets its own copy of the password, deleted right after.
    fd, pwfile = tempfile.mkstemp(prefix=".pwfile-", dir=data.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(password + "\n")
        _chown(Path(pwfile), account)
        args = [
            "initdb", "-D", str(data), "-U", SUPERUSER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
            "-E", "UTF8", "--locale=C",
        ]
        if not cluster.durable:
            args.append("--no-sync")
        result = _run(cluster, args, timeout=300)
    finally:
        os.unlink(pwfile)
    if result.returncode != 0:
        raise PostgresError(
            f"initdb ({bin_dir}) failed for {data} with exit code {result.returncode}:\n"
            f"{(result.stderr or result.stdout).strip()}"
        )
    with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write("\n# MaaS settings, rewritten at every start by maas_tasks.postgres\ninclude 'maas.conf'\n")
    _write_settings(cluster, data)
    log.info("initialised PostgreSQL cluster in %s", data)
    return True


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable only by the owner."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_settings(cluster: PgCluster, data: Path) -> None:
    socket_dir = cluster.socket_dir
    lines = [
        "# Written by maas_tasks.postgres at init and at every start; edits here are overwritten.",
        f"listen_addresses = {_quote_conf(LISTEN_HOST)}",
        f"port = {cluster.port}",
        f"unix_socket_directories = {_quote_conf(str(socket_dir) if socket_dir else '')}",
        # Airflow's scheduler, API server and workers each keep a pool; 100 leaves headroom on a dev box.
        "max_connections = 100",
        "shared_buffers = '64MB'",
        "password_encryption = 'scram-sha-256'",
    ]
    if not cluster.durable:
        lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
    path = data / "maas.conf"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(path, 0o600)
    _chown(path, _service_account())


def read_status(cluster: PgCluster) -> PgStatus:
    """Whether the cluster is initialised and running, from its ``postmaster.pid``."""
    data = _real_data_dir(cluster)
    initialized = (data / "PG_VERSION").is_file()
    try:
        lines = (data / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (FileNotFoundError, IndexError, ValueError):
        return PgStatus(initialized, False, None, None, data)
    if not pid_alive(pid):
        return PgStatus(initialized, False, None, None, data)
    return PgStatus(initialized, True, pid, port, data)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def start_cluster(cluster: PgCluster, timeout: float = 60.0) -> PgStatus:
    """Start the server unless it runs, and wait until it accepts TCP connections. Idempotent.

    Raises:
        PostgresError: the cluster is not initialised, runs on another port, or failed to start
            within ``timeout`` seconds (the message quotes the new lines of the server log).
    """
    status = read_status(cluster)
    if not status.initialized:
        raise PostgresError(f"no PostgreSQL cluster in {cluster.data_dir}; run `maas stack up` (init_cluster) first")
    if status.running:
        if status.port != cluster.port:
            raise PostgresError(
                f"the cluster in {status.data_dir} already runs on port {status.port}, not {cluster.port}; "
                "stop it (`maas stack down`) and start it again to change the port"
            )
        _wait_for_connections(cluster, time.monotonic() + timeout)
        return status
    data = _real_data_dir(cluster)
    _prepare_dirs(cluster)
    _write_settings(cluster, data)
    log_file = cluster.log_file
    log_offset = log_file.stat().st_size if log_file.exists() else 0
    deadline = time.monotonic() + timeout
    result = _run(
        cluster,
        ["pg_ctl", "-D", str(data), "-l", str(log_file), "-w", "-t", str(max(1, int(timeout))), "start"],
        timeout=timeout + 10,
    )
    if result.returncode != 0:
        raise PostgresError(
            f"PostgreSQL did not start on {LISTEN_HOST}:{cluster.port} (data {data}): "
            f"{(result.stderr or result.stdout).strip()}\n"
            f"last lines of {log_file}:\n{_log_tail(log_file, log_offset)}\n"
            "If the port is in use, stop whatever holds it or set MAAS_PG_PORT to a free port."
        )
    _wait_for_connections(cluster, deadline)
    log.info("PostgreSQL for %s is accepting connections on %s:%d", cluster.root, LISTEN_HOST, cluster.port)
    return read_status(cluster)


def _log_tail(log_file: Path, offset: int, lines: int = 20) -> str:
    try:
        with log_file.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read the log: {exc})"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(the log is empty)"


def _wait_for_connections(cluster: PgCluster, deadline: float) -> None:
    dsn = cluster.dsn("postgres")
    while True:
        try:
            psycopg2.connect(dsn, connect_timeout=2).close()
            return
        except psycopg2.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise PostgresError(
                    f"PostgreSQL for {cluster.root} runs but accepts no connection on {LISTEN_HOST}:{cluster.port}: "
                    f"{str(exc).strip()}\nsee {cluster.log_file}"
                ) from None
            time.sleep(0.1)


def stop_cluster(cluster: PgCluster, timeout: float = 60.0) -> bool:
    """Stop the server (fast mode: roll back open transactions, then a clean shutdown). Idempotent.

    Returns:
        True if a running server was stopped.

    Raises:
        PostgresError: pg_ctl could not stop it within ``timeout`` seconds.
    """
    status = read_status(cluster)
    if not status.running:
        return False
    result = _run(
        cluster,
        ["pg_ctl", "-D", str(status.data_dir), "-m", "fast", "-w", "-t", str(max(1, int(timeout))), "stop"],
        timeout=timeout + 10,
    )
    if result.returncode != 0 and read_status(cluster).running:
        raise PostgresError(
            f"could not stop PostgreSQL (pid {status.pid}, data {status.data_dir}): "
            f"{(result.stderr or result.stdout).strip()}; see {cluster.log_file}"
        )
    return True


def destroy_cluster(cluster: PgCluster) -> None:
    """Stop the server and delete every file of the cluster, the temp-dir fallback included."""
    stop_cluster(cluster)
    state = _state_dir(cluster)
    if state != cluster.root:
        shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(cluster.root, ignore_errors=True)


def _admin_connection(cluster: PgCluster) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(cluster.dsn("postgres"), connect_timeout=10)
    conn.autocommit = True
    return conn


def ensure_database(cluster: PgCluster, name: str) -> bool:
    """Create database ``name`` owned by ``maas`` unless it exists. Idempotent, safe to race.

    Returns:
        True if this call created it.
    """
    conn = _admin_connection(cluster)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                return False
            return True
    finally:
        conn.close()


def drop_database(cluster: PgCluster, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions first."""
    conn = _admin_connection(cluster)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()


def local_cluster(settings: Settings | None = None) -> PgCluster:
    """The stack's own cluster: ``<MAAS_HOME>/pg`` on MAAS_PG_PORT."""
    settings = settings or load_settings()
    return PgCluster(root=settings.home / "pg", port=settings.pg_port)


def registry_dsn(settings: Settings | None = None) -> str:
    """The registry's DSN: MAAS_REGISTRY_DSN when set, else database ``maas`` of the local cluster."""
    settings = settings or load_settings()
    if settings.registry_dsn:
        return settings.registry_dsn
    return local_cluster(settings).dsn("maas")
