"""
### MaaS training pipeline

Turns a labeled text file into a model served by TensorFlow Serving:

ingest → validate → clean → features → train → evaluate → gate → export → promote

* **ingest_data** reads the source (a CSV/TSV/JSON Lines/Parquet file, a directory or glob of them, an
  `aclImdb` tree or tarball, an `s3://` prefix, or a PostgreSQL table or query read past its watermark) and
  stages an immutable Parquet snapshot, addressed by its rows: data already ingested makes no new snapshot.
* **validate_data** checks it with Great Expectations (its log lists every check, the rows and any
  failure; the result JSON and the Data Docs page go to the store and the registry). Bad rows go to a
  quarantine file with their reasons and the run goes on while they are under *Quarantine limit*; bad
  data fails the run here and leaves no snapshot behind.
* **clean_data** (HTML, Unicode NFKC, whitespace, duplicates, the label map; a stable hash-based
  train/validation/test split with a leakage check), **check_drift** (the new data against what the
  serving model was trained on: labels, lengths, out-of-vocabulary rate), **build_features** (the
  vocabulary of 1- to 3-word n-grams and their Naive-Bayes weights), **train_model** (L2-regularised
  softmax regression over sparse n-gram
  features, fitted by L-BFGS; the features are computed inside the served graph, so the served model takes
  raw text; its log shows every epoch and when it stopped).
* **evaluate_model** scores the model on the held-out split (its log shows the metrics, the confusion
  matrix, per-length slices and every gate check) and registers the next model version: *candidate* when
  it passes the gate, *rejected* otherwise. The gate: the minimum accuracy (and ROC AUC, if set), and the
  serving version (the champion) scored on the same rows: the new model may not be worse beyond the
  tolerance (paired bootstrap) nor regress on any length slice. *Force promotion* overrides it, on record.
* **gate_model** stops a rejected model here: export and promotion are skipped, the champion keeps serving.
* **export_model** writes the SavedModel to `models/<name>/<version>/` in the store, with golden
  requests (held-out texts and the answers the exported model gave);
  **promote_model** makes it the stable version on every model server: it loads beside the serving
  version as a canary and must answer its golden requests, then the servers swap with no failed
  request. If another version became stable after this one was gated, it is *superseded* and the
  newer one stays; a failure gives the serving state back and records why.

**Run it now:** press **Trigger** (top right), change any field of the form (every field states its
limits; empty optional fields use the defaults, and an empty *Data file* trains on the bundled sample),
then press **Trigger** at the bottom of the form.

**Schedule:** on MAAS_TRAINING_SCHEDULE (a cron, default every Sunday at 00:00 UTC) on the defaults (the
data is the watched source, MAAS_INGEST_SOURCE, once it holds any; the bundled sample before), and
whenever `maas_ingest` announces a new snapshot (the Asset `maas_snapshots_<model>`), once the DAG is
unpaused. A run the Asset starts trains on the snapshot it names, with the ingest parameters (columns,
label map) it carries. Unpausing (the toggle, or *Unpause maas_training on trigger* in the trigger form)
never starts a missed run: the first scheduled run is the next Sunday. Every task passes only small
references (store keys, versions) through XCom.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, Param, dag, task
from maas_hooks import fail_fast, task_registry, task_store  # plugins/
from maas_timetables import NextSlotCronTimetable

from maas_tasks.config import LABEL_MAP_EXAMPLE, MODEL_NAME_PATTERN, load_retraining_settings
from maas_tasks.retrain import snapshot_asset

log = logging.getLogger(__name__)

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "maas"}
DAGRUN_TIMEOUT_HOURS = 6
EPOCHS_MAX = 50
BATCH_WINDOW_MAX = 100
BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
VOCABULARY_SIZES = (500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000)
EVAL_FRACTION_RANGE = (0.05, 0.5)
# Read when the file is parsed: the schedule and the Asset (announced by maas_ingest) define the DAG.
RETRAINING = load_retraining_settings()
SNAPSHOTS = Asset(**snapshot_asset(RETRAINING.model_name))
# MAAS_TRAINING_QUEUE (read when the DAG is parsed) names the Celery queue of train_model: in compose,
# "gpu" sends training to the gpu profile's workers, the only ones consuming it. Unset: Airflow's default queue.
# Executors without queues (LocalExecutor, dag.test) ignore it.
TRAINING_QUEUE = os.environ.get("MAAS_TRAINING_QUEUE", "").strip()
TRAINING_TASK_ARGS = {"queue": TRAINING_QUEUE} if TRAINING_QUEUE else {}


def _label_map(params: dict[str, Any]) -> dict[str, str] | None:
    """The label_map Param as {raw label: class name} (a malformed one fails the task: a ConfigError is a
    ValueError)."""
    from maas_tasks.config import parse_label_map

    return parse_label_map(params["label_map"], source="label_map")


def _schedule() -> Any:
    """The cron of MAAS_TRAINING_SCHEDULE or a new snapshot announced by maas_ingest, whichever comes first."""
    if RETRAINING.training_schedule is None:
        return SNAPSHOTS
    return AssetOrTimeSchedule(timetable=NextSlotCronTimetable(RETRAINING.training_schedule, timezone="UTC"),
                               assets=SNAPSHOTS)


def _announcement(triggering_asset_events: Any) -> dict[str, Any] | None:
    """The newest snapshot maas_ingest announced among the events that started this run (None: a manual or
    cron run)."""
    from maas_tasks.retrain import newest_announcement

    events = triggering_asset_events.get(SNAPSHOTS) if triggering_asset_events else None
    return newest_announcement([dict(e.extra or {}) for e in events or ()])


def _run_params(params: dict[str, Any], triggering_asset_events: Any) -> dict[str, Any]:
    """The run's params, with the ingest parameters of the snapshot maas_ingest announced (if it started it)."""
    from maas_tasks.retrain import announced_params

    return announced_params(params, _announcement(triggering_asset_events))


