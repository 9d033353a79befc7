"""Tests of the SavedModel export: the serving contract, equal predictions, and the publish order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maas_tasks.evaluate import load_model, predict_scores
from maas_tasks.export import export_model, version_prefix
from maas_tasks.storage import MANIFEST_NAME, download_tree

pytestmark = pytest.mark.slow

TEXTS = ["A superb, moving film.", "Dull and tedious.<br />Awful.", "It was released last spring.", ""]


class RecordingStore:
    """Wraps a store and records the order of writes, to check what is published last."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url
        self.writes: list[str] = []

    def put_bytes(self, key, data):
        self.writes.append(key)
        self.inner.put_bytes(key, data)

    def put_file(self, key, path):
        self.writes.append(key)
        self.inner.put_file(key, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    store = RecordingStore(trained_run["store"])
    metadata = {"run_id": "run-1", "metrics": {"accuracy": 0.9}, "snapshot_key": trained_run["snapshot_key"]}
    result = export_model(store, trained_run["trained"]["key"], model_name="sentiment", version=3, metadata=metadata)
    local = tmp_path_factory.mktemp("export") / "3"
    download_tree(trained_run["store"], result["prefix"], local)
    return {"result": result, "store": store, "local": local, "metadata": metadata}


def test_signature_def_is_the_serving_contract(exported):
    from tensorflow.python.saved_model import loader_impl

    saved_model = loader_impl.parse_saved_model(str(exported["local"]))
    (meta_graph,) = saved_model.meta_graphs
    assert "serve" in meta_graph.meta_info_def.tags
    signature = meta_graph.signature_def["serving_default"]

    def spec(info):
        from tensorflow.core.framework import types_pb2

        return types_pb2.DataType.Name(info.dtype), [d.size for d in info.tensor_shape.dim]

    assert {name: spec(info) for name, info in signature.inputs.items()} == {"text": ("DT_STRING", [-1])}
    assert {name: spec(info) for name, info in signature.outputs.items()} == {
        "scores": ("DT_FLOAT", [-1, 2]),
        "classes": ("DT_STRING", [-1, 2]),
        "label": ("DT_STRING", [-1]),
    }


def test_saved_model_predicts_like_the_keras_model(exported, trained_run):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported["local"]))
    out = loaded.signatures["serving_default"](text=tf.constant(TEXTS))
    keras_scores = predict_scores(load_model(trained_run["store"], trained_run["trained"]["key"]), TEXTS)
    np.testing.assert_allclose(out["scores"].numpy(), keras_scores, rtol=1e-5, atol=1e-6)
    classes = np.array(["negative", "positive"])
    assert [row.tolist() for row in out["classes"].numpy().astype(str)] == [classes.tolist()] * len(TEXTS)
    assert out["label"].numpy().astype(str).tolist() == classes[keras_scores.argmax(axis=1)].tolist()


def test_metadata_and_manifest_are_written_last(exported, trained_run):
    result, store = exported["result"], exported["store"]
    assert result["prefix"] == "models/sentiment/3" == version_prefix("sentiment", 3)
    assert result["uri"] == trained_run["store"].uri("models/sentiment/3")
    assert {"saved_model.pb", "variables/variables.index"} <= set(result["files"])
    assert store.writes[-2:] == ["models/sentiment/3/" + MANIFEST_NAME, "models/sentiment/3.json"]
    record = json.loads(store.get_bytes("models/sentiment/3.json"))
    assert record["model_name"] == "sentiment" and record["version"] == 3
    assert record["classes"] == ["negative", "positive"]
    assert record["metadata"] == exported["metadata"]
    assert record["files"] == sorted(result["files"])
    assert record["created_at"].endswith("+00:00")


def test_an_export_rerun_with_the_same_inputs_writes_nothing_and_answers_the_same(trained_run):
    store, key = trained_run["store"], trained_run["trained"]["key"]
    first = export_model(store, key, model_name="sentiment", version=5, metadata={"n": 1}, report=b"<html>r</html>")
    written = {k: store.modified_at(k) for k in store.list_keys("models/sentiment/5")}
    written["models/sentiment/5.json"] = store.modified_at("models/sentiment/5.json")
    again = export_model(store, key, model_name="sentiment", version=5, metadata={"n": 1}, report=b"<html>r</html>")
    assert again == first
    assert {k: store.modified_at(k) for k in written} == written
    # A file of the published version gone: the rerun exports it again instead of answering from the record.
    store.delete(f"models/sentiment/5/{next(iter(first['files']))}")
    repaired = export_model(store, key, model_name="sentiment", version=5, metadata={"n": 1}, report=b"<html>r</html>")
    assert set(repaired["files"]) == set(first["files"])
    assert all(store.exists(f"models/sentiment/5/{rel}") for rel in repaired["files"])


