"""The training pipeline's stages run back to back on one file, each timed, as the DAG would run them,
from the raw file to a served version.

The stages are the library functions the DAG's tasks call, on a :class:`~maas_tasks.storage.FileStore`
and a registry of its own (:func:`throwaway_registry`: a database on a private PostgreSQL cluster in a
temp dir), so ingest, validation (with its result, Data Docs and quarantine) and cleaning do all they do in
a run; evaluation does not register a version, and export writes version 1. The last stage, ``serve``, is what a
serving node does with a new version: download it from the store into a fresh serving directory, start the
model server on it (``python -m serving.server``, with the stack's batching) and wait for its first answer
to a REST predict. Each stage's time and its own peak memory (:class:`benchmarks.memory.PeakMemory`, the
model server's process included) are recorded.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.memory import PeakMemory
from benchmarks.metrics import calibration_summary
from maas_tasks.config import project_root
from maas_tasks.features import DEFAULT_MAX_TOKENS
from maas_tasks.storage import Store

MODEL_NAME = "sentiment"
STAGES = ("ingest", "validate", "clean", "features", "train", "evaluate", "export", "serve")
SERVE_TIMEOUT_SECONDS = 180.0
# The data side of a run (clean includes the split), whose total the issue bounds.
DATA_STAGES = ("ingest", "validate", "clean")
DATA_STAGES_TARGET_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def throwaway_cluster() -> Iterator[Any]:
    """A private PostgreSQL cluster (no fsync) in a temp dir, started, and removed afterwards.

    Raises:
        maas_tasks.postgres.PostgresNotInstalled: no PostgreSQL server binaries (``make postgres-server``).
    """
    from maas_tasks.postgres import PgCluster, destroy_cluster, init_cluster, start_cluster

    with tempfile.TemporaryDirectory(prefix="maas-bench-pg-") as tmp:
        cluster = PgCluster(root=Path(tmp), port=free_port(), durable=False)
        try:
            init_cluster(cluster)
            start_cluster(cluster)
            yield cluster
        finally:
            destroy_cluster(cluster)


@contextmanager
def throwaway_registry(cluster: Any, database: str) -> Iterator[Any]:
    """A migrated registry in a database of its own on ``cluster`` (a :func:`throwaway_cluster`).

    Runs that each take a database of one cluster are as isolated as runs with a cluster each, without
    paying for an initdb each; the database goes with the cluster.
    """
    from maas_tasks.postgres import ensure_database
    from maas_tasks.registry import Registry

    ensure_database(cluster, database)
    with Registry.connect(cluster.dsn(database)) as registry:  # connecting migrates it
        yield registry


def import_libraries() -> float:
    """Import TensorFlow, Keras and Great Expectations now; returns the seconds it took.

    A run pays these imports once per process (an Airflow task: once per task), whatever the data size, so
    the benchmark pays them before its first stage: else the smallest size's stages would carry them and
    the growth between sizes would say nothing about the stages.
    """
    import importlib

    from maas_tasks.tf_runtime import import_tensorflow

    started = time.perf_counter()
    import_tensorflow()
    for name in ("keras", "great_expectations"):
        importlib.import_module(name)
    return time.perf_counter() - started


def _timed(stages: list[dict[str, Any]], name: str, run: Callable[[], Any],
           on_stage: Callable[[str], None] | None) -> Any:
    if on_stage is not None:
        on_stage(name)
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
    stages.append({"stage": name, "seconds": seconds, **memory.summary()})
    return result


def _predict(port: int, model_name: str, texts: Sequence[str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = json.dumps({"instances": list(texts)}).encode()
        connection.request("POST", f"/v1/models/{model_name}:predict", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def start_served_version(
    store: Store, export_prefix: str, workdir: Path, texts: Sequence[str], *, model_name: str = MODEL_NAME,
    timeout: float = SERVE_TIMEOUT_SECONDS,
) -> subprocess.Popen:
    """Serve the version at ``export_prefix`` as a node would, returning once it has answered ``texts``.

    Downloads the version (manifest-checked) into ``workdir/<model_name>/<version>``, starts the model server
    on it with the stack's batching, and sends one REST predict of ``texts`` until it answers 200. The
    caller stops the returned process.

    Raises:
        RuntimeError: the server exited, or did not answer within ``timeout`` seconds (with its log's tail).
    """
    from benchmarks.serving import BATCHING_PARAMETERS_FILE, SERVER_MODULE, model_server_flags, stop_process
    from maas_tasks.storage import download_tree

    base = workdir / model_name
    download_tree(store, export_prefix, base / export_prefix.rstrip("/").rsplit("/", 1)[-1])
    grpc_port, rest_port = free_port(), free_port()
    log_path = workdir / "model-server.log"
    flags = model_server_flags(model_name, base, grpc_port, rest_port, BATCHING_PARAMETERS_FILE)
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, *flags], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=project_root())
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the model server exited with status {process.returncode} while starting:\n{tail}")
        try:
            if _predict(rest_port, model_name, texts)[0] == 200:
                return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the model server did not answer within {timeout:.0f} s:\n{tail}")
        time.sleep(0.1)


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
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ingest → validate → clean (and split) → features → train → evaluate → export → serve on ``data_path``.

    The defaults are the DAG's; ``registry`` records the snapshot as a run would. Evaluation is timed as
    the pipeline runs it; its scores also give the calibration figures (log loss, ECE, mean confidence).
    ``on_stage`` is called with each stage's name as it starts (progress lines).

    Returns:
        ``stages`` (name, seconds, and ``start_mb``/``peak_mb``/``delta_mb``: the RSS of this process and
        its children when the stage began, its peak during the stage, and the difference), ``rows``
        (train/eval), ``metrics`` (accuracy, precision, recall, f1, roc_auc, n_eval plus the calibration
        summary), ``train`` (device, temperature, train_seconds), ``features_key``, ``export_prefix`` and
        ``eval_texts``.

    Raises:
        maas_tasks.validate.DataValidationError: the file fails validation (the message says why).
        RuntimeError: the model server did not serve the exported version.
    """
    from maas_tasks.clean import clean_snapshots, training_batches
    from maas_tasks.evaluate import evaluate_model
    from maas_tasks.export import export_model
    from maas_tasks.features import build_features
    from maas_tasks.ingest import ingest_data
    from maas_tasks.train import train_model
    from maas_tasks.validate import validate_staged_snapshot

    stages: list[dict[str, Any]] = []
    staged = _timed(stages, "ingest", lambda: ingest_data(store, registry, str(data_path), run_id="bench"), on_stage)
    snapshot = _timed(stages, "validate", lambda: validate_staged_snapshot(
        store, registry, staged, text_col=text_col, label_col=label_col, group_col=group_col, dag_run_id="bench",
    ), on_stage)
    cleaned = _timed(stages, "clean", lambda: clean_snapshots(
        store, training_batches(store, registry, snapshot), text_col=text_col, label_col=label_col,
        group_col=group_col,
    ), on_stage)
    features = _timed(
        stages, "features", lambda: build_features(store, cleaned["key"], max_tokens=max_tokens), on_stage
    )
    trained = _timed(
        stages,
        "train",
        lambda: train_model(store, features["key"], epochs=epochs, batch_size=batch_size, device=device),
        on_stage,
    )
    metrics = _timed(stages, "evaluate", lambda: evaluate_model(store, trained["key"], features["key"]), on_stage)
    scores, labels, texts = metrics.pop("scores"), metrics.pop("truth"), metrics.pop("texts")
    exported = _timed(
        stages,
        "export",
        lambda: export_model(
            store, trained["key"], model_name=MODEL_NAME, version=1, metadata={"benchmark": True}
        ),
        on_stage,
    )
    with tempfile.TemporaryDirectory(prefix="maas-bench-serve-") as tmp:
        server = _timed(
            stages, "serve", lambda: start_served_version(store, exported["prefix"], Path(tmp), texts[:1]), on_stage
        )
        from benchmarks.serving import stop_process

        stop_process(server)

    headline = {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "n_eval")}
    return {
        "stages": stages,
        "rows": {"train": features["train_rows"], "eval": features["eval_rows"]},
        "data": {"quarantined": snapshot["quarantined_rows"] + cleaned["quarantined"], "splits": cleaned["splits"],
                 "docs_uri": snapshot["docs_uri"]},
        "metrics": {**headline, **{k: v for k, v in calibration_summary(scores, labels).items() if k != "accuracy"}},
        "train": {k: trained.get(k) for k in ("device", "temperature", "train_seconds", "best_epoch")},
        "vocab_size": features["vocab_size"],
        "classes": features["classes"],
        "features_key": features["key"],
        "short_probe": metrics.get("short_probe"),
        "slices": metrics.get("slices"),
        "export_prefix": exported["prefix"],
        "eval_texts": texts,
    }
