"""Training stage: a linear TF-IDF classifier, saved as one end-to-end Keras model that takes raw strings.

The model is ``TextVectorization`` (TF-IDF, vocabulary and idf weights from the feature stage) →
binary term frequency → L2 normalisation → a softmax ``Dense`` layer: a strong, fast baseline for text
classification. Training vectorises the texts once (a sparse matrix) and fits only the ``Dense`` layer
on the selected device, which is then shared with the end-to-end model that is saved, so serving needs
no Python preprocessing.

The scores are meant to be read as probabilities, so training aims at calibration as well as accuracy:
decoupled weight decay keeps the weights (and so the scores of short texts) bounded, and when the train
side is large enough a slice of it is held out to fit a temperature that is folded into the ``Dense``
layer (Guo et al. 2017, "On Calibration of Modern Neural Networks").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maas_tasks.config import DEVICE_CHOICES
from maas_tasks.features import OOV_TOKEN, split_frame
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
# Measured on a movie-grouped split of the IMDB train set (20k/5k, 20k tokens, 5 epochs of 64): unit-length
# inputs need a high Adam rate to learn in few steps (the 400-row sample), and a plain L2 penalty does not
# hold back the weights of rare terms under Adam; decoupled decay does (Loshchilov & Hutter 2019).
DEFAULT_LEARNING_RATE = 0.1
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_CALIBRATION_FRACTION = 0.1
# Below this many held-out rows a fitted temperature is noise (and a separable slice drives it to zero).
MIN_CALIBRATION_ROWS = 200
_TEMPERATURE_BOUNDS = (0.1, 10.0)


def select_device(preference: str = "auto", devices: Sequence[Any] | None = None) -> str:
    """Pick the TensorFlow device to train on.

    Args:
        preference: ``auto`` (GPU when there is one), ``gpu`` (must have one) or ``cpu``.
        devices: the physical devices to choose from (objects with ``device_type`` or names such as
            ``/physical_device:GPU:0``); default ``tf.config.list_physical_devices()``.

    Returns:
        ``"/GPU:0"`` or ``"/CPU:0"``.

    Raises:
        ValueError: ``preference`` is not one of auto, cpu, gpu, or it is gpu and no GPU is visible.
    """
    preference = preference.strip().lower()
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device preference {preference!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if preference == "cpu":
        return "/CPU:0"
    if devices is None:
        tf = import_tensorflow()

        devices = tf.config.list_physical_devices()
    has_gpu = any("GPU" in str(getattr(d, "device_type", d)).upper() for d in devices)
    if has_gpu:
        return "/GPU:0"
    if preference == "gpu":
        raise ValueError(
            "device 'gpu' was requested but TensorFlow sees no GPU (visible devices: "
            f"{', '.join(str(getattr(d, 'name', d)) for d in devices) or 'none'}); install the CUDA build "
            "of TensorFlow and the NVIDIA driver, or use device 'auto' or 'cpu'"
        )
    return "/CPU:0"


def _feature_layers(vectorizer: dict[str, Any]) -> list[Any]:
    """Raw strings → unit-length binary TF-IDF vectors: the layers every model built here starts with."""
    import_tensorflow()
    import keras

    # Index 0 is the out-of-vocabulary bucket. Keras would give it the mean idf, and as it counts every
    # unknown word and bigram it dominated long reviews' norms and shrank the real terms (so the head
    # needed huge weights, which saturated the scores of short texts): idf 0 leaves it out.
    idf = np.asarray([0.0, *vectorizer["idf_weights"]], dtype=np.float32)
    zeros = np.zeros_like(idf)
    return [
        keras.layers.TextVectorization(
            max_tokens=vectorizer["max_tokens"],
            ngrams=vectorizer["ngrams"],
            output_mode="tf_idf",
            vocabulary=[OOV_TOKEN, *vectorizer["vocabulary"]],
            idf_weights=idf,
            name="tfidf",
        ),
        # Binary term frequency (a term counts once, weighted by its idf) suits sentiment better than raw
        # counts (Wang & Manning 2012; +0.6 accuracy points on IMDB here). TextVectorization has no such
        # mode, so: divide by idf to get the counts, cap them at 1, multiply by idf again.
        keras.layers.Normalization(mean=zeros, variance=idf**2, name="term_counts"),
        keras.layers.ReLU(max_value=1.0, name="term_presence"),
        keras.layers.Normalization(mean=zeros, variance=idf**2, invert=True, name="idf_weighting"),
        # Unit length per text: long and short reviews get comparable feature scales.
        keras.layers.UnitNormalization(name="l2_normalize"),
    ]


def _scores_layer(n_classes: int) -> Any:
    import_tensorflow()
    import keras

    return keras.layers.Dense(n_classes, activation="softmax", name="scores")


def _apply(layers: list[Any], x: Any) -> Any:
    for layer in layers:
        x = layer(x)
    return x


def _end_to_end(features: list[Any], scores: Any) -> Any:
    import_tensorflow()
    import keras

    text = keras.Input(shape=(), dtype="string", name="text")
    return keras.Model(text, scores(_apply(features, text)), name="tfidf_linear")


def build_model(vectorizer: dict[str, Any]) -> Any:
    """The end-to-end classifier: a batch of raw strings in, class probabilities out.

    Args:
        vectorizer: the feature stage's ``vectorizer.json`` (vocabulary, idf_weights, ngrams,
            max_tokens, classes).
    """
    return _end_to_end(_feature_layers(vectorizer), _scores_layer(len(vectorizer["classes"])))


def _read_parquet(store: Store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def model_file_key(model_key: str) -> str:
    """The ``.keras`` object of a trained model, given that key or its ``trained/<hash>`` prefix."""
    return model_key if model_key.endswith(".keras") else f"{model_key.rstrip('/')}/{MODEL_FILE}"


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` that minimises the log loss of ``softmax(logits / T)`` on ``labels``.

    The log loss is convex in ``1/T``, so a golden-section search over ``log T`` finds its minimum;
    ``T`` is kept within [0.1, 10] so that a slice the model separates perfectly cannot push it to 0.

    Args:
        logits: n x K pre-softmax scores. labels: n class indices.

    Raises:
        ValueError: shapes disagree or there are no rows.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need n x K logits and n labels with n > 0, got {logits.shape} and {labels.shape}")
    picked = logits[np.arange(len(labels)), labels]

    def log_loss(log_t: float) -> float:
        z = logits / np.exp(log_t)
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - picked / np.exp(log_t)))

    low, high = np.log(_TEMPERATURE_BOUNDS[0]), np.log(_TEMPERATURE_BOUNDS[1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):  # shrinks the bracket by 0.618**60: far below any useful precision
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if log_loss(left) <= log_loss(right):
            high = right
        else:
            low = left
    return float(np.exp((low + high) / 2))


def _featurize(features: list[Any], texts: list[str], batch_size: int = 256) -> Any:
    """All ``texts`` through the feature layers once, as one sparse matrix (most of a row is zeros).

    Each batch is dense (texts x vocabulary, once per layer) until it is converted, so batches stay small:
    on IMDB, 1024 texts a batch cost ~0.5 GB more peak memory than 256, and were no faster.
    """
    tf = import_tensorflow()

    def to_sparse(batch: tf.Tensor) -> tf.SparseTensor:
        return tf.sparse.from_dense(_apply(features, batch))

    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(texts, dtype=tf.string)).batch(batch_size)
    return tf.sparse.concat(axis=0, sp_inputs=list(dataset.map(to_sparse, num_parallel_calls=tf.data.AUTOTUNE)))


def _epoch_logger(epochs: int) -> Any:
    """A Keras callback that logs each epoch's loss and accuracy (train and held-out) and its duration."""
    import keras

    started: list[float] = []

    def begin(epoch: int, logs: dict | None = None) -> None:
        started[:] = [time.perf_counter()]

    def end(epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        held_out = (
            f"; held-out loss {logs['val_loss']:.4f}, accuracy {logs['val_accuracy']:.4f}" if "val_loss" in logs else ""
        )
        log.info(
            "epoch %d/%d: loss %.4f, accuracy %.4f%s (%.1f s)", epoch + 1, epochs, logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")), held_out, time.perf_counter() - started[0],
        )

    return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)


