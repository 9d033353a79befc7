"""The model registry: which data snapshots exist, which model versions were trained from them,
which one is serving, and an append-only log of every change.

It lives in PostgreSQL (the stack's private cluster, or MAAS_REGISTRY_DSN) so that concurrent
DAG runs get race-free guarantees from the database rather than from Python: version numbers
come from a per-model counter row updated in the same transaction as the version row (no
duplicates, no gaps, even on rollback), at most one version per model is serving (a partial
unique index), and the event log rejects UPDATE, DELETE and TRUNCATE (a trigger).

The schema is versioned SQL in ``maas_tasks/migrations/NNNN_name.sql``, applied in order by
:func:`migrate` under a transaction-level advisory lock so concurrent starters do not race.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import errors as pg_errors
from psycopg2.extras import Json

STATUSES = ("candidate", "rejected", "serving", "retired")
INITIAL_STATUSES = ("candidate", "rejected")
# Where each status may go. Retired -> serving is a rollback to an earlier version; rejected is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"rejected", "serving"}),
    "serving": frozenset({"retired"}),
    "retired": frozenset({"serving"}),
    "rejected": frozenset(),
}
# The key of the migration advisory lock, shared by every MaaS process: the bytes of "maasreg1".
MIGRATION_LOCK_KEY = 0x6D61617372656731
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class RegistryError(RuntimeError):
    """A registry operation failed; the message says what and how to fix it."""


class RegistryUnavailable(RegistryError):
    """The registry database cannot be reached."""


class VersionNotFound(RegistryError, LookupError):
    """No such model version."""


class IllegalTransition(RegistryError, ValueError):
    """A status change the model lifecycle does not allow (e.g. serving a rejected version)."""


@dataclass(frozen=True)
class Migration:
    """One schema migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A recorded data snapshot (content-addressed by ``sha256``)."""

    id: int
    uri: str
    sha256: str
    rows: int
    source: str
    columns: list[str]
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ModelVersion:
    """One trained version of a model and where it is in its lifecycle."""

    model_name: str
    version: int
    status: str
    metrics: dict[str, Any]
    artifact_uri: str | None
    snapshot_id: int | None
    dag_run_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Event:
    """One entry of the append-only event log."""

    id: int
    at: datetime
    model_name: str | None
    version: int | None
    kind: str
    detail: dict[str, Any]


def load_migrations() -> list[Migration]:
    """The packaged migrations, ordered by version.

    Raises:
        RegistryError: a file in ``migrations/`` is misnamed or two files share a version.
    """
    folder = resources.files("maas_tasks") / "migrations"
    migrations: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if not match:
            raise RegistryError(f"migration file {entry.name!r} is not named NNNN_lower_snake.sql; rename it")
        version = int(match.group(1))
        if version in migrations:
            raise RegistryError(
                f"migrations {migrations[version].name!r} and {entry.name!r} share version {version}; renumber one"
            )
        migrations[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return [migrations[v] for v in sorted(migrations)]


def migrate(conn: psycopg2.extensions.connection, migrations: list[Migration] | None = None) -> list[int]:
    """Bring the schema up to date in one transaction. Idempotent; safe to run concurrently.

    Args:
        conn: an open connection not in autocommit mode; committed on success, rolled back on error.
        migrations: what to apply (default: :func:`load_migrations`).

    Returns:
        The versions this call applied (empty when the schema was current).

    Raises:
        RegistryError: an applied migration's file changed since, or the database is newer than this code.
    """
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[int] = []
    with conn, conn.cursor() as cur:
        # Held until commit: a second starter waits here, then sees everything already applied.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version, name, checksum FROM schema_migrations")
        applied = {version: (name, checksum) for version, name, checksum in cur.fetchall()}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise RegistryError(
                f"the registry database has schema migrations {unknown} that this MaaS code does not know; "
                "upgrade MaaS to the version that created them"
            )
        for migration in migrations:
            if migration.version in applied:
                name, checksum = applied[migration.version]
                if checksum != migration.checksum:
                    raise RegistryError(
                        f"migration {migration.name} changed after it was applied (as {name}); applied migrations "
                        "are immutable: revert the edit and put the change in a new NNNN_name.sql file"
                    )
                continue
            cur.execute(migration.sql)
            cur.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    return applied_now


def describe_dsn(dsn: str) -> str:
    """``host H port P database D`` for messages; never includes the password."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "an unparsable DSN (check MAAS_REGISTRY_DSN: libpq key=value or postgresql:// URL)"
    host = params.get("host") or params.get("hostaddr") or "the default unix socket"
    return f"host {host} port {params.get('port') or 5432} database {params.get('dbname') or params.get('user') or '?'}"


def _redact(message: str, dsn: str) -> str:
    try:
        password = psycopg2.extensions.parse_dsn(dsn).get("password")
    except psycopg2.ProgrammingError:
        password = None
    return message.replace(password, "***") if password else message


class Registry:
    """A connection to the registry. Not thread-safe: use one instance per thread or process.

    ``Registry(dsn)`` only connects; :meth:`connect` also applies pending migrations and is what
    pipeline steps use.
    """

    def __init__(self, dsn: str, connect_timeout: int = 10) -> None:
        """Open a connection to ``dsn``.

        Raises:
            RegistryUnavailable: the database cannot be reached; says where and how to fix it.
        """
        try:
            self._conn = psycopg2.connect(dsn, connect_timeout=connect_timeout, application_name="maas-registry")
        except psycopg2.Error as exc:
            detail = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, dsn)
            raise RegistryUnavailable(
                f"cannot connect to the model registry at {describe_dsn(dsn)}: {detail}. "
                "Start the local stack with `maas stack up`, or set MAAS_REGISTRY_DSN to a reachable PostgreSQL"
            ) from None

    @classmethod
    def connect(cls, dsn: str, connect_timeout: int = 10) -> Registry:
        """Connect and apply pending migrations."""
        registry = cls(dsn, connect_timeout=connect_timeout)
        try:
            migrate(registry._conn)
        except BaseException:
            registry.close()
            raise
        return registry

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        # `with conn` commits on success and rolls back on any exception.
        with self._conn, self._conn.cursor() as cur:
            yield cur

    @staticmethod
    def _insert_event(
        cur: psycopg2.extensions.cursor,
        kind: str,
        model_name: str | None = None,
        version: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        cur.execute(
            "INSERT INTO model_events (model_name, version, kind, detail) VALUES (%s, %s, %s, %s) RETURNING id",
            (model_name, version, kind, Json(detail or {})),
        )
        return cur.fetchone()[0]

    def record_snapshot(
        self,
        uri: str,
        sha256: str,
        rows: int,
        source: str,
        metadata: dict[str, Any] | None = None,
        columns: list[str] | None = None,
    ) -> int:
        """Record a data snapshot; recording the same content (``sha256``) again returns the first id.

        Raises:
            RegistryError: ``sha256`` is not 64 lowercase hex digits, or ``rows`` is negative.
        """
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise RegistryError(f"sha256 {sha256!r} is not 64 lowercase hex digits (storage.sha256_file gives one)")
        if rows < 0:
            raise RegistryError(f"rows={rows} is negative for snapshot {uri}")
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO data_snapshots (uri, sha256, rows, source, columns, metadata)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING RETURNING id",
                (uri, sha256, rows, source, Json(columns or []), Json(metadata or {})),
            )
            inserted = cur.fetchone()
            if inserted is None:
                cur.execute("SELECT id FROM data_snapshots WHERE sha256 = %s", (sha256,))
                return cur.fetchone()[0]
            self._insert_event(
                cur, "snapshot_recorded", detail={"snapshot_id": inserted[0], "uri": uri, "sha256": sha256}
            )
            return inserted[0]

    def get_snapshot(self, snapshot_id: int) -> Snapshot:
        """The snapshot with ``snapshot_id``.

        Raises:
            RegistryError: there is none.
        """
        with self._transaction() as cur:
            cur.execute(
                "SELECT id, uri, sha256, rows, source, columns, metadata, created_at FROM data_snapshots"
                " WHERE id = %s",
                (snapshot_id,),
            )
            row = cur.fetchone()
        if row is None:
            raise RegistryError(f"no data snapshot with id {snapshot_id} in the registry")
        return Snapshot(*row)

    def register_version(
        self,
        model_name: str,
        *,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
        snapshot_id: int | None = None,
        dag_run_id: str | None = None,
        artifact_uri: str | None = None,
    ) -> int:
        """Allocate the next version number of ``model_name`` and record it, atomically.

        Returns:
            The new version (1 for a model's first).

        Raises:
            IllegalTransition: ``status`` is not candidate or rejected (serving goes through mark_serving).
            RegistryError: ``snapshot_id`` does not exist. Nothing is recorded and no number is used up.
        """
        if status not in INITIAL_STATUSES:
            raise IllegalTransition(
                f"a new version of {model_name} must start as one of {INITIAL_STATUSES}, not {status!r}; "
                "register it as candidate, then mark_serving"
            )
        try:
            with self._transaction() as cur:
                cur.execute(
                    "INSERT INTO model_counters (model_name, last_version) VALUES (%s, 1)"
                    " ON CONFLICT (model_name) DO UPDATE SET last_version = model_counters.last_version + 1"
                    " RETURNING last_version",
                    (model_name,),
                )
                version = cur.fetchone()[0]
                cur.execute(
                    "INSERT INTO model_versions (model_name, version, status, metrics, artifact_uri, snapshot_id,"
                    " dag_run_id) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (model_name, version, status, Json(metrics or {}), artifact_uri, snapshot_id, dag_run_id),
                )
                self._insert_event(
                    cur, "registered", model_name, version,
                    {"status": status, "snapshot_id": snapshot_id, "dag_run_id": dag_run_id},
                )
        except pg_errors.ForeignKeyViolation:
            raise RegistryError(
                f"cannot register {model_name}: data snapshot id {snapshot_id} does not exist; record_snapshot first"
            ) from None
        return version

    def _lock_model(self, cur: psycopg2.extensions.cursor, model_name: str, version: int) -> str:
        """Lock the model's counter row (serialising its state changes) and return the version's status."""
        cur.execute("SELECT 1 FROM model_counters WHERE model_name = %s FOR UPDATE", (model_name,))
        cur.execute(
            "SELECT status FROM model_versions WHERE model_name = %s AND version = %s", (model_name, version)
        )
        row = cur.fetchone()
        if row is None:
            raise VersionNotFound(f"{model_name} version {version} is not in the registry")
        return row[0]

    def set_artifact(self, model_name: str, version: int, uri: str) -> None:
        """Record where the exported model of a version lives.

        Raises:
            VersionNotFound: no such version.
        """
        with self._transaction() as cur:
            cur.execute(
                "UPDATE model_versions SET artifact_uri = %s WHERE model_name = %s AND version = %s",
                (uri, model_name, version),
            )
            if cur.rowcount == 0:
                raise VersionNotFound(f"{model_name} version {version} is not in the registry")
            self._insert_event(cur, "artifact_set", model_name, version, {"artifact_uri": uri})

    def mark_serving(self, model_name: str, version: int, detail: dict[str, Any] | None = None) -> int | None:
        """Make ``version`` the serving one; the previous serving version becomes retired.

        Both changes and their events commit together. Marking the serving version again is a no-op.

        Returns:
            The version that was serving before (None if none, or if ``version`` already was).

        Raises:
            VersionNotFound: no such version.
            IllegalTransition: the version is rejected.
        """
        with self._transaction() as cur:
            current = self._lock_model(cur, model_name, version)
            if current == "serving":
                return None
            _check_transition(model_name, version, current, "serving")
            cur.execute(
                "UPDATE model_versions SET status = 'retired' WHERE model_name = %s AND status = 'serving'"
                " RETURNING version",
                (model_name,),
            )
            previous = cur.fetchone()
            previous_version = previous[0] if previous else None
            if previous_version is not None:
                self._insert_event(
                    cur, "retired", model_name, previous_version, {"from": "serving", "replaced_by": version}
                )
            cur.execute(
                "UPDATE model_versions SET status = 'serving' WHERE model_name = %s AND version = %s",
                (model_name, version),
            )
            self._insert_event(
                cur, "serving", model_name, version, {"from": current, "replaces": previous_version, **(detail or {})}
            )
        return previous_version

    def set_status(
        self, model_name: str, version: int, status: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Move a version to ``status`` if the lifecycle allows it (see TRANSITIONS); same status is a no-op.

        ``serving`` goes through :meth:`mark_serving` so the previous serving version is retired.

        Raises:
            VersionNotFound: no such version.
            IllegalTransition: the lifecycle forbids the change, or ``status`` is unknown.
        """
        if status not in STATUSES:
            raise IllegalTransition(f"unknown status {status!r} for {model_name} v{version}; use one of {STATUSES}")
        if status == "serving":
            self.mark_serving(model_name, version, detail)
            return
        with self._transaction() as cur:
            current = self._lock_model(cur, model_name, version)
            if current == status:
                return
            _check_transition(model_name, version, current, status)
            cur.execute(
                "UPDATE model_versions SET status = %s WHERE model_name = %s AND version = %s",
                (status, model_name, version),
            )
            self._insert_event(cur, status, model_name, version, {"from": current, **(detail or {})})

    def get_version(self, model_name: str, version: int) -> ModelVersion:
        """One version.

        Raises:
            VersionNotFound: no such version.
        """
        found = self._select_versions("WHERE model_name = %s AND version = %s", (model_name, version))
        if not found:
            raise VersionNotFound(f"{model_name} version {version} is not in the registry")
        return found[0]

    def list_versions(self, model_name: str | None = None, status: str | None = None) -> list[ModelVersion]:
        """Versions ordered by model name then version, optionally of one model and/or one status."""
        clauses, params = [], []
        if model_name is not None:
            clauses.append("model_name = %s")
            params.append(model_name)
        if status is not None:
            clauses.append("status = %s")
            params.append(status)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._select_versions(where, tuple(params))

    def _select_versions(self, where: str, params: tuple[Any, ...]) -> list[ModelVersion]:
        with self._transaction() as cur:
            cur.execute(
                "SELECT model_name, version, status, metrics, artifact_uri, snapshot_id, dag_run_id, created_at,"
                f" updated_at FROM model_versions {where} ORDER BY model_name, version",
                params,
            )
            return [ModelVersion(*row) for row in cur.fetchall()]

    def serving_version(self, model_name: str) -> int | None:
        """The version of ``model_name`` that is serving, or None."""
        with self._transaction() as cur:
            cur.execute(
                "SELECT version FROM model_versions WHERE model_name = %s AND status = 'serving'", (model_name,)
            )
            row = cur.fetchone()
        return row[0] if row else None

    def record_event(
        self,
        kind: str,
        model_name: str | None = None,
        version: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """Append an event (e.g. a validation failure or a deployment) and return its id."""
        with self._transaction() as cur:
            return self._insert_event(cur, kind, model_name, version, detail)

    def list_events(
        self,
        model_name: str | None = None,
        version: int | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events in the order they happened, optionally filtered; ``limit`` keeps the most recent ones."""
        clauses, params = [], []
        for column, value in (("model_name", model_name), ("version", version), ("kind", kind)):
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        query = f"SELECT id, at, model_name, version, kind, detail FROM model_events {where} ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT %s"
            params.append(limit)
        with self._transaction() as cur:
            cur.execute(query, tuple(params))
            rows = cur.fetchall()
        return [Event(*row) for row in reversed(rows)]


def _check_transition(model_name: str, version: int, current: str, target: str) -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (final)"
        raise IllegalTransition(
            f"{model_name} v{version} is {current}; it cannot become {target} (from {current} it can go to: {allowed})"
        )
