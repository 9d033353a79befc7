"""Tests of device selection, the end-to-end model, temperature fitting and training runs, short and long."""

from __future__ import annotations

import io
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from maas_tasks.evaluate import load_model, predict_scores
from maas_tasks.storage import FileStore
from maas_tasks.train import build_model, fit_temperature, model_file_key, select_device
from tests.maas_tasks.conftest import put_parquet

CPU = SimpleNamespace(name="/physical_device:CPU:0", device_type="CPU")
GPU = SimpleNamespace(name="/physical_device:GPU:0", device_type="GPU")


@pytest.mark.parametrize(
    ("preference", "devices", "expected"),
    [
        ("auto", [CPU, GPU], "/GPU:0"),
        ("gpu", [CPU, GPU], "/GPU:0"),
        ("cpu", [CPU, GPU], "/CPU:0"),
        ("auto", [CPU], "/CPU:0"),
        ("AUTO", ["/physical_device:GPU:0"], "/GPU:0"),
    ],
)
def test_select_device(preference, devices, expected):
    assert select_device(preference, devices) == expected


def test_select_device_gpu_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPU .*/physical_device:CPU:0.*'auto' or 'cpu'"):
        select_device("gpu", [CPU])
    with pytest.raises(ValueError, match="not one of auto, cpu, gpu"):
        select_device("tpu", [CPU])


def test_select_device_reads_tensorflow_devices():
    assert select_device("auto") in ("/CPU:0", "/GPU:0")


