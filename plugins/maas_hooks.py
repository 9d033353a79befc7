"""Airflow Connections for the object store and the registry, turned into the settings the DAG tasks run with.

A deployment configures where the tasks keep their artifacts and their registry the way Airflow
deployments configure every external system: as Connections (``AIRFLOW_CONN_*`` variables, a secrets
backend, or the UI), whose passwords Airflow keeps out of task logs. The local stack defines none and
keeps using the ``MAAS_*`` settings, so the tasks read both through one function, :func:`task_settings`:

- ``maas_store`` (conn_type ``aws``): login = access key, password = secret key, extra
  ``{"endpoint_url": "http://minio:9000", "bucket": "maas", "prefix": "", "region_name": "us-east-1"}``;
  it replaces ``MAAS_STORE_URL`` (``s3://bucket[/prefix]``) and the ``MAAS_S3_*`` settings.
- ``maas_registry`` (conn_type ``postgres``): host, port, login, password, schema = database, and
  libpq options (``sslmode``, ...) in extra; it replaces ``MAAS_REGISTRY_DSN``.

The library (``maas_tasks``) never reads Airflow's Connections: the tasks hand it the resulting
``Settings``. Every secret of those settings is registered with Airflow's secrets masker, including the
forms Airflow would not recognise (the registry DSN with its quoted password), so a task log shows
``***`` instead. Nothing here runs at DAG parse time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from airflow.sdk import BaseHook

STORE_CONN_ID = "maas_store"
REGISTRY_CONN_ID = "maas_registry"
# libpq connection options a maas_registry connection may carry in its extra (the rest are refused).
_LIBPQ_OPTIONS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name", "options",
    "target_session_attrs", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
})


class ConnectionSettingsError(ValueError):
    """A maas_store or maas_registry connection is defined but cannot be used; the message says how to fix it."""


def _connection(conn_id: str) -> Any | None:
    """The connection ``conn_id``, or None when no secrets backend defines it."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


class MaasStoreHook(BaseHook):
    """The object store of a deployment, from an ``aws`` connection to S3 or MinIO."""

    conn_name_attr = "maas_store_conn_id"
    default_conn_name = STORE_CONN_ID
    conn_type = "aws"
    hook_name = "MaaS object store (S3/MinIO)"

    def __init__(self, maas_store_conn_id: str = STORE_CONN_ID) -> None:
        super().__init__()
        self.conn_id = maas_store_conn_id

    def settings_overrides(self) -> dict[str, Any]:
        """The store settings the connection gives; {} when it is not defined.

        Raises:
            ConnectionSettingsError: it has no bucket, or a secret key without an access key (or the reverse).
        """
        conn = _connection(self.conn_id)
        if conn is None:
            return {}
        return store_overrides(conn.login, conn.password, conn.extra_dejson, self.conn_id)


class MaasRegistryHook(BaseHook):
    """The model registry of a deployment, from a ``postgres`` connection."""

    conn_name_attr = "maas_registry_conn_id"
    default_conn_name = REGISTRY_CONN_ID
    conn_type = "postgres"
    hook_name = "MaaS model registry (PostgreSQL)"

    def __init__(self, maas_registry_conn_id: str = REGISTRY_CONN_ID) -> None:
        super().__init__()
        self.conn_id = maas_registry_conn_id

    def settings_overrides(self) -> dict[str, Any]:
        """``{"registry_dsn": ...}`` from the connection; {} when it is not defined.

        Raises:
            ConnectionSettingsError: it names no host or database, or carries an unknown option in extra.
        """
        conn = _connection(self.conn_id)
        if conn is None:
            return {}
        return registry_overrides(
            conn.host, conn.port, conn.login, conn.password, conn.schema, conn.extra_dejson, self.conn_id
        )


def store_overrides(
    login: str | None, password: str | None, extra: dict[str, Any], conn_id: str = STORE_CONN_ID
) -> dict[str, Any]:
    """Settings fields for the store an ``aws`` connection describes (see the module docstring)."""
    bucket = str(extra.get("bucket") or "").strip().strip("/")
    if not bucket:
        raise ConnectionSettingsError(
            f'connection {conn_id} names no bucket: add "bucket" to its extra, e.g. {{"bucket": "maas", '
            '"endpoint_url": "http://minio:9000"}'
        )
    if bool(login) != bool(password):
        raise ConnectionSettingsError(
            f"connection {conn_id} has {'an access key (login)' if login else 'a secret key (password)'} but "
            f"no {'secret key (password)' if login else 'access key (login)'}: give both, or neither for "
            "credentials from the environment"
        )
    prefix = str(extra.get("prefix") or "").strip("/")
    overrides: dict[str, Any] = {
        "store_url": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
        "s3_endpoint": str(extra.get("endpoint_url") or "").strip() or None,
        "s3_access_key": login or None,
        "s3_secret_key": password or None,
    }
    if extra.get("region_name"):
        overrides["s3_region"] = str(extra["region_name"])
    return overrides


