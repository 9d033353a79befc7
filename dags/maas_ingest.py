"""
### MaaS ingest: watch a data source, announce new snapshots

Looks at the watched source on a schedule and, when it holds data not seen before, ingests, validates and
cleans it and measures its drift, as `maas_training` does; then it announces the new snapshot with an
event of the Asset `maas_snapshots_<model>`, which starts a `maas_training` run on exactly that snapshot.

* **look_at_source** names the source (*Source*, else MAAS_INGEST_SOURCE, else the directory
  `$MAAS_HOME/incoming`) and compares a fingerprint of its files (names, sizes, modification times) with
  the last look: unchanged, or a watched directory still empty, ends the run here (the other tasks are
  skipped). A file modified in the last *Settle time* is still being written: the next look takes it.
  `s3://` and PostgreSQL sources are read at every look (a watermarked table only past its watermark).
* **ingest_data**, **validate_data**, **clean_data**, **check_drift**: the training pipeline's stages. Data
  already ingested makes no new snapshot (a snapshot is addressed by its rows).
* **announce_snapshot** emits the Asset event (extra: `snapshot_id`, `sha256`, `source_uri`, `drift_flagged`,
  the ingest parameters) for a snapshot never announced nor trained on before; with MAAS_RETRAIN_ON=drift
  only when its drift was flagged (or nothing serves yet to compare with). Otherwise it is skipped and
  says why.

**Schedule:** MAAS_INGEST_SCHEDULE (a cron, default every 5 minutes, UTC), once the DAG is unpaused; a
missed look is never caught up, and one look runs at a time. **Run it now:** press **Trigger**.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, task
from maas_hooks import fail_fast, task_registry, task_store  # plugins/
from maas_timetables import NextSlotCronTimetable

from maas_tasks.config import LABEL_MAP_EXAMPLE, load_retraining_settings
from maas_tasks.retrain import snapshot_asset

log = logging.getLogger(__name__)

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "maas"}
# A look that takes longer than this is stuck (the training pipeline's data stages take seconds to minutes).
DAGRUN_TIMEOUT = timedelta(hours=2)
SETTLE_CHOICES = (0, 10, 30, 60, 120, 300, 600)
# Announcements looked back on to tell whether a snapshot was announced (one event per new snapshot).
ANNOUNCED_LOOKBACK = 1000
# Read when the file is parsed: the Asset and the schedule are part of the DAG's definition.
RETRAINING = load_retraining_settings()
SNAPSHOTS = Asset(**snapshot_asset(RETRAINING.model_name))


def _label_map(params: dict[str, Any]) -> dict[str, str] | None:
    """The label_map Param as {raw label: class name} (a malformed one fails the task)."""
    from maas_tasks.config import parse_label_map

    return parse_label_map(params["label_map"], source="label_map")


def _announced(inlet_events: Any) -> list[int]:
    """The snapshot ids the Asset's recent events announced."""
    from maas_tasks.retrain import announced_ids

    events = inlet_events[SNAPSHOTS].ascending(False).limit(ANNOUNCED_LOOKBACK)
    return announced_ids([dict(e.extra or {}) for e in events])


def _look_params(params: dict[str, Any]) -> dict[str, Any]:
    """What a look's fingerprint covers besides the files: other parameters make it another look."""
    from maas_tasks.config import load_retraining_settings as current
    from maas_tasks.retrain import DATA_PARAMS

    return {
        **{k: params[k] for k in (*DATA_PARAMS, "table_query", "watermark_col")},
        "retrain_on": current().retrain_on, "model_name": RETRAINING.model_name,
    }


def ingest_params() -> dict[str, Param]:
    """The run parameters. A scheduled look uses these defaults, so the data parameters default to those of
    maas_training; the announcement carries them to the training run it starts."""
    return {
        "source": Param(
            None, type=["null", "string"], maxLength=2048, title="Source",
            description=(
                "The source to look at, as seen by the machine that runs the tasks: a directory or glob of CSV/TSV, "
                "JSON Lines or Parquet files, a file, an s3://bucket/prefix or a postgresql://... table. Empty: "
                "MAAS_INGEST_SOURCE, else the directory incoming/ under MAAS_HOME."
            ),
        ),
        "table_query": Param(
            None, type=["null", "string"], maxLength=4096, title="SQL query",
            description="Optional, for a PostgreSQL source: the SELECT that gives the rows (instead of ?table=).",
        ),
        "watermark_col": Param(
            None, type=["null", "string"], maxLength=128, title="Watermark column",
            description="Optional, for a PostgreSQL source: read only rows past the highest value already ingested.",
        ),
        "text_col": Param("text", type="string", minLength=1, maxLength=128, title="Text column",
                          description="Column holding the raw text (1 to 128 characters)."),
        "label_col": Param("label", type="string", minLength=1, maxLength=128, title="Label column",
                           description="Column holding each text's class (1 to 128 characters)."),
        "id_col": Param(None, type=["null", "string"], maxLength=128, title="Id column",
                        description="Optional. A column of unique row ids. Empty: rows are identified by their text."),
        "group_col": Param(None, type=["null", "string"], maxLength=128, title="Group column",
                           description="Optional. Rows sharing its value stay on one side of the split."),
        "label_map": Param(
            None, type=["null", "string"], maxLength=2048, title="Label map",
            description=f"Optional. RAW=NAME pairs, e.g. {LABEL_MAP_EXAMPLE}. Empty: the labels as written.",
        ),
        "max_quarantine_fraction": Param(
            0.05, type="number", minimum=0, maximum=0.5, title="Quarantine limit",
            description="Share of the rows (0 to 0.5) that may fail a row check and be quarantined.",
        ),
        "settle_seconds": Param(
            30, type="integer", enum=list(SETTLE_CHOICES), title="Settle time",
            description=(
                "Seconds (one of 0, 10, 30, 60, 120, 300, 600) a local file must be left unchanged before it is "
                "ingested, so a file being copied in is not read half-written. Copy files in under a name starting "
                "with '.' or '_' and rename them when done, and it can be 0."
            ),
        ),
    }


