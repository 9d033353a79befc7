"""The Models page of the Airflow UI: every model version in the registry, and a roll-back action per version.

Operators watch and steer the served model in the tool they already use for the pipeline, so this page
lives in Airflow: an Airflow 3 plugin made of a FastAPI app, which the API server mounts at
``/maas-models/``, and an external view that puts **Models** in the UI's navigation (the UI shows the
page in a frame at ``/plugin/models``). Per version the page shows its status, the labels that point at it
(stable, canary, previous; pinned), the headline metrics, the gate decision with every check, the data
snapshot with its Data Docs and drift report, when and by which run it was made, and its evaluation
report; per model, what every serving node observed.

Everything goes through Airflow's own authentication: the same JWT as the REST API (the ``_token``
cookie the login sets, or an ``Authorization: Bearer`` header), checked by the same code; without one a
request gets 401. *Roll back to this* triggers the ``maas_rollback`` DAG as the logged-in user through the
REST API's own trigger code, after the permission check that API makes (creating runs of the DAG), so
the run is the scheduler's to execute, shows in the UI, and names who asked for it. The evaluation
reports and Data Docs live in the object store (``file://`` locally, ``s3://`` in deployments): the app
streams them from it at ``/maas-models/store/<key>``, so one link works for both, and only keys under
``reports/``, ``validation/<sha>/docs/`` and ``drift/`` are served.

The API server imports every plugin when it starts, and other Airflow processes load plugins too: this
module imports only FastAPI at the top; the registry, the store, Jinja2 and Airflow's API internals are
imported when a request needs them.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

log = logging.getLogger(__name__)

URL_PREFIX = "/maas-models"
ROLLBACK_DAG_ID = "maas_rollback"
TRAINING_DAG_ID = "maas_training"
TEMPLATE_DIR = Path(__file__).with_name("maas_models")
# Store keys the page links to: evaluation reports, validation Data Docs, drift reports (never the data).
SERVED_KEYS = re.compile(r"^(reports/[^/]+/\d+|validation/[0-9a-f]{64}/docs|drift/[0-9a-f]+)/[^?#]+$")
# Statuses a version may be rolled to (with an exported artifact), as maas_tasks.promote allows.
ROLLABLE_STATUSES = ("retired", "superseded", "candidate")
HEADLINE_METRICS = (("accuracy", "accuracy"), ("f1", "F1"), ("roc_auc", "ROC AUC"), ("log_loss", "log loss"),
                    ("ece", "ECE"))
ACTIVE_RUN_STATES = ("queued", "running")
EVENTS_PER_VERSION = 8
RECENT_ROLLBACKS = 5
# While a rollback runs the page reloads itself this often, so the labels move as the registry does.
REFRESH_SECONDS = 3

app = FastAPI(title="MaaS models", docs_url=None, redoc_url=None, openapi_url=None)


async def current_user(request: Request) -> Any:
    """The logged-in Airflow user, found exactly as the REST API finds it (bearer token, else the ``_token``
    cookie); 401 without credentials, 401/403 for an expired or invalid token."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


UserDep = Annotated[Any, Depends(current_user)]


def require_rollback_access(request: Request, user: UserDep) -> None:
    """403 unless the user may trigger ``maas_rollback``: the check of the REST API's trigger endpoint."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    requires_access_dag("POST", DagAccessEntity.RUN, ROLLBACK_DAG_ID)(request, user)


def require_same_origin(request: Request) -> None:
    """403 for a form posted from another origin. Airflow's login cookie is SameSite=Lax, which keeps
    other sites out but not another port of the same host (a site ignores ports), so a page served
    elsewhere on 127.0.0.1 could otherwise make a logged-in user's browser trigger a rollback."""
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a browser form (an API client with a bearer token), or a browser that sends none
    # Behind a reverse proxy the Host it forwards may be its own; the host the browser used is then here.
    host = request.headers.get("x-forwarded-host") or request.headers.get("host")
    if urlsplit(origin).netloc != host:
        raise HTTPException(403, f"a rollback may only be asked from the Models page itself, not from {origin}")


def may_roll_back(request: Request, user: Any) -> bool:
    """Whether to offer the roll-back buttons to this user."""
    try:
        require_rollback_access(request, user)
    except HTTPException:
        return False
    return True


def maas_settings() -> Any:
    """The settings the DAG tasks run with (MAAS_*, or the maas_store / maas_registry Connections where
    defined), read per request: the page shows the registry and store the pipeline writes."""
    from maas_hooks import task_settings  # plugins/

    return task_settings()


SettingsDep = Annotated[Any, Depends(maas_settings)]


