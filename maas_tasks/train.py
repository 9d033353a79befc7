"""Training stage: a linear TF-IDF classifier, saved as one end-to-end Keras model that takes raw strings.

The model is ``TextVectorization`` (TF-IDF, vocabulary and idf weights from the feature stage) →
L2 normalisation → dropout → a softmax ``Dense`` layer (optional L2 weight decay): a strong, fast baseline
for text classification. For speed, training vectorises in the ``tf.data`` pipeline (string ops run on
the CPU) and fits only the dense head on the selected device; the head's layers are then shared with
the end-to-end model that is saved, so serving needs no Python preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from maas_tasks.config import DEVICE_CHOICES
from maas_tasks.storage import Store

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
# Unit-length TF-IDF inputs need large weights, so a high Adam rate: on a movie-grouped split of the
# IMDB train set (20k/5k) these defaults reach ~89% eval accuracy in 5 epochs; L2 did not help there.
DEFAULT_LEARNING_RATE = 0.1
DEFAULT_L2 = 0.0


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
        import tensorflow as tf

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


def _layers(vectorizer: dict[str, Any], dropout: float, l2: float) -> tuple[Any, list[Any]]:
    import keras

    vectorize = keras.layers.TextVectorization(
        max_tokens=vectorizer["max_tokens"],
        ngrams=vectorizer["ngrams"],
        output_mode="tf_idf",
        vocabulary=vectorizer["vocabulary"],
        idf_weights=vectorizer["idf_weights"],
        name="tfidf",
    )
    head = [
        # Unit length per text: long and short reviews get comparable feature scales.
        keras.layers.UnitNormalization(name="l2_normalize"),
        keras.layers.Dropout(dropout, name="dropout"),
        keras.layers.Dense(
            len(vectorizer["classes"]),
            activation="softmax",
            kernel_regularizer=keras.regularizers.L2(l2),
            name="scores",
        ),
    ]
    return vectorize, head


def _apply(layers: list[Any], x: Any) -> Any:
    for layer in layers:
        x = layer(x)
    return x


def _end_to_end(vectorize: Any, head: list[Any]) -> Any:
    import keras

    text = keras.Input(shape=(), dtype="string", name="text")
    return keras.Model(text, _apply(head, vectorize(text)), name="tfidf_linear")


def build_model(vectorizer: dict[str, Any], *, dropout: float = 0.2, l2: float = DEFAULT_L2) -> Any:
    """The end-to-end classifier: a batch of raw strings in, class probabilities out.

    Args:
        vectorizer: the feature stage's ``vectorizer.json`` (vocabulary, idf_weights, ngrams,
            max_tokens, classes).
    """
    return _end_to_end(*_layers(vectorizer, dropout, l2))


def _read_parquet(store: Store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def model_file_key(model_key: str) -> str:
    """The ``.keras`` object of a trained model, given that key or its ``trained/<hash>`` prefix."""
    return model_key if model_key.endswith(".keras") else f"{model_key.rstrip('/')}/{MODEL_FILE}"


def train_model(
    store: Store,
    features_key: str,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    dropout: float = 0.2,
    l2: float = DEFAULT_L2,
    device: str = "auto",
    seed: int = 13,
) -> dict[str, Any]:
    """Train the classifier on ``features_key``'s train split and save it end to end.

    Writes ``trained/<hash>/model.keras`` and then ``history.json`` (per-epoch loss/accuracy on
    train and eval, the parameters and the device). The hash covers the features key (itself a
    content hash) and the training parameters, so a re-run writes the same key.

    Args:
        device: ``auto``, ``cpu`` or ``gpu`` (see :func:`select_device`).

    Returns:
        ``key`` (the ``.keras`` object), ``prefix``, ``device``, ``history`` and ``train_seconds``.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must both be at least 1")
    device_name = select_device(device)
    features_key = features_key.rstrip("/")
    vectorizer = json.loads(store.get_bytes(f"{features_key}/vectorizer.json"))
    classes = vectorizer["classes"]
    train_df = _read_parquet(store, f"{features_key}/train.parquet")
    eval_df = _read_parquet(store, f"{features_key}/eval.parquet")
    keras.utils.set_random_seed(seed)

    vectorize, head = _layers(vectorizer, dropout, l2)
    n_features = vectorize.vocabulary_size()

    def dataset(df: pd.DataFrame, shuffle: bool) -> tf.data.Dataset:
        labels = np.asarray([classes.index(label) for label in df["label"]], dtype=np.int32)
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(df["text"].tolist(), dtype=tf.string), labels))
        if shuffle:
            ds = ds.shuffle(len(df), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(lambda text, y: (vectorize(text), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    features_in = keras.Input(shape=(n_features,), name="tfidf_features")
    trainer = keras.Model(features_in, _apply(head, features_in))
    trainer.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    validation = dataset(eval_df, shuffle=False) if len(eval_df) else None
    started = time.perf_counter()
    with tf.device(device_name):
        # shuffle=False: the tf.data pipeline already reshuffles every epoch.
        fitted = trainer.fit(
            dataset(train_df, shuffle=True), validation_data=validation, epochs=epochs, shuffle=False, verbose=0
        )
    train_seconds = time.perf_counter() - started
    history = {name: [float(v) for v in values] for name, values in fitted.history.items()}

    model = _end_to_end(vectorize, head)
    params = {
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "dropout": dropout,
        "l2": l2, "seed": seed,
    }
    digest = hashlib.sha256(json.dumps({"features": features_key, **params}, sort_keys=True).encode())
    prefix = f"trained/{digest.hexdigest()[:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        model.save(path)
        store.put_file(f"{prefix}/{MODEL_FILE}", path)
    record = {
        "history": history, "params": params, "device": device_name, "train_seconds": train_seconds,
        "features_key": features_key, "classes": classes,
    }
    store.put_bytes(f"{prefix}/{HISTORY_FILE}", json.dumps(record, indent=2).encode())
    return {
        "key": f"{prefix}/{MODEL_FILE}",
        "prefix": prefix,
        "device": device_name,
        "history": history,
        "train_seconds": train_seconds,
    }