@dag(
    dag_id="maas_ingest",
    description="Look at the watched source; ingest and announce a new snapshot, which starts maas_training",
    schedule=NextSlotCronTimetable(RETRAINING.ingest_schedule, timezone="UTC") if RETRAINING.ingest_schedule else None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=DAGRUN_TIMEOUT,
    tags=["maas", "ingest"],
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    params=ingest_params(),
)
def maas_ingest() -> None:
    @task.short_circuit(inlets=[SNAPSHOTS])
    def look_at_source(params: dict[str, Any] | None = None, inlet_events: Any = None) -> dict[str, Any] | None:
        from maas_tasks.config import load_retraining_settings as current
        from maas_tasks.retrain import look_at_source as look

        _, store = task_store()
        with fail_fast():
            result = look(
                store, params["source"] or current().ingest_source, model_name=RETRAINING.model_name,
                params=_look_params(params), announced=_announced(inlet_events),
                settle_seconds=params["settle_seconds"],
            )
        log.info(result["reason"])
        return result if result["ingest"] else None

    @task
    def ingest_data(look: dict[str, Any], params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        from maas_tasks.ingest import ingest_data as stage_data

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return stage_data(
                store, registry, look["source"], run_id=run_id, table_query=params["table_query"] or None,
                watermark_col=params["watermark_col"] or None, settings=settings,
            )

    @task
    def validate_data(
        staged: dict[str, Any], params: dict[str, Any] | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        from maas_tasks.validate import validate_staged_snapshot

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            snapshot = validate_staged_snapshot(
                store, registry, staged, text_col=params["text_col"], label_col=params["label_col"],
                id_col=params["id_col"] or None, group_col=params["group_col"] or None, label_map=_label_map(params),
                max_quarantine_fraction=params["max_quarantine_fraction"], dag_run_id=run_id,
            )
        return {**snapshot, "source": staged["source"]}

    @task
    def clean_data(snapshot: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.clean import clean_snapshots, training_batches

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return clean_snapshots(
                store, training_batches(store, registry, snapshot), text_col=params["text_col"],
                label_col=params["label_col"], id_col=params["id_col"] or None, group_col=params["group_col"] or None,
                label_map=_label_map(params),
            )

    @task
    def check_drift(cleaned: dict[str, Any], snapshot: dict[str, Any]) -> dict[str, Any]:
        from maas_tasks.drift import check_drift as compare_data

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            report = compare_data(store, registry, cleaned["key"], snapshot["snapshot_id"], model_name=RETRAINING.model_name)
        return {k: report[k] for k in ("compared", "flagged", "reasons", "message", "report_uri")}

    @task(outlets=[SNAPSHOTS], inlets=[SNAPSHOTS])
    def announce_snapshot(
        look: dict[str, Any],
        snapshot: dict[str, Any],
        drift: dict[str, Any],
        params: dict[str, Any] | None = None,
        run_id: str | None = None,
        inlet_events: Any = None,
        outlet_events: Any = None,
    ) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from maas_tasks.config import load_retraining_settings as current
        from maas_tasks.retrain import decide_announcement, record_look

        settings, store = task_store()
        with task_registry(settings) as registry:
            trained = [v.version for v in registry.list_versions(RETRAINING.model_name)
                       if v.snapshot_id == snapshot["snapshot_id"]]
        decision = decide_announcement(
            snapshot, drift, model_name=RETRAINING.model_name, retrain_on=current().retrain_on,
            announced=_announced(inlet_events), trained=trained, params=params, run_id=run_id,
        )
        # Recorded before the event is: a look that finds the same files again re-announces a snapshot whose
        # announcement was lost (the Asset's events say whether it was), so nothing is announced twice or never.
        record_look(store, RETRAINING.model_name, look, snapshot, announce=decision["announce"])
        log.info(decision["reason"])
        if not decision["announce"]:
            raise AirflowSkipException(decision["reason"])
        outlet_events[SNAPSHOTS].extra = decision["extra"]
        return decision["extra"]

    look = look_at_source()
    staged = ingest_data(look)
    snapshot = validate_data(staged)
    cleaned = clean_data(snapshot)
    drift = check_drift(cleaned, snapshot)
    announce_snapshot(look, snapshot, drift)


maas_ingest()