def _record_failed_run(context: dict[str, Any]) -> None:
    """When a run fails, say so in the registry and mark the snapshot it recorded, so nothing a failed run left
    behind looks like the input of a trained model. It never raises: the run has failed already, and a registry
    outage must not hide why."""
    try:
        run_id = context["dag_run"].run_id
        task = context.get("ti") or context.get("task_instance")
        settings, _ = task_store()
        with task_registry(settings) as registry:
            registry.mark_run_failed(
                run_id, tasks=[task.task_id] if task is not None else [], reason=str(context.get("reason") or "a task failed")
            )
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("could not record the failed run in the registry: %s: %s", type(exc).__name__, exc)


def training_params() -> dict[str, Param]:
    """The run parameters, grouped in the trigger form's sections.

    Airflow's form enforces ``enum`` (a dropdown), ``minimum``/``maximum`` (a number outside is set to the
    nearest limit as the field loses focus) and ``maxLength``; it does not check ``pattern``,
    ``exclusiveMaximum`` or that an integer has no fraction, and it treats an empty field as missing unless
    the type admits ``null``. So whole numbers are dropdowns, fractions have inclusive bounds, optional
    values are nullable with a ``None`` default, and each description states the limits. Only the model
    name's pattern is left to the server, which refuses a bad name before any run is created. A run
    triggered through the API or ``maas run`` gets the same checks from the same schema.
    """
    from maas_tasks.sample_data import sample_data_path

    sample = str(sample_data_path())
    data, training, gate = "Data", "Training", "Gate and promotion"
    return {
        "data_path": Param(
            None,
            type=["null", "string"],
            maxLength=2048,
            title="Data source",
            description=(
                "Where the labeled texts are, as seen by the machine that runs the tasks: a CSV/TSV, JSON Lines "
                "(plain or .gz) or Parquet file, e.g. /opt/airflow/data/reviews.csv.gz; a directory or glob of "
                "them; an aclImdb directory or aclImdb_v1.tar.gz; an s3://bucket/prefix; or a PostgreSQL "
                "postgresql://user@host/db?table=reviews. Leave empty to train on the bundled sample of 400 movie "
                "reviews, maas_tasks/data/sample_reviews.csv in the MaaS package (click the field to pick its full "
                "path)."
            ),
            examples=[sample],
            section=data,
        ),
        "table_query": Param(
            None, type=["null", "string"], maxLength=4096, title="SQL query",
            description=(
                "Optional, for a PostgreSQL source: the SELECT that gives the rows (instead of ?table=). Empty: the "
                "whole table."
            ),
            section=data,
        ),
        "watermark_col": Param(
            None, type=["null", "string"], maxLength=128, title="Watermark column",
            description=(
                "Optional, for a PostgreSQL source: a column that grows with new rows (e.g. updated_at or id). Each "
                "run reads only rows past the highest value already ingested, and trains on the batches so far."
            ),
            section=data,
        ),
        "batch_window": Param(
            0, type="integer", enum=list(range(0, BATCH_WINDOW_MAX + 1)),
            values_display={"0": "every batch so far", **{str(n): str(n) for n in range(1, BATCH_WINDOW_MAX + 1)}},
            title="Batch window",
            description=(
                f"For a source read by watermark: train on the newest 1 to {BATCH_WINDOW_MAX} batches only; 0 (the "
                "default): every batch so far."
            ),
            section=data,
        ),
        "text_col": Param(
            "text", type="string", minLength=1, maxLength=128, title="Text column",
            description="Column holding the raw text (1 to 128 characters).", section=data,
        ),
        "label_col": Param(
            "label", type="string", minLength=1, maxLength=128, title="Label column",
            description="Column holding each text's class; its values become the served class names.",
            section=data,
        ),
        "id_col": Param(
            None, type=["null", "string"], maxLength=128, title="Id column",
            description=(
                "Optional. A column identifying each row: ids must be unique (repeats are quarantined), and rows "
                "keep their split by id as data is added. Empty: rows are identified by their text."
            ),
            section=data,
        ),
        "label_map": Param(
            None, type=["null", "string"], maxLength=2048, title="Label map",
            description=(
                f"Optional. RAW=NAME pairs, comma-separated, e.g. {LABEL_MAP_EXAMPLE}: the labels in the data and "
                "the class names the model serves. Rows with a label not in the map are quarantined. Empty: the "
                "labels as written are the class names."
            ),
            section=data,
        ),
        "max_quarantine_fraction": Param(
            0.05, type="number", minimum=0, maximum=0.5, title="Quarantine limit",
            description=(
                "Share of the rows (0 to 0.5) that may fail a row check (no text, unknown label, too long, not "
                "UTF-8, repeated id) and be set aside in the quarantine file; above it the run fails."
            ),
            section=data,
        ),
        "group_col": Param(
            None, type=["null", "string"], maxLength=128, title="Group column",
            description=(
                "Optional. Rows sharing a value of this column (e.g. movie_id) stay on one side of the train/"
                "held-out split, so the held-out score measures unseen groups. Empty: rows are split one by one."
            ),
            section=data,
        ),
        "slice_cols": Param(
            None, type=["null", "string"], maxLength=512, title="Slice columns",
            description=(
                "Optional, comma-separated columns (e.g. genre,source) whose values the evaluation reports "
                "metrics for, in the task log and the evaluation report. Empty: slices by text length only."
            ),
            section=data,
        ),
        "epochs": Param(
            5, type="integer", enum=list(range(1, EPOCHS_MAX + 1)), title="Epochs",
            description=(
                f"Most rounds of 25 L-BFGS iterations, each a full pass over the training split (a whole number from 1 "
                f"to {EPOCHS_MAX}); training stops sooner when it has converged or the validation loss stops improving."
            ),
            section=training,
        ),
        "batch_size": Param(
            512, type="integer", enum=list(BATCH_SIZES), title="Batch size",
            description=(
                f"Texts turned into n-gram features at a time (it bounds memory, not the fit): one of "
                f"{', '.join(map(str, BATCH_SIZES))}."
            ),
            section=training,
        ),
        "max_tokens": Param(
            1_000_000,
            type="integer",
            enum=list(VOCABULARY_SIZES),
            values_display={str(n): f"{n:,}" for n in VOCABULARY_SIZES},
            title="Vocabulary size",
            description=(
                "Most n-grams (1 to 3 words, each in at least 2 training texts) the model keeps, most frequent first: one of "
                f"{', '.join(f'{n:,}' for n in VOCABULARY_SIZES)}."
            ),
            section=training,
        ),
        "eval_fraction": Param(
            0.2, type="number", minimum=EVAL_FRACTION_RANGE[0], maximum=EVAL_FRACTION_RANGE[1],
            title="Held-out fraction",
            description=(
                f"Share of the rows (whole groups when a group column is set) kept out of training to score the "
                f"model: {EVAL_FRACTION_RANGE[0]} to {EVAL_FRACTION_RANGE[1]}."
            ),
            section=training,
        ),
        "min_accuracy": Param(
            0.7, type="number", minimum=0, maximum=1, title="Minimum accuracy",
            description=(
                "Gate: a model whose held-out accuracy is below this (0 to 1) is registered as rejected, never "
                "exported, and the serving model stays."
            ),
            section=gate,
        ),
        "min_roc_auc": Param(
            None, type=["null", "number"], minimum=0, maximum=1, title="Minimum ROC AUC",
            description="Gate: optional minimum held-out ROC AUC (0 to 1). Empty: not checked.", section=gate,
        ),
        "champion_tolerance": Param(
            0.01, type="number", minimum=0, maximum=0.2, title="Champion tolerance",
            description=(
                "Gate: how much lower (0 to 0.2 of accuracy) the new model may score than the serving version on the "
                "same held-out rows: it is rejected when a paired bootstrap shows it worse by more than this with "
                "95 % confidence. No length slice may drop by more than 0.02 plus its own noise band."
            ),
            section=gate,
        ),
        "force_promote": Param(
            False, type="boolean", title="Force promotion",
            description=(
                "Promote even if the gate rejects the model (an operator's override): the registry records that the "
                "gate was forced and by which run. The serving checks of promotion still apply."
            ),
            section=gate,
        ),
        "model_name": Param(
            None, type=["null", "string"], maxLength=64, pattern=MODEL_NAME_PATTERN, title="Model name",
            description=(
                "Name the model is registered and served under: up to 64 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit. Empty: MAAS_MODEL_NAME (default sentiment)."
            ),
            section=gate,
        ),
    }


