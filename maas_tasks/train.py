"""Training stage: fit the linear layer of the served n-gram model (:mod:`maas_tasks.model`) on the train split.

The texts are featurised once, with the served model's own ``features`` (sparse, weighted n-gram presence
of unit length), and a softmax layer over them is fitted with SGD and Nesterov momentum (on unit-length
sparse features it generalises better than Adam, whose per-weight step sizes let rare n-grams grow as fast
as common ones: docs/model.md). A slice of the train side (whole groups) is held out as the validation
side: training stops early when its loss stops improving and keeps the best epoch, and a temperature is
fitted on it (Guo et al. 2017), so scores read as probabilities: a length-aware one, fitted on the
validation texts and on their first words, because one temperature leaves short texts overconfident.

Runs are deterministic (seeded shuffling, TensorFlow's deterministic ops). On a machine with several
GPUs the layer is trained under ``tf.distribute.MirroredStrategy``, on one GPU on that GPU, else on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from maas_tasks.config import DEVICE_CHOICES
from maas_tasks.features import load_vectorizer, split_frame
from maas_tasks.model import Artifact, build_classifier, first_words, save_artifact
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
# SGD's learning rate is this over the features' curvature (see curvature()). Measured on a movie-disjoint
# IMDB split (curvature ~0.009): rates of 4 to 8 reach the best validation loss in 2 to 4 epochs; on small
# templated data (curvature ~0.09) the same product keeps the first epochs from overshooting.
STEP_PER_CURVATURE = 0.075
MAX_LEARNING_RATE = 100.0
# Tiny data still gets this many SGD steps per epoch (the data repeated), or a few epochs are too few steps.
MIN_STEPS_PER_EPOCH = 20
MOMENTUM = 0.9
WARMUP_EPOCHS = 0.0
DEFAULT_PATIENCE = 1
DEFAULT_CALIBRATION_FRACTION = 0.1
# Below this many held-out rows a fitted temperature is noise (and a separable slice drives it to zero).
MIN_CALIBRATION_ROWS = 200
_TEMPERATURE_BOUNDS = (0.1, 10.0)
# The validation texts are also cut to their first words at these lengths to fit the length-aware temperature.
CALIBRATION_PREFIX_WORDS = (6, 12, 25, 50)


@dataclass(frozen=True)
class DevicePlan:
    """Where training runs: ``strategy`` is ``mirrored`` (all GPUs), ``one_device`` (one GPU) or ``default``."""

    strategy: str
    devices: tuple[str, ...]

    def describe(self) -> str:
        if self.strategy == "mirrored":
            return f"MirroredStrategy over {len(self.devices)} GPUs ({', '.join(self.devices)})"
        return self.devices[0]


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


def plan_devices(preference: str = "auto", devices: Sequence[Any] | None = None) -> DevicePlan:
    """The distribution strategy and devices to train on (see :func:`select_device` for ``preference``).

    Several GPUs: ``MirroredStrategy`` over all of them (each step's batch is split between them and the
    gradients summed). Mixed precision is not used: a sparse linear layer is bound by memory traffic, not
    arithmetic, and float16 sparse matmuls are not supported on every device.
    """
    device = select_device(preference, devices)
    if device == "/CPU:0":
        return DevicePlan("default", ("/CPU:0",))
    if devices is None:
        tf = import_tensorflow()

        devices = tf.config.list_physical_devices("GPU")
    gpus = [d for d in devices if "GPU" in str(getattr(d, "device_type", d)).upper()]
    names = tuple(f"/GPU:{i}" for i in range(len(gpus)))
    return DevicePlan("mirrored", names) if len(names) > 1 else DevicePlan("one_device", ("/GPU:0",))


def make_strategy(plan: DevicePlan) -> Any:
    """The ``tf.distribute`` strategy of ``plan``."""
    tf = import_tensorflow()

    if plan.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(plan.devices))
    if plan.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy(plan.devices[0])
    return tf.distribute.get_strategy()


def _read_parquet(store: Store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


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


def fit_length_calibration(logits: np.ndarray, known: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` minimising the log loss of ``softmax(logits / exp(a + b / sqrt(1 + known)))``.

    One temperature for every text leaves short texts overconfident: a dozen words give few n-grams, each
    of which weighs much after the unit-length scaling. ``known`` (each row's number of known n-grams) lets
    the temperature grow for short texts. Starts from the best single temperature (``b = 0``), so the fit
    is never worse than it on these rows; the temperature stays within [0.1, 10] for every length.
    """
    from scipy.optimize import minimize

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    scale = 1.0 / np.sqrt(1.0 + np.asarray(known, dtype=np.float64))
    picked = logits[np.arange(len(labels)), labels]
    low, high = np.log(_TEMPERATURE_BOUNDS[0]), np.log(_TEMPERATURE_BOUNDS[1])

    def log_loss(params: np.ndarray) -> float:
        log_t = np.clip(params[0] + params[1] * scale, low, high)
        z = logits / np.exp(log_t)[:, None]
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - picked / np.exp(log_t)))

    start = np.array([np.log(fit_temperature(logits, labels)), 0.0])
    best = minimize(log_loss, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 400})
    a, b = (best.x if best.fun <= log_loss(start) else start).tolist()
    return float(a), float(b)


