"""Export stage: turn a trained model into a TensorFlow Serving version in the object store.

The SavedModel is written with Keras's ``ExportArchive`` (a plain ``tf.saved_model.save`` of a Keras
model does not load in TF Serving's session-based loader) and has one signature, ``serving_default``,
which is the serving contract:

- input ``text``: DT_STRING, shape [-1] (raw text; TF-IDF happens inside the graph);
- output ``scores``: DT_FLOAT [-1, K] class probabilities;
- output ``classes``: DT_STRING [-1, K] the class names, in the same order as ``scores``;
- output ``label``: DT_STRING [-1] the most probable class.

The export is checked by loading it back and calling the signature before anything is uploaded.
The version's files go to ``models/<name>/<version>/`` (manifest last) and its metadata to
``models/<name>/<version>.json`` after that, so a reader that finds the metadata finds a complete model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maas_tasks.config import check_model_name
from maas_tasks.errors import PermanentError
from maas_tasks.model import build_classifier, load_artifact
from maas_tasks.storage import ObjectNotFound, Store, delete_prefix, read_manifest, upload_tree
from maas_tasks.tf_runtime import import_tensorflow
from maas_tasks.train import HISTORY_FILE

log = logging.getLogger(__name__)

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "text"
OUTPUT_NAMES = ("classes", "label", "scores")
# Shipped inside the version (TF Serving ignores assets.extra/ but for its warm-up file): the requests a
# serving node replays before the version may serve, and the answers the exported model gave in process.
GOLDEN_FILE = "assets.extra/maas_golden.json"
GOLDEN_HELD_OUT_TEXTS = 32
# TF Serving replays this file's requests when it loads a version, before the version serves, so the first
# real request does not pay for graph tracing and table warm-up (the embedded server does the same).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
WARMUP_BATCH_SIZES = (1, 8, 64)
MODEL_CARD_FILE = "assets.extra/maas_model_card.json"
REPORT_FILE = "assets.extra/maas_evaluation_report.html"
GOLDEN_TOLERANCE = 1e-4
# Inputs at the edges of what the served graph sees: nothing, one word, unknown words, non-ASCII, a long text.
_GOLDEN_EDGE_CASES = ["", "ok", "zzqx qqxz", "Très bien, ça m'a plu ! 👍", "long " * 2000]


class ExportError(PermanentError):
    """The exported SavedModel does not honour the serving contract, or the version may not be exported."""


def version_prefix(model_name: str, version: int) -> str:
    """The store prefix of an exported version: ``models/<model_name>/<version>``."""
    return f"models/{model_name}/{version}"


def _serving_function(model: Any, classes: list[str]) -> Any:
    tf = import_tensorflow()

    class_names = tf.constant(classes, dtype=tf.string)

    # The argument's name is the signature's input key, so it must be `text`.
    @tf.function(input_signature=[tf.TensorSpec(shape=[None], dtype=tf.string, name=INPUT_NAME)])
    def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
        scores = tf.cast(model(text, training=False), tf.float32)
        batch = tf.shape(text)[0]
        return {
            "scores": scores,
            "classes": tf.tile(class_names[tf.newaxis, :], [batch, 1]),
            "label": tf.gather(class_names, tf.argmax(scores, axis=1)),
        }

    return serve


def _check_saved_model(path: Path, classes: list[str]) -> None:
    """Load the SavedModel back and call its signature on two strings; raise if the contract is broken."""
    tf = import_tensorflow()

    loaded = tf.saved_model.load(str(path))
    if SIGNATURE_NAME not in loaded.signatures:
        raise ExportError(f"{path} has no {SIGNATURE_NAME!r} signature (has {list(loaded.signatures)})")
    signature = loaded.signatures[SIGNATURE_NAME]
    inputs = signature.structured_input_signature[1]
    if set(inputs) != {INPUT_NAME} or inputs[INPUT_NAME].dtype != tf.string:
        raise ExportError(f"{path}: signature inputs are {inputs}; the contract is one string input 'text'")
    out = signature(text=tf.constant(["a sample text", "another one"]))
    k = len(classes)
    expected = {"scores": (tf.float32, (2, k)), "classes": (tf.string, (2, k)), "label": (tf.string, (2,))}
    for name, (dtype, shape) in expected.items():
        if name not in out or out[name].dtype != dtype or tuple(out[name].shape) != shape:
            got = {n: (t.dtype.name, tuple(t.shape)) for n, t in out.items()}
            raise ExportError(f"{path}: signature outputs are {got}; the contract wants {name} {dtype.name} {shape}")
    if set(out) != set(OUTPUT_NAMES):
        raise ExportError(f"{path}: signature outputs are {sorted(out)}; the contract is {sorted(OUTPUT_NAMES)}")
    if [c.decode() for c in out["classes"].numpy()[0]] != classes:
        raise ExportError(f"{path}: the exported classes differ from the model's {classes}")


def write_saved_model(
    model: Any,
    classes: list[str],
    path: Path,
    golden_texts: list[str] | None = None,
    warmup_texts: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a SavedModel with the serving contract at ``path`` and verify it.

    Args:
        golden_texts: when given, the SavedModel's own answers to them (and to a few edge cases) are
            written to ``GOLDEN_FILE`` inside it, for serving nodes to replay.
        warmup_texts: when given, ``WARMUP_FILE`` holds Predict requests of them (batches of 1, 8 and 64).

    Returns:
        ``load_seconds``: how long loading the SavedModel back took (what a model server pays).
    """
    import_tensorflow()
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    # Lookup tables of layers nested in a subclassed model are not found by track(model): track them too.
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "lookup_table", None) is not None:
            archive.track(layer.lookup_table)
    archive.add_endpoint(SIGNATURE_NAME, _serving_function(model, classes))
    archive.write_out(str(path), verbose=False)
    started = time.perf_counter()
    _check_saved_model(path, classes)
    load_seconds = time.perf_counter() - started
    if golden_texts is not None:
        write_golden_requests(path, [*golden_texts, *_GOLDEN_EDGE_CASES])
    if warmup_texts:
        write_warmup_requests(path, warmup_texts)
    return {"load_seconds": load_seconds}


