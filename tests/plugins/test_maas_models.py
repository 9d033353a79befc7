"""The Models page's app against a real registry, store and Airflow metadata database, with Airflow's own
authentication: tokens from the auth manager the API server uses (the simple one), checked by the REST API's
code. The page lists every version with its labels, metrics, gate reasons, data and links; reports stream
from the store; *Roll back to this* creates a ``maas_rollback`` run as the user; nothing answers without a
login."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import maas_models
from tests.dags.in_process import airflow_db  # noqa: F401 - the session's Airflow metadata database
from tests.fixtures.model_versions import publish_version, record_snapshot

DAGS = Path(__file__).resolve().parents[2] / "dags"
MODEL = "sentiment"


@pytest.fixture(scope="module")
def registry_state(pg_cluster, tmp_path_factory):
    """sentiment v1 (retired, previous), v2 (stable), v3 (rejected by the gate), v4 (passed, never exported),
    with a snapshot, its Data Docs and drift report, reports, and a node's report; returns the settings."""
    from maas_tasks import postgres
    from maas_tasks.config import load_settings
    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store

    root = tmp_path_factory.mktemp("models-page")
    name = f"models_{uuid.uuid4().hex[:8]}"
    postgres.ensure_database(pg_cluster, name)
    settings = load_settings({"MAAS_HOME": str(root), "MAAS_REGISTRY_DSN": pg_cluster.dsn(name),
                              "MAAS_STORE_URL": f"file://{root / 'store'}"})
    store = open_store(settings=settings)
    with Registry.connect(settings.registry_dsn) as registry:
        snapshot = record_snapshot(registry, store, rows=400, source="data/<b>reviews</b>.csv", drift_flagged=True)
        for n, accuracy in ((1, 0.85), (2, 0.87)):
            version = publish_version(registry, store, MODEL, accuracy=accuracy, snapshot_id=snapshot,
                                      dag_run_id=f"manual__2026-12-0{n}T10:00:00+00:00", saved_model=None, seed=n)
            registry.set_artifact(MODEL, version, store.uri(f"models/{MODEL}/{version}"))
            registry.mark_serving(MODEL, version, grace_seconds=3600)
        publish_version(registry, store, MODEL, accuracy=0.55, snapshot_id=snapshot, dag_run_id="manual__3",
                        saved_model=None, seed=3)
        publish_version(registry, store, MODEL, accuracy=0.88, snapshot_id=snapshot, dag_run_id="manual__4",
                        saved_model=None, seed=4)
        target = registry.serving_target(MODEL)
        registry.report_node("local", grpc_target="127.0.0.1:1", rest_url=None, report={
            "models": {MODEL: {"generation": target.generation, "stable": {"version": 2, "state": "AVAILABLE"},
                               "previous": {"version": 1, "state": "AVAILABLE"}}},
        })
    return settings


@pytest.fixture(scope="module")
def rollback_dag_in_db(airflow_db):  # noqa: F811 - the fixture imported above
    """maas_rollback serialized into Airflow's metadata database, as the DAG processor leaves it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=str(DAGS / "maas_rollback.py"), bundle_path=DAGS, bundle_name="dags-folder")
    assert bag.import_errors == {}
    sync_bag_to_db(bag, "dags-folder", None)


@pytest.fixture(scope="module")
def tokens(airflow_db):  # noqa: F811
    """JWTs of an admin and a viewer, signed by the simple auth manager (what its login issues)."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = create_auth_manager()
    return {role: manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role)) for role in ("admin", "viewer")}