def _schedule(learning_rate: float, steps: int, warmup: int) -> Any:
    """Linear warm-up over ``warmup`` steps to ``learning_rate``, then cosine decay to 0."""
    import keras

    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, warmup_target=learning_rate, warmup_steps=warmup
    )


def curvature(x: Any, iterations: int = 20) -> float:
    """The largest eigenvalue of ``XᵀX / n`` for the sparse feature matrix ``x`` (power iteration).

    It measures how much a step on one text moves the scores of the others: large when texts share many
    n-grams (small templated data), small for long varied texts over a big vocabulary. Dividing the learning
    rate by it makes one default work on both (the step that suits logistic regression is ~1/curvature).
    """
    tf = import_tensorflow()

    n = tf.cast(x.dense_shape[0], tf.float32)
    u = tf.fill([tf.cast(x.dense_shape[1], tf.int32), 1], 1.0)
    value = tf.constant(0.0)
    for _ in range(iterations):
        w = tf.sparse.sparse_dense_matmul(x, tf.sparse.sparse_dense_matmul(x, u), adjoint_a=True) / n
        value = tf.norm(w)
        if float(value) == 0.0:
            return 0.0
        u = w / value
    return float(value)


def featurize(model: Any, texts: Sequence[str], batch_size: int = 512) -> Any:
    """``texts`` through the model's own ``features``, as one ``[len(texts), V + 1]`` SparseTensor."""
    tf = import_tensorflow()

    parts = [
        model.features(tf.constant(list(texts[start:start + batch_size]), dtype=tf.string))
        for start in range(0, len(texts), batch_size)
    ]
    if not parts:
        return tf.SparseTensor(tf.zeros([0, 2], tf.int64), tf.zeros([0]), [0, model.width])
    return tf.sparse.concat(axis=0, sp_inputs=parts)


def _epoch_logger(epochs: int, has_validation: bool) -> Any:
    """A Keras callback logging each epoch's loss and accuracy (train and validation), its time and the time left."""
    import keras

    started: list[float] = []
    durations: list[float] = []

    def begin(epoch: int, logs: dict | None = None) -> None:
        started[:] = [time.perf_counter()]

    def end(epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        durations.append(time.perf_counter() - started[0])
        validation = (
            f"; validation loss {logs['val_loss']:.4f}, accuracy {logs['val_accuracy']:.4f}" if has_validation else ""
        )
        left = (epochs - epoch - 1) * float(np.mean(durations))
        log.info(
            "epoch %d/%d: loss %.4f, accuracy %.4f%s (%.1f s; at most %.0f s left)", epoch + 1, epochs,
            logs.get("loss", float("nan")), logs.get("accuracy", float("nan")), validation, durations[-1], left,
        )

    return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)