def open_registry(settings: SettingsDep) -> Iterator[Any]:
    """A registry connection for one request; 503 with the registry's own message when it cannot be reached."""
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry, RegistryError

    try:
        registry = Registry.connect(registry_dsn(settings))
    except RegistryError as exc:
        raise HTTPException(503, str(exc)) from None
    with registry:
        yield registry


RegistryDep = Annotated[Any, Depends(open_registry)]


def trigger_rollback_run(request: Request, user: Any, conf: dict[str, Any], note: str) -> str:
    """Create a manual ``maas_rollback`` run (queued for the scheduler) with ``conf``, through the REST API's
    own trigger code; returns its run id.

    Raises:
        HTTPException: the DAG is not parsed yet, has import errors, or refuses the conf (the API's own
            answers: 404, 400).
    """
    from airflow.api_fastapi.core_api.datamodels.dag_run import TriggerDAGRunPostBody
    from airflow.api_fastapi.core_api.routes.public.dag_run import trigger_dag_run
    from airflow.models.dagbag import DBDagBag
    from airflow.models.log import Log
    from airflow.utils.session import create_session

    body = TriggerDAGRunPostBody(logical_date=None, conf=conf, note=note)
    with create_session() as session:
        run = trigger_dag_run(ROLLBACK_DAG_ID, body, DBDagBag(), user, session, request)
        # The audit log entry the REST API writes for a trigger, so Browse > Audit Log shows who asked.
        session.add(Log(
            event="trigger_dag_run", owner=user.get_name(), owner_display_name=user.get_name(),
            dag_id=ROLLBACK_DAG_ID, run_id=run.run_id,
            extra=json.dumps({"conf": conf, "method": request.method, "via": "Models page"}),
        ))
        return run.run_id


