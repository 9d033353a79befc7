"""
### MaaS housekeeping: retention of store objects

Deletes what the object store no longer needs: exported versions, evaluation reports, trained models,
features and data snapshots beyond each model's newest *Versions kept*, with their validation, quarantine
and drift reports, cleaned tables, and the staged copies and temporary files killed runs left behind.

Never deleted: a version in the registry's serving target (stable, canary, previous), serving or pinned;
anything a kept version references (its snapshot, features, trained model, export, report) and the
reports of kept snapshots; every batch of a source read by watermark; the newest snapshot of each source;
anything written less than *Minimum age* ago (a run in progress). Before it deletes a version's files the
registry must agree, under the model's lock, that nothing serves it; every deletion is a registry event,
and a second run finds nothing more to delete.

* **clean_store** plans, logs every decision (what is kept and why, what goes and why), and deletes unless
  *Dry run* is ticked: then it only lists what would go.

**Schedule:** MAAS_HOUSEKEEPING_SCHEDULE (a cron, default 03:00 UTC daily), once the DAG is unpaused (new DAGs
start paused); *Versions kept* defaults to MAAS_KEEP_VERSIONS (5). **Preview:** press **Trigger** with *Dry
run* ticked.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, task
from maas_hooks import fail_fast, task_registry, task_store  # plugins/
from maas_timetables import NextSlotCronTimetable

from maas_tasks.config import MAX_KEEP_VERSIONS, load_retraining_settings

log = logging.getLogger(__name__)

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(minutes=1), "owner": "maas"}
DAGRUN_TIMEOUT = timedelta(hours=2)
KEEP_CHOICES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 50, 100)
# Longer than the DAGs' run timeouts (maas_training: 6 hours), so no object of a run in progress is deleted.
MIN_AGE_HOURS = (12, 24, 48, 72, 168)
RETRAINING = load_retraining_settings()


def housekeeping_params() -> dict[str, Param]:
    """The run parameters; a scheduled run uses the defaults."""
    return {
        "dry_run": Param(
            False, type="boolean", title="Dry run",
            description="List what would be deleted, and why, without deleting anything. Scheduled runs delete.",
        ),
        "keep_versions": Param(
            None, type=["null", "integer"], enum=[None, *KEEP_CHOICES], title="Versions kept",
            values_display={"None": f"MAAS_KEEP_VERSIONS ({RETRAINING.keep_versions})"},
            description=(
                f"How many of each model's newest versions keep their files: one of {KEEP_CHOICES[0]} to "
                f"{KEEP_CHOICES[-1]}. Empty: MAAS_KEEP_VERSIONS (1 to {MAX_KEEP_VERSIONS}, default 5). Serving, "
                "canary, previous and pinned versions are kept whatever their age."
            ),
        ),
        "min_age_hours": Param(
            24, type="integer", enum=list(MIN_AGE_HOURS), title="Minimum age (hours)",
            description=(
                f"Nothing written less than this many hours ago is deleted (one of {MIN_AGE_HOURS[0]} to "
                f"{MIN_AGE_HOURS[-1]}): a training run in progress, up to its 6-hour timeout, keeps its files."
            ),
        ),
    }


@dag(
    dag_id="maas_housekeeping",
    description="Delete store objects beyond the newest versions kept; never what serves or is pinned",
    schedule=(NextSlotCronTimetable(RETRAINING.housekeeping_schedule, timezone="UTC")
              if RETRAINING.housekeeping_schedule else None),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=DAGRUN_TIMEOUT,
    tags=["maas", "housekeeping"],
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    params=housekeeping_params(),
)
def maas_housekeeping() -> None:
    @task
    def clean_store(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        from maas_tasks.config import load_retraining_settings as current
        from maas_tasks.housekeeping import run_housekeeping

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return run_housekeeping(
                store, registry, keep_versions=params["keep_versions"] or current().keep_versions,
                min_age=timedelta(hours=params["min_age_hours"]), dry_run=bool(params["dry_run"]), run_id=run_id,
            )

    clean_store()


maas_housekeeping()