def _split_calibration(train_df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out about ``fraction`` of the train side (whole groups) as the validation side.

    Returns the rows to fit on and the held-out rows; the latter is empty (no early stopping, no
    temperature) when ``fraction`` is 0 or it would be smaller than :data:`MIN_CALIBRATION_ROWS`.
    """
    if fraction == 0 or fraction * len(train_df) < MIN_CALIBRATION_ROWS:
        return train_df, train_df.iloc[:0]
    try:
        return split_frame(train_df, eval_fraction=fraction, seed=seed + 1)
    except ValueError:  # too few groups or a rare class: calibrating is not worth losing training rows
        return train_df, train_df.iloc[:0]


def _labels(df: pd.DataFrame, classes: list[Any]) -> np.ndarray:
    index = {label: i for i, label in enumerate(classes)}
    return np.asarray([index[label] for label in df["label"]], dtype=np.int32)


def train_model(
    store: Store,
    features_key: str,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float | None = None,
    patience: int = DEFAULT_PATIENCE,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    device: str = "auto",
    seed: int = 13,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Train the classifier on ``features_key``'s train split and store it (``trained/<hash>/``).

    Writes the model (:func:`maas_tasks.model.save_artifact`) and then ``history.json`` (per-epoch loss and
    accuracy, the epoch kept, the temperature, the parameters, the device). The hash covers the features key
    (itself a content hash) and the training parameters, so a re-run writes the same prefix.

    Args:
        epochs: the most epochs to run; fewer when the validation loss stops improving for ``patience``.
        learning_rate: SGD's initial rate (cosine decay to 0); default :data:`STEP_PER_CURVATURE` over the
            features' :func:`curvature` (recorded with the model).
        calibration_fraction: share of the train side held out (whole groups) for early stopping and the
            temperature; 0, or a slice under :data:`MIN_CALIBRATION_ROWS` rows, trains on all of it for every
            epoch with temperature 1.
        device: ``auto``, ``cpu`` or ``gpu`` (see :func:`select_device`); ``devices`` injects the device list.

    Returns:
        ``key`` (the ``trained/<hash>`` prefix), ``device``, ``history``, ``best_epoch``, ``temperature`` and
        ``train_seconds``.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """
    tf = import_tensorflow()
    import keras

    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size} and patience={patience} must all be at least 1")
    if (learning_rate is not None and learning_rate <= 0) or not 0 <= calibration_fraction < 1:
        raise ValueError(
            f"learning_rate={learning_rate} must be positive and calibration_fraction={calibration_fraction} in [0, 1)"
        )
    plan = plan_devices(device, devices)
    features_key = features_key.rstrip("/")
    vectorizer = load_vectorizer(store, features_key)
    classes = vectorizer["classes"]
    fit_df, validation_df = _split_calibration(
        _read_parquet(store, f"{features_key}/train.parquet"), calibration_fraction, seed
    )
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()

    started = time.perf_counter()
    artifact = Artifact(
        classes=[str(c) for c in classes], ngrams=int(vectorizer["ngrams"]), vocabulary=vectorizer["vocabulary"],
        term_weights=np.asarray(vectorizer["term_weights"], dtype=np.float32),
        kernel=np.zeros((len(vectorizer["vocabulary"]) + 1, len(classes)), dtype=np.float32),
        bias=np.zeros(len(classes), dtype=np.float32), info={},
    )
    model = build_classifier(artifact)
    fit_x, fit_y = featurize(model, fit_df["text"].tolist()), _labels(fit_df, classes)
    has_validation = len(validation_df) > 0
    validation = (featurize(model, validation_df["text"].tolist()), _labels(validation_df, classes))
    featurize_seconds = time.perf_counter() - started
    if learning_rate is None:
        learning_rate = min(MAX_LEARNING_RATE, STEP_PER_CURVATURE / max(curvature(fit_x), 1e-9))

    def dataset(x: Any, y: np.ndarray, shuffle: bool, repeat: int = 1) -> Any:
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        return ds.repeat(repeat).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    log.info(
        "training on %s: %d rows (featurised in %.1f s), %d for validation, %d classes, %d n-gram features; at most "
        "%d epochs, batch size %d, learning rate %g", plan.describe(), len(fit_df), featurize_seconds,
        len(validation_df), len(classes), model.width - 1, epochs, batch_size, learning_rate,
    )
    with make_strategy(plan).scope():
        inputs = keras.Input(shape=(model.width,), sparse=True, name="features")
        scores = keras.layers.Dense(len(classes), activation="softmax", kernel_initializer="zeros", name="scores")
        trainer = keras.Model(inputs, scores(inputs))
        batches = max(1, -(-len(fit_df) // batch_size))
        repeat = -(-MIN_STEPS_PER_EPOCH // batches)
        steps_per_epoch = -(-len(fit_df) * repeat // batch_size)
        steps = epochs * steps_per_epoch
        warmup = min(steps // 2, int(WARMUP_EPOCHS * steps_per_epoch))
        trainer.compile(
            optimizer=keras.optimizers.SGD(
                _schedule(learning_rate, steps, warmup), momentum=MOMENTUM, nesterov=True
            ),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    callbacks = [_epoch_logger(epochs, has_validation)]
    stopper = None
    if has_validation:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        callbacks.append(stopper)
    fitted = trainer.fit(
        dataset(fit_x, fit_y, shuffle=True, repeat=repeat),
        validation_data=dataset(*validation, shuffle=False) if has_validation else None,
        epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks,
    )
    history = {name: [float(v) for v in values] for name, values in fitted.history.items()}
    best_epoch = len(history["loss"])
    if has_validation:
        best_epoch = int(np.argmin(history["val_loss"])) + 1
    kernel, bias = (np.asarray(w) for w in scores.get_weights())
    calibration = np.zeros(2, dtype=np.float32)
    calibration_rows = 0
    if has_validation:
        # The validation texts and their first words: the temperature must also fit short inputs.
        texts, labels = validation_df["text"].tolist(), validation[1]
        xs = [validation[0], *(featurize(model, first_words(texts, n)) for n in CALIBRATION_PREFIX_WORDS)]
        logits = np.concatenate([tf.sparse.sparse_dense_matmul(x, kernel).numpy() + bias for x in xs])
        known = np.concatenate([
            tf.math.unsorted_segment_sum(tf.ones_like(x.values), x.indices[:, 0], x.dense_shape[0]).numpy() for x in xs
        ])
        calibration = np.asarray(fit_length_calibration(logits, known, np.tile(labels, len(xs))), dtype=np.float32)
        calibration_rows = len(known)
    temperature = float(np.exp(calibration[0]))
    train_seconds = time.perf_counter() - started
    stopped = stopper is not None and stopper.stopped_epoch > 0
    log.info(
        "trained on %s: %d rows, %d epoch(s)%s, kept epoch %d, in %.1f s; score temperature %.3f for long texts, "
        "%.3f for 10 n-grams%s", plan.describe(), len(fit_df), len(history["loss"]),
        " (stopped early: validation loss stopped improving)" if stopped else "", best_epoch, train_seconds,
        temperature, float(np.exp(calibration[0] + calibration[1] / np.sqrt(11.0))),
        "" if has_validation else " (too few rows to hold out a validation side)",
    )

    params = {
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience,
        "calibration_fraction": calibration_fraction, "seed": seed,
    }
    digest = hashlib.sha256(json.dumps({"features": features_key, **params}, sort_keys=True).encode())
    prefix = f"trained/{digest.hexdigest()[:16]}"
    calibration_record = {
        "temperature": temperature, "length_coefficient": float(calibration[1]), "fit_rows": len(fit_df),
        "calibration_rows": len(validation_df), "calibration_texts": calibration_rows,
    }
    info = {
        "calibration": calibration_record, "weighting": vectorizer["weighting"], "min_df": vectorizer["min_df"],
        "max_tokens": vectorizer["max_tokens"], "features_key": features_key, "params": params,
    }
    save_artifact(store, prefix, Artifact(**{
        **artifact.__dict__, "kernel": kernel, "bias": bias, "info": info, "calibration": calibration,
    }))
    record = {
        "history": history, "best_epoch": best_epoch, "params": params, "calibration": calibration_record,
        "device": plan.describe(), "train_seconds": train_seconds, "features_key": features_key, "classes": classes,
        "vocab_size": model.width - 1,
    }
    store.put_bytes(f"{prefix}/{HISTORY_FILE}", json.dumps(record, indent=2).encode())
    return {
        "key": prefix,
        "prefix": prefix,
        "device": plan.describe(),
        "history": history,
        "best_epoch": best_epoch,
        "temperature": temperature,
        "train_seconds": train_seconds,
    }
