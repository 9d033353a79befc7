"""Tests of the private PostgreSQL cluster: binary discovery, the root/temp-dir fallback, DSNs, and a
real cluster's lifecycle (init, start, stop, restart, status, errors)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from maas_tasks.config import load_settings
from maas_tasks.postgres import (
    PgCluster,
    PostgresError,
    PostgresNotInstalled,
    can_traverse,
    choose_state_dir,
    destroy_cluster,
    drop_database,
    ensure_database,
    fallback_dir,
    find_pg_bin,
    init_cluster,
    local_cluster,
    read_status,
    registry_dsn,
    socket_dir_for,
    start_cluster,
    stop_cluster,
)
from tests.fixtures.postgres import find_free_port

# A uid/gid that owns nothing on the machine, standing in for the `postgres` service account.
STRANGER = pwd.struct_passwd(("maas-test-stranger", "x", 54321, 54321, "", "/", "/bin/false"))


def _fake_bin(directory: Path, names: tuple[str, ...] = ("initdb", "pg_ctl")) -> Path:
    directory.mkdir(parents=True)
    for name in names:
        path = directory / name
        path.write_text("#!/bin/sh\n", encoding="utf-8")
        path.chmod(0o755)
    return directory


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A 0755 temp dir: pytest's tmp_path sits under a 0700 dir when root, which would defeat these tests."""
    path = Path(tempfile.mkdtemp(prefix="maas-pg-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_find_pg_bin_without_binaries_says_how_to_install(tmp_path):
    with pytest.raises(PostgresNotInstalled) as caught:
        find_pg_bin(search_path=str(tmp_path), versions_root=tmp_path / "lib")
    assert "sudo apt-get install postgresql" in str(caught.value)
    assert "package 'postgresql'" in str(caught.value)


def test_find_pg_bin_picks_the_highest_complete_major(tmp_path):
    lib = tmp_path / "lib"
    for major in ("9", "14", "16"):
        _fake_bin(lib / major / "bin")
    _fake_bin(lib / "17" / "bin", names=("initdb",))  # incomplete install: no pg_ctl
    assert find_pg_bin(search_path=str(tmp_path / "empty"), versions_root=lib) == lib / "16" / "bin"


def test_find_pg_bin_prefers_path_and_follows_symlinks_to_the_install(tmp_path):
    lib = tmp_path / "lib"
    real = _fake_bin(lib / "15" / "bin")
    _fake_bin(lib / "16" / "bin")
    on_path = tmp_path / "local-bin"
    on_path.mkdir()
    for name in ("initdb", "pg_ctl"):
        (on_path / name).symlink_to(real / name)
    assert find_pg_bin(search_path=str(on_path), versions_root=lib) == real


def test_can_traverse_follows_owner_group_and_other_bits(open_tmp):
    outer = open_tmp / "home"
    inner = outer / "me" / "checkout"
    inner.mkdir(parents=True)
    outer.chmod(0o700)
    assert not can_traverse(inner, STRANGER.pw_uid, {STRANGER.pw_gid})
    assert can_traverse(inner, 0, set())
    outer.chmod(0o711)
    assert can_traverse(inner, STRANGER.pw_uid, {STRANGER.pw_gid})
    outer.chmod(0o710)
    assert not can_traverse(inner, STRANGER.pw_uid, {STRANGER.pw_gid})
    assert can_traverse(inner, STRANGER.pw_uid, {outer.stat().st_gid})


def test_choose_state_dir_falls_back_to_temp_dir_only_when_unreachable(open_tmp):
    tmp_path = open_tmp
    open_root = tmp_path / "open" / "pg"
    open_root.mkdir(parents=True)
    closed_home = tmp_path / "closed"
    closed_root = closed_home / "checkout" / ".maas" / "pg"
    closed_root.mkdir(parents=True)
    closed_home.chmod(0o700)
    temp = tmp_path / "systemp"

    assert choose_state_dir(closed_root, None, temp) == closed_root  # not root: our own files
    assert choose_state_dir(open_root, STRANGER, temp) == open_root
    chosen = choose_state_dir(closed_root, STRANGER, temp)
    assert chosen == fallback_dir(closed_root, temp)
    assert chosen.parent == temp and chosen.name.startswith("maas-pg-")
    assert fallback_dir(closed_root, temp) != fallback_dir(open_root, temp)

    # Once set up, the symlink is the record: the decision is not re-made.
    (closed_root / "data").symlink_to(tmp_path / "elsewhere" / "data")
    assert choose_state_dir(closed_root, STRANGER, temp) == tmp_path / "elsewhere"


def test_socket_dir_dropped_when_path_too_long():
    assert socket_dir_for(Path("/srv/pg"), 54320) == Path("/srv/pg/run")
    assert socket_dir_for(Path("/" + "d" * 95), 54320) is None


def test_dsn_and_sqlalchemy_url_quote_awkward_passwords(tmp_path):
    cluster = PgCluster(root=tmp_path, port=5555)
    password = "p@ss w'o\\rd:/%?#"
    cluster.password_file.write_text(password + "\n", encoding="utf-8")

    parsed = psycopg2.extensions.parse_dsn(cluster.dsn("my db"))
    assert parsed == {"host": "127.0.0.1", "port": "5555", "user": "maas", "password": password, "dbname": "my db"}

    url = make_url(cluster.sqlalchemy_url("air flow"))
    assert (url.drivername, url.username, url.password) == ("postgresql+psycopg2", "maas", password)
    assert (url.host, url.port, url.database) == ("127.0.0.1", 5555, "air flow")


def test_dsn_without_password_file_says_to_init(tmp_path):
    with pytest.raises(PostgresError, match="maas stack up"):
        PgCluster(root=tmp_path, port=5555).dsn()


def test_local_cluster_and_registry_dsn_follow_settings(tmp_path):
    settings = load_settings({"MAAS_HOME": str(tmp_path), "MAAS_PG_PORT": "54999"})
    cluster = local_cluster(settings)
    assert (cluster.root, cluster.port) == (tmp_path / "pg", 54999)
    cluster.root.mkdir()
    cluster.password_file.write_text("pw\n", encoding="utf-8")
    assert registry_dsn(settings) == "host=127.0.0.1 port=54999 user=maas password=pw dbname=maas"

    external = "postgresql://reg:secret@db.internal:5432/registry"
    assert registry_dsn(load_settings({"MAAS_HOME": str(tmp_path), "MAAS_REGISTRY_DSN": external})) == external


def test_session_cluster_is_running_and_reported(pg_cluster):
    status = read_status(pg_cluster)
    assert status.initialized and status.running
    assert status.port == pg_cluster.port
    assert (status.data_dir / "PG_VERSION").is_file()
    os.kill(status.pid, 0)
    assert stat.S_IMODE(pg_cluster.password_file.stat().st_mode) == 0o600


def test_session_cluster_uses_fallback_exactly_when_postgres_cannot_reach_it(pg_cluster):
    needs_fallback = False
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        needs_fallback = not can_traverse(pg_cluster.root, account.pw_uid, {account.pw_gid})
    assert pg_cluster.data_dir.is_symlink() == needs_fallback
    if needs_fallback:
        state = pg_cluster.data_dir.resolve().parent
        assert state == fallback_dir(pg_cluster.root)
        assert state.stat().st_uid == account.pw_uid
        assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_init_and_start_are_idempotent(pg_cluster):
    password = pg_cluster.read_password()
    pid = read_status(pg_cluster).pid
    assert init_cluster(pg_cluster) is False
    assert start_cluster(pg_cluster).pid == pid
    assert pg_cluster.read_password() == password


def test_start_refuses_a_different_port_while_running(pg_cluster):
    other = PgCluster(root=pg_cluster.root, port=pg_cluster.port + 1, durable=False)
    with pytest.raises(PostgresError, match="already runs on port"):
        start_cluster(other)


def test_ensure_database_is_idempotent(pg_cluster):
    assert ensure_database(pg_cluster, "idempotent db") is True
    assert ensure_database(pg_cluster, "idempotent db") is False
    psycopg2.connect(pg_cluster.dsn("idempotent db")).close()
    drop_database(pg_cluster, "idempotent db")
    with pytest.raises(psycopg2.OperationalError, match="does not exist"):
        psycopg2.connect(pg_cluster.dsn("idempotent db"))


def test_server_requires_the_generated_password(pg_cluster):
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=pg_cluster.port, user="maas", password="guess", dbname="postgres")


@pytest.mark.slow
def test_stop_and_restart_keep_data(open_tmp):
    cluster = PgCluster(root=open_tmp / "pg", port=find_free_port(), durable=False)
    try:
        assert init_cluster(cluster) is True
        assert not read_status(cluster).running
        start_cluster(cluster)
        assert not cluster.data_dir.is_symlink()
        if os.geteuid() == 0:
            assert cluster.data_dir.stat().st_uid == pwd.getpwnam("postgres").pw_uid
        assert stat.S_IMODE(cluster.data_dir.stat().st_mode) == 0o700
        with psycopg2.connect(cluster.dsn()) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')")
        conn.close()

        assert stop_cluster(cluster) is True
        status = read_status(cluster)
        assert status.initialized and not status.running and status.pid is None
        assert stop_cluster(cluster) is False
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(cluster.dsn(), connect_timeout=2)

        saved = cluster.password_file.rename(cluster.root / "password.saved")
        with pytest.raises(PostgresError, match="password file .* is gone"):
            init_cluster(cluster)
        saved.rename(cluster.password_file)

        start_cluster(cluster)
        with psycopg2.connect(cluster.dsn()) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchall() == [("survives",)]
        conn.close()
    finally:
        destroy_cluster(cluster)
    assert not cluster.root.exists()


@pytest.mark.slow
def test_start_on_a_busy_port_quotes_the_server_log(open_tmp):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        cluster = PgCluster(root=open_tmp / "pg", port=squatter.getsockname()[1], durable=False)
        try:
            init_cluster(cluster)
            with pytest.raises(PostgresError) as caught:
                start_cluster(cluster, timeout=20)
        finally:
            destroy_cluster(cluster)
    message = str(caught.value)
    assert f"127.0.0.1:{cluster.port}" in message
    assert "Address already in use" in message
    assert "MAAS_PG_PORT" in message


def test_start_before_init_says_what_to_run(tmp_path):
    with pytest.raises(PostgresError, match="maas stack up"):
        start_cluster(PgCluster(root=tmp_path / "pg", port=find_free_port()))