def test_build_model_takes_raw_strings():
    import tensorflow as tf

    vectorizer = {
        "vocabulary": ["good", "bad", "film"], "idf_weights": [1.0, 1.2, 0.5], "ngrams": 1, "max_tokens": 10,
        "classes": ["a", "b", "c"],
    }
    model = build_model(vectorizer)
    scores = model(tf.constant(["good film", "unknown words only", ""])).numpy()
    assert scores.shape == (3, 3)
    assert scores.sum(axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    assert model.input.dtype == "string"


def test_features_count_each_known_term_once_and_ignore_unknown_words():
    import keras
    import tensorflow as tf

    vectorizer = {
        "vocabulary": ["good", "bad", "film"], "idf_weights": [1.0, 1.2, 0.5], "ngrams": 1, "max_tokens": 10,
        "classes": ["neg", "pos"],
    }
    model = build_model(vectorizer)
    features = keras.Model(model.input, model.get_layer("l2_normalize").output)
    out = features(tf.constant(["good film", "good good film zzz qqq www", "zzz qqq", ""])).numpy()
    # Columns: out-of-vocabulary bucket, good, bad, film; binary tf times idf, then unit length.
    np.testing.assert_allclose(out[0], np.array([0, 1.0, 0, 0.5]) / np.hypot(1.0, 0.5), atol=1e-6)
    np.testing.assert_allclose(out[1], out[0], atol=1e-6)
    assert not out[2].any() and not out[3].any()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_fit_temperature_recovers_the_temperature_of_the_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 3))
    cumulative = _softmax(logits / 2.5).cumsum(axis=1)
    labels = (cumulative > rng.random((len(logits), 1))).argmax(axis=1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(logits / 2.5, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_is_bounded_and_checks_shapes():
    separable = np.array([[2.0, -2.0], [-1.0, 1.0]])
    assert fit_temperature(separable, [0, 1]) == pytest.approx(0.1, rel=1e-3)
    assert fit_temperature(separable, [1, 0]) == pytest.approx(10.0, rel=1e-3)
    with pytest.raises(ValueError, match="n x K logits"):
        fit_temperature(np.zeros((2, 2)), [0])


def test_model_file_key():
    assert model_file_key("trained/abc") == "trained/abc/model.keras"
    assert model_file_key("trained/abc/model.keras") == "trained/abc/model.keras"


@pytest.mark.slow
def test_short_training_beats_chance_and_saves_an_end_to_end_model(trained_run):
    store, trained = trained_run["store"], trained_run["trained"]
    assert trained["device"] == "/CPU:0"
    assert trained["key"] == f"{trained['prefix']}/model.keras"
    assert store.list_keys(trained["prefix"]) == [f"{trained['prefix']}/{n}" for n in ("history.json", "model.keras")]
    history = trained["history"]
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]
    assert history["val_accuracy"][-1] > 0.7  # balanced classes: chance is 0.5
    record = json.loads(store.get_bytes(f"{trained['prefix']}/history.json"))
    assert record["classes"] == ["negative", "positive"]
    assert record["features_key"] == trained_run["features"]["key"]

    model = load_model(store, trained["key"])
    probes = ["The acting was brilliant. I loved the story.", "The acting was dull. I hated the story."]
    scores = predict_scores(model, probes)
    assert scores.argmax(axis=1).tolist() == [1, 0]


@pytest.mark.slow
def test_training_is_reproducible_with_a_seed(trained_run):
    from maas_tasks.train import train_model

    store = trained_run["store"]
    again = train_model(store, trained_run["features"]["key"], epochs=2, batch_size=16, device="cpu")
    assert again["key"] == trained_run["trained"]["key"]
    assert again["history"]["loss"] == pytest.approx(trained_run["trained"]["history"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_long_training_keeps_scores_calibrated(tmp_path):
    """Many epochs on easy data once drove the weights up until most scores were exactly 1.0."""
    from maas_tasks.clean import clean_snapshot
    from maas_tasks.features import build_features
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.train import train_model

    store = FileStore(tmp_path / "store")
    snapshot = put_parquet(store, "snapshots/t/data.parquet", generate_reviews(2500, seed=3))
    cleaned = clean_snapshot(store, snapshot, text_col="text", label_col="label", group_col="movie_id")
    features = build_features(store, cleaned["key"], max_tokens=5000)
    trained = train_model(store, features["key"], epochs=20, calibration_fraction=0.2, device="cpu")

    eval_df = pd.read_parquet(io.BytesIO(store.get_bytes(f"{features['key']}/eval.parquet")))
    scores = predict_scores(load_model(store, trained["key"]), eval_df["text"].tolist())
    truth = (eval_df["label"] == "positive").to_numpy().astype(int)
    confidence = scores.max(axis=1)
    accuracy = float((scores.argmax(axis=1) == truth).mean())
    log_loss = float(-np.log(scores[np.arange(len(truth)), truth]).mean())
    assert accuracy > 0.85
    # Before the fix: log loss 0.54 and 28% of the eval reviews scored above 0.9999.
    assert np.isfinite(log_loss) and log_loss < 0.4
    assert (confidence > 0.999).mean() < 0.01
    assert abs(confidence.mean() - accuracy) < 0.05

    record = json.loads(store.get_bytes(f"{trained['prefix']}/history.json"))
    assert record["calibration"]["calibration_rows"] > 200
    assert record["calibration"]["temperature"] == trained["temperature"] != 1.0


def test_each_epoch_is_logged_with_its_losses_accuracies_and_time(caplog):
    from maas_tasks.train import _epoch_logger

    callback = _epoch_logger(epochs=3)
    with caplog.at_level(logging.INFO, logger="maas_tasks.train"):
        callback.on_epoch_begin(0)
        callback.on_epoch_end(0, {"loss": 0.61234, "accuracy": 0.7, "val_loss": 0.5, "val_accuracy": 0.75})
        callback.on_epoch_begin(1)
        callback.on_epoch_end(1, {"loss": 0.4, "accuracy": 0.8})  # no held-out rows
    first, second = (r.getMessage() for r in caplog.records)
    assert re.fullmatch(
        r"epoch 1/3: loss 0.6123, accuracy 0.7000; held-out loss 0.5000, accuracy 0.7500 \(\d+\.\d s\)", first
    )
    assert re.fullmatch(r"epoch 2/3: loss 0.4000, accuracy 0.8000 \(\d+\.\d s\)", second)
