"""Tests of device selection, the end-to-end model and a short training run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from maas_tasks.evaluate import load_model, predict_scores
from maas_tasks.train import build_model, model_file_key, select_device

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