def write_warmup_requests(path: Path, texts: list[str]) -> int:
    """Write TF Serving's warm-up file: ``PredictionLog`` records of Predict requests on ``texts``.

    Returns the number of requests written.
    """
    tf = import_tensorflow()
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    target = path / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with tf.io.TFRecordWriter(str(target)) as writer:
        for size in WARMUP_BATCH_SIZES:
            batch = [texts[i % len(texts)] for i in range(size)]
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = SIGNATURE_NAME
            request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(record.SerializeToString())
            written += 1
    return written


def code_version(root: Path | None = None) -> dict[str, Any]:
    """The MaaS package version and, in a git checkout (``root``, default the project's), the commit (and
    whether the tree had changes)."""
    from importlib import metadata

    from maas_tasks.config import project_root

    try:
        package = metadata.version("maas")
    except metadata.PackageNotFoundError:
        package = None
    commit = dirty = None
    try:
        root = root or project_root()
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip() or None
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package, a container image): the package version is what there is
    return {"package": package, "commit": commit, "dirty": dirty}


def write_golden_requests(path: Path, texts: list[str]) -> dict[str, Any]:
    """Run the SavedModel at ``path`` on ``texts`` in this process and store inputs and outputs beside it."""
    tf = import_tensorflow()

    out = tf.saved_model.load(str(path)).signatures[SIGNATURE_NAME](text=tf.constant(texts, dtype=tf.string))
    golden = {
        "signature_name": SIGNATURE_NAME,
        "inputs": texts,
        "scores": out["scores"].numpy().tolist(),
        "label": [label.decode("utf-8") for label in out["label"].numpy()],
        "tolerance": GOLDEN_TOLERANCE,
    }
    target = path / GOLDEN_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(golden), encoding="utf-8")
    return golden


