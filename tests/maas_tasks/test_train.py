"""Tests of device selection, the end-to-end model, temperature fitting and training runs, short and long."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from maas_tasks.evaluate import load_model, predict_scores
from maas_tasks.storage import FileStore
from maas_tasks.model import Artifact, build_classifier
from maas_tasks.train import DevicePlan, fit_temperature, make_strategy, plan_devices, select_device
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


def test_plan_devices_mirrors_over_every_gpu_and_falls_back_to_the_cpu():
    gpu1 = SimpleNamespace(name="/physical_device:GPU:1", device_type="GPU")
    assert plan_devices("auto", [CPU, GPU, gpu1]) == DevicePlan("mirrored", ("/GPU:0", "/GPU:1"))
    assert "MirroredStrategy over 2 GPUs" in plan_devices("auto", [CPU, GPU, gpu1]).describe()
    assert plan_devices("auto", [CPU, GPU]) == DevicePlan("one_device", ("/GPU:0",))
    assert plan_devices("auto", [CPU]) == DevicePlan("default", ("/CPU:0",))
    assert plan_devices("cpu", [CPU, GPU, gpu1]) == DevicePlan("default", ("/CPU:0",))
    with pytest.raises(ValueError, match="no GPU"):
        plan_devices("gpu", [CPU])


def test_make_strategy_on_this_machine_is_the_default():
    import tensorflow as tf

    strategy = make_strategy(plan_devices("auto"))
    assert strategy is tf.distribute.get_strategy() or isinstance(strategy, tf.distribute.OneDeviceStrategy)


def _toy_artifact(classes=("neg", "pos")) -> Artifact:
    vocabulary = ["good", "bad", "film", "not good"]
    kernel = np.zeros((len(vocabulary) + 1, len(classes)), dtype=np.float32)
    kernel[1, -1], kernel[2, 0], kernel[4, 0] = 3.0, 3.0, 5.0  # good -> last class; bad, "not good" -> first
    return Artifact(list(classes), 2, vocabulary, np.ones(len(vocabulary), np.float32), kernel,
                    np.zeros(len(classes), np.float32), {})


def test_classifier_takes_raw_strings_and_stays_sparse():
    import tensorflow as tf

    model = build_classifier(_toy_artifact())
    scores = model(tf.constant(["A GOOD film!", "not good <br /> at all", "unknown words only", ""])).numpy()
    assert scores.shape == (4, 2)
    assert scores.sum(axis=1) == pytest.approx([1, 1, 1, 1], abs=1e-5)
    assert scores[0].argmax() == 1 and scores[1].argmax() == 0
    assert scores[2] == pytest.approx([0.5, 0.5]) and scores[3] == pytest.approx([0.5, 0.5])
    features = model.features(tf.constant(["good good film", "film"]))
    assert isinstance(features, tf.SparseTensor)
    # Presence, not counts, and unit length per row: "good" counts once.
    dense = tf.sparse.to_dense(features).numpy()
    assert dense[0, 1] == pytest.approx(dense[0, 3]) and np.linalg.norm(dense, axis=1) == pytest.approx([1, 1])


def test_served_graph_never_holds_a_dense_batch_by_vocabulary_tensor():
    import tensorflow as tf

    model = build_classifier(_toy_artifact())
    graph = tf.function(model.call).get_concrete_function(tf.TensorSpec([None], tf.string)).graph
    dense = [
        (op.type, tuple(out.shape)) for op in graph.get_operations() for out in op.outputs
        if out.shape.rank == 2 and out.shape[0] is None and out.shape[1] == model.width
    ]
    assert dense == []


@pytest.mark.slow
def test_short_training_beats_chance_and_saves_an_end_to_end_model(trained_run):
    store, trained = trained_run["store"], trained_run["trained"]
    assert trained["device"] == "/CPU:0"
    assert trained["key"] == trained["prefix"]
    names = ("history.json", "model.json", "vocabulary.txt", "weights.npz")
    assert store.list_keys(trained["prefix"]) == [f"{trained['prefix']}/{n}" for n in names]
    history = trained["history"]
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]
    assert history["accuracy"][-1] > 0.7  # balanced classes: chance is 0.5
    record = json.loads(store.get_bytes(f"{trained['prefix']}/history.json"))
    assert record["classes"] == ["negative", "positive"]
    assert record["features_key"] == trained_run["features"]["key"]

    model = load_model(store, trained["key"])
    probes = ["The acting was brilliant. I loved the story.", "The acting was dull. I hated the story."]
    scores = predict_scores(model, probes)
    assert scores.argmax(axis=1).tolist() == [1, 0]


@pytest.mark.slow
def test_training_is_reproducible(trained_run):
    from maas_tasks.train import train_model

    store = trained_run["store"]
    again = train_model(store, trained_run["features"]["key"], epochs=2, batch_size=16, device="cpu")
    assert again["key"] == trained_run["trained"]["key"]
    assert again["history"] == trained_run["trained"]["history"]  # identical, not merely close


@pytest.mark.slow
def test_long_training_keeps_scores_calibrated(tmp_path):
    """Many epochs on easy data once drove the weights up until most scores were exactly 1.0."""
    from maas_tasks.clean import clean_snapshot
    from maas_tasks.features import build_features
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.train import train_model

    store = FileStore(tmp_path / "store")
    snapshot = put_parquet(store, "snapshots/t/data.parquet", generate_reviews(2500, seed=3))
    cleaned = clean_snapshot(store, snapshot, text_col="text", label_col="label", group_col="movie_id",
                             validation_fraction=0.2)
    features = build_features(store, cleaned["key"], max_tokens=5000)
    trained = train_model(store, features["key"], epochs=20, device="cpu")

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
    # The validation rows are the clean stage's: whole movies, none of them in the train or test split.
    assert record["calibration"]["calibration_rows"] == features["validation_rows"] > 200
    assert record["calibration"]["temperature"] == trained["temperature"] != 1.0
    # C was chosen on the validation side (the lowest validation loss of the grid's fits) and recorded.
    selection = record["c_selection"]
    assert len(selection) >= 2 and float(min(selection, key=selection.get)) == record["params"]["c"]
    assert record["refit_history"]["loss"]  # the shipped model was refitted on every train row


def test_the_validation_rows_are_the_split_columns():
    from maas_tasks.train import MIN_CALIBRATION_ROWS, _split_validation

    n = MIN_CALIBRATION_ROWS
    train_side = pd.DataFrame({"text": [f"t{i}" for i in range(3 * n)], "label": ["a", "b"] * (3 * n // 2),
                               "split": ["train", "validation", "train"] * n})
    fit, validation = _split_validation(train_side)
    assert set(fit["split"]) == {"train"} and set(validation["split"]) == {"validation"}
    assert (len(fit), len(validation)) == (2 * n, n)
    # Too few validation rows for a temperature: every row is fitted on, none held out.
    few = train_side.head(n)
    fit, validation = _split_validation(few)
    assert len(fit) == n and validation.empty
    fit, validation = _split_validation(train_side.drop(columns="split"))
    assert len(fit) == 3 * n and validation.empty


def test_each_epoch_is_logged_with_its_losses_accuracies_and_time(caplog):
    from maas_tasks.train import _log_epoch

    seconds: list[float] = []
    with caplog.at_level(logging.INFO, logger="maas_tasks.train"):
        seconds.append(2.0)
        _log_epoch("epoch", 1, 3, {"loss": 0.61234, "accuracy": 0.7, "val_loss": 0.5, "val_accuracy": 0.75}, seconds)
        seconds.append(4.0)
        _log_epoch("epoch", 2, 3, {"loss": 0.4, "accuracy": 0.8}, seconds)
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "epoch 1/3: loss 0.6123, accuracy 0.7000; validation loss 0.5000, accuracy 0.7500 (2.0 s; at most 4 s left)"
    assert second == "epoch 2/3: loss 0.4000, accuracy 0.8000 (4.0 s; at most 3 s left)"


def _separable(n: int = 400, width: int = 30, seed: int = 0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    dense = (rng.random((n, width)) < 0.2) * rng.random((n, width))
    dense[np.arange(n), y] += 1.0  # column k speaks for class k
    return tf.sparse.from_dense(dense.astype(np.float32)), y


def test_fit_softmax_learns_converges_and_regularises():
    from maas_tasks.train import _fit_softmax

    x, y = _separable()
    plan = DevicePlan("default", ("/CPU:0",))
    kernel, bias, history, stopped = _fit_softmax(plan, x, y, n_classes=3, c=10.0, epochs=20)
    assert kernel.shape == (30, 3) and bias.shape == (3,) and kernel.dtype == np.float32
    assert history["accuracy"][-1] > 0.95 and stopped == "converged"
    assert len(history["loss"]) < 20  # converged before the last epoch, and stopped there
    strong, *_ = _fit_softmax(plan, x, y, n_classes=3, c=0.01, epochs=20)
    assert np.linalg.norm(strong) < 0.5 * np.linalg.norm(kernel)  # a smaller C shrinks the weights


def test_fit_softmax_stops_when_the_validation_loss_stops_improving(monkeypatch):
    from maas_tasks import train
    from maas_tasks.train import _fit_softmax

    monkeypatch.setattr(train, "ITERATIONS_PER_EPOCH", 1)  # epochs short enough to see the loss turn
    x, y = _separable(seed=1)
    noise = np.random.default_rng(2).integers(0, 3, len(y))  # validation labels unrelated to the features
    kernel, _, history, stopped = _fit_softmax(
        DevicePlan("default", ("/CPU:0",)), x, y, n_classes=3, c=1e6, epochs=20, validation=(x, noise), patience=1,
    )
    assert stopped == "validation loss stopped improving" and len(history["val_loss"]) < 20
    assert np.argmin(history["val_loss"]) == len(history["val_loss"]) - 2  # the best epoch's weights are kept


@pytest.mark.slow
def test_fit_softmax_under_mirrored_strategy_matches_one_device():
    """Two logical CPUs stand in for two GPUs: the rows are split between replicas and the sums reduced."""
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from maas_tasks.train import DevicePlan, _fit_softmax
        from tests.maas_tasks.test_train import _separable
        x, y = _separable()
        mirrored = DevicePlan("mirrored", ("/CPU:0", "/CPU:1"))
        k2, b2, h2, _ = _fit_softmax(mirrored, x, y, n_classes=3, c=10.0, epochs=3)
        k1, b1, h1, _ = _fit_softmax(DevicePlan("default", ("/CPU:0",)), x, y, n_classes=3, c=10.0, epochs=3)
        np.testing.assert_allclose(k2, k1, atol=1e-4)
        np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-6)
        print("replicas ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("replicas ok")


def test_fit_side_weights_are_the_weights_counted_without_the_validation_rows():
    import tensorflow as tf

    from maas_tasks.features import fit_vectorizer
    from maas_tasks.train import featurize, fit_side_weights

    texts = ["good film", "good plot", "bad film", "bad plot", "good good", "bad acting", "good acting", "bad bad"]
    labels = ["pos", "pos", "neg", "neg", "pos", "neg", "pos", "neg"]
    everything = fit_vectorizer(texts, labels, ["neg", "pos"], ngrams=1, min_df=1)
    vectorizer = {**everything, "classes": ["neg", "pos"]}
    model = build_classifier(Artifact(["neg", "pos"], 1, everything["vocabulary"], everything["term_weights"],
                                      np.zeros((len(everything["vocabulary"]) + 1, 2), np.float32), np.zeros(2, np.float32), {}))
    held = featurize(model, texts[6:])
    weights = fit_side_weights(vectorizer, held, np.array([1, 0]))
    # The same as counting the first six texts alone, on the same vocabulary.
    alone = fit_vectorizer(texts[:6], labels[:6], ["neg", "pos"], ngrams=1, min_df=1)
    expected = dict(zip(alone["vocabulary"], alone["term_weights"]))
    got = dict(zip(everything["vocabulary"], weights))
    assert got == pytest.approx({token: expected.get(token, got[token]) for token in got})
    assert isinstance(held, tf.SparseTensor)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sampled_labels(logits: np.ndarray, temperature: np.ndarray | float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cumulative = _softmax(logits / np.reshape(temperature, (-1, 1))).cumsum(axis=1)
    return (cumulative > rng.random((len(logits), 1))).argmax(axis=1)


def test_fit_temperature_recovers_the_temperature_of_the_data():
    logits = np.random.default_rng(0).normal(scale=4.0, size=(20000, 3))
    labels = _sampled_labels(logits, 2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(logits / 2.5, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_is_bounded_and_checks_shapes():
    separable = np.array([[2.0, -2.0], [-1.0, 1.0]])
    assert fit_temperature(separable, [0, 1]) == pytest.approx(0.1, rel=1e-3)
    assert fit_temperature(separable, [1, 0]) == pytest.approx(10.0, rel=1e-3)
    with pytest.raises(ValueError, match="n x K logits"):
        fit_temperature(np.zeros((2, 2)), [0])


def test_length_calibration_recovers_a_temperature_that_grows_for_short_texts():
    from maas_tasks.train import fit_length_calibration

    rng = np.random.default_rng(1)
    known = rng.integers(2, 400, 20000)
    true_a, true_b = 0.2, 4.0
    temperature = np.exp(true_a + true_b / np.sqrt(1.0 + known))
    logits = rng.normal(scale=5.0, size=(len(known), 2))
    labels = _sampled_labels(logits, temperature)
    a, b = fit_length_calibration(logits, known, labels)
    assert a == pytest.approx(true_a, abs=0.1) and b == pytest.approx(true_b, rel=0.15)


def test_deterministic_ops_only_on_the_cpu():
    from maas_tasks.train import deterministic_ops

    # TensorFlow has no deterministic GPU kernel for sparse matmuls: switching determinism on there fails the fit.
    assert deterministic_ops(plan_devices("auto", [CPU])) is True
    assert deterministic_ops(plan_devices("auto", [CPU, GPU])) is False
    assert deterministic_ops(plan_devices("auto", [CPU, GPU, SimpleNamespace(name="g1", device_type="GPU")])) is False


def test_served_temperature_stays_within_its_bounds():
    import tensorflow as tf

    from maas_tasks.model import TEMPERATURE_BOUNDS

    hot = build_classifier(Artifact(**{**_toy_artifact().__dict__, "calibration": np.array([5.0, 0.0], np.float32)}))
    cold = build_classifier(Artifact(**{**_toy_artifact().__dict__, "calibration": np.array([-5.0, 0.0], np.float32)}))
    features = hot.features(tf.constant(["good film", "bad"]))
    assert hot.temperature(features).numpy() == pytest.approx([TEMPERATURE_BOUNDS[1]] * 2)
    assert cold.temperature(features).numpy() == pytest.approx([TEMPERATURE_BOUNDS[0]] * 2)