@dag(
    dag_id="maas_training",
    description="Train a text classifier on a labeled file and serve it with TensorFlow Serving if it passes the gate",
    schedule=_schedule(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    # A run stuck for hours (a hung task, a lost worker) must not hold the next runs behind it.
    dagrun_timeout=timedelta(hours=DAGRUN_TIMEOUT_HOURS),
    tags=["maas", "training"],
    default_args=DEFAULT_ARGS,
    on_failure_callback=_record_failed_run,
    doc_md=__doc__,
    params=training_params(),
)
def maas_training() -> None:
    @task
    def ingest_data(
        params: dict[str, Any] | None = None, run_id: str | None = None, triggering_asset_events: Any = None
    ) -> dict[str, Any]:
        from maas_tasks.ingest import ingest_data as stage_data
        from maas_tasks.retrain import announced_snapshot, scheduled_source
        from maas_tasks.sample_data import sample_data_path

        settings, store = task_store()
        announcement = _announcement(triggering_asset_events)
        with fail_fast(), task_registry(settings) as registry:
            if announcement is not None:  # started by maas_ingest: train on the snapshot it announced
                return announced_snapshot(store, registry, announcement)
            source = params["data_path"] or str(sample_data_path())
            if not params["data_path"] and run_id and run_id.startswith("scheduled__"):
                source = scheduled_source(RETRAINING.ingest_source, source)
            log.info("data source: %s", source)
            return stage_data(
                store,
                registry,
                source,
                run_id=run_id,
                table_query=params["table_query"] or None,
                watermark_col=params["watermark_col"] or None,
                settings=settings,
            )

    @task
    def validate_data(
        staged: dict[str, Any], params: dict[str, Any] | None = None, run_id: str | None = None,
        triggering_asset_events: Any = None,
    ) -> dict[str, Any]:
        from maas_tasks.validate import validate_staged_snapshot

        params = _run_params(params, triggering_asset_events)
        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return validate_staged_snapshot(
                store,
                registry,
                staged,
                text_col=params["text_col"],
                label_col=params["label_col"],
                id_col=params["id_col"] or None,
                group_col=params["group_col"] or None,
                label_map=_label_map(params),
                max_quarantine_fraction=params["max_quarantine_fraction"],
                dag_run_id=run_id,
            )

    @task
    def clean_data(
        snapshot: dict[str, Any], params: dict[str, Any] | None = None, triggering_asset_events: Any = None
    ) -> dict[str, Any]:
        from maas_tasks.clean import clean_snapshots, training_batches

        params = _run_params(params, triggering_asset_events)
        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            batches = training_batches(store, registry, snapshot, window=params["batch_window"] or None)
            return clean_snapshots(
                store,
                batches,
                text_col=params["text_col"],
                label_col=params["label_col"],
                id_col=params["id_col"] or None,
                group_col=params["group_col"] or None,
                label_map=_label_map(params),
                slice_cols=[c.strip() for c in (params["slice_cols"] or "").split(",") if c.strip()],
                test_fraction=params["eval_fraction"],
            )

    @task
    def check_drift(
        cleaned: dict[str, Any], snapshot: dict[str, Any], params: dict[str, Any] | None = None,
        triggering_asset_events: Any = None,
    ) -> dict[str, Any]:
        from maas_tasks.drift import check_drift as compare_data

        params = _run_params(params, triggering_asset_events)
        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return compare_data(
                store, registry, cleaned["key"], snapshot["snapshot_id"],
                model_name=params["model_name"] or settings.model_name,
            )

    @task
    def build_features(cleaned: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.features import build_features as fit_features

        _, store = task_store()
        with fail_fast():
            return fit_features(store, cleaned["key"], max_tokens=params["max_tokens"])

    @task(**TRAINING_TASK_ARGS)
    def train_model(features: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.train import train_model as fit_model

        settings, store = task_store()
        with fail_fast():
            result = fit_model(
                store,
                features["key"],
                epochs=params["epochs"],
                batch_size=params["batch_size"],
                device=settings.device,
            )
        return {k: result[k] for k in ("key", "device", "train_seconds", "best_epoch")}

    @task
    def evaluate_model(
        trained: dict[str, Any],
        features: dict[str, Any],
        snapshot: dict[str, Any],
        params: dict[str, Any] | None = None,
        run_id: str | None = None,
        triggering_asset_events: Any = None,
    ) -> dict[str, Any]:
        from maas_tasks.evaluate import evaluate_and_register

        params = _run_params(params, triggering_asset_events)
        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return evaluate_and_register(
                store,
                registry,
                trained["key"],
                features["key"],
                model_name=params["model_name"] or settings.model_name,
                min_accuracy=params["min_accuracy"],
                min_roc_auc=params["min_roc_auc"],
                champion_tolerance=params["champion_tolerance"],
                force_promote=bool(params["force_promote"]),
                snapshot_id=snapshot["snapshot_id"],
                dag_run_id=run_id,
            )

    @task.short_circuit
    def gate_model(evaluation: dict[str, Any]) -> bool:
        passed = bool(evaluation["gate"]["passed"])
        version = f"{evaluation['model_name']} v{evaluation['version']}"
        log.info("gate %s for %s: %s", "passed" if passed else "REJECTED", version, evaluation["gate"]["reason"])
        return passed

    @task
    def export_model(evaluation: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
        from maas_tasks.export import export_registered_version

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            return export_registered_version(store, registry, trained["key"], evaluation)

    @task
    def promote_model(exported: dict[str, Any]) -> dict[str, Any]:
        from maas_tasks.promote import promote_registered_version

        settings, store = task_store()
        with fail_fast(), task_registry(settings) as registry:
            result = promote_registered_version(
                settings, store, registry, exported["model_name"], exported["version"]
            )
        if result["outcome"] == "superseded":
            log.info(
                "%s v%s is superseded: v%s became stable after it was gated, so it does not replace it",
                result["model_name"], result["version"], result["stable"],
            )
        return {k: v for k, v in result.items() if k != "nodes"}

    staged = ingest_data()
    snapshot = validate_data(staged)
    cleaned = clean_data(snapshot)
    check_drift(cleaned, snapshot)
    features = build_features(cleaned)
    trained = train_model(features)
    evaluation = evaluate_model(trained, features, snapshot)
    exported = export_model(evaluation, trained)
    gate_model(evaluation) >> exported
    promote_model(exported)


maas_training()
