"""
### MaaS training pipeline

Turns a labeled text file into a model served by TensorFlow Serving:

ingest → validate → clean → features → train → evaluate → gate → export → promote

* **ingest_data** stages an immutable Parquet snapshot of the file in the object store.
* **validate_data** checks it with Great Expectations; bad data fails the run here and leaves no
  snapshot behind. Good data is published and recorded in the registry.
* **clean_data**, **build_features** (train/eval split, TF-IDF vocabulary), **train_model** (a Keras
  model whose first layer is the TF-IDF vectorizer, so the served model takes raw text).
* **evaluate_model** computes accuracy, precision, recall, F1 and ROC AUC on the held-out split and
  registers the next model version: *candidate* when it passes the gate, *rejected* otherwise.
* **gate_model** stops a rejected model here: it is never exported.
* **export_model** writes the SavedModel to `models/<name>/<version>/` in the store;
  **promote_model** copies it onto the serving volume, reloads the model server and marks it serving.

Trigger with the **Trigger DAG** button to change the data file, columns or gate; the weekly schedule
retrains on the defaults. Every task passes only small references (store keys, versions) through XCom.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, task

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "maas"}


def _store() -> tuple[Any, Any]:
    """Settings and object store for a task; imported lazily to keep DAG parsing cheap."""
    from maas_tasks.config import load_settings
    from maas_tasks.storage import open_store

    settings = load_settings()
    return settings, open_store(settings=settings)


@contextmanager
def _fail_fast_on_bad_input() -> Iterator[None]:
    """Bad data or parameters (a stage's ValueError) will not improve on retry: fail the task at once,
    with the stage's message, instead of retrying it."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from exc


def _registry(settings: Any) -> Any:
    """A registry connection for a task, to use in a ``with`` block (closed at its end)."""
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry

    return Registry.connect(registry_dsn(settings))


@dag(
    dag_id="maas_training",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["maas", "training"],
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    params={
        "data_path": Param(
            "",
            type="string",
            title="Data file",
            description="CSV/TSV (optionally .gz) or Parquet file with labeled texts. Empty: the bundled sample.",
        ),
        "text_col": Param(
            "text", type="string", minLength=1, title="Text column", description="Column holding the raw text."
        ),
        "label_col": Param(
            "label",
            type="string",
            minLength=1,
            title="Label column",
            description="Column holding the label; its values become the served class names.",
        ),
        "group_col": Param(
            "",
            type="string",
            title="Group column",
            description="Optional column whose groups stay on one side of the train/eval split (e.g. movie_id).",
        ),
        "model_name": Param(
            "",
            type="string",
            pattern="^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$",
            title="Model name",
            description="Name the model is registered and served under. Empty: MAAS_MODEL_NAME (default sentiment).",
        ),
        "epochs": Param(
            5, type="integer", minimum=1, maximum=200, title="Epochs", description="Passes over the training split."
        ),
        "batch_size": Param(
            64, type="integer", minimum=1, maximum=4096, title="Batch size", description="Texts per training step."
        ),
        "max_tokens": Param(
            20000,
            type="integer",
            minimum=100,
            maximum=500000,
            title="Vocabulary size",
            description="Most frequent unigrams and bigrams kept by the TF-IDF layer.",
        ),
        "eval_fraction": Param(
            0.2,
            type="number",
            exclusiveMinimum=0,
            exclusiveMaximum=1,
            title="Held-out fraction",
            description="Share of rows (whole groups when a group column is set) kept out of training for evaluation.",
        ),
        "min_accuracy": Param(
            0.7,
            type="number",
            minimum=0,
            maximum=1,
            title="Minimum accuracy",
            description="Gate: a model below this held-out accuracy is registered as rejected and never exported.",
        ),
    },
)
def maas_training() -> None:
    @task
    def ingest_data(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        from maas_tasks.ingest import ingest_data as stage_data
        from maas_tasks.sample_data import sample_data_path

        _, store = _store()
        with _fail_fast_on_bad_input():
            return stage_data(store, params["data_path"] or sample_data_path(), run_id=run_id)

    @task
    def validate_data(
        staged: dict[str, Any], params: dict[str, Any] | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        from maas_tasks.validate import validate_staged_snapshot

        settings, store = _store()
        with _fail_fast_on_bad_input(), _registry(settings) as registry:
            return validate_staged_snapshot(
                store,
                registry,
                staged,
                text_col=params["text_col"],
                label_col=params["label_col"],
                group_col=params["group_col"] or None,
                dag_run_id=run_id,
            )

    @task
    def clean_data(snapshot: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.clean import clean_snapshot

        _, store = _store()
        with _fail_fast_on_bad_input():
            return clean_snapshot(
                store,
                snapshot["key"],
                text_col=params["text_col"],
                label_col=params["label_col"],
                group_col=params["group_col"] or None,
            )

    @task
    def build_features(cleaned: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.features import build_features as fit_features

        _, store = _store()
        with _fail_fast_on_bad_input():
            return fit_features(
                store, cleaned["key"], max_tokens=params["max_tokens"], eval_fraction=params["eval_fraction"]
            )

    @task
    def train_model(features: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from maas_tasks.train import train_model as fit_model

        settings, store = _store()
        with _fail_fast_on_bad_input():
            result = fit_model(
                store,
                features["key"],
                epochs=params["epochs"],
                batch_size=params["batch_size"],
                device=settings.device,
            )
        return {k: result[k] for k in ("key", "device", "train_seconds")}

    @task
    def evaluate_model(
        trained: dict[str, Any],
        features: dict[str, Any],
        snapshot: dict[str, Any],
        params: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        from maas_tasks.evaluate import evaluate_and_register

        settings, store = _store()
        with _fail_fast_on_bad_input(), _registry(settings) as registry:
            return evaluate_and_register(
                store,
                registry,
                trained["key"],
                features["key"],
                model_name=params["model_name"] or settings.model_name,
                min_accuracy=params["min_accuracy"],
                snapshot_id=snapshot["snapshot_id"],
                dag_run_id=run_id,
            )

    @task.short_circuit
    def gate_model(evaluation: dict[str, Any]) -> bool:
        print(f"gate: {evaluation['gate']['reason']}")
        return bool(evaluation["gate"]["passed"])

    @task
    def export_model(evaluation: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
        from maas_tasks.export import export_registered_version

        settings, store = _store()
        with _registry(settings) as registry:
            return export_registered_version(store, registry, trained["key"], evaluation)

    @task
    def promote_model(exported: dict[str, Any]) -> dict[str, Any]:
        from maas_tasks.promote import promote_registered_version

        settings, store = _store()
        with _registry(settings) as registry:
            return promote_registered_version(
                settings, store, registry, exported["model_name"], exported["version"]
            )

    staged = ingest_data()
    snapshot = validate_data(staged)
    cleaned = clean_data(snapshot)
    features = build_features(cleaned)
    trained = train_model(features)
    evaluation = evaluate_model(trained, features, snapshot)
    exported = export_model(evaluation, trained)
    gate_model(evaluation) >> exported
    promote_model(exported)


maas_training()