def test_reexport_replaces_the_version(trained_run):
    store = trained_run["store"]
    stale = "models/sentiment/4/stale.txt"
    store.put_bytes(stale, b"left over from an older export")
    first = export_model(store, trained_run["trained"]["key"], model_name="sentiment", version=4, metadata={"n": 1})
    assert not store.exists(stale)
    again = export_model(store, trained_run["trained"]["prefix"], model_name="sentiment", version=4, metadata={"n": 2})
    assert set(again["files"]) == set(first["files"])
    assert store.list_keys("models/sentiment/4") == sorted(
        [f"models/sentiment/4/{name}" for name in first["files"]] + [f"models/sentiment/4/{MANIFEST_NAME}"]
    )
    assert json.loads(store.get_bytes("models/sentiment/4.json"))["metadata"] == {"n": 2}


@pytest.mark.parametrize("version", [0, -1, "7", 1.0, True])
def test_bad_versions_are_rejected(trained_run, version):
    with pytest.raises(ValueError, match="positive integer"):
        export_model(trained_run["store"], "trained/x", model_name="sentiment", version=version, metadata={})


def test_bad_model_name_is_rejected(trained_run):
    with pytest.raises(ValueError, match="model name"):
        export_model(trained_run["store"], "trained/x", model_name="../up", version=1, metadata={})


def test_export_of_a_missing_model_names_it(trained_run, tmp_path: Path):
    from maas_tasks.storage import ObjectNotFound

    with pytest.raises(ObjectNotFound, match="trained/missing/model.json"):
        export_model(trained_run["store"], "trained/missing", model_name="sentiment", version=9, metadata={})


def test_warmup_requests_are_predict_logs_of_held_out_texts(exported):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from maas_tasks.export import WARMUP_FILE

    records = [
        prediction_log_pb2.PredictionLog.FromString(raw)
        for raw in tf.data.TFRecordDataset(str(exported["local"] / WARMUP_FILE)).as_numpy_iterator()
    ]
    sizes = [len(r.predict_log.request.inputs["text"].string_val) for r in records]
    assert sizes == [1, 8, 64]
    assert all(r.predict_log.request.model_spec.signature_name == "serving_default" for r in records)
    # The embedded server replays them when it loads the version, as TF Serving does.
    from serving.server import load_servable

    assert load_servable("sentiment", 3, exported["local"]).name == "sentiment"


def test_a_broken_warmup_file_fails_the_load(exported, tmp_path):
    import shutil

    from maas_tasks.export import WARMUP_FILE
    from serving.server import ServingError, load_servable

    copy = tmp_path / "3"
    shutil.copytree(exported["local"], copy)
    (copy / WARMUP_FILE).write_bytes(b"not a TFRecord file")
    with pytest.raises(ServingError, match="Warm-up of .* failed"):
        load_servable("sentiment", 3, copy)


def test_export_reports_size_and_load_time(exported):
    result = exported["result"]
    files = exported["result"]["files"]
    assert result["size_bytes"] == sum(f["size"] for f in files.values()) > 0
    assert 0 < result["load_seconds"] < 60
    record = json.loads(exported["store"].get_bytes("models/sentiment/3.json"))
    assert record["size_bytes"] == result["size_bytes"]


def test_registered_export_carries_a_model_card(trained_run, pg_dsn):
    from maas_tasks.evaluate import evaluate_and_register
    from maas_tasks.export import MODEL_CARD_FILE, export_registered_version
    from maas_tasks.registry import Registry

    store, model_key = trained_run["store"], trained_run["trained"]["key"]
    with Registry.connect(pg_dsn) as registry:
        evaluation = evaluate_and_register(
            store, registry, model_key, trained_run["features"]["key"], model_name="carded", min_accuracy=0.5,
            snapshot_id=None, dag_run_id="card-run",
        )
        exported = export_registered_version(store, registry, model_key, evaluation)
    card = json.loads(store.get_bytes(f"{exported['prefix']}/{MODEL_CARD_FILE}"))
    assert card["model_name"] == "carded" and card["version"] == evaluation["version"]
    assert card["dag_run_id"] == "card-run" and card["classes"] == ["negative", "positive"]
    assert card["metrics"]["accuracy"] == evaluation["metrics"]["accuracy"]
    assert card["gate"]["passed"] is True and card["gate"]["checks"][0]["name"] == "min_accuracy"
    assert card["thresholds"]["min_accuracy"] == 0.5
    assert {"epochs", "batch_size", "ngrams", "min_df", "max_tokens", "weighting"} <= set(card["parameters"])
    assert card["vocab_size"] > 0 and card["training"]["train_seconds"] > 0
    assert card["export"]["size_bytes"] > 0 and "commit" in card["code_version"]
