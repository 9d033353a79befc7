"""Connections to settings: maas_store and maas_registry override the MAAS_* settings only where defined, a
defined but incomplete one is refused with its fix, and their secrets never reach a task log."""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

import maas_hooks
from maas_tasks.config import load_settings

STORE_SECRET = "store-secret-" + uuid.uuid4().hex
REGISTRY_PASSWORD = "pw with 'quote' " + uuid.uuid4().hex


def store_conn(**extra) -> str:
    return json.dumps({
        "conn_type": "aws", "login": "access-key", "password": STORE_SECRET,
        "extra": {"endpoint_url": "http://minio:9000", "bucket": "maas", "region_name": "eu-west-1", **extra},
    })


def registry_conn(**fields) -> str:
    return json.dumps({
        "conn_type": "postgres", "host": "postgres", "port": 5433, "login": "maas", "password": REGISTRY_PASSWORD,
        "schema": "registry", **fields,
    })


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAAS_STORE", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MAAS_REGISTRY", raising=False)
    return {"MAAS_HOME": str(tmp_path), "MAAS_S3_SECRET_KEY": "env-secret", "MAAS_REGISTRY_DSN": "host=h dbname=d"}


def test_without_connections_the_maas_settings_are_used_unchanged(env):
    assert maas_hooks.task_settings(env) == load_settings(env)


def test_a_store_connection_replaces_the_store_settings(env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MAAS_STORE", store_conn(prefix="/team/a/"))
    settings = maas_hooks.task_settings(env)
    assert settings.store_url == "s3://maas/team/a"
    assert (settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, settings.s3_region) == (
        "http://minio:9000", "access-key", STORE_SECRET, "eu-west-1")
    assert settings.registry_dsn == env["MAAS_REGISTRY_DSN"]  # no registry connection: MAAS_REGISTRY_DSN stays
    monkeypatch.setenv("AIRFLOW_CONN_MAAS_STORE", store_conn(prefix=""))
    assert maas_hooks.task_settings(env).store_url == "s3://maas"


def test_a_registry_connection_becomes_a_dsn_whose_password_survives_quoting(env, monkeypatch):
    from psycopg2.extensions import parse_dsn

    monkeypatch.setenv("AIRFLOW_CONN_MAAS_REGISTRY", registry_conn(extra={"sslmode": "require"}))
    settings = maas_hooks.task_settings(env)
    assert parse_dsn(settings.registry_dsn) == {
        "host": "postgres", "port": "5433", "dbname": "registry", "user": "maas", "password": REGISTRY_PASSWORD,
        "sslmode": "require",
    }
    assert settings.store_url == load_settings(env).store_url  # no store connection: the MAAS_* store stays
    assert REGISTRY_PASSWORD not in repr(settings) and "env-secret" not in repr(settings)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("AIRFLOW_CONN_MAAS_STORE", store_conn(bucket=""), "names no bucket: add \"bucket\" to its extra"),
        ("AIRFLOW_CONN_MAAS_STORE", json.dumps({"conn_type": "aws", "login": "k", "extra": {"bucket": "b"}}),
         "has an access key \\(login\\) but no secret key"),
        ("AIRFLOW_CONN_MAAS_REGISTRY", registry_conn(schema=None), "needs a host and a database"),
        ("AIRFLOW_CONN_MAAS_REGISTRY", registry_conn(extra={"sslmod": "require"}), "has extra sslmod, which libpq"),
    ],
)
def test_an_incomplete_connection_is_refused_with_its_fix(env, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(maas_hooks.ConnectionSettingsError, match=message):
        maas_hooks.task_settings(env)


@pytest.mark.integration
def test_the_store_connection_reaches_the_s3_server(env, monkeypatch, s3_endpoint):
    from maas_tasks.storage import open_store

    bucket = f"maas-conn-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AIRFLOW_CONN_MAAS_STORE", store_conn(endpoint_url=s3_endpoint, bucket=bucket, prefix="p"))
    store = open_store(settings=maas_hooks.task_settings(env))
    store.ensure_bucket()
    store.put_bytes("hello.txt", b"hi")
    assert store.get_bytes("hello.txt") == b"hi"
    assert store.url == f"s3://{bucket}/p"


def test_connection_secrets_are_masked_in_the_task_log(env, monkeypatch, tmp_path):
    # The path `maas run` and the scheduler's tasks log through: Airflow's processors, its secrets masker.
    from airflow.configuration import conf
    from airflow.sdk.listener import get_listener_manager

    from maas_runs import route_run_logs

    monkeypatch.setenv("AIRFLOW_CONN_MAAS_STORE", store_conn())
    monkeypatch.setenv("AIRFLOW_CONN_MAAS_REGISTRY", registry_conn())
    ti = SimpleNamespace(dag_id="maas_hooks_test", run_id=f"manual__{uuid.uuid4().hex}", task_id="t", map_index=-1,
                         try_number=1, state="success")
    stage = logging.getLogger("maas_tasks.storage")
    with route_run_logs(tmp_path / "run.log"):
        get_listener_manager().hook.on_task_instance_running(previous_state=None, task_instance=ti)
        settings = maas_hooks.task_settings(env)
        stage.warning("connecting with %s and %s", settings.s3_secret_key, settings.registry_dsn)
        stage.warning("password alone: %s", REGISTRY_PASSWORD)
        get_listener_manager().hook.on_task_instance_success(previous_state=None, task_instance=ti)
    task_log = (Path(conf.get("logging", "base_log_folder")) / f"dag_id={ti.dag_id}" / f"run_id={ti.run_id}"
                / "task_id=t" / "attempt=1.log").read_text()
    assert "connecting with ***" in task_log and "password alone: ***" in task_log
    for secret in (STORE_SECRET, REGISTRY_PASSWORD, "env-secret"):
        assert secret not in task_log and secret not in (tmp_path / "run.log").read_text()


def test_failures_a_retry_cannot_fix_fail_a_task_at_once_and_others_are_retried():
    from airflow.sdk.exceptions import AirflowFailException

    from maas_tasks.promote import PromotionError
    from maas_tasks.registry import VersionNotFound
    from serving.rollout import PermanentRolloutError, RolloutError

    for permanent in (ValueError("column 'text' is missing"), PromotionError("v3 is rejected"),
                      PermanentRolloutError("v4 failed its golden requests"), VersionNotFound("sentiment v9")):
        with pytest.raises(AirflowFailException, match=re.escape(str(permanent))):
            with maas_hooks.fail_fast():
                raise permanent
    for passing in (ConnectionError("registry unreachable"), RolloutError("node local did not answer in time")):
        with pytest.raises(type(passing)):  # a passing fault keeps Airflow's retries
            with maas_hooks.fail_fast():
                raise passing