def _held_out_texts(store: Store, model_key: str, limit: int = GOLDEN_HELD_OUT_TEXTS) -> list[str]:
    """The first ``limit`` texts of the held-out split the model was evaluated on."""
    import io

    import pandas as pd

    features_key = json.loads(store.get_bytes(f"{model_key.rstrip('/')}/{HISTORY_FILE}"))["features_key"]
    eval_df = pd.read_parquet(io.BytesIO(store.get_bytes(f"{features_key}/eval.parquet")))
    return [str(text) for text in eval_df["text"].head(limit)]


def export_model(
    store: Store,
    model_key: str,
    *,
    model_name: str,
    version: int,
    metadata: dict[str, Any],
    model_card: dict[str, Any] | None = None,
    report: bytes | None = None,
) -> dict[str, Any]:
    """Export the trained model at ``model_key`` as version ``version`` of ``model_name``.

    Re-exporting a version with other inputs replaces it: the old metadata and files are removed first,
    then the new files are uploaded (manifest last) and the metadata JSON is written last of all. A rerun
    with the same model, metadata, model card and report after a complete export changes nothing and
    returns the same result (a retried task must not rewrite a version that may be serving).

    Args:
        model_key: the trained model's ``trained/<hash>`` prefix.
        version: a positive integer (TF Serving version directories are numbers).
        metadata: caller's facts to record, e.g. metrics, snapshot key, run id.
        model_card: written inside the version as ``MODEL_CARD_FILE`` (with the export's size and load
            time added), so the facts about a version travel with it.
        report: the evaluation report's HTML page, written inside the version as ``REPORT_FILE``.

    Returns:
        ``prefix`` (``models/<name>/<version>``), ``uri`` of that prefix, ``files`` (the manifest),
        ``metadata_key``, ``size_bytes`` and ``load_seconds``.
    """
    check_model_name(model_name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version {version!r} must be a positive integer (TF Serving version directories are numbers)")
    prefix = version_prefix(model_name, version)
    metadata_key = f"{prefix}.json"
    request_sha256 = _export_request_digest(model_key, metadata, model_card, report)
    published = _published_export(store, prefix, metadata_key, request_sha256)
    if published is not None:
        log.info("%s v%d is already exported from %s with the same facts: nothing to do", model_name, version, model_key)
        return published
    artifact = load_artifact(store, model_key)
    model, classes = build_classifier(artifact), artifact.classes
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / str(version)
        held_out = _held_out_texts(store, model_key)
        written = write_saved_model(model, classes, local, golden_texts=held_out, warmup_texts=held_out)
        size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        exported = {"size_bytes": size, "load_seconds": round(written["load_seconds"], 3)}
        if model_card is not None:
            card = local / MODEL_CARD_FILE
            card.parent.mkdir(parents=True, exist_ok=True)
            card.write_text(json.dumps({**model_card, "export": exported}, indent=2, sort_keys=True, default=str))
        if report is not None:
            (local / REPORT_FILE).parent.mkdir(parents=True, exist_ok=True)
            (local / REPORT_FILE).write_bytes(report)
        store.delete(metadata_key)
        delete_prefix(store, prefix)
        files = upload_tree(store, local, prefix)
    record = {
        "model_name": model_name,
        "version": version,
        "classes": classes,
        "model_key": model_key,
        "metadata": metadata,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(files),
        "uri": store.uri(prefix),
        "request_sha256": request_sha256,
        **exported,
    }
    store.put_bytes(metadata_key, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    log.info(
        "exported %s v%d to %s: %.1f MB, loads in %.2f s", model_name, version, store.uri(prefix), size / 1e6,
        exported["load_seconds"],
    )
    return {"prefix": prefix, "uri": store.uri(prefix), "files": files, "metadata_key": metadata_key, **exported}


def _export_request_digest(
    model_key: str, metadata: dict[str, Any], model_card: dict[str, Any] | None, report: bytes | None
) -> str:
    """What an export was asked to write, as one digest: a rerun asking for the same is a no-op."""
    asked = {
        "model_key": model_key.rstrip("/"),
        "metadata": metadata,
        "model_card": model_card,
        "report_sha256": hashlib.sha256(report).hexdigest() if report is not None else None,
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()


def _published_export(store: Store, prefix: str, metadata_key: str, request_sha256: str) -> dict[str, Any] | None:
    """The result of an earlier, complete export of the same request to ``prefix``, or None.

    Complete means its record (written last) names the same request and every file its manifest lists is
    there; re-exporting would write a SavedModel with other bytes (TensorFlow numbers the functions it
    traces per process), so a retried task would change a version that may already be serving.
    """
    try:
        record = json.loads(store.get_bytes(metadata_key))
        files = read_manifest(store, prefix)
    except (ObjectNotFound, ValueError):
        return None
    if not isinstance(record, dict) or record.get("request_sha256") != request_sha256:
        return None
    present = set(store.list_keys(prefix))
    if sorted(files) != record.get("files") or not {f"{prefix}/{rel}" for rel in files} <= present:
        return None
    return {
        "prefix": prefix, "uri": store.uri(prefix), "files": files, "metadata_key": metadata_key,
        "size_bytes": record["size_bytes"], "load_seconds": record["load_seconds"],
    }


def export_registered_version(
    store: Store, registry: Any, model_key: str, evaluation: dict[str, Any]
) -> dict[str, Any]:
    """Export the version ``evaluate_and_register`` registered, and record its artifact in the registry.

    Raises:
        ExportError: the version is not a candidate (a rejected model is never exported).
    """
    model_name, version = evaluation["model_name"], evaluation["version"]
    record = registry.get_version(model_name, version)
    if record.status not in ("candidate", "serving"):
        raise ExportError(f"{model_name} v{version} is {record.status}; only a candidate that passed the gate is exported")
    snapshot = registry.get_snapshot(record.snapshot_id) if record.snapshot_id is not None else None
    snapshot_facts = {"id": snapshot.id, "uri": snapshot.uri, "sha256": snapshot.sha256} if snapshot else None
    exported = export_model(
        store,
        model_key,
        model_name=model_name,
        version=version,
        metadata={"metrics": record.metrics, "dag_run_id": record.dag_run_id, "snapshot": snapshot_facts},
        model_card=model_card(store, model_key, record, snapshot_facts),
        report=_report_page(store, model_name, version) if record.report_uri else None,
    )
    if record.artifact_uri != exported["uri"]:
        registry.set_artifact(model_name, version, exported["uri"])
    return {"model_name": model_name, "version": version, "prefix": exported["prefix"], "uri": exported["uri"]}


def _report_page(store: Store, model_name: str, version: int) -> bytes:
    from maas_tasks.evaluate import report_prefix
    from maas_tasks.report import REPORT_FILE as PAGE

    return store.get_bytes(f"{report_prefix(model_name, version)}/{PAGE}")


def model_card(store: Store, model_key: str, record: Any, snapshot: dict[str, Any] | None) -> dict[str, Any]:
    """The facts a reader needs about a version: its data, metrics, gate decision, parameters and origin."""
    history = json.loads(store.get_bytes(f"{model_key.rstrip('/')}/{HISTORY_FILE}"))
    features = json.loads(store.get_bytes(f"{history['features_key']}/vectorizer.json"))
    metrics = dict(record.metrics)
    gate = metrics.pop("gate", None)
    thresholds = metrics.pop("thresholds", None)
    metrics.pop("min_accuracy", None)
    return {
        "model_name": record.model_name,
        "version": record.version,
        "classes": history["classes"],
        "data_snapshot": snapshot,
        "metrics": metrics,
        "gate": gate,
        "thresholds": thresholds,
        "parameters": {
            **history["params"],
            **{k: features.get(k) for k in ("ngrams", "min_df", "max_tokens", "weighting")},
        },
        "vocab_size": history.get("vocab_size"),
        "training": {
            k: history.get(k) for k in ("device", "train_seconds", "best_epoch", "calibration", "features_key")
        },
        "code_version": code_version(),
        "dag_run_id": record.dag_run_id,
        "model_key": model_key,
        "evaluation_report": record.report_uri,
    }
