"""The model registry: which data snapshots exist, which model versions were trained from them, the
desired serving state of each model, what each serving node observed, and an append-only log of every
change.

It lives in PostgreSQL (the stack's private cluster, or MAAS_REGISTRY_DSN) so that concurrent
DAG runs get race-free guarantees from the database rather than from Python: version numbers
come from a per-model counter row updated in the same transaction as the version row (no
duplicates, no gaps, even on rollback), at most one version per model is serving (a partial
unique index), and the event log rejects UPDATE, DELETE and TRUNCATE (a trigger).

The desired serving state (:class:`ServingTarget`: the ``stable`` version, an optional ``canary``
under verification, the ``previous`` stable kept loaded for a grace period) changes only by
compare-and-set: each change names the state it expects, bumps the target's generation, moves the
versions' statuses and appends its events in one transaction, and notifies the serving nodes'
agents on the ``maas_serving`` channel (PostgreSQL LISTEN/NOTIFY).

The schema is versioned SQL in ``maas_tasks/migrations/NNNN_name.sql``, applied in order by
:func:`migrate` under a transaction-level advisory lock so concurrent starters do not race.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import errors as pg_errors
from psycopg2.extras import Json

STATUSES = ("candidate", "rejected", "serving", "retired", "superseded")
INITIAL_STATUSES = ("candidate", "rejected")
# Where each status may go. Retired -> serving is a rollback to an earlier version; a superseded candidate
# (its champion changed before it was promoted) may still be rolled to on purpose; rejected is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"rejected", "serving", "superseded"}),
    "serving": frozenset({"retired"}),
    "retired": frozenset({"serving"}),
    "superseded": frozenset({"serving"}),
    "rejected": frozenset(),
}
# Versions that may be put in front of users (as canary, then stable): passed the gate and exported.
SERVABLE_STATUSES = ("candidate", "serving", "retired", "superseded")
# PostgreSQL NOTIFY channel on which every desired-state change is announced (payload: the model name).
SERVING_CHANNEL = "maas_serving"
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


class DesiredStateConflict(RegistryError):
    """A compare-and-set of a model's desired serving state found another state than it expected.

    ``target`` is the state found.
    """

    def __init__(self, message: str, target: ServingTarget) -> None:
        super().__init__(message)
        self.target = target


class ChampionChanged(DesiredStateConflict):
    """The stable version is no longer the one a promotion was gated against."""


class CanaryBusy(DesiredStateConflict):
    """Another version holds the canary slot (its promotion is still within its lease)."""


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
    source_uri: str | None = None
    schema: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    validation_uri: str | None = None
    docs_uri: str | None = None
    quarantine_uri: str | None = None
    quarantined_rows: int = 0
    drift: dict[str, Any] = field(default_factory=dict)
    drift_uri: str | None = None
    watermark: str | None = None


_SNAPSHOT_COLUMNS = (
    "id, uri, sha256, rows, source, columns, metadata, created_at, source_uri, schema, validation, validation_uri,"
    " docs_uri, quarantine_uri, quarantined_rows, drift, drift_uri, watermark"
)
# What set_snapshot_reports may set, and how each value is stored.
_SNAPSHOT_REPORTS = {
    "validation": Json, "validation_uri": str, "docs_uri": str, "quarantine_uri": str, "quarantined_rows": int,
    "drift": Json, "drift_uri": str,
}


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
    pinned: bool = False
    report_uri: str | None = None


@dataclass(frozen=True)
class ServingTarget:
    """The desired serving state of one model: what every node must serve (see the module docstring)."""

    model_name: str
    stable: int | None
    canary: int | None
    canary_until: datetime | None
    previous: int | None
    previous_until: datetime | None
    generation: int
    updated_at: datetime


@dataclass(frozen=True)
class ServingNode:
    """A model server known to the registry and what its agent last observed."""

    node_id: str
    grpc_target: str
    rest_url: str | None
    last_seen: datetime
    report: dict[str, Any]


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
        self._where = describe_dsn(dsn)
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
        """A cursor in a transaction, committed at the end of the block and rolled back on any exception.

        Raises:
            RegistryUnavailable: the server went away (stopped, restarted, out of reach) during the block; the
                connection is gone, so the caller retries with a new Registry.
        """
        try:
            with self._conn, self._conn.cursor() as cur:
                yield cur
        except psycopg2.Error as exc:
            if not self._conn.closed:
                raise
            # The rollback on a lost connection fails too ("connection already closed"), hiding why it was lost.
            lost = exc.__context__ if isinstance(exc.__context__, psycopg2.OperationalError) else exc
            detail = str(lost).strip().splitlines()[0] if str(lost).strip() else type(lost).__name__
            raise RegistryUnavailable(
                f"lost the connection to the model registry at {self._where}: {detail}. PostgreSQL stopped or "
                "restarted (or the network dropped) before this call finished: run it again once the server is back "
                "(a DAG task's retry does, on a new connection)"
            ) from exc

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
        *,
        source_uri: str | None = None,
        schema: dict[str, Any] | None = None,
        watermark: tuple[str, str] | None = None,
    ) -> int:
        """Record a data snapshot; recording the same content (``sha256``) again returns the first id.

        ``source_uri`` names where the rows came from (a file, a directory, ``s3://...``, a PostgreSQL
        table): the snapshots of one source are its batches (:meth:`list_snapshots`). ``watermark``
        (column, highest value in the snapshot) moves that source's watermark forward in the same
        transaction, so a crash never records rows as read without their snapshot.

        Raises:
            RegistryError: ``sha256`` is not 64 lowercase hex digits, ``rows`` is negative, or a
                watermark is given without a ``source_uri``.
        """
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise RegistryError(f"sha256 {sha256!r} is not 64 lowercase hex digits (storage.sha256_file gives one)")
        if rows < 0:
            raise RegistryError(f"rows={rows} is negative for snapshot {uri}")
        if watermark is not None and not source_uri:
            raise RegistryError(f"snapshot {uri}: a watermark needs the source_uri it belongs to")
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO data_snapshots (uri, sha256, rows, source, columns, metadata, source_uri, schema, watermark)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING RETURNING id",
                (uri, sha256, rows, source, Json(columns or []), Json(metadata or {}), source_uri, Json(schema or {}),
                 watermark[1] if watermark else None),
            )
            inserted = cur.fetchone()
            if inserted is None:
                cur.execute("SELECT id FROM data_snapshots WHERE sha256 = %s", (sha256,))
                return cur.fetchone()[0]
            if watermark is not None:
                cur.execute(
                    "INSERT INTO source_watermarks (source_uri, column_name, value, snapshot_id) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (source_uri) DO UPDATE SET column_name = EXCLUDED.column_name,"
                    " value = EXCLUDED.value, snapshot_id = EXCLUDED.snapshot_id, updated_at = now()",
                    (source_uri, watermark[0], watermark[1], inserted[0]),
                )
            self._insert_event(
                cur, "snapshot_recorded",
                detail={"snapshot_id": inserted[0], "uri": uri, "sha256": sha256, "source_uri": source_uri,
                        "watermark": list(watermark) if watermark else None},
            )
            return inserted[0]

    def _select_snapshots(self, where: str, params: tuple[Any, ...]) -> list[Snapshot]:
        with self._transaction() as cur:
            cur.execute(f"SELECT {_SNAPSHOT_COLUMNS} FROM data_snapshots {where}", params)
            return [Snapshot(*row) for row in cur.fetchall()]

    def get_snapshot(self, snapshot_id: int) -> Snapshot:
        """The snapshot with ``snapshot_id``.

        Raises:
            RegistryError: there is none.
        """
        found = self._select_snapshots("WHERE id = %s", (snapshot_id,))
        if not found:
            raise RegistryError(f"no data snapshot with id {snapshot_id} in the registry")
        return found[0]

    def find_snapshot(self, sha256: str) -> Snapshot | None:
        """The snapshot of content ``sha256``, if one was recorded."""
        found = self._select_snapshots("WHERE sha256 = %s", (sha256,))
        return found[0] if found else None

    def list_snapshots(self, source_uri: str | None = None, *, last: int | None = None) -> list[Snapshot]:
        """Recorded snapshots, oldest first: every one, or the batches of ``source_uri`` (only the newest
        ``last`` of them when given)."""
        where, params = ("WHERE source_uri = %s", (source_uri,)) if source_uri is not None else ("", ())
        if last is not None:
            if last < 1:
                raise RegistryError(f"last={last}: the window must hold at least one batch")
            inner = f"SELECT id FROM data_snapshots {where} ORDER BY id DESC LIMIT %s"
            return self._select_snapshots(f"WHERE id IN ({inner}) ORDER BY id", (*params, last))
        return self._select_snapshots(f"{where} ORDER BY id", params)

    def set_snapshot_reports(self, snapshot_id: int, **reports: Any) -> None:
        """Attach reports to a snapshot: ``validation`` (the summary), ``validation_uri`` (the result JSON),
        ``docs_uri`` (the Data Docs page), ``quarantine_uri``, ``quarantined_rows``, ``drift`` (its summary),
        ``drift_uri``. Setting one again replaces it (a retried task writes the same values).

        Raises:
            RegistryError: an unknown report name, or no such snapshot.
        """
        unknown = sorted(set(reports) - set(_SNAPSHOT_REPORTS))
        if unknown:
            raise RegistryError(f"unknown snapshot report(s) {', '.join(unknown)}; known: {', '.join(_SNAPSHOT_REPORTS)}")
        if not reports:
            return
        names = sorted(reports)
        values = [None if reports[n] is None else _SNAPSHOT_REPORTS[n](reports[n]) for n in names]
        with self._transaction() as cur:
            cur.execute(
                f"UPDATE data_snapshots SET {', '.join(f'{n} = %s' for n in names)} WHERE id = %s RETURNING id",
                (*values, snapshot_id),
            )
            if cur.fetchone() is None:
                raise RegistryError(f"no data snapshot with id {snapshot_id} in the registry")
            self._insert_event(
                cur, "snapshot_reports", detail={"snapshot_id": snapshot_id, **{n: reports[n] for n in names if n.endswith("uri")}}
            )

    def mark_run_failed(self, dag_run_id: str, *, tasks: list[str], reason: str) -> list[int]:
        """Record that a DAG run failed, and mark the snapshots it recorded (``metadata.dag_run_id``) with the
        failure: their data passed validation and stay reusable, but nothing was trained from them by that run.

        Returns:
            The ids of the snapshots marked.
        """
        failure = {"dag_run_id": dag_run_id, "tasks": tasks, "reason": reason}
        with self._transaction() as cur:
            cur.execute(
                "UPDATE data_snapshots SET metadata = metadata || jsonb_build_object('failed_run', %s::jsonb)"
                " WHERE metadata->>'dag_run_id' = %s RETURNING id",
                (Json(failure), dag_run_id),
            )
            marked = sorted(row[0] for row in cur.fetchall())
            self._insert_event(cur, "run_failed", detail={**failure, "snapshots": marked})
        return marked

    def get_watermark(self, source_uri: str) -> tuple[str, str] | None:
        """The (column, value) watermark recorded for ``source_uri``: its rows up to value are ingested."""
        with self._transaction() as cur:
            cur.execute("SELECT column_name, value FROM source_watermarks WHERE source_uri = %s", (source_uri,))
            row = cur.fetchone()
        return (row[0], row[1]) if row else None

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
        self._set_location(model_name, version, "artifact_uri", uri, "artifact_set")

    def set_report(self, model_name: str, version: int, uri: str) -> None:
        """Record where the evaluation report of a version lives.

        Raises:
            VersionNotFound: no such version.
        """
        self._set_location(model_name, version, "report_uri", uri, "report_written")

    def _set_location(self, model_name: str, version: int, column: str, uri: str, event: str) -> None:
        with self._transaction() as cur:
            cur.execute(
                f"UPDATE model_versions SET {column} = %s WHERE model_name = %s AND version = %s",
                (uri, model_name, version),
            )
            if cur.rowcount == 0:
                raise VersionNotFound(f"{model_name} version {version} is not in the registry")
            self._insert_event(cur, event, model_name, version, {column: uri})

    def mark_serving(
        self,
        model_name: str,
        version: int,
        detail: dict[str, Any] | None = None,
        *,
        grace_seconds: float = 0.0,
    ) -> int | None:
        """Make ``version`` the stable one at once, without a canary phase; the stable version before it
        becomes retired (and ``previous``, kept loaded for ``grace_seconds``).

        The promotion protocol goes through :meth:`begin_canary` and :meth:`commit_canary`; this is the
        direct move, for a model's bootstrap and for tests. Marking the stable version again is a no-op.

        Returns:
            The version that was stable before (None if none, or if ``version`` already was).

        Raises:
            VersionNotFound: no such version.
            IllegalTransition: the version is rejected.
        """
        with self._transaction() as cur:
            current = self._lock_model(cur, model_name, version)
            target = self._lock_target(cur, model_name)
            if current == "serving" and target.stable == version:
                return None
            _check_transition(model_name, version, current, "serving")
            self._move_stable(cur, target, version, current, grace_seconds, detail)
        return target.stable

    def begin_canary(
        self,
        model_name: str,
        version: int,
        *,
        expected_stable: int | None,
        lease_seconds: float,
        detail: dict[str, Any] | None = None,
    ) -> ServingTarget:
        """Put ``version`` in the canary slot, if the stable version is still ``expected_stable``.

        A retry of the same promotion (the slot already holds ``version``) renews the lease. A slot held by
        another version past its lease is taken over (that promotion was abandoned).

        Returns:
            The new desired state.

        Raises:
            ChampionChanged: the stable version is not ``expected_stable`` (the promotion is superseded).
            CanaryBusy: another version holds the slot within its lease.
            IllegalTransition: ``version`` cannot be served (rejected, or never exported).
        """
        with self._transaction() as cur:
            status = self._lock_model(cur, model_name, version)
            self._check_servable(cur, model_name, version, status)
            target = self._lock_target(cur, model_name)
            if target.stable != expected_stable:
                raise ChampionChanged(
                    f"{model_name}: stable is v{target.stable}, not v{expected_stable} as when v{version} was gated",
                    target,
                )
            if target.canary not in (None, version):
                cur.execute("SELECT %s < now()", (target.canary_until,))
                if not cur.fetchone()[0]:
                    raise CanaryBusy(
                        f"{model_name}: v{target.canary} holds the canary slot until {target.canary_until:%H:%M:%S}",
                        target,
                    )
                self._insert_event(
                    cur, "canary_expired", model_name, target.canary,
                    {"lease_until": target.canary_until.isoformat(), "taken_over_by": version},
                )
            cur.execute(
                "UPDATE serving_targets SET canary = %s, canary_until = now() + make_interval(secs => %s),"
                " generation = generation + 1, updated_at = now() WHERE model_name = %s",
                (version, lease_seconds, model_name),
            )
            new = self._lock_target(cur, model_name)
            self._insert_event(
                cur, "canary", model_name, version,
                {"stable": target.stable, "lease_until": new.canary_until.isoformat(), "generation": new.generation,
                 **(detail or {})},
            )
            self._notify(cur, model_name)
        return new

    def commit_canary(
        self,
        model_name: str,
        version: int,
        *,
        expected_stable: int | None,
        grace_seconds: float,
        detail: dict[str, Any] | None = None,
    ) -> ServingTarget:
        """Make the canary ``version`` stable, if it still holds the slot and stable is ``expected_stable``.

        In one transaction: stable := ``version``, previous := the old stable (loaded until the grace ends),
        the canary slot is freed, ``version`` becomes serving and the old stable retired, with their events.

        Raises:
            ChampionChanged: the stable version changed since the canary phase began.
            CanaryBusy: ``version`` no longer holds the canary slot (its lease expired and it was taken).
        """
        with self._transaction() as cur:
            status = self._lock_model(cur, model_name, version)
            target = self._lock_target(cur, model_name)
            if target.stable != expected_stable:
                raise ChampionChanged(
                    f"{model_name}: stable is v{target.stable}, not v{expected_stable} as when v{version} was gated",
                    target,
                )
            if target.canary != version:
                raise CanaryBusy(f"{model_name}: v{version} no longer holds the canary slot", target)
            _check_transition(model_name, version, status, "serving")
            new = self._move_stable(cur, target, version, status, grace_seconds, detail)
        return new

    def abort_canary(self, model_name: str, version: int, reason: str, detail: dict[str, Any] | None = None) -> bool:
        """Free the canary slot if ``version`` holds it, recording why; False when it did not hold it."""
        with self._transaction() as cur:
            cur.execute("SELECT 1 FROM model_counters WHERE model_name = %s FOR UPDATE", (model_name,))
            target = self._lock_target(cur, model_name)
            if target.canary != version:
                return False
            self._clear_canary(cur, target, "canary_aborted", {"reason": reason, **(detail or {})})
        return True

    def expire_canaries(self) -> list[tuple[str, int]]:
        """Free every canary slot whose lease has run out (its promotion died or stalled), with an event each.

        Returns:
            The (model, version) pairs freed.
        """
        with self._transaction() as cur:
            cur.execute("SELECT model_name FROM serving_targets WHERE canary_until < now() ORDER BY model_name")
            names = [row[0] for row in cur.fetchall()]
            freed = []
            for name in names:
                cur.execute("SELECT 1 FROM model_counters WHERE model_name = %s FOR UPDATE", (name,))
                target = self._lock_target(cur, name)
                cur.execute("SELECT %s < now()", (target.canary_until,))
                if target.canary is not None and cur.fetchone()[0]:
                    self._clear_canary(
                        cur, target, "canary_expired",
                        {"lease_until": target.canary_until.isoformat(), "reason": "its promotion did not finish"},
                    )
                    freed.append((name, target.canary))
        return freed

    def revert_stable(self, model_name: str, version: int, *, to: int | None, reason: str) -> bool:
        """Move stable back from ``version`` to ``to`` after ``version`` failed on the nodes.

        ``version`` becomes retired and ``to`` serving again (with ``to`` None, the model's first promotion
        is undone: nothing is stable). Returns False (and changes nothing) when ``version`` is no longer
        the stable one.
        """
        with self._transaction() as cur:
            if to is None:
                self._lock_model(cur, model_name, version)
            else:
                status = self._lock_model(cur, model_name, to)
            target = self._lock_target(cur, model_name)
            if target.stable != version:
                return False
            detail = {"reverted_from": version, "reason": reason}
            if to is not None:
                _check_transition(model_name, to, status, "serving")
                self._move_stable(cur, target, to, status, 0.0, detail)
                return True
            cur.execute(
                "UPDATE serving_targets SET stable = NULL, previous = NULL, previous_until = NULL,"
                " generation = generation + 1, updated_at = now() WHERE model_name = %s",
                (model_name,),
            )
            cur.execute(
                "UPDATE model_versions SET status = 'retired' WHERE model_name = %s AND version = %s",
                (model_name, version),
            )
            self._insert_event(cur, "retired", model_name, version, {"from": "serving", **detail})
            self._notify(cur, model_name)
        return True

    def mark_superseded(self, model_name: str, version: int, detail: dict[str, Any] | None = None) -> None:
        """Record that a candidate's champion changed before it could be promoted (no-op if already so)."""
        self.set_status(model_name, version, "superseded", detail)

    def set_pinned(self, model_name: str, version: int, pinned: bool) -> None:
        """Pin a version (never pruned from serving volumes) or unpin it."""
        with self._transaction() as cur:
            self._lock_model(cur, model_name, version)
            cur.execute(
                "UPDATE model_versions SET pinned = %s WHERE model_name = %s AND version = %s",
                (pinned, model_name, version),
            )
            self._insert_event(cur, "pinned" if pinned else "unpinned", model_name, version)

    def prune_version(self, model_name: str, version: int, detail: dict[str, Any] | None = None) -> str | None:
        """Before housekeeping deletes a version's exported model and report: check, under the model's lock,
        that nothing may serve it, and forget where they are, so that no promotion or rollback can pick it
        from then on (a version without an artifact cannot become canary or stable).

        Returns:
            None when its files may be deleted (a ``pruned`` event is recorded, once); otherwise why not:
            it is the stable, canary or previous version, serving, or pinned.

        Raises:
            VersionNotFound: no such version.
        """
        with self._transaction() as cur:
            # The counter row's lock serialises every change of the model's serving state (see _lock_model).
            status = self._lock_model(cur, model_name, version)
            cur.execute(
                "SELECT stable, canary, previous FROM serving_targets WHERE model_name = %s FOR UPDATE", (model_name,)
            )
            held = cur.fetchone() or (None, None, None)
            cur.execute(
                "SELECT pinned, artifact_uri, report_uri FROM model_versions WHERE model_name = %s AND version = %s",
                (model_name, version),
            )
            pinned, artifact_uri, report_uri = cur.fetchone()
            if pinned:
                return "pinned"
            for role, holder in zip(("stable", "canary", "previous"), held):
                if holder == version:
                    return f"the {role} version"
            if status == "serving":
                return "serving"
            if artifact_uri is None and report_uri is None:
                return None
            cur.execute(
                "UPDATE model_versions SET artifact_uri = NULL, report_uri = NULL WHERE model_name = %s AND version = %s",
                (model_name, version),
            )
            self._insert_event(
                cur, "pruned", model_name, version,
                {"artifact_uri": artifact_uri, "report_uri": report_uri, **(detail or {})},
            )
        return None

    def serving_target(self, model_name: str) -> ServingTarget | None:
        """The desired serving state of ``model_name``, or None before anything was put in front of users."""
        targets = self._select_targets("WHERE model_name = %s", (model_name,))
        return targets[0] if targets else None

    def serving_targets(self) -> list[ServingTarget]:
        """The desired serving state of every model, by name."""
        return self._select_targets("", ())

    def _select_targets(self, where: str, params: tuple[Any, ...]) -> list[ServingTarget]:
        with self._transaction() as cur:
            cur.execute(
                "SELECT model_name, stable, canary, canary_until, previous, previous_until, generation, updated_at"
                f" FROM serving_targets {where} ORDER BY model_name",
                params,
            )
            return [ServingTarget(*row) for row in cur.fetchall()]

    def report_node(self, node_id: str, *, grpc_target: str, rest_url: str | None, report: dict[str, Any]) -> None:
        """Record what a serving node's agent observed (registering the node on its first report)."""
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO serving_nodes (node_id, grpc_target, rest_url, last_seen, report)"
                " VALUES (%s, %s, %s, now(), %s) ON CONFLICT (node_id) DO UPDATE SET grpc_target = EXCLUDED.grpc_target,"
                " rest_url = EXCLUDED.rest_url, last_seen = now(), report = EXCLUDED.report",
                (node_id, grpc_target, rest_url, Json(report)),
            )

    def forget_node(self, node_id: str) -> bool:
        """Remove a serving node that was stopped on purpose, so promotions stop waiting for it (a node that
        just dies still counts until its last report is older than the rollout's node TTL). False when
        the registry did not know it. A node that reports again is registered again."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM serving_nodes WHERE node_id = %s", (node_id,))
            return cur.rowcount > 0

    def serving_nodes(self, *, seen_within: float | None = None) -> list[ServingNode]:
        """The known serving nodes, optionally only those that reported within ``seen_within`` seconds."""
        clause, params = ("WHERE last_seen > now() - make_interval(secs => %s)", (seen_within,)) if seen_within else ("", ())
        with self._transaction() as cur:
            cur.execute(
                f"SELECT node_id, grpc_target, rest_url, last_seen, report FROM serving_nodes {clause} ORDER BY node_id",
                params,
            )
            return [ServingNode(*row) for row in cur.fetchall()]

    def _lock_target(self, cur: psycopg2.extensions.cursor, model_name: str) -> ServingTarget:
        """The model's desired state, locked for update (created empty on first use)."""
        cur.execute("INSERT INTO serving_targets (model_name) VALUES (%s) ON CONFLICT DO NOTHING", (model_name,))
        cur.execute(
            "SELECT model_name, stable, canary, canary_until, previous, previous_until, generation, updated_at"
            " FROM serving_targets WHERE model_name = %s FOR UPDATE",
            (model_name,),
        )
        return ServingTarget(*cur.fetchone())

    def _check_servable(self, cur: psycopg2.extensions.cursor, model_name: str, version: int, status: str) -> None:
        if status not in SERVABLE_STATUSES:
            raise IllegalTransition(f"{model_name} v{version} is {status}; only a version that passed the gate can be served")
        cur.execute(
            "SELECT artifact_uri FROM model_versions WHERE model_name = %s AND version = %s", (model_name, version)
        )
        if cur.fetchone()[0] is None:
            raise IllegalTransition(f"{model_name} v{version} has no exported artifact; export it first")

    def _move_stable(
        self,
        cur: psycopg2.extensions.cursor,
        target: ServingTarget,
        version: int,
        status: str,
        grace_seconds: float,
        detail: dict[str, Any] | None,
    ) -> ServingTarget:
        """stable := ``version`` with the statuses and events that go with it (the caller holds the locks)."""
        name, old = target.model_name, target.stable
        cur.execute(
            "UPDATE serving_targets SET stable = %s, canary = NULL, canary_until = NULL, previous = %s,"
            " previous_until = CASE WHEN %s::integer IS NULL THEN NULL ELSE now() + make_interval(secs => %s) END,"
            " generation = generation + 1, updated_at = now() WHERE model_name = %s",
            (version, old, old, grace_seconds, name),
        )
        cur.execute(
            "UPDATE model_versions SET status = 'retired' WHERE model_name = %s AND status = 'serving' RETURNING version",
            (name,),
        )
        for (retired,) in cur.fetchall():
            self._insert_event(cur, "retired", name, retired, {"from": "serving", "replaced_by": version})
        cur.execute("UPDATE model_versions SET status = 'serving' WHERE model_name = %s AND version = %s", (name, version))
        new = self._lock_target(cur, name)
        self._insert_event(
            cur, "serving", name, version,
            {"from": status, "replaces": old, "generation": new.generation, **(detail or {})},
        )
        self._notify(cur, name)
        return new

    def _clear_canary(self, cur: psycopg2.extensions.cursor, target: ServingTarget, kind: str, detail: dict[str, Any]) -> None:
        cur.execute(
            "UPDATE serving_targets SET canary = NULL, canary_until = NULL, generation = generation + 1,"
            " updated_at = now() WHERE model_name = %s",
            (target.model_name,),
        )
        self._insert_event(
            cur, kind, target.model_name, target.canary, {"stable": target.stable, "generation": target.generation + 1, **detail}
        )
        self._notify(cur, target.model_name)

    @staticmethod
    def _notify(cur: psycopg2.extensions.cursor, model_name: str) -> None:
        # Delivered at commit: the agents of the serving nodes wake up and reconcile.
        cur.execute("SELECT pg_notify(%s, %s)", (SERVING_CHANNEL, model_name))

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
            if current == "serving":
                raise IllegalTransition(
                    f"{model_name} v{version} is the stable version; make another version stable instead "
                    "(maas rollback --to VERSION), which retires it"
                )
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
                f" updated_at, pinned, report_uri FROM model_versions {where} ORDER BY model_name, version",
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