def _split_calibration(train_df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out about ``fraction`` of the train side (whole groups) to fit the temperature on.

    Returns the rows to fit on and the held-out rows; the latter is empty (no temperature is fitted) when
    ``fraction`` is 0 or it would be smaller than :data:`MIN_CALIBRATION_ROWS`.
    """
    if fraction == 0 or fraction * len(train_df) < MIN_CALIBRATION_ROWS:
        return train_df, train_df.iloc[:0]
    try:
        return split_frame(train_df, eval_fraction=fraction, seed=seed + 1)
    except ValueError:  # too few groups or a rare class: calibrating is not worth losing training rows
        return train_df, train_df.iloc[:0]


def train_model(
    store: Store,
    features_key: str,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    device: str = "auto",
    seed: int = 13,
) -> dict[str, Any]:
    """Train the classifier on ``features_key``'s train split and save it end to end.

    The texts are vectorised once (sparse). The ``scores`` layer is fitted with AdamW (Adam with
    decoupled weight decay) and a learning rate that decays to zero over the run (cosine), so the last
    epochs settle instead of wandering; then, if a calibration slice was held out, its temperature is
    fitted and folded into the layer's kernel and bias (the argmax, so accuracy, does not change).
    Writes ``trained/<hash>/model.keras`` and then ``history.json`` (per-epoch loss/accuracy on train
    and eval, the temperature, the parameters and the device). The hash covers the features key (itself
    a content hash) and the training parameters, so a re-run writes the same key.

    Args:
        learning_rate: AdamW's initial learning rate.
        weight_decay: the fraction of each weight AdamW removes per step, times the learning rate.
        calibration_fraction: share of the train side held out (whole groups) to fit the temperature;
            0, or a slice under :data:`MIN_CALIBRATION_ROWS` rows, trains on all of it with temperature 1.
        device: ``auto``, ``cpu`` or ``gpu`` (see :func:`select_device`).

    Returns:
        ``key`` (the ``.keras`` object), ``prefix``, ``device``, ``history``, ``temperature`` and
        ``train_seconds``.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """
    tf = import_tensorflow()
    import keras

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must both be at least 1")
    if learning_rate <= 0 or weight_decay < 0 or not 0 <= calibration_fraction < 1:
        raise ValueError(
            f"learning_rate={learning_rate} must be positive, weight_decay={weight_decay} not negative and "
            f"calibration_fraction={calibration_fraction} in [0, 1)"
        )
    device_name = select_device(device)
    features_key = features_key.rstrip("/")
    vectorizer = json.loads(store.get_bytes(f"{features_key}/vectorizer.json"))
    classes = vectorizer["classes"]
    fit_df, calibration_df = _split_calibration(
        _read_parquet(store, f"{features_key}/train.parquet"), calibration_fraction, seed
    )
    eval_df = _read_parquet(store, f"{features_key}/eval.parquet")
    keras.utils.set_random_seed(seed)

    started = time.perf_counter()
    features = _feature_layers(vectorizer)
    # Build the layers eagerly: built inside a tf.data graph, Normalization would keep that graph's tensors.
    _apply(features, tf.constant([""]))
    scores = _scores_layer(len(classes))

    def featurize(df: pd.DataFrame) -> tuple[Any, np.ndarray]:
        labels = np.asarray([classes.index(label) for label in df["label"]], dtype=np.int32)
        return _featurize(features, df["text"].tolist()), labels

    def dataset(df: pd.DataFrame, shuffle: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(featurize(df))
        if shuffle:
            ds = ds.shuffle(len(df), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    features_in = keras.Input(shape=(features[0].vocabulary_size(),), sparse=True, name="tfidf_features")
    trainer = keras.Model(features_in, scores(features_in))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * -(-len(fit_df) // batch_size))
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    trainer.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log.info(
        "training on %s: %d rows, %d held out, %d classes, %d features; %d epochs, batch size %d",
        device_name, len(fit_df), len(eval_df), len(classes), features[0].vocabulary_size(), epochs, batch_size,
    )
    if len(calibration_df):
        log.info("%d more training rows are set aside to calibrate the scores", len(calibration_df))
    with tf.device(device_name):
        # shuffle=False: the tf.data pipeline already reshuffles every epoch.
        fitted = trainer.fit(
            dataset(fit_df, shuffle=True),
            validation_data=dataset(eval_df, shuffle=False) if len(eval_df) else None,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[_epoch_logger(epochs)],
        )
        temperature = 1.0
        if len(calibration_df):
            kernel, bias = scores.get_weights()
            x, y = featurize(calibration_df)
            logits = tf.sparse.sparse_dense_matmul(x, kernel).numpy() + bias
            temperature = fit_temperature(logits, y)
            scores.set_weights([kernel / temperature, bias / temperature])
    train_seconds = time.perf_counter() - started
    history = {name: [float(v) for v in values] for name, values in fitted.history.items()}
    log.info(
        "trained on %s: %d rows, %d epochs in %.1f s; score temperature %.3f%s", device_name, len(fit_df), epochs,
        train_seconds, temperature, "" if len(calibration_df) else " (too few rows to calibrate)",
    )

    model = _end_to_end(features, scores)
    params = {
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "weight_decay": weight_decay,
        "calibration_fraction": calibration_fraction, "seed": seed,
    }
    digest = hashlib.sha256(json.dumps({"features": features_key, **params}, sort_keys=True).encode())
    prefix = f"trained/{digest.hexdigest()[:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        model.save(path)
        store.put_file(f"{prefix}/{MODEL_FILE}", path)
    calibration = {"temperature": temperature, "fit_rows": len(fit_df), "calibration_rows": len(calibration_df)}
    record = {
        "history": history, "params": params, "calibration": calibration, "device": device_name,
        "train_seconds": train_seconds, "features_key": features_key, "classes": classes,
    }
    store.put_bytes(f"{prefix}/{HISTORY_FILE}", json.dumps(record, indent=2).encode())
    return {
        "key": f"{prefix}/{MODEL_FILE}",
        "prefix": prefix,
        "device": device_name,
        "history": history,
        "temperature": temperature,
        "train_seconds": train_seconds,
    }