def recent_rollback_runs(limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` runs of ``maas_rollback``: id, state, conf, who triggered it, when."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(
            select(DagRun).where(DagRun.dag_id == ROLLBACK_DAG_ID).order_by(DagRun.id.desc()).limit(limit)
        )
        return [
            {"run_id": r.run_id, "state": str(getattr(r.state, "value", r.state)), "conf": r.conf or {},
             "user": r.triggering_user_name, "queued_at": r.queued_at, "start_date": r.start_date,
             "end_date": r.end_date, "link": run_link(ROLLBACK_DAG_ID, r.run_id)}
            for r in runs
        ]


def run_link(dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI, relative to this page (``/maas-models/``), so a base path works."""
    return f"../dags/{dag_id}/runs/{quote(run_id, safe='')}"


def _store_link(store: Any, uri: str | None, *, html_of_json: bool = False) -> str | None:
    """This app's link to a store object (the page's own endpoint), or None when it is not one it serves."""
    from maas_tasks.storage import store_key

    if not uri:
        return None
    try:
        key = store_key(store, uri)
    except ValueError:
        return None  # recorded in another store than the one configured: shown, not linked
    if html_of_json and key.endswith("/report.json"):
        key = key[: -len("report.json")] + "report.html"  # the drift report's page beside its JSON
    return f"store/{quote(key)}" if SERVED_KEYS.match(key) else None


def _metrics(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    return [(label, f"{metrics[key]:.4f}") for key, label in HEADLINE_METRICS if isinstance(metrics.get(key), (int, float))]


def _gate(metrics: dict[str, Any]) -> dict[str, Any] | None:
    gate = metrics.get("gate")
    if not isinstance(gate, dict):
        return None
    checks = [
        {"name": str(c.get("name", "")), "passed": bool(c.get("passed")), "detail": str(c.get("detail", ""))}
        for c in gate.get("checks") or [] if isinstance(c, dict)
    ]
    verdict = "forced" if gate.get("forced") else "passed" if gate.get("passed") else "rejected"
    return {"verdict": verdict, "reason": str(gate.get("reason") or ""), "checks": checks,
            "failed": [c for c in checks if not c["passed"]], "champion": gate.get("champion"),
            "forced_by": gate.get("forced_by")}


def _event_line(event: Any) -> str:
    """One event as a short phrase (its kind, then what it records about why), for a version's history."""
    detail = event.detail or {}
    parts = [event.kind.replace("_", " ")]
    for key in ("purpose", "from", "replaces", "replaced_by", "reverted_from", "reason"):
        if detail.get(key) not in (None, ""):
            value = f"v{detail[key]}" if key in _VERSION_DETAILS else detail[key]
            parts.append(f"{key.replace('_', ' ')} {value}")
    return "; ".join(parts)


# Event details that name another version of the model.
_VERSION_DETAILS = ("replaces", "replaced_by", "reverted_from")


def describe_models(registry: Any, store: Any, model: str | None = None) -> list[dict[str, Any]]:
    """What the page shows, per model (by name): the desired state, what each node observed, and every
    version, newest first, with everything the page lists about it."""
    from maas_tasks.cli import observed_states, serving_state

    versions = registry.list_versions(model)
    targets = {t.model_name: t for t in registry.serving_targets()}
    nodes = registry.serving_nodes()
    states = {s["model_name"]: s for s in serving_state(list(targets.values()), nodes)}
    snapshots: dict[int, Any] = {}
    models: dict[str, dict[str, Any]] = {}
    for record in sorted(versions, key=lambda v: (v.model_name, -v.version)):
        name = record.model_name
        target = targets.get(name)
        entry = models.setdefault(name, {
            "name": name, "target": target, "nodes": (states.get(name) or {}).get("nodes", []), "versions": [],
        })
        labels = [role for role in ("stable", "canary", "previous") if target and getattr(target, role) == record.version]
        snapshot = None
        if record.snapshot_id is not None:
            if record.snapshot_id not in snapshots:
                snapshots[record.snapshot_id] = registry.get_snapshot(record.snapshot_id)
            found = snapshots[record.snapshot_id]
            drift = found.drift or {}
            snapshot = {
                "id": found.id, "sha": found.sha256[:12], "sha256": found.sha256, "rows": found.rows,
                "source": found.source_uri or found.source, "quarantined": found.quarantined_rows,
                "docs": _store_link(store, found.docs_uri), "drift": _store_link(store, found.drift_uri, html_of_json=True),
                "drift_flagged": bool(drift.get("flagged")), "drift_message": drift.get("message"),
            }
        rollable = (
            record.status in ROLLABLE_STATUSES and bool(record.artifact_uri)
            and not (target and record.version in (target.stable, target.canary))
        )
        why_not = None
        if not rollable:
            if "stable" in labels:
                why_not = "serving now"
            elif "canary" in labels:
                why_not = "being verified as the canary"
            elif record.status == "rejected":
                why_not = "rejected by the gate: never exported"
            elif not record.artifact_uri:
                why_not = "never exported"
        events = registry.list_events(model_name=name, version=record.version, limit=EVENTS_PER_VERSION)
        metrics = record.metrics or {}
        entry["versions"].append({
            "version": record.version, "status": record.status, "labels": labels, "pinned": record.pinned,
            "metrics": _metrics(metrics), "n_eval": metrics.get("n_eval"), "gate": _gate(metrics),
            "snapshot": snapshot, "created_at": record.created_at, "dag_run_id": record.dag_run_id,
            "run_link": run_link(TRAINING_DAG_ID, record.dag_run_id) if record.dag_run_id else None,
            "report": _store_link(store, record.report_uri), "report_uri": record.report_uri,
            "observed": observed_states(nodes, name, record.version), "rollable": rollable, "why_not": why_not,
            "events": [{"at": e.at, "text": _event_line(e)} for e in reversed(events)],
        })
    return list(models.values())


@cache
def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["when"] = lambda value: f"{value:%Y-%m-%d %H:%M} UTC" if value is not None else ""
    return env


def render_page(context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    html = _templates().get_template("models.html").render(**context)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def _page(
    request: Request, user: Any, registry: Any, settings: Any, *, model: str | None, triggered: str | None = None,
    error: str | None = None, status_code: int = 200,
) -> HTMLResponse:
    from maas_tasks.storage import open_store

    models = describe_models(registry, open_store(settings=settings), model)
    try:
        rollbacks = recent_rollback_runs(RECENT_ROLLBACKS)
    except Exception as exc:  # noqa: BLE001 - the versions still show when Airflow's database does not answer
        log.warning("could not read the maas_rollback runs: %s: %s", type(exc).__name__, exc)
        rollbacks = []
    active = any(run["state"] in ACTIVE_RUN_STATES for run in rollbacks)
    return render_page({
        "models": models, "model": model, "user": user.get_name(), "may_roll_back": may_roll_back(request, user),
        "rollbacks": rollbacks, "triggered": next((r for r in rollbacks if r["run_id"] == triggered), None),
        "triggered_id": triggered, "triggered_link": run_link(ROLLBACK_DAG_ID, triggered) if triggered else None,
        "error": error, "refresh": REFRESH_SECONDS if active else None, "rollback_dag": ROLLBACK_DAG_ID,
    }, status_code)


@app.exception_handler(HTTPException)
async def _refusal(request: Request, exc: HTTPException) -> Response:
    """Refusals worded as the REST API words them (JSON), or for a browser as a short page that says what to do."""
    if "text/html" not in request.headers.get("accept", ""):
        return Response(json.dumps({"detail": exc.detail}), status_code=exc.status_code, headers=exc.headers,
                        media_type="application/json")
    message = {
        401: "You are not logged in to Airflow, or your session has expired: log in again, then open Models.",
        403: "Your Airflow user may not do this.",
        503: "The model registry cannot be reached.",
    }.get(exc.status_code, "The request was refused.")
    return render_page({"refusal": message, "detail": str(exc.detail)}, exc.status_code)


@app.get("/", response_class=HTMLResponse)
def models_page(
    request: Request, user: UserDep, registry: RegistryDep, settings: SettingsDep,
    model: str | None = None, triggered: str | None = None,
) -> HTMLResponse:
    """The page: every version of every model (or of ``model``); ``triggered`` names a rollback run just
    triggered, whose state the page shows (it reloads itself while a rollback runs)."""
    return _page(request, user, registry, settings, model=model or None, triggered=triggered)


@app.post("/rollback")
def roll_back(
    request: Request, user: UserDep, registry: RegistryDep, settings: SettingsDep,
    model_name: Annotated[str, Form(min_length=1, max_length=64)],
    version: Annotated[int, Form(ge=1)],
) -> Response:
    """Trigger ``maas_rollback`` for ``model_name`` v``version``, then show the page with the run.

    The version is checked first, as the DAG's first task will (it must exist, have passed the gate and
    been exported), so a click on a version that cannot serve says why instead of starting a run that fails.
    """
    from maas_tasks.promote import PromotionError, resolve_rollback_version
    from maas_tasks.registry import VersionNotFound

    require_rollback_access(request, user)
    require_same_origin(request)
    try:
        plan = resolve_rollback_version(registry, model_name, version)
    except (PromotionError, VersionNotFound) as exc:
        return _page(request, user, registry, settings, model=model_name, error=f"Not rolled back: {exc}",
                     status_code=409)
    note = f"Roll {model_name} back from v{plan['stable']} to v{version} (Models page, {user.get_name()})"
    try:
        run_id = trigger_rollback_run(request, user, {"model_name": model_name, "version": version}, note)
    except HTTPException as exc:
        return _page(request, user, registry, settings, model=model_name,
                     error=f"Airflow refused to trigger {ROLLBACK_DAG_ID}: {exc.detail}", status_code=exc.status_code)
    log.info("%s triggered %s run %s: %s v%s", user.get_name(), ROLLBACK_DAG_ID, run_id, model_name, version)
    # After a POST, a redirect: reloading the page then does not trigger a second rollback.
    return RedirectResponse(f"./?{urlencode({'model': model_name, 'triggered': run_id})}", status_code=303)


@app.get("/store/{key:path}")
def store_object(key: str, user: UserDep, settings: SettingsDep) -> Response:
    """An evaluation report, Data Docs page or drift report (or a file they link), from the object store."""
    from maas_tasks.storage import ObjectNotFound, StoreError, check_key, open_store

    try:
        check_key(key)
    except StoreError:
        raise HTTPException(404, f"{key} is not a store key") from None
    if not SERVED_KEYS.match(key):
        raise HTTPException(404, f"{key} is not a report: only evaluation reports, Data Docs and drift reports are served")
    try:
        data = open_store(settings=settings).get_bytes(key)
    except ObjectNotFound:
        raise HTTPException(404, f"{key} is not in the store (deleted by housekeeping, or never written)") from None
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


@app.get("/icon.svg", include_in_schema=False)
def icon() -> Response:
    """The navigation icon (stacked layers: versions)."""
    return Response(_ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


_ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#6b7785" stroke-width="2" '
    'stroke-linecap="round" stroke-linejoin="round"><path d="M12 2 2 7l10 5 10-5-10-5z"/><path d="m2 17 10 5 10-5"/>'
    '<path d="m2 12 10 5 10-5"/></svg>'
)


class MaasModelsPlugin(AirflowPlugin):
    """Registers the app and the navigation entry."""

    name = "maas_models"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "MaaS models"}]
    external_views = [{
        "name": "Models",
        # Relative: the UI resolves it against its base URL (<base href>), so a base path works too.
        "href": f"{URL_PREFIX.lstrip('/')}/",
        "url_route": "models",
        "destination": "nav",
        "nav_top_level": True,
        "icon": f"{URL_PREFIX.lstrip('/')}/icon.svg",
    }]