def registry_overrides(
    host: str | None, port: int | None, login: str | None, password: str | None, database: str | None,
    extra: dict[str, Any], conn_id: str = REGISTRY_CONN_ID,
) -> dict[str, Any]:
    """``{"registry_dsn": ...}`` for the database a ``postgres`` connection describes."""
    from maas_tasks.postgres import format_dsn

    if not host or not database:
        raise ConnectionSettingsError(
            f"connection {conn_id} needs a host and a database (its schema field), e.g. "
            "postgres://maas:PASSWORD@postgres:5432/maas"
        )
    unknown = sorted(set(extra) - _LIBPQ_OPTIONS)
    if unknown:
        raise ConnectionSettingsError(
            f"connection {conn_id} has extra {', '.join(unknown)}, which libpq does not take; "
            f"known: {', '.join(sorted(_LIBPQ_OPTIONS))}"
        )
    params: dict[str, Any] = {"host": host, "port": port or 5432, "dbname": database}
    if login:
        params["user"] = login
    if password:
        params["password"] = password
    params.update({key: str(value) for key, value in extra.items()})
    return {"registry_dsn": format_dsn(**params)}


def task_settings(env: dict[str, str] | None = None) -> Any:
    """The settings a DAG task runs with: the ``MAAS_*`` settings, overridden by the ``maas_store`` and
    ``maas_registry`` connections where they are defined. Call it inside a task, never at parse time.

    Args:
        env: the ``MAAS_*`` variables (default: the process environment).

    Returns:
        A ``maas_tasks.config.Settings``; its secrets are masked in this task's log.

    Raises:
        ConnectionSettingsError: a connection is defined but incomplete (a ValueError: the task fails at once).
    """
    from maas_tasks.config import load_settings

    settings = load_settings(env)
    settings = replace(settings, **MaasStoreHook().settings_overrides(), **MaasRegistryHook().settings_overrides())
    mask_settings_secrets(settings)
    return settings


def task_store() -> tuple[Any, Any]:
    """The settings (:func:`task_settings`) and object store a DAG task works with."""
    from maas_tasks.storage import open_store

    settings = task_settings()
    return settings, open_store(settings=settings)


def task_registry(settings: Any) -> Any:
    """A registry connection for a DAG task, to use in a ``with`` block (closed at its end)."""
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry

    return Registry.connect(registry_dsn(settings))


@contextmanager
def fail_fast() -> Iterator[None]:
    """In a DAG task: failures a retry cannot fix fail the task at once, with the stage's message; passing
    faults (a store, registry or model server out of reach) keep Airflow's retries.

    Permanent are: bad data, parameters or settings (a stage's ValueError, ConnectionSettingsError
    included), a model that cannot serve (PermanentError), and a version the registry does not have.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from maas_tasks.errors import PermanentError
    from maas_tasks.registry import VersionNotFound

    try:
        yield
    except (ValueError, PermanentError, VersionNotFound) as exc:
        raise AirflowFailException(str(exc)) from exc


def mask_settings_secrets(settings: Any) -> None:
    """Register the secrets of ``settings`` with Airflow's secrets masker (task logs show ``***``)."""
    from airflow.sdk.log import mask_secret

    from maas_tasks.postgres import registry_dsn

    if settings.s3_secret_key:
        mask_secret(settings.s3_secret_key)
    dsn = settings.registry_dsn
    if dsn is None:
        try:
            dsn = registry_dsn(settings)  # the local cluster's, with its generated password
        except Exception:  # noqa: BLE001 - no local cluster here: nothing of it to mask
            dsn = None
    if dsn:
        mask_secret(dsn)
        for part in _dsn_passwords(dsn):
            mask_secret(part)


def _dsn_passwords(dsn: str) -> list[str]:
    """The password(s) a libpq DSN or URL holds, as written and unquoted."""
    from psycopg2.extensions import parse_dsn

    try:
        password = parse_dsn(dsn).get("password")
    except Exception:  # noqa: BLE001 - a DSN libpq cannot parse holds nothing we could unmask
        return []
    return [password] if password else []
