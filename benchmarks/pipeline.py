"""The training pipeline's stages run back to back on one file, each timed, as the DAG would run them.

The stages are the library functions the DAG's tasks call, on a :class:`~maas_tasks.storage.FileStore`
and a registry of its own (:func:`throwaway_registry`: a private PostgreSQL cluster in a temp dir), so
ingest, validation (with its result, Data Docs and quarantine) and cleaning do all they do in a run;
evaluation does not register a version, and export writes version 1.
"""

from __future__ import annotations

import resource
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


from benchmarks.metrics import calibration_summary
from maas_tasks.features import DEFAULT_MAX_TOKENS
from maas_tasks.storage import Store

MODEL_NAME = "sentiment"
STAGES = ("ingest", "validate", "clean", "features", "train", "evaluate", "export")
# The data side of a run (clean includes the split), whose total the issue bounds.
DATA_STAGES = ("ingest", "validate", "clean")
DATA_STAGES_TARGET_SECONDS = 10.0


@contextmanager
def throwaway_registry() -> Iterator[Any]:
    """A migrated registry on a private PostgreSQL cluster (no fsync) in a temp dir, removed afterwards.

    Raises:
        maas_tasks.postgres.PostgresNotInstalled: no PostgreSQL server binaries (``make postgres-server``).
    """
    from maas_tasks.postgres import PgCluster, destroy_cluster, ensure_database, init_cluster, start_cluster
    from maas_tasks.registry import Registry

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="maas-bench-pg-") as tmp:
        cluster = PgCluster(root=Path(tmp), port=port, durable=False)
        try:
            init_cluster(cluster)
            start_cluster(cluster)
            ensure_database(cluster, "maas")
            with Registry.connect(cluster.dsn("maas")) as registry:  # connecting migrates it
                yield registry
        finally:
            destroy_cluster(cluster)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(stages: list[dict[str, Any]], name: str, run: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = run()
    stages.append({"stage": name, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()})
    return result


def run_pipeline(
    store: Store,
    registry: Any,
    data_path: Path,
    *,
    text_col: str = "text",
    label_col: str = "label",
    group_col: str | None = "movie_id",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    epochs: int = 5,
    batch_size: int = 512,
    device: str = "auto",
) -> dict[str, Any]:
    """Run ingest → validate → clean (and split) → features → train → evaluate → export on ``data_path``.

    The defaults are the DAG's; ``registry`` records the snapshot as a run would. Evaluation is timed as the pipeline runs it; its scores also give the
    calibration figures (log loss, ECE, mean confidence).

    Returns:
        ``stages`` (name, seconds, peak_rss_mb after the stage), ``rows`` (train/eval), ``metrics``
        (accuracy, precision, recall, f1, roc_auc, n_eval plus the calibration summary), ``train``
        (device, temperature, train_seconds), ``export_prefix`` and ``eval_texts``.

    Raises:
        maas_tasks.validate.DataValidationError: the file fails validation (the message says why).
    """
    from maas_tasks.clean import clean_snapshots, training_batches
    from maas_tasks.evaluate import evaluate_model
    from maas_tasks.export import export_model
    from maas_tasks.features import build_features
    from maas_tasks.ingest import ingest_data
    from maas_tasks.train import train_model
    from maas_tasks.validate import validate_staged_snapshot

    stages: list[dict[str, Any]] = []
    staged = _timed(stages, "ingest", lambda: ingest_data(store, registry, str(data_path), run_id="bench"))
    snapshot = _timed(stages, "validate", lambda: validate_staged_snapshot(
        store, registry, staged, text_col=text_col, label_col=label_col, group_col=group_col, dag_run_id="bench",
    ))
    cleaned = _timed(stages, "clean", lambda: clean_snapshots(
        store, training_batches(store, registry, snapshot), text_col=text_col, label_col=label_col,
        group_col=group_col,
    ))
    features = _timed(stages, "features", lambda: build_features(store, cleaned["key"], max_tokens=max_tokens))
    trained = _timed(
        stages,
        "train",
        lambda: train_model(store, features["key"], epochs=epochs, batch_size=batch_size, device=device),
    )
    metrics = _timed(stages, "evaluate", lambda: evaluate_model(store, trained["key"], features["key"]))
    scores, labels, texts = metrics.pop("scores"), metrics.pop("truth"), metrics.pop("texts")
    exported = _timed(
        stages,
        "export",
        lambda: export_model(
            store, trained["key"], model_name=MODEL_NAME, version=1, metadata={"benchmark": True}
        ),
    )

    headline = {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "n_eval")}
    return {
        "stages": stages,
        "rows": {"train": features["train_rows"], "eval": features["eval_rows"]},
        "data": {"quarantined": snapshot["quarantined_rows"] + cleaned["quarantined"], "splits": cleaned["splits"],
                 "docs_uri": snapshot["docs_uri"]},
        "metrics": {**headline, **{k: v for k, v in calibration_summary(scores, labels).items() if k != "accuracy"}},
        "train": {k: trained.get(k) for k in ("device", "temperature", "train_seconds", "best_epoch")},
        "vocab_size": features["vocab_size"],
        "short_probe": metrics.get("short_probe"),
        "slices": metrics.get("slices"),
        "export_prefix": exported["prefix"],
        "eval_texts": texts,
    }
