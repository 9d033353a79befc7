"""
### MaaS rollback

Makes an earlier version of a model the stable one again, through the same protocol as a promotion and
as `maas rollback`: the version loads beside the serving one as a canary and must answer its golden
requests on every model server, then the servers swap with no failed request.

* **resolve_rollback_version** fixes which version to serve: *Version*, or when empty the stable version
  before the current one. It fails at once, saying why, when there is nothing to roll back to or the
  version cannot serve (not in the registry, rejected by the gate, never exported). Nothing changes here.
* **rollback_version** moves the stable version to it. Retrying is safe: the version is fixed by number,
  so a retry after the swap finds it stable already. If another version became stable meanwhile the run
  fails as *superseded* and that version stays: trigger the rollback again to replace it.

**Run it:** press **Trigger**, name the model (empty: MAAS_MODEL_NAME, default sentiment) and the version
(empty: the previous stable one). The *Models* page of the Airflow UI triggers it per version with
*Roll back to this*.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, task
from maas_hooks import fail_fast, task_registry, task_store  # plugins/

from maas_tasks.config import MODEL_NAME_PATTERN

log = logging.getLogger(__name__)

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "maas"}
# A rollback waits at most a few minutes per phase for the model servers; an hour ends any stuck run.
DAGRUN_TIMEOUT = timedelta(hours=1)


def rollback_params() -> dict[str, Param]:
    """The run parameters; the trigger form shows them, and a run triggered through the API gets the same checks."""
    return {
        "model_name": Param(
            None, type=["null", "string"], maxLength=64, pattern=MODEL_NAME_PATTERN, title="Model name",
            description=(
                "The model to roll back: up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit. "
                "Empty: MAAS_MODEL_NAME (default sentiment)."
            ),
        ),
        "version": Param(
            None, type=["null", "integer"], minimum=1, title="Version",
            description=(
                "The version to serve again, a whole number from 1: one that passed the gate and was exported. "
                "Empty: the stable version before the current one."
            ),
        ),
    }


@dag(
    dag_id="maas_rollback",
    description="Serve an earlier model version again, with no failed request",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # Two rollbacks of one model at once would only supersede each other.
    max_active_runs=1,
    dagrun_timeout=DAGRUN_TIMEOUT,
    # It runs only when triggered, so unpaused changes nothing until someone asks for a rollback, and a
    # rollback asked for (from the Models page, the API) runs instead of waiting for an unpause.
    is_paused_upon_creation=False,
    tags=["maas", "serving"],
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    params=rollback_params(),
)
def maas_rollback() -> None:
    @task
    def resolve_rollback_version(params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.promote import resolve_rollback_version as resolve

        settings, _ = task_store()
        model_name = params["model_name"] or settings.model_name
        with fail_fast(), task_registry(settings) as registry:
            plan = resolve(registry, model_name, params["version"])
        log.info("%s: v%s serves now; rolling back to v%s", model_name, plan["stable"], plan["version"])
        return plan

    @task
    def rollback_version(plan: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from maas_tasks.promote import rollback_version as roll_back

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            result = roll_back(settings, store, registry, plan["model_name"], plan["version"])
        name = result["model_name"]
        if result["outcome"] == "superseded":
            raise AirflowFailException(
                f"{name} was not rolled back to v{plan['version']}: v{result['stable']} became stable while this run "
                f"was moving it; v{result['stable']} keeps serving. Trigger maas_rollback again to replace it"
            )
        if result["outcome"] == "already stable":
            log.info("%s v%s is stable (it already was) on node(s) %s", name, result["stable"], ", ".join(result["nodes"]))
        else:
            log.info(
                "%s v%s is stable on node(s) %s; v%s is retired", name, result["stable"], ", ".join(result["nodes"]),
                result["previous_version"],
            )
        return result

    rollback_version(resolve_rollback_version())


maas_rollback()