@pytest.fixture
def client(registry_state, rollback_dag_in_db, tokens):
    """The app mounted where the API server mounts it; ``client(role)`` sends that user's ``_token`` cookie."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    root = FastAPI()
    root.mount(maas_models.URL_PREFIX, maas_models.app)
    maas_models.app.dependency_overrides[maas_models.maas_settings] = lambda: registry_state
    clients = []

    def make(role: str | None = "admin") -> TestClient:
        made = TestClient(root, base_url="http://airflow.test", follow_redirects=False)
        if role:
            made.cookies.set("_token", tokens[role])
        clients.append(made)
        return made

    yield make
    maas_models.app.dependency_overrides.clear()
    for made in clients:
        made.close()


def rows(html: str) -> dict[int, str]:
    """The table row of each version, by version number, in page order."""
    return {int(n): row for n, row in re.findall(r'<tr data-version="(\d+)">(.*?)</tr>', html, re.S)}


def rollback_runs() -> list:
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == "maas_rollback").order_by(DagRun.id)).all()
        session.expunge_all()
        return runs


def test_the_plugin_adds_the_app_and_a_models_entry_to_the_navigation():
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    (entry,) = [a for a in apps if a["name"] == "MaaS models"]  # Airflow imports the file as a module of its own
    assert entry["url_prefix"] == "/maas-models" and entry["app"].title == "MaaS models"
    views, _ = plugins_manager._get_ui_plugins()
    view = next(v for v in views if v["name"] == "Models")
    assert view["destination"] == "nav" and view["nav_top_level"] is True and view["url_route"] == "models"
    assert view["href"] == "maas-models/"  # relative to the UI's base URL


def test_importing_the_plugin_is_cheap(tmp_path):
    """Every Airflow process loads plugins: the registry, the store, the API's internals wait for a request."""
    import json
    import os
    import subprocess
    import sys

    heavy = ["tensorflow", "pandas", "psycopg2", "maas_tasks.registry", "maas_tasks.storage", "maas_tasks.cli",
             "airflow.api_fastapi.core_api.security"]
    script = f"import json, sys, maas_models; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "PYTHONPATH": str(Path(maas_models.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_nothing_answers_without_a_login(client):
    before = len(rollback_runs())
    anonymous = client(None)
    for method, path in (("GET", "/maas-models/"), ("GET", "/maas-models/store/reports/sentiment/1/index.html"),
                         ("POST", "/maas-models/rollback")):
        response = anonymous.request(method, path, data={"model_name": MODEL, "version": "1"})
        assert response.status_code == 401, (method, path)
        assert response.json() == {"detail": "Not authenticated"}
    page = anonymous.get("/maas-models/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and "not logged in to Airflow" in page.text and "sentiment" not in page.text
    forged = client(None)
    forged.cookies.set("_token", "not.a.jwt")
    assert forged.get("/maas-models/").status_code == 403
    assert anonymous.get("/maas-models/", headers={"Authorization": "Bearer not.a.jwt"}).status_code == 403
    assert len(rollback_runs()) == before


def test_the_page_lists_every_version_newest_first_with_labels_gate_data_and_links(client):
    page = client().get("/maas-models/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    by_version = rows(html)
    assert list(by_version) == [4, 3, 2, 1]
    assert "Desired: stable <b>v2</b>" in html and "previous v1" in html
    assert "Node <b>local</b> serves v2 (AVAILABLE)" in html and "agrees" in html

    v1, v2, v3, v4 = by_version[1], by_version[2], by_version[3], by_version[4]
    assert "status-serving" in v2 and '<span class="badge label">stable</span>' in v2 and "local: AVAILABLE as stable" in v2
    assert "status-retired" in v1 and '<span class="badge label">previous</span>' in v1
    assert "accuracy 0.8667" in v2 and "on 120 held-out rows" in v2
    # The gate: verdict, champion, every check; a rejected version shows why without a click.
    assert "passed" in v2 and "against champion v1" in v2 and "accuracy vs champion v1: 0.8667 vs 0.8500" in v2
    assert "rejected" in v3 and "accuracy 0.5500 is below the minimum 0.7000 on 120 eval rows" in v3
    assert "no champion" in v1
    # Data: the snapshot, escaped, with its Data Docs and drift report through the app's store endpoint.
    assert "snapshot #1 · 400 rows" in v2 and "data/&lt;b&gt;reviews&lt;/b&gt;.csv" in v2 and "<b>reviews" not in html
    docs = re.search(r'href="(store/validation/[0-9a-f]{64}/docs/[^"]+)">Data Docs', v2).group(1)
    drift = re.search(r'href="(store/drift/[0-9a-f]+/report.html)" title="label shares moved beyond the threshold">drift</a> '
                      r'<span class="fail">flagged', v2).group(1)
    report = re.search(r'href="(store/reports/sentiment/2/index.html)">evaluation report', v2).group(1)
    # When, and by which run (a link into the Airflow UI, relative to the page).
    assert '2026-12-' in v2 and 'href="../dags/maas_training/runs/manual__2026-12-02T10%3A00%3A00%2B00%3A00"' in v2
    assert "history" in v2 and "serving; from candidate" in v2
    # The action where it can serve; why not elsewhere.
    assert "Roll back to this" in v1 and 'name="version" value="1"' in v1
    assert "Roll back to this" not in v2 and "serving now" in v2
    assert "Roll back to this" not in v3 and "rejected by the gate: never exported" in v3
    assert "Roll back to this" not in v4 and "never exported" in v4

    for link, expected in ((docs, "Data Docs of"), (drift, "label shares moved"), (report, "sentiment v2")):
        served = client().get(f"/maas-models/{link}")
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/html"), link
        assert expected in served.text
    assert client().get("/maas-models/?model=other").text.count("<tr data-version") == 0


def test_the_store_endpoint_serves_reports_only(client, registry_state):
    from maas_tasks.storage import open_store

    assert open_store(settings=registry_state).exists(f"snapshots/{'0' * 64}/data.parquet") is False
    admin = client()
    for key in ("snapshots/abc/data.parquet", "validation/%s/result.json" % ("a" * 64), "models/sentiment/1/saved_model.pb",
                "reports/sentiment/1/%2e%2e/%2e%2e/%2e%2e/snapshots/x", "reports/sentiment/9/index.html"):
        assert admin.get(f"/maas-models/store/{key}").status_code == 404, key
    plot = next(k for k in open_store(settings=registry_state).list_keys("reports/sentiment/1/") if k.endswith(".png"))
    png = admin.get(f"/maas-models/store/{plot}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"


def test_roll_back_to_this_triggers_maas_rollback_as_the_user_and_the_page_follows_the_run(client):
    admin = client()
    response = admin.post("/maas-models/rollback", data={"model_name": MODEL, "version": "1"},
                          headers={"Referer": "http://airflow.test/maas-models/"})
    assert response.status_code == 303
    location = urlparse(response.headers["location"])
    query = parse_qs(location.query)
    assert location.path == "./" and query["model"] == [MODEL]
    run = rollback_runs()[-1]
    assert query["triggered"] == [run.run_id] and run.run_type == "manual"
    assert run.conf == {"model_name": MODEL, "version": 1}
    assert run.triggering_user_name == "admin" and str(run.state) in ("queued", "DagRunState.QUEUED")
    assert str(getattr(run.triggered_by, "value", run.triggered_by)).lower() == "ui"

    page = admin.get(f"/maas-models/{location.path[2:]}?{location.query}").text
    banner = re.search(r'<div class="banner[^"]*" role="status" id="triggered">(.*?)</div>', page, re.S).group(1)
    assert run.run_id in banner and "rolling sentiment back to v1" in banner and "queued" in banner
    assert 'href="../dags/maas_rollback/runs/' in banner
    assert '<meta http-equiv="refresh" content="3">' in page  # it reloads while the run is queued or running
    assert f'<tr data-run="{run.run_id}">' in page and ">admin<" in page
    # The registry is the DAG's to change: nothing moved yet.
    assert "Desired: stable <b>v2</b>" in page


def test_a_version_that_cannot_serve_is_refused_before_any_run_exists(client):
    before = len(rollback_runs())
    admin = client()
    for version, message in ((3, "sentiment v3 is rejected and was never exported"),
                             (4, "sentiment v4 is candidate and was never exported"),
                             (99, "sentiment version 99 is not in the registry")):
        response = admin.post("/maas-models/rollback", data={"model_name": MODEL, "version": str(version)})
        assert response.status_code == 409 and f"Not rolled back: {message}" in response.text, version
    assert admin.post("/maas-models/rollback", data={"model_name": MODEL, "version": "0"}).status_code == 422
    assert len(rollback_runs()) == before


def test_a_viewer_sees_the_versions_but_may_not_roll_back(client):
    before = len(rollback_runs())
    viewer = client("viewer")
    page = viewer.get("/maas-models/")
    assert page.status_code == 200 and "<button" not in page.text and list(rows(page.text)) == [4, 3, 2, 1]
    assert "you may not trigger maas_rollback" in rows(page.text)[1]
    refused = viewer.post("/maas-models/rollback", data={"model_name": MODEL, "version": "1"})
    assert refused.status_code == 403 and len(rollback_runs()) == before


def test_a_rollback_posted_from_another_origin_is_refused(client):
    before = len(rollback_runs())
    admin = client()
    # Another port of the same host is the same "site" to the browser, so SameSite=Lax sends the cookie.
    forged = admin.post("/maas-models/rollback", data={"model_name": MODEL, "version": "1"},
                        headers={"Origin": "http://airflow.test:9999"})
    assert forged.status_code == 403 and "only be asked from the Models page" in forged.text
    assert len(rollback_runs()) == before


def test_an_unreachable_registry_is_reported_not_a_traceback(client, registry_state, monkeypatch):
    from dataclasses import replace

    from tests.fixtures.postgres import find_free_port

    down = replace(registry_state, registry_dsn=f"host=127.0.0.1 port={find_free_port()} dbname=maas user=maas")
    maas_models.app.dependency_overrides[maas_models.maas_settings] = lambda: down
    page = client().get("/maas-models/", headers={"Accept": "text/html"})
    assert page.status_code == 503
    assert "The model registry cannot be reached." in page.text and "cannot connect to the model registry" in page.text
